"""The documentation site: ``mkdocs build --strict`` succeeds and renders the pages and the API reference.

Strict mode turns every warning into a failure: a page missing from the nav, a relative link or an anchor
that does not resolve (``validation`` in mkdocs.yml), a cross-reference mkdocstrings cannot find, a docstring
griffe cannot parse. The second test checks that a broken link really fails the build with this config.
"""

from __future__ import annotations

import html
import inspect
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jreshard
import jreshard.errors

ROOT = Path(__file__).resolve().parents[1]

# Pages of the site (besides the API reference) and a phrase each must hold.
PAGES = {
    "index.html": "xla_force_host_platform_device_count=8",
    "pipeline/index.html": "max_inflight_bytes",
    "formats/index.html": "pytorch_model.bin.index.json",
    "remote/index.html": "GOOGLE_APPLICATION_CREDENTIALS",
    "multihost/index.html": "jax.distributed.initialize",
    "porting/index.html": "Stacking layers",
    "orbax/index.html": "TorchCheckpointManager",
    "convert/index.html": "Atomicity",
    "saving/index.html": "save_dcp",
    "saving_safetensors/index.html": "save_safetensors",
    "security/index.html": "allow-listed unpickler",
    "cli/index.html": "PATTERN=SPEC;PATTERN=SPEC",
    "benchmarks/index.html": "benchmarks/restore.py",
    "architecture/index.html": "make_array_from_single_device_arrays",
}

API = ["open", "load", "plan", "sample_path", "target_for", "parse_rules", "Checkpoint", "TensorInfo", "Plan",
       "ProcessPlan", "saved", "stack", "concat", "View", "rename", "torch_layout", "TorchLayout", "Shard",
       "Replicate", "StridedShard", "save_dcp", "save_safetensors", "invert", "convert", "ConvertError"]
ORBAX = ["TorchCheckpointHandler", "TorchRestore", "TorchStepNameFormat", "TorchCheckpointManager",
         "SaveNotSupportedError"]


def _build(cwd: Path, site: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False)


def _text(page: Path) -> str:
    """The visible text of a page: tags dropped (highlighted code is split into spans), entities decoded,
    whitespace collapsed."""
    return " ".join(html.unescape(re.sub(r"<[^>]+>", "", page.read_text())).split())


def _plain(doc: str) -> str:
    """A docstring line as the site shows it: Sphinx roles and backticks dropped, whitespace collapsed."""
    doc = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", doc)
    return " ".join(doc.replace("`", "").split())


def test_site_builds_strict(tmp_path: Path) -> None:
    site = tmp_path / "site"
    r = _build(ROOT, site)
    assert r.returncode == 0, f"mkdocs build --strict failed:\n{r.stdout}\n{r.stderr}"

    for page, phrase in PAGES.items():
        assert (site / page).is_file(), page
        assert phrase in _text(site / page), (page, phrase)
    assert 'pip install "jreshard[cli]"' in _text(site / "index.html")

    api_html = (site / "api/jreshard/index.html").read_text()
    api = _text(site / "api/jreshard/index.html")
    for name in API:
        assert f'id="jreshard.{name}"' in api_html, f"jreshard.{name} is not in the API reference"
        summary = _plain(inspect.getdoc(getattr(jreshard, name)).split("\n\n")[0])[:60]
        assert summary in api, (name, summary)
    # Methods are documented under their class, with their docstrings.
    assert 'id="jreshard.Checkpoint.read"' in api_html
    assert _plain(inspect.getdoc(jreshard.Checkpoint.read).split("\n")[0])[:50] in api
    # "Example:" sections render as code (not as block quotes of ">>>"), and no Sphinx role is left raw.
    assert "<blockquote>" not in api_html
    assert api_html.count('<span class="gp">&gt;&gt;&gt; </span>') > 20  # highlighted doctest prompts
    for page in ("api/jreshard/index.html", "api/errors/index.html", "api/orbax/index.html"):
        assert not re.search(r":(func|class|meth|mod):", _text(site / page)), page
    # Cross-references in docstrings became links (":func:`jreshard.load`" in convert's docstring).
    assert re.search(r'<a class="autorefs autorefs-internal"[^>]*href="#jreshard\.load"', api_html)

    errors_html = (site / "api/errors/index.html").read_text()
    for name in jreshard.errors.__all__:
        assert f'id="jreshard.errors.{name}"' in errors_html, name
    orbax_html = (site / "api/orbax/index.html").read_text()
    for name in ORBAX:
        assert f'id="jreshard.orbax.{name}"' in orbax_html, name


def test_broken_link_fails_the_build(tmp_path: Path) -> None:
    """The strict build refuses a relative link to a missing page and an anchor that does not exist."""
    work = tmp_path / "repo"
    work.mkdir()
    shutil.copy(ROOT / "mkdocs.yml", work / "mkdocs.yml")
    shutil.copytree(ROOT / "docs", work / "docs")
    (work / "jreshard").symlink_to(ROOT / "jreshard", target_is_directory=True)
    page = work / "docs" / "formats.md"
    page.write_text(page.read_text() + "\nSee [nowhere](no_such_page.md) and [here](remote.md#no-such-anchor).\n")
    r = _build(work, tmp_path / "site")
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert re.search(r"WARNING.*formats\.md.*no_such_page\.md", out), out
    assert re.search(r"WARNING.*formats\.md.*no-such-anchor", out), out
