"""The trust boundary: every file name, storage view and size a checkpoint states passes here before it is
used to open, read or allocate anything.

* :func:`checked_name` — a name a checkpoint gives for one of its files (DCP ``relative_path``, an index
  json's ``weight_map`` entries, URL keys) must be a plain relative path that stays inside the checkpoint
  after normalisation: no ``..``, no absolute path, no scheme or host, no NUL or backslash.
* :func:`checked_int`, :func:`checked_shape` — integers read from a file (offsets, sizes, strides, shapes) are
  real ``int``s (not bools, floats or huge values) in range.
* :func:`check_view` — a strided view (size, stride, storage offset) lies inside its storage, and the
  storage inside the bytes that hold it.

Symlinks are not judged here: they are laid out by the user's own tools (a Hugging Face cache snapshot links
into ``../../blobs/``) and are followed; what a name opens must still be a regular file
(:meth:`jreshard.storage.LocalStore.fd`).
"""

from __future__ import annotations

import contextlib
import math
import posixpath
import struct
from typing import Any, Iterator, Sequence

from .errors import (CheckpointFormatError, InconsistentCheckpointError, JReshardError, StorageError,
                     UnsafeCheckpointError)

MAX_NDIM = 64  # torch's own limit on tensor dimensions
MAX_INT = 2**62  # offsets, sizes and byte counts above this are not real files or tensors
MAX_NAME = 4096


def checked_name(name: Any, where: str) -> str:
    """``name`` as a normalised relative path inside the checkpoint, or UnsafeCheckpointError.

    Example:
        >>> checked_name("shards/./__0_0.distcp", "ckpt")
        'shards/__0_0.distcp'
        >>> checked_name("../etc/passwd", "ckpt")
        Traceback (most recent call last):
        ...
        jreshard.errors.UnsafeCheckpointError: ckpt: the checkpoint names the file '../etc/passwd', which is outside it; refused
    """
    if not isinstance(name, str):
        raise UnsafeCheckpointError(f"{where}: a file name in the checkpoint is a {type(name).__name__}, not a string")
    bad = (not name or len(name) > MAX_NAME or "\x00" in name or "\\" in name or name.startswith("/")
           or "://" in name or (len(name) >= 2 and name[1] == ":"))
    norm = posixpath.normpath(name) if not bad else ""
    if bad or norm in (".", "..") or norm.startswith("../") or norm.startswith("/"):
        raise UnsafeCheckpointError(
            f"{where}: the checkpoint names the file {name[:200]!r}, which is outside it; refused"
        )
    return norm


def checked_int(value: Any, what: str, where: str, lo: int = 0, hi: int = MAX_INT) -> int:
    """``value`` if it is an ``int`` (not a bool) in ``[lo, hi]``, else CheckpointFormatError.

    Example:
        >>> checked_int(3, "offset", "f")
        3
        >>> checked_int(2.5, "offset", "f")
        Traceback (most recent call last):
        ...
        jreshard.errors.CheckpointFormatError: f: offset is 2.5, not an integer in [0, 4611686018427387904]
    """
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise CheckpointFormatError(f"{where}: {what} is {_short(value)}, not an integer in [{lo}, {hi}]")
    return int(value)


class Shape(tuple):
    """A tuple of at most MAX_NDIM ints in [0, MAX_INT], as :func:`checked_shape` made it (checking it again
    is free). Equal to, and hashed like, the plain tuple."""

    __slots__ = ()


def checked_shape(values: Any, what: str, where: str, itemsize: int = 1) -> tuple[int, ...]:
    """A shape (or offsets) of at most MAX_NDIM non-negative ints whose element count times ``itemsize``
    stays below MAX_INT bytes.

    Example:
        >>> checked_shape([2, 3], "shape", "f", 4)
        (2, 3)
    """
    kind = type(values)
    if kind is Shape:  # checked already: only the byte size depends on the itemsize
        if math.prod(values) * max(1, itemsize) <= MAX_INT:
            return values
    elif (kind is tuple or kind is list) and len(values) <= MAX_NDIM and all(type(v) is int for v in values):
        out = Shape(values)  # the common case, checked in C-speed builtins
        if not out or (min(out) >= 0 and max(out) <= MAX_INT and math.prod(out) * max(1, itemsize) <= MAX_INT):
            return out
    if not isinstance(values, (tuple, list)) or len(values) > MAX_NDIM:
        raise CheckpointFormatError(f"{where}: {what} is {_short(values)}, not a list of at most {MAX_NDIM} integers")
    out = Shape(checked_int(v, what, where) for v in values)
    if math.prod(out) * max(1, itemsize) > MAX_INT:
        raise CheckpointFormatError(f"{where}: {what} {out} is too large")
    return out


def check_view(size: Sequence[int], stride: Sequence[int], storage_offset: int, itemsize: int,
               storage_nbytes: int, what: str) -> None:
    """A strided view of ``size``/``stride`` (elements) from ``storage_offset`` must lie inside a storage of
    ``storage_nbytes`` bytes: strides and offset are non-negative ints, ranks agree.

    Example:
        >>> check_view((2, 3), (3, 1), 0, 4, 24, "t")
        >>> check_view((2, 3), (3, 1), 1, 4, 24, "t")
        Traceback (most recent call last):
        ...
        jreshard.errors.InconsistentCheckpointError: t: size (2, 3), stride (3, 1), storage offset 1 reaches byte 28 of a storage of 24 bytes
    """
    size = checked_shape(size, "size", what, itemsize)
    if not isinstance(stride, (tuple, list)) or len(stride) > MAX_NDIM:
        raise CheckpointFormatError(f"{what}: stride {_short(stride)} is not a list of integers")
    stride = tuple(checked_int(s, "stride", what) for s in stride)
    offset = checked_int(storage_offset, "storage offset", what)
    if len(stride) != len(size):
        raise InconsistentCheckpointError(f"{what}: size {size} and stride {stride} differ in rank")
    if math.prod(size) == 0:
        return
    end = (offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1) * itemsize
    if end > storage_nbytes:
        raise InconsistentCheckpointError(
            f"{what}: size {size}, stride {stride}, storage offset {offset} reaches byte {end} of a storage of "
            f"{storage_nbytes} bytes"
        )


@contextlib.contextmanager
def decoding(where: str) -> Iterator[None]:
    """Decode untrusted bytes inside this block: an error that is not a jreshard error (a ``struct.error`` on
    a short record, a ``KeyError`` on a missing field ...) becomes a CheckpointFormatError naming ``where``.

    The checks that stop hostile inputs are explicit (the functions above); this is the net under them, so
    that no input surfaces as anything but a JReshardError.

    Example:
        >>> with decoding("f.bin"):
        ...     {}["missing"]
        Traceback (most recent call last):
        ...
        jreshard.errors.CheckpointFormatError: f.bin: malformed checkpoint data (KeyError: "'missing'")
    """
    try:
        yield
    except JReshardError:
        raise
    except MemoryError:
        raise CheckpointFormatError(f"{where}: the checkpoint asks for more memory than there is") from None
    except OSError as e:
        raise StorageError(f"{where}: {e}") from None
    except (struct.error, TypeError, KeyError, IndexError, ValueError, OverflowError, AttributeError,
            RecursionError, UnicodeError) as e:
        raise CheckpointFormatError(f"{where}: malformed checkpoint data ({type(e).__name__}: {_short(str(e))})") from None


def _short(value: Any) -> str:
    """A bounded repr of an untrusted value (never the whole of a huge or deep object)."""
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxstring, r.maxother, r.maxlong = 3, 60, 60, 40
    return r.repr(value)
