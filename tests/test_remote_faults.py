"""Remote stores fail fast and say why: a refused connection, HTTP 403 / 404, a server that stalls mid-body,
and a server that answers 503 a few times before it serves (the load then succeeds without re-fetching much).

Servers run on 127.0.0.1 inside the test: a small threaded HTTP server whose behaviour each test picks by
URL prefix, and a fault-injecting proxy in front of a moto S3 server (as in tests/test_s3.py). Every case
runs under :func:`_bounded`, so a hang fails the test instead of blocking the run.
"""

from __future__ import annotations

import http.client
import os
import re
import socket
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

import jreshard
from jreshard import errors
from tests.helpers import run_bounded

SLACK = 1.1
FAST = {"timeout": 2, "retries": 2, "retry_delay": 0.05, "max_retry_delay": 0.2}
FLAKY = {**FAST, "timeout": 15, "retries": 3}  # 3 failures in a row, then success: needs 3 retries (a long
# timeout: on a busy machine a slow answer must not count as a 4th failure)
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
TENSORS = {"a": np.arange(64 * 1024, dtype=np.float32).reshape(256, 256),
           "b": (np.arange(32 * 1024, dtype=np.int64) * 7).reshape(128, 256)}


def _bounded(fn, limit: float) -> dict:
    return run_bounded(fn, limit, "a remote store")


def _raises(fn, limit: float, kind=errors.StorageError):
    box = _bounded(fn, limit)
    assert "error" in box, f"no error: {box.get('value')!r}"
    assert isinstance(box["error"], kind), repr(box["error"])
    assert isinstance(box["error"], errors.JReshardError)
    return box["error"]


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again on exit: nothing listens there


# ------------------------------------------------------------------------------------------------
# a plain HTTP server with faults chosen by path: /ok/, /denied/, /stall/, /flaky/


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, *args):
        pass

    def _empty(self, code: int) -> None:
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _serve(self, head: bool) -> None:
        srv = self.server
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        mode, _, name = path.lstrip("/").partition("/")
        if mode == "denied":
            return self._empty(403)
        with srv.lock:
            if mode == "flaky" and not head and srv.failures_left > 0:
                srv.failures_left -= 1
                srv.failed += 1
                return self._empty(503)
        f = srv.root / name
        if not f.is_file():
            return self._empty(404)
        data = f.read_bytes()
        start, stop, code = 0, len(data), 200
        m = _RANGE.match((self.headers.get("Range") or "").strip())
        if m and (m.group(1) or m.group(2)):
            if m.group(1):
                start = int(m.group(1))
                stop = min(len(data), int(m.group(2)) + 1) if m.group(2) else len(data)
            else:
                start = max(0, len(data) - int(m.group(2)))
            code = 206
        body = data[start:stop]
        self.send_response(code)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{f.stat().st_mtime_ns:x}"')
        if code == 206:
            self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if head:
            return None
        if mode == "stall" and len(body) > 4096:  # headers and a little of the body, then nothing
            self.wfile.write(body[:1024])
            self.wfile.flush()
            srv.release.wait(60)
            return None
        with srv.lock:  # counted before the write: the client may check the count as soon as it has the bytes
            srv.bytes_sent += len(body)
        self.wfile.write(body)
        return None

    def do_GET(self):
        self._serve(head=False)

    def do_HEAD(self):
        self._serve(head=True)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root = root
        self.lock = threading.Lock()
        self.release = threading.Event()
        self.bytes_sent = 0
        self.failures_left = 0
        self.failed = 0

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from safetensors.numpy import save_file

    d = tmp_path_factory.mktemp("faults")
    save_file(TENSORS, str(d / "model.safetensors"))
    return d


@pytest.fixture(scope="module")
def server(data_dir):
    srv = _Server(data_dir)
    th = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    th.start()
    try:
        yield srv
    finally:
        srv.release.set()
        srv.shutdown()
        srv.server_close()
        th.join(timeout=10)


def test_http_refused_fails_fast():
    url = f"http://127.0.0.1:{_closed_port()}/ckpt/model.safetensors"
    err = _raises(lambda: jreshard.open(url, storage_options=FAST), 20)
    assert "127.0.0.1" in str(err) and "/ckpt/model.safetensors" in str(err), err
    assert "refused" in str(err), err


def test_http_refused_default_options_fails_fast():
    """No storage_options at all: the defaults bound the retries too."""
    url = f"http://127.0.0.1:{_closed_port()}/ckpt/"
    err = _raises(lambda: jreshard.open(url), 30)
    assert "refused" in str(err) and url.rstrip("/") in str(err), err


def test_http_403_names_cause(server):
    url = server.base + "/denied/model.safetensors"
    err = _raises(lambda: jreshard.open(url, storage_options=FAST), 20)
    assert url in str(err) and "403" in str(err) and "access denied" in str(err), err


def test_http_404_names_cause(server):
    url = server.base + "/ok/absent.safetensors"
    err = _raises(lambda: jreshard.open(url, storage_options=FAST), 20, errors.MissingDataError)
    assert url in str(err) and "not found" in str(err), err


def test_http_stall_mid_body_times_out(server):
    url = server.base + "/stall/model.safetensors"
    opts = {"timeout": 2, "retries": 1, "retry_delay": 0.05, "max_retry_delay": 0.2}
    ck = _bounded(lambda: jreshard.open(url, storage_options=opts), 20)["value"]  # the header is small: served
    err = _raises(lambda: ck.read("a"), 30)
    assert url in str(err) and "timed out" in str(err), err


def test_http_503_then_success(server):
    url = server.base + "/flaky/model.safetensors"
    with server.lock:
        server.failures_left, server.failed = 2, 0
    ck = _bounded(lambda: jreshard.open(url, storage_options=FLAKY), 60)["value"]
    with server.lock:
        server.failures_left, server.bytes_sent = 3, 0
    box = _bounded(lambda: {n: ck.read(n) for n in TENSORS}, 60)
    assert "error" not in box, box.get("error")
    for n, a in TENSORS.items():
        np.testing.assert_array_equal(box["value"][n], a)
    needed = sum(a.nbytes for a in TENSORS.values())
    assert server.failed == 5 and server.failures_left == 0
    assert needed <= ck.io_stats.bytes_read <= SLACK * needed, (ck.io_stats, needed)
    assert needed <= server.bytes_sent <= SLACK * needed, (server.bytes_sent, needed)


def test_options_validated():
    with pytest.raises(errors.InvalidArgumentError):
        jreshard.open(f"http://127.0.0.1:{_closed_port()}/x/", storage_options={"timeout": 0})


# ------------------------------------------------------------------------------------------------
# S3: a fault-injecting proxy in front of moto


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Proxy

    def log_message(self, *args):
        pass

    def _forward(self) -> None:
        srv = self.server
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with srv.lock:
            fault = srv.fault
            if fault == "flaky" and self.command == "GET" and srv.failures_left > 0:
                srv.failures_left -= 1
                srv.failed += 1
                fault = "503"
        if fault in ("403", "503"):
            xml = (b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>"
                   + (b"AccessDenied" if fault == "403" else b"SlowDown") + b"</Code><Message>no</Message></Error>")
            self.send_response(int(fault))
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(0 if self.command == "HEAD" else len(xml)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(xml)
            return
        conn = http.client.HTTPConnection("127.0.0.1", srv.upstream_port, timeout=30)
        try:
            conn.request(self.command, self.path, body=body or None, headers=dict(self.headers))
            resp = conn.getresponse()
            payload = resp.read()
        finally:
            conn.close()
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("content-length", "transfer-encoding", "connection", "server", "date"):
                self.send_header(k, v)
        n = int(resp.getheader("Content-Length") or len(payload)) if self.command == "HEAD" else len(payload)
        self.send_header("Content-Length", str(n))
        self.end_headers()
        if self.command != "HEAD":
            if self.command == "GET":  # counted before the write (see above)
                with srv.lock:
                    srv.bytes_sent += len(payload)
            self.wfile.write(payload)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward


class _Proxy(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, upstream: str) -> None:
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.upstream_port = urllib.parse.urlsplit(upstream).port
        self.lock = threading.Lock()
        self.fault = ""
        self.failures_left = 0
        self.failed = 0
        self.bytes_sent = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


BUCKET = "jreshard-faults"


@pytest.fixture(scope="module")
def s3proxy(tmp_path_factory, data_dir):
    from tests.test_s3 import REGION, _start_moto, _stop, isolate_aws

    mp = pytest.MonkeyPatch()
    isolate_aws(mp)
    try:
        proc, endpoint = _start_moto(tmp_path_factory.mktemp("moto") / "moto.log", dict(os.environ))
    except RuntimeError as e:
        mp.undo()
        pytest.fail(f"cannot start a moto S3 server (moto[server] is in the test extra): {e}")
    proxy = _Proxy(endpoint)
    th = threading.Thread(target=proxy.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    th.start()
    try:
        import boto3

        client = boto3.client("s3", endpoint_url=endpoint, region_name=REGION,
                              aws_access_key_id="testing", aws_secret_access_key="testing")
        client.create_bucket(Bucket=BUCKET)
        client.upload_file(str(data_dir / "model.safetensors"), BUCKET, "st/model.safetensors")
        proxy.options = {"endpoint": proxy.endpoint, "aws_region": REGION, **FAST}
        yield proxy
    finally:
        proxy.shutdown()
        proxy.server_close()
        th.join(timeout=10)
        _stop(proc)
        mp.undo()


URL = f"s3://{BUCKET}/st/model.safetensors"


def test_s3_refused_fails_fast(s3proxy):
    opts = {**s3proxy.options, "endpoint": f"http://127.0.0.1:{_closed_port()}"}
    err = _raises(lambda: jreshard.open(URL, storage_options=opts), 20)
    assert f"s3://{BUCKET}/st/" in str(err) and "refused" in str(err), err


def test_s3_403_without_credentials(s3proxy, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
    s3proxy.fault = "403"
    try:
        err = _raises(lambda: jreshard.open(URL, storage_options=s3proxy.options), 20)
    finally:
        s3proxy.fault = ""
    assert f"s3://{BUCKET}/st/model.safetensors" in str(err), err
    assert "access denied" in str(err) and "no AWS credentials found" in str(err), err


def test_s3_404_names_cause(s3proxy):
    url = f"s3://{BUCKET}/st/absent.safetensors"
    err = _raises(lambda: jreshard.open(url, storage_options=s3proxy.options), 20, errors.MissingDataError)
    assert url in str(err) and "not found" in str(err), err


def test_s3_503_then_success(s3proxy):
    ck = _bounded(lambda: jreshard.open(URL, storage_options={**s3proxy.options, **FLAKY}), 60)["value"]
    with s3proxy.lock:
        s3proxy.fault, s3proxy.failures_left, s3proxy.failed, s3proxy.bytes_sent = "flaky", 3, 0, 0
    try:
        box = _bounded(lambda: {n: ck.read(n) for n in TENSORS}, 60)
    finally:
        s3proxy.fault = ""
    assert "error" not in box, box.get("error")
    for n, a in TENSORS.items():
        np.testing.assert_array_equal(box["value"][n], a)
    needed = sum(a.nbytes for a in TENSORS.values())
    assert s3proxy.failed == 3
    assert needed <= ck.io_stats.bytes_read <= SLACK * needed, (ck.io_stats, needed)
    assert needed <= s3proxy.bytes_sent <= SLACK * needed, (s3proxy.bytes_sent, needed)
