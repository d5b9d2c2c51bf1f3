"""Small helpers shared by the test modules (no jreshard logic here: expected values come from torch)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from jax.sharding import PartitionSpec as P

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent


def child_env(**extra) -> dict:
    """Environment for subprocesses: repo importable, no inherited JAX device flags."""
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env.pop("JAX_ENABLE_X64", None)
    env.pop("JAX_PLATFORMS", None)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    env.update({k: str(v) for k, v in extra.items()})
    return env


def assert_same(actual, expected, what: str = "") -> None:
    """Exact equality: same dtype, same shape, same bytes (bitwise for floats)."""
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    if np.ascontiguousarray(actual).tobytes() != np.ascontiguousarray(expected).tobytes():
        np.testing.assert_array_equal(actual, expected, err_msg=what)
        raise AssertionError(f"{what}: values equal but bytes differ (e.g. -0.0 vs 0.0)")


# ---------------------------------------------------------------------------------------------
# meshes and partition specs
# ---------------------------------------------------------------------------------------------

MESH_SHAPES = {
    "2x4": ((2, 4), ("data", "model")),
    "8": ((8,), ("data",)),
    "4x2": ((4, 2), ("data", "model")),
}


def make_mesh(key: str):
    import jax
    from jax.sharding import Mesh

    shape, names = MESH_SHAPES[key]
    return Mesh(np.array(jax.devices()[: math.prod(shape)]).reshape(shape), names)


def spec_fits(spec, shape, mesh_shape: dict) -> bool:
    """Whether PartitionSpec ``spec`` is valid for ``shape`` on a mesh and tiles it evenly."""
    if len(spec) > len(shape):
        return False
    for dim, axes in enumerate(spec):
        if axes is None:
            continue
        axes = axes if isinstance(axes, tuple) else (axes,)
        if any(a not in mesh_shape for a in axes):
            return False
        n = math.prod(mesh_shape[a] for a in axes)
        if shape[dim] % n:
            return False
    return True


def distinct_indices(sharding, shape, addressable_only: bool = True) -> list:
    """Distinct index boxes (tuples of slices) of the devices of this process."""
    m = sharding.addressable_devices_indices_map(shape) if addressable_only else sharding.devices_indices_map(shape)
    seen, out = set(), []
    for idx in m.values():
        key = tuple((s.start, s.stop, s.step) for s in idx)
        if key not in seen:
            seen.add(key)
            out.append(idx)
    return out


def box_nbytes(index, shape, itemsize: int) -> int:
    n = 1
    for s, d in zip(index, shape):
        start, stop, step = s.indices(d)
        n *= len(range(start, stop, step))
    return n * itemsize


def nest(flat: dict) -> dict:
    """{"a.b.c": x} -> {"a": {"b": {"c": x}}}."""
    out: dict = {}
    for k, v in flat.items():
        d = out
        parts = k.split(".")
        for p in parts[:-1]:
            d = d.setdefault(p, {})
        d[parts[-1]] = v
    return out


def flatten(nested: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in nested.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def check_loaded_array(arr, target, ref: np.ndarray, what: str) -> None:
    """A loaded jax.Array against its target (ShapeDtypeStruct or jax.Array) and reference."""
    import jax

    assert isinstance(arr, jax.Array), f"{what}: got {type(arr)}"
    assert tuple(arr.shape) == tuple(target.shape), f"{what}: shape {arr.shape} != {target.shape}"
    assert np.dtype(arr.dtype) == np.dtype(target.dtype), f"{what}: dtype {arr.dtype} != {target.dtype}"
    assert arr.sharding == target.sharding, f"{what}: sharding {arr.sharding} != {target.sharding}"
    expected = ref.astype(np.dtype(target.dtype)) if ref.dtype != np.dtype(target.dtype) else ref
    assert_same(np.asarray(arr), expected, what)
    for shard in arr.addressable_shards:
        assert_same(np.asarray(shard.data), expected[shard.index], f"{what} shard on {shard.device} {shard.index}")


# Target shardings tried on the meshes of make_mesh (only those that divide a shape are used).
SPECS = {
    "P()": P(),
    "P(data)": P("data"),
    "P(None,model)": P(None, "model"),
    "P(data,model)": P("data", "model"),
    "P(model,data)": P("model", "data"),
    "P((data,model))": P(("data", "model")),
    "P(None,data)": P(None, "data"),
    "P(None,None,data)": P(None, None, "data"),
}


def random_tensor(name: str, dtype_name: str, shape):
    """Deterministic torch tensor of random BIT PATTERNS (NaN payloads, -0.0, inf included); 0/1 for bool."""
    import zlib

    import torch

    dt = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()) & 0x7FFFFFFF)
    n = int(np.prod(shape, dtype=np.int64))
    if dt == torch.bool:
        return torch.randint(0, 2, (n,), generator=g, dtype=torch.uint8).to(torch.bool).reshape(shape)
    itemsize = torch.empty((), dtype=dt).element_size()
    raw = torch.randint(0, 256, (n * itemsize,), generator=g, dtype=torch.uint8)
    return raw.view(dt).reshape(shape).clone()


def torch_bits(t, dtype: np.dtype) -> np.ndarray:
    """The bytes of torch tensor ``t`` (made contiguous) as a numpy array of ``dtype`` (bit-exact)."""
    import torch

    t = t.detach().cpu().contiguous()
    raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()
    return np.frombuffer(raw, dtype=dtype).reshape(tuple(t.shape)).copy()


def normal_tensor(name: str, dtype_name: str, shape):
    """Deterministic torch tensor of normal values (x4) for float dtypes, wide random integers otherwise."""
    import zlib

    import torch

    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    dt = getattr(torch, dtype_name)
    if dt.is_floating_point:
        return (torch.randn(shape, generator=g, dtype=torch.float64) * 4).to(dt)
    return torch.randint(-(2**40), 2**40, shape, generator=g, dtype=torch.int64).to(dt)


def check_catalog(ck, expected: dict) -> None:
    """The checkpoint lists exactly the ``expected`` tensors ({name: numpy reference}), with their shapes
    and dtypes."""
    assert set(ck.tensors) == set(expected)
    for name, ref in expected.items():
        info = ck.tensors[name]
        assert info.name == name
        assert tuple(info.shape) == ref.shape, name
        assert np.dtype(info.dtype) == ref.dtype, name


def flatten_torch(obj, prefix: str = ""):
    """(name, leaf) pairs of a torch.load result, flattened the DCP way."""
    import torch

    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from flatten_torch(v, f"{prefix}{k}.")
    elif isinstance(obj, (list, tuple)) and any(isinstance(v, (torch.Tensor, dict, list, tuple)) for v in obj):
        for i, v in enumerate(obj):
            yield from flatten_torch(v, f"{prefix}{i}.")
    else:
        yield prefix[:-1], obj


def evaluate(view, arrays: dict, casts: bool = True) -> np.ndarray:
    """The reference for a jreshard view: its operations done by numpy on the whole arrays (independent of
    jreshard's per-box tracing). With ``casts=False`` every ``astype`` is skipped (the view of element ids)."""
    op, args = view._op, view._args
    if op == "saved":
        return np.asarray(arrays[args])
    kids = [evaluate(k, arrays, casts) for k in view._kids]
    x = kids[0]
    if op == "transpose":
        return np.transpose(x, args)
    if op == "reshape":
        return x.reshape(args)
    if op == "astype":
        return x.astype(args) if casts else x
    if op == "index":
        return x[args]
    if op == "stack":
        return np.stack(kids, axis=args)
    if op == "concat":
        return np.concatenate(kids, axis=args)
    raise AssertionError(op)


def run_jax_processes(script: str, args_for, tmp_path, nproc: int = 4, timeout_s: float = 420,
                      **env_extra) -> list[dict]:
    """Run ``tests/<script>`` in ``nproc`` JAX processes (2 CPU devices each, plus ``env_extra``);
    ``args_for(i, result_path)`` are the arguments of process i, which writes its result dict (with ``"ok"``)
    as JSON to ``result_path``. Returns the result dicts, after asserting that every process succeeded."""
    import json
    import subprocess
    import sys
    import time

    env = child_env(XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu", OMP_NUM_THREADS=1,
                    **env_extra)
    paths = [Path(tmp_path) / f"result{i}.json" for i in range(nproc)]
    procs = [subprocess.Popen([sys.executable, str(TESTS_DIR / script), *args_for(i, paths[i])], env=env,
                              cwd=str(REPO_ROOT), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(nproc)]
    deadline = time.monotonic() + timeout_s
    outputs = []
    try:
        for p in procs:
            try:
                out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                out, err = "", "TIMEOUT"
            outputs.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    results = []
    for i, (rc, out, err) in enumerate(outputs):
        try:
            res = json.loads(paths[i].read_text())
        except (OSError, json.JSONDecodeError):
            res = None
        assert rc == 0 and res is not None and res.get("ok"), (
            f"process {i} failed (rc={rc}):\n{(res or {}).get('traceback', '')}\nstdout:\n{(out or '')[-3000:]}"
            f"\nstderr:\n{(err or '')[-6000:]}"
        )
        results.append(res)
    return results


def run_bounded(fn, limit: float, what: str = "a remote store") -> dict:
    """Run ``fn()`` in a thread: ``{"value": ...}`` or ``{"error": ...}``; a test failure when it runs longer than
    ``limit`` s (``what`` hung)."""
    import threading

    import pytest

    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            box["error"] = e

    th = threading.Thread(target=run, daemon=True)
    th.start()
    th.join(limit)
    if th.is_alive():
        pytest.fail(f"still running after {limit} s: {what} hung")
    return box
