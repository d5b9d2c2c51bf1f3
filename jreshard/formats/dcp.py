"""torch.distributed.checkpoint (DCP) directories: ``.metadata`` plus ``__<rank>_<i>.distcp`` files.

The metadata pickle (decoded by the allow-listed unpickler) gives every tensor's global shape, dtype and
chunks, and where each chunk's item lies (file, offset, length, transforms). An item is a torch.save archive
(default), a zstd stream of one (``stream.zstd/1``), or a tensor inside a safetensors section that starts at
the item's offset (``SerializationFormat.SAFETENSORS``, where offsets/lengths do not locate the tensor).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..catalog import Chunk, Locator, TensorInfo, record_read_facts, validate_chunks
from ..dtypes import TorchDtype
from ..errors import CheckpointFormatError, InconsistentCheckpointError, MissingDataError, TruncatedDataError
from ..planning import c_strides
from ..storage import LocalStore, Store
from ..gcpause import gc_paused
from ..gate import _short, checked_int, checked_name, checked_shape, decoding
from ..unpickle import (BytesStorageMetadata, ChunkStorageMetadata, Metadata, MetadataIndex, StorageInfo, TensorRef,
                        TensorStorageMetadata, safe_loads)
from .safetensors import Header, load_json, read_headers
from .torchsave import MAX_INFLATED, SMALL_BLOB, TAIL, Blob, materialize, open_archives, templates_for

METADATA = ".metadata"


@dataclass(frozen=True)
class ItemRef:
    """What a DCP chunk or object points at: its item's blob and the item's kind."""

    fqn: str
    blob: Blob
    kind: str  # "torch_save" | "safetensors"


def _blob(info: StorageInfo, where: str, what: str, limit: int = MAX_INFLATED) -> Blob:
    """The item a _StorageInfo points at: a file name inside the checkpoint and a byte range, checked."""
    key = _checked_key(info.relative_path, where, what)
    offset = checked_int(info.offset, f"{what}: item offset", where)
    length = checked_int(info.length, f"{what}: item length", where)
    transforms = info.transform_descriptors or ()
    if not isinstance(transforms, (list, tuple)) or not all(isinstance(t, str) for t in transforms):
        raise CheckpointFormatError(f"{where}: {what}: transform descriptors {_short(transforms)} are not strings")
    return Blob(key, offset, length, tuple(transforms), limit)


def _checked_key(name: Any, where: str, what: str) -> str:
    """checked_name, remembered for the few distinct file names of a checkpoint (every chunk names one)."""
    if isinstance(name, str):
        key = _KEYS.get(name)
        if key is not None:
            return key
    key = checked_name(name, f"{where}: {what}")
    if len(_KEYS) < 100_000:
        _KEYS[name] = key
    return key


_KEYS: dict[str, str] = {}  # name -> checked name (the check depends on the name alone)


def detect(store: Store) -> bool:
    return store.exists(METADATA)


class DCPSource:
    """A DCP checkpoint: tensors (with chunk refs), objects (with item refs), and chunk resolution."""

    format_name = "dcp"

    def __init__(self, store: Store) -> None:
        self.store = store
        where = store.where(METADATA)
        with decoding(where), gc_paused():
            self._read_metadata(store, where)

    def _read_metadata(self, store: Store, where: str) -> None:
        raw = store.read_all(METADATA)
        md = safe_loads(raw, where, bounded=False)  # read field by field below, every field checked
        if not isinstance(md, Metadata) or type(md.state_dict_metadata) is not dict:
            raise CheckpointFormatError(f"{where}: not a torch.distributed.checkpoint Metadata pickle")
        self.metadata = md
        storage = md.storage_data if md.storage_data is not None else {}
        if not isinstance(storage, dict):
            raise CheckpointFormatError(f"{where}: storage_data is not a dict")
        by_index: dict[tuple[str, Any], StorageInfo] = {}
        for mi, info in storage.items():
            if not isinstance(mi, MetadataIndex) or not isinstance(mi.fqn, str) or not isinstance(info, StorageInfo):
                raise CheckpointFormatError(f"{where}: storage_data entry {_short(mi)} is not a MetadataIndex -> _StorageInfo")
            offset = None if mi.offset is None else checked_shape(mi.offset, f"offsets of {mi.fqn!r}", where)
            by_index[(mi.fqn, offset)] = info
        self.tensors: dict[str, TensorInfo] = {}
        self.object_refs: dict[str, ItemRef] = {}
        file_extent: dict[str, int] = {}
        for fqn, entry in md.state_dict_metadata.items():
            if not isinstance(fqn, str):
                raise CheckpointFormatError(f"{where}: entry name {_short(fqn)} is not a string")
            if isinstance(entry, TensorStorageMetadata):
                dtype = _dtype_of(entry, fqn, where)
                what = f"tensor {fqn!r}"
                shape = checked_shape(entry.size, f"{what}: shape", where, dtype.itemsize)
                if not isinstance(entry.chunks, (list, tuple)):
                    raise CheckpointFormatError(f"{where}: {what}: chunks are not a list")
                chunks = []
                wholes: list[int] = []
                partials: list[bool] = []
                for c in entry.chunks:
                    if not isinstance(c, ChunkStorageMetadata):
                        raise CheckpointFormatError(f"{where}: {what}: a chunk is a {type(c).__name__}")
                    offsets = checked_shape(c.offsets, f"{what}: chunk offsets", where)
                    sizes = checked_shape(c.sizes, f"{what}: chunk sizes", where, dtype.itemsize)
                    info = by_index.get((fqn, offsets))
                    numel = math.prod(sizes)
                    if info is None:
                        if numel == 0:
                            continue
                        raise MissingDataError(
                            f"{where}: tensor {fqn!r}: the chunk at offsets {offsets} has no storage entry"
                        )
                    blob = _blob(info, where, f"{what}, chunk at offsets {offsets}",
                                 limit=2 * numel * dtype.itemsize + 64 * 2**20)
                    kind = "safetensors" if (not blob.transforms and blob.length == numel * dtype.itemsize) else "torch_save"
                    file_extent[blob.key] = max(file_extent.get(blob.key, 0), blob.offset + blob.length)
                    # Compressed items and small archives are read whole (see torchsave.open_archives).
                    whole = blob.transforms or (kind == "torch_save" and blob.length <= SMALL_BLOB)
                    chunks.append(Chunk(offsets, sizes, ItemRef(fqn, blob, kind),
                                        whole_read_nbytes=blob.length if whole else None,
                                        partial_ok=bool(whole and not blob.transforms)))
                    wholes.append(blob.length if whole else -1)
                    partials.append(chunks[-1].partial_ok)
                kept = validate_chunks(fqn, shape, chunks, where)
                if len(kept) == len(chunks):  # (none dropped: the facts are the kept chunks')
                    record_read_facts(kept, wholes, partials)
                self.tensors[fqn] = TensorInfo(fqn, shape, dtype, kept)
            elif isinstance(entry, BytesStorageMetadata):
                info = by_index.get((fqn, None))
                if info is None:
                    raise MissingDataError(f"{where}: object {fqn!r} has no storage entry")
                blob = _blob(info, where, f"object {fqn!r}")
                file_extent[blob.key] = max(file_extent.get(blob.key, 0), blob.offset + blob.length)
                self.object_refs[fqn] = ItemRef(fqn, blob, "torch_save")
            else:
                raise CheckpointFormatError(f"{where}: entry {fqn!r} has unknown metadata type {type(entry).__name__}")
        if isinstance(store, LocalStore):
            for key, extent in sorted(file_extent.items()):
                size = store.size(key)
                if size < extent:
                    raise TruncatedDataError(
                        f"{store.where(key)}: the metadata places items up to byte {extent} but the file has {size} bytes "
                        "(truncated file?)"
                    )

    # -- chunk resolution -------------------------------------------------------------------------

    def locate_many(self, items: Sequence[tuple[TensorInfo, Chunk]], precise: bool = False,
                    headers: dict[Any, Any] | None = None) -> list[Locator]:
        """Locators of the chunks; ``precise``: small archives too are located for sub-ranges (header reads)
        instead of being read whole. ``headers``: the caller's cache of the safetensors headers read (kept
        there, and looked up there first)."""
        with decoding(self.store.description):
            return self._locate_many(items, precise, {} if headers is None else headers)

    def _locate_many(self, items: Sequence[tuple[TensorInfo, Chunk]], precise: bool,
                     headers: dict[Any, Any]) -> list[Locator]:
        out: list[Locator | None] = [None] * len(items)
        ts_idx = [i for i, (_, c) in enumerate(items) if c.ref.kind == "torch_save"]
        st_idx = [i for i, (_, c) in enumerate(items) if c.ref.kind == "safetensors"]
        if ts_idx:
            blobs = [items[i][1].ref.blob for i in ts_idx]
            wheres = [self._where(items[i][0], items[i][1]) for i in ts_idx]
            # Located precisely, a small archive's header reads are small too: its central directory (a few
            # entries) is in its last KiB.
            small, tail = (0, 1024) if precise else (SMALL_BLOB, TAIL)
            archives = open_archives(self.store, blobs, wheres, small=small, tail=tail,
                                     templates=templates_for(self, small, tail))
            for i, where, archive in zip(ts_idx, wheres, archives):
                tensor, chunk = items[i]
                out[i] = _chunk_locator(archive.obj, archive, tensor, chunk, where)
        if st_idx:
            todo = sorted({(b.key, b.offset) for b in (items[i][1].ref.blob for i in st_idx)} - set(headers))
            if todo:
                headers.update(read_headers(self.store, todo))
            for i in st_idx:
                out[i] = self._st_locator(*items[i], headers)
        return out  # type: ignore[return-value]

    def _where(self, tensor: TensorInfo, chunk: Chunk) -> str:
        b = chunk.ref.blob
        return f"{self.store.where(b.key)} (tensor {tensor.name!r}, chunk at offsets {chunk.offsets}, bytes [{b.offset}, {b.offset + b.length}))"

    def _st_locator(self, tensor: TensorInfo, chunk: Chunk, headers: dict[tuple[str, int], Header]) -> Locator:
        b = chunk.ref.blob
        where = self._where(tensor, chunk)
        header = headers[(b.key, b.offset)]
        entry = header.entries.get(tensor.name)
        if entry is None:
            raise MissingDataError(f"{where}: the safetensors section has no entry {tensor.name!r}")
        info = header.metadata.get("DCP_SHARDING_INFO")
        sharding = load_json(info.encode() if isinstance(info, str) else b"{}", where)
        saved = (sharding.get(tensor.name) or {}).get("saved_offsets") if isinstance(sharding, dict) else None
        if saved is not None and checked_shape(saved, "saved_offsets", where) != chunk.offsets:
            raise InconsistentCheckpointError(
                f"{where}: the file holds offsets {_short(saved)} of {tensor.name!r}, the metadata says {chunk.offsets}"
            )
        if entry.dtype != tensor.dtype or entry.shape != chunk.sizes:
            raise InconsistentCheckpointError(
                f"{where}: saved entry is {entry.dtype_name} {entry.shape}, the metadata says "
                f"{tensor.dtype} {chunk.sizes}"
            )
        return Locator(b.key, header.data_start + entry.begin, 0, c_strides(chunk.sizes), entry.end - entry.begin,
                       "little", where=where)

    # -- objects ----------------------------------------------------------------------------------

    def read_objects(self, names: Sequence[str]) -> dict[str, Any]:
        refs = [self.object_refs[n] for n in names]
        wheres = [f"{self.store.where(r.blob.key)} (object {r.fqn!r})" for r in refs]
        out = {}
        with decoding(self.store.description):
            for name, archive, where in zip(names, open_archives(self.store, [r.blob for r in refs], wheres), wheres):
                out[name] = materialize(archive.obj, archive, self.store, where)
        return out


def _chunk_locator(obj: Any, archive: Any, tensor: TensorInfo, chunk: Chunk, where: str) -> Locator:
    if not isinstance(obj, TensorRef):
        raise InconsistentCheckpointError(f"{where}: the item holds a {type(obj).__name__}, not a tensor")
    dtype = obj.dtype.numpy(where)
    if dtype != tensor.dtype:
        raise InconsistentCheckpointError(f"{where}: saved chunk has dtype {dtype}, the metadata says {tensor.dtype}")
    if obj.size != chunk.sizes:
        raise InconsistentCheckpointError(f"{where}: saved chunk has shape {obj.size}, the metadata says {chunk.sizes}")
    return archive.locator(obj, tensor.name)


def _dtype_of(entry: TensorStorageMetadata, fqn: str, where: str) -> np.dtype:
    props = entry.properties
    dtype = getattr(props, "dtype", None)
    if not isinstance(dtype, TorchDtype):
        raise CheckpointFormatError(f"{where}: tensor {fqn!r} has no dtype in its metadata")
    return dtype.numpy(f"{where}: tensor {fqn!r}")
