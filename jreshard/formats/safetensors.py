"""safetensors files: one file, or a directory/index of shards (``model.safetensors.index.json``).

The header (8-byte little-endian length, then JSON) gives every tensor's dtype, shape and byte range; data
is C-ordered and little-endian, so each tensor is one chunk with a plain strided locator.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any, Sequence

from ..catalog import Chunk, Locator, TensorInfo
from ..dtypes import safetensors_dtype
from ..errors import CheckpointFormatError, InconsistentCheckpointError, MissingDataError, TruncatedDataError
from ..plan import c_strides
from ..storage import LocalStore, Store

MAX_HEADER = 100 * 2**20


def read_headers(store: Store, files: Sequence[str]) -> dict[str, tuple[int, dict[str, Any]]]:
    """{file: (data start, header JSON)} for each safetensors file (two batched reads)."""
    lens = store.read_ranges([(f, 0, 8) for f in files])
    sizes = []
    for f, raw in zip(files, lens):
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER:
            raise CheckpointFormatError(f"{store.where(f)}: not a safetensors file (header length {n})")
        sizes.append(n)
    heads = store.read_ranges([(f, 8, 8 + n) for f, n in zip(files, sizes)])
    out = {}
    for f, n, raw in zip(files, sizes, heads):
        try:
            header = json.loads(raw)
        except ValueError as e:
            raise CheckpointFormatError(f"{store.where(f)}: not a safetensors file (bad JSON header: {e})") from e
        if not isinstance(header, dict):
            raise CheckpointFormatError(f"{store.where(f)}: not a safetensors file (header is not an object)")
        out[f] = (8 + n, header)
    return out


class SafetensorsSource:
    """Tensors of one or more safetensors files."""

    format_name = "safetensors"

    def __init__(self, store: Store, files: Sequence[str] | None = None, index: str | None = None) -> None:
        self.store = store
        self.object_refs: dict[str, Any] = {}
        expected: dict[str, str] = {}
        if index is not None:
            try:
                weight_map = json.loads(store.read_all(index))["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise CheckpointFormatError(f"{store.where(index)}: not a safetensors index (no weight_map): {e}") from e
            expected = dict(weight_map)
            files = sorted(set(expected.values()))
        assert files is not None
        self.headers = read_headers(store, list(files))
        self.metadata = {f: h.get("__metadata__") or {} for f, (_, h) in self.headers.items()}
        self.tensors: dict[str, TensorInfo] = {}
        self._where: dict[str, tuple[str, int, int]] = {}
        for f, (start, header) in self.headers.items():
            size = store.size(f) if isinstance(store, LocalStore) else None
            for name, entry in header.items():
                if name == "__metadata__":
                    continue
                where = f"{store.where(f)} (tensor {name!r})"
                if name in self.tensors:
                    raise InconsistentCheckpointError(f"{where}: tensor also stored in {self._where[name][0]}")
                if expected and expected.get(name) != f:
                    raise InconsistentCheckpointError(f"{where}: the index places it in {expected.get(name)!r}")
                dtype = safetensors_dtype(entry["dtype"], where)
                shape = tuple(int(s) for s in entry["shape"])
                begin, end = (int(x) for x in entry["data_offsets"])
                if end - begin != math.prod(shape) * dtype.itemsize:
                    raise InconsistentCheckpointError(
                        f"{where}: {end - begin} bytes stored for shape {shape} of {entry['dtype']}"
                    )
                if size is not None and start + end > size:
                    raise TruncatedDataError(f"{where}: needs bytes up to {start + end} but the file has {size}")
                self._where[name] = (f, start + begin, end - begin)
                self.tensors[name] = TensorInfo(name, shape, dtype, (Chunk((0,) * len(shape), shape, ref=name),))
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
