"""Writer of real Llama checkpoints (Hugging Face transformers + torch) for the Llama port tests.

Run as a script (``python tests/model_writers.py OUT_DIR``); spawns 4 CPU ranks with
``torch.multiprocessing.spawn`` (gloo backend) and writes:

    OUT_DIR/hf/      ``LlamaForCausalLM.save_pretrained`` of the seeded initial model: float32 safetensors in
                     several shards with ``model.safetensors.index.json``, and ``config.json``
    OUT_DIR/fsdp/    a DCP checkpoint of the same model after 2 AdamW steps under FSDP2 (``fully_shard`` per
                     decoder layer and on the root, 4 ranks): ``get_model_state_dict`` + ``dcp.save``
    OUT_DIR/ref/     input_ids.npy (int64 [2, 12]); {hf,fsdp}_logits.npy (transformers' float32 logits of the
                     initial and the trained model on those ids); {hf,fsdp}_state.npz (the full state dicts)
    OUT_DIR/config.json  the Hugging Face config
    OUT_DIR/DONE     written last

The initial model's RMSNorm weights are randomized (transformers initializes them to ones) so that every
parameter of both variants holds distinct values. torch is imported only inside functions.
"""

from __future__ import annotations

import json
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.torch_writers import free_port, gloo_group  # noqa: E402

WORLD = 4
SEED = 1234
BATCH, SEQ = 2, 12
TRAIN_STEPS = 2
# About 9.7 MB of float32 parameters in >= 3 files. Large enough that the zip overhead of DCP's items (about
# 1.5 KB each) is small beside the bytes a process needs, as in real models.
MAX_SHARD_SIZE = "2MB"

HF_CONFIG = {
    "vocab_size": 256,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 32,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "max_position_embeddings": 64,
}


def build_model():
    """The seeded initial ``LlamaForCausalLM`` (float32), identical in every process."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    config = LlamaConfig(**HF_CONFIG)
    model = LlamaForCausalLM(config).to(torch.float32)
    g = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
    return model


def input_ids():
    """The fixed batch of token ids the reference logits are computed on."""
    import torch

    g = torch.Generator().manual_seed(SEED + 2)
    return torch.randint(0, HF_CONFIG["vocab_size"], (BATCH, SEQ), generator=g)


def train_batch():
    """The random batch the FSDP ranks train on (the same on every rank)."""
    import torch

    g = torch.Generator().manual_seed(SEED + 3)
    return torch.randint(0, HF_CONFIG["vocab_size"], (BATCH, SEQ), generator=g)


def to_numpy_state(state: dict) -> dict:
    """{name: float32 numpy array} of a full (plain tensor) state dict."""
    return {k: v.detach().cpu().contiguous().numpy().copy() for k, v in state.items()}


def reference_logits(state: dict):
    """transformers' logits of a fresh (non-distributed) model holding ``state``, on :func:`input_ids`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(**HF_CONFIG)).to(torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=True)
    assert not missing and not unexpected, (missing, unexpected)
    model.eval()
    with torch.no_grad():
        return model(input_ids=input_ids()).logits.to(torch.float32).numpy().copy()


def _write_hf(model, out_dir: str) -> None:
    """save_pretrained of the initial model, its state dict and its logits (rank 0)."""
    import numpy as np

    hf_dir = os.path.join(out_dir, "hf")
    model.save_pretrained(hf_dir, max_shard_size=MAX_SHARD_SIZE, safe_serialization=True)
    files = [f for f in os.listdir(hf_dir) if f.endswith(".safetensors")]
    assert len(files) >= 3 and os.path.exists(os.path.join(hf_dir, "model.safetensors.index.json")), files
    ref = os.path.join(out_dir, "ref")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    np.savez(os.path.join(ref, "hf_state.npz"), **to_numpy_state(state))
    np.save(os.path.join(ref, "hf_logits.npy"), reference_logits(state))
    np.save(os.path.join(ref, "input_ids.npy"), input_ids().numpy().astype(np.int64))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(model.config.to_dict(), f, indent=1, sort_keys=True)


def _worker(rank: int, out_dir: str, port: int) -> None:
    import numpy as np
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    with gloo_group(rank, port, WORLD):
        model = build_model()
        if rank == 0:
            _write_hf(model, out_dir)
        mesh = init_device_mesh("cpu", (WORLD,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
        batch = train_batch()
        model.train()
        for _ in range(TRAIN_STEPS):
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
        state = get_model_state_dict(model)
        dcp.save(state, checkpoint_id=os.path.join(out_dir, "fsdp"))
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            ref = os.path.join(out_dir, "ref")
            np.savez(os.path.join(ref, "fsdp_state.npz"), **to_numpy_state(full))
            np.save(os.path.join(ref, "fsdp_logits.npy"), reference_logits(full))
        dist.barrier()


def write_all(out_dir: str) -> None:
    """Write every checkpoint and reference under ``out_dir``, then ``DONE``."""
    import torch.multiprocessing as mp

    os.makedirs(os.path.join(out_dir, "ref"), exist_ok=True)
    mp.spawn(_worker, args=(out_dir, free_port()), nprocs=WORLD, join=True)
    with open(os.path.join(out_dir, "DONE"), "w") as f:
        f.write("ok\n")


if __name__ == "__main__":
    write_all(sys.argv[1])
