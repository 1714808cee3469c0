"""Every tutorial in ``tutorials/`` runs, as a notebook, on a CPU in under three minutes.

The tutorials are jupytext percent-format scripts (stored without outputs). Each is
converted to a notebook with jupytext and executed with nbclient in a fresh kernel, in a
temporary directory (``$CAPTUM_GIM_TUTORIAL_OUT`` points there too, so nothing is
written into the checkout), with matplotlib's Agg backend. Any cell error fails the test,
and so does a GIM warning that a module kept its plain gradient or that the recomputed
attention did not match the model's.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = sorted((ROOT / "tutorials").glob("*.py"))
LIMIT_S = 180

#: optional packages a tutorial needs (skipped without them)
NEEDS = {
    "pyhealth_ehr": ("pyhealth",),
    "llm_tiny_llama": ("transformers", "tokenizers"),
    "vision_digits": ("sklearn",),
}
#: files a tutorial must write under $CAPTUM_GIM_TUTORIAL_OUT (or the working directory)
WRITES = {
    "text_classification": ("text_classification/gim_vs_ig.html",),
    "vision_digits": ("vision_digits/gim_vs_ig.png", "vision_digits/example0_gim.png"),
    "llm_tiny_llama": ("llm_tiny_llama/token_attr_gim.png", "llm_tiny_llama/token_attr_ig.png"),
    "pyhealth_ehr": ("pyhealth_ehr/codes_gim_vs_ig.png", "pyhealth_ehr/labs_over_time.png"),
}
#: warnings that mean GIM did not do what the tutorial's text says it does
GIM_WARNINGS = ("UnmatchedModulesWarning", "GIMAttentionMismatchWarning")

pytestmark = pytest.mark.slow


def test_tutorials_exist() -> None:
    names = {p.stem for p in TUTORIALS}
    assert {"text_classification", "vision_digits", "llm_tiny_llama", "pyhealth_ehr"} <= names


@pytest.mark.parametrize("path", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_runs(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    jupytext = pytest.importorskip("jupytext")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    for package in NEEDS.get(path.stem, ()):
        pytest.importorskip(package)

    notebook = jupytext.read(path)
    assert not any(c.get("outputs") for c in notebook.cells if c.cell_type == "code"), (
        f"{path.name} is stored with outputs"
    )
    out = tmp_path / "out"
    monkeypatch.setenv("CAPTUM_GIM_TUTORIAL_OUT", str(out))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    start = time.perf_counter()
    client = nbclient.NotebookClient(
        notebook,
        timeout=LIMIT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()
    elapsed = time.perf_counter() - start
    assert elapsed < LIMIT_S, f"{path.name} took {elapsed:.0f}s (limit {LIMIT_S}s)"
    for rel in WRITES.get(path.stem, ()):
        assert (out / rel).exists(), f"{path.name} did not write {rel}"
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    errors = [o for o in outputs if o.get("output_type") == "error"]
    assert not errors
    stderr = "".join(
        o.get("text", "") for o in outputs if o.get("output_type") == "stream" and o.get("name") == "stderr"
    )
    assert not any(w in stderr for w in GIM_WARNINGS), stderr[-3000:]
