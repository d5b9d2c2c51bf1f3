"""Peak anonymous-memory measurement for the current process (Linux ``/proc``).

``PeakAnonMemory`` is a context manager: on entry it records the process's
``RssAnon`` (the baseline) and starts a daemon thread that re-reads
``/proc/self/status`` every ``interval`` seconds; on exit it stops the thread and
takes a final sample. ``RssAnon`` counts heap / anonymous-mmap pages only, so
file pages from the page cache or from ``mmap``-ed checkpoint files are not
charged to the loader.

A sampling thread needs the GIL, so a C call that holds the GIL for a long time
can hide a short spike from it. As an independent cross-check, the kernel's
high-water mark of the *total* RSS (``VmHWM``, reset on entry through
``/proc/self/clear_refs``) is reported too; it also counts file-backed pages.

``prefault`` exists because of virtual machines with free page reporting
(``virtio_balloon``): memory the guest has left free for a few seconds is handed
back to the host, and the next first touch of it costs several times more (on the
development VM, faulting 1.5 GiB took ~2.7 s instead of ~0.3 s). Touching and
freeing enough memory just before a timed section gives every contender the same
warm start; the benchmarks do it only when asked (``--prefault-gib``), and label
such figures, since a user's process pays that first touch.
"""

from __future__ import annotations

import os
import threading
from typing import Self

_STATUS = "/proc/self/status"


def _status_fields(fd: int, *names: bytes) -> dict[bytes, int]:
    """Reads ``name:  <n> kB`` fields of ``/proc/self/status``, in bytes."""
    data = os.pread(fd, 16384, 0)
    out = {}
    for name in names:
        start = data.index(name + b":") + len(name) + 1
        end = data.index(b"\n", start)
        out[name] = int(data[start:end].split()[0]) * 1024
    return out


def rss_anon_bytes() -> int:
    """The current ``RssAnon`` of this process, in bytes."""
    fd = os.open(_STATUS, os.O_RDONLY)
    try:
        return _status_fields(fd, b"RssAnon")[b"RssAnon"]
    finally:
        os.close(fd)


def _meminfo_bytes(name: str) -> int:
    with open("/proc/meminfo", "rb") as f:
        for line in f:
            if line.startswith(name.encode() + b":"):
                return int(line.split()[1]) * 1024
    raise KeyError(name)


def prefault(nbytes: int, keep_free: int = 1 << 30) -> int:
    """Faults in and frees up to ``nbytes`` of anonymous memory; returns the amount.

    The amount is capped at ``MemFree - keep_free`` so that the page cache is never
    evicted to make room.
    """
    import numpy as np

    n = max(0, min(nbytes, _meminfo_bytes("MemFree") - keep_free))
    if n:
        buf = np.empty(n, np.uint8)
        buf[::4096] = 1  # one write per page is enough to fault it in
        del buf
    return n


def _reset_hwm() -> bool:
    """Resets ``VmHWM`` to the current RSS (Linux >= 4.0); False if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakAnonMemory:
    """Samples ``RssAnon`` in a background thread while the ``with`` block runs.

    After the block: ``baseline`` (bytes at entry), ``peak`` (max sample, at least
    the baseline), ``delta`` (``peak - baseline``), ``samples`` (count), and
    ``hwm_delta`` (``VmHWM`` at exit minus ``VmRSS`` at entry, or None when the
    high-water mark could not be reset).
    """

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.baseline = self.peak = self.samples = 0
        self.hwm_delta: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._fd = -1

    def _sample(self) -> None:
        value = _status_fields(self._fd, b"RssAnon")[b"RssAnon"]
        self.samples += 1
        self.peak = max(self.peak, value)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> Self:
        self._fd = os.open(_STATUS, os.O_RDONLY)
        self._hwm_ok = _reset_hwm()
        fields = _status_fields(self._fd, b"RssAnon", b"VmRSS")
        self._rss_start = fields[b"VmRSS"]
        self.baseline = self.peak = fields[b"RssAnon"]
        self._thread = threading.Thread(target=self._run, name="memwatch", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        self._sample()
        if self._hwm_ok:
            hwm = _status_fields(self._fd, b"VmHWM")[b"VmHWM"]
            self.hwm_delta = hwm - self._rss_start
        os.close(self._fd)

    @property
    def delta(self) -> int:
        return self.peak - self.baseline
