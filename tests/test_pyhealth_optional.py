"""PyHealth stays optional: the core never imports it, and captum_gim.pyhealth says how to
install it when it is missing. Runs with or without PyHealth installed."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest


def test_core_import_does_not_import_pyhealth():
    code = (
        "import sys, captum_gim, captum_gim.adapters, captum_gim.viz; "
        "import captum_gim.rules; "
        "bad = [m for m in ('pyhealth', 'captum_gim.rules.pyhealth') if m in sys.modules]; "
        "sys.exit(1 if bad else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_missing_pyhealth_gives_the_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyhealth", None)  # "import pyhealth" now fails
    for name in ("captum_gim.pyhealth", "captum_gim.adapters.pyhealth"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    with pytest.raises(ImportError, match=r"pip install captum-gim\[pyhealth\]"):
        importlib.import_module("captum_gim.pyhealth")


def test_timeseries_plot_is_backend_free():
    torch = pytest.importorskip("torch")
    pytest.importorskip("matplotlib")
    from captum_gim.viz import plot_timeseries_attributions

    attr = torch.tensor([[0.5, -1.0], [0.0, 2.0], [0.0, 0.0]])
    ax = plot_timeseries_attributions(
        attr,
        feature_names=["hr", "bp"],
        time_labels=["d1", "d2", "pad"],
        values=attr * 10,
        mask=torch.tensor([True, True, False]),
        title="patient 0",
    )
    assert [t.get_text() for t in ax.get_xticklabels()] == ["d1", "d2"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["hr", "bp"]
    import io

    ax.figure.savefig(io.BytesIO(), format="png")
    with pytest.raises(ValueError, match="one patient"):
        plot_timeseries_attributions(torch.zeros(2, 3, 4))
