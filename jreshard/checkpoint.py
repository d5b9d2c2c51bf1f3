"""The public objects: :class:`Checkpoint` (open once, inspect, read, plan, load) and the load pipeline
that joins catalog -> plan -> read -> place."""

from __future__ import annotations

import difflib
import itertools
import math
import sys
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from types import MappingProxyType
from typing import Any, Callable, Iterable

import numpy as np

from . import place as _place
from .catalog import Locator, TensorInfo
from .errors import JReshardError, ShardingError, TargetMismatchError
from .plan import Piece, Plan, ProcessPlan, element_span, merge_runs, normalize_index, overlaps, pieces_of, runs_of
from .read import CopyJob, Executor
from .spec import matches_saved
from .storage import IOStats, Store

DEFAULT_INFLIGHT = 2 * 2**30


class Checkpoint:
    """An opened checkpoint. Use :func:`jreshard.open` to make one.

    Example:
        >>> import jreshard
        >>> ckpt = jreshard.open(jreshard.sample_path())
        >>> sorted(ckpt.tensors)[:2]
        ['model.embed.weight', 'model.head.bias']
    """

    def __init__(self, source: Any, fmt: Any, store: Store, io: str) -> None:
        self.source = str(source)
        self.format = fmt
        self.store = store
        self.io = io
        self._objects: dict[str, Any] | None = None
        self._locators: dict[tuple[str, int], Locator] = {}
        self._pool: ThreadPoolExecutor | None = None  # for read(); load() makes its own

    # -- inspection -------------------------------------------------------------------------------

    @property
    def tensors(self) -> Mapping[str, TensorInfo]:
        """Every saved tensor by name: shape, numpy dtype and saved chunks."""
        return MappingProxyType(self.format.tensors)

    @property
    def objects(self) -> Mapping[str, Any]:
        """The non-tensor entries (``step``, ``sched.lr`` ...), decoded by the allow-listed unpickler."""
        if self._objects is None:
            names = list(self.format.object_refs)
            self._objects = self.format.read_objects(names) if names else {}
        return MappingProxyType(self._objects)

    @property
    def io_stats(self) -> IOStats:
        """Bytes and requests read from storage by this checkpoint so far (headers included)."""
        return self.store.stats

    def __repr__(self) -> str:
        total = sum(t.nbytes for t in self.format.tensors.values())
        return (f"<jreshard.Checkpoint {self.format.format_name} {self.source!r}: {len(self.format.tensors)} tensors, "
                f"{total / 2**30:.3f} GiB, {len(getattr(self.format, 'object_refs', {}))} objects>")

    def close(self) -> None:
        """Release open files and threads."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        close = getattr(self.store, "close", None)
        if close:
            close()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- reading ----------------------------------------------------------------------------------

    def tensor(self, name: str) -> TensorInfo:
        try:
            return self.format.tensors[name]
        except KeyError:
            raise TargetMismatchError(_unknown(name, self.format.tensors, self.source)) from None

    def read(self, name: str, index: tuple[slice | int, ...] | None = None) -> np.ndarray:
        """Read tensor ``name`` (or the box ``index``: a tuple of step-1 slices and integers, as in numpy;
        integers drop their dimension) into a numpy array, reading only the saved bytes that overlap it.

        Example:
            >>> import jreshard
            >>> ckpt = jreshard.open(jreshard.sample_path())
            >>> ckpt.read("model.embed.weight", (slice(0, 2), slice(0, 3))).shape
            (2, 3)
        """
        info = self.tensor(name)
        try:
            box = normalize_index(index, info.shape)
        except (IndexError, TypeError, ValueError) as e:
            raise TargetMismatchError(f"{self.source}: tensor {name!r}: bad index {index!r}: {e}") from None
        piece = Piece(name, box, 0, [])
        dest = _place.aligned_empty(piece.shape, info.dtype)
        executor = Executor(self.store, self.io)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(executor.threads, thread_name_prefix="jreshard")
        self._fill([(info, piece, dest)], executor, self._pool)
        if index is not None and not isinstance(index, tuple):
            index = (index,)
        dropped = {d for d, s in enumerate(index or ()) if isinstance(s, (int, np.integer))}
        if dropped:
            return dest.reshape(tuple(n for d, n in enumerate(dest.shape) if d not in dropped))
        return dest

    def saved_sharding(self, name: str, mesh: Any) -> Any | None:
        """A ``NamedSharding`` over ``mesh`` whose shards are exactly the saved chunks of ``name`` (each device
        then reads one whole chunk), or None when no NamedSharding has those shards (e.g. torch's uneven
        splits) or ``mesh`` has no axes of the right sizes.

        Example:
            >>> import jax, numpy as np, jreshard
            >>> from jax.sharding import Mesh
            >>> ckpt = jreshard.open(jreshard.sample_path())
            >>> ckpt.saved_sharding("model.layers.0.b1", Mesh(np.array(jax.devices()[:1]), ("x",))).spec
            P(None,)
        """
        from jax.sharding import NamedSharding

        from .spec import saved_partition_spec

        spec = saved_partition_spec(self.tensor(name), mesh)
        return None if spec is None else NamedSharding(mesh, spec)

    # -- planning ---------------------------------------------------------------------------------

    def plan(self, target: Any, *, coalesce_gap: int = 256) -> Plan:
        """What :meth:`load` would read, per JAX process, without reading tensor bytes (headers only).

        Example:
            >>> import jax, jreshard
            >>> from jax.sharding import SingleDeviceSharding
            >>> ckpt = jreshard.open(jreshard.sample_path())
            >>> t = ckpt.tensors["model.embed.weight"]
            >>> p = ckpt.plan({t.name: jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=SingleDeviceSharding(jax.devices()[0]))})
            >>> p.bytes_needed == t.nbytes
            True
        """
        import jax

        entries, _ = _flatten_target(target)
        specs = [self._spec(name, leaf) for name, leaf in entries]
        processes: dict[int, ProcessPlan] = {}
        runs_by: dict[int, dict[str, list[tuple[np.ndarray, np.ndarray]]]] = {}
        whole: dict[int, set[tuple[str, int]]] = {}
        as_saved: dict[str, bool] = {}
        pieces: list[tuple[TensorInfo, Piece, list]] = []
        for spec in specs:
            if spec is None:
                continue
            info, sharding, _ = spec
            as_saved[info.name] = matches_saved(info, sharding)
            for piece in pieces_of(info.name, info.shape, sharding, addressable_only=False):
                pieces.append((info, piece, overlaps(info.chunks, piece.box)))
        # Header reads for every chunk any process reads by ranges, in one batch (whole-read items need none).
        located = self._locate((info, ov.chunk_id) for info, _, ovs in pieces for ov in ovs
                               if info.chunks[ov.chunk_id].whole_read_nbytes is None)
        for info, piece, ovs in pieces:
            pp = processes.setdefault(piece.process, ProcessPlan(piece.process))
            nbytes = math.prod(piece.shape) * info.dtype.itemsize
            pp.bytes_needed += nbytes
            pp.pieces += 1
            t = pp.tensors.setdefault(info.name, {"bytes_needed": 0, "pieces": 0})
            t["bytes_needed"] += nbytes
            t["pieces"] += 1
            for ov in ovs:
                chunk = info.chunks[ov.chunk_id]
                if chunk.whole_read_nbytes is not None:
                    whole.setdefault(piece.process, set()).add((info.name, ov.chunk_id))
                    continue
                loc = located[(info.name, ov.chunk_id)]
                if loc.data is not None:
                    continue  # held in memory since its header read
                r = runs_of(loc, chunk.sizes, ov, piece.shape, info.dtype.itemsize)
                if r is None:
                    lo, hi = element_span(loc, ov, info.dtype.itemsize)
                    starts, lens = np.array([loc.base + lo]), np.array([hi - lo])
                else:
                    starts = r.src_starts() + loc.base
                    lens = np.full(len(starts), r.run, np.int64)
                runs_by.setdefault(piece.process, {}).setdefault(loc.key, []).append((starts, lens))
        for pid, pp in processes.items():
            for parts in runs_by.get(pid, {}).values():
                s = np.concatenate([p[0] for p in parts])
                l = np.concatenate([p[1] for p in parts])
                order = np.argsort(s, kind="stable")
                rs, re, _ = merge_runs(s[order], l[order], coalesce_gap)
                pp.bytes_to_read += int((re - rs).sum())
                pp.num_reads += len(rs)
            for name, cid in whole.get(pid, ()):
                pp.bytes_to_read += int(self.format.tensors[name].chunks[cid].whole_read_nbytes)
                pp.num_reads += 1
        return Plan(processes, jax.process_index(), self.source, as_saved)

    # -- loading ----------------------------------------------------------------------------------

    def load(self, target: Any, *, max_inflight_bytes: int | None = None,
             progress: bool | Callable[[dict[str, Any]], None] = False, coalesce_gap: int = 256) -> Any:
        """Load ``target`` (a pytree of ``jax.ShapeDtypeStruct`` with shardings, or ``jax.Array``) from this
        checkpoint; see :func:`jreshard.load`.

        Example:
            >>> import jax, jreshard
            >>> from jax.sharding import SingleDeviceSharding
            >>> ckpt = jreshard.open(jreshard.sample_path())
            >>> t = ckpt.tensors["model.embed.weight"]
            >>> out = ckpt.load({t.name: jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=SingleDeviceSharding(jax.devices()[0]))})
            >>> out[t.name].shape == t.shape
            True
        """
        import jax

        entries, treedef = _flatten_target(target)
        specs = [self._spec(name, leaf) for name, leaf in entries]
        limit = int(max_inflight_bytes or DEFAULT_INFLIGHT)
        report = _progress_fn(progress)
        # Distinct pieces of this process, in target order.
        work: list[tuple[int, TensorInfo, Piece, Any]] = []
        for i, spec in enumerate(specs):
            if spec is None:
                continue
            info, sharding, dtype = spec
            for piece in pieces_of(info.name, info.shape, sharding):
                work.append((i, info, piece, dtype))
        device_arrays: dict[int, dict[Any, Any]] = {i: {} for i in range(len(specs))}
        executor = Executor(self.store, self.io, coalesce_gap)
        total = sum(math.prod(p.shape) * info.dtype.itemsize for _, info, p, _ in work)
        if report:  # batches small enough for the display to move (about 20 updates)
            limit = min(limit, max(64 * 2**20, total // 20))
        done = 0
        t0 = time.perf_counter()
        with ThreadPoolExecutor(executor.threads) as pool:
            for batch in _batches(work, limit):
                hosts = _place.allocate([(piece.shape, info.dtype) for _, info, piece, _ in batch])
                bufs = [(info, piece, host) for (_, info, piece, _), host in zip(batch, hosts)]
                self._fill(bufs, executor, pool)
                host, devs, owners = [], [], []
                for (i, info, piece, dtype), (_, _, buf) in zip(batch, bufs):
                    if buf.dtype != dtype:
                        cast = _place.aligned_empty(buf.shape, dtype)
                        np.copyto(cast, buf, casting="unsafe")
                        buf = cast
                    for dev in piece.devices:
                        host.append(buf)
                        devs.append(dev)
                        owners.append(i)
                placed = _place.put(host, devs)
                if any(d.platform != "cpu" for d in devs):
                    jax.block_until_ready(placed)  # host buffers may be released after this
                for i, dev, arr in zip(owners, devs, placed):
                    device_arrays[i][dev] = arr
                del host, bufs, hosts
                done += sum(math.prod(p.shape) * info.dtype.itemsize for _, info, p, _ in batch)
                if report:
                    report({"bytes_done": done, "bytes_total": total, "seconds": time.perf_counter() - t0,
                            "bytes_read": self.store.stats.bytes_read})
        out = []
        for i, ((name, leaf), spec) in enumerate(zip(entries, specs)):
            if spec is None:
                out.append(self.objects[name])
                continue
            info, sharding, dtype = spec
            per_dev = device_arrays[i]
            order = list(sharding.addressable_devices_indices_map(info.shape))
            out.append(_place.assemble(info.shape, sharding, [per_dev[d] for d in order]))
        return jax.tree_util.tree_unflatten(treedef, out)

    # -- internals --------------------------------------------------------------------------------

    def _spec(self, name: str, leaf: Any) -> tuple[TensorInfo, Any, np.dtype] | None:
        import jax

        if not isinstance(leaf, (jax.ShapeDtypeStruct, jax.Array)):
            if name in self.format.object_refs:
                return None
            if name in self.format.tensors:
                raise TargetMismatchError(
                    f"{self.source}: target leaf for tensor {name!r} is a {type(leaf).__name__}; give a "
                    "jax.ShapeDtypeStruct with a sharding or a jax.Array"
                )
            raise TargetMismatchError(_unknown(name, {**self.format.tensors, **self.format.object_refs}, self.source))
        info = self.tensor(name)
        shape = tuple(int(s) for s in leaf.shape)
        if shape != info.shape:
            raise TargetMismatchError(
                f"{self.source}: tensor {name!r}: target shape {shape} differs from the saved shape {info.shape}"
            )
        sharding = getattr(leaf, "sharding", None)
        if sharding is None:
            raise ShardingError(f"tensor {name!r}: the target has no sharding; give jax.ShapeDtypeStruct(..., sharding=...)")
        try:
            sharding.shard_shape(shape)
        except Exception as e:  # jax raises IndivisibleError / ValueError
            raise ShardingError(f"tensor {name!r} of shape {shape}: the target sharding cannot tile it: {e}") from None
        dtype = np.dtype(leaf.dtype)
        if info.dtype.kind == "c" and dtype.kind != "c":
            raise TargetMismatchError(f"tensor {name!r}: cannot cast saved {info.dtype} to {dtype} (drops the imaginary part)")
        return info, sharding, dtype

    def _locate(self, wanted: Iterable[tuple[TensorInfo, int]]) -> dict[tuple[str, int], Locator]:
        """Locators of the (tensor, chunk id) pairs, keyed by (name, chunk id): one batched locate for those
        not cached yet. Locators holding bytes in memory (small or compressed items) are not cached."""
        out: dict[tuple[str, int], Locator | None] = {}
        todo: list[tuple[TensorInfo, int]] = []
        for info, cid in wanted:
            key = (info.name, cid)
            if key not in out:
                out[key] = self._locators.get(key)
                if out[key] is None:
                    todo.append((info, cid))
        if todo:
            for (info, cid), loc in zip(todo, self.format.locate_many([(info, info.chunks[cid]) for info, cid in todo])):
                out[(info.name, cid)] = loc
                if loc.data is None:
                    self._locators[(info.name, cid)] = loc
        return out  # type: ignore[return-value]  # every entry is filled now

    def _fill(self, bufs: list[tuple[TensorInfo, Piece, np.ndarray]], executor: Executor, pool: ThreadPoolExecutor) -> None:
        """Fill the host buffers of pieces from the saved chunks (one batched locate, then the reads)."""
        plans = []
        for info, piece, dest in bufs:
            ovs = overlaps(info.chunks, piece.box)
            covered = sum(math.prod(o.size) for o in ovs)
            if covered != math.prod(piece.shape):
                raise JReshardError(f"internal: tensor {info.name!r} box {piece.box} covered {covered} elements")
            plans.append((info, piece, dest, ovs))
        located = self._locate((info, ov.chunk_id) for info, _, _, ovs in plans for ov in ovs)
        jobs = []
        for info, piece, dest, ovs in plans:
            for ov in ovs:
                loc = located[(info.name, ov.chunk_id)]
                chunk = info.chunks[ov.chunk_id]
                jobs.append(CopyJob(info.name, loc, chunk.sizes, ov, dest,
                                    runs_of(loc, chunk.sizes, ov, piece.shape, info.dtype.itemsize)))
        executor.run(jobs, pool)


def _batches(work: list, limit: int) -> Iterable[list]:
    """Split the pieces into batches of at most ``limit`` host bytes (at least one unit each). A unit is a
    whole tensor's pieces, or, for a tensor larger than the limit, the pieces sharing one band of rows, so
    that the pieces overlapping a saved chunk are read together."""
    units: list[list] = []
    for _, group in itertools.groupby(work, key=lambda item: item[0]):
        pieces = list(group)
        if sum(_host_bytes(item) for item in pieces) <= limit:
            units.append(pieces)
            continue
        pieces.sort(key=lambda item: item[2].box)
        for _, band in itertools.groupby(pieces, key=lambda item: item[2].box[:1]):
            units.append(list(band))
    batch: list = []
    size = 0
    for unit in units:
        n = sum(_host_bytes(item) for item in unit)
        if batch and size + n > limit:
            yield batch
            batch, size = [], 0
        batch.extend(unit)
        size += n
    if batch:
        yield batch


def _host_bytes(item: tuple) -> int:
    _, info, piece, dtype = item
    return math.prod(piece.shape) * (info.dtype.itemsize + (dtype.itemsize if dtype != info.dtype else 0))


def _progress_fn(progress: Any) -> Callable[[dict[str, Any]], None] | None:
    if callable(progress):
        return progress
    if not progress:
        return None

    def show(info: dict[str, Any]) -> None:
        done, total = info["bytes_done"], max(info["bytes_total"], 1)
        rate = done / max(info["seconds"], 1e-9) / 2**30
        end = "\n" if done >= total else ""
        sys.stderr.write(f"\rjreshard: {done / 2**30:7.3f} / {total / 2**30:.3f} GiB ({100 * done / total:5.1f}%), "
                         f"{rate:.2f} GiB/s{end}")
        sys.stderr.flush()

    return show


def _key_name(entry: Any) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _flatten_target(target: Any) -> tuple[list[tuple[str, Any]], Any]:
    """(dotted name, leaf) of every target leaf, and the treedef to rebuild the structure."""
    import jax

    def is_leaf(x: Any) -> bool:
        return isinstance(x, (jax.ShapeDtypeStruct, jax.Array))

    flat, treedef = jax.tree_util.tree_flatten_with_path(target, is_leaf=is_leaf)
    return [(".".join(_key_name(k) for k in path), leaf) for path, leaf in flat], treedef


def _unknown(name: str, known: Mapping[str, Any], source: str) -> str:
    close = difflib.get_close_matches(name, list(known), n=3)
    hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
    return f"{source}: no tensor or object named {name!r} in the checkpoint ({len(known)} entries){hint}"
