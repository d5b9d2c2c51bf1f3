"""Legacy ``torch.save`` files (torch < 1.6, or ``_use_new_zipfile_serialization=False``), read torch-free.

The layout (torch's ``torch/serialization.py``, ``_legacy_save`` / ``_legacy_load``): five pickles one after
the other,

1. the magic number ``0x1950a86a20f9469cfc6c``,
2. the protocol version ``1001``,
3. ``sys_info`` (a dict; torch does not use it when loading),
4. the saved object, each storage a persistent id ``('storage', storage_type, key, location, numel,
   view_metadata)``,
5. the list of storage keys in the order their bytes follow,

then, for each key of that list, an 8-byte little-endian element count and ``count * itemsize`` bytes, in
little-endian order whatever the writing machine (torch's ``THPStorage_readFileRaw``).

Only the pickles are read, in growing windows from the start of the file; each storage's place follows from
the counts before it, and its 8-byte header is read (one small read each, in one batch) to check the count it
holds against the pickle's. Tensors become Locators into those byte ranges, as for the zip format. Storage
views (``view_metadata``, written by torch < 1.0), pickled modules and the older tar format (torch < 0.4) are
refused with a clear error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..catalog import Locator
from ..dtypes import TorchDtype
from ..errors import (
    CheckpointFormatError,
    InconsistentCheckpointError,
    JReshardError,
    MissingDataError,
    TruncatedDataError,
)
from ..gate import MAX_INT, check_view
from ..pickle_scan import _ARG, _L1, _L4, _NL, _NL2, _STOP
from ..storage import Store
from ..unpickle import MAX_ENTRIES, StorageRef, TensorRef, safe_loads

MAGIC = 0x1950A86A20F9469CFC6C
PROTOCOL = 1001
HEAD = 64 * 1024  # first read of a file: its pickles, and the whole file when it is this small
MAX_PICKLES = 2**30  # the five pickles together may take at most this many bytes


def _pickle_end(data: bytes, pos: int) -> int | None:
    """Where the pickle starting at ``data[pos]`` ends (just after its STOP), or None if ``data`` ends first.
    Only walks the opcodes; an unknown opcode is a CheckpointFormatError."""
    n, find = len(data), data.find
    while pos < n:
        code = data[pos]
        arg = _ARG[code]
        if arg is None:
            raise CheckpointFormatError(f"not a pickle (unknown opcode {code:#04x} at byte {pos})")
        if code == _STOP:
            return pos + 1
        if arg >= 0:
            pos += 1 + arg
        elif arg == _NL:
            end = find(b"\n", pos + 1)
            if end < 0:
                return None
            pos = end + 1
        elif arg == _NL2:
            end = find(b"\n", pos + 1)
            end = find(b"\n", end + 1) if end >= 0 else -1
            if end < 0:
                return None
            pos = end + 1
        else:
            width = 1 if arg == _L1 else 4 if arg == _L4 else 8
            if pos + 1 + width > n:
                return None
            pos += 1 + width + int.from_bytes(data[pos + 1 : pos + 1 + width], "little")
    return None


def is_tar(head: bytes) -> bool:
    """Whether ``head`` (the first 512 bytes of a file) is a tar header: torch < 0.4's format.

    Example:
        >>> is_tar(bytes(257) + b"ustar" + bytes(250))
        True
    """
    return len(head) >= 262 and head[257:262] == b"ustar"


def starts_legacy(head: bytes) -> bool:
    """Whether ``head`` starts with the legacy format's first pickle, the magic number (protocol 2, as torch
    writes it, or any other protocol).

    Example:
        >>> import pickle
        >>> starts_legacy(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + b"...")
        True
        >>> starts_legacy(b"PK\\x03\\x04")
        False
    """
    try:
        end = _pickle_end(head, 0)
        return end is not None and safe_loads(head[:end], "magic number") == MAGIC
    except JReshardError:
        return False


@dataclass(frozen=True)
class LegacyStorage:
    """A storage of a legacy file: ``nbytes`` bytes at ``offset`` (after its 8-byte count)."""

    key: str
    offset: int
    nbytes: int


class LegacyFile:
    """A parsed legacy torch.save file: the decoded object (tensors as TensorRef) and where each storage's
    bytes lie. ``data`` holds the whole file when it was small enough to be read in the first request."""

    byteorder = "little"

    def __init__(self, key: str, where: str, obj: Any, storages: dict[str, LegacyStorage],
                 data: bytes | None = None) -> None:
        self.key, self.where, self.obj, self.storages, self.data = key, where, obj, storages, data

    def locator(self, tensor: TensorRef, name: str) -> Locator:
        """The Locator of ``tensor`` (a TensorRef of this file's pickle), its view checked against its storage."""
        where = f"{self.where}: tensor {name!r}"
        storage = self.storages.get(tensor.storage.key)
        if storage is None:
            raise MissingDataError(f"{where}: storage {tensor.storage.key!r} has no bytes in the file")
        check_view(tensor.size, tensor.stride, tensor.storage_offset, tensor.dtype.numpy(where).itemsize,
                   storage.nbytes, where)
        data = memoryview(self.data) if self.data is not None else None
        return Locator(self.key, storage.offset, tensor.storage_offset, tensor.stride, storage.nbytes, "little",
                       data=data, where=self.where)


def _itemsize(ref: StorageRef, where: str) -> int:
    return 1 if ref.dtype is None else TorchDtype(ref.dtype).numpy(where).itemsize


def open_legacy(store: Store, key: str, where: str, size: int | None) -> LegacyFile:
    """Parse the legacy torch.save file ``key`` (``size`` bytes; None when the store cannot tell, e.g. over
    HTTP): its pickles, then the 8-byte count of each storage. No storage's bytes are read (unless the whole
    file fits in the first read)."""
    data, whole = _read_head(store, key, where, size, HEAD)
    if not starts_legacy(data[:512]):
        if is_tar(data[:512]):
            raise CheckpointFormatError(
                f"{where}: a tar-format torch file (torch < 0.4), which jreshard does not read; load it with an old "
                "torch and save it again with torch.save(obj, path)"
            )
        raise CheckpointFormatError(
            f"{where}: not a torch.save file (neither a zip archive nor the legacy format: its first bytes are "
            f"{data[:8]!r})"
        )
    ends: list[int] = []
    pos = 0
    while len(ends) < 5:
        try:
            end = _pickle_end(data, pos)
        except CheckpointFormatError as e:
            raise CheckpointFormatError(f"{where}: pickle {len(ends) + 1} of the legacy format: {e}") from None
        if end is not None:
            ends.append(end)
            pos = end
            continue
        if whole:
            raise TruncatedDataError(f"{where}: the file ends inside pickle {len(ends) + 1} of the legacy format "
                                     "(truncated file?)")
        if len(data) >= MAX_PICKLES:
            raise CheckpointFormatError(f"{where}: the legacy format's pickles take more than {MAX_PICKLES} bytes; "
                                        "refused")
        data, whole = _read_head(store, key, where, size, min(2 * len(data), MAX_PICKLES), data)
    if whole:
        size = len(data)
    starts = [0] + ends[:-1]
    parts = [data[a:b] for a, b in zip(starts, ends)]
    if safe_loads(parts[1], f"{where} (protocol version)") != PROTOCOL:
        raise CheckpointFormatError(f"{where}: legacy torch.save protocol version is not {PROTOCOL}")
    if type(safe_loads(parts[2], f"{where} (sys_info)")) is not dict:
        raise CheckpointFormatError(f"{where}: the legacy format's sys_info is not a dict")
    refs: dict[str, StorageRef] = {}
    obj = safe_loads(parts[3], f"{where} (pickle)", allow_storages="legacy", storages=refs)
    keys = safe_loads(parts[4], f"{where} (storage keys)")
    storages = _locate_storages(store, key, where, size, keys, refs, ends[4], data if whole else None)
    return LegacyFile(key, where, obj, storages, data if whole else None)


def _read_head(store: Store, key: str, where: str, size: int | None, want: int,
               have: bytes = b"") -> tuple[bytes, bool]:
    """The first ``want`` bytes of the file (fewer if it is shorter), reading only what ``have`` lacks; and
    whether that is the whole file."""
    if size is not None:
        stop = min(want, size)
        return (have + store.read(key, len(have), stop) if stop > len(have) else have), stop >= size
    try:
        return have + store.read(key, len(have), want), False
    except TruncatedDataError:  # shorter than want (a remote store cannot say its size): read the rest
        data = store.read_all(key)
        if data[: len(have)] != have:
            raise InconsistentCheckpointError(f"{where}: the file changed while it was read") from None
        return data, True


def _locate_storages(store: Store, key: str, where: str, size: int | None, keys: Any,
                     refs: dict[str, StorageRef], start: int, data: bytes | None) -> dict[str, LegacyStorage]:
    """Each storage's byte range, from the counts the pickle gives, in the order of the key list; every 8-byte
    count in the file is checked against the pickle's (one read each, batched), and the last storage against
    the end of the file."""
    if type(keys) not in (list, tuple) or not all(type(k) is str for k in keys):
        raise CheckpointFormatError(f"{where}: the legacy format's storage key list is not a list of strings")
    if len(keys) > MAX_ENTRIES or (size is not None and start + 8 * len(keys) > size):
        raise TruncatedDataError(f"{where}: {len(keys)} storages cannot follow the pickles in a file of {size} bytes")
    if len(set(keys)) != len(keys):
        raise InconsistentCheckpointError(f"{where}: the legacy format's storage key list names a storage twice")
    unused = [k for k in keys if k not in refs]
    if unused:
        raise InconsistentCheckpointError(
            f"{where}: the storage key list names {unused[:3]!r}, which the pickle does not use"
        )
    listed = set(keys)
    missing = [k for k in refs if k not in listed]
    if missing:
        raise MissingDataError(f"{where}: storages {missing[:3]!r} of the pickle have no bytes in the file")
    out: dict[str, LegacyStorage] = {}
    pos = start
    for k in keys:
        ref = refs[k]
        nbytes = ref.numel * _itemsize(ref, where)
        out[k] = LegacyStorage(k, pos + 8, nbytes)
        pos += 8 + nbytes
        if size is not None and pos > size:
            raise TruncatedDataError(f"{where}: storage {k!r} of {ref.numel} elements ends at byte {pos} but the file "
                                     f"has {size} bytes (truncated file?)")
        if pos > MAX_INT:
            raise CheckpointFormatError(f"{where}: storage {k!r} of {ref.numel} elements ends beyond any file")
    if data is not None:
        heads = [data[s.offset - 8 : s.offset] for s in out.values()]
    else:
        requests = [(key, s.offset - 8, s.offset) for s in out.values()]
        if size is None and keys and out[keys[-1]].nbytes:  # the last byte of the last storage is there
            requests.append((key, pos - 1, pos))
        heads = store.read_ranges(requests)[: len(out)]
    for (k, s), head in zip(out.items(), heads):
        count = int.from_bytes(head, "little", signed=True)
        if count != refs[k].numel:
            raise InconsistentCheckpointError(
                f"{where}: storage {k!r} holds {count} elements by its count in the file, the pickle says "
                f"{refs[k].numel}"
            )
    return out
