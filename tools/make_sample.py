"""Write the small sample DCP checkpoint bundled with jreshard (jreshard/sample/dcp/).

Needs torch (CPU). Spawns 4 ranks (gloo) with torch.multiprocessing.spawn, builds a tiny 2-layer
MLP-like state dict of DTensors (Shard(0) / Shard(1) / Replicate on a 1-D mesh of 4 and a 2x2 mesh),
bf16 and f32, plus a "step" counter, and saves it with torch.distributed.checkpoint.

    python tools/make_sample.py [OUT_DIR]      # default: jreshard/sample/dcp
    python tools/make_sample.py --torch-free OUT_DIR   # the same tensors written by jreshard.save_dcp

Without torch (``--torch-free``) the same names, shapes, dtypes and (where JAX can express them) the same
chunks are written by ``jreshard.save_dcp`` from JAX arrays on 4 CPU devices; the values come from numpy
(``torch_free_tensor``), and ``model.head.weight``'s uneven split (3, 3, 3, 1 rows), which no JAX sharding
gives, is saved as one chunk.

Data are deterministic (seeded); the values of tensor NAME are
``torch.randn(shape, generator=torch.Generator().manual_seed(crc32(NAME)))`` cast to its dtype.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import zlib

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join("jreshard", "sample", "dcp")
WORLD = 4

# name -> (shape, dtype, mesh ("1d" | "2d"), placements)
SAMPLE = {
    "model.embed.weight": ((64, 32), "bfloat16", "1d", ("S0",)),
    "model.layers.0.w1": ((32, 64), "float32", "1d", ("S1",)),
    "model.layers.0.b1": ((64,), "float32", "1d", ("R",)),
    "model.layers.0.w2": ((64, 32), "float32", "1d", ("S0",)),
    "model.layers.0.b2": ((32,), "float32", "1d", ("R",)),
    "model.layers.1.w1": ((32, 64), "bfloat16", "2d", ("S0", "S1")),
    "model.layers.1.b1": ((64,), "bfloat16", "1d", ("S0",)),
    "model.layers.1.w2": ((64, 32), "bfloat16", "2d", ("R", "S1")),
    "model.layers.1.b2": ((32,), "bfloat16", "2d", ("R", "R")),
    "model.head.weight": ((10, 32), "float32", "1d", ("S0",)),  # uneven: 3, 3, 3, 1 rows
    "model.head.bias": ((10,), "float32", "1d", ("R",)),
}
STEP = 100


def full_tensor(name: str):
    import torch

    shape, dtype, _, _ = SAMPLE[name]
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()) & 0x7FFFFFFF)
    return torch.randn(shape, generator=g, dtype=torch.float32).to(getattr(torch, dtype))


def _worker(rank: int, out_dir: str, port: int) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        meshes = {"1d": init_device_mesh("cpu", (WORLD,)), "2d": init_device_mesh("cpu", (2, 2))}
        state: dict = {"step": STEP}
        for name, (_, _, mesh, placements) in SAMPLE.items():
            pl = [Replicate() if p == "R" else Shard(int(p[1:])) for p in placements]
            value = distribute_tensor(full_tensor(name), meshes[mesh], pl, src_data_rank=None)
            d = state
            parts = name.split(".")
            for p in parts[:-1]:
                d = d.setdefault(p, {})
            d[parts[-1]] = value
        dcp.save(state, checkpoint_id=out_dir)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def torch_free_tensor(name: str):
    """The values of ``name`` in a sample written without torch: seeded numpy normals cast to its dtype."""
    import ml_dtypes
    import numpy as np

    shape, dtype, _, _ = SAMPLE[name]
    values = np.random.default_rng(zlib.crc32(name.encode())).standard_normal(shape, dtype=np.float32)
    return values.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype))


def torch_free_sample(out_dir: str) -> None:
    """Write the sample with jreshard.save_dcp (JAX arrays on 4 CPU devices; torch is not imported)."""
    if "jax" not in sys.modules:
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_force_host_platform_device_count" not in flags:
            os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={WORLD}".strip()
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    sys.path.insert(0, REPO_ROOT)
    import jreshard

    devices = np.array(jax.devices()[:WORLD])
    meshes = {"1d": Mesh(devices, ("x",)), "2d": Mesh(devices.reshape(2, 2), ("a", "b"))}
    tree: dict = {"step": STEP}
    for name, (shape, _, mesh, placements) in SAMPLE.items():
        m = meshes[mesh]
        spec: list = [None] * len(shape)
        for axis, p in zip(m.axis_names, placements):
            if p != "R":
                spec[int(p[1:])] = axis
        if any(s is not None and n % m.shape[s] for n, s in zip(shape, spec)):
            spec = [None] * len(shape)  # an uneven torch.chunk split: no JAX sharding gives it; one chunk
        tree[name] = jax.device_put(torch_free_tensor(name), NamedSharding(m, PartitionSpec(*spec)))
    jreshard.save_dcp(tree, out_dir, overwrite=True)


def main(argv: list[str]) -> None:
    if len(argv) > 1 and argv[1] == "--torch-free":
        out_dir = argv[2] if len(argv) > 2 else DEFAULT_OUT
        torch_free_sample(out_dir)
        print(f"wrote {out_dir} without torch: {sorted(os.listdir(out_dir))}")
        return
    import torch.multiprocessing as mp

    os.chdir(REPO_ROOT)  # so the checkpoint_id recorded in .metadata is the relative path
    out_dir = argv[1] if len(argv) > 1 else DEFAULT_OUT
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    os.makedirs(out_dir)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(out_dir, port), nprocs=WORLD, join=True)
    total = sum(os.path.getsize(os.path.join(out_dir, f)) for f in os.listdir(out_dir))
    print(f"wrote {out_dir}: {sorted(os.listdir(out_dir))}, {total} bytes")


if __name__ == "__main__":
    main(sys.argv)
