"""safetensors files: one file, or a directory/index of shards (``model.safetensors.index.json``).

The header (8-byte little-endian length, then JSON) gives every tensor's dtype, shape and byte range; data
is C-ordered and little-endian, so each tensor is one chunk with a plain strided locator.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..catalog import Chunk, Locator, TensorInfo
from ..dtypes import safetensors_dtype
from ..errors import CheckpointFormatError, InconsistentCheckpointError, MissingDataError, TruncatedDataError
from ..planning import c_strides
from ..gate import _short, checked_int, checked_name, checked_shape, decoding
from ..storage import LocalStore, Store

MAX_HEADER = 100 * 2**20
MAX_INDEX = 64 * 2**20


@dataclass(frozen=True)
class Entry:
    """One tensor of a safetensors header, checked: dtype, shape and its byte range in the data section."""

    dtype_name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class Header:
    """A checked safetensors header: where the data section starts (absolute), the tensors, ``__metadata__``."""

    data_start: int
    entries: dict[str, Entry]
    metadata: dict[str, Any]


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise CheckpointFormatError(f"key {k[:100]!r} appears twice in the JSON (ambiguous)")
        out[k] = v
    return out


def load_json(raw: bytes, where: str) -> Any:
    """JSON text from a checkpoint: UTF-8, duplicate keys refused (two readers would see two values).

    Example:
        >>> load_json(b'{"a": 1}', "f")
        {'a': 1}
    """
    try:
        return json.loads(raw, object_pairs_hook=_no_duplicates)
    except CheckpointFormatError as e:
        raise CheckpointFormatError(f"{where}: {e}") from None
    except (ValueError, RecursionError) as e:
        raise CheckpointFormatError(f"{where}: bad JSON: {type(e).__name__}: {str(e)[:200]}") from None


def parse_header(raw: bytes, data_start: int, where: str, data_nbytes: int | None = None) -> Header:
    """Check a safetensors JSON header: every tensor has a known dtype, a shape of ints, and
    ``data_offsets`` inside the data section (``data_nbytes`` bytes when known) that match its size; no
    two tensors share bytes."""
    header = load_json(raw, where)
    if not isinstance(header, dict):
        raise CheckpointFormatError(f"{where}: not a safetensors file (header is not an object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise CheckpointFormatError(f"{where}: __metadata__ is not an object")
    entries: dict[str, Entry] = {}
    for name, e in header.items():
        what = f"{where} (tensor {name!r})"
        if not isinstance(e, dict) or not isinstance(e.get("dtype"), str) or not isinstance(e.get("data_offsets"), list) \
                or len(e["data_offsets"]) != 2:
            raise CheckpointFormatError(f"{what}: entry {_short(e)} lacks dtype, shape or data_offsets")
        dtype = safetensors_dtype(e["dtype"], what)
        shape = checked_shape(e.get("shape"), "shape", what, dtype.itemsize)
        begin = checked_int(e["data_offsets"][0], "data offset", what)
        end = checked_int(e["data_offsets"][1], "data offset", what)
        if end < begin or end - begin != math.prod(shape) * dtype.itemsize:
            raise InconsistentCheckpointError(
                f"{what}: data_offsets [{begin}, {end}) do not hold shape {shape} of {e['dtype']}"
            )
        if data_nbytes is not None and end > data_nbytes:
            raise TruncatedDataError(f"{what}: needs bytes up to {data_start + end} but the file has "
                                     f"{data_start + data_nbytes}")
        entries[name] = Entry(e["dtype"], dtype, shape, begin, end)
    last_end, last = 0, ""
    for name, e in sorted(entries.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if e.begin < last_end and e.end > e.begin:
            raise InconsistentCheckpointError(f"{where}: tensors {last!r} and {name!r} share bytes (overlapping "
                                              "data_offsets); refused")
        if e.end > e.begin:
            last_end, last = e.end, name
    return Header(data_start, entries, metadata)


def read_headers(store: Store, locations: Sequence[tuple[str, int]]) -> dict[tuple[str, int], Header]:
    """{(file, offset): Header} of the safetensors sections starting at ``offset`` of ``file`` (two batched
    reads). For local files, the header and the data must lie inside the file."""
    lens = store.read_ranges([(f, o, o + 8) for f, o in locations])
    sizes = []
    for (f, o), raw in zip(locations, lens):
        (n,) = struct.unpack("<Q", raw)
        if not 2 <= n <= MAX_HEADER:
            raise CheckpointFormatError(f"{store.where(f)}: not a safetensors file (header length {n} at byte {o})")
        sizes.append(n)
    heads = store.read_ranges([(f, o + 8, o + 8 + n) for (f, o), n in zip(locations, sizes)])
    out = {}
    for (f, o), n, raw in zip(locations, sizes, heads):
        data_start = o + 8 + n
        data_nbytes = store.size(f) - data_start if isinstance(store, LocalStore) else None
        out[(f, o)] = parse_header(raw, data_start, store.where(f), data_nbytes)
    if not isinstance(store, LocalStore):
        # No file size from a remote store: read the last byte the header claims (one small request per
        # section), so that a header claiming more than the file holds fails here, before any allocation.
        ends = [(f, h.data_start + max((e.end for e in h.entries.values()), default=0))
                for (f, _), h in out.items()]
        store.read_ranges([(f, end - 1, end) for f, end in ends if end > 0])
    return out


def read_index(store: Store, index: str) -> dict[str, str]:
    """The ``weight_map`` of a sharded checkpoint's index json: tensor name -> file inside the checkpoint."""
    where = store.where(index)
    if isinstance(store, LocalStore) and store.size(index) > MAX_INDEX:
        raise CheckpointFormatError(f"{where}: index of {store.size(index)} bytes is larger than {MAX_INDEX}")
    raw = store.read_all(index)
    if len(raw) > MAX_INDEX:
        raise CheckpointFormatError(f"{where}: index of {len(raw)} bytes is larger than {MAX_INDEX}")
    doc = load_json(raw, where)
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointFormatError(f"{where}: not a checkpoint index (no weight_map object)")
    out = {}
    for name, file in weight_map.items():
        out[name] = checked_name(file, f"{where} (entry {name[:200]!r})")
    return out


class SafetensorsSource:
    """Tensors of one or more safetensors files."""

    format_name = "safetensors"

    def __init__(self, store: Store, files: Sequence[str] | None = None, index: str | None = None,
                 weight_map: dict[str, str] | None = None) -> None:
        self.store = store
        self.object_refs: dict[str, Any] = {}
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
        headers = read_headers(store, [(f, 0) for f in files])
        self.metadata = {f: headers[(f, 0)].metadata for f in files}
        self.tensors: dict[str, TensorInfo] = {}
        self._where: dict[str, tuple[str, int, int]] = {}
        for f in files:
            header = headers[(f, 0)]
            for name, entry in header.entries.items():
                where = f"{store.where(f)} (tensor {name!r})"
                if name in self.tensors:
                    raise InconsistentCheckpointError(f"{where}: tensor also stored in {self._where[name][0]}")
                if expected and expected.get(name) != f:
                    raise InconsistentCheckpointError(f"{where}: the index places it in {expected.get(name)!r}")
                self._where[name] = (f, header.data_start + entry.begin, entry.end - entry.begin)
                self.tensors[name] = TensorInfo(name, entry.shape, entry.dtype,
                                                (Chunk((0,) * len(entry.shape), entry.shape, ref=name),))
        missing = sorted(set(expected) - set(self.tensors))
        if missing:
            raise MissingDataError(
                f"{store.where(index or '')}: tensors listed in the index are missing from their files: {missing[:5]}"
            )

    def locate_many(self, items: Sequence[tuple[TensorInfo, Chunk]]) -> list[Locator]:
        out = []
        for info, _chunk in items:
            f, offset, nbytes = self._where[info.name]
            out.append(Locator(f, offset, 0, c_strides(info.shape), nbytes, "little",
                               where=f"{self.store.where(f)} (tensor {info.name!r})"))
        return out

    def read_objects(self, names: Sequence[str]) -> dict[str, Any]:
        return {}
