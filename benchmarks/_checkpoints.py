"""The checkpoints the restore benchmark reads: where they live and how each is written (once, then reused).

``dcp``: torch ``dcp.save`` on 4 gloo ranks (CPU), every tensor a DTensor ``Shard(0)`` over a 1-D mesh of 4,
i.e. an FSDP-style checkpoint (or, with ``JRESHARD_BENCH_WRITER=jreshard``, the same chunks written by
``jreshard.save_dcp``, no torch). ``orbax``: the same arrays saved by ``ocp.StandardCheckpointer`` on the
(2, 4) restore mesh. ``safetensors``: the same tensors in one ``.safetensors`` file.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import socket
import sys
from pathlib import Path

import numpy as np
from _model import ModelSpec, make_targets

SAVE_RANKS = 4


@dataclasses.dataclass(frozen=True)
class Paths:
    """Where one model's cached checkpoints live."""

    root: Path

    @property
    def dcp(self) -> Path:
        return self.root / "dcp"

    @property
    def orbax(self) -> Path:
        return self.root / "orbax"

    @property
    def safetensors(self) -> Path:
        return self.root / "model.safetensors"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def artifact(self, what: str) -> Path:
        return {"dcp": self.dcp, "orbax": self.orbax, "safetensors": self.safetensors}[what]

    def done_marker(self, what: str) -> Path:
        return self.root / f".{what}.done"


def chosen_dcp(checkpoint: str | None, workdir: str) -> str | None:
    """``checkpoint`` when given, else the newest DCP checkpoint restore.py wrote under ``workdir`` (None, with a
    message on stderr, when there is none): the checkpoint partial.py and replay.py measure."""
    if checkpoint:
        return checkpoint
    dirs = sorted(glob.glob(os.path.join(workdir, "*", "dcp")), key=os.path.getmtime)
    if not dirs:
        print(f"no DCP checkpoint under {workdir}: run benchmarks/restore.py first", file=sys.stderr)
        return None
    return dirs[-1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _save_dcp_rank(rank: int, world: int, port: int, model: ModelSpec, out_dir: str) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    state = {}
    for t in model.tensors:
        rows = t.shape[0] // world
        local = t.rows(rank * rows, (rank + 1) * rows)
        if t.dtype == "bf16":
            local = torch.from_numpy(local.view(np.int16)).view(torch.bfloat16)
        else:
            local = torch.from_numpy(local)
        stride = tuple(int(np.prod(t.shape[i + 1 :])) for i in range(len(t.shape)))
        state[t.name] = DTensor.from_local(
            local, mesh, [Shard(0)], run_check=False, shape=torch.Size(t.shape), stride=stride
        )
    dcp.save(state, checkpoint_id=out_dir)
    dist.destroy_process_group()


def write_dcp_torch_free(model: ModelSpec, paths: Paths) -> None:
    """The same checkpoint without torch: jreshard.save_dcp of the tensors as JAX arrays split on their first
    dimension over SAVE_RANKS devices, i.e. the chunks FSDP's Shard(0) gives."""
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    import jreshard

    mesh = Mesh(np.array(jax.devices()[:SAVE_RANKS]), ("fsdp",))
    tree = {t.name: jax.device_put(t.rows(), NamedSharding(mesh, PartitionSpec("fsdp"))) for t in model.tensors}
    jreshard.save_dcp(tree, paths.dcp, overwrite=True)


def write_dcp(model: ModelSpec, paths: Paths) -> None:
    if os.environ.get("JRESHARD_BENCH_WRITER") == "jreshard":
        return write_dcp_torch_free(model, paths)
    import torch.multiprocessing as mp

    mp.spawn(_save_dcp_rank, args=(SAVE_RANKS, _free_port(), model, str(paths.dcp)), nprocs=SAVE_RANKS,
             join=True)  # fmt: skip


def write_orbax(model: ModelSpec, paths: Paths) -> None:
    import jax
    import orbax.checkpoint as ocp

    targets = make_targets(model)
    tree = {t.name: jax.device_put(t.rows(), targets[t.name].sharding) for t in model.tensors}
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(paths.orbax, tree)
        checkpointer.wait_until_finished()


def write_safetensors(model: ModelSpec, paths: Paths) -> None:
    import safetensors.numpy

    safetensors.numpy.save_file({t.name: t.rows() for t in model.tensors}, str(paths.safetensors))


WRITERS = {"dcp": write_dcp, "orbax": write_orbax, "safetensors": write_safetensors}
