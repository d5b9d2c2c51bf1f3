"""One JAX process of the multi-process test (run by tests/test_multiprocess.py, not collected).

usage: python tests/mp_child.py CKPT_DIR REF_DIR PORT PROCESS_ID NUM_PROCESSES RESULT_JSON
Environment: XLA_FLAGS=--xla_force_host_platform_device_count=2, JAX_PLATFORMS=cpu.
Writes its result as JSON to RESULT_JSON (a file, so that native libraries writing to
stdout from their own threads cannot interleave with it).
"""

from __future__ import annotations

import sys


def main() -> dict:
    ckpt_dir, ref_dir, port, pid, nproc = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])

    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=nproc, process_id=pid)

    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import jreshard
    from tests import torch_writers as tw
    from tests.helpers import assert_same, box_nbytes, distinct_indices

    result = {"pid": pid, "ok": False}
    assert jax.process_count() == nproc and jax.process_index() == pid
    assert len(jax.devices()) == 2 * nproc and len(jax.local_devices()) == 2
    mesh = Mesh(np.array(jax.devices()).reshape(nproc, 2), ("data", "model"))

    ref = tw.load_store(ref_dir)
    # the large tensors only (header reads negligible); row bands / aligned boxes per process
    specs = {
        "mp.a": P("data", None),  # (512, 512) f32 saved Shard(0)
        "mp.b": P("data", "model"),  # (256, 1024) bf16 saved (Shard(0), Shard(1)) on 2x2
        "mp.c": P(),  # (1024, 256) f32 saved replicated: every process needs all of it
        "mp.d": P("data", None),  # (384, 640) f32 saved Shard(1): row band across 4 saved chunks
        "mp.e": P(("data", "model")),  # (256, 512) f32 plain tensor
    }
    targets = {
        n: jax.ShapeDtypeStruct(ref[n].shape, ref[n].dtype, sharding=NamedSharding(mesh, s)) for n, s in specs.items()
    }
    needed = sum(
        box_nbytes(idx, t.shape, np.dtype(t.dtype).itemsize)
        for t in targets.values()
        for idx in distinct_indices(t.sharding, t.shape)
    )

    def check(out, what):
        assert set(out) == set(targets), (what, sorted(out))
        n = 0
        for name, t in targets.items():
            arr = out[name]
            assert isinstance(arr, jax.Array), (what, name, type(arr))
            assert arr.shape == t.shape and np.dtype(arr.dtype) == np.dtype(t.dtype), (what, name)
            assert arr.sharding == t.sharding, (what, name, arr.sharding)
            assert len(arr.addressable_shards) == 2, (what, name)
            for s in arr.addressable_shards:
                assert s.device.process_index == pid
                assert_same(np.asarray(s.data), ref[name][s.index], f"{what} p{pid}:{name}{s.index}")
                n += 1
        return n

    ck = jreshard.open(ckpt_dir)
    before = ck.io_stats.bytes_read
    out = ck.load(targets)
    result["shards_checked"] = check(out, "Checkpoint.load")
    result["bytes_read"] = ck.io_stats.bytes_read
    result["bytes_read_by_load"] = ck.io_stats.bytes_read - before
    result["num_reads"] = ck.io_stats.num_reads
    result["needed"] = needed

    for io in ("posix", "tensorstore"):
        result["shards_checked"] += check(jreshard.load(ckpt_dir, targets, io=io), f"load io={io}")

    plan = jreshard.plan(ckpt_dir, targets, process_index="all")
    own = jreshard.plan(ckpt_dir, targets)  # the default: this process only
    result["plan_processes"] = sorted(int(k) for k in plan.processes)
    result["plan_bytes_needed"] = plan.bytes_needed
    result["plan_self_matches"] = (
        plan.processes[pid].bytes_needed == plan.bytes_needed == own.bytes_needed
        and plan.processes[pid].bytes_to_read == plan.bytes_to_read == own.bytes_to_read
        and plan.processes[pid].num_reads == plan.num_reads == own.num_reads
        and sorted(own.processes) == [pid]
    )

    # every process must get here before anyone shuts down
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("jreshard-mp-test-done")
    result["ok"] = True
    return result


if __name__ == "__main__":
    from tests.mp_result import run

    run(main, 4, 6)
