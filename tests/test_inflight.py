"""``max_inflight_bytes`` bounds the host bytes read but not yet placed, whatever the target sharding.

The bound is measured without timing: the host allocations of the load (``jreshard.place.allocate`` and
``jreshard.place.aligned_empty``, cast buffers included) are summed between two ``jreshard.place.put``
calls, i.e. per batch or part placed on devices. Values are compared exactly, shard by shard, with what
torch wrote (DCP) or with the arrays given to safetensors' writer.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest

import jax
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

import jreshard
from jreshard import place
from jreshard.errors import InvalidArgumentError, JReshardError
from tests.helpers import check_loaded_array, make_mesh

BIG = ("mp.a", "mp.b", "mp.c", "mp.d", "mp.e")  # 512 KiB .. 1 MiB each, in the "plain" variant
SOME = ("mp.a", "mp.b", "mp.d")  # float32 512x512, bfloat16 256x1024, float32 384x640
KiB, MiB = 2**10, 2**20

# name -> (mesh key, spec): every BIG tensor divides evenly under each.
SHARDINGS = {
    "rows": ("8", P("data")),
    "columns": ("8", P(None, "data")),
    "replicated": ("8", P()),
    "2d": ("2x4", P("data", "model")),
    "2d_swapped": ("4x2", P("model", "data")),
    "flat": ("2x4", P(("data", "model"))),
    "single_device": (None, None),
}


class Meter:
    """Host bytes allocated by the load since the last device_put: one entry per put in ``batches``."""

    def __init__(self) -> None:
        self.pending = 0
        self.batches: list[int] = []

    @property
    def peak(self) -> int:
        return max(self.batches, default=0)


@pytest.fixture
def meter(monkeypatch):
    m = Meter()
    real_allocate, real_empty, real_put = place.allocate, place.aligned_empty, place.put

    def allocate(shapes, *args, **kwargs):
        out = real_allocate(shapes, *args, **kwargs)
        m.pending += sum(a.nbytes for a in out)
        return out

    def aligned_empty(shape, dtype):
        out = real_empty(shape, dtype)
        m.pending += out.nbytes
        return out

    def put(host, devices):
        m.batches.append(m.pending)
        m.pending = 0
        return real_put(host, devices)

    monkeypatch.setattr(place, "allocate", allocate)
    monkeypatch.setattr(place, "aligned_empty", aligned_empty)
    monkeypatch.setattr(place, "put", put)
    return m


@pytest.fixture(scope="module")
def plain(checkpoints):
    with jreshard.open(checkpoints.dirs["plain"]) as ckpt:
        yield ckpt, checkpoints.reference("plain")


def _sharding(key):
    mesh_key, spec = SHARDINGS[key]
    if mesh_key is None:
        return SingleDeviceSharding(jax.devices()[3])
    return NamedSharding(make_mesh(mesh_key), spec)


def _distinct_bytes(shape, dtype, sharding, cast=None) -> int:
    """Host bytes of the distinct shards (a replicated shard once), with the cast buffer when casting."""
    per = np.dtype(dtype).itemsize + (np.dtype(cast).itemsize if cast is not None and np.dtype(cast) != np.dtype(dtype) else 0)
    boxes = {tuple((s.start, s.stop) for s in idx) for idx in sharding.addressable_devices_indices_map(shape).values()}
    return sum(math.prod((b or n) - (a or 0) for (a, b), n in zip(box, shape)) * per for box in boxes)


@pytest.mark.parametrize("bound", [40 * KiB, 300 * KiB])
@pytest.mark.parametrize("key", list(SHARDINGS))
def test_bound_holds_for_every_sharding(plain, meter, key, bound):
    """40 KiB: every shard is larger (read in parts); 300 KiB: sharded shards fit (batches of whole shards),
    whole tensors do not (replicated, single device: parts)."""
    ckpt, ref = plain
    sharding = _sharding(key)
    target = {n: jax.ShapeDtypeStruct(ckpt.tensors[n].shape, ckpt.tensors[n].dtype, sharding=sharding) for n in SOME}
    out = ckpt.load(target, max_inflight_bytes=bound)
    assert 0 < meter.peak <= bound, (meter.peak, bound)
    assert meter.pending == 0  # everything allocated was placed
    # Every distinct shard's bytes went through exactly once (the meter sees the whole load).
    assert sum(meter.batches) == sum(_distinct_bytes(t.shape, t.dtype, sharding) for t in target.values())
    for n in SOME:
        check_loaded_array(out[n], target[n], ref[n], f"{n} {key} bound={bound}")


def test_column_sharded_tensor_is_read_in_batches_of_whole_pieces(tmp_path, meter):
    """The case of the report: 2048x1024 float32 with P(None, "model") on 8 devices and a 2 MiB bound was
    read as one 8 MiB batch; now it is 4 batches of two 1 MiB pieces."""
    from safetensors.numpy import save_file

    w = np.random.default_rng(0).standard_normal((2048, 1024)).astype(np.float32)
    save_file({"w": w}, str(tmp_path / "w.safetensors"))
    mesh = Mesh(np.array(jax.devices()), ("model",))
    target = {"w": jax.ShapeDtypeStruct(w.shape, w.dtype, sharding=NamedSharding(mesh, P(None, "model")))}
    with jreshard.open(tmp_path / "w.safetensors") as ckpt:
        out = ckpt.load(target, max_inflight_bytes=2 * MiB)
    assert meter.batches == [2 * MiB] * 4
    check_loaded_array(out["w"], target["w"], w, "w")


def test_pieces_larger_than_the_bound_with_casts(plain, meter):
    """Cast buffers count: float32 -> float64 holds 12 bytes per element; bf16 -> float32 6."""
    ckpt, ref = plain
    bound = 100 * KiB + 4
    target = {
        "mp.a": jax.ShapeDtypeStruct((512, 512), np.float64, sharding=_sharding("columns")),
        "mp.b": jax.ShapeDtypeStruct((256, 1024), np.float32, sharding=_sharding("replicated")),
        "mp.d": jax.ShapeDtypeStruct((384, 640), ml_dtypes.bfloat16, sharding=_sharding("2d")),
    }
    out = ckpt.load(target, max_inflight_bytes=bound, cast="unsafe")  # float32 -> bfloat16 among them
    assert 0 < meter.peak <= bound
    assert sum(meter.batches) == sum(_distinct_bytes(t.shape, ckpt.tensors[n].dtype, t.sharding, t.dtype)
                                     for n, t in target.items())
    for n, t in target.items():
        check_loaded_array(out[n], t, ref[n], n)


@pytest.fixture(scope="module")
def odd_file(tmp_path_factory):
    """Every kind of tensor the parts must handle, written by safetensors.numpy.save_file."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(7)
    arrays = {
        "mask": rng.integers(0, 2, size=(24, 40)).astype(bool),
        "bf": rng.standard_normal((40, 24)).astype(ml_dtypes.bfloat16),
        "ids": rng.integers(-(2**62), 2**62, size=(9, 7), dtype=np.int64),
        "scalar": np.array(-2.75, np.float32),
        "cube": rng.standard_normal((4, 6, 40)).astype(np.float16),  # a row of 480 bytes
        "single_row": rng.standard_normal((1, 3, 64)).astype(np.float32),  # first dimension of size 1
        "empty": np.zeros((0, 16), np.float32),
        "vec": rng.standard_normal(50).astype(np.float32),
    }
    path = tmp_path_factory.mktemp("inflight") / "odd.safetensors"
    save_file(arrays, str(path))
    return path, arrays


ODD_TARGETS = {
    # name: (mesh key or None, spec)
    "mask": ("2x4", P("data", "model")),
    "bf": ("8", P("data")),
    "ids": (None, None),
    "scalar": ("8", P()),
    "cube": ("2x4", P(None, "data", "model")),
    "single_row": ("8", P()),
    "empty": ("8", P(None, "data")),
    "vec": ("2x4", P("data")),
}


@pytest.mark.parametrize("bound", [8, 100, 1000])
def test_parts_are_exact_for_every_dtype(odd_file, meter, bound):
    path, arrays = odd_file
    target = {}
    for n, (mesh_key, spec) in ODD_TARGETS.items():
        sharding = SingleDeviceSharding(jax.devices()[5]) if mesh_key is None else NamedSharding(make_mesh(mesh_key), spec)
        target[n] = jax.ShapeDtypeStruct(arrays[n].shape, arrays[n].dtype, sharding=sharding)
    calls = []
    with jreshard.open(path) as ckpt:
        out = ckpt.load(target, max_inflight_bytes=bound, progress=calls.append)
    assert meter.peak <= bound
    total = sum(a.nbytes for a in arrays.values())
    assert calls[-1]["bytes_done"] == calls[-1]["bytes_total"] == total
    assert all(a["bytes_done"] <= b["bytes_done"] for a, b in zip(calls, calls[1:]))
    if bound == 8:
        assert len(meter.batches) > 100  # element by element for most tensors
    for n, t in target.items():
        check_loaded_array(out[n], t, arrays[n], f"{n} bound={bound}")


def test_default_bound_keeps_one_batch(plain, meter):
    ckpt, ref = plain
    sharding = _sharding("2d")
    target = {n: jax.ShapeDtypeStruct(ckpt.tensors[n].shape, ckpt.tensors[n].dtype, sharding=sharding) for n in BIG}
    out = ckpt.load(target)
    assert len(meter.batches) == 1  # the fast path: every piece in one batch
    for n in BIG:
        check_loaded_array(out[n], target[n], ref[n], n)


def test_progress_counters_with_parts(plain):
    ckpt, _ = plain
    target = {n: jax.ShapeDtypeStruct(ckpt.tensors[n].shape, ckpt.tensors[n].dtype, sharding=_sharding("replicated"))
              for n in SOME}
    calls = []
    ckpt.load(target, max_inflight_bytes=300 * KiB, progress=calls.append)
    total = sum(ckpt.tensors[n].nbytes for n in SOME)
    assert len(calls) > len(SOME)  # 1 MiB tensors in parts of at most 300 KiB
    assert [c["bytes_total"] for c in calls] == [total] * len(calls)
    done = [c["bytes_done"] for c in calls]
    assert done == sorted(done) and done[-1] == total
    steps = np.diff([0] + done)
    assert (steps > 0).all() and (steps <= 300 * KiB).all()


@pytest.mark.parametrize("bad", [0, -1, 3, 1.5, "1k", True])
def test_bound_below_one_element_is_refused(plain, bad):
    ckpt, _ = plain
    t = ckpt.tensors["mp.a"]  # float32: 4 bytes per element
    target = {"mp.a": jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=_sharding("rows"))}
    before = ckpt.io_stats.bytes_read
    with pytest.raises(InvalidArgumentError) as e:
        ckpt.load(target, max_inflight_bytes=bad)
    assert isinstance(e.value, JReshardError) and isinstance(e.value, ValueError)
    assert "max_inflight_bytes" in str(e.value)
    assert ckpt.io_stats.bytes_read == before  # refused before reading


def test_bound_counts_the_cast_element(plain):
    ckpt, ref = plain
    t = ckpt.tensors["mp.e"]  # float32, loaded as float64: 12 bytes per element on the host
    target = {"mp.e": jax.ShapeDtypeStruct(t.shape, np.float64, sharding=_sharding("rows"))}
    with pytest.raises(InvalidArgumentError, match="'mp.e'.*12"):
        ckpt.load(target, max_inflight_bytes=8)


def test_bound_of_exactly_one_element(odd_file, meter):
    path, arrays = odd_file
    with jreshard.open(path) as ckpt:
        target = {"vec": jax.ShapeDtypeStruct((50,), np.float32, sharding=_sharding("single_device"))}
        out = ckpt.load(target, max_inflight_bytes=4)
    assert meter.batches == [4] * 50
    check_loaded_array(out["vec"], target["vec"], arrays["vec"], "vec")
