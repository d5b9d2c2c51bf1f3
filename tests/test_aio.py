"""Reads of local files in one io_submit (jreshard.aio, LocalStore.fill_many and the small requests of
LocalStore.read_ranges): every byte lands where a plain preadv puts it, a part the kernel does not serve whole is
reported (never taken as read), and a restore whose batched reads fail in any way falls back to plain reads and is
still exact, or raises the plain reads' error."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jreshard
from jreshard import aio, storage
from jreshard.errors import TruncatedDataError
from jreshard.storage import LocalStore
from tests.helpers import make_mesh
from tests.test_scatter_read import _load_plain, _targets

needs_aio = pytest.mark.skipif(not aio.available(), reason="native AIO is not available on this machine")


def _parts(lengths_per_part, offsets):
    bufs = [[np.zeros(n, np.uint8) for n in lengths] for lengths in lengths_per_part]
    iovs = [np.array([[b.ctypes.data, len(b)] for b in part], np.uint64).reshape(-1, 2) for part in bufs]
    return bufs, list(zip(offsets, iovs))


@needs_aio
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.lists(st.integers(1, 50), min_size=0, max_size=25), st.integers(0, 400)),
                min_size=1, max_size=8), st.integers(1, 7), st.integers(0, 40))
def test_parts_filled_in_one_submit_hold_the_files_bytes(tmp_path, monkeypatch, parts, per_call, short_by):
    """Parts of up to 25 regions, read ``per_call`` regions per iocb (IOV_MAX made small, so that parts span
    several iocbs): every region of a part reported filled holds the file's bytes; a part that runs past the end
    of the file (by ``short_by`` bytes, for the last part) is reported not filled, and only that one."""
    monkeypatch.setattr(storage, "_IOV_MAX", per_call)
    lengths = [p[0] for p in parts]
    offsets = [p[1] for p in parts]
    size = max(o + sum(ls) for ls, o in zip(lengths, offsets))
    if short_by and sum(lengths[-1]):
        size = max(0, offsets[-1] + sum(lengths[-1]) - short_by)
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)
    (tmp_path / "f.bin").write_bytes(data.tobytes())
    bufs, items = _parts(lengths, offsets)
    store = LocalStore(str(tmp_path))
    with store._use("f.bin") as fd:
        filled = store.fill_many(fd, items)
    for k, (part, offset) in enumerate(zip(bufs, offsets)):
        stop = offset + sum(len(b) for b in part)
        fits = stop <= size or stop == offset  # a part of no bytes reads nothing
        assert filled[k] == fits, (k, offset, stop, size)
        if fits:
            got = np.concatenate(part) if part else np.zeros(0, np.uint8)
            np.testing.assert_array_equal(got, data[offset:stop])


@needs_aio
def test_a_bad_descriptor_reads_nothing_and_says_so(tmp_path):
    (tmp_path / "f.bin").write_bytes(b"x" * 100)
    store = LocalStore(str(tmp_path))
    bufs, items = _parts([[10, 20]], [0])
    r, w = os.pipe()
    os.close(r)
    os.close(w)  # a closed descriptor: every read of it fails
    assert store.fill_many(r, items) == [False]
    assert not any(b.any() for b in bufs[0])


def test_without_native_aio_every_part_is_left_to_plain_reads(tmp_path, monkeypatch):
    (tmp_path / "f.bin").write_bytes(b"x" * 100)
    monkeypatch.setitem(aio._STATE, "libc", None)
    store = LocalStore(str(tmp_path))
    bufs, items = _parts([[10], [5, 5], []], [0, 20, 0])
    with store._use("f.bin") as fd:
        assert store.fill_many(fd, items) == [False, False, True]  # an empty part has nothing to read
    assert not any(b.any() for part in bufs for b in part)
    assert aio.submit(aio.rows(1)) is None


@needs_aio
def test_small_ranges_are_read_in_one_submit(tmp_path, monkeypatch):
    data = os.urandom(200_000)
    (tmp_path / "a.bin").write_bytes(data)
    (tmp_path / "b.bin").write_bytes(data[::-1])
    submits = []
    real = aio.submit

    def counted(cbs):
        submits.append(len(cbs))
        return real(cbs)

    monkeypatch.setattr(aio, "submit", counted)
    store = LocalStore(str(tmp_path))
    requests = [("a.bin", 10, 4000), ("b.bin", 0, 1), ("a.bin", 100, 100), ("b.bin", 100_000, 170_000),
                ("a.bin", 199_000, 200_000)]
    got = store.read_ranges(requests)
    files = {"a.bin": data, "b.bin": data[::-1]}
    assert got == [files[k][a:b] for k, a, b in requests]
    assert submits == [3]  # the empty request needs no read, the 70 kB one is read plainly


def test_a_fork_makes_its_own_contexts(tmp_path):
    """io contexts do not survive fork(): a child reads through contexts of its own (or plainly), never through
    the parent's."""
    (tmp_path / "f.bin").write_bytes(bytes(range(256)) * 4)
    store = LocalStore(str(tmp_path))
    assert store.read_ranges([("f.bin", 0, 3), ("f.bin", 300, 303)]) == [bytes([0, 1, 2]), bytes([44, 45, 46])]
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        ok = False
        try:
            got = LocalStore(str(tmp_path)).read_ranges([("f.bin", 1, 4), ("f.bin", 301, 304)])
            ok = got == [bytes([1, 2, 3]), bytes([45, 46, 47])]
            ok = ok and aio._STATE.get("pid") in (None, os.getpid())
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


@pytest.mark.parametrize("fault", ["refused", "short", "error", "half"])
def test_a_restore_whose_batched_reads_fail_reads_plainly_and_is_exact(checkpoints, monkeypatch, fault):
    """Whatever io_submit reports (nothing served, short counts, errors, half of the parts), the restore reads
    what it did not serve with plain reads and returns the exact arrays."""
    real = aio.submit
    served = []

    def faulty(cbs):
        served.append(len(cbs))
        if fault == "refused":
            return None
        if fault == "error":  # EIO for every row, nothing read
            return np.full(len(cbs), -5, np.int64)
        if fault == "short":  # every read really stops early: half of its regions (bytes) asked for
            cut = cbs.copy()
            cut["nbytes"] = np.maximum(1, cut["nbytes"] // 2)
            return real(cut)
        res = np.full(len(cbs), aio.NOT_SERVED, np.int64)  # "half": every other row is not submitted
        half = cbs[::2].copy()
        got = real(half)
        if got is not None:
            res[::2] = got
        return res

    monkeypatch.setattr(aio, "submit", faulty)
    _load_plain(checkpoints)
    assert served


def test_a_file_cut_while_read_is_reported_by_the_plain_read(checkpoints, tmp_path, monkeypatch):
    """The .distcp files cut short just before the first batched read of their data: that read comes back short
    (a part not filled), the plain read of that part raises TruncatedDataError, and so does the load (naming a
    file), instead of returning a half-filled array."""
    import shutil

    directory = tmp_path / "cut"
    shutil.copytree(checkpoints.dirs["plain"], directory)
    reported, raised = [], []
    real_many, real_scatter, real_fill = LocalStore.fill_many, LocalStore.fill_scatter, LocalStore.fill

    def fill_many(self, fd, parts):
        if not reported:
            for f in directory.glob("*.distcp"):
                os.truncate(f, 0)
        filled = real_many(self, fd, parts)
        reported.extend(filled)
        return filled

    def plain(real):
        def read(self, *args):
            try:
                return real(self, *args)
            except TruncatedDataError as e:
                raised.append(e)
                raise
        return read

    monkeypatch.setattr(LocalStore, "fill_many", fill_many)
    monkeypatch.setattr(LocalStore, "fill_scatter", plain(real_scatter))
    monkeypatch.setattr(LocalStore, "fill", plain(real_fill))
    with jreshard.open(str(directory), io="posix") as ckpt:
        targets = _targets(ckpt, make_mesh("2x4"))
        with pytest.raises(TruncatedDataError, match=r"__\d_0\.distcp.*truncated file"):
            ckpt.load(targets)
    assert reported and False in reported
    assert raised  # the parts the batched read did not fill went to the plain read, which raised
