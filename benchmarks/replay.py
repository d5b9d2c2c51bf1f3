"""jreshard's own reads of one restore, replayed with no Python: what the reads alone cost on this machine.

restore.py's "x raw" compares a whole restore with the fastest plain read of the same files. This script splits
that ratio in two. It records every read one ``jreshard.load`` of the benchmark's DCP checkpoint issues (the
file, the offset and the scatter rows of each ``preadv``: the block of host memory and the offset in it that
every run of bytes goes to, bridged gaps to a junk buffer), writes them to a plan file, and has a small C
program (``replay.c``, built here with ``cc``) replay them in fresh processes, alternating round by round with
the raw read of the same files done the same way in C:

  raw-tT     every ``.distcp`` file read front to back by T threads in 16 MiB pieces into one fresh buffer per
             file (``_rawread.py`` in C);
  replay-tT  the recorded reads, in jreshard's submission order, on T threads (jreshard's read thread count by
             default), 1,024 scatter rows a ``preadv``, into fresh blocks of the sizes jreshard allocated.

Both ask for huge pages and touch their memory first inside the timing, as jreshard and numpy do. The replay is
the same kernel work as jreshard's reads (the same bytes to the same layout of pieces, the same calls) with no
planning, no Python and no ``device_put``: its time over raw's is what the target layout costs the kernel, and
jreshard's time over the replay's (restore.py's jreshard row against this one, in separate runs) is what
jreshard adds. ``--settle S`` sleeps S seconds before each run, for virtual machines that take memory freed a
few seconds ago back from the guest (restore.py's runs start after JAX's import, about 3 s).

    python benchmarks/replay.py [--workdir /tmp/jreshard-bench | --checkpoint DIR] [--rounds 15] [--settle 0]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]


@dataclasses.dataclass
class Recording:
    """The reads of one load: ``files`` (absolute paths), ``block_sizes`` (bytes of each host block, in the order
    allocated) and ``reads``: ``(file index, offset, rows)`` with rows an ``(n, 3)`` int64 array of ``(block
    index or -1 for the junk buffer, offset in it, length)``, in the order the reads were issued; ``junk_bytes``
    the junk buffer's size. ``blocks`` are the live blocks after the load (what the reads wrote) and ``out`` what
    the load returned (both let go of by :meth:`release`)."""

    files: list[str]
    block_sizes: list[int]
    reads: list[tuple[int, int, np.ndarray]]
    junk_bytes: int
    blocks: list[np.ndarray]
    out: Any

    def release(self) -> None:
        """Lets go of the load's arrays and blocks (the model's size in memory), keeping the reads."""
        self.blocks, self.out = [], None


@contextlib.contextmanager
def _recording() -> Iterator[tuple[list, list]]:
    """Patches jreshard's host allocation and local reads to note each block and each read; yields the two
    lists ``(blocks, reads)`` (reads as ``(file key, offset, (n, 2) array of (address, length) rows)``)."""
    from jreshard import place, storage

    blocks: list[np.ndarray] = []
    reads: list[tuple[str, int, np.ndarray]] = []
    lock = threading.Lock()
    empty, fill, fill_scatter = place._empty, storage.LocalStore.fill, storage.LocalStore.fill_scatter

    def rec_empty(nbytes: int) -> np.ndarray:
        block = empty(nbytes)
        with lock:
            blocks.append(block)
        return block

    def rec_fill(self, fd, key, offset, view):
        address = np.frombuffer(view, np.uint8).ctypes.data if len(view) else 0
        with lock:
            reads.append((key, offset, np.array([[address, len(view)]], np.uint64)))
        return fill(self, fd, key, offset, view)

    def rec_fill_scatter(self, fd, key, offset, iov):
        rows = iov.copy()  # before the call, which may change iov
        with lock:
            reads.append((key, offset, rows))
        return fill_scatter(self, fd, key, offset, iov)

    place._empty, storage.LocalStore.fill, storage.LocalStore.fill_scatter = rec_empty, rec_fill, rec_fill_scatter
    try:
        yield blocks, reads
    finally:
        place._empty, storage.LocalStore.fill, storage.LocalStore.fill_scatter = empty, fill, fill_scatter


def record(path: str | Path, targets: Any) -> Recording:
    """Runs ``jreshard.load(path, targets)`` and records its reads. A read into memory that is neither one of the
    load's host blocks nor the junk buffer (a staged read, copied out afterwards) cannot be replayed as it was:
    ValueError. (A checkpoint whose chunks are all small archives, read whole, records no reads.)
    """
    import jax

    import jreshard
    from jreshard import read as jread

    junk = jread._junk()
    with _recording() as (blocks, raw_reads):
        out = jax.block_until_ready(jreshard.load(str(path), targets))
    # The junk buffer (index -1) and the blocks, by address: every row's region is looked up at once.
    spans = sorted([(junk.ctypes.data, len(junk), -1)] + [(b.ctypes.data, len(b), k) for k, b in enumerate(blocks)])
    starts, sizes, ids = (np.array(col, np.int64) for col in zip(*spans))

    def where(rows: np.ndarray) -> np.ndarray:
        address, length = rows[:, 0].astype(np.int64), rows[:, 1].astype(np.int64)
        i = np.searchsorted(starts, address, "right") - 1
        inside = (i >= 0) & (address + length <= starts[i] + sizes[i])
        if not inside.all():
            n = int(length[~inside][0])
            raise ValueError(f"a read of {n} bytes into memory outside the load's blocks: not replayable")
        return np.stack([ids[i], address - starts[i], length], axis=1)

    root = Path(path)
    keys = sorted({key for key, _, _ in raw_reads})
    index = {key: k for k, key in enumerate(keys)}
    reads = [(index[key], offset, where(rows)) for key, offset, rows in raw_reads]
    files = [str((root if root.is_dir() else root.parent) / key) for key in keys]
    return Recording(files, [len(b) for b in blocks], reads, len(junk), list(blocks), out)


def write_plan(rec: Recording, dest: Path) -> None:
    """The plan file ``replay.c`` reads (little-endian int64 throughout): file, block and read counts and the junk
    buffer's size; each file's path (its length, then its bytes); each block's size; each read's file index,
    offset and row count, then its rows."""
    with open(dest, "wb") as f:
        f.write(struct.pack("<qqqq", len(rec.files), len(rec.block_sizes), len(rec.reads), rec.junk_bytes))
        for name in rec.files:
            raw = os.fsencode(name)
            f.write(struct.pack("<q", len(raw)) + raw)
        f.write(np.asarray(rec.block_sizes, "<i8").tobytes())
        for file, offset, rows in rec.reads:
            f.write(struct.pack("<qqq", file, offset, len(rows)))
            f.write(np.ascontiguousarray(rows, "<i8").tobytes())


def replay_in_python(rec: Recording) -> list[np.ndarray]:
    """What ``replay.c`` does, in Python and on one thread: every recorded read into fresh zeroed blocks; returns
    the blocks (the reference the tests hold the C program's semantics and the recording to)."""
    blocks = [np.zeros(n, np.uint8) for n in rec.block_sizes]
    junk = np.empty(rec.junk_bytes, np.uint8)
    fds = [os.open(name, os.O_RDONLY) for name in rec.files]
    try:
        for file, offset, rows in rec.reads:
            views = [memoryview(junk if b < 0 else blocks[b])[o : o + n] for b, o, n in rows.tolist()]
            for start in range(0, len(views), 1024):
                part = views[start : start + 1024]
                want = sum(len(v) for v in part)
                if os.preadv(fds[file], part, offset) != want:
                    raise EOFError(f"{rec.files[file]}: short read at {offset}")
                offset += want
    finally:
        for fd in fds:
            os.close(fd)
    return blocks


def build(out_dir: Path) -> Path:
    """``replay.c`` compiled into ``out_dir`` with the system's C compiler (``$CC``, else cc / gcc / clang)."""
    cc = os.environ.get("CC") or next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
    if cc is None:
        raise RuntimeError("replay.py needs a C compiler (cc, gcc or clang, or $CC)")
    exe = out_dir / "replay"
    subprocess.run([cc, "-O2", "-pthread", "-o", str(exe), str(HERE / "replay.c")], check=True)
    return exe


def _run(exe: Path, plan: Path, mode: str, threads: int) -> dict[str, float]:
    line = subprocess.run([str(exe), str(plan), mode, str(threads)], check=True, capture_output=True,
                          text=True).stdout.split()
    # "<mode> <threads> wall W sys S user U minflt F"
    return {"wall": float(line[3]), "sys": float(line[5]), "user": float(line[7]), "minflt": float(line[9])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/jreshard-bench",
                    help="restore.py's workdir: its newest DCP checkpoint is used (default /tmp/jreshard-bench)")
    ap.add_argument("--checkpoint", help="the DCP checkpoint directory to use (instead of --workdir's newest)")
    ap.add_argument("--size-gib", type=float, default=1.5, help="the model size restore.py wrote it with (default 1.5)")
    ap.add_argument("--rounds", type=int, default=15, help="rounds (every row once per round; default 15)")
    ap.add_argument("--raw-threads", default="2,4", help="thread counts of the raw rows (default 2,4)")
    ap.add_argument("--threads", type=int, help="threads of the replay row (default: jreshard's read threads)")
    ap.add_argument("--settle", type=float, default=0.0, help="seconds to sleep before each run (default 0)")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = ap.parse_args(argv)
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from _checkpoints import chosen_dcp
    from _machine import facts
    from _model import build_model, make_targets
    from _pagecache import files_under, warm

    from jreshard.read import read_threads

    directory = chosen_dcp(args.checkpoint, args.workdir)
    if directory is None:
        return 2
    threads = args.threads or read_threads()
    raw_threads = [int(t) for t in args.raw_threads.split(",")]
    rec = record(directory, make_targets(build_model(args.size_gib)))
    rows = sum(len(r) for _, _, r in rec.reads)
    wanted = sum(int(r[r[:, 0] >= 0, 2].sum()) for _, _, r in rec.reads)
    print(f"checkpoint {directory}: {len(rec.reads)} reads, {rows} scatter rows, {wanted / 2**30:.3f} GiB into "
          f"{len(rec.block_sizes)} blocks; replay on {threads} threads")
    rec.release()
    names = [f"raw-t{t}" for t in raw_threads] + [f"replay-t{threads}"]
    runs: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        exe = build(Path(tmp))
        plan = Path(tmp) / "plan.bin"
        write_plan(rec, plan)
        warm(files_under(Path(directory)))
        for _ in range(args.rounds):
            for name in names:
                time.sleep(args.settle)
                mode, t = name.split("-t")
                runs[name].append(_run(exe, plan, mode, int(t)))
    med = {n: statistics.median(r["wall"] for r in runs[n]) for n in names}
    anchor = min((n for n in names if n.startswith("raw")), key=med.__getitem__)
    per_round = {n: statistics.median(a["wall"] / b["wall"] for a, b in zip(runs[n], runs[anchor])) for n in names}
    print(f"median of {args.rounds} rounds, each row a fresh process; warm page cache; settle {args.settle:g} s")
    print(f"{'row':<12} {'median s':>9} {'min-max s':>13} {'sys s':>7} {'x raw':>6} {'per round':>10}")
    for n in names:
        walls = [r["wall"] for r in runs[n]]
        print(f"{n:<12} {med[n]:>9.3f} {min(walls):>6.3f}-{max(walls):<6.3f} "
              f"{statistics.median(r['sys'] for r in runs[n]):>7.3f} {med[n] / med[anchor]:>6.2f} {per_round[n]:>10.2f}")
    print(f"x raw: over {anchor} (the fastest raw row); per round: the median of each round's ratio to it")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": facts(), "checkpoint": directory, "settle": args.settle,
                                               "threads": threads, "anchor": anchor, "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
