"""Loading over plain HTTP(S)-style URLs: a tiny threaded server on 127.0.0.1 that answers ``HEAD`` and
``GET`` with ``Range: bytes=a-b`` / ``bytes=a-`` / ``bytes=-n`` (206 Partial Content) serves a safetensors
file, a DCP checkpoint written by torch and a torch.save archive.

The server counts the body bytes it sends, an independent check that only about the requested shards'
bytes travel.
"""

from __future__ import annotations

import email.utils
import re
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jreshard
from jreshard import errors

from tests import torch_writers as tw
from tests.helpers import assert_same, box_nbytes, check_loaded_array, distinct_indices, make_mesh, normal_tensor, torch_bits

SLACK = 1.1
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_Server"

    def log_message(self, *args):  # quiet
        pass

    def _file(self) -> Path | None:
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        for prefix, root in self.server.mounts.items():
            if path.startswith(prefix):
                full = (root / path[len(prefix):]).resolve()
                if full.is_file() and (full == root or root in full.parents):
                    return full
        return None

    def _empty(self, code: int, extra: dict | None = None) -> None:
        self.send_response(code)
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _serve(self, head: bool) -> None:
        with self.server.lock:
            self.server.requests.append((self.command, self.path, self.headers.get("Range")))
        f = self._file()
        if f is None:
            self._empty(404)
            return
        st = f.stat()
        size = st.st_size
        start, stop, code = 0, size, 200
        rng = self.headers.get("Range")
        if rng:
            m = _RANGE.match(rng.strip())
            if not m or (not m.group(1) and not m.group(2)):
                self._empty(416, {"Content-Range": f"bytes */{size}"})
                return
            if m.group(1):
                start = int(m.group(1))
                stop = min(size, int(m.group(2)) + 1) if m.group(2) else size
            else:  # suffix: the last n bytes
                start = max(0, size - int(m.group(2)))
            if start >= size or stop <= start:
                self._empty(416, {"Content-Range": f"bytes */{size}"})
                return
            code = 206
        self.send_response(code)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{st.st_mtime_ns:x}-{size:x}"')
        self.send_header("Last-Modified", email.utils.formatdate(st.st_mtime, usegmt=True))
        if code == 206:
            self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{size}")
        self.send_header("Content-Length", str(stop - start))
        self.end_headers()
        if head:
            return
        with open(f, "rb") as fh:
            fh.seek(start)
            body = fh.read(stop - start)
        self.wfile.write(body)
        with self.server.lock:
            self.server.bytes_sent += len(body)

    def do_GET(self):  # noqa: N802
        self._serve(head=False)

    def do_HEAD(self):  # noqa: N802
        self._serve(head=True)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, mounts: dict[str, Path]):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.mounts = {k: v.resolve() for k, v in mounts.items()}
        self.lock = threading.Lock()
        self.bytes_sent = 0
        self.requests: list = []

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def reset(self) -> None:
        with self.lock:
            self.bytes_sent = 0
            self.requests.clear()


ST = {"embed": ("float32", (512, 256)), "proj": ("bfloat16", (256, 512)), "ids": ("int64", (128, 64)),
      "bias": ("float16", (512,))}
NP = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16), "int64": np.dtype(np.int64),
      "float16": np.dtype(np.float16)}


def _to_numpy(t) -> np.ndarray:
    return torch_bits(t, NP[str(t.dtype).removeprefix("torch.")])


_random = normal_tensor


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    import torch
    from safetensors.torch import load_file, save_file

    d = tmp_path_factory.mktemp("http")
    save_file({n: _random(n, *v) for n, v in ST.items()}, str(d / "model.safetensors"))
    st_ref = {k: _to_numpy(v) for k, v in load_file(str(d / "model.safetensors")).items()}
    torch.save({"net": {n: _random(n, *v) for n, v in ST.items()}, "step": 11}, d / "ckpt.pt")
    raw = torch.load(str(d / "ckpt.pt"), weights_only=True)
    bin_ref = {f"net.{k}": _to_numpy(v) for k, v in raw["net"].items()}
    return d, st_ref, bin_ref


@pytest.fixture(scope="module")
def server(data, checkpoints):
    srv = _Server({"/data/": data[0], "/ck/": checkpoints.root})
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=10)


def _needed(targets: dict) -> int:
    return sum(box_nbytes(i, t.shape, np.dtype(t.dtype).itemsize)
               for t in targets.values() for i in distinct_indices(t.sharding, t.shape))


def test_server_supports_ranges(server):
    """Self-check of the fixture server with urllib."""
    import urllib.request

    req = urllib.request.Request(server.base + "/data/model.safetensors", headers={"Range": "bytes=2-9"})
    with urllib.request.urlopen(req) as r:
        assert r.status == 206 and len(r.read()) == 8
    req = urllib.request.Request(server.base + "/data/model.safetensors", headers={"Range": "bytes=-5"})
    with urllib.request.urlopen(req) as r:
        assert r.status == 206 and len(r.read()) == 5


def test_safetensors_whole(server, data):
    _, ref, _ = data
    with jreshard.open(server.base + "/data/model.safetensors") as ck:
        assert set(ck.tensors) == set(ref)
        for name, a in ref.items():
            assert_same(ck.read(name), a, name)


def test_safetensors_partial_load(server, data):
    _, ref, _ = data
    mesh = make_mesh("2x4")
    targets = {
        "embed": jax.ShapeDtypeStruct((512, 256), np.float32, sharding=NamedSharding(mesh, P("data", "model"))),
        "ids": jax.ShapeDtypeStruct((128, 64), np.int64, sharding=NamedSharding(mesh, P(("data", "model")))),
    }
    server.reset()
    ck = jreshard.open(server.base + "/data/model.safetensors")
    out = ck.load(targets)
    for n, t in targets.items():
        check_loaded_array(out[n], t, ref[n], n)
    needed = _needed(targets)
    assert needed < 0.7 * sum(a.nbytes for a in ref.values())
    assert needed <= ck.io_stats.bytes_read <= SLACK * needed, (ck.io_stats, needed)
    assert needed <= server.bytes_sent <= SLACK * needed, (server.bytes_sent, needed)
    # sub-boxes
    server.reset()
    before = ck.io_stats.bytes_read
    box = (slice(30, 200), slice(0, 512))
    assert_same(ck.read("proj", box), ref["proj"][box], "proj box")
    need = box_nbytes(box, (256, 512), 2)
    assert need <= ck.io_stats.bytes_read - before <= SLACK * need
    assert server.bytes_sent <= SLACK * need


def test_dcp_checkpoint(server, checkpoints):
    ref = checkpoints.reference("plain")
    url = server.base + "/ck/plain/"
    big = [t.name for t in tw.TENSORS if t.big]
    mesh = make_mesh("8")
    targets = {n: jax.ShapeDtypeStruct(ref[n].shape, ref[n].dtype, sharding=NamedSharding(mesh, P("data")))
               for n in big}
    server.reset()
    ck = jreshard.open(url)
    out = ck.load(targets)
    for n, t in targets.items():
        check_loaded_array(out[n], t, ref[n], n)
    needed = _needed(targets)
    assert needed <= ck.io_stats.bytes_read <= SLACK * needed, (ck.io_stats, needed)
    assert needed <= server.bytes_sent <= SLACK * needed, (server.bytes_sent, needed)
    assert dict(ck.objects) == tw.OBJECTS_FLAT


def test_dcp_every_tensor(server, checkpoints):
    ref = checkpoints.reference("plain")
    mesh = make_mesh("2x4")
    targets = {n: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, P())) for n, a in ref.items()}
    out = jreshard.load(server.base + "/ck/plain", targets)
    for n, t in targets.items():
        check_loaded_array(out[n], t, ref[n], n)


def test_torch_save_archive(server, data):
    _, _, ref = data
    with jreshard.open(server.base + "/data/ckpt.pt") as ck:
        assert set(ck.tensors) == set(ref)
        assert dict(ck.objects) == {"step": 11}
        for name, a in ref.items():
            assert_same(ck.read(name), a, name)
        assert_same(ck.read("net.embed", (slice(5, 300), slice(7, 9))), ref["net.embed"][5:300, 7:9], "box")


def test_missing_file(server):
    with pytest.raises(errors.MissingDataError):
        jreshard.open(server.base + "/data/absent.safetensors")
