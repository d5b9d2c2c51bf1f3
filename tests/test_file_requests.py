"""The requests a file's copy jobs become (jreshard.read._file_requests), held to what a read needs of them,
whatever path (per run, per row of runs at once, arithmetic cuts) made them: every run of every job is fed by
exactly one request (runs longer than the request size cut), which holds all its bytes; each request reads
from its first fed byte to its last; and bytes read beyond those needed stay within the gap rules."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jreshard.catalog import Locator
from jreshard.planning import Overlap, Runs, _grid
from jreshard.read import CopyJob, _file_requests


@st.composite
def row_jobs(draw):
    """Jobs of rows of runs (and a few single runs and 2-d grids) laid out in one file: several chunks, each a
    storage of rows; each job takes a column band of some rows, as a piece of a column-sharded target does."""
    jobs = []
    base = 0
    for c in range(draw(st.integers(1, 6))):
        rows, width = draw(st.integers(1, 40)), draw(st.integers(1, 64))
        base += draw(st.integers(0, 300))  # bytes between items
        loc = Locator("f", base, 0, (width, 1), rows * width)
        for _ in range(draw(st.integers(1, 4))):
            r0 = draw(st.integers(0, rows - 1))
            n = draw(st.integers(1, rows - r0))
            a = draw(st.integers(0, width - 1))
            run = draw(st.integers(1, width - a))
            kind = draw(st.sampled_from(["row", "row", "row", "one", "grid"]))
            if kind == "one":
                runs = Runs(r0 * width + a, (), 0, (), (), run)
            elif kind == "grid" and n >= 2:
                half = n // 2
                runs = Runs(r0 * width + a, (2 * width, width), 0, (2 * run, run), (half, 2), run)
            else:
                runs = Runs(r0 * width + a, (width,), 0, (run,), (n,), run)
            jobs.append(band_job(f"t{c}", loc, (rows, width), (r0, a), runs))
        base += rows * width
    return jobs


def band_job(name: str, loc: Locator, chunk: tuple[int, int], start: tuple[int, int], runs: Runs) -> CopyJob:
    """The copy job of ``runs`` (a column band of some rows of a byte-element chunk, from ``start``) into a
    piece of its own, rows of ``runs.run`` bytes, unbound."""
    ov = Overlap(0, start, (0, 0), (runs.count, runs.run))
    return CopyJob(name, loc, chunk, ov, None, runs, 1, 0, (runs.run, 1))


def _runs(j: CopyJob, r: Runs) -> list[tuple[int, int, int]]:
    """(file start, length, destination) of every run of ``r``."""
    src = _grid(r.src, r.outer, r.src_strides) + j.locator.base
    dst = _grid(r.dst, r.outer, r.dst_strides)
    return [(int(s), r.run, int(d)) for s, d in zip(src, dst)]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(row_jobs(), st.sampled_from([0, 8, 64]), st.sampled_from([8, 100, 1 << 20]), st.sampled_from([None, 32, 4096]))
def test_requests_feed_every_run_once_and_read_no_more_than_their_span(jobs, gap, limit, chunk_gap):
    def per_byte(runs):  # (job, file byte, destination byte): runs longer than ``limit`` may be cut
        return sorted((k, s + i, d + i) for k, s, n, d in runs for i in range(n))

    wanted = [(id(j), s, n, d) for j in jobs for s, n, d in _runs(j, j.runs)]
    groups = list(_file_requests(jobs, gap, limit, chunk_gap))
    fed = []
    spans = []
    for requests, feeds in groups:
        assert len(requests) == len(feeds)
        for (key, start, stop), feed in zip(requests, feeds):
            assert key == "f" and feed
            runs = [(id(j), *run) for j, part in feed for run in _runs(j, part)]
            assert min(s for _, s, _, _ in runs) == start  # reads from its first fed byte
            assert max(s + n for _, s, n, _ in runs) == stop  # to its last
            assert max(s for _, s, _, _ in runs) - start < limit  # its runs start within one cut of ``limit`` bytes
            fed += runs
            spans.append((start, stop))
    assert per_byte(fed) == per_byte(wanted)  # every byte of every run fed once, to its destination
    # Bytes read beyond those needed: only gaps that the rules allow to be bridged.
    needed = np.zeros(max(s + n for _, s, n, _ in wanted), bool)
    for _, s, n, _ in wanted:
        needed[s : s + n] = True
    cap = max(gap, chunk_gap if chunk_gap is not None else gap)
    for start, stop in spans:  # inside a request, no stretch of unneeded bytes is longer than the largest gap rule
        inner = ~needed[start:stop]
        if inner.any():
            edges = np.flatnonzero(np.diff(np.concatenate(([0], inner.view(np.int8), [0]))))
            assert int((edges[1::2] - edges[::2]).max()) <= cap
