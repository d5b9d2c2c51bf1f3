"""Partial reads: what one process of a multi-host load reads, jreshard against a raw copy of the same bytes.

A process holding 2 of 8 devices of a (2, 4) ('data', 'model') mesh with ``P('data', 'model')`` needs, of every
matrix, half its rows and a quarter or half of its columns: in each saved ``Shard(0)`` chunk, a part of every
row. This script times, on the DCP checkpoint that ``benchmarks/restore.py`` writes (run that first):

  jreshard  ``Checkpoint.read(name, box)`` for every matrix (the same path ``load`` takes for such pieces);
  raw       the same boxes copied out of ``numpy.memmap`` views of the saved chunks (offsets found with
            jreshard's own header parsing, so only the copy is timed): the floor for reading those bytes.

Both run on a warm page cache, in one process, alternating, ``--repeat`` times (median reported); every
jreshard result is compared with the raw copy. ``read GiB`` is what jreshard read from the files per pass
(its ``io_stats``): local reads take whole rows where the gaps between the needed parts are small.
``--json PATH`` writes the rows and the machine's facts (``benchmarks/readme.py`` makes the README table).

    python benchmarks/partial.py [--workdir /tmp/jreshard-bench | --checkpoint DIR] [--repeat 5] [--json PATH]
"""

from __future__ import annotations

import argparse
import glob
import inspect
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
from _checkpoints import chosen_dcp
from _layoutread import file_locators
from _machine import facts

import jreshard
from jreshard.planning import overlaps

# Checkpoint.read's default coalesce_gap, and one that reads the gaps inside saved rows through.
DEFAULT_GAP = inspect.signature(jreshard.Checkpoint.read).parameters["coalesce_gap"].default
WIDE_GAP = 65536


def boxes(ckpt: jreshard.Checkpoint, col_parts: int) -> dict[str, tuple[slice, slice]]:
    out = {}
    for name, info in ckpt.tensors.items():
        if len(info.shape) == 2:
            rows, cols = info.shape
            out[name] = (slice(0, rows // 2), slice(0, cols // col_parts))
    return out


def raw_copy(ckpt: jreshard.Checkpoint, want: dict[str, tuple[slice, slice]], maps: dict, located: dict
             ) -> dict[str, np.ndarray]:
    out = {}
    for name, (rs, cs) in want.items():
        info = ckpt.tensors[name]
        dest = np.empty((rs.stop - rs.start, cs.stop - cs.start), info.dtype)
        box = ((rs.start, rs.stop), (cs.start, cs.stop))
        for ov in overlaps(info.chunks, box):
            loc = located[(name, ov.chunk_id)]
            chunk = info.chunks[ov.chunk_id]
            src = np.ndarray(chunk.sizes, info.dtype, buffer=maps[loc.key],
                             offset=loc.base + loc.storage_offset * info.dtype.itemsize,
                             strides=tuple(s * info.dtype.itemsize for s in loc.strides))
            (r0, c0), (n0, n1) = ov.chunk_start, ov.size
            (p0, p1) = ov.piece_start
            dest[p0 : p0 + n0, p1 : p1 + n1] = src[r0 : r0 + n0, c0 : c0 + n1]
        out[name] = dest
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/jreshard-bench",
                    help="restore.py's workdir: its newest DCP checkpoint is used (default /tmp/jreshard-bench)")
    ap.add_argument("--checkpoint", help="the DCP checkpoint directory to use (instead of --workdir's newest)")
    ap.add_argument("--repeat", type=int, default=5, help="passes per setting (median reported; default 5)")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = ap.parse_args()
    directory = chosen_dcp(args.checkpoint, args.workdir)
    if directory is None:
        return 2
    machine = facts()
    ckpt = jreshard.open(directory)
    maps = {os.path.basename(f): np.memmap(f, np.uint8, "r") for f in glob.glob(os.path.join(directory, "*.distcp"))}
    for f in maps.values():
        np.add.reduce(f[::4096])  # warm the page cache
    model_bytes = sum(t.nbytes for t in ckpt.tensors.values())
    print(f"checkpoint {directory}: {model_bytes / 2**30:.3f} GiB")
    rows = []
    print(f"{'piece':<22} {'gap':>6} {'GiB':>7} {'read GiB':>9} {'jreshard s':>11} {'raw s':>8} {'x raw':>6}")
    for parts, gap in ((2, DEFAULT_GAP), (2, WIDE_GAP), (4, DEFAULT_GAP), (4, WIDE_GAP)):
        want = boxes(ckpt, parts)
        for name in want:  # locate chunks once (headers), outside the timing
            ckpt.read(name, (slice(0, 1), slice(0, 1)))
        located = file_locators(ckpt, want)
        t_j, t_r = [], []
        for _ in range(args.repeat):
            before = ckpt.io_stats.bytes_read
            t = time.perf_counter()
            got = {name: ckpt.read(name, box, coalesce_gap=gap) for name, box in want.items()}
            t_j.append(time.perf_counter() - t)
            read = ckpt.io_stats.bytes_read - before
            t = time.perf_counter()
            ref = raw_copy(ckpt, want, maps, located)
            t_r.append(time.perf_counter() - t)
            if bad := [n for n in want if not np.array_equal(got[n].view(np.uint8), ref[n].view(np.uint8))]:
                raise SystemExit(f"jreshard's read differs from the raw copy for {len(bad)} tensors, e.g. {bad[0]}")
        nbytes = sum(a.nbytes for a in got.values())
        mj, mr = statistics.median(t_j), statistics.median(t_r)
        print(f"{f'rows/2 x cols/{parts}':<22} {gap:>6} {nbytes / 2**30:>7.3f} {read / 2**30:>9.3f} {mj:>11.3f} {mr:>8.3f} "
              f"{mj / mr:>6.2f}")
        rows.append({"piece": f"rows/2 x cols/{parts}", "coalesce_gap": gap, "bytes": nbytes, "bytes_read": read,
                     "jreshard_s": mj, "raw_s": mr, "jreshard_runs": t_j, "raw_runs": t_r})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"checkpoint": directory, "model_bytes": model_bytes, "repeat": args.repeat,
                       "default_coalesce_gap": DEFAULT_GAP, "machine": machine, "rows": rows}, f, indent=1)
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
