"""``invert``: arrays loaded through a mapping, run backwards to the saved tensors.

The property: ``invert(jreshard.load(ckpt, target, mapping=M), M)`` gives the checkpoint's tensors bit for bit,
on the real Llama checkpoints (``hf_llama_mapping``: transposes, head splits, layer stacks), on a MoE checkpoint
with fused tensors split over several targets, and on hypothesis-random views of real checkpoints. Mappings
that do not cover a saved tensor exactly once are refused with the tensor named, and the oracle for that is
independent of jreshard: the view evaluated by numpy on element ids.
"""

from __future__ import annotations

import itertools
import math

import jax
import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding

import jreshard
from examples import llama_nnx
from examples.port_llama import hf_llama_mapping
from jreshard import invert
from jreshard.errors import InvalidArgumentError, TargetMismatchError
from tests.helpers import assert_same, evaluate
from tests.test_mapping import (
    BASES,
    _random_view,
    _spec,
    mesh,
    moe,  # noqa: F401  (the fixture)
    moe_mapping,
    moe_target,
)

# ---------------------------------------------------------------------------------------------
# the real Llama: hf_llama_mapping inverted
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_cfg(llama_checkpoints):
    return llama_nnx.LlamaConfig.from_hf(llama_checkpoints.config)


@pytest.mark.parametrize("variant", ["hf", "fsdp"])
def test_llama_load_then_invert_gives_the_saved_tensors(variant, llama_checkpoints, llama_cfg):
    path = llama_checkpoints.path(variant)
    mapping = hf_llama_mapping(llama_cfg)
    targets = llama_nnx.target_shapes(llama_cfg, llama_nnx.make_mesh())
    loaded = jreshard.load(path, targets, mapping=mapping)
    ref = llama_checkpoints.state(variant)
    # the saved shapes from the checkpoint, or from any dict of array-likes
    for like in (path, {k: v for k, v in ref.items()}):
        out = invert(loaded, mapping, saved_like=like)
        assert sorted(out) == sorted(ref)
        for name, want in ref.items():
            assert isinstance(out[name], jax.Array), name
            assert_same(np.asarray(out[name]), want, name)
    assert list(out) == list(ref)  # in saved_like's order
    # Sharded targets give sharded saved tensors (inverted structurally, not gathered on one device).
    q = out["model.layers.0.self_attn.q_proj.weight"]
    assert len(q.sharding.device_set) == 8 and not q.sharding.is_fully_replicated
    # A reshape hides the saved shape: without saved_like, a clear error naming a saved tensor.
    with pytest.raises(InvalidArgumentError, match=r"saved tensor 'model\.layers\.0\.self_attn\.[qko]_proj\.weight'.*saved_like"):
        invert(loaded, mapping)


def test_llama_invert_the_nnx_state_tree(llama_checkpoints, llama_cfg):
    """The tree may be the nnx state itself (Variables), as a port gives it."""
    from examples.port_llama import port_state

    path = llama_checkpoints.path("hf")
    _, state = port_state(path, llama_nnx.make_mesh(), llama_cfg)
    out = invert(state, hf_llama_mapping(llama_cfg), saved_like=path)
    ref = llama_checkpoints.state("hf")
    assert sorted(out) == sorted(ref)
    for name, want in ref.items():
        assert_same(np.asarray(out[name]), want, name)


# ---------------------------------------------------------------------------------------------
# fused tensors split over targets, casts (the MoE checkpoint of test_mapping)
# ---------------------------------------------------------------------------------------------


def test_moe_fused_split_and_casts_invert(moe):  # noqa: F811
    root, tensors = moe
    mapping = moe_mapping()
    loaded = jreshard.load(str(root), moe_target(), mapping=mapping)
    out = invert(loaded, mapping, saved_like=str(root))
    assert sorted(out) == sorted(tensors)
    for name, want in tensors.items():  # gate_up_proj from two targets; down_proj bf16 again (float32 targets)
        assert_same(np.asarray(out[name]), want, name)
    # Dropping one half of the fused tensors: they are only partly covered.
    half = {k: v for k, v in mapping.items() if k != "layers.moe.up"}
    part = {"layers": {k: v for k, v in loaded["layers"].items()}}
    part["layers"]["moe"] = {k: v for k, v in loaded["layers"]["moe"].items() if k != "up"}
    with pytest.raises(TargetMismatchError, match=r"gate_up_proj\.weight' \(16, 16\) is only partly covered.*"
                                                  r"'layers\.moe\.gate' hold 128 of its 256"):
        invert(part, half, saved_like=str(root))


# ---------------------------------------------------------------------------------------------
# random views of real checkpoints
# ---------------------------------------------------------------------------------------------


def _ids(view, arrays):
    """The view of element ids (numpy, no casts): which saved element every target element comes from."""
    return evaluate(view, arrays, casts=False)


def _invertible(mapping: dict, shapes: dict) -> dict:
    """{saved name: True when the mapping's targets hold each of its elements exactly once} (numpy oracle)."""
    offsets, total = {}, 0
    for name, shape in shapes.items():
        offsets[name] = total
        total += math.prod(shape)
    ids = {n: np.arange(offsets[n], offsets[n] + math.prod(s), dtype=np.int64).reshape(s) for n, s in shapes.items()}
    counts = np.zeros(total, np.int64)
    for view in mapping.values():
        np.add.at(counts, _ids(view, ids).ravel(), 1)
    return {n: bool((counts[offsets[n]:offsets[n] + math.prod(s)] == 1).all()) for n, s in shapes.items()}


def _casts(view) -> list:
    """The casts on the way from the (single) saved tensor to the output, innermost first."""
    if view._op == "saved":
        return []
    inner = _casts(view._kids[0])
    return inner + [view._args] if view._op == "astype" else inner


def _random_ops(rng, v):
    """A few invertible operations on view ``v`` (bound)."""
    for _ in range(rng.randint(0, 3)):
        op = rng.choice(["T", "transpose", "split", "merge", "flip", "newaxis", "stack1", "astype", "step"])
        if op == "T":
            v = v.T
        elif op == "transpose" and v.ndim:
            axes = list(range(v.ndim))
            rng.shuffle(axes)
            v = v.transpose(*axes)
        elif op == "split" and v.ndim:
            d = rng.randrange(v.ndim)
            divs = [k for k in range(2, v.shape[d]) if v.shape[d] % k == 0]
            if divs:
                k = rng.choice(divs)
                v = v.reshape(*v.shape[:d], k, v.shape[d] // k, *v.shape[d + 1:])
        elif op == "merge" and v.ndim >= 2:
            d = rng.randrange(v.ndim - 1)
            v = v.reshape(*v.shape[:d], v.shape[d] * v.shape[d + 1], *v.shape[d + 2:])
        elif op == "flip" and v.ndim:
            d = rng.randrange(v.ndim)
            v = v[(slice(None),) * d + (slice(None, None, -1),)]
        elif op == "newaxis":
            d = rng.randrange(v.ndim + 1)
            v = v[(slice(None),) * d + (None,)]
            if rng.random() < 0.5:
                v = v[(slice(None),) * d + (0,)]
        elif op == "stack1":
            v = jreshard.stack([v], axis=rng.randrange(v.ndim + 1))
        elif op == "astype":
            v = v.astype(rng.choice([np.float64, np.float32]))  # lossless from float32
        elif op == "step" and v.ndim:  # a reversed strided split of one dim, joined back in another order
            d = rng.randrange(v.ndim)
            if v.shape[d] >= 2:
                ev = v[(slice(None),) * d + (slice(None, None, 2),)]
                od = v[(slice(None),) * d + (slice(1, None, 2),)]
                v = jreshard.concat([od, ev], axis=d)
    return v


def _random_cover(rng, ckpt, name) -> dict:
    """Targets that together hold saved tensor ``name`` exactly once: split into parts (contiguous cuts,
    interleaved steps, or cuts of a reshape of it), each part through random invertible operations."""
    v = ckpt.saved(name)
    if rng.random() < 0.4 and v.ndim:  # cut a reshape of it: the parts are not boxes of the saved tensor
        d = rng.randrange(v.ndim)
        divs = [k for k in range(2, v.shape[d]) if v.shape[d] % k == 0]
        if divs:
            k = rng.choice(divs)
            v = v.reshape(*v.shape[:d], k, v.shape[d] // k, *v.shape[d + 1:])
            if rng.random() < 0.5:
                v = v.T
    parts = [v]
    if v.ndim:
        d = rng.randrange(v.ndim)
        n = v.shape[d]
        kind = rng.choice(["cuts", "steps", "none"])
        pre = (slice(None),) * d
        if kind == "cuts" and n >= 2:
            cuts = sorted(rng.sample(range(1, n), min(n - 1, rng.randint(1, 2))))
            edges = [0, *cuts, n]
            parts = [v[pre + (slice(a, b),)] for a, b in itertools.pairwise(edges)]
        elif kind == "steps" and n >= 2:
            parts = [v[pre + (slice(0, None, 2),)], v[pre + (slice(1, None, 2),)]]
    parts = [_random_ops(rng, p) for p in parts]
    if len(parts) >= 2 and len({(p.shape, p.dtype) for p in parts}) == 1 and rng.random() < 0.5:
        parts = [jreshard.stack(parts[::-1], axis=rng.randrange(parts[0].ndim + 1))]
    return {f"t{i}": p for i, p in enumerate(parts)}


def _loaded(ckpt, mapping, draw):
    target = {}
    for name, view in mapping.items():
        target[name] = jax.ShapeDtypeStruct(view.shape, view.dtype, sharding=NamedSharding(mesh(), _spec(draw, view.shape)))
    return ckpt.load(target, mapping=mapping)


@pytest.fixture(scope="module")
def opened_ckpts(checkpoints):
    out = {}
    yield lambda variant: out.setdefault(variant, jreshard.open(checkpoints.dirs[variant]))
    for ck in out.values():
        ck.close()


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_random_covers_invert_exactly(checkpoints, opened_ckpts, data):
    """Several targets holding one saved tensor in pieces (cuts, steps, reshapes, flips, stacks, transposes):
    inverted bit for bit, from sharded jax arrays."""
    variant = data.draw(st.sampled_from(["plain", "safetensors"]))
    name = data.draw(st.sampled_from([n for n in BASES if n in checkpoints.names[variant]]))
    ckpt = opened_ckpts(variant)
    rng = data.draw(st.randoms(use_true_random=False))
    mapping = _random_cover(rng, ckpt, name)
    assert _invertible(mapping, {name: ckpt.tensors[name].shape}) == {name: True}, mapping
    loaded = _loaded(ckpt, mapping, data.draw)
    out = invert(loaded, mapping, saved_like=ckpt)
    assert list(out) == [name]
    assert_same(np.asarray(out[name]), checkpoints.reference(variant)[name], repr(mapping))


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_random_views_invert_or_are_refused(checkpoints, opened_ckpts, data):
    """test_mapping's random views (slices, ints, stacks and concats of a view with itself, lossy casts): each
    is inverted when (by the numpy oracle) it holds every saved element exactly once, else refused."""
    variant = data.draw(st.sampled_from(["plain", "safetensors"]))
    name = data.draw(st.sampled_from([n for n in BASES if n in checkpoints.names[variant]]))
    ckpt = opened_ckpts(variant)
    rng = data.draw(st.randoms(use_true_random=False))
    view = _random_view(rng, ckpt, name)
    mapping = {"out": view}
    loaded = _loaded(ckpt, mapping, data.draw)
    if not _invertible(mapping, {name: ckpt.tensors[name].shape})[name]:
        with pytest.raises(TargetMismatchError, match=f"saved tensor {name!r}"):
            invert(loaded, mapping, saved_like=ckpt)
        return
    out = invert(loaded, mapping, saved_like=ckpt)
    got = np.asarray(out[name])
    saved = checkpoints.reference(variant)[name]
    want = saved
    for dt in _casts(view):  # the values the load gave, back in the saved dtype
        want = want.astype(dt)
    assert_same(got, want.astype(saved.dtype), repr(view))
    # and the view of what invert gives is what was loaded
    np.testing.assert_array_equal(evaluate(view, {name: got}), np.asarray(loaded["out"]), err_msg=repr(view))


# ---------------------------------------------------------------------------------------------
# names, dtypes, refusals
# ---------------------------------------------------------------------------------------------


def test_unmapped_targets_keep_their_names_numpy_stays_numpy():
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    out = invert({"a": {"b": w.T}, "c": np.ones(2, np.int8), "step": 100}, {"a": {"b": jreshard.saved("w").T}})
    assert list(out) == ["w", "c"]
    assert isinstance(out["w"], np.ndarray)
    assert_same(out["w"], w)
    assert_same(out["c"], np.ones(2, np.int8))
    # saved_like with another dtype: cast back to it (as a load casts the other way)
    out = invert({"c": np.ones(2, np.float32)}, saved_like={"c": np.zeros(2, ml_dtypes.bfloat16)})
    assert_same(out["c"], np.ones(2, ml_dtypes.bfloat16))
    # an astype hides the saved dtype
    with pytest.raises(InvalidArgumentError, match="dtype of saved tensor 'x'"):
        invert({"y": np.ones(2)}, {"y": jreshard.saved("x").astype(np.float64)})
    out = invert({"y": np.ones(2)}, {"y": jreshard.saved("x").astype(np.float64)},
                 saved_like={"x": np.zeros(2, np.float16)})
    assert_same(out["x"], np.ones(2, np.float16))


def test_tied_weights_and_partial_views_are_refused():
    e = np.arange(12, dtype=np.float32).reshape(4, 3)
    tied = {"embed": jreshard.saved("e"), "head": jreshard.saved("e").T}
    with pytest.raises(TargetMismatchError, match=r"saved tensor 'e' is not invertible.*both targets 'embed' and 'head'"):
        invert({"embed": e, "head": e.T}, tied)
    assert_same(invert({"embed": e}, {"embed": tied["embed"]})["e"], e)  # leave one out of both
    with pytest.raises(TargetMismatchError, match=r"'e' \(4, 3\) is only partly covered.*hold 3 of its 12"):
        invert({"row": e[1]}, {"row": jreshard.saved("e")[1]}, saved_like={"e": e})
    with pytest.raises(TargetMismatchError, match="read twice by target 'x'"):
        invert({"x": np.concatenate([e, e])}, {"x": jreshard.concat(["e", "e"])}, saved_like={"e": e})


def test_mismatches_are_refused():
    e = np.zeros((4, 3), np.float32)
    with pytest.raises(TargetMismatchError, match=r"mapping entries name no array.*'nope'"):
        invert({"a": e}, {"nope": "e"})
    with pytest.raises(TargetMismatchError, match=r"saved tensor 'e' would have shape \(4, 3\)"):
        invert({"e": e}, saved_like={"e": (3, 4)})
    with pytest.raises(TargetMismatchError, match=r"target 'a' has shape \(4, 3\) but its mapping entry"):
        invert({"a": e}, {"a": jreshard.saved("e").reshape(3, 4)}, saved_like={"e": (4, 3)})
    with pytest.raises(TargetMismatchError, match="imaginary"):
        invert({"a": e.astype(np.complex64)}, {"a": "e"}, saved_like={"e": e})
    with pytest.raises(InvalidArgumentError, match="saved_like must be"):
        invert({"a": e}, saved_like=3)


def test_partial_reshape_pieces_interleave():
    """Pieces of a reshape that are not boxes of the saved tensor (grouped-query heads of a fused qkv) and
    strided pieces that interleave: reassembled exactly, also from jax arrays."""
    kv, g, d, h = 2, 3, 4, 5  # per kv head: 1 q head, then k, then v ... laid out [kv, g, d] x h
    w = np.arange(kv * g * d * h, dtype=np.float32).reshape(kv * g * d, h)
    heads = jreshard.saved("w").reshape(kv, g, d, h)
    mapping = {"q": heads[:, :1], "k": heads[:, 1], "v": heads[:, 2:]}
    tree = {n: jax.numpy.asarray(_ids(v.bind(lambda _: (w.shape, w.dtype)), {"w": w})) for n, v in mapping.items()}
    out = invert(tree, mapping, saved_like={"w": w})
    assert isinstance(out["w"], jax.Array)
    assert_same(np.asarray(out["w"]), w)
    mapping = {"even": jreshard.saved("w")[::2].T, "odd": jreshard.saved("w")[1::2]}
    tree = {"even": w[::2].T, "odd": w[1::2]}
    assert_same(invert(tree, mapping, saved_like={"w": w})["w"], w)


def _w(shape):
    return np.arange(math.prod(shape), dtype=np.float32).reshape(shape)


W = _w((4, 6, 10))
S = jreshard.saved("w")
# Each a mapping that holds w exactly once, through one kind of inverse step.
CASES = {
    "cyclic_transpose": {"t": S.transpose(1, 2, 0)},
    "transpose_then_split": {"t": S.transpose(2, 0, 1).reshape(2, 5, 24)},
    "concat_strided_mid_kid": {"even": jreshard.concat([S[:3], S[3:]])[::2], "odd": jreshard.concat([S[:3], S[3:]])[1::2]},
    "reshape_rows_stepped": {"a": S.reshape(8, 3, 10)[::2], "b": S.reshape(8, 3, 10)[1::2]},
    "reshape_inner_stepped": {"a": S.reshape(4, 60)[:, ::3], "b": S.reshape(4, 60)[:, 1::3], "c": S.reshape(4, 60)[:, 2::3]},
    "merged_dim_cut": {"a": S.reshape(24, 10)[:7], "b": S.reshape(24, 10)[7:]},
    "merged_dim_stepped_by_rows": {"a": S.reshape(240)[::10].reshape(4, 6), **{
        f"r{k}": S.reshape(240)[k::10] for k in range(1, 10)}},
    "flip_and_newaxis": {"t": S[::-1, None, :, ::-1][:, 0]},
    "int_index_then_stack": {"t": jreshard.stack([S[i] for i in range(4)], axis=2)},
    "reshape_parts_of_size1_dims": {"a": S[:, None].reshape(4, 60)[:, :30], "b": S[:, None].reshape(4, 60)[:, 30:]},
    "many_to_many_reshape_parts": {"a": S.reshape(3, 80)[:, :33], "b": S.reshape(3, 80)[:, 33:]},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_inverse_step(case):
    mapping = CASES[case]
    assert _invertible(mapping, {"w": W.shape}) == {"w": True}
    tree = {n: _ids(v.bind(lambda _: (W.shape, W.dtype)), {"w": W}) for n, v in mapping.items()}
    assert_same(invert(tree, mapping, saved_like={"w": W})["w"], W, case)  # numpy
    sharded = {n: jax.device_put(a, NamedSharding(mesh(), _first_spec(a.shape))) for n, a in tree.items()}
    out = invert(sharded, mapping, saved_like={"w": W})["w"]
    assert isinstance(out, jax.Array)
    assert_same(np.asarray(out), W, case)


def _first_spec(shape):
    from jax.sharding import PartitionSpec

    for d, n in enumerate(shape):
        if n % 4 == 0:
            return PartitionSpec(*([None] * d + ["model"]))
    return PartitionSpec()
