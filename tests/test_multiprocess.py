"""Four real JAX processes (2 CPU devices each) load one DCP checkpoint onto a global 8-device mesh."""

from __future__ import annotations

import json
import subprocess
import sys
import time


from tests.helpers import REPO_ROOT, TESTS_DIR, child_env
from tests.torch_writers import free_port

NPROC = 4
TIMEOUT_S = 420


def _result(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def test_four_jax_processes_load_plain_checkpoint(checkpoints, tmp_path):
    port = free_port()
    env = child_env(
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        JAX_PLATFORMS="cpu",
        OMP_NUM_THREADS=1,
    )
    procs = [
        subprocess.Popen(
            [sys.executable, str(TESTS_DIR / "mp_child.py"), str(checkpoints.dirs["plain"]),
             str(checkpoints.root / "ref"), str(port), str(i), str(NPROC),
             str(tmp_path / f"result{i}.json")],
            env=env,
            cwd=str(REPO_ROOT),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(NPROC)
    ]
    deadline = time.monotonic() + TIMEOUT_S
    outputs = []
    try:
        for p in procs:
            remaining = max(1.0, deadline - time.monotonic())
            try:
                out, err = p.communicate(timeout=remaining)
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
        res = _result(tmp_path / f"result{i}.json")
        assert rc == 0 and res is not None and res.get("ok"), (
            f"process {i} failed (rc={rc}):\n{(res or {}).get('traceback', '')}\nstdout:\n{(out or '')[-3000:]}"
            f"\nstderr:\n{(err or '')[-6000:]}"
        )
        results.append(res)

    assert sorted(r["pid"] for r in results) == list(range(NPROC))
    for r in results:
        # 5 tensors x 2 local devices, for Checkpoint.load and for io=posix / io=tensorstore
        assert r["shards_checked"] == 5 * 2 * 3
        assert r["needed"] > 1_000_000
        assert r["needed"] <= r["bytes_read_by_load"] <= r["bytes_read"], r
        assert r["bytes_read"] <= 1.1 * r["needed"], r
        assert r["num_reads"] >= 1
        assert r["plan_processes"] == list(range(NPROC))
        assert r["plan_self_matches"] is True
        assert r["plan_bytes_needed"] == r["needed"], r  # distinct boxes of this process, each once
