"""safetensors files written by the ``safetensors`` package itself: one file with every dtype, files written
from numpy, and a Hugging Face style sharded directory with its ``model.safetensors.index.json``.

Expected values always come from safetensors' own readers (``safetensors.torch.load_file`` converted bit
for bit to numpy, and ``safetensors.numpy.load_file`` where numpy can hold the dtype), never from jreshard.
"""

from __future__ import annotations

import json
import os
import shutil
import struct

import ml_dtypes
import numpy as np
import pytest

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jreshard
from jreshard import errors

from tests.helpers import MESH_SHAPES, check_catalog, assert_same, box_nbytes, check_loaded_array, make_mesh, nest, spec_fits, SPECS, random_tensor, torch_bits

IOS = ("posix", "tensorstore")

# torch dtype name -> (safetensors dtype string, numpy dtype). Written here from the safetensors format
# specification, not taken from jreshard.
DTYPES = {
    "float64": ("F64", np.dtype(np.float64)),
    "float32": ("F32", np.dtype(np.float32)),
    "float16": ("F16", np.dtype(np.float16)),
    "bfloat16": ("BF16", np.dtype(ml_dtypes.bfloat16)),
    "float8_e4m3fn": ("F8_E4M3", np.dtype(ml_dtypes.float8_e4m3fn)),
    "float8_e5m2": ("F8_E5M2", np.dtype(ml_dtypes.float8_e5m2)),
    "float8_e8m0fnu": ("F8_E8M0", np.dtype(ml_dtypes.float8_e8m0fnu)),
    "int8": ("I8", np.dtype(np.int8)),
    "int16": ("I16", np.dtype(np.int16)),
    "int32": ("I32", np.dtype(np.int32)),
    "int64": ("I64", np.dtype(np.int64)),
    "uint8": ("U8", np.dtype(np.uint8)),
    "uint16": ("U16", np.dtype(np.uint16)),
    "uint32": ("U32", np.dtype(np.uint32)),
    "uint64": ("U64", np.dtype(np.uint64)),
    "bool": ("BOOL", np.dtype(np.bool_)),
    "complex64": ("C64", np.dtype(np.complex64)),
}

# Shapes stored for every dtype: one that tiles every mesh used below, an odd one, a 3-D one, a 0-d one and
# an empty one.
SHAPES = {"grid": (16, 8), "odd": (5, 7), "cube": (4, 8, 16), "scalar": (), "empty": (0, 4)}

# ---------------------------------------------------------------------------------------------
# helpers (torch side)
# ---------------------------------------------------------------------------------------------


def to_numpy(t) -> np.ndarray:
    """Bit-exact numpy copy of a torch tensor (ml_dtypes for bf16 / float8)."""
    return torch_bits(t, DTYPES[str(t.dtype).removeprefix("torch.")][1])


def header_of(path) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def write_raw_safetensors(path, header: dict, data: bytes) -> None:
    """A safetensors file written by hand (for headers safetensors' writer would refuse)."""
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + data)


# ---------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def all_dtypes_file(tmp_path_factory):
    """One file with every dtype x shape, written by safetensors.torch.save_file.

    Returns (path, expected) where expected maps name -> numpy array read back by safetensors itself.
    """
    from safetensors.numpy import load_file as np_load_file
    from safetensors.torch import load_file, save_file

    path = tmp_path_factory.mktemp("st_single") / "all_dtypes.safetensors"
    tensors = {
        f"{dt}.{sk}": random_tensor(f"{dt}.{sk}", dt, shape) for dt in DTYPES for sk, shape in SHAPES.items()
    }
    save_file(tensors, str(path), metadata={"format": "pt", "note": "jreshard test"})
    expected = {k: to_numpy(v) for k, v in load_file(str(path)).items()}
    # The fixture itself: safetensors wrote what we gave it, with the dtype strings of the format ...
    header = header_of(path)
    for name, t in tensors.items():
        assert_same(expected[name], to_numpy(t), name)
        assert header[name]["dtype"] == DTYPES[name.split(".")[0]][0], name
    # ... and safetensors' numpy reader agrees wherever numpy knows the dtype (it refuses fp8, so those
    # tensors are left out of this second file).
    side = path.with_name("numpy_readable.safetensors")
    readable = {k: v for k, v in tensors.items() if not k.startswith("float8")}
    save_file(readable, str(side))
    np_ref = np_load_file(str(side))
    assert set(np_ref) == set(readable)
    for name, arr in np_ref.items():
        assert arr.shape == expected[name].shape and arr.tobytes() == expected[name].tobytes(), name
    return path, expected


@pytest.fixture(scope="module")
def numpy_file(tmp_path_factory):
    """A file written by safetensors.numpy.save_file (bf16 as ml_dtypes)."""
    from safetensors.numpy import load_file, save_file

    rng = np.random.default_rng(0)
    arrays = {
        "emb": rng.standard_normal((32, 16)).astype(np.float32),
        "half": rng.standard_normal((8, 8, 4)).astype(np.float16),
        "bf": rng.standard_normal((16, 4)).astype(ml_dtypes.bfloat16),
        "ids": rng.integers(-(2**62), 2**62, size=(24,), dtype=np.int64),
        "u16": rng.integers(0, 2**16, size=(4, 6), dtype=np.uint16),
        "mask": rng.integers(0, 2, size=(8, 3)).astype(bool),
        "cplx": (rng.standard_normal((8, 2)) + 1j * rng.standard_normal((8, 2))).astype(np.complex64),
        "scalar": np.array(3.25, dtype=np.float64),
    }
    path = tmp_path_factory.mktemp("st_numpy") / "np.safetensors"
    save_file(arrays, str(path))
    expected = load_file(str(path))
    for k, v in arrays.items():
        assert_same(expected[k], v, k)
    return path, expected


SHARDED_TENSORS = {
    # name: (dtype, shape)
    "model.embed_tokens.weight": ("bfloat16", (64, 32)),
    "model.layers.0.self_attn.q_proj.weight": ("float32", (32, 32)),
    "model.layers.0.self_attn.k_proj.weight": ("float32", (16, 32)),
    "model.layers.0.mlp.up_proj.weight": ("float16", (64, 32)),
    "model.layers.0.input_layernorm.weight": ("float32", (32,)),
    "model.layers.1.self_attn.q_proj.weight": ("bfloat16", (32, 32)),
    "model.layers.1.mlp.up_proj.weight": ("float8_e4m3fn", (64, 32)),
    "model.layers.1.input_layernorm.weight": ("float32", (32,)),
    "model.norm.weight": ("float32", (32,)),
    "lm_head.weight": ("bfloat16", (64, 32)),
    "model.rotary.inv_freq_count": ("int64", ()),
}


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory):
    """A Hugging Face style sharded checkpoint: model-0000X-of-00003.safetensors + model.safetensors.index.json."""
    from safetensors.torch import load_file, save_file

    d = tmp_path_factory.mktemp("st_sharded")
    names = sorted(SHARDED_TENSORS)
    files = [f"model-{i + 1:05d}-of-00003.safetensors" for i in range(3)]
    groups = {f: {} for f in files}
    for i, name in enumerate(names):
        dt, shape = SHARDED_TENSORS[name]
        groups[files[i % 3]][name] = random_tensor(name, dt, shape)
    weight_map, total = {}, 0
    for f, tensors in groups.items():
        save_file(tensors, str(d / f), metadata={"format": "pt"})
        for n, t in tensors.items():
            weight_map[n] = f
            total += t.numel() * t.element_size()
    with open(d / "model.safetensors.index.json", "w") as fh:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh, indent=2)
    expected = {}
    for f in files:
        expected.update({k: to_numpy(v) for k, v in load_file(str(d / f)).items()})
    assert sorted(expected) == names
    return d, expected


@pytest.fixture(scope="module")
def meshes():
    assert len(jax.devices()) == 8, jax.devices()
    return {k: make_mesh(k) for k in MESH_SHAPES}


# ---------------------------------------------------------------------------------------------
# catalog and whole-tensor reads
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("io", IOS)
def test_all_dtypes_catalog(all_dtypes_file, io):
    path, expected = all_dtypes_file
    with jreshard.open(path, io=io) as ck:
        check_catalog(ck, expected)
        assert dict(ck.objects) == {}


@pytest.mark.parametrize("io", IOS)
def test_all_dtypes_read_bitwise(all_dtypes_file, io):
    path, expected = all_dtypes_file
    with jreshard.open(path, io=io) as ck:
        for name, ref in expected.items():
            got = ck.read(name)
            assert isinstance(got, np.ndarray)
            assert_same(got, ref, name)


@pytest.mark.parametrize("io", IOS)
def test_all_dtypes_sub_boxes(all_dtypes_file, io):
    path, expected = all_dtypes_file
    boxes = {
        "grid": [(slice(3, 11), slice(2, 7)), (slice(0, 16), slice(5, 6)), (slice(15, 16), slice(0, 8))],
        "odd": [(slice(1, 4), slice(0, 7)), (slice(0, 5), slice(3, 5))],
        "cube": [(slice(1, 3), slice(2, 7), slice(1, 5)), (slice(0, 4), slice(0, 8), slice(5, 6)), (slice(2, 3), slice(3, 4), slice(0, 16))],
    }
    with jreshard.open(path, io=io) as ck:
        for dt in DTYPES:
            for sk, bxs in boxes.items():
                name = f"{dt}.{sk}"
                for box in bxs:
                    assert_same(ck.read(name, box), expected[name][box], f"{name}{box}")


@pytest.mark.parametrize("io", IOS)
def test_numpy_written_file(numpy_file, io):
    path, expected = numpy_file
    with jreshard.open(str(path), io=io) as ck:
        assert set(ck.tensors) == set(expected)
        for name, ref in expected.items():
            assert tuple(ck.tensors[name].shape) == ref.shape
            assert np.dtype(ck.tensors[name].dtype) == ref.dtype
            assert_same(ck.read(name), ref, name)


def test_file_url(numpy_file):
    path, expected = numpy_file
    with jreshard.open(f"file://{path}") as ck:
        assert_same(ck.read("emb", (slice(4, 20), slice(3, 9))), expected["emb"][4:20, 3:9], "emb")


@pytest.mark.parametrize("io", IOS)
@pytest.mark.parametrize("how", ["dir", "index_file", "dir_url"])
def test_sharded_directory(sharded_dir, io, how):
    d, expected = sharded_dir
    source = {"dir": str(d), "index_file": str(d / "model.safetensors.index.json"), "dir_url": f"file://{d}/"}[how]
    with jreshard.open(source, io=io) as ck:
        assert set(ck.tensors) == set(expected)
        for name, ref in expected.items():
            assert tuple(ck.tensors[name].shape) == ref.shape, name
            assert np.dtype(ck.tensors[name].dtype) == ref.dtype, name
            assert_same(ck.read(name), ref, name)
        box = (slice(8, 40), slice(1, 31))
        assert_same(ck.read("lm_head.weight", box), expected["lm_head.weight"][box], "lm_head box")


def test_single_file_directory(tmp_path, numpy_file):
    """A directory holding model.safetensors (no index)."""
    path, expected = numpy_file
    shutil.copy(path, tmp_path / "model.safetensors")
    with jreshard.open(tmp_path) as ck:
        assert set(ck.tensors) == set(expected)
        assert_same(ck.read("half"), expected["half"], "half")


def test_local_read_bytes_are_bounded(sharded_dir):
    """Reading a box of rows reads about that many bytes, not the whole tensor or file."""
    d, expected = sharded_dir
    with jreshard.open(d, io="posix") as ck:
        before = ck.io_stats.bytes_read
        name = "model.layers.0.mlp.up_proj.weight"  # float16 (64, 32)
        box = (slice(10, 30), slice(0, 32))
        assert_same(ck.read(name, box), expected[name][box], name)
        needed = box_nbytes(box, expected[name].shape, 2)
        assert 0 < ck.io_stats.bytes_read - before <= needed + 512


@pytest.mark.parametrize("io", IOS)
@pytest.mark.parametrize("spec_key", ["P(None,data)", "P(None,model)", "P(model,data)"])
def test_load_reads_each_byte_about_once(tmp_path, meshes, io, spec_key):
    """Column shardings split every row of a C-ordered tensor between devices: all devices together still
    need each byte once, so about the file's tensor bytes are read (plus the header), whatever the io."""
    from safetensors.numpy import save_file

    a = np.random.default_rng(1).standard_normal((512, 256)).astype(np.float32)
    path = tmp_path / "cols.safetensors"
    save_file({"w": a}, str(path))
    header_bytes = os.path.getsize(path) - a.nbytes
    mesh = meshes["2x4"]
    spec = {"P(None,data)": P(None, "data"), "P(None,model)": P(None, "model"), "P(model,data)": P("model", "data")}[spec_key]
    t = jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, spec))
    with jreshard.open(path, io=io) as ck:
        out = ck.load({"w": t})
        check_loaded_array(out["w"], t, a, "w")
        assert ck.io_stats.bytes_read <= 1.1 * a.nbytes + header_bytes, (ck.io_stats, a.nbytes)


# ---------------------------------------------------------------------------------------------
# loading onto meshes
# ---------------------------------------------------------------------------------------------


def _targets(expected: dict, mesh, spec) -> dict:
    mesh_shape = dict(mesh.shape)
    return {
        name: jax.ShapeDtypeStruct(ref.shape, ref.dtype, sharding=NamedSharding(mesh, spec))
        for name, ref in expected.items()
        if spec_fits(spec, ref.shape, mesh_shape)
    }


LOAD_CASES = [
    (m, s)
    for m, (mshape, mnames) in MESH_SHAPES.items()
    for s in SPECS
    if any(spec_fits(SPECS[s], shape, dict(zip(mnames, mshape))) for shape in SHAPES.values() if shape)
    and SPECS[s] != P()  # P() is covered once below
] + [("2x4", "P()")]


@pytest.mark.parametrize("io", IOS)
@pytest.mark.parametrize("mesh_key,spec_key", LOAD_CASES, ids=[f"{m}-{s}" for m, s in LOAD_CASES])
def test_load_all_dtypes_onto_mesh(all_dtypes_file, meshes, io, mesh_key, spec_key):
    path, expected = all_dtypes_file
    mesh, spec = meshes[mesh_key], SPECS[spec_key]
    targets = _targets(expected, mesh, spec)
    assert targets, "no tensor fits this spec"
    with jreshard.open(path, io=io) as ck:
        out = ck.load(targets)
    assert set(out) == set(targets)
    for name, t in targets.items():
        check_loaded_array(out[name], t, expected[name], f"{name} {mesh_key} {spec_key}")


@pytest.mark.parametrize("io", IOS)
@pytest.mark.parametrize("mesh_key,spec_key", [("2x4", "P(data,model)"), ("8", "P(data)"), ("4x2", "P(model,data)"),
                                               ("2x4", "P(None,model)"), ("8", "P()")])
def test_load_sharded_directory_onto_mesh(sharded_dir, meshes, io, mesh_key, spec_key):
    d, expected = sharded_dir
    mesh, spec = meshes[mesh_key], SPECS[spec_key]
    targets = _targets(expected, mesh, spec)
    # tensors the spec does not tile are loaded replicated, so every tensor is covered
    for name, ref in expected.items():
        targets.setdefault(name, jax.ShapeDtypeStruct(ref.shape, ref.dtype, sharding=NamedSharding(mesh, P())))
    out = jreshard.load(str(d), nest(targets), io=io)
    flat = {}

    def walk(tree, prefix=""):
        for k, v in tree.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                flat[f"{prefix}{k}"] = v

    walk(out)
    assert set(flat) == set(expected)
    for name, t in targets.items():
        check_loaded_array(flat[name], t, expected[name], f"{name} {mesh_key} {spec_key}")


def test_load_with_cast(numpy_file, meshes):
    """A target dtype different from the saved one is a cast (expected value: numpy's astype)."""
    path, expected = numpy_file
    mesh = meshes["2x4"]
    t = jax.ShapeDtypeStruct((32, 16), np.float16, sharding=NamedSharding(mesh, P("data", "model")))
    out = jreshard.load(path, {"emb": t}, cast="unsafe")  # float32 -> float16 may round: asked for
    check_loaded_array(out["emb"], t, expected["emb"], "emb as float16")


# ---------------------------------------------------------------------------------------------
# broken files
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("io", IOS)
@pytest.mark.parametrize("dtype", ["F4", "F6_E2M3", "F6_E3M2", "Q9"])
def test_unsupported_dtype(tmp_path, io, dtype):
    path = tmp_path / "odd.safetensors"
    header = {
        "__metadata__": {"format": "pt"},
        "ok": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
        "odd": {"dtype": dtype, "shape": [4, 8], "data_offsets": [16, 32]},
    }
    write_raw_safetensors(path, header, bytes(range(32)))
    with pytest.raises(errors.CheckpointFormatError) as ei:
        ck = jreshard.open(path, io=io)
        ck.read("odd")
    assert dtype in str(ei.value)
    assert isinstance(ei.value, errors.JReshardError)


@pytest.mark.parametrize("io", IOS)
@pytest.mark.parametrize("cut", ["data", "header", "length"])
def test_truncated_file(tmp_path, numpy_file, io, cut):
    src, expected = numpy_file
    raw = src.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    keep = {"data": len(raw) - 100, "header": 8 + n // 2, "length": 5}[cut]
    path = tmp_path / "cut.safetensors"
    path.write_bytes(raw[:keep])
    exc = errors.TruncatedDataError if cut != "header" else (errors.TruncatedDataError, errors.CheckpointFormatError)
    with pytest.raises(exc):
        ck = jreshard.open(path, io=io)
        for name in expected:
            ck.read(name)


@pytest.mark.parametrize("io", IOS)
def test_truncated_file_in_load(tmp_path, numpy_file, meshes, io):
    src, expected = numpy_file
    raw = src.read_bytes()
    header = header_of(src)
    # cut inside the last tensor's data
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    path = tmp_path / "cut.safetensors"
    path.write_bytes(raw[:-3])
    ref = expected[last]
    t = jax.ShapeDtypeStruct(ref.shape, ref.dtype, sharding=NamedSharding(meshes["8"], P()))
    with pytest.raises(errors.TruncatedDataError):
        jreshard.load(path, {last: t}, io=io)


def _copy_sharded(sharded_dir, tmp_path):
    d, expected = sharded_dir
    dst = tmp_path / "sharded"
    shutil.copytree(d, dst)
    with open(dst / "model.safetensors.index.json") as f:
        index = json.load(f)
    return dst, index, expected


def _write_index(dst, index):
    with open(dst / "model.safetensors.index.json", "w") as f:
        json.dump(index, f)


@pytest.mark.parametrize("io", IOS)
@pytest.mark.parametrize("how", ["dir", "index_file"])
def test_index_lists_absent_tensor(sharded_dir, tmp_path, io, how):
    dst, index, _ = _copy_sharded(sharded_dir, tmp_path)
    index["weight_map"]["model.layers.2.ghost.weight"] = "model-00002-of-00003.safetensors"
    _write_index(dst, index)
    source = dst if how == "dir" else dst / "model.safetensors.index.json"
    with pytest.raises(errors.MissingDataError) as ei:
        jreshard.open(source, io=io)
    assert "model.layers.2.ghost.weight" in str(ei.value)


@pytest.mark.parametrize("io", IOS)
def test_index_lists_absent_file(sharded_dir, tmp_path, io):
    dst, index, _ = _copy_sharded(sharded_dir, tmp_path)
    os.remove(dst / "model-00003-of-00003.safetensors")
    with pytest.raises(errors.MissingDataError) as ei:
        ck = jreshard.open(dst, io=io)
        for name in index["weight_map"]:
            ck.read(name)
    assert "model-00003-of-00003.safetensors" in str(ei.value)


def test_index_points_to_wrong_file(sharded_dir, tmp_path):
    dst, index, _ = _copy_sharded(sharded_dir, tmp_path)
    name = next(n for n, f in index["weight_map"].items() if f == "model-00001-of-00003.safetensors")
    index["weight_map"][name] = "model-00002-of-00003.safetensors"
    _write_index(dst, index)
    with pytest.raises(errors.InconsistentCheckpointError):
        jreshard.open(dst)


def test_header_size_mismatch(tmp_path):
    """data_offsets that do not match shape x dtype."""
    path = tmp_path / "bad.safetensors"
    write_raw_safetensors(path, {"x": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 60]}}, bytes(64))
    with pytest.raises(errors.InconsistentCheckpointError):
        jreshard.open(path)


def test_not_a_safetensors_file(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"\xff" * 64)
    with pytest.raises(errors.CheckpointFormatError):
        jreshard.open(path)
