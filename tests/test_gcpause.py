"""Opening, planning and loading run with the cyclic garbage collector paused (their many small objects would
trigger full collections that rescan every live object), and leave it as they found it, with nested and
concurrent pauses."""

from __future__ import annotations

import gc
import threading

import jax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jreshard
from jreshard import place, program
from jreshard.gcpause import gc_paused
from tests.helpers import make_mesh


@pytest.mark.parametrize("call", ["plan", "load"])
def test_plan_and_load_pause_gc_and_restore_it(checkpoints, monkeypatch, call):
    seen = []
    make_step, put = program.make_step, place.put

    def spy(real):
        def run(*args, **kwargs):
            seen.append((real.__name__, gc.isenabled()))
            return real(*args, **kwargs)
        return run

    monkeypatch.setattr(program, "make_step", spy(make_step))
    monkeypatch.setattr(place, "put", spy(put))
    mesh = make_mesh("2x4")
    with jreshard.open(checkpoints.dirs["plain"]) as ckpt:
        target = {name: jax.ShapeDtypeStruct(info.shape, info.dtype, sharding=NamedSharding(mesh, P()))
                  for name, info in ckpt.tensors.items()}
        assert gc.isenabled()
        getattr(ckpt, call)(target)
        # Planning (both) and placing (a load) ran with the collector off.
        assert {n for n, _ in seen} == ({"make_step", "put"} if call == "load" else {"make_step"})
        assert not any(on for _, on in seen)
        assert gc.isenabled()
        gc.disable()
        try:
            getattr(ckpt, call)(target)
            assert not gc.isenabled()  # a collector the caller paused stays paused
        finally:
            gc.enable()


def test_load_by_path_keeps_the_pause_from_open_to_load(checkpoints, monkeypatch):
    """``jreshard.load(path)`` opens and loads in one pause: the collector does not come back between the open and
    the load (where its first collection would rescan every object the open made)."""
    states = []
    real = jreshard.open_source

    def open_source(*args, **kwargs):
        out = real(*args, **kwargs)
        states.append(gc.isenabled())  # the open's own pause has ended here
        return out

    monkeypatch.setattr(jreshard, "open_source", open_source)
    with jreshard.open(checkpoints.dirs["plain"]) as ckpt:
        name, info = next(iter(ckpt.tensors.items()))
    target = {name: jax.ShapeDtypeStruct(info.shape, info.dtype, sharding=NamedSharding(make_mesh("2x4"), P()))}
    assert states == [True]  # a plain open leaves the collector on
    out = jreshard.load(checkpoints.dirs["plain"], target)
    assert out[name].shape == info.shape
    assert states == [True, False]
    assert gc.isenabled()


def test_concurrent_pauses_hold_until_the_last_ends():
    entered, release = threading.Event(), threading.Event()

    def hold():
        with gc_paused():
            entered.set()
            release.wait(10)

    t = threading.Thread(target=hold)
    assert gc.isenabled()
    with gc_paused():
        t.start()
        assert entered.wait(10)
    assert not gc.isenabled()  # the other thread's pause still holds
    release.set()
    t.join(10)
    assert gc.isenabled()


def test_an_error_inside_ends_the_pause():
    with pytest.raises(ValueError):
        with gc_paused():
            raise ValueError("boom")
    assert gc.isenabled()
