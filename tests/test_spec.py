"""Saved layouts as jax.sharding: for DTensors written by torch, the PartitionSpec jreshard derives from the
chunks must shard the tensor exactly into the saved chunks, and loading with it reads one whole chunk per
device. Expected split counts come from the writer's placements, not from jreshard."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding

import jreshard
from jreshard.planning import normalize_index
from jreshard.spec import saved_grid, saved_partition_spec
from tests import torch_writers as tw
from tests.helpers import assert_same

MESH_SIZE = {"dtensor1": (4,), "dtensor2": (2, 2)}


def expected_splits(t: tw.TensorSpec) -> list[int]:
    """Chunks per dimension that torch's placements give (Shard(d) on mesh dim k splits dim d by its size)."""
    splits = [1] * len(t.shape)
    for size, placement in zip(MESH_SIZE[t.kind], t.placements):
        if placement.startswith("S"):
            splits[int(placement[1:])] *= size
    return splits


def even(t: tw.TensorSpec) -> bool:
    return all(n % s == 0 and n // s > 0 for n, s in zip(t.shape, expected_splits(t)))


CASES = [t for t in tw.tensors_for("plain") if t.kind in MESH_SIZE and t.shape and not t.big]


@pytest.mark.parametrize("t", CASES, ids=[t.name for t in CASES])
def test_saved_grid_matches_placements(checkpoints, t):
    ckpt = jreshard.open(checkpoints.dirs["plain"])
    grid = saved_grid(ckpt.tensors[t.name])
    if even(t):
        assert grid is not None and [len(c) - 1 for c in grid] == expected_splits(t)


@pytest.mark.parametrize("t", [t for t in CASES if even(t)], ids=[t.name for t in CASES if even(t)])
@pytest.mark.parametrize("mesh_shape", [(4,), (2, 2), (2, 4)])
def test_saved_spec_loads_one_chunk_per_device(checkpoints, t, mesh_shape):
    names = ("a", "b")[: len(mesh_shape)]
    mesh = Mesh(np.array(jax.devices()[: math.prod(mesh_shape)]).reshape(mesh_shape), names)
    ckpt = jreshard.open(checkpoints.dirs["plain"])
    info = ckpt.tensors[t.name]
    spec = saved_partition_spec(info, mesh)
    splits = expected_splits(t)
    sizes = dict(mesh.shape)
    fits = all(s == 1 or s in sizes.values() or s == math.prod(mesh_shape) for s in splits) and \
        math.prod(splits) <= math.prod(mesh_shape)
    if spec is None:
        assert not fits or len([s for s in splits if s > 1]) > 1  # no unused axis (or run of axes) for a split
        return
    counts = [math.prod(sizes[a] for a in ((p,) if isinstance(p, str) else p)) if p else 1 for p in spec]
    assert counts == splits
    sharding = NamedSharding(mesh, spec)
    chunk_boxes = {tuple((o, o + s) for o, s in zip(c.offsets, c.sizes)) for c in info.chunks}
    shard_boxes = {normalize_index(i, info.shape) for i in sharding.devices_indices_map(info.shape).values()}
    assert shard_boxes == chunk_boxes
    target = {t.name: jax.ShapeDtypeStruct(info.shape, info.dtype, sharding=sharding)}
    plan = ckpt.plan(target)
    assert plan.as_saved == {t.name: True}
    arr = ckpt.load(target)[t.name]
    assert_same(np.asarray(arr), checkpoints.reference("plain")[t.name], t.name)


def test_uneven_split_has_no_named_sharding(checkpoints):
    ckpt = jreshard.open(checkpoints.dirs["plain"])
    mesh = Mesh(np.array(jax.devices()[:4]), ("a",))
    # (10, 6) Shard(0) over 4 ranks: torch.chunk gives rows 3, 3, 3, 1.
    assert [len(c) - 1 for c in saved_grid(ckpt.tensors["d1.uneven_s0"])] == [4, 1]
    assert saved_partition_spec(ckpt.tensors["d1.uneven_s0"], mesh) is None
    assert ckpt.saved_sharding("d1.uneven_s0", mesh) is None
