"""Every notebook in ``colab/`` runs top to bottom, and is saved without outputs.

nbclient / ipykernel are not dependencies, so a notebook is run the way a kernel would run it, without one: its code
cells, in order, in one namespace, in a fresh Python subprocess whose working directory is ``colab/`` (as Jupyter's
would be). Lines that are IPython syntax (``!shell``, ``%magic``) are blanked; as in IPython, a cell ending in an
expression shows it (``repr``, which also runs the notebooks' display code). The subprocess gets none of the
test session's JAX settings (``XLA_FLAGS``, ``JAX_ENABLE_X64``, ``JAX_PLATFORMS``) and no ``PYTHONPATH``: each
notebook sets up its own devices and finds what it imports, as it must in Colab.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
COLAB = REPO_ROOT / "colab"
NOTEBOOKS = sorted(COLAB.glob("*.ipynb"))
TIMEOUT_S = 300  # per notebook; each takes a few seconds

# Runs the code cells given as a JSON list of strings (argv[1]) like a kernel: one namespace, tracebacks that
# show the cell's code, the value of a final expression printed.
RUNNER = r"""
import ast, json, linecache, sys
cells = json.load(open(sys.argv[1]))
ns = {"__name__": "__main__"}
for i, src in enumerate(cells):
    filename = f"<cell {i}>"
    linecache.cache[filename] = (len(src), None, src.splitlines(True), filename)
    tree = ast.parse(src, filename)
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    exec(compile(tree, filename, "exec"), ns)
    if last is not None:
        value = eval(compile(ast.Expression(last.value), filename, "eval"), ns)
        if value is not None:
            print(repr(value))
    sys.stdout.flush()
"""


def code_cells(path: Path) -> list[str]:
    """The notebook's code cells, IPython-only lines (``!``, ``%``) blanked so line numbers stay."""
    with open(path) as f:
        nb = json.load(f)
    out = []
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        src = cell["source"]
        src = "".join(src) if isinstance(src, list) else src
        lines = ["" if line.lstrip().startswith(("!", "%")) else line for line in src.splitlines()]
        out.append("\n".join(lines) + "\n")
    return out


def notebook_env(tmp: Path) -> dict[str, str]:
    """The test session's environment without its JAX settings and PYTHONPATH; temporary files (the notebooks'
    checkpoints) under ``tmp``."""
    env = dict(os.environ)
    for var in ("XLA_FLAGS", "JAX_ENABLE_X64", "JAX_PLATFORMS", "PYTHONPATH"):
        env.pop(var, None)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", PYTHONUNBUFFERED="1", TMPDIR=str(tmp))
    return env


def test_notebooks_found():
    assert {p.name for p in NOTEBOOKS} >= {"quickstart.ipynb", "port_llama.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_saved_clean(path):
    """No outputs or execution counts are committed."""
    with open(path) as f:
        nb = json.load(f)
    assert nb["nbformat"] == 4
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code":
            assert cell.get("outputs") == [] and cell.get("execution_count") is None, f"{path.name}: cell {i}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, tmp_path):
    cells = tmp_path / "cells.json"
    cells.write_text(json.dumps(code_cells(path)))
    t0 = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, "-c", RUNNER, str(cells)], cwd=str(path.parent),
                              env=notebook_env(tmp_path), capture_output=True, text=True, timeout=TIMEOUT_S,
                              check=False)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{path.name} did not finish in {TIMEOUT_S}s:\n{e.stdout}\n{e.stderr}")
    seconds = time.monotonic() - t0
    assert proc.returncode == 0, (f"{path.name} failed (rc={proc.returncode}, {seconds:.1f}s):\n"
                                  f"{proc.stdout[-5000:]}\n{proc.stderr[-10000:]}")
