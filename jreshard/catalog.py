"""The format-neutral data model every reader produces: tensors, their saved chunks, and where bytes lie.

* :class:`Chunk`: a hyperrectangle (``offsets``, ``sizes``) of a tensor that was saved as one piece, plus
  ``ref``, a format-specific handle the format resolves into a :class:`Locator` when bytes are needed.
* :class:`Locator`: how the chunk's elements lie in storage: element ``(i0, i1, ...)`` of the chunk is at byte
  ``base + itemsize * (storage_offset + sum(i_k * strides_k))`` of file ``key`` (or of ``data`` if the bytes
  are already in memory, e.g. after zstd decompression).
* :class:`TensorInfo`: name, global shape, dtype and chunks. :func:`validate_chunks` checks that the chunks
  tile the tensor exactly (no hole, no partial overlap).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import InconsistentCheckpointError


@dataclass(frozen=True)
class Locator:
    """Where a chunk's elements lie: a strided view of a storage at ``base`` of ``key`` (or in ``data``)."""

    key: str
    base: int
    storage_offset: int
    strides: tuple[int, ...]
    storage_nbytes: int
    byteorder: str = "little"
    data: Any = field(default=None, compare=False, repr=False)  # bytes-like when the storage is in memory
    where: str = ""  # for error messages: file (and entry) the bytes come from

    def is_c_contiguous(self, sizes: tuple[int, ...]) -> bool:
        expected = 1
        for size, stride in zip(reversed(sizes), reversed(self.strides)):
            if size != 1 and stride != expected:
                return False
            expected *= size
        return True


@dataclass(frozen=True)
class Chunk:
    """A saved hyperrectangle of a tensor.

    Example:
        >>> c = Chunk(offsets=(4, 0), sizes=(4, 8))
        >>> c.stops, c.numel
        ((8, 8), 32)
    """

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    ref: Any = field(default=None, compare=False, repr=False)
    # Bytes a reader must fetch to get *any* element of the chunk when it cannot read sub-ranges
    # (compressed chunks): the size of the whole stored item; None when sub-ranges can be read.
    whole_read_nbytes: int | None = field(default=None, compare=False, repr=False)

    @property
    def stops(self) -> tuple[int, ...]:
        return tuple(o + s for o, s in zip(self.offsets, self.sizes))

    @property
    def numel(self) -> int:
        return math.prod(self.sizes)


@dataclass(frozen=True)
class TensorInfo:
    """A saved tensor: its global ``shape``, numpy ``dtype`` and the ``chunks`` it was saved in.

    Example:
        >>> import numpy as np
        >>> t = TensorInfo("w", (8, 4), np.dtype("float32"), (Chunk((0, 0), (8, 4)),))
        >>> t.nbytes
        128
    """

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    chunks: tuple[Chunk, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __repr__(self) -> str:
        return f"TensorInfo({self.name!r}, shape={self.shape}, dtype={self.dtype}, chunks={len(self.chunks)})"


def validate_chunks(name: str, shape: tuple[int, ...], chunks: list[Chunk], where: str) -> tuple[Chunk, ...]:
    """Check that ``chunks`` tile ``shape`` exactly; drop empty chunks and exact duplicates.

    Raises InconsistentCheckpointError naming the tensor and ``where`` on a chunk out of bounds, a partial
    overlap, or a hole.

    Example:
        >>> validate_chunks("w", (4,), [Chunk((0,), (2,)), Chunk((2,), (2,))], "ckpt")
        (Chunk(offsets=(0,), sizes=(2,)), Chunk(offsets=(2,), sizes=(2,)))
    """
    ndim = len(shape)
    kept: list[Chunk] = []
    seen: set[tuple[tuple[int, ...], tuple[int, ...]]] = set()
    for c in chunks:
        if len(c.offsets) != ndim or len(c.sizes) != ndim:
            raise InconsistentCheckpointError(
                f"{where}: tensor {name!r} of shape {shape} has a chunk of rank {len(c.sizes)} "
                f"(offsets {c.offsets}, sizes {c.sizes})"
            )
        if any(o < 0 or s < 0 or o + s > d for o, s, d in zip(c.offsets, c.sizes, shape)):
            raise InconsistentCheckpointError(
                f"{where}: tensor {name!r} of shape {shape} has a chunk outside it "
                f"(offsets {c.offsets}, sizes {c.sizes})"
            )
        if c.numel == 0:
            continue
        key = (c.offsets, c.sizes)
        if key in seen:
            continue
        seen.add(key)
        kept.append(c)
    total = sum(c.numel for c in kept)
    numel = math.prod(shape)
    if len(kept) > 1:
        lo = np.array([c.offsets for c in kept], dtype=np.int64)
        hi = np.array([c.stops for c in kept], dtype=np.int64)
        step = max(1, 2**22 // (len(kept) * max(ndim, 1)))
        for i0 in range(0, len(kept), step):
            a_lo, a_hi = lo[i0 : i0 + step, None, :], hi[i0 : i0 + step, None, :]
            inter = (np.minimum(a_hi, hi[None]) - np.maximum(a_lo, lo[None])) > 0
            both = inter.all(axis=-1)
            for r in range(both.shape[0]):
                both[r, i0 + r] = False
            if both.any():
                i, j = np.argwhere(both)[0]
                a, b = kept[i0 + i], kept[j]
                raise InconsistentCheckpointError(
                    f"{where}: tensor {name!r}: saved chunks overlap (offsets {a.offsets} sizes {a.sizes} and "
                    f"offsets {b.offsets} sizes {b.sizes})"
                )
    if total != numel:
        raise InconsistentCheckpointError(
            f"{where}: tensor {name!r} of shape {shape}: its saved chunks cover {total} of {numel} elements "
            "(the checkpoint has holes: a chunk is missing from the metadata)"
        )
    return tuple(kept)
