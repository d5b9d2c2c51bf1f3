"""The plan: pure arithmetic from saved chunks and target shardings to byte runs.

Stage 1 (logical, no I/O): for every distinct target index ("piece") of every process, the saved chunks
that overlap it and the overlapping region (:func:`overlaps`, the arithmetic of torch's resharding).
Stage 2 (physical): with each chunk's :class:`~jreshard.catalog.Locator`, a region becomes a regular grid of
byte *runs* (:func:`runs_of`); :mod:`jreshard.read` merges the runs of a file into requests.

:class:`Plan` reports the program of a load (:mod:`jreshard.program`), per process, without reading any tensor
bytes.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .catalog import Chunk, Locator
from .lanes import Rows

Box = tuple[tuple[int, int], ...]  # per dim (start, stop)


def normalize_index(index: Sequence[slice] | None, shape: Sequence[int]) -> Box:
    """A tuple of slices (as jax gives for device indices) as per-dimension (start, stop).

    Example:
        >>> normalize_index((slice(None), slice(2, 4)), (3, 8))
        ((0, 3), (2, 4))
    """
    if index is None:
        index = ()
    index = tuple(index) if isinstance(index, (tuple, list)) else (index,)
    if len(index) > len(shape):
        raise IndexError(f"index {index} has more dimensions than shape {tuple(shape)}")
    out = []
    for d, size in enumerate(shape):
        s = index[d] if d < len(index) else slice(None)
        if isinstance(s, (int, np.integer)):
            i = int(s) + size if int(s) < 0 else int(s)
            if not 0 <= i < size:
                raise IndexError(f"index {int(s)} is out of bounds for dimension {d} of size {size}")
            s = slice(i, i + 1)
        start, stop, step = s.indices(size)
        if step != 1:
            raise IndexError(f"index {index}: only step-1 slices are supported")
        out.append((start, max(start, stop)))
    return tuple(out)


@dataclass(frozen=True)
class Overlap:
    """The region where saved ``chunk`` (number ``chunk_id`` of its tensor) meets a piece: ``size`` elements
    per dim starting at ``chunk_start`` in chunk coordinates and at ``piece_start`` in piece coordinates."""

    chunk_id: int
    chunk_start: tuple[int, ...]
    piece_start: tuple[int, ...]
    size: tuple[int, ...]


def overlaps(chunks: Sequence[Chunk], box: Box) -> list[Overlap]:
    """Every saved chunk's overlap with ``box`` (empty overlaps omitted), in chunk order.

    For many chunks as :func:`jreshard.catalog.validate_chunks` returns them (``TensorInfo.chunks``), only the
    chunks that meet ``box`` are visited, found by an index built once for them
    (:func:`jreshard.catalog.chunk_overlaps`): O(log n + candidates) per box instead of O(n). Fewer chunks are
    scanned, and what a scan finds is kept by layout and box (at most SCANNED_OVERLAPS Overlaps in all), for the
    tensors cut alike.

    Example:
        >>> from jreshard.catalog import Chunk
        >>> [o.size for o in overlaps([Chunk((0,), (4,)), Chunk((4,), (4,))], ((2, 6),))]
        [(2,), (2,)]
    """
    from .catalog import (
        chunk_overlaps,  # (imported here: only this function of the module needs it)
    )

    found = chunk_overlaps(chunks, box)
    if found is not None:
        COUNTS["overlaps"] += len(found[0])
        return list(map(Overlap, *found))
    COUNTS["overlaps"] += len(chunks)  # a scan visits every chunk
    layout = _layout_id(chunks)
    key = None if layout is None else (layout, box)
    if key is not None:
        try:
            hit = _SCANNED.get(key)
        except TypeError:  # a box of lists: not kept
            key = hit = None
        if hit is not None:
            return list(hit)
    out = []
    for i, c in enumerate(chunks):
        lo = [max(o, b0) for o, (b0, _) in zip(c.offsets, box)]
        hi = [min(o + s, b1) for o, s, (_, b1) in zip(c.offsets, c.sizes, box)]
        if any(h <= l for l, h in zip(lo, hi)):
            continue
        out.append(Overlap(i, tuple(l - o for l, o in zip(lo, c.offsets)), tuple(l - b0 for l, (b0, _) in zip(lo, box)),
                           tuple(h - l for l, h in zip(lo, hi))))
    if key is not None:
        if _SCANNED_HELD[0] + len(out) > SCANNED_OVERLAPS:
            _SCANNED.clear()  # all dropped at once: what is kept stays within the bound
            _SCANNED_HELD[0] = 0
        _SCANNED[key] = tuple(out)  # (Overlaps are frozen: shared by every tensor of this layout)
        _SCANNED_HELD[0] += len(out)
    return out


SCANNED_OVERLAPS = 1 << 15  # scanned Overlaps kept in all (overlaps(): one process-wide table)
LAYOUTS = 4096  # chunk layouts numbered before the numbering starts over (new numbers, never reused)
_SCANNED: dict[tuple[int, Any], tuple[Overlap, ...]] = {}  # (layout number, box) -> its overlaps
_SCANNED_HELD = [0]
_LAYOUT_IDS: dict[tuple, int] = {}
_NEXT_LAYOUT = itertools.count()


def _layout_id(chunks: Sequence[Chunk]) -> int | None:
    """The number of the layout of ``chunks`` (their offsets and sizes), by which :func:`overlaps` keeps what a
    scan found for a box, for every tensor cut alike (a model's layers: planned piece by piece, each scanning the
    same few chunks for the same boxes). Only for a validated ChunkTuple (immutable, of frozen Chunks), which
    remembers its number; None for anything else. Numbers are never reused, so a number a ChunkTuple holds
    always means its own layout."""
    from .catalog import ChunkTuple

    if type(chunks) is not ChunkTuple:
        return None
    try:
        return chunks._layout_id
    except AttributeError:
        pass
    layout = tuple((c.offsets, c.sizes) for c in chunks)
    try:
        number = _LAYOUT_IDS.get(layout)
    except TypeError:  # bounds that are lists (not validated): they could change, nothing is kept
        number = None
    else:
        if number is None:
            if len(_LAYOUT_IDS) >= LAYOUTS:
                _LAYOUT_IDS.clear()
            number = _LAYOUT_IDS[layout] = next(_NEXT_LAYOUT)
    chunks._layout_id = number  # type: ignore[attr-defined]
    return number


def element_span(locator: Locator, overlap: Overlap, itemsize: int) -> tuple[int, int]:
    """[lo, hi) bytes, relative to the locator base, that the elements of ``overlap`` touch (any strides).

    Example:
        >>> from jreshard.catalog import Locator
        >>> element_span(Locator("f", 0, 0, (1, 4), 64), Overlap(0, (1, 0), (0, 0), (2, 3)), 4)
        (4, 44)
    """
    first = locator.storage_offset + sum(s * st for s, st in zip(overlap.chunk_start, locator.strides))
    lo = first + sum((n - 1) * st for n, st in zip(overlap.size, locator.strides) if st < 0)
    hi = first + sum((n - 1) * st for n, st in zip(overlap.size, locator.strides) if st > 0) + 1
    return lo * itemsize, hi * itemsize


def c_strides(shape: Sequence[int]) -> tuple[int, ...]:
    """Element strides of a C-ordered array of ``shape``."""
    strides, acc = [], 1
    for s in reversed(shape):
        strides.append(acc)
        acc *= max(int(s), 1)
    return tuple(reversed(strides))


@dataclass(frozen=True)
class Runs:
    """A regular grid of byte runs: for every index ``i`` of ``outer``, ``run`` bytes from
    ``src + sum(i * src_strides)`` (relative to the locator base) go to ``dst + sum(i * dst_strides)`` of the
    destination buffer: contiguously when ``step`` is 0, else as elements of ``item`` bytes placed ``step``
    bytes apart (a run contiguous in storage whose destination is strided, e.g. transposed)."""

    src: int
    src_strides: tuple[int, ...]
    dst: int
    dst_strides: tuple[int, ...]
    outer: tuple[int, ...]
    run: int
    step: int = 0
    item: int = 0

    @property
    def count(self) -> int:
        return math.prod(self.outer)

    @property
    def nbytes(self) -> int:
        return self.count * self.run

    def src_starts(self) -> np.ndarray:
        return _grid(self.src, self.outer, self.src_strides)

    def dst_starts(self) -> np.ndarray:
        return _grid(self.dst, self.outer, self.dst_strides)

    @property
    def src_span(self) -> tuple[int, int]:
        """[first, last) bytes (relative to the locator base) that the runs touch."""
        if self.count == 0:
            return (self.src, self.src)
        hi = self.src + sum((n - 1) * s for n, s in zip(self.outer, self.src_strides)) + self.run
        return (self.src, hi)


def _grid(start: int, outer: Sequence[int], strides: Sequence[int]) -> np.ndarray:
    acc = np.array([start], dtype=np.int64)
    for n, s in zip(outer, strides):
        acc = (acc[:, None] + np.arange(n, dtype=np.int64)[None, :] * s).reshape(-1)
    return acc


MAX_ELEMENT_RUNS = 1 << 22  # beyond this many elements, a transposed storage region is read as its span


def runs_of(locator: Locator, chunk_sizes: Sequence[int], overlap: Overlap, piece_shape: Sequence[int],
            itemsize: int, dst: tuple[int, Sequence[int]] | None = None) -> Runs | None:
    """The byte runs that copy ``overlap`` from a chunk laid out as ``locator`` into a C-ordered piece, or, when
    ``dst = (first, strides)`` is given, into the destination elements ``first + sum(i_k * strides_k)`` (element
    units; ``first`` is where the overlap's first element goes).

    Runs fold the innermost dimensions that are contiguous in both storage and destination. When the innermost
    dimension is contiguous in storage only, each run is one storage row placed element by element (``step``).
    When the chunk's innermost stride is not 1 (a transposed storage), returns None if the region's span holds
    at most 1/16 more than its elements (the region is then copied from a staged read of its span), else runs
    of single elements.

    Example:
        >>> from jreshard.catalog import Locator
        >>> loc = Locator("f", 0, 0, (8, 1), 256)
        >>> r = runs_of(loc, (4, 8), Overlap(0, (0, 2), (0, 0), (4, 4)), (4, 4), 4)
        >>> (r.outer, r.run, r.src_starts().tolist())
        ((4,), 16, [8, 40, 72, 104])
        >>> r = runs_of(loc, (4, 8), Overlap(0, (0, 2), (0, 0), (4, 4)), (4, 4), 4, dst=(0, (1, 4)))  # transposed
        >>> (r.outer, r.run, r.step, r.dst_strides)
        ((4,), 16, 16, (4,))
    """
    ndim = len(overlap.size)
    src_el = locator.strides
    size = overlap.size
    if dst is None:
        dst_el = c_strides(piece_shape)
        first = sum(p * st for p, st in zip(overlap.piece_start, dst_el))
    else:
        first, dst_el = dst[0], tuple(dst[1])
    nz = [j for j in range(ndim) if size[j] != 1]
    run_el = 1
    folded = 0
    for j in reversed(nz):
        if src_el[j] == run_el and dst_el[j] == run_el:
            run_el *= size[j]
            folded += 1
        else:
            break
    step = 0
    if nz and not folded:
        j = nz[-1]
        if src_el[j] != 1:  # the innermost dimension is not contiguous in storage (a transposed storage)
            lo, hi = element_span(locator, overlap, itemsize)
            if (hi - lo) * 16 <= math.prod(size) * itemsize * 17 or math.prod(size) > MAX_ELEMENT_RUNS:
                return None  # its span holds little else (or it is huge): read it whole, copy element-wise
            run_el, folded = 1, 0  # else one run per element, so that only the elements are read
        else:
            run_el, folded, step = size[j], 1, dst_el[j] * itemsize
    src0 = (locator.storage_offset + sum(s * st for s, st in zip(overlap.chunk_start, src_el))) * itemsize
    keep = nz[: len(nz) - folded]
    return Runs(src0, tuple(src_el[i] * itemsize for i in keep), first * itemsize,
                tuple(dst_el[i] * itemsize for i in keep), tuple(size[i] for i in keep), run_el * itemsize,
                step, itemsize if step else 0)


# --------------------------------------------------------------------------------------------------
# Plan reporting


@dataclass
class Piece:
    """One distinct target index of a tensor on one process, and the devices that hold it."""

    name: str
    box: Box
    process: int
    devices: list[Any]
    shape: tuple[int, ...] = field(init=False, repr=False, compare=False)  # of the box
    size: int = field(init=False, repr=False, compare=False)  # its elements

    def __post_init__(self) -> None:
        self.shape = tuple(b - a for a, b in self.box)
        self.size = math.prod(self.shape)

    @property
    def index(self) -> tuple[slice, ...]:
        return tuple(slice(a, b) for a, b in self.box)


# Work counters of planning (never reset by the library; read differences): "boxes", device boxes computed
# (:func:`pieces_of`); "overlaps", saved-chunk overlaps visited (:func:`overlaps`). Tests pin with them that a
# process's plan costs in proportion to the shards of its devices, not to the mesh.
COUNTS: dict[str, int] = {"boxes": 0, "overlaps": 0}


@dataclass(frozen=True)
class AbstractDevice:
    """A device of an abstract mesh: its position ``id`` in the mesh's devices (row-major) and its process."""

    id: int
    process_index: int


def _spec_axes(spec: Any, ndim: int, axis_names: Sequence[str], where: str) -> list[tuple[int, ...]]:
    """Per dim of an array of ``ndim`` dims, the positions (in ``axis_names``) of the mesh axes ``spec``
    shards it over, major first."""
    from .errors import ShardingError

    entries = tuple(spec)
    if len(entries) > ndim:
        raise ShardingError(f"{where}: the partition spec {spec} has {len(entries)} entries for {ndim} dim(s)")
    out = []
    for d in range(ndim):
        e = entries[d] if d < len(entries) else None
        names = () if e is None else (e,) if isinstance(e, str) else tuple(e) if isinstance(e, (tuple, list)) else None
        if names is None or any(not isinstance(a, str) or a not in axis_names for a in names):
            raise ShardingError(f"{where}: the partition spec {spec} has the entry {e!r}, which is not an axis of "
                                f"the mesh (axes {tuple(axis_names)})")
        out.append(tuple(list(axis_names).index(a) for a in names))
    return out


def named_boxes(shape: Sequence[int], axis_sizes: Sequence[int], axis_names: Sequence[str], spec: Any,
                positions: Sequence[int] | None = None, where: str = "target") -> list[Box]:
    """The box of every device at ``positions`` (default: all) of a mesh of ``axis_sizes`` named
    ``axis_names`` (devices in row-major order), under ``NamedSharding(mesh, spec)`` over ``shape``: the same
    boxes as ``NamedSharding.devices_indices_map``, computed without devices, in time proportional to the
    positions asked for. A dim sharded ``k`` ways must be a multiple of ``k`` (as jax requires), else
    :class:`~jreshard.errors.ShardingError`.

    Example:
        >>> from jax.sharding import PartitionSpec as P
        >>> named_boxes((8, 6), (2, 4), ("data", "model"), P("model", "data"), [0, 1, 5])
        [((0, 2), (0, 3)), ((2, 4), (0, 3)), ((2, 4), (3, 6))]
    """
    from .errors import ShardingError

    sizes = [int(n) for n in axis_sizes]
    axes = _spec_axes(spec, len(shape), axis_names, where)
    ways = [math.prod(sizes[a] for a in dim_axes) for dim_axes in axes]
    for d, (n, k) in enumerate(zip(shape, ways)):
        if n % k:
            raise ShardingError(f"{where} of shape {tuple(shape)}: the partition spec {spec} splits dim {d} ({n}) "
                                f"{k} ways, which does not divide it")
    if positions is None:
        positions = range(math.prod(sizes))
    strides = c_strides(sizes)
    out = []
    for pos in positions:
        coords = [(pos // st) % sz for st, sz in zip(strides, sizes)]
        box = []
        for n, k, dim_axes in zip(shape, ways, axes):
            i = 0
            for a in dim_axes:
                i = i * sizes[a] + coords[a]
            step = n // k
            box.append((i * step, (i + 1) * step))
        out.append(tuple(box))
    COUNTS["boxes"] += len(out)
    return out


def _named_parts(sharding: Any) -> tuple[tuple[int, ...], tuple[str, ...], Any] | None:
    """(axis sizes, axis names, spec) of a NamedSharding (over a Mesh or an AbstractMesh) that jreshard can tile
    itself, else None."""
    from jax.sharding import NamedSharding

    if isinstance(sharding, AbstractSharding):
        return sharding._parts
    if type(sharding) is not NamedSharding:
        return None
    spec = sharding.spec
    if getattr(spec, "unreduced", None) or getattr(spec, "reduced", None):
        return None
    if any(not (e is None or isinstance(e, str) or (isinstance(e, tuple) and all(isinstance(a, str) for a in e)))
           for e in spec):
        return None  # UNCONSTRAINED and the like: jax's own map
    mesh = sharding.mesh
    return tuple(int(n) for n in mesh.axis_sizes), tuple(mesh.axis_names), spec


class AbstractSharding:
    """A target sharding over a ``jax.sharding.AbstractMesh``, whose devices do not exist here, with the
    processes that would hold them: process ``k`` owns the ``devices_per_process`` consecutive devices of the
    mesh (in row-major order over its axes) from ``k * devices_per_process`` on, as ``jax.make_mesh`` lays out
    hosts' devices along the last axes. Planning only: jreshard never places arrays on it.

    Example:
        >>> from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec as P
        >>> s = AbstractSharding(NamedSharding(AbstractMesh((4, 2), ("data", "model")), P("data")), 4)
        >>> s.num_processes, sorted(d.id for d in s.process_devices(1)), s.shard_shape((8, 2))
        (2, [4, 5, 6, 7], (2, 2))
    """

    def __init__(self, sharding: Any, devices_per_process: int) -> None:
        from .errors import InvalidArgumentError

        self._parts = _named_parts(sharding)
        if self._parts is None:
            raise InvalidArgumentError(f"an abstract target sharding must be a jax.sharding.NamedSharding over an "
                                       f"AbstractMesh with axis names in its spec, not {sharding!r}")
        self.sharding = sharding
        self.mesh = sharding.mesh
        self.spec = sharding.spec
        n = math.prod(int(s) for s in self.mesh.axis_sizes)
        if isinstance(devices_per_process, bool) or not isinstance(devices_per_process, int) \
                or devices_per_process <= 0 or n % devices_per_process:
            raise InvalidArgumentError(f"devices_per_process must be a positive integer dividing the {n} devices of "
                                       f"the mesh {dict(self.mesh.shape)}, not {devices_per_process!r}")
        self.devices_per_process = devices_per_process
        self.num_devices = n
        self.num_processes = n // devices_per_process

    def __repr__(self) -> str:
        return (f"AbstractSharding({dict(self.mesh.shape)}, {self.spec}, devices_per_process="
                f"{self.devices_per_process})")

    def shard_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(self.sharding.shard_shape(shape))

    def process_devices(self, process: int) -> list[AbstractDevice]:
        """The devices of process ``process`` (none for a process outside the mesh)."""
        if not 0 <= process < self.num_processes:
            return []
        return list(_abstract_devices(process, self.devices_per_process))

    @property
    def device_set(self) -> set[AbstractDevice]:
        return {AbstractDevice(i, i // self.devices_per_process) for i in range(self.num_devices)}

    def devices_indices_map(self, shape: tuple[int, ...]) -> dict[AbstractDevice, tuple[slice, ...]]:
        """As ``jax.sharding.Sharding.devices_indices_map``, with :class:`AbstractDevice` keys."""
        devices = sorted(self.device_set, key=lambda d: d.id)
        return {d: tuple(slice(a, b) for a, b in box)
                for d, box in zip(devices, named_boxes(shape, self.mesh.axis_sizes, self.mesh.axis_names, self.spec))}


@functools.lru_cache(maxsize=64)
def _abstract_devices(process: int, k: int) -> tuple[AbstractDevice, ...]:
    return tuple(AbstractDevice(i, process) for i in range(process * k, (process + 1) * k))


def processes_of(sharding: Any) -> set[int]:
    """The processes that hold devices of ``sharding``.

    Example:
        >>> import jax
        >>> from jax.sharding import SingleDeviceSharding
        >>> processes_of(SingleDeviceSharding(jax.devices()[0]))
        {0}
    """
    if isinstance(sharding, AbstractSharding):
        return set(range(sharding.num_processes))
    return {d.process_index for d in sharding.device_set}


@functools.lru_cache(maxsize=16)
def _mesh_processes(mesh: Any) -> tuple[list[Any], dict[int, list[int]]]:
    """A concrete mesh's devices (row-major) and, per process, the positions of its devices."""
    flat = list(mesh.devices.flat)
    by_process: dict[int, list[int]] = {}
    for i, d in enumerate(flat):
        by_process.setdefault(d.process_index, []).append(i)
    return flat, by_process


def pieces_of(name: str, shape: tuple[int, ...], sharding: Any, addressable_only: bool = True,
              process: int | None = None) -> list[Piece]:
    """The distinct target indices of ``sharding`` over ``shape``, per process, each with the devices holding
    it (a replicated index is one piece with several devices): of this process's devices
    (``addressable_only``), of process ``process`` only (given), or of every process. A NamedSharding (and an
    :class:`AbstractSharding`) is tiled by :func:`named_boxes` for the devices asked for only.

    Example:
        >>> import jax
        >>> from jax.sharding import SingleDeviceSharding
        >>> [p.box for p in pieces_of("w", (4, 2), SingleDeviceSharding(jax.devices()[0]))]
        [((0, 4), (0, 2))]
    """
    if process is None and addressable_only:
        import jax

        process = jax.process_index()
    parts = _named_parts(sharding)
    if parts is not None:
        if isinstance(sharding, AbstractSharding):
            devices = (sharding.process_devices(process) if process is not None
                       else sorted(sharding.device_set, key=lambda d: d.id))
            positions = [d.id for d in devices]
        else:
            flat, by_process = _mesh_processes(sharding.mesh)
            positions = list(range(len(flat))) if process is None else by_process.get(process, [])
            devices = [flat[i] for i in positions]
        boxes = _named_boxes_kept(shape, parts, positions, name)
        items: Any = zip(devices, boxes)
    else:
        if process is not None and process != __import__("jax").process_index() or not addressable_only:
            indices = sharding.devices_indices_map(shape)
        else:
            indices = sharding.addressable_devices_indices_map(shape)
        items = ((dev, normalize_index(idx, shape)) for dev, idx in indices.items()
                 if process is None or dev.process_index == process)
    pieces: dict[tuple[int, Box], Piece] = {}
    for dev, box in items:
        piece = pieces.get((dev.process_index, box))
        if piece is None:
            pieces[(dev.process_index, box)] = Piece(name, box, dev.process_index, [dev])
        else:
            piece.devices.append(dev)
    return list(pieces.values())


_BOXES_KEPT: dict[Any, list[Box]] = {}  # named_boxes of recent (shape, mesh, spec, positions): a model's layers
_BOXES_KEPT_MAX = 4096


def _named_boxes_kept(shape: tuple[int, ...], parts: tuple, positions: list[int], name: str) -> list[Box]:
    """:func:`named_boxes`, kept for the next tensors of the same shape and sharding (counted in COUNTS each time,
    as computed)."""
    try:
        key = (tuple(shape), tuple(parts[0]), tuple(parts[1]), parts[2], tuple(positions))
        boxes = _BOXES_KEPT.get(key)
    except TypeError:  # an unhashable spec: computed every time
        return named_boxes(shape, parts[0], parts[1], parts[2], positions, where=f"target {name!r}")
    if boxes is None:
        boxes = named_boxes(shape, parts[0], parts[1], parts[2], positions, where=f"target {name!r}")
        if len(_BOXES_KEPT) >= _BOXES_KEPT_MAX:
            _BOXES_KEPT.clear()
        _BOXES_KEPT[key] = boxes
    else:
        COUNTS["boxes"] += len(boxes)
    return boxes


@dataclass
class ProcessPlan:
    """What one process reads: ``bytes_needed`` (its distinct shards, saved dtype), ``bytes_to_read`` (after
    merging, with whole reads of compressed items), ``num_reads`` (requests), ``pieces`` (distinct shards).

    Example:
        >>> ProcessPlan(0, bytes_needed=100, bytes_to_read=150).amplification
        1.5
    """

    process: int
    bytes_needed: int = 0
    bytes_to_read: int = 0
    num_reads: int = 0
    pieces: int = 0
    tensors: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def amplification(self) -> float:
        """``bytes_to_read / bytes_needed`` (1.0 when nothing is needed)."""
        return self.bytes_to_read / self.bytes_needed if self.bytes_needed else 1.0


@dataclass
class TensorPlan:
    """What one target costs this process: ``pieces`` (its distinct shards here), ``bytes_needed`` (saved
    dtype), ``bytes_to_read`` (its share of the requests that feed it: a request feeding several targets is
    split by the bytes each takes from it, so that the shares add up to the process's ``bytes_to_read``) and
    ``num_reads`` (the requests that feed it: one feeding several targets counts for each)."""

    name: str
    pieces: int = 0
    bytes_needed: int = 0
    bytes_to_read: int = 0
    num_reads: int = 0

    @property
    def amplification(self) -> float:
        """``bytes_to_read / bytes_needed`` (1.0 when nothing is needed)."""
        return self.bytes_to_read / self.bytes_needed if self.bytes_needed else 1.0


@dataclass
class Plan:
    """The work of a load, computed without reading tensor bytes (only headers).

    ``processes`` maps the processes planned (this one by default, or those ``process_index`` asked for: see
    :func:`jreshard.plan`) to their :class:`ProcessPlan`; ``process`` is the one whose program the plan holds
    (the one asked for, else this process, ``this_process``), and ``bytes_needed``, ``bytes_to_read`` and
    ``num_reads`` are its figures. :meth:`by_tensor` splits its reads by target, and :meth:`picture` draws a
    target's shards (of every process) over the saved chunks.

    Example:
        >>> import jax, numpy as np, jreshard
        >>> from jax.sharding import Mesh
        >>> mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
        >>> p = jreshard.plan(jreshard.sample_path(), mesh=mesh)
        >>> p.bytes_to_read >= p.bytes_needed > 0, sorted(p.processes)
        (True, [0])
    """

    processes: dict[int, ProcessPlan]
    this_process: int
    source: str = ""
    # Per tensor: whether the target's shards are exactly the saved chunks (one whole chunk per device).
    as_saved: dict[str, bool] = field(default_factory=dict)
    # What load executes for this process (jreshard.program.Program), and the resolved targets.
    _program: Any = field(default=None, repr=False, compare=False)
    _targets: list[Any] = field(default_factory=list, repr=False, compare=False)
    # The saved tensors by name (the checkpoint's catalog, shared, not copied), for pictures.
    _catalog: Any = field(default=None, repr=False, compare=False)
    # The process whose figures and program the plan holds (None: this_process).
    process: int | None = None

    @property
    def planned(self) -> int:
        """The process whose program this plan holds: ``process``, else ``this_process``."""
        return self.this_process if self.process is None else self.process

    @property
    def local(self) -> ProcessPlan:
        """The :class:`ProcessPlan` of the planned process (:attr:`planned`)."""
        return self.processes.get(self.planned, ProcessPlan(self.planned))

    @property
    def bytes_needed(self) -> int:
        """Bytes the planned process's distinct shards hold (saved dtype)."""
        return self.local.bytes_needed

    @property
    def bytes_to_read(self) -> int:
        """Bytes the planned process reads (after merging nearby ranges)."""
        return self.local.bytes_to_read

    @property
    def num_reads(self) -> int:
        """Read requests the planned process issues."""
        return self.local.num_reads

    def total(self) -> ProcessPlan:
        """The figures of every planned process summed (``process`` -1; per target as well).

        Example:
            >>> p = Plan({0: ProcessPlan(0, 10, 20, 2, 1), 1: ProcessPlan(1, 10, 10, 1, 1)}, 0)
            >>> t = p.total()
            >>> (t.bytes_needed, t.bytes_to_read, t.num_reads, t.pieces)
            (20, 30, 3, 2)
        """
        out = ProcessPlan(-1)
        for p in self.processes.values():
            out.bytes_needed += p.bytes_needed
            out.bytes_to_read += p.bytes_to_read
            out.num_reads += p.num_reads
            out.pieces += p.pieces
            for name, e in p.tensors.items():
                t = out.tensors.setdefault(name, {"pieces": 0, "bytes_needed": 0})
                for k, v in e.items():
                    t[k] = t.get(k, 0) + v
        return out

    def __repr__(self) -> str:
        local = self.local
        return (f"<jreshard.Plan{f' for {self.source!r}' if self.source else ''}: {len(self.processes)} process(es); "
                f"process {self.planned}: {local.pieces} shards, needed {_human(local.bytes_needed)}, read "
                f"{_human(local.bytes_to_read)} in {local.num_reads} requests ({local.amplification:.2f}x)>")

    def __str__(self) -> str:
        lines = [f"jreshard plan for {self.source}" if self.source else "jreshard plan",
                 f"{'process':>8} {'shards':>7} {'needed':>12} {'to read':>12} {'reads':>8} {'ampl.':>6}"]
        for pid in sorted(self.processes):
            p = self.processes[pid]
            mark = "*" if pid == self.planned else " "
            lines.append(f"{pid:>7}{mark} {p.pieces:>7} {_human(p.bytes_needed):>12} {_human(p.bytes_to_read):>12} "
                         f"{p.num_reads:>8} {p.amplification:>6.2f}")
        if len(self.processes) > 1:
            p = self.total()
            lines.append(f"{'all':>7}  {p.pieces:>7} {_human(p.bytes_needed):>12} {_human(p.bytes_to_read):>12} "
                         f"{p.num_reads:>8} {p.amplification:>6.2f}")
        if self.as_saved:
            same = sum(self.as_saved.values())
            lines.append(f"{same} of {len(self.as_saved)} tensors have target shards equal to their saved chunks")
        return "\n".join(lines)

    def by_tensor(self) -> dict[str, TensorPlan]:
        """This process's work per target (:class:`TensorPlan`), from the program it runs: shards and bytes
        needed, and each request's bytes shared among the targets it feeds.

        Example:
            >>> import jax, jreshard
            >>> from jax.sharding import SingleDeviceSharding
            >>> ckpt = jreshard.open(jreshard.sample_path())
            >>> t = ckpt.tensors["model.embed.weight"]
            >>> p = ckpt.plan({t.name: jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=SingleDeviceSharding(jax.devices()[0]))})
            >>> r = p.by_tensor()[t.name]
            >>> (r.pieces, r.bytes_needed == t.nbytes, r.bytes_to_read == p.bytes_to_read, r.num_reads == p.num_reads)
            (1, True, True, True)
        """
        out = {name: TensorPlan(name, e.get("pieces", 0), e.get("bytes_needed", 0))
               for name, e in self.local.tensors.items()}
        if self._program is None:
            return out

        def share(nbytes: int, weights: dict[str, int]) -> None:
            """``nbytes`` of one request split among the targets by weight (largest remainders), one read each."""
            total = sum(weights.values())
            if not weights or total <= 0:
                return
            parts = {n: nbytes * w // total for n, w in weights.items()}
            rest = nbytes - sum(parts.values())
            for n in sorted(weights, key=lambda n: -(nbytes * weights[n] % total))[:rest]:
                parts[n] += 1
            for n, b in parts.items():
                tp = out.setdefault(n, TensorPlan(n))
                tp.bytes_to_read += b
                tp.num_reads += 1

        for batch in self._program.batches:
            for unit in batch.units:
                owner: dict[int, str] = {}
                for step in unit.steps:
                    for slot in range(step.slot, step.slot + 1 + len(step.temps)):
                        owner[slot] = step.target.name
                prepared = unit.prepared
                for (_, start, stop), job in zip(prepared.staged_requests, prepared.staged):
                    share(stop - start, {owner[job.slot]: 1})
                for requests, feeds in prepared.groups:
                    for (_, start, stop), feed in zip(requests, feeds):
                        weights: dict[str, int] = {}
                        for job, runs in feed:
                            if type(runs) is Rows:  # a lane's rows
                                for slot, nb in runs.slot_bytes().items():
                                    weights[owner[slot]] = weights.get(owner[slot], 0) + nb
                            else:
                                weights[owner[job.slot]] = weights.get(owner[job.slot], 0) + runs.nbytes
                        share(stop - start, weights)
                whole: dict[tuple[str, int], dict[str, int]] = {}
                sizes: dict[tuple[str, int], int] = {}
                for r in unit.deferred:  # compressed items, read whole once per unit
                    key = (r.info.name, r.overlap.chunk_id)
                    sizes[key] = r.info.chunks[r.overlap.chunk_id].whole_read_nbytes
                    w = whole.setdefault(key, {})
                    w[owner[r.slot]] = w.get(owner[r.slot], 0) + math.prod(r.overlap.size)
                for key, weights in whole.items():
                    share(sizes[key], weights)
        return out

    def picture(self, name: str, saved: str | None = None) -> Any:
        """The :class:`~jreshard.picture.LayoutPicture` of target ``name``: the saved chunks of the tensor it
        is read from, and the target's shards on every process (for a mapped target, each shard's boxes traced
        back onto the saved tensor; ``saved`` picks which saved tensor for a target read from several, by
        default the first), with the bytes this process needs and reads for it. Draw it with ``.text()``,
        ``.svg()`` or ``.save_png(path)``; in a notebook it shows as SVG.

        Example:
            >>> import jax, numpy as np, jreshard
            >>> from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
            >>> ckpt = jreshard.open(jreshard.sample_path())
            >>> mesh = Mesh(np.array(jax.devices()[:1]), ("x",))
            >>> t = ckpt.tensors["model.embed.weight"]
            >>> p = ckpt.plan({t.name: jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=NamedSharding(mesh, P("x")))})
            >>> print("\\n".join(p.picture(t.name).caption()))  # the sample's chunks are zstd-compressed: read whole
            model.embed.weight  bfloat16 (64, 32)
            saved: 4 chunks (4x1 grid); target: 1 shard on 1 device; needed 4.00 KiB, read 10.16 KiB (2.54x)
            rows: dim 0 (64), columns: dim 1 (32)
        """
        from .errors import InvalidArgumentError, TargetMismatchError
        from .picture import target_picture
        from .program import close_hint

        targets = {t.name: t for t in self._targets if t is not None}
        if name not in targets:
            raise TargetMismatchError(f"{self.source or 'plan'}: no target array named {name!r} in this plan "
                                      f"({len(targets)} targets)" + close_hint(name, targets))
        if self._catalog is None:
            raise InvalidArgumentError("this Plan has no catalog to draw from; make it with jreshard.plan or "
                                       "Checkpoint.plan")
        tp = self.by_tensor().get(name)
        return target_picture(targets[name], self._catalog, saved,
                              bytes_needed=tp.bytes_needed if tp else 0, bytes_read=tp.bytes_to_read if tp else 0,
                              process=self.planned if len(self.processes) > 1 or self.planned != self.this_process
                              else None)

    def _repr_html_(self) -> str:
        """A table per process, a table per target of this process (``MAX_HTML_ROWS`` at most), and the picture
        of the target that reads the most bytes beyond those it needs (or, when none does, the largest)."""
        from html import escape

        rows = "".join(
            f"<tr><td>{pid}{' (this)' if pid == self.this_process else ''}{' *' if pid == self.planned else ''}"
            f"</td><td>{p.pieces}</td>"
            f"<td>{_human(p.bytes_needed)}</td><td>{_human(p.bytes_to_read)}</td><td>{p.num_reads}</td>"
            f"<td>{p.amplification:.2f}</td></tr>"
            for pid, p in sorted(self.processes.items())
        )
        title = f"jreshard plan for <code>{escape(self.source)}</code>" if self.source else "jreshard plan"
        out = [f"<div><p><b>{title}</b></p>",
               ("<table><tr><th>process</th><th>shards</th><th>needed</th><th>to read</th><th>reads</th>"
                f"<th>amplification</th></tr>{rows}</table>")]
        if self.as_saved:
            out.append(f"<p>{sum(self.as_saved.values())} of {len(self.as_saved)} tensors have target shards equal "
                       "to their saved chunks</p>")
        per = self.by_tensor()
        targets = {t.name: t for t in self._targets if t is not None}
        if per:
            body = []
            for name, tp in list(per.items())[:MAX_HTML_ROWS]:
                t = targets.get(name)
                shape = escape(str(t.shape)) if t is not None else ""
                dtype = escape(str(t.dtype)) if t is not None else ""
                body.append(f"<tr><td>{escape(name)}</td><td>{dtype}</td><td>{shape}</td><td>{tp.pieces}</td>"
                            f"<td>{_human(tp.bytes_needed)}</td><td>{_human(tp.bytes_to_read)}</td>"
                            f"<td>{tp.num_reads}</td><td>{tp.amplification:.2f}</td></tr>")
            if len(per) > MAX_HTML_ROWS:
                body.append(f'<tr><td colspan="8">\u2026 {len(per) - MAX_HTML_ROWS} more</td></tr>')
            out.append(f"<p>targets on process {self.planned}</p><table><tr><th>target</th><th>dtype</th>"
                       "<th>shape</th><th>shards</th><th>needed</th><th>to read</th><th>reads</th>"
                       f"<th>amplification</th></tr>{''.join(body)}</table>")
        drawable = [n for n in per if n in targets]
        if drawable and self._catalog is not None:
            # Worst: the most bytes read beyond those needed (a tiny vector read with its whole chunk can have a
            # larger amplification, but costs little).
            worst = max(drawable, key=lambda n: (per[n].bytes_to_read - per[n].bytes_needed, per[n].amplification))
            if per[worst].bytes_to_read > per[worst].bytes_needed:
                tp = per[worst]
                why = (f"the target that reads the most beyond what it needs ({_human(tp.bytes_to_read)} for "
                       f"{_human(tp.bytes_needed)}, amplification {tp.amplification:.2f})")
            else:
                worst = max(drawable, key=lambda n: per[n].bytes_needed)
                why = "the largest target"
            try:
                svg = self.picture(worst).svg(width=480)
            except Exception as e:  # noqa: BLE001 - a report draws what it can
                svg = f"<p>(no picture: {escape(str(e))})</p>"
            out.append(f"<p>{escape(worst)}: {why}</p>{svg}")
        out.append("</div>")
        return "\n".join(out)


MAX_HTML_ROWS = 50  # rows of a notebook table before "... N more"


def _human(n: float, digits: int = 2) -> str:
    """Bytes in binary units, e.g. ``_human(3 * 2**20) == "3.00 MiB"`` (whole bytes below 1 KiB)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.{digits}f} {unit}"
        n /= 1024
    return f"{n:.{digits}f} TiB"
