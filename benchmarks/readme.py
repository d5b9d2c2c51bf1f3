"""Regenerates the README's benchmark tables with one command.

Runs, with their defaults except ``--repeat`` and the work directory (each writes ``--json``):

  1. ``restore.py``  both cases (DCP, safetensors), warm and cold page cache, every contender warm; cold
                     only jreshard, torch, orbax and the raw reads (``--cold-skip`` the port and the
                     conversions, which keeps the whole run near 15 minutes here; ``--full``: every
                     contender cold too);
  2. ``partial.py``  on the DCP checkpoint restore.py wrote;
  3. ``save.py``     jreshard ``save_dcp`` against torch ``dcp.save``;

then rewrites, in ``README.md``, the text between each pair of markers ``<!-- bench:NAME:start -->`` and
``<!-- bench:NAME:end -->`` (NAME: machine, restore, convert, partial, save) and nothing else. The machine
block records the date, CPUs, memory, kernel, package versions, the commit, the load average, the command
and how long the run took. A script that fails leaves its tables as they were and makes the command exit 1.

    python benchmarks/readme.py                       # run everything (~15 min here), rewrite README.md
    python benchmarks/readme.py --no-run              # re-render from the JSON of the last run
    python benchmarks/readme.py --only restore --repeat 1
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
README = HERE.parent / "README.md"
SCRIPTS = ("restore", "partial", "save")
GIB = 1 << 30
CONVERTERS = ("convert", "dcp_orbax", "jr_orbax")
COLD_SKIP = ("port", *CONVERTERS)  # left out of the cold-cache runs unless --full


# ------------------------------------------------------------------------------ running


def run_scripts(which: list[str], args) -> dict[str, float]:
    """Runs the scripts, their output streamed; returns each one's wall time (None-less: failures raise)."""
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = None
    times = {}
    for name in which:
        cmd = [sys.executable, str(HERE / f"{name}.py"), "--repeat", str(args.repeat), "--json", str(out / f"{name}.json")]
        if name == "restore":
            cmd += ["--size-gib", repr(args.size_gib), "--workdir", args.workdir]
            if not args.full:
                cmd += ["--cold-skip", ",".join(COLD_SKIP)]
        elif name == "partial":
            model_dir = _dcp_dir(args)
            cmd += ["--checkpoint", str(model_dir)] if model_dir else ["--workdir", args.workdir]
        else:
            cmd += ["--size-gib", repr(args.size_gib), "--workdir", str(Path(args.workdir) / "save")]
        print(f"\n$ {' '.join(cmd)}", flush=True)
        start = time.perf_counter()
        code = subprocess.run(cmd, check=False).returncode
        times[name] = time.perf_counter() - start
        if code != 0:
            raise SystemExit(f"{name}.py exited {code}; README not changed for it (the other tables: --no-run)")
    return times


def _dcp_dir(args) -> Path | None:
    """The DCP checkpoint restore.py wrote for --size-gib (its key comes from the same model builder)."""
    sys.path.insert(0, str(HERE))
    from _model import build_model

    path = Path(args.workdir) / build_model(args.size_gib).key / "dcp"
    return path if path.is_dir() else None


# ------------------------------------------------------------------------------ rendering


def _s(row: dict[str, Any] | None) -> str:
    """Median seconds with the range over the runs."""
    if row is None:
        return "-"
    if "error" in row:
        return "error"
    return f"{row['median_s']:.3f} ({row['min_s']:.2f}-{row['max_s']:.2f})"


def _x(row: dict[str, Any] | None, key: str) -> str:
    value = None if row is None else row.get("ratios", {}).get(key)
    return "-" if value is None else f"{value:.2f}"


def _rows_by_key(case: dict[str, Any]) -> tuple[list[tuple[str, float]], dict[tuple[str, float, str], Any]]:
    """The (name, prefault) row keys in first-seen order, and every row by (name, prefault, cache)."""
    order: list[tuple[str, float]] = []
    by = {}
    for block in case["blocks"]:
        for row in block["rows"]:
            key = (row["name"], block["prefault_gib"])
            if key not in order:
                order.append(key)
            by[(*key, block["cache"])] = (row, block)
    return order, by


def _caches(case: dict[str, Any]) -> list[str]:
    return [c for c in ("warm", "cold") if any(b["cache"] == c for b in case["blocks"])]


def _peak(rows: list[dict[str, Any] | None]) -> str:
    peaks = [r["peak_anon_gib"] for r in rows if r and "peak_anon_gib" in r]
    deltas = [r["delta_anon_gib"] for r in rows if r and "delta_anon_gib" in r]
    return f"{max(peaks):.3f} (+{max(deltas):.3f})" if peaks else "-"


def _label(row: dict[str, Any], bold: bool) -> str:
    text = row["label"]
    return f"**{text}**" if bold and row["name"] == "jreshard" else text


def _table(case: dict[str, Any], names: list[tuple[str, float]], by: dict, columns: list[tuple[str, str]],
           first: str) -> list[str]:  # fmt: skip
    caches = [c for c in _caches(case) if any((*key, c) in by for key in names)]
    head = [first] + [f"{cache} {title}" if key == "s" else title for cache in caches for key, title in columns]
    head.append("peak anon GiB (growth)")
    lines = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
    for key in names:
        cells = {c: by.get((*key, c), (None, None))[0] for c in caches}
        row = next(r for r in cells.values() if r is not None)
        out = [_label(row, bold=True)]
        for cache in caches:
            r = cells[cache]
            out += [_s(r) if k == "s" else _x(r, k) for k, _ in columns]
        out.append(_peak(list(cells.values())))
        lines.append("| " + " | ".join(out) + " |")
    return lines


def _cache_note(case: dict[str, Any]) -> str:
    notes = []
    for cache in _caches(case):
        runs = [run for b in case["blocks"] if b["cache"] == cache for row in b["rows"] for run in row.get("runs", [])
                if "page_cache" in run]  # fmt: skip
        fractions = [run["page_cache"]["resident_fraction"] for run in runs]
        methods = sorted({run["page_cache"]["method"] for run in runs})
        if not runs:
            continue
        if None in fractions:
            checked = "residency not verifiable here"
        else:
            lo, hi = f"{min(fractions):.1%}", f"{max(fractions):.1%}"
            checked = f"{lo if lo == hi else f'{lo}-{hi}'} of the files resident after it (mincore)"
        anchors = sorted({b["anchor"] for b in case["blocks"] if b["cache"] == cache and b["anchor"]})
        anchor = f"; x raw anchor: {', '.join(a.replace('raw-t', '') + ' thread(s)' for a in anchors)}" if anchors else ""
        notes.append(f"{cache}: {' / '.join(methods)}, before each run; {checked}{anchor}")
    return "Page cache — " + "; ".join(notes) + "."


def _checks(case: dict[str, Any], names: list[str]) -> str:
    results = {}
    for block in case["blocks"]:
        for row in block["rows"]:
            if row["name"] in names and row.get("verify", "-") != "-":
                results[row["name"]] = row["verify"]
            elif row["name"] in names and "error" in row:
                results.setdefault(row["name"], f"error: {row['error']}")
    if not results:
        return "Outputs were not checked (`--no-verify`)."
    bad = {n: v for n, v in results.items() if v != "ok"}
    if not bad:
        return f"Every array of {', '.join(sorted(results))} was checked against the generator on its first run: ok."
    return "Checks that did not pass: " + "; ".join(f"{n}: {v}" for n, v in sorted(bad.items())) + "."


def render_restore(data: dict[str, Any]) -> str:
    model = data["model"]
    parts = []
    titles = {"dcp": "DCP checkpoint (4 ranks, `Shard(0)`) -> (2, 4) mesh",
              "safetensors": "one `.safetensors` file -> (2, 4) mesh"}  # fmt: skip
    columns = [("s", "s"), ("raw", "x raw"), ("torch", "x torch"), ("orbax", "x orbax")]
    for case_name, case in data["cases"].items():
        order, by = _rows_by_key(case)
        names = [k for k in order if k[0] not in CONVERTERS]
        parts.append(f"**{titles.get(case_name, case_name)}**, {model['gib']:.3f} GiB, median of {data['repeat']} "
                     f"(min-max), seconds:\n")  # fmt: skip
        parts += _table(case, names, by, columns, "contender")
        parts.append("")
        parts.append(_cache_note(case) + " " + _checks(case, [n for n, _ in names]))
        parts.append("")
    return "\n".join(parts).rstrip() + "\n"


def render_convert(data: dict[str, Any]) -> str:
    case = data["cases"].get("dcp")
    if case is None:
        return "(the DCP case did not run)\n"
    order, by = _rows_by_key(case)
    names = [k for k in order if k[0] in CONVERTERS]
    if not names:
        return "(no conversion contender ran)\n"
    inflight = data.get("convert_inflight_bytes", 256 << 20) >> 20
    columns = [("s", "s"), ("dcp_orbax", "x torch + Orbax"), ("raw", "x raw")]
    lines = [(f"DCP -> native Orbax checkpoint, {data['model']['gib']:.3f} GiB, median of {data['repeat']} (min-max), "
             f"seconds; `convert` with `max_inflight_bytes` = {inflight} MiB:\n")]  # fmt: skip
    lines += _table(case, names, by, columns, "conversion")
    lines += ["", _checks(case, [n for n, _ in names]).replace(
        "was checked against the generator", "was restored by `StandardCheckpointer` and checked")]
    return "\n".join(lines) + "\n"


def render_partial(data: dict[str, Any]) -> str:
    lines = [f"{data['model_bytes'] / GIB:.3f} GiB DCP checkpoint, warm page cache, median of {data['repeat']}:\n",
             ("| piece of every matrix | coalesce_gap | GiB | read GiB | jreshard `Checkpoint.read` s | "
             "raw memmap copy s | x raw |"),
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for r in data["rows"]:
        gap = f"{r['coalesce_gap']}" + (" (default)" if r["coalesce_gap"] == data.get("default_coalesce_gap") else "")
        lines.append(f"| {r['piece']} | {gap} | {r['bytes'] / GIB:.3f} | {r['bytes_read'] / GIB:.3f} | "
                     f"{r['jreshard_s']:.3f} | {r['raw_s']:.3f} | {r['jreshard_s'] / r['raw_s']:.2f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def render_save(data: dict[str, Any]) -> str:
    gib = data["model_bytes"] / GIB
    pre = f", pre-faulted {data['prefault_gib']:g} GiB" if data.get("prefault_gib") else ""
    layout = {"sharded": "JAX arrays on the (2, 4) mesh, 8 chunks per matrix", "single": "JAX arrays on one device"}
    lines = [(f"Save {gib:.3f} GiB as DCP ({layout.get(data['layout'], data['layout'])}; torch: the same tensors as "
             f"CPU tensors), median of {data.get('repeat', '?')}{pre}:\n"),
             "| contender | seconds | GiB/s | x jreshard | peak anon growth | file GiB |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    labels = {"jreshard": "**jreshard `save_dcp`**", "torch": "torch `dcp.save`"}
    jr = data["summary"]["jreshard"]["seconds"]
    for name, s in data["summary"].items():
        lines.append(f"| {labels.get(name, name)} | {s['seconds']:.3f} | {s['gib_per_s']:.2f} | {s['seconds'] / jr:.2f} "
                     f"| {s['peak_anon_delta_mib']:.0f} MiB | {s['file_bytes'] / GIB:.3f} |")  # fmt: skip
    if data.get("verified"):
        lines += ["", f"torch's `dcp.load` read jreshard's checkpoint back: all {data['verified']} tensors equal."]
    return "\n".join(lines) + "\n"


def render_machine(data: dict[str, dict[str, Any]], run: dict[str, Any] | None) -> str:
    m = next(d["machine"] for d in data.values() if "machine" in d)
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
    mem = f"{m['mem_total_gib']:.1f} GiB RAM" if m.get("mem_total_gib") else "RAM unknown"
    loads = ", ".join(f"{name}.py {d['machine']['load_average']:.2f}" for name, d in data.items() if "machine" in d)
    one_run = run is not None and set(data) <= set(run["times"])
    if not one_run:  # tables from different runs (--only, or JSON written by the scripts themselves)
        m = {**m, "date": ", ".join(f"{name}.py {d['machine']['date']}" for name, d in data.items() if "machine" in d)}
    took = ""
    if run:
        times = run["times"]
        took = (f" Made by `{run['command']}`, which took "
                + ", ".join(f"{name}.py {t / 60:.1f} min" for name, t in times.items())
                + f" ({sum(times.values()) / 60:.1f} min in all).")  # fmt: skip
    return (f"Measured {'from ' if one_run else ''}{m['date']} on this project's development machine: {m['cpu_count']} CPUs ({m['cpu_model']}), "
            f"{mem}, Linux {m['kernel']}, Python {m['python']}; {versions}; jreshard at {m.get('commit') or '?'}. "
            f"It is a shared virtual machine: other work ran beside the benchmark (load average at the start: "
            f"{loads}), so the figures are noisy; the ranges show by how much.{took}\n")  # fmt: skip


# ------------------------------------------------------------------------------ README


def replace_block(text: str, name: str, body: str) -> str:
    """``text`` with the lines between ``<!-- bench:NAME:start -->`` and ``<!-- bench:NAME:end -->`` replaced by
    ``body``; raises SystemExit when the markers are missing or out of order."""
    start, end = f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"
    pattern = re.compile(re.escape(start) + r"\n.*?" + re.escape(end), re.DOTALL)
    if text.count(start) != 1 or text.count(end) != 1 or not pattern.search(text):
        raise SystemExit(f"README: expected exactly one {start} ... {end} pair (each on its own line)")
    return pattern.sub(lambda _: f"{start}\n{body.rstrip()}\n{end}", text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=3, help="runs per contender in every script (default 3)")
    p.add_argument("--size-gib", type=float, default=1.5, help="model size (default 1.5)")
    p.add_argument("--workdir", default="/tmp/jreshard-bench", help="checkpoints (default /tmp/jreshard-bench)")
    p.add_argument("--results", help="where the scripts' JSON goes (default WORKDIR/results)")
    p.add_argument("--only", action="append", choices=SCRIPTS, help="run only this script (repeatable)")
    p.add_argument("--no-run", dest="run", action="store_false", help="only re-render from the JSON of the last run")
    p.add_argument("--full", action="store_true",
                   help="cold-cache runs for every restore contender (default: not for " + ", ".join(COLD_SKIP) + ")")
    p.add_argument("--readme", default=str(README), help="the README to rewrite (default the repository's)")
    args = p.parse_args(argv)
    args.workdir = str(Path(args.workdir).resolve())
    args.results = args.results or str(Path(args.workdir) / "results")

    which = list(args.only or SCRIPTS)
    run_file = Path(args.results) / "run.json"
    if args.run:
        run = {"command": " ".join(["python", "benchmarks/readme.py", *(sys.argv[1:] if argv is None else argv)]),
               "times": run_scripts(which, args)}
        run_file.write_text(json.dumps(run))
    else:
        run = json.loads(run_file.read_text()) if run_file.exists() else None
    data = {}
    for name in SCRIPTS:
        path = Path(args.results) / f"{name}.json"
        if path.exists():
            data[name] = json.loads(path.read_text())
    if not data:
        raise SystemExit(f"no results under {args.results}: run without --no-run first")
    readme = Path(args.readme)
    text = readme.read_text()
    renderers = {"restore": [("restore", render_restore), ("convert", render_convert)],
                 "partial": [("partial", render_partial)], "save": [("save", render_save)]}  # fmt: skip
    for script, blocks in renderers.items():
        if script in data:
            for block, render in blocks:
                text = replace_block(text, block, render(data[script]))
    text = replace_block(text, "machine", render_machine(data, run))
    readme.write_text(text)
    print(f"\n{readme}: tables rewritten from {', '.join(f'{n}.json' for n in data)} in {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
