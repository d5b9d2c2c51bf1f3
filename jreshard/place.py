"""Host buffers onto devices: aligned host allocation, ``jax.device_put`` and global assembly.

On CPU devices a 64-byte aligned numpy buffer is aliased by ``device_put`` (no copy), so pieces are
allocated aligned and written once.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

ALIGN = 64


def aligned_empty(shape: Sequence[int], dtype: np.dtype) -> np.ndarray:
    """An uninitialised C-ordered array whose data pointer is 64-byte aligned.

    Example:
        >>> a = aligned_empty((3, 5), np.dtype("float32"))
        >>> a.shape, a.ctypes.data % 64
        ((3, 5), 0)
    """
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + ALIGN, np.uint8)
    start = (-raw.ctypes.data) % ALIGN
    return raw[start : start + nbytes].view(dtype).reshape(tuple(shape))


def put(host: Sequence[np.ndarray], devices: Sequence[Any]) -> list[Any]:
    """``jax.device_put`` of each host array onto its device, in one batched call."""
    import jax

    if not host:
        return []
    return list(jax.device_put(list(host), list(devices)))


def assemble(shape: tuple[int, ...], sharding: Any, arrays: Sequence[Any]) -> Any:
    """The global jax.Array of ``shape`` from the per-device arrays of this process (no communication)."""
    import jax

    return jax.make_array_from_single_device_arrays(shape, sharding, list(arrays))
