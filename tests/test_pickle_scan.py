"""The opcode pre-scan that runs before any pickle reaches the C unpickler (jreshard.pickle_scan).

Its fast path skips runs of harmless opcodes with one regex match; these tests hold it to a plain
opcode-by-opcode walk written here from pickletools' opcode table (the oracle), on real pickles of every
protocol and on mutations of them, and check that a dangerous number anywhere in a long run is found.
"""

from __future__ import annotations

import pickle
import pickletools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jreshard.errors import CheckpointFormatError
from jreshard.pickle_scan import check_opcodes

_LENGTH_BYTES = {"string1": 1, "bytes1": 1, "unicodestring1": 1, "long1": 1, "string4": 4, "bytes4": 4,
                 "unicodestring4": 4, "long4": 4, "bytes8": 8, "bytearray8": 8, "unicodestring8": 8}
_OPS = {op.code.encode("latin-1")[0]: op for op in pickletools.opcodes}


def oracle(data: bytes) -> tuple[str, int] | None:
    """What must be refused, found one opcode at a time: (kind, byte) of the first unknown opcode, or memo
    index / frame length / argument length larger than the pickle; None if there is none before STOP."""
    n, pos = len(data), 0
    while pos < n:
        op = _OPS.get(data[pos])
        if op is None:
            return ("opcode", pos)
        arg = op.arg
        if op.name == "STOP":
            return None
        if arg is None:
            pos += 1
        elif arg.n >= 0:
            value = int.from_bytes(data[pos + 1 : pos + 1 + arg.n], "little")
            if op.name in ("LONG_BINPUT", "FRAME") and value > n:
                return ("number", pos)
            pos += 1 + arg.n
        elif arg.name in _LENGTH_BYTES:
            width = _LENGTH_BYTES[arg.name]
            length = int.from_bytes(data[pos + 1 : pos + 1 + width], "little")
            if length > n:
                return ("number", pos)
            pos += 1 + width + length
        else:  # newline-terminated argument(s)
            end = data.find(b"\n", pos + 1)
            if arg.name == "stringnl_noescape_pair" and end >= 0:
                end = data.find(b"\n", end + 1)
            if end < 0:
                return None
            if op.name == "PUT":
                try:
                    if int(data[pos + 1 : end]) > n:
                        return ("number", pos)
                except ValueError:
                    pass
            pos = end + 1
    return None


def scan(data: bytes) -> tuple[str, int] | None:
    try:
        check_opcodes(data, "t")
    except CheckpointFormatError as e:
        msg = str(e)
        pos = int(msg.split(" at byte ")[1].split()[0].rstrip(")"))
        return ("opcode" if "unknown opcode" in msg else "number", pos)
    return None


values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=300)
    | st.binary(max_size=300),
    lambda inner: st.lists(inner, max_size=6) | st.tuples(inner, inner) | st.dictionaries(st.text(max_size=8), inner,
                                                                                        max_size=6),
    max_leaves=40,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values, st.integers(0, 5), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=4))
def test_scan_equals_opcode_walk_on_mutated_pickles(value, protocol, edits):
    data = bytearray(pickle.dumps(value, protocol=protocol))
    for where, byte in edits:
        data[where % len(data)] = byte
    data = bytes(data)
    assert scan(data) == oracle(data)


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
@pytest.mark.parametrize("bad", [b"r\xff\xff\xff\x7f", b"\x95\xff\xff\xff\xff\xff\x00\x00\x00",
                                 b"\x96\xff\xff\xff\xff\xff\x00\x00\x00", b"p99999999999\n"])
def test_a_dangerous_number_after_a_long_run_of_fast_opcodes_is_refused(protocol, bad):
    # A pickle of many small tuples (hundreds of thousands of opcodes the regex skips), then the bad opcode
    # in place of its STOP.
    body = pickle.dumps([(i, -i, i * 70000) for i in range(50_000)], protocol=protocol)
    assert body.endswith(b".")
    data = body[:-1] + bad + b"."
    assert oracle(data) == ("number", len(body) - 1)
    with pytest.raises(CheckpointFormatError, match=f"at byte {len(body) - 1} is beyond the pickle's size"):
        check_opcodes(data, "t")
    check_opcodes(body, "t")  # the same pickle without it passes
