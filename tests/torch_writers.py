"""Writers of real torch.distributed.checkpoint (DCP) checkpoints for the test suite.

Run as a script (``python tests/torch_writers.py OUT_DIR``): spawns 4 CPU ranks with
``torch.multiprocessing.spawn`` (gloo backend, one process group) and writes every checkpoint
variant under ``OUT_DIR``:

    OUT_DIR/plain        default TORCH_SAVE serialization
    OUT_DIR/zstd         FileSystemWriter(_extensions=[ZStandard()])
    OUT_DIR/safetensors  FileSystemWriter(serialization_format=SAFETENSORS), contiguous tensors only
    OUT_DIR/threads      FileSystemWriter(thread_count=3)
    OUT_DIR/ref/         the full tensors the writer constructed (one .npy per tensor + manifest.json)
    OUT_DIR/torch_ref/<variant>/  what torch's own dcp.load reads back (not for safetensors)
    OUT_DIR/DONE         written last

The table of tensors (``TENSORS``) is plain Python and importable without torch, so the tests can
parametrize over it at collection time. torch is imported only inside functions.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass

WORLD = 4
VARIANTS = ("plain", "zstd", "safetensors", "threads")
# torch 2.13's FileSystemReader cannot read the safetensors serialization back.
TORCH_READABLE_VARIANTS = ("plain", "zstd", "threads")

ALL_DTYPES = (
    "float64",
    "float32",
    "float16",
    "bfloat16",
    "float8_e4m3fn",
    "float8_e5m2",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "bool",
    "complex64",
    "complex128",
)

# Non-tensor entries, as the writer puts them into the state dict, and as DCP flattens them.
OBJECTS_NESTED = {"step": 7, "sched": {"lr": 0.1, "ms": [1, 2]}}
OBJECTS_FLAT = {"step": 7, "sched.lr": 0.1, "sched.ms": [1, 2]}


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the test state dict.

    kind: "dtensor1" (1-D mesh of 4), "dtensor2" (2-D mesh 2x2), "plain" (same tensor on all ranks),
          "dtensor1_localT" (1-D mesh, Shard(0), each rank's local tensor a transposed, non-contiguous view),
          "transposed" (plain view ``arange(..).reshape(a, b).T``), "offset_slice" (plain ``big[2:5]``).
    placements: tuple of "S0", "S1", "S2", "R" (one per mesh dim) for dtensors.
    """

    name: str
    shape: tuple
    dtype: str = "float32"
    kind: str = "plain"
    placements: tuple = ()
    variants: tuple = VARIANTS
    big: bool = False  # large tensors for the multi-process test (plain variant only)

    @property
    def contiguous(self) -> bool:
        return self.kind not in ("transposed", "offset_slice")


def _specs() -> list[TensorSpec]:
    non_st = ("plain", "zstd", "threads")
    s = [
        # 1-D mesh of 4
        TensorSpec("d1.s0", (16, 12), kind="dtensor1", placements=("S0",)),
        TensorSpec("d1.s1", (8, 24), kind="dtensor1", placements=("S1",)),
        TensorSpec("d1.rep", (16, 8), kind="dtensor1", placements=("R",)),
        TensorSpec("d1.uneven_s0", (10, 6), kind="dtensor1", placements=("S0",)),
        TensorSpec("d1.uneven_s1", (6, 10), kind="dtensor1", placements=("S1",)),
        TensorSpec("d1.empty_s0", (3, 5), kind="dtensor1", placements=("S0",)),
        TensorSpec("d1.vec", (40,), kind="dtensor1", placements=("S0",)),
        TensorSpec("d1.vec_uneven", (13,), kind="dtensor1", placements=("S0",)),
        TensorSpec("d1.s2_3d", (4, 6, 16), kind="dtensor1", placements=("S2",)),
        TensorSpec("d1.s1_3d", (8, 10, 3), dtype="bfloat16", kind="dtensor1", placements=("S1",)),
        TensorSpec("d1.scalar_rep", (), kind="dtensor1", placements=("R",)),
        TensorSpec("d1.local_transposed", (16, 6), kind="dtensor1_localT", placements=("S0",), variants=non_st),
        # 2-D mesh (2, 2)
        TensorSpec("d2.s0s1", (16, 24), kind="dtensor2", placements=("S0", "S1")),
        TensorSpec("d2.s1rep", (8, 12), kind="dtensor2", placements=("S1", "R")),
        TensorSpec("d2.reps0", (16, 8), kind="dtensor2", placements=("R", "S0")),
        TensorSpec("d2.s0s0", (16, 8), kind="dtensor2", placements=("S0", "S0")),
        TensorSpec("d2.s0s0_uneven", (10, 3), kind="dtensor2", placements=("S0", "S0")),
        TensorSpec("d2.s1s0", (12, 16), kind="dtensor2", placements=("S1", "S0")),
        TensorSpec("d2.uneven_s0s1", (7, 9), dtype="bfloat16", kind="dtensor2", placements=("S0", "S1")),
        TensorSpec("d2.rep_rep", (8, 8), dtype="int32", kind="dtensor2", placements=("R", "R")),
        # plain tensors (identical on every rank)
        TensorSpec("plain.w", (24, 16)),
        TensorSpec("plain.vec", (24,)),
        TensorSpec("plain.scalar", ()),
        TensorSpec("plain.odd", (5, 7, 3), dtype="float16"),
        TensorSpec("plain.transposed", (16, 6), kind="transposed", variants=non_st),
        TensorSpec("plain.offset_slice", (3, 8), kind="offset_slice", variants=non_st),
        TensorSpec("plain.transposed_bf16", (8, 4), dtype="bfloat16", kind="transposed", variants=non_st),
        # nested dict keys
        TensorSpec("model.layers.0.w", (16, 16), kind="dtensor1", placements=("S0",)),
        TensorSpec("model.layers.0.b", (16,), kind="dtensor1", placements=("R",)),
        TensorSpec("model.layers.1.w", (16, 8), dtype="bfloat16", kind="dtensor2", placements=("S1", "S0")),
        TensorSpec("model.layers.1.b", (8,), dtype="bfloat16"),
        TensorSpec("model.embed", (32, 8), dtype="bfloat16", kind="dtensor1", placements=("S0",)),
    ]
    for dt in ALL_DTYPES:
        # safetensors (the format) has no complex128.
        v = non_st if dt == "complex128" else VARIANTS
        s.append(TensorSpec(f"dtypes.sharded.{dt}", (16, 8), dtype=dt, kind="dtensor2", placements=("S0", "S1"),
                            variants=v))
        s.append(TensorSpec(f"dtypes.uneven.{dt}", (10, 3), dtype=dt, kind="dtensor1", placements=("S0",),
                            variants=v))
        s.append(TensorSpec(f"dtypes.plain.{dt}", (5, 8), dtype=dt, variants=v))
    # Larger tensors for the multi-process I/O accounting test (plain variant only).
    s += [
        TensorSpec("mp.a", (512, 512), kind="dtensor1", placements=("S0",), variants=("plain",), big=True),
        TensorSpec("mp.b", (256, 1024), dtype="bfloat16", kind="dtensor2", placements=("S0", "S1"),
                   variants=("plain",), big=True),
        TensorSpec("mp.c", (1024, 256), kind="dtensor1", placements=("R",), variants=("plain",), big=True),
        TensorSpec("mp.d", (384, 640), kind="dtensor1", placements=("S1",), variants=("plain",), big=True),
        TensorSpec("mp.e", (256, 512), kind="plain", variants=("plain",), big=True),
    ]
    return s


TENSORS: list[TensorSpec] = _specs()
TENSORS_BY_NAME = {t.name: t for t in TENSORS}


def tensors_for(variant: str) -> list[TensorSpec]:
    return [t for t in TENSORS if variant in t.variants]


# ---------------------------------------------------------------------------------------------
# numpy side (no torch): the reference store
# ---------------------------------------------------------------------------------------------

# dtype name -> (storage dtype used in the .npy file, numpy/ml_dtypes dtype)
def _np_dtype(name: str):
    import ml_dtypes
    import numpy as np

    if name == "bfloat16":
        return np.dtype(ml_dtypes.bfloat16)
    if name == "float8_e4m3fn":
        return np.dtype(ml_dtypes.float8_e4m3fn)
    if name == "float8_e5m2":
        return np.dtype(ml_dtypes.float8_e5m2)
    return np.dtype(name)


_STORAGE_VIEW = {"bfloat16": "uint16", "float8_e4m3fn": "uint8", "float8_e5m2": "uint8"}


def np_dtype(name: str):
    return _np_dtype(name)


def save_store(directory: str, arrays: dict) -> None:
    """Write {name: (dtype_name, ndarray)} as one .npy per tensor plus manifest.json."""
    import numpy as np

    os.makedirs(directory, exist_ok=True)
    manifest = {}
    for i, (name, (dtname, arr)) in enumerate(sorted(arrays.items())):
        fname = f"{i:04d}.npy"
        store = arr.view(_STORAGE_VIEW[dtname]) if dtname in _STORAGE_VIEW else arr
        np.save(os.path.join(directory, fname), np.array(store, order="C", copy=True), allow_pickle=False)
        manifest[name] = {"file": fname, "dtype": dtname, "shape": list(arr.shape)}
    with open(os.path.join(directory, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)


def load_store(directory: str) -> dict:
    """Read a store written by save_store: {name: ndarray with its real (ml_dtypes) dtype}."""
    import numpy as np

    with open(os.path.join(directory, "manifest.json")) as f:
        manifest = json.load(f)
    out = {}
    for name, ent in manifest.items():
        arr = np.load(os.path.join(directory, ent["file"]), allow_pickle=False)
        if ent["dtype"] in _STORAGE_VIEW:
            arr = arr.view(_np_dtype(ent["dtype"]))
        assert arr.dtype == _np_dtype(ent["dtype"]), (name, arr.dtype, ent["dtype"])
        assert tuple(arr.shape) == tuple(ent["shape"]), (name, arr.shape, ent["shape"])
        out[name] = arr
    return out


# ---------------------------------------------------------------------------------------------
# torch side
# ---------------------------------------------------------------------------------------------


def torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def to_numpy(t):
    """torch tensor -> numpy array with the ml_dtypes dtype for bf16 / float8 (bit-exact)."""
    import torch

    t = t.detach().cpu().contiguous()
    name = str(t.dtype).removeprefix("torch.")
    if name == "bfloat16":
        return t.view(torch.int16).numpy().view(_np_dtype(name))
    if name in ("float8_e4m3fn", "float8_e5m2"):
        return t.view(torch.uint8).numpy().view(_np_dtype(name))
    return t.numpy().copy()


def _seed_of(name: str) -> int:
    import zlib

    return zlib.crc32(name.encode()) & 0x7FFFFFFF


def make_full(spec: TensorSpec):
    """The full (global) tensor for ``spec``; deterministic and identical on every rank.

    Floating data is NaN/inf free and exactly representable in its dtype.
    """
    import torch

    g = torch.Generator().manual_seed(_seed_of(spec.name))
    dt = torch_dtype(spec.dtype)
    shape = spec.shape
    if spec.kind == "transposed":
        a, b = shape[1], shape[0]
        base = torch.arange(a * b, dtype=torch.float64).reshape(a, b)
        return (base * 0.5 - 3).to(dt).T  # non-contiguous view
    if spec.kind == "offset_slice":
        rows, cols = shape
        big = torch.arange(10 * cols, dtype=torch.float64).reshape(10, cols)
        big = (big * 0.25 + 1).to(dt)
        view = big[2 : 2 + rows]
        assert view.storage_offset() == 2 * cols and tuple(view.shape) == tuple(shape)
        return view
    if dt.is_complex:
        re = torch.randn(shape, generator=g, dtype=torch.float64)
        im = torch.randn(shape, generator=g, dtype=torch.float64)
        return torch.complex(re, im).to(dt)
    if dt == torch.bool:
        return torch.randint(0, 2, shape, generator=g, dtype=torch.int64).to(torch.bool)
    if dt == torch.uint8:
        return torch.randint(0, 256, shape, generator=g, dtype=torch.int64).to(dt)
    if not dt.is_floating_point:
        info = torch.iinfo(dt)
        lo, hi = max(info.min, -(2**40)), min(info.max, 2**40)
        return torch.randint(lo, hi, shape, generator=g, dtype=torch.int64).to(dt)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3.0
    if spec.dtype.startswith("float8"):
        x = x.clamp(-50, 50)
    return x.to(dt)


def _placements(codes):
    from torch.distributed.tensor import Replicate, Shard

    out = []
    for c in codes:
        out.append(Replicate() if c == "R" else Shard(int(c[1:])))
    return out


def _set_nested(d: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
    d[parts[-1]] = value


def build_state_dict(variant: str, mesh1, mesh2) -> dict:
    """The nested state dict a rank saves for ``variant`` (tensors + non-tensor objects)."""
    import copy

    import torch
    from torch.distributed.tensor import distribute_tensor

    state: dict = {}
    for spec in tensors_for(variant):
        full = make_full(spec)
        if spec.kind == "dtensor1_localT":
            from torch.distributed.tensor import DTensor

            rank = mesh1.get_local_rank()
            local = torch.chunk(full, mesh1.size(), dim=0)[rank]
            local = local.T.contiguous().T  # same values, column-major strides, storage == numel
            assert not local.is_contiguous()
            value = DTensor.from_local(local, mesh1, _placements(spec.placements), run_check=False,
                                       shape=full.shape, stride=full.stride())
        elif spec.kind in ("dtensor1", "dtensor2"):
            mesh = mesh1 if spec.kind == "dtensor1" else mesh2
            # Every rank holds the same full tensor: take the local piece without communication
            # (gloo cannot scatter float8 / complex / bool).
            value = distribute_tensor(full.contiguous(), mesh, _placements(spec.placements), src_data_rank=None)
        else:
            value = full
        _set_nested(state, spec.name, value)
    for k, v in copy.deepcopy(OBJECTS_NESTED).items():
        state[k] = v
    return state


def _writer(variant: str, path: str):
    from torch.distributed.checkpoint import FileSystemWriter

    if variant == "plain":
        return FileSystemWriter(path)
    if variant == "zstd":
        from torch.distributed.checkpoint._extension import ZStandard

        return FileSystemWriter(path, _extensions=[ZStandard()])
    if variant == "safetensors":
        from torch.distributed.checkpoint.filesystem import SerializationFormat

        return FileSystemWriter(path, serialization_format=SerializationFormat.SAFETENSORS)
    if variant == "threads":
        return FileSystemWriter(path, thread_count=3)
    raise ValueError(variant)


def torch_reference_load(ckpt_dir: str, variant: str):
    """torch's own single-process dcp.load into preallocated full-size plain tensors."""
    import torch
    import torch.distributed.checkpoint as dcp

    specs = tensors_for(variant)
    state = {s.name: torch.zeros(s.shape, dtype=torch_dtype(s.dtype)) for s in specs}
    state["step"] = -1
    state["sched"] = {"lr": -1.0, "ms": None}
    dcp.load(state, checkpoint_id=ckpt_dir, no_dist=True)
    arrays = {s.name: (s.dtype, to_numpy(state[s.name])) for s in specs}
    objects = {"step": state["step"], "sched.lr": state["sched"]["lr"], "sched.ms": state["sched"]["ms"]}
    return arrays, objects


@contextlib.contextmanager
def gloo_group(rank: int, port: int, world: int = WORLD) -> Iterator[None]:
    """This spawned process as rank ``rank`` of a gloo process group on localhost (one torch thread)."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _worker(rank: int, out_dir: str, port: int) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh

    with gloo_group(rank, port):
        mesh1 = init_device_mesh("cpu", (WORLD,))
        mesh2 = init_device_mesh("cpu", (2, 2))
        for variant in VARIANTS:
            path = os.path.join(out_dir, variant)
            state = build_state_dict(variant, mesh1, mesh2)
            dcp.save(state, storage_writer=_writer(variant, path))
        dist.barrier()
        if rank == 0:
            # The writer's own full tensors (for every variant: one union store).
            save_store(os.path.join(out_dir, "ref"), {s.name: (s.dtype, to_numpy(make_full(s))) for s in TENSORS})
            with open(os.path.join(out_dir, "ref", "variants.json"), "w") as f:
                json.dump({v: [s.name for s in tensors_for(v)] for v in VARIANTS}, f, indent=1)
        elif rank <= len(TORCH_READABLE_VARIANTS):
            # torch's own reading, one variant per rank (in parallel).
            variant = TORCH_READABLE_VARIANTS[rank - 1]
            arrays, objects = torch_reference_load(os.path.join(out_dir, variant), variant)
            d = os.path.join(out_dir, "torch_ref", variant)
            save_store(d, arrays)
            with open(os.path.join(d, "objects.json"), "w") as f:
                json.dump(objects, f)
        dist.barrier()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_all(out_dir: str) -> None:
    import torch.multiprocessing as mp

    os.makedirs(out_dir, exist_ok=True)
    mp.spawn(_worker, args=(out_dir, free_port()), nprocs=WORLD, join=True)
    with open(os.path.join(out_dir, "DONE"), "w") as f:
        f.write("ok\n")


if __name__ == "__main__":
    write_all(sys.argv[1])
