"""A load reads the next unit while the previous one goes to the devices, within ``max_inflight_bytes``.

Events are logged without timing: a unit's reads submitted (``Checkpoint._start_unit``), its pieces put on
devices (``jreshard.place.put``) and, where device_put copies (accelerators; forced here on CPU devices), the
wait for a transfer to finish (``jax.block_until_ready``) after which its host buffers are released. The
host bytes of units submitted but not yet placed, or placed but still being copied, never exceed the bound;
with room for two units, unit k+1 is submitted before unit k is placed.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jreshard
from jreshard import checkpoint, place, program
from tests.helpers import check_loaded_array, make_mesh

KiB = 2**10


@pytest.fixture(scope="module")
def plain(checkpoints):
    with jreshard.open(checkpoints.dirs["plain"]) as ckpt:
        yield ckpt, checkpoints.reference("plain")


def _log(monkeypatch, copies: bool):
    events: list[tuple[str, int]] = []
    start, put, ready = checkpoint.Checkpoint._start_unit, place.put, jax.block_until_ready

    def start_unit(self, unit, *args):
        events.append(("start", unit.host_bytes))
        return start(self, unit, *args)

    def put_(host, devices):
        if copies:  # as an accelerator does: the device holds its own copy, the host buffer may be reused
            host = [np.array(h, copy=True) for h in host]
        out = put(host, devices)
        events.append(("put", id(out)))
        return out

    def ready_(x):
        if isinstance(x, list):
            events.append(("ready", id(x)))
        return ready(x)

    make_global = place.make_global

    def make_global_(shape, sharding, pieces):
        if copies:
            pieces = {box: np.array(h, copy=True) for box, h in pieces.items()}
        return make_global(shape, sharding, pieces)

    monkeypatch.setattr(checkpoint.Checkpoint, "_start_unit", start_unit)
    monkeypatch.setattr(place, "put", put_)
    monkeypatch.setattr(place, "make_global", make_global_)
    monkeypatch.setattr(jax, "block_until_ready", ready_)
    if copies:
        monkeypatch.setattr(checkpoint, "_copies_to_device", lambda devices: True)
    return events


def _held(events, copies: bool) -> list[int]:
    """Host bytes held (submitted and not placed; with copies, placed and not yet transferred) after each
    event."""
    submitted: list[int] = []  # bytes of units submitted, in order, not yet put
    moving: dict[int, int] = {}
    out = []
    for kind, x in events:
        if kind == "start":
            submitted.append(x)
        elif kind == "put":
            nbytes = submitted.pop(0)
            if copies:
                moving[x] = nbytes
        elif kind == "ready":
            moving.pop(x, None)
        out.append(sum(submitted) + sum(moving.values()))
    return out


def _target(ckpt, names):
    mesh = make_mesh("2x4")
    return {n: jax.ShapeDtypeStruct(ckpt.tensors[n].shape, ckpt.tensors[n].dtype,
                                    sharding=NamedSharding(mesh, P("data", "model")))
            for n in names}


NAMES = ("mp.a", "mp.b", "mp.c", "mp.d", "mp.e")  # 512 KiB .. 1 MiB each


@pytest.mark.parametrize("copies", [False, True])
def test_next_unit_is_read_while_the_previous_is_placed(plain, monkeypatch, copies):
    ckpt, ref = plain
    target = _target(ckpt, NAMES)
    monkeypatch.setattr(program, "MIN_PACK", 256 * KiB)  # units of one tensor each, well under the bound
    plan = ckpt.plan(target, max_inflight_bytes=2100 * KiB)
    units = [u for b in plan._program.batches for u in b.units]
    assert len(units) >= 3 and all(u.host_bytes <= 1050 * KiB for u in units)  # any two fit in the bound
    events = _log(monkeypatch, copies)
    out = ckpt.load(target, max_inflight_bytes=2100 * KiB)
    kinds = [k for k, _ in events]
    assert kinds.count("start") == kinds.count("put") == len(units)
    # Every unit after the first is submitted before the one before it is placed (where transfers hold host
    # buffers too, as long as the one before that has finished its transfer: at least once here).
    starts = [i for i, k in enumerate(kinds) if k == "start"]
    puts = [i for i, k in enumerate(kinds) if k == "put"]
    overlapped = [s < p for s, p in zip(starts[1:], puts[:-1])]
    assert any(overlapped) if copies else all(overlapped), kinds
    assert max(_held(events, copies)) <= 2100 * KiB
    for n in NAMES:
        check_loaded_array(out[n], target[n], ref[n], n)


@pytest.mark.parametrize("copies", [False, True])
def test_no_overlap_past_the_bound(plain, monkeypatch, copies):
    ckpt, ref = plain
    target = _target(ckpt, NAMES)
    plan = ckpt.plan(target, max_inflight_bytes=600 * KiB)
    units = [u for b in plan._program.batches for u in b.units]
    sizes_ = [u.host_bytes for u in units]
    assert all(a + b > 600 * KiB for a, b in zip(sizes_, sizes_[1:]))  # no two neighbours fit together
    events = _log(monkeypatch, copies)
    out = ckpt.load(target, max_inflight_bytes=600 * KiB)
    kinds = [k for k, _ in events if k != "ready"]
    assert kinds == ["start", "put"] * len(units), kinds  # each unit placed (and transferred) before the next starts
    assert max(_held(events, copies)) <= 600 * KiB
    for n in NAMES:
        check_loaded_array(out[n], target[n], ref[n], n)


def test_accelerator_host_blocks_are_reused(plain, monkeypatch):
    """Where device_put copies, a unit's host blocks go back to a pool once its transfer is done and the next
    units are read into them: fewer fresh blocks than units, and every array exact."""
    ckpt, ref = plain
    target = _target(ckpt, NAMES)
    monkeypatch.setattr(program, "MIN_PACK", 256 * KiB)
    plan = ckpt.plan(target, max_inflight_bytes=2100 * KiB)
    units = [u for b in plan._program.batches for u in b.units]
    events = _log(monkeypatch, copies=True)
    fresh = []
    empty = place._empty
    monkeypatch.setattr(place, "_empty", lambda n: fresh.append(n) or empty(n))
    out = ckpt.load(target, max_inflight_bytes=2100 * KiB)
    assert len(units) >= 4 and 0 < len(fresh) < len(units)
    assert max(_held(events, True)) <= 2100 * KiB
    for n in NAMES:
        check_loaded_array(out[n], target[n], ref[n], n)
    # On CPU devices (which alias host buffers), nothing is reused; nor where a unit's pieces go to both kinds
    # of devices (devices 4-7 copying here, 0-3 aliasing).
    for mixed in (False, True):
        fresh.clear()
        monkeypatch.undo()
        monkeypatch.setattr(program, "MIN_PACK", 256 * KiB)
        monkeypatch.setattr(place, "_empty", lambda n: fresh.append(n) or empty(n))
        if mixed:
            put = place.put
            monkeypatch.setattr(checkpoint, "_copies_to_device", lambda devices: any(d.id >= 4 for d in devices))
            monkeypatch.setattr(place, "put", lambda host, devices: put(
                [np.array(h, copy=True) if d.id >= 4 else h for h, d in zip(host, devices)], devices))
        out = ckpt.load(target, max_inflight_bytes=2100 * KiB)
        assert len(fresh) >= len(units)
        for n in NAMES:
            check_loaded_array(out[n], target[n], ref[n], n)


def test_blocks_of_units_with_aliasing_devices_never_join_the_pool(plain, monkeypatch):
    """Devices 4-7 copy, 0-3 alias (as a CPU device does). Tensors only on 4-7 are read through the pool; a unit
    with pieces on 0-3 allocates fresh blocks that stay with the arrays aliasing them, never reused by a later
    unit, so every array stays exact."""
    ckpt, ref = plain
    monkeypatch.setattr(program, "MIN_PACK", 256 * KiB)
    put = place.put
    monkeypatch.setattr(checkpoint, "_copies_to_device", lambda devices: any(d.id >= 4 for d in devices))
    monkeypatch.setattr(place, "put", lambda host, devices: put(
        [np.array(h, copy=True) if d.id >= 4 else h for h, d in zip(host, devices)], devices))
    taken = []
    take = place.HostPool.take
    monkeypatch.setattr(place.HostPool, "take", lambda self, n: taken.append(self.lent) or take(self, n))
    copying = jax.sharding.Mesh(np.array(jax.devices()[4:8]).reshape(2, 2), ("data", "model"))
    target = {}
    for k, n in enumerate(NAMES):  # alternately on all 8 devices (mixed) and on the copying 4 only
        info = ckpt.tensors[n]
        mesh = make_mesh("2x4") if k % 2 == 0 else copying
        target[n] = jax.ShapeDtypeStruct(info.shape, info.dtype, sharding=NamedSharding(mesh, P("data", "model")))
    out = ckpt.load(target, max_inflight_bytes=2100 * KiB)
    assert taken and min(taken) >= 0  # the pool lent only what it handed out
    for n in NAMES:
        check_loaded_array(out[n], target[n], ref[n], n)


def _plans_and_starts(monkeypatch):
    events: list[str] = []
    plan_batch, start = program._plan_batch, checkpoint.Checkpoint._start_unit

    def plan_batch_(*args, **kwargs):
        events.append("plan")
        return plan_batch(*args, **kwargs)

    def start_unit(self, unit, *args):
        events.append("start")
        return start(self, unit, *args)

    monkeypatch.setattr(program, "_plan_batch", plan_batch_)
    monkeypatch.setattr(checkpoint.Checkpoint, "_start_unit", start_unit)
    return events


def test_a_load_plans_each_batch_while_the_one_before_is_read(plain, monkeypatch):
    """Without a progress report, a load plans its batches as it runs them: batch k+1 is planned after batch k's
    reads are submitted, so reading starts once the first batch is planned. With a report (which needs the
    total bytes first) every batch is planned before the first read. Both give the same exact arrays."""
    ckpt, ref = plain
    target = _target(ckpt, NAMES)
    monkeypatch.setattr(program, "MIN_PACK", 256 * KiB)  # a batch per tensor
    events = _plans_and_starts(monkeypatch)
    out = ckpt.load(target, max_inflight_bytes=2100 * KiB)
    assert events.count("plan") == events.count("start") >= 3
    assert events == ["plan", "start"] * events.count("plan"), events
    for n in NAMES:
        check_loaded_array(out[n], target[n], ref[n], n)
    events.clear()
    seen = []
    out = ckpt.load(target, max_inflight_bytes=2100 * KiB, progress=seen.append)
    k = events.count("plan")
    assert events == ["plan"] * k + ["start"] * k, events
    assert seen[-1]["bytes_done"] == seen[-1]["bytes_total"] == sum(ckpt.tensors[n].nbytes for n in NAMES)
    for n in NAMES:
        check_loaded_array(out[n], target[n], ref[n], n)


def test_a_batch_that_fails_to_plan_fails_the_load_once_the_reads_before_it_end(plain, monkeypatch):
    """A batch planned while earlier ones are read (a header found corrupt, say) fails the load with its error,
    after every unit already submitted has been waited for: no read still writes into a buffer, no array is
    returned."""
    ckpt, _ = plain
    target = _target(ckpt, NAMES)
    monkeypatch.setattr(program, "MIN_PACK", 256 * KiB)
    events = _plans_and_starts(monkeypatch)
    plan_batch, finish = program._plan_batch, checkpoint.Checkpoint._finish_unit
    finished: list[int] = []

    def plan_batch_(*args, **kwargs):
        if events.count("plan") == 2:  # the third batch
            raise jreshard.JReshardError("mp.c: planted failure while planning")
        return plan_batch(*args, **kwargs)

    def finish_(self, unit, hosts, wait):
        finished.append(1)
        return finish(self, unit, hosts, wait)

    monkeypatch.setattr(program, "_plan_batch", plan_batch_)
    monkeypatch.setattr(checkpoint.Checkpoint, "_finish_unit", finish_)
    with pytest.raises(jreshard.JReshardError, match="planted failure"):
        ckpt.load(target, max_inflight_bytes=2100 * KiB)
    assert events == ["plan", "start"] * 2 and len(finished) == 2
