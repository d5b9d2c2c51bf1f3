"""Local reads land straight in the pieces: a request whose runs go to several places (a column-sharded
target needs a part of every saved row) is read with one scatter ``preadv`` into the pieces, with no staging
copy; a short read continues where it stopped, and a truncated file is a TruncatedDataError.
"""

from __future__ import annotations

import ctypes
import os

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jreshard
from jreshard import read, storage
from jreshard.errors import TruncatedDataError
from tests.helpers import check_loaded_array, make_mesh, spec_fits

SPECS = [P(None, "model"), P("data", "model"), P("model", "data"), P("data"), P()]


def _targets(ckpt, mesh):
    targets = {}
    for k, (name, info) in enumerate(sorted(ckpt.tensors.items())):
        fitting = [s for s in SPECS if spec_fits(s, info.shape, dict(mesh.shape))]
        targets[name] = jax.ShapeDtypeStruct(info.shape, info.dtype, sharding=NamedSharding(mesh, fitting[k % len(fitting)]))
    return targets


def _load_plain(checkpoints, spec=None) -> None:
    """Load the "plain" checkpoint with posix reads onto the (2, 4) mesh (each tensor with a spec that fits it,
    or ``spec`` for all) and check every array against torch's own reading."""
    mesh = make_mesh("2x4")
    ref = checkpoints.reference("plain")
    with jreshard.open(checkpoints.dirs["plain"], io="posix") as ckpt:
        if spec is None:
            targets = _targets(ckpt, mesh)
        else:
            targets = {n: jax.ShapeDtypeStruct(i.shape, i.dtype, sharding=NamedSharding(mesh, spec))
                       for n, i in ckpt.tensors.items()}
        out = ckpt.load(targets)
    for name, arr in out.items():
        check_loaded_array(arr, targets[name], np.asarray(ref[name]), f"plain: {name}")


def test_column_pieces_read_straight_into_pieces(checkpoints, monkeypatch):
    staged, scattered = [], []
    copy, fill = read._copy_runs_from, storage.LocalStore.fill_scatter

    def copy_runs(buf, origin, job, runs=None):
        if job.locator.data is None:  # bytes read from a file (not an archive held in memory)
            staged.append((job.name, (runs or job.runs).step))
        return copy(buf, origin, job, runs)

    def fill_scatter(self, fd, key, offset, iov):
        scattered.append(len(iov))
        return fill(self, fd, key, offset, iov)

    monkeypatch.setattr(read, "_copy_runs_from", copy_runs)
    monkeypatch.setattr(storage.LocalStore, "fill_scatter", fill_scatter)
    _load_plain(checkpoints)
    assert scattered and max(scattered) > 1  # requests scattered over several runs/pieces
    # Only runs placed element by element (a transposed destination) still go through a staging buffer.
    assert all(step for _, step in staged), sorted({n for n, step in staged if not step})



def test_bytes_held_in_memory_are_copied_on_the_read_threads(checkpoints, monkeypatch):
    """Small items held in memory are copied into their pieces by the read pool, not by the thread that plans
    and places (a first touch of a fresh piece faults in a whole huge page); the arrays are still exact."""
    import threading

    threads = []
    copy_runs, copy_elements = read._copy_runs_from, read._copy_elements_from

    def record(fn):
        def wrapped(buf, origin, job, *rest):
            if job.locator.data is not None:
                threads.append(threading.current_thread())
            return fn(buf, origin, job, *rest)
        return wrapped

    monkeypatch.setattr(read, "_copy_runs_from", record(copy_runs))
    monkeypatch.setattr(read, "_copy_elements_from", record(copy_elements))
    _load_plain(checkpoints)
    assert threads  # the checkpoint has such items
    assert threading.main_thread() not in threads


def test_items_read_whole_do_not_hold_up_the_next_unit(checkpoints, monkeypatch):
    """A unit's items read whole (small archives: here every tensor of a replicated target) are read and copied
    on the pool, behind the unit's other reads, and not waited for when the unit starts: starting it returns
    while its reads are still held back, so the next unit can be planned meanwhile. The arrays are exact."""
    import threading

    from jreshard.checkpoint import Checkpoint

    started, late = threading.Event(), []
    start_unit, pread_all = Checkpoint._start_unit, read.Executor._pread_all

    def start(self, *args, **kwargs):
        out = start_unit(self, *args, **kwargs)
        started.set()
        return out

    def held_back(self, *args):
        if not started.wait(20):  # the unit's start waited for this read: it would never come otherwise
            late.append(args[0][0])
        return pread_all(self, *args)

    monkeypatch.setattr(Checkpoint, "_start_unit", start)
    monkeypatch.setattr(read.Executor, "_pread_all", held_back)
    _load_plain(checkpoints, P())
    assert started.is_set() and not late


def _short_preadv(limit):
    """A preadv that reads at most ``limit`` bytes per call (as a signal or a slow file system may)."""

    def call(fd, iov_addr, count, offset):
        rows = np.ctypeslib.as_array((ctypes.c_uint64 * (2 * count)).from_address(iov_addr)).reshape(count, 2)
        done = 0
        for addr, length in rows.tolist():
            n = min(length, limit - done)
            data = os.pread(fd, n, offset + done)
            ctypes.memmove(addr, data, len(data))
            done += len(data)
            if len(data) < n or done == limit:
                break
        return done

    return call


@pytest.mark.parametrize("limit", [1, 7, 1000])
def test_scatter_short_reads_continue(tmp_path, monkeypatch, limit):
    data = np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8)
    (tmp_path / "f.bin").write_bytes(data.tobytes())
    monkeypatch.setattr(storage, "_PREADV_C", [_short_preadv(limit)])
    a, b, junk, c = (np.zeros(n, np.uint8) for n in (1500, 700, 300, 2000))
    iov = np.array([[x.ctypes.data, len(x)] for x in (a, b, junk, c)], np.uint64)
    store = storage.LocalStore(str(tmp_path))
    with store._use("f.bin") as fd:
        assert store.fill_scatter(fd, "f.bin", 100, iov)
    np.testing.assert_array_equal(np.concatenate([a, b, junk, c]), data[100:4600])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.integers(1, 40), min_size=1, max_size=30), st.integers(1, 6), st.integers(1, 120))
def test_scatter_reads_every_region_whatever_the_calls_return(tmp_path, monkeypatch, lengths, per_call, limit):
    """Regions read in calls of ``per_call`` regions (IOV_MAX), each call returning at most ``limit`` bytes: every
    byte lands in its region, however the short reads fall against the calls' windows."""
    data = np.random.default_rng(len(lengths)).integers(0, 256, sum(lengths) + 10, dtype=np.uint8)
    (tmp_path / "g.bin").write_bytes(data.tobytes())
    monkeypatch.setattr(storage, "_PREADV_C", [_short_preadv(limit)])
    monkeypatch.setattr(storage, "_IOV_MAX", per_call)
    bufs = [np.zeros(n, np.uint8) for n in lengths]
    iov = np.array([[x.ctypes.data, len(x)] for x in bufs], np.uint64)
    store = storage.LocalStore(str(tmp_path))
    with store._use("g.bin") as fd:
        assert store.fill_scatter(fd, "g.bin", 7, iov)
    np.testing.assert_array_equal(np.concatenate(bufs), data[7 : 7 + sum(lengths)])


def test_scatter_past_the_end_is_truncated(tmp_path):
    (tmp_path / "f.bin").write_bytes(bytes(range(100)))
    a, b = np.zeros(60, np.uint8), np.zeros(60, np.uint8)
    iov = np.array([[a.ctypes.data, 60], [b.ctypes.data, 60]], np.uint64)
    store = storage.LocalStore(str(tmp_path))
    with store._use("f.bin") as fd, pytest.raises(TruncatedDataError, match=r"f\.bin.*expected 120 bytes from offset 10 but the file ends at 100"):
        store.fill_scatter(fd, "f.bin", 10, iov)


@pytest.mark.parametrize("where", ["fill_scatter", "fill"])
def test_an_io_error_is_a_storage_error_naming_file_and_tensor(checkpoints, monkeypatch, where):
    """A failing disk (EIO from preadv) ends the load in a StorageError that names the file and the tensors, not
    a bare OSError."""
    from jreshard.errors import StorageError

    def broken(self, fd, key, *args):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(storage.LocalStore, where, broken)
    mesh = make_mesh("2x4")
    with jreshard.open(checkpoints.dirs["plain"], io="posix") as ckpt:
        targets = _targets(ckpt, mesh)
        with pytest.raises(StorageError, match=r"\.distcp.*Input/output error.*while reading tensor"):
            ckpt.load(targets)


def test_a_wait_for_two_parts_ends_both_and_raises_the_first_failure():
    from jreshard.checkpoint import _both

    calls = []

    def ok(tag):
        return lambda: calls.append(tag)

    def fails(tag):
        def wait():
            calls.append(tag)
            raise ValueError(tag)
        return wait

    _both(ok("a"), ok("b"))()
    assert calls == ["a", "b"]
    for first, second, raised in ((fails("a"), ok("b"), "a"), (ok("a"), fails("b"), "b"), (fails("a"), fails("b"), "a")):
        calls.clear()
        with pytest.raises(ValueError, match=raised):
            _both(first, second)()
        assert calls == ["a", "b"]  # the second part is waited for even after the first failed
