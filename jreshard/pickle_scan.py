"""A structural pass over a pickle's opcodes, run before the C unpickler sees it.

CPython's C unpickler trusts two kinds of numbers in the stream before it has checked anything else:

* a memo index (``PUT``, ``LONG_BINPUT``): the memo is an array grown to twice the index and zero-filled,
  so a 9-byte pickle ``LONG_BINPUT 0x7fffffff`` asks for 32 GiB and touches it (a kill for memory);
* an argument length (``BINBYTES8``, ``BYTEARRAY8``, ``BINUNICODE8`` ...): ``BYTEARRAY8`` allocates the
  length it reads before reading the bytes.

:func:`check_opcodes` walks the opcodes (without building anything) and refuses a memo index or an argument
length larger than the pickle itself, and opcodes that do not exist. A pickle written by Python numbers its
memo entries from 0 upwards, one per memoised object, so every index it uses is smaller than its size.
"""

from __future__ import annotations

import pickletools
import re

from .errors import CheckpointFormatError

# Per opcode byte: >= 0 a fixed argument length; _NL a newline-terminated argument, _NL2 two of them;
# _L1 / _L4 / _L8 a little-endian length of 1, 4 or 8 bytes followed by that many bytes.
_NL, _NL2, _L1, _L4, _L8 = -1, -2, -3, -4, -5
_KINDS = {"decimalnl_short": _NL, "decimalnl_long": _NL, "stringnl": _NL, "stringnl_noescape": _NL,
          "unicodestringnl": _NL, "floatnl": _NL, "stringnl_noescape_pair": _NL2, "string1": _L1, "bytes1": _L1,
          "unicodestring1": _L1, "long1": _L1, "string4": _L4, "bytes4": _L4, "unicodestring4": _L4,
          "long4": _L4, "bytes8": _L8, "bytearray8": _L8, "unicodestring8": _L8}


def _table() -> list[int | None]:
    table: list[int | None] = [None] * 256
    for op in pickletools.opcodes:
        arg = 0 if op.arg is None else (op.arg.n if op.arg.n >= 0 else _KINDS[op.arg.name])
        table[ord(op.code)] = arg
    return table


_ARG = _table()
_STOP, _PUT, _LONG_BINPUT, _FRAME, _LONG1 = ord("."), ord("p"), ord("r"), 0x95, 0x8A


def _fast_pattern() -> re.Pattern[bytes]:
    """A run of opcodes that need no check: those without an argument (STOP aside), with a fixed-length argument
    (LONG_BINPUT and FRAME aside, whose numbers are checked), and LONG1 (a length byte of 1 to 8, then that many
    bytes): almost every opcode of a large pickle, matched by the C regex engine instead of a Python loop."""
    def cls(codes: list[int]) -> bytes:
        return b"[" + b"".join(re.escape(bytes([c])) for c in codes) + b"]"

    by_len: dict[int, list[int]] = {}
    for code, arg in enumerate(_ARG):
        if arg is not None and arg >= 0 and code not in (_STOP, _LONG_BINPUT, _FRAME):
            by_len.setdefault(arg, []).append(code)
    alts = [cls(codes) + (b".{%d}" % n if n else b"") for n, codes in sorted(by_len.items())]
    alts.append(re.escape(bytes([_LONG1])) + b"(?:" + b"|".join(re.escape(bytes([k])) + b".{%d}" % k
                                                            for k in range(1, 9)) + b")")
    return re.compile(b"(?:" + b"|".join(alts) + b")*+", re.DOTALL)


_FAST = _fast_pattern()


def check_opcodes(data: bytes, where: str) -> None:
    """Refuse (CheckpointFormatError) unknown opcodes, memo indices or argument lengths beyond the pickle's
    size. Stops at STOP; a stream cut short is left to the unpickler, which reports it.

    Runs of opcodes that cannot carry such a number are skipped by one regex match (:data:`_FAST`); every other
    opcode is checked here, one at a time. The walk is the same either way: each opcode's argument is skipped.

    Example:
        >>> import pickle
        >>> check_opcodes(pickle.dumps({"a": [1, 2]}, protocol=2), "ok")
        >>> check_opcodes(b"\\x80\\x02Nr\\xff\\xff\\xff\\x7f.", "memo")
        Traceback (most recent call last):
        ...
        jreshard.errors.CheckpointFormatError: memo: pickle memo index 2147483647 at byte 3 is beyond the pickle's size; refused
    """
    table, n, pos = _ARG, len(data), 0
    find, from_bytes, fast = data.find, int.from_bytes, _FAST.match
    while pos < n:
        pos = fast(data, pos).end()
        if pos >= n:
            return
        code = data[pos]
        arg = table[code]
        if arg is None:
            raise CheckpointFormatError(f"{where}: not a pickle (unknown opcode {code:#04x} at byte {pos})")
        if arg >= 0:
            if code == _LONG_BINPUT and from_bytes(data[pos + 1 : pos + 5], "little") > n:
                raise _beyond(where, "memo index", from_bytes(data[pos + 1 : pos + 5], "little"), pos)
            if code == _FRAME and from_bytes(data[pos + 1 : pos + 9], "little") > n:
                raise _beyond(where, "frame length", from_bytes(data[pos + 1 : pos + 9], "little"), pos)
            if code == _STOP:
                return
            pos += 1 + arg
        elif arg == _NL:
            end = find(b"\n", pos + 1)
            if end < 0:
                return
            if code == _PUT:
                try:
                    idx = int(data[pos + 1 : end])
                except ValueError:
                    idx = 0  # the unpickler refuses it
                if idx > n:
                    raise _beyond(where, "memo index", idx, pos)
            pos = end + 1
        elif arg == _NL2:
            first = find(b"\n", pos + 1)
            end = find(b"\n", first + 1) if first >= 0 else -1  # (not from 0: the walk never goes back)
            if end < 0:
                return
            pos = end + 1
        else:
            width = 1 if arg == _L1 else 4 if arg == _L4 else 8
            length = from_bytes(data[pos + 1 : pos + 1 + width], "little")
            if length > n:
                raise _beyond(where, "argument length", length, pos)
            pos += 1 + width + length


def _beyond(where: str, what: str, value: int, pos: int) -> CheckpointFormatError:
    return CheckpointFormatError(f"{where}: pickle {what} {value} at byte {pos} is beyond the pickle's size; refused")
