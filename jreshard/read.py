"""Executes copy jobs: bytes of saved chunks into the host buffers of target pieces.

A :class:`CopyJob` copies one overlap region. Jobs whose bytes are already in memory (small archives read
whole, decompressed zstd items) are plain strided copies. The others read from the store:

* ``posix`` (local files): when the jobs of a chunk tile a band of its rows, the band is read in cache-sized
  windows (``preadv`` into a per-thread buffer) and scattered into the pieces; other jobs are one strided
  copy each out of a memory map of the file. Both run on a thread pool.
* ``tensorstore`` (any KvStore): the runs of a file, sorted, merged where gaps are small and cut near
  MAX_REQUEST, become one batch of byte-range reads; each read is copied out on the pool as it arrives.

Chunks with a transposed layout (innermost stride != 1) are read as their span and copied element-wise.
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .catalog import Locator
from .errors import JReshardError, TruncatedDataError
from .plan import Overlap, Runs, element_span, merge_runs, runs_of, split_reads
from .storage import LocalStore, Store

BOUNCE = 4 * 2**20  # rows of a chunk read per window into a per-thread buffer (fits in cache)
MAX_REQUEST = 8 * 2**20  # a ranged read is cut (between runs) near this size: parallel requests, cache-sized copies


def _row_band(group: Sequence[CopyJob]) -> tuple[int, int, int, int] | None:
    """(first row, end row, rows per window, bytes per row) when the jobs of one C-ordered chunk tile a band of its rows
    (dimension 0) exactly, so that reading the band reads only needed bytes; None otherwise."""
    j0 = group[0]
    loc, sizes = j0.locator, j0.chunk_sizes
    if not sizes or not loc.is_c_contiguous(sizes) or any(j.runs is None for j in group):
        return None
    item = j0.dest.dtype.itemsize
    row = loc.strides[0] * item if sizes[0] > 1 else int(np.prod(sizes[1:], dtype=np.int64)) * item
    if row == 0 or row > BOUNCE:
        return None
    a = min(j.overlap.chunk_start[0] for j in group)
    b = max(j.overlap.chunk_start[0] + j.overlap.size[0] for j in group)
    if sum(j.nbytes for j in group) != (b - a) * row:
        return None  # the jobs leave parts of the band unread: scatter only what is needed
    return a, b, max(1, BOUNCE // row), row


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
        self._local = threading.local()

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
        jobs = [part for j in jobs for part in _split_long_run(j)]
        by_key: dict[str, list[int]] = {}
        for i, j in enumerate(jobs):
            by_key.setdefault(j.locator.key, []).append(i)
        requests: list[tuple[str, int, int]] = []
        job_reads: list[np.ndarray] = [np.zeros(0, np.int64)] * len(jobs)  # the read of each run of each job
        for key, idx in by_key.items():
            starts = [jobs[i].runs.src_starts() + jobs[i].locator.base for i in idx]  # type: ignore[union-attr]
            s = np.concatenate(starts)
            l = np.concatenate([np.full(len(x), jobs[i].runs.run, np.int64) for i, x in zip(idx, starts)])  # type: ignore[union-attr]
            order = np.argsort(s, kind="stable")
            rs, re, read_of_sorted = merge_runs(s[order], l[order], self.gap)
            rs, re, read_of_sorted = split_reads(s[order], l[order], rs, read_of_sorted, MAX_REQUEST)
            read_of_run = np.empty_like(read_of_sorted)
            read_of_run[order] = read_of_sorted + len(requests)
            requests.extend((key, int(x), int(y)) for x, y in zip(rs.tolist(), re.tolist()))
            bounds = np.cumsum([0] + [len(x) for x in starts])
            for k, i in enumerate(idx):  # each job's runs are one slice of the concatenation
                job_reads[i] = read_of_run[bounds[k] : bounds[k + 1]]
        # What each read feeds: (job, runs) parts, each a regular block of runs inside that read.
        feeds: list[list[tuple[CopyJob, Runs]]] = [[] for _ in requests]
        for j, reads in zip(jobs, job_reads):
            r = j.runs
            assert r is not None
            if len(r.outer) <= 1:  # runs in file order: each read holds a consecutive range of them
                cuts = np.flatnonzero(np.diff(reads)) + 1
                for k0, k1 in zip([0, *cuts.tolist()], [*cuts.tolist(), len(reads)]):
                    step_src = r.src_strides[0] if r.outer else 0
                    step_dst = r.dst_strides[0] if r.outer else 0
                    feeds[int(reads[k0])].append((j, Runs(r.src + k0 * step_src, r.src_strides, r.dst + k0 * step_dst,
                                                          r.dst_strides, (k1 - k0,) if r.outer else (), r.run)))
            else:
                for k, src, dst in zip(reads.tolist(), r.src_starts().tolist(), r.dst_starts().tolist()):
                    feeds[k].append((j, Runs(src, (), dst, (), (), r.run)))
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
        store = self.store
        assert isinstance(store, LocalStore)
        # Chunks whose overlapping jobs tile a band of their rows are read window by window into a small
        # per-thread buffer and scattered from there (the second copy runs from cache); the other jobs copy
        # their region out of a memory map of the file.
        by_chunk: dict[tuple[str, int], list[CopyJob]] = {}
        for j in jobs:
            by_chunk.setdefault((j.locator.key, j.locator.base), []).append(j)
        futures = []
        scatter: list[CopyJob] = []
        for group in by_chunk.values():
            band = _row_band(group)
            if band is None:
                scatter.extend(group)
                continue
            a, b, rows, row = band
            for r0 in range(a, b, rows):
                futures.append(pool.submit(self._window, group, r0, min(b, r0 + rows), row))
        self._scatter(scatter, pool)
        for f in futures:
            f.result()

    def _window(self, group: list[CopyJob], r0: int, r1: int, row: int) -> None:
        """Read rows [r0, r1) of a chunk into this thread's buffer and copy every job's part of them."""
        loc = group[0].locator
        item = group[0].dest.dtype.itemsize
        lo = loc.storage_offset * item + r0 * row
        n = (r1 - r0) * row
        buf = getattr(self._local, "buf", None)
        if buf is None or len(buf) < n:
            buf = self._local.buf = np.empty(max(n, BOUNCE), np.uint8)
        self.store.read_into(loc.key, loc.base + lo, buf[:n])
        for j in group:
            ov = j.overlap
            c0 = max(ov.chunk_start[0], r0)
            c1 = min(ov.chunk_start[0] + ov.size[0], r1)
            if c1 <= c0:
                continue
            sub = Overlap(ov.chunk_id, (c0,) + ov.chunk_start[1:], (ov.piece_start[0] + c0 - ov.chunk_start[0],) + ov.piece_start[1:],
                          (c1 - c0,) + ov.size[1:])
            runs = runs_of(loc, j.chunk_sizes, sub, j.dest.shape, item)
            _copy_runs_from(buf[:n], lo, j, runs)

    def _scatter(self, jobs: Sequence[CopyJob], pool: ThreadPoolExecutor) -> None:
        """Jobs that read only part of their chunk's rows: one strided copy each, out of the memory-mapped
        file (only the needed bytes are touched; a syscall per run would cost far more)."""
        store = self.store
        assert isinstance(store, LocalStore)
        by_key: dict[str, list[CopyJob]] = {}
        for j in jobs:
            by_key.setdefault(j.locator.key, []).append(j)
        futures = []
        for key, kjobs in by_key.items():
            size = store.size(key)
            bad = sorted({j.name for j in kjobs if j.locator.base + j.runs.src_span[1] > size})  # type: ignore[union-attr]
            if bad:
                raise TruncatedDataError(
                    f"{store.where(key)}: file has {size} bytes, fewer than the metadata says "
                    f"(tensor(s) {', '.join(map(repr, bad[:5]))}); truncated file?"
                )
            view = store.mapped(key)
            futures.extend(pool.submit(_copy_runs_from, view, -j.locator.base, j) for j in kjobs)
            store.stats.add(sum(j.runs.nbytes for j in kjobs), len(kjobs))  # type: ignore[union-attr]
        for f in futures:
            f.result()


def _split_long_run(job: CopyJob) -> list[CopyJob]:
    """A job that is one long run, as several jobs of at most MAX_REQUEST bytes (parallel requests)."""
    r = job.runs
    if r is None or r.outer or r.run <= MAX_REQUEST:
        return [job]
    return [dataclasses.replace(job, runs=Runs(r.src + o, (), r.dst + o, (), (), min(MAX_REQUEST, r.run - o)))
            for o in range(0, r.run, MAX_REQUEST)]


def read_locator_whole(store: Store, locator: Locator, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A whole chunk/tensor as a new array (used for small objects and ``Checkpoint.read``)."""
    from .plan import runs_of

    dest = np.empty(shape, dtype)
    ov = Overlap(0, (0,) * len(shape), (0,) * len(shape), tuple(shape))
    job = CopyJob("", locator, tuple(shape), ov, dest, runs_of(locator, shape, ov, shape, dtype.itemsize))
    with ThreadPoolExecutor(2) as pool:
        Executor(store).run([job], pool)
    return dest
