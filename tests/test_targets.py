"""Load targets (jreshard.targets): plain pytrees as before, and flax nnx states with abstract or named shardings.

Expected names, specs and kinds below are written by hand from the model definitions; values come from numpy.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jreshard import errors
from jreshard.targets import TargetLeaf, flatten_target, missing_message
from tests.helpers import REPO_ROOT, child_env

nnx = pytest.importorskip("flax.nnx")

AUTO = (AxisType.Auto, AxisType.Auto)
EXPLICIT = (AxisType.Explicit, AxisType.Explicit)


def _mesh(axis_types=AUTO, reverse=False, shape=(2, 4), names=("data", "model")) -> Mesh:
    devices = jax.devices()[:8]
    if reverse:
        devices = devices[::-1]
    return Mesh(np.array(devices).reshape(shape), names, axis_types=axis_types)


@pytest.fixture(scope="module")
def mesh() -> Mesh:
    return _mesh()


@pytest.fixture(scope="module")
def mesh_rev() -> Mesh:
    """Same axis names and sizes as ``mesh``, other device order: tells which of the two a sharding is over."""
    return _mesh(reverse=True)


_init = nnx.initializers.normal(0.5)


class Model(nnx.Module):
    """Embed -> Linear -> Linear -> RMSNorm; shardings as in the table of ``EXPECTED``."""

    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(32, 8, embedding_init=nnx.with_partitioning(_init, (None, "model")), rngs=rngs)
        self.layers = nnx.List([
            nnx.Linear(8, 16, kernel_init=nnx.with_partitioning(_init, ("data", "model")),
                       bias_init=nnx.with_partitioning(_init, ("model",)), rngs=rngs),
            nnx.Linear(16, 8, kernel_init=nnx.with_partitioning(_init, ("model", None)), bias_init=_init, rngs=rngs),
        ])
        self.norm = nnx.RMSNorm(8, rngs=rngs)

    def __call__(self, ids):
        return self.norm(self.layers[1](self.layers[0](self.embed(ids))))


# name -> (shape, spec), in jax's (sorted key) order.
EXPECTED = {
    "embed.embedding": ((32, 8), P(None, "model")),
    "layers.0.bias": ((16,), P("model")),
    "layers.0.kernel": ((8, 16), P("data", "model")),
    "layers.1.bias": ((8,), P()),
    "layers.1.kernel": ((16, 8), P("model", None)),
    "norm.scale": ((8,), P()),
}


def _abstract(mesh: Mesh, model=Model):
    with jax.set_mesh(mesh):
        return nnx.split(nnx.eval_shape(lambda: model(rngs=nnx.Rngs(0))))


def _names_only_state():
    """An abstract state whose Variables carry sharding names but no sharding (eager sharding off, no mesh)."""
    with nnx.use_eager_sharding(False):
        return nnx.split(nnx.eval_shape(lambda: Model(rngs=nnx.Rngs(0))))


def _check_shardings(leaves: list[TargetLeaf], mesh: Mesh) -> None:
    assert [t.name for t in leaves] == list(EXPECTED)
    for t in leaves:
        shape, spec = EXPECTED[t.name]
        assert t.shape == shape, t.name
        assert t.dtype == np.dtype(np.float32), t.name
        assert t.kind == "Param", t.name
        assert isinstance(t.sharding, NamedSharding), t.name
        assert t.sharding.mesh == mesh and not isinstance(t.sharding.mesh, jax.sharding.AbstractMesh), t.name
        assert t.sharding.is_equivalent_to(NamedSharding(mesh, spec), len(shape)), (t.name, t.sharding.spec, spec)


def _values(leaves: list[TargetLeaf]) -> list[np.ndarray]:
    """Distinct values per leaf, so a value put into the wrong Variable shows."""
    return [((np.arange(np.prod(t.shape), dtype=np.float32).reshape(t.shape) % 7) - 3) / (i + 2)
            for i, t in enumerate(leaves)]


def _placed(leaves: list[TargetLeaf], values: list[np.ndarray]) -> list[jax.Array]:
    return [jax.device_put(v, t.sharding) for t, v in zip(leaves, values)]


def _forward_reference(v: dict[str, np.ndarray], ids: np.ndarray) -> np.ndarray:
    h = v["embed.embedding"][ids]
    h = h @ v["layers.0.kernel"] + v["layers.0.bias"]
    h = h @ v["layers.1.kernel"] + v["layers.1.bias"]
    return h / np.sqrt(np.mean(h * h, axis=-1, keepdims=True) + 1e-6) * v["norm.scale"]


# ---------------------------------------------------------------------------------------------
# names, kinds and shardings of nnx states
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("axis_types", [AUTO, EXPLICIT], ids=["auto", "explicit"])
def test_abstract_state_names_and_shardings_from_set_mesh(axis_types):
    mesh = _mesh(axis_types)
    _, state = _abstract(mesh)
    # eval_shape under set_mesh leaves shardings over an AbstractMesh in the state...
    assert isinstance(state["layers"][0]["kernel"].get_value().sharding.mesh, jax.sharding.AbstractMesh)
    with jax.set_mesh(mesh):
        leaves, _ = flatten_target(state)
    # ...which come out over the concrete mesh, named without the Variables' ".value".
    _check_shardings(leaves, mesh)
    assert leaves[2].leaf is state["layers"][0]["kernel"]


def test_mesh_argument_resolves_and_wins_over_context(mesh, mesh_rev):
    _, state = _abstract(mesh)
    leaves, _ = flatten_target(state, mesh=mesh)  # no mesh in context here
    _check_shardings(leaves, mesh)
    with jax.set_mesh(mesh_rev):
        leaves, _ = flatten_target(state, mesh=mesh)
    _check_shardings(leaves, mesh)


def test_context_mesh_is_the_one_used(mesh, mesh_rev):
    _, state = _abstract(mesh)
    with jax.set_mesh(mesh_rev):
        leaves, _ = flatten_target(state)
    _check_shardings(leaves, mesh_rev)


def test_no_concrete_mesh_is_a_sharding_error(mesh):
    _, state = _abstract(mesh)
    with pytest.raises(errors.ShardingError) as e:
        flatten_target(state)
    msg = str(e.value)
    assert "'embed.embedding'" in msg and "mesh=" in msg and "jax.set_mesh" in msg


@pytest.mark.parametrize("shape,names", [((4, 2), ("data", "model")), ((2, 4), ("x", "model"))], ids=["sizes", "names"])
def test_mismatched_mesh_is_a_sharding_error(mesh, shape, names):
    _, state = _abstract(mesh)
    other = _mesh(shape=shape, names=names)
    with pytest.raises(errors.ShardingError) as e:
        flatten_target(state, mesh=other)
    msg = str(e.value)
    assert "'embed.embedding'" in msg
    assert "'data': 2, 'model': 4" in msg  # the abstract mesh
    assert f"{names[0]!r}: {shape[0]}, {names[1]!r}: {shape[1]}" in msg  # the concrete one
    with jax.set_mesh(other), pytest.raises(errors.ShardingError):
        flatten_target(state)


def test_sharding_names_only(mesh, mesh_rev):
    _, state = _names_only_state()
    kernel = state["layers"][0]["kernel"]
    assert kernel.get_value().sharding is None and kernel.get_metadata("out_sharding") == ("data", "model")
    with pytest.raises(errors.ShardingError, match="mesh="):
        flatten_target(state)
    _check_shardings(flatten_target(state, mesh=mesh)[0], mesh)
    with jax.set_mesh(mesh_rev):
        _check_shardings(flatten_target(state)[0], mesh_rev)


def test_variable_own_mesh_and_mesh_argument(mesh, mesh_rev):
    # (nnx.eval_shape itself would place a Variable that has a mesh: build the names-only state by hand.)
    spec = jax.ShapeDtypeStruct((4, 8), np.float32)
    state = nnx.State({"w": nnx.Param(spec, out_sharding=("data", "model"), mesh=mesh_rev, eager_sharding=False)})
    (leaf,), _ = flatten_target(state)  # the Variable's own mesh, no context needed
    assert leaf.sharding.mesh == mesh_rev and leaf.sharding.spec == P("data", "model")
    (leaf,), _ = flatten_target(state, mesh=mesh)  # mesh= wins
    assert leaf.sharding.mesh == mesh and leaf.sharding.spec == P("data", "model")


def test_sharding_names_through_logical_rules(mesh):
    class Logical(nnx.Module):
        def __init__(self, rngs):
            rules = (("embed", None), ("hidden", "model"))
            self.w = nnx.Param(nnx.with_metadata(_init, sharding_rules=rules, out_sharding=("embed", "hidden"))(
                rngs.params(), (8, 16)))

    with nnx.use_eager_sharding(False):
        _, state = nnx.split(nnx.eval_shape(lambda: Logical(nnx.Rngs(0))))
    (leaf,), _ = flatten_target(state, mesh=mesh)
    assert leaf.name == "w" and leaf.sharding.spec == P(None, "model")


def test_names_that_are_not_mesh_axes(mesh):
    class Bad(nnx.Module):
        def __init__(self, rngs):
            self.w = nnx.Param(jnp.zeros((8, 16)), out_sharding=("tensor", None))

    with nnx.use_eager_sharding(False):
        _, state = nnx.split(nnx.eval_shape(lambda: Bad(nnx.Rngs(0))))
    with pytest.raises(errors.ShardingError, match=r"'w'.*'tensor'"):
        flatten_target(state, mesh=mesh)


def test_abstract_mesh_argument_is_invalid(mesh):
    with pytest.raises(errors.InvalidArgumentError):
        flatten_target({}, mesh=mesh.abstract_mesh)


# ---------------------------------------------------------------------------------------------
# the documented flax patterns
# ---------------------------------------------------------------------------------------------

def test_get_named_sharding_pattern_keeps_concrete_shardings(mesh, mesh_rev):
    """flax guide: jax.tree.map(lambda a, s: ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abs_state,
    nnx.get_named_sharding(abs_state, mesh))."""
    _, abs_state = _names_only_state()
    combined = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abs_state, nnx.get_named_sharding(abs_state, mesh_rev))
    with jax.set_mesh(mesh):  # a concrete sharding is kept, whatever the context mesh
        leaves, _ = flatten_target(combined, mesh=mesh)
    _check_shardings(leaves, mesh_rev)
    # The sharding tree alone is not a target; the error says how to combine it.
    with pytest.raises(errors.InvalidArgumentError, match="get_named_sharding"):
        flatten_target(nnx.get_named_sharding(abs_state, mesh))


def test_get_abstract_model(mesh):
    graphdef, abs_state = nnx.get_abstract_model(lambda: Model(rngs=nnx.Rngs(0)), mesh)
    leaves, unflatten = flatten_target(abs_state)  # concrete already: no mesh needed
    _check_shardings(leaves, mesh)
    values = _values(leaves)
    model = nnx.merge(graphdef, unflatten(_placed(leaves, values)))
    np.testing.assert_array_equal(np.asarray(model.layers[1].kernel[...]), values[4])


def test_unflatten_merge_gives_the_model(mesh):
    graphdef, state = _abstract(mesh)
    with jax.set_mesh(mesh):
        leaves, unflatten = flatten_target(state)
    values = _values(leaves)
    arrays = _placed(leaves, values)
    result = unflatten(arrays)
    assert isinstance(result, nnx.State)
    # Each value is back in a Variable of the target's type, with the target Variable's metadata.
    kernel = result["layers"][0]["kernel"]
    assert type(kernel) is nnx.Param and kernel.get_metadata("out_sharding") == ("data", "model")
    assert kernel.get_value() is arrays[2]
    model = nnx.merge(graphdef, result)
    by_name = dict(zip(EXPECTED, values))
    got = {
        "embed.embedding": model.embed.embedding, "layers.0.bias": model.layers[0].bias,
        "layers.0.kernel": model.layers[0].kernel, "layers.1.bias": model.layers[1].bias,
        "layers.1.kernel": model.layers[1].kernel, "norm.scale": model.norm.scale,
    }
    for name, var in got.items():
        assert type(var) is nnx.Param, name
        np.testing.assert_array_equal(np.asarray(var[...]), by_name[name], err_msg=name)
        shape, spec = EXPECTED[name]
        assert var[...].sharding.is_equivalent_to(NamedSharding(mesh, spec), len(shape)), name
    # Metadata is kept.
    assert model.layers[0].kernel.get_metadata("out_sharding") == ("data", "model")
    ids = np.array([[1, 5, 31], [0, 2, 7]])
    with jax.set_mesh(mesh):
        out = model(jnp.asarray(ids))
    np.testing.assert_allclose(np.asarray(out), _forward_reference(by_name, ids), rtol=1e-4, atol=1e-5)


def test_unflatten_then_update_a_live_model(mesh):
    _, state = _abstract(mesh)
    with jax.set_mesh(mesh):
        leaves, unflatten = flatten_target(state)
        live = Model(rngs=nnx.Rngs(1))
    values = _values(leaves)
    nnx.update(live, unflatten(_placed(leaves, values)))
    np.testing.assert_array_equal(np.asarray(live.embed.embedding[...]), values[0])
    np.testing.assert_array_equal(np.asarray(live.layers[0].bias[...]), values[1])
    np.testing.assert_array_equal(np.asarray(live.norm.scale[...]), values[5])
    with pytest.raises(errors.InvalidArgumentError):
        unflatten(values[:-1])


def test_live_state_as_target(mesh):
    with jax.set_mesh(mesh):
        live = Model(rngs=nnx.Rngs(1))
    state = nnx.state(live)
    leaves, unflatten = flatten_target(state)  # concrete arrays: their own shardings, no mesh needed
    _check_shardings(leaves, mesh)
    assert leaves[0].sharding is live.embed.embedding[...].sharding
    values = _values(leaves)
    nnx.update(live, unflatten(_placed(leaves, values)))
    np.testing.assert_array_equal(np.asarray(live.layers[1].kernel[...]), values[4])


class Stateful(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.lin = nnx.Linear(4, 8, kernel_init=nnx.with_partitioning(_init, (None, "model")), rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)


STATEFUL_KINDS = {
    "bn.bias": "Param", "bn.mean": "BatchStat", "bn.scale": "Param", "bn.var": "BatchStat",
    "drop.rngs.count": "RngCount", "drop.rngs.key": "RngKey",
    "lin.bias": "Param", "lin.kernel": "Param",
}


def test_kinds_of_rng_and_batch_stat_variables(mesh):
    graphdef, state = _abstract(mesh, Stateful)
    with jax.set_mesh(mesh):
        leaves, _ = flatten_target(state)
    assert {t.name: t.kind for t in leaves} == STATEFUL_KINDS
    key = next(t for t in leaves if t.name == "drop.rngs.key")
    assert key.shape == () and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    # The usual fix: load only the parameters, merge with the rest.
    graphdef, params, rest = nnx.split(nnx.merge(graphdef, state), nnx.Param, ...)
    with jax.set_mesh(mesh):
        leaves, unflatten = flatten_target(params)
    assert [t.name for t in leaves] == ["bn.bias", "bn.scale", "lin.bias", "lin.kernel"]
    values = _values(leaves)
    model = nnx.merge(graphdef, unflatten(_placed(leaves, values)), rest)
    np.testing.assert_array_equal(np.asarray(model.lin.kernel[...]), values[3])
    assert type(model.bn.mean) is nnx.BatchStat


# ---------------------------------------------------------------------------------------------
# plain pytrees: jax's key paths joined with dots, as before nnx states were targets
# ---------------------------------------------------------------------------------------------

Pair = collections.namedtuple("Pair", ["first", "second"])


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Box:
    inner: object
    extra: object


class Opaque:
    """Registered without keys: its children get FlattenedIndexKey paths."""

    def __init__(self, a, b):
        self.a, self.b = a, b


jax.tree_util.register_pytree_node(Opaque, lambda o: ((o.a, o.b), None), lambda _, c: Opaque(*c))


def test_plain_pytrees_as_before(mesh):
    sds = lambda *shape: jax.ShapeDtypeStruct(shape, np.float32, sharding=NamedSharding(mesh, P()))
    array = jax.device_put(np.ones((2, 4), np.float32), NamedSharding(mesh, P("data", "model")))
    target = {
        "model": {"embed": {"weight": sds(4, 2)}, "layers": [sds(3), (sds(1, 2), array)]},
        "pair": Pair(sds(5), Box(inner=sds(6), extra={"z": sds(7)})),
        "opaque": Opaque(sds(8), sds(9)),
        "step": 100,
        "plain_sds": jax.ShapeDtypeStruct((2,), np.int32),
    }
    leaves, unflatten = flatten_target(target)
    names = [t.name for t in leaves]
    assert names == [
        "model.embed.weight", "model.layers.0", "model.layers.1.0", "model.layers.1.1",
        "opaque.0", "opaque.1", "pair.first", "pair.second.inner", "pair.second.extra.z", "plain_sds", "step",
    ]
    # jax's paths, with array specs as leaves.
    flat, treedef = jax.tree_util.tree_flatten_with_path(
        target, is_leaf=lambda x: isinstance(x, (jax.ShapeDtypeStruct, jax.Array)))
    assert len(leaves) == len(flat) and all(t.leaf is leaf for t, (_, leaf) in zip(leaves, flat))
    assert all(t.kind is None for t in leaves)
    by = {t.name: t for t in leaves}
    assert by["step"].shape is None and by["step"].sharding is None and by["step"].dtype is None
    assert by["plain_sds"].shape == (2,) and by["plain_sds"].sharding is None and by["plain_sds"].dtype == np.int32
    assert by["model.layers.1.1"].sharding is array.sharding
    assert by["model.embed.weight"].sharding is target["model"]["embed"]["weight"].sharding
    values = [f"v{i}" for i in range(len(leaves))]
    rebuilt = unflatten(values)
    assert jax.tree_util.tree_structure(rebuilt) == treedef
    assert jax.tree_util.tree_leaves(rebuilt) == values
    assert rebuilt["pair"].second.extra["z"] == "v8" and rebuilt["step"] == "v10"


def test_plain_abstract_sharding_resolves(mesh, mesh_rev):
    abstract = NamedSharding(mesh.abstract_mesh, P("data", "model"))
    target = {"w": jax.ShapeDtypeStruct((4, 8), np.float32, sharding=abstract)}
    with jax.set_mesh(mesh_rev):
        (leaf,), _ = flatten_target(target)
    assert leaf.sharding.mesh == mesh_rev and leaf.sharding.spec == P("data", "model")


def test_works_without_flax():
    code = r'''
import importlib.abc, json, sys
class _NoFlax(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "flax" or name.startswith("flax."):
            raise ImportError("flax is blocked in this test")
sys.meta_path.insert(0, _NoFlax())
import numpy as np, jax
import jreshard, jreshard.targets
from jax.sharding import SingleDeviceSharding
s = SingleDeviceSharding(jax.devices()[0])
target = {"a": {"b": jax.ShapeDtypeStruct((2,), np.float32, sharding=s)}, "n": 1}
leaves, unflatten = jreshard.targets.flatten_target(target)
print(json.dumps({"names": [t.name for t in leaves], "out": unflatten([5, 6]),
                  "flax": any(m == "flax" or m.startswith("flax.") for m in sys.modules)}))
'''
    proc = subprocess.run([sys.executable, "-c", code], env=child_env(JAX_PLATFORMS="cpu"), cwd=str(REPO_ROOT),
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got == {"names": ["a.b", "n"], "out": {"a": {"b": 5}, "n": 6}, "flax": False}


# ---------------------------------------------------------------------------------------------
# missing_message
# ---------------------------------------------------------------------------------------------

def test_missing_message_plain():
    msg = missing_message(["a.w", "b"], {"a.w": None})
    assert msg == "2 target leaves are neither in the checkpoint nor in the mapping: 'a.w', 'b'"
    one = missing_message(["x"], {"x": "Param"})
    assert one == "1 target leaf is neither in the checkpoint nor in the mapping: 'x'"


def test_missing_message_hints_at_params_only():
    names = ["rngs.default.key", "rngs.default.count", "bn.mean", "lin.kernel"]
    kinds = {"rngs.default.key": "RngKey", "rngs.default.count": "RngCount", "bn.mean": "BatchStat",
             "lin.kernel": "Param"}
    msg = missing_message(names, kinds)
    assert msg.startswith("4 target leaves are neither in the checkpoint nor in the mapping: 'rngs.default.key', "
                          "'rngs.default.count', 'bn.mean', 'lin.kernel'")
    assert "3 of them are nnx Variables that are not a Param (BatchStat, RngCount, RngKey)" in msg
    assert "`graphdef, params, rest = nnx.split(model, nnx.Param, ...)` and pass `params` as the target" in msg


def test_missing_message_lists_at_most_ten():
    names = [f"t{i}" for i in range(13)]
    msg = missing_message(names, {})
    assert msg.startswith("13 target leaves are")
    assert "'t9', ... and 3 more" in msg and "'t10'" not in msg
    assert "nnx.split" not in msg


def test_with_warnings_as_errors(mesh):
    """flatten_target itself emits no deprecation warnings (e.g. from flax's deprecated ``sharding_names``)."""
    _, state = _names_only_state()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        flatten_target(state, mesh=mesh)
