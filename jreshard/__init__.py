"""jreshard: PyTorch checkpoints onto JAX device meshes, torch-free, reading only the bytes each device needs.

The public surface: :func:`open`, :func:`load`, :func:`plan`, :class:`Checkpoint` and the error types in
:mod:`jreshard.errors`.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from . import errors
from .catalog import Chunk, Locator, TensorInfo
from .checkpoint import Checkpoint
from .gcpause import gc_paused
from .errors import (CheckpointClosedError, CheckpointFormatError, InconsistentCheckpointError, InvalidArgumentError,
                     JReshardError, MissingDataError, OutOfMemoryError, ShardingError, StorageError, TargetMismatchError,
                     TruncatedDataError, UnsafeCheckpointError)
from .planning import Plan, ProcessPlan
from .sources import open_source
from .storage import IOStats
from .layout import Replicate, Shard, StridedShard, TorchLayout, torch_layout
from .renames import rename
from .rules import ALL_TENSORS as _ALL_TENSORS
from .rules import parse_rules, target_for
from .views import View, concat, saved, stack
from .inverse import invert
from .write_dcp import save_dcp
from .write_orbax import ConvertError, convert
from .write_safetensors import save_safetensors

__version__ = "0.1.0"

_builtin_open = open


def open(source: str | os.PathLike, *, io: str = "auto", storage_options: dict[str, Any] | None = None,  # noqa: A001
         variant: str | None = None) -> Checkpoint:
    """Open a checkpoint: a DCP directory (``.metadata`` + ``.distcp``), a ``.safetensors`` file or a directory
    of them with its index, a ``torch.save`` archive (``.pt``, ``.pth``, ``.bin``) or its sharded index, by
    path or URL (``file://``, ``gs://``, ``s3://``, ``http(s)://``).

    Only metadata is read. ``io`` picks the read back-end: ``"auto"`` (preadv for local files, tensorstore
    otherwise), ``"posix"`` or ``"tensorstore"``. ``storage_options`` are merged into the tensorstore KvStore
    spec (e.g. ``{"endpoint": "http://127.0.0.1:9000"}`` for an S3-compatible server).

    A directory is recognised by its files: Hugging Face's conventions (any ``*.safetensors.index.json`` or
    ``*.bin.index.json``, variants such as ``model.fp16.safetensors``, diffusers' and PEFT's file names), sets
    of safetensors files without an index, and torch's ``HuggingFaceStorageWriter`` shards (see
    :mod:`jreshard.sources`). Where it holds several checkpoints (a model and an adapter, fp32 and fp16
    variants) the error lists them and ``variant`` picks one: a Hugging Face variant (``"fp16"``) or a stem or
    file name (``"adapter_model"``).

    Example:
        >>> import jreshard
        >>> ckpt = jreshard.open(jreshard.sample_path())
        >>> ckpt.tensors["model.embed.weight"].shape
        (64, 32)
        >>> ckpt.objects["step"]
        100
    """
    if io not in ("auto", "posix", "tensorstore"):
        raise InvalidArgumentError(f"io must be 'auto', 'posix' or 'tensorstore', not {io!r}")
    fmt, store = open_source(os.fspath(source), io=io, storage_options=storage_options, variant=variant)
    return Checkpoint(source, fmt, store, io)


def load(source: str | os.PathLike | Checkpoint, target: Any = _ALL_TENSORS, *, mapping: Any = None,
         max_inflight_bytes: int | None = None, progress: bool | Callable[[dict[str, Any]], None] = False,
         io: str = "auto", coalesce_gap: int = 256, storage_options: dict[str, Any] | None = None,
         mesh: Any = None, cast: str = "safe", rules: Any = None, variant: str | None = None) -> Any:
    """Load the tensors named by ``target`` onto their shardings, or, without ``target``, every saved tensor
    onto ``mesh``.

    ``target`` is a pytree whose leaves are ``jax.ShapeDtypeStruct(shape, dtype, sharding=...)`` or
    ``jax.Array`` (whose shape, dtype and sharding are taken), or a flax nnx state (abstract or not; its
    abstract meshes resolve against ``mesh`` or the mesh set by ``jax.set_mesh``). Leaf names are the pytree
    paths joined with dots, so a flat dict keyed by DCP names (``"model.layers.0.w"``) and the nested dict
    ``{"model": {"layers": {"0": {"w": ...}}}}`` both work. A leaf that is not an array spec but names a saved
    object (``"step"``) is replaced by that object. Returns the same structure with ``jax.Array``s.

    ``mapping`` maps target names to what they are read from: a saved name, or a view
    (:func:`jreshard.saved` with ``.T``, ``.reshape``, indexing, ``.astype``, :func:`jreshard.stack`,
    :func:`jreshard.concat`), as a flat dict or a pytree shaped like the target. A view's shape and dtype must
    equal the target's. Targets absent from it are read from the saved tensor of the same name, and there a
    target dtype different from the saved one is a cast, done per shard: by default (``cast="safe"``) only a
    cast that keeps every value (``np.can_cast(saved, target, "safe")``; bfloat16 to float32 but not float32 to
    bfloat16), with ``cast="unsafe"`` any (float to int, wider to narrower ...); an explicit ``.astype`` in the
    mapping is always allowed. Every shard is traced back through its view, so each process reads only the saved
    bytes its devices' shards need.

    Every process reads only the saved bytes that overlap the shards of its own devices; a shard shared by
    several local devices is read once. ``max_inflight_bytes`` bounds the host memory of shards read but not
    yet placed (default 2 GiB); ``progress=True`` prints progress to stderr, or give a callable that receives
    a dict of counters. ``coalesce_gap`` merges reads whose gap is at most that many bytes.

    Without ``target`` (omitted, not None: an explicit None or ``{}`` is an error), every saved tensor is
    loaded, with its saved dtype, onto ``mesh`` (required then, or set by ``jax.set_mesh``), each with the
    ``PartitionSpec`` of the first of ``rules`` whose pattern is found in its name (:func:`target_for`;
    ``rules=None`` shards dim ``i`` over mesh axis ``i`` where it divides), into a flat dict keyed by saved
    name. Saved objects (``step`` ...) are not included: read them from ``ckpt.objects``. ``rules`` with a
    ``target`` is an error. ``variant`` picks a checkpoint of a directory that holds several, as in :func:`open`.

    Example:
        >>> import jax, numpy as np, jreshard
        >>> from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        >>> mesh = Mesh(np.array(jax.devices()[:1]), ("x",))
        >>> ckpt = jreshard.open(jreshard.sample_path())
        >>> t = ckpt.tensors["model.embed.weight"]
        >>> out = jreshard.load(ckpt, {t.name: jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=NamedSharding(mesh, P("x")))})
        >>> out[t.name].shape
        (64, 32)
        >>> everything = jreshard.load(ckpt, mesh=mesh, rules={r"\\.weight$": "x"})
        >>> len(everything) == len(ckpt.tensors), everything[t.name].sharding.spec
        (True, P('x',))
    """
    # One pause of the cyclic collector over the open and the load: resumed between them, it would first
    # rescan every object the open made.
    with gc_paused():
        ckpt = source if isinstance(source, Checkpoint) else open(source, io=io, storage_options=storage_options,
                                                                  variant=variant)
        try:
            return ckpt.load(target, mapping=mapping, max_inflight_bytes=max_inflight_bytes, progress=progress,
                             coalesce_gap=coalesce_gap, mesh=mesh, cast=cast, rules=rules)
        finally:
            if ckpt is not source:
                ckpt.close()


def plan(source: str | os.PathLike | Checkpoint, target: Any = _ALL_TENSORS, *, mapping: Any = None,
         max_inflight_bytes: int | None = None, io: str = "auto", coalesce_gap: int = 256,
         storage_options: dict[str, Any] | None = None, mesh: Any = None, cast: str = "safe",
         rules: Any = None, variant: str | None = None, process_index: int | str | list[int] | None = None,
         devices_per_process: int | None = None) -> Plan:
    """The program :func:`load` runs (same arguments), without reading tensor bytes: bytes the process's shards
    need, bytes and requests it reads (after merging ranges, in the batches ``max_inflight_bytes`` makes), in
    all and per target. For this process it is built by the same function ``load`` uses, so the report is
    what runs. ``print(plan)`` shows a table. Without ``target``, every saved tensor onto ``mesh`` by
    ``rules``, as in :func:`load`.

    ``process_index``: None (default) plans this process only, at a cost in proportion to the saved chunks its
    devices' shards touch; ``k`` plans process ``k``'s share; ``"all"`` (or a list) plans every process the
    target spans one after the other, keeping each one's figures in ``plan.processes`` (memory: one process's
    plan). To plan a mesh whose devices are not here (host 137 of a 256-host job, from a laptop), give the
    target over a ``jax.sharding.AbstractMesh`` (``NamedSharding(AbstractMesh(sizes, names), spec)``, or
    ``mesh=`` an AbstractMesh without a target, or :func:`target_for` over one) and ``devices_per_process``:
    process ``k`` holds the devices ``k * devices_per_process`` to ``(k + 1) * devices_per_process - 1`` of
    the mesh, counted in row-major order over its axes.

    Example:
        >>> import jax, jreshard
        >>> from jax.sharding import SingleDeviceSharding
        >>> ckpt = jreshard.open(jreshard.sample_path())
        >>> t = ckpt.tensors["model.embed.weight"]
        >>> p = jreshard.plan(ckpt, {t.name: jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=SingleDeviceSharding(jax.devices()[0]))})
        >>> p.bytes_to_read >= p.bytes_needed
        True
        >>> from jax.sharding import AbstractMesh
        >>> mesh = AbstractMesh((16, 16), ("data", "model"))  # 256 devices, 8 per host: 32 hosts
        >>> p = jreshard.plan(ckpt, mesh=mesh, devices_per_process=8, process_index=27)
        >>> sorted(p.processes), p.process, p.bytes_needed > 0
        ([27], 27, True)
        >>> len(jreshard.plan(ckpt, mesh=mesh, devices_per_process=8, process_index="all").processes)
        32
    """
    ckpt = source if isinstance(source, Checkpoint) else open(source, io=io, storage_options=storage_options,
                                                              variant=variant)
    try:
        return ckpt.plan(target, mapping=mapping, max_inflight_bytes=max_inflight_bytes, coalesce_gap=coalesce_gap,
                         mesh=mesh, cast=cast, rules=rules, process_index=process_index,
                         devices_per_process=devices_per_process)
    finally:
        if ckpt is not source:
            ckpt.close()


def sample_path() -> str:
    """The path of the small DCP checkpoint bundled with jreshard (written by torch with 4 ranks).

    Example:
        >>> import os, jreshard
        >>> os.path.exists(os.path.join(jreshard.sample_path(), ".metadata"))
        True
    """
    return os.path.join(os.path.dirname(__file__), "sample", "dcp")


__all__ = [
    "open", "load", "plan", "sample_path", "Checkpoint", "Plan", "ProcessPlan", "TensorInfo", "Chunk", "Locator",
    "IOStats", "errors", "JReshardError", "UnsafeCheckpointError", "CheckpointFormatError", "MissingDataError",
    "TruncatedDataError", "InconsistentCheckpointError", "TargetMismatchError", "ShardingError", "StorageError",
    "CheckpointClosedError", "InvalidArgumentError", "OutOfMemoryError", "View", "saved", "stack", "concat",
    "rename", "torch_layout", "TorchLayout", "Shard", "Replicate", "StridedShard", "invert", "save_safetensors",
    "save_dcp", "convert", "ConvertError", "target_for", "parse_rules",
]
