"""Executes copy jobs: bytes of saved chunks into the host buffers of target pieces.

A :class:`CopyJob` copies one overlap region. Jobs whose bytes are already in memory (small archives read
whole, decompressed zstd items) are plain strided copies. The others read from the store:

* both paths start alike (:meth:`Executor.prepare`, no I/O): the runs of a file, sorted, merged over gaps of
  at most ``coalesce_gap`` (larger gaps, up to LOCAL_GAP inside a chunk locally, only while they total at most
  1/WASTE of the bytes needed) and cut (between runs) near a request size, become requests; each request feeds
  (job, runs) parts, regular blocks of runs inside it. These requests are the plan's.
* ``posix`` (local files): requests are cut near BOUNCE; the pool reads each with one scatter ``preadv``
  straight into the pieces (each run to its place, bridged gaps to a junk buffer: no staging copy,
  no second pass over the bytes); only requests with runs placed element by element (transposed) are read
  into a per-thread buffer (cache-sized) and copied out from there. No memory maps: a file truncated while being read gives a short read,
  hence a TruncatedDataError, where touching a map past the new end raises SIGBUS.
* ``tensorstore`` (any KvStore): requests are cut near MAX_REQUEST, issued as one batch of byte-range reads;
  each read is copied out on the pool as it arrives.

Regions of a transposed storage (innermost stride != 1) are read as their span and copied element-wise when
that span holds little else, else element by element (see :func:`jreshard.planning.runs_of`).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from .catalog import Locator
from .errors import JReshardError, StorageError, TruncatedDataError
from .lanes import Lane, Rows, _dest_bytes, copy_block_from, row_grid
from .planning import Overlap, Runs, _grid, c_strides, element_span
from .storage import LocalStore, Store, settle

BOUNCE = 4 * 2**20  # a local read is cut (between runs) near this size: a per-thread buffer that stays in cache
LOCAL_GAP = 64 * 2**10  # inside a chunk, local reads may read through gaps up to this (within the WASTE budget)
TILE = 128  # transposing copies go tile by tile, TILE x TILE elements
WASTE = 16  # gaps above coalesce_gap are read (bridged) only while they total at most 1/WASTE of the bytes needed
JUNK = 256 * 2**10  # the buffer for bytes read through (gaps) when reading straight into pieces
IOV_BATCH = 16 * 2**20  # a local read task takes about this many bytes of requests (and builds their scatter lists)
MAX_REQUEST = 8 * 2**20  # a ranged read is cut (between runs) near this size: parallel requests, cache-sized copies
# Each pool thread's read buffer (``buf``), shared by executors: Checkpoint.read makes one per call, and a
# fresh buffer would cost page faults on every call. It lives as long as the thread.
_LOCAL = threading.local()


@dataclass
class CopyJob:
    """Copy ``overlap`` of a chunk located by ``locator`` into ``dest``, a C-contiguous buffer: at the places of
    a C-ordered piece of ``dest``'s shape, or, when ``dst_strides`` is given, to elements
    ``dst0 + sum(i_k * dst_strides_k)`` of it (element units; ``dst0`` is where the overlap's first element
    goes). ``dest`` may be None while planning: it is bound (``slot`` says which buffer) before running."""

    name: str
    locator: Locator
    chunk_sizes: tuple[int, ...]
    overlap: Overlap
    dest: np.ndarray | None
    runs: Runs | None  # None: not contiguous in the source (transposed); copied from a staged span
    itemsize: int = 0
    dst0: int = 0
    dst_strides: tuple[int, ...] | None = None
    slot: int = 0

    def __post_init__(self) -> None:
        if not self.itemsize:
            assert self.dest is not None
            self.itemsize = self.dest.dtype.itemsize
        if self.dst_strides is None:
            assert self.dest is not None
            strides = c_strides(self.dest.shape)
            self.dst0 = sum(p * st for p, st in zip(self.overlap.piece_start, strides))
            self.dst_strides = strides

    @property
    def nbytes(self) -> int:
        return math.prod(self.overlap.size) * self.itemsize

    def element_span(self) -> tuple[int, int]:
        """[lo, hi) bytes, relative to the locator base, that the region's elements touch."""
        return element_span(self.locator, self.overlap, self.itemsize)

    def dest_view(self) -> np.ndarray:
        """The destination elements of the overlap, as a (strided) view of ``dest``."""
        assert self.dest is not None and self.dst_strides is not None
        return strided_view(self.dest, self.overlap.size, self.dst0, self.dst_strides)


Feeds = list[tuple[Any, Any]]  # what one request feeds: (job, runs) or (lane, row block) parts


def _dest_u8(job: CopyJob) -> np.ndarray:
    assert job.dest is not None
    return _flat_u8(job.dest)


def _flat_u8(buf: np.ndarray) -> np.ndarray:
    """The bytes of the C-contiguous ``buf`` (a view)."""
    if not buf.flags.c_contiguous:  # a reshape would copy, and the copy would be filled instead
        raise JReshardError("internal: a destination buffer is not C-contiguous")
    return buf.reshape(-1).view(np.uint8)


def strided_view(buf: np.ndarray, shape: Sequence[int], first: int, strides: Sequence[int]) -> np.ndarray:
    """Elements ``first + sum(i_k * strides_k)`` (element units) of the C-contiguous ``buf``, as an array of
    ``shape`` that writes through to ``buf``.

    Example:
        >>> buf = np.arange(6)
        >>> strided_view(buf, (2, 2), 1, (1, 3)).tolist()  # a transposed 2x2 block
        [[1, 4], [2, 5]]
    """
    item = buf.dtype.itemsize
    return np.ndarray(tuple(shape), buf.dtype, buffer=_flat_u8(buf), offset=first * item,
                      strides=tuple(s * item for s in strides))


def _units(item: int) -> tuple[np.dtype, int]:
    """A numpy type that copies ``item``-byte elements, and how many of it make one element."""
    for n in (8, 4, 2, 1):
        if item % n == 0:
            return np.dtype(f"u{n}"), item // n
    raise AssertionError(item)


def _copy_runs_from(buf: np.ndarray, origin: int, job: CopyJob, runs: Runs | None = None) -> None:
    """Copy ``runs`` (default: job.runs) from ``buf`` (uint8, whose byte 0 is locator-relative byte ``origin``)
    into the job's piece buffer."""
    r = runs or job.runs
    assert r is not None
    lo, hi = r.src_span
    if lo < origin or hi - origin > len(buf):
        raise TruncatedDataError(f"{job.locator.where}: tensor {job.name!r}: bytes [{lo}, {hi}) are outside the item")
    if r.step:  # storage rows placed element by element (a transposed destination)
        unit, k = _units(r.item)
        n = r.run // r.item
        shape = r.outer + (n, k)
        src = np.ndarray(shape, unit, buffer=buf, offset=lo - origin, strides=r.src_strides + (r.item, unit.itemsize))
        dst = np.ndarray(shape, unit, buffer=_dest_u8(job), offset=r.dst,
                         strides=r.dst_strides + (r.step, unit.itemsize))
        if r.outer and r.outer[-1] > TILE and n > TILE:
            # A transposing copy in tiles that stay in cache (several times faster than one strided copy).
            for a in range(0, r.outer[-1], TILE):
                for b in range(0, n, TILE):
                    np.copyto(dst[..., a : a + TILE, b : b + TILE, :], src[..., a : a + TILE, b : b + TILE, :])
            return
    else:
        src = np.ndarray(r.outer + (r.run,), np.uint8, buffer=buf, offset=lo - origin, strides=r.src_strides + (1,))
        dst = np.ndarray(r.outer + (r.run,), np.uint8, buffer=_dest_u8(job), offset=r.dst,
                         strides=r.dst_strides + (1,))
    np.copyto(dst, src)


def _copy_part(buf: np.ndarray, start: int, j: Any, part: Any, key: str) -> None:
    """Copy what a request feeds ``(job, runs)`` or ``(lane, row block)`` from ``buf``, which holds the bytes of
    file ``key`` from ``start``."""
    if type(part) is Rows:
        copy_block_from(buf, start, j, part, key)
    else:
        _copy_runs_from(buf, start - j.locator.base, j, part)


def _copy_elements_from(buf: np.ndarray, origin: int, job: CopyJob) -> None:
    """Element-wise strided copy of the overlap from ``buf`` (locator-relative byte ``origin``)."""
    item = job.itemsize
    loc, ov = job.locator, job.overlap
    lo, hi = job.element_span()
    if lo < origin or hi - origin > len(buf):
        raise TruncatedDataError(f"{loc.where}: tensor {job.name!r}: bytes [{lo}, {hi}) are outside the item")
    first = (loc.storage_offset + sum(s * st for s, st in zip(ov.chunk_start, loc.strides))) * item
    assert job.dest is not None
    src = np.ndarray(ov.size, job.dest.dtype, buffer=buf, offset=first - origin,
                     strides=tuple(st * item for st in loc.strides))
    np.copyto(job.dest_view(), src)


def _fix_byteorder(job: CopyJob) -> None:
    assert job.dest is not None
    if job.locator.byteorder == "big" and job.dest.dtype.itemsize > 1:
        view = job.dest_view()
        if job.dest.dtype.kind == "c":
            view.view(np.dtype(f"f{job.dest.dtype.itemsize // 2}")).byteswap(inplace=True)
        else:
            view.byteswap(inplace=True)


def read_threads() -> int:
    """How many threads read local files by default: one per CPU, at least 2, at most 8. The reads that page-cache
    hits serve are copies the kernel makes on the reading thread, and more threads than CPUs only contend.

    Example:
        >>> 2 <= read_threads() <= 8
        True
    """
    return min(8, max(2, os.cpu_count() or 1))


class Executor:
    """Runs copy jobs against one store with a thread pool; ``io`` is "posix" or "tensorstore"."""

    def __init__(self, store: Store, io: str = "auto", coalesce_gap: int = 256, threads: int | None = None) -> None:
        self.store = store
        self.posix = isinstance(store, LocalStore) and io in ("auto", "posix")
        self.gap = max(0, int(coalesce_gap))
        self.threads = threads or read_threads()
        self._local = _LOCAL

    def prepare(self, jobs: Sequence[CopyJob], lanes: Sequence[Lane] = (), feeds: bool = True) -> Prepared:
        """The reads that serve ``jobs`` and ``lanes`` (no I/O): what :meth:`execute` then issues, exactly.
        ``feeds`` False: the requests only, each feeding None (for counting; such a Prepared cannot run)."""
        memory = [j for j in jobs if j.locator.data is not None]
        staged = [j for j in jobs if j.locator.data is None and j.runs is None]
        direct = [j for j in jobs if j.locator.data is None and j.runs is not None and j.runs.count]
        spans = [j.element_span() for j in staged]
        staged_requests = [(j.locator.key, j.locator.base + lo, j.locator.base + hi) for j, (lo, hi) in zip(staged, spans)]
        if not direct and not lanes:
            groups: list[tuple[list[tuple[str, int, int]], list[Feeds]]] = []
        elif self.posix:
            groups = list(_file_requests(direct, self.gap, BOUNCE, chunk_gap=max(self.gap, LOCAL_GAP), lanes=lanes,
                                         feeds=feeds))
        else:
            groups = [_requests(direct, self.gap, MAX_REQUEST, lanes=lanes, feeds=feeds)]
        return Prepared(list(jobs), memory, staged, staged_requests, groups)

    def run(self, jobs: Sequence[CopyJob], pool: ThreadPoolExecutor) -> None:
        """Read and copy ``jobs`` (their ``dest`` bound)."""
        self.execute(self.prepare(jobs), pool)

    def execute(self, prepared: Prepared, pool: ThreadPoolExecutor) -> None:
        """Issue the reads of ``prepared`` and copy them into the jobs' destinations (bound by then)."""
        self.start(prepared, pool)()

    def start(self, prepared: Prepared, pool: ThreadPoolExecutor) -> Callable[[], None]:
        """Begin :meth:`execute`: the reads of ``prepared`` are submitted to ``pool`` (with the copies of bytes
        held in memory and the staged reads, as one more task); returns the function that waits for them to land
        and completes the copies.
        The destinations must stay bound until it returns. Whatever happens, call it (it also waits after a
        failure, so no read still writes into the buffers)."""
        futures: list[Future[None]] = []
        try:
            if prepared.memory or prepared.staged:
                # On the pool too: the first touch of a fresh piece faults in a whole huge page, which the
                # thread that plans the next batch should not wait for.
                futures.append(pool.submit(self._small, prepared))
            if prepared.groups:
                if self.posix:
                    self._posix(prepared.groups, pool, futures)
                else:
                    self._ranged(prepared.groups, pool, futures)
        except BaseException:
            settle(futures)
            raise

        def finish() -> None:
            try:
                for f in futures:
                    f.result()
            except BaseException:
                settle(futures)  # the first failure: the reads not begun are dropped, those under way end
                raise
            for j in prepared.jobs:
                _fix_byteorder(j)

        return finish

    def _small(self, prepared: Prepared) -> None:
        """The copies of bytes held in memory and the staged reads (read whole, then copied element-wise)."""
        for j in prepared.memory:
            buf = np.frombuffer(j.locator.data, np.uint8)[j.locator.base:]
            (_copy_runs_from if j.runs is not None else _copy_elements_from)(buf, 0, j)
        if prepared.staged:
            datas = self._read(prepared.staged_requests, prepared.staged)
            for j, (_, start, _), data in zip(prepared.staged, prepared.staged_requests, datas):
                _copy_elements_from(np.frombuffer(data, np.uint8), start - j.locator.base, j)

    def _read(self, requests: list[tuple[str, int, int]], jobs: Sequence[CopyJob]) -> list[bytes]:
        try:
            return self.store.read_ranges(requests)
        except JReshardError as e:
            raise self._named(e, jobs) from None

    @staticmethod
    def _named(e: JReshardError, jobs: Sequence[Any]) -> JReshardError:
        """``e`` with the names of the tensors being read (by copy jobs or lanes) added to its message."""
        names = sorted({n for j in jobs for n in (j.names if isinstance(j, Lane) else [j.name])})
        return type(e)(f"{e} [while reading tensor(s) {', '.join(map(repr, names[:5]))}]")

    # -- any KvStore -----------------------------------------------------------------------------

    def _ranged(self, groups: list[tuple[list[tuple[str, int, int]], list[Feeds]]], pool: ThreadPoolExecutor,
                futures: list[Future[None]]) -> None:
        """All requests (runs of a file sorted, merged where gaps are small, cut near MAX_REQUEST) issued as one
        batch of byte-range reads; as each read arrives, the pool copies the blocks of runs it holds."""
        requests = [r for rs, _ in groups for r in rs]
        feeds = [f for _, fs in groups for f in fs]
        jobs = [j for f in feeds for j, _ in f]
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
                _copy_part(data, requests[k][1], j, part, requests[k][0])

        # Reads complete in the background; copies run on the pool as each read arrives.
        futures.extend(pool.submit(consume, k) for k in range(len(requests)))

    # -- local files ---------------------------------------------------------------------------------

    def _posix(self, groups: list[tuple[list[tuple[str, int, int]], list[Feeds]]], pool: ThreadPoolExecutor,
               futures: list[Future[None]]) -> None:
        """Each request (cut near BOUNCE and merged over gaps up to LOCAL_GAP inside a chunk) read with ``preadv``
        on the pool, in tasks of about IOV_BATCH bytes of requests: each task builds the scatter lists of its
        requests (:func:`_scatter_iovs`, on the pool, so the thread that plans and places does not) and reads
        each request straight into the pieces where it can be, else into a per-thread buffer (which stays in
        cache) copied out from there. A file shorter than a request (truncated, even while being read) is a
        TruncatedDataError: plain reads return short counts where a memory map would raise SIGBUS."""
        junk = _junk()
        for requests, feeds in groups:
            i = 0
            while i < len(requests):
                k, size = i, 0
                while k < len(requests) and (k == i or size < IOV_BATCH):
                    size += requests[k][2] - requests[k][1]
                    k += 1
                futures.append(pool.submit(self._pread_all, requests[i:k], feeds[i:k], junk))
                i = k

    def _pread_all(self, requests: list[tuple[str, int, int]], feeds: list[Feeds], junk: np.ndarray) -> None:
        """Read a run of requests, scattered straight into the pieces where :func:`_scatter_iovs` can (gaps into
        ``junk``; a file's descriptor held once for the requests of one file, counted once)."""
        store = self.store
        assert isinstance(store, LocalStore)
        iovs = _scatter_iovs(requests, feeds, junk)
        i = 0
        while i < len(requests):
            key = requests[i][0]
            k = i
            while k < len(requests) and requests[k][0] == key:
                k += 1
            nbytes = 0
            with store._use(key) as fd:
                for request, feed, iov in zip(requests[i:k], feeds[i:k], iovs[i:k]):
                    nbytes += self._pread(fd, request, feed, iov)
            store.stats.add(nbytes, k - i)
            i = k

    def _pread(self, fd: int, request: tuple[str, int, int], feeds: Feeds, iov: np.ndarray | None) -> int:
        """Read one request from ``fd`` and copy what it feeds into the pieces (scattered by ``iov`` when given);
        returns its size."""
        key, start, stop = request
        n = stop - start
        store = self.store
        assert isinstance(store, LocalStore)
        try:
            if len(feeds) == 1 and type(feeds[0][1]) is Runs:
                j, r = feeds[0]
                if r.run == n and not r.step and r.count == 1:  # one contiguous run: straight into the piece
                    store.fill(fd, key, start, memoryview(_dest_u8(j)[r.dst : r.dst + n]))
                    return n
            if iov is not None and store.fill_scatter(fd, key, start, iov):
                return n  # read straight into the pieces, each run where it belongs
            buf = getattr(self._local, "buf", None)
            if buf is None or len(buf) < n:
                buf = self._local.buf = np.empty(max(n, BOUNCE), np.uint8)
            store.fill(fd, key, start, memoryview(buf[:n]))
        except JReshardError as e:
            raise self._named(e, [j for j, _ in feeds]) from None
        except OSError as e:  # EIO and the like: the disk, not the checkpoint, but still a jreshard error
            raise self._named(StorageError(f"{store.where(key)}: reading bytes {start}..{stop} failed: "
                                           f"{e.strerror or e}"), [j for j, _ in feeds]) from None
        for j, part in feeds:
            _copy_part(buf[:n], start, j, part, key)
        return n


_JUNK: list[np.ndarray] = []


def _junk() -> np.ndarray:
    """The buffer for the bytes of reads that no piece needs (bridged gaps), shared by all threads: its
    contents are never read."""
    if not _JUNK:
        _JUNK.append(np.empty(JUNK, np.uint8))
    return _JUNK[0]


def _scatter_iovs(requests: Sequence[tuple[str, int, int]], feeds: Sequence[Feeds], junk: np.ndarray
                  ) -> list[np.ndarray | None]:
    """For each request ``(file, start, stop)`` and what it feeds, the ``(address, length)`` rows (uint64) that
    scatter the file bytes ``[start, stop)`` straight into the pieces: each run to its place in its piece
    (neighbouring runs contiguous in both file and piece as one row), each gap between runs into ``junk``. Built
    for all the requests at once (array arithmetic, no Python per run). None for a request where that does not
    apply: a run placed element by element (transposed), runs that overlap in the file, a gap larger than
    ``junk``, runs that do not tile the request from its start to its stop, or runs outside their piece (these
    are left to the staged copy, which reports them).

    Example:
        >>> from jreshard.catalog import Locator
        >>> from jreshard.planning import Overlap
        >>> dest = np.zeros((2, 2), np.uint8)
        >>> job = CopyJob("w", Locator("f", 0, 0, (4, 1), 8), (2, 4), Overlap(0, (0, 1), (0, 0), (2, 2)), dest,
        ...               Runs(1, (4,), 0, (2,), (2,), 2))  # columns 1:3 of a 2x4 uint8 chunk
        >>> iov = _scatter_iovs([("f", 1, 7)], [[(job, job.runs)]], np.empty(16, np.uint8))[0]
        >>> [int(n) for n in iov[:, 1]]  # 2 bytes to row 0, 2 to junk (the gap), 2 to row 1
        [2, 2, 2]
    """
    m = len(requests)
    ok = np.ones(m, bool)
    # Rows of runs, one per (request, part): first file byte, count, file step, run length, first address, step.
    sq: list[int] = []
    sx: list[int] = []
    sn: list[int] = []
    ss: list[int] = []
    sr: list[int] = []
    sd: list[int] = []
    sds: list[int] = []
    arrays: list[tuple[np.ndarray, ...]] = []
    lane_dest: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    out: list[np.ndarray | None] = [None] * m
    for k, feed in enumerate(feeds):
        tiled = _tiled_iov(requests[k], feed)
        if tiled is not None:
            out[k] = tiled
            continue
        for j, r in feed:
            if type(r) is Rows:
                got = lane_dest.get(id(j))
                if got is None:
                    got = lane_dest[id(j)] = _dest_bytes(j)[1:]
                addr, size = got
                if len(r.dst) and (int(r.dst.min()) < 0
                                   or bool((r.dst + (r.n - 1) * r.ds + r.run > size[r.slot]).any())):
                    ok[k] = False
                    continue
                arrays.append((np.full(len(r.x0), k, np.int64), r.x0, r.n, r.s, r.run, r.dst + addr[r.slot], r.ds))
                continue
            if r.step or not r.count:
                ok[k] = False
                continue
            dest = _dest_u8(j)
            if not _inside(r, len(dest)):
                ok[k] = False
                continue
            if len(r.outer) <= 1:
                sq.append(k)
                sx.append(r.src + j.locator.base)
                sn.append(r.outer[0] if r.outer else 1)
                ss.append(r.src_strides[0] if r.outer else 0)
                sr.append(r.run)
                sd.append(r.dst + dest.ctypes.data)
                sds.append(r.dst_strides[0] if r.outer else 0)
            else:
                x = r.src_starts() + j.locator.base
                one, zero = np.ones(len(x), np.int64), np.zeros(len(x), np.int64)
                arrays.append((np.full(len(x), k, np.int64), x, one, zero, np.full(len(x), r.run, np.int64),
                               r.dst_starts() + dest.ctypes.data, zero))
    if sq:
        arrays.append(tuple(np.array(a, np.int64) for a in (sq, sx, sn, ss, sr, sd, sds)))
    if not arrays:
        return out
    q, x0, n, st, run, d0, ds = (np.concatenate([a[i] for a in arrays]).astype(np.int64, copy=False)
                                 for i in range(7))
    req = np.repeat(q, n)
    src = row_grid(x0, n, st)
    dst = row_grid(d0, n, ds)
    length = np.repeat(run, n)
    starts = np.array([r[1] for r in requests], np.int64)
    stops = np.array([r[2] for r in requests], np.int64)
    rel = src - starts[req]
    inside = (rel >= 0) & (rel + length <= (stops - starts)[req])
    if not inside.all():
        ok[req[~inside]] = False
    keep = ok[req]
    req, src, dst, length, rel = req[keep], src[keep], dst[keep], length[keep], rel[keep]
    if not len(req):
        return out
    span = int((stops - starts).max()) + 1
    if m * span < 2**62:
        order = np.argsort(req * span + rel, kind="stable")
    else:
        order = np.lexsort((rel, req))
    req, src, dst, length = req[order], src[order], dst[order], length[order]
    end = src + length
    same = np.zeros(len(req), bool)
    same[1:] = req[1:] == req[:-1]
    # Runs that overlap in the file: the request is read staged (which reports what is wrong).
    bad = same[1:] & (src[1:] < end[:-1])
    if bad.any():
        ok[req[1:][bad]] = False
    # Join runs contiguous in the file and in memory.
    new = np.ones(len(req), dtype=bool)
    new[1:] = ~same[1:] | (src[1:] != end[:-1]) | (dst[1:] != dst[:-1] + length[:-1])
    first = np.flatnonzero(new)
    req, src, dst, end = req[first], src[first], dst[first], np.maximum.reduceat(end, first)
    length = end - src
    last = np.ones(len(req), bool)
    last[:-1] = req[1:] != req[:-1]
    gap = np.zeros(len(req), np.int64)
    gap[:-1] = np.where(last[:-1], 0, src[1:] - end[:-1])
    if len(junk) < int(gap.max()):
        ok[req[gap > len(junk)]] = False
    # Each request's runs start at its start and end at its stop.
    head = np.ones(len(req), bool)
    head[1:] = last[:-1]
    ok[req[head & (src != starts[req])]] = False
    ok[req[last & (end != stops[req])]] = False
    if not ok[req].all():
        good = ok[req]
        req, dst, length, gap = req[good], dst[good], length[good], gap[good]
    # Each run, then the gap after it (if any), in order.
    width = 1 + (gap > 0)
    pos = np.cumsum(width) - width
    total = int(width.sum())
    iov = np.empty((total, 2), np.int64)
    iov[pos, 0], iov[pos, 1] = dst, length
    g = pos[width == 2] + 1
    iov[g, 0], iov[g, 1] = junk.ctypes.data, gap[width == 2]
    iov = iov.view(np.uint64)
    # Request k's runs are rows [first[k], first[k + 1]) of the runs; its iov rows start at pos[first[k]].
    bounds = np.append(pos, total)[np.searchsorted(req, np.arange(m + 1))].tolist()
    for k in np.flatnonzero(ok).tolist():
        if bounds[k] < bounds[k + 1]:
            out[k] = iov[bounds[k] : bounds[k + 1]]
    return out


def _inside(r: Runs, size: int) -> bool:
    """Whether every run of ``r`` lands inside a destination of ``size`` bytes."""
    lo = r.dst + sum(min(0, (n - 1) * st) for n, st in zip(r.outer, r.dst_strides))
    hi = r.dst + sum(max(0, (n - 1) * st) for n, st in zip(r.outer, r.dst_strides)) + r.run
    return lo >= 0 and hi <= size


def _tiled_iov(request: tuple[str, int, int], feed: Feeds) -> np.ndarray | None:
    """The scatter list of one request whose runs tile it exactly, row after row (the usual shape: a band of a
    chunk's rows, each row cut into the column slices of several pieces), built as a grid of rows by parts
    with no sort and no gap; None when the request is not of that shape (:func:`_scatter_iovs` then takes the
    general way, which also reports what is wrong).

    Example:
        >>> from jreshard.catalog import Locator
        >>> from jreshard.planning import Overlap
        >>> a, b = np.zeros((2, 2), np.uint8), np.zeros((2, 2), np.uint8)
        >>> loc = Locator("f", 0, 0, (4, 1), 8)
        >>> ja = CopyJob("w", loc, (2, 4), Overlap(0, (0, 0), (0, 0), (2, 2)), a, Runs(0, (4,), 0, (2,), (2,), 2))
        >>> jb = CopyJob("w", loc, (2, 4), Overlap(0, (0, 2), (0, 0), (2, 2)), b, Runs(2, (4,), 0, (2,), (2,), 2))
        >>> iov = _tiled_iov(("f", 0, 8), [(ja, ja.runs), (jb, jb.runs)])  # rows of 4 bytes: 2 to a, 2 to b
        >>> [int(n) for n in iov[:, 1]], int(iov[1, 0]) == b.ctypes.data
        ([2, 2, 2, 2], True)
    """
    parts = []
    for j, r in feed:
        if type(r) is not Runs or r.step or len(r.outer) > 1 or not r.count:
            return None
        dest = _dest_u8(j)
        if not _inside(r, len(dest)):
            return None
        n = r.outer[0] if r.outer else 1
        st = r.src_strides[0] if r.outer else 0
        ds = r.dst_strides[0] if r.outer else 0
        parts.append((r.src + j.locator.base, n, st, r.run, r.dst + dest.ctypes.data, ds))
    if not parts:
        return None
    parts.sort()
    # Bands of rows, back to back from the request's start to its stop: the parts of a band have the same file
    # step and side by side fill each row from one to the next; their row counts do not grow from one to the
    # next and differ by at most one (a request cut in the middle of a row); one-row parts are a run each.
    pos, i = request[1], 0
    bands = []  # (first address of each part, its run, its step in memory, rows, rows x parts written)
    total = 0
    while i < len(parts):
        x, n, st = parts[i][0], parts[i][1], parts[i][2]
        if x != pos:
            return None
        k, end, low = i, x, n
        while k < len(parts) and parts[k][0] == end:
            pn = parts[k][1]
            if n == 1 and pn != 1:
                break
            if n > 1 and ((pn > 1 and parts[k][2] != st) or pn > low or pn < n - 1):
                break
            low = pn
            end += parts[k][3]
            k += 1
        if k == i or (n > 1 and end - x != st):
            return None
        band = parts[i:k]
        # The last row holds the parts with n rows, then stops.
        count = len(band) if n == 1 else sum(p[1] for p in band)
        bands.append(([p[4] for p in band], [p[3] for p in band], [p[5] for p in band], n, count))
        total += count
        pos = end if n == 1 else x + sum(p[1] * p[3] for p in band)
        i = k
    if pos != request[2]:
        return None
    # Each band written in place, row by row (a row: one run per part), its addresses a grid of first address
    # plus row times step.
    iov = np.empty((total, 2), np.int64)
    o, merge, prev = 0, False, None
    for d0, runs, ds, n, count in bands:
        width = len(d0)
        full = n - 1 if count < n * width else n
        if full:
            block = iov[o : o + full * width].reshape(full, width, 2)
            if ds.count(ds[0]) == width:  # parts of one step (the usual case): one pass
                np.add.outer(np.arange(full, dtype=np.int64) * ds[0], np.array(d0, np.int64), out=block[:, :, 0])
            else:
                np.multiply.outer(np.arange(full, dtype=np.int64), np.array(ds, np.int64), out=block[:, :, 0])
                block[:, :, 0] += np.array(d0, np.int64)
            block[:, :, 1] = runs
        if full < n:  # the last row, cut
            a = count - full * width
            tail = iov[o + full * width : o + count]
            tail[:, 0] = [d + full * step for d, step in zip(d0[:a], ds[:a])]
            tail[:, 1] = runs[:a]
        # Could two consecutive runs be next to each other in memory (then they are one row)? Within a row,
        # from one row to the next, and from the band before: each is one linear condition on the row number.
        merge = merge or _may_touch(d0, runs, ds, n, count, prev)
        last = count - 1
        prev = (d0[last % width] + (last // width) * ds[last % width] + runs[last % width])
        o += count
    if merge:
        dst, length = iov[:, 0], iov[:, 1]
        new = np.ones(len(dst), bool)
        new[1:] = dst[1:] != dst[:-1] + length[:-1]
        if not new.all():
            first = np.flatnonzero(new)
            out = np.empty((len(first), 2), np.int64)
            out[:, 0], out[:, 1] = dst[first], np.add.reduceat(length, first)
            iov = out
    return iov.view(np.uint64)


def _may_touch(d0: list[int], runs: list[int], ds: list[int], n: int, count: int, prev: int | None) -> bool:
    """Whether, in a band of ``n`` rows of parts (part k of row i at ``d0[k] + i * ds[k]``, ``runs[k]`` bytes;
    ``count`` runs in all, the last row cut), some run ends where the next one starts in memory, or the first
    starts where the band before ended (``prev``). Each such meeting is ``A + i * B == 0`` for a row number i:
    it is checked for the rows that have both runs, without a pass over the runs."""
    if prev is not None and prev == d0[0]:
        return True
    width = len(d0)
    rows_with = [n if k < count - (n - 1) * width else n - 1 for k in range(width)] if n > 1 else [1] * width

    def meets(a: int, b: int, rows: int) -> bool:  # a + i * b == 0 for some 0 <= i < rows
        if b == 0:
            return a == 0 and rows > 0
        return a % b == 0 and 0 <= -a // b < rows

    for k in range(width - 1):  # part k, then part k + 1 of the same row
        if meets(d0[k] + runs[k] - d0[k + 1], ds[k] - ds[k + 1], rows_with[k + 1]):
            return True
    # The last part of row i, then the first part of row i + 1.
    last = width - 1
    return n > 1 and meets(d0[last] + runs[last] - d0[0] - ds[0], ds[last] - ds[0], rows_with[0] - 1)


@dataclass
class Prepared:
    """The reads that serve a list of copy jobs (:meth:`Executor.prepare`): jobs whose bytes are in memory, jobs
    copied from a staged read of their span (one request each), and per file the requests of the other jobs
    with what each request feeds."""

    jobs: list[CopyJob]
    memory: list[CopyJob]
    staged: list[CopyJob]
    staged_requests: list[tuple[str, int, int]]
    groups: list[tuple[list[tuple[str, int, int]], list[Feeds]]]

    @property
    def requests(self) -> list[tuple[str, int, int]]:
        """Every request :meth:`Executor.execute` issues, as ``(file, start, stop)``."""
        return self.staged_requests + [r for rs, _ in self.groups for r in rs]


def _requests(jobs: Sequence[CopyJob], gap: int, limit: int, chunk_gap: int | None = None,
              lanes: Sequence[Lane] = (), feeds: bool = True) -> tuple[list[tuple[str, int, int]], list[Feeds]]:
    """The requests of all files (:func:`_file_requests`) at once."""
    requests: list[tuple[str, int, int]] = []
    fed: list[Feeds] = []
    for r, f in _file_requests(jobs, gap, limit, chunk_gap, lanes, feeds):
        requests.extend(r)
        fed.extend(f)
    return requests, fed


_SPAN = 1 << 40  # file offsets below this are merged for all files at once (file k's offsets shifted by k * _SPAN)


def _file_requests(jobs: Sequence[CopyJob], gap: int, limit: int, chunk_gap: int | None = None,
                   lanes: Sequence[Lane] = (), feeds: bool = True
                   ) -> Iterator[tuple[list[tuple[str, int, int]], list[Feeds]]]:
    """The reads that serve ``jobs`` and the rows of ``lanes``: per file, all runs sorted, merged where the gap
    between them is at most ``gap`` (``chunk_gap``, default ``gap``, between runs of the same chunk), and cut
    into requests near ``limit`` bytes (a run belongs to the request where it starts; each request reads from
    its first run's start to its last run's end). Yields, file by file, the requests ``(key, start, stop)`` and
    what each request feeds: (job, runs) parts, regular blocks of runs inside that request, and (lane,
    :class:`~jreshard.lanes.Rows`) parts. Runs longer than ``limit`` are cut first.

    A job or lane row whose runs form one regular row with gaps of at most ``chunk_gap`` (the usual case: a
    piece needing a part of every row of a chunk) is merged as one interval and cut arithmetically; the other
    rows are merged run by run, all at once (array arithmetic); only jobs of other shapes go run by run in
    Python. All files are merged in one pass, file k's offsets shifted by ``k * _SPAN`` (gaps between files
    are never bridged); files with offsets beyond that go one by one. ``feeds`` False: only the requests (each
    feeds None), for a plan that is counted, not run.
    """
    if chunk_gap is None:
        chunk_gap = gap
    keys: dict[str, int] = {}
    items: list[tuple[CopyJob, Runs, int]] = []
    top = 0
    for j in jobs:
        kid = keys.setdefault(j.locator.key, len(keys))
        for r in _split_long_runs(j.runs, limit):
            items.append((j, r, kid))
            top = max(top, j.locator.base + r.src_span[1])
    lane_rows: list[tuple[Lane, Rows]] = []
    for lane in lanes:
        ids = np.zeros(len(lane.keys), np.int64)
        for k in np.unique(lane.rows.kid).tolist():  # the files it has rows in
            ids[k] = keys.setdefault(lane.keys[k], len(keys))
        lr = _split_long_rows(dataclasses.replace(lane.rows, kid=ids[lane.rows.kid]), limit)  # kid: of this pass
        lane_rows.append((lane, lr))
        if len(lr.x0):
            top = max(top, int((lr.x0 + (lr.n - 1) * lr.s + lr.run).max()))
    if top >= _SPAN or len(keys) >= (1 << 62) // _SPAN or max(gap, chunk_gap) >= _SPAN - top:  # file by file
        if len(keys) > 1:
            for key in keys:
                yield from _file_requests([j for j in jobs if j.locator.key == key], gap, limit, chunk_gap,
                                          [lane.only(key) for lane in lanes], feeds)
            return
    span = _SPAN if len(keys) > 1 else 0
    names = list(keys)
    # Intervals to merge: one per dense job (x0: file offset of its first run, n runs, stride s), one per run of
    # the others. Sparse jobs of one row of runs (the usual case: a piece needing a part of every row of a
    # chunk) have their runs laid out by array arithmetic, all at once: ``rows`` (x0, n, s, run, base).
    dense: list[tuple[CopyJob, Runs, int, int, int]] = []
    sparse: list[tuple[CopyJob, Runs, np.ndarray | None]] = []
    rows: list[tuple[int, int, int, int, int]] = []
    for j, r, kid in items:
        if len(r.outer) > 1:
            r = _fold(r)
        base = j.locator.base + kid * span
        x0 = base + r.src
        if not r.outer:
            dense.append((j, r, x0, 1, 0))
        elif len(r.outer) == 1 and r.run <= r.src_strides[0] <= r.run + max(gap, min(chunk_gap, r.run // WASTE)):
            dense.append((j, r, x0, r.outer[0], r.src_strides[0]))
        elif len(r.outer) == 1:
            sparse.append((j, r, None))
            rows.append((x0, r.outer[0], r.src_strides[0], r.run, base))
        else:
            sparse.append((j, r, r.src_starts() + base))
    obj = Rows(*np.array(rows, np.int64).reshape(-1, 5).T)
    # Lane rows (shifted like the jobs): dense ones are one interval each, like dense jobs; the others go run by
    # run, like ``rows``.
    klanes = [(lane.whole or lane, _shifted(lr, span)) for lane, lr in lane_rows]  # parts name the bound lane
    ldense = [(lr.n == 1) | ((lr.run <= lr.s)
                             & (lr.s <= lr.run + np.maximum(gap, np.minimum(chunk_gap, lr.run // WASTE))))
              for _, lr in klanes]
    others = [x for _, _, x in sparse if x is not None]
    # The rows merged run by run, with side-by-side bands of the same rows fused first (what the merge would join
    # anyway: no gap between them): pieces that split a chunk's rows between them read as whole rows.
    cat = np.concatenate
    f_start, f_len, f_chunk = _fused_runs(cat([obj.x0] + [lr.x0[~d] for (_, lr), d in zip(klanes, ldense)]),
                                          cat([obj.n] + [lr.n[~d] for (_, lr), d in zip(klanes, ldense)]),
                                          cat([obj.s] + [lr.s[~d] for (_, lr), d in zip(klanes, ldense)]),
                                          cat([obj.run] + [lr.run[~d] for (_, lr), d in zip(klanes, ldense)]),
                                          cat([obj.base] + [lr.base[~d] for (_, lr), d in zip(klanes, ldense)]))
    starts = cat([np.array([d[2] for d in dense], np.int64), f_start]
                 + [lr.x0[d] for (_, lr), d in zip(klanes, ldense)] + others)
    if not len(starts):
        return
    lengths = cat([np.array([(n - 1) * s + r.run for _, r, _, n, s in dense], np.int64), f_len]
                  + [((lr.n - 1) * lr.s + lr.run)[d] for (_, lr), d in zip(klanes, ldense)]
                  + [np.full(len(x), r.run, np.int64) for _, r, x in sparse if x is not None])
    chunks = cat([np.array([x0 - r.src for _, r, x0, _, _ in dense], np.int64), f_chunk]
                 + [lr.base[d] for (_, lr), d in zip(klanes, ldense)]
                 + [np.full(len(x), int(x[0]) - r.src, np.int64) for _, r, x in sparse if x is not None])
    order = np.argsort(starts, kind="stable")
    # Per file: the bytes needed, and those read through the gaps of dense rows; larger gaps may then be read
    # through while they total at most 1/WASTE of the bytes needed, less those.
    nk = max(1, len(keys))
    kid_of = (lambda x: x // span) if span else (lambda x: x * 0)
    useful = np.zeros(nk, np.int64)
    bridged = np.zeros(nk, np.int64)
    for _, r, x0, n, s in dense:
        k = x0 // span if span else 0
        useful[k] += n * r.run
        if s - r.run > gap:
            bridged[k] += (n - 1) * (s - r.run)
    for _, r, x in sparse:
        if x is not None:
            useful[int(x[0]) // span if span else 0] += len(x) * r.run
    np.add.at(useful, kid_of(obj.x0), obj.n * obj.run)
    for (_, lr), d in zip(klanes, ldense):
        np.add.at(useful, kid_of(lr.x0), lr.n * lr.run)
        np.add.at(bridged, kid_of(lr.x0), np.where(d & (lr.s - lr.run > gap), (lr.n - 1) * (lr.s - lr.run), 0))
    budget = np.maximum(0, useful // WASTE - bridged)
    rs, re = _merge(starts[order], lengths[order], chunks[order], gap, chunk_gap, budget, span)
    # Each merged region is cut into windows of ``limit`` bytes; a run belongs to the window of its start.
    nwin = (re - rs - 1) // max(1, limit) + 1
    first_win = np.cumsum(nwin) - nwin
    nw = int(nwin.sum())
    parts: list[list[tuple[Any, Any]]] = [[] for _ in range(nw)] if feeds else []  # (none made when counting)
    regions = np.searchsorted(rs, [d[2] for d in dense], "right") - 1
    # Rows of runs inside one merged region: in one window (the usual case), bounds at once and parts as
    # they are (``one``); across windows, cut like the dense jobs (``cut``); the others run by run below.
    wins = _Windows(rs, re, first_win, limit)
    ow = wins.of(obj)
    if feeds:
        lo_l, hi_l = [np.iinfo(np.int64).max] * nw, [-1] * nw  # the bytes each window reads
        many = None
    else:
        # Counted: a region of one window reads from its first run's start to its last byte (what the rows
        # below would find), so the bounds come from the regions, and only rows reaching a region of several
        # windows are placed.
        many = nwin > 1
        lo_l, hi_l = np.full(nw, np.iinfo(np.int64).max, np.int64), np.full(nw, -1, np.int64)
        lo_l[first_win[~many]], hi_l[first_win[~many]] = rs[~many], re[~many]
        dense = [d for d, m in zip(dense, regions.tolist()) if many[m]]
        regions = regions[many[regions]] if len(regions) else regions
    obj_reach = wins.reaches(obj, ow, many) if many is not None else np.ones(len(obj.x0), bool)
    regions = regions.tolist()
    rs_l, fw_l = (rs.tolist(), first_win.tolist()) if dense or ow.cut.any() else ([], [])
    picked = np.flatnonzero(ow.cut)
    if len(picked):
        row_jobs = [(j, r) for j, r, x in sparse if x is None]
        extra = [(row_jobs[k] + (x0, n, s), m) for k, x0, n, s, m in
                 zip(picked.tolist(), *(a[picked].tolist() for a in (obj.x0, obj.n, obj.s, ow.m)))]
    else:
        extra = []
    for (j, r, x0, n, s), m in itertools.chain(zip(dense, regions), extra):
        r0, f = rs_l[m], fw_l[m]
        w0_, w1 = f + (x0 - r0) // limit, f + (x0 + (n - 1) * s - r0) // limit
        k0 = 0
        for w in range(w0_, w1 + 1):
            k1 = n if w == w1 else -(-(r0 + (w - f + 1) * limit - x0) // s)  # runs starting before the cut
            if k1 > k0:
                a, b = x0 + k0 * s, x0 + (k1 - 1) * s + r.run
                lo_l[w] = min(lo_l[w], a)
                hi_l[w] = max(hi_l[w], b)
                if feeds:
                    part = r if not r.outer else Runs(r.src + k0 * s, r.src_strides, r.dst + k0 * r.dst_strides[0],
                                                      r.dst_strides, (k1 - k0,), r.run, r.step, r.item)
                    parts[w].append((j, part))
                k0 = k1
    lo, hi = (np.array(lo_l, np.int64), np.array(hi_l, np.int64)) if feeds else (lo_l, hi_l)
    if len(obj.x0):
        one = ow.one & obj_reach
        np.minimum.at(lo, ow.w0[one], obj.x0[one])
        np.maximum.at(hi, ow.w0[one], (ow.last + obj.run)[one])
        w0_l = ow.w0.tolist()
    for lane, lr in klanes:
        lw = wins.of(lr)
        if not feeds:  # counted: the windows' bounds only, of the rows reaching regions of several windows
            reach = np.flatnonzero(wins.reaches(lr, lw, many))
            if not len(reach):
                continue
            win, first, end = _window_bounds(lr.take(reach), _Placement(*(a[reach] for a in lw)), first_win, rs,
                                             limit)
            np.minimum.at(lo, win, first)
            np.maximum.at(hi, win, end)
            continue
        # Rows across windows are cut into one sub-row per window (the dense jobs' arithmetic, at once).
        placed, win = _cut_at(lr, lw, first_win, rs, limit)
        if len(win):
            last = placed.x0 + (placed.n - 1) * placed.s
            np.minimum.at(lo, win, placed.x0)
            np.maximum.at(hi, win, last + placed.run)
            if not feeds:
                continue
            order = np.argsort(win, kind="stable")
            ws = win[order]
            cuts = [0, *(np.flatnonzero(np.diff(ws)) + 1).tolist(), len(order)]
            for w, part in zip(ws[cuts[:-1]].tolist(), _shifted(placed.take(order), -span).split(cuts)):
                parts[w].append((lane, part))
    k = -1
    for j, r, x in sparse:
        if x is None:  # a row of runs
            k += 1
            if ow.one[k]:
                if feeds:
                    parts[w0_l[k]].append((j, r))
                continue
            if ow.cut[k] or not obj_reach[k]:
                continue
            x = _grid(r.src, r.outer, r.src_strides) + int(obj.base[k])
        m = np.searchsorted(rs, x, "right") - 1
        win = first_win[m] + (x - rs[m]) // limit
        np.minimum.at(lo, win, x)
        np.maximum.at(hi, win, x + r.run)
        if feeds:
            _cut_blocks(j, r, win, parts)
    used = np.flatnonzero(hi >= 0)
    kid = lo[used] // span if span else np.zeros(len(used), np.int64)
    bounds = (np.flatnonzero(np.diff(kid)) + 1).tolist()
    used_l, kid_l = used.tolist(), kid.tolist()
    lo_u, hi_u = (lo[used] - kid * span).tolist(), (hi[used] - kid * span).tolist()
    for a, b in zip([0, *bounds], [*bounds, len(used_l)]):
        key = names[kid_l[a]]
        yield (list(zip(itertools.repeat(key, b - a), lo_u[a:b], hi_u[a:b])),
               [parts[used_l[i]] for i in range(a, b)] if feeds else [None] * (b - a))


def _fused_runs(x0: np.ndarray, n: np.ndarray, s: np.ndarray, run: np.ndarray, base: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The runs of rows (starts, lengths, chunk ids) for merging, with rows of the same chunk, count and stride
    that sit side by side in the file (one starting where the other's first run ends) fused into one row: the
    union of their bytes is the same, in fewer runs. A fused row whose runs touch each other is one interval.

    Example (two column bands of the same 3 rows of 10 bytes, then an unrelated row):
        >>> st, ln, ch = _fused_runs(np.array([0, 4, 100]), np.array([3, 3, 2]), np.array([10, 10, 8]),
        ...                          np.array([4, 6, 2]), np.array([0, 0, 100]))
        >>> st.tolist(), ln.tolist(), ch.tolist()
        ([0, 100, 108], [30, 2, 2], [0, 100, 100])
    """
    if len(x0) > 1:
        order = np.lexsort((x0, s, n, base))
        x0, n, s, run, base = x0[order], n[order], s[order], run[order], base[order]
        new = np.ones(len(x0), bool)
        new[1:] = (base[1:] != base[:-1]) | (n[1:] != n[:-1]) | (s[1:] != s[:-1]) | (x0[1:] != x0[:-1] + run[:-1])
        first = np.flatnonzero(new)
        x0, n, s, base = x0[first], n[first], s[first], base[first]
        run = np.add.reduceat(run, first)
    whole = run == s  # rows of touching runs: one interval
    return (np.concatenate((x0[whole], row_grid(x0[~whole], n[~whole], s[~whole]))),
            np.concatenate(((n * s)[whole], np.repeat(run[~whole], n[~whole]))),
            np.concatenate((base[whole], np.repeat(base[~whole], n[~whole]))))


def _shifted(r: Rows, span: int) -> Rows:
    """``r`` with its file offsets shifted by ``kid * span`` (unshifted by a negative ``span``)."""
    if not span:
        return r
    shift = r.kid * span
    return dataclasses.replace(r, x0=r.x0 + shift, base=r.base + shift)


def _cut_at(r: Rows, lw: _Placement, first_win: np.ndarray, rs: np.ndarray, limit: int) -> tuple[Rows, np.ndarray]:
    """The rows (placed by :meth:`_Windows.of`) cut into one sub-row per window their runs reach (a run belongs
    to the window of its start), and the window of each sub-row: arithmetic for rows inside one merged region,
    run by run (arrays) for the others."""
    one, cut, out = np.flatnonzero(lw.one), np.flatnonzero(lw.cut), np.flatnonzero(lw.out)
    if not len(cut) and not len(out):
        return r.take(one), lw.w0[one]
    sub_o, win_o = _runs_in_windows(r, out, first_win, rs, limit)
    row, w, k0, k1 = _cut_rows(r, lw, cut, first_win, rs, limit)
    sub = r.take(cut[row])
    sub.x0 = sub.x0 + k0 * sub.s
    sub.dst = sub.dst + k0 * sub.ds
    sub.n = k1 - k0
    return Rows.concat([r.take(one), sub, sub_o]), np.concatenate((lw.w0[one], w, win_o))


def _window_bounds(r: Rows, lw: _Placement, first_win: np.ndarray, rs: np.ndarray, limit: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What :func:`_cut_at` places, as bounds only (a plan that is counted): per piece, its window, its first
    byte and its end (the windows' extents are the least first byte and the greatest end of what they hold)."""
    one, cut, out = np.flatnonzero(lw.one), np.flatnonzero(lw.cut), np.flatnonzero(lw.out)
    row, w, k0, k1 = _cut_rows(r, lw, cut, first_win, rs, limit)
    x, which, _, win = _out_runs(r, out, first_win, rs, limit)
    c = cut[row]
    return (np.concatenate((lw.w0[one], w, win)),
            np.concatenate((r.x0[one], r.x0[c] + k0 * r.s[c], x)),
            np.concatenate(((lw.last + r.run)[one], r.x0[c] + (k1 - 1) * r.s[c] + r.run[c], x + r.run[out][which])))


def _cut_rows(r: Rows, lw: _Placement, cut: np.ndarray, first_win: np.ndarray, rs: np.ndarray, limit: int
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Rows ``cut`` (inside one merged region, across windows) cut at the windows: per sub-row, its row (index
    into ``cut``), window, and first and end run (k0, k1) in that row."""
    m = lw.m[cut]
    r0, f = rs[m], first_win[m]
    x0, n, s = r.x0[cut], r.n[cut], r.s[cut]
    w0 = lw.w0[cut]
    w1 = f + (x0 + (n - 1) * s - r0) // limit
    count = w1 - w0 + 1
    row = np.repeat(np.arange(len(cut)), count)
    w = np.repeat(w0, count) + (np.arange(int(count.sum())) - np.repeat(np.cumsum(count) - count, count))
    # runs starting before the end of window w: ceil((end of w - x0) / s), at most n
    end = r0[row] + (w - f[row] + 1) * limit
    k1 = np.minimum(n[row], -(-(end - x0[row]) // s[row]))
    k0 = np.concatenate(([0], k1[:-1]))
    k0[np.concatenate(([True], row[1:] != row[:-1]))] = 0
    keep = k1 > k0
    return row[keep], w[keep], k0[keep], k1[keep]


def _out_runs(r: Rows, rows: np.ndarray, first_win: np.ndarray, rs: np.ndarray, limit: int
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The runs of rows ``rows`` of ``r``, one by one: start, row (index into ``rows``), run index in its row,
    and window."""
    n = r.n[rows]
    x = row_grid(r.x0[rows], n, r.s[rows])
    which = np.repeat(np.arange(len(rows)), n)
    k = np.arange(len(x)) - np.repeat(np.cumsum(n) - n, n)
    m = np.searchsorted(rs, x, "right") - 1
    return x, which, k, first_win[m] + (x - rs[m]) // limit


def _runs_in_windows(r: Rows, rows: np.ndarray, first_win: np.ndarray, rs: np.ndarray, limit: int
                     ) -> tuple[Rows, np.ndarray]:
    """Rows ``rows`` of ``r`` (whose runs lie in several merged regions) cut where the window of their runs
    changes: the sub-rows, and the window of each."""
    x, which, k, win = _out_runs(r, rows, first_win, rs, limit)
    new = np.ones(len(x), bool)
    new[1:] = (which[1:] != which[:-1]) | (win[1:] != win[:-1])
    first = np.flatnonzero(new)
    sub = r.take(rows[which[first]])
    sub.x0 = x[first]
    sub.dst = sub.dst + k[first] * sub.ds
    sub.n = np.diff(np.concatenate((first, [len(x)])))
    return sub, win[first]


def _split_long_rows(r: Rows, limit: int) -> Rows:
    """Rows whose runs are longer than ``limit`` bytes cut into single runs of at most ``limit`` bytes (as
    :func:`_split_long_runs` cuts a job's)."""
    long = r.run > limit
    if not long.any():
        return r
    keep = np.flatnonzero(~long)
    cut = np.flatnonzero(long)
    # every run k of every long row, then every piece o of it
    per_run = -(-r.run[cut] // limit)
    runs_of_row = np.repeat(cut, r.n[cut])
    k = np.arange(len(runs_of_row)) - np.repeat(np.cumsum(r.n[cut]) - r.n[cut], r.n[cut])
    pieces = np.repeat(per_run, r.n[cut])
    row = np.repeat(runs_of_row, pieces)
    o = (np.arange(int(pieces.sum())) - np.repeat(np.cumsum(pieces) - pieces, pieces)) * limit
    kk = np.repeat(k, pieces)
    x0 = r.x0[row] + kk * r.s[row] + o
    dst = r.dst[row] + kk * r.ds[row] + o
    run = np.minimum(limit, r.run[row] - o)
    one = np.ones(len(row), np.int64)
    zero = np.zeros(len(row), np.int64)
    split = r.take(row)
    split.x0, split.n, split.s, split.run, split.dst, split.ds = x0, one, zero, run, dst, zero
    return Rows.concat([r.take(keep), split])


class _Placement(NamedTuple):
    """Where rows of runs fall among merged regions and windows (:meth:`_Windows.of`): per row its region ``m``,
    last run start ``last``, first window ``w0``, and whether it lies in one region and one window (``one``), in
    one region across windows (``cut``) or in several regions (``out``)."""

    m: np.ndarray
    last: np.ndarray
    w0: np.ndarray
    one: np.ndarray
    cut: np.ndarray
    out: np.ndarray


@dataclass
class _Windows:
    """Merged regions (``rs``, ``re``) cut into windows of ``limit`` bytes (``first_win``: the first window of
    each region); :meth:`of` places rows of runs in them."""

    rs: np.ndarray
    re: np.ndarray
    first_win: np.ndarray
    limit: int

    def of(self, r: Rows) -> _Placement:
        last = r.x0 + (r.n - 1) * r.s
        m = np.searchsorted(self.rs, r.x0, "right") - 1
        mm = np.maximum(m, 0)
        w0 = self.first_win[mm] + (r.x0 - self.rs[mm]) // self.limit
        inside = (m >= 0) & (last < self.re[mm]) & ((r.s > 0) | (r.n == 1))
        one = inside & (w0 == self.first_win[mm] + (last - self.rs[mm]) // self.limit)
        return _Placement(m, last, w0, one, inside & ~one, ~inside)

    def reaches(self, r: Rows, p: _Placement, many: np.ndarray) -> np.ndarray:
        """Whether each row (placed by :meth:`of` as ``p``) has a run start in a region flagged in ``many`` (or
        may have: rows with runs outside every region, or of negative stride, count as reaching one)."""
        if not len(r.x0):
            return np.zeros(0, bool)
        lo, hi = np.minimum(r.x0, p.last), np.maximum(r.x0, p.last)
        m0 = np.searchsorted(self.rs, lo, "right") - 1
        m1 = np.searchsorted(self.rs, hi, "right") - 1
        flagged = np.concatenate(([0], np.cumsum(many)))
        return (m0 < 0) | (flagged[m1 + 1] - flagged[np.maximum(m0, 0)] > 0)


def _merge(starts: np.ndarray, lengths: np.ndarray, chunks: np.ndarray, gap: int, chunk_gap: int,
           budget: int | np.ndarray | None = None, span: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Merge byte runs (sorted by start) into reads: gaps of at most ``gap`` are bridged; larger
    gaps of at most ``chunk_gap`` between runs of the same chunk (same ``chunks`` value) too, smallest first,
    while those total at most ``budget`` bytes (None: no limit). Returns the (starts, stops) of the merged reads.
    With ``span``, the runs are of several files (file k's offsets shifted by ``k * span``) and ``budget`` is an
    array: file k's gaps are bridged within ``budget[k]``, smallest first, exactly as for that file alone (one
    file is file 0).

    Example (gaps of 2, 6 and 4 bytes; gaps up to 3 always, a budget of 4 for the others: 2 and 4 bridged):
        >>> s, e = _merge(np.array([0, 12, 28, 42]), np.array([10, 10, 10, 10]), np.zeros(4, np.int64), 3, 16, 4)
        >>> s.tolist(), e.tolist()
        ([0, 28], [22, 52])
    """
    ends = starts + lengths
    if len(starts) == 0:
        return starts, ends
    prev_end = np.maximum.accumulate(ends)
    gaps = starts[1:] - prev_end[:-1]
    join = gaps <= np.where(chunks[1:] == chunks[:-1], chunk_gap, gap)
    if budget is not None:
        # Overlapping runs and gaps up to ``gap`` always join; larger gaps join smallest first within the
        # budget, so that they add at most 1/WASTE to the bytes needed.
        cand = np.flatnonzero(join & (gaps > gap))
        if len(cand):
            file = starts[1:][cand] // span if span else np.zeros(len(cand), np.int64)
            order = np.lexsort((gaps[cand], file))  # by file, then gap (stable)
            order, file = cand[order], file[order]
            used = np.cumsum(gaps[order])
            first = np.flatnonzero(np.concatenate(([True], file[1:] != file[:-1])))
            before = np.repeat(used[first] - gaps[order][first], np.diff(np.concatenate((first, [len(order)]))))
            allowed = order[used - before <= np.atleast_1d(budget)[file]]
            join[cand] = False
            join[allowed] = True
    new = np.ones(len(starts), dtype=bool)
    new[1:] = ~join
    first = np.flatnonzero(new)
    return starts[first], np.maximum.reduceat(ends, first)


def _cut_blocks(j: CopyJob, r: Runs, win: np.ndarray, parts: list[list[tuple[CopyJob, Runs]]]) -> None:
    """Add to ``parts[w]`` the runs of ``r`` (window ``win[i]`` for run i, in grid order) that fall in window
    w: the grid as blocks along its last dimension, each block cut where the window changes."""
    if not r.outer:
        parts[int(win[0])].append((j, r))
        return
    n, s_step, d_step = r.outer[-1], r.src_strides[-1], r.dst_strides[-1]
    src_strides, dst_strides, run, step, item = (s_step,), (d_step,), r.run, r.step, r.item
    block_src = _grid(r.src, r.outer[:-1], r.src_strides[:-1]).tolist()
    block_dst = _grid(r.dst, r.outer[:-1], r.dst_strides[:-1]).tolist()
    new = np.ones(len(win), dtype=bool)
    new[1:] = win[1:] != win[:-1]
    new[::n] = True
    first = np.flatnonzero(new)
    for a, b, w in zip(first.tolist(), [*first[1:].tolist(), len(win)], win[first].tolist()):
        m, k0 = divmod(a, n)
        parts[w].append((j, Runs(block_src[m] + k0 * s_step, src_strides, block_dst[m] + k0 * d_step, dst_strides,
                                 (b - a,), run, step, item)))


def _fold(r: Runs) -> Runs:
    """``r`` with neighbouring outer dimensions merged where both grids are regular across them."""
    if len(r.outer) < 2:
        return r
    outer, ss, ds = list(r.outer), list(r.src_strides), list(r.dst_strides)
    for d in range(len(outer) - 2, -1, -1):
        if ss[d] == outer[d + 1] * ss[d + 1] and ds[d] == outer[d + 1] * ds[d + 1]:
            outer[d : d + 2] = [outer[d] * outer[d + 1]]
            ss[d : d + 2] = [ss[d + 1]]
            ds[d : d + 2] = [ds[d + 1]]
    return dataclasses.replace(r, src_strides=tuple(ss), dst_strides=tuple(ds), outer=tuple(outer))


def _split_long_runs(r: Runs | None, limit: int) -> list[Runs]:
    """A job's runs, with runs longer than ``limit`` bytes cut into single runs of at most ``limit`` bytes
    (parallel requests, bounded buffers). The pieces stay runs of the same job, whose ``dest`` is bound later."""
    assert r is not None
    if r.run <= limit:
        return [r]
    if r.step:  # cut between elements; each element moves ``step`` bytes in the destination
        n = max(1, limit // r.item) * r.item
        return [dataclasses.replace(r, src=src + o, src_strides=(), dst=dst + o // r.item * r.step, dst_strides=(),
                                    outer=(), run=min(n, r.run - o))
                for src, dst in zip(r.src_starts().tolist(), r.dst_starts().tolist()) for o in range(0, r.run, n)]
    return [Runs(src + o, (), dst + o, (), (), min(limit, r.run - o))
            for src, dst in zip(r.src_starts().tolist(), r.dst_starts().tolist()) for o in range(0, r.run, limit)]


def read_locator_whole(store: Store, locator: Locator, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A whole chunk/tensor as a new array (used for small objects and ``Checkpoint.read``)."""
    from .planning import runs_of

    dest = np.empty(shape, dtype)
    ov = Overlap(0, (0,) * len(shape), (0,) * len(shape), tuple(shape))
    job = CopyJob("", locator, tuple(shape), ov, dest, runs_of(locator, shape, ov, shape, dtype.itemsize))
    with ThreadPoolExecutor(2) as pool:
        Executor(store).run([job], pool)
    return dest
