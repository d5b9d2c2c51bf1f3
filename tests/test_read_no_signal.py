"""A checkpoint file truncated while it is being loaded raises TruncatedDataError; it never kills the process.

Local files are read with ``pread``/``preadv`` (short counts become TruncatedDataError). A memory map of a file
that shrinks raises SIGBUS where its pages are touched, which no size check made beforehand can rule out. Each
load runs in a child process so that a signal shows up as a negative return code instead of ending pytest.
Partial-row reads (a piece needing a part of every saved row) are covered in particular: they used the map.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import REPO_ROOT, child_env

PRELUDE = r'''
import glob, os, sys, threading
import numpy as np
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import jreshard
from jreshard import errors

def truncate(files, size=4096):
    for f in files:
        os.truncate(f, min(size, os.path.getsize(f)))

def report(e):
    print("ERROR", type(e).__name__, isinstance(e, errors.JReshardError))
    print("MESSAGE", e)
    sys.stdout.flush()
'''

# load(): the progress callback (called after each batch) truncates every data file after the first batch.
LOAD_CHILD = PRELUDE + r'''
path = sys.argv[1]
files = sorted(glob.glob(os.path.join(path, "*.distcp")))
mesh = Mesh(np.array(jax.devices()[:2]), ("model",))
ckpt = jreshard.open(path)
names = ["d1.s0", "mp.a", "mp.d", "mp.b"]  # small first; mp.a / mp.b: saved by rows, read by columns
target = {n: jax.ShapeDtypeStruct(ckpt.tensors[n].shape, ckpt.tensors[n].dtype,
                                  sharding=NamedSharding(mesh, P(None, "model"))) for n in names}
ckpt.plan(target)  # locates every chunk (headers) before the files shrink: the data reads must see it
batches = []

def progress(info):
    batches.append(info["bytes_done"])
    if len(batches) == 1:
        truncate(files)

try:
    ckpt.load(target, max_inflight_bytes=64 * 1024, progress=progress)
    print("LOADED", len(batches))
except Exception as e:
    report(e)
print("BATCHES", len(batches))
'''

# Checkpoint.read of boxes needing a part of every row, with the file truncated between open and read.
READ_CHILD = PRELUDE + r'''
path, pattern = sys.argv[1], sys.argv[2]
boxes = [(n, (slice(a, b), slice(c, d))) for n, a, b, c, d in
         (x.split(":")[0:1] + [int(v) for v in x.split(":")[1:]] for x in sys.argv[3:])]
files = sorted(glob.glob(os.path.join(path, pattern)))
ckpt = jreshard.open(path)
for name, _ in boxes:
    ckpt.read(name, (slice(None), slice(0, 1)))  # locates every chunk (headers) before the files shrink
truncate(files)
for name, box in boxes:
    try:
        ckpt.read(name, box)
        print("READ", name)
    except Exception as e:
        report(e)
        break
'''

# Truncation racing with reads: a thread shrinks the file while partial-row reads copy from it.
RACE_CHILD = PRELUDE + r'''
path, name = sys.argv[1], sys.argv[2]
files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
ckpt = jreshard.open(path)
rows, cols = ckpt.tensors[name].shape
box = (slice(0, rows), slice(1, cols // 2))
first = ckpt.read(name, box)
go = threading.Event()

def shrink():
    go.wait()
    truncate(files)

t = threading.Thread(target=shrink)
t.start()
try:
    for i in range(200):
        ckpt.read(name, box)
        go.set()
    t.join()
    ckpt.read(name, box)  # the file is short now: this read must fail
    print("NO ERROR")
except Exception as e:
    report(e)
go.set()
t.join()
'''


def _run(code: str, *args: str) -> subprocess.CompletedProcess:
    env = child_env(XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu", OMP_NUM_THREADS=1)
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], env=env, cwd=str(REPO_ROOT),
                          capture_output=True, text=True, timeout=300)


def _assert_truncated(proc: subprocess.CompletedProcess, *named: str) -> str:
    out = f"rc={proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    assert proc.returncode >= 0, f"the child was killed by signal {-proc.returncode}\n{out}"
    assert proc.returncode == 0, out
    assert "ERROR TruncatedDataError True" in proc.stdout, out
    message = next(line for line in proc.stdout.splitlines() if line.startswith("MESSAGE"))
    for word in named:
        assert word in message, f"{word!r} not in {message!r}"
    return message


def _copy(checkpoints, variant, tmp_path):
    dst = tmp_path / variant
    shutil.copytree(checkpoints.dirs[variant], dst)
    return dst


def test_truncated_during_load(checkpoints, tmp_path):
    path = _copy(checkpoints, "plain", tmp_path)
    proc = _run(LOAD_CHILD, path)
    _assert_truncated(proc, "while reading tensor", "truncated", str(path))
    assert "LOADED" not in proc.stdout and "BATCHES 0" not in proc.stdout, proc.stdout  # failed after a batch


@pytest.mark.parametrize("box", ["mp.a:0:512:0:3", "mp.a:100:300:7:260", "mp.b:0:256:0:100"])
def test_partial_rows_truncated_between_open_and_read(checkpoints, tmp_path, box):
    path = _copy(checkpoints, "plain", tmp_path)
    proc = _run(READ_CHILD, path, "*.distcp", box)
    _assert_truncated(proc, repr(box.split(":")[0]), str(path))


def _safetensors(tmp_path, shape=(512, 1024)):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    path = tmp_path / "st"
    path.mkdir()
    save_file({"small": np.arange(12, dtype=np.float32).reshape(3, 4),
               "w": rng.standard_normal(shape, dtype=np.float32)}, str(path / "model.safetensors"))
    return path


def test_safetensors_partial_rows_truncated(tmp_path):
    path = _safetensors(tmp_path)
    proc = _run(READ_CHILD, path, "*.safetensors", "w:0:8:0:3", "w:0:512:500:900")
    _assert_truncated(proc, "'w'", "model.safetensors")


def test_truncated_while_reading(tmp_path):
    """The file shrinks while reads copy from it: a map would be touched past its end (SIGBUS)."""
    path = _safetensors(tmp_path, (2048, 2048))
    proc = _run(RACE_CHILD, path, "w")
    _assert_truncated(proc, "'w'", "model.safetensors")
