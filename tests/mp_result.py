"""The end of a multi-process test child: run its ``main()`` and write the result, or the error, as JSON to a
file (not stdout: gloo prints to stdout from its own threads, which could interleave with a printed result)."""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Callable


def run(main: Callable[[], dict], pid_index: int, result_index: int) -> None:
    """Call ``main``; write its dict (or ``{"ok": False, "error", "traceback"}``) to ``sys.argv[result_index]``
    atomically, then exit 0 when it says ``ok``."""
    try:
        res = main()
    except BaseException as e:  # noqa: BLE001 -- report, then fail
        res = {"pid": sys.argv[pid_index] if len(sys.argv) > pid_index else None, "ok": False,
               "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    path = sys.argv[result_index]
    with open(path + ".tmp", "w") as f:
        json.dump(res, f)
    os.replace(path + ".tmp", path)
    sys.exit(0 if res.get("ok") else 1)
