"""torch.save zip archives, read torch-free: the zip index, ``data.pkl`` through the allow-listed
unpickler, and the byte location of every storage.

An archive may sit anywhere inside a file (DCP writes one archive per chunk into a ``.distcp`` file), so an
archive is addressed as a :class:`Blob` (file key, byte offset, length). :func:`open_archives` resolves many
blobs with few batched reads: the tail (zip central directory), then ``data.pkl``, ``byteorder`` and the
local header of every storage entry. Payloads themselves are never read here.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import zstandard

from ..catalog import Locator
from ..errors import CheckpointFormatError, InconsistentCheckpointError, TruncatedDataError
from ..storage import Store
from ..unpickle import StorageRef, TensorRef, safe_loads

SMALL_BLOB = 64 * 1024  # archives up to this size are read whole in one request
TAIL = 8 * 1024  # first guess of the central directory's size
LOCAL_SLACK = 256  # local headers carry alignment padding in their extra field; read this much beyond


@dataclass(frozen=True)
class Blob:
    """A byte range ``[offset, offset + length)`` of file ``key`` that holds one item."""

    key: str
    offset: int
    length: int
    transforms: tuple[str, ...] = ()


@dataclass
class ZipEntry:
    name: str
    header_offset: int  # relative to the archive start
    size: int
    method: int
    data_offset: int | None = None  # relative to the archive start, once the local header was read


@dataclass
class Archive:
    """A parsed torch.save archive: its entries, the unpickled ``data.pkl`` (tensors as TensorRef) and where
    each storage's bytes start."""

    blob: Blob
    where: str
    entries: dict[str, ZipEntry]
    prefix: str = ""
    obj: Any = None
    byteorder: str = "little"
    data: bytes | None = None  # the whole archive, when it is held in memory
    _tails: dict[str, bytes] = field(default_factory=dict, repr=False)

    def storage_entry(self, ref: StorageRef) -> ZipEntry:
        name = f"{self.prefix}data/{ref.key}"
        entry = self.entries.get(name)
        if entry is None:
            raise InconsistentCheckpointError(f"{self.where}: storage entry {name!r} is missing from the archive")
        return entry

    def locator(self, tensor: TensorRef, name: str) -> Locator:
        """The Locator of ``tensor`` (a TensorRef from this archive's data.pkl)."""
        entry = self.storage_entry(tensor.storage)
        itemsize = tensor.dtype.numpy(f"{self.where}: tensor {name!r}").itemsize
        # UntypedStorage counts bytes; typed storages count elements.
        numel_bytes = tensor.storage.numel * (1 if tensor.storage.dtype is None else itemsize)
        if entry.size < numel_bytes:
            raise InconsistentCheckpointError(
                f"{self.where}: tensor {name!r}: storage entry holds {entry.size} bytes, its header says {numel_bytes}"
            )
        needed = _max_extent(tensor.size, tensor.stride, tensor.storage_offset)
        if needed * itemsize > entry.size:
            raise InconsistentCheckpointError(
                f"{self.where}: tensor {name!r} (size {tensor.size}, stride {tensor.stride}, storage offset "
                f"{tensor.storage_offset}) reaches past its storage of {entry.size} bytes"
            )
        assert entry.data_offset is not None
        base = entry.data_offset
        if self.data is not None:
            return Locator(self.blob.key, base, tensor.storage_offset, tensor.stride, entry.size, self.byteorder,
                           data=memoryview(self.data), where=self.where)
        return Locator(self.blob.key, self.blob.offset + base, tensor.storage_offset, tensor.stride, entry.size,
                       self.byteorder, where=self.where)


def _max_extent(size: Sequence[int], stride: Sequence[int], offset: int) -> int:
    if any(s == 0 for s in size):
        return 0
    return offset + sum((s - 1) * st for s, st in zip(size, stride)) + 1


# ------------------------------------------------------------------------------------------------
# zip structures

_EOCD = b"PK\x05\x06"
_EOCD64_LOC = b"PK\x06\x07"
_EOCD64 = b"PK\x06\x06"
_CDH = b"PK\x01\x02"
_LFH = b"PK\x03\x04"


def _find_cd(tail: bytes, tail_start: int, where: str) -> tuple[int, int, int]:
    """(central directory offset, size, entry count), offsets relative to the archive start."""
    pos = tail.rfind(_EOCD)
    if pos < 0:
        raise CheckpointFormatError(f"{where}: not a zip archive (no end-of-central-directory record)")
    (_, _, _, _, count, cd_size, cd_off, _) = struct.unpack_from("<IHHHHIIH", tail, pos)
    if count == 0xFFFF or cd_size == 0xFFFFFFFF or cd_off == 0xFFFFFFFF:
        loc = pos - 20
        if loc < 0 or tail[loc : loc + 4] != _EOCD64_LOC:
            raise CheckpointFormatError(f"{where}: zip64 archive without its locator")
        (_, _, eocd64_off, _) = struct.unpack_from("<IIQI", tail, loc)
        rel = eocd64_off - tail_start
        if rel < 0 or tail[rel : rel + 4] != _EOCD64:
            raise CheckpointFormatError(f"{where}: zip64 end record not where its locator says")
        (_, _, _, _, _, _, _, count, cd_size, cd_off) = struct.unpack_from("<IQHHIIQQQQ", tail, rel)
    return cd_off, cd_size, count


def _parse_cd(cd: bytes, count: int, where: str) -> dict[str, ZipEntry]:
    entries: dict[str, ZipEntry] = {}
    pos = 0
    for _ in range(count):
        if cd[pos : pos + 4] != _CDH:
            raise CheckpointFormatError(f"{where}: corrupt zip central directory")
        (_, _, _, flags, method, _, _, _, csize, usize, nlen, elen, clen, _, _, _, lh_off) = struct.unpack_from(
            "<IHHHHHHIIIHHHHHII", cd, pos
        )
        name = cd[pos + 46 : pos + 46 + nlen].decode("utf-8", "replace")
        extra = cd[pos + 46 + nlen : pos + 46 + nlen + elen]
        if 0xFFFFFFFF in (csize, usize, lh_off):
            csize, usize, lh_off = _zip64_extra(extra, csize, usize, lh_off, where)
        entries[name] = ZipEntry(name, lh_off, usize, method)
        pos += 46 + nlen + elen + clen
    return entries


def _zip64_extra(extra: bytes, csize: int, usize: int, lh_off: int, where: str) -> tuple[int, int, int]:
    pos = 0
    while pos + 4 <= len(extra):
        tag, size = struct.unpack_from("<HH", extra, pos)
        if tag == 1:
            vals = list(struct.unpack_from(f"<{size // 8}Q", extra, pos + 4))
            if usize == 0xFFFFFFFF:
                usize = vals.pop(0)
            if csize == 0xFFFFFFFF:
                csize = vals.pop(0)
            if lh_off == 0xFFFFFFFF:
                lh_off = vals.pop(0)
            return csize, usize, lh_off
        pos += 4 + size
    raise CheckpointFormatError(f"{where}: zip64 sizes missing")


def _local_data_offset(header: bytes, entry: ZipEntry, where: str) -> int:
    if header[:4] != _LFH:
        raise CheckpointFormatError(f"{where}: corrupt zip local header for {entry.name!r}")
    nlen, elen = struct.unpack_from("<HH", header, 26)
    return entry.header_offset + 30 + nlen + elen


# ------------------------------------------------------------------------------------------------
# Opening many archives with batched reads


def _decompress(data: bytes, where: str) -> bytes:
    try:
        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    except zstandard.ZstdError as e:
        raise InconsistentCheckpointError(f"{where}: zstd stream does not decompress: {e}") from e


def apply_transforms(data: bytes, transforms: Sequence[str], where: str) -> bytes:
    """Undo DCP's transform descriptors (``stream.zstd/1``) on an item's bytes."""
    for t in reversed(transforms):
        if t.startswith("stream.zstd"):
            data = _decompress(data, where)
        else:
            raise CheckpointFormatError(f"{where}: unsupported transform descriptor {t!r}")
    return data


def open_archives(store: Store, blobs: Sequence[Blob], wheres: Sequence[str]) -> list[Archive]:
    """Parse the torch.save archives at ``blobs`` (batched reads; payloads are not read unless the archive
    is small or compressed, in which case it is held in memory whole)."""
    archives: list[Archive | None] = [None] * len(blobs)
    # Phase 1: whole small/compressed archives, and the tails of the others.
    reqs, idx = [], []
    for i, b in enumerate(blobs):
        if b.transforms or b.length <= SMALL_BLOB:
            reqs.append((b.key, b.offset, b.offset + b.length))
        else:
            reqs.append((b.key, b.offset + b.length - TAIL, b.offset + b.length))
        idx.append(i)
    datas = store.read_ranges(reqs)
    pending_cd: list[tuple[int, int, int, int]] = []
    for i, data in zip(idx, datas):
        b = blobs[i]
        if b.transforms or b.length <= SMALL_BLOB:
            whole = apply_transforms(data, b.transforms, wheres[i]) if b.transforms else data
            archives[i] = _archive_in_memory(b, whole, wheres[i])
        else:
            tail_start = b.length - TAIL
            cd_off, cd_size, count = _find_cd(data, tail_start, wheres[i])
            if cd_off + cd_size > b.length:
                raise TruncatedDataError(f"{wheres[i]}: zip central directory runs past the end of the archive")
            if cd_off >= tail_start:
                entries = _parse_cd(data[cd_off - tail_start : cd_off - tail_start + cd_size], count, wheres[i])
                archives[i] = Archive(b, wheres[i], entries)
            else:
                pending_cd.append((i, cd_off, cd_size, count))
    if pending_cd:
        cds = store.read_ranges([(blobs[i].key, blobs[i].offset + o, blobs[i].offset + o + s) for i, o, s, _ in pending_cd])
        for (i, _, _, count), cd in zip(pending_cd, cds):
            archives[i] = Archive(blobs[i], wheres[i], _parse_cd(cd, count, wheres[i]))
    # Phase 2: data.pkl, byteorder and the local headers of storages, for archives not held in memory.
    reqs2: list[tuple[str, int, int]] = []
    owners: list[tuple[Archive, ZipEntry, str]] = []
    for a in archives:
        assert a is not None
        if a.data is not None:
            continue
        a.prefix = _prefix(a)
        for entry in a.entries.values():
            rel = entry.name[len(a.prefix):]
            if rel in ("data.pkl", "byteorder"):
                stop = min(entry.header_offset + 30 + len(entry.name.encode()) + LOCAL_SLACK + entry.size, a.blob.length)
                kind = rel
            elif rel.startswith("data/"):
                stop = min(entry.header_offset + 30 + len(entry.name.encode()) + LOCAL_SLACK, a.blob.length)
                kind = "storage"
            else:
                continue
            reqs2.append((a.blob.key, a.blob.offset + entry.header_offset, a.blob.offset + stop))
            owners.append((a, entry, kind))
    if reqs2:
        for (a, entry, kind), data in zip(owners, store.read_ranges(reqs2)):
            entry.data_offset = _local_data_offset(data, entry, a.where)
            if kind != "storage":
                rel = entry.data_offset - entry.header_offset
                content = data[rel : rel + entry.size]
                if len(content) != entry.size:
                    content = store.read(a.blob.key, a.blob.offset + entry.data_offset,
                                         a.blob.offset + entry.data_offset + entry.size)
                a._tails[kind] = content
        for a in archives:
            if a is not None and a.data is None:
                _finish(a)
    return [a for a in archives if a is not None]


def _prefix(a: Archive) -> str:
    for name in a.entries:
        if name.endswith("data.pkl") and name.count("/") <= 1:
            return name[: -len("data.pkl")]
    raise CheckpointFormatError(f"{a.where}: torch.save archive without data.pkl")


def _archive_in_memory(b: Blob, data: bytes, where: str) -> Archive:
    cd_off, cd_size, count = _find_cd(data, 0, where)
    if cd_off + cd_size > len(data):
        raise TruncatedDataError(f"{where}: zip central directory runs past the end of the archive")
    entries = _parse_cd(data[cd_off : cd_off + cd_size], count, where)
    a = Archive(b, where, entries, data=data)
    a.prefix = _prefix(a)
    for entry in entries.values():
        entry.data_offset = _local_data_offset(data[entry.header_offset : entry.header_offset + 30], entry, where)
        if entry.data_offset + entry.size > len(data):
            raise TruncatedDataError(f"{where}: zip entry {entry.name!r} runs past the end of the archive")
        rel = entry.name[len(a.prefix):]
        if rel in ("data.pkl", "byteorder"):
            a._tails[rel] = data[entry.data_offset : entry.data_offset + entry.size]
    _finish(a)
    return a


def _finish(a: Archive) -> None:
    for entry in a.entries.values():
        if entry.method != 0 and entry.name[len(a.prefix):].startswith("data"):
            raise CheckpointFormatError(f"{a.where}: zip entry {entry.name!r} is compressed; torch.save writes STORED entries")
    if "data.pkl" not in a._tails:
        raise CheckpointFormatError(f"{a.where}: torch.save archive without data.pkl")
    bo = a._tails.get("byteorder", b"little").decode("ascii", "replace").strip() or "little"
    if bo not in ("little", "big"):
        raise CheckpointFormatError(f"{a.where}: unknown byteorder {bo!r}")
    a.byteorder = bo
    a.obj = safe_loads(a._tails["data.pkl"], f"{a.where} (data.pkl)", allow_storages=True)
    a._tails.clear()


def iter_tensors(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Flatten nested dicts/lists/tuples the way DCP flattens state dicts: ``a.b.0.c``; yields (name, leaf)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from iter_tensors(v, f"{prefix}{k}." )
    elif isinstance(obj, (list, tuple)) and any(isinstance(v, (TensorRef, dict, list, tuple)) for v in obj):
        for i, v in enumerate(obj):
            yield from iter_tensors(v, f"{prefix}{i}.")
    else:
        yield prefix[:-1], obj
