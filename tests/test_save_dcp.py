"""jreshard.save_dcp: JAX arrays saved as a DCP checkpoint that torch's dcp.load reads (one process, and 4 gloo
ranks onto another sharding), that jreshard reads back, written by one JAX process or by 4 together.

The checkpoints are written once per module (``saved``), then read by torch in two subprocesses
(``tests/mp_save_child.py``): one single-process ``dcp.load(no_dist=True)`` of every checkpoint and one 4-rank
job. Every comparison is byte-exact against the numpy arrays the JAX arrays were made from.
"""

from __future__ import annotations

import importlib
import io
import json
import os
import pickletools
import random
import re
import struct
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

import jreshard
from jreshard import save_dcp
from jreshard.errors import InvalidArgumentError, JReshardError
from tests import mp_save_child as child
from tests.helpers import (
    REPO_ROOT,
    TESTS_DIR,
    assert_same,
    child_env,
    distinct_indices,
    make_mesh,
    run_jax_processes,
)
from tests.torch_writers import free_port

SAVE = importlib.import_module("jreshard.write_dcp")
TP = importlib.import_module("jreshard.torchpickle")

ALL_DTYPES = ("float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
              "float8_e5m2fnuz", "float8_e8m0fnu", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
              "uint64", "bool", "complex64", "complex128")
MESH_AXES = {"2x4": {"data": 2, "model": 4}, "8": {"data": 8}, "4x2": {"data": 4, "model": 2}}
OBJECTS = {"step": 7, "sched.lr": 0.1, "sched.name": "cosine", "flag": True}
NPROC = 4


# ---------------------------------------------------------------------------------------------
# the trees


def _put(ref: np.ndarray, sharding) -> jax.Array:
    return jax.make_array_from_callback(ref.shape, sharding, lambda idx: ref[idx])


def _named(mesh_key: str, *spec) -> NamedSharding:
    return NamedSharding(make_mesh(mesh_key), P(*spec))


def main_tree() -> tuple[dict, dict, list]:
    """(tree, {fqn: reference array}, [fqns that the 4-rank torch job loads as plain tensors])."""
    mk = child.make_array
    layouts = {
        "shard.rows": ((32, 6), "float32", _named("8", "data")),
        "shard.cols": ((6, 32), "float32", _named("8", None, "data")),
        "shard.partial_rep": ((16, 12), "bfloat16", _named("2x4", "data", None)),  # replicated over 'model'
        "shard.rep": ((5, 7), "float16", _named("2x4")),  # replicated on 8 devices
        "shard.2d_T": ((8, 16), "float32", _named("4x2", "model", "data")),
        "shard.multi_axis": ((16, 4), "float32", _named("2x4", ("data", "model"))),
        "shard.3d": ((4, 8, 6), "int32", _named("2x4", None, "model", "data")),
        "shard.one_device": ((3, 5), "float64", SingleDeviceSharding(jax.devices()[3])),
        "empty.rows": ((0, 8), "float32", _named("2x4", None, "model")),
        "empty.mid": ((4, 0, 2), "bfloat16", _named("2x4")),
        "empty.vec": ((0,), "int64", _named("8", "data")),
        "scalar.f32": ((), "float32", SingleDeviceSharding(jax.devices()[5])),
        "scalar.rep": ((), "bfloat16", _named("2x4")),
    }
    for dt in ALL_DTYPES:
        layouts[f"dtypes.{dt}"] = ((16, 8), dt, _named("2x4", "data", "model"))
        layouts[f"scalars.{dt}"] = ((), dt, _named("4x2"))
    refs: dict = {}
    flat: dict = {}
    for name, (shape, dt, sharding) in layouts.items():
        refs[name] = mk(name, shape, dt)
        flat[name] = _put(refs[name], sharding)
    special = np.array([np.nan, np.inf, -np.inf, -0.0, 0.0, 1e-45, -3.5, 65504.0], np.float32)
    refs["special.f32"] = special
    flat["special.f32"] = _put(special, _named("8", "data"))
    tree: dict = {k: v for k, v in flat.items()}
    # nested containers: dicts and a list of dicts, flattened to model.layers.<i>.<w|b>
    layers = []
    for i in range(2):
        w, b = mk(f"model.layers.{i}.w", (8, 12), "bfloat16"), mk(f"model.layers.{i}.b", (12,), "float32")
        refs[f"model.layers.{i}.w"], refs[f"model.layers.{i}.b"] = w, b
        layers.append({"w": _put(w, _named("2x4", "data", "model")), "b": _put(b, _named("2x4", "model"))})
    tree["model"] = {"layers": layers, "embed": _put(mk("model.embed", (10, 4), "float32"), _named("2x4"))}
    refs["model.embed"] = mk("model.embed", (10, 4), "float32")
    # numpy leaves
    refs["numpy.arr"] = mk("numpy.arr", (3, 4), "float16")
    refs["numpy.scalar"] = np.asarray(np.float32(2.5))
    tree["numpy"] = {"arr": refs["numpy.arr"], "scalar": np.float32(2.5)}
    # objects
    tree["step"] = OBJECTS["step"]
    tree["sched"] = {"lr": OBJECTS["sched.lr"], "name": OBJECTS["sched.name"]}
    tree["flag"] = OBJECTS["flag"]
    plain = ["shard.rep", "model.embed", "empty.mid"]
    return tree, refs, plain


def random_tree(seed: int = 1234, count: int = 30) -> tuple[dict, dict]:
    """Random shapes, dtypes and shardings (every sharded dimension divides evenly, as NamedSharding needs)."""
    rng = random.Random(seed)
    tree, refs = {}, {}
    for i in range(count):
        ndim = rng.choice([0, 1, 2, 2, 3])
        shape = tuple(rng.choice([0, 1, 2, 3, 4, 6, 8, 12, 16]) for _ in range(ndim))
        dt = rng.choice(ALL_DTYPES)
        mesh_key = rng.choice(list(MESH_AXES))
        free = list(MESH_AXES[mesh_key])
        spec = []
        for d in shape:
            opts = [None] + [a for a in free if d % MESH_AXES[mesh_key][a] == 0]
            pick = rng.choice(opts)
            if pick is not None:
                free.remove(pick)
            spec.append(pick)
        name = f"r{i:02d}_{dt}"
        refs[name] = child.make_array(name, shape, dt)
        tree[name] = _put(refs[name], _named(mesh_key, *spec))
    return tree, refs


def _shape_dtypes(refs: dict) -> dict:
    return {n: [list(a.shape), TP.torch_dtype_name(a.dtype)] for n, a in refs.items()}


# ---------------------------------------------------------------------------------------------
# running the subprocesses


def _run(args: list, env: dict, what: str, timeout: float = 300) -> dict:
    result = Path(args[-1])
    proc = subprocess.run([sys.executable, str(TESTS_DIR / "mp_save_child.py"), *args], check=False, env=env, cwd=str(REPO_ROOT),
                          capture_output=True, text=True, timeout=timeout)
    res = json.loads(result.read_text()) if result.exists() else {}
    assert proc.returncode == 0 and res.get("ok"), (
        f"{what} failed (rc={proc.returncode}):\n{res.get('traceback', '')}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )
    return res


def _run_jax_writers(ckpt: Path, tmp: Path) -> list[dict]:
    port = free_port()
    return run_jax_processes("mp_save_child.py", lambda i, out: ["jax-writer", str(ckpt), str(port), str(i), str(NPROC),
                                                                 str(out)], tmp, NPROC, 300, JAX_ENABLE_X64=1)


@dataclass
class Saved:
    root: Path
    refs: dict  # checkpoint name -> {fqn: reference}
    objects: dict  # checkpoint name -> {fqn: value}
    plain: dict  # checkpoint name -> [fqns loaded as plain tensors by the 4-rank job]
    writers: list  # results of the 4 JAX writer processes
    chunk_counts: dict  # fqn -> distinct shards of the main tree's jax arrays
    torch_single: dict  # torch-load result (its own data.pkl per dtype, ...)

    def ckpt(self, name: str) -> Path:
        return self.root / name

    def torch_out(self, name: str) -> Path:
        return self.root / "torch1" / name

    def torch4_out(self, name: str) -> Path:
        return self.root / "torch4" / name


@pytest.fixture(scope="module")
def saved(tmp_path_factory, llama_checkpoints) -> Saved:
    root = tmp_path_factory.mktemp("save_dcp")
    # 1. four JAX processes write one checkpoint together (before this process makes its own arrays)
    writers = _run_jax_writers(root / "multi", root)
    mp_refs = {n: a for n, (a, _) in child.mp_reference().items()}
    mp_refs.update({n: child.make_array(n, s, d) for n, (s, d) in child.MP_NUMPY.items()})
    # 2. this process: the main tree, a random one, and one whose archives all use zip64 fields
    tree, refs, plain = main_tree()
    save_dcp(tree, root / "main")
    rtree, rrefs = random_tree()
    save_dcp(rtree, root / "random")
    ztree = {k: tree[k] for k in ("shard.rows", "dtypes.bfloat16", "scalar.f32", "empty.rows", "step")}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TP, "ZIP32_LIMIT", 1)  # every size and offset >= 1 is written as a zip64 field
        save_dcp(ztree, root / "zip64")
    zrefs = {k: refs[k] for k in ztree if k != "step"}
    # a Llama ported into a sharded nnx state, saved back through its load mapping (run backwards)
    ported_refs = _save_ported_llama(llama_checkpoints, root / "ported")
    all_refs = {"main": refs, "random": rrefs, "zip64": zrefs, "multi": mp_refs, "ported": ported_refs}
    objects = {"main": OBJECTS, "random": {}, "zip64": {"step": 7}, "multi": child.MP_OBJECTS, "ported": {}}
    plains = {"main": plain, "multi": ["mp.c"]}
    # 3. torch reads them: one process (all four checkpoints), then 4 ranks (main and multi)
    jobs = [{"ckpt": str(root / n), "out": str(root / "torch1" / n), "tensors": _shape_dtypes(r),
             "objects": {k: _placeholder(v) for k, v in objects[n].items()}} for n, r in all_refs.items()]
    (root / "jobs1.json").write_text(json.dumps(jobs))
    env = child_env(OMP_NUM_THREADS=1)
    single = _run(["torch-load", str(root / "jobs1.json"), str(root / "torch1.json")], env, "torch dcp.load")
    jobs4 = [{**j, "out": str(root / "torch4" / Path(j["ckpt"]).name), "plain": plains[Path(j["ckpt"]).name]}
             for j in jobs if Path(j["ckpt"]).name in plains]
    (root / "jobs4.json").write_text(json.dumps(jobs4))
    _run(["torch-load-4", str(root / "jobs4.json"), str(root / "torch4.json")], env, "4-rank torch dcp.load")
    counts = {}
    for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if isinstance(leaf, jax.Array):
            fqn = ".".join(str(getattr(k, "key", getattr(k, "idx", None))) for k in kp)
            counts[fqn] = len(distinct_indices(leaf.sharding, leaf.shape, addressable_only=False))
    return Saved(root, all_refs, objects, plains, writers, counts, single)


def _save_ported_llama(llama_checkpoints, path: Path) -> dict:
    """save_dcp(nnx state, mapping=hf_llama_mapping): torch's names and layouts come back; returns transformers'
    own state dict of the checkpoint the state was ported from (what torch must read back)."""
    from flax import nnx

    from examples import llama_nnx
    from examples.port_llama import hf_llama_mapping, port_state

    cfg = llama_nnx.LlamaConfig.from_hf(llama_checkpoints.config)
    _, state = port_state(llama_checkpoints.path("fsdp"), llama_nnx.make_mesh(), cfg)
    save_dcp(nnx.to_pure_dict(state), path, mapping=hf_llama_mapping(cfg), saved_like=llama_checkpoints.path("fsdp"))
    return llama_checkpoints.state("fsdp")


def _placeholder(value):
    """A value of the same type for torch's load target (DCP replaces objects by what was saved)."""
    return {bool: False, int: -1, float: -1.0, str: ""}[type(value)]


def _check_store(store: dict, refs: dict, what: str) -> None:
    assert set(store) == set(refs), (what, sorted(set(store) ^ set(refs)))
    for name, ref in refs.items():
        assert_same(store[name], ref, f"{what}: {name}")


# ---------------------------------------------------------------------------------------------
# torch reads what save_dcp wrote


@pytest.mark.parametrize("name", ["main", "random", "zip64", "multi", "ported"])
def test_torch_dcp_load_single_process(saved, name):
    out = saved.torch_out(name)
    _check_store(child.read_raw(str(out)), saved.refs[name], f"torch dcp.load of {name}")
    assert child.read_objects(str(out)) == {k: repr(v) for k, v in saved.objects[name].items()}
    md = json.loads((out / "manifest.json").read_text())["metadata"]
    assert md["checkpoint_id"] == str(saved.ckpt(name))
    expected_types = {"torch.distributed.checkpoint.metadata.TensorStorageMetadata"}
    if saved.objects[name]:
        expected_types.add("torch.distributed.checkpoint.metadata.BytesStorageMetadata")
    assert set(md["types"]) == expected_types
    for fqn, ref in saved.refs[name].items():
        assert md["dtypes"][fqn] == "torch." + TP.torch_dtype_name(ref.dtype)


def test_main_tree_names_and_planner_data(saved):
    md = json.loads((saved.torch_out("main") / "manifest.json").read_text())["metadata"]
    assert md["planner_data"]["model.layers.1.w"] == ["model", "layers", 1, "w"]
    assert md["planner_data"]["sched.lr"] == ["sched", "lr"]
    assert md["planner_data"]["dtypes.bfloat16"] == ["dtypes.bfloat16"]


@pytest.mark.parametrize("name", ["main", "multi"])
def test_torch_four_ranks_load_onto_another_sharding(saved, name):
    refs = saved.refs[name]
    checked = 0
    for rank in range(NPROC):
        d = saved.torch4_out(name) / f"rank{rank}"
        store = child.read_raw(str(d))
        manifest = json.loads((d / "manifest.json").read_text())["tensors"]
        assert set(store) == set(refs)
        for fqn, local in store.items():
            ent = manifest[fqn]
            ref = refs[fqn]
            if fqn in saved.plain[name] or ref.ndim == 0:
                assert not ent["dtensor"], fqn
            else:
                assert ent["dtensor"], fqn
            index = tuple(slice(o, o + s) for o, s in zip(ent["offsets"], local.shape))
            assert_same(local, ref[index], f"rank {rank}: {fqn}{index}")
            checked += 1
        assert child.read_objects(str(d)) == {k: repr(v) for k, v in saved.objects[name].items()}
    assert checked == NPROC * len(refs)


# ---------------------------------------------------------------------------------------------
# the format itself


def _items(ckpt: Path):
    """(fqn, offsets, file bytes of the item, item offset) of every storage entry, via torch's metadata summary."""
    md = json.loads((ckpt.parent / "torch1" / ckpt.name / "manifest.json").read_text())["metadata"]
    files = {}
    for fqn, offsets, rel, off, length in md["storage"]:
        data = files.setdefault(rel, (ckpt / rel).read_bytes())
        yield fqn, offsets, data[off : off + length], off


def _globals(pickle_bytes: bytes) -> list:
    """The globals and persistent ids a pickle names, in order (what torch.load's weights_only checks)."""
    out = []
    for op, arg, _ in pickletools.genops(pickle_bytes):
        if op.name in ("GLOBAL", "STACK_GLOBAL", "BINPERSID"):
            out.append((op.name, arg))
    return out


def _local_sizes(blob: bytes, offset: int) -> tuple[int, int, int]:
    """(crc, compressed size, size) from the local header at ``offset``, zip64 extra field resolved."""
    crc, csize, usize, nlen, elen = struct.unpack_from("<IIIHH", blob, offset + 14)
    extra = blob[offset + 30 + nlen : offset + 30 + nlen + elen]
    pos = 0
    while pos + 4 <= len(extra):
        tag, size = struct.unpack_from("<HH", extra, pos)
        if tag == 1:
            usize, csize = struct.unpack_from("<QQ", extra, pos + 4)
        pos += 4 + size
    return crc, csize, usize


@pytest.mark.parametrize("name", ["main", "zip64"])
def test_archives_are_what_torch_writes(saved, name):
    """Every item: a valid zip (CRC-32 checked: torch.load does not check it), torch's entries in torch's order,
    every entry 64-byte aligned in the archive and the storage 64-byte aligned in the file, and data.pkl naming
    the same globals as torch.save's of a tensor of that dtype."""
    torch_pickles = saved.torch_single["torch_pickles"]
    refs = saved.refs[name]
    seen = 0
    for fqn, offsets, blob, item_offset in _items(saved.ckpt(name)):
        z = zipfile.ZipFile(io.BytesIO(blob))
        assert z.testzip() is None, fqn
        names = [n.removeprefix("archive/") for n in z.namelist()]
        for info in z.infolist():
            assert info.compress_type == zipfile.ZIP_STORED
            nlen, elen = struct.unpack_from("<HH", blob, info.header_offset + 26)
            data_start = info.header_offset + 30 + nlen + elen
            assert data_start % 64 == 0, (fqn, info.filename, data_start)
            local = _local_sizes(blob, info.header_offset)
            assert local == (info.CRC, info.compress_size, info.file_size), (fqn, info.filename, local)
            if info.filename.endswith("data/0"):
                assert (item_offset + data_start) % 64 == 0, fqn
        if offsets is None:  # an object
            assert names == [n for n in torch_pickles["float32[2, 3]"]["names"] if n != "data/0"], (fqn, names)
            continue
        ref = refs[fqn]
        key = f"{TP.torch_dtype_name(ref.dtype)}{[2, 3]}"
        assert names == torch_pickles[key]["names"], (fqn, names)
        ours = _globals(z.read("archive/data.pkl"))
        theirs = _globals(bytes.fromhex(torch_pickles[key]["data.pkl"]))
        assert [(op, a) for op, a in ours if op != "BINPERSID"] == [(op, a) for op, a in theirs if op != "BINPERSID"]
        seen += 1
    assert seen >= len(refs)


def test_tensor_pickles_decode_like_torchs(saved):
    """data.pkl of every dtype and of 2-D, 0-d and empty shapes: the same tensor (storage type and size,
    offset, shape, strides, dtype) as torch.save's."""
    from jreshard.unpickle import safe_loads

    def described(data: bytes):
        t = safe_loads(data, "t", allow_storages=True)
        return t.storage.key, t.storage.dtype, t.storage.numel, t.storage_offset, t.size, t.stride, repr(t.dtype)

    pickles = saved.torch_single["torch_pickles"]
    for dt in ALL_DTYPES:
        for shape in ((2, 3), (), (0, 4), (2, 0, 3)):
            ours = TP.tensor_pickle(child.np_dtype(dt), shape)
            theirs = bytes.fromhex(pickles[f"{dt}{list(shape)}"]["data.pkl"])
            assert described(ours) == described(theirs), (dt, shape)
    assert len(pickles) == 4 * len(ALL_DTYPES)


def test_single_process_each_chunk_once(saved):
    """Every distinct shard is one storage entry (replicas are not saved again), each a chunk of its tensor."""
    md = json.loads((saved.torch_out("main") / "manifest.json").read_text())["metadata"]
    entries: dict = {}
    for fqn, offsets, rel, _, _ in md["storage"]:
        assert rel == "__0_0.distcp"
        entries.setdefault(fqn, []).append(None if offsets is None else tuple(offsets))
    assert len(saved.chunk_counts) > 50
    for fqn, count in saved.chunk_counts.items():
        assert len(entries[fqn]) == len(set(entries[fqn])) == count, (fqn, entries[fqn], count)
    assert entries["shard.rep"] == [(0, 0)] and entries["numpy.arr"] == [(0, 0)] and entries["step"] == [None]


def test_multi_process_files_each_chunk_once(saved):
    """4 JAX processes: one data file each, every distinct shard saved once (replicas not), .metadata last."""
    ckpt = saved.ckpt("multi")
    files = sorted(p.name for p in ckpt.iterdir())
    assert files == [".metadata"] + [f"__{i}_0.distcp" for i in range(NPROC)], files
    assert [w["pid"] for w in saved.writers] == list(range(NPROC))
    assert all(w["metadata_seen"] for w in saved.writers)  # save_dcp returned after .metadata was written
    md = json.loads((saved.torch_out("multi") / "manifest.json").read_text())["metadata"]
    by_fqn: dict = {}
    extent: dict = {}
    for fqn, offsets, rel, off, length in md["storage"]:
        by_fqn.setdefault(fqn, []).append(tuple(offsets) if offsets is not None else None)
        extent[rel] = max(extent.get(rel, 0), off + length)
    mesh = {"data": NPROC, "model": 2}
    for fqn, (ref, axes) in child.mp_reference().items():
        distinct = 1
        for ax in axes:
            for a in (ax if isinstance(ax, tuple) else (ax,)):
                distinct *= mesh[a] if a else 1
        assert len(by_fqn[fqn]) == len(set(by_fqn[fqn])) == distinct, (fqn, by_fqn[fqn])
    assert set(extent) == {f"__{i}_0.distcp" for i in range(NPROC)}
    for w in saved.writers:
        assert w["file_size"] == extent[f"__{w['pid']}_0.distcp"], w


# ---------------------------------------------------------------------------------------------
# jreshard reads what save_dcp wrote


@pytest.mark.parametrize("name", ["main", "random", "zip64", "multi"])
def test_jreshard_round_trip(saved, name):
    refs = saved.refs[name]
    ckpt = jreshard.open(saved.ckpt(name))
    assert set(ckpt.tensors) == set(refs)
    target = {}
    for fqn, ref in refs.items():
        # another sharding than the saved one: rows over 8 devices where they divide, else replicated
        spec = P("data") if ref.ndim and ref.shape[0] % 8 == 0 else P()
        target[fqn] = jax.ShapeDtypeStruct(ref.shape, ref.dtype, sharding=_named("8", *spec))
    out = jreshard.load(ckpt, target)
    for fqn, ref in refs.items():
        assert out[fqn].sharding == target[fqn].sharding
        assert_same(np.asarray(out[fqn]), ref, f"jreshard load of {name}: {fqn}")
    assert {k: v for k, v in ckpt.objects.items()} == saved.objects[name]


def test_hypothesis_round_trip():
    """Random shapes, dtypes and shardings: save_dcp then jreshard.load onto another sharding, exactly."""
    import tempfile

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    @st.composite
    def cases(draw):
        mesh_key = draw(st.sampled_from(sorted(MESH_AXES)))
        ndim = draw(st.integers(0, 3))
        shape = tuple(draw(st.sampled_from([0, 1, 2, 3, 4, 8, 16])) for _ in range(ndim))
        free = list(MESH_AXES[mesh_key])
        spec = []
        for d in shape:
            pick = draw(st.sampled_from([None] + [a for a in free if d % MESH_AXES[mesh_key][a] == 0]))
            if pick is not None:
                free.remove(pick)
            spec.append(pick)
        return mesh_key, shape, draw(st.sampled_from(ALL_DTYPES)), tuple(spec), draw(st.integers(0, 2**31))

    @settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(cases())
    def check(case):
        mesh_key, shape, dt, spec, seed = case
        ref = child.make_array("h", shape, dt, seed=seed)
        with tempfile.TemporaryDirectory() as d:
            save_dcp({"x": {"y": _put(ref, _named(mesh_key, *spec))}}, Path(d) / "c")
            other = _named("4x2", *(("model",) if shape and shape[0] % 2 == 0 else ()))
            out = jreshard.load(Path(d) / "c", {"x.y": jax.ShapeDtypeStruct(shape, ref.dtype, sharding=other)})
            assert_same(np.asarray(out["x.y"]), ref, f"{case}")

    check()


# ---------------------------------------------------------------------------------------------
# refusals, atomicity, torch-free


def _arr(shape=(4,), dtype=jnp.float32):
    return jnp.zeros(shape, dtype)


@pytest.mark.parametrize("tree, match", [
    ({"a.b": _arr(), "a": {"b": _arr()}}, "both flatten to the DCP name 'a.b'"),
    ({"l": [_arr()], "l.0": _arr()}, "both flatten to the DCP name 'l.0'"),
    ({("a", "b"): _arr()}, "is a tuple"),
    ({"": _arr()}, "empty key"),
    ({"a": {"": _arr()}}, "empty key"),
    ({"a\x00b": _arr()}, "NUL"),
    ({"a\udc80": _arr()}, "lone surrogate"),
    (_arr(), "bare leaf"),
    ({"a": object()}, "cannot save a object"),
    ({"a": jax.ShapeDtypeStruct((2,), jnp.float32)}, "ShapeDtypeStruct"),
    ({"a": jnp.zeros(4, jnp.int4)}, "no torch equivalent"),
    ({"a": np.zeros(4, ">f4")}, "no torch equivalent"),
    ({"a": jax.random.key(0)}, "extended dtype"),
], ids=["collision", "list-collision", "tuple-key", "empty-key", "empty-inner-key", "nul", "surrogate", "bare-leaf",
        "object", "abstract", "int4", "big-endian", "prng-key"])
def test_refuses_what_dcp_cannot_hold(tmp_path, tree, match):
    path = tmp_path / "c"
    with pytest.raises((JReshardError, TypeError, ValueError)) as info:
        save_dcp(tree, path)
    if match is not None:
        assert isinstance(info.value, InvalidArgumentError), info.value
        assert match in str(info.value), str(info.value)
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary directory left behind


def test_destination_rules(tmp_path):
    tree = {"w": _arr()}
    (tmp_path / "file").write_text("x")
    with pytest.raises(InvalidArgumentError, match="not a directory"):
        save_dcp(tree, tmp_path / "file")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(InvalidArgumentError):
            save_dcp(tree, tmp_path / "other", overwrite=overwrite)
    assert (tmp_path / "other" / "notes.txt").read_text() == "keep me"
    (tmp_path / "empty").mkdir()
    save_dcp(tree, tmp_path / "empty")  # an empty directory is free
    with pytest.raises(InvalidArgumentError, match="overwrite=True"):
        save_dcp({"v": _arr()}, tmp_path / "empty")
    save_dcp({"v": jnp.ones(3)}, tmp_path / "empty", overwrite=True)
    ck = jreshard.open(tmp_path / "empty")
    assert set(ck.tensors) == {"v"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "file", "other"]


def test_interrupted_save_leaves_no_checkpoint(tmp_path, monkeypatch):
    """A failure while writing data leaves nothing at the path (a fresh save) or the old checkpoint intact
    (overwrite), and no temporary directory."""
    real = SAVE._write_item
    calls = []

    def failing(fd, item, shards, where):
        calls.append(item.leaf.fqn)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real(fd, item, shards, where)

    tree = {f"t{i}": jnp.full((4, 4), i, jnp.float32) for i in range(6)}
    monkeypatch.setattr(SAVE, "_write_item", failing)
    monkeypatch.setattr(SAVE, "_WRITERS", 1)
    with pytest.raises(JReshardError, match="No space left"):
        save_dcp(tree, tmp_path / "c")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(SAVE, "_write_item", real)
    save_dcp({"old": jnp.ones(2)}, tmp_path / "c")
    calls.clear()
    monkeypatch.setattr(SAVE, "_write_item", failing)
    with pytest.raises(JReshardError):
        save_dcp(tree, tmp_path / "c", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
    assert set(jreshard.open(tmp_path / "c").tensors) == {"old"}


def test_writes_each_shard_separately(tmp_path, monkeypatch):
    """No whole-array gather: every jax array converted to host memory while saving is one shard."""
    converted = []

    class SpyNumpy:
        """numpy, recording the shape of every jax array save_dcp turns into a numpy array."""

        def __getattr__(self, name):
            fn = getattr(np, name)
            if name not in ("asarray", "array", "ascontiguousarray", "asanyarray"):
                return fn

            def convert(a, *args, **kwargs):
                if isinstance(a, jax.Array):
                    converted.append(a.shape)
                return fn(a, *args, **kwargs)

            return convert

    monkeypatch.setattr(SAVE, "np", SpyNumpy())
    x = _put(np.arange(64 * 16, dtype=np.float32).reshape(64, 16), _named("2x4", "data", "model"))
    save_dcp({"x": x}, tmp_path / "c")
    assert converted == [(32, 4)] * 8


def test_killed_save_is_never_a_checkpoint(tmp_path):
    """A process killed halfway through a save (after some items are written) leaves no checkpoint at the path
    (a fresh save) and the old checkpoint intact (overwrite)."""
    code = (
        "import os, sys, importlib, jax.numpy as jnp\n"
        "from jreshard import save_dcp\n"
        "mod = importlib.import_module('jreshard.write_dcp')\n"
        "real, calls = mod._write_item, []\n"
        "def dying(*a):\n"
        "    calls.append(1)\n"
        "    if len(calls) == 4: os._exit(7)\n"
        "    return real(*a)\n"
        "mod._write_item, mod._WRITERS = dying, 1\n"
        "save_dcp({f't{i}': jnp.full((4, 4), i) for i in range(6)}, sys.argv[1], overwrite=True)\n"
    )
    for path, before in ((tmp_path / "fresh", None), (tmp_path / "old", {"old"})):
        if before:
            save_dcp({"old": jnp.ones(2)}, path)
        proc = subprocess.run([sys.executable, "-c", code, str(path)], check=False, capture_output=True, text=True,
                              env=child_env(JAX_PLATFORMS="cpu"), timeout=120)
        assert proc.returncode == 7, proc.stderr[-3000:]
        if before is None:
            assert not path.exists()
            with pytest.raises(JReshardError):
                jreshard.open(path)
        else:
            assert set(jreshard.open(path).tensors) == before


def test_save_is_torch_free(tmp_path):
    """save_dcp in a process where torch cannot be imported; the modules decode no pickle."""
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import jax.numpy as jnp, numpy as np, jreshard\n"
        "from jreshard import save_dcp\n"
        f"save_dcp({{'a': jnp.arange(6.0).reshape(2, 3), 'n': np.ones(2, np.int8), 's': 3}}, {str(tmp_path / 'c')!r})\n"
        f"ck = jreshard.open({str(tmp_path / 'c')!r})\n"
        "assert set(ck.tensors) == {'a', 'n'} and ck.objects == {'s': 3}\n"
        "assert not [m for m in sys.modules if m.startswith('torch') and sys.modules[m] is not None]\n"
        "print('OK')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], check=False, env=child_env(JAX_PLATFORMS="cpu"), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]
    for module in ("write_dcp.py", "torchpickle.py"):
        source = (REPO_ROOT / "jreshard" / module).read_text()
        assert not re.search(r"^\s*(import torch\b|from torch\b)", source, re.MULTILINE), module
        assert "pickle.load" not in source and "Unpickler" not in source, module


def test_torchpickle_memo_and_ints():
    """The emitter's memo (strings, globals) and integer/float/container encodings round trip through
    jreshard's allow-listed unpickler."""
    from jreshard.unpickle import safe_loads

    value = {"a": [0, 255, 256, 65535, 65536, -1, 2**31 - 1, -(2**31), 2**31, 2**70, -(2**70)],
             "b": ("x", "x", "y" * 300), "c": [1.5, -0.0, True, False, None], "d": list(range(2500)),
             "e": {str(i): i for i in range(1200)}}
    for protocol in (2, 4):
        assert safe_loads(TP.dumps(value, protocol=protocol), "t") == value
    data = TP.dumps([TP.torch_size((2, 3)), TP.torch_size(()), TP.Global("torch", "float32")] * 300, protocol=4)
    decoded = safe_loads(data, "t")
    assert decoded[0] == (2, 3) and decoded[1] == () and repr(decoded[2]) == "torch.float32"
    assert data.count(b"torch") == 1  # the module name is written once, then fetched from the memo


def test_flax_nnx_state(tmp_path):
    """An nnx state saves under the names jreshard.load gives its Variables (``a.kernel``), and loads back."""
    from flax import nnx

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Linear(4, 8, rngs=rngs)
            self.b = nnx.Linear(8, 2, param_dtype=jnp.bfloat16, rngs=rngs)

    state = nnx.state(Model(nnx.Rngs(0)))
    save_dcp(state, tmp_path / "c")
    assert set(jreshard.open(tmp_path / "c").tensors) == {"a.kernel", "a.bias", "b.kernel", "b.bias"}
    loaded = jreshard.load(tmp_path / "c", state)
    for (path, x), (_, y) in zip(jax.tree_util.tree_leaves_with_path(state), jax.tree_util.tree_leaves_with_path(loaded)):
        assert_same(np.asarray(y), np.asarray(x), jax.tree_util.keystr(path))


def test_short_writes_are_resumed(tmp_path, monkeypatch):
    """A file system that writes fewer bytes than asked (pwritev may): the rest is written after them."""
    real = os.pwritev

    def short(fd, buffers, offset):
        first = bytes(memoryview(buffers[0]).cast("B")[:777])
        return real(fd, [first], offset)

    monkeypatch.setattr(os, "pwritev", short)
    ref = child.make_array("short", (64, 40), "bfloat16")
    save_dcp({"w": _put(ref, _named("2x4", "data", "model")), "step": 3}, tmp_path / "c")
    monkeypatch.setattr(os, "pwritev", real)
    out = jreshard.load(tmp_path / "c", {"w": jax.ShapeDtypeStruct(ref.shape, ref.dtype, sharding=_named("8"))})
    assert_same(np.asarray(out["w"]), ref, "w")
    assert jreshard.open(tmp_path / "c").objects == {"step": 3}
