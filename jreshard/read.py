"""Executes copy jobs: bytes of saved chunks into the host buffers of target pieces.

A :class:`CopyJob` copies one overlap region. Jobs whose bytes are already in memory (small archives read
whole, decompressed zstd items) are plain strided copies. The others read from the store:

* both paths start alike: the runs of a file, sorted, merged where gaps are small and cut (between runs)
  near a request size, become requests; each request feeds (job, runs) parts, regular blocks of runs inside it.
* ``posix`` (local files): requests are cut near BOUNCE and merged over gaps up to LOCAL_GAP inside a chunk
  (``coalesce_gap`` between chunks, so that other tensors' bytes are not read); the pool reads
  each with ``preadv`` into a per-thread buffer (cache-sized) and copies its parts out from there (a request
  that is one run of one piece is read straight into the piece). No memory maps: a file truncated while being
  read gives a short read, hence a TruncatedDataError, where touching a map past the new end raises SIGBUS.
* ``tensorstore`` (any KvStore): requests are cut near MAX_REQUEST and merged over ``coalesce_gap``, issued
  as one batch of byte-range reads; each read is copied out on the pool as it arrives.

Chunks with a transposed layout (innermost stride != 1) are read as their span and copied element-wise.
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from .catalog import Locator
from .errors import JReshardError, TruncatedDataError
from .plan import Overlap, Runs, _grid, element_span
from .storage import LocalStore, Store

BOUNCE = 4 * 2**20  # a local read is cut (between runs) near this size: a per-thread buffer that stays in cache
LOCAL_GAP = 64 * 2**10  # local reads merge over gaps up to this: reading a small gap costs less than a syscall
MAX_REQUEST = 8 * 2**20  # a ranged read is cut (between runs) near this size: parallel requests, cache-sized copies
# Each pool thread's read buffer (``buf``), shared by executors: Checkpoint.read makes one per call, and a
# fresh buffer would cost page faults on every call. It lives as long as the thread.
_LOCAL = threading.local()


@dataclass
class CopyJob:
    """Copy ``overlap`` of a chunk located by ``locator`` into ``dest`` (the piece's C-ordered buffer)."""

    name: str
    locator: Locator
    chunk_sizes: tuple[int, ...]
    overlap: Overlap
    dest: np.ndarray
    runs: Runs | None  # None: not contiguous in the source (transposed); copied from a staged span

    @property
    def nbytes(self) -> int:
        return math.prod(self.overlap.size) * self.dest.dtype.itemsize

    def element_span(self) -> tuple[int, int]:
        """[lo, hi) bytes, relative to the locator base, that the region's elements touch."""
        return element_span(self.locator, self.overlap, self.dest.dtype.itemsize)


Feeds = list[tuple[CopyJob, Runs]]  # what one request feeds: (job, runs) parts, regular blocks of runs inside it


def _dest_u8(job: CopyJob) -> np.ndarray:
    return job.dest.reshape(-1).view(np.uint8)


def _copy_runs_from(buf: np.ndarray, origin: int, job: CopyJob, runs: Runs | None = None) -> None:
    """Copy ``runs`` (default: job.runs) from ``buf`` (uint8, whose byte 0 is locator-relative byte ``origin``)
    into the job's piece buffer."""
    r = runs or job.runs
    assert r is not None
    lo, hi = r.src_span
    if lo < origin or hi - origin > len(buf):
        raise TruncatedDataError(f"{job.locator.where}: tensor {job.name!r}: bytes [{lo}, {hi}) are outside the item")
    src = np.ndarray(r.outer + (r.run,), np.uint8, buffer=buf, offset=lo - origin, strides=r.src_strides + (1,))
    dst = np.ndarray(r.outer + (r.run,), np.uint8, buffer=_dest_u8(job), offset=r.dst, strides=r.dst_strides + (1,))
    np.copyto(dst, src)


def _copy_elements_from(buf: np.ndarray, origin: int, job: CopyJob) -> None:
    """Element-wise strided copy of the overlap from ``buf`` (locator-relative byte ``origin``)."""
    item = job.dest.dtype.itemsize
    loc, ov = job.locator, job.overlap
    lo, hi = job.element_span()
    if lo < origin or hi - origin > len(buf):
        raise TruncatedDataError(f"{loc.where}: tensor {job.name!r}: bytes [{lo}, {hi}) are outside the item")
    first = (loc.storage_offset + sum(s * st for s, st in zip(ov.chunk_start, loc.strides))) * item
    src = np.ndarray(ov.size, job.dest.dtype, buffer=buf, offset=first - origin,
                     strides=tuple(st * item for st in loc.strides))
    region = tuple(slice(p, p + n) for p, n in zip(ov.piece_start, ov.size))
    job.dest[region] = src


def _fix_byteorder(job: CopyJob) -> None:
    if job.locator.byteorder == "big" and job.dest.dtype.itemsize > 1:
        region = tuple(slice(p, p + n) for p, n in zip(job.overlap.piece_start, job.overlap.size))
        view = job.dest[region]
        if job.dest.dtype.kind == "c":
            view.view(np.dtype(f"f{job.dest.dtype.itemsize // 2}")).byteswap(inplace=True)
        else:
            view.byteswap(inplace=True)


class Executor:
    """Runs copy jobs against one store with a thread pool; ``io`` is "posix" or "tensorstore"."""

    def __init__(self, store: Store, io: str = "auto", coalesce_gap: int = 256, threads: int | None = None) -> None:
        self.store = store
        self.posix = isinstance(store, LocalStore) and io in ("auto", "posix")
        self.gap = max(0, int(coalesce_gap))
        self.threads = threads or min(8, max(2, 2 * (os.cpu_count() or 1)))
        self._local = _LOCAL

    def run(self, jobs: Sequence[CopyJob], pool: ThreadPoolExecutor) -> None:
        memory = [j for j in jobs if j.locator.data is not None]
        staged = [j for j in jobs if j.locator.data is None and j.runs is None]
        direct = [j for j in jobs if j.locator.data is None and j.runs is not None and j.runs.count]
        for j in memory:
            buf = np.frombuffer(j.locator.data, np.uint8)[j.locator.base:]
            (_copy_runs_from if j.runs is not None else _copy_elements_from)(buf, 0, j)
        if staged:
            spans = [j.element_span() for j in staged]
            datas = self._read([(j.locator.key, j.locator.base + lo, j.locator.base + hi) for j, (lo, hi) in zip(staged, spans)], staged)
            for j, (lo, _), data in zip(staged, spans, datas):
                _copy_elements_from(np.frombuffer(data, np.uint8), lo, j)
        if direct:
            if self.posix:
                self._posix(direct, pool)
            else:
                self._ranged(direct, pool)
        for j in jobs:
            _fix_byteorder(j)

    def _read(self, requests: list[tuple[str, int, int]], jobs: Sequence[CopyJob]) -> list[bytes]:
        try:
            return self.store.read_ranges(requests)
        except JReshardError as e:
            raise self._named(e, jobs) from None

    @staticmethod
    def _named(e: JReshardError, jobs: Sequence[CopyJob]) -> JReshardError:
        """``e`` with the names of the tensors being read added to its message."""
        names = sorted({j.name for j in jobs})
        return type(e)(f"{e} [while reading tensor(s) {', '.join(map(repr, names[:5]))}]")

    # -- any KvStore -----------------------------------------------------------------------------

    def _ranged(self, jobs: Sequence[CopyJob], pool: ThreadPoolExecutor) -> None:
        """All runs of a file, sorted and merged where gaps are small (and cut near MAX_REQUEST), become one
        batch of byte-range reads; as each read arrives, the pool copies the blocks of runs it holds."""
        requests, feeds = _requests(jobs, self.gap, MAX_REQUEST)
        try:
            getters = self.store.read_async(requests)
        except JReshardError as e:
            raise self._named(e, jobs) from None

        def consume(k: int) -> None:
            try:
                data = np.frombuffer(getters[k](), np.uint8)
            except JReshardError as e:
                raise self._named(e, [j for j, _ in feeds[k]]) from None
            for j, part in feeds[k]:
                _copy_runs_from(data, requests[k][1] - j.locator.base, j, part)

        # Reads complete in the background; copies run on the pool as each read arrives.
        for f in [pool.submit(consume, k) for k in range(len(requests))]:
            f.result()

    # -- local files ---------------------------------------------------------------------------------

    def _posix(self, jobs: Sequence[CopyJob], pool: ThreadPoolExecutor) -> None:
        """Requests as in :meth:`_ranged`, cut near BOUNCE and merged over gaps up to LOCAL_GAP inside a chunk,
        each read with ``preadv`` on the pool into a per-thread buffer (which stays in cache) and copied out from
        there. A file shorter than a request (truncated, even while being read) is a TruncatedDataError: plain
        reads return short counts where a memory map would raise SIGBUS."""
        futures = []
        for requests, feeds in _file_requests(jobs, self.gap, BOUNCE, chunk_gap=max(self.gap, LOCAL_GAP)):
            # One pool task per request, or per run of small requests (a task costs microseconds); a file's
            # reads start while the next file is planned.
            task: list[tuple[tuple[str, int, int], Feeds]] = []
            size = 0
            for request, feed in zip(requests, feeds):
                task.append((request, feed))
                size += request[2] - request[1]
                if size >= BOUNCE or len(task) >= 64:
                    futures.append(pool.submit(self._pread_all, task))
                    task, size = [], 0
            if task:
                futures.append(pool.submit(self._pread_all, task))
        for f in futures:
            f.result()

    def _pread_all(self, work: list[tuple[tuple[str, int, int], Feeds]]) -> None:
        for request, feeds in work:
            self._pread(request, feeds)

    def _pread(self, request: tuple[str, int, int], feeds: Feeds) -> None:
        """Read one request and copy what it feeds into the pieces."""
        key, start, stop = request
        n = stop - start
        store = self.store
        assert isinstance(store, LocalStore)
        try:
            if len(feeds) == 1 and feeds[0][1].count == 1 and feeds[0][1].run == n:
                j, r = feeds[0]  # one contiguous run: straight into the piece's buffer
                store.read_into(key, start, _dest_u8(j)[r.dst : r.dst + n])
                return
            buf = getattr(self._local, "buf", None)
            if buf is None or len(buf) < n:
                buf = self._local.buf = np.empty(max(n, BOUNCE), np.uint8)
            store.read_into(key, start, buf[:n])
        except JReshardError as e:
            raise self._named(e, [j for j, _ in feeds]) from None
        for j, part in feeds:
            _copy_runs_from(buf[:n], start - j.locator.base, j, part)


def _requests(jobs: Sequence[CopyJob], gap: int, limit: int, chunk_gap: int | None = None
              ) -> tuple[list[tuple[str, int, int]], list[Feeds]]:
    """The requests of all files (:func:`_file_requests`) at once."""
    requests: list[tuple[str, int, int]] = []
    feeds: list[Feeds] = []
    for r, f in _file_requests(jobs, gap, limit, chunk_gap):
        requests.extend(r)
        feeds.extend(f)
    return requests, feeds


def _file_requests(jobs: Sequence[CopyJob], gap: int, limit: int, chunk_gap: int | None = None
                   ) -> Iterator[tuple[list[tuple[str, int, int]], list[Feeds]]]:
    """The reads that serve ``jobs``: per file, all runs sorted, merged where the gap between them is at most
    ``gap`` (``chunk_gap``, default ``gap``, between runs of the same chunk), and cut into requests near
    ``limit`` bytes (a run belongs to the request where it starts; each request reads from its first run's
    start to its last run's end). Yields, file by file, the requests ``(key, start, stop)`` and what each
    request feeds: (job, runs) parts, regular blocks of runs inside that request. Runs longer than ``limit``
    are cut first.

    A job whose runs form one regular row with gaps of at most ``chunk_gap`` (the usual case: a piece needing
    a part of every row of a chunk) is merged as one interval and cut arithmetically; only the other jobs are
    handled run by run.
    """
    if chunk_gap is None:
        chunk_gap = gap
    jobs = [part for j in jobs for part in _split_long_runs(j, limit)]
    by_key: dict[str, list[CopyJob]] = {}
    for j in jobs:
        by_key.setdefault(j.locator.key, []).append(j)
    for key, kjobs in by_key.items():
        # Intervals to merge: one per dense job (x0: file offset of its first run, n runs, stride s), one per
        # run of the others.
        dense: list[tuple[CopyJob, Runs, int, int, int]] = []
        sparse: list[tuple[CopyJob, Runs, np.ndarray]] = []
        for j in kjobs:
            r = _fold(j.runs)  # type: ignore[arg-type]
            x0 = j.locator.base + r.src
            if not r.outer:
                dense.append((j, r, x0, 1, 0))
            elif len(r.outer) == 1 and r.run <= r.src_strides[0] <= r.run + chunk_gap:
                dense.append((j, r, x0, r.outer[0], r.src_strides[0]))
            else:
                sparse.append((j, r, r.src_starts() + j.locator.base))
        starts = np.concatenate([np.array([d[2] for d in dense], np.int64)] + [x for _, _, x in sparse])
        lengths = np.concatenate([np.array([(n - 1) * s + r.run for _, r, _, n, s in dense], np.int64)]
                                 + [np.full(len(x), r.run, np.int64) for _, r, x in sparse])
        chunks = np.concatenate([np.array([j.locator.base for j, *_ in dense], np.int64)]
                                + [np.full(len(x), j.locator.base, np.int64) for j, _, x in sparse])
        order = np.argsort(starts, kind="stable")
        rs, re = _merge(starts[order], lengths[order], chunks[order], gap, chunk_gap)
        # Each merged region is cut into windows of ``limit`` bytes; a run belongs to the window of its start.
        nwin = (re - rs - 1) // max(1, limit) + 1
        first_win = np.cumsum(nwin) - nwin
        nw = int(nwin.sum())
        lo_l, hi_l = [np.iinfo(np.int64).max] * nw, [-1] * nw  # the bytes each window reads
        parts: list[list[tuple[CopyJob, Runs]]] = [[] for _ in range(nw)]
        rs_l, fw_l = rs.tolist(), first_win.tolist()
        regions = (np.searchsorted(rs, [d[2] for d in dense], "right") - 1).tolist()
        for (j, r, x0, n, s), m in zip(dense, regions):
            r0, f = rs_l[m], fw_l[m]
            w0, w1 = f + (x0 - r0) // limit, f + (x0 + (n - 1) * s - r0) // limit
            k0 = 0
            for w in range(w0, w1 + 1):
                k1 = n if w == w1 else -(-(r0 + (w - f + 1) * limit - x0) // s)  # runs starting before the cut
                if k1 > k0:
                    a, b = x0 + k0 * s, x0 + (k1 - 1) * s + r.run
                    if a < lo_l[w]:
                        lo_l[w] = a
                    if b > hi_l[w]:
                        hi_l[w] = b
                    part = r if not r.outer else Runs(r.src + k0 * s, r.src_strides, r.dst + k0 * r.dst_strides[0],
                                                      r.dst_strides, (k1 - k0,), r.run)
                    parts[w].append((j, part))
                    k0 = k1
        lo, hi = np.array(lo_l, np.int64), np.array(hi_l, np.int64)
        for j, r, x in sparse:
            m = np.searchsorted(rs, x, "right") - 1
            win = first_win[m] + (x - rs[m]) // limit
            np.minimum.at(lo, win, x)
            np.maximum.at(hi, win, x + r.run)
            _cut_blocks(j, r, win, parts)
        used = np.flatnonzero(hi >= 0).tolist()
        yield [(key, int(lo[w]), int(hi[w])) for w in used], [parts[w] for w in used]


def _merge(starts: np.ndarray, lengths: np.ndarray, chunks: np.ndarray, gap: int, chunk_gap: int
           ) -> tuple[np.ndarray, np.ndarray]:
    """Like :func:`~jreshard.plan.merge_runs` (runs sorted by start), with gaps of at most ``chunk_gap`` bridged
    between runs of the same chunk (same ``chunks`` value) and of at most ``gap`` between chunks. Returns the
    (starts, stops) of the merged reads."""
    ends = starts + lengths
    if len(starts) == 0:
        return starts, ends
    prev_end = np.maximum.accumulate(ends)
    new = np.ones(len(starts), dtype=bool)
    new[1:] = starts[1:] - prev_end[:-1] > np.where(chunks[1:] == chunks[:-1], chunk_gap, gap)
    first = np.flatnonzero(new)
    return starts[first], np.maximum.reduceat(ends, first)


def _cut_blocks(j: CopyJob, r: Runs, win: np.ndarray, parts: list[list[tuple[CopyJob, Runs]]]) -> None:
    """Add to ``parts[w]`` the runs of ``r`` (window ``win[i]`` for run i, in grid order) that fall in window
    w: the grid as blocks along its last dimension, each block cut where the window changes."""
    if not r.outer:
        parts[int(win[0])].append((j, r))
        return
    n, s_step, d_step = r.outer[-1], r.src_strides[-1], r.dst_strides[-1]
    block_src = _grid(r.src, r.outer[:-1], r.src_strides[:-1]).tolist()
    block_dst = _grid(r.dst, r.outer[:-1], r.dst_strides[:-1]).tolist()
    new = np.ones(len(win), dtype=bool)
    new[1:] = win[1:] != win[:-1]
    new[::n] = True
    first = np.flatnonzero(new)
    for a, b, w in zip(first.tolist(), [*first[1:].tolist(), len(win)], win[first].tolist()):
        m, k0 = divmod(a, n)
        parts[w].append((j, Runs(block_src[m] + k0 * s_step, (s_step,), block_dst[m] + k0 * d_step, (d_step,),
                                 (b - a,), r.run)))


def _fold(r: Runs) -> Runs:
    """``r`` with neighbouring outer dimensions merged where both grids are regular across them."""
    outer, ss, ds = list(r.outer), list(r.src_strides), list(r.dst_strides)
    for d in range(len(outer) - 2, -1, -1):
        if ss[d] == outer[d + 1] * ss[d + 1] and ds[d] == outer[d + 1] * ds[d + 1]:
            outer[d : d + 2] = [outer[d] * outer[d + 1]]
            ss[d : d + 2] = [ss[d + 1]]
            ds[d : d + 2] = [ds[d + 1]]
    return Runs(r.src, tuple(ss), r.dst, tuple(ds), tuple(outer), r.run)


def _split_long_runs(job: CopyJob, limit: int) -> list[CopyJob]:
    """A job whose runs are longer than ``limit`` bytes, as jobs of single runs of at most ``limit`` bytes
    (parallel requests, bounded buffers)."""
    r = job.runs
    if r is None or r.run <= limit:
        return [job]
    return [dataclasses.replace(job, runs=Runs(src + o, (), dst + o, (), (), min(limit, r.run - o)))
            for src, dst in zip(r.src_starts().tolist(), r.dst_starts().tolist()) for o in range(0, r.run, limit)]


def read_locator_whole(store: Store, locator: Locator, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A whole chunk/tensor as a new array (used for small objects and ``Checkpoint.read``)."""
    from .plan import runs_of

    dest = np.empty(shape, dtype)
    ov = Overlap(0, (0,) * len(shape), (0,) * len(shape), tuple(shape))
    job = CopyJob("", locator, tuple(shape), ov, dest, runs_of(locator, shape, ov, shape, dtype.itemsize))
    with ThreadPoolExecutor(2) as pool:
        Executor(store).run([job], pool)
    return dest
