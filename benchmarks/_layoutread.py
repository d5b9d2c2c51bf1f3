"""The layout floor: the bytes a restore needs, read straight into the target's device pieces, with nothing else.

The raw anchor (``_rawread.py``) reads every file front to back into one buffer per file. A restore must put
the bytes where the target wants them instead: with the benchmark's (2, 4) mesh every matrix is split over
columns, so each saved row lands in four pieces of 1-3 KiB, in four different device buffers. That costs the
kernel more than a straight copy, whatever does it. This contender measures that cost alone:

- set-up (untimed): the checkpoint's chunk locations (through jreshard's catalogue, since finding the bytes of
  a chunk inside a ``.distcp`` is the one thing it cannot do without a parser), the device pieces of every
  target (``sharding.devices_indices_map``), one buffer of fresh, untouched memory carved into those pieces
  (2 MiB aligned, as jreshard carves its blocks), and for each saved chunk the scatter list of
  ``(address, length)`` rows that puts its bytes in place (a row per saved row and device; bytes no piece
  needs go to a small junk buffer; a piece replicated on several devices is read once per distinct copy);
- timed: ``threads`` threads take the chunks' scatter lists (cut into tasks of about ``TASK`` bytes) in file
  order and hand them to the C library's ``preadv`` (through ctypes, which releases the GIL), 1,024 rows a
  call: no planning, no Python per row, no ``device_put``.

It returns numpy pieces, not ``jax.Array``s. Its time over the raw anchor's is what the layout costs on this
machine; a loader's time over it is what the loader adds.
"""

from __future__ import annotations

import ctypes
import math
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

TASK = 8 << 20  # bytes of scatter rows per task
IOV_MAX = 1024
HUGE = 2 << 20
JUNK = 1 << 20


def _preadv() -> Any:
    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "preadv64", None) or libc.preadv
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64]
    fn.restype = ctypes.c_ssize_t
    return fn


def _boxes(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    return tuple(s.indices(n)[:2] for s, n in zip(index, shape))


def file_locators(ckpt: Any, names: Any) -> dict:
    """Where every chunk of the tensors ``names`` lies in its file, keyed by (name, chunk id): located through
    jreshard's catalogue (sub-ranges of small archives too), outside any timing. A chunk whose bytes are held
    in memory (a compressed item) has no place in a file to map or read: ValueError."""
    located = ckpt._locate([(ckpt.tensor(n), c) for n in names for c in range(len(ckpt.tensor(n).chunks))],
                           precise=True)
    held = sorted(key for key, loc in located.items() if loc.data is not None)
    if held:
        raise ValueError(f"chunk {held[0]} is held in memory, not in a file")
    return located


class LayoutRead:
    """The scatter lists of one restore (``path`` onto ``targets``), ready to run (:meth:`__call__`)."""

    def __init__(self, path: str | Path, targets: dict[str, Any], threads: int) -> None:
        import jreshard

        self.threads = threads
        self.path = Path(path)
        self.root = self.path if self.path.is_dir() else self.path.parent  # a single-file checkpoint's keys
        self.pieces: dict[str, list[tuple[Any, tuple[slice, ...], int, tuple[int, ...]]]] = {}
        self.dtypes: dict[str, np.dtype] = {}
        specs = []  # (name, info, {box: [(device, index)]})
        total = 0
        with jreshard.open(str(path)) as ckpt:
            located = file_locators(ckpt, targets)
            for name, target in targets.items():
                info = ckpt.tensor(name)
                if len(info.shape) > 2:
                    raise ValueError(f"{name}: the layout floor handles 1-D and 2-D tensors only")
                boxes: dict[tuple, list] = {}
                for device, index in target.sharding.devices_indices_map(info.shape).items():
                    boxes.setdefault(_boxes(index, info.shape), []).append((device, index))
                specs.append((name, info, boxes))
                for box, devs in boxes.items():
                    total += len(devs) * (math.prod(b - a for a, b in box) * info.dtype.itemsize + 64)
            self.buffer = np.empty(total + HUGE, np.uint8)  # fresh: first touch happens in the timed reads
            self.junk = np.empty(JUNK, np.uint8)
            pos = (-self.buffer.ctypes.data) % HUGE
            tasks: list[tuple[str, int, np.ndarray]] = []
            for name, info, boxes in specs:
                item = info.dtype.itemsize
                out = []
                copies = []  # per distinct box, the list of (address of each replica piece)
                for box, devs in boxes.items():
                    b2 = box if len(box) == 2 else ((0, 1), *box)
                    addrs = []
                    for device, index in devs:
                        size = math.prod(b - a for a, b in b2) * item
                        out.append((device, index, pos, tuple(b - a for a, b in box)))
                        addrs.append(self.buffer.ctypes.data + pos)
                        pos += (size + 63) // 64 * 64
                    copies.append((b2, addrs))
                self.pieces[name] = out
                self.dtypes[name] = info.dtype
                for cid, chunk in enumerate(info.chunks):
                    loc = located[(name, cid)]
                    sizes = tuple(chunk.sizes)
                    if not loc.is_c_contiguous(sizes):
                        raise ValueError(f"{name}: chunk {cid} is not a plain contiguous range of a file")
                    c_off = chunk.offsets if len(sizes) == 2 else (0, *chunk.offsets)
                    c_sz = sizes if len(sizes) == 2 else (1, *sizes)
                    start = loc.base + loc.storage_offset * item
                    for layer in range(max(len(a) for _, a in copies)):
                        tasks += self._chunk_tasks(loc.key, start, c_off, c_sz, item,
                                                   [(b2, a[layer]) for b2, a in copies if layer < len(a)])
        self.tasks = tasks
        self.files = sorted({t[0] for t in tasks})

    def _chunk_tasks(self, key: str, start: int, c_off, c_sz, item: int, boxes) -> list:
        """The tasks that read one saved chunk (rows ``c_off[0]..``, all of its columns) into one copy of every
        box that overlaps it."""
        offs, addrs, lens = [], [], []
        for (r, c), addr in boxes:
            r0, r1 = max(r[0], c_off[0]), min(r[1], c_off[0] + c_sz[0])
            k0, k1 = max(c[0], c_off[1]), min(c[1], c_off[1] + c_sz[1])
            if r0 >= r1 or k0 >= k1:
                continue
            rows = np.arange(r0, r1, dtype=np.int64)
            offs.append(((rows - c_off[0]) * c_sz[1] + (k0 - c_off[1])) * item)
            addrs.append(addr + ((rows - r[0]) * (c[1] - c[0]) + (k0 - c[0])) * item)
            lens.append(np.full(len(rows), (k1 - k0) * item, np.int64))
        if not offs:
            return []
        off, addr, ln = (np.concatenate(x) for x in (offs, addrs, lens))
        order = np.argsort(off, kind="stable")
        off, addr, ln = off[order], addr[order], ln[order]
        # Bytes between two pieces (or before the first) that no piece needs go to the junk buffer.
        ends = np.concatenate([[0], off[:-1] + ln[:-1]])
        gap = off - ends
        if (gap < 0).any():
            raise ValueError("overlapping pieces in one layer")
        rows_a, rows_l = [], []
        junk = self.junk.ctypes.data
        for g, a, n in zip(gap.tolist(), addr.tolist(), ln.tolist()):
            while g:
                step = min(g, JUNK)
                rows_a.append(junk)
                rows_l.append(step)
                g -= step
            rows_a.append(a)
            rows_l.append(n)
        iov = np.stack([np.array(rows_a, np.uint64), np.array(rows_l, np.uint64)], axis=1)
        # Cut into tasks of about TASK bytes, each starting where the previous one ended in the file.
        csum = np.cumsum(iov[:, 1].astype(np.int64))
        tasks, i, done = [], 0, 0
        while i < len(iov):
            k = int(np.searchsorted(csum, done + TASK, "left")) + 1
            k = min(max(k, i + 1), len(iov))
            tasks.append((key, start + done, np.ascontiguousarray(iov[i:k])))
            done = int(csum[k - 1])
            i = k
        return tasks

    def __call__(self) -> dict[str, list[tuple[Any, tuple[slice, ...], np.ndarray]]]:
        """Run every read; returns each target's ``(device, index, piece)`` triples."""
        call = _preadv()
        fds = {k: os.open(self.root / k, os.O_RDONLY) for k in self.files}
        it = iter(self.tasks)
        lock = threading.Lock()
        errors: list[BaseException] = []

        def work() -> None:
            try:
                while not errors:
                    with lock:
                        task = next(it, None)
                    if task is None:
                        return
                    key, offset, iov = task
                    for s in range(0, len(iov), IOV_MAX):
                        part = iov[s : s + IOV_MAX]
                        want = int(part[:, 1].sum())
                        got = call(fds[key], part.ctypes.data, len(part), offset)
                        if got != want:  # a short read (never for a whole file in the page cache) or an error
                            raise OSError(f"{key}: preadv at {offset} returned {got}, wanted {want}")
                        offset += want
            except BaseException as e:  # noqa: BLE001 -- re-raised in the caller
                errors.append(e)

        try:
            pool = [threading.Thread(target=work, name=f"layout-{k}") for k in range(self.threads)]
            for t in pool:
                t.start()
            for t in pool:
                t.join()
        finally:
            for fd in fds.values():
                os.close(fd)
        if errors:
            raise errors[0]
        return self.arrays()

    def arrays(self) -> dict[str, list[tuple[Any, tuple[slice, ...], np.ndarray]]]:
        """Each target's ``(device, index, piece)`` triples: views of the buffer."""
        out = {}
        for name, pieces in self.pieces.items():
            dtype = self.dtypes[name]
            out[name] = [(device, index, self.buffer[pos : pos + math.prod(shape) * dtype.itemsize].view(dtype)
                          .reshape(shape)) for device, index, pos, shape in pieces]
        return out
