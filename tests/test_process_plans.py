"""Per-process plans: ``plan()`` plans this process, ``process_index=k`` another one (over an AbstractMesh with
``devices_per_process``), ``"all"`` every process one after the other; the device boxes jreshard computes
without devices equal jax's, and a process's plan costs in proportion to its own devices' shards."""

from __future__ import annotations

import json
import math

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import AbstractMesh, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jreshard
from jreshard.errors import InvalidArgumentError, ShardingError
from jreshard.planning import COUNTS, named_boxes, normalize_index
from tests.test_cli import run

MESH_SHAPES = [(8,), (2, 4), (4, 2), (2, 2, 2), (1, 8), (8, 1)]


@st.composite
def mesh_spec_shape(draw):
    sizes = draw(st.sampled_from(MESH_SHAPES))
    names = tuple("abc"[: len(sizes)])
    ndim = draw(st.integers(1, 3))
    dims: list[list[str]] = [[] for _ in range(ndim)]
    for a in draw(st.permutations(names)):
        where = draw(st.integers(-1, ndim - 1))  # -1: the axis is not used
        if where >= 0:
            dims[where].append(a)
    spec = P(*(None if not d else d[0] if len(d) == 1 and draw(st.booleans()) else tuple(d) for d in dims))
    ways = [math.prod(sizes[names.index(a)] for a in d) for d in dims]
    uneven = draw(st.booleans())
    shape = tuple(k * draw(st.integers(1, 3)) + (draw(st.integers(1, k - 1)) if uneven and k > 1 else 0)
                  for k in ways)
    return sizes, names, spec, shape


@settings(max_examples=150, deadline=None)
@given(mesh_spec_shape())
def test_named_boxes_equal_jax_devices_indices_map(case):
    sizes, names, spec, shape = case
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(sizes), names)
    sharding = NamedSharding(mesh, spec)
    try:
        expected = sharding.devices_indices_map(shape)
    except ValueError:  # jax refuses a dim its shards do not divide: so does jreshard
        with pytest.raises(ShardingError, match="does not divide"):
            named_boxes(shape, sizes, names, spec)
        return
    want = [normalize_index(expected[d], shape) for d in mesh.devices.flat]
    assert named_boxes(shape, sizes, names, spec) == want
    picked = [7, 0, 3]
    assert named_boxes(shape, sizes, names, spec, picked) == [want[i] for i in picked]


def _target(ckpt, mesh) -> dict:
    return jreshard.target_for(ckpt, mesh)


def _figures(pp) -> tuple:
    return pp.bytes_needed, pp.bytes_to_read, pp.num_reads, pp.pieces, pp.tensors


def test_default_plans_this_process_and_all_plans_every_one(checkpoints):
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    with jreshard.open(checkpoints.dirs["plain"]) as ckpt:
        target = _target(ckpt, mesh)
        own = ckpt.plan(target)
        assert sorted(own.processes) == [0] and own.planned == 0
        every = ckpt.plan(target, process_index="all")
        assert sorted(every.processes) == [0]  # all 8 CPU devices are this process's
        assert _figures(every.local) == _figures(own.local)
        # over an abstract mesh of the same shape, one process holding all 8 devices: the same program
        abstract = _target(ckpt, AbstractMesh((2, 4), ("data", "model")))
        same = ckpt.plan(abstract, devices_per_process=8)
        assert _figures(same.local) == _figures(own.local)
        assert same.as_saved == own.as_saved
        with pytest.raises(InvalidArgumentError, match="process_index 1 holds no device"):
            ckpt.plan(target, process_index=1)


def test_abstract_processes_hold_consecutive_devices(checkpoints):
    """Process k of an abstract mesh plans the shards of devices 2k, 2k+1 (row-major), as the same shards on a
    concrete mesh planned by a process holding only those devices would."""
    names = ("data", "model")
    concrete = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), names)
    with jreshard.open(checkpoints.dirs["plain"]) as ckpt:
        abstract = _target(ckpt, AbstractMesh((2, 4), names))
        every = ckpt.plan(abstract, devices_per_process=2, process_index="all")
        assert sorted(every.processes) == [0, 1, 2, 3] and every.planned == 0
        assert every._program.process == 0  # one program kept, the others summed and dropped
        assert sorted(ckpt.plan(abstract, devices_per_process=2).processes) == [0]  # the default: this process
        for k in range(4):
            alone = ckpt.plan(abstract, devices_per_process=2, process_index=k)
            assert sorted(alone.processes) == [k] and alone.planned == k
            assert _figures(alone.local) == _figures(every.processes[k])
            # the same devices as a concrete single-process mesh: each replica group's shards, read once
            devices = concrete.devices.flat[2 * k: 2 * k + 2]
            needed = 0
            for sds in abstract.values():
                s = NamedSharding(concrete, sds.sharding.spec)
                boxes = {normalize_index(idx, sds.shape) for d, idx in s.devices_indices_map(sds.shape).items()
                         if d in devices}
                needed += sum(math.prod(b - a for a, b in box) for box in boxes) * np.dtype(sds.dtype).itemsize
            assert alone.bytes_needed == needed
        total = every.total()
        assert total.bytes_needed == sum(p.bytes_needed for p in every.processes.values())
        assert "all" in str(every)


def test_one_process_costs_a_share_of_the_whole_mesh(checkpoints):
    """Over 64 processes, one process's plan computes 1/64 of the device boxes and visits about 1/64 of the
    chunk overlaps of the whole-mesh report: nothing loops over the other processes' pieces."""
    with jreshard.open(checkpoints.dirs["plain"]) as ckpt:
        target = _target(ckpt, AbstractMesh((32, 4), ("data", "model")))
        before = dict(COUNTS)
        one = ckpt.plan(target, devices_per_process=2, process_index=37)
        mid = dict(COUNTS)
        every = ckpt.plan(target, devices_per_process=2, process_index="all")
        after = dict(COUNTS)
    boxes_one, boxes_all = mid["boxes"] - before["boxes"], after["boxes"] - mid["boxes"]
    over_one, over_all = mid["overlaps"] - before["overlaps"], after["overlaps"] - mid["overlaps"]
    assert len(every.processes) == 64
    assert boxes_one == 2 * len(target) and boxes_all == 128 * len(target)  # the boxes of its 2 devices only
    assert over_one > 0 and over_one * 64 <= over_all * 1.5
    assert _figures(one.local) == _figures(every.processes[37])


def test_abstract_plan_errors(checkpoints):
    mesh = AbstractMesh((4, 2), ("data", "model"))
    with jreshard.open(checkpoints.dirs["plain"]) as ckpt:
        target = _target(ckpt, mesh)
        with pytest.raises(ShardingError, match="AbstractMesh itself .* devices_per_process=N"):
            ckpt.plan(target)
        with pytest.raises(InvalidArgumentError, match="dividing the 8 devices"):
            ckpt.plan(target, devices_per_process=3)
        with pytest.raises(InvalidArgumentError, match=r"process_index 4 holds no device .*processes 0\.\.3"):
            ckpt.plan(target, devices_per_process=2, process_index=4)
        with pytest.raises(InvalidArgumentError, match="process_index must be"):
            ckpt.plan(target, devices_per_process=2, process_index="some")
        with pytest.raises(InvalidArgumentError, match="no devices to load onto"):
            ckpt._plan(target, None, None, 256, mesh, local_only=True, devices_per_process=2)
        concrete = _target(ckpt, Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model")))
        with pytest.raises(InvalidArgumentError, match="no target leaf is"):
            ckpt.plan(concrete, devices_per_process=2)
        # mesh= an AbstractMesh without a target: every tensor by the default rule
        p = ckpt.plan(mesh=mesh, devices_per_process=4, process_index=[1, 0])
        assert sorted(p.processes) == [0, 1] and p.planned == 0


def test_cli_plans_one_host_of_a_large_abstract_mesh(checkpoints):
    src = checkpoints.dirs["plain"]
    proc = run("plan", src, "--mesh", "data=64,model=32", "--devices-per-process", "8", "--process", "137", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["process"] == 137 and list(doc["processes"]) == ["137"]
    with jreshard.open(src) as ckpt:
        want = ckpt.plan(mesh=AbstractMesh((64, 32), ("data", "model")), devices_per_process=8, process_index=137)
    assert doc["processes"]["137"]["bytes_needed"] == want.bytes_needed
    assert doc["processes"]["137"]["bytes_to_read"] == want.bytes_to_read
    proc = run("plan", src, "--mesh", "data=2,model=4", "--devices-per-process", "2", "--process", "all")
    assert proc.returncode == 0, proc.stderr
    assert "4 processes" in proc.stdout
    assert [line.split("│")[1].strip() for line in proc.stdout.splitlines()
            if line.startswith("│") and line.split("│")[1].strip() in ("0*", "1", "2", "3", "all")] == [
        "0*", "1", "2", "3", "all"]


def test_located_state_lives_until_the_load_ends(checkpoints, monkeypatch):
    """Per-archive state (locators, their lane tables) is kept from a plan of this process for the load that
    follows, which then reads exactly what the plan says (no header again), and dropped when that load ends; a
    plan of other processes drops what it located when it returns."""
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    with jreshard.open(checkpoints.dirs["plain"]) as ckpt:
        target = _target(ckpt, mesh)
        own = ckpt.plan(target)
        state = ckpt._located
        assert state.locators and state.lane_tables  # archives located by the plan (headers read)
        before = (ckpt.io_stats.bytes_read, ckpt.io_stats.num_reads)
        first = ckpt.load(target)
        assert (ckpt.io_stats.bytes_read - before[0], ckpt.io_stats.num_reads - before[1]) == (own.bytes_to_read,
                                                                                               own.num_reads)
        assert not ckpt._located.locators and not ckpt._located.lane_tables and not ckpt._located.file_ids
        assert state.locators  # (the state a plan may still be using is swapped, not emptied under it)
        # the next load locates again: it reads the headers on top of the plan's bytes, and loads the same
        before = (ckpt.io_stats.bytes_read, ckpt.io_stats.num_reads)
        again = ckpt.load(target)
        assert ckpt.io_stats.num_reads - before[1] > own.num_reads
        assert not ckpt._located.locators
        for name in target:
            np.testing.assert_array_equal(np.asarray(again[name]), np.asarray(first[name]))
        # what is located for other processes ends with the plan; what is located for this one is kept
        abstract = _target(ckpt, AbstractMesh((2, 4), ("data", "model")))
        ckpt.plan(abstract, process_index=1, devices_per_process=2)
        assert not ckpt._located.locators
        every = ckpt.plan(abstract, process_index="all", devices_per_process=2)
        kept = set(ckpt._located.locators)
        ckpt._release_located()
        ckpt.plan(abstract, process_index=0, devices_per_process=2)
        assert kept == set(ckpt._located.locators) and kept  # this process's archives
        kept_state = ckpt._located
        assert sorted(every.processes) == [0, 1, 2, 3]
        others = set()  # what the other processes locate, each planned as if it were this one
        for k in (1, 2, 3):
            ckpt._release_located()
            monkeypatch.setattr(jax, "process_index", lambda k=k: k)
            ckpt.plan(abstract, process_index=k, devices_per_process=2)
            others |= set(ckpt._located.locators)
        assert others - kept  # archives only they need: the plan of all kept none of them (kept is 0's alone)
        ckpt.plan(target)
        assert ckpt._located.locators
    assert not ckpt._located.locators and kept_state.locators  # close() drops it (swapped, not emptied)


def test_header_cache_lives_with_the_located_state(checkpoints):
    """A DCP checkpoint of safetensors items: the section headers read to locate chunks are per-archive state
    too, kept from a plan for its load, dropped when the load ends, and never kept for other processes."""
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    with jreshard.open(checkpoints.dirs["safetensors"]) as ckpt:
        target = _target(ckpt, mesh)
        own = ckpt.plan(target)
        assert ckpt._located.headers  # headers read by the plan
        before = (ckpt.io_stats.bytes_read, ckpt.io_stats.num_reads)
        ckpt.load(target)
        assert (ckpt.io_stats.bytes_read - before[0], ckpt.io_stats.num_reads - before[1]) == (own.bytes_to_read,
                                                                                               own.num_reads)
        assert not ckpt._located.headers
        ckpt.plan(_target(ckpt, AbstractMesh((2, 4), ("data", "model"))), process_index=1, devices_per_process=2)
        assert not ckpt._located.headers and not ckpt._located.locators
