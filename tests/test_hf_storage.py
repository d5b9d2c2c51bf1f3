"""torch's Hugging Face writer (``HuggingFaceStorageWriter``): per-rank safetensors shards whose
``DCP_SHARDING_INFO`` places each slice, read as the chunks of the full tensors, bitwise as torch's
``HuggingFaceStorageReader`` reads them; hostile sharding info refused.

Run as a script (``python tests/test_hf_storage.py OUT``) it writes the checkpoints with 4 gloo ranks and
DTensor shards, and torch's own reading of them.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))

from tests import torch_writers as tw

# name -> (full shape, numpy dtype, placements over a 4-rank mesh or a 2x2 mesh)
TENSORS = {
    "head.weight": ((127, 64), "float32", "s0"),  # uneven Shard(0): 32, 32, 32, 31 rows
    "embed.weight": ((16, 10), "float16", "s1"),  # uneven Shard(1)
    "blocks.0.w": ((12, 6), "float32", "s0s1"),  # 2x2 mesh, (Shard(0), Shard(1)); torch consolidates floats only
    "norm.bias": ((8,), "float64", "r"),  # replicated: saved once
}
MAPPING = {"head.weight": 1, "norm.bias": 1, "embed.weight": 2, "blocks.0.w": 2}
CONFIGS = {
    "dist": {"save_distributed": True},
    "dist_map": {"save_distributed": True, "fqn_to_index_mapping": MAPPING},
    "consolidated": {"save_distributed": True, "fqn_to_index_mapping": MAPPING, "enable_consolidation": True},
}


def full(name: str) -> np.ndarray:
    shape, dtype, _ = TENSORS[name]
    rng = np.random.default_rng(sum(map(ord, name)))
    return (rng.standard_normal(shape) * 100).astype(dtype)


def _worker(rank: int, out: str, port: int) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import (
        HuggingFaceStorageReader,
        HuggingFaceStorageWriter,
    )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    with tw.gloo_group(rank, port):
        mesh1 = init_device_mesh("cpu", (4,))
        mesh2 = init_device_mesh("cpu", (2, 2))
        plan = {"s0": (mesh1, [Shard(0)]), "s1": (mesh1, [Shard(1)]), "s0s1": (mesh2, [Shard(0), Shard(1)]),
                "r": (mesh1, [Replicate()])}
        state = {}
        for name, (_, _, how) in TENSORS.items():
            mesh, placements = plan[how]
            state[name] = distribute_tensor(torch.from_numpy(full(name)), mesh, placements)
        for config, kwargs in CONFIGS.items():
            dcp.save(state, storage_writer=HuggingFaceStorageWriter(os.path.join(out, config), **kwargs))
        dist.barrier()
        if rank == 0:  # torch's own reading, as a single process
            for config, sub in (("dist", ""), ("dist_map", ""), ("consolidated", "sharded"), ("consolidated", "")):
                path = os.path.join(out, config, sub)
                dest = {n: torch.zeros(TENSORS[n][0], dtype=getattr(torch, TENSORS[n][1])) for n in TENSORS}
                dcp.load(dest, storage_reader=HuggingFaceStorageReader(path), no_dist=True)
                np.savez(os.path.join(out, f"torch_{config}{'_' + sub if sub else ''}.npz"),
                         **{n: t.numpy() for n, t in dest.items()})
        dist.barrier()


def write(out: str) -> None:
    import torch.multiprocessing as mp

    os.makedirs(out, exist_ok=True)
    mp.spawn(_worker, args=(out, tw.free_port()), nprocs=4, join=True)
    Path(out, "DONE").write_text("ok\n")


if __name__ == "__main__":
    write(sys.argv[1])
    sys.exit(0)

import jax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jreshard
from jreshard.errors import (
    CheckpointFormatError,
    InconsistentCheckpointError,
    JReshardError,
)
from tests.conftest import _run_writer
from tests.helpers import assert_same

SOURCES = {"dist": "dist", "dist_map": "dist_map", "consolidated_sharded": "consolidated/sharded",
           "consolidated": "consolidated"}


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> Path:
    keep = os.environ.get("JRESHARD_TEST_CHECKPOINTS")
    root = Path(keep) / "hf_storage" if keep else tmp_path_factory.mktemp("hf_storage")
    if not (root / "DONE").exists():
        _run_writer("test_hf_storage.py", root, "HuggingFaceStorageWriter")
    return root


def test_writer_lays_out_rank_shards(hf):
    assert sorted(os.listdir(hf / "dist")) == [f"shard-0000{r}-model-00001-of-00001.safetensors" for r in (1, 2, 3, 4)]
    assert "shard-00002-model-00002-of-00002.safetensors" in os.listdir(hf / "dist_map")
    assert "model.safetensors.index.json" in os.listdir(hf / "consolidated")


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_reads_as_torch_reads(hf, source):
    ckpt = jreshard.open(hf / SOURCES[source])
    torch_ref = dict(np.load(hf / f"torch_{source}.npz"))
    assert sorted(ckpt.tensors) == sorted(TENSORS)
    for name in TENSORS:
        assert ckpt.tensors[name].shape == TENSORS[name][0]
        assert_same(ckpt.read(name), torch_ref[name], f"{source} {name}")
        assert_same(ckpt.read(name), full(name), f"{source} {name} (writer)")
    if source != "consolidated":
        assert len(ckpt.tensors["head.weight"].chunks) == 4
    # through the planner onto a mesh
    mesh = Mesh(np.array(jax.devices()[:4]), ("x",))
    target = {"blocks.0.w": jax.ShapeDtypeStruct((12, 6), np.float32, sharding=NamedSharding(mesh, P("x"))),
              "head.weight": jax.ShapeDtypeStruct((127, 64), np.float32, sharding=NamedSharding(mesh, P(None, "x")))}
    out = jreshard.load(hf / SOURCES[source], target)
    for name in target:
        assert_same(np.asarray(out[name]), torch_ref[name], f"{source} {name} (load)")


def test_reads_only_the_slices_it_needs(hf):
    ckpt = jreshard.open(hf / "dist")
    before = ckpt.io_stats.bytes_read
    rows = ckpt.read("head.weight", (slice(33, 40),))
    assert_same(rows, full("head.weight")[33:40])
    assert ckpt.io_stats.bytes_read - before == 7 * 64 * 4  # rows 33..39 lie in rank 2's slice only


def test_one_shard_file_is_refused(hf):
    for f in ("shard-00001-model-00001-of-00001.safetensors", "shard-00003-model-00001-of-00001.safetensors"):
        with pytest.raises(CheckpointFormatError, match="open the directory") as e:
            jreshard.open(hf / "dist" / f)
        assert f in str(e.value) and "HuggingFaceStorageWriter" in str(e.value)


# -- hostile sharding info: mutations of a real file ------------------------------------------------------

def _rewrite(path: Path, edit) -> None:
    """Rewrite the safetensors file at ``path`` with ``edit(sharding_info) -> str`` as its DCP_SHARDING_INFO."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header["__metadata__"]["DCP_SHARDING_INFO"] = edit(json.loads(header["__metadata__"]["DCP_SHARDING_INFO"]))
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])


@pytest.fixture
def copy(hf, tmp_path):
    dest = tmp_path / "dist"
    shutil.copytree(hf / "dist", dest)
    return dest


def _shard(d: Path, rank: int) -> Path:
    return d / f"shard-0000{rank}-model-00001-of-00001.safetensors"


def _set_offsets(name, offsets):
    def edit(info):
        info[name]["saved_offsets"] = offsets
        return json.dumps(info)
    return edit


@pytest.mark.parametrize("edit, error, words", [
    (_set_offsets("head.weight", [16, 0]), InconsistentCheckpointError, "overlap"),  # across rank 1's slice
    (_set_offsets("head.weight", [0, 0]), InconsistentCheckpointError, "holes"),  # rank 1's slice twice
    (_set_offsets("head.weight", [2**40, 0]), InconsistentCheckpointError, "head.weight"),  # a hole / out of range
    (_set_offsets("head.weight", [3 * 2**61, 0]), CheckpointFormatError, "saved offset"),
    (_set_offsets("head.weight", [32]), CheckpointFormatError, "saved_offsets of 2 ints"),
    (_set_offsets("head.weight", [32.0, 0]), CheckpointFormatError, "saved offset"),
    (_set_offsets("head.weight", [-32, 0]), CheckpointFormatError, "saved offset"),
    (lambda info: json.dumps({k: v for k, v in info.items() if k != "head.weight"}), CheckpointFormatError,
     "no saved_offsets"),
    (lambda info: json.dumps({**info, "ghost": {"saved_offsets": [0]}}), InconsistentCheckpointError, "ghost"),
    (lambda info: "[" * 100000 + "]" * 100000, CheckpointFormatError, "DCP_SHARDING_INFO"),  # a JSON bomb
    (lambda info: "{not json", CheckpointFormatError, "bad JSON"),
    (lambda info: json.dumps(info)[:-1] + ', "head.weight": {}}', CheckpointFormatError, "twice"),
])
def test_hostile_sharding_info(copy, edit, error, words):
    _rewrite(_shard(copy, 2), edit)
    with pytest.raises(error, match=words) as e:
        jreshard.open(copy)
    assert "shard-0000" in str(e.value)


def test_missing_interior_shard_is_a_hole(copy):
    os.remove(_shard(copy, 2))
    with pytest.raises(InconsistentCheckpointError, match="holes"):
        jreshard.open(copy)


def test_mixed_slices_and_whole_tensor(copy):
    """A plain safetensors file beside the shards that repeats a name: not a slice, refused."""
    import safetensors.numpy

    safetensors.numpy.save_file({"head.weight": full("head.weight")}, str(copy / "shard-00005-model-00001-of-00001.safetensors"))
    with pytest.raises(InconsistentCheckpointError, match="also stored in"):
        jreshard.open(copy)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(offsets=st.lists(st.lists(st.integers(-3, 200), min_size=2, max_size=2), min_size=4, max_size=4))
def test_fuzzed_offsets_open_consistently_or_refuse(copy, tmp_path_factory, offsets):
    d = tmp_path_factory.mktemp("fuzz")
    for rank, o in enumerate(offsets, start=1):
        shutil.copy(_shard(copy, rank), d / _shard(copy, rank).name)
        _rewrite(d / _shard(copy, rank).name, _set_offsets("head.weight", o))
    try:
        ckpt = jreshard.open(d)
    except JReshardError:
        return
    # accepted: the chunks tile the tensor, and each chunk holds the bytes of its own file
    t = ckpt.tensors["head.weight"]
    assert sum(c.numel for c in t.chunks) == int(np.prod(t.shape))
    got = ckpt.read("head.weight")
    rows = [(o[0], s) for o, s in zip(offsets, (32, 32, 32, 31))]
    for (r0, n), rank in zip(rows, range(4)):
        assert_same(got[r0 : r0 + n], full("head.weight")[32 * rank : 32 * rank + n])
