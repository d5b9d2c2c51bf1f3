"""Convert a PyTorch checkpoint into a native Orbax checkpoint, batch by batch, atomically.

:func:`convert` writes Orbax's on-disk format itself, with tensorstore (which Orbax uses): the layout
``ocp.StandardCheckpointer().save`` writes (zarr arrays in one OCDBT key-value store, ``_METADATA``,
``_sharding``, ``array_metadatas/``, ``_CHECKPOINT_METADATA``, ``commit_success.txt``), without going through
Orbax's save. With ``target=None`` each batch of at most ``max_inflight_bytes`` is read into numpy with
:meth:`Checkpoint.read` (no jax arrays; a larger tensor in slabs of rows); with a target the batch is loaded with
:meth:`Checkpoint.load` and each addressable shard is written once. Each batch is written and freed before the
next is read, so the whole model is never in memory.

Atomicity: everything is written under a hidden work directory next to the first missing component of ``dest``
(``.NAME.jreshard-convert-tmp``), never a name Orbax or an ``ocp.CheckpointManager`` takes for a checkpoint or a
step; ``dest`` appears in one ``rename(2)`` at the very end. A conversion killed at any point leaves at most that
work directory, which the next conversion into the same ``dest`` removes. tensorstore is imported only when
:func:`convert` runs, Orbax only to record a target's ``NamedSharding``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InvalidArgumentError, JReshardError, TargetMismatchError
from .write_dcp import fsync_dir as _fsync_dir

__all__ = ["DEFAULT_CONVERT_INFLIGHT", "ConvertError", "convert", "work_dir_of"]

DEFAULT_CONVERT_INFLIGHT = 1 * 2**30
TMP_SUFFIX = ".jreshard-convert-tmp"

# A test hook: called with the batch's arrays (and counters) after each batch is written, before it is freed.
_batch_hook: Callable[[dict[str, Any]], None] | None = None


class ConvertError(JReshardError):
    """A conversion cannot be done or failed: ``dest`` exists, is not a local path, or tensorstore failed to write.

    Example:
        >>> import jreshard
        >>> try:
        ...     jreshard.convert(jreshard.sample_path(), jreshard.sample_path())
        ... except jreshard.ConvertError as e:
        ...     print("exists" in str(e))
        True
    """


def work_dir_of(dest: str | os.PathLike) -> Path:
    """The hidden work directory a conversion into ``dest`` writes to: next to the first component of ``dest``
    that does not exist yet (``dest`` itself when its parent exists), so that the final rename creates that
    component, and with it ``dest``, at once.

    Example:
        >>> work_dir_of("/tmp/no-such-dir-jreshard/ckpt").name
        '.no-such-dir-jreshard.jreshard-convert-tmp'
    """
    top = _top_missing(Path(os.path.abspath(os.fspath(dest))))
    return top.parent / f".{top.name}{TMP_SUFFIX}"


def _top_missing(dest: Path) -> Path:
    top = dest
    while not top.parent.exists() and top.parent != top.parent.parent:
        top = top.parent
    return top


def convert(source: str | os.PathLike, dest: str | os.PathLike, target: Any = None, mapping: Any = None, *,
            max_inflight_bytes: int | None = None, mesh: Any = None, storage_options: dict[str, Any] | None = None,
            progress: bool | Callable[[dict[str, Any]], None] = False, io: str = "auto",
            sync_files: bool = False, cast: str = "safe") -> str:
    """Convert the checkpoint ``source`` (anything :func:`jreshard.open` reads) into a native Orbax checkpoint at
    ``dest``: the layout ``ocp.StandardCheckpointer`` writes, restored by plain Orbax onto any sharding with
    ``ocp.StandardCheckpointer().restore(dest, abstract_tree)``. Returns ``dest`` as an absolute path.

    ``target=None`` converts every saved tensor, with its saved dtype, into a nested dict built from the dotted
    names (``"model.layers.0.w"`` -> ``{"model": {"layers": {"0": {"w": ...}}}}``), each array written unsharded
    from the first device (the sharding only matters as Orbax's default when a restore gives none). Non-tensor
    entries (``step`` ...) are not converted. A 64-bit tensor while JAX's 64-bit types are off is written from
    numpy, exactly (Orbax restores it as 64-bit only with 64-bit types on).

    Otherwise ``target`` and ``mapping`` are those of :func:`jreshard.load`: the checkpoint has the target's
    names and structure (nested dicts of its key paths: a flat dict keyed by dotted names stays flat, a list
    index becomes the key ``"0"``...), its dtypes and shardings; leaves naming saved objects (``"step"``) are
    written as those objects (they must be values Orbax saves: numbers, strings, numpy arrays).

    Memory: the target's arrays are loaded and written in batches of at most ``max_inflight_bytes`` bytes on
    this process's devices (default 1 GiB; replicas count once per device), each written and freed before the
    next is read. With ``target=None`` a tensor larger than the bound is read and written in slabs of rows
    (its zarr chunks); with a target, an array larger than the bound is a batch of its own, held whole.

    ``cast`` is :func:`jreshard.load`'s: a target dtype other than the saved one is a cast, and one that can
    change values needs ``cast="unsafe"`` (or an ``.astype`` in the mapping).

    ``sync_files=True`` fsyncs every file written (slower: the whole checkpoint goes to disk before the rename);
    by default the data is left to the page cache, which survives a crash or a SIGKILL of the process but not a
    power loss.

    Atomic: ``dest`` must not exist; it appears by one rename when the checkpoint is complete. A conversion
    interrupted at any point (an exception, Ctrl-C, SIGKILL) leaves no ``dest``, only a hidden work directory
    (:func:`work_dir_of`) that Orbax and ``ocp.CheckpointManager`` ignore, removed on an exception or Ctrl-C and
    otherwise by the next conversion into ``dest``. Do not run two conversions into the same ``dest`` at once.
    ``dest`` must be a local path (with a local path, a rename is atomic). Single JAX process only.

    ``progress=True`` draws a progress bar (bytes, rate, ETA) on stderr; a callable receives a dict of counters
    (``bytes_done``, ``bytes_total``, ``arrays_done``, ``arrays_total``, ``seconds``) after every batch.
    ``mesh``, ``io`` and ``storage_options`` are those of :func:`jreshard.load` / :func:`jreshard.open`.

    Example:
        >>> import os, tempfile, jax, orbax.checkpoint as ocp
        >>> from jax.sharding import SingleDeviceSharding
        >>> from jreshard import sample_path
        >>> from jreshard import convert
        >>> dest = convert(sample_path(), os.path.join(tempfile.mkdtemp(), "orbax"), max_inflight_bytes=2**20)
        >>> s = SingleDeviceSharding(jax.devices()[0])
        >>> abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s),
        ...                         ocp.StandardCheckpointer().metadata(dest).item_metadata.tree)
        >>> restored = ocp.StandardCheckpointer().restore(dest, abstract)
        >>> restored["model"]["embed"]["weight"].shape
        (64, 32)
    """
    import jax

    from . import open as _open

    dest_s = os.fspath(dest)
    if "://" in dest_s:
        raise ConvertError(f"dest {dest_s!r}: convert writes to a local path only (an atomic rename is needed)")
    if jax.process_count() > 1:
        raise ConvertError("convert runs in a single JAX process; run it on one host and restore on many")
    dest_p = Path(os.path.abspath(dest_s))
    if dest_p.exists() or dest_p.is_symlink():
        raise ConvertError(f"{dest_p} exists; remove it or convert into a new path")
    ckpt = source if hasattr(source, "format") and hasattr(source, "load") else _open(
        source, io=io, storage_options=storage_options)
    try:
        return _convert(ckpt, dest_p, target, mapping, max_inflight_bytes, mesh, progress, sync_files, cast)
    finally:
        if ckpt is not source:
            ckpt.close()


# -- the target -----------------------------------------------------------------------------------------


def _default_target(ckpt: Any) -> tuple[dict[str, Any], dict[str, tuple[str, ...]], set[str]]:
    """Every saved tensor on the first device in its saved dtype (flat, by name), the key path of each (its
    dotted name split), and the names to write from numpy (64-bit types JAX would narrow)."""
    import jax
    from jax.sharding import SingleDeviceSharding

    sharding = SingleDeviceSharding(jax.devices()[0])
    flat, paths, numpy_names = {}, {}, set()
    for name, info in ckpt.tensors.items():
        dtype = np.dtype(info.dtype)
        if np.dtype(jax.dtypes.canonicalize_dtype(dtype)) != dtype:
            numpy_names.add(name)
        flat[name] = jax.ShapeDtypeStruct(info.shape, dtype, sharding=sharding)
        paths[name] = tuple(name.split("."))
    _check_paths(ckpt.source, paths)
    return flat, paths, numpy_names


def _check_paths(source: str, paths: dict[str, tuple[str, ...]]) -> None:
    """Refuse names that cannot all be leaves of one nested dict (``a.b`` and ``a.b.c``, or an empty part)."""
    leaves = set(paths.values())
    for name, path in paths.items():
        if any(p == "" for p in path):
            raise TargetMismatchError(f"{source}: tensor {name!r} has an empty part in its dotted name; give a "
                                      "target to convert it under another name")
        for k in range(1, len(path)):
            if path[:k] in leaves:
                raise TargetMismatchError(
                    f"{source}: tensor {'.'.join(path[:k])!r} is also a prefix of {name!r}: they cannot both be "
                    "leaves of one nested dict; give a target (e.g. a flat dict of their names) to convert them")


def _key_paths(target: Any, entries: list[Any], unflatten: Callable[[list[Any]], Any]) -> list[tuple[str, ...]]:
    """The key path of every target leaf, as strings: the path of leaf ``i`` in ``unflatten(range(n))``."""
    import jax

    from .targets import key_name

    marks = [_Mark(i) for i in range(len(entries))]
    flat, _ = jax.tree_util.tree_flatten_with_path(unflatten(marks), is_leaf=lambda x: isinstance(x, _Mark))
    out: list[tuple[str, ...] | None] = [None] * len(entries)
    for path, leaf in flat:
        if isinstance(leaf, _Mark):
            keys = tuple(key_name(k) for k in path)
            out[leaf.i] = keys
    for i, e in enumerate(entries):
        if out[i] is None or ".".join(out[i]) != e.name:  # e.g. an nnx Variable: fall back to the dotted name
            out[i] = tuple(e.name.split("."))
    return out  # type: ignore[return-value]


class _Mark:
    def __init__(self, i: int) -> None:
        self.i = i


def _nest(items: list[tuple[tuple[str, ...], Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path, value in items:
        d = out
        for k in path[:-1]:
            d = d.setdefault(k, {})
        d[path[-1]] = value
    return out


def _local_bytes(shape: tuple[int, ...], dtype: Any, sharding: Any) -> int:
    """Bytes an array of this sharding takes on this process's devices (replicas counted per device)."""
    itemsize = np.dtype(dtype).itemsize
    if sharding is None:
        return math.prod(shape) * itemsize
    total = 0
    for index in sharding.addressable_devices_indices_map(shape).values():
        n = 1
        for s, dim in zip(index, shape):
            start, stop, _ = s.indices(dim)
            n *= max(0, stop - start)
        total += n
    return total * itemsize


def _batches(sizes: list[int], limit: int) -> list[list[int]]:
    """Indices grouped in order into batches of at most ``limit`` bytes (a larger item is a batch of its own).

    Example:
        >>> _batches([3, 3, 5, 1, 9, 2], 6)
        [[0, 1], [2, 3], [4], [5]]
    """
    out: list[list[int]] = []
    cur: list[int] = []
    size = 0
    for i, n in enumerate(sizes):
        if cur and size + n > limit:
            out.append(cur)
            cur, size = [], 0
        cur.append(i)
        size += n
    if cur:
        out.append(cur)
    return out


def _limit(value: Any) -> int:
    if value is None:
        return DEFAULT_CONVERT_INFLIGHT
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise InvalidArgumentError(f"max_inflight_bytes must be a positive integer number of bytes, not {value!r}")
    return int(value)


# -- the conversion -------------------------------------------------------------------------------------


def _convert(ckpt: Any, dest: Path, target: Any, mapping: Any, max_inflight_bytes: Any, mesh: Any,
             progress: Any, sync_files: bool = False, cast: str = "safe") -> str:

    from .targets import flatten_target

    limit = _limit(max_inflight_bytes)
    if target is None:
        if mapping is not None:
            raise InvalidArgumentError("a mapping needs a target (the names and shardings to convert into)")
        flat_target, path_of, numpy_names = _default_target(ckpt)
        entries, unflatten = flatten_target(flat_target)
        paths = [path_of[e.name] for e in entries]
    else:
        entries, unflatten = flatten_target(target, mesh=mesh)
        paths = _key_paths(target, entries, unflatten)
        numpy_names = set()
        flat_target = None
    sizes = [0 if e.shape is None else _local_bytes(e.shape, e.dtype, e.sharding) for e in entries]
    totals = [0 if e.shape is None else math.prod(e.shape) * np.dtype(e.dtype).itemsize for e in entries]
    # Check the whole target (names, shapes, mapping, shardings) before anything is written: a plan reads no
    # tensor bytes.
    if target is None:
        jaxed = {e.name: e.leaf for e in entries if e.name not in numpy_names}
        if jaxed:
            ckpt.plan(jaxed, max_inflight_bytes=limit)
    else:
        ckpt.plan(target, mapping=mapping, max_inflight_bytes=limit, mesh=mesh, cast=cast)

    work = work_dir_of(dest)
    top = _top_missing(dest)
    if work.exists() or work.is_symlink():
        _rmtree(work)  # left by a killed conversion into the same dest
    work.mkdir(parents=True)
    report = _progress_fn(progress)
    pending: Any = None
    interrupts = _DeferredInterrupt()
    try:
        stage = work / "ckpt"
        done_bytes, done_arrays, t0 = 0, 0, time.perf_counter()
        total_bytes = sum(totals)
        if report:
            report(_counters(0, total_bytes, 0, len(entries), t0))
        writer = _OrbaxWriter(stage, sync_files)
        for batch in _batches(sizes, limit):
            interrupts.check()
            pending = writer
            if flat_target is not None:  # target=None: host reads into numpy, no jax arrays
                values = _write_default_batch(ckpt, entries, batch, paths, limit, writer)
            else:
                values = _load_batch(ckpt, entries, batch, mapping, limit, mesh, cast)
                created = {i: writer.start_value(paths[i], values[i]) for i in batch}
                for i in batch:
                    writer.write_value(created[i], values[i])
            writer.wait()
            pending = None
            if _batch_hook is not None:
                _batch_hook({"arrays": list(values.values()), "limit": limit,
                             "nbytes": sum(sizes[i] for i in batch)})
            _release(values)
            del values
            done_bytes += sum(totals[i] for i in batch)
            done_arrays += len(batch)
            if report:
                report(_counters(done_bytes, total_bytes, done_arrays, len(entries), t0))
        interrupts.check()
        writer.write_metadata()
        _finalize(stage, work, dest, top)
    except BaseException:
        if pending is not None:  # a Ctrl-C while tensorstore writes in its threads: let it end before removing
            try:
                pending.wait()
            except BaseException:  # noqa: BLE001, S110 - the first error is the one raised
                pass
        _rmtree(work)
        raise
    finally:
        interrupts.restore()
    _rmtree(work)
    return str(dest)


class _DeferredInterrupt:
    """While a conversion runs in the main thread, a first Ctrl-C (SIGINT) is held until the batch being written
    is complete (tensorstore writes in threads of its own, which a KeyboardInterrupt would leave writing into the
    work directory while it is removed); :meth:`check` then raises KeyboardInterrupt. A second Ctrl-C raises at once."""

    def __init__(self) -> None:
        import signal
        import threading

        self.pending = False
        self.old: Any = None
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self.old = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.pending:
            raise KeyboardInterrupt
        self.pending = True

    def check(self) -> None:
        if self.pending:
            raise KeyboardInterrupt

    def restore(self) -> None:
        import signal

        if self.old is not None:
            signal.signal(signal.SIGINT, self.old)
            self.old = None


def _load_batch(ckpt: Any, entries: list[Any], batch: list[int], mapping: Any, limit: int, mesh: Any,
                cast: str) -> dict[int, Any]:
    """The values of a batch of a user target's leaves: loaded arrays and saved objects."""
    import jax

    # A flat sub-target by name; its leaves are plain ShapeDtypeStructs with the shardings already resolved (an
    # nnx Variable or an abstract-mesh leaf becomes one, so that no mesh is needed).
    arrays = {entries[i].name: jax.ShapeDtypeStruct(entries[i].shape, entries[i].dtype, sharding=entries[i].sharding)
              for i in batch if entries[i].shape is not None}
    loaded: dict[str, Any] = {}
    if arrays:
        sub_mapping = None
        if mapping is not None:
            from .program import _mapping

            views = _mapping(mapping)
            sub_mapping = {n: views[n] for n in arrays if n in views}
        loaded = ckpt.load(arrays, mapping=sub_mapping, max_inflight_bytes=limit, mesh=mesh, cast=cast)
    out: dict[int, Any] = {}
    for i in batch:
        name = entries[i].name
        if name in loaded:
            out[i] = loaded[name]
            continue
        try:
            out[i] = ckpt.objects[name]
        except KeyError:
            raise TargetMismatchError(f"{ckpt.source}: no tensor or object named {name!r}") from None
    return out


# -- the native writer: Orbax's on-disk format, written with tensorstore -----------------------------------

# What ``ocp.StandardCheckpointer().save`` writes (orbax-checkpoint 0.12): each array is a zarr (v2) array in one
# OCDBT key-value store at the checkpoint's root, keyed by its key path joined with dots (``a.b/.zarray``,
# ``a.b/0.0``), its chunks its shards (the whole array when unsharded); ``_METADATA`` holds the tree metadata,
# ``_sharding`` the shardings (base64 of the name -> serialized sharding), ``array_metadatas/process_0`` the write
# and chunk shapes, ``_strings.json`` string leaves. This OCDBT config is Orbax's (tensorstore_utils).
_OCDBT_CONFIG = {"max_inline_value_bytes": 1024, "max_decoded_node_bytes": 100000000, "manifest_kind": "single"}
_OCDBT_TARGET_DATA_FILE_SIZE = 2**31
_KEY_TYPE_DICT = 2
# ocp.StandardCheckpointHandler's module and name, as StandardCheckpointer records it (a test checks it).
_STANDARD_HANDLER = "orbax.checkpoint._src.handlers.standard_checkpoint_handler.StandardCheckpointHandler"


class _OrbaxWriter:
    """Writes arrays into an Orbax (StandardCheckpointer) PyTree directory with tensorstore: writes are issued
    asynchronously and :meth:`wait` waits for all of them (one batch); :meth:`write_metadata` writes Orbax's JSON
    files at the end. Chunks are written uncompressed (Orbax reads any zarr compressor) and, unless
    ``sync_files``, without an fsync per file."""

    def __init__(self, directory: Path, sync_files: bool) -> None:
        import tensorstore as ts

        self.ts = ts
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.context = ts.Context({"file_io_sync": bool(sync_files),
                                   "cache_pool#ocdbt": {"total_bytes_limit": 100000000}})
        self.futures: list[Any] = []
        self.tree: dict[str, Any] = {}
        self.shardings: dict[str, str] = {}
        self.array_metadatas: list[dict[str, Any]] = []
        self.strings: dict[str, str] = {}

    def _kvstore(self, name: str) -> dict[str, Any]:
        return {"driver": "ocdbt", "base": f"file://{self.dir}", "path": name, "config": _OCDBT_CONFIG,
                "assume_config": True, "target_data_file_size": _OCDBT_TARGET_DATA_FILE_SIZE,
                "cache_pool": "cache_pool#ocdbt"}

    def _record(self, path: tuple[str, ...], value_type: str, write_shape: Any = None) -> None:
        meta: dict[str, Any] = {"value_type": value_type, "skip_deserialize": False}
        if write_shape is not None:
            meta["write_shape"] = list(write_shape)
        self.tree[str(tuple(path))] = {
            "key_metadata": [{"key": k, "key_type": _KEY_TYPE_DICT} for k in path], "value_metadata": meta}

    def create(self, path: tuple[str, ...], shape: tuple[int, ...], dtype: Any, chunks: tuple[int, ...], *,
               value_type: str = "jax.Array", write_shape: tuple[int, ...] | None = None, sharding: Any = None) -> Any:
        """Start creating the zarr array of leaf ``path`` (chunks of ``chunks``) and record its metadata; returns
        a future of the store (creations issued together are committed together)."""
        name = ".".join(path)
        dtype = np.dtype(dtype)
        spec = {"driver": "zarr", "kvstore": self._kvstore(name), "recheck_cached_data": False,
                "recheck_cached_metadata": False, "store_data_equal_to_fill_value": True,
                "dtype": dtype.name,
                "metadata": {"shape": list(shape), "chunks": list(chunks), "compressor": None}}
        store = self.ts.open(spec, create=True, context=self.context)
        write_shape = tuple(shape) if write_shape is None else write_shape
        self._record(path, value_type, write_shape if value_type == "jax.Array" else None)
        if value_type == "jax.Array":
            self.array_metadatas.append({"array_metadata": {
                "param_name": name, "write_shape": list(write_shape), "chunk_shape": list(chunks),
                "ext_metadata": None}})
            sm = _sharding_metadata(sharding)
            if sm is not None:
                import base64

                self.shardings[base64.b64encode(name.encode()).decode()] = sm
        return store

    def opened(self, future: Any) -> Any:
        try:
            return future.result()
        except Exception as e:
            raise ConvertError(f"tensorstore failed to create an array in {self.dir}: {type(e).__name__}: {e}") from e

    def write(self, store: Any, data: np.ndarray, box: tuple[slice, ...] | None = None) -> None:
        """Start writing ``data`` (kept, unmodified, until :meth:`wait`) into ``store`` (at ``box``)."""
        target = store if box is None or not box else store[box]
        self.futures.append(target.write(data, can_reference_source_data_indefinitely=True))

    def start_value(self, path: tuple[str, ...], value: Any) -> Any:
        """Start creating the array of one leaf of a target (a jax array, a numpy array or a scalar; a string is
        recorded); :meth:`write_value` then writes it."""
        import jax

        if isinstance(value, jax.Array):
            shard_shape = tuple(value.sharding.shard_shape(value.shape))
            return self.create(path, value.shape, value.dtype, shard_shape, write_shape=shard_shape,
                               sharding=value.sharding)
        if isinstance(value, str):
            self._record(path, "string")
            self.strings[".".join(path)] = value
            return None
        if isinstance(value, np.ndarray):
            return self.create(path, value.shape, value.dtype, value.shape, value_type="np.ndarray")
        if isinstance(value, (bool, int, float, complex, np.number, np.bool_)):
            return self.create(path, (), np.asarray(value).dtype, (), value_type="scalar")
        raise ConvertError(f"{'.'.join(path)}: a {type(value).__name__} is not a value Orbax saves "
                           "(numbers, strings, numpy arrays)")

    def write_value(self, created: Any, value: Any) -> None:
        """Write one leaf into the array :meth:`start_value` created: each addressable shard of a jax array
        once (replica 0)."""
        import jax

        if created is None:
            return
        store = self.opened(created)
        if isinstance(value, jax.Array):
            for shard in value.addressable_shards:
                if shard.replica_id == 0:
                    self.write(store, np.asarray(shard.data), tuple(shard.index))
        else:
            self.write(store, _contiguous(np.asarray(value)))

    def wait(self) -> None:
        futures, self.futures = self.futures, []
        try:
            for f in futures:
                f.result()
        except Exception as e:
            raise ConvertError(f"tensorstore failed to write into {self.dir}: {type(e).__name__}: {e}") from e

    def write_metadata(self) -> None:
        """Orbax's JSON files of the PyTree (after every array is written)."""
        meta = {"tree_metadata": self.tree, "use_ocdbt": True, "use_zarr3": False,
                "store_array_data_equal_to_fill_value": True, "custom_metadata": None}
        if self.strings:
            _write_json(self.dir / "_strings.json", self.strings)
        if self.array_metadatas:
            (self.dir / "array_metadatas").mkdir(exist_ok=True)
            _write_json(self.dir / "array_metadatas" / "process_0", {"array_metadatas": self.array_metadatas})
        _write_json(self.dir / "_sharding", self.shardings)
        _write_json(self.dir / "_METADATA", meta)


def _release(values: dict[int, Any]) -> None:
    """Free a written batch's jax arrays now (in a function: no loop variable keeps the last value alive while
    the next batch is read)."""
    import jax

    for v in values.values():
        if isinstance(v, jax.Array):
            v.delete()


def _contiguous(a: np.ndarray) -> np.ndarray:
    return a if a.flags.c_contiguous else np.ascontiguousarray(a).reshape(a.shape)  # a 0-d array stays 0-d


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj))


def _sharding_metadata(sharding: Any) -> str | None:
    """The serialized sharding Orbax records in ``_sharding`` (NamedSharding and SingleDeviceSharding only)."""
    from jax.sharding import NamedSharding, SingleDeviceSharding

    if isinstance(sharding, SingleDeviceSharding):  # as Orbax writes it, without importing Orbax (0.3 s)
        return json.dumps({"sharding_type": "SingleDeviceSharding", "device_str": str(next(iter(sharding.device_set)))})
    if not isinstance(sharding, NamedSharding):
        return None
    try:
        import orbax.checkpoint as ocp

        return ocp.metadata.NamedShardingMetadata.from_jax_sharding(sharding).to_serialized_string()
    except Exception:  # noqa: BLE001 - no orbax here, or a sharding it cannot describe: the record is optional
        return None  # (a restore given shardings does not read it)


def _write_default_batch(ckpt: Any, entries: list[Any], batch: list[int], paths: list[tuple[str, ...]],
                         limit: int, writer: _OrbaxWriter) -> dict[int, Any]:
    """target=None: each tensor read into numpy (no jax array) and written whole, from the first device's
    unsharded layout; a tensor larger than ``limit`` is read and written in slabs of rows (its chunks), one slab
    at a time, so the memory held stays within the bound."""
    out: dict[int, Any] = {}
    plans = []
    for i in batch:  # every array of the batch created at once (one OCDBT commit), then written
        e = entries[i]
        shape = tuple(e.shape)
        dtype = np.dtype(e.dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes <= limit or len(shape) == 0 or shape[0] <= 1:
            rows = None
            created = writer.create(paths[i], shape, dtype, shape, sharding=e.sharding)
        else:
            rows = max(1, min(shape[0], limit // max(1, nbytes // shape[0])))
            created = writer.create(paths[i], shape, dtype, (rows, *shape[1:]), write_shape=shape,
                                    sharding=e.sharding)
        plans.append((i, e, shape, rows, created))
    for i, e, shape, rows, created in plans:
        store = writer.opened(created)
        if rows is None:
            data = ckpt.read(e.name)
            writer.write(store, _contiguous(data))
            out[i] = data
            continue
        for r0 in range(0, shape[0], rows):
            box = (slice(r0, min(shape[0], r0 + rows)),)
            writer.wait()  # one slab in memory at a time
            data = ckpt.read(e.name, box)
            writer.write(store, _contiguous(data), box)
            out[i] = data
    return out


def _finalize(stage: Path, work: Path, dest: Path, top: Path) -> None:
    """Record the PyTree as StandardCheckpointer does (``_CHECKPOINT_METADATA``, ``commit_success.txt``) and
    rename it onto ``dest``."""
    tree_dir = stage
    now = time.time_ns()
    meta = {"item_handlers": _STANDARD_HANDLER,  # what StandardCheckpointer records
            "metrics": {}, "performance_metrics": {}, "init_timestamp_nsecs": now, "commit_timestamp_nsecs": now,
            "custom_metadata": {}}
    (tree_dir / "_CHECKPOINT_METADATA").write_text(json.dumps(meta))
    (tree_dir / "commit_success.txt").write_text(f"Checkpoint commit was successful to {dest}")
    if dest.parent == top and top.name.isdigit():
        # dest is an item of a new step directory (``root/7/default``): record it as CheckpointManager does.
        step_meta = {k: v for k, v in meta.items() if k != "item_handlers"}
        step_meta["item_handlers"] = {dest.name: meta["item_handlers"]}
        (work / "out" / top.name).mkdir(parents=True, exist_ok=True)
        (work / "out" / top.name / "_CHECKPOINT_METADATA").write_text(json.dumps(step_meta))
    # Build the missing part of dest's path inside the work dir, then create it with one rename.
    rel = dest.relative_to(top.parent)
    built = work / "out" / rel
    built.parent.mkdir(parents=True, exist_ok=True)
    os.rename(tree_dir, built)
    _fsync_dir(built)
    if top.exists() or top.is_symlink():
        raise ConvertError(f"{top} appeared during the conversion; it is not replaced")
    os.rename(work / "out" / rel.parts[0], top)
    _fsync_dir(top.parent)


def _rmtree(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)


# -- progress -------------------------------------------------------------------------------------------


def _counters(done: int, total: int, arrays: int, arrays_total: int, t0: float) -> dict[str, Any]:
    return {"bytes_done": done, "bytes_total": total, "arrays_done": arrays, "arrays_total": arrays_total,
            "seconds": time.perf_counter() - t0}


def _human(n: float) -> str:
    from .planning import _human as human

    return human(n, 1)


def progress_line(info: dict[str, Any], width: int = 24) -> str:
    """One line of the progress bar: bar, bytes, arrays, rate and ETA.

    Example:
        >>> progress_line({"bytes_done": 2**29, "bytes_total": 2**30, "arrays_done": 3, "arrays_total": 6,
        ...                "seconds": 2.0}, width=10)
        '[#####.....]  50.0%  512.0 MiB / 1.0 GiB  3/6 arrays  256.0 MiB/s  ETA 0:02'
    """
    done, total, secs = info["bytes_done"], max(info["bytes_total"], 1), info["seconds"]
    frac = min(1.0, done / total)
    fill = round(frac * width)
    rate = done / secs if secs > 0 else 0.0
    if rate > 0 and done < total:
        eta_s = round((total - done) / rate)
        eta = f"ETA {eta_s // 60}:{eta_s % 60:02d}"
    elif done >= total:
        eta = f"in {secs:.1f} s"
    else:
        eta = "ETA --:--"
    return (f"[{'#' * fill}{'.' * (width - fill)}] {100 * frac:5.1f}%  {_human(done)} / {_human(info['bytes_total'])}"
            f"  {info['arrays_done']}/{info['arrays_total']} arrays  {_human(rate)}/s  {eta}")


def _progress_fn(progress: Any) -> Callable[[dict[str, Any]], None] | None:
    from .checkpoint import _progress_fn as progress_fn

    return progress_fn(progress, line=progress_line, label="jreshard convert")
