"""One JAX process of the multi-process Llama port test (run by tests/test_multiprocess.py, not collected).

usage: python tests/mp_port_child.py LLAMA_ROOT PORT PROCESS_ID NUM_PROCESSES RESULT_JSON VARIANT [VARIANT ...]
LLAMA_ROOT is the directory of tests/model_writers.py (config.json, hf/, fsdp/, ref/); each VARIANT ("hf",
"fsdp") is ported in turn onto the global ("data": 2, "model": 4) mesh of all 8 devices.
Environment: XLA_FLAGS=--xla_force_host_platform_device_count=2, JAX_PLATFORMS=cpu.
Writes its result as JSON to RESULT_JSON (a file, so that native libraries writing to
stdout from their own threads cannot interleave with it).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> dict:
    root, port, pid, nproc = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    variants = sys.argv[6:]

    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=nproc, process_id=pid)

    import numpy as np
    from flax import nnx

    import jreshard
    from examples import llama_nnx
    from examples.port_llama import hf_llama_mapping, numpy_port
    from tests.helpers import assert_same, box_nbytes, distinct_indices

    result: dict = {"pid": pid, "ok": False, "variants": {}}
    assert jax.process_count() == nproc and jax.process_index() == pid
    assert len(jax.devices()) == 2 * nproc and len(jax.local_devices()) == 2

    mesh = llama_nnx.make_mesh(jax.devices())  # global devices, in jax.devices() order
    assert mesh.devices.shape == (2, 4) and mesh.axis_names == ("data", "model")
    with open(root / "config.json") as f:
        cfg = llama_nnx.LlamaConfig.from_hf(json.load(f))
    mapping = hf_llama_mapping(cfg)
    targets = llama_nnx.target_shapes(cfg, mesh)

    # bytes the shards of every process hold (distinct boxes per process; float32 saved and loaded),
    # computed from the targets' shardings alone.
    needed_by_process = {q: 0 for q in range(nproc)}
    for t in targets.values():
        boxes: dict[int, set] = {q: set() for q in range(nproc)}
        for dev, idx in t.sharding.devices_indices_map(t.shape).items():
            key = tuple(s.indices(d) for s, d in zip(idx, t.shape))
            if key not in boxes[dev.process_index]:
                boxes[dev.process_index].add(key)
                needed_by_process[dev.process_index] += box_nbytes(idx, t.shape, np.dtype(t.dtype).itemsize)
    local_needed = sum(
        box_nbytes(idx, t.shape, np.dtype(t.dtype).itemsize)
        for t in targets.values()
        for idx in distinct_indices(t.sharding, t.shape)
    )
    assert local_needed == needed_by_process[pid]
    result["needed_by_process"] = {str(q): n for q, n in needed_by_process.items()}

    def per_process(p) -> dict:
        return {str(int(q)): {"bytes_needed": pp.bytes_needed, "bytes_to_read": pp.bytes_to_read,
                              "num_reads": pp.num_reads, "pieces": pp.pieces}
                for q, pp in p.processes.items()}

    def check(out: dict, expected: dict, what: str) -> int:
        assert set(out) == set(targets), (what, sorted(set(out) ^ set(targets)))
        n = 0
        for name, t in targets.items():
            arr = out[name]
            assert isinstance(arr, jax.Array), (what, name, type(arr))
            assert arr.shape == t.shape and np.dtype(arr.dtype) == np.dtype(t.dtype), (what, name, arr.shape)
            assert arr.sharding == t.sharding, (what, name, arr.sharding, t.sharding)
            assert len(arr.addressable_shards) == 2, (what, name)
            for s in arr.addressable_shards:
                assert s.device.process_index == pid
                data = np.asarray(s.data)
                assert np.array_equal(data, expected[name][s.index]), f"{what} p{pid}:{name}{s.index}"
                assert_same(data, expected[name][s.index], f"{what} p{pid}:{name}{s.index}")
                n += 1
        return n

    for variant in variants:
        res: dict = {}
        result["variants"][variant] = res
        with np.load(root / "ref" / f"{variant}_state.npz", allow_pickle=False) as z:
            state_dict = {k: z[k] for k in z.files}
        res["saved_model_bytes"] = int(sum(a.nbytes for a in state_dict.values()))
        expected = numpy_port(state_dict, cfg)

        ck = jreshard.open(root / variant)
        try:
            p = jreshard.plan(ck, targets, mapping=mapping, process_index="all")
            res["plan_processes"] = sorted(int(q) for q in p.processes)
            res["plan"] = per_process(p)
            res["plan_local"] = {"bytes_needed": p.bytes_needed, "bytes_to_read": p.bytes_to_read,
                                 "num_reads": p.num_reads}
            res["plan_this_process"] = int(p.this_process)

            # the same model given as its (abstract) nnx state
            _, abstract = llama_nnx.abstract_state(cfg, mesh)
            res["plan_nnx"] = per_process(jreshard.plan(ck, abstract, mapping=mapping, process_index="all"))

            b0, r0 = ck.io_stats.bytes_read, ck.io_stats.num_reads
            out = jreshard.load(ck, targets, mapping=mapping)
            res["load_bytes_read"] = ck.io_stats.bytes_read - b0
            res["load_num_reads"] = ck.io_stats.num_reads - r0
            res["shards_checked"] = check(out, expected, f"{variant} flat target")

            # and loaded into the nnx state
            _, abstract = llama_nnx.abstract_state(cfg, mesh)
            loaded = jreshard.load(ck, abstract, mapping=mapping)
            res["shards_checked_nnx"] = check(llama_nnx.flat_names(loaded), expected, f"{variant} nnx state")
            assert isinstance(loaded, nnx.State), type(loaded)
        finally:
            ck.close()

    # every process must get here before anyone shuts down
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("jreshard-mp-port-test-done")
    result["ok"] = True
    return result


if __name__ == "__main__":
    from tests.mp_result import run

    run(main, 3, 5)
