"""The ``jreshard`` command: ``inspect`` a checkpoint, ``plan`` a load onto a mesh, run the ``demo``.

    jreshard demo                       # the bundled sample onto 8 CPU devices, printing what went where
    jreshard inspect PATH_OR_URL        # tensors, dtypes, chunks, objects
    jreshard plan PATH_OR_URL --mesh 2x4 [--axes data,model]   # bytes per process, without reading
    jreshard convert PATH_OR_URL DEST [--max-inflight 256MiB]  # into a native Orbax checkpoint
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Sequence


def _ensure_cpu_devices(n: int) -> None:
    """Ask XLA for ``n`` host devices (only effective before jax is imported)."""
    if "jax" in sys.modules:
        return
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


def _mesh(shape: Sequence[int], axes: Sequence[str]) -> Any:
    import jax
    import numpy as np
    from jax.sharding import Mesh

    n = int(np.prod(shape))
    devices = jax.devices()
    if len(devices) < n:
        raise SystemExit(f"the mesh {tuple(shape)} needs {n} devices; jax sees {len(devices)}")
    return Mesh(np.array(devices[:n]).reshape(tuple(shape)), tuple(axes))


def default_target(ckpt: Any, mesh: Any) -> dict[str, Any]:
    """A target for every tensor: the first dim over the first mesh axis and the second over the second,
    where they divide evenly; replicated otherwise.

    Example:
        >>> import jax, numpy as np, jreshard
        >>> from jax.sharding import Mesh
        >>> mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
        >>> t = default_target(jreshard.open(jreshard.sample_path()), mesh)
        >>> t["model.embed.weight"].sharding.spec
        P('data', 'model')
    """
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    out = {}
    for name, info in ckpt.tensors.items():
        spec = []
        for dim, axis in zip(info.shape, mesh.axis_names):
            spec.append(axis if dim % mesh.shape[axis] == 0 else None)
        out[name] = jax.ShapeDtypeStruct(info.shape, info.dtype, sharding=NamedSharding(mesh, P(*spec)))
    return out


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def cmd_inspect(args: argparse.Namespace) -> int:
    import jreshard

    ckpt = jreshard.open(args.source)
    print(ckpt)
    width = max((len(n) for n in ckpt.tensors), default=10)
    from .spec import saved_grid

    for name, info in ckpt.tensors.items():
        grid = saved_grid(info)
        layout = "x".join(str(len(c) - 1) for c in grid) + " grid" if grid and info.shape else ""
        print(f"  {name:<{width}}  {str(info.dtype):<14} {str(info.shape):<18} {_human(info.nbytes):>10}  "
              f"{len(info.chunks)} chunk(s) {layout}")
    for name, value in ckpt.objects.items():
        print(f"  {name:<{width}}  = {value!r:.80}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    import jreshard

    shape = [int(x) for x in args.mesh.split("x")]
    axes = args.axes.split(",") if args.axes else ["data", "model", "x", "y"][: len(shape)]
    mesh = _mesh(shape, axes)
    ckpt = jreshard.open(args.source)
    print(ckpt.plan(default_target(ckpt, mesh)))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import numpy as np

    import jreshard

    mesh = _mesh((2, 4), ("data", "model"))
    source = args.source or jreshard.sample_path()
    ckpt = jreshard.open(source)
    print(f"checkpoint: {ckpt}")
    print(f"target mesh: {dict(mesh.shape)} over {mesh.devices.size} {mesh.devices.flat[0].platform} devices\n")
    target = default_target(ckpt, mesh)
    plan = ckpt.plan(target)
    arrays = ckpt.load(target)
    for name, arr in arrays.items():
        info = ckpt.tensors[name]
        saved = ", ".join(f"[{','.join(f'{o}:{o + s}' for o, s in zip(c.offsets, c.sizes))}]" for c in info.chunks)
        print(f"{name}  {info.dtype} {info.shape}")
        print(f"  saved chunks: {saved}")
        print(f"  target: {arr.sharding.spec}")
        by_index: dict[str, list[int]] = {}
        for shard in arr.addressable_shards:
            key = ",".join(f"{s.start or 0}:{s.stop if s.stop is not None else d}" for s, d in zip(shard.index, info.shape))
            by_index.setdefault(f"[{key}]", []).append(shard.device.id)
        print("  placed: " + "; ".join(f"{k} -> devices {v}" for k, v in by_index.items()))
    for name, value in ckpt.objects.items():
        print(f"{name} = {value!r}")
    # Check against a plain whole-tensor read.
    ok = all(np.array_equal(np.asarray(a), ckpt.read(n)) for n, a in arrays.items())
    print(f"\n{plan}\nbytes read: {ckpt.io_stats.bytes_read} in {ckpt.io_stats.num_reads} reads; "
          f"all tensors equal to a whole read: {ok}")
    return 0 if ok else 1


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
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 256MiB, 1GiB, 4096)") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"a size must be at least one byte, not {text!r}")
    return int(value)


def cmd_convert(args: argparse.Namespace) -> int:
    from .write_orbax import convert, work_dir_of

    try:
        dest = convert(args.source, args.dest, max_inflight_bytes=args.max_inflight, progress=not args.quiet,
                       sync_files=args.sync)
    except KeyboardInterrupt:
        sys.stderr.write(f"\njreshard: convert interrupted; nothing was left at {args.dest} "
                         f"(partial output in {work_dir_of(args.dest)} removed)\n")
        return 130
    if not args.quiet:
        print(f"jreshard: wrote the Orbax checkpoint {dest}; restore it with "
              "orbax.checkpoint.StandardCheckpointer().restore(path, abstract_tree)", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``jreshard`` command.

    Example:
        >>> main(["inspect", __import__("jreshard").sample_path()])  # doctest: +ELLIPSIS
        <jreshard.Checkpoint dcp ...
        0
    """
    parser = argparse.ArgumentParser(prog="jreshard", description="PyTorch checkpoints onto JAX meshes.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="list tensors, dtypes, chunks and objects")
    p.add_argument("source")
    p.set_defaults(fn=cmd_inspect)
    p = sub.add_parser("plan", help="bytes each process would read, without reading")
    p.add_argument("source")
    p.add_argument("--mesh", default="2x4", help="mesh shape, e.g. 2x4 (default)")
    p.add_argument("--axes", default=None, help="mesh axis names, comma separated (default data,model)")
    p.set_defaults(fn=cmd_plan)
    p = sub.add_parser("demo", help="load the bundled sample onto a (2, 4) mesh of 8 CPU devices")
    p.add_argument("source", nargs="?", default=None)
    p.set_defaults(fn=cmd_demo)
    p = sub.add_parser("convert", help="convert into a native Orbax checkpoint (StandardCheckpointer layout)",
                       description="Convert every saved tensor (dtypes as saved) into an Orbax checkpoint at DEST: a "
                       "nested dict of the dotted names, written batch by batch under --max-inflight and renamed "
                       "onto DEST when complete (Ctrl-C or a crash leaves no DEST).")
    p.add_argument("source")
    p.add_argument("dest", help="the Orbax checkpoint directory to create (must not exist; a local path)")
    p.add_argument("--max-inflight", type=parse_size, default="256MiB",
                   help="bytes of arrays loaded at once (default 256MiB; e.g. 1GiB)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.add_argument("--sync", action="store_true",
                   help="fsync every file before the checkpoint is renamed into place (survives a power loss; slower)")
    p.set_defaults(fn=cmd_convert)
    args = parser.parse_args(argv)
    if args.command in ("demo", "plan"):
        _ensure_cpu_devices(8)
    try:
        return args.fn(args)
    except Exception as e:
        from .errors import JReshardError

        if isinstance(e, JReshardError):
            print(f"jreshard: {type(e).__name__}: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
