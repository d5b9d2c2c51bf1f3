"""Every notebook in ``colab/`` runs top to bottom in a real Jupyter kernel, and is saved without outputs.

Each notebook is executed by nbclient in an ipykernel kernel (this interpreter's), as Jupyter or Colab would run
it: IPython syntax included (the ``%pip install`` line really runs pip, which finds the package installed), in
``colab/`` as working directory, every cell's value displayed through its rich reprs (``_repr_html_`` ...). The
kernel gets none of the test session's JAX settings (``XLA_FLAGS``, ``JAX_*``) and no ``PYTHONPATH``: each
notebook sets up its own devices and finds what it imports, as it must in Colab.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
COLAB = REPO_ROOT / "colab"
NOTEBOOKS = sorted(COLAB.glob("*.ipynb"))
CELL_TIMEOUT_S = 300  # per cell; a whole notebook takes seconds to a minute
STARTUP_TIMEOUT_S = 120


def notebook_env(tmp: Path) -> dict[str, str]:
    """The test session's environment without its JAX settings and PYTHONPATH; temporary files (the notebooks'
    checkpoints) under ``tmp``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    for var in ("XLA_FLAGS", "PYTHONPATH"):
        env.pop(var, None)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", PYTHONUNBUFFERED="1", TMPDIR=str(tmp),
               PIP_DISABLE_PIP_VERSION_CHECK="1")
    return env


def run_notebook(path: Path, tmp: Path):
    """The notebook at ``path`` executed in a fresh kernel (its outputs filled in); fails the test on an error."""
    import nbclient  # the test extra's nbclient and ipykernel (a missing one fails the test, never skips it)
    import nbformat
    from nbclient.exceptions import (
        CellExecutionError,
        CellTimeoutError,
        DeadKernelError,
    )

    nb = nbformat.read(str(path), as_version=4)
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, startup_timeout=STARTUP_TIMEOUT_S,
                                     kernel_name="python3", resources={"metadata": {"path": str(path.parent)}})
    try:
        client.execute(env=notebook_env(tmp), cwd=str(path.parent))
    except (CellExecutionError, CellTimeoutError, DeadKernelError) as e:
        pytest.fail(f"{path.name} failed: {type(e).__name__}:\n{str(e)[-10000:]}")
    return nb


def outputs(nb, mime: str) -> list[str]:
    """Every output of the notebook's code cells of type ``mime`` (``"stream"`` for printed text)."""
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            if mime == "stream" and o.get("output_type") == "stream":
                out.append(o.get("text", ""))
            elif mime in o.get("data", {}):
                data = o["data"][mime]
                out.append("".join(data) if isinstance(data, list) else data)
    return out


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


def test_quickstart_is_colab_ready():
    """The first code cell installs the package as a Colab user would; the notebook uses the public API only."""
    with open(COLAB / "quickstart.ipynb") as f:
        nb = json.load(f)
    code = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    assert code[0].strip() == '%pip install -q "jreshard[cli]"'
    assert "jreshard.cli" not in "".join(code)
    assert 'os.environ.setdefault("XLA_FLAGS"' in code[1] and code[1].index("setdefault") < code[1].index("import jax")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, tmp_path):
    nb = run_notebook(path, tmp_path)
    errors = [o for cell in nb.cells for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors
    if path.name == "quickstart.ipynb":
        pip = next(c for c in nb.cells if c.cell_type == "code")
        assert "restart the kernel" in "".join(o.get("text", "") for o in pip.outputs), pip.outputs  # %pip ran
        html = "\n".join(outputs(nb, "text/html"))
        assert "jreshard.Checkpoint" in html and "saved grid" in html  # the checkpoint's table
        assert "amplification" in html and "<svg" in html  # the plan's tables and its picture
        assert html.count("<svg") >= 2  # and the picture of one tensor
        printed = "\n".join(outputs(nb, "stream"))
        assert "each equal to ckpt.read" in printed
