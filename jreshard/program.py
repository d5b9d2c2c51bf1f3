"""The program of a load: what :meth:`jreshard.Checkpoint.load` executes and :meth:`~jreshard.Checkpoint.plan`
reports, built by one function (:func:`build`), so that the report is what runs.

For every target array: its view of the saved tensors (the mapping's entry, or the saved tensor of the same
name), and for every distinct shard ("piece") of the processes asked for, the shard's box traced through the
view to boxes of saved tensors (:meth:`jreshard.views.View.trace`), intersected with the saved chunks
(:func:`jreshard.planning.overlaps`) and turned into copy jobs into the shard's host buffer (any strides: a
transposed or stacked destination is written in place, never through a copy). Pieces are packed into batches
of at most ``max_inflight_bytes`` host bytes (pieces larger than that are read part by part), and each batch's
jobs become the exact requests the executor issues (:meth:`jreshard.read.Executor.prepare`).
"""

from __future__ import annotations

import collections
import functools
import itertools
import math
import numbers
import operator
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .catalog import TensorInfo, chunk_index, chunk_overlap_arrays, none_read_whole, read_facts
from .errors import InvalidArgumentError, JReshardError, TargetMismatchError
from .place import check_fits
from .planning import (
    COUNTS,
    Box,
    Overlap,
    Piece,
    Plan,
    ProcessPlan,
    _named_parts,
    c_strides,
    named_boxes,
    overlaps,
    pieces_of,
    processes_of,
    runs_of,
)
from .lanes import Lane, Located, RegionBlock, lanes_of
from .read import CopyJob, Executor, Prepared
from .spec import matches_saved
from .targets import TargetLeaf, key_name, missing_message
from .views import Leaf, View

DEFAULT_INFLIGHT = 2 * 2**30
# A small archive is located for sub-ranges (header reads) when a unit needs less than 1/PARTIAL of it and
# that saves more than HEADER_COST bytes (about what the header reads of one small archive take).
PARTIAL = 1.1
HEADER_COST = 2048


def _sub_ranges_pay(needed: Any, whole: Any) -> Any:
    """Whether locating a small archive for sub-ranges pays, for ``needed`` of its ``whole`` bytes (ints, or
    int64 arrays at once)."""
    return (needed * PARTIAL < whole) & (whole - needed > HEADER_COST)

# Overlaps with many chunks are planned as arrays (jreshard.lanes); False plans every overlap as an object (the
# tests compare both).
LANES = True
MIN_PACK = 64 * 2**20  # batches are packed to max(MIN_PACK, bytes / 20) (progress moves), at most the bound


@dataclass(eq=False)
class Target:
    """A target array: its leaf position ``index``, dotted ``name``, the (bound) ``view`` it is read from, and
    the target's shape, dtype and sharding."""

    index: int
    name: str
    view: View
    shape: tuple[int, ...]
    dtype: np.dtype
    sharding: Any
    elem_bytes: int = 0  # host bytes one element takes while read (saved buffers and casts)
    sources: tuple[str, ...] = ()


@dataclass(eq=False)
class Region:
    """A saved chunk's overlap with a traced leaf, and where it lands: slot ``slot`` of the unit, elements
    ``dst0 + sum(i * strides)`` (element units)."""

    info: TensorInfo
    overlap: Any
    slot: int
    dst0: int
    strides: tuple[int, ...]


@dataclass(eq=False)
class Step:
    """What one piece (or one part of a piece) reads: a buffer of ``box`` in ``buf_dtype`` (slot ``slot``),
    cast in place of itself by ``casts`` after the reads; ``temps`` are leaves read into buffers of their own
    (slots ``slot + 1 ...``, in their saved dtypes), then cast and copied into the buffer."""

    target: Target
    piece: Piece
    box: Box
    buf_dtype: np.dtype
    casts: tuple[np.dtype, ...]
    temps: list[Leaf]
    temp_dtypes: list[np.dtype]
    slot: int

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(b - a for a, b in self.box)

    def slots(self) -> list[tuple[tuple[int, ...], np.dtype]]:
        return [(self.shape, self.buf_dtype)] + [(leaf.shape, dt) for leaf, dt in zip(self.temps, self.temp_dtypes)]


@dataclass(eq=False)
class Unit:
    """Steps read together: one batch of whole pieces, or one part of a group of large pieces. ``jobs`` and
    ``prepared`` (their requests) are fixed at planning; ``deferred`` regions (of compressed items, read whole)
    are located and copied when the unit runs."""

    steps: list[Step]
    jobs: list[CopyJob]
    prepared: Prepared
    deferred: list[Region]
    nbytes: int = 0  # saved bytes its steps need
    rel: Box | None = None  # in-parts units: the part's box relative to each piece
    lanes: list[Lane] = field(default_factory=list)  # rows of runs as arrays (one lane, all files)

    @functools.cached_property
    def host_bytes(self) -> int:
        """Bytes of the host buffers the unit reads into (its pieces and their cast temporaries); its steps are
        fixed once planned, so this is summed once (a load asks for it at every step of its pipeline)."""
        return sum(math.prod(shape) * np.dtype(dt).itemsize for step in self.steps for shape, dt in step.slots())


@dataclass(eq=False)
class Batch:
    """Units run one after the other. ``in_parts``: the pieces of ``group`` (one tensor, one shape, each above
    the bound) are filled part by part, one unit per part, into device buffers of the whole pieces."""

    in_parts: bool
    units: list[Unit]
    group: list[tuple[Target, Piece]] = field(default_factory=list)


@dataclass(eq=False)
class Program:
    """What one process executes: its batches, in order."""

    process: int
    batches: list[Batch]
    executor: Executor  # the one the requests were prepared for, which runs them
    limit: int = 0  # the bound on host bytes read but not yet placed (max_inflight_bytes)


# -- targets ------------------------------------------------------------------------------------------


def resolve(ckpt: Any, entries: Sequence[TargetLeaf], mapping: Any, check_dtype: Any,
            cast: str = "safe") -> list[Target | None]:
    """The view every target array is read from: the mapping's entry (its shape and dtype must equal the
    target's), else the saved tensor of the same name (a different target dtype is a cast, per shard: with
    ``cast="safe"`` only one that keeps every value, :func:`cast_is_safe`; ``"unsafe"`` allows any). None for
    leaves that name saved objects. Missing names are one error listing them all; so are lossy casts."""
    if cast not in ("safe", "unsafe"):
        raise InvalidArgumentError(f"cast must be 'safe' or 'unsafe', not {cast!r}")
    views = _mapping(mapping)
    names = {e.name for e in entries}
    unknown = sorted(set(views) - names)
    if unknown:
        raise TargetMismatchError(
            f"{ckpt.source}: {len(unknown)} mapping entries name no target leaf: {', '.join(map(repr, unknown[:8]))}"
            f"{' ...' if len(unknown) > 8 else ''}" + close_hint(unknown[0], names))
    tensors = ckpt.format.tensors
    objects = getattr(ckpt.format, "object_refs", {})

    def lookup(n: str) -> tuple[tuple[int, ...], np.dtype]:
        info = ckpt.tensor(n)
        return info.shape, info.dtype

    out: list[Target | None] = []
    missing: list[str] = []
    lossy: list[tuple[str, np.dtype, np.dtype]] = []
    for i, entry in enumerate(entries):
        name, shape = entry.name, entry.shape
        if shape is None and (name in views or name in tensors):
            raise TargetMismatchError(
                f"{ckpt.source}: target leaf {name!r} is a {type(entry.leaf).__name__}; give a jax.ShapeDtypeStruct "
                "with a sharding or a jax.Array")
        if name not in views and name not in tensors:
            if shape is not None and name in objects:
                raise TargetMismatchError(
                    f"{ckpt.source}: target {name!r} is an array spec, but {name!r} is a saved object, not a tensor: "
                    f"read it with ckpt.objects[{name!r}], or make its target leaf a value that is not an array "
                    f"spec (e.g. {{{name!r}: 0}}), which load replaces by the saved object")
            if shape is not None or name not in objects:
                missing.append(name)
            out.append(None)  # a saved object (or missing)
            continue
        try:
            dtype = np.dtype(entry.dtype)
        except TypeError:
            raise TargetMismatchError(f"{ckpt.source}: target {name!r} has dtype {entry.dtype}, which no saved "
                                      "tensor can fill") from None
        if name in views:
            view = views[name].bind(lookup)
            if view.shape != shape or view.dtype != dtype:
                raise TargetMismatchError(
                    f"{ckpt.source}: target {name!r} is {_sd(shape, dtype)} but its mapping entry {view!r} is "
                    f"{_sd(view.shape, view.dtype)}"
                    + (f"; cast it with .astype({dtype})" if view.shape == shape else ""))
        else:
            info = tensors[name]
            if shape != info.shape:
                raise TargetMismatchError(
                    f"{ckpt.source}: tensor {name!r}: target shape {shape} differs from the saved shape {info.shape}")
            view = ckpt.saved(name)
            if dtype != info.dtype:
                real = info.dtype.kind == "c" and dtype.kind != "c"  # refused by astype below, whatever cast says
                if cast == "safe" and not real and not cast_is_safe(info.dtype, dtype):
                    lossy.append((name, info.dtype, dtype))
                    continue
                view = view.astype(dtype)  # (refuses complex to real)
        sharding = entry.sharding
        check_dtype(name, shape, dtype, sharding)
        sources = tuple(view.names())
        saved = max(tensors[n].dtype.itemsize for n in sources)
        casted = any(tensors[n].dtype != dtype for n in sources) or any(v._op == "astype" for v in view.nodes())
        out.append(Target(i, name, view, shape, dtype, sharding, saved + (dtype.itemsize if casted else 0), sources))
    if missing:
        kinds = {e.name: e.kind for e in entries}
        raise TargetMismatchError(f"{ckpt.source}: {missing_message(missing, kinds)}"
                                  + close_hint(missing[0], [*tensors, *objects]))
    if lossy:
        raise TargetMismatchError(f"{ckpt.source}: {lossy_message(lossy)}")
    return out


def lossy_message(lossy: Sequence[tuple[str, np.dtype, np.dtype]]) -> str:
    """The message for implicit casts that can change values (``(target name, saved dtype, target dtype)``).

    Example:
        >>> import numpy as np
        >>> print(lossy_message([("w", np.dtype("float32"), np.dtype("int8"))]))  # doctest: +NORMALIZE_WHITESPACE
        target 'w' is int8 but the saved tensor 'w' is float32, and casting float32 to int8 can change values.
        Pass cast="unsafe" to load / plan to allow such casts, or ask for this one explicitly in the mapping:
        mapping={'w': jreshard.saved('w').astype(jnp.int8)}
    """
    shown = "; ".join(f"target {n!r} is {dst} but the saved tensor {n!r} is {src}" for n, src, dst in lossy[:8])
    if len(lossy) > 8:
        shown += f"; ... and {len(lossy) - 8} more"
    n, _, dst = lossy[0]
    pairs = sorted({f"{s} to {d}" for _, s, d in lossy})
    return (f"{shown}, and casting {', '.join(pairs)} can change values. Pass cast=\"unsafe\" to load / plan to "
            f"allow such casts, or ask for {'this one' if len(lossy) == 1 else 'each'} explicitly in the mapping: "
            f"mapping={{{n!r}: jreshard.saved({n!r}).astype(jnp.{dst.name})}}")


def cast_is_safe(src: Any, dst: Any) -> bool:
    """Whether casting ``src`` to ``dst`` keeps every value: for numpy's own dtypes, ``np.can_cast(src, dst,
    "safe")``; where an ml_dtypes type (bfloat16, float8 ..., int4) is either side, whether every value of
    ``src`` (all of them are tried: such types have at most 16 bits) is exactly a value of ``dst`` (signed
    zeros, infinities and NaN included). Wider sources with an ml_dtypes side are not safe.

    Example:
        >>> import ml_dtypes, numpy as np
        >>> [cast_is_safe(a, b) for a, b in [(np.float32, np.int8), (ml_dtypes.bfloat16, np.float32),
        ...                                  (np.float32, ml_dtypes.bfloat16), (np.int8, np.float16)]]
        [False, True, False, True]
    """
    return _cast_is_safe(np.dtype(src), np.dtype(dst))


@functools.cache
def _cast_is_safe(src: np.dtype, dst: np.dtype) -> bool:
    if src == dst:
        return True
    if _builtin(src) and _builtin(dst):
        return bool(np.can_cast(src, dst, "safe"))
    values = _all_values(src)
    if values is None:
        return False
    try:
        with np.errstate(all="ignore"):
            got = values.astype(dst)
    except (TypeError, ValueError):  # no such cast
        return False
    return _same_values(values, got)


def _builtin(dt: np.dtype) -> bool:
    return dt.kind in "biufc" and type(dt).__module__ == "numpy.dtypes"


def _all_values(dt: np.dtype) -> np.ndarray | None:
    """Every value of a dtype of at most 16 bits (an array of it), else None."""
    if dt.kind == "b":
        return np.array([False, True])
    bits = dt.itemsize * 8
    try:
        import ml_dtypes

        try:
            bits = ml_dtypes.finfo(dt).bits
        except (ValueError, TypeError):
            bits = ml_dtypes.iinfo(dt).bits
    except (ImportError, ValueError, TypeError):
        pass
    if bits > 16:
        return None
    return np.arange(2**bits, dtype=np.uint8 if dt.itemsize == 1 else np.uint16).view(dt)


def _same_values(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether ``a`` and ``b`` hold the same values: equal real and imaginary parts with the same signs of zero,
    NaN where NaN."""
    def parts(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with np.errstate(all="ignore"):
            if x.dtype.kind == "c":
                return x.real.astype(np.float64), x.imag.astype(np.float64)
            return x.astype(np.float64), np.zeros(x.shape)

    def same(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return ((x == y) & (np.signbit(x) == np.signbit(y))) | (np.isnan(x) & np.isnan(y))

    (ar, ai), (br, bi) = parts(a), parts(b)
    return bool(np.all(same(ar, br) & same(ai, bi)))


def _sd(shape: tuple[int, ...], dtype: np.dtype) -> str:
    return f"{shape} {dtype}"


def _mapping(mapping: Any) -> dict[str, View]:
    """The mapping as {dotted target name: view}: a flat dict of names, or a pytree shaped like the target."""
    from .views import as_view

    if mapping is None:
        return {}
    if callable(mapping) and not isinstance(mapping, dict):
        raise InvalidArgumentError("mapping must be a dict of target names to saved names or views, not a function")
    import jax

    flat, _ = jax.tree_util.tree_flatten_with_path(mapping, is_leaf=lambda x: isinstance(x, (View, str)))
    out: dict[str, View] = {}
    for path, value in flat:
        name = ".".join(key_name(k) for k in path)
        if name in out:
            raise InvalidArgumentError(f"mapping names target {name!r} twice")
        out[name] = as_view(value, name)
    return out


def close_hint(name: str, known: Iterable[str]) -> str:
    """``"; did you mean ..."`` naming the entries of ``known`` closest to ``name``, or ``""``."""
    import difflib

    close = difflib.get_close_matches(name, list(known), n=3)
    return f"; did you mean {', '.join(map(repr, close))}?" if close else ""


# -- pieces, steps, units -----------------------------------------------------------------------------


def make_step(target: Target, piece: Piece, box: Box, slot: int, tensors: Any) -> tuple[Step, list[Region]]:
    """The step that fills ``box`` (absolute, inside ``piece``) of ``target`` from slot ``slot`` on, and its
    regions (overlaps of the traced leaves with saved chunks)."""
    shape = tuple(b - a for a, b in box)
    leaves = list(target.view.trace(box))
    kinds = {(tensors[leaf.name].dtype, leaf.casts) for leaf in leaves}
    if len(kinds) <= 1:
        buf_dtype, casts = kinds.pop() if kinds else (target.dtype, ())
        direct, temps = leaves, []
    else:
        buf_dtype, casts = target.dtype, ()
        direct = [leaf for leaf in leaves if tensors[leaf.name].dtype == buf_dtype and all(c == buf_dtype for c in leaf.casts)]
        temps = [leaf for leaf in leaves if not (tensors[leaf.name].dtype == buf_dtype
                                                 and all(c == buf_dtype for c in leaf.casts))]
    step = Step(target, piece, box, np.dtype(buf_dtype), tuple(casts), temps, [tensors[t.name].dtype for t in temps], slot)
    # Refused before any byte is planned for it: a shard larger than this machine's memory.
    check_fits(sum(math.prod(s) * np.dtype(d).itemsize for s, d in step.slots()), f"the shard {box} of {target.name!r}")
    regions: list[Region] = []
    covered = 0
    for k, leaf in enumerate(direct + temps):
        info = tensors[leaf.name]
        if k < len(direct):
            s, dst, strides = slot, leaf.dst, leaf.strides
        else:
            s, dst, strides = slot + 1 + (k - len(direct)), 0, c_strides(leaf.shape)
        if k < len(direct) and info.ndim in (1, 2) and LANES:
            found = chunk_overlap_arrays(info.chunks, leaf.box)
            if found is not None:  # many chunks: their overlaps as arrays (turned into lanes when located)
                cid, cstart, pstart, size = found
                COUNTS["overlaps"] += len(cid)
                covered += int(size.prod(axis=1).sum())
                dst0 = dst + pstart @ np.array(strides, np.int64)
                regions.append(RegionBlock(info, s, cid, cstart, size, dst0, tuple(strides), pstart))
                continue
        for ov in overlaps(info.chunks, leaf.box):
            covered += math.prod(ov.size)
            regions.append(Region(info, ov, s, dst + sum(p * st for p, st in zip(ov.piece_start, strides)), strides))
    if covered != math.prod(shape):
        raise JReshardError(f"internal: target {target.name!r} box {box} covered {covered} elements")
    return step, regions


def _steps_at_once(target: Target, pieces: list[Piece], boxes: list[Box], slot: int, tensors: Any
                   ) -> tuple[list[Step], list[list[Any]]] | None:
    """What :func:`make_step` gives for each of ``pieces`` (boxes ``boxes``, slots from ``slot`` on), made at
    once for a target read as it is saved (no view, no cast) from a 1-D or 2-D tensor with many chunks: the
    overlaps of pieces of one shape are one :class:`RegionBlock` (a slot per row), listed with the first of
    them. None where that does not apply (then :func:`make_step` goes piece by piece)."""
    view = target.view
    if not LANES or view._op != "saved":
        return None
    info = tensors[view._args]
    if info.ndim not in (1, 2) or any(b <= a for box in boxes for a, b in box):
        return None
    # The blocks depend on the chunks' bounds and the boxes only: tensors cut alike (a model's layers) share
    # them through their index's memo, whichever of them was planned first.
    index = chunk_index(info.chunks, boxes)
    if index is None:
        return None
    key = ("steps", tuple(boxes))
    groups = index.memo.get(key)
    dtype = np.dtype(info.dtype)
    steps = [Step(target, piece, box, dtype, (), [], [], slot + k) for k, (piece, box) in enumerate(zip(pieces, boxes))]
    shapes = [tuple(b - a for a, b in box) for box in boxes]
    # Refused before any byte is planned for it: a shard larger than this machine's memory (the largest).
    big = max(range(len(boxes)), key=lambda k: math.prod(shapes[k]))
    check_fits(math.prod(shapes[big]) * dtype.itemsize, f"the shard {boxes[big]} of {target.name!r}")
    if groups is None:
        groups = _block_groups(target, index, boxes, shapes)
        if len(index.memo) >= index.MEMO_ENTRIES:
            index.memo.clear()
        index.memo[key] = groups
    else:
        COUNTS["overlaps"] += sum(len(g[2]) for g in groups)
    regions: list[list[Any]] = [[] for _ in steps]
    for k0, bid, cid, cstart, size, dst0, strides, pstart in groups:
        regions[k0].append(RegionBlock(info, slot + bid, cid, cstart, size, dst0, strides, pstart))
    return steps, regions


def _block_groups(target: Target, index: Any, boxes: list[Box], shapes: list[tuple[int, ...]]) -> list[tuple]:
    """The overlaps of ``boxes`` with the chunks of ``index`` checked to cover each box, grouped by box shape:
    per group (first box, box ids, chunk ids, starts in the chunk, sizes, buffer starts, strides, starts in the
    box), read-only arrays."""
    b = np.array(boxes, np.int64)
    bid, cid, cstart, pstart, size = index.overlap_arrays_many(b[:, :, 0], b[:, :, 1])
    shp = np.array(shapes, np.int64)
    covered = np.zeros(len(boxes), np.int64)
    np.add.at(covered, bid, size.prod(axis=1))
    if not np.array_equal(covered, shp.prod(axis=1)):
        k = int(np.flatnonzero(covered != shp.prod(axis=1))[0])
        raise JReshardError(f"internal: target {target.name!r} box {boxes[k]} covered {int(covered[k])} elements")
    COUNTS["overlaps"] += len(cid)
    groups = []
    for shape in dict.fromkeys(shapes):
        ks = np.flatnonzero((shp == shape).all(axis=1))
        rows = np.flatnonzero(np.isin(bid, ks))
        strides = c_strides(shape)
        group = (bid[rows], cid[rows], cstart[rows], size[rows], pstart[rows] @ np.array(strides, np.int64),
                 pstart[rows])
        for a in group:
            a.flags.writeable = False
        groups.append((int(ks[0]), *group[:5], strides, group[5]))
    return groups


def jobs_of(regions: Sequence[Region], located: dict) -> tuple[list[CopyJob], list[Region]]:
    """Copy jobs of the regions whose chunks are located; the others (compressed items) are returned."""
    jobs, deferred = [], []
    for r in regions:
        chunk = r.info.chunks[r.overlap.chunk_id]
        loc = located.get((r.info.name, r.overlap.chunk_id))
        if loc is None:
            deferred.append(r)
            continue
        item = r.info.dtype.itemsize
        jobs.append(CopyJob(r.info.name, loc, chunk.sizes, r.overlap, None,
                            runs_of(loc, chunk.sizes, r.overlap, (), item, (r.dst0, r.strides)),
                            item, r.dst0, r.strides, r.slot))
    return jobs, deferred


def build(ckpt: Any, targets: Sequence[Target | None], *, limit: int, io_executor: Executor,
          processes: Iterable[int], keep: int | None, own: int | None = None, lazy: bool = False
          ) -> tuple[dict[int, ProcessPlan], Program | None]:
    """Plan the ``processes`` one after the other: per process, the pieces of its devices
    (:func:`jreshard.planning.pieces_of`, for that process only), its batches, their jobs and the requests they
    issue, summed into a :class:`ProcessPlan`; a process holding none of the targets' devices plans nothing.
    The program of process ``keep`` is returned whole; the others' are summed and dropped before the next
    process is planned, so memory stays that of one process's plan and the work that of the pieces planned.
    Chunks located for process ``own`` (this one) go to the checkpoint's :class:`~jreshard.lanes.Located`
    (kept for its load); those located for the others to one shared among them, dropped when this returns.

    ``lazy`` (a load, which runs the program of ``keep`` as it is made): that program's batches are planned as
    they are taken from ``Program.batches`` (a generator), the first one read while the next is planned; its
    :class:`ProcessPlan` is complete once they all are."""
    plans: dict[int, ProcessPlan] = {}
    program = None
    others = None
    for pid in processes:
        if pid == own:
            state = ckpt._located
        else:
            if others is None:
                others = Located()
            state = others
        pp = ProcessPlan(pid)
        batches = _process_batches(ckpt, targets, limit, io_executor, pid, pid == keep, pp, state)
        if pid == keep:
            program = Program(pid, batches if lazy else list(batches), io_executor, limit)
        else:
            collections.deque(batches, maxlen=0)  # planned and summed, each batch dropped as the next is made
        if pp.pieces or pid == keep:
            plans[pid] = pp
    return plans, program


def _process_batches(ckpt: Any, targets: Sequence[Target | None], limit: int, executor: Executor, pid: int,
                     feeds: bool, pp: ProcessPlan, state: Located) -> Iterator[Batch]:
    """The batches of process ``pid``, planned one at a time as they are taken, summed into ``pp``."""
    items = [(t.index, t, piece, t.elem_bytes) for t in targets if t is not None
             for piece in pieces_of(t.name, t.shape, t.sharding, addressable_only=False, process=pid)]
    pp.pieces += len(items)
    for t, run in itertools.groupby(items, key=lambda item: item[1]):
        entry = pp.tensors.setdefault(t.name, {"pieces": 0, "bytes_needed": 0})
        entry["pieces"] += sum(1 for _ in run)
    total = sum(_host_bytes(item) for item in items)
    pack = min(limit, max(MIN_PACK, total // 20))
    for in_parts, batch in _batches(items, limit, pack):
        yield _plan_batch(ckpt, in_parts, batch, limit, executor, pp, feeds=feeds, state=state)


def target_processes(targets: Sequence[Target | None]) -> list[int]:
    """The processes that hold devices of the targets' shardings, in order."""
    out: set[int] = set()
    for t in targets:
        if t is not None:
            out |= processes_of(t.sharding)
    return sorted(out)


def _plan_batch(ckpt: Any, in_parts: bool, items: list, limit: int, executor: Executor, pp: ProcessPlan,
                feeds: bool = True, state: Located | None = None) -> Batch:
    group = [(t, piece) for _, t, piece, _ in items]
    if not in_parts:
        return Batch(False, [_unit_of(ckpt, group, None, executor, pp, feeds, state)])
    elem = items[0][3]
    parts = _parts(tuple((0, n) for n in items[0][2].shape), elem, max(elem, limit // len(group)))
    return Batch(True, [_unit_of(ckpt, group, rel, executor, pp, feeds, state) for rel in parts], group)


def _unit_of(ckpt: Any, group: list[tuple[Target, Piece]], rel: Box | None, executor: Executor,
             pp: ProcessPlan, feeds: bool = True, state: Located | None = None) -> Unit:
    """The unit reading the pieces of ``group`` whole (``rel`` None), or their part ``rel`` (relative box)."""
    steps: list[Step] = []
    regions: list[list[Any]] = []
    slot = 0
    tensors = ckpt.format.tensors
    for t, run in itertools.groupby(group, key=lambda tp: tp[0]):
        pieces = [piece for _, piece in run]
        boxes = [piece.box if rel is None else tuple((a0 + a, a0 + b) for (a0, _), (a, b) in zip(piece.box, rel))
                 for piece in pieces]
        made = _steps_at_once(t, pieces, boxes, slot, tensors)
        if made is not None:
            steps.extend(made[0])
            regions.extend(made[1])
            slot += len(pieces)
            continue
        for piece, box in zip(pieces, boxes):
            step, regs = make_step(t, piece, box, slot, tensors)
            slot += 1 + len(step.temps)
            steps.append(step)
            regions.append(regs)
    unit = plan_unit(ckpt, steps, regions, executor, pp, feeds, state)
    unit.rel = rel
    return unit


def _regions_of(block: RegionBlock, rows: np.ndarray) -> list[Region]:
    """The rows ``rows`` (a mask) of ``block`` as Region objects."""
    idx = np.flatnonzero(rows)
    slots = np.broadcast_to(block.slot, block.cid.shape)[idx].tolist()
    return [Region(block.info, Overlap(c, tuple(cs), tuple(ps), tuple(sz)), s, d, block.strides)
            for c, cs, ps, sz, d, s in zip(block.cid[idx].tolist(), block.cstart[idx].tolist(),
                                            block.pstart[idx].tolist(), block.size[idx].tolist(),
                                            block.dst0[idx].tolist(), slots)]


def _region_bytes(r: Region | RegionBlock) -> int:
    return r.nbytes if type(r) is RegionBlock else math.prod(r.overlap.size) * r.info.dtype.itemsize


def plan_unit(ckpt: Any, steps: list[Step], regions: list[list[Region]], executor: Executor, pp: ProcessPlan,
              feeds: bool = True, state: Located | None = None) -> Unit:
    """The unit that fills ``steps`` from their ``regions``, its reads counted into ``pp``. ``feeds`` False: a
    unit only counted (another process's), whose requests are made without what each feeds (never run).
    ``state``: where located chunks are looked up and kept (default the checkpoint's
    :class:`~jreshard.lanes.Located`)."""
    flat = [r for regs in regions for r in regs if type(r) is Region]
    blocks, wholes = [], []
    for b in (r for regs in regions for r in regs if type(r) is RegionBlock):
        # Rows of chunks read whole (small or compressed items) are set apart: they join the lanes if located
        # below, else they are read whole when the unit runs.
        if none_read_whole(b.info.chunks):  # known at open
            if len(b):
                blocks.append(b)
            continue
        whole = read_facts(b.info.chunks, b.cid)[0] >= 0
        if whole.any():
            wholes.append(b.subset(whole))
            b = b.subset(~whole)
        if len(b):
            blocks.append(b)
    # Blocks whose chunks are all located as plain storages already are read from the lane tables; the
    # others' chunks are located (or looked up) one by one. (Region objects are located below, with the rows
    # that lanes leave to copy jobs.)
    if state is None:
        state = ckpt._located  # one consistent set of located chunks for this unit, even if a load ends meanwhile
    tables = state.lane_tables
    located = ckpt._locate(((b.info, c) for b in blocks
                            if not (b.info.name in tables and (tables[b.info.name].state[b.cid] == 1).all())
                            for c in np.unique(b.cid).tolist()), state=state)
    # Small archives (read whole for one request instead of header reads) are located for sub-ranges when
    # this unit needs less than 1/PARTIAL of their bytes: the bytes read then stay near the bytes needed.
    need: dict[tuple[str, int], int] = {}
    infos: dict[str, TensorInfo] = {}
    hit: set[str] = set()  # tensors with chunks read whole by default located for sub-ranges

    def consider(info: TensorInfo, cid: int, nbytes: int) -> None:
        chunk = info.chunks[cid]
        key = (info.name, cid)
        if chunk.whole_read_nbytes is not None and key not in located:
            cached = state.locators.get(key)  # located for sub-ranges by an earlier plan: read as such again
            if cached is not None:
                located[key] = cached
                hit.add(info.name)
                return
        if chunk.partial_ok and chunk.whole_read_nbytes is not None and key not in located:
            need[key] = need.get(key, 0) + nbytes
            infos[info.name] = info

    for r in flat:
        consider(r.info, r.overlap.chunk_id, math.prod(r.overlap.size) * r.info.dtype.itemsize)
    flat_names = {r.info.name for r in flat}
    by_name: dict[str, list[RegionBlock]] = {}
    for b in wholes:
        by_name.setdefault(b.info.name, []).append(b)
    for name, bs in by_name.items():
        info = bs[0].info
        uniq, inv = np.unique(np.concatenate([b.cid for b in bs]), return_inverse=True)
        nbytes = np.zeros(len(uniq), np.int64)
        np.add.at(nbytes, inv, np.concatenate([b.size.prod(axis=1) for b in bs]) * info.dtype.itemsize)
        if name in flat_names or name in state.sub_ranged:
            for c, nb in zip(uniq.tolist(), nbytes.tolist()):
                consider(info, c, nb)
            continue
        # No chunk of this tensor is located yet, nor needed by other regions: only those passing the test
        # below can be located (the same test, at once).
        w, pok = read_facts(info.chunks, uniq)
        cand = np.flatnonzero(pok & _sub_ranges_pay(nbytes, w))
        for c, nb in zip(uniq[cand].tolist(), nbytes[cand].tolist()):
            need[(name, c)] = nb
            infos[name] = info
    partial = [(infos[n], cid) for (n, cid), nbytes in need.items()
               if _sub_ranges_pay(nbytes, infos[n].chunks[cid].whole_read_nbytes)]
    if partial:
        located.update(ckpt._locate(partial, precise=True, state=state))
        hit.update(info.name for info, _ in partial)
    # Whole-read rows whose chunks are now located go with the other rows; the rest are read whole.
    unread: list[RegionBlock] = []
    for b in wholes:
        if b.info.name not in hit:
            unread.append(b)
            continue
        uniq, inv = np.unique(b.cid, return_inverse=True)
        found = np.array([(b.info.name, c) in located for c in uniq.tolist()], bool)[inv]
        if found.any():
            blocks.append(b.subset(found))
        if not found.all():
            unread.append(b.subset(~found))
    lanes, rest = lanes_of(blocks, located, tables, state.file_ids)
    for b, rows in rest:
        flat.extend(_regions_of(b, rows))
    located.update(ckpt._locate(((r.info, r.overlap.chunk_id) for r in flat
                                 if (r.info.name, r.overlap.chunk_id) not in located
                                 and r.info.chunks[r.overlap.chunk_id].whole_read_nbytes is None), state=state))
    jobs, deferred = jobs_of(flat, located)
    prepared = executor.prepare(jobs, lanes, feeds=feeds)
    total = 0
    for step, regs in zip(steps, regions):
        if not regs:  # (the other pieces of a target planned at once: their overlaps are with the first's)
            continue
        nbytes = sum(_region_bytes(r) for r in regs)
        total += nbytes
        pp.bytes_needed += nbytes
        pp.tensors.setdefault(step.target.name, {"pieces": 0, "bytes_needed": 0})["bytes_needed"] += nbytes
    for requests in itertools.chain([prepared.staged_requests], (rs for rs, _ in prepared.groups)):
        pp.bytes_to_read += sum(map(operator.itemgetter(2), requests)) - sum(map(operator.itemgetter(1), requests))
        pp.num_reads += len(requests)
    # One whole read per chunk, of the deferred regions and of the unread rows, per tensor at once.
    read_whole: dict[str, tuple[TensorInfo, list[int], list[np.ndarray]]] = {}
    for r in deferred:
        read_whole.setdefault(r.info.name, (r.info, [], []))[1].append(r.overlap.chunk_id)
    for b in unread:
        read_whole.setdefault(b.info.name, (b.info, [], []))[2].append(b.cid)
    for info, ids, arrays in read_whole.values():
        uniq = np.unique(np.concatenate([np.array(ids, np.int64), *arrays]))
        nbytes = read_facts(info.chunks, uniq)[0]
        if (nbytes < 0).any():
            raise JReshardError(f"internal: tensor {info.name!r}: a chunk left unlocated is not read whole")
        pp.bytes_to_read += int(nbytes.sum())
        pp.num_reads += len(uniq)
    if feeds:  # a unit only counted needs no Region object for these
        for b in unread:
            deferred.extend(_regions_of(b, np.ones(len(b), bool)))
    return Unit(steps, jobs, prepared, deferred, total, lanes=lanes)


# -- batching -------------------------------------------------------------------------------------------


def _batches(work: list, limit: int, pack: int | None = None) -> Iterable[tuple[bool, list]]:
    """Split the work items ``(target index, target, piece, elem_bytes)`` into batches ``(in_parts, items)``.
    Batches of whole pieces (``in_parts`` False) hold at most ``limit`` host bytes (:func:`_host_bytes`): units
    are packed in order up to ``pack`` (default and at most ``limit``; a unit above ``pack`` is a batch of its
    own). A unit is a whole target's pieces when they fit in ``limit``; else the pieces sharing one band of rows
    when they fit; else single pieces. Pieces of
    one target larger than ``limit`` each are grouped by shape, in groups filled together part by part
    (``in_parts`` True).

    Example (a 2048x1024 float32 tensor sharded by columns 8 ways, 1 MiB pieces, 2 MiB bound):
        >>> work = [(0, None, Piece("w", ((0, 2048), (128 * k, 128 * (k + 1))), 0, []), 4) for k in range(8)]
        >>> [(in_parts, len(b)) for in_parts, b in _batches(work, 2 * 2**20)]
        [(False, 2), (False, 2), (False, 2), (False, 2)]
        >>> [(in_parts, len(b)) for in_parts, b in _batches(work, 2**19)]
        [(True, 8)]
    """
    pack = limit if pack is None else min(pack, limit)
    units: list[tuple[bool, list, int]] = []  # (in parts, items, host bytes)
    for _, group in itertools.groupby(work, key=lambda item: item[0]):
        pieces = list(group)
        # A target's pieces stay together up to the bound (not only the packing size): they usually need
        # complementary parts of the same saved rows, which then join into few long reads.
        nbytes = sum(_host_bytes(item) for item in pieces)
        if nbytes <= limit:
            units.append((False, pieces, nbytes))
            continue
        pieces.sort(key=lambda item: item[2].box)
        large: dict[tuple[int, ...], list] = {}
        for _, band_items in itertools.groupby(pieces, key=lambda item: item[2].box[:1]):
            band = []
            for item in band_items:
                if _host_bytes(item) > limit:
                    large.setdefault(item[2].shape, []).append(item)
                else:
                    band.append(item)
            band_bytes = sum(_host_bytes(item) for item in band)
            if band_bytes <= limit:
                units.append((False, band, band_bytes))
            else:
                units.extend((False, [item], _host_bytes(item)) for item in band)
        for items in large.values():
            per = max(1, min(len(items), limit // max(1, items[0][3])))  # pieces filled together
            units.extend((True, items[k : k + per], 0) for k in range(0, len(items), per))
    batch: list = []
    size = 0
    for in_parts, unit, n in units:
        if in_parts:
            if batch:
                yield False, batch
                batch, size = [], 0
            yield True, unit
            continue
        if batch and size + n > pack:
            yield False, batch
            batch, size = [], 0
        batch.extend(unit)
        size += n
    if batch:
        yield False, batch


def _host_bytes(item: tuple) -> int:
    """Host bytes of a work item: its piece's elements times the bytes each takes while read."""
    return item[2].size * item[3]


def inflight_limit(value: Any, targets: Sequence[Target | None]) -> int:
    """``max_inflight_bytes`` checked: None gives the default; anything else must be an integer of at least
    one element (saved and cast) of every target, else InvalidArgumentError.

    Example:
        >>> inflight_limit(None, []) == DEFAULT_INFLIGHT, inflight_limit(4096, [])
        (True, 4096)
        >>> inflight_limit(0, [])
        Traceback (most recent call last):
        ...
        jreshard.errors.InvalidArgumentError: max_inflight_bytes must be a positive number of bytes, not 0
    """
    if value is None:
        return DEFAULT_INFLIGHT
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidArgumentError(f"max_inflight_bytes must be an integer number of bytes, not {value!r}")
    limit = int(value)
    if limit <= 0:
        raise InvalidArgumentError(f"max_inflight_bytes must be a positive number of bytes, not {limit}")
    real = [t for t in targets if t is not None]
    if real:
        widest = max(real, key=lambda t: t.elem_bytes)
        if limit < widest.elem_bytes:
            raise InvalidArgumentError(
                f"max_inflight_bytes={limit} is below one element: target {widest.name!r} (read from "
                f"{', '.join(widest.sources)} as {widest.dtype}) needs {widest.elem_bytes} bytes per element on the "
                f"host; give at least {widest.elem_bytes}")
    return limit


def _parts(box: Box, elem_bytes: int, limit: int) -> Iterable[Box]:
    """Sub-boxes of ``box`` that tile it in C order, each at most ``limit`` bytes at ``elem_bytes`` per
    element (``limit >= elem_bytes``): bands along the first dimension whose trailing block fits, with the
    dimensions before it taken one index at a time.

    Example:
        >>> list(_parts(((0, 4), (0, 3)), 4, 24))  # rows of 12 bytes, two rows per part
        [((0, 2), (0, 3)), ((2, 4), (0, 3))]
        >>> list(_parts(((2, 4), (0, 3)), 4, 8))  # a row (12 bytes) is too large: bands of a row
        [((2, 3), (0, 2)), ((2, 3), (2, 3)), ((3, 4), (0, 2)), ((3, 4), (2, 3))]
    """
    shape = [b - a for a, b in box]
    if not shape or math.prod(shape) * elem_bytes <= limit:
        yield box
        return
    k = 0
    while math.prod(shape[k + 1 :]) * elem_bytes > limit:
        k += 1
    step = max(1, limit // (math.prod(shape[k + 1 :]) * elem_bytes))
    for outer in itertools.product(*(range(a, b) for a, b in box[:k])):
        head = tuple((i, i + 1) for i in outer)
        a, b = box[k]
        for r0 in range(a, b, step):
            yield head + ((r0, min(b, r0 + step)),) + box[k + 1 :]


def as_saved(ckpt: Any, targets: Sequence[Target | None]) -> dict[str, bool]:
    """Per target read straight from one saved tensor: whether its shards are exactly the saved chunks."""
    out = {}
    for t in targets:
        if t is not None and t.view._op == "saved":
            info = ckpt.format.tensors[t.view._args]
            parts = _named_parts(t.sharding)
            if parts is None:
                out[t.name] = matches_saved(info, t.sharding)
            else:
                out[t.name] = _named_matches_saved(info, *parts)
    return out


def _named_matches_saved(info: TensorInfo, sizes: tuple[int, ...], names: tuple[str, ...], spec: Any) -> bool:
    """:func:`jreshard.spec.matches_saved` for a NamedSharding, without its devices: the distinct shards (one
    device per distinct box) are tiled only when there are as many as saved chunks."""
    if not info.chunks:
        return True
    used = {a for e in spec if e is not None for a in ((e,) if isinstance(e, str) else e)}
    shards = math.prod(n for n, a in zip(sizes, names) if a in used)
    if shards != len(info.chunks):
        return False
    # One device per distinct box: the mesh with the unused axes dropped.
    sub = [(n, a) for n, a in zip(sizes, names) if a in used]
    counted = COUNTS["boxes"]  # (a report on the catalog, not work of the processes planned)
    boxes = named_boxes(info.shape, [n for n, _ in sub], [a for _, a in sub], spec)
    COUNTS["boxes"] = counted
    chunks = {tuple((o, o + s) for o, s in zip(c.offsets, c.sizes)) for c in info.chunks}
    return set(boxes) == chunks


def report(ckpt: Any, plans: dict[int, ProcessPlan], this: int, targets: Sequence[Target | None],
           program: Program | None, process: int | None = None) -> Plan:
    return Plan(plans, this, ckpt.source, as_saved(ckpt, targets), _program=program, _targets=list(targets),
                process=process)
