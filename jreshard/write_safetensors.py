"""Write a pytree of (sharded) ``jax.Array``s as a Hugging Face safetensors checkpoint.

The layout is ``save_pretrained``'s: one ``model.safetensors`` when everything fits in one shard, else
``model-0000k-of-0000n.safetensors`` files and ``model.safetensors.index.json`` (``metadata.total_size`` and
``weight_map``). Tensors are assigned to files as ``huggingface_hub``'s ``split_torch_state_dict_into_shards``
does (in order; a new file when the next tensor would pass ``max_shard_size``; a tensor larger than it alone in
its file). Inside a file tensors are ordered by item size, largest first, then by name (as the ``safetensors``
library does), and the header is padded with spaces to a multiple of 8 bytes, so every tensor is aligned.

Memory stays bounded: every header is computed from shapes and dtypes first, each file is created at its final
size under a temporary name and memory-mapped, and each tensor is written shard by shard — one device shard
(``replica_id == 0``, so a replicated array is copied once) is copied to the host at a time and stored into its
box of the tensor's byte range. Files are renamed into place when complete; the index is written last.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from .dtypes import SAFETENSORS_DTYPES
from .errors import InvalidArgumentError, TargetMismatchError

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_SIZE = "50GB"  # transformers 5's save_pretrained default
_SIZE_UNITS = {"TB": 10**12, "GB": 10**9, "MB": 10**6, "KB": 10**3,
               "TIB": 2**40, "GIB": 2**30, "MIB": 2**20, "KIB": 2**10}
_SHARD_FILE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")

# numpy dtype -> safetensors dtype string, for the dtypes jreshard also reads back. C128 is left out: the
# safetensors library (0.8) has no such dtype, so its readers and transformers could not open the file.
_NAMES: dict[np.dtype, str] = {dt: name for name, dt in SAFETENSORS_DTYPES.items() if dt is not None and name != "C128"}


def safetensors_dtype_name(dtype: Any, where: str = "") -> str:
    """The safetensors spelling of a numpy / JAX dtype (``BF16``, ``F8_E4M3``, ...); InvalidArgumentError for
    dtypes safetensors has no name for (complex128, float8_e4m3fnuz, int4, PRNG keys ...).

    Example:
        >>> import ml_dtypes
        >>> safetensors_dtype_name(ml_dtypes.bfloat16), safetensors_dtype_name("float32")
        ('BF16', 'F32')
    """
    try:
        dt = np.dtype(dtype)
    except TypeError:
        dt = None
    name = _NAMES.get(dt) if dt is not None else None
    if name is None:
        known = ", ".join(sorted(str(d) for d in _NAMES))
        raise InvalidArgumentError(f"{where + ': ' if where else ''}dtype {dtype} has no safetensors name "
                                   f"(writable dtypes: {known}); cast it first")
    return name


def parse_size(size: int | str) -> int:
    """``max_shard_size`` in bytes: an int, or a string with a unit as Hugging Face writes it (``"5GB"`` is
    5 * 10**9 bytes; ``KB``, ``MB``, ``GB``, ``TB``, and the binary ``KiB`` ... ``TiB``).

    Example:
        >>> parse_size("5GB"), parse_size("2MiB"), parse_size(1000)
        (5000000000, 2097152, 1000)
    """
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        value = int(size)
    elif isinstance(size, str):
        text = size.strip()
        m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([KMGT]I?B)", text, flags=re.IGNORECASE)
        if not m:
            raise InvalidArgumentError(f"max_shard_size {size!r}: give bytes (int) or a number with a unit "
                                       "(KB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. '5GB'")
        value = int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])
    else:
        raise InvalidArgumentError(f"max_shard_size must be an int or a string like '5GB', not {type(size).__name__}")
    if value <= 0:
        raise InvalidArgumentError(f"max_shard_size must be positive, not {size!r}")
    return value


def named_arrays(tree: Any, what: str = "tree", skip_others: bool = False) -> dict[str, Any]:
    """``{dotted name: array}`` of a pytree's array leaves (``jax.Array`` or ``numpy.ndarray``; a flax nnx
    Variable is one leaf named by its path). Other leaves are refused (skipped with ``skip_others``). Names are the key paths joined with dots,
    as :func:`jreshard.load` names targets; empty and colliding names are refused.

    Example:
        >>> import numpy as np
        >>> sorted(named_arrays({"a": {"b": np.zeros(2)}, "c": [np.ones(1)]}))
        ['a.b', 'c.0']
    """
    import jax

    from .targets import _path_name, _variable_types

    variables = _variable_types()

    def is_leaf(x: Any) -> bool:
        return isinstance(x, (jax.Array, np.ndarray, np.generic)) or (bool(variables) and isinstance(x, variables))

    def walk(node: Any, prefix: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], Any]]:
        # dicts and lists in their own order (jax's flattening sorts dict keys; save_pretrained keeps order)
        if isinstance(node, dict) and not is_leaf(node):
            for k, v in node.items():
                yield from walk(v, (*prefix, str(k)))
        elif isinstance(node, (list, tuple)) and type(node) in (list, tuple):
            for i, v in enumerate(node):
                yield from walk(v, (*prefix, str(i)))
        elif is_leaf(node) or node is None:
            if node is not None:
                yield prefix, node
        else:
            flat, _ = jax.tree_util.tree_flatten_with_path(node, is_leaf=is_leaf)
            for path, leaf in flat:
                yield (*prefix, *(k for k in [_path_name(path)] if k)), leaf

    out: dict[str, Any] = {}
    for parts, leaf in walk(tree, ()):
        name = ".".join(parts)
        items = [(name, leaf)]
        if variables and isinstance(leaf, variables):
            inner, _ = jax.tree_util.tree_flatten_with_path(leaf.get_value(), is_leaf=is_leaf)
            items = [(f"{name}.{_path_name(sub)}" if sub else name, v) for sub, v in inner]
        for n, value in items:
            if isinstance(value, np.generic):
                value = np.asarray(value)
            if not isinstance(value, (jax.Array, np.ndarray)):
                if skip_others:
                    continue
                raise InvalidArgumentError(f"{what}: leaf {n!r} is a {type(value).__name__}, not a jax.Array or "
                                           "numpy array")
            if not n:
                raise InvalidArgumentError(f"{what}: an array has an empty name (a bare array, not a dict of them); "
                                           "give {name: array}")
            if n in out:
                raise InvalidArgumentError(f"{what}: two leaves are named {n!r} (nested keys are joined with dots)")
            out[n] = value
    return out


def _plan_files(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Tensor names per file, as huggingface_hub's ``split_state_dict_into_shards_factory`` assigns them."""
    files: list[list[str]] = []
    current: list[str] = []
    current_size = 0
    for name, size in sizes.items():
        if size > max_bytes:
            files.append([name])
            continue
        if current_size + size > max_bytes and current:
            files.append(current)
            current, current_size = [], 0
        current.append(name)
        current_size += size
    if current:
        files.append(current)
    return files or [[]]


def _header(entries: list[tuple[str, str, tuple[int, ...], int]], metadata: dict[str, str]
            ) -> tuple[bytes, dict[str, int]]:
    """The header bytes (8-byte length + JSON padded to a multiple of 8) and each tensor's offset in the data
    section. ``entries``: (name, dtype name, shape, nbytes), in file order."""
    doc: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offsets: dict[str, int] = {}
    pos = 0
    for name, dtype, shape, nbytes in entries:
        doc[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        offsets[name] = pos
        pos += nbytes
    raw = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw, offsets


def _shards(value: Any, name: str) -> Iterator[tuple[tuple[slice, ...], Any]]:
    """(index, host array) of the pieces that tile ``value`` once, one host copy at a time."""
    import jax

    if isinstance(value, np.ndarray):
        yield tuple(slice(None) for _ in value.shape), value
        return
    assert isinstance(value, jax.Array)
    if not value.is_fully_addressable:
        raise InvalidArgumentError(
            f"array {name!r} is not fully addressable from process {jax.process_index()} (it spans several "
            "processes); save_safetensors writes from one process: gather it first, e.g. "
            "jax.experimental.multihost_utils.process_allgather(x, tiled=True), or reshard it onto this "
            "process's devices")
    for shard in value.addressable_shards:
        if shard.replica_id == 0:
            yield shard.index, np.asarray(shard.data)


def _box(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape))


def _write_file(path: str, header: bytes, offsets: dict[str, int], arrays: dict[str, Any],
                sizes: dict[str, int]) -> None:
    """Create ``path`` at its final size, write the header, then every tensor shard by shard through a memory
    map (each tensor's pages flushed once it is written)."""
    data_start = len(header)
    total = data_start + sum(sizes[n] for n in offsets)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, total)
        os.pwrite(fd, header, 0)
        if total > data_start:
            mm = mmap.mmap(fd, total)
            try:
                for name, off in offsets.items():
                    if sizes[name]:
                        _write_tensor(mm, data_start + off, arrays[name], name)
                mm.flush()
            finally:
                mm.close()
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_tensor(mm: mmap.mmap, begin: int, value: Any, name: str) -> None:
    shape = tuple(int(s) for s in value.shape)
    dtype = np.dtype(value.dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.dtype(f"u{dtype.itemsize}") if dtype.itemsize in (1, 2, 4, 8) else np.dtype((np.void, dtype.itemsize))
    dest = np.frombuffer(mm, dtype=np.uint8, count=nbytes, offset=begin).view(raw).reshape(shape or (1,))
    try:
        for index, host in _shards(value, name):
            host = np.asarray(host)
            if host.dtype != dtype:
                raise TargetMismatchError(f"array {name!r}: a shard holds {host.dtype}, not {dtype}")
            src = host.reshape(host.shape or (1,)).view(raw)
            if shape:
                dest[_box(index, shape)] = src
            else:
                dest[...] = src
            del host, src
    finally:
        del dest
    page = mmap.ALLOCATIONGRANULARITY
    start = begin - begin % page
    mm.flush(start, begin + nbytes - start)


def save_safetensors(tree: Any, path: str | os.PathLike, *, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                     metadata: Mapping[str, str] | None = None, mapping: Any = None,
                     saved_like: Any = None) -> list[str]:
    """Write the arrays of ``tree`` into directory ``path`` as a Hugging Face safetensors checkpoint, readable
    by transformers' ``from_pretrained``, ``safetensors.torch.load_file`` / ``safetensors.numpy.load_file``
    and :func:`jreshard.open`. Returns the names of the files written (the index last, when there is one).

    ``tree`` is a pytree (nested dicts, lists, a flax nnx state ...) of ``jax.Array`` (sharded any way) or
    ``numpy.ndarray`` (or numpy scalar); tensor names are the key paths joined with dots (``{"model": {"norm": {"weight": x}}}``
    is ``model.norm.weight``). Give torch's names and layouts (:func:`jreshard.invert` turns a model loaded
    with a mapping back into them). Everything in one file: ``model.safetensors``; otherwise (the tensors'
    bytes above ``max_shard_size``, an int or a string like ``"5GB"``, ``"500MB"``, ``"2GiB"``)
    ``model-0000k-of-0000n.safetensors`` and ``model.safetensors.index.json``, split in tree order as
    ``save_pretrained`` does (a tensor larger than the limit has a file of its own). ``metadata`` (str to
    str) goes into every file's ``__metadata__``, with ``"format": "pt"`` unless it sets ``format``
    (transformers refuses files without a known format).

    Each array is written from its addressable device shards, one shard's host copy at a time (a replicated
    array once); no tensor and no file is ever assembled in host memory. Files are written under temporary
    names and renamed when complete; the index is written last. Files of an earlier save in ``path``
    (``model.safetensors``, ``model-*-of-*.safetensors``, the index) that this save does not replace are
    removed afterwards, as ``save_pretrained`` does.

    Multi-process runs: only process 0 writes (other processes return ``[]`` at once); every array must be
    fully addressable on process 0 — an array spread over several processes raises InvalidArgumentError
    (gather it first with ``jax.experimental.multihost_utils.process_allgather``).

    Raises InvalidArgumentError for a dtype safetensors cannot name (complex128, PRNG keys, float8 ``fnuz``
    types, int4), empty or colliding names, leaves that are not arrays, non-str metadata, a bad
    ``max_shard_size``.

    Example:
        >>> import tempfile, numpy as np, jax.numpy as jnp, jreshard
        >>> from jreshard import save_safetensors
        >>> d = tempfile.mkdtemp()
        >>> save_safetensors({"model": {"w": jnp.arange(6.0).reshape(2, 3)}, "b": np.ones(3, np.int32)}, d)
        ['model.safetensors']
        >>> with jreshard.open(d) as ckpt:
        ...     ckpt.read("model.w").tolist()
        [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
    """
    import jax

    if mapping is not None:
        from .inverse import invert

        tree = invert(tree, mapping, saved_like=saved_like)
    max_bytes = parse_size(max_shard_size)
    meta = {"format": "pt"}
    if metadata is not None:
        if not isinstance(metadata, Mapping) or not all(isinstance(k, str) and isinstance(v, str)
                                                          for k, v in metadata.items()):
            raise InvalidArgumentError("metadata must be a dict of str to str (safetensors' __metadata__)")
        meta.update(metadata)
    arrays = named_arrays(tree)
    if "__metadata__" in arrays:
        raise InvalidArgumentError("the tensor name '__metadata__' is reserved by safetensors")
    dtypes = {n: safetensors_dtype_name(a.dtype, f"array {n!r}") for n, a in arrays.items()}
    shapes = {n: tuple(int(s) for s in a.shape) for n, a in arrays.items()}
    sizes = {n: math.prod(shapes[n]) * np.dtype(a.dtype).itemsize for n, a in arrays.items()}
    for n, a in arrays.items():  # refuse before anything is written
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            next(_shards(a, n))
    if jax.process_index() != 0:
        return []
    directory = os.fspath(path)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise InvalidArgumentError(f"{directory}: exists and is not a directory (save_safetensors writes a "
                                   "directory)")
    os.makedirs(directory, exist_ok=True)

    groups = _plan_files(sizes, max_bytes)
    n_files = len(groups)
    names = [WEIGHTS_NAME] if n_files == 1 else [f"model-{i + 1:05d}-of-{n_files:05d}.safetensors"
                                                  for i in range(n_files)]
    tag = f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    written: list[str] = []
    temps: list[str] = []
    try:
        for fname, group in zip(names, groups):
            order = sorted(group, key=lambda n: (-np.dtype(arrays[n].dtype).itemsize, n))
            header, offsets = _header([(n, dtypes[n], shapes[n], sizes[n]) for n in order], meta)
            tmp = os.path.join(directory, "." + fname + tag)
            temps.append(tmp)
            _write_file(tmp, header, offsets, arrays, sizes)
        for fname, tmp in zip(names, temps):
            os.replace(tmp, os.path.join(directory, fname))
            written.append(fname)
        temps = []
        if n_files > 1:
            index = {"metadata": {"total_size": sum(sizes.values())},
                     "weight_map": {n: fname for fname, group in zip(names, groups) for n in group}}
            tmp = os.path.join(directory, "." + INDEX_NAME + tag)
            temps.append(tmp)
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, os.path.join(directory, INDEX_NAME))
            temps = []
            written.append(INDEX_NAME)
    finally:
        for tmp in temps:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
    for fname in os.listdir(directory):
        stale = fname not in written and (fname == WEIGHTS_NAME or fname == INDEX_NAME or _SHARD_FILE.fullmatch(fname))
        if stale and os.path.isfile(os.path.join(directory, fname)):
            os.unlink(os.path.join(directory, fname))
    return written


__all__ = ["named_arrays", "parse_size", "safetensors_dtype_name", "save_safetensors"]
