"""Shared fixtures: 8 virtual CPU devices for JAX, and real DCP checkpoints written by torch.

The environment is set up here, before anything imports jax. The checkpoints are written ONCE per
session by ``tests/torch_writers.py`` (4 gloo ranks spawned with ``torch.multiprocessing.spawn``)
in a subprocess, so torch's process group never lives inside the pytest process.

Set ``JRESHARD_TEST_CHECKPOINTS=/some/dir`` to keep the written checkpoints between sessions
(written there once, reused while ``DIR/DONE`` exists).

Hypothesis draws the same examples on every run (``derandomize``), so that a run of the suite (CI's) is
repeatable; ``JRESHARD_HYPOTHESIS=random`` draws new ones, to look further.
"""

from __future__ import annotations

import os
import sys

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ["JAX_PLATFORMS"] = "cpu"
# float64 / int64 / complex128 tensors must stay 64-bit in JAX for exact comparisons.
os.environ["JAX_ENABLE_X64"] = "1"

import json  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

settings.register_profile("repeatable", derandomize=True)
settings.register_profile("random", derandomize=False)
settings.load_profile("random" if os.environ.get("JRESHARD_HYPOTHESIS") == "random" else "repeatable")

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tests import torch_writers as tw  # noqa: E402
from tests.helpers import child_env  # noqa: E402


@dataclass
class Checkpoints:
    root: Path
    dirs: dict  # variant -> Path of the DCP directory
    writer_reference: dict  # name -> np.ndarray (the full tensors the writer built)
    torch_reference: dict  # variant -> {name -> np.ndarray} (torch's dcp.load), not for safetensors
    torch_objects: dict  # variant -> {flat name -> object} (torch's dcp.load)
    names: dict  # variant -> [tensor names]
    write_seconds: float = 0.0
    _cache: dict = field(default_factory=dict)

    def reference(self, variant: str) -> dict:
        """torch's own reading where torch can read the variant, else the writer's tensors."""
        if variant in self.torch_reference:
            return self.torch_reference[variant]
        return {n: self.writer_reference[n] for n in self.names[variant]}


def _run_writer(script: str, root: Path, what: str) -> float:
    """Run a checkpoint writer (torch, in its own process) into ``root``; its seconds."""
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(TESTS_DIR / script), str(root)],
        env=child_env(OMP_NUM_THREADS=1),
        cwd=str(REPO_ROOT),
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0 or not (root / "DONE").exists():
        raise RuntimeError(
            f"{what} writer failed (rc={proc.returncode}):\n{proc.stdout[-5000:]}\n{proc.stderr[-10000:]}"
        )
    return time.monotonic() - t0


def _write(root: Path) -> float:
    return _run_writer("torch_writers.py", root, "torch checkpoint")


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory, pytestconfig) -> Checkpoints:
    keep = os.environ.get("JRESHARD_TEST_CHECKPOINTS")
    if keep:
        root = Path(keep)
        seconds = 0.0 if (root / "DONE").exists() else _write(root)
    else:
        root = tmp_path_factory.mktemp("dcp")
        seconds = _write(root)
    pytestconfig._jreshard_write_seconds = seconds
    with open(root / "ref" / "variants.json") as f:
        names = json.load(f)
    torch_reference, torch_objects = {}, {}
    for v in tw.TORCH_READABLE_VARIANTS:
        torch_reference[v] = tw.load_store(str(root / "torch_ref" / v))
        with open(root / "torch_ref" / v / "objects.json") as f:
            torch_objects[v] = json.load(f)
    return Checkpoints(
        root=root,
        dirs={v: root / v for v in tw.VARIANTS},
        writer_reference=tw.load_store(str(root / "ref")),
        torch_reference=torch_reference,
        torch_objects=torch_objects,
        names=names,
        write_seconds=seconds,
    )


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    # Report how long the session's checkpoint writing took (when it ran).
    t = getattr(config, "_jreshard_write_seconds", None)
    if t:
        terminalreporter.write_line(f"jreshard tests: DCP checkpoints written by torch in {t:.1f}s")


def pytest_addoption(parser):
    parser.addoption("--fuzz-long", action="store_true", default=False,
                     help="run tests/test_fuzz.py with 50x the cases (minutes to hours)")


@pytest.fixture(scope="session")
def fuzz_long(pytestconfig) -> bool:
    """Whether --fuzz-long was given (tests/test_fuzz.py multiplies its case counts)."""
    return bool(pytestconfig.getoption("--fuzz-long"))


# ---------------------------------------------------------------------------------------------
# A tiny Hugging Face Llama, saved with save_pretrained and as an FSDP2 DCP checkpoint (tests/model_writers.py)
# ---------------------------------------------------------------------------------------------


@dataclass
class LlamaCheckpoints:
    """The checkpoints and references written by ``tests/model_writers.py``."""

    root: Path
    hf: Path  # save_pretrained directory (sharded safetensors + index), the initial weights
    fsdp: Path  # DCP directory of the model after 2 FSDP2 AdamW steps on 4 ranks
    ref: Path  # input_ids.npy, {hf,fsdp}_logits.npy, {hf,fsdp}_state.npz
    config: dict  # the Hugging Face config (config.json)
    write_seconds: float = 0.0

    def path(self, variant: str) -> Path:
        """The checkpoint directory of ``variant`` ("hf" or "fsdp")."""
        return {"hf": self.hf, "fsdp": self.fsdp}[variant]

    def state(self, variant: str) -> dict:
        """transformers' full state dict of ``variant``: {name: float32 ndarray}."""
        import numpy as np

        with np.load(self.ref / f"{variant}_state.npz", allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    def logits(self, variant: str):
        """transformers' float32 logits of ``variant`` on :meth:`input_ids`."""
        import numpy as np

        return np.load(self.ref / f"{variant}_logits.npy", allow_pickle=False)

    def input_ids(self):
        """The int64 [batch, seq] token ids of the reference logits."""
        import numpy as np

        return np.load(self.ref / "input_ids.npy", allow_pickle=False)


def _write_llama(root: Path) -> float:
    import shutil

    shutil.rmtree(root, ignore_errors=True)
    return _run_writer("model_writers.py", root, "Llama checkpoint")


@pytest.fixture(scope="session")
def llama_checkpoints(tmp_path_factory) -> LlamaCheckpoints:
    """Written once per session (kept under ``$JRESHARD_TEST_CHECKPOINTS/llama`` when that is set)."""
    keep = os.environ.get("JRESHARD_TEST_CHECKPOINTS")
    if keep:
        root = Path(keep) / "llama"
        seconds = 0.0 if (root / "DONE").exists() else _write_llama(root)
    else:
        root = tmp_path_factory.mktemp("llama")
        seconds = _write_llama(root)
    with open(root / "config.json") as f:
        config = json.load(f)
    return LlamaCheckpoints(root=root, hf=root / "hf", fsdp=root / "fsdp", ref=root / "ref", config=config,
                            write_seconds=seconds)
