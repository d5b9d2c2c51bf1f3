"""The allow-listed unpickler: the only way jreshard decodes a pickle.

Every global a pickle asks for is looked up in :data:`ALLOWED`; each entry maps to a harmless stand-in
(a record class, a dtype marker, a constructor of plain data). Anything else raises
:class:`~jreshard.errors.UnsafeCheckpointError` naming the global, before anything is called, so a
malicious ``.metadata``, ``data.pkl`` or saved object cannot execute code.
"""

from __future__ import annotations

import collections
import io
import pathlib
import pickle
from dataclasses import dataclass
from typing import Any, Callable

from .dtypes import TORCH_DTYPES, TORCH_STORAGES, TorchDtype
from .errors import CheckpointFormatError, UnsafeCheckpointError

# --------------------------------------------------------------------------------------------
# Stand-ins for the torch objects that appear in checkpoints.


class _Frozen(type):
    """Metaclass of the stand-in classes: they are shared by every unpickler, so a pickle (BUILD on a class
    it got from the allow-list) must not be able to change them."""

    def __setattr__(cls, key: str, value: Any) -> None:
        raise UnsafeCheckpointError(f"a pickle tried to modify {cls.__name__}.{key}")


class Guarded:
    """An allow-listed callable that a pickle cannot modify (BUILD on a plain function would set its
    attributes, e.g. its defaults, for every later load in the process)."""

    __slots__ = ("_fn", "_name")

    def __init__(self, fn: Callable[..., Any], name: str) -> None:
        object.__setattr__(self, "_fn", fn)
        object.__setattr__(self, "_name", name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._fn(*args, **kwargs)

    def __setattr__(self, key: str, value: Any) -> None:
        raise UnsafeCheckpointError(f"a pickle tried to modify {self._name}")

    def __repr__(self) -> str:
        return f"<allow-listed {self._name}>"


class Record(metaclass=_Frozen):
    """A plain attribute bag that a pickle may build with NEWOBJ + BUILD (torch dataclasses)."""

    _fields: tuple[str, ...] = ()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        for name, value in zip(self._fields, args):
            setattr(self, name, value)
        for name, value in kwargs.items():
            setattr(self, name, value)

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and (state[0] is None or isinstance(state[0], dict)):
            state = {**(state[0] or {}), **(state[1] or {})}
        if isinstance(state, dict):
            for key, value in state.items():
                setattr(self, key, value)
        elif isinstance(state, tuple) and self._fields:
            for name, value in zip(self._fields, state):
                setattr(self, name, value)
        else:
            raise CheckpointFormatError(f"unexpected pickled state for {type(self).__name__}: {state!r:.200}")

    def __getattr__(self, name: str) -> Any:
        # Fields dropped by __getstate__ (e.g. _StorageInfo drops None fields) read as None.
        if name in type(self)._fields:
            return None
        raise AttributeError(name)

    def __repr__(self) -> str:
        body = ", ".join(f"{k}={getattr(self, k)!r}" for k in self._fields)
        return f"{type(self).__name__}({body})"

    def _key(self) -> tuple:
        return tuple(_hashable(getattr(self, k)) for k in self._fields)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other._key() == self._key()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self).__name__, self._key()))


def _hashable(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(value)
    return value


class Metadata(Record):
    _fields = ("state_dict_metadata", "planner_data", "storage_data", "storage_meta", "version")


class TensorStorageMetadata(Record):
    _fields = ("properties", "size", "chunks")


class BytesStorageMetadata(Record):
    _fields = ()


class ChunkStorageMetadata(Record):
    _fields = ("offsets", "sizes")


class TensorProperties(Record):
    _fields = ("dtype", "layout", "requires_grad", "memory_format", "pin_memory")


class MetadataIndex(Record):
    _fields = ("fqn", "offset", "index")


class StorageMeta(Record):
    _fields = ("checkpoint_id", "save_id", "load_id", "modules")


class StorageInfo(Record):
    _fields = ("relative_path", "offset", "length", "transform_descriptors")


class EnumMember:
    """An enum member of torch's (e.g. ``_MEM_FORMAT_ENCODING``): kept as its class name and value."""

    def __init__(self, owner: str, value: Any) -> None:
        self.owner, self.value = owner, value

    def __repr__(self) -> str:
        return f"{self.owner}({self.value!r})"


def _enum(owner: str) -> Callable[[Any], EnumMember]:
    return lambda value: EnumMember(owner, value)


@dataclass(frozen=True)
class StorageType:
    """A torch storage class named in a persistent id; ``dtype`` is None for UntypedStorage (bytes)."""

    dtype: str | None


@dataclass(frozen=True)
class StorageRef:
    """A storage of a torch.save archive: the entry ``data/<key>``, ``numel`` elements of ``dtype``."""

    key: str
    dtype: str | None
    numel: int


@dataclass(frozen=True)
class TensorRef:
    """A tensor as ``data.pkl`` describes it: a strided view of a storage."""

    storage: StorageRef
    storage_offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: TorchDtype

    @property
    def shape(self) -> tuple[int, ...]:
        return self.size


def _torch_size(values: Any = ()) -> tuple[int, ...]:
    return tuple(int(v) for v in values)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    if not isinstance(storage, StorageRef) or storage.dtype is None:
        raise CheckpointFormatError("_rebuild_tensor_v2 without a typed storage")
    return TensorRef(storage, int(storage_offset), _torch_size(size), _torch_size(stride), TorchDtype(storage.dtype))


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
    if not isinstance(storage, StorageRef) or not isinstance(dtype, TorchDtype):
        raise CheckpointFormatError("_rebuild_tensor_v3 without a storage and a dtype")
    return TensorRef(storage, int(storage_offset), _torch_size(size), _torch_size(stride), dtype)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    return data


def _get_layout(name: str) -> str:
    return str(name)


def _numpy_reconstruct(cls, shape, dtype_code):
    import numpy as np

    if cls is not np.ndarray:
        raise UnsafeCheckpointError(f"numpy _reconstruct of {cls!r} is not allowed")
    return np.ndarray.__new__(np.ndarray, shape, dtype_code)


def _numpy_scalar(dtype, data=None):
    import numpy as np

    return np.frombuffer(data, dtype=dtype, count=1)[0] if data is not None else dtype.type()


def _numpy_dtype(name, align=False, copy=False):
    import numpy as np

    return np.dtype(name)


def _pure_path(*parts: Any) -> str:
    return str(pathlib.PurePosixPath(*parts))


def _pure_windows_path(*parts: Any) -> str:
    return str(pathlib.PureWindowsPath(*parts))


def _build_allowed() -> dict[tuple[str, str], Any]:
    import numpy as np

    allowed: dict[tuple[str, str], Any] = {}
    md = "torch.distributed.checkpoint.metadata"
    for cls in (Metadata, TensorStorageMetadata, BytesStorageMetadata, ChunkStorageMetadata, TensorProperties,
                MetadataIndex, StorageMeta):
        allowed[(md, cls.__name__)] = cls
    allowed[("torch.distributed.checkpoint.filesystem", "_StorageInfo")] = StorageInfo
    functions: dict[tuple[str, str], Callable[..., Any]] = {
        (md, "_MEM_FORMAT_ENCODING"): _enum("_MEM_FORMAT_ENCODING"),
        ("torch.distributed.checkpoint.filesystem", "SerializationFormat"): _enum("SerializationFormat"),
        ("torch", "Size"): _torch_size,
        ("torch.serialization", "_get_layout"): _get_layout,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        ("numpy", "dtype"): _numpy_dtype,
    }
    for path_cls in ("PosixPath", "PurePosixPath", "Path"):
        functions[("pathlib", path_cls)] = _pure_path
    for path_cls in ("WindowsPath", "PureWindowsPath"):
        functions[("pathlib", path_cls)] = _pure_windows_path
    for np_core in ("numpy.core.multiarray", "numpy._core.multiarray"):
        functions[(np_core, "_reconstruct")] = _numpy_reconstruct
        functions[(np_core, "scalar")] = _numpy_scalar
    for key, fn in functions.items():
        allowed[key] = Guarded(fn, ".".join(key))
    for name in TORCH_DTYPES:
        allowed[("torch", name)] = TorchDtype(name)
    for cls_name, dtype_name in TORCH_STORAGES.items():
        allowed[("torch", cls_name)] = StorageType(dtype_name)
    allowed[("torch.storage", "UntypedStorage")] = StorageType(None)
    # Built-in (C) types: immutable, and building them runs no user code.
    allowed[("collections", "OrderedDict")] = collections.OrderedDict
    for builtin in (set, frozenset, complex, slice, range, bytearray):
        allowed[("builtins", builtin.__name__)] = builtin
        allowed[("__builtin__", builtin.__name__)] = builtin
    allowed[("numpy", "ndarray")] = np.ndarray
    for np_type in ("float64", "float32", "float16", "int64", "int32", "int16", "int8", "uint8", "bool_"):
        allowed[("numpy", np_type)] = getattr(np, np_type)
    for cls_name in ("Float64DType", "Float32DType", "Float16DType", "Int64DType", "Int32DType", "Int16DType",
                     "Int8DType", "UInt8DType", "BoolDType"):
        allowed[("numpy.dtypes", cls_name)] = getattr(np.dtypes, cls_name)
    return allowed


ALLOWED: dict[tuple[str, str], Any] = _build_allowed()


class SafeUnpickler(pickle.Unpickler):
    """A pickle.Unpickler whose globals come only from :data:`ALLOWED`.

    ``where`` names the file (and entry) in error messages. Persistent ids of torch.save archives
    (``('storage', StorageType, key, location, numel)``) become :class:`StorageRef`; a pickle with
    persistent ids where none are expected is refused.
    """

    def __init__(self, data: bytes, where: str, allow_storages: bool = False) -> None:
        super().__init__(io.BytesIO(data))
        self.where = where
        self.allow_storages = allow_storages

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"{self.where}: the pickle asks for the global {module}.{name}, which is not on jreshard's "
                "allow-list; it was refused and nothing was executed"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        if not self.allow_storages:
            raise UnsafeCheckpointError(f"{self.where}: unexpected persistent id {pid!r:.100} in pickle")
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], StorageType)):
            raise CheckpointFormatError(f"{self.where}: unsupported persistent id {pid!r:.200}")
        _, storage_type, key, _location, numel = pid
        return StorageRef(str(key), storage_type.dtype, int(numel))


def safe_loads(data: bytes, where: str, allow_storages: bool = False) -> Any:
    """Decode ``data`` with the allow-listed unpickler.

    Example:
        >>> import pickle
        >>> safe_loads(pickle.dumps({"step": 7, "lr": 0.1}), "example")
        {'step': 7, 'lr': 0.1}
    """
    try:
        return SafeUnpickler(data, where, allow_storages).load()
    except (UnsafeCheckpointError, CheckpointFormatError):
        raise
    except Exception as e:  # malformed pickles raise many kinds of errors
        raise CheckpointFormatError(f"{where}: cannot decode pickle: {type(e).__name__}: {e}") from e
