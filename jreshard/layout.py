"""Saved torch layouts as ``jax.sharding``, torch-free.

A DTensor is laid out by a list of placements, one per mesh dimension: :class:`Shard`, :class:`Replicate`
or :class:`StridedShard` (torch's ``_StridedShard``, as FSDP2 + tensor parallelism produce it).
:func:`local_chunk` is the arithmetic of torch's ``compute_local_shape_and_global_offset`` (the box a rank
holds, as DCP saves it); :func:`local_indices` is the exact set of global indices a rank holds (a strided
shard may hold several ranges); :func:`torch_layout` gives the mesh and ``PartitionSpec`` under which every
JAX device holds exactly what the torch rank at the same mesh coordinate holds, or says why none exists.

Live torch placement objects (``Shard``, ``Replicate``, ``_StridedShard``) are accepted wherever a
placement is expected; this module never imports torch.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import InvalidArgumentError, ShardingError

if TYPE_CHECKING:  # pragma: no cover
    from jax.sharding import Mesh, NamedSharding, PartitionSpec


@dataclass(frozen=True)
class Shard:
    """Tensor dim ``dim`` split over one mesh dimension with ``torch.chunk`` semantics (uneven sizes,
    trailing chunks smaller or empty); a later placement on the same dim splits each chunk again.

    Example:
        >>> Shard(0)
        Shard(dim=0)
    """

    dim: int


@dataclass(frozen=True)
class Replicate:
    """Every rank along this mesh dimension holds the same data.

    Example:
        >>> Replicate()
        Replicate()
    """


@dataclass(frozen=True)
class StridedShard:
    """torch's ``_StridedShard(dim, split_factor=...)``: the dim is first chunked into ``split_factor``
    pieces, each piece is chunked over the mesh dimension, and a rank holds its chunk of every piece, in
    order. FSDP2 over a tensor-parallel ``Shard(dim)`` saves ``StridedShard(dim, tp_size)`` on the FSDP mesh
    dimension.

    Example:
        >>> StridedShard(0, split_factor=2)
        StridedShard(dim=0, split_factor=2)
    """

    dim: int
    split_factor: int


Placement = Shard | Replicate | StridedShard


def to_placement(p: Any) -> Placement:
    """One of this module's placements from a placement of this module or a live torch placement
    (recognised by class name: ``Shard``, ``Replicate``, ``_StridedShard``; ``Partial`` is refused).

    Example:
        >>> to_placement(StridedShard(1, 4))
        StridedShard(dim=1, split_factor=4)
    """
    if isinstance(p, (Shard, Replicate, StridedShard)):
        return p
    names = [k.__name__ for k in type(p).__mro__]
    if "Partial" in names:
        raise ShardingError(
            f"placement {p!r} is Partial: each rank holds a partial value (e.g. a partial sum) to be reduced, "
            "not a piece of the tensor; reduce it in torch (redistribute to Replicate or Shard) before saving")
    if "_StridedShard" in names or "StridedShard" in names:
        return StridedShard(_int(getattr(p, "dim", None), f"{p!r}.dim"),
                            _int(getattr(p, "split_factor", None), f"{p!r}.split_factor"))
    if "Shard" in names:
        return Shard(_int(getattr(p, "dim", None), f"{p!r}.dim"))
    if "Replicate" in names:
        return Replicate()
    raise InvalidArgumentError(f"{p!r} is not a placement: expected Shard, Replicate or StridedShard "
                               "(or torch's Shard, Replicate, _StridedShard)")


# ---------------------------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------------------------


def _int(v: Any, what: str) -> int:
    if isinstance(v, bool) or not hasattr(v, "__index__"):
        raise InvalidArgumentError(f"{what} must be an int, not {v!r}")
    return int(v.__index__())


def _shape(shape: Sequence[int], what: str, minimum: int) -> tuple[int, ...]:
    try:
        items = tuple(shape)
    except TypeError:
        raise InvalidArgumentError(f"{what} must be a sequence of ints, not {shape!r}") from None
    out = tuple(_int(s, what) for s in items)
    if any(s < minimum for s in out):
        raise InvalidArgumentError(f"{what} {out} has a size below {minimum}")
    return out


def _placements(placements: Sequence[Any], ndim: int, mesh_shape: tuple[int, ...]) -> tuple[Placement, ...]:
    if isinstance(placements, (str, bytes)) or not hasattr(placements, "__iter__"):
        raise InvalidArgumentError(f"placements must be a sequence, one per mesh dimension, not {placements!r}")
    out = []
    for p in (to_placement(p) for p in placements):
        if isinstance(p, (Shard, StridedShard)):
            if not -ndim <= p.dim < ndim:
                raise InvalidArgumentError(f"placement {p} names dim {p.dim} of a {ndim}-d tensor")
            if p.dim < 0:
                p = Shard(p.dim + ndim) if isinstance(p, Shard) else StridedShard(p.dim + ndim, p.split_factor)
            if isinstance(p, StridedShard) and p.split_factor < 1:
                raise InvalidArgumentError(f"placement {p} needs split_factor >= 1")
        out.append(p)
    if len(out) != len(mesh_shape):
        raise InvalidArgumentError(
            f"{len(out)} placements for a mesh of shape {mesh_shape}: torch gives one placement per mesh dimension")
    return tuple(out)


def _coordinate(coordinate: Sequence[int], mesh_shape: tuple[int, ...]) -> tuple[int, ...]:
    c = _shape(coordinate, "coordinate", 0)
    if len(c) != len(mesh_shape) or any(i >= n for i, n in zip(c, mesh_shape)):
        raise InvalidArgumentError(f"coordinate {c} is not in a mesh of shape {mesh_shape}")
    return c


# ---------------------------------------------------------------------------------------------
# torch's arithmetic, on runs of global indices
# ---------------------------------------------------------------------------------------------

_Runs = list[tuple[int, int]]  # ascending, disjoint, non-adjacent [start, stop) ranges of global indices


def _chunk(length: int, n: int, i: int) -> tuple[int, int]:
    """Positions [a, b) of chunk i of torch.chunk(range(length), n), empty chunks filled in."""
    c = -(-length // n)
    return min(length, c * i), min(length, c * (i + 1))


def _take(runs: _Runs, a: int, b: int) -> _Runs:
    """The global indices at local positions [a, b) of the concatenation of runs."""
    out: _Runs = []
    pos = 0
    for s, e in runs:
        n = e - s
        lo, hi = max(a, pos), min(b, pos + n)
        if lo < hi:
            out.append((s + lo - pos, s + hi - pos))
        pos += n
        if pos >= b:
            break
    return out


def _merge(runs: _Runs) -> _Runs:
    out: _Runs = []
    for s, e in runs:
        if out and out[-1][1] == s:
            out[-1] = (out[-1][0], e)
        else:
            out.append((s, e))
    return out


def _split(runs: _Runs, p: Shard | StridedShard, n: int, i: int) -> _Runs:
    """What rank i of n holds after placement p splits the indices ``runs`` it held before."""
    length = sum(e - s for s, e in runs)
    if isinstance(p, Shard):
        return _take(runs, *_chunk(length, n, i))
    out: _Runs = []
    for j in range(p.split_factor):
        pa, pb = _chunk(length, p.split_factor, j)
        qa, qb = _chunk(pb - pa, n, i)
        out += _take(runs, pa + qa, pa + qb)
    return _merge(out)


def _dim_runs(size: int, steps: Sequence[tuple[Shard | StridedShard, int, int]]) -> _Runs:
    runs: _Runs = [(0, size)] if size else []
    for p, n, i in steps:
        runs = _split(runs, p, n, i)
    return runs


def _steps(placements: tuple[Placement, ...], mesh_shape: tuple[int, ...], coordinate: tuple[int, ...],
           dim: int) -> list[tuple[Shard | StridedShard, int, int]]:
    return [(p, mesh_shape[m], coordinate[m]) for m, p in enumerate(placements)
            if isinstance(p, (Shard, StridedShard)) and p.dim == dim]


def _checked(global_shape: Sequence[int], mesh_shape: Sequence[int], placements: Sequence[Any],
             coordinate: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[Placement, ...],
                                                 tuple[int, ...]]:
    shape = _shape(global_shape, "global_shape", 0)
    mesh = _shape(mesh_shape, "mesh_shape", 1)
    return shape, mesh, _placements(placements, len(shape), mesh), _coordinate(coordinate, mesh)


def local_indices(global_shape: Sequence[int], mesh_shape: Sequence[int], placements: Sequence[Any],
                  coordinate: Sequence[int]) -> tuple[tuple[range, ...], ...]:
    """Per tensor dim, the global indices the rank at mesh ``coordinate`` holds, as ascending ranges in the
    order of its local tensor. One range (or none: empty) per dim means the rank holds one contiguous box;
    a :class:`StridedShard` not followed by the matching ``Shard`` leaves several.

    Example:
        >>> local_indices((8, 3), (2,), [StridedShard(0, 2)], (0,))
        ((range(0, 2), range(4, 6)), (range(0, 3),))
    """
    shape, mesh, pl, coord = _checked(global_shape, mesh_shape, placements, coordinate)
    return tuple(tuple(range(s, e) for s, e in _dim_runs(size, _steps(pl, mesh, coord, d)))
                 for d, size in enumerate(shape))


def local_is_box(global_shape: Sequence[int], mesh_shape: Sequence[int], placements: Sequence[Any],
                 coordinate: Sequence[int]) -> bool:
    """Whether the rank at mesh ``coordinate`` holds one contiguous box of the tensor (then
    :func:`local_chunk` describes its data exactly).

    Example:
        >>> local_is_box((8,), (2, 2), [StridedShard(0, 2), Shard(0)], (1, 0))
        True
        >>> local_is_box((8,), (2, 2), [StridedShard(0, 2), Replicate()], (1, 0))
        False
    """
    return all(len(r) <= 1 for r in local_indices(global_shape, mesh_shape, placements, coordinate))


def local_chunk(global_shape: Sequence[int], mesh_shape: Sequence[int], placements: Sequence[Any],
                coordinate: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(offsets, sizes)`` of the rank at mesh ``coordinate``, as torch's
    ``compute_local_shape_and_global_offset`` gives them (which returns ``(sizes, offsets)``): per dim the
    number of indices held and the first of them; an empty piece of a sharded dim has offset equal to the
    dim's global size. torch (and DCP, which saves this box as the rank's chunk) reports this box even when
    a :class:`StridedShard` leaves the rank several ranges (:func:`local_is_box` False): then ``sizes`` counts
    every index held, but the data is not the box at ``offsets`` (see :func:`local_indices`).

    Example:
        >>> [local_chunk((10,), (4,), [Shard(0)], (r,)) for r in range(4)]
        [((0,), (3,)), ((3,), (3,)), ((6,), (3,)), ((9,), (1,))]
    """
    shape, mesh, pl, coord = _checked(global_shape, mesh_shape, placements, coordinate)
    offsets, sizes = [], []
    for d, size in enumerate(shape):
        runs = _dim_runs(size, _steps(pl, mesh, coord, d))
        n = sum(e - s for s, e in runs)
        sizes.append(n)
        offsets.append(runs[0][0] if n else size)
    return tuple(offsets), tuple(sizes)


# ---------------------------------------------------------------------------------------------
# the layout as a jax sharding
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TorchLayout:
    """A torch DTensor layout as a JAX mesh and ``PartitionSpec``: under ``NamedSharding(self.mesh(),
    self.spec)`` the device at each mesh coordinate holds exactly the box torch's rank at that coordinate
    holds. Mesh axes of size 1 never appear in ``spec``.

    Example:
        >>> layout = torch_layout((6, 4), [Shard(1)], (2,), ("tp",))
        >>> layout.spec, layout.mesh_shape, layout.axis_names
        (P(None, 'tp'), (2,), ('tp',))
    """

    mesh_shape: tuple[int, ...]
    axis_names: tuple[str, ...]
    spec: PartitionSpec

    def mesh(self, devices: Sequence[Any] | None = None) -> Mesh:
        """The mesh: ``devices`` (default ``jax.devices()[:n]``) in rank order, i.e. the i-th device at the
        i-th mesh coordinate in C order (torch's rank order for ``init_device_mesh``).

        Example:
            >>> import jax
            >>> torch_layout((4,), [Replicate()], (1,)).mesh([jax.devices()[0]]).axis_names
            ('dp0',)
        """
        import jax
        import numpy as np
        from jax.sharding import Mesh

        n = math.prod(self.mesh_shape)
        if devices is None:
            devices = jax.devices()
            if len(devices) < n:
                raise InvalidArgumentError(
                    f"the mesh {self.mesh_shape} needs {n} devices; this process sees {len(devices)}")
            devices = devices[:n]
        flat = np.asarray(devices, dtype=object).reshape(-1)
        if flat.size != n:
            raise InvalidArgumentError(f"the mesh {self.mesh_shape} needs {n} devices, got {flat.size}")
        return Mesh(flat.reshape(self.mesh_shape), self.axis_names)

    def sharding(self, devices: Sequence[Any] | None = None) -> NamedSharding:
        """``NamedSharding(self.mesh(devices), self.spec)``.

        Example:
            >>> torch_layout((4, 2), [Shard(0)], (1,), ("dp",)).sharding().spec
            P(None, None)
        """
        from jax.sharding import NamedSharding

        return NamedSharding(self.mesh(devices), self.spec)


def _mesh_from(device_mesh: Any) -> tuple[tuple[int, ...], Any]:
    inner = getattr(device_mesh, "mesh", None)
    shape = getattr(inner, "shape", None) if inner is not None else None
    if shape is None:
        shape = getattr(device_mesh, "shape", None)
    if shape is None:
        raise InvalidArgumentError(f"device_mesh {device_mesh!r} has neither .mesh.shape nor .shape")
    return tuple(shape), getattr(device_mesh, "mesh_dim_names", None)


def _describe(placements: tuple[Placement, ...], mesh_dims: Sequence[int]) -> str:
    def one(p: Placement) -> str:
        if isinstance(p, StridedShard):
            return f"_StridedShard({p.dim}, split_factor={p.split_factor})"
        return f"Shard({p.dim})" if isinstance(p, Shard) else "Replicate()"

    return ", ".join(f"{one(placements[m])} on mesh dim {m}" for m in mesh_dims)


def _show(runs: _Runs) -> str:
    return "[" + ", ".join(f"{s}:{e}" for s, e in runs) + "]"


def torch_layout(global_shape: Sequence[int], placements: Sequence[Any], mesh_shape: Sequence[int] | None = None,
                 mesh_dim_names: Sequence[str] | None = None, *, device_mesh: Any = None) -> TorchLayout:
    """The JAX mesh and ``PartitionSpec`` that hold a tensor exactly as torch's DTensor with these
    ``placements`` on a mesh of ``mesh_shape`` holds it, rank by rank.

    ``device_mesh`` may be a torch ``DeviceMesh`` (its shape and ``mesh_dim_names`` are used) instead of
    ``mesh_shape`` / ``mesh_dim_names``; unnamed meshes get axes ``dp0``, ``dp1``, .... ``Shard(d)`` on mesh
    dims i < j becomes the spec entry ``(name_i, name_j)``; FSDP2 + TP's ``[_StridedShard(d, tp), Shard(d)]``
    becomes ``(name_tp, name_dp)``. Raises :class:`~jreshard.errors.ShardingError` with the reason when no
    ``PartitionSpec`` gives every device the same box as torch (uneven ``torch.chunk`` sizes, a rank holding
    several ranges, or blocks in an order no spec expresses).

    Example:
        >>> torch_layout((8, 4), [StridedShard(0, 2), Shard(0)], (2, 2), ("dp", "tp")).spec
        P(('tp', 'dp'), None)
        >>> torch_layout((10,), [Shard(0)], (4,)).spec  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        jreshard.errors.ShardingError: ...: dim 0 of size 10 split 4 ways by torch.chunk gives sizes (3, 3, 3, 1); ...
    """
    from jax.sharding import PartitionSpec

    if device_mesh is not None:
        if mesh_shape is not None or mesh_dim_names is not None:
            raise InvalidArgumentError("give either device_mesh or mesh_shape / mesh_dim_names, not both")
        mesh_shape, mesh_dim_names = _mesh_from(device_mesh)
    if mesh_shape is None:
        raise InvalidArgumentError("torch_layout needs mesh_shape or device_mesh")
    shape = _shape(global_shape, "global_shape", 0)
    mesh = _shape(mesh_shape, "mesh_shape", 1)
    if not mesh:
        raise InvalidArgumentError("mesh_shape must have at least one dimension")
    pl = _placements(placements, len(shape), mesh)
    if mesh_dim_names is None:
        names = tuple(f"dp{i}" for i in range(len(mesh)))
    else:
        names = tuple(mesh_dim_names)
        if len(names) != len(mesh) or len(set(names)) != len(names) or not all(isinstance(a, str) for a in names):
            raise InvalidArgumentError(f"mesh_dim_names {names} must be {len(mesh)} distinct strings for mesh {mesh}")
    where = (f"shape {shape} with placements [{_describe(pl, range(len(mesh)))}] on mesh {mesh}"
             + (f" {names}" if mesh_dim_names is not None else ""))
    spec = [_dim_entry(shape[d], d, pl, mesh, names, where) for d in range(len(shape))]
    return TorchLayout(mesh, names, PartitionSpec(*spec))


def _dim_entry(size: int, d: int, pl: tuple[Placement, ...], mesh: tuple[int, ...], names: tuple[str, ...],
               where: str) -> Any:
    """The spec entry of tensor dim d, or ShardingError."""
    dims = [m for m, p in enumerate(pl) if isinstance(p, (Shard, StridedShard)) and p.dim == d]
    if not dims or size == 0:
        return None
    how = _describe(pl, dims)
    sub = [mesh[m] for m in dims]
    held: dict[tuple[int, ...], _Runs] = {}
    for c in itertools.product(*(range(n) for n in sub)):
        runs = _dim_runs(size, [(pl[m], mesh[m], i) for m, i in zip(dims, c)])
        if len(runs) > 1:
            coord = [0] * len(mesh)
            for m, i in zip(dims, c):
                coord[m] = i
            raise ShardingError(
                f"{where}: dim {d} of size {size}: the rank at mesh coordinate {tuple(coord)} holds indices "
                f"{_show(runs)} ({how}), not one contiguous range; every shard of a NamedSharding is one box")
        held[c] = runs
    ways = math.prod(sub)
    by_offset = sorted(held.values(), key=lambda r: r[0][0] if r else size)
    sizes = tuple(sum(e - s for s, e in r) for r in by_offset)
    if len(set(sizes)) > 1:
        method = "torch.chunk" if len(dims) == 1 and isinstance(pl[dims[0]], Shard) else how
        raise ShardingError(f"{where}: dim {d} of size {size} split {ways} ways by {method} gives sizes {sizes}; "
                            "a NamedSharding needs equal sizes")
    block = sizes[0]
    # every held range is now a nonempty [k * block, (k + 1) * block): find the mixed radix mapping c -> k
    index = {c: r[0][0] // block for c, r in held.items()}
    axes = [k for k, n in enumerate(sub) if n > 1]
    zero = tuple(0 for _ in sub)
    strides = {}
    for k in axes:
        e = list(zero)
        e[k] = 1
        strides[k] = index[tuple(e)] - index[zero]
    order = sorted(axes, key=lambda k: -strides[k])
    expect = 1
    ok = index[zero] == 0 and len(set(index.values())) == ways
    for k in reversed(order):
        ok = ok and strides[k] == expect
        expect *= sub[k]
    ok = ok and all(index[c] == sum(c[k] * strides[k] for k in axes) for c in index)
    if not ok:
        hint = ""
        for k, m in enumerate(dims):
            after = math.prod(mesh[j] for j in dims[k + 1:] if isinstance(pl[j], Shard))
            if isinstance(pl[m], StridedShard) and pl[m].split_factor != after:
                hint = (f"; FSDP2 over tensor parallelism saves _StridedShard({d}, split_factor=S) with S the "
                        f"number of pieces the Shard({d}) after it makes, here {after}, not {pl[m].split_factor}")
                break
        listing = ", ".join(f"{tuple(c)}: {index[c]}" for c in list(index)[:16])
        listing += ", ..." if len(index) > 16 else ""
        raise ShardingError(
            f"{where}: dim {d} of size {size} is split into blocks of {block} by {how}, but the block each "
            f"coordinate of mesh dims {tuple(dims)} holds ({listing}) is not a mixed-radix number of those "
            f"coordinates in any axis order; a PartitionSpec entry (a, b, ...) gives the rank at (i_a, i_b, ...) "
            f"block i_a * size_b * ... + i_b * ... + ..., the first axis outermost{hint}")
    chosen = tuple(names[dims[k]] for k in order)
    if not chosen:
        return None
    return chosen[0] if len(chosen) == 1 else chosen


__all__ = [
    "Placement",
    "Replicate",
    "Shard",
    "StridedShard",
    "TorchLayout",
    "local_chunk",
    "local_indices",
    "local_is_box",
    "to_placement",
    "torch_layout",
]
