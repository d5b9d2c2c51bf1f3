"""The allow-listed unpickler: the only way jreshard decodes a pickle.

Every global a pickle asks for is looked up in :data:`ALLOWED`; each entry maps to a harmless stand-in
(a record class, a dtype marker, a constructor of plain data). Anything else raises
:class:`~jreshard.errors.UnsafeCheckpointError` naming the global, before anything is called, so a
malicious ``.metadata``, ``data.pkl`` or saved object cannot execute code.

Beyond the list itself (see ``docs/security.md``):

* nothing a pickle is given can be changed by it: shared stand-ins have no ``__dict__`` and refuse
  ``__setstate__`` (BUILD); records accept only their declared fields;
* every callable checks its arguments' types and charges what it allocates to a per-pickle budget
  (``64 MiB + 8 x`` the pickle's size), so a tiny pickle cannot ask for gigabytes (``bytearray(3 << 30)``,
  ``set(range(10**9))``);
* numpy arrays, scalars and dtypes are built by jreshard from validated (dtype, shape, bytes): numeric kinds
  only (no object, structured or subarray dtypes), bytes of exactly the right length, and ``dtype`` state
  (BUILD) limited to a byte order; the decoder never hands a pickle a real ``numpy.dtype`` or ``ndarray`` to
  modify;
* a pickle whose tuples could nest deeply (CPython's tuple hash recurses in C without a guard) is decoded
  on a thread with a stack large enough for the deepest nesting its size allows.
"""

from __future__ import annotations

import io
import pathlib
import pickle
import threading
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .dtypes import TORCH_DTYPES, TORCH_STORAGES, TorchDtype
from .errors import CheckpointFormatError, JReshardError, UnsafeCheckpointError
from .gate import _short, check_view, checked_int, checked_shape
from .pickle_scan import check_opcodes

MAX_DEPTH = 100  # nesting of containers in a decoded object that jreshard walks or returns
MAX_ENTRIES = 1_000_000  # entries (paths) of one decoded object that jreshard walks
_TUPLE_OPS = (b")", b"t", b"\x85", b"\x86", b"\x87")  # every level of tuple nesting costs one of these bytes
_SAFE_LEVELS = 10_000  # nesting any thread's stack holds
_STACK_PER_LEVEL = 128  # bytes of C stack per level of tuple hashing (measured: under 64)
_MAX_STACK = 16 * 2**30

# --------------------------------------------------------------------------------------------
# One decode: its budget and where it is


class _Decode:
    """State of one decode: the file it names in errors, the bytes its callables may still allocate, and
    whether it made numpy stand-ins that must be resolved."""

    def __init__(self, where: str, budget: int) -> None:
        self.where, self.left, self.stubs = where, budget, 0

    def charge(self, nbytes: int, what: str) -> None:
        if nbytes > self.left:
            raise UnsafeCheckpointError(
                f"{self.where}: the pickle asks for {what} ({nbytes} bytes), more than a pickle of its size may "
                "allocate; refused"
            )
        self.left -= nbytes


_state = threading.local()


def _current() -> _Decode:
    decode = getattr(_state, "decode", None)
    if decode is None:  # an allow-listed callable used outside a decode
        raise UnsafeCheckpointError("allow-listed pickle callables run only inside jreshard's unpickler")
    return decode


def _fail(message: str) -> CheckpointFormatError:
    return CheckpointFormatError(f"{_current().where}: {message}")


# --------------------------------------------------------------------------------------------
# Stand-ins for the torch objects that appear in checkpoints.


class _Frozen(type):
    """Metaclass of the stand-in classes: they are shared by every unpickler, so a pickle (BUILD on a class
    it got from the allow-list) must not be able to change them."""

    def __setattr__(cls, key: str, value: Any) -> None:
        raise UnsafeCheckpointError(f"a pickle tried to modify {cls.__name__}.{key}")


class _Sealed:
    """Shared or validated stand-ins: no ``__dict__``, no attribute writes, no BUILD."""

    __slots__ = ()

    def __setattr__(self, key: str, value: Any) -> None:
        raise UnsafeCheckpointError(f"a pickle tried to modify {type(self).__name__}.{key}")

    def __setstate__(self, state: Any) -> None:
        raise UnsafeCheckpointError(f"a pickle tried to set the state of {type(self).__name__} (BUILD); refused")


class Guarded(_Sealed):
    """An allow-listed callable that a pickle cannot modify (BUILD on a plain function would set its
    attributes, e.g. its defaults, for every later load in the process)."""

    __slots__ = ("_fn", "_name")

    def __init__(self, fn: Callable[..., Any], name: str) -> None:
        object.__setattr__(self, "_fn", fn)
        object.__setattr__(self, "_name", name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<allow-listed {self._name}>"


class Record(metaclass=_Frozen):
    """A plain attribute bag that a pickle may build with NEWOBJ + BUILD (torch dataclasses). Only the
    declared ``_fields`` can be set; their values are checked by the code that reads them."""

    _fields: tuple[str, ...] = ()

    def __init__(self, *args: Any) -> None:
        if len(args) > len(self._fields):
            raise _fail(f"{type(self).__name__} takes {len(self._fields)} fields, the pickle gives {len(args)}")
        for name, value in zip(self._fields, args):
            object.__setattr__(self, name, value)

    def __setattr__(self, key: str, value: Any) -> None:
        raise UnsafeCheckpointError(f"a pickle tried to modify {type(self).__name__}.{key}")

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and all(s is None or type(s) is dict for s in state):
            state = {**(state[0] or {}), **(state[1] or {})}
        if type(state) is dict:
            for key, value in state.items():
                if key not in self._fields:
                    raise _fail(f"{type(self).__name__} has no field {_short(key)}")
                object.__setattr__(self, key, value)
        elif type(state) is tuple and self._fields and len(state) <= len(self._fields):
            for name, value in zip(self._fields, state):
                object.__setattr__(self, name, value)
        else:
            raise _fail(f"unexpected pickled state for {type(self).__name__}: {_short(state)}")

    def __getattr__(self, name: str) -> Any:
        # Fields dropped by __getstate__ (e.g. _StorageInfo drops None fields) read as None.
        if name in type(self)._fields:
            return None
        raise AttributeError(name)

    def __repr__(self) -> str:
        body = ", ".join(f"{k}={_short(getattr(self, k))}" for k in self._fields)
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


class EnumMember(_Sealed):
    """An enum member of torch's (e.g. ``_MEM_FORMAT_ENCODING``): kept as its class name and value."""

    __slots__ = ("owner", "value")

    def __init__(self, owner: str, value: Any) -> None:
        object.__setattr__(self, "owner", owner)
        object.__setattr__(self, "value", value)

    def __repr__(self) -> str:
        return f"{self.owner}({self.value!r})"


def _enum(owner: str) -> Callable[[Any], EnumMember]:
    def member(value: Any) -> EnumMember:
        if not isinstance(value, (int, str)) or isinstance(value, bool):
            raise _fail(f"{owner} member {_short(value)} is not an int or a string")
        return EnumMember(owner, value)

    return member


class StorageType(_Sealed):
    """A torch storage class named in a persistent id; ``dtype`` is None for UntypedStorage (bytes)."""

    __slots__ = ("dtype",)

    def __init__(self, dtype: str | None) -> None:
        object.__setattr__(self, "dtype", dtype)

    def __repr__(self) -> str:
        return f"StorageType({self.dtype!r})"


@dataclass(frozen=True, slots=True)
class StorageRef:
    """A storage of a torch.save archive: the entry ``data/<key>``, ``numel`` elements of ``dtype``."""

    key: str
    dtype: str | None
    numel: int

    def __setstate__(self, state: Any) -> None:
        raise UnsafeCheckpointError("a pickle tried to set the state of a storage (BUILD); refused")


@dataclass(frozen=True, slots=True)
class TensorRef:
    """A tensor as ``data.pkl`` describes it: a strided view of a storage, checked to lie inside it."""

    storage: StorageRef
    storage_offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: TorchDtype

    def __setstate__(self, state: Any) -> None:
        raise UnsafeCheckpointError("a pickle tried to set the state of a tensor (BUILD); refused")

    @property
    def shape(self) -> tuple[int, ...]:
        return self.size


def _torch_size(values: Any = ()) -> tuple[int, ...]:
    return checked_shape(values, "torch.Size", _current().where)


def _tensor_ref(storage: Any, storage_offset: Any, size: Any, stride: Any, dtype: Any) -> TensorRef:
    where = _current().where
    if not isinstance(storage, StorageRef):
        raise _fail("a tensor is rebuilt without a storage")
    if not isinstance(dtype, TorchDtype):
        raise _fail("a tensor is rebuilt without a dtype")
    itemsize = dtype.numpy(where).itemsize
    storage_nbytes = storage.numel * (1 if storage.dtype is None else TorchDtype(storage.dtype).numpy(where).itemsize)
    check_view(size, stride, storage_offset, itemsize, storage_nbytes, f"{where}: tensor view")
    return TensorRef(storage, int(storage_offset), tuple(size), tuple(stride), dtype)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    if not isinstance(storage, StorageRef) or storage.dtype is None:
        raise _fail("_rebuild_tensor_v2 without a typed storage")
    return _tensor_ref(storage, storage_offset, size, stride, TorchDtype(storage.dtype))


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
    return _tensor_ref(storage, storage_offset, size, stride, dtype)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    if not isinstance(data, TensorRef):
        raise _fail("a parameter is rebuilt from something that is not a tensor")
    return data


def _get_layout(name: Any) -> str:
    if not isinstance(name, str):
        raise _fail(f"layout {_short(name)} is not a string")
    return name


# --------------------------------------------------------------------------------------------
# numpy: arrays, scalars and dtypes built by jreshard from validated parts

_NUMPY_KINDS = "biufc"


def _numpy_dtype_of(spec: Any) -> np.dtype:
    """A plain numeric numpy dtype named by ``spec`` (a dtype string such as 'f4' or '<i8')."""
    if not isinstance(spec, str) or len(spec) > 16:
        raise _fail(f"numpy dtype {_short(spec)} is not a plain dtype name")
    try:
        dt = np.dtype(spec)
    except TypeError as e:
        raise _fail(f"numpy dtype {spec!r} is not understood: {e}") from None
    if dt.kind not in _NUMPY_KINDS or dt.fields is not None or dt.subdtype is not None or dt.hasobject:
        raise UnsafeCheckpointError(f"{_current().where}: numpy dtype {spec!r} is not a plain number type; refused")
    return dt


class NumpyDtype(_Sealed):
    """``numpy.dtype(name)`` as a pickle builds it; BUILD may set only its byte order. Resolved to a real
    ``numpy.dtype`` after decoding."""

    __slots__ = ("dtype", "built")
    __hash__ = None  # type: ignore[assignment]  # unusable as a key or set member before it is resolved

    def __init__(self, dtype: np.dtype) -> None:
        object.__setattr__(self, "dtype", dtype)
        object.__setattr__(self, "built", False)

    def __setstate__(self, state: Any) -> None:
        # numpy's dtype state: (version, byteorder, subarray, names, fields, elsize, alignment, flags[, metadata])
        if self.built or type(state) is not tuple or len(state) not in (8, 9) or state[0] not in (3, 4):
            raise UnsafeCheckpointError(f"{_current().where}: unexpected numpy dtype state {_short(state)}; refused")
        _, order, subarray, names, fields, elsize, alignment, flags = state[:8]
        extra = state[8] if len(state) == 9 else None
        if (order not in ("<", ">", "|", "=") or (subarray, names, fields, extra) != (None, None, None, None)
                or elsize not in (-1, self.dtype.itemsize) or alignment not in (-1, self.dtype.alignment)
                or flags != 0 or type(elsize) is not int or type(alignment) is not int or type(flags) is not int):
            raise UnsafeCheckpointError(
                f"{_current().where}: numpy dtype state {_short(state)} is not that of a plain number type; refused"
            )
        dtype = self.dtype.newbyteorder(order) if order in ("<", ">") else self.dtype
        object.__setattr__(self, "dtype", dtype)
        object.__setattr__(self, "built", True)


class NumpyArray(_Sealed):
    """``numpy.ndarray`` as ``numpy.core.multiarray._reconstruct`` + BUILD make it; the array is made by
    jreshard from a validated (dtype, shape, bytes) and replaces this stand-in after decoding."""

    __slots__ = ("array",)
    __hash__ = None  # type: ignore[assignment]

    def __init__(self) -> None:
        object.__setattr__(self, "array", None)

    def __setstate__(self, state: Any) -> None:
        if self.array is not None or type(state) is not tuple or len(state) not in (4, 5):
            raise UnsafeCheckpointError(f"{_current().where}: unexpected numpy array state {_short(state)}; refused")
        shape, dtype, fortran, raw = state[-4:]
        if not isinstance(dtype, NumpyDtype) or type(fortran) is not bool:
            raise UnsafeCheckpointError(f"{_current().where}: numpy array state without a plain dtype; refused")
        dt = dtype.dtype
        shape = checked_shape(shape, "numpy array shape", _current().where, dt.itemsize)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        if not isinstance(raw, (bytes, bytearray)) or len(raw) != nbytes:
            raise _fail(f"numpy array of shape {shape} and dtype {dt} needs {nbytes} bytes, the pickle gives "
                        f"{len(raw) if isinstance(raw, (bytes, bytearray)) else type(raw).__name__}")
        _current().charge(nbytes, f"a numpy array of {nbytes} bytes")
        array = np.frombuffer(raw, dt).copy().reshape(shape, order="F" if fortran else "C")
        object.__setattr__(self, "array", array)


class _Token(_Sealed):
    """A class a pickle may name but not call (``numpy.ndarray``, ``numpy.float32`` ...); after decoding,
    the class itself."""

    __slots__ = ("value",)
    __hash__ = None  # type: ignore[assignment]

    def __init__(self, value: Any) -> None:
        object.__setattr__(self, "value", value)

    def __repr__(self) -> str:
        return f"<allow-listed {self.value!r}>"


def _numpy_reconstruct(cls: Any, shape: Any = (0,), dtype_code: Any = b"b") -> NumpyArray:
    if not (isinstance(cls, _Token) and cls.value is np.ndarray):
        raise UnsafeCheckpointError(f"{_current().where}: numpy _reconstruct of {_short(cls)} is not allowed")
    _current().stubs += 1
    return NumpyArray()


def _numpy_frombuffer(buffer: Any, dtype: Any, shape: Any, order: Any) -> NumpyArray:
    """numpy's protocol-5 array pickle: ``_frombuffer(bytes, dtype, shape, order)``."""
    if not isinstance(dtype, NumpyDtype) or order not in ("C", "F"):
        raise UnsafeCheckpointError(f"{_current().where}: numpy array without a plain dtype; refused")
    array = NumpyArray()
    _current().stubs += 1
    array.__setstate__((shape, dtype, order == "F", buffer))
    return array


def _numpy_scalar(dtype: Any, data: Any = None) -> Any:
    if not isinstance(dtype, NumpyDtype):
        raise UnsafeCheckpointError(f"{_current().where}: numpy scalar without a plain dtype; refused")
    if data is None:
        return dtype.dtype.type()
    if isinstance(data, str):
        data = data.encode("latin-1")
    if not isinstance(data, (bytes, bytearray)) or len(data) != dtype.dtype.itemsize:
        raise _fail(f"numpy scalar of {dtype.dtype} with {_short(data)}")
    return np.frombuffer(data, dtype.dtype, count=1)[0]


def _numpy_dtype(name: Any, align: Any = False, copy: Any = False) -> NumpyDtype:
    _current().stubs += 1
    return NumpyDtype(_numpy_dtype_of(name))


# --------------------------------------------------------------------------------------------
# Built-in constructors, with their arguments checked and their allocations charged


def _items(value: Any, what: str) -> Any:
    if type(value) not in (list, tuple, set, frozenset, dict):
        raise _fail(f"{what} of {_short(value)}: only a list, tuple, set or dict is accepted")
    _current().charge(64 * len(value) + 256, what)
    return value


def _set(iterable: Any = ()) -> set:
    return set(_items(iterable, "set"))


def _frozenset(iterable: Any = ()) -> frozenset:
    return frozenset(_items(iterable, "frozenset"))


class PickledOrderedDict(dict):
    """``collections.OrderedDict`` as a pickle builds it: a dict (ordered since Python 3.7) whose only
    settable attribute is ``_metadata`` (torch state dicts carry module versions there). A real OrderedDict has
    a ``__dict__`` a BUILD could fill with anything."""

    __slots__ = ("_metadata",)

    def __setattr__(self, key: str, value: Any) -> None:
        raise UnsafeCheckpointError(f"a pickle tried to modify OrderedDict.{key}")

    def __setstate__(self, state: Any) -> None:
        if type(state) is tuple and len(state) == 2 and all(s is None or type(s) is dict for s in state):
            state = {**(state[0] or {}), **(state[1] or {})}
        if type(state) is not dict or set(state) - {"_metadata"}:
            raise _fail(f"unexpected pickled state for an OrderedDict: {_short(state)}")
        object.__setattr__(self, "_metadata", state.get("_metadata"))


def _ordered_dict(items: Any = ()) -> PickledOrderedDict:
    items = _items(items, "OrderedDict")
    if type(items) is not dict and not all(type(p) in (list, tuple) and len(p) == 2 for p in items):
        raise _fail("OrderedDict items are not pairs")
    return PickledOrderedDict(items)


def _bytes_of(value: Any, encoding: Any, what: str) -> bytes:
    if isinstance(value, (bytes, bytearray)) and encoding is None:
        data = bytes(value)
    elif isinstance(value, str) and encoding in ("latin1", "latin-1"):
        data = value.encode("latin-1")
    else:
        raise _fail(f"{what}({_short(value)}, {_short(encoding)}) is not allowed (bytes, or a str with 'latin1')")
    _current().charge(len(data), what)
    return data


def _bytearray(value: Any = b"", encoding: Any = None) -> bytearray:
    return bytearray(_bytes_of(value, encoding, "bytearray"))


def _bytes(value: Any = b"", encoding: Any = None) -> bytes:
    return _bytes_of(value, encoding, "bytes")


def _codecs_encode(value: Any, encoding: Any = "utf-8") -> bytes:
    return _bytes_of(value, encoding, "_codecs.encode")


def _numbers(*args: Any, what: str, kinds: tuple[type, ...]) -> tuple:
    if len(args) > 3 or not all(isinstance(a, kinds) for a in args):
        raise _fail(f"{what}{_short(args)} is not allowed")
    return args


def _complex(real: Any = 0, imag: Any = 0) -> complex:
    return complex(*_numbers(real, imag, what="complex", kinds=(int, float)))


def _slice(*args: Any) -> slice:
    return slice(*_numbers(*args, what="slice", kinds=(int, type(None))))


def _range(*args: Any) -> range:
    return range(*_numbers(*args, what="range", kinds=(int,)))


def _path(flavour: type) -> Callable[..., str]:
    def path(*parts: Any) -> str:
        if len(parts) > 256 or not all(isinstance(p, str) for p in parts):
            raise _fail(f"a path made of {_short(parts)}")
        return str(flavour(*parts))

    return path


def _build_allowed() -> dict[tuple[str, str], Any]:
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
        ("collections", "OrderedDict"): _ordered_dict,
        ("_codecs", "encode"): _codecs_encode,
    }
    for path_cls in ("PosixPath", "PurePosixPath", "Path"):
        functions[("pathlib", path_cls)] = _path(pathlib.PurePosixPath)
    for path_cls in ("WindowsPath", "PureWindowsPath"):
        functions[("pathlib", path_cls)] = _path(pathlib.PureWindowsPath)
    for np_core in ("numpy.core.multiarray", "numpy._core.multiarray"):
        functions[(np_core, "_reconstruct")] = _numpy_reconstruct
        functions[(np_core, "scalar")] = _numpy_scalar
    for np_numeric in ("numpy.core.numeric", "numpy._core.numeric"):
        functions[(np_numeric, "_frombuffer")] = _numpy_frombuffer
    for builtins in ("builtins", "__builtin__"):
        for name, fn in (("set", _set), ("frozenset", _frozenset), ("bytearray", _bytearray), ("bytes", _bytes),
                         ("complex", _complex), ("slice", _slice), ("range", _range)):
            functions[(builtins, name)] = fn
    functions[("__builtin__", "xrange")] = _range
    for key, fn in functions.items():
        allowed[key] = Guarded(fn, ".".join(key))
    for name in TORCH_DTYPES:
        allowed[("torch", name)] = TorchDtype(name)
    for cls_name, dtype_name in TORCH_STORAGES.items():
        allowed[("torch", cls_name)] = StorageType(dtype_name)
    allowed[("torch.storage", "UntypedStorage")] = StorageType(None)
    # Classes a pickle may name (e.g. a dtype stored in a config) but never call or modify.
    allowed[("numpy", "ndarray")] = _Token(np.ndarray)
    for np_type in ("float64", "float32", "float16", "int64", "int32", "int16", "int8", "uint8", "bool_"):
        allowed[("numpy", np_type)] = _Token(getattr(np, np_type))
    for cls_name in ("Float64DType", "Float32DType", "Float16DType", "Int64DType", "Int32DType", "Int16DType",
                     "Int8DType", "UInt8DType", "BoolDType"):
        allowed[("numpy.dtypes", cls_name)] = _Token(getattr(np.dtypes, cls_name))
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
        except (KeyError, TypeError):
            raise UnsafeCheckpointError(
                f"{self.where}: the pickle asks for the global {str(module)[:100]}.{str(name)[:100]}, which is not on "
                "jreshard's allow-list; it was refused and nothing was executed"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        if not self.allow_storages:
            raise UnsafeCheckpointError(f"{self.where}: unexpected persistent id {_short(pid)} in pickle")
        if not (type(pid) is tuple and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], StorageType)
                and isinstance(pid[2], str) and 0 < len(pid[2]) <= 256):
            raise CheckpointFormatError(f"{self.where}: unsupported persistent id {_short(pid)}")
        _, storage_type, key, _location, numel = pid
        return StorageRef(key, storage_type.dtype, checked_int(numel, "storage size", self.where))


def safe_loads(data: bytes, where: str, allow_storages: bool = False, bounded: bool = True) -> Any:
    """Decode ``data`` with the allow-listed unpickler.

    With ``bounded`` (the default) the result nests at most MAX_DEPTH containers deep (deeper is a
    CheckpointFormatError), so that walking or printing it is safe; a caller that reads a known structure
    field by field (DCP's ``.metadata``) may skip that walk.

    Example:
        >>> import pickle
        >>> safe_loads(pickle.dumps({"step": 7, "lr": 0.1}), "example")
        {'step': 7, 'lr': 0.1}
    """
    data = bytes(data)
    check_opcodes(data, where)
    levels = sum(data.count(op) for op in _TUPLE_OPS)
    if levels <= _SAFE_LEVELS:
        return _decode(data, where, allow_storages, bounded)
    # Tuples may nest deeper than a normal stack holds while they are hashed (dict keys, set members):
    # decode on a thread whose stack holds the deepest nesting this pickle's size allows.
    stack = max(8 * 2**20, levels * _STACK_PER_LEVEL + 4 * 2**20)
    if stack > _MAX_STACK:
        raise CheckpointFormatError(f"{where}: pickle with {levels} tuple opcodes is too large to decode safely")
    out: list[Any] = []

    def run() -> None:
        try:
            out.append((True, _decode(data, where, allow_storages, bounded)))
        except BaseException as e:  # handed to the caller's thread
            out.append((False, e))

    with _STACK_LOCK:
        old = threading.stack_size(-(-stack // 4096) * 4096)
        try:
            thread = threading.Thread(target=run, name="jreshard-unpickle")
            thread.start()
        except (RuntimeError, MemoryError) as e:
            raise CheckpointFormatError(f"{where}: cannot start a thread to decode this pickle safely: {e}") from None
        finally:
            threading.stack_size(old)
    thread.join()
    ok, value = out[0]
    if not ok:
        raise value
    return value


_STACK_LOCK = threading.Lock()


def _decode(data: bytes, where: str, allow_storages: bool, bounded: bool = True) -> Any:
    decode = _Decode(where, 64 * 2**20 + 8 * len(data))
    previous = getattr(_state, "decode", None)
    _state.decode = decode
    try:
        obj = SafeUnpickler(data, where, allow_storages).load()
        if decode.stubs or bounded:
            obj = _resolve(obj, 0, {})
        return obj
    except JReshardError:
        raise
    except RecursionError:
        raise CheckpointFormatError(f"{where}: the pickle nests objects too deeply") from None
    except Exception as e:  # malformed pickles raise many kinds of errors
        raise CheckpointFormatError(f"{where}: cannot decode pickle: {type(e).__name__}: {_short(str(e))}") from None
    finally:
        _state.decode = previous


def _resolve(obj: Any, depth: int, memo: dict[int, Any]) -> Any:
    """Replace numpy stand-ins (and class tokens) in a decoded object by what they stand for, in place in
    lists, dicts and records (tuples are rebuilt where they change). Shared objects are visited once."""
    kind = type(obj)
    if kind is NumpyArray:
        if obj.array is None:
            raise _fail("a numpy array without its state")
        return obj.array
    if kind is NumpyDtype:
        return obj.dtype
    if kind is _Token:
        return obj.value
    if kind not in (list, dict, tuple, PickledOrderedDict, set, frozenset) and not isinstance(obj, Record):
        return obj
    key = id(obj)
    if key in memo:
        return memo[key]
    if depth > MAX_DEPTH:
        raise _fail(f"the pickle nests containers deeper than {MAX_DEPTH} levels")
    memo[key] = obj
    if kind is list:
        for i, v in enumerate(obj):
            obj[i] = _resolve(v, depth + 1, memo)
    elif kind is dict or kind is PickledOrderedDict:
        for k, v in obj.items():
            obj[k] = _resolve(v, depth + 1, memo)
    elif kind is set or kind is frozenset:
        for v in obj:  # members are hashable, so never stand-ins: only their depth is checked
            _resolve(v, depth + 1, memo)
    elif kind is tuple:
        items = tuple(_resolve(v, depth + 1, memo) for v in obj)
        if any(a is not b for a, b in zip(items, obj)):
            memo[key] = items
            return items
    else:
        for name in type(obj)._fields:
            if name in obj.__dict__:
                object.__setattr__(obj, name, _resolve(obj.__dict__[name], depth + 1, memo))
    return obj
