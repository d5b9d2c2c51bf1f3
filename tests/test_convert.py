"""jreshard.convert: a PyTorch checkpoint into a native Orbax checkpoint, batch by batch and atomically."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jreshard
import jreshard.write_orbax as jconvert
from jreshard import convert
from jreshard.write_orbax import ConvertError, work_dir_of
from tests.helpers import REPO_ROOT, assert_same, child_env, make_mesh

VARIANT = "plain"


def _spec_for(shape, mesh) -> P:
    """First dim over 'data' and second over 'model' where they divide evenly (a layout torch never saved)."""
    spec = []
    for dim, axis in zip(shape, mesh.axis_names):
        spec.append(axis if dim % mesh.shape[axis] == 0 else None)
    return P(*spec)


def _abstract(dest, mesh):
    """The converted checkpoint's tree (from Orbax's own metadata) as abstract arrays on ``mesh``."""
    meta = ocp.StandardCheckpointer().metadata(dest).item_metadata.tree
    return jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=NamedSharding(mesh, _spec_for(m.shape, mesh))),
        meta)


def _flat(tree) -> dict:
    return {".".join(jreshard.targets.key_name(k) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _check_all(dest, refs, mesh) -> None:
    """Plain Orbax restores every tensor onto ``mesh`` with torch's values (bit for bit) and dtypes."""
    abstract = _abstract(dest, mesh)
    with ocp.StandardCheckpointer() as c:
        restored = c.restore(dest, abstract)
    flat, flat_abstract = _flat(restored), _flat(abstract)
    assert sorted(flat) == sorted(refs)
    for name, ref in refs.items():
        arr = flat[name]
        assert isinstance(arr, jax.Array), name
        assert arr.sharding.is_equivalent_to(flat_abstract[name].sharding, arr.ndim), name
        assert_same(arr, ref, name)


def _work_dirs(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.endswith(jconvert.TMP_SUFFIX))


def _pending(work: Path) -> int:
    """Files the OCDBT store of a running conversion has committed so far (each batch adds some)."""
    stage = work / "ckpt" / "d"
    try:
        return sum(1 for _ in stage.iterdir())
    except OSError:
        return 0


# ---------------------------------------------------------------------------------------------------------


def test_convert_all_tensors_restores_on_another_mesh(checkpoints, tmp_path):
    refs = checkpoints.reference(VARIANT)
    dest = tmp_path / "orbax"
    seen = []
    out = convert(checkpoints.dirs[VARIANT], dest, max_inflight_bytes=256 * 1024, progress=seen.append)
    assert out == str(dest)
    # several batches, the last report complete
    assert len(seen) > 3 and seen[-1]["bytes_done"] == seen[-1]["bytes_total"] == sum(r.nbytes for r in refs.values())
    assert seen[-1]["arrays_done"] == len(refs)
    # StandardCheckpointer's layout, nothing else left next to it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["orbax"]
    meta = json.loads((dest / "_CHECKPOINT_METADATA").read_text())
    assert meta["item_handlers"].endswith("StandardCheckpointHandler")
    assert (dest / "_METADATA").exists() and (dest / "manifest.ocdbt").exists()
    # nested dicts of the dotted names
    tree = ocp.StandardCheckpointer().metadata(dest).item_metadata.tree
    assert set(tree["model"]["layers"]["0"]) == {"w", "b"}
    _check_all(dest, refs, make_mesh("2x4"))
    _check_all(dest, refs, make_mesh("8"))


def test_convert_with_target_and_mapping(checkpoints, tmp_path):
    refs = checkpoints.reference(VARIANT)
    mesh = make_mesh("4x2")
    sh = lambda *spec: NamedSharding(mesh, P(*spec))
    target = {
        "params": {
            "embed_t": jax.ShapeDtypeStruct((8, 32), refs["model.embed"].dtype, sharding=sh(None, "data")),
            "layers": [
                {"w": jax.ShapeDtypeStruct((16, 16), np.float32, sharding=sh("data", "model"))},
                {"w": jax.ShapeDtypeStruct((16, 8), np.float32, sharding=sh("data"))},  # cast from bfloat16
            ],
        },
        "step": 0,  # a saved object
        "embed.copy": jax.ShapeDtypeStruct((32, 8), refs["model.embed"].dtype, sharding=sh()),  # a dotted key
    }
    mapping = {"embed.copy": "model.embed",
               "params.embed_t": jreshard.saved("model.embed").T,
               "params.layers.0.w": "model.layers.0.w",
               "params.layers.1.w": jreshard.saved("model.layers.1.w").astype(np.float32)}
    dest = tmp_path / "ported"
    convert(checkpoints.dirs[VARIANT], dest, target, mapping, max_inflight_bytes=1024)
    tree = ocp.StandardCheckpointer().metadata(dest).item_metadata.tree
    assert set(tree) == {"params", "step", "embed.copy"} and set(tree["params"]) == {"embed_t", "layers"}
    assert set(tree["params"]["layers"]) == {"0", "1"}  # list indices become keys
    other = make_mesh("2x4")
    abstract = {"params": {
        "embed_t": jax.ShapeDtypeStruct((8, 32), refs["model.embed"].dtype, sharding=NamedSharding(other, P("data"))),
        "layers": {"0": {"w": jax.ShapeDtypeStruct((16, 16), np.float32, sharding=NamedSharding(other, P()))},
                   "1": {"w": jax.ShapeDtypeStruct((16, 8), np.float32, sharding=NamedSharding(other, P("model")))}}},
        "step": 0, "embed.copy": jax.ShapeDtypeStruct((32, 8), refs["model.embed"].dtype,
                                                    sharding=NamedSharding(other, P("model")))}
    with ocp.StandardCheckpointer() as c:
        r = c.restore(dest, abstract)
    assert_same(r["params"]["embed_t"], refs["model.embed"].T, "embed_t")
    assert_same(r["params"]["layers"]["0"]["w"], refs["model.layers.0.w"], "0.w")
    assert_same(r["params"]["layers"]["1"]["w"], refs["model.layers.1.w"].astype(np.float32), "1.w")
    assert_same(r["embed.copy"], refs["model.embed"], "embed.copy")
    assert int(r["step"]) == checkpoints.torch_objects[VARIANT]["step"]


def test_convert_refuses_and_leaves_nothing(checkpoints, tmp_path):
    src = checkpoints.dirs[VARIANT]
    (tmp_path / "exists").mkdir()
    with pytest.raises(ConvertError, match="exists; remove it"):
        convert(src, tmp_path / "exists")
    bad = {"nope": jax.ShapeDtypeStruct((2,), np.float32, sharding=NamedSharding(make_mesh("8"), P()))}
    with pytest.raises(jreshard.TargetMismatchError):
        convert(src, tmp_path / "bad", bad)
    with pytest.raises(jreshard.InvalidArgumentError):
        convert(src, tmp_path / "bad", max_inflight_bytes=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists"]
    assert issubclass(ConvertError, jreshard.JReshardError)


def test_convert_into_a_new_step_of_a_checkpoint_manager(checkpoints, tmp_path):
    """dest = root/5/default: the step appears whole, and a plain CheckpointManager restores it."""
    refs = checkpoints.reference(VARIANT)
    dest = tmp_path / "5" / "default"
    convert(checkpoints.dirs[VARIANT], dest)
    mesh = make_mesh("2x4")
    with ocp.CheckpointManager(tmp_path) as mngr:
        assert mngr.all_steps() == [5]
        r = mngr.restore(5, args=ocp.args.StandardRestore(_abstract(dest, mesh)))
    flat = _flat(r)
    for name in ("model.embed", "mp.a", "d1.s1_3d"):
        assert_same(flat[name], refs[name], name)


def _live_buffer_bytes() -> int:
    """Bytes of the distinct device buffers of all live jax arrays (an array and its shards' views share one)."""
    bufs = {}
    for a in jax.live_arrays():
        for s in a.addressable_shards:
            bufs[(s.device.id, s.data.unsafe_buffer_pointer())] = s.data.nbytes
    return sum(bufs.values())


@pytest.mark.parametrize("with_target", [False, True])
def test_batches_bound_live_arrays(checkpoints, tmp_path, monkeypatch, with_target):
    """Each batch's arrays are written and freed before the next is read: when a batch is written, no array of
    an earlier batch is alive any more (numpy arrays without a target, jax arrays with one), and a batch holds
    at most the bound (or the one array above it)."""
    import gc
    import weakref

    limit = 64 * 1024
    base = _live_buffer_bytes()
    earlier: list = []
    seen = []

    def hook(info):
        gc.collect()
        alive = [r for r in earlier if r() is not None]
        nbytes = sum(a.nbytes for a in info["arrays"])
        largest = max(a.nbytes for a in info["arrays"])
        seen.append((len(alive), nbytes, largest, len(info["arrays"]), _live_buffer_bytes() - base))
        earlier.extend(weakref.ref(a) for a in info["arrays"] if isinstance(a, (np.ndarray, jax.Array)))

    monkeypatch.setattr(jconvert, "_batch_hook", hook)
    target = None
    if with_target:
        mesh = make_mesh("2x4")
        with jreshard.open(checkpoints.dirs[VARIANT]) as ckpt:
            target = {n: jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=NamedSharding(mesh, _spec_for(t.shape, mesh)))
                      for n, t in ckpt.tensors.items()}
    convert(checkpoints.dirs[VARIANT], tmp_path / "o", target, max_inflight_bytes=limit)
    assert len(seen) > 5
    assert any(n > 1 for *_, n, _ in seen)  # small arrays share batches
    for alive, nbytes, largest, _, live in seen:
        assert alive == 0
        assert nbytes <= max(limit, largest), (nbytes, largest)
        assert live <= max(limit, largest), (live, largest)
    gc.collect()
    assert [r for r in earlier if r() is not None] == []  # nothing kept
    assert _live_buffer_bytes() - base == 0


def test_batches_unit():
    assert jconvert._batches([5, 5, 1, 20, 1, 1], 10) == [[0, 1], [2], [3], [4, 5]]


# -- interruption: SIGKILL, Ctrl-C ------------------------------------------------------------------------

_SLOW = ("import sys, jreshard.write_orbax as c; "
         "c.convert(sys.argv[1], sys.argv[2], max_inflight_bytes=1024, progress=True)")


def _start(args: list[str], **env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], cwd=str(REPO_ROOT), env=child_env(JAX_PLATFORMS="cpu", **env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_batches(proc: subprocess.Popen, work: Path, n: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while _pending(work) < n:
        if proc.poll() is not None:
            raise AssertionError(f"the conversion ended (rc {proc.returncode}) before {n} batches:\n"
                                 f"{proc.stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.02)


def test_sigkill_midway_leaves_no_checkpoint_and_rerun_succeeds(checkpoints, tmp_path):
    src = checkpoints.dirs[VARIANT]
    dest = tmp_path / "7"
    work = work_dir_of(dest)
    proc = _start(["-c", _SLOW, str(src), str(dest)])
    try:
        _wait_for_batches(proc, work, 3)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert not dest.exists()
    assert _work_dirs(tmp_path) == [work.name]  # what was written so far, hidden
    abstract = {"mp": {"a": jax.ShapeDtypeStruct((512, 512), np.float32,
                                                 sharding=NamedSharding(make_mesh("8"), P("data")))}}
    with pytest.raises(Exception):  # noqa: B017 - Orbax refuses it (FileNotFoundError today)
        ocp.StandardCheckpointer().restore(dest, abstract)
    with ocp.CheckpointManager(tmp_path) as mngr:
        assert mngr.all_steps() == []
        assert mngr.latest_step() is None
    # the rerun removes the stale work directory and converts
    convert(src, dest, max_inflight_bytes=512 * 1024)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["7"]
    with ocp.CheckpointManager(tmp_path) as mngr:
        assert mngr.all_steps() == [7]
    _check_all(dest, checkpoints.reference(VARIANT), make_mesh("2x4"))


def test_cli_convert(checkpoints, tmp_path):
    """``python -m jreshard convert --sync`` (files fsynced), with 64-bit types off in the child: its
    int64/float64 tensors are written exactly (from numpy) and restore as 64-bit here."""
    dest = tmp_path / "cli"
    proc = subprocess.run([sys.executable, "-m", "jreshard", "convert", str(checkpoints.dirs[VARIANT]), str(dest),
                           "--max-inflight", "256KiB", "--sync"], check=False, cwd=str(REPO_ROOT),
                          env=child_env(JAX_PLATFORMS="cpu", JAX_ENABLE_X64="0"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "100.0%" in proc.stderr and "/s" in proc.stderr and "ETA" in proc.stderr
    assert "arrays" in proc.stderr and "wrote the Orbax checkpoint" in proc.stderr
    _check_all(dest, checkpoints.reference(VARIANT), make_mesh("4x2"))
    # errors: a jreshard error is one line, exit 2
    again = subprocess.run([sys.executable, "-m", "jreshard", "convert", str(checkpoints.dirs[VARIANT]), str(dest)],
                           check=False, cwd=str(REPO_ROOT), env=child_env(JAX_PLATFORMS="cpu"), capture_output=True,
                           text=True,
                           timeout=300)
    assert again.returncode == 2 and "ConvertError" in again.stderr and "exists" in again.stderr


def test_cli_ctrl_c_exits_130_and_removes_partial_output(checkpoints, tmp_path):
    dest = tmp_path / "interrupted"
    work = work_dir_of(dest)
    # The jreshard command, each batch held 50 ms (a test hook): the Ctrl-C lands mid-conversion however fast the
    # machine is, not after its last batch. Ctrl-C is handled as in a terminal even when the test runner was started
    # with SIGINT ignored (a background job of a non-interactive shell), which its children would inherit.
    cli = ("import signal, sys, time, jreshard.write_orbax as c; "
           "signal.signal(signal.SIGINT, signal.default_int_handler); c._batch_hook = lambda info: time.sleep(0.05); "
           "from jreshard.cli import main; sys.argv = ['jreshard', *sys.argv[1:]]; sys.exit(main())")
    proc = _start(["-c", cli, "convert", str(checkpoints.dirs[VARIANT]), str(dest), "--max-inflight", "1KiB"])
    try:
        _wait_for_batches(proc, work, 2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


# -- the native format: what StandardCheckpointer itself writes -------------------------------------------


def _kv_items(path: Path) -> dict[str, bytes]:
    import tensorstore as ts

    kv = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{path}"}).result()
    return {k.decode(): kv.read(k).result().value for k in kv.list().result()}


def test_native_layout_matches_standard_checkpointer(checkpoints, tmp_path):
    """A converted checkpoint has the metadata StandardCheckpointer writes for the same tree: the same _METADATA,
    _sharding, array metadatas (chunks = shards), OCDBT keys and zarr arrays (uncompressed here). Shardings without
    replicas: Orbax splits a replicated shard among its replicas (smaller chunks), jreshard writes it whole."""
    refs = checkpoints.reference(VARIANT)
    mesh = make_mesh("4x2")
    target = {"params": {"embed": jax.ShapeDtypeStruct(refs["model.embed"].shape, refs["model.embed"].dtype,
                                                       sharding=NamedSharding(mesh, P("model", "data"))),
                         "w0": jax.ShapeDtypeStruct((16, 16), np.float32,
                                                    sharding=NamedSharding(mesh, P("data", "model")))},
              "step": 0}
    mapping = {"params.embed": "model.embed", "params.w0": "model.layers.0.w"}
    ours = tmp_path / "ours"
    convert(checkpoints.dirs[VARIANT], ours, target, mapping, max_inflight_bytes=1024)
    with ocp.StandardCheckpointer() as c:
        restored = c.restore(ours, target)
        c.save(tmp_path / "theirs", restored)
    theirs = tmp_path / "theirs"
    for name in ("_METADATA", "_sharding"):
        assert json.loads((ours / name).read_text()) == json.loads((theirs / name).read_text()), name
    key = lambda m: m["array_metadata"]["param_name"]
    assert sorted(json.loads((ours / "array_metadatas" / "process_0").read_text())["array_metadatas"], key=key) == \
        sorted(json.loads((theirs / "array_metadatas" / "process_0").read_text())["array_metadatas"], key=key)
    ok, tk = _kv_items(ours), _kv_items(theirs)
    assert sorted(ok) == sorted(tk)
    for k in ok:
        if k.endswith(".zarray"):
            a, b = json.loads(ok[k]), json.loads(tk[k])
            assert a.pop("compressor") is None
            b.pop("compressor")
            assert a == b, k
    assert json.loads((ours / "_CHECKPOINT_METADATA").read_text())["item_handlers"] == \
        json.loads((theirs / "_CHECKPOINT_METADATA").read_text())["item_handlers"]
    assert_same(restored["params"]["embed"], refs["model.embed"], "embed")
    assert_same(restored["params"]["w0"], refs["model.layers.0.w"].astype(np.float32), "w0")


def test_slabbed_default_conversion_metadata_and_checkpoint_manager(checkpoints, tmp_path):
    """target=None with a bound below the largest tensors: those are written in slabs of rows (their chunks);
    Orbax's metadata gives every saved shape and dtype, and a plain CheckpointManager restores every tensor."""
    refs = checkpoints.reference(VARIANT)
    limit = 4096
    dest = tmp_path / "3" / "default"
    convert(checkpoints.dirs[VARIANT], dest, max_inflight_bytes=limit)
    meta = _flat(ocp.StandardCheckpointer().metadata(dest).item_metadata.tree)
    assert sorted(meta) == sorted(refs)
    for name, ref in refs.items():
        assert tuple(meta[name].shape) == ref.shape and np.dtype(meta[name].dtype) == ref.dtype, name
    chunks = {m["array_metadata"]["param_name"]: m["array_metadata"]["chunk_shape"]
              for m in json.loads((dest / "array_metadatas" / "process_0").read_text())["array_metadatas"]}
    big = [n for n, r in refs.items() if r.nbytes > limit and r.ndim and r.shape[0] > 1]
    assert big
    for name in big:
        c = chunks[name]
        assert c[0] < refs[name].shape[0] and np.prod(c) * refs[name].dtype.itemsize <= limit, (name, c)
    mesh = make_mesh("2x4")
    with ocp.CheckpointManager(tmp_path) as mngr:
        assert mngr.all_steps() == [3]
        r = mngr.restore(3, args=ocp.args.StandardRestore(_abstract(dest, mesh)))
    flat = _flat(r)
    for name, ref in refs.items():
        assert_same(flat[name], ref, name)
