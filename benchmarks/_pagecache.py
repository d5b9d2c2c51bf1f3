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
