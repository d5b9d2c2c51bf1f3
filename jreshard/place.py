"""Host buffers onto devices: aligned host allocation, ``jax.device_put`` and global assembly.

On CPU devices a 64-byte aligned numpy buffer is aliased by ``device_put`` (no copy), so pieces are
allocated aligned and written once.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any, Sequence

import numpy as np

from .errors import OutOfMemoryError

ALIGN = 64


@functools.lru_cache(maxsize=1)
def host_memory() -> int:
    """Bytes of physical memory of this machine (0 when unknown), asked once."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def check_fits(nbytes: int, what: str = "host buffers") -> None:
    """Refuse (OutOfMemoryError) an allocation larger than this machine's memory before it is made: with
    overcommit, a huge ``numpy.empty`` succeeds and the process is killed when the pages are touched.

    Example:
        >>> check_fits(1024)
    """
    total = host_memory()
    if total and nbytes > total:
        raise OutOfMemoryError(f"{what} need {nbytes / 2**30:.1f} GiB at once, more than this machine's "
                               f"{total / 2**30:.1f} GiB of memory; read a smaller box or shard the target further")


def aligned_empty(shape: Sequence[int], dtype: np.dtype) -> np.ndarray:
    """An uninitialised C-ordered array whose data pointer is 64-byte aligned.

    Example:
        >>> a = aligned_empty((3, 5), np.dtype("float32"))
        >>> a.shape, a.ctypes.data % 64
        ((3, 5), 0)
    """
    dtype = np.dtype(dtype)
    nbytes = math.prod(int(s) for s in shape) * dtype.itemsize
    check_fits(nbytes)
    raw = _empty(nbytes + ALIGN)
    start = (-raw.ctypes.data) % ALIGN
    return raw[start : start + nbytes].view(dtype).reshape(tuple(shape))


BLOCK = 256 * 2**20  # host pieces are carved out of blocks of this size (huge pages, few page faults)
HUGE = 2 * 2**20


class HostPool:
    """Host blocks given back once their bytes reached a device that copies them (an accelerator), taken again by
    the next allocations: memory faulted in once serves batch after batch. Blocks idle in the pool and blocks
    lent out (``take``) together stay within ``cap`` bytes: idle blocks are dropped before a fresh one would
    pass it.

    Example:
        >>> pool = HostPool(cap=3 << 20)
        >>> a = pool.take(1 << 20); pool.give([a])
        >>> b = pool.take(1000)  # the idle block, reused
        >>> b is a, pool.lent
        (True, 1048576)
    """

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.idle: list[np.ndarray] = []
        self.lent = 0

    def take(self, nbytes: int) -> np.ndarray:
        """A block of at least ``nbytes`` bytes (uint8): the smallest idle one that fits, else a fresh one."""
        fits = [k for k, b in enumerate(self.idle) if len(b) >= nbytes]
        if fits:
            block = self.idle.pop(min(fits, key=lambda k: len(self.idle[k])))
        else:
            while self.idle and sum(len(b) for b in self.idle) + self.lent + nbytes > self.cap:
                self.idle.pop(max(range(len(self.idle)), key=lambda k: len(self.idle[k])))
            block = _empty(nbytes)
        self.lent += len(block)
        return block

    def give(self, blocks: Sequence[np.ndarray]) -> None:
        """Blocks taken from this pool whose arrays are no longer needed on the host."""
        for b in blocks:
            self.lent -= len(b)
            self.idle.append(b)


def allocate(shapes: Sequence[tuple[Sequence[int], np.dtype]], block: int = BLOCK, pool: HostPool | None = None,
             blocks: list[np.ndarray] | None = None) -> list[np.ndarray]:
    """Uninitialised C-ordered arrays for ``(shape, dtype)`` pairs, 64-byte aligned, packed into shared blocks
    of about ``block`` bytes (taken from ``pool`` when given; each block used is appended to ``blocks``).

    Small separate allocations fault their memory in 4 KiB pages; one large 2 MiB-aligned block is backed by
    transparent huge pages, which makes first touch several times cheaper. A block lives as long as any
    array carved from it.

    Example:
        >>> a, b = allocate([((3, 5), np.dtype("float32")), ((7,), np.dtype("int8"))])
        >>> a.shape, b.shape, a.ctypes.data % 64, b.ctypes.data % 64
        ((3, 5), (7,), 0, 0)
    """
    sizes = [math.prod(int(s) for s in shape) * np.dtype(dtype).itemsize for shape, dtype in shapes]
    check_fits(sum(sizes))
    out: list[np.ndarray | None] = [None] * len(shapes)
    i = 0
    while i < len(shapes):
        # Gather consecutive arrays into one block.
        j, total = i, 0
        while j < len(shapes) and (j == i or total + _pad(sizes[j]) <= block):
            total += _pad(sizes[j])
            j += 1
        raw = _empty(total + HUGE) if pool is None else pool.take(total + HUGE)
        if blocks is not None:
            blocks.append(raw)
        start = (-raw.ctypes.data) % HUGE
        pos = start
        for k in range(i, j):
            shape, dtype = shapes[k]
            out[k] = raw[pos : pos + sizes[k]].view(np.dtype(dtype)).reshape(tuple(shape))
            pos += _pad(sizes[k])
        i = j
    return out  # type: ignore[return-value]


def _empty(nbytes: int) -> np.ndarray:
    """``numpy.empty(nbytes, uint8)``; a failed allocation (an address-space limit, strict overcommit) is an
    OutOfMemoryError."""
    try:
        return np.empty(nbytes, np.uint8)
    except MemoryError:
        pass  # raised below, outside the except block, so that no MemoryError rides along as its context
    raise OutOfMemoryError(f"cannot allocate {nbytes / 2**30:.2f} GiB of host memory")


def _pad(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def put(host: Sequence[np.ndarray], devices: Sequence[Any]) -> list[Any]:
    """``jax.device_put`` of each host array onto its device, in one batched call."""
    import jax

    if not host:
        return []
    return list(jax.device_put(list(host), list(devices)))


def make_global(shape: tuple[int, ...], sharding: Any, pieces: dict[tuple[tuple[int, int], ...], np.ndarray]) -> Any:
    """The global jax.Array of ``shape`` with ``sharding`` from this process's host pieces, keyed by their boxes
    (``((start, stop), ...)`` per dimension): every local device's shard in one batched put (a CPU device
    aliases its host buffer), with no per-device array made first.

    Example:
        >>> import jax
        >>> from jax.sharding import SingleDeviceSharding
        >>> a = make_global((2, 3), SingleDeviceSharding(jax.devices()[0]), {((0, 2), (0, 3)): np.ones((2, 3), np.float32)})
        >>> a.shape, float(a.sum())
        ((2, 3), 6.0)
    """
    import jax

    def piece(index: tuple[slice, ...]) -> np.ndarray:
        return pieces[tuple((s.start or 0, n if s.stop is None else s.stop) for s, n in zip(index, shape))]

    return jax.make_array_from_callback(shape, sharding, piece)


def assemble(shape: tuple[int, ...], sharding: Any, arrays: Sequence[Any]) -> Any:
    """The global jax.Array of ``shape`` from the per-device arrays of this process (no communication)."""
    import jax

    return jax.make_array_from_single_device_arrays(shape, sharding, list(arrays))
