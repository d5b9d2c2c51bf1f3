"""The raw-read anchor: the plainest fast read of a checkpoint's bytes, with no parsing and no ``device_put``.

``read_files(files, threads, block)`` allocates one buffer per file (``numpy.empty``: fresh anonymous memory,
not pre-faulted, exactly what a loader gets when it allocates its shards, so the page faults of first touch
are paid inside the read as they are inside every loader), cuts the files into ``block``-byte pieces and has
``threads`` threads take the pieces in file order and ``os.preadv`` each straight into its place in the
buffer. ``os.preadv`` releases the GIL, so the threads read in parallel; one thread is the single-stream
``readinto`` loop. The benchmark runs it for several thread counts, each in a fresh process, and takes the
fastest as the anchor that other contenders are compared with.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np

DEFAULT_BLOCK = 16 << 20


def blocks(sizes: list[int], block: int) -> list[tuple[int, int, int]]:
    """``(file index, offset, length)`` pieces of at most ``block`` bytes covering every file, in file order."""
    if block <= 0:
        raise ValueError(f"block must be positive, got {block}")
    return [(i, off, min(block, size - off)) for i, size in enumerate(sizes) for off in range(0, size, block)]


def read_files(files: list[Path], threads: int, block: int = DEFAULT_BLOCK) -> list[np.ndarray]:
    """Every file's bytes in a freshly allocated uint8 buffer, read by ``threads`` threads in ``block``-byte
    pieces. Raises EOFError when a file is shorter than its size was at the start."""
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    sizes = [f.stat().st_size for f in files]
    buffers = [np.empty(size, np.uint8) for size in sizes]
    views = [memoryview(b) for b in buffers]
    fds = [os.open(f, os.O_RDONLY) for f in files]
    pieces = iter(blocks(sizes, block))
    lock = threading.Lock()
    errors: list[BaseException] = []

    def work() -> None:
        try:
            while True:
                with lock:
                    piece = next(pieces, None)
                if piece is None or errors:
                    return
                i, off, length = piece
                done = 0
                while done < length:
                    n = os.preadv(fds[i], [views[i][off + done : off + length]], off + done)
                    if n == 0:
                        raise EOFError(f"{files[i]}: no bytes at offset {off + done} of {sizes[i]}")
                    done += n
        except BaseException as e:  # noqa: BLE001 -- re-raised in the caller
            errors.append(e)

    try:
        if threads == 1:
            work()
        else:
            pool = [threading.Thread(target=work, name=f"raw-{k}") for k in range(threads)]
            for t in pool:
                t.start()
            for t in pool:
                t.join()
    finally:
        for fd in fds:
            os.close(fd)
    if errors:
        raise errors[0]
    return buffers
