"""Overlaps planned as arrays (jreshard.lanes) against the same overlaps planned as Python objects.

Lanes are used for tensors with many saved chunks (pod-scale checkpoints); here the threshold is lowered so that
the 4-rank checkpoints torch writes in the tests take that path too. Loads must equal torch's tensors, and a
plan made with lanes must read exactly what the same plan made object by object reads.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jax
from jax.sharding import NamedSharding

import jreshard
import jreshard.catalog as catalog
import jreshard.program as program
import jreshard.read as read
from jreshard.catalog import Locator
from jreshard.lanes import Lane, Rows
from jreshard.planning import Overlap, Runs, _grid
from jreshard.read import CopyJob, _file_requests
from tests import torch_writers as tw
from tests.helpers import SPECS, check_loaded_array, make_mesh, spec_fits


@pytest.fixture
def lanes_always(monkeypatch):
    """Every tensor's overlaps go through the chunk index, hence through lanes."""
    monkeypatch.setattr(catalog, "_INDEX_MIN_CHUNKS", 1)


def _targets(checkpoints, variant, mesh, spec):
    refs = checkpoints.reference(variant)
    mesh_shape = dict(zip(mesh.axis_names, mesh.devices.shape))
    return {name: jax.ShapeDtypeStruct(refs[name].shape, refs[name].dtype, sharding=NamedSharding(mesh, spec))
            for name in checkpoints.names[variant] if spec_fits(spec, refs[name].shape, mesh_shape)}


def _numbers(plan):
    return (plan.bytes_needed, plan.bytes_to_read, plan.num_reads,
            {n: (t.pieces, t.bytes_needed, t.bytes_to_read, t.num_reads) for n, t in plan.by_tensor().items()})


def _lane_rows(plan) -> int:
    return sum(len(lane) for b in plan._program.batches for u in b.units for lane in u.lanes)


CASES = [("2x4", "P(data,model)"), ("2x4", "P(None,model)"), ("8", "P(data)"), ("4x2", "P(model,data)"),
         ("8", "P()"), ("4x2", "P(None,data)")]


@pytest.mark.parametrize("mesh_key,spec_key", CASES, ids=[f"{m}-{s}" for m, s in CASES])
@pytest.mark.parametrize("io", ["posix", "tensorstore"])
@pytest.mark.parametrize("variant", tw.VARIANTS)
def test_lanes_load_exactly_and_read_what_objects_read(checkpoints, lanes_always, monkeypatch, variant, io,
                                                      mesh_key, spec_key):
    mesh = make_mesh(mesh_key)
    targets = _targets(checkpoints, variant, mesh, SPECS[spec_key])
    ckpt = jreshard.open(checkpoints.dirs[variant], io=io)
    with_lanes = ckpt.plan(targets)
    if variant != "zstd" and any(tw.TENSORS_BY_NAME[n].big for n in targets):
        assert _lane_rows(with_lanes) > 0  # (compressed chunks and small archives are read whole: never lanes)
    monkeypatch.setattr(program, "LANES", False)
    objects = jreshard.open(checkpoints.dirs[variant], io=io).plan(targets)
    assert _lane_rows(objects) == 0
    assert _numbers(with_lanes) == _numbers(objects)
    monkeypatch.setattr(program, "LANES", True)
    before = (ckpt.io_stats.bytes_read, ckpt.io_stats.num_reads)
    out = ckpt.load(targets)
    assert ckpt.io_stats.bytes_read - before[0] == with_lanes.bytes_to_read
    assert ckpt.io_stats.num_reads - before[1] == with_lanes.num_reads
    refs = checkpoints.reference(variant)
    for name, t in targets.items():
        check_loaded_array(out[name], t, refs[name], f"lanes {variant}/{io}/{mesh_key}/{spec_key}:{name}")


@st.composite
def rows_in_a_file(draw):
    """Rows of runs (a band of columns of some rows of a chunk) of chunks laid out in one file, as copy jobs
    and as the equivalent lane rows."""
    jobs, rows, kids = [], [], []
    ends = {"f": 0, "g": 0, "h": 0}
    for _ in range(draw(st.integers(1, 6))):
        nrows, width = draw(st.integers(1, 30)), draw(st.integers(1, 80))
        key = draw(st.sampled_from(sorted(ends)))
        base = ends[key] + draw(st.integers(0, 200))
        loc = Locator(key, base, 0, (width, 1), nrows * width)
        for _ in range(draw(st.integers(1, 4))):
            r0 = draw(st.integers(0, nrows - 1))
            n = draw(st.integers(1, nrows - r0))
            a = draw(st.integers(0, width - 1))
            run = draw(st.integers(1, width - a))
            if run == width and n > 1 and draw(st.booleans()):  # whole rows: one run, as runs_of folds them
                run, n = run * n, 1
            src = r0 * width + a
            dst = draw(st.integers(0, 50))
            ds = run + draw(st.integers(0, 5))
            runs = Runs(src, (width,), dst, (ds,), (n,), run) if n > 1 else Runs(src, (), dst, (), (), run)
            ov = Overlap(0, (r0, a), (0, 0), (n, run))
            jobs.append(CopyJob("t", loc, (nrows, width), ov, None, runs, 1, dst, (ds, 1), slot=0))
            rows.append((base + src, n, width if n > 1 else 0, run, dst, ds if n > 1 else 0, base))
            kids.append(sorted(ends).index(key))
        ends[key] = base + nrows * width
    a = np.array(rows, np.int64).T
    zeros = np.zeros(len(rows), np.int64)
    x0, n, s, run, dst, ds, base = a
    lane = Lane(sorted(ends), ["t"], Rows(x0, n, s, run, base, dst, ds, zeros, zeros, np.array(kids, np.int64)))
    return jobs, lane


def _fed_bytes(groups):
    """(file byte, destination byte) of everything the requests feed, and the requests."""
    requests, fed = [], []
    for reqs, feeds in groups:
        for req, feed in zip(reqs, feeds):
            requests.append(req)
            for j, part in feed:
                if isinstance(j, Lane):
                    for x0, n, s, run, dst, ds in zip(*(v.tolist() for v in (part.x0, part.n, part.s, part.run,
                                                                             part.dst, part.ds))):
                        fed += [(x0 + k * s + i, dst + k * ds + i) for k in range(n) for i in range(run)]
                        assert req[1] <= x0 and x0 + (n - 1) * s + run <= req[2]
                else:
                    src = _grid(part.src, part.outer, part.src_strides) + j.locator.base
                    dst = _grid(part.dst, part.outer, part.dst_strides)
                    fed += [(int(x) + i, int(d) + i) for x, d in zip(src, dst) for i in range(part.run)]
                    assert req[1] <= int(src.min()) and int(src.max()) + part.run <= req[2]
    return requests, sorted(fed)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows_in_a_file(), st.sampled_from([0, 8, 64]), st.sampled_from([16, 100, 1 << 20]),
       st.sampled_from([None, 32, 4096]))
def test_lane_requests_equal_copy_job_requests(case, gap, limit, chunk_gap):
    jobs, lane = case
    by_jobs = _fed_bytes(_file_requests(jobs, gap, limit, chunk_gap))
    by_lane = _fed_bytes(_file_requests([], gap, limit, chunk_gap, lanes=[lane]))
    assert sorted(by_lane[0]) == sorted(by_jobs[0])  # the same requests
    assert by_lane[1] == by_jobs[1]  # feeding the same bytes to the same places
    # Counted only (another process's plan): the same requests, feeding nothing.
    for kw in ({}, {"lanes": [lane]}):
        counted = list(_file_requests([] if kw else jobs, gap, limit, chunk_gap, feeds=False, **kw))
        assert sorted(r for reqs, _ in counted for r in reqs) == sorted(by_jobs[0])
        assert all(f is None for _, fs in counted for f in fs)
    # All files in one pass (offsets shifted per file) or file by file: the same requests and feeds.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(read, "_SPAN", 64)  # every offset beyond it: file by file
        for made, alone in ((by_jobs, _fed_bytes(_file_requests(jobs, gap, limit, chunk_gap))),
                            (by_lane, _fed_bytes(_file_requests([], gap, limit, chunk_gap, lanes=[lane])))):
            assert sorted(alone[0]) == sorted(made[0]) and alone[1] == made[1]


@pytest.mark.parametrize("variant", ["plain", "safetensors"])
def test_read_through_lanes_equals_torch(checkpoints, lanes_always, variant):
    ckpt = jreshard.open(checkpoints.dirs[variant])
    refs = checkpoints.reference(variant)
    # 2-d tensors whose chunks are located for sub-ranges (not read whole): their reads go through lanes
    located = [n for n in checkpoints.names[variant]
               if refs[n].ndim == 2 and all(c.whole_read_nbytes is None for c in ckpt.tensors[n].chunks)]
    assert located
    for name in located:
        ref = refs[name]
        rows, cols = ref.shape
        for index in [np.s_[:, :], np.s_[1 : rows - 1, 3 : cols // 2], np.s_[rows // 3, :], np.s_[:, cols - 1]]:
            np.testing.assert_array_equal(ckpt.read(name, index), ref[index], err_msg=f"{variant}:{name}[{index}]")


@pytest.mark.parametrize("cut", [0.3, 0.6, 0.97])
@pytest.mark.parametrize("io", ["posix", "tensorstore"])
def test_file_truncated_under_lanes_is_an_error_naming_file_and_tensor(checkpoints, lanes_always, tmp_path, io, cut):
    """A file cut short after the plan located its chunks: the lanes' reads (scatter or staged) end in a
    TruncatedDataError naming the file and the tensors, never in wrong bytes or a half-filled array."""
    import shutil

    from jreshard.errors import TruncatedDataError

    d = tmp_path / "plain"
    shutil.copytree(checkpoints.dirs["plain"], d)
    mesh = make_mesh("2x4")
    targets = {n: t for n, t in _targets(checkpoints, "plain", mesh, SPECS["P(data,model)"]).items()
               if tw.TENSORS_BY_NAME[n].big}
    ckpt = jreshard.open(d, io=io)
    plan = ckpt.plan(targets)
    assert _lane_rows(plan) > 0
    f = d / "__1_0.distcp"
    with open(f, "r+b") as fh:
        fh.truncate(int(f.stat().st_size * cut))
    with pytest.raises(TruncatedDataError, match=r"__1_0\.distcp") as e:
        ckpt.load(targets)
    assert any(repr(n) in str(e.value) for n in targets), str(e.value)


@pytest.mark.parametrize("mesh_key,spec_key", [("2x4", "P(None,model)"), ("4x2", "P(model,data)"), ("8", "P(data)")])
def test_small_archives_located_for_sub_ranges_under_lanes_read_what_objects_read(checkpoints, lanes_always,
                                                                                   monkeypatch, mesh_key, spec_key):
    """Archives read whole by default (small ones), located for sub-ranges when a unit needs little of them:
    with lanes, their rows are decided for all chunks of a tensor at once and join the lanes; the plan must
    read what the object path reads, planned again (the locators kept), and load exactly."""
    monkeypatch.setattr(program, "HEADER_COST", 0)  # sub-ranges whatever the archive's size
    mesh = make_mesh(mesh_key)
    targets = _targets(checkpoints, "plain", mesh, SPECS[spec_key])
    ckpt = jreshard.open(checkpoints.dirs["plain"])
    small = [n for n in targets if all(c.whole_read_nbytes is not None for c in ckpt.tensors[n].chunks)]
    assert small
    first = ckpt.plan(targets)
    assert ckpt._located.sub_ranged & set(small)  # some were located for sub-ranges
    again = ckpt.plan(targets)  # now from the kept locators
    monkeypatch.setattr(program, "LANES", False)
    objects = jreshard.open(checkpoints.dirs["plain"]).plan(targets)
    assert _numbers(first) == _numbers(objects) == _numbers(again)
    monkeypatch.setattr(program, "LANES", True)
    before = (ckpt.io_stats.bytes_read, ckpt.io_stats.num_reads)
    out = ckpt.load(targets)
    assert (ckpt.io_stats.bytes_read - before[0], ckpt.io_stats.num_reads - before[1]) == \
        (first.bytes_to_read, first.num_reads)
    refs = checkpoints.reference("plain")
    for name, t in targets.items():
        check_loaded_array(out[name], t, refs[name], f"small archives {mesh_key}/{spec_key}:{name}")


@pytest.mark.parametrize("variant", tw.VARIANTS)
def test_read_facts_known_at_open_are_those_of_the_chunks(checkpoints, variant):
    """A DCP checkpoint records at open how each chunk is read (whole or by sub-ranges); the planner trusts
    those arrays in place of looking at each chunk, so they must be exactly what the chunks say."""
    ckpt = jreshard.open(checkpoints.dirs[variant])
    seen = set()
    for name, info in ckpt.format.tensors.items():
        chunks = info.chunks
        fresh = catalog.ChunkTuple(tuple(chunks))  # the same chunks, nothing known yet
        cids = np.arange(len(chunks), dtype=np.int64)
        got, want = catalog.read_facts(chunks, cids), catalog.read_facts(fresh, cids)
        assert [a.tolist() for a in got] == [a.tolist() for a in want], name
        if hasattr(chunks, "_none_whole"):
            assert catalog.none_read_whole(chunks) == (not (want[0] >= 0).any()), name
            seen.add(not catalog.none_read_whole(chunks))
    if variant == "plain":
        assert seen == {True, False}  # both kinds of tensors were checked (small archives, and larger ones)
    if variant == "zstd":
        assert seen == {True}  # compressed: every chunk is read whole
