"""Runs longer than a read request are cut into several requests: every piece still lands in its shard.

The cut is exercised on the real fixture checkpoints by shrinking the request sizes (``BOUNCE`` for local
reads, ``MAX_REQUEST`` for ranged ones) to a few hundred bytes, so that nearly every run of every tensor is
cut, in every variant and for both read paths; the loaded arrays must equal torch's reading.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jreshard
from jreshard import read
from tests import torch_writers as tw
from tests.helpers import check_loaded_array, make_mesh, spec_fits

SPECS = [P(), P("data"), P(None, "model"), P("data", "model")]


@pytest.mark.parametrize("io", ["posix", "tensorstore"])
@pytest.mark.parametrize("variant", tw.VARIANTS)
def test_every_run_cut_into_small_requests(checkpoints, monkeypatch, variant, io):
    monkeypatch.setattr(read, "BOUNCE", 384)
    monkeypatch.setattr(read, "MAX_REQUEST", 384)
    mesh = make_mesh("2x4")
    ref = checkpoints.reference(variant)
    with jreshard.open(checkpoints.dirs[variant], io=io) as ckpt:
        targets = {}
        for k, (name, info) in enumerate(sorted(ckpt.tensors.items())):
            fitting = [s for s in SPECS if spec_fits(s, info.shape, dict(mesh.shape))]
            spec = fitting[k % len(fitting)]
            targets[name] = jax.ShapeDtypeStruct(info.shape, info.dtype, sharding=NamedSharding(mesh, spec))
        out = ckpt.load(targets)
    assert set(out) == set(ref)
    for name, arr in out.items():
        check_loaded_array(arr, targets[name], np.asarray(ref[name]), f"{variant}/{io}: {name}")
