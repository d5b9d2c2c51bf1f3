"""End-to-end port of a real model: a tiny Hugging Face Llama onto a flax nnx Llama on a (2, 4) mesh.

The checkpoints come from ``tests/model_writers.py`` (fixture ``llama_checkpoints``): the initial weights as
sharded safetensors from ``save_pretrained`` ("hf") and the weights after 2 AdamW steps under FSDP2 on 4 ranks
as a DCP checkpoint ("fsdp"). The expected values are transformers' own: its logits on a fixed batch and its
state dicts.

* ``test_numpy_port_*`` check the nnx model (examples/llama_nnx.py) and the whole-array conversion
  ``numpy_port`` against transformers' logits, without jreshard.
* ``test_jreshard_port_*`` load the checkpoints with ``jreshard.load(..., mapping=hf_llama_mapping(cfg))``
  into the nnx state, its pure dict, or the flat ``target_shapes`` dict, and check every parameter (values
  bit for bit against ``numpy_port`` of transformers' state dict, and shardings) and the logits.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jreshard
from examples import llama_nnx
from examples.port_llama import hf_llama_mapping, numpy_port, port, port_state
from tests.helpers import assert_same
from tests.model_writers import HF_CONFIG

VARIANTS = ("hf", "fsdp")
RTOL = 1e-4  # max |logits - reference| <= RTOL * max |reference|


@pytest.fixture(scope="module")
def mesh():
    return llama_nnx.make_mesh()


@pytest.fixture(scope="module")
def cfg(llama_checkpoints) -> llama_nnx.LlamaConfig:
    return llama_nnx.LlamaConfig.from_hf(llama_checkpoints.config)


@pytest.fixture(scope="module")
def abstract(cfg, mesh):
    """(graphdef, abstract state, {name: ShapeDtypeStruct}) of the nnx model on the mesh."""
    graphdef, state = llama_nnx.abstract_state(cfg, mesh)
    return graphdef, state, llama_nnx.flat_names(state)


@pytest.fixture(scope="module")
def input_ids(llama_checkpoints, mesh):
    ids = llama_checkpoints.input_ids()
    return jax.device_put(ids, NamedSharding(mesh, P("data", None)))


def assert_logits_close(actual, expected, what: str) -> None:
    actual = np.asarray(actual)
    assert actual.dtype == np.float32, f"{what}: dtype {actual.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    err = float(np.max(np.abs(actual.astype(np.float64) - expected)))
    bound = RTOL * float(np.max(np.abs(expected)))
    assert err <= bound, f"{what}: max |logits - transformers| = {err:.3g} > {bound:.3g}"


def logits_close(actual, expected) -> bool:
    err = float(np.max(np.abs(np.asarray(actual, np.float64) - expected)))
    return err <= RTOL * float(np.max(np.abs(expected)))


def on_mesh(params: dict[str, np.ndarray], targets: dict[str, jax.ShapeDtypeStruct]) -> dict[str, jax.Array]:
    """numpy parameters placed with the targets' shardings (shapes and dtypes checked)."""
    assert set(params) == set(targets), (sorted(set(params) ^ set(targets)))
    out = {}
    for name, t in targets.items():
        a = params[name]
        assert a.shape == t.shape and a.dtype == t.dtype, (name, a.shape, a.dtype, t.shape, t.dtype)
        out[name] = jax.device_put(a, t.sharding)
    return out


# ---------------------------------------------------------------------------------------------
# the model and the reference conversion, without jreshard
# ---------------------------------------------------------------------------------------------


def test_config_from_hf(cfg):
    """The writer's Hugging Face config (config.json as transformers wrote it) read into LlamaConfig."""
    assert cfg == llama_nnx.LlamaConfig(
        vocab_size=HF_CONFIG["vocab_size"], hidden_size=HF_CONFIG["hidden_size"],
        intermediate_size=HF_CONFIG["intermediate_size"], num_hidden_layers=HF_CONFIG["num_hidden_layers"],
        num_attention_heads=HF_CONFIG["num_attention_heads"], num_key_value_heads=HF_CONFIG["num_key_value_heads"],
        head_dim=HF_CONFIG["head_dim"], rope_theta=HF_CONFIG["rope_theta"], rms_norm_eps=HF_CONFIG["rms_norm_eps"],
        tie_word_embeddings=False)


def test_target_layout(abstract, cfg):
    """The abstract state: the names, shapes and shardings the model documents."""
    _, _, targets = abstract
    h, n, k, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    i, v, nl = cfg.intermediate_size, cfg.vocab_size, cfg.num_hidden_layers
    expected = {
        "embed.embedding": ((v, h), P("model", "data")),
        "layers.attn.q.kernel": ((nl, h, n, d), P(None, "data", "model", None)),
        "layers.attn.k.kernel": ((nl, h, k, d), P(None, "data", None, "model")),
        "layers.attn.v.kernel": ((nl, h, k, d), P(None, "data", None, "model")),
        "layers.attn.o.kernel": ((nl, n, d, h), P(None, "model", None, "data")),
        "layers.mlp.gate.kernel": ((nl, h, i), P(None, "data", "model")),
        "layers.mlp.up.kernel": ((nl, h, i), P(None, "data", "model")),
        "layers.mlp.down.kernel": ((nl, i, h), P(None, "model", "data")),
        "layers.input_norm.scale": ((nl, h), P(None, None)),
        "layers.post_attn_norm.scale": ((nl, h), P(None, None)),
        "norm.scale": ((h,), P(None)),
        "lm_head.kernel": ((h, v), P("data", "model")),
    }
    assert sorted(targets) == sorted(expected)
    for name, (shape, spec) in expected.items():
        t = targets[name]
        assert t.shape == shape and t.dtype == np.float32, (name, t.shape, t.dtype)
        assert isinstance(t.sharding, NamedSharding) and t.sharding.spec == spec, (name, t.sharding)
        assert t.sharding.mesh.devices.shape == (2, 4) and t.sharding.mesh.axis_names == ("data", "model")
    assert llama_nnx.target_shapes(cfg, llama_nnx.make_mesh()) == targets


@pytest.mark.parametrize("variant", VARIANTS)
def test_numpy_port_matches_transformers(variant, llama_checkpoints, cfg, abstract, input_ids):
    graphdef, state, targets = abstract
    params = numpy_port(llama_checkpoints.state(variant), cfg)
    model = llama_nnx.merge(graphdef, state, on_mesh(params, targets))
    out = llama_nnx.logits(model, input_ids)
    assert_logits_close(out, llama_checkpoints.logits(variant), f"{variant}: numpy port")


def _interleaved_q(params: dict, sd: dict, cfg: llama_nnx.LlamaConfig) -> None:
    # head split the other way round: [H, D, N] instead of [H, N, D]
    h, n, d = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
    params["layers.attn.q.kernel"] = np.stack([
        sd[f"model.layers.{i}.self_attn.q_proj.weight"].T.reshape(h, d, n).transpose(0, 2, 1)
        for i in range(cfg.num_hidden_layers)])


def _swapped_kv_heads(params: dict, sd: dict, cfg: llama_nnx.LlamaConfig) -> None:
    params["layers.attn.k.kernel"] = np.ascontiguousarray(params["layers.attn.k.kernel"][:, :, ::-1])
    params["layers.attn.v.kernel"] = np.ascontiguousarray(params["layers.attn.v.kernel"][:, :, ::-1])


def _swapped_norms(params: dict, sd: dict, cfg: llama_nnx.LlamaConfig) -> None:
    params["layers.input_norm.scale"], params["layers.post_attn_norm.scale"] = (
        params["layers.post_attn_norm.scale"], params["layers.input_norm.scale"])


def _reversed_layers(params: dict, sd: dict, cfg: llama_nnx.LlamaConfig) -> None:
    for name in [n for n in params if n.startswith("layers.mlp.")]:
        params[name] = np.ascontiguousarray(params[name][::-1])


def _o_without_transpose(params: dict, sd: dict, cfg: llama_nnx.LlamaConfig) -> None:
    h, n, d = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
    params["layers.attn.o.kernel"] = np.stack([
        sd[f"model.layers.{i}.self_attn.o_proj.weight"].reshape(n, d, h) for i in range(cfg.num_hidden_layers)])


@pytest.mark.parametrize("corrupt", [_interleaved_q, _swapped_kv_heads, _swapped_norms, _reversed_layers,
                                     _o_without_transpose], ids=lambda f: f.__name__.strip("_"))
def test_numpy_port_logit_check_detects_layout_errors(corrupt, llama_checkpoints, cfg, abstract, input_ids):
    """The logit comparison is tight enough to catch each plausible porting mistake (on both variants)."""
    graphdef, state, targets = abstract
    for variant in VARIANTS:
        sd = llama_checkpoints.state(variant)
        params = numpy_port(sd, cfg)
        corrupt(params, sd, cfg)
        out = llama_nnx.logits(llama_nnx.merge(graphdef, state, on_mesh(params, targets)), input_ids)
        assert not logits_close(out, llama_checkpoints.logits(variant)), f"{variant}: {corrupt.__name__} undetected"


# ---------------------------------------------------------------------------------------------
# the checkpoints themselves (read with jreshard's plain API)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_checkpoints_hold_the_reference_state(variant, llama_checkpoints):
    """The saved tensors are transformers' state dict; "hf" is sharded safetensors, "fsdp" 4-way DCP."""
    path = llama_checkpoints.path(variant)
    if variant == "hf":
        assert (path / "model.safetensors.index.json").exists()
        assert len(list(path.glob("*.safetensors"))) >= 3
    else:
        assert (path / ".metadata").exists() and len(list(path.glob("*.distcp"))) == 4
    ref = llama_checkpoints.state(variant)
    with jreshard.open(path) as ckpt:
        assert sorted(ckpt.tensors) == sorted(ref)
        for name, expected in ref.items():
            info = ckpt.tensors[name]
            if variant == "fsdp":
                assert len(info.chunks) == 4, (name, info)
            assert_same(ckpt.read(name), expected, name)
    other = llama_checkpoints.state("fsdp" if variant == "hf" else "hf")
    assert all(not np.array_equal(ref[n], other[n]) for n in ref), "training changed every tensor"


# ---------------------------------------------------------------------------------------------
# jreshard ports
# ---------------------------------------------------------------------------------------------


def check_loaded(loaded: dict[str, jax.Array], targets: dict[str, jax.ShapeDtypeStruct],
                 expected: dict[str, np.ndarray], what: str) -> None:
    """Every loaded parameter: a jax.Array with the target's sharding, equal bit for bit to ``expected``."""
    assert sorted(loaded) == sorted(targets), what
    for name, t in targets.items():
        a = loaded[name]
        assert isinstance(a, jax.Array), (what, name, type(a))
        assert a.shape == t.shape and a.dtype == t.dtype, (what, name, a.shape, a.dtype)
        assert a.sharding == t.sharding, (what, name, a.sharding, t.sharding)
        assert_same(np.asarray(a), expected[name], f"{what}: {name}")
        for shard in a.addressable_shards:
            assert_same(np.asarray(shard.data), expected[name][shard.index], f"{what}: {name} on {shard.device}")


@pytest.mark.parametrize("variant", VARIANTS)
def test_jreshard_port_matches_transformers(variant, llama_checkpoints, cfg, mesh, input_ids):
    """Target: the nnx state from ``abstract_state`` itself."""
    graphdef, state = llama_nnx.abstract_state(cfg, mesh)
    targets = llama_nnx.flat_names(state)
    loaded = jreshard.load(llama_checkpoints.path(variant), state, mapping=hf_llama_mapping(cfg))
    assert isinstance(loaded, nnx.State)
    expected = numpy_port(llama_checkpoints.state(variant), cfg)
    check_loaded(llama_nnx.flat_names(loaded), targets, expected, f"{variant}, nnx state")
    out = llama_nnx.logits(nnx.merge(graphdef, loaded), input_ids)
    assert_logits_close(out, llama_checkpoints.logits(variant), f"{variant}: jreshard port (nnx state)")


@pytest.mark.parametrize("variant", VARIANTS)
def test_jreshard_port_pure_dict_target(variant, llama_checkpoints, cfg, mesh, input_ids):
    """Target: the nnx state's pure dict (nested dicts of ShapeDtypeStruct), through ``port`` / ``port_state``."""
    graphdef, state = port_state(llama_checkpoints.path(variant), mesh, cfg)
    _, abstract_state = llama_nnx.abstract_state(cfg, mesh)
    expected = numpy_port(llama_checkpoints.state(variant), cfg)
    check_loaded(llama_nnx.flat_names(state), llama_nnx.flat_names(abstract_state), expected, f"{variant}, pure dict")
    out = llama_nnx.logits(nnx.merge(graphdef, state), input_ids)
    assert_logits_close(out, llama_checkpoints.logits(variant), f"{variant}: jreshard port (pure dict)")
    if variant == "hf":  # config read from the save_pretrained directory
        model = port(llama_checkpoints.hf, mesh)
        assert_logits_close(llama_nnx.logits(model, input_ids), llama_checkpoints.logits("hf"), "hf: port()")


@pytest.mark.parametrize("variant", VARIANTS)
def test_jreshard_port_flat_target(variant, llama_checkpoints, cfg, mesh, abstract, input_ids):
    """Target: the flat ``{dotted name: ShapeDtypeStruct}`` of ``target_shapes``."""
    graphdef, state, _ = abstract
    targets = llama_nnx.target_shapes(cfg, mesh)
    loaded = jreshard.load(llama_checkpoints.path(variant), targets, mapping=hf_llama_mapping(cfg))
    expected = numpy_port(llama_checkpoints.state(variant), cfg)
    check_loaded(loaded, targets, expected, f"{variant}, flat target")
    out = llama_nnx.logits(llama_nnx.merge(graphdef, state, loaded), input_ids)
    assert_logits_close(out, llama_checkpoints.logits(variant), f"{variant}: jreshard port (flat target)")
