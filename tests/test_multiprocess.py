"""Four real JAX processes (2 CPU devices each) load one DCP checkpoint onto a global 8-device mesh."""

from __future__ import annotations

from tests.helpers import run_jax_processes
from tests.torch_writers import free_port

NPROC = 4
TIMEOUT_S = 420


def test_four_jax_processes_load_plain_checkpoint(checkpoints, tmp_path):
    port = free_port()
    results = _run_children(
        "mp_child.py", lambda i, out: [str(checkpoints.dirs["plain"]), str(checkpoints.root / "ref"), str(port),
                                       str(i), str(NPROC), str(out)], tmp_path)
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


PORT_VARIANTS = ("hf", "fsdp")


def _run_children(script, args_for, tmp_path, timeout_s=TIMEOUT_S) -> list[dict]:
    """Run ``script`` in NPROC JAX processes (2 CPU devices each); ``args_for(i, result_path)`` are the
    arguments of process i. Returns the result dicts, after asserting every process succeeded."""
    return run_jax_processes(script, args_for, tmp_path, NPROC, timeout_s)


def test_four_jax_processes_port_llama(llama_checkpoints, tmp_path):
    """The Llama port (views: transposes, head splits, stacked layers) by 4 JAX processes onto a global
    (data=2, model=4) mesh, from the save_pretrained safetensors and from the FSDP2 DCP checkpoint (both in
    one run of the children): each process reads at most 1.1x the bytes its devices hold, reads exactly
    what its plan says, and every shard equals numpy_port of transformers' state dict."""
    port = free_port()
    root = llama_checkpoints.root
    results = _run_children(
        "mp_port_child.py",
        lambda i, out: [str(root), str(port), str(i), str(NPROC), str(out), *PORT_VARIANTS],
        tmp_path,
    )
    assert sorted(r["pid"] for r in results) == list(range(NPROC))
    procs = [str(q) for q in range(NPROC)]
    failures = []
    for variant in PORT_VARIANTS:
        saved_bytes = results[0]["variants"][variant]["saved_model_bytes"]
        assert saved_bytes > 500_000, saved_bytes  # the test model: ~164k float32 parameters
        for r in results:
            pid, res = r["pid"], r["variants"][variant]
            what = f"{variant} p{pid}"
            assert res["plan_processes"] == list(range(NPROC)), (what, res["plan_processes"])
            assert res["plan_this_process"] == pid, what
            plan = res["plan"]
            # every process's plan agrees on every process, and with the nnx-state target's plan
            assert plan == results[0]["variants"][variant]["plan"], (what, plan)
            assert res["plan_nnx"] == plan, (what, res["plan_nnx"], plan)
            # bytes needed: the distinct boxes each process's devices hold (computed from the shardings)
            assert {q: plan[q]["bytes_needed"] for q in procs} == r["needed_by_process"], (what, plan)
            assert all(plan[q]["bytes_needed"] > 0 for q in procs), (what, plan)
            assert sum(plan[q]["bytes_needed"] for q in procs) >= saved_bytes / 2, (what, plan)
            assert res["plan_local"] == {k: plan[str(pid)][k] for k in ("bytes_needed", "bytes_to_read", "num_reads")}
            # the plan is what runs
            assert res["load_bytes_read"] == plan[str(pid)]["bytes_to_read"], (what, res["load_bytes_read"], plan)
            assert res["load_num_reads"] == plan[str(pid)]["num_reads"], (what, res["load_num_reads"], plan)
            # 12 parameters x 2 local devices, loaded into the flat dict and into the nnx state
            assert res["shards_checked"] == 12 * 2 and res["shards_checked_nnx"] == 12 * 2, what
        # the requirement: each process reads at most 1.1x the bytes its devices hold
        for q in procs:
            p = results[0]["variants"][variant]["plan"][q]
            if not p["bytes_to_read"] <= 1.1 * p["bytes_needed"]:
                failures.append(f"{variant} process {q}: reads {p['bytes_to_read']} bytes in {p['num_reads']} "
                                f"requests for {p['bytes_needed']} needed "
                                f"({p['bytes_to_read'] / p['bytes_needed']:.3f}x > 1.1x)")
    assert not failures, "\n".join(failures)
