"""Exact semantics at the edges: ``Checkpoint.read`` is numpy's basic indexing (and refuses the rest), implicit
casts that can change values need ``cast="unsafe"``, a saved object asked for as a tensor and an empty target are
errors that say what to do."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.sharding import SingleDeviceSharding

import jreshard
from jreshard import checkpoint as _checkpoint
from jreshard.program import cast_is_safe
from tests import torch_writers as tw
from tests.helpers import assert_same

# Fixture tensors of the "plain" DCP variant: uneven and 2-d chunked, 3-d, bf16, complex, empty, 0-d, larger.
NAMES = ["d2.s0s0_uneven", "d1.s2_3d", "d2.uneven_s0s1", "d1.empty_s0", "dtypes.uneven.complex128", "mp.b",
         "plain.scalar"]


@pytest.fixture(scope="module")
def plain(checkpoints):
    ck = jreshard.open(checkpoints.dirs["plain"])
    yield ck, checkpoints.reference("plain")
    ck.close()


def _sds(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=SingleDeviceSharding(jax.devices()[0]))


# ---------------------------------------------------------------------------------------------
# read(): numpy basic indexing, exactly
# ---------------------------------------------------------------------------------------------


def _bound(d):
    return st.one_of(st.none(), st.integers(-d - 3, d + 3))


def _item(d):
    step = st.one_of(st.none(), st.integers(-5, 5).filter(bool), st.sampled_from([d + 1, -d - 1]))
    sl = st.builds(slice, _bound(d), _bound(d), step)
    if d == 0:
        return sl
    ints = st.integers(-d, d - 1)
    return st.one_of(sl, ints, ints.map(np.int64))


@st.composite
def _name_and_index(draw):
    name = draw(st.sampled_from(NAMES))
    shape = tw.TENSORS_BY_NAME[name].shape
    k = draw(st.integers(0, len(shape)))  # dimensions indexed explicitly
    ellipsis = draw(st.booleans())
    e = draw(st.integers(0, k)) if ellipsis else k  # items before the ellipsis index the leading dims
    dims = list(range(e)) + list(range(len(shape) - (k - e), len(shape)))
    items = [draw(_item(shape[d])) for d in dims]
    if ellipsis:
        items.insert(e, Ellipsis)
    for _ in range(draw(st.integers(0, 2))):
        items.insert(draw(st.integers(0, len(items))), None)
    if len(items) == 1 and draw(st.booleans()):
        return name, items[0]  # a bare index, not a tuple
    return name, tuple(items)


@pytest.mark.parametrize("traced", ["default", "host", "view"])
def test_read_is_numpy_basic_indexing(plain, monkeypatch, traced):
    """Random basic indices (ints, negative ints, slices of any step, ..., None) on real saved tensors:
    ``read(name, idx)`` equals ``reference[idx]``, dtype, shape and bytes; strides taken on the host from the
    bounding box ("host"), traced through the view ("view"), or split between them (the default)."""
    if traced != "default":
        monkeypatch.setattr(_checkpoint, "MAX_TRACED_BOXES", 0 if traced == "host" else 10**9)
    ck, refs = plain

    @settings(max_examples=70, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(_name_and_index())
    def check(name_index):
        name, idx = name_index
        ref = refs[name]
        got = ck.read(name, idx)
        assert isinstance(got, np.ndarray)
        assert_same(got, ref[idx], f"{name}[{idx!r}]")

    check()


@pytest.mark.parametrize("idx", [
    ..., None, (), 0, -1, (0, 1), (-1, -1), (slice(None, None, -1),), (slice(None), slice(None, None, -2)),
    (..., 0), (None, ..., None), (slice(3, 1, -1), slice(5, None, 3)), (slice(None, None, 100),),
    (slice(-100, 100),), (np.int64(2), slice(np.int64(-2), None)),
], ids=repr)
def test_read_fixed_indices(plain, idx):
    """The forms of the report (``...``, ``None``, two ints), flips, negative and out-of-range slice bounds."""
    ck, refs = plain
    ref = refs["d2.s0s0_uneven"]  # (10, 3)
    assert_same(ck.read("d2.s0s0_uneven", idx), ref[idx], repr(idx))


def test_read_default_and_none(plain):
    ck, refs = plain
    ref = refs["d1.s2_3d"]
    assert_same(ck.read("d1.s2_3d"), ref, "whole")
    assert ck.read("d1.s2_3d", None).shape == (1,) + ref.shape  # numpy's newaxis, not "the whole tensor"
    assert_same(ck.read("plain.scalar"), refs["plain.scalar"], "0-d")
    assert_same(ck.read("plain.scalar", (None, ...)), refs["plain.scalar"][None, ...], "0-d[None, ...]")


@pytest.mark.parametrize("idx,fancy", [
    ([0, 1], True),
    ([True, False] * 5, True),
    (np.array([0, 1]), True),
    (np.array(1), True),
    (np.zeros(10, bool), True),
    (True, True),
    (np.bool_(False), True),
    ((slice(None), [0, 1]), True),
    (([0, 1], [0, 1]), True),
    (((0, 1),), True),
    ((0.0,), False),
    ("a", False),
    (slice(0.5, 2), False),
    (slice(0, 2, 0), False),
    ((0, 0, 0), False),  # too many indices
    ((..., 0, ...), False),
    (10, False),  # out of bounds
    (-11, False),
    ((0, 3), False),
], ids=repr)
def test_read_refuses_what_it_does_not_support(plain, idx, fancy):
    """Fancy indexing (a list, an array, a boolean, a tuple inside the index) and invalid indices raise
    InvalidArgumentError; never another array. For the list, numpy's own answer is rows 0 and 1."""
    ck, _ = plain
    before = ck.io_stats.bytes_read
    with pytest.raises(jreshard.InvalidArgumentError) as e:
        ck.read("d2.s0s0_uneven", idx)
    assert "d2.s0s0_uneven" in str(e.value)
    assert ("fancy indexing" in str(e.value)) == fancy, str(e.value)
    assert ck.io_stats.bytes_read == before  # refused before reading


def test_read_list_is_not_a_box(plain):
    """The reported case: numpy reads rows 0 and 1 for ``[0, 1]``; read refuses rather than return a (1, 1) box,
    and the tuple ``(0, 1)`` is element [0, 1] as in numpy."""
    ck, refs = plain
    ref = refs["d2.s0s0_uneven"]
    assert ref[[0, 1]].shape == (2, 3)
    with pytest.raises(jreshard.InvalidArgumentError, match="a list is fancy indexing"):
        ck.read("d2.s0s0_uneven", [0, 1])
    assert_same(ck.read("d2.s0s0_uneven", (0, 1)), ref[0, 1], "(0, 1)")


def test_read_strides_read_only_what_they_need(checkpoints):
    """Large strides are traced (only the selected rows are read); a flip reads its bounding box once."""
    ck = jreshard.open(checkpoints.dirs["plain"])
    ref = checkpoints.reference("plain")["mp.a"]  # (512, 512) float32 over 4 saved chunks of rows
    row = 512 * 4
    ck.read("mp.a", (slice(None, None, 128), 0))  # locates the saved chunks (header reads) before measuring
    before = ck.io_stats.bytes_read
    assert_same(ck.read("mp.a", slice(None, None, 128)), ref[::128], "rows ::128")
    assert ck.io_stats.bytes_read - before <= 4 * row * 1.1
    before = ck.io_stats.bytes_read
    assert_same(ck.read("mp.a", slice(355, 99, -1)), ref[355:99:-1], "rows flipped")
    assert 256 * row <= ck.io_stats.bytes_read - before <= 256 * row * 1.1
    before = ck.io_stats.bytes_read
    assert_same(ck.read("mp.a", (slice(10, 20), slice(None, None, -3))), ref[10:20, ::-3], "columns ::-3")
    assert ck.io_stats.bytes_read - before <= 10 * row * 1.1
    ck.close()


# ---------------------------------------------------------------------------------------------
# implicit casts: only safe ones unless cast="unsafe"
# ---------------------------------------------------------------------------------------------

BF16, F8E4, F8E5, I4 = (np.dtype(t) for t in (ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2,
                                              ml_dtypes.int4))
# (saved, target, safe): the rule's table. Safe casts keep every value.
CAST_TABLE = [
    (np.float32, np.float64, True), (np.float16, np.float32, True), (np.int8, np.int16, True),
    (np.int32, np.int64, True), (np.uint8, np.int16, True), (np.uint16, np.uint32, True), (np.bool_, np.int8, True),
    (np.int8, np.float16, True), (np.int16, np.float32, True), (np.int32, np.float64, True),
    (np.float32, np.complex64, True), (np.float64, np.complex128, True), (np.complex64, np.complex128, True),
    (np.float32, np.int8, False), (np.float32, np.int64, False), (np.float64, np.float32, False),
    (np.int64, np.int32, False), (np.int16, np.int8, False), (np.int8, np.uint8, False), (np.uint8, np.int8, False),
    (np.int64, np.uint64, False), (np.uint64, np.int64, False), (np.int16, np.float16, False),
    (np.int32, np.float32, False), (np.complex64, np.float32, False), (np.complex128, np.float64, False),
    (np.complex128, np.complex64, False), (np.float16, np.bool_, False), (np.int8, np.bool_, False),
    # ml_dtypes: every value of the source exactly a value of the target
    (BF16, np.float32, True), (BF16, np.float64, True), (BF16, np.complex64, True), (F8E4, BF16, True),
    (F8E4, np.float16, True), (F8E5, np.float16, True), (F8E5, BF16, True), (I4, np.int8, True),
    (I4, BF16, True), (np.int8, BF16, True), (np.uint8, BF16, True), (np.bool_, BF16, True),
    (np.float32, BF16, False), (np.float16, BF16, False), (BF16, np.float16, False), (BF16, F8E4, False),
    (F8E5, F8E4, False), (F8E4, F8E5, False), (BF16, np.int32, False), (np.int16, BF16, False),
    (np.int8, F8E4, False), (np.int8, I4, False), (I4, np.uint8, False), (F8E4, I4, False),
]


@pytest.mark.parametrize("src,dst,safe", CAST_TABLE, ids=[f"{np.dtype(a)}->{np.dtype(b)}" for a, b, _ in CAST_TABLE])
def test_cast_rule_table(src, dst, safe):
    assert cast_is_safe(src, dst) == safe
    src, dst = np.dtype(src), np.dtype(dst)
    if _numpy_own(src) and _numpy_own(dst):
        assert bool(np.can_cast(src, dst, "safe")) == safe  # numpy agrees where it knows both
    if safe and not _numpy_own(src):  # ml_dtypes sources: every value survives the cast, checked directly
        x = np.arange(2 ** (src.itemsize * 8), dtype=np.uint8 if src.itemsize == 1 else np.uint16).view(src)
        if src == I4:
            x = np.arange(-8, 8).astype(I4)
        with np.errstate(invalid="ignore"):
            y = x.astype(dst)
            xs, ys = x.astype(np.float64), np.real(y).astype(np.float64)
        assert np.array_equal(xs, ys, equal_nan=True) and np.array_equal(np.signbit(xs), np.signbit(ys))


def _numpy_own(dt):
    return type(dt).__module__ == "numpy.dtypes"


def test_cast_rule_is_numpy_can_cast_for_numpy_types():
    types = [np.dtype(t) for t in (np.bool_, np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64,
                                   np.uint64, np.float16, np.float32, np.float64, np.complex64, np.complex128)]
    for a, b in itertools.product(types, types):
        assert cast_is_safe(a, b) == bool(np.can_cast(a, b, "safe")), (a, b)


def test_lossy_implicit_cast_needs_cast_unsafe(plain):
    ck, refs = plain
    name = "d2.s0s0_uneven"  # (10, 3) float32
    target = {name: _sds((10, 3), jnp.int8)}
    for call in (lambda **kw: jreshard.load(ck, target, **kw), lambda **kw: jreshard.plan(ck, target, **kw)):
        with pytest.raises(jreshard.TargetMismatchError) as e:
            call()
        msg = str(e.value)
        for part in (repr(name), "float32", "int8", 'cast="unsafe"', ".astype("):
            assert part in msg, (part, msg)
    got = jreshard.load(ck, target, cast="unsafe")[name]
    assert_same(np.asarray(got), refs[name].astype(np.int8), "cast unsafe")
    # an explicit .astype in the mapping is a request: allowed with the default
    got = jreshard.load(ck, target, mapping={name: jreshard.saved(name).astype(np.int8)})[name]
    assert_same(np.asarray(got), refs[name].astype(np.int8), "astype")


def test_safe_implicit_casts_still_load(plain):
    ck, refs = plain
    out = jreshard.load(ck, {"d2.uneven_s0s1": _sds((7, 9), jnp.float32),  # bf16 -> f32
                             "d2.s0s0_uneven": _sds((10, 3), jnp.float64),
                             "dtypes.uneven.complex128": _sds((10, 3), jnp.complex128)})
    assert_same(np.asarray(out["d2.uneven_s0s1"]), refs["d2.uneven_s0s1"].astype(np.float32), "bf16->f32")
    assert_same(np.asarray(out["d2.s0s0_uneven"]), refs["d2.s0s0_uneven"].astype(np.float64), "f32->f64")
    with pytest.raises(jreshard.TargetMismatchError, match="bfloat16"):
        jreshard.load(ck, {"d2.s0s0_uneven": _sds((10, 3), jnp.bfloat16)})  # f32 -> bf16
    with pytest.raises(jreshard.TargetMismatchError, match="'d2.s0s0_uneven' is bfloat16"):  # after a safe cast
        jreshard.load(ck, {"d1.s2_3d": _sds((4, 6, 16), jnp.float64), "d2.s0s0_uneven": _sds((10, 3), jnp.bfloat16)})


def test_complex_to_real_is_refused_whatever_cast_says(plain):
    ck, _ = plain
    for cast in ("safe", "unsafe"):
        with pytest.raises(jreshard.TargetMismatchError, match="imaginary"):
            jreshard.load(ck, {"dtypes.uneven.complex128": _sds((10, 3), jnp.float64)}, cast=cast)


def test_cast_argument_checked(plain):
    ck, _ = plain
    with pytest.raises(jreshard.InvalidArgumentError, match="cast must be"):
        jreshard.load(ck, {"d2.s0s0_uneven": _sds((10, 3), jnp.float32)}, cast="same_kind")


# ---------------------------------------------------------------------------------------------
# saved objects asked for as tensors; empty targets
# ---------------------------------------------------------------------------------------------


def test_object_asked_for_as_tensor(plain):
    ck, _ = plain
    with pytest.raises(jreshard.TargetMismatchError) as e:
        jreshard.load(ck, {"step": _sds((), jnp.int32)})
    msg = str(e.value)
    assert "'step' is a saved object" in msg and "ckpt.objects['step']" in msg, msg
    assert jreshard.load(ck, {"step": 0}) == {"step": 7}  # the non-array leaf it suggests


@pytest.mark.parametrize("target", [None, {}, [], (), {"a": {}}], ids=repr)
def test_empty_target_is_an_error(plain, target):
    ck, _ = plain
    for call in (jreshard.load, jreshard.plan):
        with pytest.raises(jreshard.InvalidArgumentError, match="A target is a pytree"):
            call(ck, target)
