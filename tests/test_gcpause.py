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
from jreshard import program
from jreshard.gcpause import gc_paused
from tests.helpers import make_mesh


def test_plan_pauses_gc_and_restores_it(checkpoints, monkeypatch):
    seen = []
    make_step = program.make_step

    def spy(*args, **kwargs):
        seen.append(gc.isenabled())
        return make_step(*args, **kwargs)

    monkeypatch.setattr(program, "make_step", spy)
    mesh = make_mesh("2x4")
    with jreshard.open(checkpoints.dirs["plain"]) as ckpt:
        target = {name: jax.ShapeDtypeStruct(info.shape, info.dtype, sharding=NamedSharding(mesh, P()))
                  for name, info in ckpt.tensors.items()}
        assert gc.isenabled()
        ckpt.plan(target)
        assert seen and not any(seen)
        assert gc.isenabled()
        gc.disable()
        try:
            ckpt.plan(target)
            assert not gc.isenabled()  # a collector the caller paused stays paused
        finally:
            gc.enable()


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
