"""Python's cyclic garbage collector paused while jreshard makes many small objects.

Opening a large checkpoint decodes millions of small objects, and planning makes a program of many more; each
full collection rescans every live object (jax's and the caller's included), again and again as the count
grows: half the time of opening a 2,048-rank checkpoint, and of planning one host's share of it. Everything
jreshard makes is freed by reference counting, so pausing the collector loses nothing.
"""

from __future__ import annotations

import contextlib
import gc
import threading

_LOCK = threading.Lock()
_STATE = {"holds": 0, "was_enabled": False}


class gc_paused(contextlib.ContextDecorator):
    """Within it (a ``with`` block or a decorated function), the cyclic garbage collector is off. Nested and
    concurrent pauses (several threads) hold it off until the last one ends; the collector is then as it was
    before the first began, so a collector the caller disabled stays disabled.

    Example:
        >>> import gc
        >>> with gc_paused():
        ...     with gc_paused():
        ...         inner = gc.isenabled()
        ...     outer = gc.isenabled()
        >>> inner, outer, gc.isenabled()
        (False, False, True)
    """

    def __enter__(self) -> gc_paused:
        with _LOCK:
            if not _STATE["holds"]:
                _STATE["was_enabled"] = gc.isenabled()
                gc.disable()
            _STATE["holds"] += 1
        return self

    def __exit__(self, *exc: object) -> None:
        with _LOCK:
            _STATE["holds"] -= 1
            if not _STATE["holds"] and _STATE["was_enabled"]:
                gc.enable()
