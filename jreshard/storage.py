"""Byte storage: where checkpoint files live and how byte ranges of them are read.

Two back-ends share one interface (:class:`Store`):

* :class:`KvStore` reads through a tensorstore KvStore (``file``, ``gcs``, ``s3``, ``http``, ``memory``),
  with byte-range reads grouped in a ``ts.Batch``;
* :class:`LocalStore` reads local files with ``pread``/``preadv`` into caller buffers (the fast path for
  local disks, chosen by ``io="auto"``). Never memory maps: a file truncated under a map kills the reader
  with SIGBUS, a short ``pread`` is an error.

:func:`store_for_directory` maps a path or URL to a store. Each store counts the bytes and reads it issued
(:class:`IOStats`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
import threading
import urllib.parse
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import (
    CheckpointClosedError,
    MissingDataError,
    StorageError,
    TruncatedDataError,
    UnsafeCheckpointError,
)
from .gate import checked_name


@dataclass
class IOStats:
    """Counters of what a store read: bytes requested from storage and the number of requests.

    Example:
        >>> s = IOStats(); s.add(100); (s.bytes_read, s.num_reads)
        (100, 1)
    """

    bytes_read: int = 0
    num_reads: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, nbytes: int, reads: int = 1) -> None:
        with self._lock:
            self.bytes_read += int(nbytes)
            self.num_reads += int(reads)


_PREADV = hasattr(os, "preadv")
_IOV_MAX = 1024  # regions per preadv call (POSIX IOV_MAX on Linux and macOS)
_PREADV_C: list[Any] = []  # the C library's preadv (ctypes), once looked up; [None] where there is none


def _preadv_fn() -> Any:
    """The C library's ``preadv`` as a ctypes function (it releases the GIL while it runs), or None."""
    if not _PREADV_C:
        fn = None
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            fn = getattr(libc, "preadv64", None) or libc.preadv
            fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64]
            fn.restype = ctypes.c_ssize_t
        except (OSError, AttributeError, TypeError):
            fn = None
        if fn is not None and ctypes.sizeof(ctypes.c_void_p) != 8:
            fn = None  # the iovec rows are built as two 64-bit words
        _PREADV_C.append(fn)
    return _PREADV_C[0]


class Store:
    """A flat namespace of files (keys) with ranged reads."""

    description: str = "store"

    def __init__(self) -> None:
        self.stats = IOStats()

    def read_ranges(self, requests: Sequence[tuple[str, int, int]]) -> list[bytes]:
        """Read ``[(key, start, stop), ...]`` concurrently; each result has exactly ``stop - start`` bytes."""
        raise NotImplementedError

    def read(self, key: str, start: int, stop: int) -> bytes:
        return self.read_ranges([(key, start, stop)])[0]

    def read_async(self, requests: Sequence[tuple[str, int, int]]) -> list[Callable[[], bytes]]:
        """Start reading ``requests``; each returned callable waits for its bytes (exactly stop - start)."""
        return [lambda r=r: self.read_ranges([r])[0] for r in requests]

    def read_all(self, key: str) -> bytes:
        """A whole file."""
        raise NotImplementedError

    def tail(self, key: str, n: int) -> bytes:
        """The last ``n`` bytes of a file (the whole file if it is shorter)."""
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        raise NotImplementedError

    def where(self, key: str) -> str:
        """A human-readable name of ``key`` for error messages."""
        return f"{self.description.rstrip('/')}/{key}"


def _open_regular(path: str, where: str) -> int:
    """A read-only descriptor of the regular file at ``path`` (symlinks followed). Anything else — a FIFO, a
    device, a directory — is refused without blocking (O_NONBLOCK: opening a FIFO would wait for a writer)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise MissingDataError(f"{where}: file not found") from None
    except OSError as e:
        raise StorageError(f"{where}: cannot open: {e}") from e
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UnsafeCheckpointError(f"{where}: not a regular file (a FIFO, device or directory); refused")
    return fd


def _check_length(store: Store, key: str, start: int, stop: int, got: int) -> None:
    if got != stop - start:
        raise TruncatedDataError(
            f"{store.where(key)}: expected bytes [{start}, {stop}) but the file ends after {start + got} bytes "
            "(truncated file?)"
        )


# ------------------------------------------------------------------------------------------------
# Local files

RANGES_BATCH = 256  # LocalStore.read_ranges: requests per task of its pool
RANGES_THREADS = 16  # threads of that pool (small reads of a cold disk are served concurrently)
_RANGES_POOL: list[Any] = []
_RANGES_LOCK = threading.Lock()


def settle(futures: Sequence[Future[Any]]) -> None:
    """Wait until every one of ``futures`` is done (cancelling those not started), whatever their outcome."""
    for f in futures:
        f.cancel()
    wait(futures)


def _ranges_pool() -> Any:
    """The process's pool for LocalStore.read_ranges (made on first use)."""
    with _RANGES_LOCK:
        if not _RANGES_POOL:
            _RANGES_POOL.append(ThreadPoolExecutor(RANGES_THREADS, thread_name_prefix="jreshard-ranges"))
        return _RANGES_POOL[0]


class LocalStore(Store):
    """Files under a local directory, read with ``pread``/``preadv``.

    Every read holds a *use* of the store (:meth:`_use`) while it runs. :meth:`close` refuses new uses and
    closes the descriptors only once no use is left (the last reader closes them), so a descriptor is never
    closed, and its number reused by another ``open``, under a running read.

    Example:
        >>> import tempfile, pathlib
        >>> d = tempfile.mkdtemp(); _ = pathlib.Path(d, "a.bin").write_bytes(b"hello")
        >>> s = LocalStore(d); s.read("a.bin", 0, 2)
        b'he'
        >>> s.close(); s.close()  # idempotent
        >>> try:
        ...     s.read("a.bin", 0, 2)
        ... except CheckpointClosedError as e:
        ...     print(type(e).__name__)
        CheckpointClosedError
    """

    def __init__(self, root: str) -> None:
        super().__init__()
        self.root = os.path.abspath(root)
        self.description = self.root
        self._fds: dict[str, int] = {}
        self._lock = threading.RLock()  # re-entrant: _fd() takes it again under fd()
        self._closed = False
        self._uses = 0  # reads in flight (each holds a use)

    def path(self, key: str) -> str:
        return os.path.join(self.root, checked_name(key, self.root))

    def fd(self, key: str) -> int:
        """The descriptor of file ``key`` (opened on first use), valid until :meth:`close`; reads of this store
        use :meth:`_use` instead, which keeps it open while they run. CheckpointClosedError once closed."""
        with self._lock:
            self._refuse_closed()
            return self._fd(key)

    def _fd(self, key: str) -> int:
        fd = self._fds.get(key)
        if fd is None:
            with self._lock:
                fd = self._fds.get(key)
                if fd is None:
                    self._refuse_closed()  # a reader still running after close() opens no new file
                    fd = self._fds[key] = _open_regular(self.path(key), self.where(key))
        return fd

    def _refuse_closed(self) -> None:
        if self._closed:
            raise CheckpointClosedError(f"{self.root}: the checkpoint was closed")

    @contextlib.contextmanager
    def _use(self, key: str) -> Any:
        """Hold a use of the store while reading file ``key``; yields its descriptor, which stays open (and
        keeps its number) until the use ends. Refused with CheckpointClosedError once the store is closed."""
        with self._lock:
            self._refuse_closed()
            self._uses += 1
        try:
            yield self._fd(key)
        finally:
            with self._lock:
                self._uses -= 1
                if self._closed and not self._uses:
                    self._close_fds()  # close() came during this read: the last reader closes

    def size(self, key: str) -> int:
        with self._use(key) as fd:
            return os.fstat(fd).st_size

    def exists(self, key: str) -> bool:
        return os.path.isfile(self.path(key))

    def read_ranges(self, requests: Sequence[tuple[str, int, int]]) -> list[bytes]:
        """The bytes of each ``(key, start, stop)``, in order. Many small reads (archive headers: a plan of a
        checkpoint of many ranks reads hundreds of thousands) go to a pool of threads in batches of
        RANGES_BATCH, so that a cold disk serves them concurrently; the first failing request (in order)
        raises."""
        self._refuse_closed()
        n = len(requests)
        if n <= RANGES_BATCH:
            out = self._read_ranges(requests)
        else:
            batches = [requests[k : k + RANGES_BATCH] for k in range(0, n, RANGES_BATCH)]
            futures = [_ranges_pool().submit(self._read_ranges, b) for b in batches]
            out = []
            for f in futures:  # in order: the first failure (in request order) is the one raised
                try:
                    out.extend(f.result())
                except BaseException:
                    settle(futures)  # no read outlives this call
                    raise
        self.stats.add(sum(r[2] - r[1] for r in requests), n)
        return out

    def _read_ranges(self, requests: Sequence[tuple[str, int, int]]) -> list[bytes]:
        out = []
        for key, start, stop in requests:
            if stop > start:
                with self._use(key) as fd:
                    data = os.pread(fd, stop - start, start)
            else:
                data = b""
            _check_length(self, key, start, stop, len(data))
            out.append(data)
        return out

    def read_all(self, key: str) -> bytes:
        return self.read(key, 0, self.size(key))

    def tail(self, key: str, n: int) -> bytes:
        size = self.size(key)
        return self.read(key, max(0, size - n), size)

    def read_into(self, key: str, offset: int, buf: np.ndarray) -> None:
        """Fill ``buf`` (a writable uint8 array) with the file's bytes from ``offset``; a file that ends early
        raises TruncatedDataError; a closed store raises CheckpointClosedError."""
        with self._use(key) as fd:
            self.fill(fd, key, offset, memoryview(buf))
        self.stats.add(len(buf))

    def fill(self, fd: int, key: str, offset: int, view: memoryview) -> None:
        """Fill ``view`` from descriptor ``fd`` of file ``key`` (held by :meth:`_use`) at ``offset``; a file that
        ends early raises TruncatedDataError. Not counted in :attr:`stats` (the caller counts)."""
        done = 0
        while done < len(view):
            if _PREADV:
                got = os.preadv(fd, [view[done:]], offset + done)
            else:  # platforms without preadv
                data = os.pread(fd, len(view) - done, offset + done)
                got = len(data)
                view[done : done + got] = data
            if got == 0:
                raise TruncatedDataError(
                    f"{self.where(key)}: expected {len(view)} bytes from offset {offset} but the file ends at "
                    f"{offset + done} (truncated file?)"
                )
            done += got

    def fill_scatter(self, fd: int, key: str, offset: int, iov: np.ndarray) -> bool:
        """Fill the memory regions of ``iov`` (an ``(n, 2)`` uint64 array of ``(address, length)`` rows, which
        this call may change; the caller keeps the memory alive) with consecutive bytes of descriptor ``fd`` of
        file ``key`` from ``offset``: ``preadv`` straight into scattered destinations, no staging copy. A file
        that ends early raises TruncatedDataError. Returns False (nothing read) where the C library has no
        ``preadv``; the caller then reads otherwise. Not counted in :attr:`stats` (the caller counts).

        Example:
            >>> import tempfile, pathlib
            >>> d = tempfile.mkdtemp(); _ = pathlib.Path(d, "a.bin").write_bytes(b"hello world")
            >>> s = LocalStore(d); a, b = np.zeros(2, np.uint8), np.zeros(3, np.uint8)
            >>> iov = np.array([[a.ctypes.data, 2], [b.ctypes.data, 3]], np.uint64)
            >>> with s._use("a.bin") as fd:
            ...     ok = s.fill_scatter(fd, "a.bin", 6, iov)
            >>> bytes(a) + bytes(b) if ok else b"world"
            b'world'
        """
        call = _preadv_fn()
        if call is None:
            return False
        import ctypes

        n = len(iov)
        if not n:
            return True
        # What each call of up to _IOV_MAX regions asks for: a call that returns that much is done, with no
        # search for where a short read stopped (a call after a short read asks for less, never this much).
        wants = np.add.reduceat(iov[:, 1], np.arange(0, n, _IOV_MAX)).tolist()
        total = sum(wants)
        i, done = 0, 0
        while i < n:
            k = min(n, i + _IOV_MAX)
            got = call(fd, iov[i:].ctypes.data, k - i, offset + done)
            if i % _IOV_MAX == 0 and got == wants[i // _IOV_MAX]:  # the usual case: all of it
                done += got
                i = k
                continue
            if got < 0:
                err = ctypes.get_errno()
                if err == errno.EINTR:
                    continue
                raise OSError(err, os.strerror(err), self.path(key))
            if got == 0:
                raise TruncatedDataError(
                    f"{self.where(key)}: expected {total} bytes from offset {offset} but the file ends at "
                    f"{offset + done} (truncated file?)"
                )
            done += got
            # Skip the regions filled; a region filled in part is advanced (a short read).
            lens = np.cumsum(iov[i:k, 1], dtype=np.uint64)
            m = int(np.searchsorted(lens, got, "right"))
            if m < k - i:
                part = got - (int(lens[m - 1]) if m else 0)
                iov[i + m, 0] += np.uint64(part)
                iov[i + m, 1] -= np.uint64(part)
            i += m
        return True

    def close(self) -> None:
        """Refuse every later read (CheckpointClosedError) and close the files: now when no read is running,
        else when the last running read ends. Idempotent; safe from any thread."""
        with self._lock:
            self._closed = True
            if not self._uses:
                self._close_fds()

    def _close_fds(self) -> None:
        with self._lock:
            fds = list(self._fds.values())
            self._fds.clear()
            for fd in fds:
                try:
                    os.close(fd)
                except OSError:
                    pass

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass


# ------------------------------------------------------------------------------------------------
# tensorstore KvStore


class KvStore(Store):
    """Any tensorstore KvStore (``file``, ``gcs``, ``s3``, ``http``, ``memory`` ...), read by byte ranges.

    ``remote`` (:class:`RemoteOptions`) bounds every request: tensorstore retries a failed request at most
    ``retries`` times with exponential backoff, and each wait for a result is capped in Python
    (:meth:`RemoteOptions.wait_s`), so a dead or stalled endpoint ends in a :class:`StorageError` that names
    the URL and the likely cause instead of a silent hang. ``gcs_endpoint`` points a ``gcs`` store at another
    JSON API base URL (an emulator), through ``TENSORSTORE_GCS_HTTP_URL`` while it opens.
    """

    def __init__(self, spec: dict[str, Any], context: Any = None, remote: RemoteOptions | None = None,
                 gcs_endpoint: str | None = None) -> None:
        super().__init__()
        import tensorstore as ts

        self._ts = ts
        self.spec = spec
        self.remote = remote or RemoteOptions()
        self.gcs_endpoint = gcs_endpoint
        self.description = _describe(spec)
        if context is None and _is_remote(spec):
            context = ts.Context(self.remote.context_spec())
        try:
            with _gcs_http_url(gcs_endpoint):
                fut = ts.KvStore.open(spec, context=context) if context is not None else ts.KvStore.open(spec)
            self.kv = self._wait(fut, "", 0, what="open")
        except StorageError:
            raise
        except Exception as e:
            raise StorageError(f"cannot open storage {spec!r}: {e}") from e
        self._closed = False

    def _wait(self, fut: Any, key: str, nbytes: int, what: str) -> Any:
        """``fut.result()`` within :meth:`RemoteOptions.wait_s`; a failure other than a missing key or a short
        file becomes a StorageError naming the URL and the likely cause."""
        wait = self.remote.wait_s(nbytes)
        try:
            return fut.result(timeout=wait)
        except TimeoutError:
            with contextlib.suppress(Exception):
                fut.cancel()
            raise StorageError(
                f"{self.where(key)}: {what} timed out: no result after {wait:.0f} s ({self.remote.describe()}); "
                "the endpoint accepts connections but does not answer, or stalled mid-transfer. Raise "
                "storage_options['timeout'] or ['deadline'] for a slow link"
            ) from None
        except Exception as e:  # tensorstore raises ValueError and others: all are classified
            msg = str(e)
            if _is_short(msg):
                raise TruncatedDataError(f"{self.where(key)}: {what}: the file is shorter (truncated file?)") from None
            if "NOT_FOUND" in msg:
                raise MissingDataError(f"{self.where(key)}: file not found") from None
            raise StorageError(f"{self.where(key)}: {what} failed: {_cause(msg, self.spec)} [{msg}]") from e

    def _open_kv(self) -> Any:
        """The KvStore, or CheckpointClosedError once :meth:`close` was called."""
        if self._closed:
            raise CheckpointClosedError(f"{self.description}: the checkpoint was closed")
        return self.kv

    def close(self) -> None:
        """Refuse every later read (CheckpointClosedError). Reads already issued complete (tensorstore holds
        no descriptor that a later open could reuse). Idempotent; safe from any thread.

        Example:
            >>> s = KvStore({"driver": "memory"}); s.close(); s.close()
            >>> try:
            ...     s.read_all("a")
            ... except CheckpointClosedError as e:
            ...     print(type(e).__name__)
            CheckpointClosedError
        """
        self._closed = True

    def _result(self, key: str, start: int, stop: int, fut: Any) -> bytes:
        try:
            res = self._wait(fut, key, stop - start, f"read of bytes [{start}, {stop})")
        except TruncatedDataError:
            raise TruncatedDataError(
                f"{self.where(key)}: expected bytes [{start}, {stop}) but the file is shorter (truncated file?)"
            ) from None
        if res.state == "missing":
            raise MissingDataError(f"{self.where(key)}: file not found")
        data = res.value  # copies: read once
        _check_length(self, key, start, stop, len(data))
        return data

    def read_async(self, requests: Sequence[tuple[str, int, int]]) -> list[Callable[[], bytes]]:
        ts = self._ts
        kv = self._open_kv()
        futures = []
        with ts.Batch() as batch:
            for key, start, stop in requests:
                futures.append(kv.read(key, byte_range=slice(start, stop), batch=batch) if stop > start else None)
        self.stats.add(sum(r[2] - r[1] for r in requests), sum(1 for f in futures if f is not None))
        return [(lambda: b"") if f is None else (lambda f=f, r=r: self._result(*r, f)) for r, f in zip(requests, futures)]

    def read_ranges(self, requests: Sequence[tuple[str, int, int]]) -> list[bytes]:
        return [get() for get in self.read_async(requests)]

    def read_all(self, key: str) -> bytes:
        kv = self._open_kv()
        res = self._wait(kv.read(key), key, 0, "read")
        if res.state == "missing":
            raise MissingDataError(f"{self.where(key)}: file not found")
        data = res.value
        self.stats.add(len(data))
        return data

    def tail(self, key: str, n: int) -> bytes:
        kv = self._open_kv()
        try:
            res = self._wait(kv.read(key, byte_range=slice(-n, None)), key, n, f"read of the last {n} bytes")
        except TruncatedDataError:  # (refused, denied, timed out... raise: a whole read would fail the same way)
            return self.read_all(key)  # shorter than n
        if res.state == "missing":
            raise MissingDataError(f"{self.where(key)}: file not found")
        data = res.value
        self.stats.add(len(data))
        return data

    def exists(self, key: str) -> bool:
        """Whether ``key`` exists. A store that cannot be reached (refused, denied, timed out) raises
        StorageError rather than answering False."""
        try:
            res = self._wait(self.kv.read(key, byte_range=slice(0, 0)), key, 0, "existence check")
        except (MissingDataError, TruncatedDataError):
            return False
        return res.state != "missing"


# ------------------------------------------------------------------------------------------------
# Timeouts, retries and error causes of remote stores

#: ``storage_options`` keys that jreshard takes for itself; the others go into the tensorstore spec.
REMOTE_OPTION_KEYS = ("timeout", "retries", "retry_delay", "max_retry_delay", "deadline", "low_speed_limit")

_REMOTE_DRIVERS = ("http", "s3", "gcs", "gcs_grpc")
_CURL_ENV_DONE = False
_CURL_ENV_LOCK = threading.Lock()


@dataclass(frozen=True)
class RemoteOptions:
    """Bounds on remote reads, from ``storage_options`` of :func:`jreshard.open` (see docs/remote.md).

    * ``timeout`` (30 s): connecting, or a transfer moving under ``low_speed_limit`` (1024) bytes/s for this
      long, fails the attempt (curl settings; see :meth:`configure_curl`);
    * ``retries`` (3): a failed attempt (connection error, timeout, HTTP 5xx/429) is retried at most this many
      times, with exponential backoff from ``retry_delay`` (0.5 s) up to ``max_retry_delay`` (5 s);
    * ``deadline`` (None: automatic): the longest wait in Python for any one request, whatever tensorstore
      does; automatic is ``(retries + 1) * (timeout + max_retry_delay) + nbytes / (256 KiB/s)``.

    Example:
        >>> o = RemoteOptions.pop({"timeout": 5, "retries": 1, "endpoint": "x"}); o.timeout, o.retries
        (5.0, 1)
        >>> o.wait_s(0)
        20.0
    """

    timeout: float = 30.0
    retries: int = 3
    retry_delay: float = 0.5
    max_retry_delay: float = 5.0
    deadline: float | None = None
    low_speed_limit: int = 1024

    @classmethod
    def pop(cls, opts: dict[str, Any]) -> RemoteOptions:
        """Take jreshard's keys out of ``opts`` (what is left is for the tensorstore spec);
        InvalidArgumentError for a value out of range."""
        from .errors import InvalidArgumentError

        kw = {k: opts.pop(k) for k in REMOTE_OPTION_KEYS if k in opts}
        try:
            o = cls(timeout=float(kw.get("timeout", cls.timeout)), retries=int(kw.get("retries", cls.retries)),
                    retry_delay=float(kw.get("retry_delay", cls.retry_delay)),
                    max_retry_delay=float(kw.get("max_retry_delay", max(cls.max_retry_delay,
                                                                        float(kw.get("retry_delay", 0))))),
                    deadline=None if kw.get("deadline") is None else float(kw["deadline"]),
                    low_speed_limit=int(kw.get("low_speed_limit", cls.low_speed_limit)))
        except (TypeError, ValueError) as e:
            raise InvalidArgumentError(f"storage_options: {e}") from None
        if not (o.timeout > 0 and o.retries >= 0 and 0 <= o.retry_delay <= o.max_retry_delay
                and (o.deadline is None or o.deadline > 0) and o.low_speed_limit >= 1):
            raise InvalidArgumentError(
                "storage_options: need timeout > 0, retries >= 0, 0 <= retry_delay <= max_retry_delay, "
                f"deadline > 0 and low_speed_limit >= 1; got {o}")
        return o

    def wait_s(self, nbytes: int) -> float:
        """The longest Python-side wait for one request of ``nbytes`` bytes."""
        if self.deadline is not None:
            return self.deadline
        return (self.retries + 1) * (self.timeout + self.max_retry_delay) + max(0, nbytes) / 262144

    def context_spec(self) -> dict[str, Any]:
        """tensorstore context resources: the retry bounds of the http, s3 and gcs drivers. (tensorstore's
        ``max_retries`` counts retries after the first attempt and must be >= 1; ``retries=0`` relies on
        the Python-side wait alone for its bound.)"""
        retry = {"max_retries": max(1, self.retries), "initial_delay": f"{self.retry_delay}s",
                 "max_delay": f"{self.max_retry_delay}s"}
        return {"http_request_retries": retry, "s3_request_retries": retry, "gcs_request_retries": retry}

    def describe(self) -> str:
        return f"timeout={self.timeout:g} s, retries={self.retries}"

    def configure_curl(self) -> None:
        """Set tensorstore's curl connect timeout and low-speed abort from this store's options. These are
        environment variables that tensorstore reads once per process, when it makes its first HTTP request:
        later stores (and a process where tensorstore already made HTTP requests) keep the values in force,
        and a variable the user already set is kept. The Python-side wait bounds every store regardless."""
        global _CURL_ENV_DONE
        with _CURL_ENV_LOCK:
            if _CURL_ENV_DONE:
                return
            _CURL_ENV_DONE = True
            secs = str(max(1, round(self.timeout)))
            os.environ.setdefault("TENSORSTORE_CURL_CONNECT_TIMEOUT_SECONDS", secs)
            os.environ.setdefault("TENSORSTORE_CURL_LOW_SPEED_TIME_SECONDS", secs)
            os.environ.setdefault("TENSORSTORE_CURL_LOW_SPEED_LIMIT_BYTES", str(self.low_speed_limit))


_GCS_URL_LOCK = threading.Lock()


@contextlib.contextmanager
def _gcs_http_url(endpoint: str | None) -> Any:
    """Point tensorstore's ``gcs`` driver at ``endpoint`` (an emulator, a proxy) while a store opens: the
    driver has no endpoint member in its spec and reads ``TENSORSTORE_GCS_HTTP_URL`` when a store opens
    (the opened store keeps it). Nothing to do for ``None``."""
    if endpoint is None:
        yield
        return
    with _GCS_URL_LOCK:
        old = os.environ.get("TENSORSTORE_GCS_HTTP_URL")
        os.environ["TENSORSTORE_GCS_HTTP_URL"] = endpoint.rstrip("/")
        try:
            yield
        finally:
            if old is None:
                os.environ.pop("TENSORSTORE_GCS_HTTP_URL", None)
            else:
                os.environ["TENSORSTORE_GCS_HTTP_URL"] = old


def _is_remote(spec: dict[str, Any]) -> bool:
    return spec.get("driver") in _REMOTE_DRIVERS


def _is_short(msg: str) -> bool:
    return "OUT_OF_RANGE" in msg or "out of range" in msg.lower()


def _cause(msg: str, spec: dict[str, Any]) -> str:
    """The likely cause of a failed tensorstore request, in words, from its error message."""
    low = msg.lower()
    m = re.search(r"curl_code='(\d+)'", msg)
    curl = int(m.group(1)) if m else None
    m = re.search(r"HTTP code (\d{3})|http_response_code='(\d{3})'", msg)
    status = int(m.group(1) or m.group(2)) if m else None
    m = re.search(r"<Code>(\w+)</Code>", msg)  # an S3 error document
    s3code = m.group(1) if m else ""
    retried = " on every retry" if "retry attempts failed" in low else ""
    if curl == 7 or "could not connect" in low or "connection refused" in low:
        return ("connection refused: nothing accepts connections at this host and port (wrong endpoint, or "
                f"the server is down){retried}")
    if curl == 6 or "could not resolve" in low:
        return f"endpoint unreachable: the host name does not resolve (wrong endpoint, or no network){retried}"
    if curl == 28 or "timeout was reached" in low or "timed out" in low or "too slow" in low:
        return f"timed out: the endpoint did not answer, or the transfer stalled{retried}"
    if curl in (35, 51, 58, 60, 77) or "ssl" in low or "certificate" in low:
        return "TLS handshake or certificate error"
    if curl is not None:
        return f"network error (curl code {curl}){retried}"
    if s3code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"):
        return f"credentials rejected ({s3code})" + _credentials_hint(spec)
    if s3code in ("NoSuchBucket", "NoSuchKey"):
        return f"not found ({s3code}): wrong bucket or path"
    if status == 403 or s3code == "AccessDenied" or (status is None and "PERMISSION_DENIED" in msg):
        why = "access denied (HTTP 403): the credentials lack permission"
        if spec.get("driver") == "s3":
            why += " (S3 also answers 403 for a missing key when s3:ListBucket is not granted)"
        return why + _credentials_hint(spec)
    if status == 401 or "UNAUTHENTICATED" in msg:
        return "unauthorized (HTTP 401)" + _credentials_hint(spec)
    if "credential" in low:
        return "no usable credentials" + _credentials_hint(spec)
    if status == 404:
        return "not found (HTTP 404): wrong bucket, host or path"
    if status is not None and (status >= 500 or status == 429):
        return f"server error (HTTP {status}){retried}"
    if status is not None:
        return f"HTTP {status}"
    return "storage error"


def _credentials_hint(spec: dict[str, Any]) -> str:
    env = os.environ
    if spec.get("driver") == "s3":
        found = (env.get("AWS_ACCESS_KEY_ID") or env.get("AWS_PROFILE") or env.get("AWS_WEB_IDENTITY_TOKEN_FILE")
                 or os.path.exists(os.path.expanduser(env.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials"))))
        if not found:
            return ("; no AWS credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE; "
                    "without them tensorstore reads anonymously)")
    elif spec.get("driver") in ("gcs", "gcs_grpc"):
        config = env.get("CLOUDSDK_CONFIG") or os.path.expanduser("~/.config/gcloud")  # as tensorstore looks
        adc = os.path.join(config, "application_default_credentials.json")
        if not (env.get("GOOGLE_APPLICATION_CREDENTIALS") or env.get("GOOGLE_AUTH_TOKEN_FOR_TESTING")
                or os.path.exists(adc)):
            return ("; no Google Cloud credentials found (set GOOGLE_APPLICATION_CREDENTIALS or run "
                    "`gcloud auth application-default login`)")
    return ""


def _describe(spec: dict[str, Any]) -> str:
    driver = spec.get("driver")
    if driver == "file":
        return spec["path"]
    if driver == "gcs":
        return f"gs://{spec['bucket']}/{spec.get('path', '')}"
    if driver == "s3":
        return f"s3://{spec['bucket']}/{spec.get('path', '')}"
    if driver == "http":
        return spec["base_url"] + spec.get("path", "")
    return repr(spec)


def store_for_directory(location: str, io: str = "auto", storage_options: dict[str, Any] | None = None) -> Store:
    """A store whose keys are the files directly under ``location`` (a local dir or a URL prefix).

    Example:
        >>> import tempfile, pathlib
        >>> d = tempfile.mkdtemp(); _ = pathlib.Path(d, "a.bin").write_bytes(b"hello")
        >>> store_for_directory(d).read("a.bin", 1, 3)
        b'el'
    """
    opts = dict(storage_options or {})
    remote = RemoteOptions.pop(opts)
    parsed = urllib.parse.urlparse(location)
    scheme = parsed.scheme
    if scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt"):
        path = os.path.abspath(local_path(location))
        if not os.path.isdir(path):
            raise MissingDataError(f"{path}: directory not found")
        if io in ("auto", "posix"):
            return LocalStore(path)
        return KvStore({"driver": "file", "path": path.rstrip("/") + "/", **opts}, remote=remote)
    if io == "posix":
        raise StorageError(f"io='posix' reads local files only, not {location}")
    prefix = parsed.path.lstrip("/")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    gcs_endpoint = None
    if scheme in ("gs", "gcs"):
        spec = {"driver": "gcs", "bucket": parsed.netloc, "path": prefix}
        gcs_endpoint = opts.pop("endpoint", None)  # else TENSORSTORE_GCS_HTTP_URL, read by tensorstore itself
    elif scheme == "s3":
        spec = {"driver": "s3", "bucket": parsed.netloc, "path": prefix}
        endpoint = opts.pop("endpoint", None) or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            spec["endpoint"] = endpoint
        region = opts.pop("aws_region", None) or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            spec["aws_region"] = region
    elif scheme in ("http", "https"):
        base = f"{scheme}://{parsed.netloc}"
        spec = {"driver": "http", "base_url": base, "path": "/" + prefix}
    elif scheme == "memory":
        spec = {"driver": "memory", "path": prefix}
    else:
        raise StorageError(f"{location}: unsupported URL scheme {scheme!r} (use a path, file://, gs://, s3://, http(s)://)")
    spec.update(opts)
    if _is_remote(spec):
        remote.configure_curl()
    return KvStore(spec, remote=remote, gcs_endpoint=gcs_endpoint)


def local_path(source: str) -> str:
    """The path of a local source: a plain path, or a ``file://`` URL without a host (``file:///dir``). A
    ``file://host/...`` URL is refused rather than read from this machine's ``/...``.

    Example:
        >>> local_path("file:///tmp/ckpt"), local_path("/tmp/ckpt")
        ('/tmp/ckpt', '/tmp/ckpt')
    """
    if not source.startswith("file:"):
        return source
    parsed = urllib.parse.urlparse(source)
    if parsed.netloc:
        raise StorageError(f"{source}: a file:// URL with a host ({parsed.netloc!r}) is not a local file; "
                           "use file:///path or a plain path")
    return urllib.parse.unquote(parsed.path)


def parent_and_name(source: str) -> tuple[str, str]:
    """Split a file path or URL into its directory and its last component."""
    parsed = urllib.parse.urlparse(source)
    if parsed.scheme in ("", "file"):
        path = os.path.abspath(local_path(source))
        return os.path.dirname(path), os.path.basename(path)
    head, _, name = source.rstrip("/").rpartition("/")
    return head, name


def is_local(source: str) -> bool:
    return urllib.parse.urlparse(source).scheme in ("", "file")
