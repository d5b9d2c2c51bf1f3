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


def test_sample_written_without_torch(tmp_path, sample_ref):
    """tools/make_sample.py --torch-free writes the same tensors (numpy values) with jreshard.save_dcp in a
    process where torch cannot be imported; jreshard and torch's dcp.load both read them back exactly, with
    torch's chunks wherever a JAX sharding gives them."""
    import subprocess
    import sys

    import torch
    import torch.distributed.checkpoint as dcp

    from tests.helpers import child_env

    ms, _ = sample_ref
    out = tmp_path / "sample"
    code = ("import runpy, sys; sys.modules['torch'] = None; "
            f"sys.argv = ['make_sample.py', '--torch-free', {str(out)!r}]; "
            f"runpy.run_path({str(REPO_ROOT / 'tools' / 'make_sample.py')!r}, run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], env=child_env(JAX_PLATFORMS="cpu"), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    refs = {name: ms.torch_free_tensor(name) for name in ms.SAMPLE}
    with jreshard.open(out) as ckpt:
        assert ckpt.objects["step"] == ms.STEP
        assert sorted(ckpt.tensors) == sorted(refs)
        for name, ref in refs.items():
            np.testing.assert_array_equal(ckpt.read(name).view(np.uint8), ref.view(np.uint8), err_msg=name)
        chunks = {name: len(info.chunks) for name, info in ckpt.tensors.items()}
    with jreshard.open(SAMPLE_DIR) as torch_sample:
        for name, info in torch_sample.tensors.items():
            if name != "model.head.weight":  # torch's uneven split has no JAX sharding: saved as one chunk
                assert chunks[name] == len(info.chunks), name
    state = {name: torch.empty(ref.shape, dtype=getattr(torch, ms.SAMPLE[name][1])) for name, ref in refs.items()}
    dcp.load(state, checkpoint_id=str(out), no_dist=True)
    for name, ref in refs.items():
        np.testing.assert_array_equal(tw.to_numpy(state[name]).view(np.uint8), ref.view(np.uint8), err_msg=name)
