"""``torch.save`` files (``.pt``, ``.pth``, ``pytorch_model.bin``) and their sharded index
(``pytorch_model.bin.index.json``), read torch-free.

Nested state dicts are flattened with dots the way DCP flattens them (``model.layers.0.w``); tensors become
one-chunk tensors located inside the archive (views and shared storages included), everything else
becomes an object.
"""

from __future__ import annotations

import struct
from typing import Any, Sequence

from ..catalog import Chunk, Locator, TensorInfo
from ..errors import CheckpointFormatError, InconsistentCheckpointError, MissingDataError
from ..gate import checked_name, decoding
from ..storage import LocalStore, Store
from .safetensors import read_index
from ..unpickle import TensorRef
from .torchsave import TAIL, Archive, Blob, iter_tensors, open_archives

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def _size(store: Store, key: str) -> int:
    """Size of ``key``; for remote stores, derived from the zip end records of a suffix read."""
    if isinstance(store, LocalStore):
        return store.size(key)
    tail = store.tail(key, TAIL)
    pos = tail.rfind(b"PK\x05\x06")
    if pos < 0 or pos + 22 > len(tail):
        raise _not_zip(store, key, tail)
    (_, _, _, _, count, cd_size, cd_off, comment) = struct.unpack_from("<IHHHHIIH", tail, pos)
    if pos >= 20 and tail[pos - 20 : pos - 16] == b"PK\x06\x07":
        # zip64 end records (torch always writes them): the record at eocd64_off is followed by the locator.
        (_, _, eocd64_off, _) = struct.unpack_from("<IIQI", tail, pos - 20)
        return eocd64_off + 56 + 20 + 22 + comment
    return cd_off + cd_size + 22 + comment


def _not_zip(store: Store, key: str, head: bytes) -> CheckpointFormatError:
    return CheckpointFormatError(
        f"{store.where(key)}: not a torch.save zip archive. If it was written by torch.save with "
        "_use_new_zipfile_serialization=False (the legacy format), load it in torch and save it again with "
        "torch.save(obj, path) (torch >= 1.6 writes the zip format), or export it with safetensors."
    )


class TorchSaveSource:
    """Tensors and objects of one or more torch.save archives."""

    format_name = "torch.save"

    def __init__(self, store: Store, files: Sequence[str] | None = None, index: str | None = None,
                 weight_map: dict[str, str] | None = None) -> None:
        self.store = store
        with decoding(store.where(index or (files or [""])[0])):
            self._read(store, files, index, weight_map)

    def _read(self, store: Store, files: Sequence[str] | None, index: str | None,
              weight_map: dict[str, str] | None) -> None:
        expected: dict[str, str] = {}
        if index is not None:
            expected = weight_map if weight_map is not None else read_index(store, index)
            files = sorted(set(expected.values()))
        assert files is not None
        files = [checked_name(f, store.description) for f in files]
        heads = store.read_ranges([(f, 0, min(4, _size(store, f))) for f in files])
        for f, head in zip(files, heads):
            if head != b"PK\x03\x04":
                raise _not_zip(store, f, head)
        blobs = [Blob(f, 0, _size(store, f)) for f in files]
        archives = open_archives(store, blobs, [store.where(f) for f in files])
        self.tensors: dict[str, TensorInfo] = {}
        self.objects_: dict[str, Any] = {}
        self._refs: dict[str, tuple[Archive, TensorRef]] = {}
        for f, archive in zip(files, archives):
            for name, leaf in iter_tensors(archive.obj):
                where = f"{store.where(f)} (entry {name!r})"
                if name in self.tensors or name in self.objects_:
                    raise InconsistentCheckpointError(f"{where}: name stored twice")
                if expected and name in expected and expected[name] != f:
                    raise InconsistentCheckpointError(f"{where}: the index places it in {expected[name]!r}")
                if isinstance(leaf, TensorRef):
                    dtype = leaf.dtype.numpy(where)
                    archive.locator(leaf, name)  # validates extents now
                    self._refs[name] = (archive, leaf)
                    self.tensors[name] = TensorInfo(name, leaf.size, dtype, (Chunk((0,) * len(leaf.size), leaf.size, ref=name),))
                else:
                    self.objects_[name] = leaf
        missing = sorted(n for n in expected if n not in self.tensors and n not in self.objects_)
        if missing:
            raise MissingDataError(f"{store.where(index or '')}: entries listed in the index are missing: {missing[:5]}")
        self.object_refs = {name: name for name in self.objects_}

    def locate_many(self, items: Sequence[tuple[TensorInfo, Chunk]]) -> list[Locator]:
        with decoding(self.store.description):
            return [self._refs[info.name][0].locator(self._refs[info.name][1], info.name) for info, _ in items]

    def read_objects(self, names: Sequence[str]) -> dict[str, Any]:
        return {n: self.objects_[n] for n in names}
