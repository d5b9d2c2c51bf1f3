"""Reading and loading real DCP checkpoints (written by torch) and comparing with torch's own reading."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from tests import torch_writers as tw
from tests.helpers import (
    SPECS,
    MESH_SHAPES,
    assert_same,
    box_nbytes,
    check_loaded_array,
    distinct_indices,
    flatten,
    make_mesh,
    nest,
    spec_fits,
)

import jreshard

VARIANTS = tw.VARIANTS
IOS = ("posix", "tensorstore")
VARIANT_NAMES = [(v, t.name) for v in VARIANTS for t in tw.tensors_for(v)]


@pytest.fixture(scope="module")
def opened(checkpoints):
    """One jreshard Checkpoint per variant (opened once)."""
    cache = {}

    def get(variant):
        if variant not in cache:
            cache[variant] = jreshard.open(checkpoints.dirs[variant])
        return cache[variant]

    return get


@pytest.fixture(scope="module")
def meshes():
    assert len(jax.devices()) == 8, jax.devices()
    return {k: make_mesh(k) for k in MESH_SHAPES}


# ---------------------------------------------------------------------------------------------
# the fixture itself: torch's reading equals what the writer built
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", tw.TORCH_READABLE_VARIANTS)
def test_torch_reference_matches_writer(checkpoints, variant):
    tref = checkpoints.torch_reference[variant]
    assert sorted(tref) == sorted(checkpoints.names[variant])
    for name, arr in tref.items():
        assert_same(arr, checkpoints.writer_reference[name], f"{variant}:{name}")
    assert checkpoints.torch_objects[variant] == tw.OBJECTS_FLAT


# ---------------------------------------------------------------------------------------------
# catalog: tensors and objects
# ---------------------------------------------------------------------------------------------


def _torch_metadata(path):
    import torch  # noqa: F401  (the pickle refers to torch classes)

    with open(path / ".metadata", "rb") as f:
        return pickle.load(f)


@pytest.mark.parametrize("variant", VARIANTS)
def test_tensor_catalog_matches_torch_metadata(checkpoints, opened, variant):
    import torch
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = _torch_metadata(checkpoints.dirs[variant])
    ck = opened(variant)
    expected = {k: v for k, v in md.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}
    assert set(ck.tensors) == set(expected) == set(checkpoints.names[variant])
    for name, tmeta in expected.items():
        info = ck.tensors[name]
        spec = tw.TENSORS_BY_NAME[name]
        assert info.name == name
        assert tuple(info.shape) == tuple(tmeta.size) == spec.shape, name
        assert np.dtype(info.dtype) == tw.np_dtype(spec.dtype), (name, info.dtype)
        assert tmeta.properties.dtype == getattr(torch, spec.dtype)
        got = {(tuple(c.offsets), tuple(c.sizes)) for c in info.chunks if all(s > 0 for s in c.sizes)}
        want = {(tuple(c.offsets), tuple(c.sizes)) for c in tmeta.chunks if all(s > 0 for s in c.sizes)}
        assert got == want, name
        # every chunk jreshard lists is one torch wrote
        allc = {(tuple(c.offsets), tuple(c.sizes)) for c in tmeta.chunks}
        assert {(tuple(c.offsets), tuple(c.sizes)) for c in info.chunks} <= allc, name


@pytest.mark.parametrize("variant", VARIANTS)
def test_objects(checkpoints, opened, variant):
    objs = dict(opened(variant).objects)
    assert objs == tw.OBJECTS_FLAT
    assert type(objs["step"]) is int and type(objs["sched.lr"]) is float and type(objs["sched.ms"]) is list
    if variant in checkpoints.torch_objects:
        assert objs == checkpoints.torch_objects[variant]


def test_objects_not_in_tensors(opened):
    ck = opened("plain")
    for k in tw.OBJECTS_FLAT:
        assert k not in ck.tensors


# ---------------------------------------------------------------------------------------------
# read(): whole tensors and sub-boxes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant,name", VARIANT_NAMES, ids=[f"{v}-{n}" for v, n in VARIANT_NAMES])
def test_read_whole(checkpoints, opened, variant, name):
    ref = checkpoints.reference(variant)[name]
    got = opened(variant).read(name)
    assert isinstance(got, np.ndarray)
    assert_same(got, ref, f"{variant}:{name}")


def _random_boxes(shape, seed, n=4):
    rng = np.random.default_rng(seed)
    boxes = [tuple(slice(None) for _ in shape)]
    for _ in range(n):
        box = []
        for d in shape:
            a = int(rng.integers(0, d + 1))
            b = int(rng.integers(a, d + 1))
            box.append(slice(a, b))
        boxes.append(tuple(box))
    # a box cut at 1 element from each end, when possible
    boxes.append(tuple(slice(1, d - 1) if d > 2 else slice(0, d) for d in shape))
    return boxes


@pytest.mark.parametrize("variant", VARIANTS)
def test_read_boxes(checkpoints, opened, variant):
    ck = opened(variant)
    refs = checkpoints.reference(variant)
    for i, name in enumerate(sorted(checkpoints.names[variant])):
        ref = refs[name]
        for box in _random_boxes(ref.shape, seed=1000 + i):
            got = ck.read(name, box)
            assert_same(got, ref[box], f"{variant}:{name}[{box}]")


def test_read_box_reads_only_needed_bytes(checkpoints):
    """A row band of a large saved tensor: bytes read from storage stay close to the band's size."""
    ck = jreshard.open(checkpoints.dirs["plain"])
    ref = checkpoints.reference("plain")["mp.a"]  # (512, 512) float32, Shard(0) over 4 -> 4 x 128 rows
    box = (slice(100, 356), slice(None))  # spans three saved chunks
    before = ck.io_stats.bytes_read
    got = ck.read("mp.a", box)
    delta = ck.io_stats.bytes_read - before
    assert_same(got, ref[box], "mp.a band")
    needed = box_nbytes(box, ref.shape, ref.itemsize)
    assert needed <= delta <= 1.1 * needed, (delta, needed)
    assert ck.io_stats.num_reads >= 1


# ---------------------------------------------------------------------------------------------
# load(): many shardings, both I/O back-ends
# ---------------------------------------------------------------------------------------------


def _targets(checkpoints, variant, mesh, spec, include_big=False):
    refs = checkpoints.reference(variant)
    mesh_shape = dict(zip(mesh.axis_names, mesh.devices.shape))
    out = {}
    for name in checkpoints.names[variant]:
        if tw.TENSORS_BY_NAME[name].big and not include_big:
            continue
        ref = refs[name]
        if spec_fits(spec, ref.shape, mesh_shape):
            out[name] = jax.ShapeDtypeStruct(ref.shape, ref.dtype, sharding=NamedSharding(mesh, spec))
    return out


def _spec_axes(spec):
    out = set()
    for a in spec:
        if a is not None:
            out.update(a if isinstance(a, tuple) else (a,))
    return out


# (mesh, spec) pairs whose axis names exist in the mesh
MESH_SPECS = [(m, s) for m in MESH_SHAPES for s in SPECS if _spec_axes(SPECS[s]) <= set(MESH_SHAPES[m][1])]


@pytest.mark.parametrize("mesh_key,spec_key", MESH_SPECS, ids=[f"{m}-{s}" for m, s in MESH_SPECS])
@pytest.mark.parametrize("io", IOS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_load_flat(checkpoints, meshes, variant, io, mesh_key, spec_key):
    mesh = meshes[mesh_key]
    targets = _targets(checkpoints, variant, mesh, SPECS[spec_key])
    if not targets:
        pytest.skip("no tensor of this checkpoint tiles evenly with this spec")
    out = jreshard.load(checkpoints.dirs[variant], targets, io=io)
    assert isinstance(out, dict) and set(out) == set(targets)
    refs = checkpoints.reference(variant)
    for name, t in targets.items():
        check_loaded_array(out[name], t, refs[name], f"{variant}/{io}/{mesh_key}/{spec_key}:{name}")


@pytest.mark.parametrize("io", IOS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_load_nested(checkpoints, meshes, variant, io):
    mesh = meshes["2x4"]
    flat = _targets(checkpoints, variant, mesh, P("data"))
    flat.update(_targets(checkpoints, variant, mesh, P()))  # 0-d and odd shapes replicated
    nested = nest(flat)
    assert "model" in nested and "layers" in nested["model"] and "0" in nested["model"]["layers"]
    out = jreshard.load(checkpoints.dirs[variant], nested, io=io)
    assert isinstance(out, dict) and set(out) == set(nested)
    assert isinstance(out["model"]["layers"]["0"], dict)
    got = flatten(out)
    assert set(got) == set(flat)
    refs = checkpoints.reference(variant)
    for name, t in flat.items():
        check_loaded_array(got[name], t, refs[name], f"nested {variant}/{io}:{name}")


def test_load_via_checkpoint_object(checkpoints, meshes):
    ck = jreshard.open(checkpoints.dirs["threads"])
    mesh = meshes["4x2"]
    targets = _targets(checkpoints, "threads", mesh, P("data", "model"))
    out = ck.load(targets)
    refs = checkpoints.reference("threads")
    for name, t in targets.items():
        check_loaded_array(out[name], t, refs[name], f"Checkpoint.load:{name}")
    assert ck.io_stats.bytes_read > 0 and ck.io_stats.num_reads > 0


@pytest.mark.parametrize("io", IOS)
@pytest.mark.parametrize("variant", ["plain", "zstd", "safetensors"])
def test_load_onto_jax_array_targets(checkpoints, meshes, variant, io):
    mesh = meshes["2x4"]
    sds = _targets(checkpoints, variant, mesh, P(None, "model"))
    targets = {n: jax.device_put(np.zeros(t.shape, t.dtype), t.sharding) for n, t in sds.items()}
    out = jreshard.load(checkpoints.dirs[variant], targets, io=io)
    refs = checkpoints.reference(variant)
    for name, t in targets.items():
        check_loaded_array(out[name], t, refs[name], f"array target {variant}:{name}")


@pytest.mark.parametrize("io", IOS)
def test_load_big_tensors_several_shardings(checkpoints, meshes, io):
    refs = checkpoints.reference("plain")
    mesh = meshes["2x4"]
    specs = [P("data", "model"), P(None, ("model", "data")), P("model"), P()]
    targets = {}
    for i, name in enumerate(n for n in checkpoints.names["plain"] if tw.TENSORS_BY_NAME[n].big):
        targets[name] = jax.ShapeDtypeStruct(refs[name].shape, refs[name].dtype,
                                             sharding=NamedSharding(mesh, specs[i % len(specs)]))
    out = jreshard.load(checkpoints.dirs["plain"], targets, io=io, max_inflight_bytes=256 * 1024)
    for name, t in targets.items():
        check_loaded_array(out[name], t, refs[name], f"big {io}:{name}")


CASTS = [
    ("model.embed", np.float32),  # bf16 -> f32
    ("d1.s1_3d", np.float32),  # bf16 -> f32
    ("plain.odd", np.float32),  # f16 -> f32
    ("dtypes.sharded.bfloat16", np.float64),  # bf16 -> f64
    ("dtypes.sharded.float16", np.float32),
    ("dtypes.sharded.int8", np.int32),
    ("dtypes.sharded.float8_e4m3fn", np.float32),
    ("dtypes.sharded.float8_e5m2", np.float32),
]


@pytest.mark.parametrize("io", IOS)
@pytest.mark.parametrize("variant", ["plain", "safetensors", "zstd"])
def test_load_with_dtype_cast(checkpoints, meshes, variant, io):
    import ml_dtypes

    refs = checkpoints.reference(variant)
    mesh = meshes["4x2"]
    targets = {}
    for name, dt in CASTS:
        ref = refs[name]
        spec = P("data") if ref.ndim and ref.shape[0] % 4 == 0 else P()
        targets[name] = jax.ShapeDtypeStruct(ref.shape, np.dtype(dt), sharding=NamedSharding(mesh, spec))
    # f32 -> bf16 (round to nearest even, as ml_dtypes does)
    ref = refs["d1.s0"]
    targets["d1.s0"] = jax.ShapeDtypeStruct(ref.shape, ml_dtypes.bfloat16, sharding=NamedSharding(mesh, P("data")))
    out = jreshard.load(checkpoints.dirs[variant], targets, io=io, cast="unsafe")  # lossy casts among them
    for name, t in targets.items():
        assert refs[name].dtype != np.dtype(t.dtype)
        check_loaded_array(out[name], t, refs[name], f"cast {variant}:{name} -> {np.dtype(t.dtype)}")


@pytest.mark.parametrize("io", ["auto", "posix", "tensorstore"])
def test_io_argument_values(checkpoints, meshes, io):
    refs = checkpoints.reference("zstd")
    t = {"d2.s0s1": jax.ShapeDtypeStruct((16, 24), np.float32, sharding=NamedSharding(meshes["2x4"], P("data", "model")))}
    out = jreshard.load(str(checkpoints.dirs["zstd"]), t, io=io)
    check_loaded_array(out["d2.s0s1"], t["d2.s0s1"], refs["d2.s0s1"], f"io={io}")


def test_load_accepts_pathlike_and_str(checkpoints, meshes):
    refs = checkpoints.reference("plain")
    t = {"d1.s0": jax.ShapeDtypeStruct((16, 12), np.float32, sharding=NamedSharding(meshes["8"], P("data")))}
    for p in (checkpoints.dirs["plain"], str(checkpoints.dirs["plain"])):
        out = jreshard.load(p, t)
        check_loaded_array(out["d1.s0"], t["d1.s0"], refs["d1.s0"], f"path {type(p).__name__}")


def test_load_with_progress_and_small_inflight(checkpoints, meshes, capsys):
    refs = checkpoints.reference("plain")
    targets = _targets(checkpoints, "plain", meshes["2x4"], P("data"))
    out = jreshard.load(checkpoints.dirs["plain"], targets, max_inflight_bytes=4096, progress=True)
    for name, t in targets.items():
        check_loaded_array(out[name], t, refs[name], f"progress:{name}")


# ---------------------------------------------------------------------------------------------
# plan(): inspected without loading
# ---------------------------------------------------------------------------------------------


def test_plan_single_process(checkpoints, meshes):
    refs = checkpoints.reference("plain")
    mesh = meshes["8"]
    # no replication: every device holds a distinct box
    targets = {
        n: jax.ShapeDtypeStruct(refs[n].shape, refs[n].dtype, sharding=NamedSharding(mesh, P("data")))
        for n in ("mp.a", "mp.b", "mp.c", "mp.e")
    }
    plan = jreshard.plan(checkpoints.dirs["plain"], targets)
    needed = sum(
        box_nbytes(idx, refs[n].shape, refs[n].itemsize)
        for n, t in targets.items()
        for idx in distinct_indices(t.sharding, t.shape)
    )
    full = sum(refs[n].nbytes for n in targets)
    assert needed == full
    assert plan.bytes_needed == needed
    assert needed <= plan.bytes_to_read <= 1.1 * needed
    assert plan.num_reads >= 1
    assert set(plan.processes) == {0}
    p0 = plan.processes[0]
    assert (p0.bytes_needed, p0.bytes_to_read, p0.num_reads) == (plan.bytes_needed, plan.bytes_to_read, plan.num_reads)
    text = str(plan)
    assert isinstance(text, str) and text.strip()


def test_plan_replicated_counts_each_box_once(checkpoints, meshes):
    """A box held by several devices of one process (here: replicated over 'data') is read once."""
    refs = checkpoints.reference("plain")
    mesh = meshes["2x4"]
    t = {"mp.a": jax.ShapeDtypeStruct((512, 512), np.float32, sharding=NamedSharding(mesh, P(None, "model")))}
    plan = jreshard.plan(checkpoints.dirs["plain"], t)
    distinct = sum(box_nbytes(i, (512, 512), 4) for i in distinct_indices(t["mp.a"].sharding, (512, 512)))
    assert distinct == refs["mp.a"].nbytes
    assert plan.bytes_needed == distinct  # not once per device: that would be 2x here
    assert distinct <= plan.bytes_to_read <= 1.1 * distinct


# ---------------------------------------------------------------------------------------------
# read(): property-based sub-boxes (hypothesis, derandomized so runs are reproducible)
# ---------------------------------------------------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_HYP_NAMES = ["d2.s0s0_uneven", "d1.s2_3d", "d2.uneven_s0s1", "d1.empty_s0", "dtypes.uneven.complex128", "mp.b"]


@st.composite
def _name_and_box(draw):
    name = draw(st.sampled_from(_HYP_NAMES))
    box = []
    for d in tw.TENSORS_BY_NAME[name].shape:
        a = draw(st.integers(0, d))
        b = draw(st.integers(a, d))
        box.append(slice(a, b))
    return name, tuple(box)


@pytest.mark.parametrize("variant", ["plain", "zstd", "threads"])
def test_read_boxes_property(checkpoints, opened, variant):
    ck = opened(variant)
    refs = checkpoints.reference(variant)

    @settings(max_examples=40, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(_name_and_box())
    def check(name_box):
        name, box = name_box
        if name not in refs:
            return
        assert_same(ck.read(name, box), refs[name][box], f"{variant}:{name}[{box}]")

    check()
