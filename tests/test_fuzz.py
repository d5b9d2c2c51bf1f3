"""Structure-aware fuzzing of every reader: a file from a stranger is safe to open.

Each outcome of ``jreshard.open``, ``ckpt.tensors``, ``ckpt.read`` (whole and partial boxes), ``ckpt.objects``
and ``safe_loads`` on a mutated real checkpoint is either the original values or a ``JReshardError``: never
another exception type, a crash by signal, a hang, or a memory blow-up.

The mutations and checks live in ``tests/fuzz_worker.py``, run here as a child process (no torch, no jax) under
an address-space limit and a wall-clock limit; the worker runs each case in a forked grandchild, so a crash is
reported with the input that caused it. This module writes the torch originals (``torch.save`` files, zip and
legacy; the DCP checkpoints come from the ``checkpoints`` fixture) and hands their paths to the worker.

``--fuzz-long`` multiplies the number of cases by 50; ``JRESHARD_FUZZ_SEED`` picks another seed (default fixed,
so that a failure reproduces). Each family's failures are printed with the input's description and the path of a
saved copy that ``python tests/fuzz_worker.py --corpus ... --workdir ... --replay DIR`` re-runs.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests import torch_writers as tw
from tests.helpers import child_env, flatten_torch

TESTS_DIR = Path(__file__).resolve().parent
WORKER = TESTS_DIR / "fuzz_worker.py"

# Generated cases per family in the default run (plus a few unmutated controls each); x LONG_FACTOR with --fuzz-long.
CASES = {"dcp_metadata": 40, "dcp_items": 40, "safetensors": 50, "torchsave": 50, "pickles": 70, "legacy": 40}
LONG_FACTOR = 50
SEED = int(os.environ.get("JRESHARD_FUZZ_SEED", "20240917"))
CASE_TIMEOUT = 30  # seconds one case may take before it is reported as a hang
AS_HEADROOM = 3 * 2**30  # address space allowed above what the worker needs after its imports
DCP_VARIANTS = ("zstd", "threads", "safetensors", "plain")


# ---------------------------------------------------------------------------------------------
# the torch-written originals
# ---------------------------------------------------------------------------------------------


def _torch_states():
    import torch

    g = torch.Generator().manual_seed(7)
    big = torch.arange(40, dtype=torch.float32).reshape(10, 4)
    shared = torch.arange(12, dtype=torch.int64)
    small = {
        "w": torch.randn(4, 3, generator=g),
        "big": big,
        "view": big[2:5],  # storage offset 8, shares big's storage
        "t": torch.arange(12, dtype=torch.float64).reshape(3, 4).T,  # transposed
        "cols": torch.arange(30, dtype=torch.float32).reshape(5, 6)[:, 1:4],  # strided rows
        "shared_a": shared[0:6],
        "shared_b": shared[4:10].view(2, 3),
        "bf": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "h": torch.randn(7, generator=g).to(torch.float16),
        "mask": torch.tensor([True, False, True]),
        "c": torch.randn(2, 2, dtype=torch.complex64, generator=g),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 3),
        "u8": torch.arange(6, dtype=torch.uint8).reshape(2, 3),
        "param": torch.nn.Parameter(torch.ones(3)),
        "layers": [{"w": torch.ones(2, 2)}, {"w": torch.full((2, 2), 2.0)}],
        "meta": {"epoch": 3, "name": "run-1", "lrs": [0.1, 0.2], "flag": True, "none": None},
    }
    big_state = {  # over 64 KiB: read by ranges, not whole
        "big": torch.randn(128, 256, generator=g),
        "bigT": torch.randn(96, 200, generator=g).T,
        "slice": torch.randn(300, 100, generator=g)[10:290, 20:80],
        "small": torch.arange(5, dtype=torch.int32),
        "step": 11,
    }
    hf = {"model.embed.weight": torch.randn(16, 8, generator=g), "model.norm.weight": torch.ones(8),
          "lm_head.weight": torch.randn(8, 16, generator=g).to(torch.bfloat16)}
    return small, big_state, hf


def _save_reference(state, ref_dir: Path) -> tuple[list[str], dict]:
    import torch

    arrays, objects = {}, {}
    for name, leaf in flatten_torch(state):
        if isinstance(leaf, torch.Tensor):
            dtname = str(leaf.dtype).removeprefix("torch.")
            arrays[name] = (dtname, tw.to_numpy(leaf))
        else:
            objects[name] = leaf
    tw.save_store(str(ref_dir), arrays)
    return sorted(arrays), objects


@pytest.fixture(scope="session")
def fuzz_corpus(checkpoints, tmp_path_factory) -> Path:
    """manifest.json naming the torch-written originals and their reference values."""
    import torch

    root = tmp_path_factory.mktemp("fuzz_corpus")
    small, big_state, hf = _torch_states()
    pt = {}
    for key, state in (("small", small), ("big", big_state)):
        path = root / f"{key}.pt"
        torch.save(state, path)
        names, objects = _save_reference(state, root / f"ref_{key}")
        pt[key] = {"path": str(path), "ref": str(root / f"ref_{key}"), "names": names, "objects": objects}
    for key, state in (("legacy_small", small), ("legacy_big", big_state)):  # torch < 1.6's format
        path = root / f"{key}.pt"
        torch.save(state, path, _use_new_zipfile_serialization=False)
        names, objects = _save_reference(state, root / f"ref_{key}")
        pt[key] = {"path": str(path), "ref": str(root / f"ref_{key}"), "names": names, "objects": objects}
    single = root / "hf_single"
    single.mkdir()
    torch.save(hf, single / "pytorch_model.bin")
    names, objects = _save_reference(hf, root / "ref_hf")
    pt["hf_single"] = {"path": str(single), "ref": str(root / "ref_hf"), "names": names, "objects": objects}
    sharded = root / "hf_sharded"
    sharded.mkdir()
    keys = sorted(hf)
    parts = {"pytorch_model-00001-of-00002.bin": keys[:2], "pytorch_model-00002-of-00002.bin": keys[2:]}
    weight_map = {}
    for fname, ks in parts.items():
        torch.save({k: hf[k] for k in ks}, sharded / fname)
        weight_map.update({k: fname for k in ks})
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    pt["hf_sharded"] = {"path": str(sharded), "open": "pytorch_model.bin.index.json", "ref": str(root / "ref_hf"),
                        "names": names, "objects": objects}
    dcp = {}
    for v in DCP_VARIANTS:
        readable = v in tw.TORCH_READABLE_VARIANTS
        ref = checkpoints.root / ("torch_ref" if readable else "ref") / (v if readable else "")
        dcp[v] = {"path": str(checkpoints.dirs[v]), "ref": str(ref), "names": checkpoints.names[v],
                  "objects": checkpoints.torch_objects.get(v, tw.OBJECTS_FLAT)}
    manifest = root / "manifest.json"
    manifest.write_text(json.dumps({"dcp": dcp, "pt": pt}, indent=1))
    return manifest


# ---------------------------------------------------------------------------------------------
# running the worker
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def address_space_cap() -> int:
    """RLIMIT_AS for the worker: what ``import jreshard, numpy, tensorstore`` (and the worker's other imports,
    no jax, no torch) needs, plus AS_HEADROOM."""
    code = ("import jreshard, numpy, tensorstore, zstandard, hypothesis, safetensors.numpy, ml_dtypes, sys\n"
            "assert 'jax' not in sys.modules and 'torch' not in sys.modules\n"
            "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmPeak')][0])")
    out = subprocess.run([sys.executable, "-c", code], env=child_env(MALLOC_ARENA_MAX=2), capture_output=True,
                         text=True, timeout=120, check=True)
    return int(out.stdout.strip()) * 1024 + AS_HEADROOM


def run_worker(manifest: Path, workdir: Path, cap: int, *args: str, timeout: float) -> subprocess.CompletedProcess:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    cmd = [sys.executable, str(WORKER), "--corpus", str(manifest), "--workdir", str(workdir), *args]
    try:
        return subprocess.run(cmd, env=child_env(MALLOC_ARENA_MAX=2, OMP_NUM_THREADS=1, PYTHONFAULTHANDLER=1),
                              preexec_fn=limit, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        pytest.fail(f"fuzz worker did not finish within {timeout:.0f}s: {' '.join(cmd)}\n{out[-20000:]}")


def _describe(proc: subprocess.CompletedProcess) -> str:
    rc = proc.returncode
    how = f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exit status {rc}"
    return f"fuzz worker {how}\n--- stdout ---\n{proc.stdout[-30000:]}\n--- stderr ---\n{proc.stderr[-10000:]}"


@pytest.mark.parametrize("family", list(CASES))
def test_fuzz(family, fuzz_corpus, address_space_cap, fuzz_long, tmp_path):
    cases = CASES[family] * (LONG_FACTOR if fuzz_long else 1)
    proc = run_worker(fuzz_corpus, tmp_path, address_space_cap, "--family", family, "--cases", str(cases),
                      "--seed", str(SEED), "--case-timeout", str(CASE_TIMEOUT),
                      timeout=max(600, cases * 3.0))
    print(proc.stdout)
    assert proc.returncode >= 0, _describe(proc)  # the worker itself was not killed by a signal
    assert proc.returncode == 0, _describe(proc)


def test_fuzz_harness_catches_planted_bugs(fuzz_corpus, address_space_cap, tmp_path):
    """The harness can fail: each deliberate bug (a foreign exception, SIGSEGV, a hang, memory, a state leak
    into later loads, wrong values) is reported as its own failure class."""
    # One plant per case, in order; "wrong" must land on an unmutated control (whose values are compared), the
    # others fire on any input (in jreshard.open, or in the benign check after the case).
    plants = ["wrong", "leak", "typeerror", "segv", "hang", "memory", "rss"]
    proc = run_worker(fuzz_corpus, tmp_path, address_space_cap, "--family", "dcp_metadata", "--cases", "3",
                      "--seed", str(SEED), "--case-timeout", "6", "--plant", ",".join(plants), timeout=300)
    out = proc.stdout
    assert proc.returncode == 1, _describe(proc)
    for marker in ("exception: TypeError", "signal: SIGSEGV", "hang: hang", "memory: MemoryError", "memory: rss",
                   "benign: benign", "invariant: invariant"):
        assert marker in out, f"planted bug not reported ({marker!r})\n{_describe(proc)}"
