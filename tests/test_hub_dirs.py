"""Directories laid out by the hub's conventions: variants (``save_pretrained(variant="fp16")``), diffusers'
and PEFT's file names, sets of safetensors files without index, several checkpoints in one directory
(``variant=`` picks); TorchScript and torch.export files named for what they are."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
import torch

import jreshard
from jreshard.errors import (
    CheckpointFormatError,
    InconsistentCheckpointError,
    InvalidArgumentError,
    MissingDataError,
)
from tests.helpers import assert_same


def _tensors(seed: int, n: int = 3) -> dict:
    rng = np.random.default_rng(seed)
    return {f"layer.{i}.weight": rng.standard_normal((4, 3 + i)).astype(np.float32) for i in range(n)}


def _check(ckpt, expected: dict) -> None:
    assert sorted(ckpt.tensors) == sorted(expected)
    for name, value in expected.items():
        assert_same(ckpt.read(name), value, name)


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> Path:
    """A transformers model saved plain (sharded, with index) and as the fp16 variant (sharded and single)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("hub")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=8))
    model.save_pretrained(root / "both", max_shard_size="10KB")
    model.save_pretrained(root / "both", variant="fp16", max_shard_size="10KB")  # a variant is only a name
    model.save_pretrained(root / "single", variant="fp16")
    return root


def _read_set(d: Path, pattern: str) -> dict:
    out = {}
    for f in sorted(d.glob(pattern)):
        out.update(safetensors.numpy.load_file(str(f)))
    return out


def test_transformers_variants(hub):
    d = hub / "both"
    with pytest.raises(CheckpointFormatError, match="2 checkpoints") as e:
        jreshard.open(d)
    assert "model.safetensors.index.json" in str(e.value) and "model.safetensors.index.fp16.json" in str(e.value)
    assert "variant='fp16'" in str(e.value)
    assert (d / "model.fp16-00002-of-00002.safetensors").exists()
    _check(jreshard.open(d, variant="fp16"), _read_set(d, "model.fp16-*.safetensors"))
    plain = jreshard.open(d, variant="model.safetensors.index.json")  # a checkpoint by its file name
    _check(plain, _read_set(d, "model-*.safetensors"))
    # the variant index opened by path: a safetensors index, not a torch.save file
    _check(jreshard.open(d / "model.safetensors.index.fp16.json"), _read_set(d, "model.fp16-*.safetensors"))
    with pytest.raises(InvalidArgumentError, match="no checkpoint matches variant='bf16'"):
        jreshard.open(d, variant="bf16")


def test_single_variant_file_and_load(hub):
    d = hub / "single"
    assert os.listdir(d).count("model.fp16.safetensors") == 1
    expected = safetensors.numpy.load_file(str(d / "model.fp16.safetensors"))
    _check(jreshard.open(d), expected)
    name = "transformer.wte.weight"
    import jax

    target = {name: jax.ShapeDtypeStruct(expected[name].shape, expected[name].dtype,
                                         sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))}
    assert_same(np.asarray(jreshard.load(d, target, variant="fp16")[name]), expected[name])
    assert jreshard.plan(d, target, variant="fp16").bytes_needed == expected[name].nbytes
    with pytest.raises(InvalidArgumentError, match="this is a file"):
        jreshard.open(d / "model.fp16.safetensors", variant="fp16")


def test_diffusers_layouts(tmp_path):
    unet = tmp_path / "unet"
    unet.mkdir()
    full, half = _tensors(1, 4), {k: v.astype(np.float16) for k, v in _tensors(1, 4).items()}
    # diffusers' sharded save: diffusion_pytorch_model-0000K-of-0000N.safetensors + its index
    names = sorted(full)
    weight_map = {}
    for k, part in enumerate((names[:2], names[2:]), start=1):
        f = f"diffusion_pytorch_model-0000{k}-of-00002.safetensors"
        safetensors.numpy.save_file({n: full[n] for n in part}, str(unet / f))
        weight_map.update(dict.fromkeys(part, f))
    (unet / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    safetensors.numpy.save_file(half, str(unet / "diffusion_pytorch_model.fp16.safetensors"))
    (unet / "config.json").write_text("{}")
    with pytest.raises(CheckpointFormatError, match="diffusion_pytorch_model.fp16.safetensors"):
        jreshard.open(unet)
    _check(jreshard.open(unet, variant="fp16"), half)
    _check(jreshard.open(unet, variant="diffusion_pytorch_model"), full)


def test_peft_adapter_beside_model(tmp_path):
    adapter = {"base_model.model.q.lora_A.weight": np.ones((2, 8), np.float32)}
    safetensors.numpy.save_file(adapter, str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text("{}")
    torch.save({"args": 1}, tmp_path / "training_args.bin")  # the Trainer's: not a checkpoint
    _check(jreshard.open(tmp_path), adapter)
    model = _tensors(2)
    safetensors.numpy.save_file(model, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointFormatError, match="adapter_model.safetensors; model.safetensors") as e:
        jreshard.open(tmp_path)
    assert "training_args" not in str(e.value)
    _check(jreshard.open(tmp_path, variant="adapter_model"), adapter)
    _check(jreshard.open(tmp_path, variant="model"), model)
    _check(jreshard.open(tmp_path / "adapter_model.safetensors"), adapter)


def test_safetensors_preferred_over_bin(tmp_path):
    model = _tensors(3)
    torch.save({k: torch.from_numpy(v) * 2 for k, v in model.items()}, tmp_path / "pytorch_model.bin")
    ckpt = jreshard.open(tmp_path)
    assert ckpt.format.format_name == "torch.save"
    safetensors.numpy.save_file(model, str(tmp_path / "model.safetensors"))
    ckpt = jreshard.open(tmp_path)
    assert ckpt.format.format_name == "safetensors"
    _check(ckpt, model)
    # a .bin variant
    torch.save({k: torch.from_numpy(v).half() for k, v in model.items()}, tmp_path / "pytorch_model.fp16.bin")
    _check(jreshard.open(tmp_path, variant="fp16"), {k: v.astype(np.float16) for k, v in model.items()})


def test_safetensors_sets_without_index(tmp_path):
    model = _tensors(4, 4)
    names = sorted(model)
    for k, part in enumerate((names[:1], names[1:3], names[3:]), start=1):
        safetensors.numpy.save_file({n: model[n] for n in part}, str(tmp_path / f"model-0000{k}-of-00003.safetensors"))
    _check(jreshard.open(tmp_path), model)
    # a name stored twice is an error naming both files
    extra = tmp_path / "dup"
    shutil.copytree(tmp_path, extra, ignore=shutil.ignore_patterns("dup"))
    safetensors.numpy.save_file({n: model[n] for n in names[:2]}, str(extra / "model-00001-of-00003.safetensors"))
    with pytest.raises(InconsistentCheckpointError, match="model-00002-of-00003.safetensors.*also stored in.*"
                                                          "model-00001-of-00003.safetensors"):
        jreshard.open(extra)
    os.remove(tmp_path / "model-00002-of-00003.safetensors")
    with pytest.raises(MissingDataError, match="model-00002-of-00003.safetensors"):
        jreshard.open(tmp_path)


def test_numbered_prefix_set_and_unrelated_files(tmp_path):
    a, b = _tensors(5, 2), {"other.weight": np.zeros((2, 2), np.float32)}
    safetensors.numpy.save_file(a, str(tmp_path / "part_0.safetensors"))
    safetensors.numpy.save_file(b, str(tmp_path / "part_1.safetensors"))
    _check(jreshard.open(tmp_path), {**a, **b})
    safetensors.numpy.save_file(b, str(tmp_path / "ema.safetensors"))
    with pytest.raises(CheckpointFormatError, match=r"2 checkpoints: ema.safetensors; part\*.safetensors \(2 files\)"):
        jreshard.open(tmp_path)
    _check(jreshard.open(tmp_path, variant="ema"), b)


def test_not_a_checkpoint_directory_and_dcp_variant(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointFormatError, match="not a checkpoint directory"):
        jreshard.open(tmp_path)
    with pytest.raises(InvalidArgumentError, match="DCP"):
        jreshard.open(jreshard.sample_path(), variant="fp16")


class _Linear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)

    def forward(self, x):
        return self.lin(x)


def test_torchscript_and_export_name_their_kind(tmp_path):
    torch.jit.save(torch.jit.script(_Linear()), tmp_path / "m.jit")
    with pytest.raises(CheckpointFormatError, match="TorchScript archive .written by torch.jit.save.") as e:
        jreshard.open(tmp_path / "m.jit")
    assert "m.jit" in str(e.value)
    torch.export.save(torch.export.export(_Linear(), (torch.randn(1, 3),)), tmp_path / "m.pt2")
    with pytest.raises(CheckpointFormatError, match=r"torch.export program \(.pt2") as e:
        jreshard.open(tmp_path / "m.pt2")
    assert "m.pt2" in str(e.value)
