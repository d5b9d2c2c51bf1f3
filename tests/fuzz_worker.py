#!/usr/bin/env python
"""Structure-aware fuzz worker for jreshard: mutates real torch-written checkpoints and hand-built pickles and
checks that every outcome is the original values or a ``jreshard.errors.JReshardError``.

Run by ``tests/test_fuzz.py`` (which prepares the torch-written originals and passes their paths in a manifest);
it can also be run by hand::

    python tests/fuzz_worker.py --corpus DIR/manifest.json --workdir /tmp/fz --family dcp_metadata --cases 50 --seed 1
    python tests/fuzz_worker.py --corpus DIR/manifest.json --workdir /tmp/fz --replay /tmp/fz/failures/01-...

This process never imports torch or jax. hypothesis draws the inputs (``--seed`` fixes them); each case runs in a
forked child so that a crash (signal), a hang (per-case timeout, with faulthandler's dump of where it hung) or a
memory blow-up (the RLIMIT_AS the parent set, MemoryError anywhere in the exception chain, or the child's peak
RSS) is observed and reported instead of killing the run. The child exercises the whole read surface:
``jreshard.open``, ``ckpt.tensors``, ``ckpt.read(name)`` for every tensor, ``ckpt.read(name, box)`` on a random
partial box (BOX_READS tensors a case), ``ckpt.objects``, ``repr``/``str`` of everything (and uses decoded numpy
arrays and dtypes), then checks that a benign pickle and a benign torch.save file still decode to the right values
(no shared state was changed).

What a successful read must return: the shape and dtype ``ckpt.tensors`` announces; for a box, the same values
as the whole read; for unmutated controls, the original values; and for safetensors and torch.save files, the
values an independent decoder (the spec read with numpy / Python's zipfile and a recording unpickler, never
jreshard) finds in the mutated file. A read that silently returns other values than the original in a mutated
file that is still valid is only listed (``silent value changes``): moving an offset to other valid bytes makes
another valid checkpoint.

Failures are grouped into classes (kind, exception type, innermost jreshard frame); for each class the worker
prints the first input's description, message and traceback tail, and saves the input under
``WORKDIR/failures/`` (replay it with ``--replay``). Exit status: 0 when no case failed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import faulthandler
import io
import json
import math
import os
import pickle
import pickletools
import random
import resource
import shutil
import signal
import stat
import struct
import sys
import time
import traceback
import warnings
import zlib
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import zstandard  # noqa: E402
from hypothesis import HealthCheck, Phase, given, reject, settings  # noqa: E402
from hypothesis import seed as hyp_seed  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import jreshard  # noqa: E402
from jreshard.errors import JReshardError  # noqa: E402
from jreshard.unpickle import safe_loads  # noqa: E402
from tests.torch_writers import load_store  # noqa: E402  (numpy only)

def _mid_sizes() -> list[int]:
    """Byte sizes between this process's address-space cap and the machine's memory: claims that a check
    against physical memory lets through but an allocation may not survive."""
    try:
        phys = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        phys = 16 << 30
    cap = resource.getrlimit(resource.RLIMIT_AS)[0]
    cands = [4 << 30, 12 << 30] + ([cap + (256 << 20), (cap + phys) // 2] if cap > 0 else [])
    return sorted({c for c in cands if c < 0.9 * phys}) or [4 << 30]


MID_BYTES = _mid_sizes()
MAX_TENSORS = 2000  # tensors read per case (a mutated header can list many)
BOX_READS = 12  # tensors per case also read on a random partial box
RSS_LIMIT = 1 << 30  # a case whose child peaks this far above the worker's RSS is a memory blow-up

# ================================================================================================
# pickle assembly
# ================================================================================================

MD = "torch.distributed.checkpoint.metadata"
FS = "torch.distributed.checkpoint.filesystem"


def p_int(v: int) -> bytes:
    if isinstance(v, bool):
        return b"\x88" if v else b"\x89"
    if 0 <= v < 256:
        return b"K" + bytes([v])
    if 0 <= v < 65536:
        return b"M" + struct.pack("<H", v)
    if -(2**31) <= v < 2**31:
        return b"J" + struct.pack("<i", v)
    enc = pickle.encode_long(v)
    if len(enc) < 256:
        return b"\x8a" + bytes([len(enc)]) + enc
    return b"\x8b" + struct.pack("<i", len(enc)) + enc


def p_float(x: float) -> bytes:
    return b"G" + struct.pack(">d", x)


def p_str(s: str | bytes) -> bytes:
    b = s if isinstance(s, bytes) else s.encode("utf-8", "surrogatepass")
    if len(b) < 256:
        return b"\x8c" + bytes([len(b)]) + b
    return b"X" + struct.pack("<I", len(b)) + b


def p_bytes(b: bytes) -> bytes:
    if len(b) < 256:
        return b"C" + bytes([len(b)]) + b
    return b"B" + struct.pack("<I", len(b)) + b


def p_global(mod: str, name: str) -> bytes:
    return b"c" + mod.encode() + b"\n" + name.encode() + b"\n"


def p_tuple(items: list[bytes]) -> bytes:
    if not items:
        return b")"
    if len(items) <= 3:
        return b"".join(items) + (b"\x85", b"\x86", b"\x87")[len(items) - 1]
    return b"(" + b"".join(items) + b"t"


def p_list(items: list[bytes]) -> bytes:
    return b"]" + (b"(" + b"".join(items) + b"e" if items else b"")


def p_dict(pairs: list[tuple[bytes, bytes]]) -> bytes:
    return b"}" + (b"(" + b"".join(k + v for k, v in pairs) + b"u" if pairs else b"")


def p_reduce(fn: bytes, args: bytes) -> bytes:
    return fn + args + b"R"


def p_newobj(cls: bytes, args: bytes) -> bytes:
    return cls + args + b"\x81"


def p_build(obj: bytes, state: bytes) -> bytes:
    return obj + state + b"b"


def wrap(body: bytes, proto: int = 2) -> bytes:
    return b"\x80" + bytes([proto]) + body + b"."


def ops_of(data: bytes) -> list[tuple[Any, Any, int, int]]:
    """(opcode, arg, start, end) of the parseable prefix of a pickle."""
    f = io.BytesIO(data)
    out = []
    try:
        for op, arg, pos in pickletools.genops(f):
            out.append((op, arg, pos, f.tell()))
    except Exception:
        pass
    return out


def strip_frames(data: bytes) -> bytes:
    """The pickle without FRAME opcodes (frames are optional; their lengths would go stale under mutation)."""
    ops = ops_of(data)
    if not any(o[0].name == "FRAME" for o in ops):
        return data
    out, last = bytearray(), 0
    for op, _, s, e in ops:
        if op.name == "FRAME":
            out += data[last:s]
            last = e
    out += data[last:]
    return bytes(out)


# Globals the allow-list knows (a superset is read from jreshard.unpickle.ALLOWED when it exists).
STATIC_GLOBALS = [
    ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor_v3"),
    ("torch._utils", "_rebuild_parameter"), ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch", "Size"), ("torch", "FloatStorage"), ("torch", "BFloat16Storage"), ("torch", "LongStorage"),
    ("torch", "BoolStorage"), ("torch", "HalfStorage"), ("torch.storage", "UntypedStorage"),
    ("torch", "float32"), ("torch", "bfloat16"), ("torch", "int64"), ("torch", "complex32"), ("torch", "qint8"),
    ("torch", "float8_e4m3fn"), ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "bytearray"),
    ("builtins", "range"), ("builtins", "slice"), ("builtins", "complex"), ("__builtin__", "set"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"), ("numpy", "dtype"),
    ("numpy", "ndarray"), ("numpy", "float32"), ("numpy", "int64"), ("numpy.dtypes", "Float32DType"),
    (MD, "Metadata"), (MD, "TensorStorageMetadata"), (MD, "BytesStorageMetadata"), (MD, "ChunkStorageMetadata"),
    (MD, "TensorProperties"), (MD, "MetadataIndex"), (MD, "StorageMeta"), (MD, "_MEM_FORMAT_ENCODING"),
    (FS, "_StorageInfo"), (FS, "SerializationFormat"), ("pathlib", "PosixPath"), ("pathlib", "PureWindowsPath"),
]
FORBIDDEN_GLOBALS = [("os", "system"), ("builtins", "eval"), ("builtins", "getattr"), ("torch", "load"),
                     ("numpy", "load"), ("builtins", "object"), ("copyreg", "_reconstructor"), ("torch", "nosuch")]


def allowed_globals() -> list[tuple[str, str]]:
    try:
        from jreshard.unpickle import ALLOWED

        extra = [k for k in ALLOWED if isinstance(k, tuple) and len(k) == 2]
    except Exception:
        extra = []
    seen, out = set(), []
    for g in STATIC_GLOBALS + sorted(extra):
        if g not in seen:
            seen.add(g)
            out.append(g)
    return out


GLOBALS = allowed_globals()

BOUNDARY_INTS = [-1, 0, 1, 2, 3, 7, 255, 256, 65535, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**53 + 1,
                 2**62, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**31), -(2**63), 10**18, 10**30]
HOSTILE_STRS = ["../x", "/etc/passwd", "a/../../b", "..", ".", "", "/", "http://h/x", "file:///etc/passwd",
                "C:\\x", "C:x", "x\x00y", "data/../../x", "__0_0.distcp", "__9_9.distcp", ".metadata", "x" * 5000,
                "stream.zstd/1", "stream.zstd/2", "stream.gzip/1", "big", "little", "middle", "data/0", "data/999",
                "0", "cpu", "float32", "F32", "\udcff", "é/ü", "sub/", "./__0_0.distcp", "__0_0.distcp/."]
INSERT_OPS = [b"(", b"0", b"1", b"2", b"N", b"}", b"]", b")", b"t", b"\x85", b"\x86", b"\x87", b"b", b"R",
              b"\x81", b"\x92", b"u", b"s", b"e", b"a", b"\x94", b"h\x00", b"h\x05", b"j\xff\xff\xff\x7f",
              b"q\x00", b"r\xff\xff\xff\x7f", b".", b"Q", b"d", b"l", b"\x91", b"\x90", b"\x8f", b"\x80\x05",
              b"\x97", b"\x98", b"\x82\x01", b"ibuiltins\nset\n", b"o", b"\x88", b"K\xff", b"G\x7f\xf8\0\0\0\0\0\0"]
LEAF_OPS = {"BININT", "BININT1", "BININT2", "LONG1", "LONG4", "INT", "LONG", "NONE", "NEWTRUE", "NEWFALSE",
            "BINGET", "LONG_BINGET", "EMPTY_DICT", "EMPTY_LIST", "EMPTY_TUPLE", "BINFLOAT", "SHORT_BINUNICODE",
            "BINUNICODE", "BINUNICODE8", "SHORT_BINBYTES", "BINBYTES", "UNICODE", "BINSTRING", "SHORT_BINSTRING"}
INT_OPS = {"INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4"}
STR_OPS = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8"}
BYTES_OPS = {"BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8"}
MEMO_OPS = {"BINGET", "LONG_BINGET", "BINPUT", "LONG_BINPUT", "MEMOIZE", "GET", "PUT"}


def int_values(old: Any) -> st.SearchStrategy:
    v = old if isinstance(old, int) else 0
    near = [v + 1, v - 1, -v, v * 2, v + 2**32, v * 2**32, v // 2]
    return st.one_of(st.sampled_from(BOUNDARY_INTS), st.sampled_from(near), st.integers(-(2**70), 2**70))


# ------------------------------------------------------------------------------------------------
# generated pickle fragments: each pushes exactly one value


def _frag_leaf() -> st.SearchStrategy:
    return st.one_of(
        st.sampled_from(BOUNDARY_INTS).map(p_int),
        st.integers(-5, 300).map(p_int),
        st.sampled_from([0.5, -0.0, float("nan"), float("inf"), 1e300]).map(p_float),
        st.sampled_from(HOSTILE_STRS[:30]).map(p_str),
        st.text(max_size=8).map(p_str),
        st.binary(max_size=24).map(p_bytes),
        st.sampled_from([b"N", b"\x88", b"\x89", b"}", b"]", b")", b"\x8f"]),
        st.sampled_from(GLOBALS * 10 + FORBIDDEN_GLOBALS).map(lambda g: p_global(*g)),  # rarely a forbidden one
        st.integers(0, 6).map(lambda i: b"h" + bytes([i])),
        st.sampled_from(["f4", "O", "V8", "<f8", ">i4", "S0", "U1", "b1", "f4,i8", "(2,)f4", "M8[s]", "c16", "?",
                         "u1", "V0", "O,f4", "V1073741824"]).map(
            lambda code: p_reduce(p_global("numpy", "dtype"), p_tuple([p_str(code)]))),
    )


def _frag_extend(children: st.SearchStrategy) -> st.SearchStrategy:
    glob = st.sampled_from(GLOBALS).map(lambda g: p_global(*g))
    kids = st.lists(children, max_size=4)
    state = st.one_of(
        st.lists(st.tuples(st.sampled_from(["dtype", "name", "_fields", "value", "size", "chunks", "storage_data",
                                             "state_dict_metadata", "relative_path", "offset", "length", "__dict__",
                                             "__class__", "_fn", "fqn", "key", "numel"]).map(p_str), children),
                 max_size=3).map(p_dict),
        st.tuples(st.sampled_from([b"N", b"}"]), st.lists(st.tuples(st.text(max_size=6).map(p_str), children),
                                                            max_size=2).map(p_dict)).map(lambda t: p_tuple(list(t))),
        children,
    )
    return st.one_of(
        kids.map(p_tuple),
        kids.map(p_list),
        st.lists(st.tuples(children, children), max_size=3).map(p_dict),
        st.tuples(glob, kids.map(p_tuple)).map(lambda t: p_reduce(*t)),
        st.tuples(glob, kids.map(p_tuple)).map(lambda t: p_newobj(*t)),
        st.tuples(glob, kids.map(p_tuple), st.lists(st.tuples(st.text(max_size=6).map(p_str), children),
                                                    max_size=2).map(p_dict)).map(lambda t: t[0] + t[1] + t[2] + b"\x92"),
        st.tuples(children, state).map(lambda t: p_build(*t)),
        st.tuples(children, st.integers(0, 6)).map(lambda t: t[0] + b"q" + bytes([t[1]])),
        st.tuples(children, st.integers(1, 4)).map(lambda t: t[0] + b"2" * t[1] + b"0" * t[1]),
        kids.map(lambda k: b"\x8f" + (b"(" + b"".join(k) + b"\x90" if k else b"")),
        kids.map(lambda k: b"(" + b"".join(k) + b"\x91"),
        children.map(lambda c: c + b"Q"),
        st.binary(max_size=16).map(lambda b: b"\x96" + struct.pack("<Q", len(b)) + b),
        st.tuples(st.sampled_from(GLOBALS), kids).map(
            lambda t: b"(" + b"".join(t[1]) + b"i" + t[0][0].encode() + b"\n" + t[0][1].encode() + b"\n"),
        st.tuples(glob, kids).map(lambda t: b"(" + t[0] + b"".join(t[1]) + b"o"),
    )


FRAGMENT = st.recursive(_frag_leaf(), _frag_extend, max_leaves=20)


def _np_pickle_body(obj: Any) -> bytes:
    """The body (no PROTO, no STOP) of numpy's own protocol-2 pickle of ``obj``."""
    return pickle.dumps(obj, protocol=2)[2:-1]


def _reconstruct_build(state: bytes) -> bytes:
    """numpy's ndarray pickle: _reconstruct(ndarray, (0,), b'b') then BUILD(state)."""
    head = p_reduce(p_global("numpy._core.multiarray", "_reconstruct"),
                    p_tuple([p_global("numpy", "ndarray"), p_tuple([p_int(0)]), p_bytes(b"b")]))
    return p_build(head, state)


def _dtype(code: str) -> bytes:
    return p_reduce(p_global("numpy", "dtype"), p_tuple([p_str(code), b"\x89", b"\x88"]))


def attack_strategy() -> st.SearchStrategy:
    """Known ways to hurt an allow-listed unpickler (each a pickle body pushing one value)."""
    n_obj = st.sampled_from([1, 8, 1 << 20, 1 << 40])
    obj_dtype = st.sampled_from(["O", "O,f4", "V8"])
    raw = st.sampled_from([b"\x41" * 8, b"\xff" * 64, struct.pack("<Q", 0xDEADBEEF) * 16, b""])
    obj_array = st.tuples(n_obj, obj_dtype, st.booleans(), raw).map(lambda t: _reconstruct_build(
        p_tuple([p_int(1), p_tuple([p_int(t[0])]), _dtype(t[1]), b"\x88" if t[2] else b"\x89", p_bytes(t[3])])))
    obj_array_list = st.tuples(n_obj, obj_dtype).map(lambda t: _reconstruct_build(
        p_tuple([p_int(1), p_tuple([p_int(t[0])]), _dtype(t[1]), b"\x89", p_list([p_int(1), p_str("x")])])))
    field_state = st.sampled_from([
        # (version, byteorder, subarray, names, fields, elsize, alignment, flags)
        (3, "|", None, ("a",), {"a": ("O", 2**40)}, 8, 1, 0x3F),
        (3, "|", None, ("a",), {"a": ("f8", 2**40)}, 8, 1, 0),
        (3, "<", None, None, None, -1, -1, 0),
        (3, "<", None, None, None, 2**40, 1, 0),
        (3, "|", None, None, None, 8, 1, 0x3F),
        (3, "|", ("O", (4,)), None, None, 8, 1, 0),
        (4, "<", None, None, None, 8, 1, 0, None),
        (3, ">", None, None, None, 4, 4, 0),
    ])

    def enc(v: Any) -> bytes:
        if v is None:
            return b"N"
        if isinstance(v, bool):
            return p_int(v)
        if isinstance(v, int):
            return p_int(v)
        if isinstance(v, str):
            return _dtype(v) if v in ("O", "f8") else p_str(v)
        if isinstance(v, tuple):
            return p_tuple([enc(x) for x in v])
        if isinstance(v, dict):
            return p_dict([(p_str(k), enc(x)) for k, x in v.items()])
        raise TypeError(v)

    dtype_setstate = st.tuples(st.sampled_from(["f4", "V8", "O", "f4,i8", "i8"]), field_state).map(
        lambda t: p_build(_dtype(t[0]), enc(t[1])))
    big = st.sampled_from([3 << 30, 2**40, 2**62, 10**9])
    bytearray_big = big.map(lambda n: p_reduce(p_global("builtins", "bytearray"), p_tuple([p_int(n)])))
    set_range = st.tuples(st.sampled_from(["set", "frozenset", "bytearray"]), st.sampled_from([10**9, 10**7, 2**62])).map(
        lambda t: p_reduce(p_global("builtins", t[0]),
                           p_tuple([p_reduce(p_global("builtins", "range"), p_tuple([p_int(t[1])]))])))
    # BUILD with a dict (or (dict, slots)) state on a shared, allow-listed stand-in.
    build_shared = st.tuples(
        st.sampled_from(GLOBALS),
        st.sampled_from(["dtype", "name", "_fields", "value", "__dict__", "_fn", "__defaults__", "__kwdefaults__",
                         "owner", "key", "numel", "__class__", "__setstate__"]),
        st.sampled_from([p_str("float64"), p_str("int8"), b")", b"N", p_int(1), p_global("torch", "float64")]),
        st.booleans(),
    ).map(lambda t: p_build(p_global(*t[0]), p_dict([(p_str(t[1]), t[2])]) if t[3]
                            else p_tuple([b"N", p_dict([(p_str(t[1]), t[2])])])))
    # BUILD on an object the stand-ins return (a dtype, a storage type instance, a Record).
    build_instance = st.tuples(
        st.sampled_from([p_reduce(p_global("torch", "Size"), p_tuple([p_tuple([p_int(2)])])),
                         p_global("torch", "float32"), p_global("torch", "FloatStorage"),
                         p_reduce(p_global(MD, "_MEM_FORMAT_ENCODING"), p_tuple([p_int(1)])),
                         p_newobj(p_global(MD, "ChunkStorageMetadata"), b")"),
                         p_reduce(p_global("numpy", "dtype"), p_tuple([p_str("f4")]))]),
        st.sampled_from([p_dict([(p_str("dtype"), p_str("int8"))]), p_dict([(p_int(1), p_int(2))]),
                         p_dict([(p_str("__class__"), p_global(MD, "Metadata"))]),
                         p_tuple([b"N", p_dict([(p_str("name"), p_str("int8"))])]), p_int(7)]),
    ).map(lambda t: p_build(*t))
    depth = st.sampled_from([1000, 100_000])
    deep = st.one_of(
        depth.map(lambda n: b"]" * n + b"a" * (n - 1)),
        depth.map(lambda n: b"(" * n + b")" + b"t" * n),
        depth.map(lambda n: b"}" + b"K\x00}" * n + b"s" * n),
        depth.map(lambda n: b"(" * n + b"N" + b"l" * n),
    )
    repeat = st.one_of(
        st.sampled_from([10**5, 10**6]).map(lambda n: b"(" + b"K\x00" * n + b"l"),
        st.sampled_from([10**5, 10**6]).map(lambda n: b"N" + b"2" * n + b"(" + b"t"),
        st.sampled_from([2**31 - 1, 2**32 - 1, 10**8]).map(lambda n: b"N" + b"r" + struct.pack("<I", n)),
        st.sampled_from([2**31 - 1, 2**32 - 1]).map(lambda n: b"j" + struct.pack("<I", n)),
        st.sampled_from([2**62, 2**40]).map(lambda n: b"\x8d" + struct.pack("<Q", n) + b"x"),
        st.sampled_from([2**62, 2**40]).map(lambda n: b"\x8e" + struct.pack("<Q", n) + b"x"),
        st.sampled_from([2**62, 2**40]).map(lambda n: b"\x95" + struct.pack("<Q", n) + b"N"),
        st.sampled_from([10**5]).map(lambda n: b"]" + b"(" + b"K\x01" * n + b"e" + b"2" * 10),
    )
    # Self-reference through the memo: a Record holding itself (repr/eq/hash recursion).
    selfref = st.sampled_from(["state_dict_metadata", "fqn", "offsets", "size"]).map(
        lambda f: p_newobj(p_global(MD, "Metadata"), b")") + b"q\x00" + p_dict([(p_str(f), b"h\x00")]) + b"b")
    # A MetadataIndex holding itself used as a dict key.
    selfkey = st.just(p_dict([(p_newobj(p_global(MD, "MetadataIndex"), b")") + b"q\x01"
                               + p_dict([(p_str("fqn"), b"h\x01")]) + b"b", p_int(1))]))
    scalar = st.tuples(st.sampled_from(["O", "f4", "V8", "U1", "M8[s]"]), st.binary(max_size=16)).map(
        lambda t: p_reduce(p_global("numpy._core.multiarray", "scalar"), p_tuple([_dtype(t[0]), p_bytes(t[1])])))
    reconstruct = st.tuples(st.sampled_from([p_global("numpy", "ndarray"), p_global("numpy", "dtype"),
                                             p_global("builtins", "set"), p_global(MD, "Metadata")]),
                            st.sampled_from([p_tuple([p_int(0)]), p_tuple([p_int(2**62)]), p_tuple([p_int(-1)]), b"N"]),
                            st.sampled_from([p_bytes(b"b"), p_str("O"), _dtype("O"), p_bytes(b"V8")])).map(
        lambda t: p_reduce(p_global("numpy.core.multiarray", "_reconstruct"), p_tuple(list(t))))
    rebuild = st.tuples(st.sampled_from([2**62, 2**40, -1, 0]), st.sampled_from([(2**31, 2**31), (-1,), (2**62,), ()])).map(
        lambda t: p_reduce(p_global("torch._utils", "_rebuild_tensor_v2"), p_tuple([
            p_tuple([p_str("storage"), p_global("torch", "FloatStorage"), p_str("0"), p_str("cpu"), p_int(t[0])]) + b"Q",
            p_int(0), p_tuple([p_int(x) for x in t[1]]), p_tuple([p_int(1) for _ in t[1]]), b"\x89",
            p_reduce(p_global("collections", "OrderedDict"), b")")])))
    ordered = st.sampled_from([
        p_reduce(p_global("collections", "OrderedDict"), p_tuple([p_list([p_tuple([p_int(1)])])])),
        p_build(p_reduce(p_global("collections", "OrderedDict"), b")"), p_dict([(p_str("move_to_end"), b"N")])),
        p_newobj(p_global("collections", "OrderedDict"), b")") + b"(" + p_int(1) + p_int(2) + b"u",
        p_reduce(p_global("builtins", "complex"), p_tuple([p_str("1e400j")])),
        p_reduce(p_global("builtins", "complex"), p_tuple([p_str("x" * 100)])),
        p_reduce(p_global("builtins", "slice"), p_tuple([p_int(2**64), b"N", p_int(0)])),
        p_reduce(p_global("builtins", "range"), p_tuple([p_int(2**64)])),
        p_reduce(p_global("pathlib", "PosixPath"), p_tuple([p_str("/etc"), p_str("passwd")])),
        p_reduce(p_global("builtins", "bytearray"), p_tuple([p_str("abc"), p_str("rot13")])),
        p_reduce(p_global("builtins", "bytearray"), p_tuple([p_str("abc"), p_str("utf-8"), p_str("strict")])),
    ])
    return st.one_of(obj_array, obj_array_list, dtype_setstate, bytearray_big, set_range, build_shared,
                     build_instance, deep, repeat, selfref, selfkey, scalar, reconstruct, rebuild, ordered)


ATTACKS = attack_strategy()


def _known_attacks() -> list[tuple[str, bytes]]:
    """The attacks named in the test plan, as explicit pickle bodies (each pushes one value)."""
    storage_pid = p_tuple([p_str("storage"), p_global("torch", "FloatStorage"), p_str("0"), p_str("cpu"), p_int(4)])
    return [
        ("object-dtype ndarray over attacker bytes", _reconstruct_build(p_tuple([
            p_int(1), p_tuple([p_int(8)]), _dtype("O"), b"\x89", p_bytes(struct.pack("<Q", 0x41414141) * 8)]))),
        ("numpy.dtype.__setstate__ through BUILD: a field at offset 2**40", p_build(_dtype("V8"), p_tuple([
            p_int(3), p_str("|"), b"N", p_tuple([p_str("a")]), p_dict([(p_str("a"), p_tuple([_dtype("f8"), p_int(2**40)]))]),
            p_int(8), p_int(1), p_int(0x3F)]))),
        ("numpy.dtype.__setstate__ through BUILD clearing flags", p_build(_dtype("O"), p_tuple([
            p_int(3), p_str("|"), b"N", b"N", b"N", p_int(8), p_int(1), p_int(0)]))),
        ("bytearray(3 << 30)", p_reduce(p_global("builtins", "bytearray"), p_tuple([p_int(3 << 30)]))),
        ("set(range(10**9))", p_reduce(p_global("builtins", "set"),
                                       p_tuple([p_reduce(p_global("builtins", "range"), p_tuple([p_int(10**9)]))]))),
        ("BUILD {'dtype': 'float64'} on torch.FloatStorage", p_build(p_global("torch", "FloatStorage"),
                                                                     p_dict([(p_str("dtype"), p_str("float64"))]))),
        ("BUILD (None, {'name': 'int8'}) on torch.float32", p_build(p_global("torch", "float32"),
                                                                    p_tuple([b"N", p_dict([(p_str("name"), p_str("int8"))])]))),
        ("BUILD {'__defaults__': (1,)} on torch.Size", p_build(p_global("torch", "Size"),
                                                               p_dict([(p_str("__defaults__"), p_tuple([p_int(1)]))]))),
        ("100k nested lists", b"]" * 100_000 + b"a" * 99_999),
        ("100k nested tuples", b"(" * 100_000 + b")" + b"t" * 100_000),
        ("100k MARKs then one LIST", b"(" * 100_000 + b"N" + b"l"),
        ("LONG_BINPUT 0x7fffffff", b"Nr\xff\xff\xff\x7f"),
        ("LONG_BINPUT 10**8", b"Nr" + struct.pack("<I", 10**8)),
        ("BYTEARRAY8 of length 2**40", b"\x96" + struct.pack("<Q", 2**40) + b"x"),
        ("a million-element list", b"(" + b"K\x00" * 10**6 + b"l"),
        ("a persistent id of 2**62 elements", p_reduce(p_global("torch._utils", "_rebuild_tensor_v2"), p_tuple([
            storage_pid.replace(p_int(4), p_int(2**62)) + b"Q", p_int(0), p_tuple([p_int(2**31), p_int(2**31)]),
            p_tuple([p_int(2**31), p_int(1)]), b"\x89", p_reduce(p_global("collections", "OrderedDict"), b")")]))),
        ("a Metadata record holding itself", p_newobj(p_global(MD, "Metadata"), b")") + b"q\x00"
         + p_dict([(p_str("state_dict_metadata"), b"h\x00")]) + b"b"),
    ]


KNOWN_PICKLE_ATTACKS = _known_attacks()


def mutate_pickle_once(draw: Callable, data: bytes) -> tuple[bytes, str]:
    ops = ops_of(data)
    kind = draw(st.sampled_from(["int", "int", "int", "str", "str", "global", "delete", "dup", "swap", "insert",
                                 "flip", "truncate", "memo", "float", "other", "splice", "splice", "attack", "tuple"]))
    by = {
        "int": [i for i, o in enumerate(ops) if o[0].name in INT_OPS],
        "float": [i for i, o in enumerate(ops) if o[0].name in INT_OPS],
        "other": [i for i, o in enumerate(ops) if o[0].name in INT_OPS | STR_OPS],
        "str": [i for i, o in enumerate(ops) if o[0].name in STR_OPS | BYTES_OPS],
        "global": [i for i, o in enumerate(ops) if o[0].name in ("GLOBAL", "STACK_GLOBAL", "INST")],
        "memo": [i for i, o in enumerate(ops) if o[0].name in MEMO_OPS],
        "splice": [i for i, o in enumerate(ops) if o[0].name in LEAF_OPS],
        "attack": [i for i, o in enumerate(ops) if o[0].name in LEAF_OPS],
        "tuple": [i for i, o in enumerate(ops) if o[0].name in ("TUPLE1", "TUPLE2", "TUPLE3", "EMPTY_TUPLE", "TUPLE")],
    }
    if kind in by and not by[kind]:
        kind = "flip"
    if not ops and kind in ("delete", "dup", "swap", "insert"):
        kind = "flip"
    if not data:
        return b"\x80\x02N.", "empty pickle -> None pickle"

    def splice(i: int, new: bytes) -> bytes:
        return data[: ops[i][2]] + new + data[ops[i][3]:]

    def label(i: int) -> str:
        op, arg, pos, _ = ops[i]
        return f"op#{i}@{pos} {op.name} {arg!r:.40}"

    if kind in by:
        i = draw(st.sampled_from(by[kind]))
        op, arg, pos, end = ops[i]
        if kind == "int":
            v = draw(int_values(arg))
            return splice(i, p_int(v)), f"int {label(i)} -> {v}"
        if kind == "float":
            v = draw(st.sampled_from([float(arg if isinstance(arg, int) else 0) + 0.5, float("nan"), float("inf"),
                                      -0.0, 1e300, float(arg if isinstance(arg, int) else 0)]))
            return splice(i, p_float(v)), f"float {label(i)} -> {v}"
        if kind == "other":
            new = draw(st.sampled_from([b"N", b"\x88", b")", b"]", b"}", p_str("3"), p_int(3), p_bytes(b"3"),
                                        p_tuple([p_int(1), p_int(2)]), p_global("torch", "float32")]))
            return splice(i, new), f"type-confuse {label(i)} -> {new!r}"
        if kind == "str":
            if op.name in BYTES_OPS:
                old = arg if isinstance(arg, (bytes, bytearray)) else b""
                nb = draw(st.sampled_from([b"", b"\0" * 8, bytes(old) + b"x", bytes(old)[:-1], b"\xff" * 300]))
                return splice(i, p_bytes(nb)), f"bytes {label(i)} -> {nb[:20]!r}"
            if draw(st.integers(0, 5)) == 0:
                raw = draw(st.sampled_from([b"\xff\xfe", b"\xc0\x80", b"a\xed\xa0\x80", b"\x00"]))
                return splice(i, b"\x8c" + bytes([len(raw)]) + raw), f"str {label(i)} -> raw {raw!r}"
            s = draw(st.one_of(st.sampled_from(HOSTILE_STRS), st.text(max_size=12)))
            return splice(i, p_str(s)), f"str {label(i)} -> {s!r:.60}"
        if kind == "global":
            g = draw(st.one_of(st.sampled_from(GLOBALS), st.sampled_from(FORBIDDEN_GLOBALS)))
            new = (b"00" if op.name == "STACK_GLOBAL" else b"") + p_global(*g)
            if op.name == "INST":
                new = b"i" + g[0].encode() + b"\n" + g[1].encode() + b"\n"
            return splice(i, new), f"global {label(i)} -> {g[0]}.{g[1]}"
        if kind == "memo":
            if op.name == "MEMOIZE":
                new = draw(st.sampled_from([b"", b"\x94\x94", b"q\x00", b"r\xff\xff\xff\xff"]))
            else:
                k = draw(st.one_of(st.sampled_from([0, 1, 2, 255, 256, 2**31 - 1, 2**32 - 1]), st.integers(0, 300)))
                if (arg if isinstance(arg, int) else 0) >= 0 and k == arg:
                    k += 1
                letter = {"BINGET": "get", "LONG_BINGET": "get", "GET": "get"}.get(op.name, "put")
                if letter == "get":
                    new = (b"h" + bytes([k])) if k < 256 else (b"j" + struct.pack("<I", k))
                else:
                    new = (b"q" + bytes([k])) if k < 256 else (b"r" + struct.pack("<I", k))
            return splice(i, new), f"memo {label(i)} -> {new!r}"
        if kind == "splice":
            frag = draw(FRAGMENT)
            return splice(i, frag), f"splice {label(i)} -> fragment {frag[:60]!r}{'...' if len(frag) > 60 else ''}"
        if kind == "attack":
            frag = draw(ATTACKS)
            return splice(i, frag), f"attack-splice {label(i)} -> {frag[:60]!r}{'...' if len(frag) > 60 else ''} ({len(frag)} bytes)"
        if kind == "tuple":
            new = draw(st.sampled_from([b"\x85", b"\x86", b"\x87", b")", b"(t", b"l"]))
            return splice(i, new), f"tuple {label(i)} -> {new!r}"
    if kind == "delete":
        i = draw(st.integers(0, len(ops) - 1))
        return data[: ops[i][2]] + data[ops[i][3]:], f"delete {label(i)}"
    if kind == "dup":
        i = draw(st.integers(0, len(ops) - 1))
        return data[: ops[i][3]] + data[ops[i][2] : ops[i][3]] + data[ops[i][3]:], f"duplicate {label(i)}"
    if kind == "swap" and len(ops) >= 2:
        i = draw(st.integers(0, len(ops) - 2))
        a, b = data[ops[i][2] : ops[i][3]], data[ops[i + 1][2] : ops[i + 1][3]]
        return data[: ops[i][2]] + b + a + data[ops[i + 1][3]:], f"swap {label(i)} with next"
    if kind == "insert":
        i = draw(st.integers(0, len(ops) - 1))
        new = draw(st.sampled_from(INSERT_OPS))
        return data[: ops[i][2]] + new + data[ops[i][2]:], f"insert {new!r} before {label(i)}"
    if kind == "truncate":
        cut = draw(st.integers(0, len(data) - 1))
        return data[:cut], f"truncate pickle at {cut}/{len(data)}"
    pos = draw(st.integers(0, len(data) - 1))
    mask = draw(st.integers(1, 255))
    return data[:pos] + bytes([data[pos] ^ mask]) + data[pos + 1:], f"flip byte {pos} ^ {mask:#x}"


def mutate_pickle(draw: Callable, data: bytes, max_muts: int = 3) -> tuple[bytes, list[str]]:
    data = strip_frames(data)
    descs = []
    for _ in range(draw(st.integers(1, max_muts))):
        data, d = mutate_pickle_once(draw, data)
        descs.append(d)
    return data, descs


# ================================================================================================
# zip archives (torch.save layout)
# ================================================================================================

CD_FIELDS = {"sig": (0, "I"), "flags": (8, "H"), "method": (10, "H"), "csize": (20, "I"), "usize": (24, "I"),
             "nlen": (28, "H"), "elen": (30, "H"), "clen": (32, "H"), "disk": (34, "H"), "lh_off": (42, "I")}
LFH_FIELDS = {"sig": (0, "I"), "flags": (6, "H"), "method": (8, "H"), "csize": (18, "I"), "usize": (22, "I"),
              "nlen": (26, "H"), "elen": (28, "H")}
EOCD_FIELDS = {"sig": (0, "I"), "n_disk": (8, "H"), "n_total": (10, "H"), "cd_size": (12, "I"), "cd_off": (16, "I"),
               "clen": (20, "H")}
EOCD64_FIELDS = {"sig": (0, "I"), "rec_size": (4, "Q"), "n_disk": (24, "Q"), "n_total": (32, "Q"),
                 "cd_size": (40, "Q"), "cd_off": (48, "Q")}
LOC64_FIELDS = {"sig": (0, "I"), "eocd64_off": (8, "Q"), "ndisks": (16, "I")}


def zip_layout(buf: bytes) -> dict[str, Any] | None:
    eocd = buf.rfind(b"PK\x05\x06")
    if eocd < 0 or eocd + 22 > len(buf):
        return None
    lay: dict[str, Any] = {"eocd": eocd, "loc64": None, "eocd64": None, "cd": [], "lfh": []}
    count, _, cd_off = struct.unpack_from("<HII", buf, eocd + 10)
    if eocd >= 20 and buf[eocd - 20 : eocd - 16] == b"PK\x06\x07":
        lay["loc64"] = eocd - 20
        off = struct.unpack_from("<Q", buf, eocd - 12)[0]
        if off + 56 <= len(buf) and buf[off : off + 4] == b"PK\x06\x06":
            lay["eocd64"] = off
            count, _, cd_off = struct.unpack_from("<QQQ", buf, off + 32)
    pos = cd_off
    for _ in range(min(count, 10000)):
        if pos + 46 > len(buf) or buf[pos : pos + 4] != b"PK\x01\x02":
            break
        nlen, elen, clen = struct.unpack_from("<HHH", buf, pos + 28)
        lh = struct.unpack_from("<I", buf, pos + 42)[0]
        name = bytes(buf[pos + 46 : pos + 46 + nlen])
        lay["cd"].append((pos, name))
        if lh + 30 <= len(buf) and buf[lh : lh + 4] == b"PK\x03\x04":
            lay["lfh"].append((lh, name))
        pos += 46 + nlen + elen + clen
    return lay


def zip_entries(buf: bytes) -> list[dict[str, Any]] | None:
    """[{name, data}] of a STORED zip (via the central directory), or None."""
    lay = zip_layout(buf)
    if not lay or not lay["cd"]:
        return None
    out = []
    for pos, name in lay["cd"]:
        size = struct.unpack_from("<I", buf, pos + 24)[0]
        lh = struct.unpack_from("<I", buf, pos + 42)[0]
        if buf[lh : lh + 4] != b"PK\x03\x04":
            return None
        nlen, elen = struct.unpack_from("<HH", buf, lh + 26)
        start = lh + 30 + nlen + elen
        out.append({"name": name, "data": bytes(buf[start : start + size])})
    return out


def write_zip(entries: list[dict[str, Any]], align: int = 64, comment: bytes = b"", zip64_records: bool = True) -> bytes:
    """A torch-like STORED zip: 64-byte aligned data (padding in an 'FB' extra field), zip64 end records.
    Entry keys: name, data, and optionally method, cd_zip64 (sizes/offset in a zip64 extra, with overrides
    ``z64`` = (usize, csize, lh_off)), lfh_name (a different name in the local header)."""
    out = bytearray()
    cd = bytearray()
    for e in entries:
        name, data = e["name"], e["data"]
        lname = e.get("lfh_name", name)
        method = e.get("method", 0)
        payload = zlib.compress(data)[2:-4] if method == 8 else data
        off = len(out)
        extra = b""
        if align > 1:
            p = (-(off + 30 + len(lname) + 4)) % align
            extra = b"FB" + struct.pack("<H", p) + b"Z" * p
        crc = zlib.crc32(data)
        out += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0x0800, method, 0, 0, crc, len(payload), len(data),
                           len(lname), len(extra)) + lname + extra + payload
        csize, usize, lh, cdx = len(payload), len(data), off, b""
        if e.get("cd_zip64"):
            u, c, l = e.get("z64", (usize, csize, lh))
            cdx = struct.pack("<HHQQQ", 1, 24, u, c, l)
            csize = usize = lh = 0xFFFFFFFF
        cd += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 0x031E, 20, 0x0800, method, 0, 0, crc, csize, usize,
                          len(name), len(cdx), 0, 0, 0, 0, lh) + name + cdx
    cd_off = len(out)
    out += cd
    n = len(entries)
    if zip64_records:
        eocd64 = len(out)
        out += struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 0x031E, 45, 0, 0, n, n, len(cd), cd_off)
        out += struct.pack("<IIQI", 0x07064B50, 0, eocd64, 1)
    out += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, min(n, 0xFFFF), min(n, 0xFFFF), len(cd), cd_off, len(comment))
    return bytes(out + comment)


def field_values(fmt: str, old: int, size: int) -> st.SearchStrategy:
    top = {"H": 0xFFFF, "I": 0xFFFFFFFF, "Q": 2**64 - 1}[fmt]
    common = [0, 1, old + 1, old - 1, old * 2, size, size - 1, size + 1, top, top - 1]
    extra = {"H": [8, 30, 46, 0x8000], "I": [0x7FFFFFFF, 0x80000000, old + size, 2**31 + old],
             "Q": [2**63, 2**62, old + 2**32, 2**40, 2**63 - 1]}[fmt]
    return st.one_of(st.sampled_from(common + extra), st.integers(0, top)).map(lambda v: v & top)


def mutate_zip_field(draw: Callable, buf: bytes) -> tuple[bytes, str]:
    """Set one header field of the zip in ``buf`` (length unchanged)."""
    lay = zip_layout(buf)
    if lay is None:
        reject()
    recs = [("eocd", lay["eocd"], EOCD_FIELDS)]
    if lay["eocd64"] is not None:
        recs.append(("eocd64", lay["eocd64"], EOCD64_FIELDS))
    if lay["loc64"] is not None:
        recs.append(("loc64", lay["loc64"], LOC64_FIELDS))
    recs += [(f"cd[{n.decode('latin-1')}]", p, CD_FIELDS) for p, n in lay["cd"]] * 2
    recs += [(f"lfh[{n.decode('latin-1')}]", p, LFH_FIELDS) for p, n in lay["lfh"]] * 2
    rname, rpos, fields = draw(st.sampled_from(recs))
    fname = draw(st.sampled_from(sorted(fields)))
    off, fmt = fields[fname]
    old = struct.unpack_from("<" + fmt, buf, rpos + off)[0]
    new = draw(field_values(fmt, old, len(buf)))
    out = bytearray(buf)
    struct.pack_into("<" + fmt, out, rpos + off, new)
    return bytes(out), f"zip field {rname}.{fname} {old} -> {new}"


def structural_ranges(buf: bytes) -> list[tuple[int, int]]:
    lay = zip_layout(buf)
    if lay is None:
        return [(0, len(buf))]
    r = [(lay["eocd"], lay["eocd"] + 22)]
    if lay["eocd64"] is not None:
        r.append((lay["eocd64"], lay["eocd64"] + 56))
    if lay["loc64"] is not None:
        r.append((lay["loc64"], lay["loc64"] + 20))
    for p, n in lay["cd"]:
        r.append((p, p + 46 + len(n)))
    for p, n in lay["lfh"]:
        r.append((p, p + 30 + len(n)))
    return r


def mutate_zip_flip(draw: Callable, buf: bytes) -> tuple[bytes, str]:
    lo, hi = draw(st.sampled_from(structural_ranges(buf)))
    pos = draw(st.integers(lo, max(lo, hi - 1)))
    mask = draw(st.integers(1, 255))
    out = bytearray(buf)
    if pos < len(out):
        out[pos] ^= mask
    return bytes(out), f"flip zip byte {pos} ^ {mask:#x}"


def find_pkl(entries: list[dict[str, Any]]) -> int | None:
    for i, e in enumerate(entries):
        if e["name"].endswith(b"data.pkl"):
            return i
    return None


def mutate_zip_rebuild(draw: Callable, entries: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any], str]:
    """Structural edits that need the archive rebuilt: names, duplicates, entry contents, zip64 extras."""
    entries = [dict(e) for e in entries]
    opts: dict[str, Any] = {}
    names = [e["name"] for e in entries]
    kind = draw(st.sampled_from(["rename", "rename", "drop", "duplicate", "reorder", "content", "zip64", "compress",
                                 "align", "comment", "lfh_name"]))
    i = draw(st.integers(0, len(entries) - 1))
    nm = entries[i]["name"]
    prefix = nm[: nm.index(b"/") + 1] if b"/" in nm else b""
    if kind == "rename":
        new = draw(st.sampled_from(names + [prefix + b"../x", b"", b"data.pkl", b"a/b/data.pkl", nm + b"\x00",
                                            b"\xff\xfe" + nm, prefix + b"data/0/../1", b"x" * 1000, b"/" + nm,
                                            prefix + b"data/" + b"9" * 30, nm.upper()]))
        entries[i]["name"] = new
        return entries, opts, f"rename entry {nm!r} -> {new!r}"
    if kind == "drop":
        del entries[i]
        return entries, opts, f"drop entry {nm!r}"
    if kind == "duplicate":
        j = draw(st.integers(0, len(entries) - 1))
        dup = dict(entries[j])
        dup["data"] = draw(st.sampled_from([dup["data"], dup["data"][: len(dup["data"]) // 2], dup["data"] * 2,
                                            wrap(p_str("dup")), b""]))
        entries.insert(draw(st.integers(0, len(entries))), dup)
        return entries, opts, f"duplicate entry {dup['name']!r} ({len(dup['data'])} bytes)"
    if kind == "reorder":
        j = draw(st.integers(0, len(entries) - 1))
        entries[i], entries[j] = entries[j], entries[i]
        return entries, opts, f"swap entries {i} and {j}"
    if kind == "content":
        old = entries[i]["data"]
        new = draw(st.sampled_from([b"", b"big", b"middle", b"\xff", b"little\n", b"99", old[:-1], old + b"\0" * 7,
                                    old[: len(old) // 2], b"\0" * (len(old) + 64)]))
        entries[i]["data"] = new
        return entries, opts, f"content of {nm!r} ({len(old)} bytes) -> {new[:12]!r} ({len(new)} bytes)"
    if kind == "zip64":
        e = entries[i]
        u, c = len(e["data"]), len(e["data"])
        which = draw(st.sampled_from(["ok", "usize", "csize", "lh_off"]))
        v = draw(st.sampled_from([0, 2**63, 2**64 - 1, 2**32, 1]))
        e["cd_zip64"] = True
        if which != "ok":
            e["z64"] = (v if which == "usize" else u, v if which == "csize" else c, v if which == "lh_off" else None)
        return entries, opts, f"zip64 extra on {nm!r} ({which}={v if which != 'ok' else 'correct'})"
    if kind == "compress":
        entries[i]["method"] = 8
        return entries, opts, f"deflate entry {nm!r}"
    if kind == "align":
        opts["align"] = draw(st.sampled_from([1, 2, 4096]))
        return entries, opts, f"realign data to {opts['align']}"
    if kind == "comment":
        opts["comment"] = draw(st.sampled_from([b"PK\x05\x06" + b"\0" * 18, b"\0" * 9000, b"x"]))
        return entries, opts, f"zip comment {opts['comment'][:8]!r}... ({len(opts['comment'])} bytes)"
    new = draw(st.sampled_from([prefix + b"data/999", prefix + b"../x", b""]))
    entries[i]["lfh_name"] = new
    return entries, opts, f"local header name of {nm!r} -> {new!r}"


def finish_zip(entries: list[dict[str, Any]], opts: dict[str, Any]) -> bytes:
    for e in entries:  # z64 lh_off None: the real offset, filled in by writing twice
        if e.get("z64") and e["z64"][2] is None:
            e["z64"] = (e["z64"][0], e["z64"][1], 0)
            e["_fix_lh"] = True
    out = write_zip(entries, align=opts.get("align", 64), comment=opts.get("comment", b""))
    if any(e.get("_fix_lh") for e in entries):
        lay = zip_layout(out)
        offsets = {}
        for p, n in (lay or {}).get("lfh", []):
            offsets.setdefault(n, p)
        for e in entries:
            if e.pop("_fix_lh", False):
                e["z64"] = (e["z64"][0], e["z64"][1], offsets.get(e["name"], 0))
        out = write_zip(entries, align=opts.get("align", 64), comment=opts.get("comment", b""))
    return out


# ================================================================================================
# safetensors headers
# ================================================================================================


def st_split(buf: bytes) -> tuple[dict[str, Any], bytes]:
    n = struct.unpack_from("<Q", buf, 0)[0]
    return json.loads(buf[8 : 8 + n]), buf[8 + n:]


def st_join(header_text: bytes, data: bytes, hlen: int | None = None) -> bytes:
    return struct.pack("<Q", len(header_text) if hlen is None else hlen) + header_text + data


def _mutate_st_header_times(draw, buf: bytes) -> tuple[bytes, list]:
    """One or two header mutations in a row (stopping if the file became shorter than its length field)."""
    descs = []
    for _ in range(draw(st.integers(1, 2))):
        buf, desc = mutate_st_header(draw, buf)
        descs.append(desc)
        if len(buf) < 8:
            break
    return buf, descs


def mutate_st_header(draw: Callable, buf: bytes) -> tuple[bytes, str]:
    """One structural mutation of a safetensors file (header JSON, raw header text, length field, truncation)."""
    try:
        header, data = st_split(buf)
        if not isinstance(header, dict):
            raise ValueError("not an object")
        kinds = ["offsets", "offsets", "shape", "shape", "huge", "huge", "dtype", "entry", "metadata", "top", "raw", "raw",
                 "hlen", "truncate", "sharding"]
    except Exception:  # an earlier mutation broke the header: only raw-level mutations remain
        header, data, kinds = {}, b"", ["hlen", "truncate"]
        if len(buf) < 8:
            return buf, "(file too short to mutate further)"
    names = [k for k in header if k != "__metadata__"]
    kind = draw(st.sampled_from(kinds))
    def _ints(v: Any, n: int | None) -> bool:
        return (isinstance(v, list) and (n is None or len(v) == n)
                and all(type(x) is int and 0 <= x < 2**40 for x in v))

    # Entries still well-formed (an earlier mutation of the same header may have broken some).
    names = [k for k in names if isinstance(header[k], dict) and _ints(header[k].get("data_offsets"), 2)
             and _ints(header[k].get("shape"), None) and len(header[k]["shape"]) <= 8]
    if not names and kind in ("offsets", "shape", "huge", "dtype", "entry"):
        kind = "top"
    text: bytes | None = None
    hlen = None
    if kind in ("offsets", "shape", "huge", "dtype", "entry"):
        name = draw(st.sampled_from(names))
        ent = header[name] = dict(header[name])
        b, e = ent["data_offsets"]
        other = header[draw(st.sampled_from(names))]["data_offsets"]
        if kind == "offsets":
            new = draw(st.sampled_from([[-1, e], [b, -1], [e, b], [b, e + 1], [b - 1, e - 1], [b + 1, e + 1],
                                        [b, 2**64], [2**63, 2**63 + e - b], [2**64 - 1, 2**64 - 1 + e - b], [b + 0.5, e],
                                        [str(b), str(e)], [b], [b, e, 0], None, "0-1", {"a": 1}, [[b], [e]],
                                        [True, e], list(other), [0, len(data) + 1], [len(data), len(data) + e - b],
                                        [b, b], [float(b), float(e)], [b, 1e300], [b, e + 2**64]]))
            ent["data_offsets"] = new
            desc = f"data_offsets of {name!r} [{b}, {e}] -> {new!r}"
        elif kind == "shape":
            shp = ent["shape"]
            n = math.prod(shp)
            new = draw(st.sampled_from([[2**64], [2**63], [-1], [2.5], ["3"], [[2]], [], [0], None, {}, [1] * 65,
                                        [1] * 10000, [2**32, 2**32], list(reversed(shp)), [n], [n, 1, 1],
                                        [2**31] * 3, [-n, -1], [n * 2], [True] * len(shp), shp + [0],
                                        [2**62, 0], [0, 2**64]]))
            ent["shape"] = new
            desc = f"shape of {name!r} {shp} -> {new!r:.80}"
        elif kind == "huge":
            itemsize = {"F64": 8, "I64": 8, "U64": 8, "C64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "I16": 2,
                        "U16": 2, "BF16": 2}.get(str(ent.get("dtype")), 1)
            shp = draw(st.sampled_from([[2**20, 2**20], [2**31], [2**40], [2**61 // itemsize], [3, 2**40 + 1],
                                        [2**62 // itemsize + 1], [1, 1, 2**33]] + [[m // itemsize] for m in MID_BYTES]))
            ent["shape"] = shp
            ent["data_offsets"] = [b, b + math.prod(shp) * itemsize]
            desc = f"shape and data_offsets of {name!r} -> {shp} [{b}, {b + math.prod(shp) * itemsize}] (consistent, huge)"
        elif kind == "dtype":
            new = draw(st.sampled_from(["BF16", "F64", "I64", "F4", "F8_E8M0", "F8_E4M3", "U1", "f32", "", 123, None,
                                        ["F32"], "C128", "F6_E2M3", "BOOL", "U64", "F32 ", "f4", "O", "V8"]))
            old = ent["dtype"]
            ent["dtype"] = new
            desc = f"dtype of {name!r} {old} -> {new!r}"
        else:
            what = draw(st.sampled_from(["list", "str", "int", "null", "nodtype", "noshape", "nooffsets", "extra",
                                         "rename"]))
            if what in ("list", "str", "int", "null"):
                header[name] = {"list": [1, 2], "str": "x", "int": 5, "null": None}[what]
            elif what.startswith("no"):
                ent.pop({"nodtype": "dtype", "noshape": "shape", "nooffsets": "data_offsets"}[what])
            elif what == "extra":
                ent["extra"] = {"x": [1, 2]}
            else:
                header[draw(st.sampled_from(["", "../x", "a" * 5000, "\udcff", "__metadata__"]))] = header.pop(name)
            desc = f"entry {name!r}: {what}"
    elif kind == "metadata":
        new = draw(st.sampled_from([[1], "x", 5, None, {"a": {"b": 1}}, {"format": 5}, {"k": "v" * 100000}, True]))
        header["__metadata__"] = new
        desc = f"__metadata__ -> {new!r:.60}"
    elif kind == "sharding":
        md = header.get("__metadata__") if isinstance(header.get("__metadata__"), dict) else {}
        md = dict(md)
        name = draw(st.sampled_from(names)) if names else "x"
        new = draw(st.sampled_from(["{", "[]", "5", "null", json.dumps({name: 5}), json.dumps({name: {"saved_offsets": 5}}),
                                    json.dumps({name: {"saved_offsets": [2**64, 0]}}), json.dumps({name: {"saved_offsets": "ab"}}),
                                    json.dumps({name: {"saved_offsets": [[0], [0]]}}), "[" * 100000 + "]" * 100000, 7, None]))
        md["DCP_SHARDING_INFO"] = new
        header["__metadata__"] = md
        desc = f"__metadata__.DCP_SHARDING_INFO -> {str(new)[:60]!r}"
    elif kind == "top":
        what = draw(st.sampled_from(["list", "str", "num", "deep", "many", "empty"]))
        if what == "deep":
            text = b"[" * 100000 + b"]" * 100000
        elif what == "many":
            header = {f"t{i}": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]} for i in range(3000)}
        else:
            header = {"list": [], "str": "x", "num": 5, "empty": {}}[what]
        desc = f"top-level header -> {what}"
    elif kind == "raw":
        base = json.dumps(header, separators=(",", ":")).encode()
        what = draw(st.sampled_from(["dupkey", "dupkey", "trailing", "bom", "nan", "bignum", "badutf8", "nul",
                                     "surrogate", "pad", "notjson", "inf"]))
        if what == "dupkey" and names:
            name = draw(st.sampled_from(names))
            other = header[draw(st.sampled_from(names))]
            text = base[:-1] + b"," + json.dumps({name: other})[1:].encode()
        elif what == "trailing":
            text = base + b" x"
        elif what == "bom":
            text = b"\xef\xbb\xbf" + base
        elif what in ("nan", "inf", "bignum") and names:
            name = draw(st.sampled_from(names))
            lit = {"nan": b"NaN", "inf": b"Infinity", "bignum": b"1" * 5000}[what]
            ent = dict(header[name])
            ent["data_offsets"] = ["@@", ent["data_offsets"][1]]
            header[name] = ent
            text = json.dumps(header, separators=(",", ":")).encode().replace(b'"@@"', lit)
        elif what == "badutf8":
            text = base.replace(b'"', b'"\xff', 1)
        elif what == "nul":
            text = base + b"\x00"
        elif what == "surrogate":
            text = base[:-1] + b',"\\ud800":{"dtype":"U8","shape":[0],"data_offsets":[0,0]}}'
        elif what == "pad":
            text = b" " * 7 + base + b" " * 9
        elif what == "notjson":
            text = b"\x00" * len(base)
        else:
            text = base
        desc = f"raw header text: {what}"
    elif kind == "hlen":
        n = struct.unpack_from("<Q", buf, 0)[0]
        hlen = draw(st.sampled_from([0, 1, 7, n - 1, n + 1, n + 8, len(buf), len(buf) - 8, 2**64 - 1, 2**63,
                                     100 * 2**20, 100 * 2**20 + 1, 2**32]))
        out = bytearray(buf)
        struct.pack_into("<Q", out, 0, hlen & (2**64 - 1))
        return bytes(out), f"header length {n} -> {hlen}"
    else:
        cut = draw(st.integers(0, max(0, len(buf) - 1)))
        return buf[:cut], f"truncate safetensors file at {cut}/{len(buf)}"
    if text is None:
        text = json.dumps(header, separators=(",", ":")).encode("utf-8", "surrogatepass")
    return st_join(text, data, hlen), desc


WEIGHT_MAP_VALUES = ["../x.safetensors", "/etc/passwd", "http://h/x.safetensors", "a/../../b.safetensors", 1, None,
                     [], {}, "nonexistent.safetensors", "model.safetensors.index.json", ".", "", "sub",
                     "fifo.safetensors", "x" * 5000, "C:\\x.safetensors", "s\x00.safetensors", "./{f}", "sub/../{f}",
                     "{f}/", "link.safetensors", "file:///etc/passwd", "//h/x"]


def mutate_index(draw: Callable, index: dict[str, Any], files: list[str]) -> tuple[Any, str]:
    """A structural mutation of a sharded index (safetensors or torch)."""
    index = json.loads(json.dumps(index))
    wm = index["weight_map"]
    kind = draw(st.sampled_from(["value", "value", "value", "extra", "map", "top", "drop"]))
    if kind == "value" and wm:
        name = draw(st.sampled_from(sorted(wm)))
        v = draw(st.sampled_from(WEIGHT_MAP_VALUES))
        if isinstance(v, str):
            v = v.replace("{f}", wm[name] if isinstance(wm[name], str) else "x")
        wm[name] = v
        return index, f"weight_map[{name!r}] -> {v!r:.60}"
    if kind == "extra":
        v = draw(st.sampled_from(files + ["nonexistent.bin"]))
        wm[draw(st.sampled_from(["ghost", "", "a" * 300])) ] = v
        return index, f"weight_map gains an entry for {v!r}"
    if kind == "map":
        new = draw(st.sampled_from([[], "x", None, 5, {"a": {"b": 1}}, list(wm.items())]))
        index["weight_map"] = new
        return index, f"weight_map -> {new!r:.60}"
    if kind == "drop" and wm:
        name = draw(st.sampled_from(sorted(wm)))
        del wm[name]
        return index, f"weight_map loses {name!r}"
    new = draw(st.sampled_from([[], "x", None, {"metadata": {"total_size": 2**70}}, {"weight_map": wm, "metadata": 5}]))
    return new, f"index top level -> {new!r:.60}"


# ================================================================================================
# exercising jreshard (in the forked child)
# ================================================================================================


def _frames(e: BaseException) -> list[str]:
    return [f"{os.path.relpath(f.filename, REPO) if f.filename.startswith(str(REPO)) else f.filename}:{f.lineno} in {f.name}"
            for f in traceback.extract_tb(e.__traceback__)]


def _jreshard_frame(frames: list[str]) -> str:
    """The innermost jreshard frame (file:function), else the innermost frame's function."""
    for fr in reversed(frames):
        if fr.startswith("jreshard/"):
            path, rest = fr.split(":", 1)
            return f"{path}:{rest.split(' in ', 1)[1]}"
    return f"outside jreshard, in {frames[-1].rsplit(' in ', 1)[-1]}" if frames else "?"


def _chain(e: BaseException) -> list[BaseException]:
    out, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def _safe_str(x: Any, n: int = 400) -> str:
    try:
        s = str(x)
    except BaseException as e:  # noqa: BLE001
        s = f"<str() failed: {type(e).__name__}>"
    return s if len(s) <= n else s[:n] + f"... ({len(s)} chars)"


class Probe:
    """Collects the problems of one case (in the child)."""

    def __init__(self) -> None:
        self.problems: list[dict[str, Any]] = []
        self.silent: list[str] = []
        self.outcome: dict[str, str] = {}

    def add(self, kind: str, step: str, e: BaseException | None = None, msg: str = "", what: str = "") -> None:
        frames = _frames(e) if e is not None else []
        self.problems.append({
            "kind": kind, "step": step, "type": type(e).__name__ if e is not None else kind,
            "msg": msg or (_safe_str(e) if e is not None else ""),
            "where": _jreshard_frame(frames) if frames else (what or step), "frames": frames[-6:],
        })

    def call(self, step: str, fn: Callable[[], Any]) -> tuple[bool, Any]:
        try:
            return True, fn()
        except JReshardError as e:
            try:
                str(e), repr(e)
            except BaseException as e2:  # noqa: BLE001
                self.add("exception", f"str({step} error)", e2)
                return False, e
            for c in _chain(e)[1:]:  # an allocation that was attempted and failed (not a JReshardError refusal)
                if isinstance(c, MemoryError) and not isinstance(c, JReshardError):
                    self.add("memory", step, c, f"MemoryError wrapped in {type(e).__name__}: {_safe_str(e)}")
                    break
            self.outcome[step] = type(e).__name__
            return False, e
        except BaseException as e:  # noqa: BLE001  (any other type breaks the contract)
            self.add("memory" if isinstance(e, MemoryError) else "exception", step, e)
            return False, e


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape
            and np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes())


def use(obj: Any) -> None:
    """repr() a decoded object and use what it holds (numpy arrays, dtypes, records)."""
    repr(obj)
    seen: set[int] = set()
    stack = [obj]
    n = 0
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        while stack and n < 20000:
            x = stack.pop()
            n += 1
            if id(x) in seen:
                continue
            seen.add(id(x))
            if isinstance(x, np.ndarray):
                np.asarray(x)
                repr(x.dtype), x.shape, x.strides
                _use_dtype(x.dtype)
                if x.nbytes <= 2**24:
                    repr(x)
                    x.copy().tobytes()
                    if x.size <= 10000:
                        x.tolist()
                    if x.dtype.kind in "biufc" and x.size:
                        x.sum()
            elif isinstance(x, np.dtype):
                _use_dtype(x)
            elif isinstance(x, np.generic):
                repr(x)
                _use_dtype(x.dtype)
                np.asarray(x).tobytes()
            elif isinstance(x, dict):
                for k, v in x.items():
                    stack += [k, v]
            elif isinstance(x, (list, tuple, set, frozenset)):
                stack += list(x)[:5000]
            elif isinstance(x, (bytes, bytearray, str, int, float, complex, range, slice, type(None))):
                if not isinstance(x, (bytes, bytearray, str)) or len(x) < 2**20:
                    str(x)
            else:
                repr(x), str(x)
                for f in getattr(type(x), "_fields", ()) or ():
                    if isinstance(f, str):
                        stack.append(getattr(x, f, None))
                if dataclasses.is_dataclass(x) and not isinstance(x, type):
                    for f in dataclasses.fields(x):
                        stack.append(getattr(x, f.name, None))


def _use_dtype(dt: np.dtype) -> None:
    repr(dt), dt.itemsize, dt.fields, dt.descr, dt.hasobject
    if 0 < dt.itemsize <= 2**16:
        z = np.zeros(2, dt)
        repr(z)
        z.tobytes()
        if dt.names:
            for name in dt.names:
                repr(z[name])


def _box(rng: random.Random, shape: tuple[int, ...]) -> tuple:
    out = []
    for s in shape:
        if s == 0:
            out.append(slice(0, 0))
        elif rng.random() < 0.2:
            out.append(rng.randrange(s))
        else:
            a = rng.randrange(s)
            out.append(slice(a, rng.randrange(a, s) + 1))
    if shape and all(isinstance(b, slice) and b == slice(0, s) for b, s in zip(out, shape)) and shape[0] > 1:
        out[0] = slice(1, shape[0])
    return tuple(out)


def exercise(case: dict[str, Any], env: "Env", probe: Probe) -> None:
    """The whole read surface on one input."""
    expect = env.expected.get(case.get("expect") or "", None)
    if case["mode"] == "loads":
        ok, obj = probe.call("safe_loads", lambda: safe_loads(case["data"], "fuzz", allow_storages=case.get("storages", False)))
        if ok:
            probe.outcome.setdefault("safe_loads", "ok")
            probe.call("use(decoded)", lambda: use(obj))
        return
    ok, ckpt = probe.call("open", lambda: jreshard.open(case["path"], io=case.get("io", "auto")))
    if not ok:
        return
    probe.outcome.setdefault("open", "ok")
    ok, tensors = probe.call("tensors", lambda: dict(ckpt.tensors))
    probe.call("repr(ckpt)", lambda: repr(ckpt))
    rng = random.Random(case.get("rng", 0))
    if ok:
        if expect and case.get("preserve") and sorted(tensors) != sorted(expect["tensors"]):
            probe.add("invariant", "tensors", what="names differ from the original", msg=f"tensor names changed: {sorted(set(tensors) ^ set(expect['tensors']))[:5]}")
        listed = list(tensors.items())[:MAX_TENSORS]
        boxed = {n for n, _ in rng.sample(listed, min(len(listed), BOX_READS))} | set(case.get("box", ()))
        for name, info in listed:
            good, _ = probe.call("repr(info)", lambda: (repr(info), str(info.shape), str(info.dtype), info.nbytes))
            if not good:
                continue
            ok_full, full = probe.call("read", lambda: ckpt.read(name))
            if ok_full:
                probe.outcome.setdefault("read", "ok")
                if not isinstance(full, np.ndarray) or full.shape != tuple(info.shape) or full.dtype != info.dtype:
                    probe.add("invariant", "read", what="read disagrees with tensors", msg=f"{name!r}: read gave {type(full).__name__} "
                              f"{getattr(full, 'shape', None)} {getattr(full, 'dtype', None)}, tensors says {info.shape} {info.dtype}")
                    continue
                oracle = case.get("oracle", {}).get(name)
                if oracle is not None and oracle.shape == full.shape and oracle.dtype == full.dtype and not _same(oracle, full):
                    probe.add("invariant", "read", what="values differ from an independent decoding", msg=f"{name!r}: values differ from an independent decoding of the "
                              f"mutated file (silently wrong array)")
                ref = expect["tensors"].get(name) if expect else None
                if ref is not None and ref.shape == full.shape and ref.dtype == full.dtype and not _same(ref, full):
                    if case.get("preserve"):
                        probe.add("invariant", "read", what="values differ from the original",
                                  msg=f"{name!r}: values differ from the original")
                    else:
                        probe.silent.append(name)
            if name not in boxed:
                continue
            box = _box(rng, tuple(info.shape))
            ok_box, part = probe.call("read(box)", lambda: ckpt.read(name, box))
            if ok_box and ok_full:
                want = full[box]
                if not isinstance(part, np.ndarray) or not _same(np.asarray(part), np.asarray(want)):
                    probe.add("invariant", "read(box)", what="read(box) differs from read()[box]", msg=f"{name!r}: read(name, {box}) differs from read(name)[box] "
                              f"({getattr(part, 'shape', None)} vs {np.shape(want)})")
    ok, objs = probe.call("objects", lambda: dict(ckpt.objects))
    if ok:
        probe.outcome.setdefault("objects", "ok")
        for k, v in objs.items():
            probe.call("use(object)", lambda: (repr(k), use(v)))
        if expect and case.get("preserve") and expect.get("objects") is not None:
            got = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in objs.items()}
            if got != expect["objects"]:
                probe.add("invariant", "objects", what="objects differ from the original", msg=f"objects differ: {str(got)[:200]} vs {str(expect['objects'])[:200]}")
    probe.call("close", ckpt.close)


def benign_check(env: "Env", probe: Probe) -> None:
    """Shared state is intact: a benign pickle and a benign torch.save file decode as before any case."""
    got = _benign_outcome(env.benign_pickle)
    if got != env.benign_expected:
        probe.add("benign", "benign pickle", msg=f"after this case a benign pickle decodes differently: {got[:300]!r} "
                  f"instead of {env.benign_expected[:300]!r}")
    checks = {"np.dtype('f4').itemsize": np.dtype("f4").itemsize == 4, "float32 fields": np.dtype(np.float32).fields is None,
              "int64": np.dtype("<i8").itemsize == 8 and np.dtype("O").hasobject}
    bad = [k for k, v in checks.items() if not v]
    if bad:
        probe.add("benign", "numpy state", msg=f"numpy's builtin dtypes changed: {bad}")
    if env.benign_file:
        path, ref = env.benign_file
        try:
            with jreshard.open(path) as c:
                for name, want in ref.items():
                    if not _same(c.read(name), want):
                        probe.add("benign", "benign file", msg=f"after this case {name!r} of a benign torch.save file reads differently")
                        break
        except BaseException as e:  # noqa: BLE001
            probe.add("benign", "benign file", e, f"after this case a benign torch.save file fails: {type(e).__name__}: {_safe_str(e)}")


def _benign_outcome(data: bytes) -> str:
    try:
        return repr(safe_loads(data, "benign", allow_storages=True))
    except BaseException as e:  # noqa: BLE001
        return f"ERROR {type(e).__name__}"


def benign_pickle() -> bytes:
    body = p_dict([
        (p_str("t"), p_reduce(p_global("torch._utils", "_rebuild_tensor_v2"), p_tuple([
            p_tuple([p_str("storage"), p_global("torch", "FloatStorage"), p_str("0"), p_str("cpu"), p_int(6)]) + b"Q",
            p_int(0), p_tuple([p_int(2), p_int(3)]), p_tuple([p_int(3), p_int(1)]), b"\x89",
            p_reduce(p_global("collections", "OrderedDict"), b")")]))),
        (p_str("dt"), p_global("torch", "bfloat16")),
        (p_str("size"), p_reduce(p_global("torch", "Size"), p_tuple([p_tuple([p_int(2), p_int(3)])]))),
        (p_str("arr"), _np_pickle_body(np.arange(4, dtype=np.float32))),
        (p_str("npdt"), _np_pickle_body(np.dtype("<i8"))),
        (p_str("od"), p_reduce(p_global("collections", "OrderedDict"), p_tuple([p_list([p_tuple([p_str("a"), p_int(1)])])]))),
        (p_str("set"), p_reduce(p_global("builtins", "set"), p_tuple([p_list([p_int(1), p_int(2)])]))),
        (p_str("si"), p_build(p_newobj(p_global(FS, "_StorageInfo"), b")"), p_dict([
            (p_str("relative_path"), p_str("__0_0.distcp")), (p_str("offset"), p_int(0)), (p_str("length"), p_int(10)),
            (p_str("transform_descriptors"), b"N")]))),
        (p_str("chunk"), p_build(p_newobj(p_global(MD, "ChunkStorageMetadata"), b")"), p_dict([
            (p_str("offsets"), p_reduce(p_global("torch", "Size"), p_tuple([p_tuple([p_int(0)])]))),
            (p_str("sizes"), p_reduce(p_global("torch", "Size"), p_tuple([p_tuple([p_int(4)])])))]))),
        (p_str("mem"), p_reduce(p_global(MD, "_MEM_FORMAT_ENCODING"), p_tuple([p_int(1)]))),
    ])
    return wrap(body, 2)


# ================================================================================================
# the parent side: environment, case running, failure classes
# ================================================================================================


@dataclasses.dataclass
class Env:
    work: Path
    expected: dict[str, dict[str, Any]]
    benign_pickle: bytes
    benign_expected: str
    benign_file: tuple[str, dict[str, np.ndarray]] | None
    case_timeout: float
    plant: list[str]
    corpus: str = ""


class Runner:
    def __init__(self, env: Env, family: str) -> None:
        self.env = env
        self.family = family
        self.classes: dict[tuple, dict[str, Any]] = {}
        self.silent: list[str] = []
        self.outcomes: dict[str, int] = {}
        self.cases = 0
        self.slowest: list[tuple[float, str, str]] = []
        self.case_dir = env.work / "case"
        self.fail_dir = env.work / "failures"
        self.t0 = time.monotonic()

    def fresh(self) -> Path:
        if self.case_dir.exists():
            shutil.rmtree(self.case_dir)
        self.case_dir.mkdir(parents=True)
        return self.case_dir

    def run(self, case: dict[str, Any], desc: list[str]) -> None:
        """Run one case in a forked child; classify what happened."""
        self.cases += 1
        res_path = self.env.work / "result.json"
        fault_path = self.env.work / "fault.txt"
        for p in (res_path, fault_path):
            if p.exists():
                p.unlink()
        plant = self.env.plant[(self.cases - 1) % len(self.env.plant)] if self.env.plant else None
        sys.stdout.flush()
        sys.stderr.flush()
        t0 = time.monotonic()
        # A forked child's peak RSS starts at this process's current RSS (not at its earlier peak, which may be
        # far higher): the child's growth is measured from here.
        rss_at_fork = _rss_now()
        pid = os.fork()
        if pid == 0:  # child
            code = 3
            try:
                fault = open(fault_path, "w")
                faulthandler.enable(file=fault, all_threads=True)
                faulthandler.dump_traceback_later(self.env.case_timeout, exit=True, file=fault)
                warnings.simplefilter("ignore")
                probe = Probe()
                if plant:
                    _plant(plant)
                exercise(case, self.env, probe)
                benign_check(self.env, probe)
                with open(res_path, "w") as f:
                    json.dump({"problems": probe.problems, "silent": probe.silent, "outcome": probe.outcome}, f, default=str)
                code = 0
            except BaseException:  # noqa: BLE001
                traceback.print_exc()
            finally:
                os._exit(code)
        status, rusage = self._wait(pid, self.env.case_timeout + 15)
        elapsed = time.monotonic() - t0
        self.slowest = sorted(self.slowest + [(elapsed, case.get("label", ""), "; ".join(desc)[:120])], reverse=True)[:3]
        fault = fault_path.read_text(errors="replace") if fault_path.exists() else ""
        problems: list[dict[str, Any]] = []
        if status is None:
            problems.append({"kind": "hang", "step": "case", "type": "hang", "where": _fault_where(fault),
                             "msg": f"no result after {elapsed:.0f}s (killed)", "frames": _fault_frames(fault)})
        elif os.WIFSIGNALED(status):
            sig = signal.Signals(os.WTERMSIG(status)).name
            problems.append({"kind": "signal", "step": "case", "type": sig, "where": _fault_where(fault),
                             "msg": f"child died by {sig}", "frames": _fault_frames(fault)})
        elif not res_path.exists():
            hung = "Timeout" in fault
            problems.append({"kind": "hang" if hung else "crash", "step": "case", "type": "hang" if hung else "exit",
                             "where": _fault_where(fault),
                             "msg": (f"exceeded the per-case limit of {self.env.case_timeout:.0f}s" if hung
                                     else f"child exited with status {os.WEXITSTATUS(status)} without a result"),
                             "frames": _fault_frames(fault)})
        else:
            res = json.loads(res_path.read_text())
            problems += res["problems"]
            if res["silent"]:
                self.silent.append(f"{'; '.join(desc)} -> {', '.join(res['silent'][:3])}")
            for step, what in res["outcome"].items():
                k = f"{step}:{what}"
                self.outcomes[k] = self.outcomes.get(k, 0) + 1
        if rusage is not None and rusage.ru_maxrss * 1024 > rss_at_fork + RSS_LIMIT:
            problems.append({"kind": "memory", "step": "case", "type": "rss", "where": "peak RSS",
                             "msg": f"child peaked at {rusage.ru_maxrss / 2**20:.2f} GiB RSS", "frames": []})
        for p in problems:
            self._record(p, case, desc)

    def _wait(self, pid: int, timeout: float) -> tuple[int | None, Any]:
        deadline = time.monotonic() + timeout
        delay = 0.0005
        while True:
            wpid, status, rusage = os.wait4(pid, os.WNOHANG)
            if wpid == pid:
                return status, rusage
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                _, status, rusage = os.wait4(pid, 0)
                return None, rusage
            time.sleep(delay)
            delay = min(delay * 2, 0.02)

    def _record(self, p: dict[str, Any], case: dict[str, Any], desc: list[str]) -> None:
        key = (p["kind"], p["type"], p["where"])
        c = self.classes.get(key)
        if c is None:
            c = self.classes[key] = {"count": 0, "steps": set(), "first": p, "desc": desc, "input": case.get("label", ""),
                                     "saved": self._save(case, desc, len(self.classes) + 1, p)}
        c["count"] += 1
        c["steps"].add(p["step"])

    def _save(self, case: dict[str, Any], desc: list[str], n: int, p: dict[str, Any]) -> str:
        if n > 40:
            return ""
        slug = "".join(ch if ch.isalnum() else "-" for ch in f"{self.family}-{p['kind']}-{p['type']}")[:60]
        d = self.fail_dir / f"{n:02d}-{slug}"
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        meta = {k: v for k, v in case.items() if k not in ("data", "oracle")}
        if case["mode"] == "loads":
            (d / "input.pkl").write_bytes(case["data"])
        else:
            src = Path(case["path"])
            root = src if src.is_dir() else src.parent
            _copy_regular(root, d / "input")
            meta["path"] = str(d / "input" / (src.relative_to(root) if src != root else ""))
        meta["desc"] = desc
        (d / "case.json").write_text(json.dumps(meta, default=str, indent=1))
        return str(d)

    def report(self) -> int:
        took = time.monotonic() - self.t0
        print(f"fuzz[{self.family}]: {self.cases} cases in {took:.1f}s")
        if self.outcomes:
            print("  outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(self.outcomes.items())))
        for t, label, d in self.slowest:
            print(f"  slow case: {t:.2f}s {label}: {d}")
        if self.silent:
            print(f"  silent value changes (no error, same name/shape/dtype, different values; informational): "
                  f"{len(self.silent)} cases, e.g.:")
            for s in self.silent[:3]:
                print(f"    - {s[:300]}")
        if not self.classes:
            print("  no failures")
            return 0
        print(f"  FAILURE CLASSES: {len(self.classes)}")
        for i, ((kind, typ, where), c) in enumerate(sorted(self.classes.items(), key=lambda kv: -kv[1]["count"]), 1):
            f = c["first"]
            print(f"  [{i}] {kind}: {typ} at {where} in step(s) {', '.join(sorted(c['steps']))} -- {c['count']} case(s)")
            print(f"      input: {c['input']}")
            print(f"      mutation: {'; '.join(c['desc'])[:600]}")
            print(f"      message: {f['msg'][:600]}")
            for fr in f.get("frames", [])[-4:]:
                print(f"        {fr}")
            if c["saved"]:
                cap = resource.getrlimit(resource.RLIMIT_AS)[0]
                print(f"      saved: {c['saved']}\n      replay: python tests/fuzz_worker.py --corpus {self.env.corpus} "
                      f"--workdir {self.env.work / 'replay'}{f' --as-limit {cap}' if cap > 0 else ''} --replay {c['saved']}")
        return 1


def _fault_frames(text: str) -> list[str]:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("File ")]
    return lines[:8]


def _fault_where(text: str) -> str:
    """The innermost frame of the current thread in a faulthandler dump (jreshard's if any)."""
    cur = text.split("Current thread", 1)[-1] if "Current thread" in text else text
    lines = [ln.strip() for ln in cur.splitlines() if ln.strip().startswith("File ")]
    for ln in lines:
        if "/jreshard/" in ln:
            path = ln.split('"')[1]
            return "jreshard/" + path.split("/jreshard/", 1)[1] + ":" + ln.rsplit(" in ", 1)[-1]
    if lines:
        path = lines[0].split('"')[1] if '"' in lines[0] else lines[0]
        return os.path.basename(path) + ":" + lines[0].rsplit(" in ", 1)[-1]
    return "?"


def _copy_regular(src: Path, dst: Path) -> None:
    """Copy a case directory, regular files only (a FIFO would block a copy)."""
    dst.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        st_ = os.lstat(p)
        if stat.S_ISDIR(st_.st_mode):
            _copy_regular(p, dst / p.name)
        elif stat.S_ISREG(st_.st_mode):
            shutil.copyfile(p, dst / p.name)
        elif stat.S_ISLNK(st_.st_mode):
            os.symlink(os.readlink(p), dst / p.name)
        elif stat.S_ISFIFO(st_.st_mode):
            os.mkfifo(dst / p.name)


def _rss_now() -> int:
    """This process's resident set size now, in bytes (``VmRSS``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def _plant(what: str) -> None:
    """Deliberate bugs, to check that the harness catches each kind of failure (used by the test suite). Each
    fires in ``jreshard.open`` (so on every input) except ``wrong`` (reads return a changed value) and ``leak``
    (shared state that later loads use is changed)."""
    import ctypes

    orig_open, orig_read = jreshard.open, jreshard.Checkpoint.read

    def open_(*args, **kwargs):
        if what == "typeerror":
            raise TypeError("planted TypeError")
        if what == "segv":
            ctypes.string_at(0)
        if what == "hang":
            time.sleep(3600)
        if what == "memory":
            np.ones(1 << 40, np.uint8)
        if what == "rss":
            a = np.ones(RSS_LIMIT + (512 << 20), np.uint8)  # touches every page
            del a
        return orig_open(*args, **kwargs)

    def read(self, name, index=...):
        out = orig_read(self, name, index)
        if what == "wrong" and out.size:
            out = out.copy()
            out.reshape(-1).view(np.uint8)[0] ^= 1
        return out

    jreshard.open = open_
    jreshard.Checkpoint.read = read
    if what == "leak":
        import jreshard.dtypes as d

        d.TORCH_DTYPES["float32"] = np.dtype(np.int32)


# ================================================================================================
# inputs
# ================================================================================================


class _G:
    """Permissive stand-in used to parse trusted (torch-written) metadata in the parent."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        self.args = args
        self.__dict__.update(kw)

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and (state[0] is None or isinstance(state[0], dict)):
            state = {**(state[0] or {}), **(state[1] or {})}
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.state = state


class _Permissive(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        return type(name, (_G,), {})


def dcp_items(path: Path) -> list[dict[str, Any]]:
    """The items of a DCP checkpoint (file, offset, length, transforms, fqn), from its trusted .metadata."""
    md = _Permissive(io.BytesIO((path / ".metadata").read_bytes())).load()
    seen, out = set(), []
    for mi, info in md.storage_data.items():
        key = (info.relative_path, int(info.offset), int(info.length),
               tuple(getattr(info, "transform_descriptors", None) or ()))
        if key in seen:
            continue
        seen.add(key)
        out.append({"file": key[0], "offset": key[1], "length": key[2], "transforms": key[3], "fqn": mi.fqn})
    return out


def single_chunk_tensors(path: Path) -> list[tuple[str, tuple[int, ...], int]]:
    """(fqn, size, itemsize) of the tensors saved in one chunk, from a DCP checkpoint's trusted .metadata."""
    md = _Permissive(io.BytesIO((path / ".metadata").read_bytes())).load()
    out = []
    for fqn, entry in md.state_dict_metadata.items():
        chunks = getattr(entry, "chunks", None)
        size = getattr(entry, "size", None)
        if chunks and len(chunks) == 1 and size is not None:
            dims = tuple(size.args[0]) if getattr(size, "args", None) else tuple(size)
            props = getattr(entry, "properties", None)
            dt = getattr(props, "dtype", None)
            if dt is None and isinstance(getattr(props, "state", None), tuple) and props.state:
                dt = props.state[0]  # TensorProperties pickles its fields as a tuple
            dtype = getattr(dt, "__name__", "")
            itemsize = {"float64": 8, "int64": 8, "complex64": 8, "complex128": 16, "float32": 4, "int32": 4,
                        "float16": 2, "bfloat16": 2, "int16": 2}.get(dtype, 1)
            if dims:
                out.append((fqn, dims, itemsize))
    return out


def storage_info_ops(md: bytes) -> list[dict[str, Any]]:
    """For each ``_StorageInfo`` in a (FRAME-free) DCP .metadata pickle: its relative path, offset and length,
    and the indices of the int opcodes holding offset and length (strings are resolved through the memo)."""
    ops = ops_of(md)
    memo: dict[int, Any] = {}
    n_memo = 0
    prev: Any = None
    last: Any = None
    out: list[dict[str, Any]] = []
    for i, (op, arg, _, _) in enumerate(ops):
        name = op.name
        if name == "MEMOIZE":
            memo[n_memo] = last
            n_memo += 1
            continue
        if name in ("BINPUT", "LONG_BINPUT", "PUT"):
            memo[arg] = last
            continue
        if name in STR_OPS:
            value = arg
        elif name in ("BINGET", "LONG_BINGET", "GET"):
            value = memo.get(arg)
        elif name in INT_OPS:
            value = arg
            if prev == "offset" and out and "off_op" not in out[-1]:
                out[-1].update(off_op=i, offset=arg)
            elif prev == "length" and out and "len_op" not in out[-1]:
                out[-1].update(len_op=i, length=arg)
        else:
            value = None
        if prev == "relative_path" and isinstance(value, str):
            out.append({"path": value})
        prev = last = value
    return [r for r in out if "off_op" in r and "len_op" in r]


def relocate_item(d: Path, item: dict[str, Any], new_blob: bytes) -> str:
    """Append ``new_blob`` to the item's file in the DCP directory ``d`` and point the item's storage entries
    in .metadata at it (for a re-embedded item that no longer fits in place)."""
    md = strip_frames((d / ".metadata").read_bytes())
    ops = ops_of(md)
    fpath = d / item["file"]
    new_off = fpath.stat().st_size
    patches = []
    for r in storage_info_ops(md):
        if (r["path"], r["offset"], r["length"]) == (item["file"], item["offset"], item["length"]):
            patches += [(r["off_op"], p_int(new_off)), (r["len_op"], p_int(len(new_blob)))]
    if not patches:
        reject()
    for i, new in sorted(patches, reverse=True):
        md = md[: ops[i][2]] + new + md[ops[i][3]:]
    (d / ".metadata").write_bytes(md)
    with open(fpath, "ab") as f:
        f.write(new_blob)
    return f"item moved to the end of {item['file']} (offset {new_off}, {len(new_blob)} bytes; .metadata patched)"


def place_item(d: Path, item: dict[str, Any], raw_archive: bytes, compressed: bool) -> str:
    """Write a re-built item archive back: in place (padded to its length) when it fits, else appended."""
    fpath = d / item["file"]
    new = _fit(raw_archive, item, compressed)
    if new is not None:
        whole = fpath.read_bytes()
        fpath.write_bytes(whole[: item["offset"]] + new + whole[item["offset"] + item["length"]:])
        return "in place"
    blob = zstandard.ZstdCompressor(level=3).compress(raw_archive) if compressed else raw_archive
    return relocate_item(d, item, blob)


def copy_dir(src: Path, dst: Path) -> None:
    for p in src.iterdir():
        if p.is_file():
            shutil.copyfile(p, dst / p.name)


class Inputs:
    def __init__(self, manifest: dict[str, Any]) -> None:
        self.m = manifest
        self.dcp = {k: Path(v["path"]) for k, v in manifest["dcp"].items()}
        self.items = {k: dcp_items(p) for k, p in self.dcp.items()}
        self.metadata = {k: (p / ".metadata").read_bytes() for k, p in self.dcp.items()}
        self.single_chunk = {k: single_chunk_tensors(p) for k, p in self.dcp.items()}
        self.pt = manifest["pt"]


def load_expected(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out = {}
    for group in ("dcp", "pt"):
        for k, v in manifest[group].items():
            store = load_store(v["ref"])
            out[f"{group}:{k}"] = {"tensors": {n: store[n] for n in v["names"]}, "objects": v.get("objects")}
    return out


# ================================================================================================
# independent decoders (the parent computes what a mutated file really holds, without jreshard)
# ================================================================================================


def _np_dtypes() -> dict[str, np.dtype]:
    import ml_dtypes

    return {"F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype(ml_dtypes.bfloat16),
            "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
            "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
            "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
            "BOOL": np.dtype("?"), "C64": np.dtype("<c8"), "C128": np.dtype("<c16")}


ST_DTYPES = _np_dtypes()
STORAGE_DTYPES = {"DoubleStorage": "F64", "FloatStorage": "F32", "HalfStorage": "F16", "BFloat16Storage": "BF16",
                  "LongStorage": "I64", "IntStorage": "I32", "ShortStorage": "I16", "CharStorage": "I8",
                  "ByteStorage": "U8", "BoolStorage": "BOOL", "ComplexFloatStorage": "C64",
                  "ComplexDoubleStorage": "C128"}


def _nat(v: Any) -> bool:
    return type(v) is int and 0 <= v < 2**40


def oracle_safetensors(buf: bytes) -> dict[str, np.ndarray]:
    """What the safetensors spec says ``buf`` holds: {name: array} of each well-formed entry ({} if the header
    cannot be read). An entry jreshard returns must equal this."""
    try:
        (n,) = struct.unpack_from("<Q", buf, 0)
        if n > len(buf) - 8:
            return {}

        def no_dups(pairs: list) -> dict:
            keys = [k for k, _ in pairs]
            if len(keys) != len(set(keys)):
                raise ValueError("duplicate key")
            return dict(pairs)

        header = json.loads(buf[8 : 8 + n].decode("utf-8"), object_pairs_hook=no_dups)
    except Exception:
        return {}
    if not isinstance(header, dict):
        return {}
    data = buf[8 + n:]
    out = {}
    for name, ent in header.items():
        if name == "__metadata__" or not isinstance(ent, dict):
            continue
        dt, shape, offs = ent.get("dtype"), ent.get("shape"), ent.get("data_offsets")
        if (not isinstance(dt, str) or dt not in ST_DTYPES or not isinstance(shape, list) or not all(_nat(x) for x in shape)
                or len(shape) > 64 or not isinstance(offs, list) or len(offs) != 2 or not all(_nat(x) for x in offs)):
            continue
        b, e = offs
        dtype = ST_DTYPES[dt]
        if not b <= e <= len(data) or e - b != math.prod(shape) * dtype.itemsize:
            continue
        out[name] = np.frombuffer(data[b:e], dtype).reshape(shape)
    return out


class _View:
    def __init__(self, storage: tuple, offset: Any, size: Any, stride: Any) -> None:
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


class _Tok:
    def __init__(self, name: str) -> None:
        self.name = name


class _OracleUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return lambda storage, offset, size, stride, *a: _View(storage, offset, size, stride)
        if (module, name) in (("torch._utils", "_rebuild_parameter"), ("torch._utils", "_rebuild_parameter_with_state")):
            return lambda data, *a: data
        if (module, name) == ("collections", "OrderedDict"):
            return dict
        if module == "torch" and name in STORAGE_DTYPES:
            return _Tok(name)
        raise pickle.UnpicklingError(f"oracle does not decode {module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        if not (type(pid) is tuple and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _Tok)
                and isinstance(pid[2], str)):
            raise pickle.UnpicklingError("oracle: unexpected persistent id")
        return ("storage", pid[1].name, pid[2], pid[4])


def _flatten_decoded(obj: Any, prefix: str = "") -> Any:
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _flatten_decoded(v, f"{prefix}{k}.")
    elif isinstance(obj, (list, tuple)) and any(isinstance(v, (_View, dict, list, tuple)) for v in obj):
        for i, v in enumerate(obj):
            yield from _flatten_decoded(v, f"{prefix}{i}.")
    else:
        yield prefix[:-1], obj


def oracle_torchsave(buf: bytes) -> dict[str, np.ndarray]:
    """What a torch.save archive holds, decoded with Python's zipfile and a recording unpickler: {name: array}
    of each tensor whose view lies inside its storage ({} when the archive is not plainly readable)."""
    import zipfile

    try:
        z = zipfile.ZipFile(io.BytesIO(buf))
        names = z.namelist()
        if len(names) != len(set(names)):
            return {}
        pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") <= 1]
        if len(pkl) != 1:
            return {}
        prefix = pkl[0][: -len("data.pkl")]
        if any(i.compress_type != 0 for i in z.infolist() if i.filename.startswith(prefix + "data")):
            return {}
        order = z.read(prefix + "byteorder").decode() if prefix + "byteorder" in names else "little"
        if order not in ("little", "big"):
            return {}
        obj = _OracleUnpickler(io.BytesIO(z.read(pkl[0]))).load()
        out = {}
        for name, leaf in _flatten_decoded(obj):
            if not isinstance(leaf, _View):
                continue
            _, sname, key, numel = leaf.storage
            dtype = ST_DTYPES[STORAGE_DTYPES[sname]].newbyteorder("<" if order == "little" else ">")
            size, stride, off = tuple(leaf.size), tuple(leaf.stride), leaf.offset
            if not (all(_nat(x) for x in size + stride + (off, numel)) and len(size) == len(stride) <= 64):
                continue
            raw = z.read(prefix + "data/" + key)
            if len(raw) < numel * dtype.itemsize:
                continue
            store = np.frombuffer(raw, dtype, count=numel)
            if math.prod(size) and off + sum((n - 1) * t for n, t in zip(size, stride)) >= numel:
                continue
            view = np.lib.stride_tricks.as_strided(store[off:] if math.prod(size) else store[:0], size,
                                                   tuple(t * dtype.itemsize for t in stride))
            out[name] = np.array(view, order="C").astype(dtype.newbyteorder("="))
        return out
    except Exception:
        return {}


class _LegacyOracleUnpickler(_OracleUnpickler):
    """The recording unpickler, for the legacy format's persistent ids (six fields, no storage views)."""

    def persistent_load(self, pid: Any) -> Any:
        if not (type(pid) is tuple and len(pid) == 6 and pid[0] == "storage" and isinstance(pid[1], _Tok)
                and isinstance(pid[2], str) and pid[5] is None):
            raise pickle.UnpicklingError("oracle: unexpected persistent id")
        seen = self.seen.setdefault(pid[2], (pid[1].name, pid[4]))
        if seen != (pid[1].name, pid[4]):
            raise pickle.UnpicklingError("oracle: one storage named two ways")
        return ("storage", pid[1].name, pid[2], pid[4])


def legacy_parts(buf: bytes) -> tuple[list[int], list[str], list[tuple[str, int, int]]] | None:
    """Where the five pickles of a legacy torch.save file end, its storage keys, and (key, offset of its count,
    count) of each storage, by Python's pickle and the counts in the file (None if it is not well formed)."""
    try:
        f = io.BytesIO(buf)
        ends: list[int] = []
        seen: dict[str, Any] = {}
        for _ in range(5):
            u = _LegacyOracleUnpickler(f)  # never Python's own unpickler: it would import what a pickle names
            u.seen = seen
            keys = u.load()
            ends.append(f.tell())
        if type(keys) is not list or not all(type(k) is str for k in keys) or set(keys) != set(seen):
            return None
        table, pos = [], ends[4]
        for k in keys:
            count = struct.unpack_from("<q", buf, pos)[0]
            table.append((k, pos, count))
            pos += 8 + max(count, 0) * ST_DTYPES[STORAGE_DTYPES[seen[k][0]]].itemsize
        return ends, keys, table
    except Exception:  # noqa: BLE001  (whatever this decoder cannot read is not well formed)
        return None


def oracle_legacy(buf: bytes) -> dict[str, np.ndarray]:
    """What a legacy torch.save file holds, decoded with Python's pickle and numpy (torch's rules by hand): {name:
    array} of each tensor whose view lies inside its storage ({} when the file is not plainly readable)."""
    try:
        f = io.BytesIO(buf)

        def load() -> Any:
            u = _LegacyOracleUnpickler(f)  # never Python's own unpickler: it would import what a pickle names
            u.seen = {}
            return u.load(), u.seen

        if load()[0] != 0x1950A86A20F9469CFC6C or load()[0] != 1001 or type(load()[0]) is not dict:
            return {}
        obj, seen = load()
        keys = load()[0]
        if type(keys) is not list or len(set(keys)) != len(keys) or set(keys) != set(seen):
            return {}
        data = {}
        for k in keys:
            sname, numel = seen[k]
            dtype = ST_DTYPES[STORAGE_DTYPES[sname]].newbyteorder("<")
            head = f.read(8)
            if len(head) != 8 or struct.unpack("<q", head)[0] != numel or not _nat(numel):
                return {}
            raw = f.read(numel * dtype.itemsize)
            if len(raw) != numel * dtype.itemsize:
                return {}
            data[k] = np.frombuffer(raw, dtype)
        out = {}
        for name, leaf in _flatten_decoded(obj):
            if not isinstance(leaf, _View) or type(leaf.storage) is not tuple:
                continue
            store = data[leaf.storage[2]]
            size, stride, off = tuple(leaf.size), tuple(leaf.stride), leaf.offset
            if not (all(_nat(x) for x in size + stride + (off,)) and len(size) == len(stride) <= 64):
                continue
            if math.prod(size) and off + sum((n - 1) * t for n, t in zip(size, stride)) >= len(store):
                continue
            view = np.lib.stride_tricks.as_strided(store[off:] if math.prod(size) else store[:0], size,
                                                   tuple(t * store.itemsize for t in stride))
            out[name] = np.array(view, order="C").astype(store.dtype.newbyteorder("="))
        return out
    except Exception:  # noqa: BLE001  (whatever this decoder cannot read is not plainly readable)
        return {}


def oracle_dir(d: Path, kind: str) -> dict[str, np.ndarray]:
    """The independent decoding of every regular safetensors / torch.save file in ``d`` (names found in more
    than one file are left out)."""
    out: dict[str, np.ndarray] = {}
    dup: set[str] = set()
    for p in sorted(d.iterdir()):
        if not stat.S_ISREG(os.lstat(p).st_mode):
            continue
        if kind == "safetensors" and p.suffix == ".safetensors":
            got = oracle_safetensors(p.read_bytes())
        elif kind == "torchsave" and p.suffix in (".pt", ".bin"):
            got = oracle_torchsave(p.read_bytes())
        elif kind == "legacy" and p.suffix in (".pt", ".bin"):
            got = oracle_legacy(p.read_bytes())
        else:
            continue
        for k, v in got.items():
            if k in out:
                dup.add(k)
            out[k] = v
    return {k: v for k, v in out.items() if k not in dup}


# ================================================================================================
# families
# ================================================================================================


def _fit(raw_archive: bytes, item: dict[str, Any], compressed: bool) -> bytes | None:
    """``raw_archive`` (an item's uncompressed torch.save zip) as exactly ``item['length']`` bytes: compressed
    if the item was, padded with a zip comment (raw) or trailing zero bytes after the zstd frame; None when it
    does not fit."""
    target = item["length"]
    if compressed:
        data = zstandard.ZstdCompressor(level=3).compress(raw_archive)
        if len(data) > target:
            data = zstandard.ZstdCompressor(level=19).compress(raw_archive)
        return data + b"\0" * (target - len(data)) if len(data) <= target else None
    gap = target - len(raw_archive)
    if gap == 0:
        return raw_archive
    if (gap < 0 or gap > 65535 or raw_archive[-22:-20] != b"PK"
            or struct.unpack_from("<H", raw_archive, len(raw_archive) - 2)[0]):
        return None
    return raw_archive[:-2] + struct.pack("<H", gap) + b"\0" * gap


def fit_item(raw_archive: bytes, item: dict[str, Any], compressed: bool) -> bytes:
    out = _fit(raw_archive, item, compressed)
    if out is None:
        reject()
    return out


class Families:
    def __init__(self, runner: Runner, inputs: Inputs, io_choices: list[str]) -> None:
        self.r = runner
        self.inp = inputs
        self.io_choices = io_choices

    def _io(self, draw: Callable) -> str:
        return draw(st.sampled_from(self.io_choices))

    # -- controls: unmutated inputs must read back exactly -----------------------------------------

    def controls(self, family: str) -> None:
        r = self.r
        if family in ("dcp_metadata", "dcp_items"):
            for v in self.inp.dcp:
                d = r.fresh()
                copy_dir(self.inp.dcp[v], d)
                r.run({"mode": "open", "path": str(d), "expect": f"dcp:{v}", "preserve": True, "label": f"dcp/{v} unchanged"},
                      ["none (control)"])
        if family == "dcp_items":
            for v in ("threads", "zstd"):
                if v not in self.inp.dcp:
                    continue
                d = r.fresh()
                copy_dir(self.inp.dcp[v], d)
                for item in self.inp.items[v][:40]:
                    whole = (d / item["file"]).read_bytes()
                    blob = whole[item["offset"] : item["offset"] + item["length"]]
                    raw = zstandard.ZstdDecompressor().decompressobj().decompress(blob) if item["transforms"] else blob
                    relocate_item(d, item, zstandard.ZstdCompressor().compress(raw) if item["transforms"] else raw)
                r.run({"mode": "open", "path": str(d), "expect": f"dcp:{v}", "preserve": True,
                       "label": f"dcp/{v} with 40 items moved to the ends of their files"}, ["relocate items (control)"])
        if family == "torchsave":
            for k, v in self.inp.pt.items():
                d = r.fresh()
                path = self._pt_copy(k, d)
                r.run({"mode": "open", "path": str(path), "expect": f"pt:{k}", "preserve": True,
                       "label": f"torch.save {k} unchanged"}, ["none (control)"])
            d = r.fresh()
            src = Path(self.inp.pt["small"]["path"])
            (d / src.name).write_bytes(finish_zip(zip_entries(src.read_bytes()), {}))
            r.run({"mode": "open", "path": str(d / src.name), "expect": "pt:small", "preserve": True,
                   "label": "torch.save small, zip rewritten unchanged"}, ["rebuild zip (control)"])
        if family == "legacy":
            for k in ("legacy_small", "legacy_big"):
                if k in self.inp.pt:
                    d = r.fresh()
                    path = self._pt_copy(k, d)
                    r.run({"mode": "open", "path": str(path), "expect": f"pt:{k}", "preserve": True,
                           "oracle": oracle_dir(d, "legacy"), "label": f"legacy torch.save {k} unchanged"},
                          ["none (control)"])
        if family == "pickles":
            r.run({"mode": "loads", "data": self.r.env.benign_pickle, "label": "benign pickle"}, ["none (control)"])
        self.explicit(family)

    def explicit(self, family: str) -> None:
        """Known attacks, run in every session before the generated cases (regressions stay caught whatever
        the seed draws)."""
        r = self.r
        if family == "pickles":
            for label, body in KNOWN_PICKLE_ATTACKS:
                r.run({"mode": "loads", "data": wrap(body, 4), "storages": True, "label": "safe_loads(pickle)"},
                      [f"explicit: {label}"])
        if family == "dcp_metadata":
            for v in [k for k in ("zstd", "threads") if k in self.inp.dcp]:
                cands = [t for t in self.inp.single_chunk[v] if t[0] == "plain.vec"] or self.inp.single_chunk[v][:1]
                for fqn, size, itemsize in cands:
                    claim = max(1, MID_BYTES[0] // itemsize)
                    md = strip_frames(self.inp.metadata[v])
                    ops = ops_of(md)
                    start = next(i for i, o in enumerate(ops) if o[0].name in STR_OPS and o[1] == fqn)
                    ints = [i for i in range(start, start + 400) if ops[i][0].name in INT_OPS][: 3 * len(size)]
                    for i in sorted((ints[0], ints[2 * len(size)]), reverse=True):
                        md = md[: ops[i][2]] + p_int(claim) + md[ops[i][3]:]
                    for io_ in ("auto", "tensorstore"):
                        d = r.fresh()
                        copy_dir(self.inp.dcp[v], d)
                        (d / ".metadata").write_bytes(md)
                        r.run({"mode": "open", "path": str(d), "io": io_, "rng": 1, "box": [fqn],
                               "label": f"dcp/{v} .metadata"},
                              [f"explicit: tensor {fqn!r} of size {size} and its one chunk claim {claim} "
                               f"({claim * itemsize / 2**30:.1f} GiB, between the address-space cap and the machine's memory)"])
        if family == "safetensors":
            from safetensors.numpy import save_file

            for io_ in ("auto", "tensorstore"):
                d = r.fresh()
                save_file({"a": np.ones(4, np.float32)}, str(d / "model.safetensors"))
                header, data = st_split((d / "model.safetensors").read_bytes())
                n = MID_BYTES[0] // 4
                header["a"] = {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]}
                (d / "model.safetensors").write_bytes(st_join(json.dumps(header).encode(), data))
                r.run({"mode": "open", "path": str(d / "model.safetensors"), "io": io_, "rng": 1, "box": ["a"],
                       "label": "safetensors file with 1 tensor (a: float32[4])"},
                      [f"explicit: header claims a: F32 [{n}] at [0, {4 * n}] ({MID_BYTES[0] / 2**30:.1f} GiB) in a "
                       f"{len(data)}-byte data section"])

    def _pt_copy(self, key: str, d: Path) -> Path:
        ent = self.inp.pt[key]
        src = Path(ent["path"])
        if src.is_dir():
            copy_dir(src, d)
            return d if not ent.get("open") else d / ent["open"]
        shutil.copyfile(src, d / src.name)
        return d / src.name

    # -- DCP .metadata -------------------------------------------------------------------------------

    def dcp_metadata(self, draw: Callable) -> None:
        v = draw(st.sampled_from([k for k in ("zstd", "zstd", "threads", "safetensors", "plain") if k in self.inp.dcp]))
        pick = draw(st.integers(0, 7))
        if pick <= 1:
            data, desc = self._storage_entry(draw, v)
        elif pick == 2 and self.inp.single_chunk[v]:
            data, desc = self._resize(draw, v)
        else:
            data, desc = mutate_pickle(draw, self.inp.metadata[v])
        d = self.r.fresh()
        copy_dir(self.inp.dcp[v], d)
        (d / ".metadata").write_bytes(data)
        self.r.run({"mode": "open", "path": str(d), "io": self._io(draw), "expect": f"dcp:{v}",
                    "rng": draw(st.integers(0, 2**32)), "label": f"dcp/{v} .metadata"}, desc)

    def _storage_entry(self, draw: Callable, v: str) -> tuple[bytes, list[str]]:
        """Point one item's storage entry (offset, length) somewhere else: past the end, at another item,
        overlapping, huge."""
        md = strip_frames(self.inp.metadata[v])
        ops = ops_of(md)
        recs = storage_info_ops(md)
        r = draw(st.sampled_from(recs))
        other = draw(st.sampled_from(recs))
        size = (self.inp.dcp[v] / r["path"]).stat().st_size if (self.inp.dcp[v] / r["path"]).exists() else 0
        off = draw(st.sampled_from([r["offset"], other["offset"], size, size - 1, 2**63, 2**64, -1, 0, r["offset"] + 1,
                                    r["offset"] + r["length"] // 2]))
        ln = draw(st.sampled_from([r["length"], other["length"], 0, 1, 2**63, 2**64 + 1, -1, size, r["length"] - 1,
                                   r["length"] + 1, 2**31]))
        patches = sorted([(r["off_op"], p_int(off)), (r["len_op"], p_int(ln))], reverse=True)
        for i, new in patches:
            md = md[: ops[i][2]] + new + md[ops[i][3]:]
        return md, [f"storage entry {r['path']} [{r['offset']}, +{r['length']}] -> [{off}, +{ln}]"]

    def _resize(self, draw: Callable, v: str) -> tuple[bytes, list[str]]:
        """Claim another (consistent) size for a tensor saved in one chunk: its size and its chunk's sizes."""
        fqn, size, itemsize = draw(st.sampled_from(self.inp.single_chunk[v]))
        md = strip_frames(self.inp.metadata[v])
        ops = ops_of(md)
        start = next((i for i, o in enumerate(ops) if o[0].name in STR_OPS and o[1] == fqn), None)
        if start is None:
            reject()
        ints = [i for i in range(start, min(len(ops), start + 400)) if ops[i][0].name in INT_OPS][: 3 * len(size)]
        n = len(size)
        if [ops[i][1] for i in ints] != list(size) + [0] * n + list(size):
            reject()
        dim = draw(st.integers(0, n - 1))
        rest = max(1, math.prod(size) // max(1, size[dim])) * itemsize
        # between the worker's address-space cap and a machine's memory: allocations that may or may not succeed
        mid = [max(1, m // rest) for m in MID_BYTES]
        new = draw(st.sampled_from([2**31, 2**40, 2**61, size[dim] * 2, size[dim] + 1, 0] + mid))
        patches = sorted([(ints[dim], p_int(new)), (ints[2 * n + dim], p_int(new))], reverse=True)
        for i, b in patches:
            md = md[: ops[i][2]] + b + md[ops[i][3]:]
        return md, [f"tensor {fqn!r} of size {size} and its one chunk claim dim {dim} = {new}"]

    # -- DCP .distcp items ----------------------------------------------------------------------------

    def dcp_items(self, draw: Callable) -> None:
        v = draw(st.sampled_from([k for k in ("zstd", "zstd", "threads", "threads", "plain", "safetensors") if k in self.inp.dcp]))
        d = self.r.fresh()
        copy_dir(self.inp.dcp[v], d)
        items = self.inp.items[v]
        item = draw(st.sampled_from(items))
        fpath = d / item["file"]
        whole = fpath.read_bytes()
        blob = whole[item["offset"] : item["offset"] + item["length"]]
        compressed = bool(item["transforms"])
        is_zip = blob[:4] == b"PK\x03\x04" or compressed
        kind = draw(st.sampled_from(["field", "field", "datapkl", "datapkl", "rebuild", "truncate", "flip"]
                                    + (["zstd_flip", "zstd_trunc"] if compressed else [])))
        if v == "safetensors" and not is_zip:
            new_file, desc = mutate_st_header(draw, whole)
            fpath.write_bytes(new_file)
            self.r.run({"mode": "open", "path": str(d), "io": self._io(draw), "expect": f"dcp:{v}",
                        "rng": draw(st.integers(0, 2**32)), "label": f"dcp/{v} {item['file']} (safetensors section)"}, [desc])
            return
        label = f"dcp/{v} item {item['fqn']!r} in {item['file']} [{item['offset']}, +{item['length']}]" + (" zstd" if compressed else "")
        if kind == "truncate":
            cut = draw(st.one_of(st.integers(item["offset"], item["offset"] + item["length"]), st.integers(0, len(whole))))
            fpath.write_bytes(whole[:cut])
            desc = [f"truncate {item['file']} at {cut}/{len(whole)}"]
        elif kind in ("zstd_flip", "zstd_trunc"):
            if kind == "zstd_flip":
                pos = draw(st.integers(0, len(blob) - 1))
                new = blob[:pos] + bytes([blob[pos] ^ draw(st.integers(1, 255))]) + blob[pos + 1:]
                desc = [f"flip compressed byte {pos}"]
            else:
                cut = draw(st.integers(0, len(blob)))
                new = blob[:cut] + b"\0" * (len(blob) - cut)
                desc = [f"zstd stream cut at {cut} (zero-filled)"]
            fpath.write_bytes(whole[: item["offset"]] + new + whole[item["offset"] + item["length"]:])
        else:
            raw = zstandard.ZstdDecompressor().decompressobj().decompress(blob) if compressed else blob
            if kind == "field":
                new_raw, d1 = mutate_zip_field(draw, raw)
                new = fit_item(new_raw, {**item, "length": item["length"]}, compressed) if compressed else new_raw
                desc = [d1]
            elif kind == "flip":
                new_raw, d1 = mutate_zip_flip(draw, raw)
                new = fit_item(new_raw, item, compressed) if compressed else new_raw
                desc = [d1]
            else:
                entries = zip_entries(raw)
                if entries is None:
                    reject()
                i = find_pkl(entries)
                if kind == "datapkl" and i is not None:
                    pk, desc = mutate_pickle(draw, entries[i]["data"])
                    entries[i]["data"] = pk
                    desc = ["data.pkl: " + "; ".join(desc)]
                    opts: dict[str, Any] = {}
                else:
                    entries, opts, d1 = mutate_zip_rebuild(draw, entries)
                    desc = [d1]
                raw_new = finish_zip(entries, opts)
                where = place_item(d, item, raw_new, compressed)
                if where != "in place":
                    desc.append(where)
                new = None
            if new is not None:
                assert len(new) == item["length"], (len(new), item["length"])
                fpath.write_bytes(whole[: item["offset"]] + new + whole[item["offset"] + item["length"]:])
        self.r.run({"mode": "open", "path": str(d), "io": self._io(draw), "expect": f"dcp:{v}",
                    "rng": draw(st.integers(0, 2**32)), "label": label}, desc)

    # -- safetensors -------------------------------------------------------------------------------------

    def safetensors(self, draw: Callable) -> None:
        from safetensors.numpy import save_file

        base = draw(st.sampled_from(["file", "file", "file", "index", "dcp"] if "safetensors" in self.inp.dcp
                                    else ["file", "file", "index"]))
        if base == "dcp":
            d = self.r.fresh()
            src = self.inp.dcp["safetensors"]
            copy_dir(src, d)
            files = sorted(p.name for p in d.iterdir() if p.suffix == ".distcp")
            f = draw(st.sampled_from(files))
            buf = (d / f).read_bytes()
            if buf[:4] == b"PK\x03\x04":
                reject()
            buf, descs = _mutate_st_header_times(draw, buf)
            (d / f).write_bytes(buf)
            self.r.run({"mode": "open", "path": str(d), "io": self._io(draw), "expect": "dcp:safetensors",
                        "rng": draw(st.integers(0, 2**32)), "label": f"dcp/safetensors {f}"}, descs)
            return
        rng = np.random.default_rng(draw(st.integers(0, 2**32)))
        tensors = {}
        for i in range(draw(st.integers(1, 4))):
            dt = draw(st.sampled_from(["float64", "float32", "float16", "int64", "int32", "int16", "int8", "uint8",
                                       "uint16", "uint32", "uint64", "bool", "complex64"]))
            shape = tuple(draw(st.lists(st.integers(0, 6), max_size=3)))
            if dt == "bool":
                a = rng.integers(0, 2, shape).astype(bool)
            elif dt.startswith(("int", "uint")):
                info = np.iinfo(dt)
                a = rng.integers(info.min, info.max, shape, dtype=dt, endpoint=True)
            elif dt == "complex64":
                a = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dt)
            else:
                a = rng.standard_normal(shape).astype(dt)
            name = draw(st.sampled_from([f"t{i}", f"model.layers.{i}.weight", f"é{i}", f"a/b{i}", f"x{i}" * 40]))
            tensors[name] = np.ascontiguousarray(a)
        d = self.r.fresh()
        if base == "file":
            path = d / "model.safetensors"
            save_file(tensors, str(path), metadata={"format": "np"})
            buf = path.read_bytes()
            buf, descs = _mutate_st_header_times(draw, buf)
            path.write_bytes(buf)
            target = str(path) if draw(st.booleans()) else str(d)
            self.r.run({"mode": "open", "path": target, "io": self._io(draw), "expect": "generated",
                        "oracle": oracle_dir(d, "safetensors"),
                        "rng": draw(st.integers(0, 2**32)), "label": f"safetensors file with {len(tensors)} tensors "
                        f"({', '.join(f'{k}:{v.dtype}{list(v.shape)}' for k, v in tensors.items())[:200]})",
                        "generated": tensors}, descs)
            return
        names = list(tensors)
        k = max(1, len(names) // 2)
        shards = {"model-00001-of-00002.safetensors": names[:k], "model-00002-of-00002.safetensors": names[k:]}
        wm = {}
        for fname, ns in shards.items():
            save_file({n: tensors[n] for n in ns}, str(d / fname))
            wm.update({n: fname for n in ns})
        index = {"metadata": {"total_size": sum(a.nbytes for a in tensors.values())}, "weight_map": wm}
        new_index, desc = mutate_index(draw, index, list(shards))
        (d / "sub").mkdir()
        os.mkfifo(d / "fifo.safetensors")
        os.symlink("/etc/passwd", d / "link.safetensors")
        (d / "model.safetensors.index.json").write_text(json.dumps(new_index))
        descs = [desc]
        if draw(st.booleans()):
            f = draw(st.sampled_from(list(shards)))
            buf, d2 = mutate_st_header(draw, (d / f).read_bytes())
            (d / f).write_bytes(buf)
            descs.append(f"{f}: {d2}")
        target = str(d) if draw(st.booleans()) else str(d / "model.safetensors.index.json")
        self.r.run({"mode": "open", "path": target, "io": self._io(draw), "expect": "generated",
                    "oracle": oracle_dir(d, "safetensors"),
                    "rng": draw(st.integers(0, 2**32)), "label": f"safetensors index with {len(tensors)} tensors in 2 shards",
                    "generated": tensors}, descs)

    # -- torch.save --------------------------------------------------------------------------------------

    def torchsave(self, draw: Callable) -> None:
        key = draw(st.sampled_from([k for k in ("small", "small", "small", "big", "hf_single", "hf_sharded") if k in self.inp.pt]))
        d = self.r.fresh()
        path = self._pt_copy(key, d)
        ent = self.inp.pt[key]
        files = sorted(p.name for p in d.iterdir() if p.suffix in (".pt", ".bin"))
        kind = draw(st.sampled_from(["datapkl", "datapkl", "datapkl", "field", "field", "rebuild", "rebuild", "truncate",
                                     "flip"] + (["index", "index"] if ent.get("open") else [])))
        if kind == "index":
            ipath = d / ent["open"]
            index = json.loads(ipath.read_text())
            new_index, desc = mutate_index(draw, index, files)
            (d / "sub").mkdir()
            os.mkfifo(d / "fifo.safetensors")
            ipath.write_text(json.dumps(new_index))
            descs = [desc]
            target = str(ipath) if draw(st.booleans()) else str(d)
        else:
            f = draw(st.sampled_from(files))
            buf = (d / f).read_bytes()
            if kind == "truncate":
                cut = draw(st.integers(0, len(buf) - 1))
                new, descs = buf[:cut], [f"truncate {f} at {cut}/{len(buf)}"]
            elif kind == "field":
                new, d1 = mutate_zip_field(draw, buf)
                descs = [f"{f}: {d1}"]
            elif kind == "flip":
                new, d1 = mutate_zip_flip(draw, buf)
                descs = [f"{f}: {d1}"]
            else:
                entries = zip_entries(buf)
                if entries is None:
                    reject()
                i = find_pkl(entries)
                if kind == "datapkl":
                    pk, ds = mutate_pickle(draw, entries[i]["data"])
                    entries[i]["data"] = pk
                    new, descs = finish_zip(entries, {}), [f"{f} data.pkl: " + "; ".join(ds)]
                else:
                    entries, opts, d1 = mutate_zip_rebuild(draw, entries)
                    new, descs = finish_zip(entries, opts), [f"{f}: {d1}"]
            (d / f).write_bytes(new)
            target = str(path)
        self.r.run({"mode": "open", "path": target, "io": self._io(draw), "expect": f"pt:{key}",
                    "oracle": oracle_dir(d, "torchsave"),
                    "rng": draw(st.integers(0, 2**32)), "label": f"torch.save {key}"}, descs)

    # -- legacy torch.save files (torch < 1.6's format) ------------------------------------------------

    def legacy(self, draw: Callable) -> None:
        key = draw(st.sampled_from([k for k in ("legacy_small", "legacy_small", "legacy_big") if k in self.inp.pt]))
        d = self.r.fresh()
        path = self._pt_copy(key, d)
        buf = path.read_bytes()
        parts = legacy_parts(buf)
        if parts is None:
            reject()
        ends, keys, table = parts
        kind = draw(st.sampled_from(["pickle", "pickle", "pickle", "keys", "count", "count", "flip", "truncate",
                                     "insert"]))
        if kind == "pickle":  # a structure-aware mutation of one of the five pickles (mostly the state dict)
            i = draw(st.sampled_from([3, 3, 3, 4, 0, 1, 2]))
            start = ends[i - 1] if i else 0
            pk, ds = mutate_pickle(draw, buf[start:ends[i]])
            new, descs = buf[:start] + pk + buf[ends[i]:], [f"pickle {i + 1}: " + "; ".join(ds)]
        elif kind == "keys":
            new_keys = draw(st.one_of(st.permutations(keys).map(list), st.just(keys[:-1]), st.just(keys + keys[:1]),
                                      st.just(keys + ["1"]), st.just([k.encode() for k in keys]), st.just({})))
            new = buf[:ends[3]] + pickle.dumps(new_keys, protocol=2) + buf[ends[4]:]
            descs = [f"storage key list {str(new_keys)[:100]}"]
        elif kind == "count":
            k, off, count = draw(st.sampled_from(table))
            value = draw(st.one_of(int_values(count), st.integers(-(2**63), 2**63 - 1)))
            value = max(-(2**63), min(2**63 - 1, value))
            new = bytearray(buf)
            struct.pack_into("<q", new, off, value)
            new, descs = bytes(new), [f"count of storage {k} {count} -> {value}"]
        elif kind == "flip":
            new = bytearray(buf)
            for _ in range(draw(st.integers(1, 4))):
                new[draw(st.integers(0, ends[4] - 1))] ^= 1 << draw(st.integers(0, 7))
            new, descs = bytes(new), ["bit flips in the pickles"]
        elif kind == "truncate":
            cut = draw(st.integers(0, len(buf) - 1))
            new, descs = buf[:cut], [f"truncate at {cut}/{len(buf)}"]
        else:
            at = draw(st.integers(0, ends[4]))
            new = buf[:at] + draw(st.binary(min_size=1, max_size=16)) + buf[at:]
            descs = [f"insert bytes at {at}"]
        path.write_bytes(new)
        self.r.run({"mode": "open", "path": str(path), "io": self._io(draw), "expect": f"pt:{key}",
                    "oracle": oracle_dir(d, "legacy"), "rng": draw(st.integers(0, 2**32)),
                    "label": f"legacy torch.save {key}"}, descs)

    # -- hand-built pickles ----------------------------------------------------------------------------

    def pickles(self, draw: Callable) -> None:
        proto = draw(st.sampled_from([2, 3, 4, 5]))
        body = draw(st.one_of(ATTACKS, FRAGMENT, ATTACKS))
        data = wrap(body, proto)
        where = draw(st.sampled_from(["loads", "loads", "loads", "metadata", "data.pkl", "dcp data.pkl"]))
        desc = [f"protocol {proto} pickle {data[:100]!r}{'...' if len(data) > 100 else ''} ({len(data)} bytes)"]
        if where == "loads":
            self.r.run({"mode": "loads", "data": data, "storages": draw(st.booleans()), "label": "safe_loads(pickle)"}, desc)
            return
        d = self.r.fresh()
        if where == "metadata":
            v = "zstd" if "zstd" in self.inp.dcp else next(iter(self.inp.dcp))
            copy_dir(self.inp.dcp[v], d)
            (d / ".metadata").write_bytes(data)
            self.r.run({"mode": "open", "path": str(d), "io": self._io(draw), "label": f"pickle as dcp/{v}/.metadata"}, desc)
            return
        if where == "data.pkl":
            src = Path(self.inp.pt["small"]["path"])
            entries = zip_entries(src.read_bytes())
            entries[find_pkl(entries)]["data"] = data
            (d / src.name).write_bytes(finish_zip(entries, {}))
            self.r.run({"mode": "open", "path": str(d / src.name), "io": self._io(draw),
                        "label": "pickle as data.pkl of a torch.save file"}, desc)
            return
        v = draw(st.sampled_from([k for k in ("threads", "zstd") if k in self.inp.dcp] or list(self.inp.dcp)))
        copy_dir(self.inp.dcp[v], d)
        objects = set(self.r.env.expected.get(f"dcp:{v}", {}).get("objects") or ())
        object_items = [it for it in self.inp.items[v] if it["fqn"] in objects]
        item = draw(st.sampled_from(object_items if object_items and draw(st.booleans()) else self.inp.items[v]))
        fpath = d / item["file"]
        whole = fpath.read_bytes()
        blob = whole[item["offset"] : item["offset"] + item["length"]]
        if item["transforms"]:
            blob = zstandard.ZstdDecompressor().decompressobj().decompress(blob)
        entries = zip_entries(blob)
        if entries is None:
            reject()
        entries[find_pkl(entries)]["data"] = data
        where = place_item(d, item, finish_zip(entries, {}), bool(item["transforms"]))
        if where != "in place":
            desc.append(where)
        self.r.run({"mode": "open", "path": str(d), "io": self._io(draw),
                    "label": f"pickle as data.pkl of dcp/{v} item {item['fqn']!r}"}, desc)


# ================================================================================================
# main
# ================================================================================================

FAMILIES = ("dcp_metadata", "dcp_items", "safetensors", "torchsave", "pickles", "legacy")


def vm_peak() -> str:
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmPeak"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", required=True, help="manifest.json written by tests/test_fuzz.py")
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--family", default=",".join(FAMILIES), help="comma-separated: " + ", ".join(FAMILIES))
    ap.add_argument("--cases", type=int, default=50, help="generated cases per family")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--case-timeout", type=float, default=30.0)
    ap.add_argument("--io", default="auto,tensorstore", help="io= choices drawn per case")
    ap.add_argument("--plant", default="", help="comma-separated deliberate bugs (harness self-test)")
    ap.add_argument("--replay", default="", help="re-run one saved failure directory")
    ap.add_argument("--as-limit", type=int, default=0,
                    help="set RLIMIT_AS to this many bytes (the test suite sets it before the worker starts)")
    args = ap.parse_args(argv)
    if args.as_limit:
        resource.setrlimit(resource.RLIMIT_AS, (args.as_limit, args.as_limit))

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    manifest = json.loads(Path(args.corpus).read_text())
    expected = load_expected(manifest)
    bp = benign_pickle()
    small = manifest["pt"].get("small")
    benign_file = None
    if small:
        bdir = work / "benign"
        bdir.mkdir(exist_ok=True)
        shutil.copyfile(small["path"], bdir / "small.pt")
        benign_file = (str(bdir / "small.pt"), expected["pt:small"]["tensors"])
    env = Env(work, expected, bp, _benign_outcome(bp), benign_file, args.case_timeout,
              [p for p in args.plant.split(",") if p], str(Path(args.corpus).resolve()))
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    print(f"fuzz worker: pid {os.getpid()}, seed {args.seed}, cases/family {args.cases}, per-case limit "
          f"{args.case_timeout:.0f}s, RLIMIT_AS {'unlimited' if limit < 0 else f'{limit / 2**30:.2f} GiB'}, "
          f"VmPeak after imports {vm_peak()}, hypothesis {__import__('hypothesis').__version__}")
    if args.plant:
        print(f"fuzz worker: PLANTED BUGS {args.plant}")

    if args.replay:
        r = Runner(env, "replay")
        case = json.loads((Path(args.replay) / "case.json").read_text())
        if case["mode"] == "loads":
            case["data"] = (Path(args.replay) / "input.pkl").read_bytes()
        if case.get("generated"):
            case.pop("generated")
        print(f"replaying {args.replay}: {case.get('label')} / {'; '.join(case.get('desc', []))[:300]}")
        r.run(case, case.get("desc", []))
        return r.report()

    inputs = Inputs(manifest)
    io_choices = [x for x in args.io.split(",") if x]
    status = 0
    for family in [f for f in args.family.split(",") if f]:
        runner = Runner(env, family)
        fam = Families(runner, inputs, io_choices)
        fam.controls(family)
        fn = getattr(fam, family)
        original_run = runner.run

        def run_with_generated(case: dict[str, Any], desc: list[str], _orig=original_run) -> None:
            gen = case.pop("generated", None)
            if gen is not None:
                env.expected["generated"] = {"tensors": gen, "objects": {}}
            _orig(case, desc)

        runner.run = run_with_generated  # type: ignore[method-assign]

        @settings(max_examples=args.cases, database=None, deadline=None, derandomize=False,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck),
                  report_multiple_bugs=False)
        @hyp_seed(args.seed)
        @given(st.data())
        def drive(data: Any) -> None:
            fn(data.draw)

        drive()
        status |= runner.report()
    leaked = [m for m in ("torch", "jax") if m in sys.modules]
    if leaked:
        print(f"fuzz worker: the worker imported {leaked}; it must stay torch- and jax-free")
        status |= 1
    return status


if __name__ == "__main__":
    sys.exit(main())
