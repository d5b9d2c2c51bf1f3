"""torch.save zip archives, read torch-free: the zip index, ``data.pkl`` through the allow-listed
unpickler, and the byte location of every storage.

An archive may sit anywhere inside a file (DCP writes one archive per chunk into a ``.distcp`` file), so an
archive is addressed as a :class:`Blob` (file key, byte offset, length). :func:`open_archives` resolves many
blobs with one batch of reads, two per archive (its first and last KiB), and parses archives of one layout
once; the archives it cannot parse from those go to :func:`open_archives_general` (the tail, then
``data.pkl``, ``byteorder`` and the local header of every storage entry). Payloads themselves are never read
here.
"""

from __future__ import annotations

import collections
import math
import operator
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import zstandard

from ..catalog import Locator
from ..dtypes import TORCH_DTYPES, TorchDtype
from ..errors import CheckpointFormatError, InconsistentCheckpointError, JReshardError, TruncatedDataError
from ..gate import check_view
from ..storage import Store
from ..unpickle import MAX_DEPTH, MAX_ENTRIES, PickledOrderedDict, StorageRef, TensorRef, safe_loads

MAX_INFLATED = 2**30  # a compressed item with no declared size (a saved object) inflates to at most this
INFLATE_STEP = 16 * 2**20
SMALL_BLOB = 64 * 1024  # archives up to this size are read whole in one request
TAIL = 8 * 1024  # first guess of the central directory's size
LOCAL_SLACK = 256  # local headers carry alignment padding in their extra field; read this much beyond
HEAD = 1024  # the fast path's first window: data.pkl, byteorder and data/0's local header of a one-tensor archive
WINDOW_TAIL = 1024  # its last window: the central directory and end records of an archive of a few entries
TEMPLATES = 4096  # layouts the fast path remembers per open_archives call
KEPT_TEMPLATES = 256  # layouts kept across the calls of one checkpoint (templates_for)
PROBES_PER_LENGTH = 32  # places (and sizes) of data.pkl among the layouts of one archive length
DECODED_CACHE = 4096  # distinct data.pkl (decoding to one tensor) remembered per open_archives call


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


def _local_header_len(fixed: bytes) -> int:
    """How many bytes of a local header (from its 30-byte fixed part) :func:`_local_data_offset` looks at: the
    fixed part, the name and, when it is at most LOCAL_SLACK bytes long (as every reader's window holds it),
    the extra field."""
    if len(fixed) < 30 or fixed[:4] != _LFH:
        return 30
    nlen, elen = struct.unpack_from("<HH", fixed, 26)
    return 30 + nlen + (elen if elen <= LOCAL_SLACK else 0)


def _local_data_offset(header: bytes, entry: ZipEntry, where: str) -> int:
    """Where ``entry``'s bytes start (relative to the archive), from its local header, which must name the
    same file as the central directory, and whose extra field (when ``header`` holds it whole and it is at
    most LOCAL_SLACK bytes) must be a run of records that fills it: a changed extra-field length, which moves
    the data, is refused instead of read from the wrong place."""
    if len(header) < 30 or header[:4] != _LFH:
        raise CheckpointFormatError(f"{where}: corrupt zip local header for {entry.name!r}")
    nlen, elen = struct.unpack_from("<HH", header, 26)
    local_name = header[30 : 30 + nlen]
    if len(local_name) == nlen and local_name != entry.raw_name:
        raise InconsistentCheckpointError(
            f"{where}: zip local header names {local_name[:100]!r}, the central directory {entry.name!r}"
        )
    checked = _local_header_len(header) - 30 - nlen  # the extra field's bytes looked at: all of it, or none
    if checked and len(header) >= 30 + nlen + checked and not _records_fill(header[30 + nlen : 30 + nlen + checked]):
        raise CheckpointFormatError(
            f"{where}: corrupt zip local header for {entry.name!r}: its extra field ({elen} bytes) is not a run of "
            "records that fills it exactly"
        )
    return entry.header_offset + 30 + nlen + elen


def _records_fill(extra: bytes) -> bool:
    """Whether ``extra`` is a run of zip extra-field records (2-byte id, not 0; 2-byte size; the data) that
    ends exactly at its end. A local header whose extra-field length was changed (which moves the entry's
    data) almost never is: the last record overshoots, or the bytes after it are no record.

    Example:
        >>> _records_fill(b"FB" + (3).to_bytes(2, "little") + b"abc"), _records_fill(b"FB" + (4).to_bytes(2, "little") + b"abc")
        (True, False)
        >>> _records_fill(bytes(8)), _records_fill(b"FB" + (1).to_bytes(2, "little") + b"a" + b"\\0\\0")  # zeros: no record
        (False, False)
    """
    pos = 0
    while pos < len(extra):
        if pos + 4 > len(extra):
            return False
        tag, size = struct.unpack_from("<HH", extra, pos)
        if tag == 0:
            return False
        pos += 4 + size
    return pos == len(extra)


def _check_layout(entries: Sequence[ZipEntry], cd_off: int, where: str) -> None:
    """Entries lie before the central directory and do not overlap: from its local header to the end of its
    data for an entry whose data offset is known, else at least its local header's fixed part and name (an
    archive located for sub-ranges reads only the local headers of the entries it needs, so a corrupt extra
    length there must not move their data over a header it did not read)."""
    spans = sorted((e.header_offset, e.data_offset + e.size if e.data_offset is not None
                    else e.header_offset + 30 + len(e.raw_name), e.name) for e in entries)
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
                  tail: int = TAIL, templates: _Templates | None = None) -> list[Archive]:
    """Parse the torch.save archives at ``blobs`` (batched reads; payloads are not read unless the archive
    is compressed or at most ``small`` bytes, in which case it is held in memory whole). ``tail``: the bytes
    the general path reads first from the end of the others, where the central directory is.

    The fast path reads two windows of every archive not held whole, in one batch: its first HEAD bytes and
    its last ``min(WINDOW_TAIL, tail)`` (one read when they would meet), and parses them exactly as the general
    path (:func:`open_archives_general`) parses the archive, noting every byte it looks at. An archive whose
    parse needs a byte outside its windows (a large data.pkl, many storages, long names), or that the parse
    refuses, goes to the general path, which then gives its result or raises its error: the fast path only
    ever returns what the general path returns.

    Archives torch writes for chunks of one shape and dtype differ only in bytes that the parse does not
    look at (CRC-32 fields, payloads, ``.data/serialization_id``). So a full parse is kept, within this call,
    as a template for archives of the same length: one whose bytes at every position the template's parse
    looked at are the template's is parsed the same, and gets the template's entries, byteorder and
    decoded data.pkl (shared: they are not changed after this returns) without a parse of its own.
    ``templates``: where the templates are kept (and looked up first), for a caller that opens archives of one
    checkpoint in many calls with the same ``small`` and ``tail`` (a load, unit by unit); by default they last
    for this call only.
    """
    win_tail = min(WINDOW_TAIL, tail)
    reqs: list[tuple[str, int, int]] = []
    for b in blobs:
        if b.transforms or b.length <= small or b.length <= HEAD + win_tail:
            reqs.append((b.key, b.offset, b.offset + b.length))
        else:
            reqs.append((b.key, b.offset, b.offset + HEAD))
            reqs.append((b.key, b.offset + b.length - win_tail, b.offset + b.length))
    datas = store.read_ranges(reqs) if reqs else []
    archives: list[Archive | None] = [None] * len(blobs)
    general: list[int] = []
    if templates is None:
        templates = _Templates()
    decoded: dict[bytes, TensorRef] = {}
    k = 0
    for i, b in enumerate(blobs):
        where = wheres[i]
        held: bytes | None = None
        if b.transforms or b.length <= small:
            held = datas[k]
            k += 1
            if b.transforms:
                try:
                    held = apply_transforms(held, b.transforms, where, b.limit)
                except JReshardError:
                    general.append(i)
                    continue
            wins, length = [(0, held)], len(held)
        elif b.length <= HEAD + win_tail:
            wins, length = [(0, datas[k])], b.length
            k += 1
        else:
            wins, length = [(0, datas[k]), (b.length - win_tail, datas[k + 1])], b.length
            k += 2
        key = (held is not None, length)
        t = templates.find(key, wins)
        if t is not None:
            archive = t.archive_for(b, where, held)
        else:
            w = _Windows(wins, length)
            try:
                archive = _parse_windows(w, b, where, win_tail, held, decoded)
            except (_Miss, JReshardError):
                general.append(i)
                continue
            t = _Template.of(w, archive)
            if t is not None:
                templates.add(key, t)
        archives[i] = archive
    if general:
        for i, a in zip(general, open_archives_general(store, [blobs[i] for i in general],
                                                       [wheres[i] for i in general], small, tail)):
            archives[i] = a
    return archives  # type: ignore[return-value]


class _Miss(Exception):
    """A byte the fast parse needs lies outside the windows it holds: the general path parses the archive."""


class _Windows:
    """What the fast path holds of one archive: windows ``(start, bytes)`` (relative to the archive start;
    disjoint, and not touching), and the spans ``[start, stop)`` of them that a parse looked at."""

    __slots__ = ("length", "spans", "wins")

    def __init__(self, wins: list[tuple[int, bytes]], length: int) -> None:
        self.wins = wins
        self.length = length
        self.spans: list[tuple[int, int]] = []

    def get(self, start: int, stop: int, note: bool = True) -> bytes:
        """Bytes ``[start, stop)`` of the archive, from the window that holds them all, noted as looked at
        (unless ``note`` is false: the caller then notes what of them it looks at); _Miss when no window
        holds them."""
        for s, buf in self.wins:
            if s <= start and stop <= s + len(buf):
                if note and stop > start:
                    self.spans.append((start, stop))
                return buf if (start, stop) == (s, s + len(buf)) else buf[start - s : stop - s]
        raise _Miss


def _end_spans(tail: bytes, tail_start: int) -> list[tuple[int, int]]:
    """The bytes :func:`_find_cd` looked at when it succeeded on ``tail``: those from the last end record on
    (the record is found by ``rfind``: no later one may appear), and the zip64 locator and record when it
    read them."""
    pos = tail.rfind(_EOCD)
    spans = [(tail_start + pos, tail_start + len(tail))]
    (_, _, _, _, count, cd_size, cd_off, _) = struct.unpack_from("<IHHHHIIH", tail, pos)
    if count == 0xFFFF or cd_size == 0xFFFFFFFF or cd_off == 0xFFFFFFFF:
        eocd64_off = struct.unpack_from("<Q", tail, pos - 12)[0]
        spans += [(tail_start + pos - 20, tail_start + pos), (eocd64_off, eocd64_off + 56)]
    return spans


def _cd_spans(cd: bytes, count: int, cd_off: int) -> list[tuple[int, int]]:
    """The bytes :func:`_parse_cd` looked at when it succeeded on ``cd``: all of the directory (at ``cd_off``)
    but the CRC-32 field of each of its ``count`` entries (at +16, four bytes), which it skips."""
    spans, start, pos = [], 0, 0
    for _ in range(count):
        nlen, elen, clen = struct.unpack_from("<HHH", cd, pos + 28)
        spans.append((cd_off + start, cd_off + pos + 16))
        start, pos = pos + 20, pos + 46 + nlen + elen + clen
    spans.append((cd_off + start, cd_off + len(cd)))
    return spans


def _parse_windows(w: _Windows, blob: Blob, where: str, tail: int, held: bytes | None,
                   decoded: dict[bytes, TensorRef]) -> Archive:
    """The archive as the general path parses it (as :func:`_archive_in_memory` does when it is ``held``
    whole, else as :func:`open_archives_general` does with its ``tail`` window), from the windows ``w`` alone,
    with every byte looked at noted in ``w.spans``. Raises _Miss when a byte it needs is outside the windows,
    and the general path's errors; either way the general path then parses the archive."""
    length = w.length
    tail_start = 0 if held is not None else max(0, length - tail)
    tail_buf = w.get(tail_start, length, note=False)
    cd_off, cd_size, count = _find_cd(tail_buf, tail_start, where)
    w.spans += _end_spans(tail_buf, tail_start)
    if cd_off + cd_size > length:
        raise TruncatedDataError(f"{where}: zip central directory runs past the end of the archive")
    cd = w.get(cd_off, cd_off + cd_size, note=False)
    entries = _parse_cd(cd, count, cd_off, where)
    w.spans += _cd_spans(cd, count, cd_off)
    a = Archive(blob, where, entries, data=held, cd_off=cd_off)
    a.prefix = _prefix(a)
    for entry in entries.values():
        rel = entry.name[len(a.prefix):]
        hoff = entry.header_offset
        if held is not None or rel in ("data.pkl", "byteorder") or rel.startswith("data/"):
            # As _archive_in_memory (every entry) or the general path: the fixed part, the local name and the
            # extra field (up to LOCAL_SLACK bytes). The general path checks the local name when its read
            # holds it; this parse always does (a name it accepts, the general path accepts or does not look at).
            header = w.get(hoff, hoff + 30, note=False)
            if header[:4] == _LFH:
                header += w.get(hoff + 30, hoff + _local_header_len(header), note=False)
        else:
            continue
        entry.data_offset = _local_data_offset(header, entry, where)
        w.spans += ((hoff, hoff + 4), (hoff + 26, hoff + len(header)))  # signature; lengths and name
        if held is not None and entry.data_offset + entry.size > length:
            raise TruncatedDataError(f"{where}: zip entry {entry.name!r} runs past the end of the archive")
        if rel in ("data.pkl", "byteorder"):
            a._tails[rel] = w.get(entry.data_offset, entry.data_offset + entry.size)
    pkl = a._tails.get("data.pkl")
    _check_layout(list(entries.values()), cd_off, where)
    _finish(a, decoded)
    a._tails["data.pkl"] = pkl  # for _Template.of, which removes it
    return a


class _Template:
    """A full fast parse, as a test for archives of the same length and kind: ``checks``, per window, a getter
    of the slices the parse looked at and what they held. An archive whose windows hold the same there is
    parsed the same (the parse is a function of those bytes and the length alone; CRC-32 fields are not among
    them), so it gets ``archive``'s entries, prefix, byteorder, central directory offset and decoded data.pkl
    (``pkl``: its bytes)."""

    __slots__ = ("archive", "checks", "pkl", "probe")

    def __init__(self, checks: tuple[tuple[int, Any, Any], ...], archive: Archive, pkl: bytes,
                 probe: tuple[int, int, int]) -> None:
        self.checks = checks
        # What matching archives share, without the bytes of this one (held whole when small): templates may be
        # kept for a checkpoint's life (templates_for).
        self.archive = Archive(archive.blob, archive.where, archive.entries, prefix=archive.prefix, obj=archive.obj,
                               byteorder=archive.byteorder, cd_off=archive.cd_off)
        self.pkl = pkl
        self.probe = probe  # (window, start, stop): where its data.pkl is (bytes it looked at)

    @classmethod
    def of(cls, w: _Windows, archive: Archive) -> _Template | None:
        """The template of ``archive``, parsed from ``w`` (its data.pkl bytes taken back from it); None if a
        span looked at does not lie in one window (not for archives the fast path parses)."""
        pkl = archive._tails.pop("data.pkl")
        merged: list[list[int]] = []
        for start, stop in sorted(w.spans):
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], stop)
            else:
                merged.append([start, stop])
        slices: list[list[slice]] = [[] for _ in w.wins]
        for start, stop in merged:
            for j, (s, buf) in enumerate(w.wins):
                if s <= start and stop <= s + len(buf):
                    slices[j].append(slice(start - s, stop - s))
                    break
            else:
                return None
        checks = []
        for j, sl in enumerate(slices):
            if sl:
                getter = operator.itemgetter(*sl)
                checks.append((j, getter, getter(w.wins[j][1])))
        entry = archive.entries[f"{archive.prefix}data.pkl"]
        start = entry.data_offset if entry.data_offset is not None else -1
        for j, (s, buf) in enumerate(w.wins):
            if s <= start and start + entry.size <= s + len(buf):
                return cls(tuple(checks), archive, pkl, (j, start - s, start - s + entry.size))
        return None

    def matches(self, wins: list[tuple[int, bytes]]) -> bool:
        """Whether windows of an archive of the template's length and kind hold the template's bytes at every
        position its parse looked at."""
        for j, getter, value in self.checks:
            if getter(wins[j][1]) != value:
                return False
        return True

    def archive_for(self, blob: Blob, where: str, held: bytes | None) -> Archive:
        """The Archive of a matching archive at ``blob`` (``held``: its bytes, when held whole)."""
        t = self.archive
        obj = t.obj if type(t.obj) is TensorRef else safe_loads(self.pkl, f"{where} (data.pkl)", allow_storages=True)
        return Archive(blob, where, t.entries, prefix=t.prefix, obj=obj, byteorder=t.byteorder, data=held,
                       cd_off=t.cd_off)


class _Templates:
    """The templates of one open_archives call (or of several with the same windows: :func:`templates_for`), by
    (held whole, archive length), then by where data.pkl is in the windows, then by its bytes: an archive is
    compared with the one template whose data.pkl it holds where that template has it (it matches no other),
    the last one made of that layout. At most ``limit`` are kept."""

    def __init__(self, limit: int = TEMPLATES) -> None:
        self.limit = limit
        self.count = 0
        self.by_key: dict[tuple[bool, int], dict[tuple[int, int, int], dict[bytes, _Template]]] = {}

    def find(self, key: tuple[bool, int], wins: list[tuple[int, bytes]]) -> _Template | None:
        """The template ``wins`` (windows of an archive of kind and length ``key``) match, if any."""
        # (a snapshot: another thread may add a layout meanwhile)
        for (j, start, stop), table in list(self.by_key.get(key, {}).items()):
            t = table.get(wins[j][1][start:stop])
            if t is not None and t.matches(wins):
                return t
        return None

    def add(self, key: tuple[bool, int], t: _Template) -> None:
        """Keep ``t`` (in place of the template of its layout), up to ``limit`` in all."""
        probes = self.by_key.setdefault(key, {})
        if self.count >= self.limit or (t.probe not in probes and len(probes) >= PROBES_PER_LENGTH):
            return
        table = probes.setdefault(t.probe, {})
        self.count += t.pkl not in table
        table[t.pkl] = t


def open_archives_general(store: Store, blobs: Sequence[Blob], wheres: Sequence[str], small: int = SMALL_BLOB,
                          tail: int = TAIL) -> list[Archive]:
    """The general way of :func:`open_archives`, for any archive: the tails (``tail`` bytes) of all archives,
    their central directories where larger, then ``data.pkl``, ``byteorder`` and every storage's local header
    (one request per entry). :func:`open_archives` hands it the archives its fast path cannot parse, and its
    results and errors are what the fast path is held to."""
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
        hoff = entry.header_offset
        entry.data_offset = _local_data_offset(data[hoff : hoff + _local_header_len(data[hoff : hoff + 30])],
                                               entry, where)
        if entry.data_offset + entry.size > len(data):
            raise TruncatedDataError(f"{where}: zip entry {entry.name!r} runs past the end of the archive")
        rel = entry.name[len(a.prefix):]
        if rel in ("data.pkl", "byteorder"):
            a._tails[rel] = data[entry.data_offset : entry.data_offset + entry.size]
    _check_layout(list(entries.values()), cd_off, where)
    _finish(a)
    return a


def _finish(a: Archive, decoded: dict[bytes, TensorRef] | None = None) -> None:
    """The checks that need the whole archive, then ``data.pkl`` decoded. ``decoded``: data.pkl bytes ->
    the TensorRef they decode to (immutable, so shared), consulted and filled when given."""
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
    pkl = a._tails["data.pkl"]
    obj = None if decoded is None else decoded.get(pkl)
    if obj is None:
        obj = safe_loads(pkl, f"{a.where} (data.pkl)", allow_storages=True)
        if decoded is not None and type(obj) is TensorRef and len(decoded) < DECODED_CACHE:
            decoded[pkl] = obj
    a.obj = obj
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


def templates_for(owner: Any, small: int, tail: int) -> _Templates:
    """The templates that :func:`open_archives` keeps on ``owner`` (a format reader: one checkpoint) for calls
    with ``small`` and ``tail``, so that archives cut alike (a model's layers, located unit by unit) are parsed
    once per layout, not once per call. At most KEPT_TEMPLATES per kind of call; they hold no archive's
    own bytes (only those every matching archive shares).

    Example:
        >>> class Reader: pass
        >>> r = Reader(); templates_for(r, 0, 1024) is templates_for(r, 0, 1024) is not templates_for(r, 1, 1024)
        True
    """
    kept = owner.__dict__.setdefault("_archive_templates", {})
    found = kept.get((small, tail))
    if found is None:
        found = kept[(small, tail)] = _Templates(KEPT_TEMPLATES)
    return found
