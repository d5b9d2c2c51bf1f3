"""torch.save zip archives, read torch-free: the zip index, ``data.pkl`` through the allow-listed
unpickler, and the byte location of every storage.

An archive may sit anywhere inside a file (DCP writes one archive per chunk into a ``.distcp`` file), so an
archive is addressed as a :class:`Blob` (file key, byte offset, length). :func:`open_archives` resolves many
blobs with few batched reads: the tail (zip central directory), then ``data.pkl``, ``byteorder`` and the
local header of every storage entry. Payloads themselves are never read here.
"""

from __future__ import annotations

import collections
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import zstandard

from ..catalog import Locator
from ..dtypes import TORCH_DTYPES, TorchDtype
from ..errors import CheckpointFormatError, InconsistentCheckpointError, TruncatedDataError
from ..gate import check_view
from ..storage import Store
from ..unpickle import MAX_DEPTH, MAX_ENTRIES, PickledOrderedDict, StorageRef, TensorRef, safe_loads

MAX_INFLATED = 2**30  # a compressed item with no declared size (a saved object) inflates to at most this
INFLATE_STEP = 16 * 2**20
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
    limit: int = MAX_INFLATED  # the most bytes a compressed item may inflate to


@dataclass
class ZipEntry:
    name: str
    header_offset: int  # relative to the archive start
    size: int
    method: int
    data_offset: int | None = None  # relative to the archive start, once the local header was read
    raw_name: bytes = b""


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
    cd_off: int = 0  # where the central directory starts (relative to the archive)
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
        where = f"{self.where}: tensor {name!r}"
        itemsize = tensor.dtype.numpy(where).itemsize
        # UntypedStorage counts bytes; typed storages count elements of the storage's dtype.
        storage_item = 1 if tensor.storage.dtype is None else TorchDtype(tensor.storage.dtype).numpy(where).itemsize
        numel_bytes = tensor.storage.numel * storage_item
        if entry.size < numel_bytes:
            raise InconsistentCheckpointError(
                f"{where}: storage entry holds {entry.size} bytes, its header says {numel_bytes}"
            )
        check_view(tensor.size, tensor.stride, tensor.storage_offset, itemsize, entry.size, where)
        if entry.data_offset is None:
            raise CheckpointFormatError(f"{where}: storage entry {entry.name!r} was not located")
        base = entry.data_offset
        if self.data is not None:
            return Locator(self.blob.key, base, tensor.storage_offset, tensor.stride, entry.size, self.byteorder,
                           data=memoryview(self.data), where=self.where)
        return Locator(self.blob.key, self.blob.offset + base, tensor.storage_offset, tensor.stride, entry.size,
                       self.byteorder, where=self.where)


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
    if pos < 0 or pos + 22 > len(tail):
        raise CheckpointFormatError(f"{where}: not a zip archive (no end-of-central-directory record)")
    (_, disk, cd_disk, _, count, cd_size, cd_off, _) = struct.unpack_from("<IHHHHIIH", tail, pos)
    if count == 0xFFFF or cd_size == 0xFFFFFFFF or cd_off == 0xFFFFFFFF:
        loc = pos - 20
        if loc < 0 or tail[loc : loc + 4] != _EOCD64_LOC:
            raise CheckpointFormatError(f"{where}: zip64 archive without its locator")
        (_, _, eocd64_off, _) = struct.unpack_from("<IIQI", tail, loc)
        rel = eocd64_off - tail_start
        if rel < 0 or rel + 56 > len(tail) or tail[rel : rel + 4] != _EOCD64:
            raise CheckpointFormatError(f"{where}: zip64 end record not where its locator says")
        (_, _, _, _, _, _, _, count, cd_size, cd_off) = struct.unpack_from("<IQHHIIQQQQ", tail, rel)
    elif disk or cd_disk:
        raise CheckpointFormatError(f"{where}: multi-disk zip archives are not torch.save archives")
    if cd_size < 46 * count or cd_off > tail_start + pos:
        raise CheckpointFormatError(f"{where}: zip central directory of {count} entries in {cd_size} bytes at "
                                    f"{cd_off} does not fit the archive")
    return cd_off, cd_size, count


def _parse_cd(cd: bytes, count: int, cd_off: int, where: str) -> dict[str, ZipEntry]:
    """The entries of a central directory; every field is checked to lie inside the archive before the
    directory, and a name may appear once (a zip with two ``data/0`` entries means two different models to two
    readers)."""
    entries: dict[str, ZipEntry] = {}
    pos = 0
    for _ in range(count):
        if pos + 46 > len(cd) or cd[pos : pos + 4] != _CDH:
            raise CheckpointFormatError(f"{where}: corrupt zip central directory")
        (_, _, _, flags, method, _, _, _, csize, usize, nlen, elen, clen, _, _, _, lh_off) = struct.unpack_from(
            "<IHHHHHHIIIHHHHHII", cd, pos
        )
        if pos + 46 + nlen + elen + clen > len(cd):
            raise CheckpointFormatError(f"{where}: zip central directory entry runs past the directory")
        raw_name = cd[pos + 46 : pos + 46 + nlen]
        name = raw_name.decode("utf-8", "replace")
        extra = cd[pos + 46 + nlen : pos + 46 + nlen + elen]
        if 0xFFFFFFFF in (csize, usize, lh_off):
            csize, usize, lh_off = _zip64_extra(extra, csize, usize, lh_off, where)
        if name in entries:
            raise InconsistentCheckpointError(f"{where}: zip entry {name!r} appears twice; refused (ambiguous)")
        if method == 0 and csize != usize:
            raise CheckpointFormatError(f"{where}: stored zip entry {name!r} has sizes {csize} and {usize}")
        if flags & 0x1:
            raise CheckpointFormatError(f"{where}: zip entry {name!r} is encrypted")
        if lh_off + 30 + nlen + usize > cd_off:
            raise CheckpointFormatError(f"{where}: zip entry {name!r} (at {lh_off}, {usize} bytes) runs into the "
                                        "central directory")
        entries[name] = ZipEntry(name, lh_off, usize, method, raw_name=raw_name)
        pos += 46 + nlen + elen + clen
    return entries


def _zip64_extra(extra: bytes, csize: int, usize: int, lh_off: int, where: str) -> tuple[int, int, int]:
    pos = 0
    while pos + 4 <= len(extra):
        tag, size = struct.unpack_from("<HH", extra, pos)
        if tag == 1:
            if pos + 4 + size > len(extra):
                break
            vals = list(struct.unpack_from(f"<{size // 8}Q", extra, pos + 4))
            needed = [usize == 0xFFFFFFFF, csize == 0xFFFFFFFF, lh_off == 0xFFFFFFFF]
            if sum(needed) > len(vals):
                break
            if needed[0]:
                usize = vals.pop(0)
            if needed[1]:
                csize = vals.pop(0)
            if needed[2]:
                lh_off = vals.pop(0)
            return csize, usize, lh_off
        pos += 4 + size
    raise CheckpointFormatError(f"{where}: zip64 sizes missing")


def _local_data_offset(header: bytes, entry: ZipEntry, where: str) -> int:
    """Where ``entry``'s bytes start (relative to the archive), from its local header, which must name the
    same file as the central directory."""
    if len(header) < 30 or header[:4] != _LFH:
        raise CheckpointFormatError(f"{where}: corrupt zip local header for {entry.name!r}")
    nlen, elen = struct.unpack_from("<HH", header, 26)
    local_name = header[30 : 30 + nlen]
    if len(local_name) == nlen and local_name != entry.raw_name:
        raise InconsistentCheckpointError(
            f"{where}: zip local header names {local_name[:100]!r}, the central directory {entry.name!r}"
        )
    return entry.header_offset + 30 + nlen + elen


def _check_layout(entries: Sequence[ZipEntry], cd_off: int, where: str) -> None:
    """Entries whose data offsets are known lie before the central directory and do not overlap."""
    spans = sorted((e.header_offset, e.data_offset + e.size, e.name) for e in entries if e.data_offset is not None)
    end, last = 0, ""
    for start, stop, name in spans:
        if start < end:
            raise InconsistentCheckpointError(f"{where}: zip entries {last!r} and {name!r} overlap")
        if stop > cd_off:
            raise CheckpointFormatError(f"{where}: zip entry {name!r} runs into the central directory")
        end, last = stop, name


# ------------------------------------------------------------------------------------------------
# Opening many archives with batched reads


def _decompress(data: bytes, limit: int, where: str) -> bytes:
    """A zstd stream, decompressed to at most ``limit`` bytes (a bigger one is refused, not inflated)."""
    parts, size = [], 0
    try:
        with zstandard.ZstdDecompressor().stream_reader(data) as reader:
            while size <= limit:  # in steps: memory grows with what the stream really holds, not the claim
                more = reader.read(min(INFLATE_STEP, limit + 1 - size))
                if not more:
                    break
                parts.append(more)
                size += len(more)
    except zstandard.ZstdError as e:
        raise InconsistentCheckpointError(f"{where}: zstd stream does not decompress: {e}") from None
    if size > limit:
        raise InconsistentCheckpointError(
            f"{where}: zstd stream inflates beyond {limit} bytes, more than the item can hold; refused"
        )
    return b"".join(parts)


def apply_transforms(data: bytes, transforms: Sequence[str], where: str, limit: int = MAX_INFLATED) -> bytes:
    """Undo DCP's transform descriptors (``stream.zstd/1``) on an item's bytes, inflating to at most
    ``limit`` bytes."""
    for t in reversed(transforms):
        if isinstance(t, str) and t.startswith("stream.zstd"):
            data = _decompress(data, limit, where)
        else:
            raise CheckpointFormatError(f"{where}: unsupported transform descriptor {str(t)[:100]!r}")
    return data


def open_archives(store: Store, blobs: Sequence[Blob], wheres: Sequence[str], small: int = SMALL_BLOB,
                  tail: int = TAIL) -> list[Archive]:
    """Parse the torch.save archives at ``blobs`` (batched reads; payloads are not read unless the archive
    is compressed or at most ``small`` bytes, in which case it is held in memory whole). ``tail``: the bytes
    read first from the end of the others, where the central directory is (read again when larger)."""
    archives: list[Archive | None] = [None] * len(blobs)
    # Phase 1: whole small/compressed archives, and the tails of the others.
    reqs, idx = [], []
    for i, b in enumerate(blobs):
        if b.transforms or b.length <= small:
            reqs.append((b.key, b.offset, b.offset + b.length))
        else:
            reqs.append((b.key, b.offset + max(0, b.length - tail), b.offset + b.length))
        idx.append(i)
    datas = store.read_ranges(reqs)
    pending_cd: list[tuple[int, int, int, int]] = []
    for i, data in zip(idx, datas):
        b = blobs[i]
        if b.transforms or b.length <= small:
            whole = apply_transforms(data, b.transforms, wheres[i], b.limit) if b.transforms else data
            archives[i] = _archive_in_memory(b, whole, wheres[i])
        else:
            tail_start = max(0, b.length - tail)
            cd_off, cd_size, count = _find_cd(data, tail_start, wheres[i])
            if cd_off + cd_size > b.length:
                raise TruncatedDataError(f"{wheres[i]}: zip central directory runs past the end of the archive")
            if cd_off >= tail_start:
                entries = _parse_cd(data[cd_off - tail_start : cd_off - tail_start + cd_size], count, cd_off, wheres[i])
                archives[i] = Archive(b, wheres[i], entries, cd_off=cd_off)
            else:
                pending_cd.append((i, cd_off, cd_size, count))
    if pending_cd:
        cds = store.read_ranges([(blobs[i].key, blobs[i].offset + o, blobs[i].offset + o + s) for i, o, s, _ in pending_cd])
        for (i, cd_off, _, count), cd in zip(pending_cd, cds):
            archives[i] = Archive(blobs[i], wheres[i], _parse_cd(cd, count, cd_off, wheres[i]), cd_off=cd_off)
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
                _check_layout(list(a.entries.values()), a.cd_off, a.where)
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
    entries = _parse_cd(data[cd_off : cd_off + cd_size], count, cd_off, where)
    a = Archive(b, where, entries, data=data, cd_off=cd_off)
    a.prefix = _prefix(a)
    for entry in entries.values():
        entry.data_offset = _local_data_offset(
            data[entry.header_offset : entry.header_offset + 30 + len(entry.raw_name)], entry, where)
        if entry.data_offset + entry.size > len(data):
            raise TruncatedDataError(f"{where}: zip entry {entry.name!r} runs past the end of the archive")
        rel = entry.name[len(a.prefix):]
        if rel in ("data.pkl", "byteorder"):
            a._tails[rel] = data[entry.data_offset : entry.data_offset + entry.size]
    _check_layout(list(entries.values()), cd_off, where)
    _finish(a)
    return a


def _finish(a: Archive) -> None:
    for entry in a.entries.values():
        rel = entry.name[len(a.prefix):]
        if entry.method != 0 and (rel.startswith("data") or rel == "byteorder"):
            raise CheckpointFormatError(f"{a.where}: zip entry {entry.name!r} is compressed; torch.save writes STORED entries")
    if "data.pkl" not in a._tails:
        raise CheckpointFormatError(f"{a.where}: torch.save archive without data.pkl")
    bo = a._tails.get("byteorder", b"little").decode("ascii", "replace").strip() or "little"
    if bo not in ("little", "big"):
        raise CheckpointFormatError(f"{a.where}: unknown byteorder {bo!r}")
    a.byteorder = bo
    a.obj = safe_loads(a._tails["data.pkl"], f"{a.where} (data.pkl)", allow_storages=True)
    a._tails.clear()


def flatten_state(obj: Any) -> Iterator[tuple[str, Any]]:
    """(name, leaf) of a decoded torch.save object, named the way DCP's ``flatten_state_dict`` names a state
    dict (``torch/distributed/checkpoint/_traverse.py``), so that the same dict saved with ``torch.save`` and
    with ``dcp.save`` has the same names:

    * a mapping (dict, OrderedDict, defaultdict ...) is walked: ``{"a": {"b": x}}`` is ``a.b`` (keys by
      ``str(key)``); an empty mapping names nothing;
    * a list is walked by index (``a.0``, ``a.1``) when it holds a tensor, a mapping, or a list walked by this
      rule; otherwise it is one leaf (``[1, 2]``, ``[[1, 2], [3]]``, ``[]``);
    * anything else is one leaf: tensors, plain values, and tuples, whatever they hold (a tuple holding
      tensors is an object whose tensors are read when the object is);
    * the saved object itself is walked like a value, except that a tuple at the top is walked like a list
      (``torch.save((a, b))`` names ``0`` and ``1``; DCP saves only dicts); a bare tensor or value saved alone
      is named ``""``, the name JAX gives a pytree that is a single leaf.

    Nesting deeper than MAX_DEPTH, or more than MAX_ENTRIES leaves, is refused.

    Example:
        >>> dict(flatten_state({"model": {"w": 1}, "opt": [{"lr": 0.1}], "ids": [1, 2], "betas": (0.9, 0.99)}))
        {'model.w': 1, 'opt.0.lr': 0.1, 'ids': [1, 2], 'betas': (0.9, 0.99)}
        >>> dict(flatten_state(5))
        {'': 5}
    """
    count = [0]
    if type(obj) is tuple and not _is_leaf(list(obj), 0):
        for i, v in enumerate(obj):
            yield from _flatten(v, str(i), 1, count)
    else:
        yield from _flatten(obj, "", 0, count)


def _is_leaf(value: Any, depth: int) -> bool:
    """DCP's ``_is_terminal``: a list is a leaf unless it holds a tensor, a mapping or a non-leaf list."""
    if isinstance(value, Mapping):
        return False
    if not isinstance(value, list):
        return True
    if depth > MAX_DEPTH:
        raise CheckpointFormatError(f"state dict nests deeper than {MAX_DEPTH} levels")
    for v in value:
        if isinstance(v, (TensorRef, Mapping)) or (isinstance(v, list) and not _is_leaf(v, depth + 1)):
            return False
    return True


def _flatten(obj: Any, name: str, depth: int, count: list[int]) -> Iterator[tuple[str, Any]]:
    if depth > MAX_DEPTH:
        raise CheckpointFormatError(f"state dict nests deeper than {MAX_DEPTH} levels at {name[:200]!r}")
    prefix = f"{name}." if depth else ""
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from _flatten(v, f"{prefix}{k}", depth + 1, count)
    elif not _is_leaf(obj, depth):
        for i, v in enumerate(obj):
            yield from _flatten(v, f"{prefix}{i}", depth + 1, count)
    else:
        count[0] += 1
        if count[0] > MAX_ENTRIES:
            raise CheckpointFormatError(f"state dict has more than {MAX_ENTRIES} entries")
        yield name, obj


iter_tensors = flatten_state  # the former name


# ------------------------------------------------------------------------------------------------
# Saved objects as users get them

MAX_OBJECT_TENSOR = 64 * 2**20  # a tensor inside a saved object is made dense only up to this (or its storage's size)


def materialize(obj: Any, archive: Any, store: Store, where: str, depth: int = 0,
                count: list[int] | None = None) -> Any:
    """A decoded object as users get it: tensors inside it read into numpy arrays from ``archive`` (anything
    with ``locator(tensor, name)``), ``torch.float32`` and the other torch dtypes as numpy / ml_dtypes dtypes
    (a dtype numpy has no counterpart for, such as ``torch.complex32``, stays a ``TorchDtype``), OrderedDicts
    as ``collections.OrderedDict``. Nesting deeper than MAX_DEPTH, more than MAX_ENTRIES entries, or a tensor
    whose dense size exceeds both its storage and MAX_OBJECT_TENSOR (a zero-stride view of one element
    claiming gigabytes) are refused."""
    from ..read import read_locator_whole

    count = count if count is not None else [0]
    count[0] += 1
    if depth > MAX_DEPTH or count[0] > MAX_ENTRIES:
        raise CheckpointFormatError(f"{where}: the saved object nests deeper than {MAX_DEPTH} levels or has more "
                                    f"than {MAX_ENTRIES} entries")
    kind = type(obj)
    if kind is TensorRef:
        dtype = obj.dtype.numpy(where)
        loc = archive.locator(obj, where)
        dense = math.prod(obj.size) * dtype.itemsize
        if dense > max(loc.storage_nbytes, MAX_OBJECT_TENSOR):
            raise CheckpointFormatError(f"{where}: a tensor in the object would take {dense} bytes from a storage of "
                                        f"{loc.storage_nbytes}; refused")
        return read_locator_whole(store, loc, obj.size, dtype)
    if kind is TorchDtype:
        return obj if TORCH_DTYPES.get(obj.name) is None else TORCH_DTYPES[obj.name]
    if kind is StorageRef:
        raise CheckpointFormatError(f"{where}: a bare torch storage saved as an object is not supported")

    def each(values: Any) -> Iterator[Any]:
        return (materialize(v, archive, store, where, depth + 1, count) for v in values)

    if kind is list:
        return list(each(obj))
    if kind is tuple:
        return tuple(each(obj))
    if kind is PickledOrderedDict:
        out = collections.OrderedDict(zip(each(obj.keys()), each(obj.values())))
        metadata = getattr(obj, "_metadata", None)
        if metadata is not None:
            out._metadata = materialize(metadata, archive, store, where, depth + 1, count)  # type: ignore[attr-defined]
        return out
    if kind is collections.defaultdict:
        return collections.defaultdict(obj.default_factory, zip(each(obj.keys()), each(obj.values())))
    if kind is dict:
        return dict(zip(each(obj.keys()), each(obj.values())))
    if kind is collections.Counter:
        return collections.Counter(dict(zip(each(obj.keys()), each(obj.values()))))
    if kind in (set, frozenset):
        return kind(each(obj))
    return obj
