"""Hostile checkpoints, one class of inputs at a time: every case ends in the original values or a
``JReshardError`` naming the file — never another exception, a signal, a hang, a file outside the
checkpoint, memory blow-up or wrong numbers.

Pickles are assembled opcode by opcode; torch-written checkpoints get their metadata rewritten (with torch's
own classes); files are built by torch / safetensors and then edited. Expected values come from numpy
(``as_strided`` over the saved storage) or from what the test wrote, never from jreshard.
"""

from __future__ import annotations

import collections
import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jreshard
from jreshard import errors
from jreshard.unpickle import safe_loads

from tests.helpers import child_env

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _str(s: str) -> bytes:
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def _glob(module: str, name: str) -> bytes:
    return f"c{module}\n{name}\n".encode()


def _run_child(code: str, *, timeout: float = 120, mem_gib: float | None = None) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (optionally with an address-space cap); never kills pytest."""
    pre = ""
    if mem_gib is not None:
        pre = ("import resource; resource.setrlimit(resource.RLIMIT_AS, "
               f"({int(mem_gib * 2**30)}, {int(mem_gib * 2**30)}))\n")
    return subprocess.run([sys.executable, "-c", pre + textwrap.dedent(code)], env=child_env(), capture_output=True,
                          text=True, timeout=timeout)


# ---------------------------------------------------------------------------------------------
# 1. The unpickler: memory safety, poisoning, allocation budget, depth
# ---------------------------------------------------------------------------------------------

NP = "numpy._core.multiarray"


def _dtype_pickle(name: str, state: bytes | None) -> bytes:
    """numpy.dtype(name, False, True) [+ BUILD state]."""
    out = _glob("numpy", "dtype") + _str(name) + b"\x89\x88\x87R"
    return out + (state + b"b" if state is not None else b"")


PLAIN_F8_STATE = b"(K\x03" + _str("<") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00t"


def _array_pickle(dtype: bytes, shape: tuple, raw: bytes) -> bytes:
    shape_ops = b"(" + b"".join(b"J" + struct.pack("<i", s) for s in shape) + b"t"
    return (b"\x80\x02" + _glob(NP, "_reconstruct") + _glob("numpy", "ndarray") + b"K\x00\x85C\x01b\x87R"
            + b"(K\x01" + shape_ops + dtype + b"\x89B" + struct.pack("<I", len(raw)) + raw + b"tb.")


def test_plain_numpy_array_decodes_exactly():
    arr = np.arange(6, dtype="<f8").reshape(2, 3)
    data = _array_pickle(_dtype_pickle("f8", PLAIN_F8_STATE), (2, 3), arr.tobytes())
    out = safe_loads(data, "plain")
    assert type(out) is np.ndarray and out.dtype == np.float64
    np.testing.assert_array_equal(out, arr)


@pytest.mark.parametrize("proto", [2, 4, 5])
def test_numpy_values_of_every_protocol(proto):
    values = {"a": np.arange(12, dtype=">i4").reshape(3, 4), "f": np.asfortranarray(np.ones((2, 3))),
              "s": np.float32(1.5), "d": np.dtype("f2"), "e": np.zeros((0, 3)), "rng": ("MT19937", np.arange(5, dtype=np.uint32))}
    data = pickle.dumps(values, protocol=proto)
    out, numpy_reads = safe_loads(data, "numpy values"), pickle.loads(data)
    for k in ("a", "f", "e"):  # byte order as numpy restores it: native below protocol 5, the saved one at 5
        assert out[k].dtype == numpy_reads[k].dtype and out[k].shape == values[k].shape
        np.testing.assert_array_equal(out[k], values[k])
    assert out["f"].flags["F_CONTIGUOUS"]
    assert out["s"] == np.float32(1.5) and out["d"] == np.dtype("f2")
    np.testing.assert_array_equal(out["rng"][1], values["rng"][1])


@pytest.mark.parametrize("name", ["O", "O8", "V16", "S4", "U2", "M8[s]", "(2,)f4", "f4,i4"])
def test_numpy_dtypes_other_than_plain_numbers_are_refused(name):
    data = _array_pickle(_dtype_pickle(name, None), (2,), b"\x00" * 16)
    with pytest.raises(errors.JReshardError):
        safe_loads(data, "object dtype")


@pytest.mark.parametrize("state", [
    # flags cleared / set (object-ness lives there), a field at offset 2**40, a subarray, metadata
    b"(K\x03" + _str("|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x3ft",
    b"(K\x03" + _str("<") + b"N(" + _str("a") + b"t}" + _str("a") + b"(" + _glob("numpy", "dtype") + _str("f8")
    + b"\x89\x88\x87R\x8a\x06\x00\x00\x00\x00\x00\x01tsJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00t",
    b"(K\x03" + _str("<") + b"(" + _glob("numpy", "dtype") + _str("f8") + b"\x89\x88\x87R(K\x02tt"
    + b"NNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00t",
    b"(K\x04" + _str("<") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00}t",
    b"(K\x03" + _str("<") + b"NNNJ\x00\x00\x01\x00J\xff\xff\xff\xffK\x00t",  # elsize 65536
])
def test_dtype_state_beyond_a_byte_order_is_refused(state):
    with pytest.raises(errors.JReshardError):
        safe_loads(b"\x80\x02" + _dtype_pickle("f8", state) + b".", "dtype state")
    arr = _array_pickle(_dtype_pickle("f8", state), (1,), b"\x00" * 8)
    with pytest.raises(errors.JReshardError):
        safe_loads(arr, "dtype state in array")


def test_numpy_dtype_singleton_is_not_touched():
    """BUILD on numpy.dtype would mutate numpy's shared float64 descriptor for the whole process."""
    state = b"(K\x03" + _str(">") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00t"
    out = safe_loads(b"\x80\x02" + _dtype_pickle("f8", state) + b".", "big endian f8")
    assert out == np.dtype(">f8")
    assert np.dtype("f8").byteorder in ("=", "<") and np.dtype("f8").isnative


@pytest.mark.parametrize("data", [
    # NEWOBJ numpy.ndarray(shape, dtype, buffer=...) with an object dtype over attacker bytes
    b"\x80\x02" + _glob("numpy", "ndarray") + b"(K\x01\x85" + _str("O") + _glob("builtins", "bytearray")
    + b"C\x08AAAAAAAA\x85Rt\x81.",
    # _reconstruct of something that is not ndarray
    b"\x80\x02" + _glob(NP, "_reconstruct") + _glob("builtins", "set") + b"K\x00\x85C\x01b\x87R.",
    # array state whose bytes do not match the shape
    _array_pickle(_dtype_pickle("f8", PLAIN_F8_STATE), (4,), b"\x00" * 8),
    _array_pickle(_dtype_pickle("f8", PLAIN_F8_STATE), (-1,), b""),
    # a second BUILD on a built array
    _array_pickle(_dtype_pickle("f8", PLAIN_F8_STATE), (1,), b"\x00" * 8)[:-1]
    + b"(K\x01(K\x02t" + _dtype_pickle("f8", PLAIN_F8_STATE) + b"\x89C\x10" + b"\x00" * 16 + b"tb.",
])
def test_numpy_arrays_only_from_validated_parts(data):
    with pytest.raises(errors.JReshardError):
        safe_loads(data, "array")


STANDINS = [("torch", "FloatStorage"), ("torch", "float32"), ("torch", "Size"), ("torch._utils", "_rebuild_tensor_v2"),
            ("torch.distributed.checkpoint.metadata", "Metadata"), ("collections", "OrderedDict"),
            ("numpy", "ndarray"), ("numpy", "float32"), ("builtins", "set")]


@pytest.mark.parametrize("module,name", STANDINS)
@pytest.mark.parametrize("state", ["dict", "slots"])
def test_build_on_shared_standins_is_refused(module, name, state, tmp_path):
    """BUILD with a dict state writes straight into ``__dict__``: it must find none, on every allow-listed
    global; and a benign torch.save file decodes the same before and after."""
    import torch

    ref = torch.arange(6, dtype=torch.float32)
    torch.save({"w": ref}, tmp_path / "benign.pt")
    before = jreshard.open(tmp_path / "benign.pt").read("w")
    body = b"}" + _str("dtype") + _str("int32") + b"s" if state == "dict" else b"(N}" + _str("dtype") + _str("int32") + b"stt"
    with pytest.raises(errors.JReshardError):
        safe_loads(b"\x80\x02" + _glob(module, name) + body + b"b.", "poison")
    after = jreshard.open(tmp_path / "benign.pt").read("w")
    assert after.dtype == np.float32
    np.testing.assert_array_equal(after, before)
    np.testing.assert_array_equal(after, ref.numpy())


@pytest.mark.parametrize("data", [
    b"\x80\x02" + _glob("builtins", "bytearray") + b"\x8a\x05\x00\x00\x00\xc0\x00\x85R.",  # bytearray(3 << 30)
    b"\x80\x02" + _glob("builtins", "set") + _glob("builtins", "range") + b"J\x00\xca\x9a\x3b\x85R\x85R.",
    b"\x80\x02" + _glob("builtins", "frozenset") + _glob("builtins", "range") + b"J\x00\xca\x9a\x3b\x85R\x85R.",
    b"\x80\x02" + _glob("torch", "Size") + _glob("builtins", "range") + b"J\x00\xca\x9a\x3b\x85R\x85R.",
    # a memo index of 2**31 - 1: the C unpickler grows (and zero-fills) its memo array to twice the index
    b"\x80\x02Nr\xff\xff\xff\x7f.",
    b"\x80\x02Np4294967295\n.",
    # BYTEARRAY8 allocates the length it reads before reading the bytes
    b"\x80\x05\x96" + (2**34).to_bytes(8, "little") + b".",
    # one 1 MiB bytes object turned into a bytearray 1000 times (repetition through the memo)
    b"\x80\x02(" + b"B" + struct.pack("<I", 2**20) + b"\x00" * 2**20 + b"q\x000"
    + (_glob("builtins", "bytearray") + b"h\x00\x85R") * 1000 + b"l.",
    # ... and into an io.BytesIO 1000 times (BUILD copies its bytes)
    b"\x80\x02(" + b"B" + struct.pack("<I", 2**20) + b"\x00" * 2**20 + b"q\x000"
    + (_glob("_io", "BytesIO") + b")\x81(h\x00K\x00Ntb") * 1000 + b"l.",
    # a numpy array whose shape claims 2**40 float64 from 8 bytes
    _array_pickle(_dtype_pickle("f8", PLAIN_F8_STATE), (2**20, 2**20), b"\x00" * 8),
    # a Counter of a billion-element range
    b"\x80\x02" + _glob("collections", "Counter") + _glob("builtins", "range") + b"J\x00\xca\x9a\x3b\x85R\x85R.",
])
def test_tiny_pickles_cannot_allocate_gigabytes(data, tmp_path):
    (tmp_path / "bomb.pkl").write_bytes(data)
    code = f"""
        import jreshard, pathlib
        from jreshard.unpickle import safe_loads
        try:
            safe_loads(pathlib.Path({str(tmp_path / "bomb.pkl")!r}).read_bytes(), "bomb")
            print("DECODED")
        except jreshard.JReshardError as e:
            print("REFUSED", type(e).__name__, e)
    """
    p = _run_child(code, mem_gib=3)
    assert p.returncode == 0 and "REFUSED" in p.stdout, (p.returncode, p.stdout, p.stderr[-2000:])
    assert "MemoryError" not in p.stdout  # refused before allocating, not when the cap was hit


@pytest.mark.parametrize("kind", ["dict key", "frozenset member"])
def test_deep_tuples_never_crash(kind):
    """CPython hashes nested tuples recursively in C: a deep one used as a key overflowed the C stack."""
    body = b")" + b"\x85" * 1_000_000
    data = b"\x80\x04}" + body + b"K\x01s." if kind == "dict key" else b"\x80\x04(" + body + b"\x91."
    code = f"""
        import jreshard
        from jreshard.unpickle import safe_loads
        data = {data[:3]!r} + {body[:1]!r} + {body[1:2]!r} * 1_000_000 + {data[-4 if kind == "dict key" else -2:]!r}
        try:
            safe_loads(data, "deep"); print("DECODED")
        except jreshard.JReshardError as e:
            print("REFUSED", type(e).__name__)
    """
    p = _run_child(code)
    assert p.returncode == 0 and ("DECODED" in p.stdout or "REFUSED" in p.stdout), (p.returncode, p.stderr[-2000:])


def test_deep_lists_are_refused_not_returned():
    """Lists nested 200,000 deep through the memo (constant stack depth): walking or printing them would
    raise RecursionError in the caller's code."""
    n = 200_000
    data = b"\x80\x02" + b"]\x94" * n + b"0" * n
    data += b"".join(b"j" + struct.pack("<I", i) + b"j" + struct.pack("<I", i + 1) + b"a0" for i in range(n - 1))
    data += b"j" + struct.pack("<I", 0) + b"."
    with pytest.raises(errors.CheckpointFormatError, match="deeper"):
        safe_loads(data, "deep lists")


# Training-state objects (byte strings, streams, devices, counting dicts, numpy random generators): each
# constructor checks what it is given; tricks through them are refused.
RND = "numpy.random._pickle"
_MT = _glob("numpy.random._mt19937", "MT19937")
_BITGEN = _glob(RND, "__bit_generator_ctor") + _MT + b"\x85R"  # an MT19937 bit generator, no state yet


def _mt_state(name: str = "MT19937") -> bytes:
    return b"}(" + _str("bit_generator") + _str(name) + _str("state") + b"}(" + _str("pos") + b"K\x01uu"


# What each refusal below says (the case is refused for its own reason, not by accident).
_TRICK_MATCHES = [
    "_codecs.encode", "_codecs.encode", "_codecs.encode", "_codecs.encode", "_codecs.encode", "_codecs.encode",
    "not one of MT19937", "not one of MT19937", "Generator made by", "RandomState made by", "not one of MT19937",
    "__pyx_unpickle_SeedSequence of", "SeedSequence entropy", "state of a numpy MT19937",
    "state of a numpy MT19937", "RandomState state", "without its state", "default factory", "default factory",
    "default factory", "default factory", "PickledDefaultDict \\(BUILD\\)", "PickledDefaultDict \\(BUILD\\)",
    "more than a default factory", "PickledCounter \\(BUILD\\)", "Counter of", "position 3 outside",
    "io.BytesIO state", "io.BytesIO state", "io.BytesIO state", "io.BytesIO\\(", "BytesIO", "io.BytesIO\\(",
    "is not a device", "device index", "is not a device", "not a device name", "device index", "not a device name",
]


@pytest.mark.parametrize("data,match", list(zip([
    # _codecs.encode: only (str, "latin1"), the way protocol 2 writes bytes
    b"\x80\x02" + _glob("_codecs", "encode") + _str("abc") + _str("rot13") + b"\x86R.",
    b"\x80\x02" + _glob("_codecs", "encode") + _str("abc") + _str("utf-8") + b"\x86R.",
    b"\x80\x02" + _glob("_codecs", "encode") + _str("616263") + _str("hex") + b"\x86R.",
    b"\x80\x02" + _glob("_codecs", "encode") + b"C\x03abc" + _str("latin1") + b"\x86R.",
    b"\x80\x02" + _glob("_codecs", "encode") + _str("abc") + _str("latin1") + _str("ignore") + b"\x87R.",
    b"\x80\x02" + _glob("_codecs", "encode") + _str("abc") + b"\x85R.",
    # numpy's random constructors: only numpy's bit generators, and numpy's own constructor
    b"\x80\x02" + _glob(RND, "__bit_generator_ctor") + _glob("builtins", "set") + b"\x85R.",
    b"\x80\x02" + _glob(RND, "__bit_generator_ctor") + _str("os.system") + b"\x85R.",
    b"\x80\x02" + _glob(RND, "__generator_ctor") + _str("MT19937") + _glob("builtins", "bytearray") + b"\x86R.",
    b"\x80\x02" + _glob(RND, "__randomstate_ctor") + _str("MT19937") + _glob(NP, "_reconstruct") + b"\x86R.",
    b"\x80\x02" + _glob(RND, "__randomstate_ctor") + _glob("numpy", "ndarray") + b"\x85R.",
    b"\x80\x02" + _glob("numpy.random.bit_generator", "__pyx_unpickle_SeedSequence") + _glob("numpy", "ndarray")
    + b"K\x00N\x87R.",
    b"\x80\x02" + _glob("numpy.random.bit_generator", "__pyx_unpickle_SeedSequence")
    + _glob("numpy.random.bit_generator", "SeedSequence") + b"K\x00(" + _str("x") + b"K\x00NK\x04)t\x87R.",
    # a state naming another generator, a second BUILD, a state that is not a dict
    b"\x80\x02" + _BITGEN + _mt_state("PCG64") + b"b.",
    b"\x80\x02" + _BITGEN + _mt_state() + b"b" + _mt_state() + b"b.",
    b"\x80\x02" + _glob(RND, "__randomstate_ctor") + _BITGEN + b"\x85R]b.",
    # an unbuilt generator is not returned half-made
    b"\x80\x02" + _BITGEN + b".",
    # defaultdict: only plain default factories; no BUILD
    b"\x80\x02" + _glob("collections", "defaultdict") + _glob("torch._utils", "_rebuild_tensor_v2") + b"\x85R.",
    b"\x80\x02" + _glob("collections", "defaultdict") + _glob("pathlib", "PosixPath") + b"\x85R.",
    b"\x80\x02" + _glob("collections", "defaultdict") + _glob("numpy", "ndarray") + b"\x85R.",
    b"\x80\x02" + _glob("collections", "defaultdict") + _glob("torch", "device") + b"\x85R.",
    b"\x80\x02" + _glob("collections", "defaultdict") + _glob("builtins", "list") + b"\x85R}" + _str("x")
    + b"K\x01sb.",
    b"\x80\x02" + _glob("collections", "defaultdict") + b")R(N}" + _str("default_factory") + _glob("builtins", "set")
    + b"stb.",
    b"\x80\x02" + _glob("collections", "defaultdict") + b"N]\x86R.",
    b"\x80\x02" + _glob("collections", "Counter") + b")R}" + _str("__missing__") + b"K\x01sb.",
    b"\x80\x02" + _glob("collections", "Counter") + _str("abc") + b"\x85R.",
    # io.BytesIO: state (bytes, position <= size, no attributes), once
    b"\x80\x02" + _glob("_io", "BytesIO") + b")\x81(C\x02abK\x03Ntb.",
    b"\x80\x02" + _glob("_io", "BytesIO") + b")\x81(C\x02abK\x00}" + _str("read") + b"K\x01stb.",
    b"\x80\x02" + _glob("_io", "BytesIO") + b")\x81(C\x02abK\x00Ntb(C\x02abK\x00Ntb.",
    b"\x80\x02" + _glob("_io", "BytesIO") + b")\x81(" + _str("ab") + b"K\x00Ntb.",
    b"\x80\x02" + _glob("_io", "BytesIO") + _str("text") + b"\x85R.",
    b"\x80\x02" + _glob("_io", "BytesIO") + b"C\x01aC\x01b\x86\x81.",
    b"\x80\x02" + _glob("_io", "BytesIO") + b"K\x05\x85R.",
    # torch.device: a device name and a non-negative index
    b"\x80\x02" + _glob("torch", "device") + _str("cuda:x") + b"\x85R.",
    b"\x80\x02" + _glob("torch", "device") + _str("cuda") + b"J\xff\xff\xff\xff\x86R.",
    b"\x80\x02" + _glob("torch", "device") + _str("cuda:0") + b"K\x01\x86R.",
    b"\x80\x02" + _glob("torch", "device") + b"K\x05\x85R.",
    b"\x80\x02" + _glob("torch", "device") + _str("cuda") + b"\x8a\x0d" + b"\x01" * 13 + b"\x86R.",
    b"\x80\x02" + _glob("torch", "device") + _str("../../x") + b"\x85R.",
], _TRICK_MATCHES, strict=True)))
def test_training_state_constructors_refuse_tricks(data, match):
    with pytest.raises(errors.JReshardError, match=match):
        safe_loads(data, "trick")


def test_training_state_constructors_decode_their_own_pickles():
    """The controls of the cases above: the well-formed pickles they were cut from decode."""
    out = safe_loads(b"\x80\x02" + _glob("_io", "BytesIO") + b")\x81(C\x02abK\x01Ntb.", "ok")
    assert type(out) is io.BytesIO and out.getvalue() == b"ab" and out.tell() == 1
    assert safe_loads(b"\x80\x02" + _glob("torch", "device") + _str("cuda") + b"K\x03\x86R.", "ok") == "cuda:3"
    assert safe_loads(b"\x80\x02" + _glob("_codecs", "encode") + _str("ab\xff") + _str("latin1") + b"\x86R.",
                      "ok") == b"ab\xff"
    dd = safe_loads(b"\x80\x02" + _glob("collections", "defaultdict") + _glob("builtins", "list") + b"\x85R.", "ok")
    assert type(dd) is collections.defaultdict and dd.default_factory is list
    gen = safe_loads(b"\x80\x02" + _BITGEN + _mt_state() + b"b.", "ok")
    assert (gen.kind, gen.bit_generator, gen.state["state"]) == ("BitGenerator", "MT19937", {"pos": 1})


def test_numpy_random_state_restore_checks_the_state():
    from jreshard.unpickle import NumpyRandomState

    bad = NumpyRandomState("RandomState", "MT19937", {"bit_generator": "MT19937", "state": {"key": np.zeros(3, np.uint32),
                                                                                           "pos": 0}})
    with pytest.raises(errors.CheckpointFormatError):
        bad.restore()
    good = np.random.RandomState(2)
    state = NumpyRandomState("RandomState", "MT19937", good.get_state(legacy=False))
    assert state.restore().randint(1000) == good.randint(1000)


# Hypothesis: random programs over the allow-list: decode to a value or a jreshard error, never anything else.
_ARGS = st.sampled_from([b"N", b"K\x07", b"J\xff\xff\xff\xff", b"\x8a\x09" + b"\xff" * 9, _str("f8"), _str("O"),
                         _str("../x"), b"C\x04abcd", b"]", b"}", b")", b"G" + struct.pack(">d", 2.5),
                         b"(K\x01K\x02t", b"(" + _str("a") + b"K\x01\x86t"])
_GLOBALS = st.sampled_from(STANDINS + [("builtins", "bytearray"), ("builtins", "range"), ("builtins", "slice"),
                                       ("builtins", "complex"), (NP, "_reconstruct"), (NP, "scalar"),
                                       ("numpy", "dtype"), ("torch._utils", "_rebuild_tensor_v3"),
                                       ("pathlib", "PosixPath"), ("_codecs", "encode"),
                                       ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
                                       ("_io", "BytesIO"), ("torch", "device"), ("collections", "defaultdict"),
                                       ("collections", "Counter"), (RND, "__bit_generator_ctor"),
                                       (RND, "__generator_ctor"), (RND, "__randomstate_ctor"),
                                       ("numpy.random._pcg64", "PCG64"), ("builtins", "list"),
                                       ("numpy.random.bit_generator", "__pyx_unpickle_SeedSequence"),
                                       ("numpy.random.bit_generator", "SeedSequence")])


@st.composite
def _programs(draw):
    out = b"\x80\x02"
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["reduce", "newobj", "build", "value"]))
        if op == "value":
            out += draw(_ARGS) + b"0"
            continue
        module, name = draw(_GLOBALS)
        args = b"".join(draw(st.lists(_ARGS, max_size=4)))
        call = _glob(module, name) + b"(" + args + b"t" + (b"R" if op == "reduce" else b"\x81")
        if op == "build":
            call = _glob(module, name) + draw(_ARGS) + b"b"
        out += call + b"0"
    return out + b"N."


@SETTINGS
@given(_programs())
def test_random_programs_over_the_allow_list(data):
    try:
        value = safe_loads(data, "random program")
    except errors.JReshardError as e:  # refused: the only other outcome allowed
        value = e
    assert isinstance(repr(value), str)


# ---------------------------------------------------------------------------------------------
# 2. Names: every file a checkpoint names stays inside it; what it opens is a regular file
# ---------------------------------------------------------------------------------------------

BAD_NAMES = ["../x.distcp", "/etc/passwd", "a/../../x", "http://h/x", "", ".", "..", "a\\..\\x", "x\x00y",
             "//host/share"]


def _metadata_with_path(checkpoints, tmp_path, relative_path):
    import torch  # noqa: F401  (the pickle's classes)

    d = tmp_path / "ckpt"
    shutil.copytree(checkpoints.dirs["plain"], d)
    md = pickle.loads((d / ".metadata").read_bytes())
    key = next(iter(md.storage_data))
    info = md.storage_data[key]
    md.storage_data[key] = type(info)(relative_path, info.offset, info.length, info.transform_descriptors)
    (d / ".metadata").write_bytes(pickle.dumps(md))
    return d


@pytest.mark.parametrize("name", BAD_NAMES)
def test_dcp_relative_path_outside_the_checkpoint(checkpoints, tmp_path, name):
    (tmp_path / "x.distcp").write_bytes(b"secret")
    d = _metadata_with_path(checkpoints, tmp_path, name)
    with pytest.raises(errors.JReshardError) as e:
        ck = jreshard.open(d)
        for n in ck.tensors:
            ck.read(n)
        dict(ck.objects)
    assert "secret" not in str(e.value)


def test_dcp_relative_path_not_a_string(checkpoints, tmp_path):
    d = _metadata_with_path(checkpoints, tmp_path, 7)
    with pytest.raises(errors.JReshardError):
        jreshard.open(d)


# Every index convention a directory is recognised by (plain, variants, diffusers, PEFT), as a directory and by path.
INDEX_NAMES = ["model.safetensors.index.json", "pytorch_model.bin.index.json", "model.safetensors.index.fp16.json",
               "diffusion_pytorch_model.safetensors.index.json", "adapter_model.bin.index.json"]


@pytest.mark.parametrize("name", BAD_NAMES)
@pytest.mark.parametrize("index", INDEX_NAMES)
@pytest.mark.parametrize("by_path", [False, True], ids=["dir", "path"])
def test_index_entries_outside_the_checkpoint(tmp_path, name, index, by_path):
    from safetensors.numpy import save_file

    d = tmp_path / "model"
    d.mkdir()
    save_file({"a": np.ones(3, np.float32)}, str(d / "x.safetensors"))
    save_file({"a": np.ones(3, np.float32)}, str(tmp_path / "x.distcp"))  # what '../x.distcp' would reach
    (d / index).write_text(json.dumps({"weight_map": {"a": name}}))
    with pytest.raises(errors.UnsafeCheckpointError, match="outside it; refused"):
        jreshard.open(d / index if by_path else d)


def test_fifo_data_file_is_refused_without_hanging(checkpoints, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(checkpoints.dirs["plain"], d)
    victim = sorted(d.glob("*.distcp"))[0]
    victim.unlink()
    os.mkfifo(victim)
    code = f"""
        import jreshard
        try:
            ck = jreshard.open({str(d)!r})
            for n in ck.tensors:
                ck.read(n)
            print("READ")
        except jreshard.JReshardError as e:
            print("REFUSED", type(e).__name__)
    """
    p = _run_child(code, timeout=60)
    assert p.returncode == 0 and "REFUSED" in p.stdout, (p.stdout, p.stderr[-2000:])


def test_hugging_face_cache_symlinks_keep_working(tmp_path):
    """A hub cache snapshot is a directory of symlinks into ../../blobs/: the user's own layout."""
    from safetensors.numpy import save_file

    repo = tmp_path / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "0123abc"
    snap.mkdir(parents=True)
    a, b = np.arange(6, dtype=np.float32).reshape(2, 3), np.arange(4, dtype=np.int64)
    save_file({"a": a}, str(repo / "blobs" / "blob1"))
    save_file({"b": b}, str(repo / "blobs" / "blob2"))
    (repo / "blobs" / "blob3").write_text(json.dumps({"weight_map": {"a": "model-1.safetensors",
                                                                      "b": "model-2.safetensors"}}))
    for link, blob in [("model-1.safetensors", "blob1"), ("model-2.safetensors", "blob2"),
                       ("model.safetensors.index.json", "blob3")]:
        os.symlink(f"../../blobs/{blob}", snap / link)
    ck = jreshard.open(snap)
    np.testing.assert_array_equal(ck.read("a"), a)
    np.testing.assert_array_equal(ck.read("b"), b)


@pytest.mark.parametrize("url", ["file://localhost{}", "file://evil.example{}"])
def test_file_url_with_a_host_is_refused(url):
    with pytest.raises(errors.JReshardError):
        jreshard.open(url.format(jreshard.sample_path()))


def test_file_url_without_host_works():
    ck = jreshard.open("file://" + jreshard.sample_path())
    assert "model.embed.weight" in ck.tensors


# ---------------------------------------------------------------------------------------------
# 3. Views: offsets, strides and sizes inside their storage, storages inside their file
# ---------------------------------------------------------------------------------------------


class _Storage:
    def __init__(self, numel):
        self.numel = numel


class _Tensor:
    def __init__(self, *args):
        self.args = args

    def __reduce__(self):
        import torch

        return (torch._utils._rebuild_tensor_v2, self.args)


class _DataPickler(pickle.Pickler):
    def persistent_id(self, obj):
        import torch

        if isinstance(obj, _Storage):
            return ("storage", torch.FloatStorage, "0", "cpu", obj.numel)
        return None


def _pt_with_view(path, storage: np.ndarray, offset, size, stride, numel=None):
    """A torch.save zip whose data.pkl rebuilds one float32 tensor as the given view of ``storage``."""
    import torch

    torch.save({"w": torch.from_numpy(storage.copy())}, path)
    buf = io.BytesIO()
    _DataPickler(buf, protocol=2).dump(
        {"w": _Tensor(_Storage(len(storage) if numel is None else numel), offset, size, stride, False,
                      collections.OrderedDict())})
    with zipfile.ZipFile(path) as z:
        items = [(i.filename, z.read(i.filename)) for i in z.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, data in items:
            z.writestr(name, buf.getvalue() if name.endswith("data.pkl") else data)


def _view_is_valid(n, offset, size, stride):
    if not all(type(v) is int for v in (offset, *size, *stride)) or len(size) != len(stride):
        return False
    if not all(0 <= v <= 2**62 for v in (offset, *size, *stride)):  # sizes and offsets of real files
        return False
    if 0 in size:
        return True
    return offset + sum((s - 1) * t for s, t in zip(size, stride)) < n


_INTS = st.one_of(st.integers(-3, 12), st.sampled_from([2**31, 2**40, 2**63, 2**64, -(2**63)]))


@SETTINGS
@given(offset=_INTS, size=st.lists(_INTS, min_size=1, max_size=3), data=st.data())
def test_torch_save_views_inside_their_storage(tmp_path, offset, size, data):
    stride = data.draw(st.lists(_INTS, min_size=len(size), max_size=len(size)))
    storage = np.arange(24, dtype=np.float32)
    path = tmp_path / "view.pt"
    _pt_with_view(path, storage, offset, tuple(size), tuple(stride))
    # A box of at most 3 elements per dimension (a valid view may be a broadcast of terabytes).
    box = tuple(slice(0, min(3, n)) if type(n) is int and n >= 0 else slice(None) for n in size)
    if _view_is_valid(len(storage), offset, size, stride):
        # the box itself as a strided view (the whole view may be too large for numpy to describe)
        expected = np.lib.stride_tricks.as_strided(storage[offset:] if 0 not in size else storage,
                                                   [min(3, n) for n in size], [4 * s for s in stride])
        out = jreshard.open(path).read("w", box)
        np.testing.assert_array_equal(out, expected)
    else:
        with pytest.raises(errors.JReshardError):
            jreshard.open(path).read("w", box)


def test_broadcast_view_of_terabytes_is_refused_before_allocating(tmp_path):
    path = tmp_path / "view.pt"
    _pt_with_view(path, np.arange(4, dtype=np.float32), 0, (2**40,), (0,))
    ck = jreshard.open(path)
    np.testing.assert_array_equal(ck.read("w", (slice(5, 8),)), np.zeros(3, np.float32))
    with pytest.raises(errors.OutOfMemoryError):
        ck.read("w")


@pytest.mark.parametrize("size,stride", [((2.5,), (1,)), ((3,), (1.0,)), ((True,), (1,)), (("3",), (1,))])
def test_non_integer_shapes_are_refused(tmp_path, size, stride):
    path = tmp_path / "view.pt"
    _pt_with_view(path, np.arange(4, dtype=np.float32), 0, size, stride)
    with pytest.raises(errors.JReshardError):
        jreshard.open(path).read("w")


def test_storage_numel_beyond_its_entry(tmp_path):
    path = tmp_path / "view.pt"
    _pt_with_view(path, np.arange(4, dtype=np.float32), 0, (8,), (1,), numel=8)
    with pytest.raises(errors.JReshardError):
        jreshard.open(path).read("w")


def test_zero_stride_object_is_not_made_dense(checkpoints, tmp_path):
    """An object entry holding a tensor of shape (2**30,) over a 1-element storage (stride 0)."""
    import torch

    from tests.test_errors import _plant_torch_save_archive, _load_md

    d = tmp_path / "ckpt"
    shutil.copytree(checkpoints.dirs["plain"], d)
    md = _load_md(d)
    fqn = next(k for k, v in md.state_dict_metadata.items() if type(v).__name__ == "BytesStorageMetadata")
    _plant_torch_save_archive(d, md, fqn, {"x": torch.ones(1).expand(2**30)})
    code = f"""
        import jreshard
        try:
            print(len(jreshard.open({str(d)!r}).objects)); print("DECODED")
        except jreshard.JReshardError as e:
            print("REFUSED", type(e).__name__, e)
    """
    p = _run_child(code, mem_gib=3)
    assert p.returncode == 0 and "REFUSED" in p.stdout, (p.stdout, p.stderr[-2000:])


# safetensors headers ------------------------------------------------------------------------


def _safetensors_bytes(header: dict | str, data: bytes) -> bytes:
    raw = header if isinstance(header, str) else json.dumps(header)
    h = raw.encode()
    return struct.pack("<Q", len(h)) + h + data


_BEGINS = st.one_of(st.integers(-8, 40), st.sampled_from([2**31, 2**63, 2**64]))
_LENGTHS = st.sampled_from([8, 8, 8, 4, 0, -8, 2**40])  # 8: the length two float32s need


@SETTINGS
@given(starts=st.lists(st.tuples(_BEGINS, _LENGTHS), min_size=2, max_size=2))
def test_safetensors_offsets_inside_the_data_and_disjoint(tmp_path, starts):
    data = np.arange(8, dtype=np.float32).tobytes()
    (b0, e0), (b1, e1) = offsets = [(b, b + n) for b, n in starts]
    header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [b0, e0]},
              "b": {"dtype": "F32", "shape": [2], "data_offsets": [b1, e1]}}
    path = tmp_path / "x.safetensors"
    path.write_bytes(_safetensors_bytes(header, data))
    ok = all(0 <= b and e - b == 8 and e <= len(data) for b, e in offsets) and (e0 <= b1 or e1 <= b0)
    if ok:
        ck = jreshard.open(path)
        np.testing.assert_array_equal(ck.read("a"), np.frombuffer(data[b0:e0], np.float32))
        np.testing.assert_array_equal(ck.read("b"), np.frombuffer(data[b1:e1], np.float32))
    else:
        with pytest.raises(errors.JReshardError):
            ck = jreshard.open(path)
            ck.read("a"), ck.read("b")


@pytest.mark.parametrize("header", [
    '{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}',
    {"a": {"dtype": "F32", "shape": [2**64], "data_offsets": [0, 8]}},
    {"a": {"dtype": "F32", "shape": [2.5], "data_offsets": [0, 8]}},
    {"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}},
    {"a": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}},
    {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
    {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0.0, 8.0]}},
    {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0]}},
    {"a": {"dtype": "X9", "shape": [2], "data_offsets": [0, 8]}},
    {"a": {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}},
    {"a": [1, 2]},
    {"__metadata__": [1], "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},
    "[" * 100000 + "]" * 100000,
    "not json",
])
def test_malformed_safetensors_headers(tmp_path, header):
    path = tmp_path / "x.safetensors"
    path.write_bytes(_safetensors_bytes(header, b"\x00" * 16))
    with pytest.raises(errors.JReshardError):
        jreshard.open(path).read("a")


@pytest.mark.parametrize("length", [0, 1, 2**63, 2**64 - 1, 10**6])
def test_safetensors_header_length_field(tmp_path, length):
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", length) + b'{"a": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}')
    with pytest.raises(errors.JReshardError):
        jreshard.open(path).read("a")


# zip archives ---------------------------------------------------------------------------------


def test_duplicate_zip_entries_are_refused(tmp_path):
    import torch

    path = tmp_path / "dup.pt"
    torch.save({"w": torch.arange(4, dtype=torch.float32)}, path)
    with zipfile.ZipFile(path) as z:
        items = [(i.filename, z.read(i.filename)) for i in z.infolist()]
    storage = next(n for n, _ in items if "/data/" in n)
    with pytest.warns(UserWarning):
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
            for name, data in items:
                z.writestr(name, data)
            z.writestr(storage, np.full(4, 7, np.float32).tobytes())  # a second data/0: torch reads the first
    with pytest.raises(errors.InconsistentCheckpointError, match="twice"):
        jreshard.open(path).read("w")


def test_central_directory_pointing_into_another_entry(tmp_path):
    import torch

    path = tmp_path / "cd.pt"
    torch.save({"w": torch.arange(4, dtype=torch.float32)}, path)
    raw = bytearray(path.read_bytes())
    # Point the storage's central directory entry at the data.pkl local header.
    cd = raw.rfind(b"PK\x01\x02")
    names = {}
    pos = raw.find(b"PK\x01\x02")
    while pos >= 0:
        nlen = struct.unpack_from("<H", raw, pos + 28)[0]
        names[bytes(raw[pos + 46 : pos + 46 + nlen])] = pos
        pos = raw.find(b"PK\x01\x02", pos + 4)
    pkl = next(v for k, v in names.items() if k.endswith(b"data.pkl"))
    stor = next(v for k, v in names.items() if b"/data/" in k)
    struct.pack_into("<I", raw, stor + 42, struct.unpack_from("<I", raw, pkl + 42)[0])
    assert cd > 0
    path.write_bytes(bytes(raw))
    with pytest.raises(errors.JReshardError):
        jreshard.open(path).read("w")


@SETTINGS
@given(data=st.data())
def test_zip_directory_fields_mutated(tmp_path, data):
    """Any 4-byte field of the central directory or end records set to a boundary value: the values read
    are the original ones or a jreshard error."""
    import torch

    path = tmp_path / "m.pt"
    ref = np.arange(10, dtype=np.float32)
    if not path.exists():
        torch.save({"w": torch.from_numpy(ref.copy()), "step": 3}, path)
    raw = bytearray(path.read_bytes())
    start = raw.find(b"PK\x01\x02")
    pos = data.draw(st.integers(start, len(raw) - 2))
    width = data.draw(st.sampled_from([2, 4]))
    value = data.draw(st.sampled_from([0, 1, 0xFFFF, 0xFFFFFFFF, 2**31, 30, 46]))
    if pos + width <= len(raw):
        raw[pos : pos + width] = (value % (1 << (8 * width))).to_bytes(width, "little")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(bytes(raw))
    try:
        ck = jreshard.open(bad)
        out, objects = ck.read("w"), dict(ck.objects)
    except errors.JReshardError:
        out, objects = ref, {"step": 3}  # refused: the only other outcome allowed
    np.testing.assert_array_equal(out, ref)
    assert objects == {"step": 3}


# zstd -----------------------------------------------------------------------------------------


def test_zstd_bomb_is_capped(checkpoints, tmp_path):
    """A compressed chunk item that inflates far beyond the chunk's declared size is refused."""
    import zstandard

    d = tmp_path / "ckpt"
    shutil.copytree(checkpoints.dirs["zstd"], d)
    import torch  # noqa: F401

    md = pickle.loads((d / ".metadata").read_bytes())
    key, info = next((k, v) for k, v in md.storage_data.items() if k.offset is not None)
    bomb = zstandard.ZstdCompressor(level=19).compress(b"\x00" * (512 * 2**20))
    f = d / "bomb.distcp"
    f.write_bytes(bomb)
    md.storage_data[key] = type(info)("bomb.distcp", 0, len(bomb), info.transform_descriptors)
    (d / ".metadata").write_bytes(pickle.dumps(md))
    code = f"""
        import jreshard
        try:
            ck = jreshard.open({str(d)!r})
            ck.read({key.fqn!r}); print("READ")
        except jreshard.JReshardError as e:
            print("REFUSED", type(e).__name__, e)
    """
    p = _run_child(code, mem_gib=3)
    assert p.returncode == 0 and "REFUSED" in p.stdout, (p.stdout, p.stderr[-2000:])
    assert "inflates" in p.stdout


def test_index_json_has_a_size_cap(tmp_path):
    from safetensors.numpy import save_file

    d = tmp_path / "model"
    d.mkdir()
    save_file({"a": np.ones(3, np.float32)}, str(d / "x.safetensors"))
    filler = " " * (65 * 2**20)  # valid JSON whitespace, larger than any real index
    (d / "model.safetensors.index.json").write_text('{"weight_map": {"a": "x.safetensors"}' + filler + "}")
    with pytest.raises(errors.CheckpointFormatError, match="larger than"):
        jreshard.open(d)
    (d / "model.safetensors.index.json").write_text('{"weight_map": {"a": "x.safetensors"}}')
    np.testing.assert_array_equal(jreshard.open(d).read("a"), np.ones(3, np.float32))


# small DCP archives located for sub-ranges ------------------------------------------------------------


@SETTINGS
@given(data=st.data())
def test_small_archives_located_for_sub_ranges_agree_with_whole_reads(checkpoints, tmp_path, monkeypatch, data):
    """A small torch.save item of a DCP file is read whole (parsed in memory) or, when a load needs little of
    it, located for sub-ranges (its central directory, data.pkl and local header read from the file). Any byte
    of the item set to a boundary value: the located read gives the whole read's values for its box, or the
    original values (bytes it does not read), or a jreshard error."""
    from jreshard import program

    d = tmp_path / "ck"
    if not d.exists():
        shutil.copytree(checkpoints.dirs["plain"], d)
    name = "plain.w"  # one (24, 16) float32 chunk: an archive of about 3 KB
    chunk = jreshard.open(d).tensors[name].chunks[0]
    blob = chunk.ref.blob
    path = d / blob.key
    original = path.read_bytes()
    expected = jreshard.open(d).read(name)[(slice(2, 5), slice(3, 6))]
    raw = bytearray(original)
    pos = blob.offset + data.draw(st.integers(0, blob.length - 1))
    width = data.draw(st.sampled_from([1, 2, 4]))
    value = data.draw(st.sampled_from([0, 1, 0x7F, 0xFF, 0xFFFF, 0xFFFFFFFF, 2**31, 30, 46]))
    end = min(pos + width, blob.offset + blob.length)
    raw[pos:end] = (value % (1 << (8 * width))).to_bytes(width, "little")[: end - pos]
    path.write_bytes(bytes(raw))
    box = (slice(2, 5), slice(3, 6))
    try:
        try:
            whole = jreshard.open(d).read(name)[box]
        except errors.JReshardError:
            whole = None
        monkeypatch.setattr(program, "HEADER_COST", 0)  # locate for sub-ranges whatever the archive's size
        ck = jreshard.open(d)
        try:
            part = ck.read(name, box)
        except errors.JReshardError:
            part = None
        if part is not None:
            assert ck._located.locators, "the chunk was not located for sub-ranges"
            np.testing.assert_array_equal(part, expected if whole is None else whole,
                                          err_msg=f"byte {pos - blob.offset} of the item")
    finally:
        path.write_bytes(original)
        monkeypatch.undo()


@pytest.mark.parametrize("over", [1, 24, 64, 200])
def test_located_storage_moved_over_a_header_not_read_is_refused(checkpoints, tmp_path, monkeypatch, over):
    """A corrupt extra-field length in the storage's local header moves its data forward, over the local
    header of a later entry (``version``) that a read of sub-ranges does not read: the central directory's
    header offsets alone show the overlap, so the located read is refused, as the whole read is."""
    from jreshard import program
    from jreshard.formats import torchsave

    # The layout check alone: the extra-field check refuses most of these lengths first.
    monkeypatch.setattr(torchsave, "_records_fill", lambda extra: True)
    d = tmp_path / "ck"
    shutil.copytree(checkpoints.dirs["plain"], d)
    name = "plain.w"
    blob = jreshard.open(d).tensors[name].chunks[0].ref.blob
    path = d / blob.key
    raw = bytearray(path.read_bytes())
    item = bytes(raw[blob.offset : blob.offset + blob.length])
    infos = sorted(zipfile.ZipFile(io.BytesIO(item)).infolist(), key=lambda i: i.header_offset)
    k = next(i for i, info in enumerate(infos) if info.filename.endswith("/data/0"))
    storage, after = infos[k], infos[k + 1]
    at = blob.offset + storage.header_offset + 28  # the local header's extra-field length
    (elen,) = struct.unpack_from("<H", raw, at)
    data_end = storage.header_offset + 30 + len(storage.filename) + elen + storage.compress_size
    # the data moved to end ``over`` bytes into the next entry's local header
    struct.pack_into("<H", raw, at, elen + after.header_offset - data_end + over)
    path.write_bytes(bytes(raw))
    with pytest.raises(errors.JReshardError):
        jreshard.open(d).read(name)
    monkeypatch.setattr(program, "HEADER_COST", 0)  # located for sub-ranges, whatever the archive's size
    ck = jreshard.open(d)
    with pytest.raises(errors.InconsistentCheckpointError, match="overlap"):
        ck.read(name, (slice(2, 5), slice(3, 6)))


@pytest.mark.parametrize("name", ["plain.w", "mp.a"])
def test_every_changed_extra_length_of_a_storage_header_is_refused(checkpoints, tmp_path, monkeypatch, name):
    """The extra-field length of a storage's local header, changed by any amount from one less than its
    length down to 1, or up by 1 to 64 (the data then starts that many bytes earlier or later: inside the
    alignment padding, or past the true start), is refused by a whole read and by a read of sub-ranges alike,
    for an archive held whole (``plain.w``) and one read in windows (``mp.a``): never data read from the wrong
    place. (A length cut to 0 leaves an empty extra field, which is valid zip and not caught.)"""
    from jreshard import program

    d = tmp_path / "ck"
    shutil.copytree(checkpoints.dirs["plain"], d)
    ck = jreshard.open(d)
    expected = ck.read(name)
    blob = ck.tensors[name].chunks[0].ref.blob
    ck.close()
    path = d / blob.key
    original = path.read_bytes()
    item = original[blob.offset : blob.offset + blob.length]
    storage = next(i for i in zipfile.ZipFile(io.BytesIO(item)).infolist() if i.filename.endswith("/data/0"))
    at = blob.offset + storage.header_offset + 28
    (elen,) = struct.unpack_from("<H", original, at)
    assert elen > 0  # torch pads the data to 64 bytes with an extra-field record
    box = tuple(slice(0, max(1, n // 2)) for n in expected.shape)
    read = []
    for delta in [*range(1 - elen, 0), *range(1, 65)]:
        raw = bytearray(original)
        struct.pack_into("<H", raw, at, elen + delta)
        path.write_bytes(bytes(raw))
        for sub in (False, True):
            with monkeypatch.context() as m:
                if sub:
                    m.setattr(program, "HEADER_COST", 0)  # located for sub-ranges, whatever the archive's size
                try:
                    with jreshard.open(d) as c:
                        got = c.read(name, box if sub else ...)
                except errors.JReshardError:
                    continue
            read.append((delta, sub, np.array_equal(got, expected[box] if sub else expected)))
    assert not read, read
