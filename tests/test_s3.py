"""Loading from S3 (a moto server on 127.0.0.1): a DCP checkpoint written by torch, a safetensors file of a
few MiB, a sharded safetensors directory and a torch.save archive, by ``s3://bucket/prefix/...`` URLs.

Checks data against torch / safetensors, and that only about the bytes of the requested shards are fetched
(``io_stats.bytes_read <= 1.1 * needed``, with ``needed`` computed here from shapes and dtypes).
The module fails (never skips) when the moto server cannot be started: moto[server] is in the test extra.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jreshard
from jreshard import errors
from tests import torch_writers as tw
from tests.helpers import (
    assert_same,
    box_nbytes,
    check_loaded_array,
    distinct_indices,
    make_mesh,
    normal_tensor,
    torch_bits,
)

BUCKET = "jreshard-test"
REGION = "us-east-1"
SLACK = 1.1


def _start_moto(log_path: Path, env: dict):
    """(process, endpoint) of a moto server, or raise RuntimeError with its log."""
    try:
        import moto.server  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the environment
        raise RuntimeError(f"moto[server] is not importable: {e}") from e
    last = ""
    for _attempt in range(3):  # a port picked as free can be taken before the server binds it
        port = tw.free_port()
        log = open(log_path, "wb")
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log.close()
        endpoint = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                urllib.request.urlopen(endpoint + "/", timeout=2).read()
                return proc, endpoint
            except urllib.error.HTTPError:
                return proc, endpoint  # any HTTP answer means it is up
            except Exception:
                time.sleep(0.2)
        last = log_path.read_text(errors="replace")[-2000:]
        _stop(proc)
    raise RuntimeError(f"moto server did not start:\n{last}")


def _stop(proc) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


class S3:
    def __init__(self, endpoint: str, client) -> None:
        self.endpoint = endpoint
        self.client = client
        self.options = {"endpoint": endpoint, "aws_region": REGION}

    def upload_dir(self, local: Path, prefix: str) -> None:
        for p in sorted(local.iterdir()):
            if p.is_file():
                self.client.upload_file(str(p), BUCKET, f"{prefix}/{p.name}")

    def url(self, key: str) -> str:
        return f"s3://{BUCKET}/{key}"


def isolate_aws(mp: pytest.MonkeyPatch) -> None:
    """Dummy credentials; nothing from the environment may redirect tensorstore elsewhere."""
    mp.setenv("AWS_ACCESS_KEY_ID", "testing")
    mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for var in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION",
                "AWS_DEFAULT_REGION"):
        mp.delenv(var, raising=False)


def subset_targets(ref: dict) -> dict:
    """Some tensors of the ``plain`` DCP checkpoint, sharded so that a process needs well under all its bytes."""
    m24, m8 = make_mesh("2x4"), make_mesh("8")
    return {
        "mp.a": jax.ShapeDtypeStruct((512, 512), np.float32, sharding=NamedSharding(m24, P("data", "model"))),
        "mp.d": jax.ShapeDtypeStruct((384, 640), np.float32, sharding=NamedSharding(m8, P(None, "data"))),
        "mp.b": jax.ShapeDtypeStruct((256, 1024), ref["mp.b"].dtype, sharding=NamedSharding(m24, P("model", None))),
    }


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    isolate_aws(mp)
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    try:
        proc, endpoint = _start_moto(log, dict(os.environ))
    except RuntimeError as e:
        mp.undo()
        pytest.fail(f"cannot start a moto S3 server (moto[server] is in the test extra): {e}")
    try:
        import boto3

        client = boto3.client("s3", endpoint_url=endpoint, region_name=REGION,
                              aws_access_key_id="testing", aws_secret_access_key="testing")
        client.create_bucket(Bucket=BUCKET)
        yield S3(endpoint, client)
    finally:
        _stop(proc)
        mp.undo()


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------

BIG_DCP = [t.name for t in tw.TENSORS if t.big]  # mp.a ... mp.e (256 KiB - 1 MiB each, several chunks)

ST_TENSORS = {  # name: (torch dtype, shape)
    "embed": ("float32", (1024, 512)),  # 2 MiB
    "proj": ("bfloat16", (512, 1024)),  # 1 MiB
    "ids": ("int64", (256, 256)),  # 512 KiB
    "half": ("float16", (256, 512)),  # 256 KiB
    "norm": ("float32", (4096,)),
    "fp8": ("float8_e4m3fn", (512, 256)),
}
NP = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16), "int64": np.dtype(np.int64),
      "float16": np.dtype(np.float16), "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn)}


def _to_numpy(t) -> np.ndarray:
    return torch_bits(t, NP[str(t.dtype).removeprefix("torch.")])


_random = normal_tensor


@pytest.fixture(scope="module")
def uploaded(s3, checkpoints, tmp_path_factory):
    """Everything the tests read, uploaded once; returns the local paths and references."""
    import torch
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("s3data")
    s3.upload_dir(checkpoints.dirs["plain"], "dcp/plain")

    st = root / "st"
    st.mkdir()
    save_file({n: _random(n, dt, sh) for n, (dt, sh) in ST_TENSORS.items()}, str(st / "model.safetensors"),
              metadata={"format": "pt"})
    st_ref = {k: _to_numpy(v) for k, v in load_file(str(st / "model.safetensors")).items()}
    s3.upload_dir(st, "st")

    # a sharded safetensors directory with its index
    import json

    hf = root / "hf"
    hf.mkdir()
    names = sorted(ST_TENSORS)
    wm = {}
    for i, part in enumerate((names[0::2], names[1::2])):
        f = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: _random(n, *ST_TENSORS[n]) for n in part}, str(hf / f))
        wm.update({n: f for n in part})
    (hf / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    s3.upload_dir(hf, "hf")

    # a torch.save archive (> 64 KiB, read by ranges)
    tb = root / "bin"
    tb.mkdir()
    sd = {"model": {n: _random(n, *ST_TENSORS[n]) for n in ("embed", "half", "norm")},
          "view": _random("embed", "float32", (1024, 512))[100:300].T, "epoch": 3}
    torch.save(sd, tb / "pytorch_model.bin")
    raw = torch.load(str(tb / "pytorch_model.bin"), weights_only=True)
    bin_ref = {f"model.{k}": _to_numpy(v) for k, v in raw["model"].items()}
    bin_ref["view"] = _to_numpy(raw["view"])
    s3.upload_dir(tb, "bin")

    # broken things
    data = (st / "model.safetensors").read_bytes()
    s3.client.put_object(Bucket=BUCKET, Key="broken/cut.safetensors", Body=data[: len(data) - 1000])
    return {"st_ref": st_ref, "bin_ref": bin_ref, "dcp_ref": checkpoints.reference("plain"),
            "dcp_objects": tw.OBJECTS_FLAT}


def _needed(targets: dict) -> int:
    """Bytes of the distinct shards of this process's devices (replicas counted once)."""
    total = 0
    for t in targets.values():
        for idx in distinct_indices(t.sharding, t.shape):
            total += box_nbytes(idx, t.shape, np.dtype(t.dtype).itemsize)
    return total


def _check_load(out: dict, targets: dict, ref: dict) -> None:
    assert set(out) == set(targets)
    for name, t in targets.items():
        check_loaded_array(out[name], t, ref[name], name)


# ---------------------------------------------------------------------------------------------
# DCP
# ---------------------------------------------------------------------------------------------


def test_dcp_catalog_and_objects(s3, uploaded, checkpoints):
    with jreshard.open(s3.url("dcp/plain/"), storage_options=s3.options) as ck:
        assert set(ck.tensors) == set(checkpoints.names["plain"])
        for name, ref in uploaded["dcp_ref"].items():
            assert tuple(ck.tensors[name].shape) == ref.shape and np.dtype(ck.tensors[name].dtype) == ref.dtype
        assert dict(ck.objects) == uploaded["dcp_objects"]


def test_dcp_subset_of_tensors(s3, uploaded):
    """Only some tensors of the checkpoint: the process fetches about their bytes and no more."""
    ref = uploaded["dcp_ref"]
    targets = subset_targets(ref)
    ck = jreshard.open(s3.url("dcp/plain/"), storage_options=s3.options)
    out = ck.load(targets)
    _check_load(out, targets, ref)
    needed = _needed(targets)
    assert needed == sum(ref[n].nbytes for n in targets)
    everything = sum(a.nbytes for a in ref.values())
    assert needed < 0.7 * everything
    assert needed <= ck.io_stats.bytes_read <= SLACK * needed, (ck.io_stats, needed)


def test_dcp_sub_boxes(s3, uploaded):
    """Sub-boxes of big tensors read through ckpt.read: the bytes fetched stay close to the boxes' bytes."""
    ref = uploaded["dcp_ref"]
    boxes = [
        ("mp.a", (slice(64, 448), slice(0, 512))),  # rows across 3 of the 4 saved chunks
        ("mp.c", (slice(0, 1024), slice(64, 128))),  # a narrow column band: sparse runs
        ("mp.b", (slice(10, 250), slice(0, 1024))),  # bf16, 2-D chunked
        ("mp.e", (slice(100, 228), slice(0, 512))),
    ]
    ck = jreshard.open(s3.url("dcp/plain/"), storage_options=s3.options)
    _check_boxes(ck, boxes, ref)


def _check_boxes(ck, boxes, ref) -> None:
    """Each sub-box read equals the reference, and the bytes fetched stay within SLACK of those needed."""
    needed = 0
    for name, box in boxes:
        assert_same(ck.read(name, box), ref[name][box], f"{name}{box}")
        needed += box_nbytes(box, ref[name].shape, ref[name].dtype.itemsize)
    assert needed <= ck.io_stats.bytes_read <= SLACK * needed, (ck.io_stats, needed)


@pytest.mark.parametrize("layout", ["replicated", "sharded"])
def test_dcp_full(s3, uploaded, layout):
    """Every big tensor whole (all devices of this process together need all bytes)."""
    ref = uploaded["dcp_ref"]
    m24 = make_mesh("2x4")
    spec = P() if layout == "replicated" else P("model", "data")
    targets = {n: jax.ShapeDtypeStruct(ref[n].shape, ref[n].dtype, sharding=NamedSharding(m24, spec)) for n in BIG_DCP}
    ck = jreshard.open(s3.url("dcp/plain"), storage_options=s3.options)  # no trailing slash: still a directory
    out = ck.load(targets)
    _check_load(out, targets, ref)
    needed = _needed(targets)
    assert needed == sum(ref[n].nbytes for n in BIG_DCP)
    assert needed <= ck.io_stats.bytes_read <= SLACK * needed, (ck.io_stats, needed)


def test_dcp_every_tensor_matches_local(s3, uploaded, checkpoints):
    """All tensors of the checkpoint (small ones too), replicated; same data as torch and as a local load."""
    ref = uploaded["dcp_ref"]
    mesh = make_mesh("8")
    targets = {n: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, P())) for n, a in ref.items()}
    out = jreshard.load(s3.url("dcp/plain/"), targets, storage_options=s3.options)
    local = jreshard.load(checkpoints.dirs["plain"], targets)
    _check_load(out, targets, ref)
    for n in targets:
        assert_same(np.asarray(out[n]), np.asarray(local[n]), n)


# ---------------------------------------------------------------------------------------------
# safetensors
# ---------------------------------------------------------------------------------------------


def _st_targets(ref, names, mesh, spec):
    return {n: jax.ShapeDtypeStruct(ref[n].shape, ref[n].dtype, sharding=NamedSharding(mesh, spec)) for n in names}


@pytest.mark.parametrize("source", ["st/model.safetensors", "st/", "st"])
def test_safetensors_subset(s3, uploaded, source):
    ref = uploaded["st_ref"]
    targets = _st_targets(ref, ["embed", "half"], make_mesh("2x4"), P("data", "model"))
    ck = jreshard.open(s3.url(source), storage_options=s3.options)
    out = ck.load(targets)
    _check_load(out, targets, ref)
    needed = _needed(targets)
    assert needed < 0.7 * sum(a.nbytes for a in ref.values())
    assert needed <= ck.io_stats.bytes_read <= SLACK * needed, (ck.io_stats, needed)


def test_safetensors_sub_boxes(s3, uploaded):
    ref = uploaded["st_ref"]
    boxes = [
        ("embed", (slice(100, 700), slice(0, 512))),
        ("proj", (slice(0, 512), slice(0, 256))),  # a quarter of every row: sparse runs
        ("fp8", (slice(17, 301), slice(0, 256))),
        ("norm", (slice(1000, 3000),)),
    ]
    ck = jreshard.open(s3.url("st/model.safetensors"), storage_options=s3.options)
    _check_boxes(ck, boxes, ref)


@pytest.mark.parametrize("io", ["auto", "tensorstore"])
def test_safetensors_full(s3, uploaded, io):
    ref = uploaded["st_ref"]
    m8 = make_mesh("8")
    targets = _st_targets(ref, [n for n in ref if ref[n].ndim == 2], make_mesh("4x2"), P("data", "model"))
    targets["norm"] = jax.ShapeDtypeStruct((4096,), np.float32, sharding=NamedSharding(m8, P("data")))
    ck = jreshard.open(s3.url("st/model.safetensors"), io=io, storage_options=s3.options)
    out = ck.load(targets)
    _check_load(out, targets, ref)
    needed = _needed(targets)
    assert needed == sum(a.nbytes for a in ref.values())
    assert needed <= ck.io_stats.bytes_read <= SLACK * needed, (ck.io_stats, needed)


@pytest.mark.parametrize("source", ["hf/", "hf/model.safetensors.index.json"])
def test_sharded_safetensors(s3, uploaded, source):
    ref = uploaded["st_ref"]
    with jreshard.open(s3.url(source), storage_options=s3.options) as ck:
        assert set(ck.tensors) == set(ref)
        for name, a in ref.items():
            assert_same(ck.read(name), a, name)


# ---------------------------------------------------------------------------------------------
# torch.save
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["bin/", "bin/pytorch_model.bin"])
def test_torch_save_archive(s3, uploaded, source):
    ref = uploaded["bin_ref"]
    mesh = make_mesh("2x4")
    ck = jreshard.open(s3.url(source), storage_options=s3.options)
    assert set(ck.tensors) == set(ref)
    assert dict(ck.objects) == {"epoch": 3}
    targets = {n: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, P("data", "model")))
               for n, a in ref.items() if a.ndim == 2}
    out = ck.load(targets)
    _check_load(out, targets, ref)
    assert_same(ck.read("model.norm"), ref["model.norm"], "model.norm")
    assert_same(ck.read("view", (slice(3, 500), slice(20, 180))), ref["view"][3:500, 20:180], "view box")


# ---------------------------------------------------------------------------------------------
# configuration and errors
# ---------------------------------------------------------------------------------------------


def test_endpoint_from_environment(s3, uploaded, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    monkeypatch.setenv("AWS_REGION", REGION)
    ref = uploaded["st_ref"]
    with jreshard.open(s3.url("st/model.safetensors")) as ck:
        assert_same(ck.read("ids", (slice(5, 9), slice(0, 256))), ref["ids"][5:9], "ids")


def test_missing_object(s3, uploaded):
    with pytest.raises(errors.MissingDataError):
        jreshard.open(s3.url("nothing/here.safetensors"), storage_options=s3.options)


def test_not_a_checkpoint_prefix(s3, uploaded):
    with pytest.raises((errors.CheckpointFormatError, errors.MissingDataError)):
        jreshard.open(s3.url("nothing/"), storage_options=s3.options)


def test_truncated_object(s3, uploaded):
    ref = uploaded["st_ref"]
    with pytest.raises(errors.TruncatedDataError):
        ck = jreshard.open(s3.url("broken/cut.safetensors"), storage_options=s3.options)
        for name in ref:
            ck.read(name)


def test_posix_io_refuses_urls(s3, uploaded):
    with pytest.raises(errors.StorageError):
        jreshard.open(s3.url("st/model.safetensors"), io="posix", storage_options=s3.options)
