"""The ``jreshard`` command: ``inspect`` a checkpoint, ``plan`` a load onto a mesh, run the ``demo``, ``convert``.

    jreshard demo [SOURCE]                      # the bundled sample onto 8 CPU devices, printing what went where
    jreshard inspect PATH_OR_URL                # tensors, dtypes, chunks, objects
    jreshard plan PATH_OR_URL --mesh data=2,model=4 --rules RULES   # bytes per process, without reading
    jreshard convert PATH_OR_URL DEST [--max-inflight 256MiB]       # into a native Orbax checkpoint

Every command takes ``--json`` (one JSON document on stdout). Built on typer and rich, the ``cli`` extra
(``pip install 'jreshard[cli]'``), imported only when the command runs: ``import jreshard`` never needs them.
Errors a user can cause print one line, ``jreshard: <message>``, on stderr and exit 2.
"""

import json
import os
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

from .errors import InvalidArgumentError, JReshardError

EXTRA_MISSING = "jreshard: the command line needs its extra: pip install 'jreshard[cli]'"
DEFAULT_MESH = "data=2,model=4"
MAX_FAKE_DEVICES = 1024  # CPU devices the command asks XLA for at most (each costs memory and start-up time)
MAX_PNG_SIDE = 16384
EXIT_USAGE = 2
EXIT_BROKEN_PIPE = 141  # what a shell reports for a command ended by SIGPIPE (128 + 13)


# -- pieces the commands share ------------------------------------------------------------------------------


def _ensure_cpu_devices(n: int) -> None:
    """Ask XLA for at least ``n`` host devices (only effective before jax is imported)."""
    if "jax" in sys.modules:
        return
    flags = os.environ.get("XLA_FLAGS", "")
    m = re.search(r"--xla_force_host_platform_device_count=(\d+)", flags)
    if m is None:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
    elif int(m.group(1)) < n:
        os.environ["XLA_FLAGS"] = flags.replace(m.group(0), f"--xla_force_host_platform_device_count={n}")


def _reserve_devices(axes: dict[str, int]) -> int:
    """The number of devices the mesh ``axes`` needs, asked of XLA as CPU devices (before jax starts)."""
    import math

    n = math.prod(axes.values())
    if n > MAX_FAKE_DEVICES:
        text = ",".join(f"{a}={s}" for a, s in axes.items())
        raise InvalidArgumentError(f"the mesh {text} needs {n} devices; the command makes at most "
                                   f"{MAX_FAKE_DEVICES} CPU devices to stand in for them (jreshard plan plans a "
                                   "larger mesh as an abstract one: give --devices-per-process N)")
    _ensure_cpu_devices(n)
    return n


def _mesh(axes: dict[str, int]) -> Any:
    """A ``Mesh`` of ``axes`` (name -> size) over the first devices JAX has, or over CPU devices when there are
    not enough (XLA is asked for as many before jax is imported)."""
    n = _reserve_devices(axes)
    text = ",".join(f"{a}={s}" for a, s in axes.items())
    import jax
    import numpy as np
    from jax.sharding import Mesh

    devices = jax.devices()
    if len(devices) < n:
        try:
            cpus = jax.devices("cpu")
        except RuntimeError:  # JAX_PLATFORMS leaves no CPU backend
            cpus = []
        if len(cpus) < n:
            seen = (f"{len(cpus)} CPU device(s)" if devices[0].platform == "cpu"
                    else f"{len(devices)} {devices[0].platform} device(s) and {len(cpus)} CPU device(s)")
            raise InvalidArgumentError(
                f"the mesh {text} needs {n} devices; jax sees {seen} (run the command in a fresh process, with no "
                "smaller --xla_force_host_platform_device_count in XLA_FLAGS and the cpu platform in JAX_PLATFORMS)")
        devices = cpus
    return Mesh(np.array(devices[:n]).reshape(tuple(axes.values())), tuple(axes))


def _enable_x64() -> None:
    """Keep 64-bit saved dtypes as they are (JAX narrows them to 32 bits while its 64-bit types are off)."""
    import jax

    jax.config.update("jax_enable_x64", True)


def default_target(ckpt: Any, mesh: Any) -> dict[str, Any]:
    """A target for every tensor by the default rule: the first dim over the first mesh axis and the second over
    the second, where they divide evenly; not sharded otherwise. Kept for older code: it is
    :func:`jreshard.target_for` without rules.

    Example:
        >>> import jax, numpy as np, jreshard
        >>> from jax.sharding import Mesh
        >>> mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
        >>> t = default_target(jreshard.open(jreshard.sample_path()), mesh)
        >>> t["model.embed.weight"].sharding.spec
        P('data', 'model')
    """
    from .rules import target_for

    return target_for(ckpt, mesh)


def _human(n: float) -> str:
    from .planning import _human as human

    return human(n, 1)


def parse_size(text: str) -> int:
    """Bytes from ``"256MiB"``, ``"1.5GiB"``, ``"64M"``, ``"1G"``, ``"4096"`` (binary units).

    Example:
        >>> parse_size("256MiB"), parse_size("1.5G"), parse_size("4096")
        (268435456, 1610612736, 4096)
    """
    t = text.strip().lower().replace(" ", "")
    for suffix, mult in (("kib", 2**10), ("mib", 2**20), ("gib", 2**30), ("tib", 2**40), ("k", 2**10),
                         ("m", 2**20), ("g", 2**30), ("t", 2**40), ("b", 1)):
        if t.endswith(suffix):
            t, scale = t[: -len(suffix)], mult
            break
    else:
        scale = 1
    try:
        value = float(t) * scale
    except ValueError:
        raise InvalidArgumentError(f"not a size: {text!r} (e.g. 256MiB, 1GiB, 4096)") from None
    if not value >= 1 or value == float("inf"):
        raise InvalidArgumentError(f"a size must be at least one byte, not {text!r}")
    return int(value)


def parse_pixels(text: str) -> tuple[int, int]:
    """``(width, height)`` from ``"800x600"``.

    Example:
        >>> parse_pixels("800x600")
        (800, 600)
    """
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not m or not (1 <= int(m.group(1)) <= MAX_PNG_SIDE and 1 <= int(m.group(2)) <= MAX_PNG_SIDE):
        raise InvalidArgumentError(f"--png-size {text!r}: expected WIDTHxHEIGHT in pixels, each 1 to {MAX_PNG_SIDE} "
                                   "(e.g. 800x600)")
    return int(m.group(1)), int(m.group(2))


def _console() -> Any:
    """A rich console on stdout: plain (no colour, no wrapping at 80 columns) when stdout is not a terminal."""
    from rich.console import Console

    terminal = sys.stdout.isatty()
    return Console(highlight=False, soft_wrap=True, width=None if terminal or os.environ.get("COLUMNS") else 200)


def _text(value: Any) -> Any:
    from rich.text import Text

    return Text(str(value))  # never read as rich markup: names may hold [brackets]


def _emit_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, default=repr) + "\n")


def _value(v: Any) -> Any:
    """A saved object as JSON can hold it (its repr when JSON cannot)."""
    try:
        json.dumps(v, allow_nan=False)
        return v
    except (TypeError, ValueError):
        return repr(v)


def _mesh_and_rules(mesh: str | None, axes: str | None, rules: str | None,
                    reserve: bool = True) -> tuple[dict[str, int], Any]:
    """The mesh shape (``--mesh``, else the rules file's ``[mesh]``, else 2x4) and the parsed rules (None: the
    default rule), all checked before jax starts (whose CPU devices are asked for first, unless not
    ``reserve``: an abstract mesh)."""
    from .rules import _is_file, mesh_from_rules_file, parse_mesh, parse_rules

    axis_names = None if axes is None else [a.strip() for a in axes.split(",")]
    if mesh is not None:
        shape = parse_mesh(mesh, axis_names)
    else:
        shape = mesh_from_rules_file(rules) if rules is not None and _is_file(rules) else None
        if shape is None:
            shape = parse_mesh("2x4", axis_names) if axis_names else parse_mesh(DEFAULT_MESH)
        elif axis_names is not None:
            raise InvalidArgumentError("--axes names the dims of a --mesh like 2x4; the rules file's [mesh] "
                                       "names its axes already")
    if reserve:
        _reserve_devices(shape)
    return shape, None if rules is None else parse_rules(rules)


def _process_row(p: Any) -> dict[str, Any]:
    return {"bytes_needed": p.bytes_needed, "bytes_to_read": p.bytes_to_read, "num_reads": p.num_reads,
            "pieces": p.pieces, "amplification": p.amplification}


def _tensor_rows(plan: Any, target: dict[str, Any], pid: int) -> dict[str, dict[str, Any]]:
    from .rules import format_spec

    rows = {}
    counters = plan.processes[pid].tensors
    by_tensor = getattr(plan, "by_tensor", None)  # this process's bytes read, shared among the targets
    read = by_tensor() if by_tensor is not None and pid == getattr(plan, "planned", plan.this_process) else {}
    for name, sds in target.items():
        c = counters.get(name)
        if c is None:
            continue
        rows[name] = {"dtype": str(sds.dtype), "shape": list(sds.shape), "spec": format_spec(sds.sharding.spec),
                      "pieces": c["pieces"], "bytes_needed": c["bytes_needed"],
                      "as_saved": bool(plan.as_saved.get(name, False))}
        if name in read:
            rows[name]["bytes_to_read"] = read[name].bytes_to_read
    return rows


def _plan_json(plan: Any, target: dict[str, Any], pid: int) -> dict[str, Any]:
    return {"source": plan.source, "this_process": plan.this_process, "process": pid,
            "processes": {str(k): _process_row(p) for k, p in sorted(plan.processes.items())},
            "tensors": _tensor_rows(plan, target, pid)}


def _print_plan(console: Any, plan: Any, target: dict[str, Any], pid: int) -> None:
    from rich.table import Table

    table = Table(title="per process", title_justify="left")
    for col in ("process", "shards", "needed", "to read", "reads", "amplification"):
        table.add_column(col, justify="right")
    for k, p in sorted(plan.processes.items()):
        table.add_row(f"{k}{'*' if k == pid else ''}", str(p.pieces), _human(p.bytes_needed),
                      _human(p.bytes_to_read), str(p.num_reads), f"{p.amplification:.2f}")
    if len(plan.processes) > 1:
        p = plan.total()
        table.add_row("all", str(p.pieces), _human(p.bytes_needed), _human(p.bytes_to_read), str(p.num_reads),
                      f"{p.amplification:.2f}")
    console.print(table)
    rows = _tensor_rows(plan, target, pid)
    table = Table(title=f"per tensor, process {pid}", title_justify="left")
    table.add_column("tensor", no_wrap=True)
    for col in ("dtype", "shape", "spec"):
        table.add_column(col)
    for col in ("shards", "needed", "to read"):
        table.add_column(col, justify="right")
    table.add_column("as saved")
    for name, r in rows.items():
        table.add_row(_text(name), r["dtype"], _text(tuple(r["shape"])), _text(r["spec"] or "(replicated)"),
                      str(r["pieces"]), _human(r["bytes_needed"]),
                      _human(r["bytes_to_read"]) if "bytes_to_read" in r else "", "yes" if r["as_saved"] else "")
    console.print(table)
    if plan.as_saved:
        same = sum(plan.as_saved.values())
        console.print(_text(f"{same} of {len(plan.as_saved)} tensors have target shards equal to their saved chunks"))


def _picture(plan: Any, name: str) -> Any:
    draw = getattr(plan, "picture", None)
    if draw is None:
        raise InvalidArgumentError("--tensor/--png: this jreshard cannot draw plans (it has no Plan.picture)")
    return draw(name)


# -- the commands -------------------------------------------------------------------------------------------


def cmd_inspect(source: str, as_json: bool) -> int:
    import jreshard

    from .spec import saved_grid

    ckpt = jreshard.open(source)
    try:
        objects = dict(ckpt.objects)
        if as_json:
            _emit_json({
                "source": ckpt.source, "format": ckpt.format.format_name,
                "tensors": {name: {"dtype": str(info.dtype), "shape": list(info.shape), "nbytes": info.nbytes,
                                   "chunks": [{"offsets": list(c.offsets), "sizes": list(c.sizes)}
                                              for c in info.chunks]}
                            for name, info in ckpt.tensors.items()},
                "objects": {k: _value(v) for k, v in objects.items()}})
            return 0
        from rich.table import Table

        console = _console()
        console.print(_text(repr(ckpt)))
        table = Table()
        table.add_column("tensor", no_wrap=True)
        for col in ("dtype", "shape"):
            table.add_column(col)
        table.add_column("size", justify="right")
        table.add_column("chunks", justify="right")
        table.add_column("grid")
        for name, info in ckpt.tensors.items():
            grid = saved_grid(info)
            layout = "x".join(str(len(c) - 1) for c in grid) if grid and info.shape else ""
            table.add_row(_text(name), str(info.dtype), _text(info.shape), _human(info.nbytes), str(len(info.chunks)),
                          layout)
        console.print(table)
        if objects:
            table = Table()
            table.add_column("object", no_wrap=True)
            table.add_column("value")
            for name, value in objects.items():
                table.add_row(_text(name), _text(f"{value!r:.80}"))
            console.print(table)
        return 0
    finally:
        ckpt.close()


def _process_arg(text: str | int | None) -> int | str | None:
    """``--process``: None, ``"all"`` or a process number.

    Example:
        >>> _process_arg("all"), _process_arg("137"), _process_arg(None)
        ('all', 137, None)
    """
    if text is None or isinstance(text, int):
        return text
    t = text.strip().lower()
    if t == "all":
        return "all"
    if not t.isdigit():
        raise InvalidArgumentError(f"--process must be a process number (0, 1, ...) or 'all', not {text!r}")
    return int(t)


def cmd_plan(source: str, mesh: str | None, axes: str | None, rules: str | None, process: int | str | None,
             tensor: str | None, png: str | None, png_size: str, max_inflight: str | None, as_json: bool,
             devices_per_process: int | None = None) -> int:
    import jreshard

    from .rules import format_spec, target_for

    asked = _process_arg(process)
    if devices_per_process is not None and devices_per_process <= 0:
        raise InvalidArgumentError(f"--devices-per-process must be a positive number, not {devices_per_process}")
    # With --devices-per-process the mesh is abstract (its devices need not exist here): what a host of a
    # multi-host job reads is planned on any machine.
    shape, parsed = _mesh_and_rules(mesh, axes, rules, reserve=devices_per_process is None)
    pixels = parse_pixels(png_size)
    limit = None if max_inflight is None else parse_size(max_inflight)
    if png is not None and tensor is None:
        raise InvalidArgumentError("--png draws one tensor: give it with --tensor NAME")
    if devices_per_process is None:
        m = _mesh(shape)
    else:
        from jax.sharding import AbstractMesh

        m = AbstractMesh(tuple(shape.values()), tuple(shape))
    _enable_x64()
    ckpt = jreshard.open(source)
    try:
        if tensor is not None:
            ckpt.tensor(tensor)  # an unknown name fails here, naming the closest ones
        target = target_for(ckpt, m, parsed)
        plan = jreshard.plan(ckpt, target, max_inflight_bytes=limit, process_index=asked,
                             devices_per_process=devices_per_process)
    finally:
        ckpt.close()
    pid = plan.planned
    if pid not in plan.processes:
        raise InvalidArgumentError(f"--process {pid}: the plan spans the processes {sorted(plan.processes)}")
    picture = None if tensor is None else _picture(plan, tensor)
    console = _console()
    text = None
    if picture is not None:
        plain = "utf" not in (getattr(sys.stdout, "encoding", None) or "").lower()
        text = picture.text(width=min(console.width, 120), height=24, **({"ascii": True} if plain else {}))
    if png is not None:
        picture.save_png(png, width=pixels[0], height=pixels[1])
    if as_json:
        doc = {"mesh": shape, "rules": None if parsed is None else [[p, format_spec(s)] for p, s in parsed],
               **_plan_json(plan, target, pid)}
        if text is not None:
            doc["picture"] = {"tensor": tensor, "text": text, "png": png}
        _emit_json(doc)
        return 0
    if devices_per_process is None:
        where = f"{m.devices.size} {m.devices.flat[0].platform} devices"
    else:
        n = m.size
        where = (f"an abstract mesh of {n} devices, {devices_per_process} per process: "
                 f"{n // devices_per_process} processes")
    console.print(_text(f"jreshard plan for {plan.source}: mesh {','.join(f'{a}={s}' for a, s in shape.items())} "
                        f"({where}), "
                        + ("default rule (dim i over mesh axis i where it divides)" if parsed is None
                           else f"{len(parsed)} rule(s), unmatched names replicated")))
    _print_plan(console, plan, target, pid)
    if text is not None:
        sys.stdout.write(text.rstrip("\n") + "\n")
    if png is not None:
        console.print(_text(f"wrote {png} ({pixels[0]}x{pixels[1]} pixels)"))
    return 0


def cmd_demo(source: str | None, mesh: str | None, rules: str | None, as_json: bool) -> int:
    import numpy as np

    import jreshard

    from .rules import format_spec, target_for

    shape, parsed = _mesh_and_rules(mesh, None, rules)
    m = _mesh(shape)
    _enable_x64()
    ckpt = jreshard.open(source or jreshard.sample_path())
    try:
        target = target_for(ckpt, m, parsed)
        plan = jreshard.plan(ckpt, target)
        before = (ckpt.io_stats.bytes_read, ckpt.io_stats.num_reads)
        arrays = jreshard.load(ckpt, target)
        read = (ckpt.io_stats.bytes_read - before[0], ckpt.io_stats.num_reads - before[1])
        objects = dict(ckpt.objects)
        ok = all(np.array_equal(np.asarray(a), ckpt.read(n), equal_nan=a.dtype.kind in "fc") for n, a in arrays.items())
    finally:
        ckpt.close()
    tensors = {}
    for name, arr in arrays.items():
        info = ckpt.tensors[name]
        placed: dict[str, list[int]] = {}
        for shard in arr.addressable_shards:
            key = ",".join(f"{s.start or 0}:{s.stop if s.stop is not None else d}"
                           for s, d in zip(shard.index, info.shape))
            placed.setdefault(f"[{key}]", []).append(shard.device.id)
        tensors[name] = {"dtype": str(info.dtype), "shape": list(info.shape),
                         "saved_chunks": [[[o, o + s] for o, s in zip(c.offsets, c.sizes)] for c in info.chunks],
                         "spec": format_spec(arr.sharding.spec), "placed": placed}
    if as_json:
        _emit_json({"source": ckpt.source, "mesh": shape, "tensors": tensors,
                    "objects": {k: _value(v) for k, v in objects.items()}, "plan": _plan_json(plan, target, 0),
                    "bytes_read": read[0], "num_reads": read[1], "equal_to_whole_read": ok})
        return 0 if ok else 1
    console = _console()
    console.print(_text(f"checkpoint: {ckpt!r}"))
    console.print(_text(f"target mesh: {dict(m.shape)} over {m.devices.size} {m.devices.flat[0].platform} devices\n"))
    for name, t in tensors.items():
        saved = ", ".join("[" + ",".join(f"{a}:{b}" for a, b in c) + "]" for c in t["saved_chunks"])
        console.print(_text(f"{name}  {t['dtype']} {tuple(t['shape'])}\n  saved chunks: {saved}\n"
                            f"  target: {t['spec'] or '(replicated)'}\n  placed: "
                            + "; ".join(f"{k} -> devices {v}" for k, v in t["placed"].items())))
    for name, value in objects.items():
        console.print(_text(f"{name} = {value!r}"))
    console.print()
    _print_plan(console, plan, target, plan.this_process)
    console.print(_text(f"bytes read: {read[0]} in {read[1]} reads; all tensors equal to a whole read: {ok}"))
    return 0 if ok else 1


def cmd_convert(source: str, dest: str, max_inflight: str, quiet: bool, sync: bool, as_json: bool) -> int:
    from .write_orbax import convert, work_dir_of

    limit = parse_size(max_inflight)
    t0 = time.perf_counter()
    try:
        out = convert(source, dest, max_inflight_bytes=limit, progress=not quiet, sync_files=sync)
    except KeyboardInterrupt:
        sys.stderr.write(f"\njreshard: convert interrupted; nothing was left at {dest} "
                         f"(partial output in {work_dir_of(dest)} removed)\n")
        return 130
    if as_json:
        _emit_json({"source": source, "dest": out, "seconds": time.perf_counter() - t0})
    if not quiet:
        print(f"jreshard: wrote the Orbax checkpoint {out}; restore it with "
              "orbax.checkpoint.StandardCheckpointer().restore(path, abstract_tree)", file=sys.stderr)
    return 0


# -- typer --------------------------------------------------------------------------------------------------

_PLAN_HELP = """Bytes each process would read to load every tensor of SOURCE onto a mesh, without reading them.

The target is what jreshard.target_for(ckpt, mesh, rules) gives: every saved tensor, with its saved dtype, sharded
by the first rule whose pattern (a regular expression) is found in its name, replicated when none is (without
--rules: dim i over mesh axis i where it divides). The figures come from jreshard.plan, the program jreshard.load
runs. The mesh uses CPU devices when the machine has fewer devices (at most 1024); with --devices-per-process N
it is an abstract mesh (any size, no devices needed) whose process k holds the devices k*N ... (k+1)*N-1 in
row-major order. --process K plans process K only (default: this one); --process all plans every process one
after the other and lists each one's figures and their sum.

RULES: a TOML file ([rules] 'pattern' = "spec" in order, and an optional [mesh] axis = size table) or inline
PATTERN=SPEC pairs separated by ';'. A spec is comma-separated entries: an axis name, _ (not sharded), or a+b /
(a,b) for several axes on one dim; e.g. 'embed\\.weight$=model,_;\\.w\\d$=data,model'.

--json prints one document: {"mesh": {axis: size}, "rules": [[pattern, spec]] or null, "source", "this_process",
"process", "processes": {"<pid>": {"bytes_needed", "bytes_to_read", "num_reads", "pieces", "amplification"}},
"tensors": {name: {"dtype", "shape", "spec", "pieces", "bytes_needed", "as_saved", and for this process
"bytes_to_read": the bytes of the requests shared among the tensors they feed}} (of --process), and with
--tensor "picture": {"tensor", "text", "png"}}.
"""

_INSPECT_HELP = """Tensors (dtype, shape, size, saved chunks and their grid) and saved objects of SOURCE; reads metadata
only.

--json prints one document: {"source", "format", "tensors": {name: {"dtype", "shape", "nbytes", "chunks":
[{"offsets", "sizes"}]}}, "objects": {name: value (its repr when JSON cannot hold it)}}.
"""

_DEMO_HELP = """Load SOURCE (default: the sample bundled with jreshard) onto a mesh of CPU devices (default
data=2,model=4) and print what went where, the plan, and a check against whole reads.

--json prints one document: {"source", "mesh", "tensors": {name: {"dtype", "shape", "saved_chunks", "spec",
"placed": {"[a:b,...]": [device ids]}}}, "objects", "plan" (as plan --json), "bytes_read", "num_reads",
"equal_to_whole_read"}. Exit status 1 when a tensor differs from its whole read.
"""

_CONVERT_HELP = """Convert every saved tensor of SOURCE (dtypes as saved) into an Orbax checkpoint at DEST: a nested
dict of the dotted names, written batch by batch under --max-inflight and renamed onto DEST when complete (Ctrl-C
or a crash leaves no DEST).

--json prints one document: {"source", "dest" (absolute), "seconds"}; progress stays on stderr.
"""


def _version(value: bool) -> None:
    if value:
        import typer

        from . import __version__

        sys.stdout.write(f"jreshard {__version__}\n")
        raise typer.Exit(0)


def _app() -> Any:
    """The typer application (built on demand: typer is imported only when the command runs)."""
    from typing import Annotated

    import typer

    def opt(metavar: str, text: str) -> Any:
        return typer.Option(metavar=metavar, help=text)

    app = typer.Typer(name="jreshard", help="PyTorch checkpoints (DCP, safetensors, torch.save) onto JAX meshes.",
                      add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                      rich_markup_mode=None, context_settings={"help_option_names": ["-h", "--help"]})
    Source = Annotated[str, typer.Argument(metavar="SOURCE", help="a checkpoint path or URL")]
    Json = Annotated[bool, typer.Option("--json", help="print one JSON document on stdout (its shape is above)")]
    Mesh = Annotated[str | None, opt("MESH", "the mesh: data=2,model=4 (names and sizes), or 2x4 (axes data, model, "
                                     "x, y) [default: the rules file's [mesh], else data=2,model=4]")]
    Rules = Annotated[str | None, opt("RULES", "sharding rules: a TOML file or PATTERN=SPEC;... "
                                      "(see jreshard plan --help)")]
    Version = Annotated[bool | None, typer.Option("--version", callback=_version, is_eager=True,
                                                  help="print the version and exit")]

    @app.callback()
    def top(version: Version = None) -> None:
        """PyTorch checkpoints (DCP, safetensors, torch.save) onto JAX meshes."""

    @app.command("inspect", help=_INSPECT_HELP)
    def inspect_(source: Source, as_json: Json = False) -> int:
        return cmd_inspect(source, as_json)

    @app.command("plan", help=_PLAN_HELP)
    def plan_(source: Source, mesh: Mesh = None,
              axes: Annotated[str | None, opt("AXES", "axis names for a --mesh like 2x4 (e.g. fsdp,tp)")] = None,
              rules: Rules = None,
              process: Annotated[str | None, opt("K", "the process planned and whose tensors are listed, or "
                                                 "'all': every process, one after the other "
                                                 "[default: this one]")] = None,
              devices_per_process: Annotated[int | None, typer.Option(
                  "--devices-per-process", metavar="N",
                  help="plan the mesh as an abstract one (its devices need not exist here) whose process k holds "
                       "devices k*N ... (k+1)*N-1 in row-major order, e.g. --mesh data=64,model=32 "
                       "--devices-per-process 8 --process 137")] = None,
              tensor: Annotated[str | None, opt("NAME", "draw this tensor's saved chunks against its "
                                                "target shards")] = None,
              png: Annotated[str | None, opt("FILE", "write the drawing of --tensor as a PNG file")] = None,
              png_size: Annotated[str, opt("WxH", "the PNG's WIDTHxHEIGHT in pixels")] = "800x600",
              max_inflight: Annotated[str | None, opt("SIZE", "the load's max_inflight_bytes (e.g. 256MiB) "
                                                      "[default: the load's, 2GiB]")] = None,
              as_json: Json = False) -> int:
        return cmd_plan(source, mesh, axes, rules, process, tensor, png, png_size, max_inflight, as_json,
                        devices_per_process)

    @app.command("demo", help=_DEMO_HELP)
    def demo_(source: Annotated[str | None, typer.Argument(metavar="SOURCE", help="a checkpoint path or URL "
                                                            "[default: the bundled sample]")] = None,
              mesh: Mesh = None, rules: Rules = None, as_json: Json = False) -> int:
        return cmd_demo(source, mesh, rules, as_json)

    @app.command("convert", help=_CONVERT_HELP)
    def convert_(source: Source,
                 dest: Annotated[str, typer.Argument(metavar="DEST", help="the Orbax checkpoint directory to create "
                                                     "(must not exist; a local path)")],
                 max_inflight: Annotated[str, opt("SIZE", "bytes of arrays loaded at once (e.g. 1GiB)")] = "256MiB",
                 quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")] = False,
                 sync: Annotated[bool, typer.Option("--sync", help="fsync every file before the checkpoint is "
                                                    "renamed into place (survives a power loss; slower)")] = False,
                 as_json: Json = False) -> int:
        return cmd_convert(source, dest, max_inflight, quiet, sync, as_json)

    return app


class _StdoutClosed(Exception):
    """stdout's reader went away (``jreshard inspect X | head -1``). Not an OSError, so that neither typer nor rich
    turns it into an exit of their own on the way up to :func:`main`."""


class _Stdout:
    """``sys.stdout`` while a command runs: a broken pipe raises :class:`_StdoutClosed`."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            raise _StdoutClosed() from None

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            raise _StdoutClosed() from None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _fail(message: str) -> None:
    sys.stderr.write("jreshard: " + " ".join(str(message).split()) + "\n")


def _quiet_stdout() -> None:
    """After a broken pipe: stdout onto /dev/null, so that the flush at exit does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout is not a real file (e.g. under doctest)
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``jreshard`` command: runs it with ``argv`` (default ``sys.argv[1:]``) and returns
    the exit status (0 success, 2 a usage error or a jreshard error, 1 an I/O error, 141 stdout closed early).

    Example:
        >>> main(["inspect", __import__("jreshard").sample_path()])  # doctest: +ELLIPSIS
        <jreshard.Checkpoint dcp ...
        0
        >>> main(["plan", __import__("jreshard").sample_path(), "--mesh", "2,4"])
        2
    """
    try:
        import rich  # noqa: F401
        import typer
    except ImportError:
        sys.stderr.write(EXTRA_MISSING + "\n")
        return EXIT_USAGE
    args = list(sys.argv[1:] if argv is None else argv)
    command = typer.main.get_command(_app())
    click_error = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
    stdout = sys.stdout
    sys.stdout = _Stdout(stdout)
    try:
        try:
            rv = command.main(args=args, prog_name="jreshard", standalone_mode=False)
        finally:
            sys.stdout.flush()
    except _StdoutClosed:
        _quiet_stdout()
        return EXIT_BROKEN_PIPE
    except JReshardError as e:
        _fail(f"{type(e).__name__}: {e}")
        return EXIT_USAGE
    except click_error as e:
        if type(e).__name__ == "NoArgsIsHelpError":
            sys.stdout.write(e.format_message() + "\n")
        else:
            _fail(e.format_message() + ("" if e.exit_code != EXIT_USAGE else " (see jreshard --help)"))
        return e.exit_code
    except typer.Abort:
        _fail("aborted")
        return 130
    except OSError as e:
        _fail(str(e))
        return 1
    finally:
        sys.stdout = stdout
    return rv if isinstance(rv, int) else 0


if __name__ == "__main__":
    sys.exit(main())
