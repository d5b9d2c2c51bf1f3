"""``save_safetensors``: sharded jax arrays written as a Hugging Face safetensors checkpoint.

Expected values come from the other side's own readers: ``safetensors.numpy.load_file`` /
``safetensors.torch.load_file`` (bit for bit), huggingface_hub's ``split_torch_state_dict_into_shards`` (the
file layout save_pretrained uses), and transformers' ``LlamaForCausalLM.from_pretrained`` (logits).
"""

from __future__ import annotations

import json
import os
import struct

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jreshard
from jreshard import invert, save_safetensors
from jreshard.errors import InvalidArgumentError
from tests.helpers import assert_same, torch_bits

SAFETENSORS_NAMES = {
    np.dtype(np.bool_): "BOOL", np.dtype(np.uint8): "U8", np.dtype(np.int8): "I8", np.dtype(np.int16): "I16",
    np.dtype(np.uint16): "U16", np.dtype(np.float16): "F16", np.dtype(ml_dtypes.bfloat16): "BF16",
    np.dtype(np.int32): "I32", np.dtype(np.uint32): "U32", np.dtype(np.float32): "F32", np.dtype(np.float64): "F64",
    np.dtype(np.int64): "I64", np.dtype(np.uint64): "U64", np.dtype(ml_dtypes.float8_e4m3fn): "F8_E4M3",
    np.dtype(ml_dtypes.float8_e5m2): "F8_E5M2", np.dtype(np.complex64): "C64",
}
TORCH_READS = {"U16", "U32", "U64"} | {"BOOL", "U8", "I8", "I16", "F16", "BF16", "I32", "F32", "F64", "I64", "F8_E4M3",
                                       "F8_E5M2", "C64"}
NUMPY_READS = {"BOOL", "U8", "I8", "I16", "U16", "F16", "I32", "U32", "F32", "F64", "I64", "U64", "C64"}


def mesh() -> Mesh:
    return Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))


def _values(dtype: np.dtype, shape, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dtype == np.bool_:
        return rng.random(shape) < 0.5
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    if dtype.kind == "c":
        return (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(dtype)
    return (rng.normal(size=shape) * 4).astype(dtype)


SHARDINGS = [P("data", "model"), P("model", "data"), P(None, ("data", "model")), P(("model", "data"), None), P(),
             P("model", None)]


def _tree():
    """{name: (jax array, numpy copy)}: every dtype, each under a 2-D sharding, plus 0-d, empty and 3-D."""
    out = {}
    for i, dt in enumerate(SAFETENSORS_NAMES):
        a = _values(dt, (16, 24), i)
        out[f"layers.{i}.{dt.name}"] = (jax.device_put(a, NamedSharding(mesh(), SHARDINGS[i % len(SHARDINGS)])), a)
    s = np.array(2.5, np.float32)
    out["scalar"] = (jax.device_put(s, NamedSharding(mesh(), P())), s)
    e = np.zeros((0, 8), ml_dtypes.bfloat16)
    out["empty"] = (jax.device_put(e, NamedSharding(mesh(), P(None, "model"))), e)
    c = _values(np.dtype(np.int16), (4, 6, 8), 99)
    out["cube"] = (jax.device_put(c, NamedSharding(mesh(), P("model", None, "data"))), c)
    out["host"] = (_values(np.dtype(np.float32), (5, 3), 7),) * 2  # numpy arrays too
    return out


def _header(path) -> tuple[int, dict]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return n, json.loads(f.read(n))


def _nest(flat: dict) -> dict:
    out: dict = {}
    for name, v in flat.items():
        *head, last = name.split(".")
        d = out
        for k in head:
            d = d.setdefault(k, {})
        d[last] = v
    return out


def test_sharded_arrays_every_dtype_read_back_by_safetensors(tmp_path):
    tree = _tree()
    files = save_safetensors(_nest({k: v[0] for k, v in tree.items()}), tmp_path, metadata={"note": "x"})
    assert files == ["model.safetensors"] and sorted(os.listdir(tmp_path)) == ["model.safetensors"]
    path = tmp_path / "model.safetensors"
    n, header = _header(path)
    assert (8 + n) % 8 == 0
    assert header.pop("__metadata__") == {"format": "pt", "note": "x"}
    assert sorted(header) == sorted(tree)
    for name, (_, want) in tree.items():
        e = header[name]
        assert e["dtype"] == SAFETENSORS_NAMES[want.dtype] and e["shape"] == list(want.shape), name
        assert e["data_offsets"][0] % want.dtype.itemsize == 0, name  # aligned
    from safetensors.numpy import load_file as np_load
    from safetensors.torch import load_file as torch_load

    torch_out = torch_load(str(path))
    for name, (_, want) in tree.items():
        assert_same(torch_bits(torch_out[name], want.dtype), want, f"torch: {name}")
    numpy_names = [n for n, (_, w) in tree.items() if SAFETENSORS_NAMES[w.dtype] in NUMPY_READS]
    numpy_only = tmp_path / "np"
    save_safetensors({n: tree[n][0] for n in numpy_names}, numpy_only)
    np_out = np_load(str(numpy_only / "model.safetensors"))
    for name in numpy_names:
        assert_same(np_out[name], tree[name][1], f"numpy: {name}")
    with jreshard.open(tmp_path) as ckpt:
        for name, (_, want) in tree.items():
            assert_same(ckpt.read(name), want, f"jreshard: {name}")


def test_each_shard_copied_once_to_the_host(tmp_path, monkeypatch):
    """Host copies are one device shard at a time: a replicated array is copied once, a sharded one shard by
    shard, never whole."""
    import jreshard.write_safetensors as mod

    copies: list[tuple[str, int]] = []
    real = mod._shards

    def spy(value, name):
        for index, host in real(value, name):
            copies.append((name, host.nbytes))
            yield index, host

    monkeypatch.setattr(mod, "_shards", spy)
    a = np.arange(16 * 24, dtype=np.float32).reshape(16, 24)
    tree = {"rep": jax.device_put(a, NamedSharding(mesh(), P())),
            "half": jax.device_put(a, NamedSharding(mesh(), P("data"))),  # replicated over "model"
            "all": jax.device_put(a, NamedSharding(mesh(), P("model", "data")))}
    save_safetensors(tree, tmp_path)
    assert sorted(c for n, c in copies if n == "rep") == [a.nbytes]
    assert sorted(c for n, c in copies if n == "half") == [a.nbytes // 2] * 2
    assert sorted(c for n, c in copies if n == "all") == [a.nbytes // 8] * 8
    with jreshard.open(tmp_path) as ckpt:
        for name in tree:
            assert_same(ckpt.read(name), a, name)


def test_shard_files_as_save_pretrained_splits_them(tmp_path):
    import torch
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import load_file

    rng = np.random.default_rng(0)
    arrays = {f"model.layers.{i}.w": rng.normal(size=(32, 16 + 8 * i)).astype(np.float32) for i in range(7)}
    arrays["big"] = rng.normal(size=(64, 64)).astype(np.float32)  # larger than the limit: a file of its own
    arrays["model.layers.2.b"] = rng.normal(size=(24,)).astype(ml_dtypes.bfloat16)
    tree = {n: jax.device_put(a, NamedSharding(mesh(), P("data"))) for n, a in arrays.items()}
    limit = "10KB"
    files = save_safetensors(tree, tmp_path, max_shard_size=limit)
    split = split_torch_state_dict_into_shards(
        {n: torch.from_numpy(np.ascontiguousarray(a).view(np.int16) if a.dtype == ml_dtypes.bfloat16 else a)
         for n, a in arrays.items()}, max_shard_size=limit)
    assert split.is_sharded and files == [*split.filename_to_tensors, "model.safetensors.index.json"]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index == {"metadata": {"total_size": sum(a.nbytes for a in arrays.values())},
                     "weight_map": split.tensor_to_filename}
    assert sorted(os.listdir(tmp_path)) == sorted(files)
    for fname, names in split.filename_to_tensors.items():
        got = load_file(str(tmp_path / fname))
        assert sorted(got) == sorted(names)
        for n in names:
            assert_same(torch_bits(got[n], arrays[n].dtype), arrays[n], n)
    with jreshard.open(tmp_path) as ckpt:
        for n, a in arrays.items():
            assert_same(ckpt.read(n), a, n)
    # A later save into the same directory replaces the earlier one (stale shards and index removed) ...
    assert save_safetensors({"x": tree["big"]}, tmp_path, max_shard_size=5 * 10**9) == ["model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]
    # ... and the other way round; sizes parse as Hugging Face does ("1KB" is 1000 bytes)
    files = save_safetensors({"a": np.zeros(250, np.float32), "b": np.zeros(1, np.float32)}, tmp_path,
                             max_shard_size="1KB")
    assert files == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                     "model.safetensors.index.json"]
    assert sorted(os.listdir(tmp_path)) == sorted(files)


def test_jax_model_to_transformers_through_invert(tmp_path, llama_checkpoints):
    """A Llama ported into JAX (nnx, sharded on a 2x4 mesh), changed there, inverted with hf_llama_mapping and
    saved: transformers' from_pretrained gives the JAX model's logits."""
    import torch
    from flax import nnx
    from transformers import LlamaForCausalLM

    from examples import llama_nnx
    from examples.port_llama import hf_llama_mapping, port_state

    cfg = llama_nnx.LlamaConfig.from_hf(llama_checkpoints.config)
    m = llama_nnx.make_mesh()
    graphdef, state = port_state(llama_checkpoints.path("fsdp"), m, cfg)
    params = nnx.to_pure_dict(state)
    params["norm"]["scale"] = params["norm"]["scale"] * 1.5  # "training" in JAX
    params["layers"]["mlp"]["up"]["kernel"] = params["layers"]["mlp"]["up"]["kernel"] * -1.0
    nnx.replace_by_pure_dict(state, params)
    ids = llama_checkpoints.input_ids()
    jax_logits = np.asarray(llama_nnx.logits(nnx.merge(graphdef, state), jax.device_put(ids, NamedSharding(m, P("data", None)))))

    saved = invert(params, hf_llama_mapping(cfg), saved_like=llama_checkpoints.path("fsdp"))
    out = tmp_path / "hf"
    files = save_safetensors(saved, out, max_shard_size="1MB")
    (out / "config.json").write_text(json.dumps(llama_checkpoints.config))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(files) >= 4 and index["metadata"]["total_size"] == sum(a.nbytes for a in saved.values())
    assert sorted(index["weight_map"]) == sorted(llama_checkpoints.state("fsdp"))

    model = LlamaForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        hf_logits = model(input_ids=torch.from_numpy(ids)).logits.numpy()
    scale = float(np.max(np.abs(jax_logits)))
    assert float(np.max(np.abs(hf_logits - jax_logits))) <= 1e-4 * scale
    # the change made in JAX is what transformers computes with (not the checkpoint it came from)
    assert float(np.max(np.abs(hf_logits - llama_checkpoints.logits("fsdp")))) > 1e-2 * scale
    with jreshard.open(out) as ckpt:
        for name, a in saved.items():
            assert_same(ckpt.read(name), np.asarray(a), name)


def test_refusals_write_nothing(tmp_path):
    x = jnp.ones((2, 2))
    cases = [
        ({"c": np.zeros(2, np.complex128)}, {}, "complex128 has no safetensors name"),
        ({"c": np.zeros(2, ml_dtypes.float8_e4m3fnuz)}, {}, "float8_e4m3fnuz has no safetensors name"),
        ({"k": jax.random.key(0)}, {}, "no safetensors name"),
        (x, {}, "empty name"),
        ({"a.b": x, "a": {"b": x}}, {}, "two leaves are named 'a.b'"),
        ({"__metadata__": x}, {}, "reserved"),
        ({"a": x, "n": 3}, {}, "leaf 'n' is a int"),
        ({"a": x}, {"metadata": {"format": 1}}, "metadata must be a dict of str to str"),
        ({"a": x}, {"max_shard_size": "5XB"}, "max_shard_size '5XB'"),
        ({"a": x}, {"max_shard_size": 0}, "must be positive"),
        ({"a": x}, {"max_shard_size": True}, "must be an int"),
    ]
    for tree, kwargs, match in cases:
        d = tmp_path / "out"
        with pytest.raises(InvalidArgumentError, match=match):
            save_safetensors(tree, d, **kwargs)
        assert not d.exists(), match
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(InvalidArgumentError, match="not a directory"):
        save_safetensors({"a": x}, f)


def test_a_failed_save_leaves_the_previous_one(tmp_path, monkeypatch):
    import jreshard.write_safetensors as mod

    a = np.arange(12, dtype=np.float32)
    save_safetensors({"a": a, "b": a}, tmp_path, max_shard_size=60)
    before = {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)}
    real = mod._write_tensor
    seen = []

    def failing(mm, begin, value, name):
        seen.append(name)
        if len(seen) == 2:
            raise OSError("disk full")
        real(mm, begin, value, name)

    monkeypatch.setattr(mod, "_write_tensor", failing)
    with pytest.raises(OSError, match="disk full"):
        save_safetensors({"a": a * 2, "b": a * 2}, tmp_path, max_shard_size=60)
    assert {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)} == before  # no temp files either
