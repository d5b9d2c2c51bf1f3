"""Pod scale: opening and planning a Llama-70B-like FSDP2 DCP checkpoint saved on R = 64 ... 2,048 ranks.

The checkpoints are synthetic but shaped exactly like the real thing, and their ``.metadata`` is made with
torch's own classes and pickled as ``FileSystemWriter.finish`` pickles it:

* 723 tensors of Llama-70B (80 layers, d 8192, ffn 28672, vocab 128256, 8 kv heads of 128: q/k/v/o,
  gate/up/down and 2 norms per layer, the embedding, the final norm and the LM head), all bf16;
* FSDP2: every tensor ``Shard(0)`` over R ranks, chunked as DTensor does (``torch.chunk``: ceil(n / R) rows per
  rank, a smaller last chunk, then empty chunks where n < R or the ceil runs out). The empty chunks of a tensor
  all sit at offset n, so ``dedup_save_plans`` keeps one of them: one empty chunk per such tensor in the
  metadata, written (a ~1 KiB archive of an empty tensor) by the rank after the first empty one;
* one ``__{rank}_0.distcp`` per rank, each item a complete ``torch.save`` archive at its offset, items in the
  writer's order (largest first). The archives' headers and trailers are real bytes; their payloads are holes
  of a sparse file (zeros, which is what the archives' CRCs say), so 140 GB of tensors take a few GB of disk.
  The tensors of ``REAL`` (layer 0's q/k/v projections and norms, the final norm) have real payloads whose
  values come from :func:`expected`, so a load of them is checked exactly.

Each measurement runs in a fresh subprocess (no cache, nothing imported before) with a timeout; peaks are the
child's ``ru_maxrss``, and "+" the growth over its ``ru_maxrss`` after its imports:

  torch    ``FileSystemReader(path).read_metadata()``: what every torch restore starts with;
  open     ``jreshard.open(path)`` and ``len(ckpt.tensors)``;
  plan     ``jreshard.plan(ckpt, target)`` for one process with 8 CPU devices on a (2, 4) ('data', 'model') mesh:
           matrices ``P('data', 'model')``, vectors ``P('model')`` (timed after its own open);
  load     layer 0's real tensors loaded onto that mesh (after an open) and compared with :func:`expected`;
  host     one host's plan in a 256-process job, from a laptop: ``jreshard.plan(ckpt, target, process_index=137,
           devices_per_process=8)`` over ``AbstractMesh((64, 32), ('data', 'model'))`` (2,048 devices; matrices
           ``P('data', 'model')``, vectors ``P('model')``), timed after its own open;
  mesh     the whole-mesh report of that job (``process_index="all"``: 256 processes planned one by one).

Checkpoints are built once under ``--workdir`` (default /tmp/jreshard-scale, ``r{R}/``) and reused. R = 2,048
runs only if the R = 1,024 open and plan peaks stayed under ``--max-peak-gib`` (default 6).

    python benchmarks/scale.py [--ranks 64,128,256,512,1024,2048] [--timeout 300] [--json out.json]
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import resource
import select
import shutil
import struct
import subprocess
import sys
import time
import zipfile
import zlib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
GIB = 1 << 30
RANKS = (64, 128, 256, 512, 1024, 2048)
LAYERS, D, FFN, VOCAB, KV = 80, 8192, 28672, 128256, 8 * 128
REAL = ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
        "model.layers.0.self_attn.v_proj.weight", "model.layers.0.input_layernorm.weight",
        "model.layers.0.post_attention_layernorm.weight", "model.norm.weight")
MODES = ("torch", "open", "plan", "load", "host", "mesh")
POD = ((64, 32), ("data", "model"), 8, 137)  # the pod mesh of the host/mesh modes: 2,048 devices, 8 per process


def llama70b() -> list[tuple[str, tuple[int, ...]]]:
    """The 723 (name, shape) of Llama-70B's state dict, in its order (Hugging Face names)."""
    out = [("model.embed_tokens.weight", (VOCAB, D))]
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        out += [(p + "self_attn.q_proj.weight", (D, D)), (p + "self_attn.k_proj.weight", (KV, D)),
                (p + "self_attn.v_proj.weight", (KV, D)), (p + "self_attn.o_proj.weight", (D, D)),
                (p + "mlp.gate_proj.weight", (FFN, D)), (p + "mlp.up_proj.weight", (FFN, D)),
                (p + "mlp.down_proj.weight", (D, FFN)), (p + "input_layernorm.weight", (D,)),
                (p + "post_attention_layernorm.weight", (D,))]
    return out + [("model.norm.weight", (D,)), ("lm_head.weight", (VOCAB, D))]


def shard0(n: int, ranks: int, rank: int) -> tuple[int, int]:
    """(offset, rows) of ``rank``'s ``Shard(0)`` chunk of ``n`` rows, as DTensor computes it
    (``Shard.local_shard_size_and_offset``): ceil(n / ranks) rows each; an empty chunk sits at offset n."""
    full = -(-n // ranks)
    start = full * rank
    if start >= n:
        return n, 0
    return start, min(n, start + full) - start


def expected(name: str, shape: tuple[int, ...], rows: slice = slice(None), cols: slice = slice(None)):
    """The values of a REAL tensor (rows/cols of it), exact in bf16: small integers over 32."""
    import ml_dtypes
    import numpy as np

    salt = zlib.crc32(name.encode()) % 251
    r = np.arange(shape[0], dtype=np.int64)[rows]
    if len(shape) == 1:
        v = (r * 7 + salt) % 255 - 127
    else:
        c = np.arange(shape[1], dtype=np.int64)[cols]
        v = (r[:, None] * 131 + c[None, :] * 7 + salt) % 255 - 127
    return (v.astype(np.float32) / 32).astype(ml_dtypes.bfloat16)


# ---------------------------------------------------------------------------------------------- building


def _template(shape: tuple[int, ...], cache: dict) -> tuple[bytes, bytes, int]:
    """(bytes before the payload, bytes after it, payload length) of torch.save of a zero bf16 tensor."""
    got = cache.get(shape)
    if got is None:
        import torch

        buf = io.BytesIO()
        torch.save(torch.zeros(shape, dtype=torch.bfloat16), buf)
        raw = buf.getvalue()
        with zipfile.ZipFile(io.BytesIO(raw)) as z:
            info = next(i for i in z.infolist() if i.filename.endswith("/data/0"))
        n, e = struct.unpack_from("<HH", raw, info.header_offset + 26)
        start = info.header_offset + 30 + n + e
        nbytes = math.prod(shape) * 2
        got = cache[shape] = (raw[:start], raw[start + nbytes:], nbytes)
    return got


def build(ranks: int, path: Path) -> dict:
    """Writes the R-rank checkpoint at ``path`` (through ``path.tmp``); returns its facts."""
    import numpy as np
    import torch
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        StorageMeta,
        TensorProperties,
        TensorStorageMetadata,
    )

    start = time.perf_counter()
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = llama70b()
    # Per rank, the items its plan writes: (nbytes, tensor index, offset0, rows). Per tensor, chunk order.
    per_rank: list[list[tuple[int, int, int, int]]] = [[] for _ in range(ranks)]
    order: list[list[tuple[int, int, int]]] = []  # per tensor: (rank, offset0, rows) in metadata order
    for t, (_, shape) in enumerate(tensors):
        row = math.prod(shape[1:])
        chunks, empty_at = [], None
        for r in range(ranks):
            off, rows = shard0(shape[0], ranks, r)
            if rows:
                chunks.append((r, off, rows))
            elif empty_at is None:
                empty_at = r  # the first empty rank; dedup gives the item to a lighter plan after it
        if empty_at is not None:
            writer = min(empty_at + 1, ranks - 1)
            chunks.append((writer, shape[0], 0))
            chunks.sort(key=lambda c: c[0])
        order.append(chunks)
        for r, off, rows in chunks:
            per_rank[r].append((rows * row * 2, t, off, rows))
    cache: dict = {}
    where: dict[tuple[int, int], tuple[str, int, int]] = {}
    storage_order: list[tuple[int, int]] = []
    real = set(REAL)
    for r, items in enumerate(per_rank):
        items.sort(key=lambda it: it[0], reverse=True)  # _split_by_size_and_type: largest first, stable
        fname = f"__{r}_0.distcp"
        fd = os.open(tmp / fname, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            pos = 0
            for _, t, off, rows in items:
                name, shape = tensors[t]
                cshape = (rows, *shape[1:])
                if name in real and rows:
                    vals = expected(name, shape, slice(off, off + rows))
                    buf = io.BytesIO()
                    torch.save(torch.from_numpy(vals.view(np.int16)).view(torch.bfloat16), buf)
                    os.pwrite(fd, buf.getbuffer(), pos)
                    length = buf.getbuffer().nbytes
                else:
                    head, tail, nbytes = _template(cshape, cache)
                    os.pwrite(fd, head, pos)
                    os.pwrite(fd, tail, pos + len(head) + nbytes)
                    length = len(head) + nbytes + len(tail)
                where[(t, off)] = (fname, pos, length)
                storage_order.append((t, off))
                pos += length
            os.ftruncate(fd, pos)
        finally:
            os.close(fd)
    sdm: dict[str, Any] = {}
    index: dict[tuple[int, int], int] = {}
    for t, (name, shape) in enumerate(tensors):
        chunk_list = []
        for i, (_, off, rows) in enumerate(order[t]):
            chunk_list.append(ChunkStorageMetadata(offsets=torch.Size((off,) + (0,) * (len(shape) - 1)),
                                                   sizes=torch.Size((rows, *shape[1:]))))
            index[(t, off)] = i
        sdm[name] = TensorStorageMetadata(properties=TensorProperties(dtype=torch.bfloat16), size=torch.Size(shape),
                                          chunks=chunk_list)
    storage = {}
    for t, off in storage_order:
        name, shape = tensors[t]
        storage[MetadataIndex(name, torch.Size((off,) + (0,) * (len(shape) - 1)), index[(t, off)])] = \
            _StorageInfo(*where[(t, off)])
    md = Metadata(sdm, planner_data={name: (name,) for name, _ in tensors}, storage_data=storage,
                  storage_meta=StorageMeta(checkpoint_id=path, save_id="scale-benchmark"), version="1.0.0")
    import pickle

    with open(tmp / ".metadata", "wb") as f:
        pickle.dump(md, f)  # as FileSystemWriter.finish does
    facts = {"ranks": ranks, "tensors": len(tensors), "chunks": sum(len(c) for c in order),
             "empty_chunks": sum(1 for c in order for _, _, rows in c if rows == 0),
             "metadata_bytes": (tmp / ".metadata").stat().st_size,
             "apparent_gib": sum(f.stat().st_size for f in tmp.iterdir()) / GIB,
             "disk_gib": sum(f.stat().st_blocks * 512 for f in tmp.iterdir()) / GIB,
             "build_s": time.perf_counter() - start}
    (tmp / "scale.json").write_text(json.dumps(facts))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return facts


# ---------------------------------------------------------------------------------------------- children


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _pod_target(ckpt: Any) -> dict:
    import jax
    from jax.sharding import AbstractMesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = AbstractMesh(*POD[:2])
    return {name: jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=NamedSharding(mesh, P("data", "model") if t.ndim == 2
                                                                                 else P("model")))
            for name, t in ckpt.tensors.items()}


def _target(ckpt: Any, names: Any = None) -> dict:
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    out = {}
    for name, t in ckpt.tensors.items():
        if names is not None and name not in names:
            continue
        spec = P("data", "model") if t.ndim == 2 else P("model")
        out[name] = jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=NamedSharding(mesh, spec))
    return out


def child(mode: str, path: str) -> dict:
    """One measurement, in this (fresh) process."""
    if mode == "torch":
        from torch.distributed.checkpoint import FileSystemReader

        base = _peak()
        t0 = time.perf_counter()
        md = FileSystemReader(path).read_metadata()
        seconds = time.perf_counter() - t0
        return {"s": seconds, "peak": _peak(), "base": base, "tensors": len(md.state_dict_metadata),
                "storage_items": len(md.storage_data)}
    if mode == "build":
        return build(int(Path(path).name[1:]), Path(path))
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    import jreshard

    if mode in ("plan", "load", "host", "mesh"):
        jax.devices()
    base = _peak()
    t0 = time.perf_counter()
    ckpt = jreshard.open(path)
    tensors = ckpt.tensors
    n = len(tensors)
    open_s = time.perf_counter() - t0
    out: dict[str, Any] = {"open_s": open_s, "tensors": n, "base": base}
    if mode == "open":
        out["kept_chunks"] = sum(len(t.chunks) for t in tensors.values())
        out.update(s=open_s, peak=_peak())
        return out
    if mode == "plan":
        target = _target(ckpt)
        t0 = time.perf_counter()
        p = jreshard.plan(ckpt, target)
        out.update(s=time.perf_counter() - t0, peak=_peak(), num_reads=p.num_reads, bytes_needed=p.bytes_needed,
                   bytes_to_read=p.bytes_to_read, processes=len(p.processes))
        return out
    if mode in ("host", "mesh"):
        target = _pod_target(ckpt)
        t0 = time.perf_counter()
        p = jreshard.plan(ckpt, target, process_index=POD[3] if mode == "host" else "all", devices_per_process=POD[2])
        out.update(s=time.perf_counter() - t0, peak=_peak(), num_reads=p.num_reads, bytes_needed=p.bytes_needed,
                   bytes_to_read=p.bytes_to_read, processes=len(p.processes))
        total = p.total()
        out.update(total_reads=total.num_reads, total_bytes_needed=total.bytes_needed,
                   total_bytes_to_read=total.bytes_to_read)
        return out
    import numpy as np

    target = _target(ckpt, set(REAL))
    t0 = time.perf_counter()
    arrays = jreshard.load(ckpt, target)
    jax.block_until_ready(arrays)
    out.update(s=time.perf_counter() - t0, peak=_peak(), loaded_bytes=sum(a.nbytes for a in arrays.values()))
    bad = []
    for name, a in arrays.items():
        for shard in a.addressable_shards:
            want = expected(name, a.shape, *shard.index)
            if not np.array_equal(np.asarray(shard.data).view(np.int16), want.view(np.int16)):
                bad.append(name)
                break
    out["exact"] = not bad and len(arrays) == len(REAL)
    out["mismatch"] = bad
    return out


def hold_headers(path: str) -> None:
    """Reads every archive's header and trailer windows (what a plan reads: the first ``HEAD`` and last
    ``WINDOW_TAIL`` bytes, or the whole archive when the plan reads it whole) and the ``.metadata`` into the
    page cache (:class:`_pagecache.Held`); prints a RESULT line, then touches them every 5 s until its standard
    input closes."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _pagecache import Held
    from torch.distributed.checkpoint import FileSystemReader

    from jreshard.formats.torchsave import HEAD, SMALL_BLOB, WINDOW_TAIL

    t0 = time.perf_counter()
    root = Path(path)
    spans: dict[Path, list[tuple[int, int]]] = {root / ".metadata": [(0, (root / ".metadata").stat().st_size)]}
    for info in FileSystemReader(path).read_metadata().storage_data.values():
        ranges = spans.setdefault(root / info.relative_path, [])
        start, stop = info.offset, info.offset + info.length
        if info.length <= max(SMALL_BLOB, HEAD + WINDOW_TAIL):
            ranges.append((start, stop))
        else:
            ranges += [(start, start + HEAD), (stop - WINDOW_TAIL, stop)]
    held = Held(spans)
    print("RESULT " + json.dumps({"held_bytes": held.bytes, "s": time.perf_counter() - t0}), flush=True)
    while not select.select([sys.stdin], [], [], 5.0)[0]:
        held.touch()
    held.close()


def _child_cmd(mode: str, path: Path) -> tuple[list[str], dict]:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    return [sys.executable, str(Path(__file__).resolve()), "--child", mode, str(path)], env


def start_hold(path: Path) -> tuple[subprocess.Popen, dict]:
    """A process holding ``path``'s headers in the page cache (:func:`hold_headers`), and what it reported."""
    cmd, env = _child_cmd("hold", path)
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("RESULT "):
            return proc, json.loads(line[len("RESULT "):])
    proc.wait()
    raise SystemExit(f"holding the headers of {path} failed (exit {proc.returncode})")


def run_child(mode: str, path: Path, timeout: float) -> dict:
    cmd, env = _child_cmd(mode, path)
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"skipped": f"> {timeout:g} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
        return {"skipped": f"failed: {tail[0][:200]}"}
    return json.loads(lines[-1][len("RESULT "):])


# ---------------------------------------------------------------------------------------------- report


def _fmt_s(m: dict) -> str:
    return m["skipped"] if "skipped" in m else f"{m['s']:.2f}"


def _fmt_peak(m: dict) -> str:
    if "skipped" in m:
        return "-"
    return f"{m['peak'] / GIB:.2f} (+{(m['peak'] - m['base']) / GIB:.2f})"


def _ratio(a: dict, b: dict, key: str = "s") -> str:
    if "skipped" in a or "skipped" in b or not b.get(key):
        return "-"
    return f"{a[key] / b[key]:.2f}"


def table(rows: list[dict]) -> str:
    head = ("| R | chunks | .metadata MiB | torch `read_metadata` s | peak GiB | jreshard `open` s | peak GiB "
            "| x torch s | x torch peak | `plan` (8 devices) s | peak GiB | plan / open | load layer 0 |\n"
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    out = [head]
    for row in rows:
        t, o, p, ld = row["torch"], row["open"], row["plan"], row["load"]
        peak_ratio = "-" if "skipped" in t or "skipped" in o else f"{o['peak'] / t['peak']:.2f}"
        check = ld.get("skipped") or ("exact" if ld.get("exact") else f"MISMATCH {ld.get('mismatch')}")
        plan_open = "-" if "skipped" in p else f"{p['s'] / p['open_s']:.2f}"
        out.append(f"| {row['ranks']:,} | {row['chunks']:,} | {row['metadata_bytes'] / 2**20:.1f} | {_fmt_s(t)} | "
                   f"{_fmt_peak(t)} | {_fmt_s(o)} | {_fmt_peak(o)} | {_ratio(o, t)} | {peak_ratio} | {_fmt_s(p)} | "
                   f"{_fmt_peak(p)} | {plan_open} | {check} |")
    out.append("\n| R | one host's plan (process 137 of 256) s | peak GiB | host / open | whole-mesh report (256 "
               "processes) s | peak GiB | reads, all processes | read / needed, all processes |\n"
               "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        h, m = row.get("host", {"skipped": "not run"}), row.get("mesh", {"skipped": "not run"})
        host_open = "-" if "skipped" in h else f"{h['s'] / h['open_s']:.2f}"
        total = "total_reads" in m
        reads = f"{m['total_reads']:,}" if total else "-"
        amp = f"{m['total_bytes_to_read'] / m['total_bytes_needed']:.3f}" if total and m["total_bytes_needed"] else "-"
        out.append(f"| {row['ranks']:,} | {_fmt_s(h)} | {_fmt_peak(h)} | {host_open} | {_fmt_s(m)} | {_fmt_peak(m)} "
                   f"| {reads} | {amp} |")
    by = {row["ranks"]: row for row in rows}
    lo, hi = by.get(512), by.get(max(by)) if by else None
    if lo and hi and hi is not lo:
        parts = [f"{name} {_ratio(hi[name], lo[name])}" for name in ("torch", "open", "plan")]
        out.append(f"\nTime at {hi['ranks']:,} ranks over 512: " + ", ".join(parts) + ".")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", default=",".join(map(str, RANKS)), help="comma-separated R (default %(default)s)")
    p.add_argument("--workdir", default="/tmp/jreshard-scale", help="checkpoints, reused (default %(default)s)")
    p.add_argument("--timeout", type=float, default=300, help="seconds per measurement (default %(default)s)")
    p.add_argument("--max-peak-gib", type=float, default=6.0,
                   help="run R=2048 only if R=1024's open and plan peaks stayed under this (default %(default)s)")
    p.add_argument("--only", action="append", choices=MODES, help="measure only this (repeatable)")
    p.add_argument("--mesh-ranks", default="64,512", help="R at which the whole-mesh report runs (default %(default)s)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--warm", action="store_true",
                   help="before measuring a checkpoint, plan it once untimed (its archive headers then sit in the "
                        "page cache, as after any earlier use: 1.3M small reads of a cold disk take many minutes)")
    p.add_argument("--hold", action="store_true",
                   help="while measuring a checkpoint, hold its .metadata and archive headers in the page cache "
                        "(a helper process reads them once, then touches every page of them every 5 s through a "
                        "mapping), for machines that reclaim page-cache pages not used for a while")
    p.add_argument("--child", nargs=2, metavar=("MODE", "PATH"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        if args.child[0] == "hold":
            hold_headers(args.child[1])
            return 0
        print("RESULT " + json.dumps(child(*args.child)), flush=True)
        return 0
    ranks = sorted(int(r) for r in args.ranks.split(","))
    modes = args.only or list(MODES)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for r in ranks:
        prev = next((row for row in rows if row["ranks"] == 1024), None)
        if r == 2048 and prev is not None:
            peaks = [prev[m]["peak"] / GIB for m in ("open", "plan") if "peak" in prev[m]]
            if not peaks or max(peaks) > args.max_peak_gib:
                why = f"skipped: R=1024 peaked at {max(peaks):.1f} GiB" if peaks else "skipped: R=1024 did not finish"
                print(f"R={r}: {why} (--max-peak-gib {args.max_peak_gib:g})", flush=True)
                continue
        path = work / f"r{r}"
        if not (path / "scale.json").exists():
            print(f"R={r}: building {path} ...", flush=True)
            built = run_child("build", path, 3600)
            if "skipped" in built:
                raise SystemExit(f"R={r}: building failed: {built['skipped']}")
        row = json.loads((path / "scale.json").read_text())
        print(f"R={r}: {row['chunks']:,} chunks ({row['empty_chunks']} empty), .metadata "
              f"{row['metadata_bytes'] / 2**20:.1f} MiB, {row['apparent_gib']:.0f} GiB apparent, "
              f"{row['disk_gib']:.2f} GiB on disk", flush=True)
        hold = None
        if args.hold:
            hold, row["held"] = start_hold(path)
            print(f"  held in the page cache: {row['held']['held_bytes'] / GIB:.2f} GiB of headers "
                  f"({row['held']['s']:.0f} s to read)", flush=True)
        if args.warm:
            warm = run_child("plan", path, 3600)
            print(f"  warm-up plan (untimed): {json.dumps(warm)[:120]}", flush=True)
        mesh_ranks = {int(x) for x in args.mesh_ranks.split(",") if x}
        for mode in MODES:
            wanted = mode in modes and (mode != "mesh" or r in mesh_ranks)
            row[mode] = run_child(mode, path, args.timeout) if wanted else {"skipped": "not run"}
            print(f"  {mode}: {json.dumps(row[mode])}", flush=True)
        if hold is not None:
            hold.stdin.close()
            hold.wait()
        rows.append(row)
        if args.json:
            Path(args.json).write_text(json.dumps({"rows": rows, "timeout": args.timeout}, indent=1))
    print()
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
