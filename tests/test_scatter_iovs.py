"""The scatter lists of local reads (jreshard.read._scatter_iovs), built for many requests at once: applied to
a file's bytes (each row takes the next bytes of the request), they put every run of every job at its place in
its piece, send only unneeded bytes to the junk buffer, and cover each request exactly; a request they cannot
serve (runs overlapping in the file, a gap larger than the junk buffer, runs outside their piece) gets None
and is copied from a staged read instead, with the same result."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jreshard.catalog import Locator
from jreshard.planning import Overlap, Runs
from jreshard.read import CopyJob, _copy_part, _file_requests, _scatter_iovs
from tests.test_file_requests import row_jobs


def _file(jobs, seed):
    """Random file bytes covering every job's runs."""
    size = max(j.locator.base + j.runs.src_span[1] for j in jobs)
    return np.random.default_rng(seed).integers(0, 256, size + 16, dtype=np.uint8)


def _expected(j: CopyJob, data: np.ndarray) -> np.ndarray:
    """The job's piece (count x run bytes) cut straight out of the file's bytes."""
    r = j.runs
    out = np.zeros(j.dest.shape, np.uint8).reshape(-1)
    src = np.ndarray(r.outer + (r.run,), np.uint8, buffer=data, offset=j.locator.base + r.src,
                     strides=r.src_strides + (1,))
    np.ndarray(r.outer + (r.run,), np.uint8, buffer=out, offset=r.dst, strides=r.dst_strides + (1,))[...] = src
    return out.reshape(j.dest.shape)


def _apply(iov: np.ndarray, data: np.ndarray, start: int, stop: int, junk: np.ndarray) -> int:
    """Do what preadv does with ``iov`` from file offset ``start``; returns the junk bytes written."""
    assert iov.dtype == np.uint64 and iov.flags.c_contiguous
    assert int(iov[:, 1].sum()) == stop - start  # the request exactly
    assert (iov[:, 1] > 0).all()
    pos, wasted = start, 0
    for addr, n in iov.tolist():
        if addr == junk.ctypes.data:
            assert n <= len(junk)
            wasted += n
        ctypes.memmove(addr, data[pos:].ctypes.data, n)
        pos += n
    return wasted


def _fed(feed) -> set[int]:
    """The file bytes the runs of a request's parts take."""
    out: set[int] = set()
    for j, part in feed:
        for x in part.src_starts().tolist():
            out |= set(range(j.locator.base + x, j.locator.base + x + part.run))
    return out


def _run(jobs, data, gap, limit, chunk_gap, junk):
    for j in jobs:
        j.dest = np.zeros((j.runs.count, j.runs.run), np.uint8)
    groups = list(_file_requests(jobs, gap, limit, chunk_gap))
    served = []
    for requests, feeds in groups:
        iovs = _scatter_iovs(requests, feeds, junk)
        assert len(iovs) == len(requests)
        for (_, start, stop), feed, iov in zip(requests, feeds, iovs):
            if iov is None:
                for j, part in feed:
                    _copy_part(data[start:stop], start, j, part, "f")
                served.append((start, stop, None, feed))
            else:
                served.append((start, stop, _apply(iov, data, start, stop, junk), feed))
    return served


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(row_jobs(), st.sampled_from([0, 8, 64]), st.sampled_from([8, 100, 1 << 20]), st.sampled_from([None, 32, 4096]),
       st.sampled_from([1 << 16, 16]), st.integers(0, 2**32 - 1))
def test_scatter_lists_put_every_run_in_place(jobs, gap, limit, chunk_gap, junk_size, seed):
    data = _file(jobs, seed)
    junk = np.zeros(junk_size, np.uint8)
    served = _run(jobs, data, gap, limit, chunk_gap, junk)
    for j in jobs:
        np.testing.assert_array_equal(j.dest, _expected(j, data), err_msg=j.name)
    overlapping = any(
        a is not b and a.locator.base + a.runs.src_span[0] < b.locator.base + b.runs.src_span[1]
        and b.locator.base + b.runs.src_span[0] < a.locator.base + a.runs.src_span[1]
        for a in jobs for b in jobs)
    for start, stop, wasted, feed in served:
        if wasted is not None:  # the bytes sent to junk are exactly those of the request that no run it feeds takes
            assert wasted == stop - start - len(_fed(feed))
        elif not overlapping and junk_size > max(gap, chunk_gap or 0):
            pytest.fail(f"request [{start}, {stop}) of non-overlapping runs with small gaps was not scattered")


def test_a_gap_larger_than_junk_or_overlapping_runs_fall_back_alone():
    loc = Locator("f", 0, 0, (64, 1), 64 * 8)
    a = CopyJob("a", loc, (8, 64), Overlap(0, (0, 0), (0, 0), (8, 4)), np.zeros((8, 4), np.uint8),
                Runs(0, (64,), 0, (4,), (8,), 4), 1)
    b = CopyJob("b", loc, (8, 64), Overlap(0, (0, 2), (0, 0), (8, 4)), np.zeros((8, 4), np.uint8),
                Runs(2, (64,), 0, (4,), (8,), 4), 1)  # overlaps a's runs in the file
    c = CopyJob("c", loc, (8, 64), Overlap(0, (0, 8), (0, 0), (8, 8)), np.zeros((8, 8), np.uint8),
                Runs(8, (64,), 0, (8,), (8,), 8), 1)
    junk = np.zeros(64, np.uint8)
    reqs = [("f", 0, 7 * 64 + 6), ("f", 8, 7 * 64 + 16), ("f", 8, 7 * 64 + 16)]
    got = _scatter_iovs(reqs, [[(a, a.runs), (b, b.runs)], [(c, c.runs)], [(c, Runs(8, (64,), 0, (8,), (8,), 8))]],
                        junk)
    assert got[0] is None  # overlapping runs
    assert got[1] is not None and len(got[1]) == 15  # 8 runs and the 7 gaps of 56 bytes between them
    small = _scatter_iovs(reqs[1:2], [[(c, c.runs)]], np.zeros(16, np.uint8))
    assert small == [None]  # gaps of 56 bytes, junk of 16
    outside = Runs(8, (64,), 8, (8,), (8,), 8)  # the last row would land past the piece's end
    assert _scatter_iovs(reqs[1:2], [[(c, outside)]], junk) == [None]
    short = _scatter_iovs([("f", 8, 7 * 64 + 17)], [[(c, c.runs)]], junk)
    assert short == [None]  # the runs do not reach the request's stop


def test_runs_outside_their_request_fail_that_request_only():
    loc = Locator("f", 0, 0, (64, 1), 64 * 8)
    data = np.arange(64 * 8, dtype=np.uint64).astype(np.uint8)
    c = CopyJob("c", loc, (8, 64), Overlap(0, (0, 8), (0, 0), (8, 8)), np.zeros((8, 8), np.uint8),
                Runs(8, (64,), 0, (8,), (8,), 8), 1)
    d = CopyJob("d", loc, (8, 64), Overlap(0, (0, 40), (0, 0), (8, 8)), np.zeros((8, 8), np.uint8),
                Runs(40, (64,), 0, (8,), (8,), 8), 1)
    junk = np.zeros(64, np.uint8)
    # The second request claims to start at byte 200, after its first runs (bytes 40, 104, 168): in the first
    # request's range.
    reqs = [("f", 8, 7 * 64 + 16), ("f", 200, 7 * 64 + 48)]
    got = _scatter_iovs(reqs, [[(c, c.runs)], [(d, d.runs)]], junk)
    assert got[1] is None
    assert got[0] is not None
    _apply(got[0], data, 8, 7 * 64 + 16, junk)
    np.testing.assert_array_equal(c.dest, data.reshape(8, 64)[:, 8:16])
    # Starting before its first run (byte 39): the first row would not be the request's first byte.
    assert _scatter_iovs([("f", 39, 7 * 64 + 48)], [[(d, d.runs)]], junk) == [None]
