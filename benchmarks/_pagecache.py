"""The page-cache state a benchmark run starts from: warm (every file read once) or cold (evicted), checked.

``warm(files)`` reads every file once through an unbuffered ``readinto``. ``evict(files)`` makes them cold
without root: ``os.sync()``, then ``posix_fadvise(POSIX_FADV_DONTNEED)`` over each whole file, which drops its
clean, unmapped pages from this machine's page cache; ``drop_caches=True`` additionally writes ``3`` to
``/proc/sys/vm/drop_caches`` (machine-wide: every process's files, and dentries and inodes) when that file is
writable. Either way the result is checked: ``resident_bytes`` asks the kernel with ``mincore(2)`` (through
ctypes, on a read-only shared ``mmap`` of the file that touches no page) how many of the file's pages are in
memory. Where ``mincore`` is unavailable the check says so instead of guessing.

What "cold" cannot mean here: on a virtual machine the host may still hold the disk image in its own cache,
so a cold read is a read that misses this machine's page cache, not necessarily one that reaches a disk.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import mmap
import os
from pathlib import Path
from typing import Any

DROP_CACHES = "/proc/sys/vm/drop_caches"


def files_under(path: Path) -> list[Path]:
    """``path`` itself if it is a file, else every file below it (sorted)."""
    return [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())


def warm(files: list[Path]) -> None:
    """Reads every file once, so that its pages are in the page cache."""
    buf = bytearray(16 << 20)
    for file in files:
        with open(file, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


_libc = None


def _mincore_libc():
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        lib = ctypes.CDLL(name, use_errno=True)
        if not hasattr(lib, "mincore"):
            raise OSError("libc has no mincore")
        lib.mmap.restype = ctypes.c_void_p
        lib.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                             ctypes.c_long]  # fmt: skip
        lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        lib.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        _libc = lib
    return _libc


def resident_bytes(file: Path) -> int:
    """Bytes of ``file`` that sit in the page cache now (whole pages, at most the file's size), by ``mincore``.

    Raises OSError where ``mincore`` or ``mmap`` cannot be used.
    """
    size = file.stat().st_size
    if size == 0:
        return 0
    libc = _mincore_libc()
    fd = os.open(file, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr is None or addr == ctypes.c_void_p(-1).value:
            err = ctypes.get_errno()
            raise OSError(err, f"mmap of {file}: {os.strerror(err)}")
        try:
            pages = -(-size // mmap.PAGESIZE)
            vec = (ctypes.c_ubyte * pages)()
            if libc.mincore(addr, size, vec) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"mincore of {file}: {os.strerror(err)}")
            resident_pages = sum(1 for b in bytes(vec) if b & 1)
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)
    return min(size, resident_pages * mmap.PAGESIZE)


@dataclasses.dataclass
class Eviction:
    """What ``evict`` did: ``method`` (how), ``total`` (bytes of the files), ``resident`` (bytes still cached
    afterwards, None when that could not be checked) and ``note`` (why not, or what went wrong)."""

    method: str
    total: int
    resident: int | None
    note: str = ""

    @property
    def verified(self) -> bool:
        return self.resident is not None

    def describe(self) -> str:
        if self.resident is None:
            return f"{self.method}; residency not verifiable ({self.note})"
        return f"{self.method}; {self.resident / max(1, self.total):.1%} of {self.total / 2**30:.3f} GiB resident after"


def cold_possible() -> bool:
    """Whether ``evict`` can make files cold on this system."""
    return hasattr(os, "posix_fadvise") or os.access(DROP_CACHES, os.W_OK)


def _drop_caches() -> bool:
    try:
        with open(DROP_CACHES, "w") as f:
            f.write("3")
        return True
    except OSError:
        return False


def _fadvise_dontneed(files: list[Path]) -> None:
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _resident(files: list[Path]) -> tuple[int | None, str]:
    try:
        return sum(resident_bytes(f) for f in files), ""
    except (OSError, AttributeError) as e:
        return None, f"mincore: {e}"


def evict(files: list[Path], drop_caches: bool = False) -> Eviction:
    """Drops ``files`` from the page cache (see the module docstring) and checks how much is left.

    ``posix_fadvise`` comes first; ``/proc/sys/vm/drop_caches`` (when writable) is used as well when
    ``drop_caches`` is true, or when pages are still resident afterwards or that cannot be checked.
    """
    os.sync()
    methods = []
    if hasattr(os, "posix_fadvise"):
        _fadvise_dontneed(files)
        methods.append("posix_fadvise(DONTNEED)")
    resident, note = _resident(files)
    if (drop_caches or resident is None or resident > 0) and _drop_caches():
        methods.append("drop_caches")
        resident, note = _resident(files)
    method = " + ".join(methods) or "nothing (neither posix_fadvise nor drop_caches available)"
    return Eviction(method, sum(f.stat().st_size for f in files), resident, note)


def page_spans(ranges: list[tuple[int, int]], page: int = mmap.PAGESIZE) -> list[tuple[int, int]]:
    """The byte ranges ``[start, stop)`` widened to whole pages, sorted, and merged where they touch."""
    spans: list[tuple[int, int]] = []
    for start, stop in sorted((s // page * page, -(-e // page) * page) for s, e in ranges if e > s):
        if spans and start <= spans[-1][1]:
            spans[-1] = (spans[-1][0], max(spans[-1][1], stop))
        else:
            spans.append((start, stop))
    return spans


class Held:
    """Pages of files read into the page cache and kept there by touching them again and again, until
    :meth:`close`: what a benchmark that means "warm" needs on a machine that reclaims page-cache pages not used
    for a while on its own (``mlock`` cannot do it for a million scattered ranges: each splits the mapping,
    and a process may have only ``vm.max_map_count`` of those).

    ``spans``: per file, the byte ranges to hold (any order, widened to pages). They are read once with
    ``threads`` concurrent ``pread``s (a cold disk rewards queue depth), ``round_pages`` at a time, and mapped
    read-only with read-around off; :meth:`touch` reads a byte of every held page through those mappings (no
    system call, no copy), after each round and whenever called.
    """

    def __init__(self, spans: dict[Path, list[tuple[int, int]]], threads: int = 32,
                 round_pages: int = 1 << 18) -> None:
        from concurrent.futures import ThreadPoolExecutor

        import numpy as np

        libc = _mincore_libc()
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        self._libc = libc
        self._maps: list[tuple[int, int]] = []
        self._touch: list[tuple[Any, Any]] = []
        self.bytes = 0
        page = mmap.PAGESIZE
        jobs: list[tuple[Path, list[tuple[int, int]]]] = []
        pending: list[tuple[int, Any, Any]] = []
        try:
            for file, ranges in spans.items():
                size = file.stat().st_size
                pages = page_spans([(s, min(e, size)) for s, e in ranges])
                if not pages:
                    continue
                for i in range(0, len(pages), 256):
                    jobs.append((file, pages[i : i + 256]))
                self.bytes += sum(e - s for s, e in pages)
                fd = os.open(file, os.O_RDONLY)
                try:
                    addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
                finally:
                    os.close(fd)
                if addr is None or addr == ctypes.c_void_p(-1).value:
                    err = ctypes.get_errno()
                    raise OSError(err, f"mmap of {file}: {os.strerror(err)}")
                self._maps.append((addr, size))
                libc.madvise(addr, size, 1)  # MADV_RANDOM: fault in the page asked for, nothing around it
                view = np.ctypeslib.as_array((ctypes.c_ubyte * size).from_address(addr))
                starts = np.concatenate([np.arange(s, e, page) for s, e in pages])
                pending.append((len(jobs), view, starts))  # touched once its jobs (those before len(jobs)) are read

            def read(job: tuple[Path, list[tuple[int, int]]]) -> None:
                fd = os.open(job[0], os.O_RDONLY)
                try:
                    for s, e in job[1]:
                        os.pread(fd, e - s, s)
                finally:
                    os.close(fd)

            # Read in rounds of about ``round_pages`` pages, touching what was read so far after each round:
            # a first read of a cold disk may take many minutes, longer than the reclaimer lets pages idle.
            done = 0
            with ThreadPoolExecutor(threads) as ex:
                while done < len(jobs):
                    stop, pages_in = done, 0
                    while stop < len(jobs) and pages_in < round_pages:
                        pages_in += sum(e - s for s, e in jobs[stop][1]) // page
                        stop += 1
                    for _ in ex.map(read, jobs[done:stop]):
                        pass
                    done = stop
                    while pending and pending[0][0] <= done:
                        self._touch.append(pending.pop(0)[1:])
                    self.touch()
        except BaseException:
            self.close()
            raise

    def touch(self) -> int:
        """Reads a byte of every held page; returns their sum (so that the reads happen)."""
        return sum(int(view[starts].sum()) for view, starts in self._touch)

    def close(self) -> None:
        """Unmaps everything held."""
        self._touch.clear()
        for addr, size in self._maps:
            self._libc.munmap(addr, size)
        self._maps.clear()
