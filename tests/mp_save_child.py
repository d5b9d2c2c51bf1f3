"""Subprocesses of tests/test_save_dcp.py (not collected): JAX processes that save one checkpoint together,
and torch readers of what jreshard.save_dcp wrote.

usage:
  python tests/mp_save_child.py jax-writer CKPT_DIR PORT PROCESS_ID NUM_PROCESSES RESULT_JSON
      one of NUM_PROCESSES JAX processes (2 CPU devices each) saving ``mp_reference()`` with save_dcp.
  python tests/mp_save_child.py torch-load JOBS_JSON RESULT_JSON
      torch's single-process ``dcp.load(no_dist=True)`` into preallocated plain tensors, per job; also what
      torch.save writes as ``data.pkl`` for a small tensor of each dtype (for the format comparison).
  python tests/mp_save_child.py torch-load-4 JOBS_JSON RESULT_JSON
      4 gloo ranks (torch.multiprocessing.spawn), loading each job onto DTensors Shard(1) (Shard(0) for 1-D,
      plain tensors for 0-d and for the job's ``plain`` names); every rank saves its local pieces.

A job is ``{"ckpt": dir, "out": dir, "tensors": {name: [shape, dtype name]}, "objects": {name: default}}``.
Tensors are saved as raw bytes (``<out>/<i>.npy`` of uint8, see ``read_raw``) so every dtype round-trips exactly.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

NPROC = 4


# ---------------------------------------------------------------------------------------------
# reference data (numpy only; the same in the parent test and in every child)


def np_dtype(name: str) -> np.dtype:
    """The numpy / ml_dtypes dtype of a torch dtype name."""
    from jreshard.dtypes import TORCH_DTYPES

    return TORCH_DTYPES[name]


def make_array(name: str, shape: tuple, dtype: str, seed: int | None = None) -> np.ndarray:
    """Deterministic contents for ``name`` (exactly representable, NaN-free except where asked)."""
    import zlib

    rng = np.random.default_rng(zlib.crc32(name.encode()) if seed is None else seed)
    dt = np_dtype(dtype)
    if dt == np.bool_:
        return rng.integers(0, 2, shape).astype(bool)
    if dt.kind in "iu":
        info = np.iinfo(dt)
        return rng.integers(max(info.min, -(2**40)), min(info.max, 2**40), shape, dtype=np.int64).astype(dt)
    if dt.kind == "c":
        return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dt)
    x = rng.standard_normal(shape) * 3.0
    if dtype.startswith("float8"):
        x = np.clip(x, -50, 50)
        if dtype == "float8_e8m0fnu":
            x = np.abs(x) + 0.5
    return x.astype(dt)


def mp_reference() -> dict:
    """name -> (array, PartitionSpec axes) saved by the 4 JAX processes on a (4, 2) ('data', 'model') mesh."""
    specs = {
        "mp.a": ((64, 48), "float32", ("data", "model")),
        "mp.b": ((32, 16), "bfloat16", ("model", None)),  # replicated over 'data': across processes
        "mp.c": ((24,), "int64", ()),  # fully replicated
        "mp.d": ((8, 8, 4), "complex64", (None, "data", "model")),
        "mp.s": ((), "float32", ()),
        "mp.e": ((0, 8), "float32", (None, "data")),
        "mp.f": ((16, 8), "float8_e4m3fn", (("data", "model"),)),
        "mp.g": ((12, 8), "uint16", (None, "data")),
    }
    return {n: (make_array(n, shape, dt), axes) for n, (shape, dt, axes) in specs.items()}


MP_OBJECTS = {"step": 11, "sched.lr": 0.25}
MP_NUMPY = {"np.x": ((3, 5), "int32")}


# ---------------------------------------------------------------------------------------------
# raw byte stores


def read_raw(out_dir: str) -> dict:
    """{name: array} from a store written by ``_save_raw`` (``manifest.json`` with shape, dtype, file)."""
    with open(os.path.join(out_dir, "manifest.json")) as f:
        manifest = json.load(f)
    out = {}
    for name, ent in manifest["tensors"].items():
        raw = np.load(os.path.join(out_dir, ent["file"]), allow_pickle=False)
        out[name] = raw.view(np_dtype(ent["dtype"])).reshape(ent["shape"])
    return out


def read_objects(out_dir: str) -> dict:
    with open(os.path.join(out_dir, "manifest.json")) as f:
        return json.load(f)["objects"]


def _raw(t) -> np.ndarray:
    import torch

    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().copy()


def _save_raw(out_dir: str, tensors: dict, objects: dict, extra: dict | None = None) -> None:
    """tensors: {name: (torch tensor, dtype name, extra fields)}."""
    os.makedirs(out_dir, exist_ok=True)
    manifest = {"tensors": {}, "objects": {k: repr(v) for k, v in objects.items()}}
    for i, (name, (t, dtype, fields)) in enumerate(sorted(tensors.items())):
        fname = f"{i:04d}.npy"
        np.save(os.path.join(out_dir, fname), _raw(t), allow_pickle=False)
        manifest["tensors"][name] = {"file": fname, "dtype": dtype, "shape": list(t.shape), **fields}
    manifest.update(extra or {})
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f)


# ---------------------------------------------------------------------------------------------
# JAX writer


def jax_writer() -> dict:
    ckpt, port, pid, nproc = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=nproc, process_id=pid)
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from jreshard import save_dcp

    assert jax.process_count() == nproc and len(jax.local_devices()) == 2
    mesh = Mesh(np.array(jax.devices()).reshape(nproc, 2), ("data", "model"))
    tree: dict = {}
    for name, (ref, axes) in mp_reference().items():
        sharding = NamedSharding(mesh, P(*axes))
        arr = jax.make_array_from_callback(ref.shape, sharding, lambda idx, ref=ref: ref[idx])
        assert not arr.is_fully_addressable
        tree[name] = arr
    for name, (shape, dt) in MP_NUMPY.items():
        tree[name] = make_array(name, shape, dt)
    tree.update(MP_OBJECTS)
    save_dcp(tree, ckpt)
    own = os.path.join(ckpt, f"__{pid}_0.distcp")
    result = {"pid": pid, "ok": True, "file_size": os.path.getsize(own) if os.path.exists(own) else -1,
              "metadata_seen": os.path.exists(os.path.join(ckpt, ".metadata"))}
    return result


# ---------------------------------------------------------------------------------------------
# torch readers


def _jobs() -> list:
    with open(sys.argv[2]) as f:
        return json.load(f)


def _torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def _metadata_summary(ckpt: str) -> dict:
    from torch.distributed.checkpoint import FileSystemReader

    md = FileSystemReader(ckpt).read_metadata()
    return {
        "types": sorted({type(v).__module__ + "." + type(v).__qualname__ for v in md.state_dict_metadata.values()}),
        "dtypes": {k: str(v.properties.dtype) for k, v in md.state_dict_metadata.items() if hasattr(v, "properties")},
        "planner_data": {k: list(v) for k, v in (md.planner_data or {}).items()},
        "checkpoint_id": str(md.storage_meta.checkpoint_id) if md.storage_meta else None,
        "storage": [[mi.fqn, None if mi.offset is None else list(mi.offset), info.relative_path, info.offset,
                     info.length] for mi, info in md.storage_data.items()],
    }


def _poisoned(shape, dtype: str):
    """A preallocated target whose bytes are all 0x55 (so an element dcp.load does not write shows)."""
    import torch

    t = torch.empty(tuple(shape), dtype=_torch_dtype(dtype))
    t.reshape(-1).view(torch.uint8).fill_(0x55)
    return t


def torch_load() -> dict:
    import io
    import zipfile

    import torch
    import torch.distributed.checkpoint as dcp

    torch.set_num_threads(1)
    result: dict = {"ok": False, "jobs": []}
    for job in _jobs():
        sd: dict = {n: _poisoned(shape, dt) for n, (shape, dt) in job["tensors"].items()}
        sd.update(job["objects"])
        dcp.load(sd, checkpoint_id=job["ckpt"], no_dist=True)
        _save_raw(job["out"], {n: (sd[n], dt, {}) for n, (_, dt) in job["tensors"].items()},
                  {k: sd[k] for k in job["objects"]}, {"metadata": _metadata_summary(job["ckpt"])})
        result["jobs"].append(job["out"])
    pickles = {}
    for name in ("float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
                 "float8_e5m2fnuz", "float8_e8m0fnu", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
                 "uint64", "bool", "complex64", "complex128"):
        for shape in ((2, 3), (), (0, 4), (2, 0, 3)):
            buf = io.BytesIO()
            torch.save(torch.zeros(shape, dtype=_torch_dtype(name)), buf)
            z = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
            prefix = z.namelist()[0].split("/")[0] + "/"
            pickles[f"{name}{list(shape)}"] = {
                "data.pkl": z.read(prefix + "data.pkl").hex(),
                "names": [n[len(prefix):] for n in z.namelist()],
            }
    result["torch_pickles"] = pickles
    result["ok"] = True
    return result


def _rank_load(rank: int, jobs: list, port: int) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor import zeros as dzeros
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=NPROC)
    try:
        mesh = init_device_mesh("cpu", (NPROC,))
        for job in jobs:
            sd: dict = {}
            for name, (shape, dt) in job["tensors"].items():
                shape = tuple(shape)
                if len(shape) == 0 or name in job.get("plain", ()):
                    sd[name] = torch.zeros(shape, dtype=_torch_dtype(dt))
                else:
                    placements = [Shard(1 if len(shape) >= 2 else 0)]
                    sd[name] = dzeros(shape, dtype=_torch_dtype(dt), device_mesh=mesh, placements=placements)
            sd.update(job["objects"])
            dcp.load(sd, checkpoint_id=job["ckpt"])
            tensors = {}
            for name, (shape, dt) in job["tensors"].items():
                t = sd[name]
                if isinstance(t, DTensor):
                    _, offsets = compute_local_shape_and_global_offset(t.shape, mesh, t.placements)
                    tensors[name] = (t.to_local(), dt, {"offsets": list(offsets), "dtensor": True})
                else:
                    tensors[name] = (t, dt, {"offsets": [0] * len(shape), "dtensor": False})
            _save_raw(os.path.join(job["out"], f"rank{rank}"), tensors, {k: sd[k] for k in job["objects"]})
        dist.barrier()
    finally:
        dist.destroy_process_group()


def torch_load_4() -> dict:
    import torch.multiprocessing as mp

    from tests.torch_writers import free_port

    mp.spawn(_rank_load, args=(_jobs(), free_port()), nprocs=NPROC, join=True)
    return {"ok": True}


if __name__ == "__main__":
    from tests.mp_result import run

    mode = sys.argv[1]
    if mode == "jax-writer":
        run(jax_writer, 4, 6)
    elif mode == "torch-load":
        run(torch_load, 99, 3)
    elif mode == "torch-load-4":
        run(torch_load_4, 99, 3)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
