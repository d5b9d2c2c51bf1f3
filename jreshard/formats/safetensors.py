"""safetensors files: one file, or a directory/index of shards (``model.safetensors.index.json``).

The header (8-byte little-endian length, then JSON) gives every tensor's dtype, shape and byte range; data
is C-ordered and little-endian, so each stored tensor is one chunk with a plain strided locator.

Files written by torch's ``HuggingFaceStorageWriter`` carry ``__metadata__["DCP_SHARDING_INFO"]``, a JSON
object ``{name: {"saved_offsets": [...]}}``: with ``save_distributed=True`` each rank's file
(``shard-00001-model-00001-of-00001.safetensors`` ...) holds the rank's *slices*, at those offsets of the
full tensor. Read as a set (``shards=True``), the files' slices become the chunks of the full tensors (full
shape = the largest ``offset + size`` per dimension, as torch's ``HuggingFaceStorageReader`` computes it),
checked to tile it exactly. Alone, such a file is refused: its tensors are not whole.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..catalog import Chunk, Locator, TensorInfo, validate_chunks
from ..dtypes import safetensors_dtype
from ..errors import CheckpointFormatError, InconsistentCheckpointError, MissingDataError, TruncatedDataError
from ..gate import _short, checked_int, checked_name, checked_shape, decoding
from ..planning import c_strides
from ..storage import LocalStore, Store

MAX_HEADER = 100 * 2**20
MAX_INDEX = 64 * 2**20
SHARDING_INFO = "DCP_SHARDING_INFO"
#: A file of torch's ``HuggingFaceStorageWriter(save_distributed=True)``: one rank's slices.
TORCH_SHARD_FILE = re.compile(r"shard-(\d+)-(.+)-(\d+)-of-(\d+)\.safetensors")


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


def saved_offsets(header: Header, where: str) -> dict[str, tuple[int, ...]] | None:
    """The checked ``saved_offsets`` of each tensor of a file with ``__metadata__["DCP_SHARDING_INFO"]``
    (torch's ``HuggingFaceStorageWriter``), or None for a file without it. Every tensor of the file must have
    offsets of its rank, and the JSON may name no tensor the file does not hold.

    Example:
        >>> h = Header(0, {"w": Entry("F32", np.dtype("float32"), (2, 3), 0, 24)},
        ...            {"DCP_SHARDING_INFO": '{"w": {"saved_offsets": [4, 0]}}'})
        >>> saved_offsets(h, "f.safetensors")
        {'w': (4, 0)}
    """
    raw = header.metadata.get(SHARDING_INFO)
    if raw is None:
        return None
    what = f"{where} (__metadata__ {SHARDING_INFO})"
    if not isinstance(raw, str):
        raise CheckpointFormatError(f"{what}: not a JSON string but {_short(raw)}")
    doc = load_json(raw.encode("utf-8", "surrogatepass"), what)
    if not isinstance(doc, dict):
        raise CheckpointFormatError(f"{what}: not a JSON object but {_short(doc)}")
    extra = sorted(set(doc) - set(header.entries))
    if extra:
        raise InconsistentCheckpointError(f"{what}: names tensors the file does not hold: {[n[:100] for n in extra[:5]]}")
    out: dict[str, tuple[int, ...]] = {}
    for name, entry in header.entries.items():
        item = doc.get(name)
        offsets = item.get("saved_offsets") if isinstance(item, dict) else None
        if not isinstance(offsets, list) or len(offsets) != len(entry.shape):
            raise CheckpointFormatError(f"{what}: tensor {name!r} of shape {entry.shape} has no saved_offsets of "
                                        f"{len(entry.shape)} ints (found {_short(item)})")
        out[name] = tuple(checked_int(o, "saved offset", f"{what} (tensor {name!r})") for o in offsets)
    return out


class SafetensorsSource:
    """Tensors of one or more safetensors files.

    ``shards=True``: the files are one set of torch ``HuggingFaceStorageWriter`` shards (or a set of files
    without index): a name may be stored by several files, as slices of the full tensor placed by
    ``DCP_SHARDING_INFO``. Otherwise every tensor is stored once and whole.
    """

    format_name = "safetensors"

    def __init__(self, store: Store, files: Sequence[str] | None = None, index: str | None = None,
                 weight_map: dict[str, str] | None = None, shards: bool = False) -> None:
        self.store = store
        self.object_refs: dict[str, Any] = {}
        with decoding(store.where(index or (files or [""])[0])):
            self._read(store, files, index, weight_map, shards)

    def _read(self, store: Store, files: Sequence[str] | None, index: str | None,
              weight_map: dict[str, str] | None, shards: bool) -> None:
        expected: dict[str, str] = {}
        if index is not None:
            expected = weight_map if weight_map is not None else read_index(store, index)
            files = sorted(set(expected.values()))
        assert files is not None
        files = [checked_name(f, store.description) for f in files]
        headers = read_headers(store, [(f, 0) for f in files])
        self.metadata = {f: headers[(f, 0)].metadata for f in files}
        # name -> [(offsets, entry, file, sliced)]: every stored piece of each tensor.
        pieces: dict[str, list[tuple[tuple[int, ...], Entry, str, bool]]] = {}
        for f in files:
            header = headers[(f, 0)]
            offsets = saved_offsets(header, store.where(f))
            if offsets is not None and not shards:
                self._refuse_slices(store, f, offsets)
            for name, entry in header.entries.items():
                where = f"{store.where(f)} (tensor {name!r})"
                sliced = offsets is not None
                if name in pieces:
                    first = pieces[name][0]
                    if not (shards and sliced and first[3]):
                        raise InconsistentCheckpointError(f"{where}: tensor also stored in {store.where(first[2])}")
                    if entry.dtype_name != first[1].dtype_name or len(entry.shape) != len(first[1].shape):
                        raise InconsistentCheckpointError(
                            f"{where}: a slice of {entry.dtype_name} {entry.shape}, but {store.where(first[2])} "
                            f"holds a slice of {first[1].dtype_name} {first[1].shape}")
                if expected and expected.get(name) != f:
                    raise InconsistentCheckpointError(f"{where}: the index places it in {expected.get(name)!r}")
                at = offsets[name] if offsets is not None else (0,) * len(entry.shape)
                pieces.setdefault(name, []).append((at, entry, f, sliced))
        self.tensors: dict[str, TensorInfo] = {}
        for name, stored in pieces.items():
            self.tensors[name] = self._tensor(store, name, stored, headers)
        missing = sorted(set(expected) - set(self.tensors))
        if missing:
            raise MissingDataError(
                f"{store.where(index or '')}: tensors listed in the index are missing from their files: {missing[:5]}"
            )

    @staticmethod
    def _refuse_slices(store: Store, f: str, offsets: dict[str, tuple[int, ...]]) -> None:
        """A file of sharding info read alone: its tensors are slices unless every offset is 0 and it is not
        one rank's file of a distributed save."""
        sliced = [(n, o) for n, o in offsets.items() if any(o)]
        if not sliced and not TORCH_SHARD_FILE.fullmatch(f.rsplit("/", 1)[-1]):
            return
        detail = (f"tensor {sliced[0][0]!r} is the slice at offsets {sliced[0][1]} of a larger tensor" if sliced
                  else "its tensors are one rank's slices of larger tensors")
        raise CheckpointFormatError(
            f"{store.where(f)}: one shard of a torch HuggingFaceStorageWriter(save_distributed=True) checkpoint "
            f"({SHARDING_INFO}): {detail}; open the directory that holds all its shard files "
            f"({store.description}) instead")

    @staticmethod
    def _tensor(store: Store, name: str, stored: list[tuple[tuple[int, ...], Entry, str, bool]],
                headers: dict[tuple[str, int], Header]) -> TensorInfo:
        first = stored[0][1]
        where = f"{store.where(stored[0][2])} (tensor {name!r})"
        ndim = len(first.shape)
        if len(stored) == 1 and not any(stored[0][0]):
            shape: tuple[int, ...] = first.shape
        else:  # the full shape, as torch's HuggingFaceStorageReader computes it
            shape = tuple(max(at[d] + e.shape[d] for at, e, _, _ in stored) for d in range(ndim))
            shape = checked_shape(list(shape), "shape", where, first.dtype.itemsize)
        chunks: Sequence[Chunk] = [Chunk(at, e.shape, ref=(f, headers[(f, 0)].data_start + e.begin, e.end - e.begin))
                                   for at, e, f, _ in stored]
        if len(chunks) > 1 or shape != first.shape:
            files = sorted({store.where(f) for _, _, f, _ in stored})
            chunks = validate_chunks(name, shape, list(chunks), f"{files[0]} and {len(files) - 1} more"
                                     if len(files) > 1 else files[0])
        return TensorInfo(name, shape, first.dtype, tuple(chunks))

    def locate_many(self, items: Sequence[tuple[TensorInfo, Chunk]], precise: bool = False,
                    headers: dict[Any, Any] | None = None) -> list[Locator]:
        """Locators of the chunks (their places are known from the open: ``precise`` and ``headers``, the
        caller's header cache, change nothing here)."""
        out = []
        for info, chunk in items:
            f, offset, nbytes = chunk.ref
            out.append(Locator(f, offset, 0, c_strides(chunk.sizes), nbytes, "little",
                               where=f"{self.store.where(f)} (tensor {info.name!r})"))
        return out

    def read_objects(self, names: Sequence[str]) -> dict[str, Any]:
        return {}
