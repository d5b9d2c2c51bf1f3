"""Saving JAX arrays as a torch.distributed.checkpoint (DCP) directory that torch's ``dcp.load`` reads, torch-free.

The layout is what torch's ``FileSystemWriter`` writes with its default ``TORCH_SAVE`` serialization: one data
file per process, ``__<process>_0.distcp``, holding one complete ``torch.save`` archive per saved chunk (every
distinct shard of an array, written once by the process that holds its replica 0), and ``.metadata``, a pickle
of torch's ``Metadata`` (written by :mod:`jreshard.torchpickle`, naming torch's classes without importing torch).

Every process computes the whole layout (which process writes which chunk where, and each archive's length)
from the shardings alone, so no data is exchanged: a process writes its own file, all processes meet at a
barrier, and process 0 writes ``.metadata`` last. A single process writes into a temporary sibling directory
that is renamed into place at the end, so an interrupted save never leaves something that looks like a
checkpoint.
"""

from __future__ import annotations

import os
import shutil
import sys
import uuid
import zlib
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from . import torchpickle
from .errors import InvalidArgumentError, JReshardError, StorageError
from .torchpickle import (
    ALIGNMENT,
    ArchiveLayout,
    Global,
    Items,
    Obj,
    Reduce,
    archive_layout,
    dumps,
    object_pickle,
    tensor_pickle,
    torch_dtype_name,
    torch_size,
)

METADATA = ".metadata"
_MD = "torch.distributed.checkpoint.metadata"
_FS = "torch.distributed.checkpoint.filesystem"
_WRITERS = 4  # items written at once (each holds one shard's host bytes)
_OBJECT_TYPES = (bool, int, float, complex, str, bytes)


@dataclass
class _Leaf:
    """One named leaf of the tree: a jax.Array, a numpy array or a plain Python value."""

    fqn: str
    path: tuple  # the key path as DCP's planner_data holds it (str for mapping keys, int for sequence indices)
    value: Any
    kind: str  # "jax" | "numpy" | "object"
    shape: tuple[int, ...] = ()
    dtype: np.dtype | None = None
    chunks: list = field(default_factory=list)  # [_Item] of this leaf


@dataclass
class _Item:
    """One item of a data file: a chunk of a tensor (``offsets``/``sizes``) or an object."""

    leaf: _Leaf
    index: int  # position among the leaf's chunks
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    process: int
    device: Any = None  # the device whose shard is written (jax arrays)
    offset: int = 0  # in the data file
    length: int = 0


def save_dcp(tree: Mapping[str, Any] | Any, path: str | os.PathLike, *, mapping: Any = None, saved_like: Any = None,
             overwrite: bool = False) -> None:
    """Save ``tree`` as a torch.distributed.checkpoint (DCP) directory at ``path``.

    ``tree`` is a pytree (nested dicts, lists, dataclasses, flax nnx state) whose leaves are ``jax.Array``s
    (any sharding, over one or many processes), numpy arrays, or plain Python values (``int``, ``float``,
    ``bool``, ``complex``, ``str``, ``bytes``: saved as DCP objects, like a ``step`` counter). Names are the key
    paths joined with dots, as DCP flattens a state dict: ``{"model": {"w": a}}`` and ``{"model.w": a}`` both
    save the tensor ``model.w``. A key must be a non-empty string or an int (sequence index); names that collide
    after flattening are refused.

    The result is what torch's ``dcp.save`` writes with its default ``FileSystemWriter``: torch reads it with
    ``torch.distributed.checkpoint.load`` onto any sharding (DTensor, plain tensors, one process or many), and
    jreshard reads it with :func:`jreshard.open` / :func:`jreshard.load`.

    With several JAX processes, every process calls ``save_dcp`` with the same tree (its arrays global, the
    same numpy / Python leaves) and a ``path`` on a file system they share. Each process writes the distinct
    shards whose replica 0 lives on its devices to ``__<process_index>_0.distcp``, streaming one shard at a
    time (no array is gathered); process 0 writes ``.metadata`` after every process has finished. A single
    process writes into a temporary sibling directory renamed into place at the end.

    ``path`` must not exist, or be an empty directory; ``overwrite=True`` replaces an existing DCP checkpoint
    (a directory with a ``.metadata``).

    ``mapping`` (with ``saved_like`` where shapes cannot be inferred) is a load mapping run backwards: ``tree``
    holds arrays under the target's names and layouts, and what is saved is :func:`jreshard.invert` of it,
    i.e. the tensors under torch's names and layouts (non-array leaves are then not saved).

    Raises :class:`~jreshard.errors.InvalidArgumentError` for names,
    leaves or dtypes DCP cannot hold (e.g. ``int4``, PRNG keys) and for an occupied ``path``;
    :class:`~jreshard.errors.StorageError` when writing fails.

    Example:
        >>> import tempfile, jax, jax.numpy as jnp, numpy as np, jreshard
        >>> from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        >>> from jreshard import save_dcp
        >>> mesh = Mesh(np.array(jax.devices()[:2]), ("x",))
        >>> w = jax.device_put(jnp.arange(8.0).reshape(4, 2), NamedSharding(mesh, P("x")))
        >>> path = tempfile.mkdtemp() + "/ckpt"
        >>> save_dcp({"model": {"w": w}, "step": 7}, path)
        >>> ckpt = jreshard.open(path)
        >>> ckpt.tensors["model.w"].shape, ckpt.objects["step"]
        ((4, 2), 7)
    """
    import jax

    if mapping is not None:
        from .inverse import invert

        tree = invert(tree, mapping, saved_like=saved_like)
    final = Path(os.path.abspath(os.fspath(path)))
    leaves = _flatten(tree)
    nproc = jax.process_count()
    me = jax.process_index()
    items = _plan(leaves, nproc)
    _check_destination(final, overwrite)
    if nproc == 1:
        _save_single(final, leaves, items)
    else:
        _save_multi(final, leaves, items, me, nproc, overwrite)


# ------------------------------------------------------------------------------------------------
# Names and leaves


def _key_part(entry: Any, where: str) -> Any:
    """One key path entry as DCP's planner_data holds it: mapping keys as str, sequence indices as int."""
    import jax.tree_util as jtu

    if isinstance(entry, jtu.SequenceKey):
        return int(entry.idx)
    if isinstance(entry, jtu.FlattenedIndexKey):
        return int(entry.key)
    if isinstance(entry, jtu.GetAttrKey):
        key = entry.name
    elif isinstance(entry, jtu.DictKey):
        key = entry.key
    else:
        raise InvalidArgumentError(f"{where}: key path entry {entry!r} ({type(entry).__name__}) has no DCP name")
    if isinstance(key, bool) or not isinstance(key, (str, int)):
        raise InvalidArgumentError(
            f"{where}: the key {key!r} is a {type(key).__name__}; DCP names are strings (or integer indices)"
        )
    key = str(key)
    if not key:
        raise InvalidArgumentError(f"{where}: an empty key cannot be part of a DCP name")
    if "\x00" in key:
        raise InvalidArgumentError(f"{where}: the key {key!r} contains a NUL character")
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgumentError(f"{where}: the key {key!r} is not valid Unicode (lone surrogate)") from None
    return key


def _variable_types() -> tuple[type, ...]:
    nnx = sys.modules.get("flax.nnx")
    var = getattr(nnx, "Variable", None) if nnx is not None else None
    return (var,) if isinstance(var, type) else ()


def _flatten(tree: Any) -> list[_Leaf]:
    """The named leaves of ``tree``, checked: names DCP can hold, no two alike, leaves it can save."""
    import jax

    variables = _variable_types()

    def is_leaf(x: Any) -> bool:
        return isinstance(x, jax.Array) or (bool(variables) and isinstance(x, variables))

    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
    expanded = []
    for kp, leaf in flat:
        if variables and isinstance(leaf, variables):  # an nnx Variable: its value, named by the Variable's path
            for sub, value in jax.tree_util.tree_flatten_with_path(leaf.get_value(), is_leaf=is_leaf)[0]:
                expanded.append((tuple(kp) + tuple(sub), value))
        else:
            expanded.append((tuple(kp), leaf))
    leaves: list[_Leaf] = []
    seen: dict[str, tuple] = {}
    for kp, value in expanded:
        where = "save_dcp: leaf " + (jax.tree_util.keystr(kp) if kp else "at the root")
        if not kp:
            raise InvalidArgumentError(f"{where}: give a dict of arrays (a bare leaf has no name in a checkpoint)")
        parts = tuple(_key_part(k, where) for k in kp)
        fqn = ".".join(str(p) for p in parts)
        if fqn in seen:
            raise InvalidArgumentError(
                f"save_dcp: leaves {jax.tree_util.keystr(seen[fqn])} and {jax.tree_util.keystr(kp)} both flatten to "
                f"the DCP name {fqn!r}"
            )
        seen[fqn] = kp
        leaves.append(_leaf(fqn, parts, value, where))
    return leaves


def _leaf(fqn: str, parts: tuple, value: Any, where: str) -> _Leaf:
    import jax

    if isinstance(value, jax.Array):
        dtype = value.dtype
        if jax.dtypes.issubdtype(dtype, jax.dtypes.extended):
            raise InvalidArgumentError(f"{where}: dtype {dtype} (an extended dtype, e.g. PRNG keys) has no torch "
                                       "equivalent; save jax.random.key_data(...) instead")
        kind = "jax"
    elif isinstance(value, (np.ndarray, np.generic)):
        value = np.asarray(value)
        dtype = value.dtype
        kind = "numpy"
    elif type(value) in _OBJECT_TYPES:
        return _Leaf(fqn, parts, value, "object")
    elif isinstance(value, jax.ShapeDtypeStruct):
        raise InvalidArgumentError(f"{where}: a jax.ShapeDtypeStruct has no data to save")
    else:
        raise InvalidArgumentError(
            f"{where}: cannot save a {type(value).__name__}; leaves must be jax.Array, numpy arrays or int, float, "
            "bool, complex, str, bytes"
        )
    if torch_dtype_name(dtype) is None:
        raise InvalidArgumentError(f"{where}: dtype {dtype} has no torch equivalent")
    return _Leaf(fqn, parts, value, kind, tuple(int(d) for d in value.shape), np.dtype(dtype))


# ------------------------------------------------------------------------------------------------
# The layout: which process writes which item where (the same on every process)


def _file_name(process: int) -> str:
    return f"__{process}_0.distcp"


@lru_cache(maxsize=4096)
def _tensor_layout(dtype: np.dtype, sizes: tuple[int, ...], zip32_limit: int) -> ArchiveLayout:
    """The archive of a chunk: the same for every chunk of this dtype and shape (``zip32_limit`` keys the cache
    on the zip64 threshold, which tests lower)."""
    nbytes = int(np.prod(sizes, dtype=np.int64)) * dtype.itemsize
    return archive_layout(tensor_pickle(dtype, sizes), nbytes, seed=f"{dtype}{sizes}")


def _layout_of(item: _Item) -> ArchiveLayout:
    leaf = item.leaf
    if leaf.kind == "object":
        return archive_layout(object_pickle(leaf.value), None, seed=leaf.fqn)
    return _tensor_layout(leaf.dtype, item.sizes, torchpickle.ZIP32_LIMIT)


def _chunks_of(leaf: _Leaf) -> list[tuple[tuple, tuple, int, Any]]:
    """(offsets, sizes, process, device) of every distinct shard of a leaf; replica 0 writes (the first device
    with that index in ``devices_indices_map`` order, as jax numbers replicas)."""
    if leaf.kind != "jax":
        return [((0,) * len(leaf.shape), leaf.shape, 0, None)]
    sharding = leaf.value.sharding
    out: dict[tuple, tuple] = {}
    for device, index in sharding.devices_indices_map(leaf.shape).items():
        box = []
        for s, dim in zip(index, leaf.shape):
            start, stop, step = s.indices(dim)
            if step != 1:
                raise InvalidArgumentError(f"save_dcp: {leaf.fqn!r}: a shard with step {step} is not a DCP chunk")
            box.append((start, max(start, stop)))
        key = tuple(box)
        if key not in out:
            offsets = tuple(b[0] for b in box)
            sizes = tuple(b[1] - b[0] for b in box)
            out[key] = (offsets, sizes, device.process_index, device)
    return list(out.values())


def _plan(leaves: list[_Leaf], nproc: int) -> list[_Item]:
    """Every item of the checkpoint with its process, file offset and length (deterministic)."""
    ends = [0] * nproc
    items: list[_Item] = []
    for leaf in leaves:
        if leaf.kind == "object":
            chunks = [((), (), 0, None)]
        else:
            chunks = _chunks_of(leaf)
        for i, (offsets, sizes, process, device) in enumerate(chunks):
            start = -(-ends[process] // ALIGNMENT) * ALIGNMENT  # every archive (so every storage) 64-byte aligned
            item = _Item(leaf, i, offsets, sizes, process, device, start)
            item.length = _layout_of(item).length
            ends[process] = start + item.length
            leaf.chunks.append(item)
            items.append(item)
    return items


# ------------------------------------------------------------------------------------------------
# .metadata


def _metadata(leaves: list[_Leaf], checkpoint_id: Path) -> bytes:
    """torch's ``Metadata`` pickle, as ``pickle.dump`` writes it (protocol 4), for ``leaves``."""
    layout = Reduce(Global("torch.serialization", "_get_layout"), ("torch.strided",))
    contiguous = Reduce(Global(_MD, "_MEM_FORMAT_ENCODING"), (0,))  # TORCH_CONTIGUOUS_FORMAT
    state_dict_metadata = {}
    planner_data = {}
    storage = []
    for leaf in leaves:
        planner_data[leaf.fqn] = leaf.path
        if leaf.kind == "object":
            state_dict_metadata[leaf.fqn] = Obj(Global(_MD, "BytesStorageMetadata"))
            index = Obj(Global(_MD, "MetadataIndex"), {"fqn": leaf.fqn, "index": None})
        else:
            props = Obj(Global(_MD, "TensorProperties"),
                        (Global("torch", torch_dtype_name(leaf.dtype)), layout, False, contiguous, False))
            chunks = [Obj(Global(_MD, "ChunkStorageMetadata"),
                          {"offsets": torch_size(c.offsets), "sizes": torch_size(c.sizes)}) for c in leaf.chunks]
            state_dict_metadata[leaf.fqn] = Obj(Global(_MD, "TensorStorageMetadata"),
                                                {"properties": props, "size": torch_size(leaf.shape), "chunks": chunks})
        for c in leaf.chunks:
            if leaf.kind != "object":
                index = Obj(Global(_MD, "MetadataIndex"),
                            {"fqn": leaf.fqn, "index": c.index, "offset": torch_size(c.offsets)})
            info = Obj(Global(_FS, "_StorageInfo"),
                       {"relative_path": _file_name(c.process), "offset": c.offset, "length": c.length})
            storage.append((index, info))
    meta = Obj(Global(_MD, "StorageMeta"), {
        "checkpoint_id": Reduce(Global("pathlib", "PosixPath"), PurePosixPath(checkpoint_id).parts),
        "save_id": str(uuid.uuid4()),
        "load_id": None,
        "modules": [],
    })
    return dumps(Obj(Global(_MD, "Metadata"), {
        "state_dict_metadata": state_dict_metadata,
        "planner_data": planner_data,
        "storage_data": Items(tuple(storage)),
        "storage_meta": meta,
        "version": "1.0.0",
    }), protocol=4)


# ------------------------------------------------------------------------------------------------
# Writing


def _pwrite_all(fd: int, buffers: list, offset: int, where: str) -> None:
    """Write ``buffers`` one after the other at ``offset`` (one pwritev, repeated after a short write)."""
    views = [memoryview(b).cast("B") for b in buffers]
    views = [v for v in views if len(v)]
    while views:
        n = os.pwritev(fd, views, offset)
        if n <= 0:
            raise StorageError(f"{where}: write returned {n}")
        offset += n
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]


def _host_bytes(item: _Item, shards: dict) -> np.ndarray:
    """The item's bytes, C order, as a flat uint8 array (one shard on the host, nothing more)."""
    leaf = item.leaf
    if leaf.kind == "jax":
        host = np.asarray(shards[item.device].data)
    else:
        host = leaf.value
    host = np.asarray(host)
    if not host.flags.c_contiguous:
        host = host.copy(order="C")
    if host.shape != item.sizes or host.dtype != leaf.dtype:
        raise JReshardError(f"save_dcp: {leaf.fqn!r}: shard at {item.offsets} is {host.dtype} {host.shape}, "
                            f"expected {leaf.dtype} {item.sizes}")
    if host.dtype.byteorder == ">":
        host = host.astype(host.dtype.newbyteorder("<"))
    return host.reshape(-1).view(np.uint8)


def _write_item(fd: int, item: _Item, shards: dict, where: str) -> None:
    """One archive: its head, the chunk's bytes (one shard, from its device) and its tail, in one write."""
    layout = _layout_of(item)
    if layout.length != item.length:
        raise JReshardError(f"save_dcp: {item.leaf.fqn!r}: archive of {layout.length} bytes, planned {item.length}")
    if item.leaf.kind == "object":
        _pwrite_all(fd, [layout.head, layout.tail], item.offset, where)
        return
    raw = _host_bytes(item, shards)
    head, tail = layout.finish(zlib.crc32(raw))
    _pwrite_all(fd, [head, raw, tail], item.offset, where)


def _write_data_file(directory: Path, items: list[_Item], process: int) -> None:
    """Write this process's items into ``__<process>_0.distcp`` (a few at a time, each shard once) and fsync."""
    mine = [it for it in items if it.process == process]
    file = directory / _file_name(process)
    where = str(file)
    shards: dict[Any, dict] = {}
    for it in mine:
        if it.leaf.kind == "jax" and id(it.leaf) not in shards:
            shards[id(it.leaf)] = {s.device: s for s in it.leaf.value.addressable_shards}
    try:
        fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    except OSError as e:
        raise StorageError(f"{where}: cannot create: {e}") from None
    try:
        size = max((it.offset + it.length for it in mine), default=0)
        os.ftruncate(fd, size)
        with ThreadPoolExecutor(max_workers=_WRITERS, thread_name_prefix="jreshard-save") as pool:
            futures = [pool.submit(_write_item, fd, it, shards.get(id(it.leaf), {}), where) for it in mine]
            try:
                for f in futures:
                    f.result()
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
        os.fsync(fd)
    except OSError as e:
        raise StorageError(f"{where}: write failed: {e}") from None
    finally:
        os.close(fd)


def _write_metadata(directory: Path, leaves: list[_Leaf], checkpoint_id: Path) -> None:
    data = _metadata(leaves, checkpoint_id)
    tmp = directory / f"{METADATA}.tmp-{uuid.uuid4().hex}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, directory / METADATA)
    except OSError as e:
        raise StorageError(f"{directory / METADATA}: cannot write: {e}") from None
    fsync_dir(directory)


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make ``directory``'s entries (a rename into it) durable, where the file system allows (best effort).

    Example:
        >>> import tempfile
        >>> fsync_dir(tempfile.gettempdir())
    """
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _check_destination(final: Path, overwrite: bool) -> None:
    """``final`` must be free (absent or an empty directory), or, with ``overwrite``, a DCP checkpoint."""
    if not final.exists() and not final.is_symlink():
        return
    if not final.is_dir():
        raise InvalidArgumentError(f"save_dcp: {final} exists and is not a directory")
    if not any(final.iterdir()):
        return
    if not overwrite:
        raise InvalidArgumentError(f"save_dcp: {final} is not empty; pass overwrite=True to replace a checkpoint")
    if not (final / METADATA).exists():
        raise InvalidArgumentError(f"save_dcp: {final} is not empty and holds no DCP checkpoint (no {METADATA}); "
                                   "refusing to overwrite it")


def _save_single(final: Path, leaves: list[_Leaf], items: list[_Item]) -> None:
    parent = final.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = parent / f".{final.name}.jreshard-tmp-{uuid.uuid4().hex}"
        tmp.mkdir()
    except OSError as e:
        raise StorageError(f"save_dcp: cannot create a directory next to {final}: {e}") from None
    try:
        _write_data_file(tmp, items, 0)
        _write_metadata(tmp, leaves, final)
        if final.exists() and any(final.iterdir()):  # overwrite (checked): swap the old checkpoint out
            old = parent / f".{final.name}.jreshard-old-{uuid.uuid4().hex}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)  # absent, or an empty directory
        fsync_dir(parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise StorageError(f"save_dcp: cannot write {final}: {e}") from None
        raise


def _save_multi(final: Path, leaves: list[_Leaf], items: list[_Item], me: int, nproc: int, overwrite: bool) -> None:
    from jax.experimental import multihost_utils

    if overwrite:  # every process has checked the old checkpoint before process 0 removes it
        multihost_utils.sync_global_devices("jreshard.save_dcp: destination checked")
    try:
        final.mkdir(parents=True, exist_ok=True)
        if me == 0 and overwrite and (final / METADATA).exists():
            os.remove(final / METADATA)  # the old checkpoint stops being one first, then its files go
            for entry in final.iterdir():
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
    except OSError as e:
        raise StorageError(f"save_dcp: cannot prepare {final}: {e}") from None
    multihost_utils.sync_global_devices("jreshard.save_dcp: directory ready")
    _write_data_file(final, items, me)
    multihost_utils.sync_global_devices("jreshard.save_dcp: data written")
    if me == 0:
        _write_metadata(final, leaves, final)
    multihost_utils.sync_global_devices("jreshard.save_dcp: metadata written")
