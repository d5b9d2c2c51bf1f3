"""Restore benchmark: jreshard against torch DCP, Orbax and a plain file read.

What it measures
----------------
Case ``dcp``: a synthetic transformer-like model (``--size-gib``, default 1.5 GiB;
bf16 matrices, f32 norms, biases and LM head; see ``_model.py``) saved with
``torch.distributed.checkpoint`` (default ``FileSystemWriter``) by 4 ranks
(gloo, CPU), every tensor a DTensor ``Shard(0)`` over a 1-D mesh of 4, i.e. an
FSDP-style checkpoint. It is restored onto a (2, 4) ``('data', 'model')`` mesh of
8 CPU devices: matrices ``P('data', 'model')``, norms ``P('model')``, biases
``P()`` (replicated). Contenders:

  jreshard  ``jreshard.load(dir, targets)``, then ``jax.block_until_ready``.
  port      the same load ported to another layout through a mapping: every 2-D
            weight transposed (``saved(name).T``) and the per-layer tensors of each
            kind stacked into one ``[L, ...]`` array (``jreshard.stack([...])``), e.g.
            ``model.layers.mlp.up_proj.kernel`` = stack of ``layers.{i}.mlp.up_proj.weight.T``
            (``_model.port_tensors``). Shardings split the same logical dimensions as
            jreshard's: a transposed matrix ``P('model', 'data')``, stacked ones
            ``P(None, 'model', 'data')``, stacked norms ``P(None, 'model')``, biases
            ``P()``; the stacking dimension is not split. Its time is printed as a ratio
            to jreshard's ("port / jreshard", informational; the port issue asks <= 1.2x).
  torch     what users do today: ``dcp.load(..., no_dist=True)`` into preallocated
            full tensors, then numpy (bf16 through an int16 view) and
            ``jax.device_put`` onto each target sharding.
  orbax     the same arrays saved once with ``ocp.StandardCheckpointer``; timed:
            ``StandardCheckpointer().restore(dir, abstract tree)`` onto the same
            shardings.
  raw       ``readinto`` of every whole ``.distcp`` file into a preallocated buffer:
            the bytes jreshard has to read (one process holds all 8 devices, so it
            needs the whole checkpoint), with no parsing and no ``device_put``.

  Conversion contenders (DCP -> a native Orbax checkpoint, the tree a nested dict of
  the dotted names, every array unsharded on the first device, dtypes as saved; the
  destination is removed, untimed, before each run):
  convert   ``jreshard.convert(dir, dest, max_inflight_bytes=...)`` (default
            ``--convert-inflight-bytes`` 256 MiB): batches loaded, written with
            ``ocp.v1.partial.save`` and freed, then finalized and renamed onto dest.
  dcp_orbax what users do today: torch ``dcp.load(..., no_dist=True)`` of the whole
            model, then numpy, ``jax.device_put`` and ``ocp.StandardCheckpointer().save``.
  jr_orbax  ``jreshard.load`` of the whole model, then ``StandardCheckpointer().save``.
  The first run of each restores the converted checkpoint with plain Orbax
  (``StandardCheckpointer().restore``) onto the (2, 4) mesh shardings above and checks
  every array against the generator.

Case ``safetensors``: the same tensors in one ``.safetensors`` file, loaded by
jreshard (``jreshard.load(file, targets)``), by port (the same mapping), by Orbax v1
(``ocp.v1.load`` inside ``ocp.v1.Context(checkpoint_layout="safetensors")``) and by a
raw read of the file.

How
---
Every run of a contender is a fresh subprocess, so imports and JAX start-up stay
out of the timing and peak memory belongs to that contender alone. Each contender
runs ``--repeat`` times and the median wall time of the restore call is reported
(from the call until every array is ready; imports and building the abstract
targets are excluded). Before every run the checkpoint's files are read once,
untimed, so that every contender sees the same warm page cache; ``--cold`` drops
the page cache instead (``/proc/sys/vm/drop_caches``), when that is permitted.
Just before the timed call each run also faults in and frees some anonymous memory
(``--prefault-gib``): on a VM with free page reporting, the first touch of memory
that sat free for a few seconds is several times slower, which otherwise adds
seconds of noise to whichever run comes after an idle moment.

Memory is the process's ``RssAnon`` sampled every 2 ms during the restore (see
``_memwatch.py``): the absolute peak and the delta over the value just before the
restore started, max over the repeats. The loaded arrays themselves live in
anonymous memory on CPU devices, so a loader that holds nothing else has a delta
of about the model size. The first run of every JAX contender checks every loaded
array (dtype, shape, sharding and values) against the generator (for port: the
transposed and stacked arrays built with numpy from the generator).

Checkpoints are written once under ``--workdir/<model key>/`` and reused.

Targets (printed as PASS/FAIL, informational: the exit code is 0 unless
``--strict``, which exits 1 when a target fails or cannot be evaluated because a
contender errored; a contender's failure is shown in the table as "error: ...",
with the path of its log, and never stops the run):
  dcp:          jreshard <= 1.25x raw, <= 0.15x torch, <= 0.4x orbax time;
                jreshard peak anon delta <= model size + 0.35 GiB.
  safetensors:  jreshard <= 0.15x orbax and <= 1.25x raw time;
                jreshard peak anon delta <= orbax's.
  both:         jreshard's and port's arrays match the checkpoint (first run).
  conversion:   convert <= 0.5x dcp_orbax and <= 1.3x jr_orbax time; convert peak
                anon delta <= --convert-inflight-bytes + 0.3 GiB; each converted
                checkpoint restores to the right values (first run).

Usage::

    python benchmarks/restore.py                     # both cases, 1.5 GiB, 3 repeats
    python benchmarks/restore.py --size-gib 0.1 --repeat 1
    python benchmarks/restore.py --case dcp --skip orbax --json bench-out/restore.json
    python benchmarks/restore.py --case dcp --skip torch,orbax,raw   # jreshard and port only
    python benchmarks/restore.py --case dcp --skip jreshard,port,torch,orbax,raw   # conversions only
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

# The helpers next to this file, and the jreshard source tree this benchmark belongs to.
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

import numpy as np  # noqa: E402

from _memwatch import PeakAnonMemory, prefault  # noqa: E402
from _model import GIB, ModelSpec, build_model, port_tensors  # noqa: E402

CASES = {
    "dcp": ("jreshard", "port", "torch", "orbax", "raw", "convert", "dcp_orbax", "jr_orbax"),
    "safetensors": ("jreshard", "port", "orbax", "raw"),
}
PORT_RATIO_GOAL = 1.2  # the port issue: a ported load costs at most this much of the plain one
DESCRIPTIONS = {
    "dcp": "torch.distributed.checkpoint, 4 ranks x Shard(0) -> (2, 4) mesh of 8 CPU devices",
    "safetensors": "one .safetensors file -> (2, 4) mesh of 8 CPU devices",
}
DEVICE_COUNT = 8
MESH_SHAPE = (2, 4)
SAVE_RANKS = 4
CONVERTERS = ("convert", "dcp_orbax", "jr_orbax")
CONVERT_INFLIGHT = 256 * 2**20
CONVERT_MEMORY_SLACK_GIB = 0.3  # convert's peak anon delta goal: max_inflight_bytes + this


# --------------------------------------------------------------------------- files


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


def checkpoint_path(case: str, contender: str, paths: Paths) -> Path:
    """The file or directory a contender reads."""
    if case == "safetensors":
        return paths.safetensors
    return paths.orbax if contender == "orbax" else paths.dcp


def raw_files(case: str, paths: Paths) -> list[Path]:
    """The files the raw-read contender reads (the data files jreshard needs)."""
    if case == "safetensors":
        return [paths.safetensors]
    return sorted(paths.dcp.glob("*.distcp"))


def files_under(path: Path) -> list[Path]:
    return [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())


def read_whole_file(path: Path, size: int) -> np.ndarray:
    """Reads a file into a freshly allocated buffer with unbuffered ``readinto``."""
    buf = np.empty(size, np.uint8)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        done = 0
        while done < size:
            n = f.readinto(view[done:])
            if not n:
                raise EOFError(f"{path}: {done} of {size} bytes")
            done += n
    return buf


def warm_page_cache(path: Path) -> None:
    buf = bytearray(16 << 20)
    for file in files_under(path):
        with open(file, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def drop_page_cache() -> bool:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
        return True
    except OSError:
        return False


def prepare_page_cache(path: Path, cold: bool) -> str:
    """Puts the page cache in the state a run should start from; returns it."""
    if cold and drop_page_cache():
        return "cold"
    warm_page_cache(path)
    return "warm"


# ---------------------------------------------------------- JAX targets, verification


def make_targets(model: ModelSpec, specs=None) -> dict[str, Any]:
    """Abstract target arrays (``jax.ShapeDtypeStruct`` with a ``NamedSharding``) for
    ``specs`` (the model's tensors unless given; anything with name, shape, np_dtype, axes)."""
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    devices = jax.devices()
    if len(devices) != DEVICE_COUNT:
        raise RuntimeError(
            f"expected {DEVICE_COUNT} devices, got {len(devices)} "
            f"(XLA_FLAGS={os.environ.get('XLA_FLAGS')!r})"
        )
    mesh = Mesh(np.array(devices).reshape(MESH_SHAPE), ("data", "model"))
    return {
        t.name: jax.ShapeDtypeStruct(
            t.shape, t.np_dtype, sharding=NamedSharding(mesh, PartitionSpec(*t.axes))
        )
        for t in (model.tensors if specs is None else specs)
    }


def port_mapping(model: ModelSpec) -> dict[str, Any]:
    """The port contender's mapping: target name -> a view of the saved tensors."""
    import jreshard

    def one(t, transpose: bool):
        view = jreshard.saved(t.name)
        return view.T if transpose else view

    return {
        p.name: (jreshard.stack([one(t, p.transpose) for t in p.sources]) if p.stacked
                 else one(p.src, p.transpose))
        for p in port_tensors(model)
    }  # fmt: skip


def _bits(a: np.ndarray) -> np.ndarray:
    """The array's bits as unsigned integers of the same size (a view, strided or not)."""
    return a.view(f"u{a.dtype.itemsize}")


def verify_arrays(model: ModelSpec, out: Any, targets: dict[str, Any], specs=None) -> str:
    """"ok", or what is wrong with a contender's output; ``specs`` as for make_targets,
    each compared (bit for bit) with its ``expected()``."""
    import jax

    specs = model.tensors if specs is None else specs
    if not isinstance(out, dict):
        return f"FAIL: returned {type(out).__name__}, not a dict"
    problems = []
    for t in specs:
        arr = out.get(t.name)
        if not isinstance(arr, jax.Array):
            problems.append(f"{t.name}: {'missing' if arr is None else type(arr).__name__}")
        elif tuple(arr.shape) != t.shape or arr.dtype != t.np_dtype:
            problems.append(f"{t.name}: {arr.dtype}{list(arr.shape)}")
        elif not arr.sharding.is_equivalent_to(targets[t.name].sharding, len(t.shape)):
            problems.append(f"{t.name}: sharding {arr.sharding}")
        elif not np.array_equal(_bits(np.asarray(arr)), _bits(t.expected())):
            problems.append(f"{t.name}: values differ")
    extra = sorted(set(out) - {t.name for t in specs})
    if extra:
        problems.append(f"unexpected keys {extra[:3]}")
    if not problems:
        return "ok"
    return f"FAIL ({len(problems)}): " + "; ".join(problems[:3])


# -------------------------------------------------------------------- contenders
# Each prepare_* function does the untimed set-up (imports, targets) and returns
# (restore, targets): restore() performs the timed load and returns when done.

Restore = Callable[[], Any]


def prepare_jreshard(case: str, model: ModelSpec, paths: Paths, args) -> tuple[Restore, Any]:
    import jax
    import jreshard

    targets = make_targets(model)
    path = str(checkpoint_path(case, "jreshard", paths))
    kwargs: dict[str, Any] = {"io": args.jreshard_io}
    if args.max_inflight_bytes is not None:
        kwargs["max_inflight_bytes"] = args.max_inflight_bytes

    def restore():
        return jax.block_until_ready(jreshard.load(path, targets, **kwargs))

    return restore, targets


def prepare_port(case: str, model: ModelSpec, paths: Paths, args) -> tuple[Restore, Any]:
    import jax
    import jreshard

    targets = make_targets(model, port_tensors(model))
    mapping = port_mapping(model)
    path = str(checkpoint_path(case, "jreshard", paths))
    kwargs: dict[str, Any] = {"io": args.jreshard_io, "mapping": mapping}
    if args.max_inflight_bytes is not None:
        kwargs["max_inflight_bytes"] = args.max_inflight_bytes

    def restore():
        return jax.block_until_ready(jreshard.load(path, targets, **kwargs))

    return restore, targets


def _torch_to_numpy(tensor) -> np.ndarray:
    import ml_dtypes
    import torch

    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def prepare_torch(case: str, model: ModelSpec, paths: Paths, args) -> tuple[Restore, Any]:
    import jax
    import torch
    import torch.distributed.checkpoint as dcp

    targets = make_targets(model)
    dtypes = {"bf16": torch.bfloat16, "f32": torch.float32}
    path = str(paths.dcp)

    def restore():
        state = {t.name: torch.empty(t.shape, dtype=dtypes[t.dtype]) for t in model.tensors}
        dcp.load(state, checkpoint_id=path, no_dist=True)
        out = {
            name: jax.device_put(_torch_to_numpy(tensor), targets[name].sharding)
            for name, tensor in state.items()
        }
        return jax.block_until_ready(out)

    return restore, targets


def prepare_orbax(case: str, model: ModelSpec, paths: Paths, args) -> tuple[Restore, Any]:
    import jax
    import orbax.checkpoint as ocp

    targets = make_targets(model)
    path = checkpoint_path(case, "orbax", paths)

    def restore_standard():
        with ocp.StandardCheckpointer() as checkpointer:
            return jax.block_until_ready(checkpointer.restore(path, targets))

    def restore_v1_safetensors():
        with ocp.v1.Context(checkpoint_layout="safetensors"):
            return jax.block_until_ready(ocp.v1.load(path, targets))

    return (restore_standard if case == "dcp" else restore_v1_safetensors), targets


def _converted_dest(name: str, paths: Paths) -> Path:
    dest = paths.root / f"converted-{name}"
    shutil.rmtree(dest, ignore_errors=True)  # untimed
    for stale in paths.root.glob(f".converted-{name}*"):  # a killed run's work directory
        shutil.rmtree(stale, ignore_errors=True)
    return dest


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in flat.items():
        d = out
        *head, last = name.split(".")
        for k in head:
            d = d.setdefault(k, {})
        d[last] = value
    return out


def _orbax_save(dest: Path, nested: dict[str, Any]) -> None:
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(dest, nested)
        checkpointer.wait_until_finished()


def prepare_convert(case: str, model: ModelSpec, paths: Paths, args) -> tuple[Restore, Any]:
    from jreshard import convert

    dest = _converted_dest("convert", paths)

    def restore():
        convert(str(paths.dcp), dest, max_inflight_bytes=args.convert_inflight_bytes, io=args.jreshard_io)
        return dest

    return restore, None


def prepare_dcp_orbax(case: str, model: ModelSpec, paths: Paths, args) -> tuple[Restore, Any]:
    import jax
    import torch
    import torch.distributed.checkpoint as dcp

    dtypes = {"bf16": torch.bfloat16, "f32": torch.float32}
    dest = _converted_dest("dcp_orbax", paths)
    device = jax.devices()[0]

    def restore():
        state = {t.name: torch.empty(t.shape, dtype=dtypes[t.dtype]) for t in model.tensors}
        dcp.load(state, checkpoint_id=str(paths.dcp), no_dist=True)
        arrays = {name: jax.device_put(_torch_to_numpy(tensor), device) for name, tensor in state.items()}
        del state
        _orbax_save(dest, _nest(arrays))
        return dest

    return restore, None


def prepare_jr_orbax(case: str, model: ModelSpec, paths: Paths, args) -> tuple[Restore, Any]:
    import jax
    from jax.sharding import SingleDeviceSharding

    import jreshard

    one = SingleDeviceSharding(jax.devices()[0])
    targets = {t.name: jax.ShapeDtypeStruct(t.shape, t.np_dtype, sharding=one) for t in model.tensors}
    dest = _converted_dest("jr_orbax", paths)
    kwargs: dict[str, Any] = {"io": args.jreshard_io}
    if args.max_inflight_bytes is not None:
        kwargs["max_inflight_bytes"] = args.max_inflight_bytes

    def restore():
        _orbax_save(dest, _nest(jreshard.load(str(paths.dcp), targets, **kwargs)))
        return dest

    return restore, None


def verify_converted(model: ModelSpec, dest: Path) -> str:
    """Restores a converted checkpoint with plain Orbax onto the benchmark's (2, 4) mesh shardings and
    checks every array ("ok" or what is wrong)."""
    import jax
    import orbax.checkpoint as ocp

    targets = make_targets(model)
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            restored = checkpointer.restore(dest, _nest(targets))
    except Exception as e:  # noqa: BLE001 - reported as the check's result
        return f"FAIL: Orbax restore: {type(e).__name__}: {str(e)[:200]}"
    flat = {".".join(str(k.key) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(restored)[0]}
    return verify_arrays(model, flat, targets)


def prepare_raw(case: str, model: ModelSpec, paths: Paths, args) -> tuple[Restore, Any]:
    files = [(f, f.stat().st_size) for f in raw_files(case, paths)]
    if not files:
        raise FileNotFoundError(f"no data files for case {case}")

    def restore():
        return [read_whole_file(f, size) for f, size in files]

    return restore, None


PREPARE = {
    "jreshard": prepare_jreshard,
    "port": prepare_port,
    "torch": prepare_torch,
    "orbax": prepare_orbax,
    "raw": prepare_raw,
    "convert": prepare_convert,
    "dcp_orbax": prepare_dcp_orbax,
    "jr_orbax": prepare_jr_orbax,
}


def jreshard_plan(case: str, paths: Paths, targets: dict[str, Any], mapping=None) -> dict[str, Any]:
    import jreshard

    try:
        plan = jreshard.plan(str(checkpoint_path(case, "jreshard", paths)), targets, mapping=mapping)
        return {k: getattr(plan, k) for k in ("bytes_needed", "bytes_to_read", "num_reads")}
    except Exception as e:  # informational only
        return {"error": f"{type(e).__name__}: {e}"}


def worker_main(args, model: ModelSpec, paths: Paths) -> int:
    """One timed run of one contender; writes a JSON result to ``args._result``."""
    case, name = args._worker.split(":")
    result: dict[str, Any] = {}
    try:
        restore, targets = PREPARE[name](case, model, paths, args)
        gc.collect()
        if args.prefault_gib:
            result["prefaulted"] = prefault(int(args.prefault_gib * GIB))
        with PeakAnonMemory() as mem:
            start = time.perf_counter()
            out = restore()
            seconds = time.perf_counter() - start
        result.update(
            seconds=seconds,
            peak_anon=mem.peak,
            baseline_anon=mem.baseline,
            delta_anon=mem.delta,
            hwm_delta=mem.hwm_delta,
            samples=mem.samples,
        )
        if isinstance(out, list):  # raw read
            result["bytes_read"] = sum(buf.nbytes for buf in out)
        elif name in CONVERTERS:
            result["converted_bytes"] = sum(f.stat().st_size for f in files_under(Path(out)))
            if args._verify:
                result["verify"] = verify_converted(model, Path(out))
        elif args._verify:
            if name == "port":
                result["verify"] = verify_arrays(model, out, targets, port_tensors(model))
                result["plan"] = jreshard_plan(case, paths, targets, port_mapping(model))
            else:
                result["verify"] = verify_arrays(model, out, targets)
            if name == "jreshard":
                result["plan"] = jreshard_plan(case, paths, targets)
    except BaseException as e:  # reported in the table, never fatal for the run
        traceback.print_exc()
        message = str(e).strip().splitlines()[0] if str(e).strip() else ""
        result["error"] = f"{type(e).__name__}: {message}"[:300]
    Path(args._result).write_text(json.dumps(result))
    return 0


# ------------------------------------------------------------------ checkpoints


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
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
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

    mp.spawn(
        _save_dcp_rank,
        args=(SAVE_RANKS, _free_port(), model, str(paths.dcp)),
        nprocs=SAVE_RANKS,
        join=True,
    )


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


def setup_main(args, model: ModelSpec, paths: Paths) -> int:
    WRITERS[args._setup](model, paths)
    return 0


def ensure_checkpoint(what: str, args, model: ModelSpec, paths: Paths) -> str | None:
    """Writes a cached checkpoint unless present; returns an error message or None."""
    artifact, marker = paths.artifact(what), paths.done_marker(what)
    if marker.exists() and artifact.exists():
        print(f"  {what}: cached at {artifact}")
        return None
    if artifact.is_dir():
        shutil.rmtree(artifact)
    elif artifact.exists():
        artifact.unlink()
    marker.unlink(missing_ok=True)
    paths.logs.mkdir(parents=True, exist_ok=True)
    log = paths.logs / f"setup-{what}.log"
    print(f"  {what}: writing {artifact} ...", end=" ", flush=True)
    start = time.perf_counter()
    code, tail = run_child(["--_setup", what], args, log, timeout=args.timeout)
    if code != 0 or not artifact.exists():
        print("FAILED")
        return f"writing the {what} checkpoint failed (exit {code}, log {log}): {tail}"
    marker.touch()
    print(f"done in {time.perf_counter() - start:.1f} s")
    return None


# ------------------------------------------------------------------- orchestration


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    flag = f"--xla_force_host_platform_device_count={DEVICE_COUNT}"
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join([*flags, flag])
    env.setdefault("JAX_PLATFORMS", "cpu")
    return env


def _log_tail(log: Path) -> str:
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines()]
    except OSError:
        return ""
    lines = [line for line in lines if line]
    return lines[-1][:200] if lines else ""


def run_child(extra: list[str], args, log: Path, timeout: float) -> tuple[int, str]:
    """Runs this script in a fresh interpreter; returns (exit code, last log line)."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--size-gib", repr(args.size_gib),
        "--workdir", str(args.workdir),
        "--writer", args.writer,
        "--jreshard-io", args.jreshard_io,
        "--prefault-gib", repr(args.prefault_gib),
        *(["--max-inflight-bytes", str(args.max_inflight_bytes)] if args.max_inflight_bytes else []),
        "--convert-inflight-bytes", str(args.convert_inflight_bytes),
        *extra,
    ]  # fmt: skip
    with open(log, "w") as out:
        try:
            proc = subprocess.run(
                cmd, env=child_env(), stdout=out, stderr=subprocess.STDOUT, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            return -1, f"timed out after {timeout:.0f} s"
    return proc.returncode, _log_tail(log)


def run_contender(case: str, name: str, rep: int, args, paths: Paths) -> dict[str, Any]:
    """One run of one contender in a fresh subprocess."""
    paths.logs.mkdir(parents=True, exist_ok=True)
    log = paths.logs / f"{case}-{name}-{rep}.log"
    fd, result_file = tempfile.mkstemp(prefix="jreshard-bench-", suffix=".json")
    os.close(fd)
    try:
        extra = ["--_worker", f"{case}:{name}", "--_result", result_file]
        if rep == 0 and args.verify:
            extra.append("--_verify")
        code, tail = run_child(extra, args, log, timeout=args.timeout)
        text = Path(result_file).read_text()
        result = json.loads(text) if text else {}
    finally:
        os.unlink(result_file)
    if not result:
        result = {"error": f"worker died (exit {code}): {tail}"}
    if "error" in result:
        result["log"] = str(log)
    return result


def summarize(runs: list[dict[str, Any]], model_bytes: int) -> dict[str, Any]:
    errors = [r for r in runs if "error" in r]
    if errors:
        return {"error": errors[0]["error"], "log": errors[0].get("log"), "runs": runs}
    median = statistics.median(r["seconds"] for r in runs)
    hwm = [r["hwm_delta"] for r in runs if r.get("hwm_delta") is not None]
    summary = {
        "median_s": median,
        "gib_per_s": model_bytes / GIB / median,
        "peak_anon_gib": max(r["peak_anon"] for r in runs) / GIB,
        "delta_anon_gib": max(r["delta_anon"] for r in runs) / GIB,
        "hwm_delta_gib": max(hwm) / GIB if hwm else None,
        "verify": next((r["verify"] for r in runs if "verify" in r), "-"),
        "runs": runs,
    }
    for r in runs:
        if "plan" in r:
            summary["plan"] = r["plan"]
        if "bytes_read" in r:
            summary["bytes_read"] = r["bytes_read"]
    return summary


def evaluate_targets(case: str, res: dict[str, Any], model_bytes: int) -> list[dict[str, Any]]:
    """The case's targets, each with name, unit, limit, value and result.

    result is PASS or FAIL; "skipped" when a contender it needs was skipped, and
    "n/a (error)" when one of them failed.
    """

    def target(name: str, needs: list[str], unit: str, limit: float | None,
               value: Callable[[], float]) -> dict[str, Any]:  # fmt: skip
        row = {"name": name, "unit": unit, "limit": limit, "value": None}
        results = [res.get(n) for n in needs]
        if any(r is None for r in results):
            return {**row, "result": "skipped"}
        if any("error" in r for r in results):
            return {**row, "result": "n/a (error)"}
        row["value"] = value()
        return {**row, "result": "PASS" if row["value"] <= limit else "FAIL"}

    def time_ratio(other: str, limit: float) -> dict[str, Any]:
        return target(f"jreshard/{other} time", ["jreshard", other], "x", limit,
                      lambda: res["jreshard"]["median_s"] / res[other]["median_s"])  # fmt: skip

    def jreshard_delta() -> float:
        return res["jreshard"]["delta_anon_gib"]

    if case == "dcp":
        rows = [
            time_ratio("raw", 1.25),
            time_ratio("torch", 0.15),
            time_ratio("orbax", 0.4),
            target("jreshard peak anon delta", ["jreshard"], "GiB",
                   model_bytes / GIB + 0.35, jreshard_delta),  # fmt: skip
        ]
    else:
        rows = [
            time_ratio("orbax", 0.15),
            time_ratio("raw", 1.25),
            target("jreshard peak anon delta vs orbax", ["jreshard", "orbax"], "GiB",
                   res.get("orbax", {}).get("delta_anon_gib"), jreshard_delta),  # fmt: skip
        ]

    def arrays_match(name: str) -> dict[str, Any]:
        check = {"name": f"{name} arrays match the checkpoint", "unit": "", "limit": None,
                 "value": None}  # fmt: skip
        r = res.get(name)
        if r is None:
            check["result"] = "skipped"
        elif "error" in r:
            check["result"] = "n/a (error)"
        elif r["verify"] == "-":
            check["result"] = "not checked"
        else:
            check["result"] = "PASS" if r["verify"] == "ok" else "FAIL"
        return check

    checks = [arrays_match("jreshard"), arrays_match("port")]
    if case == "dcp" and any(n in res for n in CONVERTERS):

        def convert_ratio(other: str, limit: float) -> dict[str, Any]:
            return target(f"convert/{other} time", ["convert", other], "x", limit,
                          lambda: res["convert"]["median_s"] / res[other]["median_s"])

        inflight = res.get("convert", {}).get("convert_inflight_bytes", CONVERT_INFLIGHT)
        rows += [
            convert_ratio("dcp_orbax", 0.5),
            convert_ratio("jr_orbax", 1.3),
            target("convert peak anon delta", ["convert"], "GiB", inflight / GIB + CONVERT_MEMORY_SLACK_GIB,
                   lambda: res["convert"]["delta_anon_gib"]),
        ]
        checks += [arrays_match(n) for n in CONVERTERS]
        for check in checks[-len(CONVERTERS):]:
            check["name"] = check["name"].replace("arrays match the checkpoint", "checkpoint restores right")
    return rows + checks


def port_ratio(res: dict[str, Any]) -> float | None:
    """port's median time over jreshard's, when both ran."""
    port, jr = res.get("port", {}), res.get("jreshard", {})
    if "median_s" not in port or "median_s" not in jr:
        return None
    return port["median_s"] / jr["median_s"]


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def print_case(res: dict[str, Any], targets: list[dict[str, Any]]) -> None:
    raw = res.get("raw", {}).get("median_s")
    jr = res.get("jreshard", {}).get("median_s")

    def ratio(num: float | None, den: float | None) -> str:
        return "-" if num is None or den is None else f"{num / den:.2f}"

    header = (
        f"{'contender':<10} {'median s':>9} {'GiB/s':>7} {'x raw':>7} {'jreshard/x':>10} "
        f"{'peak anon GiB':>13} {'delta GiB':>9}  check"
    )
    print(header)
    print("-" * len(header))
    for name, r in res.items():
        if "error" in r:
            print(f"{name:<10} error: {r['error']}")
            continue
        s = r["median_s"]
        print(
            f"{name:<10} {s:>9.3f} {r['gib_per_s']:>7.2f} {ratio(s, raw):>7} "
            f"{ratio(jr, s):>10} {r['peak_anon_gib']:>13.3f} {r['delta_anon_gib']:>9.3f}  "
            f"{r['verify']}"
        )
    for name in ("jreshard", "port"):
        plan = res.get(name, {}).get("plan")
        if plan and "error" not in plan:
            print(
                f"{name} plan: {plan['bytes_needed'] / GIB:.3f} GiB needed, "
                f"{plan['bytes_to_read'] / GIB:.3f} GiB to read, {plan['num_reads']} reads"
            )
        elif plan:
            print(f"{name} plan: {plan['error']}")
    for name, r in res.items():
        if r.get("log"):
            print(f"  ({name} log: {r['log']})")
    print()
    print(f"{'target':<42} {'value':>8} {'limit':>8}  result")
    for t in targets:
        label = t["name"] + (" (GiB)" if t["unit"] == "GiB" else "")
        limit = "-" if t["limit"] is None else f"<= {t['limit']:.2f}"
        print(f"{label:<42} {_fmt(t['value'], '.3f'):>8} {limit:>8}  {t['result']}")
    conv = res.get("convert", {})
    if "median_s" in conv:
        for other in ("dcp_orbax", "jr_orbax"):
            if "median_s" in res.get(other, {}):
                print(f"convert / {other} = {conv['median_s'] / res[other]['median_s']:.2f}x  (convert "
                      f"{conv['median_s']:.3f} s, {other} {res[other]['median_s']:.3f} s)")
        print(f"convert peak anon {conv['peak_anon_gib']:.3f} GiB (delta {conv['delta_anon_gib']:.3f} GiB) with "
              f"max_inflight_bytes = {conv['convert_inflight_bytes'] / 2**20:.0f} MiB")
    ratio_pj = port_ratio(res)
    if ratio_pj is not None:
        print(
            f"\nport / jreshard = {ratio_pj:.2f}x  (port {res['port']['median_s']:.3f} s, "
            f"jreshard {res['jreshard']['median_s']:.3f} s; the port issue asks "
            f"<= {PORT_RATIO_GOAL:.1f}x, informational)"
        )


def _print_run(name: str, rep: int, repeat: int, run: dict[str, Any]) -> None:
    if "error" in run:
        print(f"  {name} run {rep + 1}: error: {run['error']}")
        return
    hwm = "?" if run.get("hwm_delta") is None else f"{run['hwm_delta'] / GIB:.3f}"
    check = f", check {run['verify']}" if "verify" in run else ""
    print(
        f"  {name} run {rep + 1}/{repeat}: {run['seconds']:.3f} s, "
        f"peak anon {run['peak_anon'] / GIB:.3f} GiB "
        f"(+{run['delta_anon'] / GIB:.3f}; RSS high-water +{hwm}){check}"
    )


def run_case(case: str, contenders: list[str], setup_errors: dict[str, str | None],
             args, model: ModelSpec, paths: Paths) -> dict[str, Any]:  # fmt: skip
    """Runs, prints and evaluates one case; returns its part of the JSON report."""
    print(f"\n== case {case}: {DESCRIPTIONS[case]} ==")
    data_files = raw_files(case, paths)
    if data_files:
        on_disk = sum(f.stat().st_size for f in data_files)
        print(f"data files: {len(data_files)}, {on_disk / GIB:.3f} GiB on disk")
    res: dict[str, Any] = {}
    cache_states = set()
    for name in contenders:
        needs = "orbax" if (case, name) == ("dcp", "orbax") else case
        if setup_errors.get(needs):
            res[name] = {"error": setup_errors[needs]}
            continue
        runs = []
        for rep in range(args.repeat):
            cache_states.add(prepare_page_cache(checkpoint_path(case, name, paths), args.cold))
            runs.append(run_contender(case, name, rep, args, paths))
            _print_run(name, rep, args.repeat, runs[-1])
            if "error" in runs[-1]:
                break
        res[name] = summarize(runs, model.nbytes)
        if name == "convert":
            res[name]["convert_inflight_bytes"] = args.convert_inflight_bytes

    cache = "/".join(sorted(cache_states)) or "-"
    how = (
        "dropped before each run"
        if cache == "cold"
        else "timings are warm-cache: the files were read once, untimed, before each run"
    )
    print(f"\nmedian of {args.repeat} run(s); page cache: {cache} ({how}); "
          f"GiB/s = model size ({model.nbytes / GIB:.3f} GiB) / time")  # fmt: skip
    targets = evaluate_targets(case, res, model.nbytes)
    print_case(res, targets)
    return {"page_cache": cache, "contenders": res, "targets": targets,
            "port_over_jreshard": port_ratio(res)}  # fmt: skip


def benchmark_main(args, model: ModelSpec, paths: Paths) -> int:
    cases = list(CASES) if args.case == "all" else [args.case]
    skip = {s for item in args.skip for s in item.split(",") if s}
    if unknown := skip - set(PREPARE):
        raise SystemExit(f"unknown contender(s) in --skip: {sorted(unknown)}; known: {sorted(PREPARE)}")

    load = os.getloadavg()[0]
    busy = " -- the machine is busy, timings will be noisy" if load > 0.5 * (os.cpu_count() or 1) else ""
    print(f"jreshard restore benchmark: model {model.describe()}")
    print(f"workdir {paths.root}; {args.repeat} run(s) per contender, each in a fresh process; "
          f"{args.prefault_gib:.2f} GiB pre-faulted before each restore")  # fmt: skip
    print(f"load average {load:.2f} on {os.cpu_count()} cores{busy}")

    print("checkpoints:")
    paths.root.mkdir(parents=True, exist_ok=True)
    needed = []
    if "dcp" in cases:
        needed += ["dcp"] + ([] if "orbax" in skip else ["orbax"])
    if "safetensors" in cases:
        needed.append("safetensors")
    setup_errors = {what: ensure_checkpoint(what, args, model, paths) for what in needed}

    report: dict[str, Any] = {
        "model": {"key": model.key, "bytes": model.nbytes, "gib": model.nbytes / GIB,
                  "tensors": len(model.tensors), "description": model.describe()},
        "repeat": args.repeat,
        "prefault_gib": args.prefault_gib,
        "load_average": load,
        "cases": {},
    }  # fmt: skip
    for case in cases:
        contenders = [n for n in CASES[case] if n not in skip]
        report["cases"][case] = run_case(case, contenders, setup_errors, args, model, paths)

    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
        print(f"\nresults written to {out}")
    failed = any(
        t["result"] in ("FAIL", "n/a (error)")
        for case in report["cases"].values()
        for t in case["targets"]
    )
    return 1 if (failed and args.strict) else 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark jreshard restores against torch DCP, Orbax and a raw read."
    )
    p.add_argument("--size-gib", type=float, default=1.5,
                   help="approximate model size (default 1.5)")
    p.add_argument("--case", choices=["dcp", "safetensors", "all"], default="all",
                   help="which checkpoint format to benchmark (default all)")
    p.add_argument("--skip", action="append", default=[],
                   help="contender(s) to leave out: jreshard, port, torch, orbax, raw "
                   "(repeatable or comma-separated)")
    p.add_argument("--repeat", type=int, default=3,
                   help="runs per contender; the median is reported (default 3)")
    p.add_argument("--writer", choices=["torch", "jreshard"], default="torch",
                   help="who writes the DCP checkpoint: torch on 4 gloo ranks (default), or jreshard.save_dcp "
                        "(no torch; the same Shard(0) chunks)")
    p.add_argument("--workdir", default="/tmp/jreshard-bench",
                   help="cache for the written checkpoints (default /tmp/jreshard-bench)")
    p.add_argument("--cold", action="store_true",
                   help="drop the page cache before each run (if permitted) instead of warming it")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target is not met")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip checking the loaded arrays after the first run")
    p.add_argument("--prefault-gib", type=float, default=None,
                   help="anonymous memory each run faults in and frees just before the restore, "
                   "so that no contender pays a VM's slow first touch (0 = off; "
                   "default 2.5 x model size + 0.5)")
    p.add_argument("--timeout", type=float, default=1800,
                   help="seconds allowed per subprocess (default 1800)")
    p.add_argument("--jreshard-io", default="auto",
                   help="the io= argument of jreshard.load (default auto)")
    p.add_argument("--max-inflight-bytes", type=int, default=None,
                   help="the max_inflight_bytes= argument of jreshard.load")
    p.add_argument("--convert-inflight-bytes", type=int, default=CONVERT_INFLIGHT,
                   help="the max_inflight_bytes= of the convert contender (default 256 MiB)")
    # Internal: the subprocess modes.
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    p.add_argument("--_result", help=argparse.SUPPRESS)
    p.add_argument("--_verify", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_setup", choices=sorted(WRITERS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    args.workdir = str(Path(args.workdir).resolve())
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model = build_model(args.size_gib)
    if args.prefault_gib is None:
        args.prefault_gib = 2.5 * model.nbytes / GIB + 0.5
    if args.writer == "jreshard":  # run_child's environment passes the choice on to the writer
        os.environ["JRESHARD_BENCH_WRITER"] = "jreshard"
    paths = Paths(Path(args.workdir) / (model.key + ("-torch-free" if args.writer == "jreshard" else "")))
    if args._setup:
        return setup_main(args, model, paths)
    if args._worker:
        return worker_main(args, model, paths)
    return benchmark_main(args, model, paths)


if __name__ == "__main__":
    sys.exit(main())
