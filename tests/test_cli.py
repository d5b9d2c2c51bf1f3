"""The ``jreshard`` console script, run for real (``.venv/bin/jreshard`` in a subprocess) on checkpoints written by
torch: its output, its ``--json`` documents (equal to what the Python API computes, and to what a load then
reads), its exit codes, and one readable line for every error a user can cause."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh

import jreshard
from jreshard.rules import format_spec, parse_rules, target_for
from tests.helpers import REPO_ROOT, child_env

SCRIPT = Path(sys.executable).parent / "jreshard"
if not SCRIPT.exists():
    SCRIPT = Path(shutil.which("jreshard") or "jreshard")
SAMPLE = jreshard.sample_path()


def run(*args, env=None, timeout=300, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("stdout", subprocess.PIPE)
    return subprocess.run([str(SCRIPT), *map(str, args)], check=False, stderr=subprocess.PIPE, text=True,
                          cwd=str(REPO_ROOT), env=env or child_env(JAX_PLATFORMS="cpu"), timeout=timeout, **kw)


def one_error_line(proc: subprocess.CompletedProcess, *words: str, rc: int = 2) -> str:
    """The process failed with ``rc``, printing nothing on stdout and one ``jreshard: ...`` line on stderr."""
    assert proc.returncode == rc, (proc.returncode, proc.stderr[-3000:])
    assert proc.stdout == "", proc.stdout[-3000:]
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("jreshard: "), proc.stderr[-3000:]
    assert all(w in lines[0] for w in words), lines[0]
    return lines[0]


def mesh_of(shape: dict) -> Mesh:
    n = int(np.prod(list(shape.values())))
    return Mesh(np.array(jax.devices()[:n]).reshape(tuple(shape.values())), tuple(shape))


def test_version():
    proc = run("--version")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, f"jreshard {jreshard.__version__}\n", "")
    module = subprocess.run([sys.executable, "-m", "jreshard", "--version"], check=False, capture_output=True,
                            text=True, cwd=str(REPO_ROOT), env=child_env(), timeout=300)
    assert (module.returncode, module.stdout) == (0, proc.stdout)


def test_inspect_text():
    proc = run("inspect", SAMPLE)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    ckpt = jreshard.open(SAMPLE)
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("<jreshard.Checkpoint dcp")
    for name, info in ckpt.tensors.items():
        row = next(line for line in lines if f" {name} " in line)
        assert str(info.dtype) in row and str(info.shape) in row and f" {len(info.chunks)} " in row, row
    assert any(" step " in line and " 100 " in line for line in lines)


def test_inspect_json(checkpoints):
    proc = run("inspect", checkpoints.dirs["plain"], "--json")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    doc = json.loads(proc.stdout)
    ckpt = jreshard.open(checkpoints.dirs["plain"])
    assert doc["format"] == "dcp" and list(doc["tensors"]) == list(ckpt.tensors)
    for name, info in ckpt.tensors.items():
        t = doc["tensors"][name]
        assert (t["dtype"], tuple(t["shape"]), t["nbytes"]) == (str(info.dtype), info.shape, info.nbytes)
        assert [(tuple(c["offsets"]), tuple(c["sizes"])) for c in t["chunks"]] == [(c.offsets, c.sizes) for c in
                                                                                   info.chunks]
    assert doc["objects"] == checkpoints.torch_objects["plain"] == dict(ckpt.objects)


RULES_TOML = r"""
[mesh]
data = 4
model = 2

[rules]
'^mp\.(a|c)$' = "data,model"
'^mp\.' = "(data,model),_"
'^plain\.w$' = "_,model"
"""


def test_plan_json_is_the_python_plan_and_what_load_reads(checkpoints, tmp_path):
    """plan --json (mesh and rules from a TOML file) has the figures of jreshard.plan for the same target, and a
    load of that target reads exactly its bytes in its requests."""
    rules = tmp_path / "rules.toml"
    rules.write_text(RULES_TOML)
    src = checkpoints.dirs["plain"]
    proc = run("plan", src, "--rules", rules, "--max-inflight", "64KiB", "--json")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    assert doc["mesh"] == {"data": 4, "model": 2}
    assert doc["rules"] == [[p, format_spec(s)] for p, s in parse_rules(rules)]
    mesh = mesh_of(doc["mesh"])
    with jreshard.open(src) as ck:
        target = target_for(ck, mesh, parse_rules(rules))
        plan = jreshard.plan(ck, target, max_inflight_bytes=64 * 1024)
        assert doc["processes"] == {str(pid): {"bytes_needed": p.bytes_needed, "bytes_to_read": p.bytes_to_read,
                                               "num_reads": p.num_reads, "pieces": p.pieces,
                                               "amplification": p.amplification}
                                    for pid, p in plan.processes.items()}
        assert list(doc["tensors"]) == list(target)
        for name, t in doc["tensors"].items():
            assert t["spec"] == format_spec(target[name].sharding.spec), name
            assert (t["pieces"], t["bytes_needed"]) == (plan.local.tensors[name]["pieces"],
                                                        plan.local.tensors[name]["bytes_needed"]), name
            assert (t["dtype"], tuple(t["shape"])) == (str(target[name].dtype), target[name].shape)
        assert doc["tensors"]["mp.a"]["spec"] == "data,model" and doc["tensors"]["mp.b"]["spec"] == "(data,model),_"
        before = (ck.io_stats.bytes_read, ck.io_stats.num_reads)
        ck.load(target, max_inflight_bytes=64 * 1024)
        after = (ck.io_stats.bytes_read, ck.io_stats.num_reads)
    local = doc["processes"][str(doc["this_process"])]
    assert (after[0] - before[0], after[1] - before[1]) == (local["bytes_to_read"], local["num_reads"])


def test_plan_text_picture_and_png(tmp_path):
    png = tmp_path / "head.png"
    proc = run("plan", SAMPLE, "--mesh", "2x4", "--axes", "fsdp,tp", "--rules", r"head\.weight$=fsdp,tp",
               "--tensor", "model.head.weight", "--png", png, "--png-size", "321x123")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr[-3000:]
    out = proc.stdout
    assert "mesh fsdp=2,tp=4 (8 cpu devices)" in out and "amplification" in out
    assert "model.head.weight  float32 (10, 32)" in out  # the picture's caption
    row = next(line for line in out.splitlines() if " model.head.weight " in line)
    assert "fsdp,tp" in row and " 8 " in row  # 8 shards on this process
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", data[16:24]) == (321, 123)


def test_demo_json():
    proc = run("demo", "--json")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    assert doc["equal_to_whole_read"] is True and doc["mesh"] == {"data": 2, "model": 4}
    local = doc["plan"]["processes"]["0"]
    assert (doc["bytes_read"], doc["num_reads"]) == (local["bytes_to_read"], local["num_reads"])
    ck = jreshard.open(SAMPLE)
    assert set(doc["tensors"]) == set(ck.tensors) and doc["objects"] == {"step": 100}
    embed = doc["tensors"]["model.embed.weight"]
    assert embed["spec"] == "data,model" and embed["placed"]["[0:32,0:8]"] == [0]


def test_convert_json(tmp_path):
    dest = tmp_path / "orbax"
    proc = run("convert", SAMPLE, dest, "--quiet", "--json")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    assert Path(doc["dest"]) == dest.resolve() and dest.is_dir() and doc["source"] == SAMPLE


def test_errors_are_one_line(tmp_path):
    not_ckpt = tmp_path / "notes.pt"
    not_ckpt.write_bytes(b"not a checkpoint at all")
    one_error_line(run("inspect", tmp_path / "missing"), "MissingDataError", str(tmp_path / "missing"))
    one_error_line(run("inspect", not_ckpt), "CheckpointFormatError", str(not_ckpt))
    one_error_line(run("plan", SAMPLE, "--mesh", "2,4"), "mesh '2,4'", "data=2,model=4")
    one_error_line(run("plan", SAMPLE, "--rules", r"embed\.weight$=model,,_"), "rules pair 1", "empty entry")
    one_error_line(run("plan", SAMPLE, "--rules", "embed=model,_,_"), "'model.embed.weight'", "'embed'",
                   "3 entries")
    one_error_line(run("plan", SAMPLE, "--bogus"), "--bogus")


def test_broken_pipe_is_quiet(checkpoints):
    """stdout closed before the command writes: no traceback, no 'Exception ignored', exit 141 (as SIGPIPE);
    through a shell pipe into head, the first bytes and nothing on stderr."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = run("inspect", SAMPLE, stdout=write_end)
    finally:
        os.close(write_end)
    assert (proc.returncode, proc.stderr) == (141, "")
    shell = subprocess.run(f"'{SCRIPT}' inspect '{checkpoints.dirs['plain']}' | head -c 10", shell=True, check=False,
                           capture_output=True, text=True, cwd=str(REPO_ROOT), env=child_env(), timeout=300)
    assert (shell.returncode, shell.stdout, shell.stderr) == (0, "<jreshard.", "")


def test_missing_extra_is_one_line(tmp_path):
    """Without typer (the cli extra), the command says how to install it, and exits 2."""
    blocked = tmp_path / "blocked" / "typer"
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text("raise ImportError('typer is blocked in this test')\n")
    env = child_env()
    env["PYTHONPATH"] = os.pathsep.join([str(blocked.parent), env["PYTHONPATH"]])
    proc = run("inspect", SAMPLE, env=env)
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == "jreshard: the command line needs its extra: pip install 'jreshard[cli]'\n"
