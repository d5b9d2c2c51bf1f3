"""Port a Hugging Face / PyTorch Llama checkpoint into the flax nnx Llama of :mod:`examples.llama_nnx`.

The checkpoint may be a ``save_pretrained`` directory (sharded safetensors with
``model.safetensors.index.json``), a DCP directory written from ``get_model_state_dict`` of an FSDP-trained
``LlamaForCausalLM``, or anything else :func:`jreshard.open` reads, as long as its tensor names are
Hugging Face's (``model.layers.{i}.self_attn.q_proj.weight``, ``lm_head.weight``, ...).

:func:`hf_llama_mapping` says how each nnx parameter is made from saved tensors (transposes, head splits,
stacking of the layers); :func:`port` loads the model onto a mesh with it, each device reading only the bytes
of its own shards. :func:`numpy_port` is the same conversion on whole numpy arrays (a reference).

Example::

    mesh = llama_nnx.make_mesh()
    model = port("/ckpt/hf_llama", mesh)            # config read from /ckpt/hf_llama/config.json
    logits = llama_nnx.logits(model, input_ids)
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from flax import nnx
from jax.sharding import Mesh

import jreshard
from jreshard import saved, stack

from .llama_nnx import LlamaConfig, LlamaForCausalLM, abstract_state


def _layer_names(prefix: str, i: int) -> dict[str, str]:
    """Saved names of layer ``i``'s tensors, keyed by the nnx name under ``layers.``."""
    p = f"{prefix}layers.{i}."
    return {
        "attn.q.kernel": p + "self_attn.q_proj.weight",
        "attn.k.kernel": p + "self_attn.k_proj.weight",
        "attn.v.kernel": p + "self_attn.v_proj.weight",
        "attn.o.kernel": p + "self_attn.o_proj.weight",
        "mlp.gate.kernel": p + "mlp.gate_proj.weight",
        "mlp.up.kernel": p + "mlp.up_proj.weight",
        "mlp.down.kernel": p + "mlp.down_proj.weight",
        "input_norm.scale": p + "input_layernorm.weight",
        "post_attn_norm.scale": p + "post_attention_layernorm.weight",
    }


def hf_llama_mapping(config: LlamaConfig, prefix: str = "model.") -> dict[str, Any]:
    """``{nnx parameter name: saved name or lazy view}`` for :func:`jreshard.load`'s ``mapping``.

    PyTorch ``Linear`` weights are [out, in]; the nnx kernels are [in, out] with the head axes split out:
    ``q_proj.weight`` [N*D, H] -> ``.T.reshape(H, N, D)``, ``o_proj.weight`` [H, N*D] ->
    ``.T.reshape(N, D, H)``, and the per-layer tensors are stacked on a new leading layer axis.
    ``prefix`` is what precedes ``layers.``, ``embed_tokens`` and ``norm`` in the saved names.
    """
    h, n, k, d = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
    layers = [_layer_names(prefix, i) for i in range(config.num_hidden_layers)]

    def stacked(name: str, fn) -> Any:
        return stack([fn(saved(names[name])) for names in layers], axis=0)

    return {
        "embed.embedding": f"{prefix}embed_tokens.weight",
        "norm.scale": f"{prefix}norm.weight",
        "lm_head.kernel": saved("lm_head.weight").T,
        "layers.attn.q.kernel": stacked("attn.q.kernel", lambda w: w.T.reshape(h, n, d)),
        "layers.attn.k.kernel": stacked("attn.k.kernel", lambda w: w.T.reshape(h, k, d)),
        "layers.attn.v.kernel": stacked("attn.v.kernel", lambda w: w.T.reshape(h, k, d)),
        "layers.attn.o.kernel": stacked("attn.o.kernel", lambda w: w.T.reshape(n, d, h)),
        "layers.mlp.gate.kernel": stacked("mlp.gate.kernel", lambda w: w.T),
        "layers.mlp.up.kernel": stacked("mlp.up.kernel", lambda w: w.T),
        "layers.mlp.down.kernel": stacked("mlp.down.kernel", lambda w: w.T),
        "layers.input_norm.scale": stacked("input_norm.scale", lambda w: w),
        "layers.post_attn_norm.scale": stacked("post_attn_norm.scale", lambda w: w),
    }


def numpy_port(state_dict: dict[str, np.ndarray], config: LlamaConfig, prefix: str = "model.") -> dict[str, np.ndarray]:
    """The conversion of :func:`hf_llama_mapping` done on whole numpy arrays: ``{nnx parameter name: array}``
    from a Hugging Face Llama state dict (a reference that does not use jreshard)."""
    h, n, k, d = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
    layers = [_layer_names(prefix, i) for i in range(config.num_hidden_layers)]
    convert = {
        "attn.q.kernel": lambda w: w.T.reshape(h, n, d),
        "attn.k.kernel": lambda w: w.T.reshape(h, k, d),
        "attn.v.kernel": lambda w: w.T.reshape(h, k, d),
        "attn.o.kernel": lambda w: w.T.reshape(n, d, h),
        "mlp.gate.kernel": lambda w: w.T,
        "mlp.up.kernel": lambda w: w.T,
        "mlp.down.kernel": lambda w: w.T,
        "input_norm.scale": lambda w: w,
        "post_attn_norm.scale": lambda w: w,
    }
    out = {
        "embed.embedding": np.ascontiguousarray(state_dict[f"{prefix}embed_tokens.weight"]),
        "norm.scale": np.ascontiguousarray(state_dict[f"{prefix}norm.weight"]),
        "lm_head.kernel": np.ascontiguousarray(state_dict["lm_head.weight"].T),
    }
    for name, fn in convert.items():
        out[f"layers.{name}"] = np.stack([fn(np.asarray(state_dict[names[name]])) for names in layers], axis=0)
    return out


def read_config(path: str | os.PathLike) -> LlamaConfig:
    """The :class:`LlamaConfig` of ``path/config.json`` (a Hugging Face config)."""
    with open(os.path.join(os.fspath(path), "config.json")) as f:
        return LlamaConfig.from_hf(json.load(f))


def port_state(path: str | os.PathLike | jreshard.Checkpoint, mesh: Mesh, config: LlamaConfig,
               prefix: str = "model.") -> tuple[nnx.GraphDef, nnx.State]:
    """``(graphdef, state)`` of the model with the checkpoint's weights, each parameter a ``jax.Array``
    sharded as the model says on ``mesh``.

    The target given to :func:`jreshard.load` is the abstract state's pure dict (nested dicts of
    ``jax.ShapeDtypeStruct``), so its leaf names are exactly the names of :func:`hf_llama_mapping`.
    """
    graphdef, state = abstract_state(config, mesh)
    loaded = jreshard.load(path, nnx.to_pure_dict(state), mapping=hf_llama_mapping(config, prefix))
    nnx.replace_by_pure_dict(state, loaded)
    return graphdef, state


def port(path: str | os.PathLike, mesh: Mesh, config: LlamaConfig | None = None,
         prefix: str = "model.") -> LlamaForCausalLM:
    """The nnx model loaded from the checkpoint at ``path`` onto ``mesh``; ``config`` defaults to
    ``path/config.json``."""
    config = read_config(path) if config is None else config
    return nnx.merge(*port_state(path, mesh, config, prefix))
