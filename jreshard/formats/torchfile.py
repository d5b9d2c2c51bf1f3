"""``torch.save`` files (``.pt``, ``.pth``, ``pytorch_model.bin``) and their sharded index
(``pytorch_model.bin.index.json``), read torch-free.

Both formats torch.save has written: the zip archive (torch >= 1.6, :mod:`.torchsave`) and the legacy format
(:mod:`.torchlegacy`); a sharded index may list files of either. Nested state dicts are named the way DCP
flattens them (``model.layers.0.w``; see :func:`~jreshard.formats.torchsave.flatten_state`); tensors become
one-chunk tensors located inside their file (views and shared storages included), everything else becomes an
object.
"""

from __future__ import annotations

import struct
from typing import Any, Sequence

from ..catalog import Chunk, Locator, TensorInfo
from ..errors import CheckpointFormatError, InconsistentCheckpointError, JReshardError, MissingDataError
from ..gate import checked_name, decoding
from ..storage import LocalStore, Store
from ..unpickle import TensorRef
from .safetensors import read_index
from .torchlegacy import open_legacy
from .torchsave import TAIL, Blob, flatten_state, materialize, open_archives

def _size(store: Store, key: str) -> int:
    """Size of ``key``; for remote stores, derived from the zip end records of a suffix read."""
    if isinstance(store, LocalStore):
        return store.size(key)
    tail = store.tail(key, TAIL)
    pos = tail.rfind(b"PK\x05\x06")
    if pos < 0 or pos + 22 > len(tail):
        raise _not_zip(store, key)
    (_, _, _, _, count, cd_size, cd_off, comment) = struct.unpack_from("<IHHHHIIH", tail, pos)
    if pos >= 20 and tail[pos - 20 : pos - 16] == b"PK\x06\x07":
        # zip64 end records (torch always writes them): the record at eocd64_off is followed by the locator.
        (_, _, eocd64_off, _) = struct.unpack_from("<IIQI", tail, pos - 20)
        return eocd64_off + 56 + 20 + 22 + comment
    return cd_off + cd_size + 22 + comment


#: Zip archives of torch that torch.save did not write, told apart by the entry names of their central
#: directory (``<archive>/constants.pkl`` ...): (names that must all appear, what the file is).
OTHER_ARCHIVES = (
    ((b"/constants.pkl", b"/code/"), "a TorchScript archive (written by torch.jit.save)",
     ("TorchScript's code and its pickles are not read; save the module's state_dict() with torch.save or "
      "safetensors and open that")),
    ((b"/archive_format", b"/models/"), "a torch.export program (.pt2, written by torch.export.save)",
     ("its program and weights are not a state dict; save exported_program.state_dict() with torch.save or "
      "safetensors and open that")),
)


def _other_archive(store: Store, key: str) -> str | None:
    """What ``key`` is when it is a torch zip archive of another kind than torch.save's (TorchScript,
    torch.export), said with what to do instead; None otherwise (or when it cannot be read)."""
    try:
        tail = store.tail(key, 64 * 1024)
    except JReshardError:
        return None
    for marks, kind, advice in OTHER_ARCHIVES:
        if all(m in tail for m in marks):
            return f"{store.where(key)}: {kind}, not a torch.save checkpoint: {advice}"
    return None


def _not_zip(store: Store, key: str) -> CheckpointFormatError:
    return CheckpointFormatError(f"{store.where(key)}: not a torch.save zip archive (no zip end record)")


class TorchSaveSource:
    """Tensors and objects of one or more torch.save archives."""

    format_name = "torch.save"

    def __init__(self, store: Store, files: Sequence[str] | None = None, index: str | None = None,
                 weight_map: dict[str, str] | None = None) -> None:
        self.store = store
        try:
            with decoding(store.where(index or (files or [""])[0])):
                self._read(store, files, index, weight_map)
        except JReshardError:
            for f in self._zips:  # TorchScript and torch.export archives fail here: say what they are
                kind = _other_archive(store, f)
                if kind is not None:
                    raise CheckpointFormatError(kind) from None
            raise

    def _read(self, store: Store, files: Sequence[str] | None, index: str | None,
              weight_map: dict[str, str] | None) -> None:
        self._zips: list[str] = []
        expected: dict[str, str] = {}
        if index is not None:
            expected = weight_map if weight_map is not None else read_index(store, index)
            files = sorted(set(expected.values()))
        assert files is not None
        files = [checked_name(f, store.description) for f in files]
        local = isinstance(store, LocalStore)
        sizes = {f: store.size(f) for f in files} if local else {}
        heads = store.read_ranges([(f, 0, min(4, sizes[f]) if local else 4) for f in files])
        zips = [f for f, head in zip(files, heads) if head == b"PK\x03\x04"]
        self._zips = zips
        blobs = [Blob(f, 0, sizes[f] if local else _size(store, f)) for f in zips]
        opened: dict[str, Any] = dict(zip(zips, open_archives(store, blobs, [store.where(f) for f in zips])))
        for f in files:  # the legacy format (and refusals of what is neither)
            if f not in opened:
                opened[f] = open_legacy(store, f, store.where(f), sizes.get(f))
        self.tensors: dict[str, TensorInfo] = {}
        self.objects_: dict[str, Any] = {}
        self._refs: dict[str, tuple[Any, TensorRef]] = {}
        self._object_files: dict[str, Any] = {}
        for f in files:
            archive = opened[f]
            for name, leaf in flatten_state(archive.obj):
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
                    self._object_files[name] = archive
        missing = sorted(n for n in expected if n not in self.tensors and n not in self.objects_)
        if missing:
            raise MissingDataError(f"{store.where(index or '')}: entries listed in the index are missing: {missing[:5]}")
        self.object_refs = {name: name for name in self.objects_}

    def locate_many(self, items: Sequence[tuple[TensorInfo, Chunk]], precise: bool = False,
                    headers: dict[Any, Any] | None = None) -> list[Locator]:
        """Locators of the chunks (their places are known from the open: ``precise`` and ``headers``, the
        caller's header cache, change nothing here)."""
        with decoding(self.store.description):
            return [self._refs[info.name][0].locator(self._refs[info.name][1], info.name) for info, _ in items]

    def read_objects(self, names: Sequence[str]) -> dict[str, Any]:
        """The saved objects as users get them (tensors inside them read, torch dtypes as numpy dtypes: see
        :func:`~jreshard.formats.torchsave.materialize`)."""
        out = {}
        with decoding(self.store.description):
            for n in names:
                archive = self._object_files[n]
                out[n] = materialize(self.objects_[n], archive, self.store, f"{archive.where} (object {n!r})")
        return out
