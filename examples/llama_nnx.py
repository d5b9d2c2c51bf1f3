"""A small Llama in flax nnx with stacked (scanned) decoder layers and tensor/data-parallel shardings.

The target of the Llama port example (:mod:`examples.port_llama`). Parameters are laid out the JAX way, so
porting a PyTorch Llama needs transposes, head splits and stacking. Dotted parameter names (the nnx state
paths) with their shapes and ``PartitionSpec`` over the mesh axes ``("data", "model")``; ``L`` is the number
of layers, ``H`` hidden, ``N`` attention heads, ``K`` kv heads, ``D`` head dim, ``I`` intermediate, ``V``
vocab:

===============================  ================  =================================
name                             shape             PartitionSpec
===============================  ================  =================================
``embed.embedding``              [V, H]            ``P("model", "data")``
``layers.attn.q.kernel``         [L, H, N, D]      ``P(None, "data", "model", None)``
``layers.attn.k.kernel``         [L, H, K, D]      ``P(None, "data", None, "model")``
``layers.attn.v.kernel``         [L, H, K, D]      ``P(None, "data", None, "model")``
``layers.attn.o.kernel``         [L, N, D, H]      ``P(None, "model", None, "data")``
``layers.mlp.gate.kernel``       [L, H, I]         ``P(None, "data", "model")``
``layers.mlp.up.kernel``         [L, H, I]         ``P(None, "data", "model")``
``layers.mlp.down.kernel``       [L, I, H]         ``P(None, "model", "data")``
``layers.input_norm.scale``      [L, H]            ``P(None, None)`` (replicated)
``layers.post_attn_norm.scale``  [L, H]            ``P(None, None)`` (replicated)
``norm.scale``                   [H]               ``P(None)`` (replicated)
``lm_head.kernel``               [H, V]            ``P("data", "model")``
===============================  ================  =================================

"model" is tensor parallelism (heads, intermediate, vocab); "data" splits the hidden dimension FSDP-style.
With fewer kv heads than the "model" axis size (2 < 4 in the test model), k and v split ``head_dim`` on
"model" instead of the kv heads. The layer axis is never sharded (the layers are run by ``nnx.scan``).

These names are the paths of the ``nnx.Param``s in the state from :func:`abstract_state` (jreshard names a
Variable by its path, without the Variable's own ``.value``), the paths of that state's pure dict
(``nnx.to_pure_dict``) and the keys of :func:`target_shapes`.

The forward pass follows Hugging Face's ``LlamaForCausalLM`` in float32: RMSNorm with weight, RoPE with
``rotate_half`` (non-interleaved halves), grouped-query attention by repeating kv heads, causal softmax
attention, SwiGLU MLP, untied ``lm_head``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

F32 = jnp.float32

# Partition specs of every parameter, per layer (the stacked layer axis is added by nnx.vmap as None).
SHARDING: dict[str, tuple] = {
    "embed.embedding": ("model", "data"),
    "attn.q.kernel": ("data", "model", None),
    "attn.k.kernel": ("data", None, "model"),
    "attn.v.kernel": ("data", None, "model"),
    "attn.o.kernel": ("model", None, "data"),
    "mlp.gate.kernel": ("data", "model"),
    "mlp.up.kernel": ("data", "model"),
    "mlp.down.kernel": ("model", "data"),
    "input_norm.scale": (None,),
    "post_attn_norm.scale": (None,),
    "norm.scale": (None,),
    "lm_head.kernel": ("data", "model"),
}


@dataclass(frozen=True)
class LlamaConfig:
    """The hyper-parameters of the model (Hugging Face ``LlamaConfig`` names, abridged)."""

    vocab_size: int = 128
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 16
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> LlamaConfig:
        """From a Hugging Face Llama ``config.json`` dict (``rope_theta`` at the top level or in
        ``rope_parameters``; ``head_dim`` defaulting to ``hidden_size // num_attention_heads``)."""
        rope = hf.get("rope_parameters") or {}
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"only the default RoPE is implemented, not {rope.get('rope_type')!r}")
        theta = rope.get("rope_theta", hf.get("rope_theta", cls.rope_theta))
        n_heads = hf["num_attention_heads"]
        cfg = cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=n_heads,
            num_key_value_heads=hf.get("num_key_value_heads") or n_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
            rope_theta=float(theta),
            rms_norm_eps=float(hf["rms_norm_eps"]),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        )
        if cfg.tie_word_embeddings:
            raise ValueError("tied word embeddings are not implemented (this model has its own lm_head)")
        if hf.get("attention_bias") or hf.get("mlp_bias"):
            raise ValueError("attention / mlp biases are not implemented")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"only silu is implemented, not {hf.get('hidden_act')!r}")
        return cfg

    def as_dict(self) -> dict[str, Any]:
        """The fields as a plain dict."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _normal(std: float = 0.02) -> Callable[..., jax.Array]:
    return nnx.initializers.normal(std)


class Kernel(nnx.Module):
    """A bias-free projection holding one ``kernel`` of any shape; ``__call__`` is the given einsum."""

    def __init__(self, shape: tuple[int, ...], sharding: tuple, equation: str, *, rngs: nnx.Rngs):
        self.equation = equation
        self.kernel = nnx.Param(_normal()(rngs.params(), shape, F32), out_sharding=sharding)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.einsum(self.equation, x, self.kernel[...])


class RMSNorm(nnx.Module):
    """``x * rsqrt(mean(x**2) + eps) * scale`` over the last axis, computed in float32."""

    def __init__(self, size: int, eps: float):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((size,), F32), out_sharding=SHARDING["norm.scale"])

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(F32)
        var = jnp.mean(x * x, axis=-1, keepdims=True)
        return x * jax.lax.rsqrt(var + jnp.asarray(self.eps, F32)) * self.scale[...]


def rope_tables(config: LlamaConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``cos`` and ``sin`` of shape [S, head_dim] for integer ``positions`` [S] (Hugging Face's default RoPE:
    the frequencies repeated over both halves)."""
    d = config.head_dim
    inv_freq = 1.0 / (jnp.asarray(config.rope_theta, F32) ** (jnp.arange(0, d, 2, dtype=F32) / F32(d)))
    freqs = positions.astype(F32)[:, None] * inv_freq[None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def _rotate_half(x: jax.Array) -> jax.Array:
    h = x.shape[-1] // 2
    return jnp.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """RoPE on ``x`` [B, S, heads, D] with tables [S, D]."""
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return x * cos + _rotate_half(x) * sin


class Attention(nnx.Module):
    """Causal grouped-query self-attention with RoPE."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        h, n, k, d = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        if n % k:
            raise ValueError(f"num_attention_heads ({n}) must be a multiple of num_key_value_heads ({k})")
        self.n_rep = n // k
        self.head_dim = d
        self.q = Kernel((h, n, d), SHARDING["attn.q.kernel"], "bsh,hnd->bsnd", rngs=rngs)
        self.k = Kernel((h, k, d), SHARDING["attn.k.kernel"], "bsh,hkd->bskd", rngs=rngs)
        self.v = Kernel((h, k, d), SHARDING["attn.v.kernel"], "bsh,hkd->bskd", rngs=rngs)
        self.o = Kernel((n, d, h), SHARDING["attn.o.kernel"], "bsnd,ndh->bsh", rngs=rngs)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        q = apply_rope(self.q(x), cos, sin)
        k = apply_rope(self.k(x), cos, sin)
        v = self.v(x)
        # kv head j serves query heads j*n_rep .. (j+1)*n_rep-1 (Hugging Face's repeat_kv).
        k = jnp.repeat(k, self.n_rep, axis=2)
        v = jnp.repeat(v, self.n_rep, axis=2)
        scores = jnp.einsum("bqnd,bknd->bnqk", q, k) * F32(self.head_dim ** -0.5)
        s = x.shape[1]
        causal = jnp.tril(jnp.ones((s, s), dtype=bool))
        scores = jnp.where(causal[None, None], scores, jnp.finfo(F32).min)
        probs = jax.nn.softmax(scores.astype(F32), axis=-1)
        out = jnp.einsum("bnqk,bknd->bqnd", probs, v)
        return self.o(out)


class MLP(nnx.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        h, i = config.hidden_size, config.intermediate_size
        self.gate = Kernel((h, i), SHARDING["mlp.gate.kernel"], "bsh,hi->bsi", rngs=rngs)
        self.up = Kernel((h, i), SHARDING["mlp.up.kernel"], "bsh,hi->bsi", rngs=rngs)
        self.down = Kernel((i, h), SHARDING["mlp.down.kernel"], "bsi,ih->bsh", rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


class DecoderLayer(nnx.Module):
    """Pre-norm attention and MLP blocks with residuals."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config, rngs=rngs)
        self.post_attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config, rngs=rngs)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        x = x + self.attn(self.input_norm(x), cos, sin)
        return x + self.mlp(self.post_attn_norm(x))


class Embed(nnx.Module):
    """Token embedding table ``embedding`` [vocab, hidden]."""

    def __init__(self, vocab: int, hidden: int, *, rngs: nnx.Rngs):
        self.embedding = nnx.Param(_normal()(rngs.params(), (vocab, hidden), F32),
                                   out_sharding=SHARDING["embed.embedding"])

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0)


class LlamaForCausalLM(nnx.Module):
    """Llama decoder with a language-model head: ``model(input_ids [B, S]) -> logits [B, S, vocab]`` (float32).

    The decoder layers are one :class:`DecoderLayer` whose parameters carry a leading layer axis (made by
    ``nnx.vmap``) and are run by ``nnx.scan``.
    """

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed = Embed(config.vocab_size, config.hidden_size, rngs=rngs)

        @nnx.split_rngs(splits=config.num_hidden_layers)
        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: None})
        def make_layers(rngs: nnx.Rngs) -> DecoderLayer:
            return DecoderLayer(config, rngs=rngs)

        self.layers = make_layers(rngs)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = Kernel((config.hidden_size, config.vocab_size), SHARDING["lm_head.kernel"], "bsh,hv->bsv",
                              rngs=rngs)

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        x = self.embed(input_ids)
        cos, sin = rope_tables(self.config, jnp.arange(input_ids.shape[1]))

        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry, transform_metadata={nnx.PARTITION_NAME: None})
        def run(h: jax.Array, layer: DecoderLayer) -> jax.Array:
            return layer(h, cos, sin)

        x = run(x, self.layers)
        return self.lm_head(self.norm(x))


def make_mesh(devices: list | None = None) -> Mesh:
    """The ("data": 2, "model": 4) mesh of the example over the first 8 devices (Auto axes)."""
    devices = jax.devices()[:8] if devices is None else devices
    return Mesh(np.array(devices).reshape(2, 4), ("data", "model"))


def abstract_state(config: LlamaConfig, mesh: Mesh) -> tuple[nnx.GraphDef, nnx.State]:
    """``(graphdef, state)`` of the model without allocating it: the state's values are
    ``jax.ShapeDtypeStruct`` with a concrete ``NamedSharding`` on ``mesh`` (``nnx.eval_shape`` under
    ``jax.set_mesh(mesh)``, then ``nnx.split``)."""
    return nnx.get_abstract_model(lambda: LlamaForCausalLM(config, rngs=nnx.Rngs(0)), mesh)


def flat_names(state: nnx.State) -> dict[str, Any]:
    """``{dotted path: value}`` of an nnx state (the value of each Variable)."""
    return {".".join(str(p) for p in path): var.get_value() for path, var in nnx.to_flat_state(state)}


def target_shapes(config: LlamaConfig, mesh: Mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """The model's parameters as a flat ``{dotted name: jax.ShapeDtypeStruct}`` with ``NamedSharding``s on
    ``mesh`` (a plain jreshard target)."""
    _, state = abstract_state(config, mesh)
    return flat_names(state)


def partition_specs(config: LlamaConfig) -> dict[str, P]:
    """``{dotted name: PartitionSpec}`` of every parameter (layer axis included)."""
    out = {}
    for name, spec in SHARDING.items():
        top = name.split(".")[0]
        if top in ("embed", "norm", "lm_head"):
            out[name] = P(*spec)
        else:
            out[f"layers.{name}"] = P(None, *spec)
    return out


def merge(graphdef: nnx.GraphDef, state: nnx.State, values: dict[str, Any]) -> LlamaForCausalLM:
    """The model with the parameters ``values`` (``{dotted name: jax.Array}``) in the structure of ``state``."""
    flat = dict(nnx.to_flat_state(state))
    by_name = {".".join(str(p) for p in path): path for path in flat}
    missing = set(by_name) - set(values)
    extra = set(values) - set(by_name)
    if missing or extra:
        raise KeyError(f"missing {sorted(missing)}, unexpected {sorted(extra)}")
    new = nnx.from_flat_state([(by_name[n], flat[by_name[n]].replace(values[n])) for n in by_name])
    return nnx.merge(graphdef, new)


@nnx.jit
def logits(model: LlamaForCausalLM, input_ids: jax.Array) -> jax.Array:
    """``model(input_ids)``, jitted."""
    return model(input_ids)
