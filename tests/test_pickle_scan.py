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


def _scan_finishes(data: bytes) -> tuple[bool, object]:
    """Run the scan in a thread: (whether it returned within a minute, its result or error)."""
    import threading

    out: list[object] = []

    def run() -> None:
        try:
            out.append(scan(data))
        except Exception as e:  # noqa: BLE001 (reported to the test)
            out.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(60)
    return (not t.is_alive(), out[0] if out else None)


@pytest.mark.parametrize("data", [
    b"\x80\x02Sabc\ncmod",  # GLOBAL with no newline after it, a newline before it: the walk went back, forever
    b"\x80\x02Sabc\nSdef\ncmod",
    b"Sabc\n\x93",  # STACK_GLOBAL takes no argument; then the stream ends
    b"\x80\x04cmod\nname",  # one newline of two
    b"\ncx",
])
def test_a_pair_of_lines_cut_short_ends_the_scan(data):
    """An opcode with two newline-terminated arguments (GLOBAL, INST) and fewer newlines after it: the stream
    is cut short (left to the unpickler), and the scan must end, however many newlines come before it."""
    finished, result = _scan_finishes(data)
    assert finished, f"the scan of {data!r} did not end"
    assert result == oracle(data)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from([b"\n", b"c", b"i", b"S", b"N", b"a", b"(", b"\x80\x02", b"x"]), max_size=40))
def test_the_scan_ends_on_any_mix_of_line_opcodes_and_newlines(parts):
    data = b"".join(parts)
    finished, result = _scan_finishes(data)
    assert finished, f"the scan of {data!r} did not end"
    assert result == oracle(data)
