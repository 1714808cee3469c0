"""Packaging: the core supports Python >= 3.10 and imports without the optional ecosystems."""

from __future__ import annotations

import configparser
import glob
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python310():
    cands = glob.glob(os.path.expanduser("~/.pyenv/versions/3.10*/bin/python3.10"))
    return cands[0] if cands else None


@pytest.mark.skipif(_python310() is None, reason="no Python 3.10 interpreter on this machine")
def test_core_compiles_on_python_310():
    files = [
        f
        for f in glob.glob(os.path.join(ROOT, "captum_gim", "**", "*.py"), recursive=True)
        if "pyhealth" not in os.path.basename(f)  # pyhealth needs Python >= 3.12 anyway
    ]
    proc = subprocess.run([_python310(), "-m", "py_compile", *files], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_setup_cfg_declares_what_the_issue_asks():
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, "setup.cfg"))
    assert cfg["options"]["python_requires"].strip() == ">=3.10"
    reqs = cfg["options"]["install_requires"]
    assert "torch>=" in reqs and "captum>=" in reqs
    extras = cfg["options.extras_require"]
    for name in ("transformers", "pyhealth", "docs", "dev"):
        assert name in extras
    assert 'python_version>="3.12"' in extras["pyhealth"]
    assert "captum_gim.cli:main" in cfg["options.entry_points"]["console_scripts"]


def test_core_import_does_not_import_optional_ecosystems():
    code = (
        "import sys, captum_gim, torch; "
        "m = torch.nn.TransformerEncoderLayer(8, 2, 16, batch_first=True); "
        "captum_gim.GIMAttribution(m).attribute(torch.randn(1, 3, 8), target=(0, 0)); "
        "print(sorted(k for k in ('transformers', 'pyhealth') if k in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
