"""The sample checkpoint bundled in jreshard/sample/dcp (written by tools/make_sample.py) loads correctly."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jreshard

from tests import torch_writers as tw
from tests.helpers import REPO_ROOT, check_loaded_array, make_mesh, spec_fits

SAMPLE_DIR = Path(jreshard.__file__).resolve().parent / "sample" / "dcp"


def _make_sample_module():
    spec = importlib.util.spec_from_file_location("make_sample", REPO_ROOT / "tools" / "make_sample.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def sample_ref():
    ms = _make_sample_module()
    return ms, {name: tw.to_numpy(ms.full_tensor(name)) for name in ms.SAMPLE}


def test_sample_files_present():
    assert (SAMPLE_DIR / ".metadata").is_file()
    files = sorted(p.name for p in SAMPLE_DIR.glob("*.distcp"))
    assert files == [f"__{r}_0.distcp" for r in range(4)]
    total = sum(p.stat().st_size for p in SAMPLE_DIR.iterdir())
    assert total < 256 * 1024


def test_sample_read_and_objects(sample_ref):
    ms, ref = sample_ref
    ck = jreshard.open(SAMPLE_DIR)
    assert set(ck.tensors) == set(ms.SAMPLE)
    assert dict(ck.objects) == {"step": ms.STEP}
    for name, arr in ref.items():
        got = ck.read(name)
        assert got.dtype == arr.dtype and got.shape == arr.shape
        assert got.tobytes() == arr.tobytes(), name


@pytest.mark.parametrize("spec", [P(), P("data"), P(None, "model"), P("data", "model")], ids=str)
def test_sample_load(sample_ref, spec):
    _, ref = sample_ref
    mesh = make_mesh("2x4")
    axes = {"data": 2, "model": 4}
    targets = {
        n: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, spec if spec_fits(spec, a.shape, axes) else P()))
        for n, a in ref.items()
    }
    out = jreshard.load(SAMPLE_DIR, targets)
    for n, t in targets.items():
        check_loaded_array(out[n], t, ref[n], f"sample:{n}")
    assert isinstance(out["model.head.weight"], jax.Array)
    assert np.asarray(out["model.head.weight"]).shape == (10, 32)
