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
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import numpy as np

from .errors import CheckpointFormatError, InconsistentCheckpointError
from .gate import MAX_INT, Shape, checked_int, checked_shape


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
    # A chunk read whole only because it is small (not compressed): it can also be located for sub-ranges, at
    # the cost of header reads (the planner does so when a load needs little of it).
    partial_ok: bool = field(default=False, compare=False, repr=False)

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
        """Bytes of the whole tensor in its saved dtype."""
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def ndim(self) -> int:
        """Number of dimensions."""
        return len(self.shape)

    def __repr__(self) -> str:
        return f"TensorInfo({self.name!r}, shape={self.shape}, dtype={self.dtype}, chunks={len(self.chunks)})"


# Work (and memory) limits for hostile metadata; they never bind for the grids torch writes, of any size or rank.
# The vertex method of _tiles holds at most _VERTEX_BUDGET int64 cells of signed terms at once, or
# _VERTEX_PER_CHUNK terms per chunk if that is more; the overlap sweep (_find_overlap) makes at most
# _SWEEP_BUDGET box copies (or _SWEEP_PER_CHUNK per chunk) to name an overlapping pair in an error, and
# _DECIDE_SWEEP_BUDGET when it must decide in place of the vertex method. A layout beyond both limits is
# refused (InconsistentCheckpointError), never accepted unchecked.
_VERTEX_BUDGET = 1 << 23
_VERTEX_PER_CHUNK = 4
_SWEEP_BUDGET = 1 << 22
_DECIDE_SWEEP_BUDGET = 1 << 23
_SWEEP_PER_CHUNK = 2
_MAX_WORD = 1 << 63  # a packed key is below this (int64)


def validate_chunks(name: str, shape: tuple[int, ...], chunks: list[Chunk], where: str) -> tuple[Chunk, ...]:
    """Check that ``chunks`` tile ``shape`` exactly; drop empty chunks and exact duplicates.

    Raises CheckpointFormatError on a shape, offset or size that is not an ``int`` in ``[0, 2**62]``, and
    InconsistentCheckpointError naming the tensor and ``where`` on a chunk of the wrong rank or out of
    bounds, a partial overlap, or a hole. The kept chunks are returned in their original order, as a tuple
    (a :class:`ChunkTuple`, which also keeps the index :func:`jreshard.planning.overlaps` builds for them).

    The tiling check is exact and O(n log n) for the layouts torch writes (any grid, any rank): see
    :func:`_tiles`.

    Example:
        >>> validate_chunks("w", (4,), [Chunk((0,), (2,)), Chunk((2,), (2,))], "ckpt")
        (Chunk(offsets=(0,), sizes=(2,)), Chunk(offsets=(2,), sizes=(2,)))
    """
    shape = checked_shape(shape, f"tensor {name!r}: shape", where)
    if not isinstance(chunks, (list, tuple)):
        chunks = list(chunks)
    if len(chunks) <= _SMALL_CHUNKS:
        small = _small_tiling(shape, chunks)
        if small is not None:
            return small
    lo, size, plain = _chunk_arrays(name, shape, chunks, where)
    ndim = len(shape)
    extent = np.array(shape, dtype=np.int64)
    # Drop empty chunks, then exact duplicates (keeping the first of each).
    keep = np.flatnonzero((size > 0).all(axis=1))
    if ndim == 0:
        keep = keep[:1]
    elif len(keep) > 1:
        radix = [d + 1 for d in shape]
        words = _pack([lo[keep, k] for k in range(ndim)] + [size[keep, k] for k in range(ndim)], radix + radix)
        keep = keep[np.sort(_group_starts(words)[0])]
    kept = ChunkTuple(chunks) if len(keep) == len(chunks) else ChunkTuple(chunks[i] for i in keep.tolist())
    lo, hi = lo[keep], lo[keep] + size[keep]
    numel = math.prod(shape)
    if numel == 0:
        return kept  # empty: every chunk inside it is empty too, so none was kept
    total = _sum_exact(np.prod(size[keep], axis=1))
    if total == numel:
        exact = _tiles(lo, hi, extent)
        if exact:
            if plain and ndim and len(kept) >= _INDEX_MIN_CHUNKS:
                kept._bounds = (lo, hi)  # for the index of chunk_overlaps, if it is ever asked for
            return kept
        if exact is None:  # too irregular for the vertex method: decide by looking for an overlapping pair
            pair = _find_overlap(lo, hi, _DECIDE_SWEEP_BUDGET)
            if pair is None:  # no overlap and the volumes add up: an exact tiling
                return kept
            if pair is _UNKNOWN:
                raise InconsistentCheckpointError(
                    f"{where}: tensor {name!r} of shape {shape}: its {len(kept)} saved chunks form a layout too "
                    "irregular to check for overlaps within the work limit (torch does not write such layouts)"
                )
            _raise_overlap(name, where, kept, pair)
    # Not an exact tiling: say what is wrong, naming an overlapping pair when one can be found.
    pair = _find_overlap(lo, hi, _SWEEP_BUDGET)
    if pair is not _UNKNOWN and pair is not None:
        _raise_overlap(name, where, kept, pair)
    if total >= numel:  # not a tiling, yet the volumes add up (or exceed): some chunks overlap
        raise InconsistentCheckpointError(
            f"{where}: tensor {name!r} of shape {shape}: saved chunks overlap (their {len(kept)} distinct chunks "
            f"hold {total} elements of a tensor of {numel}; too irregular a layout to name two of them)"
        )
    raise InconsistentCheckpointError(
        f"{where}: tensor {name!r} of shape {shape}: its saved chunks cover {'at most ' if pair is _UNKNOWN else ''}"
        f"{total} of {numel} elements (the checkpoint has holes: a chunk is missing from the metadata)"
    )


_UNKNOWN = object()  # the overlap search ran out of its budget

_SMALL_CHUNKS = 16  # up to this many chunks, plain Python decides a valid layout faster than numpy's calls


def _small_tiling(shape: Shape, chunks: Sequence[Any]) -> ChunkTuple | None:
    """What :func:`validate_chunks` returns for a few chunks that tile ``shape`` exactly, each an exact tuple of
    exact ``int`` in range, of the tensor's rank and inside it (empty chunks and exact duplicates dropped); None
    for anything else, which the array path then decides and reports. Pairwise: O(n**2) for n <= _SMALL_CHUNKS."""
    ndim = len(shape)
    seen: set[tuple[tuple[int, ...], tuple[int, ...]]] = set()
    kept: list[Any] = []
    total = 0
    for c in chunks:
        lo, size = c.offsets, c.sizes
        if (type(lo) not in (tuple, Shape) or type(size) not in (tuple, Shape) or len(lo) != ndim
                or len(size) != ndim):
            return None
        for a, n, d in zip(lo, size, shape):
            if type(a) is not int or type(n) is not int or a < 0 or n < 0 or a > d or n > d - a:
                return None
        if ndim and 0 in size:
            continue  # empty: dropped
        key = (tuple(lo), tuple(size))
        if key in seen:
            continue  # an exact duplicate: the first is kept
        seen.add(key)
        kept.append(c)
        total += math.prod(size)
        if ndim == 0:
            break  # a scalar keeps its first chunk
    if total != math.prod(shape):
        return None
    # Every chunk inside, the volumes add up to the tensor's and no two overlap: an exact tiling.
    boxes = list(seen)
    for i in range(len(boxes)):
        alo, asz = boxes[i]
        for j in range(i):
            blo, bsz = boxes[j]
            if all(a < b + m and b < a + n for a, n, b, m in zip(alo, asz, blo, bsz)):
                return None
    return ChunkTuple(chunks) if len(kept) == len(chunks) else ChunkTuple(kept)


def _raise_overlap(name: str, where: str, kept: tuple[Chunk, ...], pair: tuple[int, int]) -> None:
    a, b = kept[pair[0]], kept[pair[1]]
    raise InconsistentCheckpointError(
        f"{where}: tensor {name!r}: saved chunks overlap (offsets {a.offsets} sizes {a.sizes} and "
        f"offsets {b.offsets} sizes {b.sizes})"
    )


def _chunk_arrays(name: str, shape: tuple[int, ...], chunks: Any, where: str) -> tuple[np.ndarray, np.ndarray, bool]:
    """Offsets and sizes of ``chunks`` as (n, ndim) int64 arrays, after checking (vectorised) that every value
    is an ``int`` in [0, MAX_INT], that every chunk has the tensor's rank and lies inside ``shape``; and whether
    they are all tuples of exact ``int`` (no subclass)."""
    n, ndim = len(chunks), len(shape)
    offsets = [c.offsets for c in chunks]
    sizes = [c.sizes for c in chunks]
    containers = set(map(type, offsets)) | set(map(type, sizes))
    if not containers <= {tuple, list, Shape}:
        _checked_ints_slow(name, chunks, where)  # raises on the first that is not a list of ints
    same_rank = set(map(len, offsets)) | set(map(len, sizes)) <= {ndim}
    arrays = None
    if set(map(type, chain.from_iterable(offsets))) | set(map(type, chain.from_iterable(sizes))) <= {int}:
        try:
            arrays = tuple(np.fromiter(chain.from_iterable(x), dtype=np.int64,
                                       count=n * ndim if same_rank else sum(map(len, x)))
                           for x in (offsets, sizes))
        except OverflowError:
            arrays = None
    plain = arrays is not None and containers <= {tuple, Shape}  # tuples of exact ints, as the index wants them
    if arrays is None or any(len(a) and (a.min() < 0 or a.max() > MAX_INT) for a in arrays):
        flat_o, flat_s = _checked_ints_slow(name, chunks, where)  # raises on the first bad value
        arrays = np.array(flat_o, dtype=np.int64), np.array(flat_s, dtype=np.int64)
    if not same_rank:
        c = next(c for c in chunks if len(c.offsets) != ndim or len(c.sizes) != ndim)
        raise InconsistentCheckpointError(
            f"{where}: tensor {name!r} of shape {shape} has a chunk of rank {len(c.sizes)} "
            f"(offsets {c.offsets}, sizes {c.sizes})"
        )
    lo, size = arrays[0].reshape(n, ndim), arrays[1].reshape(n, ndim)
    extent = np.array(shape, dtype=np.int64)
    bad = np.flatnonzero(((lo > extent) | (size > extent - lo)).any(axis=1))  # no overflow: all <= 2**62
    if len(bad):
        c = chunks[int(bad[0])]
        raise InconsistentCheckpointError(
            f"{where}: tensor {name!r} of shape {shape} has a chunk outside it "
            f"(offsets {c.offsets}, sizes {c.sizes})"
        )
    return lo, size, plain


def _checked_ints_slow(name: str, chunks: Any, where: str) -> tuple[list[int], list[int]]:
    """The flat offsets and sizes as plain ints, or CheckpointFormatError on the first value that is not an
    ``int`` (bools and floats are not) in [0, MAX_INT]."""
    out: tuple[list[int], list[int]] = ([], [])
    for c in chunks:
        for what, values, flat in (("offset", c.offsets, out[0]), ("size", c.sizes, out[1])):
            if not isinstance(values, (tuple, list)):
                raise CheckpointFormatError(
                    f"{where}: tensor {name!r}: a chunk's {what}s are {type(values).__name__}, not a list of integers"
                )
            flat.extend(checked_int(v, f"tensor {name!r}: a chunk {what}", where) for v in values)
    return out


def _sum_exact(values: np.ndarray) -> int:
    """The exact sum of non-negative int64 ``values`` (each below 2**62) as a Python int."""
    return (int((values >> 31).sum()) << 31) + int((values & ((1 << 31) - 1)).sum())


def _pack(cols: list[np.ndarray], radices: list[int]) -> list[np.ndarray]:
    """Columns with ``0 <= cols[k] < radices[k]`` packed (mixed radix, in order) into as few int64 words as fit:
    rows compare equal exactly when their words do."""
    words: list[np.ndarray] = []
    cur, cur_r = None, 1
    for c, r in zip(cols, radices):
        r = int(r)
        if r <= 1:
            continue
        if cur is not None and cur_r * r <= _MAX_WORD:
            cur, cur_r = cur * r + c, cur_r * r
        else:
            if cur is not None:
                words.append(cur)
            cur, cur_r = c, r
    if cur is not None:
        words.append(cur)
    return words or [np.zeros(len(cols[0]) if cols else 0, dtype=np.int64)]


def _group_starts(words: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Group equal rows of ``words``: (first row of each group, the stable sort order, the group starts in it)."""
    if len(words) == 1:
        order = np.argsort(words[0], kind="stable")
    else:
        order = np.lexsort(words[::-1])  # stable; words[0] is the primary key
    m = len(order)
    new = np.ones(m, dtype=bool)
    if m > 1:
        new[1:] = False
        for w in words:
            ws = w[order]
            new[1:] |= ws[1:] != ws[:-1]
    starts = np.flatnonzero(new)
    return order[starts], order, starts


def _tiles(lo: np.ndarray, hi: np.ndarray, extent: np.ndarray) -> bool | None:
    """Whether the distinct non-empty boxes [lo, hi) (inside [0, extent)) tile it exactly; None if the layout is
    too irregular to decide within the work limit.

    On the tensor's box, the indicator of a chunk is a product over dims of ``[x >= a] - [x >= b]``, where
    ``[x >= 0]`` is 1 and ``[x >= extent]`` is 0 there. Expanding the products writes every chunk as a signed sum
    of orthant functions ``prod_k [x_k >= v_k]`` with ``0 <= v < extent``, and those are linearly independent
    (triangular in the partial order of v). So the chunk indicators sum to the tensor's indicator, the orthant at
    v = 0 -- which for non-negative indicators means no overlap and no hole -- exactly when the signed vertex
    counts, summed over all chunks, are +1 at v = 0 and zero elsewhere.

    The expansion is done one dim at a time, summing equal terms after each step (a linear identity, so the
    result is the same as expanding everything first): in a grid the chunk ending at a cut and the one
    starting there cancel at once, so the term count never exceeds twice the chunk count whatever the rank,
    instead of 2**ndim per chunk. Dims every chunk covers whole are dropped first; dims with the most distinct
    cuts go first (staggered, brick-like cuts cancel within a row). Coordinates are compressed per dim and a
    term (vertex coords for done dims, interval for the others) is packed into int64 words.
    """
    n, ndim = lo.shape
    dims = np.flatnonzero(~((lo == 0) & (hi == extent)).all(axis=0))
    if len(dims) == 0:
        return n == 1  # every chunk is the whole tensor (one left after dropping duplicates)
    cols, mods = [], []
    for k in dims.tolist():
        cuts = _sorted_unique(np.concatenate((lo[:, k], hi[:, k], [0, extent[k]])))
        m = len(cuts)
        cols.append(np.searchsorted(cuts, lo[:, k]) * m + np.searchsorted(cuts, hi[:, k]))
        mods.append(m)
    by_cuts = sorted(range(len(mods)), key=lambda t: -mods[t])
    cols, mods = [cols[t] for t in by_cuts], [mods[t] for t in by_cuts]
    radices = [m * m for m in mods]  # an interval (a, b) of dim t is a * m + b; a vertex v is just v
    weight = np.ones(n, dtype=np.int64)
    budget = max(_VERTEX_BUDGET // (len(mods) + 1), _VERTEX_PER_CHUNK * n)
    for t, m in enumerate(mods):
        a, b = np.divmod(cols[t], m)
        inner = b < m - 1  # [x >= extent] is zero on the tensor: that term vanishes
        if len(weight) + int(inner.sum()) > budget:
            return None
        cols = [np.concatenate((a, b[inner])) if j == t else np.concatenate((c, c[inner])) for j, c in enumerate(cols)]
        weight = np.concatenate((weight, -weight[inner]))
        radices[t] = m - 1
        _, order, starts = _group_starts(_pack(cols, radices))
        sums = np.add.reduceat(weight[order], starts) if len(starts) else weight[:0]
        rows = order[starts[sums != 0]]
        cols, weight = [c[rows] for c in cols], sums[sums != 0]
    return len(weight) == 1 and int(weight[0]) == 1 and all(int(c[0]) == 0 for c in cols)


def _find_overlap(lo: np.ndarray, hi: np.ndarray, budget: int) -> tuple[int, int] | None | object:
    """Indices (i < j) of two of the boxes [lo, hi) that overlap, None if no two do, or _UNKNOWN if deciding
    would take more than ``budget`` box copies (or _SWEEP_PER_CHUNK per box, if more).

    A sort-and-sweep, vectorised, one dim at a time: two boxes overlap in dim k exactly when both contain
    the larger of their two starts. So within a group of boxes, the *events* are the distinct starts in dim k,
    each box is copied into the group of every event it contains, and two boxes share a new group exactly
    when they share the old one and overlap in dim k. After all dims but the last, boxes sharing a group
    overlap in every dim but the last; sorted by (group, start), two overlap there exactly when some two
    consecutive ones do. Grids (any rank) and 1-d layouts copy each box once: O(n log n). Dims whose boxes
    contain the fewest events go first, the one with the most last (it is not copied).
    """
    n, ndim = lo.shape
    if n < 2:
        return None
    if ndim == 0:
        return (0, 1)
    budget = max(budget, _SWEEP_PER_CHUNK * n)
    rank_lo, rank_hi, mods, cost = [], [], [], []
    for k in range(ndim):
        cuts = _sorted_unique(np.concatenate((lo[:, k], hi[:, k])))
        rank_lo.append(np.searchsorted(cuts, lo[:, k]))
        rank_hi.append(np.searchsorted(cuts, hi[:, k]))
        mods.append(len(cuts))
        starts = _sorted_unique(rank_lo[k])
        cost.append(int((np.searchsorted(starts, rank_hi[k]) - np.searchsorted(starts, rank_lo[k])).sum()))
    dims = sorted(range(ndim), key=lambda k: cost[k])
    item = np.arange(n)
    group = np.zeros(n, dtype=np.int64)
    for k in dims[:-1]:
        m = mods[k]
        first, stop = group * m + rank_lo[k][item], group * m + rank_hi[k][item]
        events = _sorted_unique(first)
        first, stop = np.searchsorted(events, first), np.searchsorted(events, stop)
        count = stop - first  # >= 1: a box contains its own start
        total = int(count.sum())
        if total > budget:
            return _UNKNOWN
        offset = np.repeat(np.cumsum(count) - count, count)
        group = np.repeat(first, count) + (np.arange(total) - offset)
        item = np.repeat(item, count)
    k = dims[-1]
    a, b = rank_lo[k][item], rank_hi[k][item]
    order = np.lexsort((a, group))
    group, a, b, item = group[order], a[order], b[order], item[order]
    hit = (group[1:] == group[:-1]) & (a[1:] < b[:-1])
    if not hit.any():
        return None
    q = int(np.argmax(hit))
    x, y = int(item[q]), int(item[q + 1])
    return (min(x, y), max(x, y))


def _sorted_unique(values: np.ndarray) -> np.ndarray:
    v = np.sort(values)
    return v[np.concatenate(([True], v[1:] != v[:-1]))] if len(v) else v


# ---------------------------------------------------------------------------------------------------------------
# An index of a tensor's chunks, for jreshard.planning.overlaps: the chunks meeting a box in O(log n + candidates)
# ---------------------------------------------------------------------------------------------------------------

_INDEX_MIN_CHUNKS = 48  # below this, scanning every chunk is as fast


class ChunkTuple(tuple):
    """The kept chunks of a tensor, as :func:`validate_chunks` returns them: a plain tuple of :class:`Chunk`
    (equal to, and printed as, the same tuple) that also keeps the index :func:`chunk_overlaps` builds on first
    use, so that the index lives and dies with the tensor's chunks. The index is not pickled. What a format
    reader knows at open of how each chunk is read is kept too (:func:`record_read_facts`)."""

    def __reduce__(self):
        return (ChunkTuple, (tuple(self),))


class _ChunkIndex:
    """Per dim, the chunks sorted by start, and the largest size: a chunk meeting [b0, b1) in dim k starts in
    (b0 - largest size, b1), a contiguous run of the sorted starts. A box takes the dim with the shortest run."""

    MEMO_ENTRIES = 512  # results kept per index (see ``memo``); all are dropped when full

    def __init__(self, lo: np.ndarray, hi: np.ndarray):
        self.lo, self.hi = lo, hi
        # Results of planners keyed by what they were computed from (boxes), for every tensor of this layout.
        self.memo: dict[Any, Any] = {}
        self.order = [np.argsort(lo[:, k], kind="stable") for k in range(lo.shape[1])]
        self.starts = [lo[o, k] for k, o in enumerate(self.order)]
        self.max_size = [int((hi[:, k] - lo[:, k]).max()) for k in range(lo.shape[1])]

    def overlaps(self, b0: list[int], b1: list[int]):
        found = self.overlap_arrays(b0, b1)
        if found is None:
            return [], [], [], []
        cand, cstart, pstart, size = found
        return cand.tolist(), list(map(tuple, cstart.tolist())), list(map(tuple, pstart.tolist())), \
            list(map(tuple, size.tolist()))

    def overlap_arrays(self, b0: list[int], b1: list[int]):
        """(chunk ids ascending, starts in the chunk, starts in the box, sizes) as int64 arrays; None if none."""
        best = None
        for k, starts in enumerate(self.starts):
            i = int(np.searchsorted(starts, b0[k] - self.max_size[k], side="right"))
            j = int(np.searchsorted(starts, b1[k], side="left"))
            if best is None or j - i < best[2] - best[1]:
                best = (k, i, j)
        k, i, j = best
        if j <= i:
            return None
        cand = self.order[k][i:j]
        box0, box1 = np.array(b0, dtype=np.int64), np.array(b1, dtype=np.int64)
        c_lo = self.lo[cand]
        lo, hi = np.maximum(c_lo, box0), np.minimum(self.hi[cand], box1)
        hit = np.flatnonzero((hi > lo).all(axis=1))
        hit = hit[np.argsort(cand[hit], kind="stable")]  # in chunk order
        cand, lo, c_lo, hi = cand[hit], lo[hit], c_lo[hit], hi[hit]
        return cand, lo - c_lo, lo - box0, hi - lo

    def overlap_arrays_many(self, b0: np.ndarray, b1: np.ndarray):
        """:meth:`overlap_arrays` of the boxes ``[b0[i], b1[i])`` (int64 arrays (m, ndim)) at once: (box index,
        chunk ids, starts in the chunk, starts in the box, sizes), rows by box then chunk id, each box's rows
        exactly those :meth:`overlap_arrays` gives for it."""
        m, ndim = b0.shape
        lo_i = np.empty((ndim, m), np.int64)
        hi_i = np.empty((ndim, m), np.int64)
        for k, starts in enumerate(self.starts):
            lo_i[k] = np.searchsorted(starts, b0[:, k] - self.max_size[k], side="right")
            hi_i[k] = np.searchsorted(starts, b1[:, k], side="left")
        count = np.maximum(hi_i - lo_i, 0)
        best = np.argmin(hi_i - lo_i, axis=0)  # the first dim with the shortest run, as overlap_arrays takes
        cols = np.arange(m)
        n, first = count[best, cols], lo_i[best, cols]
        total = int(n.sum())
        bid = np.repeat(cols, n)
        pos = np.repeat(first - (np.cumsum(n) - n), n) + np.arange(total, dtype=np.int64)
        cand = np.stack(self.order)[np.repeat(best, n), pos] if total else np.zeros(0, np.int64)
        c_lo = self.lo[cand]
        lo, hi = np.maximum(c_lo, b0[bid]), np.minimum(self.hi[cand], b1[bid])
        hit = np.flatnonzero((hi > lo).all(axis=1))
        hit = hit[np.lexsort((cand[hit], bid[hit]))]  # by box, then in chunk order
        bid, cand, lo, c_lo, hi = bid[hit], cand[hit], lo[hit], c_lo[hit], hi[hit]
        return bid, cand, lo - c_lo, lo - b0[bid], hi - lo


# Tensors cut into the same chunks (the layers of a model) share one index, found by the chunks' bounds.
_LAYOUTS: weakref.WeakValueDictionary[tuple[int, bytes, bytes], _ChunkIndex] = weakref.WeakValueDictionary()
_LAYOUTS_LOCK = threading.Lock()


def _shared_index(lo: np.ndarray, hi: np.ndarray) -> _ChunkIndex:
    key = (lo.shape[1], np.ascontiguousarray(lo, np.int64).tobytes(), np.ascontiguousarray(hi, np.int64).tobytes())
    with _LAYOUTS_LOCK:
        index = _LAYOUTS.get(key)
        if index is None:
            index = _LAYOUTS[key] = _ChunkIndex(lo, hi)
    return index


def _build_index(chunks: tuple) -> _ChunkIndex | None:
    n = len(chunks)
    offsets = [c.offsets for c in chunks]
    sizes = [c.sizes for c in chunks]
    ranks = set(map(len, offsets)) | set(map(len, sizes))
    if (len(ranks) != 1 or not set(map(type, offsets)) | set(map(type, sizes)) <= {tuple, Shape}
            or not set(map(type, chain.from_iterable(offsets))) | set(map(type, chain.from_iterable(sizes))) <= {int}):
        return None
    ndim = ranks.pop()
    if ndim == 0:
        return None
    try:
        lo = np.fromiter(chain.from_iterable(offsets), dtype=np.int64, count=n * ndim).reshape(n, ndim)
        size = np.fromiter(chain.from_iterable(sizes), dtype=np.int64, count=n * ndim).reshape(n, ndim)
    except OverflowError:
        return None
    if lo.min() < 0 or size.min() < 0 or (lo > MAX_INT - size).any():
        return None  # not validated chunks (stops beyond 2**62): leave them to the plain scan
    return _shared_index(lo, lo + size)


def _index_of(chunks: Any, box: Any) -> _ChunkIndex | None:
    """The index of ``chunks`` (built on first use), or None when it does not apply (see :func:`chunk_overlaps`)."""
    if type(chunks) is not ChunkTuple or len(chunks) < _INDEX_MIN_CHUNKS:
        return None
    try:
        index = chunks._index
    except AttributeError:  # first use (threads racing here build it twice, harmlessly)
        bounds = getattr(chunks, "_bounds", None)
        index = chunks._index = _build_index(chunks) if bounds is None else _shared_index(*bounds)
    if index is None or type(box) is not tuple or len(box) != index.lo.shape[1]:
        return None
    if not all(type(b) is tuple and len(b) == 2 and type(b[0]) is int and type(b[1]) is int
               and 0 <= b[0] <= MAX_INT and 0 <= b[1] <= MAX_INT for b in box):
        return None
    return index


def chunk_overlap_arrays(chunks: Any, box: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """What :func:`chunk_overlaps` gives, as int64 arrays (chunk ids of shape (n,), then (n, ndim) starts in the
    chunk, starts in the box and sizes); None where it gives None.

    Example:
        >>> cs = validate_chunks("w", (400,), [Chunk((4 * i,), (4,)) for i in range(100)], "ckpt")
        >>> [a.tolist() for a in chunk_overlap_arrays(cs, ((6, 13),))]
        [[1, 2, 3], [[2], [0], [0]], [[0], [2], [6]], [[2], [4], [1]]]
    """
    index = _index_of(chunks, box)
    if index is None:
        return None
    found = index.overlap_arrays([b[0] for b in box], [b[1] for b in box])
    if found is None:
        empty = np.zeros((0, index.lo.shape[1]), np.int64)
        return np.zeros(0, np.int64), empty, empty, empty
    return found


def chunk_overlap_arrays_many(chunks: Any, boxes: Sequence[Any]
                              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """:func:`chunk_overlap_arrays` of several boxes at once: (box index, chunk ids, starts in the chunk, starts
    in the box, sizes), the rows of box 0 first (each box's in chunk order), then box 1's, and so on; None where
    :func:`chunk_overlap_arrays` gives None for any of the boxes.

    Example:
        >>> cs = validate_chunks("w", (400,), [Chunk((4 * i,), (4,)) for i in range(100)], "ckpt")
        >>> [a.tolist() for a in chunk_overlap_arrays_many(cs, [((6, 9),), ((0, 2),)])]
        [[0, 0, 1], [1, 2, 0], [[2], [0], [0]], [[0], [2], [0]], [[2], [1], [2]]]
    """
    index = chunk_index(chunks, boxes)
    if index is None:
        return None
    b = np.array(boxes, np.int64)
    return index.overlap_arrays_many(b[:, :, 0], b[:, :, 1])


def chunk_index(chunks: Any, boxes: Sequence[Any]) -> _ChunkIndex | None:
    """The index :func:`chunk_overlap_arrays_many` uses for ``chunks`` and ``boxes``, or None where it gives None.
    Tensors whose chunks have the same bounds share it (and its ``memo``)."""
    if not boxes:
        return None
    index = None
    for box in boxes:
        index = _index_of(chunks, box)
        if index is None:
            return None
    return index


def record_read_facts(chunks: Any, whole_nbytes: Sequence[int], partial_ok: Sequence[bool]) -> None:
    """Record on ``chunks`` (a :class:`ChunkTuple`; anything else is left alone) what :func:`read_facts` would
    find, known to the format reader at open: per chunk, its whole-read bytes (-1: read by sub-ranges) and
    whether it may be located for sub-ranges. Ignored unless there is one of each per chunk.

    Example:
        >>> cs = ChunkTuple((Chunk((0,), (4,)), Chunk((4,), (4,))))
        >>> record_read_facts(cs, [-1, -1], [False, False]); none_read_whole(cs)
        True
    """
    if type(chunks) is not ChunkTuple or not len(chunks) == len(whole_nbytes) == len(partial_ok):
        return
    whole = np.array(whole_nbytes, np.int64)
    chunks._read_facts = (whole, np.array(partial_ok, bool))
    chunks._none_whole = not bool((whole >= 0).any())


def none_read_whole(chunks: Any) -> bool:
    """True when it is known (:func:`record_read_facts`) that no chunk of ``chunks`` is read whole."""
    return getattr(chunks, "_none_whole", False)


def read_facts(chunks: Any, cids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Of the chunks ``cids`` (int64 array), the bytes of their whole read (``Chunk.whole_read_nbytes``, -1
    where None) and ``Chunk.partial_ok``, as arrays. A :class:`ChunkTuple` keeps what was asked, so each chunk
    is looked at once.

    Example:
        >>> cs = ChunkTuple((Chunk((0,), (4,), whole_read_nbytes=900, partial_ok=True), Chunk((4,), (4,))))
        >>> [a.tolist() for a in read_facts(cs, np.array([1, 0, 1]))]
        [[-1, 900, -1], [False, True, False]]
    """
    facts = getattr(chunks, "_read_facts", None)
    if facts is None:
        facts = (np.full(len(chunks), -2, np.int64), np.zeros(len(chunks), bool))  # -2: not looked at yet
        if type(chunks) is ChunkTuple:
            chunks._read_facts = facts
    whole, partial = facts
    got = whole[cids]
    if (got == -2).any():
        todo = np.unique(cids[got == -2]).tolist()
        picked = [chunks[c] for c in todo]
        partial[todo] = [bool(c.partial_ok) for c in picked]
        whole[todo] = [-1 if c.whole_read_nbytes is None else c.whole_read_nbytes for c in picked]
        got = whole[cids]
    return got, partial[cids]


def chunk_overlaps(chunks: Any, box: Any) -> tuple[list[int], list[tuple[int, ...]], list[tuple[int, ...]],
                                                   list[tuple[int, ...]]] | None:
    """The overlaps of ``box`` (per dim (start, stop)) with ``chunks``, as four lists (chunk ids in ascending
    order, starts in the chunk, starts in the box, sizes), from an index built on first use and kept by the
    :class:`ChunkTuple`; None when ``chunks`` is not a ChunkTuple (a list could change), is small, its chunks
    are not plain ints of one rank, or ``box`` is not plain ints in [0, 2**62] of that rank: then the caller
    scans every chunk.

    The values are exactly those of :func:`jreshard.planning.overlaps`'s scan: for every chunk where
    ``lo = max(offset, b0) < hi = min(offset + size, b1)`` in every dim, ``(lo - offset, lo - b0, hi - lo)``.

    Example:
        >>> cs = validate_chunks("w", (400,), [Chunk((4 * i,), (4,)) for i in range(100)], "ckpt")
        >>> chunk_overlaps(cs, ((6, 13),))
        ([1, 2, 3], [(2,), (0,), (0,)], [(0,), (2,), (6,)], [(2,), (4,), (1,)])
    """
    index = _index_of(chunks, box)
    if index is None:
        return None
    return index.overlaps([b[0] for b in box], [b[1] for b in box])
