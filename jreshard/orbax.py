"""Orbax (v0 API) hooks: restore PyTorch checkpoints through ``ocp.Checkpointer`` and ``ocp.CheckpointManager``.

Importing this module imports ``orbax.checkpoint`` (``import jreshard`` alone does not). It provides:

* :class:`TorchCheckpointHandler`, an ``ocp.CheckpointHandler`` whose ``restore`` is :func:`jreshard.load` (each
  process reads only the saved bytes of its own shards) and whose ``metadata`` lists the saved tensors;
* :class:`TorchRestore`, its restore arguments (registered with ``ocp.args.register_with_handler``);
* :class:`TorchStepNameFormat`, an ``ocp.step.NameFormat`` for step directories named as torch trainers name them
  (torchtitan's ``step-1000``);
* :class:`TorchCheckpointManager`, a read-only ``ocp.CheckpointManager`` for step directories that hold the
  checkpoint files directly (torchtitan's layout), which a plain ``CheckpointManager`` cannot read because it
  always looks for one sub-directory per item.

Saving is not done through Orbax: :meth:`TorchCheckpointHandler.save` raises :class:`SaveNotSupportedError`.

Orbax's v1 API (``ocp.v1``) has no registration point for foreign layouts; call :func:`jreshard.load` directly
with the abstract tree there. See ``docs/orbax.md``.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterator, Mapping
from typing import Any

import orbax.checkpoint as ocp
from etils import epath

from .errors import InvalidArgumentError, JReshardError, MissingDataError

__all__ = [
    "SaveNotSupportedError",
    "TorchCheckpointHandler",
    "TorchCheckpointManager",
    "TorchRestore",
    "TorchStepNameFormat",
]


class SaveNotSupportedError(JReshardError, NotImplementedError):
    """Saving through the jreshard Orbax hooks was asked for; jreshard only restores (save with torch, or with
    Orbax's own handlers, e.g. ``ocp.StandardCheckpointer``)."""


def _source(directory: epath.PathLike) -> str:
    return os.fspath(directory)


class TorchCheckpointHandler(ocp.CheckpointHandler):
    """An ``ocp.CheckpointHandler`` that restores a PyTorch checkpoint (a DCP directory, safetensors, a
    ``torch.save`` archive: whatever :func:`jreshard.open` reads) onto the shardings of an abstract tree.

    ``restore(directory, args=TorchRestore(target, ...))`` is :func:`jreshard.load` of ``directory``: the result
    has the structure of ``target`` and every process reads only the saved bytes its devices' shards need.
    ``metadata(directory)`` is a flat dict ``{saved tensor name: jax.ShapeDtypeStruct(shape, dtype)}`` (no
    sharding). ``save`` raises :class:`SaveNotSupportedError`.

    ``io`` and ``storage_options`` are passed to :func:`jreshard.open` (``storage_options`` of a
    :class:`TorchRestore` take precedence for that restore); ``progress`` to :func:`jreshard.load`.

    Example:
        >>> import jax, numpy as np, jreshard
        >>> import orbax.checkpoint as ocp
        >>> from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        >>> from jreshard.orbax import TorchCheckpointHandler, TorchRestore
        >>> mesh = Mesh(np.array(jax.devices()[:1]), ("x",))
        >>> meta = TorchCheckpointHandler().metadata(jreshard.sample_path())
        >>> abstract = {"model.embed.weight": meta["model.embed.weight"].update(sharding=NamedSharding(mesh, P("x")))}
        >>> out = ocp.Checkpointer(TorchCheckpointHandler()).restore(jreshard.sample_path(), args=TorchRestore(abstract))
        >>> out["model.embed.weight"].shape
        (64, 32)
    """

    def __init__(self, *, io: str = "auto", storage_options: dict[str, Any] | None = None,
                 progress: Any = False) -> None:
        self.io = io
        self.storage_options = storage_options
        self.progress = progress

    def save(self, directory: epath.Path, *args: Any, **kwargs: Any) -> None:
        """Always raises :class:`SaveNotSupportedError`: jreshard restores PyTorch checkpoints, it does not write
        them through Orbax."""
        raise SaveNotSupportedError(
            f"{directory}: jreshard.orbax.TorchCheckpointHandler only restores PyTorch checkpoints; save with "
            "torch (torch.distributed.checkpoint) or with an Orbax handler (e.g. ocp.StandardCheckpointer)")

    def restore(self, directory: epath.Path, args: TorchRestore | None = None) -> Any:
        """:func:`jreshard.load` of ``directory`` onto ``args.target`` (see :class:`TorchRestore`).

        Example:
            >>> import jax, jreshard
            >>> from jax.sharding import SingleDeviceSharding
            >>> from jreshard.orbax import TorchCheckpointHandler, TorchRestore
            >>> s = SingleDeviceSharding(jax.devices()[0])
            >>> t = {"model.head.bias": jax.ShapeDtypeStruct((10,), "float32", sharding=s)}
            >>> TorchCheckpointHandler().restore(jreshard.sample_path(), TorchRestore(t))["model.head.bias"].shape
            (10,)
        """
        from . import load

        if args is None or args.target is None:
            raise InvalidArgumentError(
                f"{directory}: restoring a PyTorch checkpoint needs a target: pass "
                "args=jreshard.orbax.TorchRestore(abstract_tree), whose leaves are jax.ShapeDtypeStruct with "
                "shardings (TorchCheckpointHandler().metadata(path) lists the saved tensors)")
        if not isinstance(args, TorchRestore):
            raise InvalidArgumentError(f"{directory}: expected jreshard.orbax.TorchRestore args, "
                                       f"not {type(args).__name__}")
        storage_options = args.storage_options if args.storage_options is not None else self.storage_options
        return load(_source(directory), args.target, mapping=args.mapping, max_inflight_bytes=args.max_inflight_bytes,
                    progress=self.progress, io=self.io, storage_options=storage_options, mesh=args.mesh,
                    cast=args.cast)

    def metadata(self, directory: epath.Path) -> dict[str, Any]:
        """The saved tensors: ``{name: jax.ShapeDtypeStruct(shape, dtype)}`` (no sharding; add one with
        ``.update(sharding=...)`` to make a restore target). Only the checkpoint's metadata is read.

        Example:
            >>> import jreshard
            >>> from jreshard.orbax import TorchCheckpointHandler
            >>> TorchCheckpointHandler().metadata(jreshard.sample_path())["model.embed.weight"].shape
            (64, 32)
        """
        import jax

        from . import open as _open

        with _open(_source(directory), io=self.io, storage_options=self.storage_options) as ckpt:
            return {name: jax.ShapeDtypeStruct(info.shape, info.dtype) for name, info in ckpt.tensors.items()}


@ocp.args.register_with_handler(TorchCheckpointHandler, for_restore=True)
@dataclasses.dataclass
class TorchRestore(ocp.args.CheckpointArgs):
    """Restore arguments of :class:`TorchCheckpointHandler`: those of :func:`jreshard.load`.

    ``target``: a pytree of ``jax.ShapeDtypeStruct(shape, dtype, sharding=...)`` (or ``jax.Array``, or a flax
    nnx state); leaf names are the pytree paths joined with dots (a flat dict keyed by saved names works).
    ``mapping``: target names to saved names or views (``jreshard.saved(name).T`` ...). ``max_inflight_bytes``
    bounds host memory; ``storage_options`` are merged into the tensorstore KvStore spec; ``mesh`` resolves
    abstract meshes of a flax nnx state; ``cast="unsafe"`` allows implicit casts that can change values.

    Example:
        >>> import jax, jreshard, orbax.checkpoint as ocp
        >>> from jax.sharding import SingleDeviceSharding
        >>> from jreshard.orbax import TorchCheckpointHandler, TorchRestore
        >>> s = SingleDeviceSharding(jax.devices()[0])
        >>> args = TorchRestore({"wT": jax.ShapeDtypeStruct((32, 64), "float32", sharding=s)},
        ...                     mapping={"wT": jreshard.saved("model.embed.weight").T.astype("float32")})
        >>> ocp.Checkpointer(TorchCheckpointHandler()).restore(jreshard.sample_path(), args=args)["wT"].shape
        (32, 64)
    """

    target: Any = None
    mapping: Any = None
    max_inflight_bytes: int | None = None
    storage_options: dict[str, Any] | None = None
    mesh: Any = None
    cast: str = "safe"


# Orbax looks up a save-args class for every handler it is given (``ocp.args.get_registered_args_cls`` raises
# without one: positional ``Checkpointer.restore(path, tree)`` and CheckpointManager item handlers need it).
# This one only exists for that lookup; saving with it raises SaveNotSupportedError.
@ocp.args.register_with_handler(TorchCheckpointHandler, for_save=True)
@dataclasses.dataclass
class _TorchSaveUnsupported(ocp.args.CheckpointArgs):
    pass


@dataclasses.dataclass(frozen=True)
class TorchStepNameFormat(ocp.step.NameFormat[ocp.step.Metadata]):
    """An ``ocp.step.NameFormat`` for step directories named ``<prefix><separator><step>``, as torch trainers
    name them (torchtitan: ``step-1000``; ``fixed_length`` zero-pads, e.g. ``step-0001000``). Orbax's
    ``ocp.step.standard_name_format(step_prefix="step")`` always puts an underscore (``step_1000``).

    A step counts as committed when its directory holds ``marker`` (DCP writes ``.metadata`` last), directly or
    in an item sub-directory; ``marker=None`` accepts every matching directory (e.g. safetensors steps).

    Example:
        >>> import orbax.checkpoint as ocp
        >>> from jreshard.orbax import TorchStepNameFormat
        >>> TorchStepNameFormat().build_name(1000)
        'step-1000'
        >>> opts = ocp.CheckpointManagerOptions(step_name_format=TorchStepNameFormat(), read_only=True)
    """

    prefix: str = "step"
    separator: str = "-"
    fixed_length: int | None = None
    marker: str | None = ".metadata"

    def __str__(self) -> str:
        return f'TorchStepNameFormat("{self.build_name(1234)}")'

    def build_name(self, step: int) -> str:
        """The directory name of ``step``."""
        digits = f"{step:0{self.fixed_length}d}" if self.fixed_length else str(step)
        return f"{self.prefix}{self.separator}{digits}"

    def _step_of(self, name: str) -> int | None:
        m = re.fullmatch(re.escape(self.prefix + self.separator) + r"(\d+)", name)
        if m is None:
            return None
        if self.fixed_length and len(m.group(1)) < self.fixed_length:
            return None
        return int(m.group(1))

    def _committed(self, path: epath.Path) -> bool:
        if not path.is_dir():
            return False
        if self.marker is None:
            return True
        if (path / self.marker).exists():
            return True
        return any(child.is_dir() and (child / self.marker).exists() for child in path.iterdir())

    def _metadata(self, path: epath.Path) -> ocp.step.Metadata | None:
        step = self._step_of(path.name)
        if step is None or not self._committed(path):
            return None
        return ocp.step.Metadata(step=step, path=path)

    def find_all(self, base_path: epath.PathLike) -> Iterator[ocp.step.Metadata]:
        """Metadata (step, path) of every committed step directory under ``base_path``."""
        base = epath.Path(base_path)
        if not base.is_dir():
            return iter([])
        return ocp.step.build_step_metadatas(list(base.iterdir()), self._metadata)

    def find_step(self, base_path: epath.PathLike, step: int) -> ocp.step.Metadata:
        """Metadata of committed ``step`` under ``base_path``; raises ValueError (as Orbax expects) if none."""
        base = epath.Path(base_path)
        meta = self._metadata(base / self.build_name(step)) if base.is_dir() else None
        if meta is None and base.is_dir():  # another zero padding of the same number
            meta = next((m for m in self.find_all(base) if m.step == step), None)
        if meta is None:
            raise ValueError(f"No committed step {step} ({self.build_name(step)!r}, {self}) under {base}")
        return meta


class TorchCheckpointManager(ocp.CheckpointManager):
    """A read-only ``ocp.CheckpointManager`` over step directories that hold a PyTorch checkpoint directly
    (torchtitan's ``<root>/step-1000/.metadata``, ``__0_0.distcp`` ...: no item sub-directory, which a plain
    ``CheckpointManager`` always looks for).

    Steps are found with ``step_name_format`` (default :class:`TorchStepNameFormat`: ``step-<n>``);
    ``all_steps()``, ``latest_step()`` and ``reload()`` are Orbax's. ``restore(step, args=TorchRestore(...))``
    restores that step (the latest when ``step`` is None) with ``handler``; ``item_metadata(step)`` is the
    handler's :meth:`~TorchCheckpointHandler.metadata`. The manager is always read-only (it never deletes or
    writes steps); ``options`` other than the name format and ``read_only`` are passed to Orbax.

    Example:
        >>> import jax, jreshard, os, tempfile
        >>> from jax.sharding import SingleDeviceSharding
        >>> from jreshard.orbax import TorchCheckpointManager, TorchRestore
        >>> root = tempfile.mkdtemp(); os.symlink(jreshard.sample_path(), os.path.join(root, "step-100"))
        >>> mngr = TorchCheckpointManager(root)
        >>> mngr.latest_step()
        100
        >>> t = {"model.head.bias": jax.ShapeDtypeStruct((10,), "float32", sharding=SingleDeviceSharding(jax.devices()[0]))}
        >>> mngr.restore(100, args=TorchRestore(t))["model.head.bias"].shape
        (10,)
        >>> import shutil; shutil.rmtree(root)
    """

    def __init__(self, directory: epath.PathLike, *, step_name_format: ocp.step.NameFormat | None = None,
                 handler: TorchCheckpointHandler | None = None,
                 options: ocp.CheckpointManagerOptions | None = None) -> None:
        fmt = step_name_format or (options.step_name_format if options is not None else None) or TorchStepNameFormat()
        options = dataclasses.replace(options or ocp.CheckpointManagerOptions(), step_name_format=fmt,
                                      read_only=True, create=False)
        self._torch_handler = handler or TorchCheckpointHandler()
        self._torch_name_format = fmt
        super().__init__(directory, item_handlers=self._torch_handler, options=options)

    def _torch_step_dir(self, step: int | None, directory: epath.PathLike | None) -> tuple[int, epath.Path]:
        root = epath.Path(directory) if directory is not None else self.directory
        if step is None:
            steps = [m.step for m in self._torch_name_format.find_all(root)] if directory is not None else (
                self.all_steps())
            if not steps:
                raise MissingDataError(f"{root}: no committed step directory ({self._torch_name_format})")
            step = max(steps)
        try:
            return step, epath.Path(self._torch_name_format.find_step(root, step).path)
        except ValueError as e:
            raise MissingDataError(f"{root}: step {step} not found: {e}") from None

    def restore(self, step: int | None, items: Any = None, restore_kwargs: Mapping[str, Any] | None = None,
                directory: epath.PathLike | None = None, args: TorchRestore | None = None) -> Any:
        """Restore ``step`` (the latest if None) onto ``args.target`` (``args`` a :class:`TorchRestore`; or
        the target as ``items`` and the other :class:`TorchRestore` fields as ``restore_kwargs``).

        Example:
            >>> # mngr.restore(mngr.latest_step(), args=TorchRestore(abstract_tree))
        """
        _, path = self._torch_step_dir(step, directory)
        if args is None:
            args = TorchRestore(items, **dict(restore_kwargs or {}))
        elif items is not None or restore_kwargs:
            raise InvalidArgumentError("give either args=TorchRestore(...) or items/restore_kwargs, not both")
        return self._torch_handler.restore(path, args)

    def item_metadata(self, step: int) -> dict[str, Any]:
        """The saved tensors of ``step``: ``{name: jax.ShapeDtypeStruct(shape, dtype)}``.

        Example:
            >>> # mngr.item_metadata(mngr.latest_step())["model.embed.weight"].shape
        """
        _, path = self._torch_step_dir(step, None)
        return self._torch_handler.metadata(path)

    def metadata(self, step: int | None = None) -> Any:
        """Orbax's ``RootMetadata`` when ``step`` is None; else an ``ocp.metadata.StepMetadata`` whose
        ``item_metadata`` is :meth:`item_metadata` of ``step`` and ``item_handlers`` the handler's typestr.

        Example:
            >>> # mngr.metadata(1000).item_metadata["model.embed.weight"].shape
        """
        if step is None:
            return super().metadata()
        return ocp.metadata.StepMetadata(item_handlers=self._torch_handler.typestr(),
                                         item_metadata=self.item_metadata(step))

    def save(self, step: int, *args: Any, **kwargs: Any) -> bool:
        """Always raises :class:`SaveNotSupportedError` (the manager is read-only)."""
        raise SaveNotSupportedError(f"{self.directory}: jreshard.orbax.TorchCheckpointManager only restores")
