"""The public objects: :class:`Checkpoint` (open once, inspect, read, plan, load) and the load pipeline
that joins catalog -> plan -> read -> place."""

from __future__ import annotations

import collections
import contextlib
import functools
import numbers
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import MappingProxyType
from typing import Any

import numpy as np

from . import place as _place
from . import program as _program
from .catalog import Locator, TensorInfo
from .gcpause import gc_paused
from .lanes import LaneTable, Located
from .errors import (
    CheckpointClosedError,
    InvalidArgumentError,
    ShardingError,
    TargetMismatchError,
)
from .planning import Piece, Plan, ProcessPlan
from .read import Executor, strided_view
from .rules import ALL_TENSORS, resolve_target
from .storage import IOStats, Store
from .targets import flatten_target
from .views import View



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
        self._located = Located()  # what locating chunks found: kept until a load ends (_release_located)
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

    def _repr_html_(self) -> str:
        """For notebooks: the tensors (name, dtype, shape, size, saved chunks and the grid they form; the first
        MAX_HTML_ROWS, then "... N more") and below them the saved objects, every name and value escaped."""
        from html import escape

        from .errors import JReshardError
        from .planning import MAX_HTML_ROWS, _human
        from .spec import saved_grid

        tensors = self.format.tensors
        refs = list(getattr(self.format, "object_refs", {}))
        total = sum(t.nbytes for t in tensors.values())
        out = [(f"<div><p><b>jreshard.Checkpoint</b> {escape(str(self.format.format_name))} "
                f"<code>{escape(self.source)}</code>: {len(tensors)} tensors, {_human(total)}, {len(refs)} objects</p>"),
               ("<table><tr><th>tensor</th><th>dtype</th><th>shape</th><th>size</th><th>chunks</th>"
                "<th>saved grid</th></tr>")]
        for name, info in list(tensors.items())[:MAX_HTML_ROWS]:
            grid = saved_grid(info) if info.shape else None
            layout = "" if not info.shape else "irregular" if grid is None else "\u00d7".join(
                str(len(c) - 1) for c in grid)
            out.append(f"<tr><td>{escape(name)}</td><td>{escape(str(info.dtype))}</td><td>{escape(str(info.shape))}"
                       f"</td><td>{_human(info.nbytes)}</td><td>{len(info.chunks)}</td><td>{layout}</td></tr>")
        if len(tensors) > MAX_HTML_ROWS:
            out.append(f'<tr><td colspan="6">\u2026 {len(tensors) - MAX_HTML_ROWS} more</td></tr>')
        out.append("</table>")
        if refs:
            values: Mapping[str, Any] = {}
            note = ""
            if self._closed:
                note = "closed: values not read"
            else:
                try:
                    values = self.objects
                except JReshardError as e:
                    note = f"values not read: {e}"
            out.append("<table><tr><th>object</th><th>value</th></tr>")
            for name in refs[:MAX_HTML_ROWS]:
                value = f"{values[name]!r:.80}" if name in values else ""
                out.append(f"<tr><td>{escape(name)}</td><td><code>{escape(value)}</code></td></tr>")
            if len(refs) > MAX_HTML_ROWS:
                out.append(f'<tr><td colspan="2">\u2026 {len(refs) - MAX_HTML_ROWS} more</td></tr>')
            out.append("</table>")
            if note:
                out.append(f"<p>{escape(note)}</p>")
        out.append("</div>")
        return "\n".join(out)

    def close(self) -> None:
        """Release open files and threads. Idempotent, and safe from any thread (a ``progress`` callback
        included): a :meth:`load` or :meth:`read` running meanwhile fails with CheckpointClosedError (it
        never returns partial or wrong data), and every later ``read``, ``load``, ``plan`` or ``objects``
        raises CheckpointClosedError. Files are closed once the reads running at that moment end.
        Inspection that needs no I/O (``tensors``, ``saved_sharding``) keeps working. What plans located
        (archive headers read) is dropped.

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
        self._release_located()  # (a load running meanwhile keeps its own set until it fails)

    def _check_open(self) -> None:
        if self._closed:
            raise CheckpointClosedError(f"{self.source}: the checkpoint was closed (Checkpoint.close); open it again")

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading ----------------------------------------------------------------------------------

    def tensor(self, name: str) -> TensorInfo:
        """The :class:`~jreshard.TensorInfo` of a saved tensor; an unknown name is a ``TargetMismatchError``
        naming the closest saved names.

        Example:
            >>> import jreshard
            >>> jreshard.open(jreshard.sample_path()).tensor("model.head.bias").shape
            (10,)
        """
        try:
            return self.format.tensors[name]
        except KeyError:
            raise TargetMismatchError(_unknown(name, self.format.tensors, self.source)) from None

    def read(self, name: str, index: Any = ..., *, coalesce_gap: int = 256) -> np.ndarray:
        """``tensor[index]`` as numpy computes it, for numpy's basic indexing: integers (negative ones count
        from the end), slices with any step (negative ones included), ``...``, ``None`` (a new axis) and tuples
        of these; the default ``...`` reads the whole tensor. The result is always a new ``np.ndarray`` (a 0-d
        one where numpy gives a scalar). Fancy indexing (lists, arrays, boolean masks, tuples inside the
        index) is refused with InvalidArgumentError, as are indices out of range.

        Only the saved bytes the selection needs are read (gaps up to ``coalesce_gap`` bytes between them are
        read through, as in :meth:`load`): the index is traced through a view of the tensor
        (``ckpt.saved(name)[index]``) to boxes of saved chunks; strides along dimensions where one box per
        selected index would be too many, and reversals, are applied on the host to the box read.

        Example:
            >>> import jreshard
            >>> ckpt = jreshard.open(jreshard.sample_path())
            >>> ckpt.read("model.embed.weight", (slice(0, 2), slice(0, 3))).shape
            (2, 3)
            >>> ckpt.read("model.embed.weight", (-1, slice(None, None, -8))).shape
            (4,)
            >>> ckpt.read("model.embed.weight", [0, 1])  # doctest: +ELLIPSIS
            Traceback (most recent call last):
            ...
            jreshard.errors.InvalidArgumentError: ...: read('model.embed.weight', [0, 1]): a list is fancy indexing, which read does not support; give basic indices (integers, slices, ..., None, or a tuple of them) and index the result with numpy for the rest
        """
        self._check_open()
        info = self.tensor(name)
        view_key, host_key = _read_keys(index, info.shape, f"{self.source}: read({name!r}, {index!r})")
        view = self.saved(name)[view_key]
        box = tuple((0, n) for n in view.shape)
        target = _program.Target(0, name, view, view.shape, info.dtype, None, info.dtype.itemsize, (name,))
        step, regions = _program.make_step(target, Piece(name, box, 0, []), box, 0, self.format.tensors)
        executor = Executor(self.store, self.io, coalesce_gap)
        # chunks located and checked before the buffer exists
        unit = _program.plan_unit(self, [step], [regions], executor, ProcessPlan(0))
        with self._lock:
            self._check_open()
            if self._pool is None:
                self._pool = ThreadPoolExecutor(executor.threads, thread_name_prefix="jreshard")
            pool = self._pool
        dest = self._run_unit(unit, executor, pool)[0]
        self._check_open()  # closed during the read: fail, as load() does
        if host_key is not None:
            dest = dest[host_key].copy(order="C")  # the stride/flip left to the host; the box read is dropped
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

    def saved(self, name: str) -> View:
        """A view of saved tensor ``name`` whose shape and dtype are known, so that every operation on it is
        checked at once (see :func:`jreshard.saved`).

        Example:
            >>> import jreshard
            >>> ckpt = jreshard.open(jreshard.sample_path())
            >>> ckpt.saved("model.embed.weight").T.reshape(4, 8, 64).shape
            (4, 8, 64)
        """
        info = self.tensor(name)
        return View("saved", name, (), f"saved({name!r})", info.shape, info.dtype)

    @gc_paused()
    def plan(self, target: Any = ALL_TENSORS, *, mapping: Any = None, max_inflight_bytes: int | None = None,
             coalesce_gap: int = 256, mesh: Any = None, cast: str = "safe", rules: Any = None,
             process_index: int | str | Sequence[int] | None = None, devices_per_process: int | None = None) -> Plan:
        """The program :meth:`load` would execute, without reading tensor bytes (headers only): the bytes the
        process's shards need, the bytes and requests it reads (after merging, in the batches
        ``max_inflight_bytes`` makes), and per target the same. For this process it is exactly what ``load``
        runs: ``load`` builds the same program with the same function. Without ``target``, every saved tensor
        onto ``mesh`` by ``rules``, as in :meth:`load`.

        ``process_index``: None plans this process (at a cost in proportion to the saved chunks its devices'
        shards touch); an int plans that process; ``"all"`` (or a list of processes) plans each process the
        target spans, one after the other, keeping each one's figures (:class:`ProcessPlan`) but only the
        program of this process (or of the first one listed). ``devices_per_process`` plans targets over an
        ``jax.sharding.AbstractMesh`` (``NamedSharding(abstract_mesh, spec)``, or ``mesh=abstract_mesh``
        without a target), whose devices need not exist here: process ``k`` holds the devices
        ``k * devices_per_process ...`` of the mesh in row-major order (see
        :class:`jreshard.planning.AbstractSharding`).

        What a plan locates for this process (archive headers read) is kept for the :meth:`load` that follows,
        which then reads none of it again and drops it when it ends; what it locates for other processes is
        dropped when it returns: no per-archive state outlives the load.

        Example:
            >>> import jax, jreshard
            >>> from jax.sharding import SingleDeviceSharding
            >>> ckpt = jreshard.open(jreshard.sample_path())
            >>> t = ckpt.tensors["model.embed.weight"]
            >>> p = ckpt.plan({t.name: jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=SingleDeviceSharding(jax.devices()[0]))})
            >>> p.bytes_needed == t.nbytes
            True
        """
        target = resolve_target(self, target, mesh, rules)
        plan, _, _ = self._plan(target, mapping, max_inflight_bytes, coalesce_gap, mesh, local_only=False, cast=cast,
                                process_index=process_index, devices_per_process=devices_per_process)
        return plan

    def _plan(self, target: Any, mapping: Any, max_inflight_bytes: Any, coalesce_gap: int, mesh: Any,
              local_only: bool, cast: str = "safe", *, process_index: Any = None,
              devices_per_process: int | None = None, lazy: bool = False) -> tuple[Plan, list, Any]:
        import jax

        self._check_open()
        if cast not in ("safe", "unsafe"):
            raise InvalidArgumentError(f"cast must be 'safe' or 'unsafe', not {cast!r}")
        abstract: dict[str, Any] = {}
        if devices_per_process is not None or isinstance(mesh, jax.sharding.AbstractMesh):
            if local_only:
                raise InvalidArgumentError(f"{self.source}: an AbstractMesh has no devices to load onto; plan over it "
                                           "with jreshard.plan(..., devices_per_process=N)")
            target, abstract = _abstract_leaves(self.source, target, devices_per_process)
            if isinstance(mesh, jax.sharding.AbstractMesh):
                mesh = None
        try:
            entries, unflatten = flatten_target(target, mesh=mesh)
        except ShardingError as e:
            if local_only or mesh is not None or "AbstractMesh" not in str(e):
                raise
            raise ShardingError(f"{e}; or plan it over the AbstractMesh itself (its devices need not exist here) "
                                "with devices_per_process=N") from None
        if abstract:
            import dataclasses

            entries = [dataclasses.replace(e, sharding=abstract[e.name]) if e.name in abstract else e for e in entries]
        if not entries:
            raise InvalidArgumentError(
                f"{self.source}: the target is {'None' if target is None else f'an empty {type(target).__name__}'}: "
                "nothing to load. A target is a pytree (a dict, a flax nnx State ...) whose leaves are "
                "jax.ShapeDtypeStruct(shape, dtype, sharding=...) or jax.Array, each named by its path joined with "
                "dots after the saved tensor it is read from (e.g. {'model.w': jax.ShapeDtypeStruct((4, 8), "
                "np.float32, sharding=...)}; ckpt.tensors lists them), and leaves that are not arrays (e.g. "
                "{'step': 0}) naming saved objects")
        targets = _program.resolve(self, entries, mapping, self._check_leaf, cast)
        limit = _program.inflight_limit(max_inflight_bytes, targets)
        executor = Executor(self.store, self.io, coalesce_gap)
        this = jax.process_index()
        processes, keep = (([this], this) if local_only else _processes_asked(self.source, process_index, this, targets))
        plans, program = _program.build(self, targets, limit=limit, io_executor=executor, processes=processes,
                                        keep=keep, own=this, lazy=lazy and local_only)
        self._check_open()
        plan = _program.report(self, plans, this, targets, program, process=keep)
        plan._catalog = self.format.tensors  # shared, for Plan.picture
        return plan, entries, unflatten

    # -- loading ----------------------------------------------------------------------------------

    @gc_paused()
    def load(self, target: Any = ALL_TENSORS, *, mapping: Any = None, max_inflight_bytes: int | None = None,
             progress: bool | Callable[[dict[str, Any]], None] = False, coalesce_gap: int = 256,
             mesh: Any = None, cast: str = "safe", rules: Any = None) -> Any:
        """Load ``target`` (a pytree of ``jax.ShapeDtypeStruct`` with shardings, or ``jax.Array``, or a flax nnx
        state) from this checkpoint, through ``mapping``; see :func:`jreshard.load`. The program run is the one
        :meth:`plan` reports for this process. Without ``target``: every saved tensor (not the saved objects)
        onto ``mesh`` by ``rules`` (:func:`jreshard.target_for`), as a flat dict keyed by saved name.

        ``max_inflight_bytes`` (default 2 GiB) bounds the host bytes read but not yet placed on devices, cast
        buffers included, whatever the sharding: shards that fit are read in batches of whole shards, and a
        shard larger than the bound is read in parts, each placed on the shard's device(s) and written into
        the shard there. It must hold one element (saved and cast) of every tensor loaded, else
        InvalidArgumentError. Within it, the next batch is read while the previous one goes to the devices; on
        accelerators, host buffers whose transfer ended are reused by the next batches. Without ``progress`` the
        batches are planned as they run (the first is read while the next ones are planned; an error found
        planning a later batch fails the load once the reads under way have ended); with it, all of them first,
        for the total. A :meth:`close` before this returns makes it raise CheckpointClosedError.

        A target dtype other than the saved one (for a target read without a mapping entry) is a cast: with
        ``cast="safe"`` (the default) only one that keeps every value (``np.can_cast(saved, target, "safe")``;
        with ml_dtypes types, e.g. bfloat16 to float32 but not float32 to bfloat16); ``cast="unsafe"`` allows
        any (float to int, wider to narrower ...), as does an explicit ``.astype`` in the mapping.

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
        try:
            return self._load(target, mapping, max_inflight_bytes, progress, coalesce_gap, mesh, cast, rules)
        finally:
            self._release_located()  # per-archive state does not outlive the load

    def _load(self, target: Any, mapping: Any, max_inflight_bytes: int | None,
              progress: bool | Callable[[dict[str, Any]], None], coalesce_gap: int, mesh: Any, cast: str,
              rules: Any) -> Any:
        import jax

        target = resolve_target(self, target, mesh, rules)
        # Without a progress report (which needs the total first), the program is planned batch by batch as
        # it runs: the first batch is read while the next ones are planned.
        plan, entries, unflatten = self._plan(target, mapping, max_inflight_bytes, coalesce_gap, mesh, local_only=True,
                                              cast=cast, lazy=not (callable(progress) or progress))
        program: _program.Program | None = plan._program
        targets = plan._targets
        report = _progress_fn(progress)
        executor = program.executor if program is not None else Executor(self.store, self.io, coalesce_gap)
        device_arrays: dict[int, dict[Any, Any]] = {t.index: {} for t in targets if t is not None}
        whole: dict[int, Any] = {}  # targets whose every local piece came in one unit: their global arrays
        total = plan.bytes_needed
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

        limit = program.limit if program is not None else 0
        # The unit being read (its reads on the pool), and on accelerators the units whose host buffers are
        # still being copied to the devices: unit k+1 is read while unit k goes to the devices, as long as
        # their host bytes together stay within the bound.
        # Host blocks whose bytes reached an accelerator are reused by the next units (no fresh page faults).
        reading: list[tuple[_program.Unit, list[np.ndarray], Callable[[], None], list[np.ndarray]]] = []
        moving: collections.deque[tuple[list[Any], int, list[np.ndarray]]] = collections.deque()
        host_pool = _place.HostPool(limit)

        def held() -> int:
            return sum(u.host_bytes for u, _, _, _ in reading) + sum(n for _, n, _ in moving)

        def place() -> None:
            """Finish the oldest unit being read and put its pieces on their devices (asynchronously)."""
            unit, hosts, wait, blocks = reading.pop(0)
            bufs = self._finish_unit(unit, hosts, wait)
            # A target whose local pieces are all in this unit becomes its global array at once (one batched
            # put); the pieces of the others are put one by one and assembled at the end.
            boxes: dict[int, dict[Any, np.ndarray]] = {}
            ndev: dict[int, int] = {}
            for step, buf in zip(unit.steps, bufs):
                boxes.setdefault(step.target.index, {})[step.piece.box] = buf
                ndev[step.target.index] = ndev.get(step.target.index, 0) + len(step.piece.devices)
            at_once = {i for i, n in ndev.items() if not device_arrays[i]
                       and n == len(targets[i].sharding.addressable_devices)}
            host, devs, owners = [], [], []
            for step, buf in zip(unit.steps, bufs):
                if step.target.index in at_once:
                    continue
                for dev in step.piece.devices:
                    host.append(buf)
                    devs.append(dev)
                    owners.append(step.target.index)
            placed = _place.put(host, devs)
            for i, dev, arr in zip(owners, devs, placed):
                device_arrays[i][dev] = arr
            for i in sorted(at_once):
                whole[i] = _place.make_global(targets[i].shape, targets[i].sharding, boxes[i])
                placed.append(whole[i])
            if _copies_to_device([d for step in unit.steps for d in step.piece.devices]):
                moving.append((placed, unit.host_bytes, blocks))  # its host buffers are released (or reused) once done
            advance(unit.nbytes)

        def settle(nbytes: int = -1) -> None:
            """Until ``nbytes`` more host bytes fit the bound (all, by default): place the unit being read,
            then wait for the oldest transfers."""
            while reading and (nbytes < 0 or held() + nbytes > limit):
                place()
            while moving and (nbytes < 0 or held() + nbytes > limit):
                placed, _, blocks = moving.popleft()
                jax.block_until_ready(placed)
                host_pool.give(blocks)

        with ThreadPoolExecutor(executor.threads) as pool, _closing(report):
            try:
                for batch in program.batches if program is not None else ():
                    if batch.in_parts:  # shards larger than the bound
                        settle()
                        for i, dev, arr in self._load_in_parts(batch, executor, pool, advance):
                            device_arrays[i][dev] = arr
                        continue
                    unit = batch.units[0]
                    settle(unit.host_bytes)
                    # Only a unit whose every device copies reads into pooled blocks (and gives them back): a
                    # device that aliases its host buffer (CPU) keeps the block as its array.
                    blocks: list[np.ndarray] = []
                    if all(_copies_to_device([d]) for step in unit.steps for d in step.piece.devices):
                        hosts, wait = self._start_unit(unit, executor, pool, host_pool, blocks)
                    else:
                        hosts, wait = self._start_unit(unit, executor, pool)
                    reading.append((unit, hosts, wait, blocks))
                    if len(reading) > 1:
                        place()  # the previous unit, while the pool reads this one
                settle()
            except BaseException:
                for unit, hosts, wait, _ in reading:  # no read still writes into a buffer once this raises
                    with contextlib.suppress(BaseException):
                        self._finish_unit(unit, hosts, wait)
                raise
        out = []
        for entry, t in zip(entries, targets):
            if t is None:
                out.append(self.objects[entry.name])
                continue
            if t.index in whole:
                out.append(whole[t.index])
                continue
            per_dev = device_arrays[t.index]
            order = list(t.sharding.addressable_devices_indices_map(t.shape))
            out.append(_place.assemble(t.shape, t.sharding, [per_dev[d] for d in order]))
        # A close() that came after the last read still fails the load: "closed before load returned" is
        # then always an error, never a race between success and failure.
        self._check_open()
        return unflatten(out)

    def _run_unit(self, unit: _program.Unit, executor: Executor, pool: ThreadPoolExecutor) -> list[np.ndarray]:
        """Read one unit into fresh host buffers; per step, its buffer cast to the target dtype."""
        hosts, wait = self._start_unit(unit, executor, pool)
        return self._finish_unit(unit, hosts, wait)

    def _start_unit(self, unit: _program.Unit, executor: Executor, pool: ThreadPoolExecutor,
                    host_pool: _place.HostPool | None = None, blocks: list[np.ndarray] | None = None
                    ) -> tuple[list[np.ndarray], Callable[[], None]]:
        """Allocate a unit's host buffers (from ``host_pool`` when given; their blocks appended to ``blocks``) and
        submit its reads: the buffers, and what :meth:`_finish_unit` waits on."""
        hosts = _place.allocate([s for step in unit.steps for s in step.slots()], pool=host_pool, blocks=blocks)
        for j in unit.jobs:
            j.dest = hosts[j.slot]
        for lane in unit.lanes:
            lane.dests = hosts
        try:
            wait = executor.start(unit.prepared, pool)
            if unit.deferred:  # items read whole (small or compressed): located now, read and copied on the pool
                try:
                    located = self._locate((r.info, r.overlap.chunk_id) for r in unit.deferred)
                    jobs, _ = _program.jobs_of(unit.deferred, located)
                    for j in jobs:
                        j.dest = hosts[j.slot]
                    # Not waited for here: queued behind this unit's reads, they would hold up the planning of
                    # the next unit until the pool is idle.
                    rest = executor.start(executor.prepare(jobs), pool)
                except BaseException:
                    with contextlib.suppress(BaseException):
                        wait()  # no read still writes into the buffers once this raises
                    raise
                wait = _both(wait, rest)
            return hosts, wait
        except BaseException as e:
            _unbind(unit)
            if isinstance(e, RuntimeError):
                self._check_open()  # close() shut the pool down: "cannot schedule new futures after shutdown"
            raise

    def _finish_unit(self, unit: _program.Unit, hosts: list[np.ndarray], wait: Callable[[], None]) -> list[np.ndarray]:
        """Wait for a started unit's reads; per step, its buffer cast to the target dtype."""
        try:
            wait()
        except Exception:
            self._check_open()  # a close() under the read (its pool shut down) is what went wrong
            raise
        finally:
            _unbind(unit)
        out = []
        for step in unit.steps:
            buf = hosts[step.slot]
            for k, leaf in enumerate(step.temps):
                val = hosts[step.slot + 1 + k]
                for c in leaf.casts:
                    val = _cast(val, c)
                np.copyto(strided_view(buf, leaf.shape, leaf.dst, leaf.strides), val, casting="unsafe")
            for c in step.casts:
                buf = _cast(buf, c)
            out.append(_cast(buf, step.target.dtype))
        return out

    def _load_in_parts(self, batch: _program.Batch, executor: Executor, pool: ThreadPoolExecutor,
                       advance: Callable[[int], None]) -> list[tuple[int, Any, Any]]:
        """``(target index, device, array)`` for a group of pieces of one target, all of one shape and each
        larger than the bound, filled in lockstep part by part (one unit per part). Each part is put on its
        piece's devices and written there into a device buffer of the whole piece: the buffers of all the
        devices are the shards of one array, updated by one compiled ``dynamic_update_slice`` per step
        (donated: each device holds one piece and one part)."""
        import jax
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        t, first = batch.group[0]
        shape = first.shape
        index_dtype = np.int32 if max(shape) < 2**31 else np.int64
        devices = [dev for _, piece in batch.group for dev in piece.devices]
        sharding = NamedSharding(Mesh(np.array(devices), ("pieces",)), PartitionSpec("pieces"))
        buf = _zeros_fn(sharding, (len(devices) * shape[0],) + shape[1:], np.dtype(t.dtype))()
        update = _update_fn(sharding.mesh)
        for unit in batch.units:
            assert unit.rel is not None
            part_shape = tuple(b - a for a, b in unit.rel)
            hosts = self._run_unit(unit, executor, pool)
            placed = _place.put([host for step, host in zip(unit.steps, hosts) for _ in step.piece.devices], devices)
            part = jax.make_array_from_single_device_arrays((len(devices) * part_shape[0],) + part_shape[1:],
                                                            sharding, placed)
            buf = update(buf, part, np.array([a for a, _ in unit.rel], index_dtype))
            jax.block_until_ready(buf)  # the host parts may be released after this (one part in flight)
            del hosts, placed, part
            advance(unit.nbytes)
        return [(t.index, shard.device, shard.data) for shard in buf.addressable_shards]

    # -- internals --------------------------------------------------------------------------------

    def _check_leaf(self, name: str, shape: tuple[int, ...], dtype: np.dtype, sharding: Any) -> None:
        """A target array's sharding and dtype checked before anything is planned."""
        import jax

        if sharding is None:
            raise ShardingError(f"target {name!r}: no sharding; give jax.ShapeDtypeStruct(..., sharding=...)")
        try:
            sharding.shard_shape(shape)
        except Exception as e:  # jax raises IndivisibleError / ValueError
            raise ShardingError(f"target {name!r} of shape {shape}: the target sharding cannot tile it: {e}") from None
        narrow = np.dtype(jax.dtypes.canonicalize_dtype(dtype))
        if narrow != dtype:
            # jax.device_put would silently make a narrower array (int64 2**40 + 7 would load as 7).
            raise TargetMismatchError(
                f"{self.source}: target {name!r}: the target dtype {dtype} is a 64-bit type, which JAX narrows to "
                f"{narrow} while 64-bit types are off (jax_enable_x64 is False), changing values that do not fit. "
                'Enable them with jax.config.update("jax_enable_x64", True) or the environment variable '
                f"JAX_ENABLE_X64=1, or ask for the narrower dtype explicitly in the target: "
                f"jax.ShapeDtypeStruct({shape}, np.{narrow.name}, sharding=...)"
            )

    def _locate(self, wanted: Iterable[tuple[TensorInfo, int]], precise: bool = False,
                state: Located | None = None) -> dict[tuple[str, int], Locator]:
        """Locators of the (tensor, chunk id) pairs, keyed by (name, chunk id): one batched locate for those
        not in ``state`` (default: the checkpoint's current :class:`~jreshard.lanes.Located`) yet, which are then added to it.
        Locators holding bytes in memory (small or compressed items) are not kept.
        ``precise``: chunks read whole only for being small are located for sub-ranges instead."""
        if state is None:
            state = self._located
        out: dict[tuple[str, int], Locator | None] = {}
        todo: list[tuple[TensorInfo, int]] = []
        for info, cid in wanted:
            key = (info.name, cid)
            if key not in out:
                out[key] = state.locators.get(key)
                if out[key] is None:
                    todo.append((info, cid))
        if todo:
            found = self.format.locate_many([(info, info.chunks[cid]) for info, cid in todo], precise=precise,
                                            headers=state.headers)
            for (info, cid), loc in zip(todo, found):
                out[(info.name, cid)] = loc
                if loc.data is None:
                    state.locators[(info.name, cid)] = loc
                    if info.chunks[cid].whole_read_nbytes is not None:
                        state.sub_ranged.add(info.name)
                    table = state.lane_tables.get(info.name)
                    if table is None:
                        table = state.lane_tables[info.name] = LaneTable(len(info.chunks))
                    table.put(info, cid, loc, state.file_ids)
        return out  # type: ignore[return-value]  # every entry is filled now

    def _release_located(self) -> None:
        """Drops what locating chunks found (:class:`~jreshard.lanes.Located`, header caches included):
        per-archive state lives until the load that used it ends, not for the life of the checkpoint. A later
        plan or load locates again (reading those headers again)."""
        self._located = Located()


# read(): at most this many boxes per saved dimension combination are traced for strided slices (one box per
# selected index); strides along the other dimensions are taken on the host from the bounding box read.
MAX_TRACED_BOXES = 4096


def _abstract_leaves(source: Any, target: Any, devices_per_process: int | None) -> tuple[Any, dict[str, Any]]:
    """``target`` with its array leaves over an AbstractMesh left without a sharding (for
    :func:`~jreshard.targets.flatten_target`), and their shardings by leaf name as
    :class:`~jreshard.planning.AbstractSharding` over ``devices_per_process``."""
    import jax

    from .planning import AbstractSharding
    from .targets import _path_name

    found: dict[str, Any] = {}

    def is_leaf(x: Any) -> bool:
        return isinstance(x, (jax.ShapeDtypeStruct, jax.Array))

    def strip(path: Any, leaf: Any) -> Any:
        sharding = getattr(leaf, "sharding", None) if isinstance(leaf, jax.ShapeDtypeStruct) else None
        if not (isinstance(sharding, jax.sharding.NamedSharding)
                and isinstance(sharding.mesh, jax.sharding.AbstractMesh)):
            return leaf
        name = _path_name(path)
        if devices_per_process is None:
            raise InvalidArgumentError(
                f"{source}: target leaf {name!r} is sharded over {sharding.mesh}, whose devices do not exist here; "
                "say how many devices each process holds with devices_per_process=N (or give a concrete mesh=)")
        found[name] = AbstractSharding(sharding, devices_per_process)
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)

    stripped = jax.tree_util.tree_map_with_path(strip, target, is_leaf=is_leaf)
    if devices_per_process is not None and not found:
        raise InvalidArgumentError(f"{source}: devices_per_process={devices_per_process!r} applies to targets sharded "
                                   "over a jax.sharding.AbstractMesh, and no target leaf is")
    return stripped, found


def _processes_asked(source: Any, process_index: Any, this: int,
                     targets: Sequence[Any]) -> tuple[list[int], int]:
    """The processes a plan covers, in order, and the one whose program it keeps, from ``process_index``."""
    if process_index is None:
        return [this], this
    if isinstance(process_index, str):
        if process_index != "all":
            raise InvalidArgumentError(f"process_index must be None, a process number, 'all' or a list of process "
                                       f"numbers, not {process_index!r}")
        spanned = _program.target_processes(targets)
        return spanned, this if this in spanned or not spanned else spanned[0]
    single = isinstance(process_index, numbers.Integral) and not isinstance(process_index, bool)
    asked = [process_index] if single else process_index
    try:
        asked = list(asked)
    except TypeError:
        asked = [process_index]
    if not asked or any(isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 0 for k in asked):
        raise InvalidArgumentError(f"process_index must be None, a process number (>= 0), 'all' or a list of "
                                   f"process numbers, not {process_index!r}")
    asked = list(dict.fromkeys(int(k) for k in asked))
    if asked != [this]:
        spanned = set(_program.target_processes(targets))
        outside = [k for k in asked if k not in spanned]
        if outside:
            shown = (f"0..{max(spanned)}" if spanned == set(range(max(spanned) + 1)) else
                     ", ".join(map(str, sorted(spanned)))) if spanned else "none"
            raise InvalidArgumentError(
                f"{source}: process_index {outside[0]} holds no device of the target's shardings (processes {shown}); "
                "for a mesh over more hosts than this one, give the target over a jax.sharding.AbstractMesh with "
                "devices_per_process=N")
    return asked, this if this in asked else asked[0]


def _read_keys(index: Any, shape: tuple[int, ...], where: str) -> tuple[tuple[Any, ...], tuple[Any, ...] | None]:
    """numpy basic indexing as ``(view key, host key)``: ``saved(name)[view key]`` selects the elements (strided
    slices there only while they trace to at most MAX_TRACED_BOXES boxes, else their bounding slice), and
    ``result[host key]`` (None: nothing to do) takes the remaining strides and reversals.
    InvalidArgumentError for what basic indexing does not allow or jreshard does not support.

    Example:
        >>> _read_keys((slice(None, None, -1), None, 2), (4, 5), "x")
        ((slice(0, 4, None), None, 2), (slice(None, None, -1), slice(None, None, None)))
        >>> _read_keys(..., (4, 5), "x")
        ((slice(0, 4, None), slice(0, 5, None)), None)
    """
    key = index if isinstance(index, tuple) else (index,)
    for k in key:
        if k is None or k is Ellipsis or _is_int(k):
            continue
        if isinstance(k, slice):
            for part in (k.start, k.stop, k.step):
                if part is not None and not _is_int(part):
                    raise InvalidArgumentError(f"{where}: slice {k!r} must have integer (or None) bounds and step")
            if k.step is not None and int(k.step) == 0:
                raise InvalidArgumentError(f"{where}: slice step cannot be zero")
            continue
        if isinstance(k, (bool, np.bool_)):
            what = "a boolean"
        elif isinstance(k, np.ndarray):
            what = "an array"
        elif isinstance(k, (list, tuple)):
            what = f"a {type(k).__name__}"
        else:
            raise InvalidArgumentError(f"{where}: {type(k).__name__} {k!r} is not an index; give integers, slices, "
                                       "..., None, or a tuple of them")
        raise InvalidArgumentError(f"{where}: {what} is fancy indexing, which read does not support; give basic "
                                   "indices (integers, slices, ..., None, or a tuple of them) and index the result "
                                   "with numpy for the rest")
    if sum(1 for k in key if k is Ellipsis) > 1:
        raise InvalidArgumentError(f"{where}: an index can only have a single ellipsis ('...')")
    real = sum(1 for k in key if k is not None and k is not Ellipsis)
    if real > len(shape):
        raise InvalidArgumentError(f"{where}: too many indices: the tensor has {len(shape)} dimensions but {real} "
                                   "were indexed")
    full: list[Any] = []
    for k in key:
        full.extend([slice(None)] * (len(shape) - real) if k is Ellipsis else [k])
    if Ellipsis not in key:
        full.extend([slice(None)] * (len(shape) - real))
    # Per entry: (view entry, host entry, boxes traced, |step| where the stride could go to the view).
    entries: list[list[Any]] = []
    d = 0
    for k in full:
        if k is None:
            entries.append([None, slice(None), 1, 0])
            continue
        size = shape[d]
        if not isinstance(k, slice):
            i = int(k)
            if not -size <= i < size:
                raise InvalidArgumentError(f"{where}: index {i} is out of bounds for dimension {d} of size {size}")
            entries.append([i % size, None, 1, 0])
        else:
            start, stop, step = slice(*(None if p is None else int(p) for p in (k.start, k.stop, k.step))).indices(size)
            sel = range(start, stop, step)
            if len(sel) == 0:
                entries.append([slice(0, 0), slice(None), 1, 0])
            elif step == 1:
                entries.append([slice(start, stop), slice(None), 1, 0])
            else:
                lo, hi = min(sel[0], sel[-1]), max(sel[0], sel[-1]) + 1
                # bounding slice, stride on the host (may move to the view below)
                entries.append([slice(lo, hi), slice(None, None, step), len(sel), abs(step)])
        d += 1
    traced = 1
    for e in sorted((e for e in entries if e[3] > 1), key=lambda e: -e[3]):
        if traced * e[2] > MAX_TRACED_BOXES:
            continue
        traced *= e[2]
        e[0] = slice(e[0].start, e[0].stop, e[3])
        e[1] = slice(None, None, -1 if e[1].step < 0 else None)
    view_key = tuple(e[0] for e in entries)
    host_key = tuple(e[1] for e in entries if e[1] is not None)
    if all(h == slice(None) for h in host_key):
        return view_key, None
    return view_key, host_key


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_))


def _cast(buf: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``buf`` as ``dtype``: itself when it has that dtype, else an aligned copy (an unsafe cast, as asked)."""
    if buf.dtype == dtype:
        return buf
    out = _place.aligned_empty(buf.shape, dtype)
    np.copyto(out, buf, casting="unsafe")
    return out


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


PROGRESS_EVERY_S = 10.0  # progress=True without a terminal: a line at most this often, and a final one


def _load_line(info: dict[str, Any]) -> str:
    """One progress line of a load: percent, bytes, rate and ETA (or the time taken, at the end).

    Example:
        >>> _load_line({"bytes_done": 3 * 2**20, "bytes_total": 4 * 2**20, "seconds": 3.0})
        ' 75.0%  3.00 MiB / 4.00 MiB  1.00 MiB/s  ETA 0:01'
        >>> _load_line({"bytes_done": 0, "bytes_total": 0, "seconds": 0.5})
        '100.0%  0 B / 0 B  0 B/s  in 0.5 s'
    """
    from .planning import _human

    done, total, secs = info["bytes_done"], info["bytes_total"], info["seconds"]
    frac = 1.0 if total <= 0 else min(1.0, done / total)
    rate = done / secs if secs > 0 else 0.0
    if done >= total:
        eta = f"in {secs:.1f} s"
    elif rate > 0:
        left = round((total - done) / rate)
        eta = f"ETA {left // 60}:{left % 60:02d}"
    else:
        eta = "ETA --:--"
    return f"{100 * frac:5.1f}%  {_human(done)} / {_human(total)}  {_human(round(rate))}/s  {eta}"


def _progress_fn(progress: Any, line: Callable[[dict[str, Any]], str] = _load_line,
                 label: str = "jreshard") -> Callable[[dict[str, Any]], None] | None:
    """``progress`` as a callback of the counters (``bytes_done``, ``bytes_total``, ``seconds`` ...): a callable
    as it is, False as None, and True as a reporter on stderr: a ``rich`` progress bar (bytes, rate, ETA) when
    stderr is a terminal (or this runs in a notebook with ipywidgets) and rich is importable, else plain
    ``\\n``-terminated lines, ``label: line(counters)``: the first report, then at most one every
    PROGRESS_EVERY_S seconds, and the final one when ``bytes_done`` reaches ``bytes_total``. A reporter has
    ``close()``, which ends its display (call it however the work ends; :func:`_closing`)."""
    if callable(progress):
        return progress
    if not progress:
        return None
    if _rich_ok(sys.stderr):
        return _RichProgress(label, sys.stderr)
    return _LineProgress(label, line)


class _LineProgress:
    """Progress as plain lines on (the current) ``sys.stderr``: the first report, then one at most every ``every``
    seconds, and the final one, each ending in a newline (a log file gets lines, not one long ``\\r``-joined
    line)."""

    def __init__(self, label: str, line: Callable[[dict[str, Any]], str], every: float | None = None) -> None:
        self.label, self.line = label, line
        self.every = PROGRESS_EVERY_S if every is None else every
        self.last: float | None = None
        self.finished = False

    def __call__(self, info: dict[str, Any]) -> None:
        final = info["bytes_done"] >= info["bytes_total"]
        now = time.monotonic()
        if self.finished or not (final or self.last is None or now - self.last >= self.every):
            return
        self.last, self.finished = now, final
        sys.stderr.write(f"{self.label}: {self.line(info)}\n")
        sys.stderr.flush()

    def close(self) -> None:
        pass


class _RichProgress:
    """Progress as a rich progress bar on ``stream``: bytes, percent, rate and ETA (and arrays, for convert),
    started at the first report, refreshed at most ten times a second, stopped at the end or by ``close``."""

    def __init__(self, label: str, stream: Any) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TaskProgressColumn,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self.label = label
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                            DownloadColumn(binary_units=True), TransferSpeedColumn(), TimeRemainingColumn(),
                            TextColumn("{task.fields[extra]}"), console=Console(file=stream), auto_refresh=False,
                            redirect_stdout=False, redirect_stderr=False)
        self.task: Any = None
        self.last = 0.0
        self.closed = False

    def __call__(self, info: dict[str, Any]) -> None:
        import atexit

        done, total = info["bytes_done"], info["bytes_total"]
        if self.closed or total <= 0:
            return
        extra = f"{info['arrays_done']}/{info['arrays_total']} arrays" if "arrays_done" in info else ""
        if self.task is None:
            self.bar.start()
            atexit.register(self.close)  # a display never left half-drawn, even if nobody calls close
            self.task = self.bar.add_task(self.label, total=total, extra=extra)
        self.bar.update(self.task, completed=done, total=total, extra=extra)
        now = time.monotonic()
        if done >= total:
            self.close()
        elif now - self.last >= 0.1:
            self.last = now
            self.bar.refresh()

    def close(self) -> None:
        import atexit

        if self.closed:
            return
        self.closed = True
        if self.task is not None:
            self.bar.refresh()
            self.bar.stop()
            atexit.unregister(self.close)


def _copies_to_device(devices: Sequence[Any]) -> bool:
    """Whether ``device_put`` onto ``devices`` copies host buffers (asynchronously) rather than aliasing them
    (CPU devices)."""
    return any(d.platform != "cpu" for d in devices)


def _both(first: Callable[[], None], second: Callable[[], None]) -> Callable[[], None]:
    """A wait for two started parts: both have ended when it returns or raises (the first failure)."""

    def wait() -> None:
        try:
            first()
        except BaseException:
            with contextlib.suppress(BaseException):
                second()
            raise
        second()

    return wait


def _unbind(unit: _program.Unit) -> None:
    """Release a unit's host buffers from its jobs and lanes."""
    for j in unit.jobs:
        j.dest = None
    for lane in unit.lanes:
        lane.dests = None


@contextlib.contextmanager
def _closing(report: Any) -> Iterator[None]:
    """Close a progress reporter (if it has ``close``) however the block ends."""
    try:
        yield
    finally:
        close = getattr(report, "close", None)
        if close is not None:
            close()


def _rich_ok(stream: Any) -> bool:
    """Whether ``progress=True`` draws a rich progress bar: rich importable, and ``stream`` a terminal, or this a
    notebook kernel with ipywidgets (which rich needs there)."""
    import importlib.util

    if importlib.util.find_spec("rich") is None:
        return False
    if _in_notebook():
        return importlib.util.find_spec("ipywidgets") is not None
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _in_notebook() -> bool:
    """Whether this runs in a Jupyter (or Colab) kernel."""
    ipython = sys.modules.get("IPython")
    get = getattr(ipython, "get_ipython", None)
    shell = get() if get is not None else None
    return shell is not None and hasattr(shell, "kernel")


def _unknown(name: str, known: Mapping[str, Any], source: str) -> str:
    return (f"{source}: no tensor or object named {name!r} in the checkpoint ({len(known)} entries)"
            + _program.close_hint(name, known))
