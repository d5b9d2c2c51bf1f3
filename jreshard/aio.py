"""Many reads of local files in one system call: Linux native AIO (``io_submit``), through ctypes.

Why: a restore's reads are page-cache copies the kernel makes on the reading thread, a thousand ``preadv`` calls
of 1,024 scatter rows each for a 1.5 GiB model. Every call returns to Python, and every return takes the GIL
again, which the thread that plans the next batch holds much of the time: the read threads then wait for the GIL
instead of reading. ``io_submit`` hands the kernel a whole list of reads (``IOCB_CMD_PREAD`` or
``IOCB_CMD_PREADV``) at once. On a file opened without ``O_DIRECT`` the kernel serves each read in the call itself,
as ``preadv`` would, and ``io_getevents`` then collects the results: two calls (and two GIL hand-overs) for a task
of reads instead of one per read.

Nothing here decides what is read: callers pass the rows they already built and checked (the same addresses,
lengths and offsets they would give ``preadv``), and get each row's result: the byte count, or a negative number
(an error, or not served). A row whose result is not the full length it asked for is the caller's to read again
the plain way, which then raises the exact error (a truncated file, EIO). Where native AIO is missing (another
OS or CPU, a sandbox that refuses ``io_setup``, a forked child whose contexts are gone), :func:`submit` returns
None and callers read the plain way.

Contexts (``io_setup``) are kept in a free list per process, one per thread using it at a time, and reused; they
are released when the process ends.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
import threading
from typing import Any

import numpy as np

PREAD = 0  # IOCB_CMD_PREAD: buf is an address, count a byte count
PREADV = 7  # IOCB_CMD_PREADV: buf is the address of (address, length) rows, count the number of rows
EVENTS = 256  # reads per io_submit (the context's size)
NOT_SERVED = -(2**62)  # the result of a row that no read answered

# struct iocb of <linux/aio_abi.h> on a little-endian 64-bit CPU (aio_key before aio_rw_flags), 64 bytes.
IOCB = np.dtype([("data", "<u8"), ("key", "<u4"), ("rw_flags", "<i4"), ("opcode", "<u2"), ("reqprio", "<i2"),
                 ("fildes", "<u4"), ("buf", "<u8"), ("nbytes", "<u8"), ("offset", "<i8"), ("reserved2", "<u8"),
                 ("flags", "<u4"), ("resfd", "<u4")])
# struct io_event: data, obj, res, res2.
EVENT = np.dtype([("data", "<u8"), ("obj", "<u8"), ("res", "<i8"), ("res2", "<i8")])
_SYSCALLS = {"x86_64": (206, 209, 208, 207), "aarch64": (0, 2, 4, 1)}  # io_setup, io_submit, io_getevents, io_destroy

_STATE: dict[str, Any] = {}
_LOCK = threading.Lock()


def _libc() -> Any:
    """(syscall function, syscall numbers) where native AIO may work, else None (looked up once)."""
    if "libc" not in _STATE:
        found = None
        numbers = _SYSCALLS.get(platform.machine())
        if (sys.platform.startswith("linux") and numbers is not None and sys.byteorder == "little"
                and ctypes.sizeof(ctypes.c_void_p) == 8 and os.environ.get("JRESHARD_AIO", "1") != "0"):
            try:
                fn = ctypes.CDLL(None, use_errno=True).syscall
                fn.restype = ctypes.c_long
                found = (fn, numbers)
            except (OSError, AttributeError):
                found = None
        _STATE["libc"] = found
    return _STATE["libc"]


def _take() -> int | None:
    """A context of this process (from the free list, else a new one); None where io_setup is refused."""
    libc = _libc()
    if libc is None:
        return None
    with _LOCK:
        if _STATE.get("pid") != os.getpid():  # contexts do not outlive a fork: the child makes its own
            _STATE["pid"] = os.getpid()
            _STATE["free"] = []
            _STATE.pop("refused", None)
        if _STATE.get("refused"):
            return None
        if _STATE["free"]:
            return _STATE["free"].pop()
    fn, (setup, _, _, _) = libc
    ctx = ctypes.c_ulong(0)
    if fn(ctypes.c_long(setup), ctypes.c_long(EVENTS), ctypes.byref(ctx)) != 0 or not ctx.value:
        with _LOCK:
            _STATE["refused"] = True  # ENOSYS, EPERM (a sandbox), EAGAIN (the system's aio-max-nr): plain reads
        return None
    return ctx.value


def _give(ctx: int) -> None:
    with _LOCK:
        if _STATE.get("pid") == os.getpid():
            _STATE["free"].append(ctx)


def available() -> bool:
    """Whether :func:`submit` can serve reads in this process (it sets up a context to find out).

    Example:
        >>> isinstance(available(), bool)
        True
    """
    ctx = _take()
    if ctx is None:
        return False
    _give(ctx)
    return True


def rows(n: int) -> np.ndarray:
    """``n`` zeroed iocb rows for :func:`submit` (fill ``fildes``, ``opcode``, ``buf``, ``nbytes``, ``offset``).

    Example:
        >>> r = rows(2); r.itemsize, len(r)
        (64, 2)
    """
    return np.zeros(n, IOCB)


def submit(cbs: np.ndarray) -> np.ndarray | None:
    """Serve the reads ``cbs`` (iocb rows from :func:`rows`; ``data`` is overwritten with the row numbers): the
    result of each row (bytes read, or negative: ``-errno``, or NOT_SERVED when it was not submitted), or None
    (nothing read) where native AIO is not available. Every read submitted has ended when this returns: the
    memory the rows name may be freed then. Each row's memory must be alive and writable until then; the caller
    checked it, as for ``preadv``.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryFile() as f:
        ...     _ = f.write(b"hello world"); f.flush()
        ...     buf = np.zeros(5, np.uint8); cbs = rows(1)
        ...     cbs["fildes"], cbs["opcode"], cbs["buf"], cbs["nbytes"], cbs["offset"] = f.fileno(), PREAD, \
buf.ctypes.data, 5, 6
        ...     res = submit(cbs)
        >>> bytes(buf) if res is not None else b"world"
        b'world'
    """
    libc = _libc()
    if libc is None:
        return None
    ctx = _take()
    if ctx is None:
        return None
    fn, (_, io_submit, io_getevents, io_destroy) = libc
    m = len(cbs)
    cbs["data"] = np.arange(m, dtype=np.uint64)
    res = np.full(m, NOT_SERVED, np.int64)
    ptrs = (cbs.ctypes.data + IOCB.itemsize * np.arange(m, dtype=np.uint64)).astype(np.uint64)
    events = np.zeros(EVENTS, EVENT)
    try:
        i = 0
        while i < m:
            k = min(m, i + EVENTS)
            got = fn(ctypes.c_long(io_submit), ctypes.c_ulong(ctx), ctypes.c_long(k - i),
                     ctypes.c_void_p(ptrs.ctypes.data + 8 * i))
            if got <= 0:
                break  # rows from i on stay NOT_SERVED (all of them where the first call is refused)
            waiting = got
            while waiting:
                e = fn(ctypes.c_long(io_getevents), ctypes.c_ulong(ctx), ctypes.c_long(waiting),
                       ctypes.c_long(waiting), ctypes.c_void_p(events.ctypes.data), None)
                if e < 0 and ctypes.get_errno() == 4:  # EINTR
                    continue
                if e <= 0:
                    # Cannot happen with a valid context; if it does, io_destroy waits for every read still
                    # under way (so none writes after this returns) and the rows not reported stay NOT_SERVED.
                    fn(ctypes.c_long(io_destroy), ctypes.c_ulong(ctx))
                    ctx = 0
                    return res
                ends = events[:e]
                res[ends["data"].astype(np.int64)] = ends["res"]
                waiting -= e
            i += got
    finally:
        if ctx:
            _give(ctx)
    return res
