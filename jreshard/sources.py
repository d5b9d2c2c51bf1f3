"""Which format a source is, and the store its files are read from.

A directory is recognised by what it holds:

* ``.metadata``: a DCP checkpoint.
* Hugging Face conventions, for any file stem (``model``, ``pytorch_model``, diffusers'
  ``diffusion_pytorch_model``, PEFT's ``adapter_model`` ...): an index ``<stem>.safetensors.index.json`` /
  ``<stem>.bin.index.json``, with a variant ``<stem>.safetensors.index.<variant>.json``; a single file
  ``<stem>.safetensors`` / ``<stem>.<variant>.safetensors`` (``.bin`` for the stems ``pytorch_model``,
  ``adapter_model`` and ``diffusion_pytorch_model`` only: other ``.bin`` files of a training directory, such
  as ``training_args.bin``, are not checkpoints).
* Files of one set without an index: ``<base>-00001-of-00003.safetensors`` ... (every number present), files
  of one prefix numbered ``<prefix>_0.safetensors``, ``<prefix>-1.safetensors`` ..., and the per-rank files of
  torch's ``HuggingFaceStorageWriter(save_distributed=True)`` (``shard-00001-model-00001-of-00001.safetensors``
  ...), whose slices are assembled by ``DCP_SHARDING_INFO``. Their tensors are the union of the files'; a name
  stored twice is an error, except as slices of a sharded save.
* Any other ``.safetensors`` file: a checkpoint of its own.

Files an index lists are part of it, not checkpoints of their own. safetensors is preferred over ``.bin``
for the same stem and variant (``model`` and ``pytorch_model`` count as one), as Hugging Face does. When more
than one checkpoint remains the error lists them; ``variant=`` picks one: a Hugging Face variant (``"fp16"``
for ``model.fp16.safetensors`` or ``model.safetensors.index.fp16.json``), else a stem (``"adapter_model"``,
``"model"``; a stem picks the checkpoint of that stem without variant) or the name of the checkpoint's index or
file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from .errors import CheckpointFormatError, InvalidArgumentError, MissingDataError
from .formats import dcp
from .gate import decoding
from .storage import (
    LocalStore,
    Store,
    is_local,
    local_path,
    parent_and_name,
    store_for_directory,
)


def open_source(source: str, io: str = "auto", storage_options: dict[str, Any] | None = None,
                variant: str | None = None) -> tuple[Any, Store]:
    """(format object, store) for a path or URL. The format object has ``tensors``, ``object_refs``,
    ``locate_many`` and ``read_objects``. ``variant`` picks one checkpoint of a directory that holds several
    (see the module's docstring)."""
    if variant is not None and (not isinstance(variant, str) or not variant):
        raise InvalidArgumentError(f"variant must be a non-empty string, not {variant!r}")
    with decoding(source):
        return _open_source(source, io, storage_options, variant)


def _open_source(source: str, io: str, storage_options: dict[str, Any] | None,
                 variant: str | None) -> tuple[Any, Store]:
    if is_local(source):
        path = local_path(source)
        if not os.path.exists(path):
            raise MissingDataError(f"{path}: no such file or directory")
        if os.path.isdir(path):
            store = store_for_directory(path, io, storage_options)
            return _directory_format(store, path, variant), store
        _no_variant(path, variant)
        parent, name = parent_and_name(path)
        store = store_for_directory(parent, io, storage_options)
        return _file_format(store, name, path), store
    # A URL: a directory when it ends with "/" or has no file extension.
    last = source.rstrip("/").rsplit("/", 1)[-1]
    if source.endswith("/") or "." not in last:
        store = store_for_directory(source.rstrip("/") + "/", io, storage_options)
        return _directory_format(store, source, variant), store
    _no_variant(source, variant)
    parent, name = parent_and_name(source)
    store = store_for_directory(parent + "/", io, storage_options)
    return _file_format(store, name, source), store


def _no_variant(where: str, variant: str | None) -> None:
    if variant is not None:
        raise InvalidArgumentError(f"{where}: variant={variant!r} picks one checkpoint of a directory; this is a "
                                   "file: open it without variant")


_INDEX = re.compile(r"(?P<stem>[^/]+?)\.(?P<kind>safetensors|bin)\.index(?:\.(?P<variant>[^./]+))?\.json")
_SINGLE = re.compile(r"(?P<stem>[^./]+)(?:\.(?P<variant>[^./]+))?\.(?P<kind>safetensors|bin)")
_OF_SET = re.compile(r"(?P<base>[^/]+?)-(?P<k>\d+)-of-(?P<n>\d+)\.safetensors")
_TORCH_SHARD = re.compile(r"shard-(?P<rank>\d+)-(?P<base>[^/]+?)-(?P<k>\d+)-of-(?P<n>\d+)\.safetensors")
_NUMBERED = re.compile(r"(?P<prefix>[A-Za-z_][\w-]*?)[-_](?P<k>\d+)\.safetensors")
_BIN_STEMS = ("pytorch_model", "adapter_model", "diffusion_pytorch_model")
#: Probed where a store cannot be listed (http): these stems, with the variant when one is given.
_PROBED_STEMS = ("model", "pytorch_model", "diffusion_pytorch_model", "adapter_model")


@dataclass
class Candidate:
    """One checkpoint a directory holds: an index, one file, or a set of files."""

    label: str
    stem: str
    variant: str | None
    kind: str  # "safetensors" or "bin"
    files: list[str] = field(default_factory=list)
    index: str | None = None
    shards: bool = False  # several files whose tensors are united (and slices assembled)

    @property
    def family(self) -> str:
        return "model" if self.stem == "pytorch_model" else self.stem

    def names(self) -> set[str]:
        return {self.label, self.stem, *self.files, *([self.index] if self.index else []),
                *([f"{self.stem}.{self.variant}"] if self.variant else [])}


def _split_variant(base: str) -> tuple[str, str | None]:
    stem, dot, variant = base.partition(".")
    return (stem, variant) if dot and variant and "." not in variant else (base, None)


def _list(store: Store, variant: str | None) -> list[str]:
    """The files directly in the store's directory; probed by name where the store cannot list (http)."""
    if isinstance(store, LocalStore):
        return sorted(n for n in os.listdir(store.root) if os.path.isfile(os.path.join(store.root, n)))
    kv = getattr(store, "kv", None)
    try:
        keys = kv.list().result(timeout=store.remote.wait_s(0)) if kv is not None else None
    except Exception:  # noqa: BLE001 - a store that cannot list (http) is probed instead
        keys = None
    if keys is not None:
        names = [k.decode("utf-8", "replace") if isinstance(k, bytes) else str(k) for k in keys]
        return sorted(n for n in names if "/" not in n)
    tags = [""] + ([f".{variant}"] if variant else [])
    probe = [f"{s}.{kind}.index{t}.json" for s in _PROBED_STEMS for kind in ("safetensors", "bin") for t in tags]
    probe += [f"{s}{t}.{kind}" for s in _PROBED_STEMS for kind in ("safetensors", "bin") for t in tags]
    return [n for n in probe if store.exists(n)]


def candidates(names: list[str], claimed: Collection[str] = ()) -> list[Candidate]:
    """The checkpoints among the file ``names`` of a directory (see the module's docstring); ``claimed``: the
    files that the directory's indexes list, which are parts of those and not checkpoints of their own.

    Example:
        >>> [c.label for c in candidates(["model.safetensors", "adapter_model.safetensors", "training_args.bin"])]
        ['adapter_model.safetensors', 'model.safetensors']
    """
    out: list[Candidate] = []
    rest = []
    for n in sorted(names):
        m = _INDEX.fullmatch(n)
        if m:
            out.append(Candidate(n, m["stem"], m["variant"], m["kind"], index=n))
        elif n.endswith((".safetensors", ".bin")) and n not in claimed:
            rest.append(n)
    torch_shards = [n for n in rest if n.endswith(".safetensors") and _TORCH_SHARD.fullmatch(n)]
    if torch_shards:
        base = _TORCH_SHARD.fullmatch(torch_shards[0])["base"]  # type: ignore[index]
        out.append(Candidate(f"shard-*-{base}-*.safetensors ({len(torch_shards)} files of torch's "
                             "HuggingFaceStorageWriter)", base, None, "safetensors", torch_shards, shards=True))
    rest = [n for n in rest if n not in torch_shards]
    sets: dict[tuple[str, int], dict[int, str]] = {}
    for n in rest:
        m = _OF_SET.fullmatch(n)
        if m:
            sets.setdefault((m["base"], int(m["n"])), {})[int(m["k"])] = n
    for (base, count), files in sets.items():
        stem, variant = _split_variant(base)
        out.append(Candidate(f"{base}-*-of-{count:05d}.safetensors ({len(files)} files)", stem, variant,
                             "safetensors", [files[k] for k in sorted(files)], shards=True))
    in_sets = {f for files in sets.values() for f in files.values()}
    rest = [n for n in rest if n not in in_sets]
    numbered: dict[str, list[str]] = {}
    for n in rest:
        m = _NUMBERED.fullmatch(n)
        if m:
            numbered.setdefault(m["prefix"], []).append(n)
    for prefix, files in numbered.items():
        if len(files) > 1:
            out.append(Candidate(f"{prefix}*.safetensors ({len(files)} files)", prefix, None, "safetensors",
                                 sorted(files), shards=True))
            rest = [n for n in rest if n not in files]
    for n in rest:
        m = _SINGLE.fullmatch(n)
        if n.endswith(".safetensors"):
            stem, variant = (m["stem"], m["variant"]) if m else (n[: -len(".safetensors")], None)
            out.append(Candidate(n, stem, variant, "safetensors", [n]))
        elif m and m["stem"] in _BIN_STEMS:
            out.append(Candidate(n, m["stem"], m["variant"], "bin", [n]))
    return out


def _choose(cands: list[Candidate], variant: str | None, where: str) -> Candidate:
    pool = cands
    if variant is not None:
        pool = [c for c in cands if c.variant == variant]
        if not pool:  # by stem or file name; a stem picks its checkpoint without variant
            pool = [c for c in cands if variant in c.names()]
            pool = [c for c in pool if c.variant is None and c.stem == variant] or pool
    # safetensors before .bin for the same stem and variant, as Hugging Face does
    safe = {(c.family, c.variant) for c in pool if c.kind == "safetensors"}
    pool = [c for c in pool if c.kind == "safetensors" or (c.family, c.variant) not in safe]
    if len(pool) == 1:
        return pool[0]
    listed = "; ".join(sorted(c.label for c in (pool or cands)))
    variants = sorted({c.variant for c in cands if c.variant})
    hint = (f"variant={variants[0]!r} picks a Hugging Face variant, " if variants else "") + \
        "variant='<stem or file name>' (e.g. " + repr((pool or cands)[0].stem) + ") picks one, or open a file path"
    if not pool:
        raise InvalidArgumentError(f"{where}: no checkpoint matches variant={variant!r}; the directory holds: "
                                   f"{listed}")
    raise CheckpointFormatError(f"{where}: the directory holds {len(pool)} checkpoints: {listed}; {hint}")


def _directory_format(store: Store, where: str, variant: str | None = None) -> Any:
    if store.exists(dcp.METADATA):
        if variant is not None:
            raise InvalidArgumentError(f"{where}: a DCP checkpoint (.metadata); variant={variant!r} applies to "
                                       "directories of Hugging Face style files")
        return dcp.DCPSource(store)
    from .formats import safetensors, torchfile

    names = _list(store, variant)
    weight_maps = {n: safetensors.read_index(store, n) for n in names if _INDEX.fullmatch(n)}
    cands = candidates(names, {f for wm in weight_maps.values() for f in wm.values()})
    if not cands:
        raise CheckpointFormatError(
            f"{where}: not a checkpoint directory (no .metadata, *.safetensors, *.safetensors.index[.variant].json,"
            " pytorch_model[.variant].bin[.index.json], adapter_model.* or diffusion_pytorch_model.*)"
        )
    c = _choose(cands, variant, where)
    if c.index is not None:
        return _index_format(store, c.index, weight_maps[c.index])
    if c.kind == "bin":
        return torchfile.TorchSaveSource(store, files=c.files)
    if c.shards:
        _complete(store, c)
    return safetensors.SafetensorsSource(store, files=c.files, shards=c.shards)


def _complete(store: Store, c: Candidate) -> None:
    """Every file of a ``-00001-of-0000N`` set is present."""
    m = _OF_SET.fullmatch(c.files[0])
    if m is None or _TORCH_SHARD.fullmatch(c.files[0]):
        return
    count = int(m["n"])
    have = {int(_OF_SET.fullmatch(f)["k"]) for f in c.files}  # type: ignore[index]
    missing = [f"{m['base']}-{k:05d}-of-{m['n']}.safetensors" for k in range(1, count + 1) if k not in have]
    extra = sorted(k for k in have if not 1 <= k <= count)
    if missing or extra:
        raise MissingDataError(f"{store.where(c.files[0])}: a set of {count} files without index, but "
                               + (f"{missing[:5]} {'is' if len(missing) == 1 else 'are'} missing" if missing
                                  else f"file numbers {extra[:5]} are outside 1..{count}"))


def _index_format(store: Store, name: str, weight_map: dict[str, str] | None = None) -> Any:
    from .formats import safetensors, torchfile

    if weight_map is None:
        weight_map = safetensors.read_index(store, name)  # read once, handed to the format
    files = sorted(set(weight_map.values()))
    if files and all(f.endswith(".safetensors") for f in files):
        return safetensors.SafetensorsSource(store, index=name, weight_map=weight_map)
    return torchfile.TorchSaveSource(store, index=name, weight_map=weight_map)


def _file_format(store: Store, name: str, where: str) -> Any:
    from .formats import safetensors, torchfile

    if name.endswith(".index.json") or _INDEX.fullmatch(name):
        return _index_format(store, name)
    if name.endswith(".safetensors"):
        return safetensors.SafetensorsSource(store, files=[name])
    return torchfile.TorchSaveSource(store, files=[name])
