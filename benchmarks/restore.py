"""Restore benchmark: jreshard against torch, Orbax and the fastest plain read of the same bytes.

What it measures
----------------
Case ``dcp``: a synthetic transformer-like model (``--size-gib``, default 1.5 GiB; bf16 matrices, f32 norms,
biases and LM head; see ``_model.py``) saved with ``torch.distributed.checkpoint`` (default
``FileSystemWriter``) by 4 ranks (gloo, CPU), every tensor a DTensor ``Shard(0)`` over a 1-D mesh of 4, i.e.
an FSDP-style checkpoint (``_checkpoints.py``). It is restored onto a (2, 4) ``('data', 'model')`` mesh of 8
CPU devices: matrices ``P('data', 'model')``, norms ``P('model')``, biases ``P()`` (replicated).
Contenders (``_contenders.py``):

  jreshard  ``jreshard.load(dir, targets)``, then ``jax.block_until_ready``.
  port      the same load ported to another layout through a mapping: every 2-D weight transposed
            (``saved(name).T``) and the per-layer tensors of each kind stacked into one ``[L, ...]`` array
            (``jreshard.stack([...])``, see ``_model.port_tensors``), sharded on the same logical dimensions
            (the stacking dimension is not split).
  torch     what users do today: ``dcp.load(..., no_dist=True)`` into preallocated full tensors, then numpy
            (bf16 through an int16 view) and ``jax.device_put`` onto each target sharding.
  orbax     the same arrays saved once with ``ocp.StandardCheckpointer``; timed:
            ``StandardCheckpointer().restore(dir, abstract tree)`` onto the same shardings.
  raw-tT    the anchor: every ``.distcp`` file (the bytes jreshard has to read: one process holds all 8
            devices) read with ``os.preadv`` by T threads in ``--raw-block-mib`` pieces into one freshly
            allocated buffer per file, no parsing, no ``device_put`` (``_rawread.py``). The buffers are fresh
            anonymous memory, not pre-faulted, as the loaders' are, so first-touch page faults are paid by
            the anchor too: that is the honest comparison. Run for each T of ``--raw-threads`` (default 1, 2,
            4, 8); every raw row is printed and the FASTEST one is the anchor of the "x raw" column.
  layout    the layout floor (``_layoutread.py``): the same bytes read with ``preadv`` straight into the
            target's device pieces (each saved row cut at the column boundaries of the (2, 4) mesh, so
            1-3 KiB per piece), the scatter lists built untimed, the reads on as many threads as jreshard
            uses; numpy pieces, no ``device_put``. Its "x raw" is what the layout itself costs; jreshard's
            time over it (printed under the table) is what jreshard adds. ``replay.py`` measures the same with
            no Python at all: jreshard's own recorded reads replayed by a C program against a C raw read.

  Conversion contenders (DCP -> a native Orbax checkpoint, the tree a nested dict of the dotted names, every
  array unsharded on the first device, dtypes as saved; the destination is removed, untimed, before each
  run):
  convert   ``jreshard.convert(dir, dest, max_inflight_bytes=...)`` (``--convert-inflight-bytes``, default
            256 MiB).
  dcp_orbax what users do today: torch ``dcp.load(..., no_dist=True)`` of the whole model, then numpy,
            ``jax.device_put`` and ``ocp.StandardCheckpointer().save``.
  jr_orbax  ``jreshard.load`` of the whole model, then ``StandardCheckpointer().save``.
  The first run of each restores the converted checkpoint with plain Orbax onto the (2, 4) mesh shardings
  and checks every array against the generator.

Case ``safetensors``: the same tensors in one ``.safetensors`` file, loaded by jreshard, by port (the same
mapping), by torch (``safetensors.torch.load_file``, then numpy and ``jax.device_put``), by Orbax v1
(``ocp.v1.load`` inside ``ocp.v1.Context(checkpoint_layout="safetensors")``) and read raw.

How
---
Every run of a contender is a fresh subprocess, so imports and JAX start-up stay out of the timing and peak
memory belongs to that contender alone. Each contender runs ``--repeat`` times per page-cache state, in rounds
(every contender once per round, so that a slow spell of a shared machine falls on all of them alike), and the
median wall time of the restore call is reported (from the call until every array is ready; imports and
building the abstract targets are excluded).

Page cache (``--cache warm|cold|both``, default both; ``_pagecache.py``): before every warm run the files
the contender reads are read once, untimed; before every cold run they are evicted (``os.sync()``, then
``posix_fadvise(POSIX_FADV_DONTNEED)`` on each, and ``/proc/sys/vm/drop_caches`` as well when pages stay
resident or ``--drop-caches`` asks for it and it is writable). Either way, how much of the files is
resident afterwards is checked with ``mincore`` and reported (or reported as not verifiable). On a VM the
host may still cache the disk image: cold means cold in this machine's page cache.

No memory is pre-faulted by default. On a VM with free page reporting the first touch of memory that sat
free for a while is slower, and every contender (the raw anchor included) pays that as a user's process
would. How much slower depends on how long ago the memory was freed: on this project's development VM the raw
2-thread read of the 1.5 GiB model took 0.2 s when it started right after the previous run's process exited
(its freed pages not yet handed back to the host) and 1.0-2.6 s when it started 2-12 s later. A contender that
starts up fast (the raw read imports no JAX) would otherwise meet friendlier memory than one that imports JAX
for 3 s. So every timed call starts ``--settle`` seconds (default 5) after the previous run's process exited:
the worker sleeps after its set-up until then (a set-up that takes longer is reported as late), and every
contender meets memory in the same state. ``--prefault-gib N`` adds a second set of rows, labelled "(pre-faulted N GiB)", for which each run
faults in and frees N GiB of anonymous memory just before the timed call; those rows are compared only
with each other (their own raw anchor, torch and orbax).

Memory is the process's ``RssAnon`` sampled every 2 ms during the restore (``_memwatch.py``): the absolute
peak and the growth over the value just before the restore started, max over the runs. The loaded arrays
themselves live in anonymous memory on CPU devices, so a loader that holds nothing else grows by about the
model size. The first run of every JAX contender in a case checks every loaded array (dtype, shape, sharding
and values) against the generator (for port: the transposed and stacked arrays built with numpy).

Ratios are measurements only: "x raw" is a row's time over the fastest raw row's, "x torch" and "x orbax"
over those contenders' times, all within the same page-cache state and pre-fault setting. A contender that
fails is shown as "error: ..." with the path of its log and never stops the run. ``--json PATH`` writes
everything (with the machine's facts, ``_machine.py``); ``benchmarks/readme.py`` turns it into the README's
tables.

Checkpoints are written once under ``--workdir/<model key>/`` and reused.

Usage::

    python benchmarks/restore.py                     # both cases, 1.5 GiB, warm and cold, 3 repeats
    python benchmarks/restore.py --size-gib 0.1 --repeat 1 --cache warm
    python benchmarks/restore.py --case dcp --skip orbax --json bench-out/restore.json
    python benchmarks/restore.py --case dcp --skip torch,orbax,raw   # jreshard and port only
    python benchmarks/restore.py --case dcp --only convert,dcp_orbax,jr_orbax   # conversions only
    python benchmarks/restore.py --prefault-gib 4 # also rows pre-faulted with 4 GiB, labelled as such
    python benchmarks/restore.py --cold-skip port,convert,dcp_orbax,jr_orbax   # fewer cold runs
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

# The helpers next to this file, and the jreshard source tree this benchmark belongs to.
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

from _checkpoints import WRITERS, Paths
from _contenders import (
    CONVERTERS,
    PREPARE,
    RAW_PREFIX,
    checkpoint_path,
    jreshard_plan,
    port_mapping,
    prepare,
    raw_files,
    raw_threads,
    verify_arrays,
    verify_converted,
    verify_pieces,
)
from _machine import facts
from _memwatch import PeakAnonMemory, prefault
from _model import DEVICE_COUNT, GIB, ModelSpec, build_model, port_tensors
from _pagecache import cold_possible, evict, files_under, resident_bytes, warm

CASES = {
    "dcp": ("jreshard", "port", "torch", "orbax", "raw", "layout", "convert", "dcp_orbax", "jr_orbax"),
    "safetensors": ("jreshard", "port", "torch", "orbax", "raw", "layout"),
}
DESCRIPTIONS = {
    "dcp": "torch.distributed.checkpoint, 4 ranks x Shard(0) -> (2, 4) mesh of 8 CPU devices",
    "safetensors": "one .safetensors file -> (2, 4) mesh of 8 CPU devices",
}
LABELS = {
    ("dcp", "jreshard"): "jreshard `load`",
    ("dcp", "port"): "jreshard port (transpose + stack mapping)",
    ("dcp", "torch"): "torch `dcp.load` + `device_put`",
    ("dcp", "orbax"): "Orbax `StandardCheckpointer.restore` (its own checkpoint)",
    ("dcp", "convert"): "`jreshard.convert`",
    ("dcp", "dcp_orbax"): "torch `dcp.load` + `StandardCheckpointer().save`",
    ("dcp", "jr_orbax"): "`jreshard.load` + `StandardCheckpointer().save`",
    ("safetensors", "jreshard"): "jreshard `load`",
    ("safetensors", "port"): "jreshard port (transpose + stack mapping)",
    ("safetensors", "torch"): "`safetensors.torch.load_file` + `device_put`",
    ("safetensors", "orbax"): "Orbax v1 safetensors layout",
    ("dcp", "layout"): "layout floor: `preadv` into the target's pieces",
    ("safetensors", "layout"): "layout floor: `preadv` into the target's pieces",
}
CONVERT_INFLIGHT = 256 * 2**20
BASELINES = ("torch", "orbax")  # ratio columns besides "x raw"


def label(case: str, name: str, prefault_gib: float = 0.0) -> str:
    """The row's name in tables."""
    threads = raw_threads(name)
    if threads is not None:
        text = f"raw `preadv`, {threads} thread{'s' if threads > 1 else ''}"
    else:
        text = LABELS.get((case, name), name)
    return text + (f" (pre-faulted {prefault_gib:g} GiB)" if prefault_gib else "")


# --------------------------------------------------------------------------- the worker (one timed run)


def worker_main(args, model: ModelSpec, paths: Paths) -> int:
    """One timed run of one contender; writes a JSON result to ``args._result``."""
    case, name = args._worker.split(":")
    result: dict[str, Any] = {}
    try:
        restore, targets = prepare(case, name, model, paths, args)
        gc.collect()
        late = time.time() - args._start_at
        if late < 0:
            time.sleep(-late)  # every contender's timed call starts --settle s after the previous run ended
        elif args._start_at:
            result["settle_late_s"] = late
        if args._prefault:  # after the settle: pre-faulted memory is reused at once
            result["prefaulted"] = prefault(int(args._prefault * GIB))
        with PeakAnonMemory() as mem:
            start = time.perf_counter()
            out = restore()
            seconds = time.perf_counter() - start
        result.update(seconds=seconds, peak_anon=mem.peak, baseline_anon=mem.baseline, delta_anon=mem.delta,
                      hwm_delta=mem.hwm_delta, samples=mem.samples)  # fmt: skip
        if isinstance(out, list):  # raw read
            result["bytes_read"] = sum(buf.nbytes for buf in out)
        elif name in CONVERTERS:
            result["converted_bytes"] = sum(f.stat().st_size for f in files_under(Path(out)))
            if args._verify:
                result["verify"] = verify_converted(model, Path(out))
        elif args._verify:
            if name == "layout":
                result["verify"] = verify_pieces(model, out, targets)
            elif name == "port":
                result["verify"] = verify_arrays(model, out, targets, port_tensors(model))
                result["plan"] = jreshard_plan(case, paths, targets, port_mapping(model))
            else:
                result["verify"] = verify_arrays(model, out, targets)
            if name == "jreshard":
                result["plan"] = jreshard_plan(case, paths, targets)
    except BaseException as e:  # noqa: BLE001 -- reported in the table, never fatal for the run
        traceback.print_exc()
        message = str(e).strip().splitlines()[0] if str(e).strip() else ""
        result["error"] = f"{type(e).__name__}: {message}"[:300]
    Path(args._result).write_text(json.dumps(result))
    return 0


def setup_main(args, model: ModelSpec, paths: Paths) -> int:
    WRITERS[args._setup](model, paths)
    return 0


# ------------------------------------------------------------------------------ subprocesses


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    flag = f"--xla_force_host_platform_device_count={DEVICE_COUNT}"
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join([*flags, flag])
    env.setdefault("JAX_PLATFORMS", "cpu")
    return env


def _log_tail(log: Path) -> str:
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines()]
    except OSError:
        return ""
    lines = [line for line in lines if line]
    return lines[-1][:200] if lines else ""


def run_child(extra: list[str], args, log: Path, timeout: float) -> tuple[int, str]:
    """Runs this script in a fresh interpreter; returns (exit code, last log line)."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--size-gib", repr(args.size_gib),
        "--workdir", str(args.workdir),
        "--writer", args.writer,
        "--jreshard-io", args.jreshard_io,
        "--raw-block-mib", str(args.raw_block_mib),
        *(["--max-inflight-bytes", str(args.max_inflight_bytes)] if args.max_inflight_bytes else []),
        "--convert-inflight-bytes", str(args.convert_inflight_bytes),
        *extra,
    ]  # fmt: skip
    with open(log, "w") as out:
        try:
            proc = subprocess.run(cmd, env=child_env(), stdout=out, stderr=subprocess.STDOUT, timeout=timeout,
                                  check=False)
        except subprocess.TimeoutExpired:
            return -1, f"timed out after {timeout:.0f} s"
    return proc.returncode, _log_tail(log)


def ensure_checkpoint(what: str, args, paths: Paths) -> str | None:
    """Writes a cached checkpoint unless present; returns an error message or None."""
    artifact, marker = paths.artifact(what), paths.done_marker(what)
    if marker.exists() and artifact.exists():
        print(f"  {what}: cached at {artifact}")
        return None
    if artifact.is_dir():
        shutil.rmtree(artifact)
    elif artifact.exists():
        artifact.unlink()
    marker.unlink(missing_ok=True)
    paths.logs.mkdir(parents=True, exist_ok=True)
    log = paths.logs / f"setup-{what}.log"
    print(f"  {what}: writing {artifact} ...", end=" ", flush=True)
    start = time.perf_counter()
    code, tail = run_child(["--_setup", what], args, log, timeout=args.timeout)
    if code != 0 or not artifact.exists():
        print("FAILED")
        return f"writing the {what} checkpoint failed (exit {code}, log {log}): {tail}"
    marker.touch()
    print(f"done in {time.perf_counter() - start:.1f} s")
    return None


def prepare_page_cache(files: list[Path], cache: str, drop_caches: bool) -> dict[str, Any]:
    """Warms or evicts ``files``; returns what was done and the resident fraction afterwards."""
    if cache == "warm":
        warm(files)
        total = sum(f.stat().st_size for f in files)
        try:
            resident: int | None = sum(resident_bytes(f) for f in files)
            note = ""
        except (OSError, AttributeError) as e:
            resident, note = None, f"mincore: {e}"
        method = "read once, untimed"
    else:
        ev = evict(files, drop_caches=drop_caches)
        method, total, resident, note = ev.method, ev.total, ev.resident, ev.note
    return {"method": method, "resident_fraction": None if resident is None else resident / max(1, total),
            "note": note}  # fmt: skip


_LAST_EXIT: list[float | None] = [None]  # when the previous run's process exited (time.time())


def run_contender(case: str, name: str, tag: str, args, paths: Paths, prefault_gib: float,
                  verify: bool) -> dict[str, Any]:  # fmt: skip
    """One run of one contender in a fresh subprocess."""
    paths.logs.mkdir(parents=True, exist_ok=True)
    log = paths.logs / f"{case}-{name}-{tag}.log"
    fd, result_file = tempfile.mkstemp(prefix="jreshard-bench-", suffix=".json")
    os.close(fd)
    try:
        start_at = (_LAST_EXIT[0] or time.time()) + args.settle
        extra = ["--_worker", f"{case}:{name}", "--_result", result_file, "--_prefault", repr(prefault_gib),
                 "--_start-at", repr(start_at if args.settle > 0 else 0.0)]
        if verify:
            extra.append("--_verify")
        code, tail = run_child(extra, args, log, timeout=args.timeout)
        _LAST_EXIT[0] = time.time()
        text = Path(result_file).read_text()
        result = json.loads(text) if text else {}
    finally:
        os.unlink(result_file)
    if not result:
        result = {"error": f"worker died (exit {code}): {tail}"}
    if "error" in result:
        result["log"] = str(log)
    return result


# ------------------------------------------------------------------------------ summaries


def summarize(runs: list[dict[str, Any]], model_bytes: int) -> dict[str, Any]:
    errors = [r for r in runs if "error" in r]
    if errors:
        return {"error": errors[0]["error"], "log": errors[0].get("log"), "runs": runs}
    seconds = [r["seconds"] for r in runs]
    median = statistics.median(seconds)
    hwm = [r["hwm_delta"] for r in runs if r.get("hwm_delta") is not None]
    resident = [r["page_cache"]["resident_fraction"] for r in runs]
    summary = {
        "median_s": median,
        "min_s": min(seconds),
        "max_s": max(seconds),
        "gib_per_s": model_bytes / GIB / median,
        "peak_anon_gib": max(r["peak_anon"] for r in runs) / GIB,
        "delta_anon_gib": max(r["delta_anon"] for r in runs) / GIB,
        "hwm_delta_gib": max(hwm) / GIB if hwm else None,
        "verify": next((r["verify"] for r in runs if "verify" in r), "-"),
        "resident_fraction": None if None in resident else [min(resident), max(resident)],
        "runs": runs,
    }
    for r in runs:
        for key in ("plan", "bytes_read", "converted_bytes"):
            if key in r:
                summary[key] = r[key]
    return summary


def add_ratios(rows: list[dict[str, Any]]) -> str | None:
    """Adds ``ratios`` (x raw, x torch, x orbax, x dcp_orbax) to every timed row of one block; returns the
    name of the raw anchor (the fastest raw row), or None when no raw row ran."""
    timed = {r["name"]: r["median_s"] for r in rows if "median_s" in r}
    raws = {n: s for n, s in timed.items() if raw_threads(n) is not None}
    anchor = min(raws, key=raws.__getitem__) if raws else None
    by_name = {r["name"]: r for r in rows}
    for r in rows:
        if "median_s" not in r:
            continue
        bases = {"raw": anchor, **{b: b for b in (*BASELINES, "dcp_orbax")}}
        r["ratios"] = {key: (r["median_s"] / timed[base] if base in timed else None)
                       for key, base in bases.items()}  # fmt: skip
        r["ratios"]["raw_rounds"] = round_ratio(r, by_name[anchor]) if anchor else None
    return anchor


def round_ratio(row: dict[str, Any], base: dict[str, Any]) -> float | None:
    """The median over rounds of ``row``'s time over ``base``'s in the same round (runs of one round are
    minutes apart at most, so a slow spell of the machine weighs on both sides of each ratio); None without a
    round in which both ran."""
    pairs = [(a["seconds"], b["seconds"]) for a, b in zip(row.get("runs", []), base.get("runs", []))
             if "seconds" in a and "seconds" in b]
    return statistics.median(a / b for a, b in pairs) if pairs else None


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def print_block(block: dict[str, Any]) -> None:
    header = (f"{'contender':<11} {'median s':>9} {'min-max s':>13} {'GiB/s':>6} {'x raw':>6} {'x torch':>7} "
              f"{'x orbax':>7} {'peak anon':>9} {'+anon':>6}  check")  # fmt: skip
    print(header)
    print("-" * len(header))
    for r in block["rows"]:
        if "error" in r:
            print(f"{r['name']:<11} error: {r['error']}  (log: {r.get('log')})")
            continue
        ratios = r["ratios"]
        print(f"{r['name']:<11} {r['median_s']:>9.3f} {r['min_s']:>6.2f}-{r['max_s']:<6.2f} {r['gib_per_s']:>6.2f} "
              f"{_fmt(ratios['raw']):>6} {_fmt(ratios['torch']):>7} {_fmt(ratios['orbax']):>7} "
              f"{r['peak_anon_gib']:>9.3f} {r['delta_anon_gib']:>6.3f}  {r['verify']}")  # fmt: skip
    if block["anchor"]:
        print(f"x raw: over {block['anchor']} (the fastest raw read); peak anon and +anon in GiB")
    rounds = {r["name"]: r["ratios"].get("raw_rounds") for r in block["rows"] if "ratios" in r}
    if block["anchor"] and any(v is not None for v in rounds.values()):
        print("x raw per round (median over the rounds of each round's ratio): "
              + ", ".join(f"{n} {v:.2f}" for n, v in rounds.items() if v is not None and n != block["anchor"]))
    timed = {r["name"]: r["median_s"] for r in block["rows"] if "median_s" in r}
    if "layout" in timed:
        for other in ("jreshard", "port"):
            if other in timed:
                print(f"{other} / layout floor = {timed[other] / timed['layout']:.2f}x")
    conv = {r["name"]: r for r in block["rows"] if r["name"] in CONVERTERS and "median_s" in r}
    if "convert" in conv:
        for other in ("dcp_orbax", "jr_orbax"):
            if other in conv:
                print(f"convert / {other} = {conv['convert']['median_s'] / conv[other]['median_s']:.2f}x")
    for r in block["rows"]:
        if r["name"] in ("jreshard", "port") and "plan" in r:
            plan = r["plan"]
            if "error" in plan:
                print(f"{r['name']} plan: {plan['error']}")
            else:
                print(f"{r['name']} plan: {plan['bytes_needed'] / GIB:.3f} GiB needed, "
                      f"{plan['bytes_to_read'] / GIB:.3f} GiB to read, {plan['num_reads']} reads")  # fmt: skip


def _print_run(name: str, rep: int, repeat: int, run: dict[str, Any]) -> None:
    cache = run.get("page_cache", {})
    resident = cache.get("resident_fraction")
    where = f"[{'?' if resident is None else f'{resident:.0%}'} resident]"
    if "error" in run:
        print(f"  {name} run {rep + 1}: {where} error: {run['error']}")
        return
    hwm = "?" if run.get("hwm_delta") is None else f"{run['hwm_delta'] / GIB:.3f}"
    check = f", check {run['verify']}" if "verify" in run else ""
    if run.get("settle_late_s"):
        check += f", started {run['settle_late_s']:.1f} s after its settle time (a slow set-up)"
    print(f"  {name} run {rep + 1}/{repeat}: {where} {run['seconds']:.3f} s, peak anon {run['peak_anon'] / GIB:.3f} "
          f"GiB (+{run['delta_anon'] / GIB:.3f}; RSS high-water +{hwm}){check}")  # fmt: skip


def contender_names(case: str, args, cache: str = "warm") -> list[str]:
    """The case's contenders after --only / --skip (and --cold-skip for the cold cache), with "raw" expanded
    into raw-t<T> per --raw-threads."""
    out = []
    for name in CASES[case]:
        if args.only and name not in args.only:
            continue
        if name in args.skip or (cache == "cold" and name in args.cold_skip):
            continue
        out += [f"{RAW_PREFIX}{t}" for t in args.raw_threads] if name == "raw" else [name]
    return out


def run_block(case: str, names: list[str], cache: str, prefault_gib: float, setup_errors: dict[str, str | None],
              verified: set[str], args, model: ModelSpec, paths: Paths) -> dict[str, Any]:  # fmt: skip
    """Every contender of a case, ``--repeat`` runs each, in one page-cache state and pre-fault setting. The runs
    go in rounds (each contender once per round, in order), so that a slow spell of the machine falls on every
    contender alike instead of on the one whose runs it happens to meet."""
    title = f"{cache} cache" + (f", pre-faulted {prefault_gib:g} GiB" if prefault_gib else ", no pre-faulting")
    print(f"\n-- {case}: {title} --")
    heads: dict[str, dict[str, Any]] = {}
    runs: dict[str, list[dict[str, Any]]] = {}
    files: dict[str, list] = {}
    for name in names:
        needs = "orbax" if (case, name) == ("dcp", "orbax") else case
        heads[name] = {"name": name, "label": label(case, name, prefault_gib)}
        if setup_errors.get(needs):
            heads[name]["error"] = setup_errors[needs]
            continue
        files[name] = files_under(checkpoint_path(case, name, paths))
        runs[name] = []
    for rep in range(args.repeat):
        for name in names:
            if name not in runs or (runs[name] and "error" in runs[name][-1]):
                continue
            state = prepare_page_cache(files[name], cache, args.drop_caches)
            tag = f"{cache}{'-prefault' if prefault_gib else ''}-{rep}"
            verify = args.verify and name not in verified and raw_threads(name) is None
            runs[name].append(run_contender(case, name, tag, args, paths, prefault_gib, verify))
            runs[name][-1]["page_cache"] = state
            if verify and "error" not in runs[name][-1]:
                verified.add(name)
            _print_run(name, rep, args.repeat, runs[name][-1])
    rows = []
    for name in names:
        rows.append(heads[name] if name not in runs else {**heads[name], **summarize(runs[name], model.nbytes)})
        if name == "convert" and name in runs:
            rows[-1]["convert_inflight_bytes"] = args.convert_inflight_bytes
    methods = sorted({r["page_cache"]["method"] for row in rows for r in row.get("runs", []) if "page_cache" in r})
    block = {"cache": cache, "prefault_gib": prefault_gib, "rows": rows, "page_cache_method": methods}
    block["anchor"] = add_ratios(rows)
    print(f"\nmedian of {args.repeat} run(s); {title}; page cache before each run: {'; '.join(methods) or '-'}; "
          f"GiB/s = model size ({model.nbytes / GIB:.3f} GiB) / time")  # fmt: skip
    print_block(block)
    return block


def benchmark_main(args, model: ModelSpec, paths: Paths) -> int:
    cases = list(CASES) if args.case == "all" else [args.case]
    caches = ["warm", "cold"] if args.cache == "both" else [args.cache]
    if "cold" in caches and not cold_possible():
        print("cold cache impossible here (no posix_fadvise, drop_caches not writable): warm only")
        caches = [c for c in caches if c != "cold"] or ["warm"]
    prefaults = [0.0] + ([args.prefault_gib] if args.prefault_gib else [])

    machine = facts()
    busy = machine["load_average"] > 0.5 * (machine["cpu_count"] or 1)
    print(f"jreshard restore benchmark: model {model.describe()}")
    print(f"workdir {paths.root}; {args.repeat} run(s) per contender and cache state, each in a fresh process; "
          f"page cache: {', '.join(caches)}; "
          + (f"rows without and with {args.prefault_gib:g} GiB pre-faulted" if args.prefault_gib
             else "no pre-faulting"))  # fmt: skip
    print(f"load average {machine['load_average']:.2f} on {machine['cpu_count']} cores"
          + (" -- the machine is busy, timings will be noisy" if busy else ""))  # fmt: skip

    print("checkpoints:")
    paths.root.mkdir(parents=True, exist_ok=True)
    names = {case: contender_names(case, args) for case in cases}  # the warm cache's: a superset
    needed = []
    if "dcp" in cases:
        needed += ["dcp"] + (["orbax"] if "orbax" in names["dcp"] else [])
    if "safetensors" in cases:
        needed.append("safetensors")
    setup_errors = {what: ensure_checkpoint(what, args, paths) for what in needed}

    report: dict[str, Any] = {
        "model": {"key": model.key, "bytes": model.nbytes, "gib": model.nbytes / GIB, "tensors": len(model.tensors),
                  "description": model.describe()},
        "machine": machine,
        "repeat": args.repeat,
        "raw_threads": args.raw_threads,
        "raw_block_mib": args.raw_block_mib,
        "convert_inflight_bytes": args.convert_inflight_bytes,
        "cases": {},
    }  # fmt: skip
    for case in cases:
        print(f"\n== case {case}: {DESCRIPTIONS[case]} ==")
        data_files = raw_files(case, paths) if not setup_errors.get(case) else []
        on_disk = sum(f.stat().st_size for f in data_files)
        if data_files:
            print(f"data files: {len(data_files)}, {on_disk / GIB:.3f} GiB on disk")
        verified: set[str] = set()
        blocks = [run_block(case, contender_names(case, args, cache), cache, pf, setup_errors, verified, args, model,
                            paths) for pf in prefaults for cache in caches]  # fmt: skip
        report["cases"][case] = {"description": DESCRIPTIONS[case], "data_bytes": on_disk, "blocks": blocks}

    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1))
        print(f"\nresults written to {out}")
    return 0


def _names(values: list[str]) -> set[str]:
    return {s for item in values for s in item.split(",") if s}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Benchmark jreshard restores against torch, Orbax and a raw read.")
    p.add_argument("--size-gib", type=float, default=1.5, help="approximate model size (default 1.5)")
    p.add_argument("--case", choices=["dcp", "safetensors", "all"], default="all",
                   help="which checkpoint format to benchmark (default all)")
    p.add_argument("--skip", action="append", default=[],
                   help="contender(s) to leave out: jreshard, port, torch, orbax, raw, convert, dcp_orbax, jr_orbax "
                        "(repeatable or comma-separated)")
    p.add_argument("--only", action="append", default=[], help="run only these contender(s) (same names)")
    p.add_argument("--cold-skip", action="append", default=[],
                   help="contender(s) to leave out of the cold-cache runs only (same names)")
    p.add_argument("--repeat", type=int, default=3,
                   help="runs per contender and cache state; the median is reported (default 3)")
    p.add_argument("--cache", choices=["warm", "cold", "both"], default="both",
                   help="page cache before each run: read once (warm), evicted (cold) or both (default)")
    p.add_argument("--drop-caches", action="store_true",
                   help="for cold runs also write /proc/sys/vm/drop_caches (machine-wide) when writable; without "
                        "it, only when posix_fadvise left pages resident")
    p.add_argument("--raw-threads", default="1,2,4,8",
                   help="thread counts of the raw-read rows (default 1,2,4,8); the fastest is the anchor")
    p.add_argument("--raw-block-mib", type=int, default=16, help="raw read piece size in MiB (default 16)")
    p.add_argument("--settle", type=float, default=5.0,
                   help="seconds from the previous run's exit to each timed call (default 5; 0: none)")
    p.add_argument("--prefault-gib", type=float, default=0.0,
                   help="also run every contender after faulting in and freeing this much anonymous memory, as "
                        "separate rows labelled '(pre-faulted N GiB)' (default 0: none)")
    p.add_argument("--writer", choices=["torch", "jreshard"], default="torch",
                   help="who writes the DCP checkpoint: torch on 4 gloo ranks (default), or jreshard.save_dcp "
                        "(no torch; the same Shard(0) chunks)")
    p.add_argument("--workdir", default="/tmp/jreshard-bench",
                   help="cache for the written checkpoints (default /tmp/jreshard-bench)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip checking the loaded arrays after each contender's first run")
    p.add_argument("--timeout", type=float, default=1800, help="seconds allowed per subprocess (default 1800)")
    p.add_argument("--jreshard-io", default="auto", help="the io= argument of jreshard.load (default auto)")
    p.add_argument("--max-inflight-bytes", type=int, default=None,
                   help="the max_inflight_bytes= argument of jreshard.load")
    p.add_argument("--convert-inflight-bytes", type=int, default=CONVERT_INFLIGHT,
                   help="the max_inflight_bytes= of the convert contender (default 256 MiB)")
    # Internal: the subprocess modes.
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    p.add_argument("--_result", help=argparse.SUPPRESS)
    p.add_argument("--_verify", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_prefault", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--_start-at", dest="_start_at", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--_setup", choices=sorted(WRITERS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    if args.raw_block_mib < 1:
        p.error("--raw-block-mib must be at least 1")
    if args.prefault_gib < 0:
        p.error("--prefault-gib must not be negative")
    try:
        args.raw_threads = sorted({int(t) for t in args.raw_threads.split(",") if t})
    except ValueError:
        p.error(f"--raw-threads: comma-separated positive integers, not {args.raw_threads!r}")
    if not args.raw_threads or min(args.raw_threads) < 1:
        p.error("--raw-threads: at least one thread count, each at least 1")
    known = {*PREPARE, "raw"}
    args.skip, args.only, args.cold_skip = _names(args.skip), _names(args.only), _names(args.cold_skip)
    if unknown := (args.skip | args.only | args.cold_skip) - known:
        p.error(f"unknown contender(s): {sorted(unknown)}; known: {sorted(known)}")
    args.workdir = str(Path(args.workdir).resolve())
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model = build_model(args.size_gib)
    if args.writer == "jreshard":  # run_child's environment passes the choice on to the writer
        os.environ["JRESHARD_BENCH_WRITER"] = "jreshard"
    paths = Paths(Path(args.workdir) / (model.key + ("-torch-free" if args.writer == "jreshard" else "")))
    if args._setup:
        return setup_main(args, model, paths)
    if args._worker:
        return worker_main(args, model, paths)
    return benchmark_main(args, model, paths)


if __name__ == "__main__":
    sys.exit(main())
