"""``progress=``: plain lines where stderr is not a terminal, a rich bar where it is, a callable's counters; and
the load's batches (hence its reads) are the same whatever ``progress`` is, and those the plan reports."""

from __future__ import annotations

import subprocess
import sys

import jax
import numpy as np
import pytest
import rich  # noqa: F401 - the test extra has it: the rich bar is tested, never skipped
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jreshard
import jreshard.checkpoint as jck
from tests.helpers import REPO_ROOT, child_env, make_mesh

VARIANT = "plain"
NAMES = ("mp.a", "mp.b", "d2.s0s1", "d1.vec_uneven")
BOUND = 96 * 2**10  # several batches, and pieces read in parts


def _target(ckpt, mesh) -> dict:
    specs = {"mp.a": P("data", "model"), "mp.b": P(None, "model"), "d2.s0s1": P("model"), "d1.vec_uneven": P()}
    return {n: jax.ShapeDtypeStruct(ckpt.tensors[n].shape, ckpt.tensors[n].dtype, sharding=NamedSharding(mesh, specs[n]))
            for n in NAMES}


@pytest.fixture
def ckpt(checkpoints):
    with jreshard.open(checkpoints.dirs[VARIANT]) as c:
        yield c


def _units(plan) -> int:
    return sum(len(b.units) for b in plan._program.batches)


def test_batches_do_not_depend_on_progress(ckpt):
    """The same reads (bytes and requests, those the plan reports) and the same batches with progress off, on
    and a callable (called once per batch, or per part of shards larger than the bound)."""
    target = _target(ckpt, make_mesh("2x4"))
    seen: dict = {}
    for progress in (False, True, "callable"):
        # The plan locates (header reads) before the counting below; the load keeps that until it ends.
        plan = ckpt.plan(target, max_inflight_bytes=BOUND)
        assert _units(plan) > 3
        calls: list = []
        before = (ckpt.io_stats.bytes_read, ckpt.io_stats.num_reads)
        ckpt.load(target, max_inflight_bytes=BOUND, progress=calls.append if progress == "callable" else progress)
        seen[progress] = (ckpt.io_stats.bytes_read - before[0], ckpt.io_stats.num_reads - before[1])
        if progress == "callable":
            assert len(calls) == _units(plan)
            assert [c["bytes_done"] for c in calls] == sorted(c["bytes_done"] for c in calls)
            assert calls[-1]["bytes_done"] == calls[-1]["bytes_total"] == plan.bytes_needed
    assert seen[False] == seen[True] == seen["callable"] == (plan.bytes_to_read, plan.num_reads)


def test_lines_without_a_terminal(ckpt, capsys, monkeypatch):
    """stderr not a terminal (captured here): newline-terminated lines, no carriage return, the last at 100%.
    With a line allowed at every batch there is one per batch; with a long interval, the first and the final."""
    target = _target(ckpt, make_mesh("2x4"))
    units = _units(ckpt.plan(target, max_inflight_bytes=BOUND))
    for every, expected in ((0.0, units), (1e9, 2)):
        monkeypatch.setattr(jck, "PROGRESS_EVERY_S", every)
        capsys.readouterr()
        ckpt.load(target, max_inflight_bytes=BOUND, progress=True)
        err = capsys.readouterr().err
        assert "\r" not in err and err.endswith("\n")
        lines = err.splitlines()
        assert len(lines) == expected, err
        assert all(line.startswith("jreshard: ") for line in lines)
        assert "100.0%" in lines[-1] and all("100.0%" not in line for line in lines[:-1])


def test_lines_on_a_pipe():
    """A real process whose stderr is a pipe (as under a job scheduler): lines, no carriage return, 100% last."""
    script = ("import jax, jreshard; from jax.sharding import SingleDeviceSharding as S\n"
              "c = jreshard.open(jreshard.sample_path())\n"
              "t = {n: jax.ShapeDtypeStruct(i.shape, i.dtype, sharding=S(jax.devices()[0])) for n, i in c.tensors.items()}\n"
              "jreshard.load(c, t, progress=True, max_inflight_bytes=4096)\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=str(REPO_ROOT), env=child_env(JAX_PLATFORMS="cpu"),
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    err = proc.stderr
    assert "\r" not in err and "\x1b[" not in err, err  # no carriage returns, no terminal codes
    lines = [line for line in err.splitlines() if line.startswith("jreshard: ")]
    assert lines and "100.0%" in lines[-1], err


def test_rich_bar_where_there_is_a_terminal(ckpt, capsys, monkeypatch):
    """Where rich is chosen (a terminal, or a notebook), the bar is drawn on stderr and ends at 100%."""
    monkeypatch.setattr(jck, "_rich_ok", lambda stream: True)
    target = _target(ckpt, make_mesh("2x4"))
    out = ckpt.load(target, max_inflight_bytes=BOUND, progress=True)
    err = capsys.readouterr().err
    assert "jreshard" in err and "100%" in err, err
    assert out["mp.a"].shape == (512, 512)
    reporter = jck._progress_fn(True)
    assert isinstance(reporter, jck._RichProgress)
    reporter.close()  # never started: nothing to stop


def test_rich_bar_is_closed_when_the_load_fails(ckpt, monkeypatch):
    """A load that fails midway stops the bar (no display left running)."""
    made: list = []
    rich_progress = jck._RichProgress

    def make(label, stream):
        made.append(rich_progress(label, stream))
        return made[-1]

    monkeypatch.setattr(jck, "_rich_ok", lambda stream: True)
    monkeypatch.setattr(jck, "_RichProgress", make)
    target = _target(ckpt, make_mesh("2x4"))
    calls = {"n": 0}
    real = jck.Checkpoint._run_unit

    def failing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise jreshard.StorageError("injected")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(jck.Checkpoint, "_run_unit", failing)
    with pytest.raises(jreshard.StorageError, match="injected"):
        ckpt.load(target, max_inflight_bytes=BOUND, progress=True)
    assert len(made) == 1 and made[0].closed and made[0].task is not None
    assert not made[0].bar.live.is_started


def test_notebook_detection(monkeypatch):
    """In a kernel (an IPython shell with a kernel), rich is used only where ipywidgets is importable."""

    class Shell:
        kernel = object()

    class FakeIPython:
        @staticmethod
        def get_ipython():
            return Shell()

    monkeypatch.setitem(sys.modules, "IPython", FakeIPython)
    assert jck._in_notebook()
    import importlib.util

    has_widgets = importlib.util.find_spec("ipywidgets") is not None
    assert jck._rich_ok(sys.stderr) is has_widgets
    monkeypatch.delitem(sys.modules, "IPython")
    assert not jck._in_notebook()
    assert not jck._rich_ok(np)  # no isatty: not a terminal
