"""Load targets: flatten a pytree of array specs (or a flax nnx ``State``) into named leaves with concrete shardings.

A target is any pytree whose leaves are ``jax.ShapeDtypeStruct(shape, dtype, sharding=...)`` or ``jax.Array``; a
leaf's name is its key path joined with dots. flax nnx states are targets as they are: an ``nnx.Variable`` is one
leaf named by its path in the state (``"layers.0.kernel"``, without the Variable's own ``.value``), and its sharding
is taken from, in order:

1. the value's sharding: a concrete one is kept, one over an ``AbstractMesh`` (what ``nnx.eval_shape`` under
   ``jax.set_mesh`` gives) is re-made over the concrete mesh;
2. the Variable's sharding names (``out_sharding``, as ``nnx.with_partitioning`` / ``nnx.Param(..., sharding=...)``
   set, with flax's logical axis rules applied), over the concrete mesh;
3. replicated over the concrete mesh (what ``nnx.get_named_sharding`` gives an unannotated Variable).

The concrete mesh is ``mesh=`` if given, else (for names only) the Variable's own ``mesh`` metadata, else the mesh
set by ``jax.set_mesh``. flax is never imported here: Variables are recognised only when the caller has already
imported ``flax.nnx``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import InvalidArgumentError, ShardingError

if TYPE_CHECKING:
    import jax

# How many names missing_message lists before "... and N more".
_LIST_AT_MOST = 10


@dataclass(frozen=True)
class TargetLeaf:
    """One leaf of a load target.

    ``name`` is the dotted path (``"layers.attn.q.kernel"``); ``leaf`` the original leaf (a
    ``jax.ShapeDtypeStruct``, a ``jax.Array``, an ``nnx.Variable`` or any other object); ``shape`` and ``dtype``
    are ``None`` for a leaf that is not an array spec (it names a saved non-tensor object); ``dtype`` is a numpy
    dtype, or jax's extended dtype for PRNG key arrays. ``sharding`` is concrete (over a real ``Mesh``), or
    ``None`` when the leaf has none (a plain ``ShapeDtypeStruct`` without one, or a non-array leaf). ``kind`` is the
    nnx Variable type name (``"Param"``, ``"BatchStat"``, ``"RngKey"``...) or ``None`` for a plain leaf.
    """

    name: str
    leaf: Any
    shape: tuple[int, ...] | None
    dtype: Any  # np.dtype, or a jax extended dtype (PRNG keys); None for a non-array leaf
    sharding: jax.sharding.Sharding | None
    kind: str | None


def key_name(entry: Any) -> str:
    """The name of one key path entry: ``DictKey`` -> key, ``SequenceKey`` -> index, ``GetAttrKey`` -> name,
    ``FlattenedIndexKey`` -> key.

    Example:
        >>> import jax
        >>> [key_name(k) for k in (jax.tree_util.DictKey("w"), jax.tree_util.SequenceKey(3))]
        ['w', '3']
    """
    for attr in ("key", "idx", "name"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _path_name(path: tuple[Any, ...]) -> str:
    return ".".join(key_name(k) for k in path)


def _variable_types() -> tuple[type, ...]:
    """``nnx.Variable`` when the caller has imported flax nnx (a Variable cannot exist otherwise), else ()."""
    nnx = sys.modules.get("flax.nnx")
    var = getattr(nnx, "Variable", None) if nnx is not None else None
    return (var,) if isinstance(var, type) else ()


def _kind(variable: Any) -> str:
    """The Variable's type name; a hijax Variable reports the type it wraps."""
    t = getattr(variable, "var_type", None)
    return (t if isinstance(t, type) else type(variable)).__name__


def _context_mesh() -> Any:
    """The concrete mesh set by ``jax.set_mesh`` (or the deprecated ``with mesh:``), or None."""
    import jax

    get_mesh = getattr(jax.sharding, "get_mesh", None)
    if get_mesh is not None:
        try:
            m = get_mesh()
        except ValueError:  # inside jax.jit: there is no concrete mesh to use
            m = None
        if m is not None and not m.empty:
            return m
    try:  # the deprecated `with mesh:` context, still used by older flax guides
        from jax._src import mesh as mesh_lib

        m = mesh_lib.thread_resources.env.physical_mesh
        if m is not None and not m.empty:
            return m
    except (ImportError, AttributeError):  # a private API: gone in some jax version
        return None
    return None


def _mesh_text(m: Any) -> str:
    kind = "AbstractMesh" if _is_abstract(m) else "Mesh"
    return f"{kind}({', '.join(f'{n!r}: {s}' for n, s in zip(m.axis_names, m.axis_sizes))})"


def _is_abstract(m: Any) -> bool:
    import jax

    return isinstance(m, jax.sharding.AbstractMesh)


class _Resolver:
    """Turns the shardings of a target's leaves into concrete ones, over ``mesh=`` or the context mesh."""

    def __init__(self, mesh: Any) -> None:
        self.mesh = mesh
        self._context: Any = None
        self._looked = False

    def concrete(self, name: str, why: str) -> Any:
        """``mesh=``, else the mesh in context; ShardingError when there is neither."""
        if self.mesh is not None:
            return self.mesh
        if not self._looked:
            self._context, self._looked = _context_mesh(), True
        if self._context is None:
            raise ShardingError(
                f"target leaf {name!r}: {why}, and no concrete mesh is available to place it on; pass "
                "mesh= or call the load under `with jax.set_mesh(mesh):`"
            )
        return self._context

    def named(self, name: str, mesh: Any, spec: Any, memory_kind: Any = None) -> Any:
        """NamedSharding(mesh, spec), with a leaf-naming ShardingError when the spec does not fit the mesh."""
        import jax

        used = [a for part in spec for a in ((part,) if isinstance(part, str) else
                                             part if isinstance(part, tuple) else ())]
        unknown = [a for a in used if a not in mesh.axis_names]
        if unknown:
            raise ShardingError(
                f"target leaf {name!r}: partition spec {spec} names mesh axes {unknown} that {_mesh_text(mesh)} "
                "does not have"
            )
        try:
            return jax.sharding.NamedSharding(mesh, spec, memory_kind=memory_kind)
        except (ValueError, TypeError) as e:  # jax checks specs (repeated axes, ...)
            raise ShardingError(
                f"target leaf {name!r}: cannot make a sharding of {spec} over {_mesh_text(mesh)}: {e}"
            ) from None

    def against(self, name: str, abstract: Any, concrete: Any) -> Any:
        """``concrete`` when its axis names and sizes are those of ``abstract``, else ShardingError."""
        if (tuple(abstract.axis_names) != tuple(concrete.axis_names)
                or tuple(abstract.axis_sizes) != tuple(concrete.axis_sizes)):
            raise ShardingError(
                f"target leaf {name!r}: its sharding is over {_mesh_text(abstract)}, which the concrete mesh "
                f"{_mesh_text(concrete)} does not match (axis names and sizes must be equal); pass a matching "
                "mesh= or set one with jax.set_mesh"
            )
        return concrete

    def sharding(self, name: str, sharding: Any) -> Any:
        """A leaf's own sharding, made concrete when it is over an AbstractMesh."""
        import jax

        if isinstance(sharding, jax.sharding.NamedSharding) and _is_abstract(sharding.mesh):
            why = f"its sharding is over {_mesh_text(sharding.mesh)}"
            mesh = self.against(name, sharding.mesh, self.concrete(name, why))
            return self.named(name, mesh, sharding.spec, sharding.memory_kind)
        return sharding

    def from_metadata(self, name: str, variable: Any) -> Any:
        """The sharding an nnx Variable's metadata asks for (partition names, else replicated)."""
        import jax

        meta = _metadata(variable)
        names = next((meta[k] for k in ("out_sharding", "sharding_names", "sharding") if meta.get(k)), None)
        if isinstance(names, jax.sharding.Sharding):
            return self.sharding(name, names)
        spec = _partition_spec(name, variable, names)
        own = meta.get("mesh")
        why = (f"it has only sharding names {tuple(spec)}" if names
               else "it has no sharding (it would be replicated)")
        if self.mesh is not None:
            mesh = self.mesh
        elif isinstance(own, jax.sharding.Mesh):
            mesh = own
        else:
            mesh = self.concrete(name, why)
        if own is not None and _is_abstract(own):
            mesh = self.against(name, own, mesh)
        return self.named(name, mesh, spec)


def _metadata(variable: Any) -> dict[str, Any]:
    try:
        meta = variable.get_metadata()
    except (AttributeError, TypeError):  # not flax 0.12's Variable API
        meta = getattr(variable, "_var_metadata", None)
    return dict(meta) if isinstance(meta, dict) else {}


def _partition_spec(name: str, variable: Any, names: Any) -> Any:
    """PartitionSpec of sharding names, through flax's logical axis rules (``sharding_rules`` metadata and the
    ``nnx.logical_axis_rules`` context) when flax provides them."""
    from jax.sharding import PartitionSpec

    if not names:
        return PartitionSpec()
    spmd = sys.modules.get("flax.nnx.spmd")
    get_var_pspec = getattr(spmd, "get_var_pspec", None)
    if get_var_pspec is not None and _metadata(variable).get("out_sharding"):
        try:
            spec = get_var_pspec(variable)
        except Exception as e:
            raise ShardingError(f"target leaf {name!r}: flax cannot turn sharding names {names} into a partition "
                                f"spec: {type(e).__name__}: {e}") from e
        if spec is not None:
            return spec
    return PartitionSpec(*names)


def _is_array(x: Any) -> bool:
    import jax

    return isinstance(x, (jax.ShapeDtypeStruct, jax.Array))


def _dtype(d: Any) -> Any:
    try:
        return np.dtype(d)
    except TypeError:  # jax extended dtypes (PRNG keys) are not numpy dtypes
        return d


def flatten_target(target: Any, *, mesh: jax.sharding.Mesh | None = None
                   ) -> tuple[list[TargetLeaf], Callable[[list[Any]], Any]]:
    """The named leaves of a load target, with concrete shardings, and ``unflatten(values)`` that rebuilds the
    target's structure from one value per leaf, in order.

    Plain pytrees flatten as ``jax.tree_util.tree_flatten_with_path`` does (``jax.ShapeDtypeStruct`` and
    ``jax.Array`` are leaves), and ``unflatten`` is the treedef's. An ``nnx.Variable`` is one leaf named by its
    path (its value's own ``.value`` key is dropped); ``unflatten`` puts each value back into a Variable of the
    same type and metadata, so ``nnx.merge(graphdef, result)`` and ``nnx.update(model, result)`` work.

    ``mesh`` (a concrete ``jax.sharding.Mesh``) is what shardings over an ``AbstractMesh`` and Variables with only
    sharding names are placed on; without it, the mesh set by ``jax.set_mesh``. Concrete shardings are kept.

    Raises ShardingError when a leaf needs a concrete mesh and none is available, or when its abstract mesh has
    other axis names or sizes than the concrete one.

    Example:
        >>> import jax, numpy as np
        >>> from jax.sharding import SingleDeviceSharding
        >>> s = SingleDeviceSharding(jax.devices()[0])
        >>> target = {"model": {"w": jax.ShapeDtypeStruct((4, 2), np.float32, sharding=s)}, "step": 0}
        >>> leaves, unflatten = flatten_target(target)
        >>> [(t.name, t.shape, t.kind) for t in leaves]
        [('model.w', (4, 2), None), ('step', None, None)]
        >>> unflatten(["W", 7])
        {'model': {'w': 'W'}, 'step': 7}
    """
    import jax

    if mesh is not None and not isinstance(mesh, jax.sharding.Mesh):
        raise InvalidArgumentError(
            f"mesh must be a concrete jax.sharding.Mesh, not {type(mesh).__name__}"
            + (" (an AbstractMesh has no devices to place arrays on)" if _is_abstract(mesh) else "")
        )
    variables = _variable_types()

    def is_leaf(x: Any) -> bool:
        return _is_array(x) or (bool(variables) and isinstance(x, variables))

    flat, treedef = jax.tree_util.tree_flatten_with_path(target, is_leaf=is_leaf)
    resolver = _Resolver(mesh)
    leaves: list[TargetLeaf] = []
    # Per top-level leaf: None (a plain leaf, one value) or (variable, inner treedef, number of values).
    groups: list[tuple[Any, Any, int] | None] = []
    for path, leaf in flat:
        name = _path_name(path)
        if variables and isinstance(leaf, variables):
            inner, inner_def = jax.tree_util.tree_flatten_with_path(_variable_value(name, leaf), is_leaf=_is_array)
            for sub, value in inner:
                leaves.append(_variable_leaf(f"{name}.{_path_name(sub)}" if sub else name, leaf, value, resolver))
            groups.append((leaf, inner_def, len(inner)))
        else:
            leaves.append(_plain_leaf(name, leaf, resolver))
            groups.append(None)
    count = len(leaves)

    def unflatten(values: list[Any]) -> Any:
        values = list(values)
        if len(values) != count:
            raise InvalidArgumentError(
                f"unflatten needs one value per target leaf: {count} leaves, {len(values)} values"
            )
        out: list[Any] = []
        i = 0
        for group in groups:
            if group is None:
                out.append(values[i])
                i += 1
                continue
            variable, inner_def, n = group
            out.append(variable.replace(jax.tree_util.tree_unflatten(inner_def, values[i:i + n])))
            i += n
        return jax.tree_util.tree_unflatten(treedef, out)

    return leaves, unflatten


def _variable_value(name: str, variable: Any) -> Any:
    import jax

    value = variable.get_value()
    if any(isinstance(x, jax.sharding.Sharding) for x in jax.tree_util.tree_leaves(value)):
        raise InvalidArgumentError(
            f"target leaf {name!r} is an nnx {_kind(variable)} holding a sharding, not an array spec: give the "
            "abstract state itself (its Variables hold jax.ShapeDtypeStruct), or combine it with the shardings of "
            "nnx.get_named_sharding: jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), "
            "abstract_state, nnx.get_named_sharding(abstract_state, mesh))"
        )
    return value


def _plain_leaf(name: str, leaf: Any, resolver: _Resolver) -> TargetLeaf:
    if not _is_array(leaf):
        return TargetLeaf(name, leaf, None, None, None, None)
    sharding = getattr(leaf, "sharding", None)
    if sharding is not None:
        sharding = resolver.sharding(name, sharding)
    return TargetLeaf(name, leaf, tuple(int(s) for s in leaf.shape), _dtype(leaf.dtype), sharding, None)


def _variable_leaf(name: str, variable: Any, value: Any, resolver: _Resolver) -> TargetLeaf:
    kind = _kind(variable)
    if not _is_array(value):
        return TargetLeaf(name, variable, None, None, None, kind)
    sharding = getattr(value, "sharding", None)
    if sharding is not None:
        sharding = resolver.sharding(name, sharding)
    else:
        sharding = resolver.from_metadata(name, variable)
    return TargetLeaf(name, variable, tuple(int(s) for s in value.shape), _dtype(value.dtype), sharding, kind)


def missing_message(names: list[str], kinds: dict[str, str | None]) -> str:
    """The message for target leaves that neither the checkpoint nor the name mapping provides.

    When some of them are nnx Variables other than ``Param`` (RNG keys and counts, batch statistics...), which a
    PyTorch checkpoint does not hold, the message says how to load only the parameters.

    Example:
        >>> kinds = {"rngs.default.key": "RngKey", "l.kernel": "Param"}
        >>> print(missing_message(["rngs.default.key", "l.kernel"], kinds))  # doctest: +NORMALIZE_WHITESPACE
        2 target leaves are neither in the checkpoint nor in the mapping: 'rngs.default.key', 'l.kernel'. 1 of them
        is an nnx Variable that is not a Param (RngKey): the usual fix is to load only the parameters: `graphdef,
        params, rest = nnx.split(model, nnx.Param, ...)` and pass `params` as the target
    """
    n = len(names)
    shown = ", ".join(repr(x) for x in names[:_LIST_AT_MOST])
    if n > _LIST_AT_MOST:
        shown += f", ... and {n - _LIST_AT_MOST} more"
    text = (f"{n} target leaves are" if n != 1 else "1 target leaf is") + \
        f" neither in the checkpoint nor in the mapping: {shown}"
    other = [kinds.get(x) for x in names if kinds.get(x) not in (None, "Param")]
    if other:
        types = ", ".join(sorted(set(other)))  # type: ignore[arg-type]
        many = len(other) != 1
        text += (f". {len(other)} of them {'are nnx Variables' if many else 'is an nnx Variable'} that "
                 f"{'are' if many else 'is'} not a Param ({types}): the usual fix is to load only the parameters: "
                 "`graphdef, params, rest = nnx.split(model, nnx.Param, ...)` and pass `params` as the target")
    return text


__all__ = ["TargetLeaf", "flatten_target", "key_name", "missing_message"]
