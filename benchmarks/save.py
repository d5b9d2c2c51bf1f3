"""Saving throughput: ``jreshard.save_dcp`` of JAX arrays against torch's own ``dcp.save`` of the same tensors.

The synthetic model of ``benchmarks/_model.py`` (``--size-gib``, default 1.5 GiB: bf16 matrices, f32 norms,
biases and LM head) is saved, single process, by two contenders, each run in a fresh subprocess:

  jreshard  ``save_dcp(tree, path)`` of jax.Arrays on 8 CPU devices, laid out as ``_model.AXES`` says on a
            (2, 4) ('data', 'model') mesh (``--layout sharded``, every matrix is 8 chunks) or on one device
            (``--layout single``, one chunk per tensor, like torch);
  torch     ``torch.distributed.checkpoint.save(state_dict, checkpoint_id=path, no_dist=True)`` of plain CPU
            tensors with the same contents (its default FileSystemWriter: one thread, TORCH_SAVE items, fsync).

Only the save call is timed (building the arrays is not); both write to ``--workdir`` through the page cache
and fsync their files. Reported per contender: median seconds over ``--repeat`` runs, GiB/s of tensor bytes,
the peak growth of anonymous memory during the save (``_memwatch.PeakAnonMemory``: the arrays themselves are
already in memory before it starts), and the ratio torch seconds / jreshard seconds (> 1: jreshard is faster).
Unless ``--no-verify``, torch's ``dcp.load`` then reads jreshard's checkpoint back and every tensor is compared
with the model's contents.

    python benchmarks/save.py [--size-gib 1.5] [--repeat 3] [--layout sharded|single] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

from _machine import facts
from _model import GIB, build_model

CONTENDERS = ("jreshard", "torch")


def child_env() -> dict:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env.pop("JAX_PLATFORMS", None)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1])]
                                        + [p for p in [env.get("PYTHONPATH")] if p])
    return env


# ------------------------------------------------------------------------------------------------ workers


def _worker_jreshard(args, out: Path) -> dict:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    import numpy as np
    from _memwatch import PeakAnonMemory, prefault
    from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding
    from jax.sharding import PartitionSpec as P

    from jreshard import save_dcp

    model = build_model(args.size_gib)
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    tree = {}
    for t in model.tensors:
        if args.layout == "single":
            sharding = SingleDeviceSharding(jax.devices()[0])
        else:
            sharding = NamedSharding(mesh, P(*t.axes))
        tree[t.name] = jax.make_array_from_callback(
            t.shape, sharding, lambda idx, t=t: t.rows(idx[0].start or 0, idx[0].stop)[(slice(None), *idx[1:])])
    jax.block_until_ready(tree)
    prefaulted = prefault(int(args.prefault_gib * GIB)) if args.prefault_gib else 0
    with PeakAnonMemory() as mem:
        t0 = time.perf_counter()
        save_dcp(tree, out)
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, "peak_anon_delta": mem.delta, "hwm_delta": mem.hwm_delta, "prefaulted": prefaulted}


def _worker_torch(args, out: Path) -> dict:
    import torch
    import torch.distributed.checkpoint as dcp
    from _memwatch import PeakAnonMemory, prefault

    model = build_model(args.size_gib)
    sd = {}
    for t in model.tensors:
        rows = t.rows()
        if t.dtype == "bf16":
            sd[t.name] = torch.from_numpy(rows.view("int16")).view(torch.bfloat16)
        else:
            sd[t.name] = torch.from_numpy(rows)
    prefaulted = prefault(int(args.prefault_gib * GIB)) if args.prefault_gib else 0
    import warnings

    warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
    with PeakAnonMemory() as mem:
        t0 = time.perf_counter()
        dcp.save(sd, checkpoint_id=str(out), no_dist=True)
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, "peak_anon_delta": mem.delta, "hwm_delta": mem.hwm_delta, "prefaulted": prefaulted}


def _worker_verify(args, out: Path) -> dict:
    """torch's dcp.load of jreshard's checkpoint, every tensor compared with the model's contents."""
    import numpy as np
    import torch
    import torch.distributed.checkpoint as dcp

    model = build_model(args.size_gib)
    sd = {t.name: torch.empty(t.shape, dtype=torch.bfloat16 if t.dtype == "bf16" else torch.float32)
          for t in model.tensors}
    dcp.load(sd, checkpoint_id=str(out), no_dist=True)
    for t in model.tensors:
        got = sd[t.name]
        got = got.view(torch.int16).numpy().view(t.np_dtype) if t.dtype == "bf16" else got.numpy()
        if not np.array_equal(got.view(np.uint8), t.expected().view(np.uint8)):
            raise AssertionError(f"{t.name}: torch read other values than were saved")
    return {"verified": len(model.tensors)}


WORKERS = {"jreshard": _worker_jreshard, "torch": _worker_torch, "verify": _worker_verify}


# ------------------------------------------------------------------------------------------------ parent


def run_worker(name: str, args, out: Path) -> dict:
    fd, result_file = tempfile.mkstemp(prefix="jreshard-save-bench-", suffix=".json")
    os.close(fd)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--size-gib", repr(args.size_gib), "--layout", args.layout,
           "--prefault-gib", repr(args.prefault_gib or 0.0), "--_worker", name, "--_out", str(out),
           "--_result", result_file]
    try:
        proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=args.timeout,
                              check=False)
        text = Path(result_file).read_text()
        result = json.loads(text) if text else {}
    except subprocess.TimeoutExpired:
        result = {"error": f"timed out after {args.timeout:.0f} s"}
    finally:
        os.unlink(result_file)
    if not result:
        result = {"error": f"worker died (exit {proc.returncode}): {proc.stderr[-2000:]}"}
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-gib", type=float, default=1.5, help="model size (default 1.5)")
    p.add_argument("--repeat", type=int, default=3, help="runs per contender (median reported)")
    p.add_argument("--layout", choices=["sharded", "single"], default="sharded",
                   help="jreshard's arrays: on a (2, 4) mesh (default) or on one device")
    p.add_argument("--workdir", default="/tmp/jreshard-bench-save", help="where the checkpoints are written")
    p.add_argument("--prefault-gib", type=float, default=0.0,
                   help="fault in and free this much memory before each timed save (VMs with free page reporting; "
                        "default 0: none, first-touch costs count as they do for a user)")
    p.add_argument("--no-verify", dest="verify", action="store_false", help="skip torch's read-back of jreshard's save")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per subprocess")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--_worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--_out", help=argparse.SUPPRESS)
    p.add_argument("--_result", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args._worker:
        try:
            result = WORKERS[args._worker](args, Path(args._out))
        except BaseException as e:  # noqa: BLE001 -- reported to the parent
            import traceback

            result = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        Path(args._result).write_text(json.dumps(result))
        return 0 if "error" not in result else 1

    model = build_model(args.size_gib)
    nbytes = model.nbytes
    machine = facts()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    print(f"model: {model.describe()}")
    print(f"jreshard layout: {args.layout}; {args.repeat} runs per contender, alternating; writing to {work}")
    runs: dict[str, list[dict]] = {c: [] for c in CONTENDERS}
    for rep in range(args.repeat):
        for name in CONTENDERS:
            out = work / f"{name}-ckpt"
            shutil.rmtree(out, ignore_errors=True)
            result = run_worker(name, args, out)
            if "error" in result:
                print(f"{name} run {rep}: ERROR {result['error']}\n{result.get('traceback', '')}")
                return 1
            result["file_bytes"] = sum(f.stat().st_size for f in out.iterdir())
            runs[name].append(result)
            print(f"  {name:8s} run {rep}: {result['seconds']:.3f} s, "
                  f"peak anon +{result['peak_anon_delta'] / 2**20:.0f} MiB")
    verified = None
    if args.verify:
        v = run_worker("verify", args, work / "jreshard-ckpt")
        if "error" in v:
            print(f"verify: ERROR {v['error']}\n{v.get('traceback', '')}")
            return 1
        verified = v["verified"]
    summary = {}
    for name, rs in runs.items():
        secs = statistics.median(r["seconds"] for r in rs)
        summary[name] = {"seconds": secs, "gib_per_s": nbytes / GIB / secs,
                         "peak_anon_delta_mib": max(r["peak_anon_delta"] for r in rs) / 2**20,
                         "file_bytes": rs[-1]["file_bytes"], "runs": [r["seconds"] for r in rs]}
    ratio = summary["torch"]["seconds"] / summary["jreshard"]["seconds"]
    print(f"\n{'contender':10s} {'seconds':>8s} {'GiB/s':>7s} {'peak anon':>10s} {'file GiB':>9s}")
    for name, s in summary.items():
        print(f"{name:10s} {s['seconds']:8.3f} {s['gib_per_s']:7.2f} {s['peak_anon_delta_mib']:7.0f} MiB "
              f"{s['file_bytes'] / GIB:9.3f}")
    print(f"ratio torch/jreshard seconds: {ratio:.2f}x" + (f"; torch read back all {verified} tensors of jreshard's "
                                                            "checkpoint exactly" if verified else ""))
    if args.json:
        Path(args.json).write_text(json.dumps({"size_gib": args.size_gib, "model_bytes": nbytes, "layout": args.layout,
                                               "summary": summary, "ratio": ratio, "verified": verified,
                                               "repeat": args.repeat, "prefault_gib": args.prefault_gib,
                                               "machine": machine}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
