"""Training state beside the tensors: numpy scalars, arrays and random generators, bytes and ``io.BytesIO``,
``torch.device`` and ``torch.dtype``, OrderedDict / defaultdict / Counter, sets and the other builtins, saved by
torch as ``.pt`` (zip and legacy format) and through DCP, decoded torch-free; and one naming rule for every
format (DCP's ``flatten_state_dict``).

Expected values: ``torch.load(weights_only=False)`` of the ``.pt`` files, and for DCP what ``dcp.load`` reads back
in the child process that wrote the checkpoint (into the flattened state dict); both named by torch's own
``flatten_state_dict``. What a torch
type becomes torch-free is spelled out in :func:`check_same`.
"""

from __future__ import annotations

import collections
import copy
import io
import pickle
import random
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jreshard
from jreshard.unpickle import NumpyRandomState, PickledOrderedDict, safe_loads
from tests.helpers import child_env, make_mesh
from tests.test_torchsave import NP_DTYPES, to_numpy, torch_flatten

FORMATS = ("zip", "legacy", "dcp")


def training_state() -> dict:
    """A state dict of the objects training code saves, beside a few tensors."""
    import torch

    rs = np.random.RandomState(11)
    rs.standard_normal(3)  # leaves a cached gaussian (has_gauss=1)
    gen = np.random.default_rng(5)
    gen.random(2)
    spawned = np.random.default_rng([1, 2, 3]).spawn(2)[1]  # a seed sequence with a spawn key
    bio = io.BytesIO(b"loader state \x00\xff")
    bio.seek(3)
    return {
        "step": 7,
        "best_metric": np.float64(0.125),
        "scalars": {"i64": np.int64(-3), "u8": np.uint8(200), "b": np.bool_(True), "c64": np.complex64(1 - 2j),
                    "f16": np.float16(1.5), "nan": np.float32("nan")},
        "arrays": {"f32": np.arange(12, dtype=np.float32).reshape(3, 4), "zero_d": np.array(2.5),
                   "empty": np.zeros((0, 3), np.int16), "fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
                   "bool": np.array([True, False]), "c128": np.array([1 + 1j, -2j]), "big_endian": np.arange(4, dtype=">i4"),
                   "u64": np.array([2**64 - 1], np.uint64)},
        "rng": {"numpy_global": np.random.RandomState(3).get_state(), "pcg": np.random.default_rng(3).bit_generator.state,
                "python": random.Random(4).getstate()},
        "rng_objects": (rs, gen, spawned, np.random.Generator(np.random.MT19937(9)), np.random.PCG64DXSM(4)),
        "blobs": {"bytes": b"\x00\x01abc\xff", "empty": b"", "bytearray": bytearray(b"xy"), "bio": bio},
        "devices": {"cuda": torch.device("cuda", 1), "cpu": torch.device("cpu"), "meta": torch.device("meta")},
        "dtypes": {"f32": torch.float32, "bf16": torch.bfloat16, "f8": torch.float8_e4m3fn, "i64": torch.int64,
                   "in_list": [torch.float16, torch.bool]},
        "containers": (collections.OrderedDict([("b", 1), ("a", 2)]), collections.defaultdict(list, {"x": [1]}),
                       collections.defaultdict(None, {1: 2}), collections.defaultdict(int),
                       collections.Counter("hello"), {1, 2, 3}, frozenset({"a"}), 1 + 2j, slice(1, 5, 2), range(3)),
        "nested_lists": [[1, 2], [3]],
        "tuple_of_tensors": (torch.arange(3), 2),
        "list_mixed": [torch.ones(2), 5, {"k": torch.zeros(1)}],
        "empty_dict": {},
        "empty_list": [],
        "int_keys": {0: {"exp_avg": torch.ones(2)}, 1: "x"},
        "w": torch.arange(32, dtype=torch.float32).reshape(4, 8),
    }


def check_same(ours, ref, where: str, decoder: bool = False) -> None:
    """``ours`` (jreshard) is what torch-free users get for ``ref`` (torch): tensors as numpy arrays (bitwise),
    torch.device as its string, torch.dtype as the numpy / ml_dtypes dtype, numpy random generators as
    NumpyRandomState (same state; restore() continues the same stream), BytesIO as a new BytesIO with the same
    bytes and position, everything else as itself (same type, bitwise for numbers). ``decoder``: ``ours`` comes
    straight from the decoder (``safe_loads``), where an OrderedDict is still jreshard's PickledOrderedDict."""
    import torch

    if isinstance(ref, torch.Tensor):
        assert type(ours) is np.ndarray, where
        expected = to_numpy(ref)
        assert ours.dtype == expected.dtype and ours.shape == expected.shape and ours.tobytes() == expected.tobytes(), where
    elif isinstance(ref, torch.device):
        assert type(ours) is str and ours == str(ref), (where, ours)
    elif isinstance(ref, torch.dtype):
        assert ours == NP_DTYPES[str(ref).removeprefix("torch.")], (where, ours)
    elif isinstance(ref, (np.random.RandomState, np.random.Generator, np.random.BitGenerator)):
        assert type(ours) is NumpyRandomState, where
        ref = copy.deepcopy(ref)
        if isinstance(ref, np.random.RandomState):
            assert ours.kind == "RandomState"
            check_same(ours.state, ref.get_state(legacy=False), where + ".state", decoder)
            draw = lambda g: g.standard_normal(5)  # uses the cached gaussian first
        else:
            bit_gen = ref if isinstance(ref, np.random.BitGenerator) else ref.bit_generator
            assert ours.kind == ("Generator" if isinstance(ref, np.random.Generator) else "BitGenerator")
            assert ours.bit_generator == type(bit_gen).__name__
            check_same(ours.state, bit_gen.state, where + ".state", decoder)
            seq = bit_gen.seed_seq
            assert ours.seed_sequence == {"entropy": seq.entropy, "spawn_key": tuple(seq.spawn_key),
                                          "pool_size": seq.pool_size, "n_children_spawned": seq.n_children_spawned}
            if isinstance(ref, np.random.BitGenerator):
                ref = np.random.Generator(ref)
            draw = lambda g: (g if isinstance(g, np.random.Generator) else np.random.Generator(g)).random(5)
            restored = ours.restore()
            if isinstance(restored, np.random.Generator):
                assert restored.bit_generator.seed_seq.spawn_key == seq.spawn_key, where
        assert draw(ours.restore()).tobytes() == draw(ref).tobytes(), where
    elif isinstance(ref, io.BytesIO):
        assert type(ours) is io.BytesIO and ours is not ref, where
        assert ours.getvalue() == ref.getvalue() and ours.tell() == ref.tell(), where
    elif isinstance(ref, (np.ndarray, np.generic)):
        assert type(ours) is type(ref) and ours.dtype == ref.dtype and ours.shape == ref.shape, (where, ours)
        assert ours.tobytes() == ref.tobytes(), where
        if isinstance(ref, np.ndarray):
            assert ours.flags.f_contiguous == ref.flags.f_contiguous and ours.flags.writeable, where
    elif isinstance(ref, dict):
        loose = decoder and type(ref) is collections.OrderedDict and type(ours) is PickledOrderedDict
        assert type(ours) is type(ref) or loose, (where, type(ours))
        assert list(ours) == list(ref), where
        if isinstance(ref, collections.defaultdict):
            assert ours.default_factory is ref.default_factory, where
        for k in ref:
            check_same(ours[k], ref[k], f"{where}[{k!r}]", decoder)
    elif isinstance(ref, (list, tuple)):
        assert type(ours) is type(ref) and len(ours) == len(ref), where
        for i, (a, b) in enumerate(zip(ours, ref)):
            check_same(a, b, f"{where}[{i}]", decoder)
    elif isinstance(ref, float):
        assert type(ours) is float and np.float64(ours).tobytes() == np.float64(ref).tobytes(), where
    else:
        assert type(ours) is type(ref) and ours == ref, (where, ours, ref)


# ---------------------------------------------------------------------------------------------
# the checkpoints: .pt (zip, legacy) in this process, DCP in a child process with torch's reading of it
# ---------------------------------------------------------------------------------------------

_DCP_CHILD = textwrap.dedent("""
    import copy, pickle, sys
    import torch
    import torch.distributed.checkpoint as dcp

    src, out_dir, ref = sys.argv[1:4]
    with open(src, "rb") as f:
        state = pickle.load(f)
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict

    dcp.save(state, checkpoint_id=out_dir, no_dist=True)
    template = flatten_state_dict(copy.deepcopy(state))[0]  # read back by flat name (int keys stay apart)
    dcp.load(template, checkpoint_id=out_dir, no_dist=True)
    with open(ref, "wb") as f:
        pickle.dump(template, f)
""")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{format: (path, state torch reads back)} for the training state."""
    import torch

    d = tmp_path_factory.mktemp("objects")
    state = training_state()
    out = {}
    torch.save(state, d / "state.pt")
    out["zip"] = (d / "state.pt", torch.load(d / "state.pt", weights_only=False))
    torch.save(state, d / "legacy.pt", _use_new_zipfile_serialization=False)
    out["legacy"] = (d / "legacy.pt", torch.load(d / "legacy.pt", weights_only=False))
    with open(d / "state.pkl", "wb") as f:
        pickle.dump(state, f)
    proc = subprocess.run([sys.executable, "-c", _DCP_CHILD, str(d / "state.pkl"), str(d / "dcp"), str(d / "dcp_ref.pkl")],
                          env=child_env(OMP_NUM_THREADS=1), capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-5000:]
    with open(d / "dcp_ref.pkl", "rb") as f:
        out["dcp"] = (d / "dcp", pickle.load(f))
    out["state"] = state
    return out


@pytest.mark.parametrize("fmt", FORMATS)
def test_objects_match_torch(saved, fmt):
    import torch

    path, ref = saved[fmt]
    flat = dict(torch_flatten(ref))
    with jreshard.open(path) as ck:
        objects = dict(ck.objects)
        tensors = {n for n, v in flat.items() if isinstance(v, torch.Tensor)}
        assert set(ck.tensors) == tensors
        assert set(objects) == set(flat) - tensors
        for name, value in objects.items():
            check_same(value, flat[name], f"{fmt}:{name}")
        for name in tensors:
            check_same(ck.read(name), flat[name], f"{fmt}:{name}")


def test_same_names_in_every_format(saved):
    """The same dict saved as .pt (zip, legacy) and through DCP: the same tensor and object names, DCP's."""
    import torch

    names = {}
    for fmt in FORMATS:
        with jreshard.open(saved[fmt][0]) as ck:
            names[fmt] = (set(ck.tensors), set(ck.objects))
    assert names["zip"] == names["legacy"] == names["dcp"]
    reference = dict(torch_flatten(saved["state"]))
    assert names["zip"][0] == {n for n, v in reference.items() if isinstance(v, torch.Tensor)}
    assert names["zip"][0] | names["zip"][1] == set(reference)
    # the rule, spelled out
    assert {"tuple_of_tensors", "nested_lists", "empty_list", "containers", "rng_objects"} <= names["zip"][1]
    assert {"list_mixed.0", "list_mixed.2.k", "int_keys.0.exp_avg"} <= names["zip"][0]
    assert {"list_mixed.1", "int_keys.1", "dtypes.in_list"} <= names["zip"][1]
    assert not any(n.startswith("empty_dict") for n in names["zip"][0] | names["zip"][1])


@pytest.mark.parametrize("fmt", FORMATS)
def test_objects_as_load_targets(saved, fmt):
    """A load whose target names objects beside arrays (the objects that made every such load fail)."""
    path = saved[fmt][0]
    mesh = make_mesh("2x4")
    w = jax.ShapeDtypeStruct((4, 8), np.float32, sharding=NamedSharding(mesh, P("data", "model")))
    one = jax.ShapeDtypeStruct((2,), np.float32, sharding=NamedSharding(mesh, P()))
    out = jreshard.load(path, {"w": w, "best_metric": 0, "blobs": {"bio": 0}, "devices": {"cuda": ""},
                               "list_mixed": [one, 0]})
    np.testing.assert_array_equal(np.asarray(out["w"]), np.arange(32, dtype=np.float32).reshape(4, 8))
    np.testing.assert_array_equal(np.asarray(out["list_mixed"][0]), np.ones(2, np.float32))
    assert out["list_mixed"][1] == 5
    assert type(out["best_metric"]) is np.float64 and out["best_metric"] == 0.125
    assert out["blobs"]["bio"].getvalue() == b"loader state \x00\xff" and out["devices"]["cuda"] == "cuda:1"


def test_each_read_gives_a_fresh_byte_stream(saved):
    """A BytesIO handed out is the user's: reading it does not move another one."""
    with jreshard.open(saved["zip"][0]) as a, jreshard.open(saved["zip"][0]) as b:
        first, second = a.objects["blobs.bio"], b.objects["blobs.bio"]
        assert first is not second
        first.read()
        assert second.tell() == 3


def test_dtype_without_numpy_counterpart_stays_named(tmp_path):
    import torch

    torch.save({"w": torch.ones(2), "dt": torch.complex32, "q": torch.quint8}, tmp_path / "dt.pt")
    with jreshard.open(tmp_path / "dt.pt") as ck:
        assert repr(ck.objects["dt"]) == "torch.complex32" and repr(ck.objects["q"]) == "torch.quint8"


# ---------------------------------------------------------------------------------------------
# names of what is not a dict
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("legacy", [False, True])
def test_top_level_names(tmp_path, legacy):
    import torch

    def save(obj, name):
        path = tmp_path / name
        torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
        return path

    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    bare = save(t, "bare.pt")
    with jreshard.open(bare) as ck:
        assert set(ck.tensors) == {""} and not ck.objects
        np.testing.assert_array_equal(ck.read(""), t.numpy())
        np.testing.assert_array_equal(ck.read("", (1, slice(0, 2))), t.numpy()[1, :2])
    mesh = make_mesh("2x4")
    sds = jax.ShapeDtypeStruct((2, 3), np.float32, sharding=NamedSharding(mesh, P()))
    np.testing.assert_array_equal(np.asarray(jreshard.load(bare, sds)), t.numpy())  # a pytree that is one leaf: ""
    with jreshard.open(save(5, "value.pt")) as ck:
        assert dict(ck.objects) == {"": 5} and not ck.tensors
    with jreshard.open(save(({"a": t}, {"b": t + 1}, 3), "tuple.pt")) as ck:
        assert set(ck.tensors) == {"0.a", "1.b"} and dict(ck.objects) == {"2": 3}
    with jreshard.open(save([t, [1, 2]], "list.pt")) as ck:
        assert set(ck.tensors) == {"0"} and dict(ck.objects) == {"1": [1, 2]}
    with jreshard.open(save((1, 2), "plain_tuple.pt")) as ck:
        assert dict(ck.objects) == {"": (1, 2)}


# ---------------------------------------------------------------------------------------------
# the decoder itself, where each of the three kinds of pickle goes through it
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bounded", [True, False])  # False: how DCP's .metadata is decoded
@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_safe_loads_of_plain_pickles(bounded, protocol):
    state = training_state()
    state = {k: v for k, v in state.items() if k not in ("tuple_of_tensors", "list_mixed", "int_keys", "w", "dtypes",
                                                         "devices")}
    data = pickle.dumps(state, protocol=protocol)
    check_same(safe_loads(data, "plain pickle", bounded=bounded), pickle.loads(data), "state", decoder=True)

