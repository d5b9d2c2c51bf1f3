"""torch's pickle formats, written without torch: a small pickle emitter whose objects name torch's globals,
and the ``torch.save`` zip archive of one tensor (or one plain Python value).

Python's own :class:`pickle.Pickler` cannot name a global it cannot import (it imports the module to check the
name), so this module writes the opcodes itself. The objects it understands are plain data (None, bool, int,
float, str, bytes, tuple, list, dict) and five stand-ins for what torch's pickles hold:

* :class:`Global` — a module attribute (``torch.float32``, ``torch.Size``), written as GLOBAL / STACK_GLOBAL;
* :class:`Reduce` — ``callable(*args)`` (``torch.Size((2, 3))``), written as REDUCE;
* :class:`Obj` — an instance made by ``cls.__new__`` then given ``state`` (BUILD), as pickle writes a
  dataclass (``NEWOBJ`` with no arguments, then ``BUILD`` unless the state is None);
* :class:`Items` — a dict whose keys are stand-ins (``MetadataIndex`` -> ``_StorageInfo``);
* :class:`PersistentId` — torch.save's storage references (BINPERSID).

Strings and globals are memoised (a fqn that names a tensor and its storage entries is written once).
Nothing here decodes a pickle: jreshard reads pickles only through :mod:`jreshard.unpickle`.
"""

from __future__ import annotations

import hashlib
import io
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from .dtypes import TORCH_DTYPES, TORCH_STORAGES
from .errors import InvalidArgumentError


@dataclass(frozen=True)
class Global:
    """The attribute ``name`` of module ``module`` (e.g. ``Global("torch", "float32")``)."""

    module: str
    name: str


@dataclass(frozen=True)
class Reduce:
    """``func(*args)`` in the pickle (REDUCE)."""

    func: Global
    args: tuple


@dataclass(frozen=True)
class Obj:
    """An instance of ``cls`` made without arguments (NEWOBJ) and given ``state`` (BUILD; none when None)."""

    cls: Global
    state: Any = None


@dataclass(frozen=True)
class Items:
    """A dict written from ``(key, value)`` pairs (keys may be stand-ins, which are not hashable)."""

    pairs: tuple


@dataclass(frozen=True)
class PersistentId:
    """A persistent id (torch.save: ``('storage', storage type, key, location, numel)``)."""

    value: Any


def torch_size(values: Any) -> Reduce:
    """``torch.Size(values)`` as torch pickles it."""
    return Reduce(Global("torch", "Size"), (tuple(int(v) for v in values),))


class _Emitter:
    """Writes one pickle: protocol 2 (GLOBAL, BINPUT, as torch's ``data.pkl``) or 4 (STACK_GLOBAL, MEMOIZE,
    as ``pickle.dump`` writes DCP's ``.metadata``)."""

    def __init__(self, protocol: int) -> None:
        if protocol not in (2, 4):
            raise InvalidArgumentError(f"protocol must be 2 or 4, not {protocol}")
        self.protocol = protocol
        self.out = io.BytesIO()
        self.w = self.out.write
        self.memo: dict[tuple, int] = {}

    # -- memo -----------------------------------------------------------------------------------

    def _get(self, key: tuple) -> bool:
        idx = self.memo.get(key)
        if idx is None:
            return False
        self.w(b"h" + bytes([idx]) if idx < 256 else b"j" + struct.pack("<I", idx))
        return True

    def _put(self, key: tuple) -> None:
        idx = len(self.memo)
        self.memo[key] = idx
        if self.protocol >= 4:
            self.w(b"\x94")
        elif idx < 256:
            self.w(b"q" + bytes([idx]))
        else:
            self.w(b"r" + struct.pack("<I", idx))

    # -- values ---------------------------------------------------------------------------------

    def dump(self, obj: Any) -> bytes:
        self.w(b"\x80" + bytes([self.protocol]))
        self.save(obj)
        self.w(b".")
        return self.out.getvalue()

    def save(self, obj: Any) -> None:
        kind = type(obj)
        if obj is None:
            self.w(b"N")
        elif kind is bool:
            self.w(b"\x88" if obj else b"\x89")
        elif kind is int:
            self._int(obj)
        elif kind is float:
            self.w(b"G" + struct.pack(">d", obj))
        elif kind is str:
            self._str(obj)
        elif kind is bytes:
            self._bytes(obj)
        elif kind is tuple:
            self._tuple(obj)
        elif kind is list:
            self.w(b"]")
            self._batched(obj, b"e", lambda v: self.save(v))
        elif kind is dict:
            self.w(b"}")
            self._batched(list(obj.items()), b"u", lambda kv: (self.save(kv[0]), self.save(kv[1])))
        elif kind is Items:
            self.w(b"}")
            self._batched(list(obj.pairs), b"u", lambda kv: (self.save(kv[0]), self.save(kv[1])))
        elif kind is Global:
            self._global(obj)
        elif kind is Reduce:
            self._global(obj.func)
            self._tuple(obj.args)
            self.w(b"R")
        elif kind is Obj:
            self._global(obj.cls)
            self.w(b")\x81")
            if obj.state is not None:
                self.save(obj.state)
                self.w(b"b")
        elif kind is PersistentId:
            self.save(obj.value)
            self.w(b"Q")
        else:
            raise InvalidArgumentError(f"cannot write a {kind.__name__} into a torch pickle")

    def _int(self, v: int) -> None:
        if 0 <= v < 256:
            self.w(b"K" + bytes([v]))
        elif 0 <= v < 65536:
            self.w(b"M" + struct.pack("<H", v))
        elif -(2**31) <= v < 2**31:
            self.w(b"J" + struct.pack("<i", v))
        else:
            raw = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
            if len(raw) < 256:
                self.w(b"\x8a" + bytes([len(raw)]) + raw)
            else:
                self.w(b"\x8b" + struct.pack("<I", len(raw)) + raw)

    def _str(self, s: str) -> None:
        key = ("s", s)
        if self._get(key):
            return
        raw = s.encode("utf-8", "surrogatepass")
        if self.protocol >= 4 and len(raw) < 256:
            self.w(b"\x8c" + bytes([len(raw)]) + raw)
        elif len(raw) < 2**32:
            self.w(b"X" + struct.pack("<I", len(raw)) + raw)
        else:
            self.w(b"\x8d" + struct.pack("<Q", len(raw)) + raw)
        self._put(key)

    def _bytes(self, b: bytes) -> None:
        if self.protocol >= 3:
            if len(b) < 256:
                self.w(b"C" + bytes([len(b)]) + b)
            else:
                self.w(b"B" + struct.pack("<I", len(b)) + b)
        else:  # protocol 2 has no bytes: _codecs.encode(str, 'latin1'), as Python writes it
            self._global(Global("_codecs", "encode"))
            self._tuple((b.decode("latin-1"), "latin1"))
            self.w(b"R")

    def _tuple(self, t: tuple) -> None:
        n = len(t)
        if n == 0:
            self.w(b")")
            return
        if n > 3:
            self.w(b"(")
        for v in t:
            self.save(v)
        self.w(b"t" if n > 3 else (b"\x85", b"\x86", b"\x87")[n - 1])

    def _batched(self, items: list, op: bytes, save_one: Any) -> None:
        for start in range(0, len(items), 1000):
            batch = items[start : start + 1000]
            self.w(b"(")
            for item in batch:
                save_one(item)
            self.w(op)  # APPENDS / SETITEMS

    def _global(self, g: Global) -> None:
        key = ("g", g.module, g.name)
        if self._get(key):
            return
        if self.protocol >= 4:
            self._str(g.module)
            self._str(g.name)
            self.w(b"\x93")
        else:
            self.w(b"c" + g.module.encode() + b"\n" + g.name.encode() + b"\n")
        self._put(key)


def dumps(obj: Any, protocol: int = 4) -> bytes:
    """The pickle of ``obj`` (plain data and :class:`Global` / :class:`Reduce` / :class:`Obj` / :class:`Items`
    / :class:`PersistentId` stand-ins).

    Example:
        >>> import pickletools
        >>> data = dumps(torch_size((2, 3)))
        >>> [op.name for op, _, _ in pickletools.genops(data)][:6]
        ['PROTO', 'SHORT_BINUNICODE', 'MEMOIZE', 'SHORT_BINUNICODE', 'MEMOIZE', 'STACK_GLOBAL']
    """
    return _Emitter(protocol).dump(obj)


# ------------------------------------------------------------------------------------------------
# torch names of numpy dtypes

# numpy dtype -> torch dtype attribute name (the canonical names torch prints).
TORCH_NAMES: dict[np.dtype, str] = {
    TORCH_DTYPES[name]: name  # type: ignore[misc]
    for name in ("float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
                 "float8_e5m2fnuz", "float8_e8m0fnu", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
                 "uint64", "bool", "complex64", "complex128")
}
_LITTLE = np.little_endian
_LEGACY_STORAGE = {dtype: cls for cls, dtype in TORCH_STORAGES.items()}  # torch dtype name -> FloatStorage ...


def torch_dtype_name(dtype: Any) -> str | None:
    """The torch dtype name (``"bfloat16"``) of a numpy / ml_dtypes dtype, or None if torch has none."""
    try:
        dt = np.dtype(dtype)
    except TypeError:
        return None
    if dt.byteorder == ">" or (dt.byteorder == "=" and not _LITTLE):
        return None
    return TORCH_NAMES.get(dt.newbyteorder("="))


# ------------------------------------------------------------------------------------------------
# torch.save zip archives

ALIGNMENT = 64  # torch aligns every entry's bytes to 64 bytes from the archive start
ZIP32_LIMIT = 0xFFFFFFFF  # sizes and offsets from here on are written as zip64 fields (tests lower it)
_PREFIX = "archive/"


def tensor_pickle(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """``data.pkl`` of a C-contiguous tensor of ``shape`` and ``dtype`` in storage ``0``, as torch.save writes
    it: ``_rebuild_tensor_v2`` with a legacy typed storage (``torch.FloatStorage``) where torch has one, else
    ``_rebuild_tensor_v3`` with an ``UntypedStorage`` (numel in bytes) and the dtype."""
    name = torch_dtype_name(dtype)
    if name is None:
        raise InvalidArgumentError(f"dtype {dtype} has no torch equivalent")
    numel = 1
    for d in shape:
        numel *= d
    stride, acc = [], 1
    for d in reversed(shape):
        stride.append(acc)
        acc *= max(d, 1)
    stride_t = tuple(reversed(stride))
    legacy = _LEGACY_STORAGE.get(name)
    hooks = Reduce(Global("collections", "OrderedDict"), ())
    if legacy is not None:
        pid = PersistentId(("storage", Global("torch", legacy), "0", "cpu", numel))
        obj = Reduce(Global("torch._utils", "_rebuild_tensor_v2"), (pid, 0, tuple(shape), stride_t, False, hooks))
    else:
        pid = PersistentId(("storage", Global("torch.storage", "UntypedStorage"), "0", "cpu",
                            numel * np.dtype(dtype).itemsize))
        obj = Reduce(Global("torch._utils", "_rebuild_tensor_v3"),
                     (pid, 0, tuple(shape), stride_t, False, hooks, Global("torch", name)))
    return dumps(obj, protocol=2)


def object_pickle(value: Any) -> bytes:
    """``data.pkl`` of a plain Python value (int, float, bool, str, bytes, complex, None), protocol 2."""
    if type(value) is complex:
        return dumps(Reduce(Global("builtins", "complex"), (value.real, value.imag)), protocol=2)
    return dumps(value, protocol=2)


@dataclass(frozen=True)
class ArchiveLayout:
    """One torch.save archive: ``head`` (everything before the storage bytes), the storage at
    ``[data_offset, data_offset + data_size)``, then ``tail`` (the entries after it, the central directory, the
    end records); both with the storage's CRC-32 still zero (:meth:`finish` puts it in). ``length`` is the whole
    archive's size: it depends on the dtype and shape only, so every process can place every archive."""

    head: bytes
    tail: bytes
    data_offset: int
    data_size: int
    length: int
    _crc_at: int  # where the storage's CRC sits in ``head`` (-1 without a storage)
    _tail_crc_at: int  # ... and in ``tail`` (its central directory entry)

    def finish(self, crc: int) -> tuple[bytes, bytes]:
        """(head, tail) of the archive whose storage bytes have CRC-32 ``crc``."""
        if self._crc_at < 0:
            return self.head, self.tail
        raw = struct.pack("<I", crc)
        head = self.head[: self._crc_at] + raw + self.head[self._crc_at + 4 :]
        tail = self.tail[: self._tail_crc_at] + raw + self.tail[self._tail_crc_at + 4 :]
        return head, tail


def _pad_extra(offset: int, name_len: int, extra_len: int) -> bytes:
    """torch's alignment padding: an extra field ``FB`` + length + ``Z``s that puts the entry's bytes at a
    multiple of ALIGNMENT (at least 4 bytes of padding: the field's own header)."""
    start = offset + 30 + name_len + extra_len
    pad = (-(start + 4)) % ALIGNMENT
    return b"FB" + struct.pack("<H", pad) + b"Z" * pad


def _local_header(name: bytes, size: int, crc: int, offset: int) -> tuple[bytes, int]:
    """A local file header (STORED, sizes and CRC known up front) with zip64 sizes when needed; returns it and
    the offset of its CRC field inside it."""
    zip64 = size >= ZIP32_LIMIT
    extra = struct.pack("<HHQQ", 1, 16, size, size) if zip64 else b""
    extra += _pad_extra(offset, len(name), len(extra))
    small = 0xFFFFFFFF if zip64 else size
    header = struct.pack("<IHHHHHIIIHH", 0x04034B50, 45 if zip64 else 20, 0x0800, 0, 0, 0, crc, small, small,
                         len(name), len(extra)) + name + extra
    return header, 14


def _central_entry(name: bytes, size: int, crc: int, offset: int) -> bytes:
    fields = []
    if size >= ZIP32_LIMIT:
        fields += [size, size]
    if offset >= ZIP32_LIMIT:
        fields.append(offset)
    extra = struct.pack(f"<HH{len(fields)}Q", 1, 8 * len(fields), *fields) if fields else b""
    zip64 = bool(fields)
    s32 = 0xFFFFFFFF if size >= ZIP32_LIMIT else size
    o32 = 0xFFFFFFFF if offset >= ZIP32_LIMIT else offset
    return struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 45 if zip64 else 20, 45 if zip64 else 20, 0x0800, 0, 0, 0,
                       crc, s32, s32, len(name), len(extra), 0, 0, 0, 0, o32) + name + extra


def _tail(entries: tuple, tail_entries: tuple, pos: int, data_size: int) -> tuple[bytes, int]:
    """The entries after the storage, the central directory and the end records (zip64 ones always, as torch
    writes them), with the storage's CRC zero; and where that CRC sits in them (-1 without a storage)."""
    out = bytearray()
    for name, payload, _ in tail_entries:
        header, _ = _local_header(name, len(payload), zlib.crc32(payload), pos + len(out))
        out += header + payload
    cd_offset = pos + len(out)
    cd = bytearray()
    crc_at = -1
    for name, payload, offset in entries:
        if payload is None:
            crc_at = len(out) + len(cd) + 16
            cd += _central_entry(name, data_size, 0, offset)
        else:
            cd += _central_entry(name, len(payload), zlib.crc32(payload), offset)
    out += cd
    eocd64_offset = cd_offset + len(cd)
    count = len(entries)
    out += struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, count, count, len(cd), cd_offset)
    out += struct.pack("<IIQI", 0x07064B50, 0, eocd64_offset, 1)
    big = cd_offset >= ZIP32_LIMIT or len(cd) >= ZIP32_LIMIT
    out += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, min(count, 0xFFFF), min(count, 0xFFFF),
                       0xFFFFFFFF if big else len(cd), 0xFFFFFFFF if big else cd_offset, 0)
    return bytes(out), crc_at


def _serialization_id(seed: str) -> bytes:
    """A 40-digit id like torch's ``.data/serialization_id``, derived from ``seed`` (deterministic)."""
    digest = int.from_bytes(hashlib.sha256(seed.encode("utf-8", "surrogatepass")).digest()[:17], "little")
    return str(digest % 10**40).zfill(40).encode()


def archive_layout(pickle_bytes: bytes, data_size: int | None, seed: str = "") -> ArchiveLayout:
    """The layout of a torch.save archive holding ``data.pkl`` = ``pickle_bytes`` and, unless ``data_size`` is
    None, one storage ``data/0`` of ``data_size`` bytes. Entries and their order are torch's: ``data.pkl``,
    ``.format_version``, ``.storage_alignment``, ``byteorder``, ``data/0``, ``version``,
    ``.data/serialization_id`` (``seed`` makes the id), every entry's bytes 64-byte aligned."""
    before = [("data.pkl", pickle_bytes), (".format_version", b"1"), (".storage_alignment", str(ALIGNMENT).encode()),
              ("byteorder", b"little")]
    after = [("version", b"3\n"), (".data/serialization_id", _serialization_id(seed))]
    head = bytearray()
    entries = []
    crc_at = -1
    for name, payload in before:
        raw = (_PREFIX + name).encode()
        header, _ = _local_header(raw, len(payload), zlib.crc32(payload), len(head))
        entries.append((raw, payload, len(head)))
        head += header + payload
    data_offset = len(head)
    if data_size is not None:
        raw = (_PREFIX + "data/0").encode()
        header, crc_field = _local_header(raw, data_size, 0, len(head))
        entries.append((raw, None, len(head)))
        crc_at = len(head) + crc_field
        head += header
        data_offset = len(head)
    pos = data_offset + (data_size or 0)
    off = pos  # the entries after the storage: their offsets follow from the sizes
    placed = []
    for name, payload in after:
        raw = (_PREFIX + name).encode()
        header, _ = _local_header(raw, len(payload), 0, off)
        placed.append((raw, payload, off))
        off += len(header) + len(payload)
    tail, tail_crc_at = _tail(tuple(entries + placed), tuple(placed), pos, data_size or 0)
    return ArchiveLayout(bytes(head), tail, data_offset, data_size or 0, pos + len(tail), crc_at, tail_crc_at)
