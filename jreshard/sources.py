"""Which format a source is, and the store its files are read from."""

from __future__ import annotations

import os
from typing import Any

from .errors import CheckpointFormatError, MissingDataError
from .formats import dcp
from .gate import decoding
from .storage import Store, is_local, local_path, parent_and_name, store_for_directory


def open_source(source: str, io: str = "auto", storage_options: dict[str, Any] | None = None) -> tuple[Any, Store]:
    """(format object, store) for a path or URL. The format object has ``tensors``, ``object_refs``,
    ``locate_many`` and ``read_objects``."""
    with decoding(source):
        return _open_source(source, io, storage_options)


def _open_source(source: str, io: str, storage_options: dict[str, Any] | None) -> tuple[Any, Store]:
    if is_local(source):
        path = local_path(source)
        if not os.path.exists(path):
            raise MissingDataError(f"{path}: no such file or directory")
        if os.path.isdir(path):
            store = store_for_directory(path, io, storage_options)
            return _directory_format(store, path), store
        parent, name = parent_and_name(path)
        store = store_for_directory(parent, io, storage_options)
        return _file_format(store, name, path), store
    # A URL: a directory when it ends with "/" or has no file extension.
    last = source.rstrip("/").rsplit("/", 1)[-1]
    if source.endswith("/") or "." not in last:
        store = store_for_directory(source.rstrip("/") + "/", io, storage_options)
        return _directory_format(store, source), store
    parent, name = parent_and_name(source)
    store = store_for_directory(parent + "/", io, storage_options)
    return _file_format(store, name, source), store


def _directory_format(store: Store, where: str) -> Any:
    if store.exists(dcp.METADATA):
        return dcp.DCPSource(store)
    from .formats import safetensors, torchfile

    for index in ("model.safetensors.index.json",):
        if store.exists(index):
            return safetensors.SafetensorsSource(store, index=index)
    if store.exists("model.safetensors"):
        return safetensors.SafetensorsSource(store, files=["model.safetensors"])
    for index in ("pytorch_model.bin.index.json",):
        if store.exists(index):
            return torchfile.TorchSaveSource(store, index=index)
    if store.exists("pytorch_model.bin"):
        return torchfile.TorchSaveSource(store, files=["pytorch_model.bin"])
    raise CheckpointFormatError(
        f"{where}: not a checkpoint directory (no .metadata, model.safetensors[.index.json] or "
        "pytorch_model.bin[.index.json])"
    )


def _file_format(store: Store, name: str, where: str) -> Any:
    from .formats import safetensors, torchfile

    if name.endswith(".index.json"):
        weight_map = safetensors.read_index(store, name)  # read once, handed to the format
        files = sorted(set(weight_map.values()))
        if files and all(f.endswith(".safetensors") for f in files):
            return safetensors.SafetensorsSource(store, index=name, weight_map=weight_map)
        return torchfile.TorchSaveSource(store, index=name, weight_map=weight_map)
    if name.endswith(".safetensors"):
        return safetensors.SafetensorsSource(store, files=[name])
    return torchfile.TorchSaveSource(store, files=[name])
