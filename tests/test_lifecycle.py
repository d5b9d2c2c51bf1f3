"""Checkpoint lifetime: close() before, during and after loads and reads (real threads, real DCP checkpoints
written by torch), and target dtypes that JAX would narrow while 64-bit types are off.

A closed checkpoint refuses every later use with CheckpointClosedError; a close() that lands during a load
fails that load (never wrong tensors, never a half-filled array); the store never closes a descriptor under a
running read, so a number reused by another ``open`` can never feed a read another file's bytes.
"""

from __future__ import annotations

import os
import random
import threading
import time

import numpy as np
import pytest

import jax
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

import jreshard
from jreshard.errors import CheckpointClosedError, JReshardError, StorageError, TargetMismatchError
from jreshard.storage import KvStore, LocalStore
from tests.helpers import assert_same, make_mesh

# The larger tensors of the "plain" variant (about 3.5 MiB together): many batches under a small bound.
BIG = ("mp.a", "mp.b", "mp.c", "mp.d", "mp.e")
IOS = ("posix", "tensorstore")


def _targets(ckpt, names, spec=P("data")):
    mesh = make_mesh("8")
    return {n: jax.ShapeDtypeStruct(ckpt.tensors[n].shape, ckpt.tensors[n].dtype, sharding=NamedSharding(mesh, spec))
            for n in names}


def _one_device(ckpt, name, dtype=None):
    t = ckpt.tensors[name]
    return {name: jax.ShapeDtypeStruct(t.shape, dtype or t.dtype, sharding=SingleDeviceSharding(jax.devices()[0]))}


# ---------------------------------------------------------------------------------------------
# a closed checkpoint
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("io", IOS)
def test_closed_checkpoint_refuses_every_use(io):
    ckpt = jreshard.open(jreshard.sample_path(), io=io)
    assert isinstance(ckpt.store, LocalStore if io == "posix" else KvStore)
    name = "model.layers.0.w1"
    target = _one_device(ckpt, name)
    expected = ckpt.read(name)
    ckpt.close()
    ckpt.close()  # idempotent
    calls = {
        "read": lambda: ckpt.read(name),
        "read box": lambda: ckpt.read(name, (slice(0, 2),)),
        "load": lambda: ckpt.load(target),
        "plan": lambda: ckpt.plan(target),
        "objects": lambda: ckpt.objects,
        "jreshard.load": lambda: jreshard.load(ckpt, target),
        "store.read": lambda: ckpt.store.read(".metadata", 0, 4),
    }
    for what, call in calls.items():
        with pytest.raises(CheckpointClosedError) as e:
            call()
        assert isinstance(e.value, StorageError) and isinstance(e.value, JReshardError), what
        assert "closed" in str(e.value), what
    # Inspection that needs no I/O keeps working.
    assert ckpt.tensors[name].shape == expected.shape
    ckpt.close()


def test_close_from_many_threads_at_once(checkpoints):
    ckpt = jreshard.open(checkpoints.dirs["plain"])
    ckpt.read("mp.a")  # opens files
    barrier = threading.Barrier(6)
    errors = []

    def close():
        try:
            barrier.wait(5)
            ckpt.close()
        except Exception as e:  # pragma: no cover - the test fails on any
            errors.append(e)

    threads = [threading.Thread(target=close) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not errors
    assert ckpt.store._fds == {}
    with pytest.raises(CheckpointClosedError):
        ckpt.read("mp.a")


# ---------------------------------------------------------------------------------------------
# close() during a load
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("io", IOS)
def test_close_from_progress_callback_fails_the_load(checkpoints, io):
    ckpt = jreshard.open(checkpoints.dirs["plain"], io=io)
    calls = []

    def progress(info):
        calls.append(dict(info))
        if len(calls) == 2:
            ckpt.close()

    with pytest.raises(CheckpointClosedError):
        ckpt.load(_targets(ckpt, BIG), max_inflight_bytes=256 * 2**10, progress=progress)
    # The load stopped at the batch after the close, long before the end.
    assert len(calls) == 2
    assert calls[-1]["bytes_done"] < calls[-1]["bytes_total"]
    if io == "posix":
        assert ckpt.store._fds == {}  # no read was running any more: the files are closed


def test_close_after_the_last_read_still_fails_the_load(checkpoints):
    """Decision: a close() before load() returns fails it, even when every byte was already read (the data
    would be complete and correct), so that 'closed during the load' never races between two outcomes."""
    ckpt = jreshard.open(checkpoints.dirs["plain"])
    seen = []

    def progress(info):
        seen.append(info["bytes_done"])
        if info["bytes_done"] == info["bytes_total"]:
            ckpt.close()

    with pytest.raises(CheckpointClosedError):
        ckpt.load(_targets(ckpt, BIG), max_inflight_bytes=1 * 2**20, progress=progress)
    assert seen and seen[-1] == sum(ckpt.tensors[n].nbytes for n in BIG)


@pytest.mark.parametrize("io", IOS)
def test_close_from_another_thread_fails_the_load(checkpoints, io):
    ckpt = jreshard.open(checkpoints.dirs["plain"], io=io)
    started, closed = threading.Event(), threading.Event()

    def progress(info):
        started.set()
        assert closed.wait(10), "the closer thread did not close"

    def closer():
        assert started.wait(10)
        ckpt.close()
        closed.set()

    t = threading.Thread(target=closer)
    t.start()
    try:
        with pytest.raises(CheckpointClosedError):
            ckpt.load(_targets(ckpt, BIG), max_inflight_bytes=512 * 2**10, progress=progress)
    finally:
        t.join(10)


def test_close_during_a_running_read_waits_for_it(checkpoints, monkeypatch):
    """close() lands while a preadv is running: the descriptor stays open (same file) until that read ends,
    the read returns the right bytes, and the last reader closes the files."""
    directory = checkpoints.dirs["plain"]
    key = "__1_0.distcp"
    with open(directory / key, "rb") as f:
        expected = f.read()
    store = LocalStore(str(directory))
    real_preadv = os.preadv
    seen = []

    def preadv(fd, buffers, offset, *args):
        if not seen:
            store.close()  # as if another thread closed right now
            seen.append(os.fstat(fd))
            assert store._closed and store._uses == 1 and key in store._fds
        return real_preadv(fd, buffers, offset, *args)

    monkeypatch.setattr(os, "preadv", preadv)
    buf = np.empty(100_000, np.uint8)
    store.read_into(key, 1000, buf)
    assert buf.tobytes() == expected[1000:101_000]
    assert (seen[0].st_ino, seen[0].st_dev) == (os.stat(directory / key).st_ino, os.stat(directory / key).st_dev)
    assert store._uses == 0 and store._fds == {}  # the reader closed the files when it ended
    with pytest.raises(CheckpointClosedError):
        store.read_into(key, 0, buf)
    with pytest.raises(CheckpointClosedError):
        store.read_ranges([(key, 0, 10)])
    with pytest.raises(CheckpointClosedError):
        store.size(key)
    with pytest.raises(CheckpointClosedError):
        store.fd(key)


def test_checkpoint_read_closed_during_its_reads(checkpoints, monkeypatch):
    ckpt = jreshard.open(checkpoints.dirs["plain"], io="posix")
    real_preadv = os.preadv
    calls = []

    def preadv(fd, buffers, offset, *args):
        calls.append(fd)
        if len(calls) == 1:
            ckpt.close()
        return real_preadv(fd, buffers, offset, *args)

    monkeypatch.setattr(os, "preadv", preadv)
    with pytest.raises(CheckpointClosedError):
        ckpt.read("mp.c")
    assert calls


# ---------------------------------------------------------------------------------------------
# stress: close() during loads and reads while other files are opened all the time
# ---------------------------------------------------------------------------------------------


class _Openers:
    """Threads that open and close decoy files (every byte 0x5A) in a loop: a descriptor number that the
    store closed under a running read would be reused by one of them, and the read would see 0x5A bytes."""

    def __init__(self, directory, n_threads: int = 2, size: int = 2**20) -> None:
        self.paths = []
        for i in range(4):
            p = directory / f"decoy{i}.bin"
            p.write_bytes(b"\x5a" * size)
            self.paths.append(str(p))
        self.stop = threading.Event()
        self.opened = 0
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(n_threads)]

    def _run(self) -> None:
        while not self.stop.is_set():
            fds = [os.open(p, os.O_RDONLY) for p in self.paths]
            self.opened += len(fds)
            for fd in fds:
                os.close(fd)

    def __enter__(self) -> "_Openers":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(10)


def test_stress_store_reads_while_closing_never_see_other_bytes(checkpoints, tmp_path):
    directory = checkpoints.dirs["plain"]
    keys = sorted(p.name for p in directory.glob("*.distcp"))
    data = {k: (directory / k).read_bytes() for k in keys}
    rng = random.Random(1234)
    ok, closed, failures = [], [], []  # list.append is atomic: no lock needed
    deadline = time.monotonic() + 1.5
    with _Openers(tmp_path) as openers:
        rounds = 0
        while rounds < 10 or (time.monotonic() < deadline and rounds < 200):
            rounds += 1
            store = LocalStore(str(directory))
            go = threading.Event()

            def reader(seed):
                r = random.Random(seed)
                go.wait(5)
                for _ in range(100_000):  # bounded: a store that never refuses fails the test, not hangs it
                    key = r.choice(keys)
                    n = r.randint(1, 64 * 2**10)
                    off = r.randint(0, len(data[key]) - n)
                    try:
                        if r.random() < 0.5:
                            buf = np.empty(n, np.uint8)
                            store.read_into(key, off, buf)
                            got = buf.tobytes()
                        else:
                            got = store.read_ranges([(key, off, off + n)])[0]
                    except CheckpointClosedError:
                        closed.append(1)
                        return
                    except Exception as e:  # EBADF, a short read ... any is a failure
                        failures.append(f"{type(e).__name__}: {e}")
                        return
                    if got != data[key][off : off + n]:
                        failures.append(f"wrong bytes from {key} [{off}, {off + n}): {got[:8]!r}")
                        return
                    ok.append(1)
                failures.append("the store kept reading after close()")

            threads = [threading.Thread(target=reader, args=(rng.random(),)) for _ in range(4)]
            for t in threads:
                t.start()
            go.set()
            time.sleep(rng.random() * 0.003)
            store.close()
            for t in threads:
                t.join(10)
            assert not failures, failures[:5]
            assert store._fds == {} and store._uses == 0
        assert openers.opened > 0
    assert len(closed) == 4 * rounds  # every reader ended on the close, none on another error
    assert ok


@pytest.mark.parametrize("io", IOS)
def test_stress_close_during_loads_never_returns_wrong_tensors(checkpoints, tmp_path, io):
    ref = checkpoints.reference("plain")
    rng = random.Random(99)
    outcomes = {"ok": 0, "closed": 0}
    with _Openers(tmp_path):
        for _ in range(6):
            ckpt = jreshard.open(checkpoints.dirs["plain"], io=io)
            started = threading.Event()
            delay = rng.random() * 0.02

            def closer():
                started.wait(10)
                time.sleep(delay)
                ckpt.close()

            t = threading.Thread(target=closer)
            t.start()
            try:
                out = ckpt.load(_targets(ckpt, BIG), max_inflight_bytes=128 * 2**10, progress=lambda info: started.set())
            except CheckpointClosedError:
                outcomes["closed"] += 1
            else:
                outcomes["ok"] += 1
                for n in BIG:
                    assert_same(np.asarray(out[n]), ref[n], n)
            finally:
                t.join(10)
            # A checkpoint read while being closed: the whole tensor or CheckpointClosedError.
            ckpt2 = jreshard.open(checkpoints.dirs["plain"], io=io)
            t2 = threading.Timer(rng.random() * 0.002, ckpt2.close)
            t2.start()
            try:
                got = ckpt2.read("mp.c")
            except CheckpointClosedError:
                pass
            else:
                assert_same(got, ref["mp.c"], "mp.c")
            finally:
                t2.join(10)
    assert outcomes["closed"] > 0


# ---------------------------------------------------------------------------------------------
# target dtypes JAX would narrow (jax_enable_x64 off)
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def x64_off():
    before = jax.config.read("jax_enable_x64")
    jax.config.update("jax_enable_x64", False)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", before)


@pytest.fixture
def wide_file(tmp_path):
    """A safetensors file (written by safetensors itself) of 64-bit values that do not fit 32 bits."""
    from safetensors.numpy import save_file

    arrays = {
        "ids": np.array([2**40 + 7, -(2**35) - 1, 5, 2**62], np.int64),
        "big_u": np.array([2**63 + 9, 3], np.uint64),
        "f64": np.array([1e30, 1 + 2**-40], np.float64),
        "small": np.array([1.5, 2.5], np.float32),
    }
    path = tmp_path / "wide.safetensors"
    save_file(arrays, str(path))
    return path, arrays


def test_x64_on_loads_64_bit_values_exactly(wide_file):
    assert jax.config.read("jax_enable_x64")  # tests/conftest.py
    path, arrays = wide_file
    with jreshard.open(path) as ckpt:
        for name in ("ids", "big_u", "f64"):
            out = ckpt.load(_one_device(ckpt, name))
            assert_same(np.asarray(out[name]), arrays[name], name)


@pytest.mark.parametrize("name, narrow", [("ids", "int32"), ("big_u", "uint32"), ("f64", "float32")])
def test_x64_off_a_64_bit_target_is_refused_before_reading(wide_file, x64_off, name, narrow):
    path, arrays = wide_file
    with jreshard.open(path) as ckpt:
        target = _one_device(ckpt, name)
        assert np.dtype(target[name].dtype) == arrays[name].dtype  # ShapeDtypeStruct keeps the 64-bit dtype
        before = ckpt.io_stats.bytes_read
        for call in (ckpt.load, ckpt.plan):
            with pytest.raises(TargetMismatchError) as e:
                call(target)
            msg = str(e.value)
            assert repr(name) in msg and narrow in msg, msg
            assert 'jax.config.update("jax_enable_x64", True)' in msg and "JAX_ENABLE_X64=1" in msg, msg
        assert ckpt.io_stats.bytes_read == before  # refused before any byte was read
        # An explicit narrower dtype with cast="unsafe" is a cast the caller asked for: allowed.
        out = ckpt.load(_one_device(ckpt, name, np.dtype(narrow)), cast="unsafe")[name]
        assert out.dtype == np.dtype(narrow)
        assert_same(np.asarray(out), arrays[name].astype(np.dtype(narrow)), name)
        # A 32-bit tensor is not concerned.
        assert_same(np.asarray(ckpt.load(_one_device(ckpt, "small"))["small"]), arrays["small"], "small")


@pytest.mark.parametrize("dtype", ["int64", "float64", "complex128"])
def test_x64_off_dcp_64_bit_tensors_are_refused(checkpoints, x64_off, dtype):
    name = f"dtypes.sharded.{dtype}"
    with jreshard.open(checkpoints.dirs["plain"]) as ckpt:
        target = _targets(ckpt, [name], P(None))
        with pytest.raises(TargetMismatchError, match="jax_enable_x64"):
            ckpt.load(target)
        with pytest.raises(TargetMismatchError, match="jax_enable_x64"):
            jreshard.plan(ckpt, target)


def test_x64_off_in_a_fresh_process(wide_file):
    """The default configuration (no JAX_ENABLE_X64 in the environment), in a child process."""
    import subprocess
    import sys

    from tests.helpers import REPO_ROOT, child_env

    path, _ = wide_file
    code = (
        "import jax, numpy as np, jreshard\n"
        "from jax.sharding import SingleDeviceSharding\n"
        "assert not jax.config.read('jax_enable_x64')\n"
        f"ckpt = jreshard.open({str(path)!r})\n"
        "s = SingleDeviceSharding(jax.devices()[0])\n"
        "try:\n"
        "    ckpt.load({'ids': jax.ShapeDtypeStruct((4,), np.int64, sharding=s)})\n"
        "except jreshard.TargetMismatchError as e:\n"
        "    print('refused', 'ids' in str(e))\n"
        "out = ckpt.load({'ids': jax.ShapeDtypeStruct((4,), np.int32, sharding=s)}, cast='unsafe')['ids']\n"
        "print(out.dtype, int(out[0]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=child_env(JAX_PLATFORMS="cpu"), cwd=str(REPO_ROOT),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split("\n")[:2] == ["refused True", "int32 7"], proc.stdout
