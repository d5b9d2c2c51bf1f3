"""Dtype names of torch and safetensors, mapped to numpy / ml_dtypes dtypes."""

from __future__ import annotations

import ml_dtypes
import numpy as np

from .errors import CheckpointFormatError, UnsafeCheckpointError

# torch dtype attribute name -> numpy dtype (None: no numpy equivalent).
TORCH_DTYPES: dict[str, np.dtype | None] = {
    "float64": np.dtype(np.float64),
    "double": np.dtype(np.float64),
    "float32": np.dtype(np.float32),
    "float": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "half": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
    "float8_e4m3fnuz": np.dtype(ml_dtypes.float8_e4m3fnuz),
    "float8_e5m2fnuz": np.dtype(ml_dtypes.float8_e5m2fnuz),
    "float8_e8m0fnu": np.dtype(ml_dtypes.float8_e8m0fnu),
    "int8": np.dtype(np.int8),
    "int16": np.dtype(np.int16),
    "short": np.dtype(np.int16),
    "int32": np.dtype(np.int32),
    "int": np.dtype(np.int32),
    "int64": np.dtype(np.int64),
    "long": np.dtype(np.int64),
    "uint8": np.dtype(np.uint8),
    "uint16": np.dtype(np.uint16),
    "uint32": np.dtype(np.uint32),
    "uint64": np.dtype(np.uint64),
    "bool": np.dtype(np.bool_),
    "complex64": np.dtype(np.complex64),
    "cfloat": np.dtype(np.complex64),
    "complex128": np.dtype(np.complex128),
    "cdouble": np.dtype(np.complex128),
    # Known to torch, no numpy equivalent: refused with a clear error when used.
    "complex32": None,
    "chalf": None,
    "float4_e2m1fn_x2": None,
    "qint8": None,
    "quint8": None,
    "qint32": None,
    "quint4x2": None,
    "quint2x4": None,
}

# Legacy typed storage class name (torch.FloatStorage ...) -> torch dtype name.
TORCH_STORAGES: dict[str, str] = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
}

# safetensors dtype string -> numpy dtype (None: no numpy equivalent).
SAFETENSORS_DTYPES: dict[str, np.dtype | None] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
    "I8": np.dtype(np.int8),
    "I16": np.dtype(np.int16),
    "I32": np.dtype(np.int32),
    "I64": np.dtype(np.int64),
    "U8": np.dtype(np.uint8),
    "U16": np.dtype(np.uint16),
    "U32": np.dtype(np.uint32),
    "U64": np.dtype(np.uint64),
    "BOOL": np.dtype(np.bool_),
    "C64": np.dtype(np.complex64),
    "C128": np.dtype(np.complex128),
    "F4": None,
    "F6_E2M3": None,
    "F6_E3M2": None,
}


class TorchDtype:
    """Stand-in for a ``torch.dtype`` met in a pickle: carries the name, resolves to numpy lazily."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        object.__setattr__(self, "name", name)

    def __setattr__(self, key: str, value: object) -> None:
        # Shared by every unpickler (it is on the allow-list): a pickle must not be able to change it.
        raise UnsafeCheckpointError(f"a pickle tried to modify torch.{self.name}")

    def __setstate__(self, state: object) -> None:
        raise UnsafeCheckpointError(f"a pickle tried to set the state of torch.{self.name} (BUILD); refused")

    def __repr__(self) -> str:
        return f"torch.{self.name}"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TorchDtype) and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)

    def numpy(self, where: str = "") -> np.dtype:
        """The numpy dtype, or a CheckpointFormatError naming ``where`` if there is none."""
        dt = TORCH_DTYPES.get(self.name)
        if dt is None:
            raise CheckpointFormatError(
                f"{where}: torch dtype torch.{self.name} has no numpy equivalent; "
                "convert it in torch (e.g. .to(torch.float32)) before saving"
            )
        return dt


def safetensors_dtype(name: str, where: str) -> np.dtype:
    """Numpy dtype of a safetensors dtype string; a clear error for those numpy cannot hold."""
    if name not in SAFETENSORS_DTYPES:
        raise CheckpointFormatError(f"{where}: unknown safetensors dtype {name!r}")
    dt = SAFETENSORS_DTYPES[name]
    if dt is None:
        raise CheckpointFormatError(
            f"{where}: safetensors dtype {name} has no numpy equivalent; it cannot be loaded into JAX"
        )
    return dt
