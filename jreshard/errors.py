"""The exception hierarchy: every error jreshard raises derives from :class:`JReshardError`.

Each message names the tensor and/or the file concerned and what was expected, so that a failed
load says what is wrong with which piece of the checkpoint.
"""

from __future__ import annotations


class JReshardError(Exception):
    """Base class of every jreshard error.

    Example:
        >>> import jreshard
        >>> try:
        ...     jreshard.open("/no/such/checkpoint")
        ... except jreshard.errors.JReshardError as e:
        ...     print(type(e).__name__)
        MissingDataError
    """


class UnsafeCheckpointError(JReshardError):
    """A pickle asked for a global that is not on the allow-list; nothing was executed."""


class CheckpointFormatError(JReshardError):
    """The bytes are not in a format jreshard understands (or are malformed)."""


class MissingDataError(JReshardError):
    """A file, a chunk or an entry the checkpoint refers to does not exist."""


class TruncatedDataError(JReshardError):
    """A file is shorter than the checkpoint's metadata says it is."""


class InconsistentCheckpointError(JReshardError):
    """Metadata and data disagree: holes, overlapping chunks, shapes or dtypes that do not match."""


class TargetMismatchError(JReshardError):
    """The target asks for a name, shape or dtype the checkpoint cannot provide."""


class ShardingError(JReshardError):
    """The target sharding cannot be used for this tensor (e.g. it does not tile the shape evenly)."""


class StorageError(JReshardError):
    """The storage layer (tensorstore KvStore or the local file system) failed to read."""


class CheckpointClosedError(StorageError):
    """The checkpoint was closed (:meth:`jreshard.Checkpoint.close`) before or during this use of it."""


class OutOfMemoryError(JReshardError, MemoryError):
    """A read or load would need more host memory at once than this machine has (e.g. a tensor a file
    declares as a broadcast view of a few bytes, but whose dense size is terabytes)."""


class InvalidArgumentError(JReshardError, ValueError):
    """An argument of a jreshard call is out of range (e.g. ``max_inflight_bytes`` below one element)."""


__all__ = [
    "JReshardError",
    "UnsafeCheckpointError",
    "CheckpointFormatError",
    "MissingDataError",
    "TruncatedDataError",
    "InconsistentCheckpointError",
    "TargetMismatchError",
    "ShardingError",
    "StorageError",
    "CheckpointClosedError",
    "InvalidArgumentError",
    "OutOfMemoryError",
]
