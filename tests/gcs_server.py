"""A GCS emulator on 127.0.0.1 for the tests: ``gcp-storage-emulator`` (from the package index) in a subprocess,
behind a small counting proxy.

The proxy (a threaded ``http.server``) forwards every request to the emulator and

* counts the body bytes of object downloads (``?alt=media``), so a test can compare the bytes the server sent
  with the bytes a load needed;
* serialises the requests it forwards: the emulator is a single-threaded ``http.server`` with a listen backlog of
  5, and tensorstore opens many connections at once;
* answers a suffix range (``Range: bytes=-N``, which real GCS serves and the emulator ignores) by asking the
  emulator for the object's size and forwarding ``bytes=SIZE-N-``;
* can inject a fault: ``fault = "403"`` answers every request with a GCS JSON error 403.

Uploads go through the emulator's JSON API (``POST /upload/storage/v1/b/{bucket}/o?uploadType=media&name=...``)
with plain ``urllib``.
"""

from __future__ import annotations

import http.client
import json
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tests.torch_writers import free_port  # (torch is not imported by it)

_SUFFIX = re.compile(r"^\s*bytes=-(\d+)\s*$")
_OBJECT = re.compile(r"^/storage/v1/b/([^/]+)/o/([^?]+)")


def start_emulator(log_path: Path, bucket: str) -> tuple[subprocess.Popen, str]:
    """(process, base URL) of a gcp-storage-emulator holding ``bucket`` in memory, or RuntimeError with its log."""
    try:
        import gcp_storage_emulator  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the environment
        raise RuntimeError(f"gcp-storage-emulator is not importable: {e}") from e
    last = ""
    for _attempt in range(3):  # a port picked as free can be taken before the server binds it
        port = free_port()
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1", "--port", str(port),
                 "--in-memory", "--default-bucket", bucket, "--quiet"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                urllib.request.urlopen(base + "/", timeout=2).read()
                return proc, base
            except (OSError, urllib.error.URLError, http.client.HTTPException):
                time.sleep(0.1)
        last = log_path.read_text(errors="replace")[-2000:]
        stop(proc)
    raise RuntimeError(f"the GCS emulator did not start:\n{last}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def upload(base: str, bucket: str, name: str, data: bytes) -> None:
    """Put object ``name`` into ``bucket`` through the JSON API's media upload."""
    url = (f"{base}/upload/storage/v1/b/{bucket}/o?uploadType=media&name="
           + urllib.parse.quote(name, safe=""))
    req = urllib.request.Request(url, data=data, method="POST",
                                 headers={"Content-Type": "application/octet-stream"})
    with urllib.request.urlopen(req, timeout=60) as r:
        meta = json.loads(r.read())
    assert int(meta["size"]) == len(data), meta


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Proxy

    def log_message(self, *args):
        pass

    def _send(self, status: int, headers: list[tuple[str, str]], payload: bytes) -> None:
        self.send_response(status)
        for k, v in headers:
            if k.lower() not in ("content-length", "transfer-encoding", "connection", "server", "date"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _upstream(self, method: str, path: str, body: bytes | None, headers: dict) -> tuple[int, list, bytes]:
        srv = self.server
        with srv.upstream_lock:  # one request at a time: the emulator serves one connection at a time
            conn = http.client.HTTPConnection("127.0.0.1", srv.upstream_port, timeout=60)
            try:
                conn.request(method, path, body=body, headers=headers)
                resp = conn.getresponse()
                return resp.status, resp.getheaders(), resp.read()
            finally:
                conn.close()

    def _forward(self) -> None:
        srv = self.server
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) or None
        with srv.lock:
            fault = srv.fault
            srv.requests.append(f"{self.command} {self.path} {self.headers.get('Range', '')}".strip())
        if fault == "403":
            err = json.dumps({"error": {"code": 403, "message": "caller does not have storage.objects.get access",
                                        "errors": [{"reason": "forbidden"}]}}).encode()
            return self._send(403, [("Content-Type", "application/json")], err)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
        m = _SUFFIX.match(self.headers.get("Range") or "")
        obj = _OBJECT.match(self.path)
        if m and obj:  # bytes=-N: the emulator would send the whole object
            status, _, meta = self._upstream("GET", f"/storage/v1/b/{obj.group(1)}/o/{obj.group(2)}", None, {})
            if status == 200:
                size = int(json.loads(meta)["size"])
                headers = {k: v for k, v in headers.items() if k.lower() != "range"}
                headers["Range"] = f"bytes={max(0, size - int(m.group(1)))}-"
        status, resp_headers, payload = self._upstream(self.command, self.path, body, headers)
        if self.command == "GET" and "alt=media" in self.path:
            with srv.lock:
                srv.bytes_sent += len(payload)
        self._send(status, resp_headers, payload)
        return None

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = do_PATCH = _forward


class Proxy(ThreadingHTTPServer):
    """A counting, fault-injecting proxy on 127.0.0.1 in front of the emulator at ``upstream``."""

    daemon_threads = True

    def __init__(self, upstream: str) -> None:
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.upstream_port = urllib.parse.urlsplit(upstream).port
        self.lock = threading.Lock()
        self.upstream_lock = threading.Lock()
        self.fault = ""
        self.bytes_sent = 0
        self.requests: list[str] = []
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def reset(self) -> None:
        with self.lock:
            self.bytes_sent = 0
            self.requests = []

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join(timeout=10)
