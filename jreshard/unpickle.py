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
* training-state objects are rebuilt the same way, from checked plain data into stand-ins that are replaced
  after decoding: ``io.BytesIO`` (a new stream over a copy of its bytes), ``defaultdict`` (plain default
  factories only) and ``Counter``, numpy's ``RandomState`` / ``Generator`` / bit generators (kept as data,
  :class:`NumpyRandomState`; no numpy code runs on the pickle's values), ``torch.device`` (its string);
* a pickle whose tuples could nest deeply (CPython's tuple hash recurses in C without a guard) is decoded
  on a thread with a stack large enough for the deepest nesting its size allows.
"""

from __future__ import annotations

import builtins as builtins_module
import collections
import io
import pathlib
import pickle
import threading
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .dtypes import TORCH_DTYPES, TORCH_STORAGES, TorchDtype
from .errors import (
    CheckpointFormatError,
    InconsistentCheckpointError,
    JReshardError,
    UnsafeCheckpointError,
)
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


def _rebuild_tensor(storage, storage_offset, size, stride):
    """torch < 1.0's rebuild (no requires_grad, no hooks): the dtype is the storage's."""
    return _rebuild_tensor_v2(storage, storage_offset, size, stride)


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

    def __setstate__(self, state: Any, native: bool = True) -> None:
        """BUILD of ``_reconstruct``: like numpy's ``ndarray.__setstate__``, an array saved in the other byte
        order comes back in the machine's (``native``); ``_frombuffer`` (protocol 5) keeps the saved order."""
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
        if native and not dt.isnative:
            array = array.astype(dt.newbyteorder("="), order="K")
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
    array.__setstate__((shape, dtype, order == "F", buffer), native=False)
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


def _codecs_encode(value: Any, encoding: Any = "utf-8", errors: Any = "strict") -> bytes:
    """``_codecs.encode(str, "latin1")``: how pickle protocol 2 (torch.save's default) stores ``bytes``. Any
    other encoding, errors mode or argument type is refused (it is not how a pickler writes bytes)."""
    if not isinstance(value, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise UnsafeCheckpointError(
            f"{_current().where}: _codecs.encode({_short(value)}, {_short(encoding)}) is not allowed; only "
            "_codecs.encode(str, 'latin1'), the way pickle protocol 2 stores bytes"
        )
    return _bytes_of(value, "latin1", "_codecs.encode")


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


# --------------------------------------------------------------------------------------------
# Training-state objects: devices, byte streams, counting dicts, numpy random generators


def _torch_device(kind: Any, index: Any = None) -> str:
    """``torch.device(type[, index])`` -> the string torch prints for it (``"cuda:0"``, ``"cpu"``)."""
    if (not isinstance(kind, str) or not 0 < len(kind) <= 64
            or not all(c.isascii() and (c.isalnum() or c in "_:") for c in kind)):
        raise _fail(f"torch.device({_short(kind)}) is not a device name")
    name, _, idx = kind.partition(":")
    if idx and (index is not None or not idx.isdigit()):
        raise _fail(f"torch.device({_short(kind)}, {_short(index)}) is not a device")
    if index is not None:
        index = checked_int(index, "torch.device index", _current().where, hi=2**31)
        return f"{name}:{index}"
    return kind


class PickledBytesIO(_Sealed, metaclass=_Frozen):
    """``io.BytesIO`` as a pickle builds it (NEWOBJ, then BUILD with ``(bytes, position, dict)``); replaced
    after decoding by a fresh ``io.BytesIO`` over a copy of the bytes."""

    __slots__ = ("built", "data", "pos")
    __hash__ = None  # type: ignore[assignment]

    def __new__(cls, initial: Any = b"") -> PickledBytesIO:  # noqa: PYI034
        self = object.__new__(cls)
        object.__setattr__(self, "data", _bytes_of(initial, None, "io.BytesIO"))
        object.__setattr__(self, "pos", 0)
        object.__setattr__(self, "built", False)
        _current().stubs += 1
        return self

    def __init__(self, initial: Any = b"") -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        if (self.built or type(state) is not tuple or len(state) != 3 or type(state[0]) not in (bytes, bytearray)
                or type(state[1]) is not int or state[2] not in (None, {})):
            raise UnsafeCheckpointError(f"{_current().where}: unexpected io.BytesIO state {_short(state)}; refused")
        if not 0 <= state[1] <= len(state[0]):
            raise _fail(f"io.BytesIO position {state[1]} outside its {len(state[0])} bytes")
        _current().charge(len(state[0]), "io.BytesIO")
        object.__setattr__(self, "data", bytes(state[0]))
        object.__setattr__(self, "pos", state[1])
        object.__setattr__(self, "built", True)

    def value(self) -> io.BytesIO:
        out = io.BytesIO(self.data)
        out.seek(self.pos)
        return out


class _PickledDict(dict):
    """A dict subclass a pickle fills with SETITEM(S) (``collections.defaultdict``, ``Counter``): no
    ``__dict__``, no attribute writes, no BUILD; replaced by the real class after decoding."""

    __slots__ = ("factory",)

    def __setattr__(self, key: str, value: Any) -> None:
        raise UnsafeCheckpointError(f"{_current().where}: a pickle tried to modify {type(self).__name__}.{key}")

    def __setstate__(self, state: Any) -> None:
        raise UnsafeCheckpointError(f"{_current().where}: a pickle tried to set the state of {type(self).__name__} "
                                    "(BUILD); refused")


class PickledDefaultDict(_PickledDict):
    __slots__ = ()


class PickledCounter(_PickledDict):
    __slots__ = ()


# Default factories a pickled defaultdict may name, by the allow-list entry that names them.
_FACTORIES: dict[str, Any] = {f"{b}.{n}": getattr(builtins_module, n) for b in ("builtins", "__builtin__")
                              for n in ("set", "frozenset", "bytes", "bytearray", "complex")}
_FACTORIES.update({"collections.OrderedDict": collections.OrderedDict, "collections.Counter": collections.Counter,
                   "collections.defaultdict": collections.defaultdict})
_FACTORY_TYPES = (list, dict, int, float, str, tuple, bool)


def _defaultdict(factory: Any = None, *rest: Any) -> PickledDefaultDict:
    if rest:
        raise _fail("collections.defaultdict with more than a default factory")
    if factory is None:
        real = None
    elif isinstance(factory, _Token) and factory.value in _FACTORY_TYPES:
        real = factory.value
    elif isinstance(factory, Guarded) and factory._name in _FACTORIES:
        real = _FACTORIES[factory._name]
    else:
        raise UnsafeCheckpointError(
            f"{_current().where}: collections.defaultdict with the default factory {_short(factory)} is not allowed "
            "(None, list, dict, set, int, float, str, tuple, bool, OrderedDict, Counter or defaultdict only)"
        )
    out = PickledDefaultDict()
    object.__setattr__(out, "factory", real)
    _current().stubs += 1
    return out


def _counter(items: Any = None) -> PickledCounter:
    out = PickledCounter(_items(items, "collections.Counter") if items is not None else ())
    _current().stubs += 1
    return out


_BIT_GENERATORS = ("MT19937", "PCG64", "PCG64DXSM", "Philox", "SFC64")


@dataclass(frozen=True)
class NumpyRandomState:
    """A pickled ``numpy.random.RandomState``, ``Generator`` or bit generator, decoded as plain data: no numpy
    code runs on the pickle's values while decoding. :meth:`restore` makes the numpy object when asked.

    * ``kind``: ``"RandomState"``, ``"Generator"`` or ``"BitGenerator"``;
    * ``bit_generator``: ``"MT19937"``, ``"PCG64"``, ``"PCG64DXSM"``, ``"Philox"`` or ``"SFC64"``;
    * ``state``: for a RandomState what ``get_state(legacy=False)`` returns (the MT19937 key and position, and
      the cached gaussian); otherwise what ``bit_generator.state`` returns;
    * ``seed_sequence``: the bit generator's ``SeedSequence`` as ``{"entropy", "spawn_key", "pool_size",
      "n_children_spawned"}``, when the pickle holds one (numpy >= 1.25), else None.

    Example:
        >>> s = NumpyRandomState("Generator", "PCG64", np.random.PCG64(5).state)
        >>> int(s.restore().integers(100)) == int(np.random.Generator(np.random.PCG64(5)).integers(100))
        True
    """

    kind: str
    bit_generator: str
    state: Any
    seed_sequence: dict[str, Any] | None = None

    def restore(self) -> Any:
        """The numpy object (``RandomState``, ``Generator`` or bit generator) in this state. numpy checks the
        state's values; one it refuses is a CheckpointFormatError."""
        import numpy.random as npr

        try:
            seed = None
            if self.seed_sequence is not None:
                seed = npr.SeedSequence(**self.seed_sequence)
            bit_gen = getattr(npr, self.bit_generator)(seed)
            if self.kind == "RandomState":
                rs = npr.RandomState(bit_gen)
                rs.set_state(self.state)
                return rs
            bit_gen.state = self.state
            return npr.Generator(bit_gen) if self.kind == "Generator" else bit_gen
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, OverflowError, RuntimeError) as e:
            raise CheckpointFormatError(f"numpy refuses the saved {self.kind} state: {type(e).__name__}: "
                                        f"{_short(str(e))}") from None


class _BitGeneratorClass(_Sealed):
    """A numpy bit generator class named by a pickle (``numpy.random._pcg64.PCG64``); never called."""

    __slots__ = ("name",)
    __hash__ = None  # type: ignore[assignment]

    def __init__(self, name: str) -> None:
        object.__setattr__(self, "name", name)

    def __repr__(self) -> str:
        return f"<numpy.random.{self.name}>"


class _SeedSequenceClass(_Sealed):
    __slots__ = ()
    __hash__ = None  # type: ignore[assignment]


class NumpySeedSequence(_Sealed):
    """``numpy.random.SeedSequence`` as Cython's pickle helper and BUILD make it; kept as its fields."""

    __slots__ = ("fields",)
    __hash__ = None  # type: ignore[assignment]

    def __init__(self) -> None:
        object.__setattr__(self, "fields", None)
        _current().stubs += 1

    def __setstate__(self, state: Any) -> None:
        # (entropy, n_children_spawned, pool, pool_size, spawn_key), in Cython's order of the fields
        if self.fields is not None or type(state) is not tuple or len(state) != 5:
            raise UnsafeCheckpointError(f"{_current().where}: unexpected SeedSequence state {_short(state)}; refused")
        entropy, spawned, _pool, pool_size, spawn_key = state
        where = _current().where
        if not (entropy is None or type(entropy) is int or (type(entropy) in (list, tuple) and len(entropy) <= 4096
                                                             and all(type(e) is int for e in entropy))):
            if not (isinstance(entropy, NumpyArray) and entropy.array is not None and entropy.array.dtype.kind in "iu"
                    and entropy.array.ndim == 1):
                raise _fail(f"SeedSequence entropy {_short(entropy)} is not an integer or a list of them")
            entropy = [int(e) for e in entropy.array]
        if type(spawn_key) not in (list, tuple) or len(spawn_key) > 4096 or not all(type(k) is int for k in spawn_key):
            raise _fail(f"SeedSequence spawn key {_short(spawn_key)} is not a tuple of integers")
        fields = {"entropy": entropy, "spawn_key": tuple(spawn_key),
                  "pool_size": checked_int(pool_size, "SeedSequence pool size", where, lo=4, hi=2**16),
                  "n_children_spawned": checked_int(spawned, "SeedSequence children", where)}
        object.__setattr__(self, "fields", fields)


def _seed_sequence_unpickle(cls: Any, checksum: Any, state: Any = None) -> NumpySeedSequence:
    """Cython's ``__pyx_unpickle_SeedSequence(cls, checksum, state)``."""
    if not isinstance(cls, _SeedSequenceClass) or type(checksum) is not int:
        raise UnsafeCheckpointError(f"{_current().where}: __pyx_unpickle_SeedSequence of {_short(cls)}; refused")
    out = NumpySeedSequence()
    if state is not None:
        out.__setstate__(state)
    return out


class NumpyBitGenerator(_Sealed):
    """A numpy bit generator as ``__bit_generator_ctor`` and BUILD make it: its name, state and seed sequence."""

    __slots__ = ("name", "seed_seq", "state")
    __hash__ = None  # type: ignore[assignment]

    def __init__(self, name: str) -> None:
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "state", None)
        object.__setattr__(self, "seed_seq", None)
        _current().stubs += 1

    def __setstate__(self, state: Any) -> None:
        seed_seq = None
        if type(state) is tuple and len(state) == 2:  # numpy >= 1.25: (state, seed sequence)
            state, seed_seq = state
        if self.state is not None or type(state) is not dict or state.get("bit_generator") != self.name:
            raise UnsafeCheckpointError(f"{_current().where}: unexpected state of a numpy {self.name} bit generator "
                                        f"{_short(state)}; refused")
        if seed_seq is not None and not (isinstance(seed_seq, NumpySeedSequence) and seed_seq.fields is not None):
            raise _fail(f"a numpy bit generator's seed sequence is {_short(seed_seq)}")
        object.__setattr__(self, "state", state)
        object.__setattr__(self, "seed_seq", seed_seq)


class NumpyGenerator(_Sealed):
    """A ``numpy.random.RandomState`` or ``Generator`` as numpy's pickle constructors and BUILD make it."""

    __slots__ = ("bit_gen", "kind", "state")
    __hash__ = None  # type: ignore[assignment]

    def __init__(self, kind: str, bit_gen: NumpyBitGenerator) -> None:
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "bit_gen", bit_gen)
        object.__setattr__(self, "state", None)
        _current().stubs += 1

    def __setstate__(self, state: Any) -> None:
        # RandomState: the legacy state dict (MT19937 key and position, cached gaussian); a Generator of
        # numpy < 1.25: its bit generator's state
        if self.state is not None or type(state) is not dict or state.get("bit_generator") != self.bit_gen.name:
            raise UnsafeCheckpointError(f"{_current().where}: unexpected numpy {self.kind} state {_short(state)}; "
                                        "refused")
        object.__setattr__(self, "state", state)


def _bit_generator_ctor(bit_generator: Any = "MT19937") -> NumpyBitGenerator:
    if isinstance(bit_generator, _BitGeneratorClass):
        return NumpyBitGenerator(bit_generator.name)
    if isinstance(bit_generator, str) and bit_generator in _BIT_GENERATORS:
        return NumpyBitGenerator(bit_generator)
    raise UnsafeCheckpointError(f"{_current().where}: numpy bit generator {_short(bit_generator)} is not one of "
                                f"{', '.join(_BIT_GENERATORS)}; refused")


def _generator_ctor(kind: str) -> Callable[..., NumpyGenerator]:
    def ctor(bit_generator_name: Any = "MT19937", bit_generator_ctor: Any = None) -> NumpyGenerator:
        if bit_generator_ctor is not None and not (isinstance(bit_generator_ctor, Guarded)
                                                   and bit_generator_ctor._fn is _bit_generator_ctor):
            raise UnsafeCheckpointError(f"{_current().where}: numpy {kind} made by {_short(bit_generator_ctor)}; "
                                        "refused")
        bit_gen = (bit_generator_name if isinstance(bit_generator_name, NumpyBitGenerator)
                   else _bit_generator_ctor(bit_generator_name))
        return NumpyGenerator(kind, bit_gen)

    return ctor


def _random_state(obj: NumpyGenerator | NumpyBitGenerator, depth: int, memo: dict[int, Any]) -> NumpyRandomState:
    bit_gen = obj if isinstance(obj, NumpyBitGenerator) else obj.bit_gen
    state = obj.state if isinstance(obj, NumpyGenerator) and obj.state is not None else bit_gen.state
    if state is None:
        raise _fail(f"a numpy {bit_gen.name} generator without its state")
    seed = bit_gen.seed_seq.fields if bit_gen.seed_seq is not None else None
    kind = obj.kind if isinstance(obj, NumpyGenerator) else "BitGenerator"
    return NumpyRandomState(kind, bit_gen.name, _resolve(state, depth + 1, memo),
                            None if seed is None else dict(seed))


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
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        ("numpy", "dtype"): _numpy_dtype,
        ("collections", "OrderedDict"): _ordered_dict,
        ("collections", "defaultdict"): _defaultdict,
        ("collections", "Counter"): _counter,
        ("_codecs", "encode"): _codecs_encode,
        ("torch", "device"): _torch_device,
        ("numpy.random._pickle", "__bit_generator_ctor"): _bit_generator_ctor,
        ("numpy.random._pickle", "__generator_ctor"): _generator_ctor("Generator"),
        ("numpy.random._pickle", "__randomstate_ctor"): _generator_ctor("RandomState"),
        ("numpy.random.bit_generator", "__pyx_unpickle_SeedSequence"): _seed_sequence_unpickle,
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
    for cls_name in ("BytesIO",):
        allowed[("_io", cls_name)] = allowed[("io", cls_name)] = PickledBytesIO
    for builtins in ("builtins", "__builtin__"):  # default factories of a defaultdict; never called
        for builtin_type in _FACTORY_TYPES:
            allowed[(builtins, builtin_type.__name__)] = _Token(builtin_type)
    allowed[("__builtin__", "long")] = _Token(int)  # protocol 2 names int and str by their Python 2 names
    allowed[("__builtin__", "unicode")] = _Token(str)
    for module, name in (("_mt19937", "MT19937"), ("_pcg64", "PCG64"), ("_pcg64", "PCG64DXSM"), ("_philox", "Philox"),
                         ("_sfc64", "SFC64")):
        allowed[(f"numpy.random.{module}", name)] = _BitGeneratorClass(name)
    allowed[("numpy.random.bit_generator", "SeedSequence")] = _SeedSequenceClass()
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
    (``('storage', StorageType, key, location, numel)``; with ``allow_storages="legacy"`` those of the legacy
    format, ``('storage', StorageType, key, location, numel, view_metadata)``) become :class:`StorageRef`; a
    pickle with persistent ids where none are expected is refused. ``storages``, when given, collects the
    storage of each key; one key named with two dtypes or sizes is refused (torch.save never writes that).
    """

    def __init__(self, data: bytes, where: str, allow_storages: bool | str = False,
                 storages: dict[str, StorageRef] | None = None) -> None:
        super().__init__(io.BytesIO(data))
        self.where = where
        self.allow_storages = allow_storages
        self.storages = storages

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
        legacy = self.allow_storages == "legacy"
        if legacy and type(pid) is tuple and pid and pid[0] == "module":
            raise CheckpointFormatError(
                f"{self.where}: the file holds a pickled torch.nn.Module (torch.save(model)); jreshard reads state "
                "dicts: save model.state_dict() instead"
            )
        if not (type(pid) is tuple and len(pid) == (6 if legacy else 5) and pid[0] == "storage"
                and isinstance(pid[1], StorageType) and isinstance(pid[2], str) and 0 < len(pid[2]) <= 256):
            raise CheckpointFormatError(f"{self.where}: unsupported persistent id {_short(pid)}")
        _, storage_type, key, _location, numel = pid[:5]
        if legacy and pid[5] is not None:
            raise CheckpointFormatError(
                f"{self.where}: storage {key!r} is a view of another storage (written by torch < 1.0); not supported"
            )
        ref = StorageRef(key, storage_type.dtype, checked_int(numel, "storage size", self.where))
        if self.storages is not None:
            seen = self.storages.setdefault(key, ref)
            if seen != ref:
                raise InconsistentCheckpointError(
                    f"{self.where}: storage {key!r} is named as {seen.numel} x {seen.dtype or 'bytes'} and as "
                    f"{ref.numel} x {ref.dtype or 'bytes'}"
                )
        return ref


def safe_loads(data: bytes, where: str, allow_storages: bool | str = False, bounded: bool = True, *,
               storages: dict[str, StorageRef] | None = None) -> Any:
    """Decode ``data`` with the allow-listed unpickler (``allow_storages`` and ``storages``: see
    :class:`SafeUnpickler`).

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
        return _decode(data, where, allow_storages, bounded, storages)
    # Tuples may nest deeper than a normal stack holds while they are hashed (dict keys, set members):
    # decode on a thread whose stack holds the deepest nesting this pickle's size allows.
    stack = max(8 * 2**20, levels * _STACK_PER_LEVEL + 4 * 2**20)
    if stack > _MAX_STACK:
        raise CheckpointFormatError(f"{where}: pickle with {levels} tuple opcodes is too large to decode safely")
    out: list[Any] = []

    def run() -> None:
        try:
            out.append((True, _decode(data, where, allow_storages, bounded, storages)))
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


def _decode(data: bytes, where: str, allow_storages: bool | str, bounded: bool = True,
            storages: dict[str, StorageRef] | None = None) -> Any:
    decode = _Decode(where, 64 * 2**20 + 8 * len(data))
    previous = getattr(_state, "decode", None)
    _state.decode = decode
    try:
        obj = SafeUnpickler(data, where, allow_storages, storages).load()
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


_CONTAINERS = (list, dict, tuple, PickledOrderedDict, set, frozenset, PickledDefaultDict, PickledCounter, NumpyGenerator,
               NumpyBitGenerator, NumpySeedSequence)


def _resolve(obj: Any, depth: int, memo: dict[int, Any]) -> Any:
    """Replace stand-ins (numpy arrays and dtypes, class tokens, byte streams, defaultdicts and Counters, numpy
    random generators) in a decoded object by what they stand for, in place in lists, dicts and records (tuples
    are rebuilt where they change). Shared objects are visited once."""
    kind = type(obj)
    if kind is NumpyArray:
        if obj.array is None:
            raise _fail("a numpy array without its state")
        return obj.array
    if kind is NumpyDtype:
        return obj.dtype
    if kind is _Token:
        return obj.value
    if kind is PickledBytesIO:
        return obj.value()  # a fresh stream for each place the pickle puts it
    if kind is _BitGeneratorClass:
        return f"numpy.random.{obj.name}"
    if kind not in _CONTAINERS and not isinstance(obj, Record):
        return obj
    key = id(obj)
    if key in memo:
        return memo[key]
    if depth > MAX_DEPTH:
        raise _fail(f"the pickle nests containers deeper than {MAX_DEPTH} levels")
    if kind is NumpyGenerator or kind is NumpyBitGenerator:
        memo[key] = _random_state(obj, depth, memo)
        return memo[key]
    if kind is NumpySeedSequence:
        if obj.fields is None:
            raise _fail("a numpy SeedSequence without its state")
        memo[key] = dict(obj.fields)
        return memo[key]
    if kind is PickledDefaultDict or kind is PickledCounter:
        real: dict = collections.defaultdict(obj.factory) if kind is PickledDefaultDict else collections.Counter()
        memo[key] = real
        for k, v in obj.items():
            real[k] = _resolve(v, depth + 1, memo)
        return real
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
