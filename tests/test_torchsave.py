"""torch.save archives (``.pt`` / ``.pth`` / ``.bin``) written by torch itself: flat and nested state dicts,
views and shared storages, every dtype, Hugging Face style sharded ``pytorch_model-0000X-of-0000N.bin`` with
``pytorch_model.bin.index.json``, and hostile pickles.

Expected values come from ``torch.load(..., weights_only=True)``, named by torch's own ``flatten_state_dict``
(DCP's rule: nested dicts joined with dots, lists walked when they hold tensors or containers, tuples and lists of
plain values kept whole), never from jreshard. The legacy format has its own module,
``tests/test_legacy_torchsave.py``.
"""

from __future__ import annotations

import io as _io
import json
import os
import pickle
import subprocess
import sys
import zipfile

import ml_dtypes
import numpy as np
import pytest

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jreshard
from jreshard import errors

from tests.helpers import MESH_SHAPES, check_catalog, assert_same, box_nbytes, check_loaded_array, make_mesh, spec_fits, SPECS, random_tensor, torch_bits

IOS = ("posix", "tensorstore")

# torch dtype name -> numpy dtype (from the dtypes' definitions, not from jreshard)
NP_DTYPES = {
    "float64": np.dtype(np.float64),
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
    "float8_e4m3fnuz": np.dtype(ml_dtypes.float8_e4m3fnuz),
    "float8_e5m2fnuz": np.dtype(ml_dtypes.float8_e5m2fnuz),
    "float8_e8m0fnu": np.dtype(ml_dtypes.float8_e8m0fnu),
    "int8": np.dtype(np.int8),
    "int16": np.dtype(np.int16),
    "int32": np.dtype(np.int32),
    "int64": np.dtype(np.int64),
    "uint8": np.dtype(np.uint8),
    "uint16": np.dtype(np.uint16),
    "uint32": np.dtype(np.uint32),
    "uint64": np.dtype(np.uint64),
    "bool": np.dtype(np.bool_),
    "complex64": np.dtype(np.complex64),
    "complex128": np.dtype(np.complex128),
}

# ---------------------------------------------------------------------------------------------
# torch-side helpers
# ---------------------------------------------------------------------------------------------


def to_numpy(t) -> np.ndarray:
    """Bit-exact numpy copy of a torch tensor (ml_dtypes for bf16 / float8)."""
    return torch_bits(t, NP_DTYPES[str(t.dtype).removeprefix("torch.")])


def torch_flatten(obj):
    """(name, leaf) pairs of a torch.load result, named by DCP's own flatten_state_dict."""
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict

    return flatten_state_dict(obj)[0].items()


def torch_reference(*paths):
    """({name: numpy array}, {name: object}) of what torch.load(weights_only=True) reads from ``paths``."""
    import torch

    tensors, objects = {}, {}
    for p in paths:
        obj = torch.load(str(p), weights_only=True, map_location="cpu")
        for name, leaf in torch_flatten(obj):
            if isinstance(leaf, torch.Tensor):
                tensors[name] = to_numpy(leaf)
            else:
                objects[name] = leaf
    return tensors, objects


def check_catalog_and_data(ck, tensors: dict, objects: dict) -> None:
    check_catalog(ck, tensors)
    for name, ref in tensors.items():
        assert_same(ck.read(name), ref, name)
    assert dict(ck.objects) == objects


# ---------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def meshes():
    assert len(jax.devices()) == 8, jax.devices()
    return {k: make_mesh(k) for k in MESH_SHAPES}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Every torch.save archive of this module, written once."""
    import torch

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("torchsave")
    out = {}

    # flat state dict with every dtype; big enough (> 64 KiB) to be read by ranges
    flat = {f"w_{dt}": random_tensor(f"w_{dt}", dt, (16, 8)) for dt in NP_DTYPES}
    flat.update({f"s_{dt}": random_tensor(f"s_{dt}", dt, ()) for dt in ("float32", "bfloat16", "int64", "bool")})
    flat["big"] = random_tensor("big", "float32", (256, 128))
    flat["empty"] = torch.zeros(0, 5)
    torch.save(flat, d / "flat.pt")
    out["flat"] = d / "flat.pt"

    # a small archive (held in memory whole by readers that want to)
    torch.save({"a": torch.arange(12, dtype=torch.float32).reshape(3, 4), "n": 5}, d / "small.pth")
    out["small"] = d / "small.pth"

    # nested: a real model and optimizer after one step, plus plain objects
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 32))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 64)).square().sum().backward()
    opt.step()
    nested = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "epoch": 3,
        "meta": {"name": "run-1", "scale": 0.5, "ids": [1, 2, 3], "flags": (True, False), "none": None},
        "history": [torch.tensor([1.0, 2.0]), {"loss": torch.tensor(0.25)}],
    }
    torch.save(nested, d / "nested.pt")
    out["nested"] = d / "nested.pt"

    # views and shared storages
    big = torch.arange(100 * 8, dtype=torch.float32).reshape(100, 8) * 0.5 - 7
    bf = random_tensor("bf", "bfloat16", (40, 12))
    shared = {
        "big": big,
        "alias": big,  # the same tensor twice
        "t": big[2:50].T,  # transposed, storage offset 16
        "tail": big[5:],  # storage offset only
        "col": big[:, 3],  # stride 8
        "strided": big[1::3, ::2],  # steps in both dims
        "row": big[7],
        "elem": big[9, 2],  # 0-d view with an offset
        "bf_t": bf[10:30].T,
        "bf_slice": bf[3:7, 2:11],
        "param": torch.nn.Parameter(torch.randn(8, 4)),
        "frozen": torch.nn.Parameter(torch.randn(6), requires_grad=False),
        "expanded": torch.arange(4, dtype=torch.float32).reshape(4, 1).expand(4, 6),  # stride 0
    }
    torch.save(shared, d / "shared.pt")
    out["shared"] = d / "shared.pt"

    # HF-style sharded .bin
    hf = d / "hf"
    hf.mkdir()
    names = [f"model.layers.{i}.{p}" for i in range(3) for p in ("attn.weight", "mlp.weight", "norm.weight")]
    names += ["model.embed.weight", "lm_head.weight"]
    sd = {}
    for n in names:
        shape = (32,) if n.endswith("norm.weight") else (64, 32)
        sd[n] = random_tensor(n, "bfloat16" if "mlp" in n or "embed" in n else "float32", shape)
    shards = [dict(list(sd.items())[i::2]) for i in range(2)]
    weight_map, total = {}, 0
    for i, part in enumerate(shards):
        fname = f"pytorch_model-{i + 1:05d}-of-00002.bin"
        torch.save(part, hf / fname)
        for k, v in part.items():
            weight_map[k] = fname
            total += v.numel() * v.element_size()
    with open(hf / "pytorch_model.bin.index.json", "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    out["hf"] = hf
    out["hf_files"] = [hf / f"pytorch_model-{i + 1:05d}-of-00002.bin" for i in range(2)]

    # single pytorch_model.bin in a directory
    single = d / "single"
    single.mkdir()
    torch.save(model.state_dict(), single / "pytorch_model.bin")
    out["single"] = single

    return out


# ---------------------------------------------------------------------------------------------
# the fixtures themselves
# ---------------------------------------------------------------------------------------------


def test_fixture_archives_are_zip_with_shared_storage(files):
    with zipfile.ZipFile(files["shared"]) as z:
        storages = [n for n in z.namelist() if "/data/" in n]
        pkl = z.read([n for n in z.namelist() if n.endswith("data.pkl")][0])
    # big, alias, t, tail, col, strided, row, elem, expanded-base share storages: far fewer storages than entries
    assert len(storages) <= 6, storages
    assert b"_rebuild_parameter" in pkl
    assert os.path.getsize(files["flat"]) > 64 * 1024 and os.path.getsize(files["small"]) < 64 * 1024


# ---------------------------------------------------------------------------------------------
# reading: catalog, tensors, objects
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("io", IOS)
@pytest.mark.parametrize("which", ["flat", "small", "nested", "shared"])
def test_archive_matches_torch_load(files, io, which):
    tensors, objects = torch_reference(files[which])
    with jreshard.open(files[which], io=io) as ck:
        check_catalog_and_data(ck, tensors, objects)


def test_nested_names(files):
    tensors, objects = torch_reference(files["nested"])
    # the convention itself, spelled out
    assert "model.0.weight" in tensors and "optimizer.state.0.exp_avg" in tensors
    assert "optimizer.state.0.step" in tensors and tensors["optimizer.state.0.step"].shape == ()
    assert "history.0" in tensors and "history.1.loss" in tensors
    assert objects["epoch"] == 3 and objects["optimizer.param_groups.0.lr"] == 0.1
    assert objects["optimizer.param_groups.0.params"] == [0, 1, 2, 3]
    assert objects["meta.ids"] == [1, 2, 3] and objects["meta.none"] is None
    with jreshard.open(files["nested"]) as ck:
        objs = dict(ck.objects)
        assert objs["epoch"] == 3 and type(objs["epoch"]) is int
        assert objs["optimizer.param_groups.0.lr"] == 0.1
        assert objs["optimizer.param_groups.0.betas"] == objects["optimizer.param_groups.0.betas"]
        assert objs["meta.name"] == "run-1"
        assert objs["meta.flags"] == (True, False)
        assert_same(ck.read("optimizer.state.2.exp_avg_sq"), tensors["optimizer.state.2.exp_avg_sq"], "exp_avg_sq")


@pytest.mark.parametrize("io", IOS)
def test_views_and_shared_storages(files, io):
    import torch

    raw = torch.load(str(files["shared"]), weights_only=True)
    with jreshard.open(files["shared"], io=io) as ck:
        for name, t in raw.items():
            assert tuple(ck.tensors[name].shape) == tuple(t.shape), name
            assert_same(ck.read(name), to_numpy(t), name)
        assert_same(ck.read("alias"), ck.read("big"), "alias")


@pytest.mark.parametrize("io", IOS)
def test_sub_boxes(files, io):
    import torch

    raw = torch.load(str(files["shared"]), weights_only=True)
    flat = torch.load(str(files["flat"]), weights_only=True)
    cases = [
        (raw, "t", (slice(1, 7), slice(5, 40))),
        (raw, "t", (slice(0, 8), slice(47, 48))),
        (raw, "tail", (slice(10, 60), slice(2, 6))),
        (raw, "strided", (slice(3, 20), slice(1, 3))),
        (raw, "col", (slice(17, 83),)),
        (raw, "bf_t", (slice(2, 11), slice(4, 19))),
        (raw, "bf_slice", (slice(1, 3), slice(0, 9))),
        (raw, "expanded", (slice(1, 3), slice(2, 6))),
        (raw, "big", (slice(0, 100), slice(0, 8))),
        (flat, "big", (slice(100, 200), slice(30, 97))),
        (flat, "w_bfloat16", (slice(3, 9), slice(1, 2))),
        (flat, "w_complex128", (slice(0, 16), slice(4, 8))),
        (flat, "w_float8_e5m2", (slice(5, 6), slice(0, 8))),
    ]
    sources = {id(raw): files["shared"], id(flat): files["flat"]}
    opened = {}
    try:
        for ref, name, box in cases:
            src = sources[id(ref)]
            ck = opened.setdefault(src, jreshard.open(src, io=io))
            expected = to_numpy(ref[name][box])
            got = ck.read(name, box)
            assert_same(got, expected, f"{name}{box}")
    finally:
        for ck in opened.values():
            ck.close()


def test_sub_box_reads_only_what_it_needs(files):
    """A row box of a contiguous tensor inside a large archive: about that many bytes are read."""
    import torch

    ref = to_numpy(torch.load(str(files["flat"]), weights_only=True)["big"])
    with jreshard.open(files["flat"], io="posix") as ck:
        before = ck.io_stats.bytes_read
        box = (slice(64, 96), slice(0, 128))
        assert_same(ck.read("big", box), ref[box], "big box")
        needed = box_nbytes(box, ref.shape, 4)
        assert 0 < ck.io_stats.bytes_read - before <= needed + 512
        assert ck.io_stats.bytes_read < os.path.getsize(files["flat"]) / 2


@pytest.mark.parametrize("io", IOS)
@pytest.mark.parametrize("how", ["dir", "index_file", "index_url"])
def test_hf_sharded_bin(files, io, how):
    tensors, objects = torch_reference(*files["hf_files"])
    hf = files["hf"]
    source = {"dir": hf, "index_file": hf / "pytorch_model.bin.index.json",
              "index_url": f"file://{hf}/pytorch_model.bin.index.json"}[how]
    with jreshard.open(source, io=io) as ck:
        check_catalog_and_data(ck, tensors, objects)
        box = (slice(10, 50), slice(3, 29))
        assert_same(ck.read("lm_head.weight", box), tensors["lm_head.weight"][box], "lm_head box")


@pytest.mark.parametrize("io", IOS)
def test_single_bin_directory(files, io):
    tensors, objects = torch_reference(files["single"] / "pytorch_model.bin")
    with jreshard.open(files["single"], io=io) as ck:
        check_catalog_and_data(ck, tensors, objects)


@pytest.mark.parametrize("io", IOS)
def test_hf_index_lists_absent_entry(files, tmp_path, io):
    import shutil

    dst = tmp_path / "hf"
    shutil.copytree(files["hf"], dst)
    index = json.loads((dst / "pytorch_model.bin.index.json").read_text())
    index["weight_map"]["model.layers.9.ghost"] = "pytorch_model-00001-of-00002.bin"
    (dst / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    with pytest.raises(errors.MissingDataError) as ei:
        jreshard.open(dst, io=io)
    assert "model.layers.9.ghost" in str(ei.value)


def test_hf_index_lists_absent_file(files, tmp_path):
    import shutil

    dst = tmp_path / "hf"
    shutil.copytree(files["hf"], dst)
    os.remove(dst / "pytorch_model-00002-of-00002.bin")
    with pytest.raises(errors.MissingDataError):
        jreshard.open(dst)


def _big_endian_copy(src, dst, dtypes_by_key: dict) -> None:
    """Rewrite a torch.save archive as a big-endian machine would have written it: byteorder "big" and every
    storage byte-swapped per element (complex: per component)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression=zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            parts = info.filename.split("/")
            if parts[-1] == "byteorder":
                data = b"big"
            elif len(parts) == 3 and parts[1] == "data":
                dt = dtypes_by_key[parts[2]]
                data = np.frombuffer(data, dt).byteswap().tobytes()
            zout.writestr(info.filename, data)


@pytest.mark.parametrize("io", IOS)
def test_big_endian_archive(tmp_path, io):
    import torch

    sd = {
        "f32": random_tensor("be.f32", "float32", (16, 8)),
        "i64": random_tensor("be.i64", "int64", (5, 3)),
        "f16_t": random_tensor("be.f16", "float16", (12, 4)).T,
        "c64": random_tensor("be.c64", "complex64", (4, 4)),
        "bf16": random_tensor("be.bf16", "bfloat16", (6, 10)),
        "u8": random_tensor("be.u8", "uint8", (7,)),
        "big": random_tensor("be.big", "float64", (128, 96)),  # the archive is > 64 KiB: read by ranges
    }
    src, dst = tmp_path / "le.pt", tmp_path / "be.pt"
    torch.save(sd, src)
    # storage keys follow the order in which the pickler meets the storages: the dict order
    dtypes = {str(i): {"f32": np.float32, "i64": np.int64, "f16_t": np.float16, "c64": np.complex64,
                       "bf16": np.uint16, "u8": np.uint8, "big": np.float64}[k] for i, k in enumerate(sd)}
    with zipfile.ZipFile(src) as z:
        assert sorted(n.split("/")[-1] for n in z.namelist() if "/data/" in n) == sorted(dtypes)
    _big_endian_copy(src, dst, dtypes)
    tensors, objects = torch_reference(dst)  # torch byte-swaps big-endian archives on load
    for k, t in sd.items():
        assert_same(tensors[k], to_numpy(t), f"torch's reading of {k}")
    with jreshard.open(dst, io=io) as ck:
        check_catalog_and_data(ck, tensors, objects)
        assert_same(ck.read("f32", (slice(2, 9), slice(3, 8))), tensors["f32"][2:9, 3:8], "f32 box")
        assert_same(ck.read("big", (slice(50, 70), slice(3, 90))), tensors["big"][50:70, 3:90], "big box")
        mesh = make_mesh("2x4")
        t = jax.ShapeDtypeStruct((128, 96), np.float64, sharding=NamedSharding(mesh, P("data", "model")))
        check_loaded_array(ck.load({"big": t})["big"], t, tensors["big"], "big on mesh")
    assert os.path.getsize(dst) > 64 * 1024


# ---------------------------------------------------------------------------------------------
# loading onto meshes
# ---------------------------------------------------------------------------------------------


LOAD_CASES = [("2x4", "P(data,model)"), ("2x4", "P(None,model)"), ("8", "P(data)"), ("4x2", "P(model,data)"),
              ("2x4", "P((data,model))"), ("4x2", "P()")]


@pytest.mark.parametrize("io", IOS)
@pytest.mark.parametrize("which", ["flat", "shared", "nested"])
@pytest.mark.parametrize("mesh_key,spec_key", LOAD_CASES, ids=[f"{m}-{s}" for m, s in LOAD_CASES])
def test_load_onto_mesh(files, meshes, io, which, mesh_key, spec_key):
    tensors, objects = torch_reference(files[which])
    mesh, spec = meshes[mesh_key], SPECS[spec_key]
    mesh_shape = dict(mesh.shape)
    targets = {
        n: jax.ShapeDtypeStruct(r.shape, r.dtype, sharding=NamedSharding(mesh, spec))
        for n, r in tensors.items()
        if spec_fits(spec, r.shape, mesh_shape)
    }
    assert targets
    with jreshard.open(files[which], io=io) as ck:
        out = ck.load(targets)
    assert set(out) == set(targets)
    for name, t in targets.items():
        check_loaded_array(out[name], t, tensors[name], f"{which}:{name} {mesh_key} {spec_key}")


def test_load_with_objects_in_target(files, meshes):
    """A non-array leaf that names a saved object is replaced by that object."""
    tensors, objects = torch_reference(files["nested"])
    mesh = meshes["2x4"]
    w = jax.ShapeDtypeStruct((128, 64), np.float32, sharding=NamedSharding(mesh, P("data", "model")))
    out = jreshard.load(files["nested"], {"model": {"0": {"weight": w}}, "epoch": 0, "meta": {"name": ""}})
    check_loaded_array(out["model"]["0"]["weight"], w, tensors["model.0.weight"], "model.0.weight")
    assert out["epoch"] == 3
    assert out["meta"]["name"] == objects["meta.name"] == "run-1"


# ---------------------------------------------------------------------------------------------
# refused inputs
# ---------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
def test_dtype_without_numpy_equivalent(tmp_path):
    import torch

    p = tmp_path / "chalf.pt"
    torch.save({"ok": torch.ones(2), "c": torch.ones(4, dtype=torch.complex32)}, p)
    with pytest.raises(errors.CheckpointFormatError) as ei:
        ck = jreshard.open(p)
        ck.read("c")
    assert "complex32" in str(ei.value) or "chalf" in str(ei.value)


def test_truncated_archive(files, tmp_path):
    raw = files["flat"].read_bytes()
    p = tmp_path / "cut.pt"
    p.write_bytes(raw[: len(raw) // 2])
    with pytest.raises((errors.TruncatedDataError, errors.CheckpointFormatError)):
        ck = jreshard.open(p)
        ck.read("big")


class _Evil:
    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _payloads(marker: str) -> dict:
    import builtins

    return {
        "os.system": _Evil(os.system, (f"touch {marker}",)),
        "subprocess.call": _Evil(subprocess.call, (["touch", marker],)),
        "builtins.exec": _Evil(builtins.exec, (f"open({marker!r}, 'w').close()",)),
        "builtins.eval": _Evil(builtins.eval, (f"__import__('os').system('touch {marker}')",)),
    }


def _torch_like_zip(path, data_pkl: bytes, extra: dict | None = None) -> None:
    """A zip laid out like torch.save's: archive/data.pkl, archive/byteorder, archive/version (STORED)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", data_pkl)
        z.writestr("archive/byteorder", b"little")
        for k, v in (extra or {}).items():
            z.writestr(f"archive/data/{k}", v)
        z.writestr("archive/version", b"3\n")
        z.writestr("archive/.data/serialization_id", b"1234567890")


@pytest.mark.parametrize("io", IOS)
@pytest.mark.parametrize("payload", ["os.system", "subprocess.call", "builtins.exec", "builtins.eval"])
def test_malicious_hand_built_zip(tmp_path, io, payload):
    marker = tmp_path / "MARKER"
    evil = _payloads(str(marker))[payload]
    path = tmp_path / "evil.bin"
    _torch_like_zip(path, pickle.dumps({"w": evil}, protocol=2))
    with pytest.raises(errors.UnsafeCheckpointError):
        ck = jreshard.open(path, io=io)
        dict(ck.objects)
    assert not marker.exists()


@pytest.mark.parametrize("where", ["top", "nested_large", "hf_dir"])
def test_malicious_torch_save(tmp_path, where):
    import torch

    marker = tmp_path / "MARKER"
    evil = _payloads(str(marker))["os.system"]
    if where == "top":
        path = tmp_path / "evil.pt"
        torch.save({"w": torch.ones(3), "hook": evil}, path)
        source = path
    elif where == "nested_large":  # > 64 KiB: read by ranges, not whole
        path = tmp_path / "evil_large.pt"
        torch.save({"model": {"w": torch.zeros(200, 200)}, "optimizer": {"state": {0: {"x": evil}}}}, path)
        assert os.path.getsize(path) > 64 * 1024
        source = path
    else:
        d = tmp_path / "hf"
        d.mkdir()
        torch.save({"a": torch.ones(2)}, d / "pytorch_model-00001-of-00002.bin")
        torch.save({"b": torch.ones(2), "c": evil}, d / "pytorch_model-00002-of-00002.bin")
        (d / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {
            "a": "pytorch_model-00001-of-00002.bin", "b": "pytorch_model-00002-of-00002.bin",
            "c": "pytorch_model-00002-of-00002.bin"}}))
        source = d
    with pytest.raises(errors.UnsafeCheckpointError) as ei:
        ck = jreshard.open(source)
        dict(ck.objects)
    assert "system" in str(ei.value)
    assert not marker.exists()


def test_malicious_payload_is_real(tmp_path):
    """Self-check of the fixture: the same bytes DO run the command when unpickled naively (in a child)."""
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.bin"
    _torch_like_zip(path, pickle.dumps({"w": _payloads(str(marker))["os.system"]}, protocol=2))
    with pytest.raises(errors.UnsafeCheckpointError):
        jreshard.open(path)
    assert not marker.exists()
    code = "import pickle, sys, zipfile; pickle.loads(zipfile.ZipFile(sys.argv[1]).read('archive/data.pkl'))"
    subprocess.run([sys.executable, "-c", code, str(path)], check=True, timeout=60)
    assert marker.exists()


def test_malicious_storage_global(tmp_path):
    """A pickle that rebuilds a tensor but names a non-torch storage class in its persistent id."""
    marker = tmp_path / "MARKER"

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if obj is _SENTINEL:
                return ("storage", _Evil(os.system, (f"touch {marker}",)), "0", "cpu", 4)
            return None

    buf = _io.BytesIO()
    Pickler(buf, protocol=2).dump({"w": _SENTINEL})
    path = tmp_path / "evil_storage.pt"
    _torch_like_zip(path, buf.getvalue(), extra={"0": b"\0" * 16})
    with pytest.raises((errors.UnsafeCheckpointError, errors.CheckpointFormatError)):
        ck = jreshard.open(path)
        dict(ck.objects)
    assert not marker.exists()


_SENTINEL = object()
