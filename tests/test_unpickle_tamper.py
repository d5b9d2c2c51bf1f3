"""A pickle must not be able to change the allow-listed stand-ins it is given (they are shared by every
later load in the process), nor reach anything outside the list."""

from __future__ import annotations

import pickletools

import numpy as np
import pytest

from jreshard.errors import JReshardError, UnsafeCheckpointError
from jreshard.unpickle import safe_loads


def _build_on(module: str, name: str, attr: str, value: bytes) -> bytes:
    """A protocol-2 pickle: GLOBAL module.name, then BUILD with slot state {attr: value}."""
    head = f"\x80\x02c{module}\n{name}\n".encode("latin-1")
    state = b"(N}X" + len(attr).to_bytes(4, "little") + attr.encode() + value + b"stb."
    return head + state


def _str(s: str) -> bytes:
    return b"X" + len(s).to_bytes(4, "little") + s.encode()


@pytest.mark.parametrize(
    "module,name,attr,value",
    [
        ("torch", "float32", "name", _str("int8")),  # would make every later float32 tensor int8
        ("torch", "Size", "__defaults__", b"(K\x01t"),  # function attributes
        ("torch._utils", "_rebuild_tensor_v2", "__kwdefaults__", b"}"),
        ("torch.distributed.checkpoint.metadata", "Metadata", "_fields", _str("x")),  # class attributes
        ("pathlib", "PosixPath", "_flavour", _str("x")),
    ],
)
def test_build_on_allowed_global_is_refused(module, name, attr, value):
    data = _build_on(module, name, attr, value)
    assert [op.name for op, _, _ in pickletools.genops(data)][-2:] == ["BUILD", "STOP"]  # well-formed
    with pytest.raises(JReshardError):
        safe_loads(data, "tampering pickle")
    # The shared stand-in is unchanged: a plain pickle of the same global still decodes as before.
    if name == "float32":
        dtype = safe_loads(f"\x80\x02c{module}\n{name}\n.".encode("latin-1"), "plain")
        assert dtype.numpy() == np.dtype(np.float32)


def test_unlisted_global_is_refused_and_not_called(tmp_path):
    marker = tmp_path / "ran"
    data = b"\x80\x02cos\nsystem\n" + _str(f"touch {marker}") + b"\x85R."
    with pytest.raises(UnsafeCheckpointError, match="os.system"):
        safe_loads(data, "evil")
    assert not marker.exists()
