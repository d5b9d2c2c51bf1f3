"""Loading from Google Cloud Storage (``gs://``) served by a GCS emulator on 127.0.0.1.

The emulator is ``gcp-storage-emulator`` (from the package index, in the ``test`` extra), run in a subprocess
behind the counting proxy of tests/gcs_server.py. jreshard reaches it the way tensorstore's ``gcs`` driver
allows: ``storage_options={"endpoint": ...}`` (or ``TENSORSTORE_GCS_HTTP_URL``), with no credentials at all
(tensorstore then reads anonymously, which the emulator accepts). A DCP checkpoint written by torch and a
safetensors file are uploaded through the emulator's JSON API and loaded onto 8 CPU devices; the data must equal
torch's, and the bytes the server sent for a sharded target must stay within 1.1x the bytes needed.

Faults: a missing object, a refused connection, a host name that does not resolve, HTTP 403 without
credentials, and a metadata server that accepts connections but never answers (tensorstore probes it once per
process when it finds no credentials: it must not hang a load). The module fails (never skips) when the emulator
cannot be started.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap

import jax
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jreshard
from jreshard import errors
from tests import gcs_server
from tests.helpers import (
    assert_same,
    box_nbytes,
    check_loaded_array,
    child_env,
    distinct_indices,
    make_mesh,
    normal_tensor,
    run_bounded,
    torch_bits,
)
from tests.test_s3 import subset_targets
from tests.torch_writers import free_port

BUCKET = "jreshard-gcs-test"
SLACK = 1.1
FAST = {"timeout": 2, "retries": 1, "retry_delay": 0.05, "max_retry_delay": 0.2}
ST_TENSORS = {  # name: (torch dtype, shape)
    "embed": ("float32", (512, 512)),  # 1 MiB
    "proj": ("bfloat16", (256, 1024)),  # 512 KiB
    "ids": ("int64", (128, 256)),  # 256 KiB
    "norm": ("float32", (4096,)),
}
NP = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16), "int64": np.dtype(np.int64)}
_CREDENTIAL_VARS = ("GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_AUTH_TOKEN_FOR_TESTING", "TENSORSTORE_GCS_HTTP_URL",
                    "GCE_METADATA_ROOT", "CLOUDSDK_CONFIG")


def _bounded(fn, limit: float) -> dict:
    return run_bounded(fn, limit, "a GCS store")


def _value(fn, limit: float):
    """``fn()``'s result; a failure naming its exception, or when it runs longer than ``limit`` s."""
    box = _bounded(fn, limit)
    if "error" in box:
        raise AssertionError(f"failed: {box['error']!r}") from box["error"]
    return box["value"]


def _raises(fn, limit: float, kind=errors.StorageError) -> Exception:
    box = _bounded(fn, limit)
    assert "error" in box, f"no error: {box.get('value')!r}"
    assert isinstance(box["error"], kind), repr(box["error"])
    assert isinstance(box["error"], errors.JReshardError)
    return box["error"]


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """The proxy in front of a running emulator; no Google credentials in the environment, and tensorstore's
    metadata-server probe pointed at a closed loopback port (refused at once: anonymous reads)."""
    mp = pytest.MonkeyPatch()
    for var in _CREDENTIAL_VARS:
        mp.delenv(var, raising=False)
    mp.setenv("CLOUDSDK_CONFIG", str(tmp_path_factory.mktemp("gcloud")))  # no ADC file there
    mp.setenv("GCE_METADATA_ROOT", f"127.0.0.1:{free_port()}")
    try:
        proc, base = gcs_server.start_emulator(tmp_path_factory.mktemp("gcs") / "emulator.log", BUCKET)
    except RuntimeError as e:
        mp.undo()
        pytest.fail(f"cannot start a GCS emulator (gcp-storage-emulator is in the test extra): {e}")
    proxy = gcs_server.Proxy(base)
    proxy.base = base
    proxy.options = {"endpoint": proxy.endpoint}
    try:
        yield proxy
    finally:
        proxy.close()
        gcs_server.stop(proc)
        mp.undo()


@pytest.fixture(scope="module")
def uploaded(gcs, checkpoints, tmp_path_factory):
    """A DCP checkpoint (torch) under dcp/plain/ and a safetensors file under st/; their references."""
    from safetensors.torch import load_file, save_file

    for p in sorted(checkpoints.dirs["plain"].iterdir()):
        if p.is_file():
            gcs_server.upload(gcs.base, BUCKET, f"dcp/plain/{p.name}", p.read_bytes())
    st = tmp_path_factory.mktemp("gcs-st") / "model.safetensors"
    save_file({n: normal_tensor(n, dt, sh) for n, (dt, sh) in ST_TENSORS.items()}, str(st), metadata={"format": "pt"})
    gcs_server.upload(gcs.base, BUCKET, "st/model.safetensors", st.read_bytes())
    st_ref = {k: torch_bits(v, NP[str(v.dtype).removeprefix("torch.")]) for k, v in load_file(str(st)).items()}
    return {"dcp_ref": checkpoints.reference("plain"), "st_ref": st_ref}


def _needed(targets: dict) -> int:
    """Bytes of the distinct shards of this process's devices (replicas counted once)."""
    return sum(box_nbytes(idx, t.shape, np.dtype(t.dtype).itemsize)
               for t in targets.values() for idx in distinct_indices(t.sharding, t.shape))


def _load_counted(gcs, url: str, targets: dict, ref: dict) -> None:
    """Load ``targets`` from ``url``; data equal to ``ref``; the bytes read and the bytes the server sent for
    the load within SLACK of the bytes needed."""
    ck = _value(lambda: jreshard.open(url, storage_options=gcs.options), 60)
    gcs.reset()
    start = ck.io_stats.bytes_read
    out = _value(lambda: ck.load(targets), 120)
    assert set(out) == set(targets)
    for name, t in targets.items():
        check_loaded_array(out[name], t, ref[name], name)
    needed = _needed(targets)
    read = ck.io_stats.bytes_read - start
    assert needed <= read <= SLACK * needed, (read, needed)
    assert needed <= gcs.bytes_sent <= SLACK * needed, (gcs.bytes_sent, needed, gcs.requests)


def test_dcp_sharded_subset(gcs, uploaded):
    """Some tensors of a torch DCP checkpoint, sharded over 8 devices: about their bytes are fetched, no more."""
    ref = uploaded["dcp_ref"]
    targets = subset_targets(ref)
    assert _needed(targets) < 0.7 * sum(a.nbytes for a in ref.values())
    _load_counted(gcs, f"gs://{BUCKET}/dcp/plain/", targets, ref)


def test_dcp_every_tensor_matches_local(gcs, uploaded, checkpoints):
    """All tensors (small ones too), replicated on 8 devices: the same values as torch and as a local load;
    the objects of the checkpoint too."""
    ref = uploaded["dcp_ref"]
    mesh = make_mesh("8")
    targets = {n: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, P())) for n, a in ref.items()}
    url = f"gs://{BUCKET}/dcp/plain"  # no trailing slash: still a directory
    out = _value(lambda: jreshard.load(url, targets, storage_options=gcs.options), 120)
    local = jreshard.load(checkpoints.dirs["plain"], targets)
    for n, t in targets.items():
        check_loaded_array(out[n], t, ref[n], n)
        assert_same(np.asarray(out[n]), np.asarray(local[n]), n)
    with jreshard.open(url, storage_options=gcs.options) as ck:
        assert set(ck.tensors) == set(checkpoints.names["plain"])
        assert dict(ck.objects) == dict(jreshard.open(checkpoints.dirs["plain"]).objects)


@pytest.mark.parametrize("subset", [True, False], ids=["subset", "all"])
def test_safetensors_sharded(gcs, uploaded, subset):
    ref = uploaded["st_ref"]
    m42 = make_mesh("4x2")
    names = ["embed", "ids"] if subset else [n for n in ref if ref[n].ndim == 2]
    targets = {n: jax.ShapeDtypeStruct(ref[n].shape, ref[n].dtype, sharding=NamedSharding(m42, P("data", "model")))
               for n in names}
    if not subset:
        targets["norm"] = jax.ShapeDtypeStruct((4096,), np.float32, sharding=NamedSharding(make_mesh("8"), P("data")))
        assert _needed(targets) == sum(a.nbytes for a in ref.values())
    _load_counted(gcs, f"gs://{BUCKET}/st/model.safetensors", targets, ref)


def test_endpoint_from_environment(gcs, uploaded, monkeypatch):
    """No endpoint option: tensorstore's own TENSORSTORE_GCS_HTTP_URL points the store at the emulator."""
    monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", gcs.endpoint)
    ref = uploaded["st_ref"]
    gcs.reset()
    ck = _value(lambda: jreshard.open(f"gs://{BUCKET}/st/model.safetensors"), 60)
    np.testing.assert_array_equal(ck.read("ids", (slice(5, 9), slice(0, 256))), ref["ids"][5:9])
    assert any("alt=media" in r for r in gcs.requests), gcs.requests  # served through the proxy


# ------------------------------------------------------------------------------------------------
# faults: each names the gs:// URL and the likely cause, within seconds


def test_missing_object(gcs, uploaded):
    url = f"gs://{BUCKET}/st/absent.safetensors"
    err = _raises(lambda: jreshard.open(url, storage_options={**gcs.options, **FAST}), 20, errors.MissingDataError)
    assert url in str(err) and "not found" in str(err), err


def test_refused_connection(gcs):
    url = f"gs://{BUCKET}/st/model.safetensors"
    opts = {**FAST, "endpoint": f"http://127.0.0.1:{free_port()}"}
    err = _raises(lambda: jreshard.open(url, storage_options=opts), 20)
    assert url in str(err) and "connection refused" in str(err), err


def test_unreachable_endpoint(gcs):
    url = f"gs://{BUCKET}/st/model.safetensors"
    opts = {**FAST, "endpoint": "http://jreshard-no-such-host.invalid:8080"}
    err = _raises(lambda: jreshard.open(url, storage_options=opts), 30)
    assert url in str(err) and "endpoint unreachable" in str(err), err


def test_denied_without_credentials(gcs, uploaded):
    url = f"gs://{BUCKET}/st/model.safetensors"
    gcs.fault = "403"
    try:
        err = _raises(lambda: jreshard.open(url, storage_options={**gcs.options, **FAST}), 20)
    finally:
        gcs.fault = ""
    assert url in str(err) and "access denied" in str(err), err
    assert "no Google Cloud credentials found" in str(err), err


_CHILD = textwrap.dedent("""
    import sys
    import jreshard
    url, endpoint = sys.argv[1], sys.argv[2]
    ck = jreshard.open(url, storage_options={"endpoint": endpoint, "timeout": 2})
    print("rows", ck.read("ids", (slice(0, 3), slice(0, 256))).shape[0])
""")


def test_silent_metadata_server_does_not_hang(gcs, uploaded, tmp_path):
    """No credentials, and a metadata server that accepts connections and never answers: tensorstore's probe
    (once per process, so in a child process) is bounded by ``timeout``, then the read proceeds anonymously."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)  # connections complete in the backlog; nothing is ever sent
        env = child_env(GCE_METADATA_ROOT=f"127.0.0.1:{silent.getsockname()[1]}", CLOUDSDK_CONFIG=str(tmp_path))
        for var in ("GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_AUTH_TOKEN_FOR_TESTING", "TENSORSTORE_GCS_HTTP_URL"):
            env.pop(var, None)
        for var in [v for v in env if v.startswith("TENSORSTORE_CURL_")]:  # set in this process by earlier stores
            env.pop(var)
        env["JAX_PLATFORMS"] = "cpu"
        try:
            res = subprocess.run([sys.executable, "-c", _CHILD, f"gs://{BUCKET}/st/model.safetensors", gcs.endpoint],
                                 check=False, env=env, capture_output=True, text=True, timeout=45)
        except subprocess.TimeoutExpired as e:
            pytest.fail(f"hung on the silent metadata server: {e}")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "rows 3" in res.stdout, (res.stdout, res.stderr[-3000:])
