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

from jreshard import read
from jreshard.catalog import Locator
from jreshard.planning import Overlap, Runs
from jreshard.read import CopyJob, _copy_part, _file_requests, _scatter_iovs, _tiled_iov
from tests.test_file_requests import band_job, row_jobs


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


@st.composite
def tiled_jobs(draw):
    """Jobs whose runs tile bands of a chunk's rows (each row cut into the column bands of several pieces, as for
    a column-sharded target read from row-sharded chunks), now and then with a band left out or single runs."""
    jobs = []
    base = 0
    for c in range(draw(st.integers(1, 4))):
        rows, width = draw(st.integers(1, 30)), draw(st.integers(1, 48))
        base += draw(st.integers(0, 100))
        loc = Locator("f", base, 0, (width, 1), rows * width)
        cuts = sorted(set(draw(st.lists(st.integers(1, max(1, width - 1)), max_size=4))) - {width})
        bands = list(zip([0, *cuts], [*cuts, width]))
        r0 = draw(st.integers(0, rows - 1))
        n = draw(st.integers(1, rows - r0))
        skip = draw(st.sampled_from([None, None, None, *range(len(bands))])) if len(bands) > 1 or c else None
        for k, (a, b) in enumerate(bands):
            if k == skip:
                continue
            run = b - a
            if draw(st.integers(0, 9)) == 0:
                runs = Runs(r0 * width + a, (), 0, (), (), run)
            else:
                runs = Runs(r0 * width + a, (width,), 0, (run,), (n,), run)
            jobs.append(band_job(f"t{c}", loc, (rows, width), (r0, a), runs))
        base += rows * width
    return jobs


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tiled_jobs(), st.sampled_from([0, 8]), st.sampled_from([7, 40, 100, 1 << 20]), st.integers(0, 2**32 - 1))
def test_tiled_requests_take_the_grid_and_place_as_the_general_way(jobs, gap, limit, seed):
    """Requests whose runs tile them (bands of rows cut in the middle of a row by a small request limit
    included) get their scatter list from the grid of rows by parts (read._tiled_iov), which places every byte
    as the general sort-and-merge does; the complete bands of rows always take that way."""
    data = _file(jobs, seed)
    junk = np.zeros(1 << 16, np.uint8)
    for j in jobs:
        j.dest = np.zeros((j.runs.count, j.runs.run), np.uint8)
    groups = list(_file_requests(jobs, gap, limit, None))
    for requests, feeds in groups:
        fast = _scatter_iovs(requests, feeds, junk)
        for (_, start, stop), feed, iov in zip(requests, feeds, fast):
            grid = _tiled_iov((None, start, stop), feed)
            if grid is not None:
                np.testing.assert_array_equal(grid, iov)
                for j in jobs:
                    j.dest[...] = 0
                _apply(grid, data, start, stop, junk)
                got = [j.dest.copy() for j in jobs]
                for j in jobs:
                    j.dest[...] = 0
                with pytest.MonkeyPatch.context() as mp:
                    mp.setattr(read, "_tiled_iov", lambda request, feed: None)
                    general = _scatter_iovs([("f", start, stop)], [feed], junk)[0]
                assert general is not None
                _apply(general, data, start, stop, junk)
                for j, g in zip(jobs, got):
                    np.testing.assert_array_equal(g, j.dest, err_msg=j.name)
            elif _fed(feed) == set(range(start, stop)):
                pytest.fail(f"request [{start}, {stop}) is tiled by its runs but did not take the grid")
    # Every run of every job in place, the grid's requests and the others together.
    for j in jobs:
        j.dest[...] = 0
    _run(jobs, data, gap, limit, None, junk)
    for j in jobs:
        np.testing.assert_array_equal(j.dest, _expected(j, data), err_msg=j.name)


def test_a_request_cut_in_the_middle_of_a_row_takes_the_grid():
    """Four column bands of 3 rows, cut after the second band of row 1 and read as two requests: each is a
    grid, the first ending and the second starting in the middle of a row."""
    loc = Locator("f", 0, 0, (16, 1), 48)
    jobs = [CopyJob("w", loc, (3, 16), Overlap(0, (0, 4 * k), (0, 0), (3, 4)), np.zeros((3, 4), np.uint8),
                    Runs(4 * k, (16,), 0, (4,), (3,), 4), 1) for k in range(4)]
    data = np.arange(48, dtype=np.uint8)
    # Rows 0-1 of bands 0-1 and row 0 of bands 2-3; then row 1 of bands 2-3 and row 2 of all four.
    first = [(j, Runs(4 * k, (16,), 0, (4,), (2 if k < 2 else 1,), 4)) for k, j in enumerate(jobs)]
    second = [(j, Runs(32 + 4 * k, (16,), 8, (4,), (1,), 4)) if k < 2 else (j, Runs(16 + 4 * k, (16,), 4, (4,), (2,), 4))
              for k, j in enumerate(jobs)]
    junk = np.zeros(64, np.uint8)
    a = _tiled_iov(("f", 0, 24), first)
    b = _tiled_iov(("f", 24, 48), second)
    assert a is not None and [int(n) for n in a[:, 1]] == [4] * 6
    assert b is not None and [int(n) for n in b[:, 1]] == [4] * 6
    _apply(a, data, 0, 24, junk)
    _apply(b, data, 24, 48, junk)
    for k, j in enumerate(jobs):
        np.testing.assert_array_equal(j.dest, data.reshape(3, 16)[:, 4 * k : 4 * k + 4])


@st.composite
def band_feeds(draw):
    """A request and the parts it feeds: a band of rows tiled by column parts (cut in the middle of a row or
    not, after some one-row parts), then often broken by one change: a part's rows, step, start or run, a part
    dropped, or the request's ends moved; half the time the request then spans as many bytes as the runs take
    (a broken layout of the right size)."""
    width = draw(st.integers(2, 24))
    cuts = sorted(set(draw(st.lists(st.integers(1, width - 1), max_size=3))))
    bands = list(zip([0, *cuts], [*cuts, width]))
    rows = draw(st.integers(1, 6))
    lead = draw(st.integers(0, len(bands) - 1))  # the request starts at this part's column of row 0
    tail = draw(st.integers(0, len(bands)))  # ... and ends after this many parts of the last row
    base = draw(st.integers(0, 40))
    parts = []  # (src, n, step, run)
    for k, (a, b) in enumerate(bands):
        n = rows - (k < lead) + (k < tail)
        start = a + (width if k < lead else 0)
        if n > 0:
            parts.append([base + start, n, width, b - a])
    ones = draw(st.integers(0, 3))  # one-row runs before the band
    pre = []
    pos = parts[0][0] if parts else base
    for _ in range(ones):
        run = draw(st.integers(1, 5))
        pos -= run
        pre.insert(0, [pos, 1, 0, run])
    parts = pre + parts
    if not parts:
        parts = [[base, 1, 0, 1]]
    begin = min(p[0] for p in parts)
    end = begin + sum(p[1] * p[3] for p in parts)
    change = draw(st.sampled_from(["none", "none", "rows", "step", "src", "run", "drop", "start", "stop"]))
    k = draw(st.integers(0, len(parts) - 1))
    delta = draw(st.sampled_from([-1, 1]))
    if change == "rows" and parts[k][1] + delta > 0:
        parts[k][1] += delta
    elif change == "step" and parts[k][1] > 1:
        parts[k][2] += delta
    elif change == "src":
        parts[k][0] += delta
    elif change == "run" and parts[k][3] + delta > 0:
        parts[k][3] += delta
    elif change == "drop" and len(parts) > 1:
        parts.pop(k)
    elif change == "start":
        begin += delta
    elif change == "stop":
        end += delta
    if draw(st.booleans()):  # the request's ends moved with the change: as many bytes as the runs take
        begin = min(p[0] for p in parts)
        end = begin + sum(p[1] * p[3] for p in parts)
    if begin >= end or min(p[0] for p in parts) < 0:
        parts, begin, end = [[base, 1, 0, 1]], base, base + 1
    order = draw(st.permutations(range(len(parts))))
    return [parts[i] for i in order], begin, end


def _part_job(src: int, n: int, step: int, run: int) -> tuple[CopyJob, Runs]:
    loc = Locator("f", 0, 0, (1,), src + (n - 1) * step + run)
    runs = Runs(src, (step,), 0, (run,), (n,), run) if n > 1 else Runs(src, (), 0, (), (), run)
    job = CopyJob("t", loc, (src + (n - 1) * step + run,), Overlap(0, (0,), (0,), (n * run,)),
                  np.zeros(n * run, np.uint8), runs, 1, 0, (1,))
    return job, runs


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(band_feeds())
def test_a_grid_is_given_only_where_it_places_every_byte(case):
    """Whenever read._tiled_iov gives a scatter list, it reads the request exactly and each file byte lands where
    its run puts it; it gives one for every request tiled by a band of rows (broken bands, requests that end
    elsewhere, runs that overlap or leave holes: None, left to the general way)."""
    parts, begin, end = case
    feed = [_part_job(*p) for p in parts]
    want: dict[int, int] = {}
    clash = False
    for (src, n, step, run), (job, _) in zip(parts, feed):
        addr = job.dest.ctypes.data
        for i in range(n):
            for b in range(run):
                clash |= src + i * step + b in want
                want[src + i * step + b] = addr + i * run + b
    iov = _tiled_iov(("f", begin, end), feed)
    exact = not clash and set(want) == set(range(begin, end))
    # Every request the runs tile exactly here is a band of rows (after one-row runs), which is a grid.
    assert (iov is not None) == exact, (parts, begin, end)
    got: dict[int, int] = {}
    pos = begin
    for addr, n in ([] if iov is None else iov.tolist()):
        for b in range(n):
            got[pos + b] = addr + b
        pos += n
    assert iov is None or (pos == end and got == want)
    # As few rows as can be: no run starts in memory where the one before it ended (those are one row).
    rows = [] if iov is None else iov.tolist()
    assert not any(a + n == b for (a, n), (b, _) in zip(rows, rows[1:])), rows


def test_a_grid_never_writes_outside_its_piece():
    """Rows placed last to first inside the piece get a grid that puts each where it belongs; rows whose places
    run past the piece's end, or before its start (a negative step), get no grid, and no scatter list at all:
    the staged copy reports them."""
    loc = Locator("f", 0, 0, (8, 1), 32)
    dest = np.zeros((4, 8), np.uint8)
    job = CopyJob("w", loc, (4, 8), Overlap(0, (0, 0), (0, 0), (4, 8)), dest, Runs(0, (8,), 0, (8,), (4,), 8), 1)
    assert _tiled_iov(("f", 0, 32), [(job, job.runs)]) is not None
    flipped = Runs(0, (8,), 24, (-8,), (4,), 8)  # rows placed last to first: inside the piece
    grid = _tiled_iov(("f", 0, 32), [(job, flipped)])
    data = np.arange(32, dtype=np.uint8)
    _apply(grid, data, 0, 32, np.zeros(64, np.uint8))
    np.testing.assert_array_equal(dest, data.reshape(4, 8)[::-1])
    for bad in (Runs(0, (8,), 8, (8,), (4,), 8), Runs(0, (8,), 0, (-8,), (4,), 8), Runs(0, (8,), -1, (8,), (4,), 8)):
        assert _tiled_iov(("f", 0, 32), [(job, bad)]) is None
        assert _scatter_iovs([("f", 0, 32)], [[(job, bad)]], np.zeros(64, np.uint8)) == [None]


@settings(max_examples=1500, deadline=None)
@given(st.data())
def test_runs_that_meet_in_memory_are_found_without_a_pass_over_them(data):
    """read._may_touch (whether a grid's runs need the pass that joins neighbours) says yes exactly when some
    run of a band, listed row by row, starts where the one before it (or the band before) ended."""
    from jreshard.read import _may_touch

    width = data.draw(st.integers(1, 4))
    n = data.draw(st.integers(1, 5))
    a = data.draw(st.integers(1, width)) if n > 1 else width  # parts in the last row
    count = (n - 1) * width + a
    small = st.integers(-6, 6)  # a small space, where runs meet often, at any row
    d0 = [data.draw(small) for _ in range(width)]
    runs = [data.draw(st.integers(1, 3)) for _ in range(width)]
    ds = [data.draw(small) for _ in range(width)] if n > 1 else [0] * width
    prev = data.draw(st.none() | small)
    flat = [(d0[k] + i * ds[k], runs[k]) for i in range(n) for k in range(width)][:count]
    meets = any(s + r == t for (s, r), (t, _) in zip(flat, flat[1:])) or (prev is not None and prev == flat[0][0])
    assert _may_touch(d0, runs, ds, n, count, prev) == meets
