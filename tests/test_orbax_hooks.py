"""The Orbax v0 hooks (jreshard.orbax), used only through Orbax's public API: ``ocp.Checkpointer``,
``ocp.CheckpointManager`` and ``ocp.args``."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jreshard
from tests.helpers import (
    REPO_ROOT,
    assert_same,
    check_loaded_array,
    child_env,
    flatten,
    make_mesh,
    nest,
    spec_fits,
)

ocp = pytest.importorskip("orbax.checkpoint")
jo = pytest.importorskip("jreshard.orbax")

PREFERRED_SPECS = (P("data", "model"), P("model", "data"), P("data"), P(None, "model"), P())
STEPS = (100, 200, 300)


def _sharded_targets(checkpoints, variant: str, mesh) -> dict:
    """One target per saved tensor, each on the first of PREFERRED_SPECS that tiles it (most are sharded)."""
    refs = checkpoints.reference(variant)
    mesh_shape = dict(mesh.shape)
    out = {}
    for name, ref in refs.items():
        spec = next(s for s in PREFERRED_SPECS if spec_fits(s, ref.shape, mesh_shape))
        out[name] = jax.ShapeDtypeStruct(ref.shape, ref.dtype, sharding=NamedSharding(mesh, spec))
    return out


# ---------------------------------------------------------------------------------------------
# ocp.Checkpointer
# ---------------------------------------------------------------------------------------------


def test_checkpointer_restore_matches_torch(checkpoints):
    mesh = make_mesh("2x4")
    flat = _sharded_targets(checkpoints, "plain", mesh)
    assert sum(t.sharding.spec != P() for t in flat.values()) > len(flat) // 2
    tree = nest(flat)
    with ocp.Checkpointer(jo.TorchCheckpointHandler()) as ckptr:
        out = ckptr.restore(checkpoints.dirs["plain"], args=jo.TorchRestore(tree))
    got = flatten(out)
    assert set(got) == set(flat)
    refs = checkpoints.torch_reference["plain"]
    for name, target in flat.items():
        check_loaded_array(got[name], target, refs[name], f"Checkpointer.restore:{name}")


def test_checkpointer_positional_restore_and_objects(checkpoints):
    # Orbax's legacy form restore(path, item) builds TorchRestore(item) from the registered args.
    mesh = make_mesh("4x2")
    name = "d2.s0s1"
    ref = checkpoints.torch_reference["zstd"][name]
    target = {name: jax.ShapeDtypeStruct(ref.shape, ref.dtype, sharding=NamedSharding(mesh, P("model", "data"))),
              "step": 0}
    out = ocp.Checkpointer(jo.TorchCheckpointHandler()).restore(checkpoints.dirs["zstd"], target)
    check_loaded_array(out[name], target[name], ref, f"positional restore:{name}")
    assert out["step"] == checkpoints.torch_objects["zstd"]["step"]


def test_checkpointer_restore_with_mapping(checkpoints):
    mesh = make_mesh("2x4")
    refs = checkpoints.torch_reference["plain"]
    a, b = refs["d2.s0s1"], refs["model.layers.1.w"]  # (16, 24) float32, (16, 8) bfloat16
    target = {
        "wT": jax.ShapeDtypeStruct(a.T.shape, a.dtype, sharding=NamedSharding(mesh, P("model", "data"))),
        "dense": {"kernel": jax.ShapeDtypeStruct(b.T.shape, np.float32, sharding=NamedSharding(mesh, P(None, "model")))},
    }
    mapping = {"wT": jreshard.saved("d2.s0s1").T,
               "dense.kernel": jreshard.saved("model.layers.1.w").T.astype("float32")}
    args = jo.TorchRestore(target, mapping=mapping, max_inflight_bytes=1024)
    out = ocp.Checkpointer(jo.TorchCheckpointHandler()).restore(checkpoints.dirs["plain"], args=args)
    check_loaded_array(out["wT"], target["wT"], np.ascontiguousarray(a.T), "mapping wT")
    check_loaded_array(out["dense"]["kernel"], target["dense"]["kernel"], np.ascontiguousarray(b.T).astype(np.float32),
                       "mapping dense.kernel")


def test_metadata(checkpoints):
    refs = checkpoints.torch_reference["plain"]
    expected = {n: (r.shape, np.dtype(r.dtype)) for n, r in refs.items()}
    meta = jo.TorchCheckpointHandler().metadata(checkpoints.dirs["plain"])
    assert all(isinstance(m, jax.ShapeDtypeStruct) and m.sharding is None for m in meta.values())
    assert {n: (tuple(m.shape), np.dtype(m.dtype)) for n, m in meta.items()} == expected
    # through Orbax: Checkpointer.metadata(...).item_metadata is the handler's metadata
    step_meta = ocp.Checkpointer(jo.TorchCheckpointHandler()).metadata(checkpoints.dirs["plain"])
    assert {n: (tuple(m.shape), np.dtype(m.dtype)) for n, m in step_meta.item_metadata.items()} == expected
    # the metadata, given shardings, is a restore target
    s = NamedSharding(make_mesh("8"), P())
    out = ocp.Checkpointer(jo.TorchCheckpointHandler()).restore(
        checkpoints.dirs["plain"], args=jo.TorchRestore({"plain.w": meta["plain.w"].update(sharding=s)}))
    assert_same(np.asarray(out["plain.w"]), refs["plain.w"], "restore from metadata")


def test_errors_are_jreshard_errors(checkpoints, tmp_path):
    handler = jo.TorchCheckpointHandler()
    with pytest.raises(jo.SaveNotSupportedError) as e:
        handler.save(tmp_path / "x", jo.TorchRestore({}))
    assert isinstance(e.value, jreshard.JReshardError) and "only restores" in str(e.value)
    with pytest.raises(jreshard.JReshardError, match="only restores"):
        ocp.Checkpointer(handler).save(tmp_path / "y", args=jo.TorchRestore({}))
    with pytest.raises(jreshard.InvalidArgumentError, match="needs a target"):
        ocp.Checkpointer(handler).restore(checkpoints.dirs["plain"], args=jo.TorchRestore())
    with pytest.raises(jreshard.TargetMismatchError, match="no.such"):
        s = NamedSharding(make_mesh("8"), P())
        ocp.Checkpointer(handler).restore(
            checkpoints.dirs["plain"], args=jo.TorchRestore({"no.such": jax.ShapeDtypeStruct((2,), np.float32,
                                                                                               sharding=s)}))


def test_import_jreshard_does_not_import_orbax():
    code = ("import sys, jreshard; assert 'orbax' not in sys.modules and 'orbax.checkpoint' not in sys.modules\n"
            "import jreshard.orbax; assert 'orbax.checkpoint' in sys.modules; print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], check=False, env=child_env(JAX_PLATFORMS="cpu"), cwd=str(REPO_ROOT),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


# ---------------------------------------------------------------------------------------------
# ocp.CheckpointManager over torch step directories (step-100, step-200, step-300)
# ---------------------------------------------------------------------------------------------

_STEP_WRITER = r"""
import sys, numpy as np, torch, torch.distributed.checkpoint as dcp
root, steps = sys.argv[1], [int(s) for s in sys.argv[2:]]
for step in steps:
    g = torch.Generator().manual_seed(step)
    w = torch.randn(8, 12, generator=g) + step
    b = (torch.arange(16, dtype=torch.float32) * step).to(torch.bfloat16)
    dcp.save({"model": {"w": w, "b": b}, "step": step}, checkpoint_id=f"{root}/step-{step}")
    np.save(f"{root}/ref-w-{step}.npy", w.numpy())
    np.save(f"{root}/ref-b-{step}.npy", b.view(torch.int16).numpy())
"""


@pytest.fixture(scope="module")
def step_root(tmp_path_factory):
    """torchtitan's layout: <root>/step-<n>/{.metadata, *.distcp}, written by torch's DCP (steps differ), plus an
    uncommitted step (no .metadata) and an unrelated directory, which must both be ignored."""
    root = tmp_path_factory.mktemp("torch_steps")
    proc = subprocess.run([sys.executable, "-c", _STEP_WRITER, str(root), *map(str, STEPS)],
                          env=child_env(OMP_NUM_THREADS=1), cwd=str(REPO_ROOT), capture_output=True, text=True, check=False,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    (root / "step-400").mkdir()  # a step being written: no .metadata yet
    (root / "step-400" / "__0_0.distcp").write_bytes(b"partial")
    (root / "tensorboard").mkdir()
    (root / "step-500.orbax-checkpoint-tmp-1").mkdir()  # Orbax's temporary-directory naming
    refs = {s: {"model.w": np.load(root / f"ref-w-{s}.npy"),
                "model.b": np.load(root / f"ref-b-{s}.npy").view(ml_dtypes.bfloat16)} for s in STEPS}
    return root, refs


def _step_targets(mesh):
    return {"model": {"w": jax.ShapeDtypeStruct((8, 12), np.float32, sharding=NamedSharding(mesh, P("data", "model"))),
                      "b": jax.ShapeDtypeStruct((16,), ml_dtypes.bfloat16, sharding=NamedSharding(mesh, P("data")))},
            "step": 0}


def _check_step(out, target, refs, step, what):
    assert out["step"] == step, what
    check_loaded_array(out["model"]["w"], target["model"]["w"], refs[step]["model.w"], f"{what} step {step} w")
    check_loaded_array(out["model"]["b"], target["model"]["b"], refs[step]["model.b"], f"{what} step {step} b")


def test_step_name_format(step_root):
    root, _ = step_root
    fmt = jo.TorchStepNameFormat()
    assert fmt.build_name(1000) == "step-1000"
    assert jo.TorchStepNameFormat(fixed_length=4).build_name(7) == "step-0007"
    assert sorted(m.step for m in fmt.find_all(root)) == list(STEPS)
    assert fmt.find_step(root, 200).path.name == "step-200"
    with pytest.raises(ValueError):  # Orbax's NameFormat contract: ValueError for a missing step
        fmt.find_step(root, 400)
    assert sorted(m.step for m in jo.TorchStepNameFormat(marker=None).find_all(root)) == [*STEPS, 400]


def test_torch_checkpoint_manager_flat_steps(step_root):
    root, refs = step_root
    mesh = make_mesh("2x4")
    target = _step_targets(mesh)
    # Options that would make a writable manager clean up / collect steps: the manager stays read-only.
    options = ocp.CheckpointManagerOptions(cleanup_tmp_directories=True, max_to_keep=1)
    with jo.TorchCheckpointManager(root, options=options) as mngr:
        assert isinstance(mngr, ocp.CheckpointManager)
        assert list(mngr.all_steps()) == list(STEPS)
        assert mngr.latest_step() == STEPS[-1]
        for step in (200, 100):
            _check_step(mngr.restore(step, args=jo.TorchRestore(target)), target, refs, step, "manager")
        _check_step(mngr.restore(None, args=jo.TorchRestore(target)), target, refs, STEPS[-1], "manager latest")
        _check_step(mngr.restore(100, items=target), target, refs, 100, "manager items=")
        expected = {"model.w": ((8, 12), np.dtype(np.float32)), "model.b": ((16,), np.dtype(ml_dtypes.bfloat16))}
        for meta in (mngr.item_metadata(300), mngr.metadata(300).item_metadata):
            assert {n: (tuple(m.shape), np.dtype(m.dtype)) for n, m in meta.items()} == expected
        with pytest.raises(jreshard.MissingDataError, match="400"):
            mngr.restore(400, args=jo.TorchRestore(target))
        with pytest.raises(jo.SaveNotSupportedError):
            mngr.save(500, args=jo.TorchRestore(target))
    assert sorted(os.listdir(root)) == sorted([f"step-{s}" for s in (*STEPS, 400)] + ["tensorboard", "step-500.orbax-checkpoint-tmp-1"] + [
        f"ref-{k}-{s}.npy" for k in "wb" for s in STEPS])  # read-only: nothing written or deleted


def test_checkpoint_manager_item_subdirectories(step_root, tmp_path):
    """A plain ocp.CheckpointManager, composite item 'model' (<root>/step-<n>/model/.metadata) and single item
    (<root>/step_<n>/default/.metadata, Orbax's own step names)."""
    root, refs = step_root
    nested, single = tmp_path / "nested", tmp_path / "single"
    for s in STEPS:
        (nested / f"step-{s}").mkdir(parents=True)
        os.symlink(root / f"step-{s}", nested / f"step-{s}" / "model")
        (single / f"step_{s}").mkdir(parents=True)
        os.symlink(root / f"step-{s}", single / f"step_{s}" / "default")
    mesh = make_mesh("4x2")
    target = _step_targets(mesh)

    options = ocp.CheckpointManagerOptions(step_name_format=jo.TorchStepNameFormat(), read_only=True)
    with ocp.CheckpointManager(nested, item_handlers={"model": jo.TorchCheckpointHandler()}, options=options) as m:
        assert list(m.all_steps()) == list(STEPS) and m.latest_step() == STEPS[-1]
        out = m.restore(200, args=ocp.args.Composite(model=jo.TorchRestore(target)))
        _check_step(out["model"], target, refs, 200, "composite")
        assert tuple(m.item_metadata(100)["model"]["model.w"].shape) == (8, 12)

    options = ocp.CheckpointManagerOptions(step_prefix="step", read_only=True)
    with ocp.CheckpointManager(single, item_handlers=jo.TorchCheckpointHandler(), options=options) as m:
        assert list(m.all_steps()) == list(STEPS)
        _check_step(m.restore(100, args=jo.TorchRestore(target)), target, refs, 100, "single item")
