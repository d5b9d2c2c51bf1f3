"""torch.distributed.checkpoint (DCP) directories: ``.metadata`` plus ``__<rank>_<i>.distcp`` files.

The metadata pickle (decoded by the allow-listed unpickler) gives every tensor's global shape, dtype and
chunks, and where each chunk's item lies (file, offset, length, transforms). An item is a torch.save archive
(default), a zstd stream of one (``stream.zstd/1``), or a tensor inside a safetensors section that starts at
the item's offset (``SerializationFormat.SAFETENSORS``, where offsets/lengths do not locate the tensor).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..catalog import Chunk, Locator, TensorInfo, validate_chunks
from ..dtypes import TorchDtype, safetensors_dtype
from ..errors import CheckpointFormatError, InconsistentCheckpointError, MissingDataError, TruncatedDataError
from ..plan import c_strides
from ..storage import LocalStore, Store
from ..unpickle import (BytesStorageMetadata, Metadata, StorageInfo, TensorRef, TensorStorageMetadata, safe_loads)
from .torchsave import SMALL_BLOB, Blob, open_archives

METADATA = ".metadata"


@dataclass(frozen=True)
class ItemRef:
    """What a DCP chunk or object points at: its item's blob and the item's kind."""

    fqn: str
    blob: Blob
    kind: str  # "torch_save" | "safetensors"


def detect(store: Store) -> bool:
    return store.exists(METADATA)


class DCPSource:
    """A DCP checkpoint: tensors (with chunk refs), objects (with item refs), and chunk resolution."""

    format_name = "dcp"

    def __init__(self, store: Store) -> None:
        self.store = store
        where = store.where(METADATA)
        raw = store.read_all(METADATA)
        md = safe_loads(raw, where)
        if not isinstance(md, Metadata) or not isinstance(getattr(md, "state_dict_metadata", None), dict):
            raise CheckpointFormatError(f"{where}: not a torch.distributed.checkpoint Metadata pickle")
        self.metadata = md
        storage = md.storage_data or {}
        by_index: dict[tuple[str, Any], StorageInfo] = {}
        for mi, info in storage.items():
            offset = tuple(mi.offset) if mi.offset is not None else None
            by_index[(mi.fqn, offset)] = info
        self.tensors: dict[str, TensorInfo] = {}
        self.object_refs: dict[str, ItemRef] = {}
        file_extent: dict[str, int] = {}
        for fqn, entry in md.state_dict_metadata.items():
            if isinstance(entry, TensorStorageMetadata):
                dtype = _dtype_of(entry, fqn, where)
                shape = tuple(int(s) for s in entry.size)
                chunks = []
                for c in entry.chunks:
                    offsets, sizes = tuple(int(x) for x in c.offsets), tuple(int(x) for x in c.sizes)
                    info = by_index.get((fqn, offsets))
                    numel = math.prod(sizes)
                    if info is None:
                        if numel == 0:
                            continue
                        raise MissingDataError(
                            f"{where}: tensor {fqn!r}: the chunk at offsets {offsets} has no storage entry"
                        )
                    transforms = tuple(info.transform_descriptors or ())
                    blob = Blob(info.relative_path, int(info.offset), int(info.length), transforms)
                    kind = "safetensors" if (not transforms and blob.length == numel * dtype.itemsize) else "torch_save"
                    if kind == "torch_save":
                        file_extent[blob.key] = max(file_extent.get(blob.key, 0), blob.offset + blob.length)
                    # Compressed items and small archives are read whole (see torchsave.open_archives).
                    whole = transforms or (kind == "torch_save" and blob.length <= SMALL_BLOB)
                    chunks.append(Chunk(offsets, sizes, ItemRef(fqn, blob, kind),
                                        whole_read_nbytes=blob.length if whole else None))
                self.tensors[fqn] = TensorInfo(fqn, shape, dtype, validate_chunks(fqn, shape, chunks, where))
            elif isinstance(entry, BytesStorageMetadata):
                info = by_index.get((fqn, None))
                if info is None:
                    raise MissingDataError(f"{where}: object {fqn!r} has no storage entry")
                blob = Blob(info.relative_path, int(info.offset), int(info.length),
                            tuple(info.transform_descriptors or ()))
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
        self._st_headers: dict[tuple[str, int], tuple[int, dict[str, Any]]] = {}

    # -- chunk resolution -------------------------------------------------------------------------

    def locate_many(self, items: Sequence[tuple[TensorInfo, Chunk]]) -> list[Locator]:
        out: list[Locator | None] = [None] * len(items)
        ts_idx = [i for i, (_, c) in enumerate(items) if c.ref.kind == "torch_save"]
        st_idx = [i for i, (_, c) in enumerate(items) if c.ref.kind == "safetensors"]
        if ts_idx:
            blobs = [items[i][1].ref.blob for i in ts_idx]
            wheres = [self._where(items[i][0], items[i][1]) for i in ts_idx]
            for i, where, archive in zip(ts_idx, wheres, open_archives(self.store, blobs, wheres)):
                tensor, chunk = items[i]
                out[i] = _chunk_locator(archive.obj, archive, tensor, chunk, where)
        if st_idx:
            self._load_st_headers({items[i][1].ref.blob for i in st_idx})
            for i in st_idx:
                out[i] = self._st_locator(*items[i])
        return out  # type: ignore[return-value]

    def _where(self, tensor: TensorInfo, chunk: Chunk) -> str:
        b = chunk.ref.blob
        return f"{self.store.where(b.key)} (tensor {tensor.name!r}, chunk at offsets {chunk.offsets}, bytes [{b.offset}, {b.offset + b.length}))"

    def _load_st_headers(self, blobs: set[Blob]) -> None:
        todo = sorted({(b.key, b.offset) for b in blobs} - set(self._st_headers))
        if not todo:
            return
        lens = self.store.read_ranges([(k, o, o + 8) for k, o in todo])
        sizes = [struct.unpack("<Q", x)[0] for x in lens]
        for (k, o), n in zip(todo, sizes):
            if n > 100 * 2**20:
                raise CheckpointFormatError(f"{self.store.where(k)}: safetensors header at byte {o} claims {n} bytes")
        heads = self.store.read_ranges([(k, o + 8, o + 8 + n) for (k, o), n in zip(todo, sizes)])
        for (k, o), n, h in zip(todo, sizes, heads):
            try:
                header = json.loads(h)
            except ValueError as e:
                raise CheckpointFormatError(f"{self.store.where(k)}: bad safetensors header at byte {o}: {e}") from e
            self._st_headers[(k, o)] = (o + 8 + n, header)

    def _st_locator(self, tensor: TensorInfo, chunk: Chunk) -> Locator:
        b = chunk.ref.blob
        where = self._where(tensor, chunk)
        data_start, header = self._st_headers[(b.key, b.offset)]
        entry = header.get(tensor.name)
        if entry is None:
            raise MissingDataError(f"{where}: the safetensors section has no entry {tensor.name!r}")
        sharding = json.loads((header.get("__metadata__") or {}).get("DCP_SHARDING_INFO", "{}") or "{}")
        saved = sharding.get(tensor.name, {}).get("saved_offsets")
        if saved is not None and tuple(saved) != chunk.offsets:
            raise InconsistentCheckpointError(
                f"{where}: the file holds offsets {tuple(saved)} of {tensor.name!r}, the metadata says {chunk.offsets}"
            )
        dtype = safetensors_dtype(entry["dtype"], where)
        if dtype != tensor.dtype or tuple(entry["shape"]) != chunk.sizes:
            raise InconsistentCheckpointError(
                f"{where}: saved entry is {entry['dtype']} {tuple(entry['shape'])}, the metadata says "
                f"{tensor.dtype} {chunk.sizes}"
            )
        begin, end = entry["data_offsets"]
        if end - begin != chunk.numel * dtype.itemsize:
            raise InconsistentCheckpointError(f"{where}: entry spans {end - begin} bytes, expected {chunk.numel * dtype.itemsize}")
        return Locator(b.key, data_start + begin, 0, c_strides(chunk.sizes), end - begin, "little", where=where)

    # -- objects ----------------------------------------------------------------------------------

    def read_objects(self, names: Sequence[str]) -> dict[str, Any]:
        refs = [self.object_refs[n] for n in names]
        wheres = [f"{self.store.where(r.blob.key)} (object {r.fqn!r})" for r in refs]
        out = {}
        for name, archive, where in zip(names, open_archives(self.store, [r.blob for r in refs], wheres), wheres):
            out[name] = materialize(archive.obj, archive, self.store, where)
        return out


def materialize(obj: Any, archive: Any, store: Store, where: str) -> Any:
    """Replace TensorRefs inside a decoded object by numpy arrays read from its archive."""
    from ..read import read_locator_whole

    if isinstance(obj, TensorRef):
        dtype = obj.dtype.numpy(where)
        return read_locator_whole(store, archive.locator(obj, where), obj.size, dtype)
    if isinstance(obj, dict):
        return type(obj)((k, materialize(v, archive, store, where)) for k, v in obj.items())
    if isinstance(obj, list):
        return [materialize(v, archive, store, where) for v in obj]
    if isinstance(obj, tuple):
        return tuple(materialize(v, archive, store, where) for v in obj)
    return obj


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
