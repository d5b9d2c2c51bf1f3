"""The restore benchmark's contenders: what each one does, timed, and how its output is checked.

Each ``prepare_*`` function does the untimed set-up (imports, targets) and returns ``(restore, targets)``:
``restore()`` performs the timed load and returns when every array is ready. ``restore.py`` runs one of
them per fresh process (see its docstring for what each contender is).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from _checkpoints import Paths
from _model import ModelSpec, make_targets, port_tensors
from _rawread import read_files

CONVERTERS = ("convert", "dcp_orbax", "jr_orbax")
RAW_PREFIX = "raw-t"  # raw-t<threads>


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
    """What users do today: torch reads the checkpoint into full tensors, then numpy and ``device_put``."""
    import jax
    import torch

    targets = make_targets(model)

    def put(state: dict[str, Any]) -> dict[str, Any]:
        out = {name: jax.device_put(_torch_to_numpy(tensor), targets[name].sharding)
               for name, tensor in state.items()}  # fmt: skip
        return jax.block_until_ready(out)

    if case == "safetensors":
        import safetensors.torch

        path = str(paths.safetensors)

        def restore_safetensors():
            return put(safetensors.torch.load_file(path))

        return restore_safetensors, targets

    import torch.distributed.checkpoint as dcp

    dtypes = {"bf16": torch.bfloat16, "f32": torch.float32}
    path = str(paths.dcp)

    def restore():
        state = {t.name: torch.empty(t.shape, dtype=dtypes[t.dtype]) for t in model.tensors}
        dcp.load(state, checkpoint_id=path, no_dist=True)
        return put(state)

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


def prepare_raw(case: str, model: ModelSpec, paths: Paths, args, threads: int) -> tuple[Restore, Any]:
    files = raw_files(case, paths)
    if not files:
        raise FileNotFoundError(f"no data files for case {case}")
    block = args.raw_block_mib << 20

    def restore():
        return read_files(files, threads, block)

    return restore, None


def prepare_layout(case: str, model: ModelSpec, paths: Paths, args) -> tuple[Restore, Any]:
    """The layout floor (``_layoutread.py``): the scatter lists of jreshard's target layout built untimed, then
    only the reads, on as many threads as jreshard reads with."""
    from _layoutread import LayoutRead

    from jreshard.read import read_threads

    targets = make_targets(model)
    return LayoutRead(checkpoint_path(case, "jreshard", paths), targets, read_threads()), targets


def verify_pieces(model: ModelSpec, out: Any, targets: dict[str, Any]) -> str:
    """"ok", or what is wrong with the layout floor's output: every target's pieces, one per device, each
    compared (bit for bit) with its slice of ``expected()``."""
    problems = []
    for t in model.tensors:
        pieces = out.get(t.name, [])
        if {d for d, _, _ in pieces} != set(targets[t.name].sharding.device_set):
            problems.append(f"{t.name}: pieces for {len(pieces)} devices")
            continue
        expected = t.expected()
        if any(not np.array_equal(_bits(p), _bits(expected[index])) for _, index, p in pieces):
            problems.append(f"{t.name}: values differ")
    if not problems:
        return "ok"
    return f"FAIL ({len(problems)}): " + "; ".join(problems[:3])


PREPARE = {
    "jreshard": prepare_jreshard,
    "layout": prepare_layout,
    "port": prepare_port,
    "torch": prepare_torch,
    "orbax": prepare_orbax,
    "convert": prepare_convert,
    "dcp_orbax": prepare_dcp_orbax,
    "jr_orbax": prepare_jr_orbax,
}


def raw_threads(name: str) -> int | None:
    """The thread count of a raw contender's name (``raw-t4`` -> 4), else None."""
    if name.startswith(RAW_PREFIX) and name[len(RAW_PREFIX):].isdigit():
        return int(name[len(RAW_PREFIX):])
    return None


def prepare(case: str, name: str, model: ModelSpec, paths: Paths, args) -> tuple[Restore, Any]:
    """The set-up of contender ``name`` (a key of PREPARE or ``raw-t<threads>``)."""
    threads = raw_threads(name)
    if threads is not None:
        return prepare_raw(case, model, paths, args, threads)
    return PREPARE[name](case, model, paths, args)


def jreshard_plan(case: str, paths: Paths, targets: dict[str, Any], mapping=None) -> dict[str, Any]:
    import jreshard

    try:
        plan = jreshard.plan(str(checkpoint_path(case, "jreshard", paths)), targets, mapping=mapping)
        return {k: getattr(plan, k) for k in ("bytes_needed", "bytes_to_read", "num_reads")}
    except Exception as e:  # noqa: BLE001 -- informational only
        return {"error": f"{type(e).__name__}: {e}"}


