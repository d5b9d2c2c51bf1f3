"""Broken, hostile or mismatched inputs raise jreshard's own errors, never a partial result."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess

import numpy as np
import pytest

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jreshard
from jreshard import errors

from tests import torch_writers as tw
from tests.helpers import make_mesh

IOS = ("posix", "tensorstore")


@pytest.fixture(scope="module")
def mesh8():
    return make_mesh("8")


def _copy(checkpoints, variant, tmp_path):
    dst = tmp_path / variant
    shutil.copytree(checkpoints.dirs[variant], dst)
    return dst


def _all_targets(checkpoints, variant, mesh):
    """Every tensor of the variant, replicated (P() always tiles)."""
    refs = checkpoints.reference(variant)
    return {
        n: jax.ShapeDtypeStruct(refs[n].shape, refs[n].dtype, sharding=NamedSharding(mesh, P()))
        for n in checkpoints.names[variant]
    }


def _load_md(path):
    import torch  # noqa: F401  (classes referenced by the pickle)

    with open(path / ".metadata", "rb") as f:
        return pickle.load(f)


def _dump_md(path, md):
    with open(path / ".metadata", "wb") as f:
        pickle.dump(md, f)


def test_error_hierarchy():
    for cls in (
        errors.UnsafeCheckpointError,
        errors.CheckpointFormatError,
        errors.MissingDataError,
        errors.TruncatedDataError,
        errors.InconsistentCheckpointError,
        errors.TargetMismatchError,
        errors.ShardingError,
        errors.StorageError,
    ):
        assert issubclass(cls, errors.JReshardError)
        assert issubclass(cls, Exception)
    assert errors.JReshardError is not Exception


# ---------------------------------------------------------------------------------------------
# target mismatches
# ---------------------------------------------------------------------------------------------


def test_target_name_absent(checkpoints, mesh8):
    t = {
        "d1.s0": jax.ShapeDtypeStruct((16, 12), np.float32, sharding=NamedSharding(mesh8, P("data"))),
        "model.layers.7.w": jax.ShapeDtypeStruct((16, 16), np.float32, sharding=NamedSharding(mesh8, P())),
    }
    with pytest.raises(errors.TargetMismatchError, match=r"model\.layers\.7\.w"):
        jreshard.load(checkpoints.dirs["plain"], t)


def test_target_name_absent_nested(checkpoints, mesh8):
    t = {"model": {"layers": {"0": {"w": jax.ShapeDtypeStruct((16, 16), np.float32,
                                                               sharding=NamedSharding(mesh8, P()))},
                              "9": {"b": jax.ShapeDtypeStruct((16,), np.float32,
                                                              sharding=NamedSharding(mesh8, P()))}}}}
    with pytest.raises(errors.TargetMismatchError, match=r"model\.layers\.9\.b"):
        jreshard.load(checkpoints.dirs["zstd"], t)


@pytest.mark.parametrize("variant", ["plain", "safetensors"])
def test_target_shape_differs(checkpoints, mesh8, variant):
    t = {"d1.s0": jax.ShapeDtypeStruct((16, 13), np.float32, sharding=NamedSharding(mesh8, P("data")))}
    with pytest.raises(errors.TargetMismatchError, match=r"d1\.s0"):
        jreshard.load(checkpoints.dirs[variant], t)
    t = {"d1.vec": jax.ShapeDtypeStruct((40, 1), np.float32, sharding=NamedSharding(mesh8, P("data")))}
    with pytest.raises(errors.TargetMismatchError, match=r"d1\.vec"):
        jreshard.load(checkpoints.dirs[variant], t)


def test_target_shape_differs_in_plan(checkpoints, mesh8):
    t = {"d2.s0s1": jax.ShapeDtypeStruct((24, 16), np.float32, sharding=NamedSharding(mesh8, P("data")))}
    with pytest.raises(errors.TargetMismatchError, match=r"d2\.s0s1"):
        jreshard.plan(checkpoints.dirs["plain"], t)


def test_read_unknown_name(checkpoints):
    ck = jreshard.open(checkpoints.dirs["plain"])
    with pytest.raises((errors.JReshardError, KeyError), match="no_such_tensor"):
        ck.read("no_such_tensor")


def test_uneven_sharding(checkpoints, mesh8):
    # (10, 6) over 8 devices on dim 0: does not tile
    t = {"d1.uneven_s0": jax.ShapeDtypeStruct((10, 6), np.float32, sharding=NamedSharding(mesh8, P("data")))}
    with pytest.raises(errors.ShardingError):
        jreshard.load(checkpoints.dirs["plain"], t)
    with pytest.raises(errors.ShardingError):
        jreshard.plan(checkpoints.dirs["plain"], t)


def test_uneven_sharding_2d_mesh(checkpoints):
    mesh = make_mesh("2x4")
    t = {"d1.uneven_s1": jax.ShapeDtypeStruct((6, 10), np.float32, sharding=NamedSharding(mesh, P(None, "model")))}
    with pytest.raises(errors.ShardingError):
        jreshard.load(checkpoints.dirs["zstd"], t)


# ---------------------------------------------------------------------------------------------
# missing / truncated data files
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("io", IOS)
@pytest.mark.parametrize("variant", tw.VARIANTS)
def test_deleted_data_file(checkpoints, mesh8, tmp_path, variant, io):
    d = _copy(checkpoints, variant, tmp_path)
    os.remove(d / "__1_0.distcp")
    with pytest.raises(errors.MissingDataError, match=r"__1_0\.distcp"):
        ck = jreshard.open(d)
        ck.objects  # noqa: B018
        jreshard.load(d, _all_targets(checkpoints, variant, mesh8), io=io)


@pytest.mark.parametrize("variant", ["plain", "zstd", "threads"])
def test_deleted_data_file_read(checkpoints, tmp_path, variant):
    d = _copy(checkpoints, variant, tmp_path)
    md = _load_md(d)
    # a tensor with a chunk stored in __2_0.distcp
    name = next(k.fqn for k, s in sorted(md.storage_data.items(), key=lambda kv: kv[0].fqn)
                if s.relative_path == "__2_0.distcp" and k.offset is not None and s.length > 0)
    os.remove(d / "__2_0.distcp")
    with pytest.raises(errors.MissingDataError, match=r"__2_0\.distcp"):
        jreshard.open(d).read(name)


@pytest.mark.parametrize("io", IOS)
@pytest.mark.parametrize("variant", tw.VARIANTS)
def test_truncated_data_file(checkpoints, mesh8, tmp_path, variant, io):
    d = _copy(checkpoints, variant, tmp_path)
    f = d / "__1_0.distcp"
    size = f.stat().st_size
    with open(f, "r+b") as fh:
        fh.truncate(int(size * 0.6))
    with pytest.raises((errors.TruncatedDataError, errors.MissingDataError), match=r"__1_0\.distcp"):
        ck = jreshard.open(d)
        ck.objects  # noqa: B018
        jreshard.load(d, _all_targets(checkpoints, variant, mesh8), io=io)


def test_truncated_data_file_read(checkpoints, tmp_path):
    d = _copy(checkpoints, "plain", tmp_path)
    md = _load_md(d)
    # the chunk stored last in __3_0.distcp; cut the file in the middle of it
    k, s = max(((k, s) for k, s in md.storage_data.items() if s.relative_path == "__3_0.distcp"),
               key=lambda kv: kv[1].offset)
    assert k.offset is not None  # tensors are written after the byte objects
    with open(d / "__3_0.distcp", "r+b") as fh:
        fh.truncate(s.offset + s.length // 2)
    with pytest.raises((errors.TruncatedDataError, errors.MissingDataError), match=r"__3_0\.distcp"):
        jreshard.open(d).read(k.fqn)


# ---------------------------------------------------------------------------------------------
# inconsistent metadata
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["plain", "safetensors"])
@pytest.mark.parametrize("name,drop", [("d1.s0", 1), ("d2.s0s1", 3), ("d1.vec", 0)])
def test_metadata_hole(checkpoints, mesh8, tmp_path, variant, name, drop):
    d = _copy(checkpoints, variant, tmp_path)
    md = _load_md(d)
    chunks = md.state_dict_metadata[name].chunks
    assert all(s > 0 for s in chunks[drop].sizes)
    del chunks[drop]
    _dump_md(d, md)
    ref = checkpoints.reference(variant)[name]
    t = {name: jax.ShapeDtypeStruct(ref.shape, ref.dtype, sharding=NamedSharding(mesh8, P()))}
    with pytest.raises(errors.InconsistentCheckpointError, match=name.replace(".", r"\.")):
        jreshard.load(d, t)
    with pytest.raises(errors.InconsistentCheckpointError, match=name.replace(".", r"\.")):
        jreshard.open(d).read(name)


# ---------------------------------------------------------------------------------------------
# hostile pickles
# ---------------------------------------------------------------------------------------------


class _OsSystem:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Exec:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import builtins

        return (builtins.exec, (f"open({self.marker!r}, 'w').close()",))


class _Subprocess:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (subprocess.call, (["touch", self.marker],))


EVILS = {"os.system": _OsSystem, "builtins.exec": _Exec, "subprocess.call": _Subprocess}


def _open_and_touch_everything(d):
    ck = jreshard.open(d)
    dict(ck.tensors)
    dict(ck.objects)
    return ck


@pytest.mark.parametrize("evil", list(EVILS))
def test_unsafe_metadata_pickle(checkpoints, tmp_path, evil):
    d = _copy(checkpoints, "plain", tmp_path)
    marker = tmp_path / "pwned"
    with open(d / ".metadata", "wb") as f:
        pickle.dump(EVILS[evil](marker), f)
    with pytest.raises(errors.UnsafeCheckpointError):
        _open_and_touch_everything(d)
    assert not marker.exists()


@pytest.mark.parametrize("evil", list(EVILS))
def test_unsafe_object_inside_real_metadata(checkpoints, tmp_path, evil):
    d = _copy(checkpoints, "plain", tmp_path)
    marker = tmp_path / "pwned"
    md = _load_md(d)
    md.planner_data = dict(md.planner_data or {})
    md.planner_data["innocent"] = EVILS[evil](marker)
    _dump_md(d, md)
    with pytest.raises(errors.UnsafeCheckpointError):
        _open_and_touch_everything(d)
    assert not marker.exists()


def _plant_torch_save_archive(d, md, fqn, obj):
    """Point the storage of ``fqn`` (first item) at a fresh torch.save archive of ``obj``."""
    import io as _io

    import torch

    buf = _io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    with open(d / "__evil.distcp", "wb") as f:
        f.write(data)
    key = next(k for k in md.storage_data if k.fqn == fqn)
    info = md.storage_data[key]
    info.relative_path = "__evil.distcp"
    info.offset = 0
    info.length = len(data)
    _dump_md(d, md)


@pytest.mark.parametrize("evil", list(EVILS))
def test_unsafe_pickle_in_object_entry(checkpoints, tmp_path, evil):
    d = _copy(checkpoints, "plain", tmp_path)
    marker = tmp_path / "pwned"
    md = _load_md(d)
    _plant_torch_save_archive(d, md, "step", EVILS[evil](marker))
    with pytest.raises(errors.UnsafeCheckpointError):
        _open_and_touch_everything(d)
    assert not marker.exists()


@pytest.mark.parametrize("io", IOS)
def test_unsafe_pickle_in_tensor_chunk(checkpoints, mesh8, tmp_path, io):
    d = _copy(checkpoints, "plain", tmp_path)
    marker = tmp_path / "pwned"
    md = _load_md(d)
    _plant_torch_save_archive(d, md, "d1.s0", _OsSystem(marker))
    t = {"d1.s0": jax.ShapeDtypeStruct((16, 12), np.float32, sharding=NamedSharding(mesh8, P("data")))}
    with pytest.raises(errors.JReshardError):
        jreshard.load(d, t, io=io)
    with pytest.raises(errors.JReshardError):
        jreshard.open(d).read("d1.s0")
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# not a checkpoint
# ---------------------------------------------------------------------------------------------


def test_directory_without_metadata(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(errors.JReshardError):
        jreshard.open(tmp_path / "empty")


def test_garbage_metadata(checkpoints, tmp_path):
    d = _copy(checkpoints, "plain", tmp_path)
    (d / ".metadata").write_bytes(b"\x00\x01garbage, not a pickle" * 10)
    with pytest.raises(errors.CheckpointFormatError):
        _open_and_touch_everything(d)
