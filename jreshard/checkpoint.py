"""The public objects: :class:`Checkpoint` (open once, inspect, read, plan, load) and the load pipeline
that joins catalog -> plan -> read -> place."""

from __future__ import annotations

import difflib
import functools
import itertools
import math
import numbers
import sys
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from types import MappingProxyType
from typing import Any, Callable, Iterable

import numpy as np

from . import place as _place
from .catalog import Locator, TensorInfo
from .errors import CheckpointClosedError, InvalidArgumentError, JReshardError, ShardingError, TargetMismatchError
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
        self._closed = False
        self._lock = threading.Lock()

    # -- inspection -------------------------------------------------------------------------------

    @property
    def tensors(self) -> Mapping[str, TensorInfo]:
        """Every saved tensor by name: shape, numpy dtype and saved chunks."""
        return MappingProxyType(self.format.tensors)

    @property
    def objects(self) -> Mapping[str, Any]:
        """The non-tensor entries (``step``, ``sched.lr`` ...), decoded by the allow-listed unpickler."""
        self._check_open()
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
        """Release open files and threads. Idempotent, and safe from any thread (a ``progress`` callback
        included): a :meth:`load` or :meth:`read` running meanwhile fails with CheckpointClosedError (it
        never returns partial or wrong data), and every later ``read``, ``load``, ``plan`` or ``objects``
        raises CheckpointClosedError. Files are closed once the reads running at that moment end.
        Inspection that needs no I/O (``tensors``, ``saved_sharding``) keeps working.

        Example:
            >>> import jreshard
            >>> ckpt = jreshard.open(jreshard.sample_path())
            >>> ckpt.close(); ckpt.close()
            >>> try:
            ...     ckpt.read("model.embed.weight")
            ... except jreshard.CheckpointClosedError as e:
            ...     print(type(e).__name__)
            CheckpointClosedError
        """
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False)  # waiting could deadlock when called from one of its threads
        close = getattr(self.store, "close", None)
        if close:
            close()

    def _check_open(self) -> None:
        if self._closed:
            raise CheckpointClosedError(f"{self.source}: the checkpoint was closed (Checkpoint.close); open it again")

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
        self._check_open()
        info = self.tensor(name)
        try:
            box = normalize_index(index, info.shape)
        except (IndexError, TypeError, ValueError) as e:
            raise TargetMismatchError(f"{self.source}: tensor {name!r}: bad index {index!r}: {e}") from None
        piece = Piece(name, box, 0, [])
        prepared = self._prepare([(info, piece)])  # chunks located and checked before the buffer exists
        dest = _place.aligned_empty(piece.shape, info.dtype)
        executor = Executor(self.store, self.io)
        with self._lock:
            self._check_open()
            if self._pool is None:
                self._pool = ThreadPoolExecutor(executor.threads, thread_name_prefix="jreshard")
            pool = self._pool
        try:
            self._run(prepared, [dest], executor, pool)
        except RuntimeError:
            self._check_open()  # close() shut the pool down: "cannot schedule new futures after shutdown"
            raise
        self._check_open()  # closed during the read: fail, as load() does
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

        self._check_open()
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
        self._check_open()
        return Plan(processes, jax.process_index(), self.source, as_saved)

    # -- loading ----------------------------------------------------------------------------------

    def load(self, target: Any, *, max_inflight_bytes: int | None = None,
             progress: bool | Callable[[dict[str, Any]], None] = False, coalesce_gap: int = 256) -> Any:
        """Load ``target`` (a pytree of ``jax.ShapeDtypeStruct`` with shardings, or ``jax.Array``) from this
        checkpoint; see :func:`jreshard.load`.

        ``max_inflight_bytes`` (default 2 GiB) bounds the host bytes read but not yet placed on devices, cast
        buffers included, whatever the sharding: shards that fit are read in batches of whole shards, and a
        shard larger than the bound is read in parts, each placed on the shard's device(s) and written into
        the shard there. It must hold one element (saved and cast) of every tensor loaded, else
        InvalidArgumentError. A :meth:`close` before this returns makes it raise CheckpointClosedError.

        Example:
            >>> import jax, jreshard
            >>> from jax.sharding import SingleDeviceSharding
            >>> ckpt = jreshard.open(jreshard.sample_path())
            >>> t = ckpt.tensors["model.embed.weight"]
            >>> out = ckpt.load({t.name: jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=SingleDeviceSharding(jax.devices()[0]))})
            >>> out[t.name].shape == t.shape
            True
            >>> small = ckpt.load({t.name: jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=SingleDeviceSharding(jax.devices()[0]))},
            ...                   max_inflight_bytes=1000)  # 64x32 bfloat16 (4 KiB) read in parts of <= 1000 bytes
            >>> bool((small[t.name] == out[t.name]).all())
            True
        """
        import jax

        self._check_open()
        entries, treedef = _flatten_target(target)
        specs = [self._spec(name, leaf) for name, leaf in entries]
        report = _progress_fn(progress)
        # Distinct pieces of this process, in target order.
        work: list[tuple[int, TensorInfo, Piece, Any]] = []
        for i, spec in enumerate(specs):
            if spec is None:
                continue
            info, sharding, dtype = spec
            for piece in pieces_of(info.name, info.shape, sharding):
                work.append((i, info, piece, dtype))
        limit = _inflight_limit(max_inflight_bytes, work)
        device_arrays: dict[int, dict[Any, Any]] = {i: {} for i in range(len(specs))}
        executor = Executor(self.store, self.io, coalesce_gap)
        total = sum(math.prod(p.shape) * info.dtype.itemsize for _, info, p, _ in work)
        pack = limit  # the size batches of whole pieces are packed to; pieces above ``limit`` are read in parts
        if report:  # batches small enough for the display to move (about 20 updates)
            pack = min(limit, max(64 * 2**20, total // 20))
        done = 0
        t0 = time.perf_counter()

        def advance(nbytes: int) -> None:
            """After each batch (or part) placed: fail a load the checkpoint was closed under, then report."""
            nonlocal done
            self._check_open()
            done += nbytes
            if report:
                report({"bytes_done": done, "bytes_total": total, "seconds": time.perf_counter() - t0,
                        "bytes_read": self.store.stats.bytes_read})

        with ThreadPoolExecutor(executor.threads) as pool:
            for in_parts, batch in _batches(work, limit, pack):
                if in_parts:  # shards larger than the bound
                    for i, dev, arr in self._load_in_parts(batch, limit, executor, pool, advance):
                        device_arrays[i][dev] = arr
                    continue
                prepared = self._prepare([(info, piece) for _, info, piece, _ in batch])
                hosts = _place.allocate([(piece.shape, info.dtype) for _, info, piece, _ in batch])
                bufs = [(info, piece, host) for (_, info, piece, _), host in zip(batch, hosts)]
                self._run(prepared, hosts, executor, pool)
                host, devs, owners = [], [], []
                for (i, info, piece, dtype), (_, _, buf) in zip(batch, bufs):
                    buf = _cast(buf, dtype)
                    for dev in piece.devices:
                        host.append(buf)
                        devs.append(dev)
                        owners.append(i)
                placed = _place.put(host, devs)
                if any(d.platform != "cpu" for d in devs):
                    jax.block_until_ready(placed)  # host buffers may be released after this
                for i, dev, arr in zip(owners, devs, placed):
                    device_arrays[i][dev] = arr
                del host, bufs, hosts, buf
                advance(sum(math.prod(p.shape) * info.dtype.itemsize for _, info, p, _ in batch))
        out = []
        for i, ((name, leaf), spec) in enumerate(zip(entries, specs)):
            if spec is None:
                out.append(self.objects[name])
                continue
            info, sharding, dtype = spec
            per_dev = device_arrays[i]
            order = list(sharding.addressable_devices_indices_map(info.shape))
            out.append(_place.assemble(info.shape, sharding, [per_dev[d] for d in order]))
        # A close() that came after the last read still fails the load: "closed before load returned" is
        # then always an error, never a race between success and failure.
        self._check_open()
        return jax.tree_util.tree_unflatten(treedef, out)

    def _load_in_parts(self, items: list, limit: int, executor: Executor, pool: ThreadPoolExecutor,
                       advance: Callable[[int], None]) -> list[tuple[int, Any, Any]]:
        """``(target index, device, array)`` for pieces of one tensor, all of one shape and each larger than
        ``limit`` host bytes. The pieces are filled in lockstep, part by part (:func:`_parts`): part r of
        every piece together is at most ``limit`` host bytes with its cast buffers. Each part is put on its
        piece's devices and written there into a device buffer of the whole piece: the buffers of all the
        devices are the shards of one array, updated by one compiled ``dynamic_update_slice`` per step
        (donated: each device holds one piece and one part)."""
        import jax
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        i, info, first, dtype = items[0]
        elem = _elem_bytes(items[0])
        shape = first.shape
        per_step = max(1, min(len(items), limit // elem))  # pieces filled together; parts of limit // per_step bytes
        index_dtype = np.int32 if max(shape) < 2**31 else np.int64
        out = []
        for k in range(0, len(items), per_step):
            group = items[k : k + per_step]
            devices = [dev for _, _, piece, _ in group for dev in piece.devices]
            sharding = NamedSharding(Mesh(np.array(devices), ("pieces",)), PartitionSpec("pieces"))
            buf = _zeros_fn(sharding, (len(devices) * shape[0],) + shape[1:], np.dtype(dtype))()
            update = _update_fn(sharding.mesh)
            for rel in _parts(tuple((0, n) for n in shape), elem, limit // len(group)):
                part_shape = tuple(b - a for a, b in rel)
                prepared = self._prepare([
                    (info, Piece(piece.name, tuple((a0 + a, a0 + b) for (a0, _), (a, b) in zip(piece.box, rel)),
                                 piece.process, piece.devices)) for _, _, piece, _ in group])
                hosts = _place.allocate([(part_shape, info.dtype)] * len(group))
                self._run(prepared, hosts, executor, pool)
                hosts = [_cast(host, dtype) for host in hosts]
                placed = _place.put([host for (_, _, piece, _), host in zip(group, hosts) for _ in piece.devices],
                                    devices)
                part = jax.make_array_from_single_device_arrays((len(devices) * part_shape[0],) + part_shape[1:],
                                                                sharding, placed)
                buf = update(buf, part, np.array([a for a, _ in rel], index_dtype))
                jax.block_until_ready(buf)  # the host parts may be released after this (one part in flight)
                del hosts, prepared, placed, part
                advance(len(group) * math.prod(part_shape) * info.dtype.itemsize)
            out.extend((i, shard.device, shard.data) for shard in buf.addressable_shards)
        return out

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
        narrow = np.dtype(jax.dtypes.canonicalize_dtype(dtype))
        if narrow != dtype:
            # jax.device_put would silently make a narrower array (int64 2**40 + 7 would load as 7).
            raise TargetMismatchError(
                f"{self.source}: tensor {name!r}: the target dtype {dtype} is a 64-bit type, which JAX narrows to "
                f"{narrow} while 64-bit types are off (jax_enable_x64 is False), changing values that do not fit. "
                'Enable them with jax.config.update("jax_enable_x64", True) or the environment variable '
                f"JAX_ENABLE_X64=1, or ask for the narrower dtype explicitly in the target: "
                f"jax.ShapeDtypeStruct({shape}, np.{narrow.name}, sharding=...)"
            )
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
        prepared = self._prepare([(info, piece) for info, piece, _ in bufs])
        self._run(prepared, [dest for _, _, dest in bufs], executor, pool)

    def _prepare(self, pieces: list[tuple[TensorInfo, Piece]]) -> list[tuple[TensorInfo, Piece, list, dict]]:
        """The overlaps of each piece with the saved chunks, and their located chunks (one batched locate of
        the headers). Run before the pieces' buffers are allocated: a chunk whose item does not hold what the
        metadata claims is refused before memory is spent on the claim."""
        plans = []
        for info, piece in pieces:
            ovs = overlaps(info.chunks, piece.box)
            covered = sum(math.prod(o.size) for o in ovs)
            if covered != math.prod(piece.shape):
                raise JReshardError(f"internal: tensor {info.name!r} box {piece.box} covered {covered} elements")
            plans.append((info, piece, ovs))
        located = self._locate((info, ov.chunk_id) for info, _, ovs in plans for ov in ovs)
        return [(info, piece, ovs, located) for info, piece, ovs in plans]

    @staticmethod
    def _run(prepared: list[tuple[TensorInfo, Piece, list, dict]], dests: list[np.ndarray], executor: Executor,
             pool: ThreadPoolExecutor) -> None:
        jobs = []
        for (info, piece, ovs, located), dest in zip(prepared, dests):
            for ov in ovs:
                loc = located[(info.name, ov.chunk_id)]
                chunk = info.chunks[ov.chunk_id]
                jobs.append(CopyJob(info.name, loc, chunk.sizes, ov, dest,
                                    runs_of(loc, chunk.sizes, ov, piece.shape, info.dtype.itemsize)))
        executor.run(jobs, pool)


def _batches(work: list, limit: int, pack: int | None = None) -> Iterable[tuple[bool, list]]:
    """Split the pieces into batches ``(in_parts, items)``. Batches of whole pieces (``in_parts`` False) hold at
    most ``limit`` host bytes (:func:`_host_bytes`): units are packed in order up to ``pack`` (default and at
    most ``limit``). A unit is a whole tensor's pieces when they fit in ``pack``; else the pieces sharing one
    band of rows when they fit (the pieces overlapping a saved chunk are then read together); else single
    pieces. The pieces of a tensor larger than ``limit`` each, of one shape, make a batch of their own
    (``in_parts`` True: read part by part).

    Example (a 2048x1024 float32 tensor sharded by columns 8 ways, 1 MiB pieces, 2 MiB bound):
        >>> from types import SimpleNamespace as NS
        >>> info = NS(dtype=np.dtype("float32"))
        >>> work = [(0, info, Piece("w", ((0, 2048), (128 * k, 128 * (k + 1))), 0, []), info.dtype) for k in range(8)]
        >>> [(in_parts, len(b)) for in_parts, b in _batches(work, 2 * 2**20)]
        [(False, 2), (False, 2), (False, 2), (False, 2)]
        >>> [(in_parts, len(b)) for in_parts, b in _batches(work, 2**19)]
        [(True, 8)]
    """
    pack = limit if pack is None else min(pack, limit)
    units: list[tuple[bool, list]] = []
    for _, group in itertools.groupby(work, key=lambda item: item[0]):
        pieces = list(group)
        if sum(_host_bytes(item) for item in pieces) <= pack:
            units.append((False, pieces))
            continue
        pieces.sort(key=lambda item: item[2].box)
        large: dict[tuple[int, ...], list] = {}
        for _, band_items in itertools.groupby(pieces, key=lambda item: item[2].box[:1]):
            band = []
            for item in band_items:
                if _host_bytes(item) > limit:
                    large.setdefault(item[2].shape, []).append(item)
                else:
                    band.append(item)
            if sum(_host_bytes(item) for item in band) <= pack:
                units.append((False, band))
            else:
                units.extend((False, [item]) for item in band)
        units.extend((True, items) for items in large.values())
    batch: list = []
    size = 0
    for in_parts, unit in units:
        if in_parts:
            if batch:
                yield False, batch
                batch, size = [], 0
            yield True, unit
            continue
        n = sum(_host_bytes(item) for item in unit)
        if batch and size + n > pack:
            yield False, batch
            batch, size = [], 0
        batch.extend(unit)
        size += n
    if batch:
        yield False, batch


def _host_bytes(item: tuple) -> int:
    """Host bytes of a work item ``(i, info, piece, dtype)``: its buffer in the saved dtype, and its cast."""
    return math.prod(item[2].shape) * _elem_bytes(item)


def _elem_bytes(item: tuple) -> int:
    """Host bytes one element of a work item takes: saved itemsize, plus the target's when it is a cast."""
    _, info, _, dtype = item
    return info.dtype.itemsize + (dtype.itemsize if dtype != info.dtype else 0)


def _cast(buf: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``buf`` as ``dtype``: itself when it has that dtype, else an aligned copy (an unsafe cast, as asked)."""
    if buf.dtype == dtype:
        return buf
    out = _place.aligned_empty(buf.shape, dtype)
    np.copyto(out, buf, casting="unsafe")
    return out


def _inflight_limit(value: Any, work: list) -> int:
    """``max_inflight_bytes`` checked: None gives the default; anything else must be an integer of at least
    one element (:func:`_elem_bytes`) of every work item, else InvalidArgumentError.

    Example:
        >>> _inflight_limit(None, []) == DEFAULT_INFLIGHT, _inflight_limit(4096, [])
        (True, 4096)
        >>> _inflight_limit(0, [])
        Traceback (most recent call last):
        ...
        jreshard.errors.InvalidArgumentError: max_inflight_bytes must be a positive number of bytes, not 0
    """
    if value is None:
        return DEFAULT_INFLIGHT
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidArgumentError(f"max_inflight_bytes must be an integer number of bytes, not {value!r}")
    limit = int(value)
    if limit <= 0:
        raise InvalidArgumentError(f"max_inflight_bytes must be a positive number of bytes, not {limit}")
    if work:
        widest = max(work, key=_elem_bytes)
        need = _elem_bytes(widest)
        if limit < need:
            _, info, _, dtype = widest
            what = f"{info.dtype}" if dtype == info.dtype else f"{info.dtype} read and cast to {dtype}"
            raise InvalidArgumentError(
                f"max_inflight_bytes={limit} is below one element: tensor {info.name!r} ({what}) needs {need} "
                f"bytes per element on the host; give at least {need}"
            )
    return limit


def _parts(box: tuple[tuple[int, int], ...], elem_bytes: int, limit: int) -> Iterable[tuple[tuple[int, int], ...]]:
    """Sub-boxes of ``box`` that tile it in C order, each at most ``limit`` bytes at ``elem_bytes`` per
    element (``limit >= elem_bytes``): bands along the first dimension whose trailing block fits, with the
    dimensions before it taken one index at a time.

    Example:
        >>> list(_parts(((0, 4), (0, 3)), 4, 24))  # rows of 12 bytes, two rows per part
        [((0, 2), (0, 3)), ((2, 4), (0, 3))]
        >>> list(_parts(((2, 4), (0, 3)), 4, 8))  # a row (12 bytes) is too large: bands of a row
        [((2, 3), (0, 2)), ((2, 3), (2, 3)), ((3, 4), (0, 2)), ((3, 4), (2, 3))]
    """
    shape = [b - a for a, b in box]
    if not shape or math.prod(shape) * elem_bytes <= limit:
        yield box
        return
    k = 0
    while math.prod(shape[k + 1 :]) * elem_bytes > limit:
        k += 1
    step = max(1, limit // (math.prod(shape[k + 1 :]) * elem_bytes))
    for outer in itertools.product(*(range(a, b) for a, b in box[:k])):
        head = tuple((i, i + 1) for i in outer)
        a, b = box[k]
        for r0 in range(a, b, step):
            yield head + ((r0, min(b, r0 + step)),) + box[k + 1 :]


@functools.lru_cache(maxsize=64)
def _zeros_fn(sharding: Any, shape: tuple[int, ...], dtype: np.dtype) -> Callable[[], Any]:
    """A compiled function making zeros of ``shape`` and ``dtype`` with ``sharding``, on its devices."""
    import jax
    import jax.numpy as jnp

    return jax.jit(functools.partial(jnp.zeros, shape, dtype), out_shardings=sharding)


@functools.lru_cache(maxsize=64)
def _update_fn(mesh: Any) -> Callable[..., Any]:
    """``update(buf, part, starts)``: on every device of the 1-d ``mesh``, its shard of ``buf`` with its shard
    of ``part`` written at ``starts`` (both sharded along dimension 0 over the mesh); ``buf`` is donated."""
    import jax
    from jax.sharding import PartitionSpec

    axis = PartitionSpec(mesh.axis_names[0])

    def dus(buf: Any, part: Any, starts: Any) -> Any:
        return jax.lax.dynamic_update_slice(buf, part, tuple(starts[d] for d in range(buf.ndim)))

    return jax.jit(jax.shard_map(dus, mesh=mesh, in_specs=(axis, axis, PartitionSpec()), out_specs=axis),
                   donate_argnums=0)


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
