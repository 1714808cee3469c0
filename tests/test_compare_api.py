"""captum_gim.compare on a model the user defines: the same methods and metrics as the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

import captum_gim
from captum_gim.evaluation.report import Report


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.norm = nn.LayerNorm(8)
        self.out = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x + self.attn(x, x, x, need_weights=False)[0])
        return self.out(h.mean(1))


@pytest.fixture(scope="module")
def report() -> Report:
    torch.manual_seed(0)
    net = Tiny().eval()
    examples = []
    for i in range(6):
        x = torch.randn(1, 5, 8)
        examples.append({"inputs": x, "target": i % 2, "baselines": torch.zeros_like(x),
                         "evidence": torch.tensor([True, False, False, False, False])})
    return captum_gim.compare(net, examples, reduce_dims=1, steps=(4,), samples=(3,),
                              n_bootstrap=50, infidelity_samples=3, gradshap_samples=3)


@pytest.mark.slow
def test_same_methods_as_the_cli(report):
    keys = [m.key for m in report.methods]
    for k in ("gim", "gim-off", "ig@1", "ig@2", "ig@4", "ig", "ig-gim@4", "ig-gim", "saliency",
              "ixg", "gradshap", "nt-gim", "random"):
        assert k in keys
    gim = report.method("gim")
    assert gim.metrics["gt_auroc"].n == 6 and gim.passes == 1
    assert gim.gim_rules["installed"] == {"torch.nn.MultiheadAttention": 1, "torch.nn.LayerNorm": 1}
    assert report.method("ig@4").passes == 4
    assert report.frontier["by_cost"]["passes"]["comprehensiveness_aopc"]["frontier"]


@pytest.mark.slow
def test_outputs(report, tmp_path):
    assert report.table().splitlines()[0].split()[:2] == ["Method", "Baseline"]
    data = json.loads(report.to_json())
    assert data["sweep"]["budgets"]["ig"] == [1, 2, 4, 50]
    assert Report.from_dict(data).method("gim").metrics["comprehensiveness_aopc"].mean == \
        report.method("gim").metrics["comprehensiveness_aopc"].mean
    files = report.save(tmp_path)
    for name in ("report.json", "report.html", "table.txt", "frontier.png", "metrics.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert files["html"].read_text().count("<table") >= 2
    df = pytest.importorskip("pandas") and report.to_dataframe()
    assert df.loc["gim", "passes"] == 1 and "comprehensiveness_aopc_ci_low" in df.columns


def test_a_forward_function_needs_the_model():
    net = Tiny().eval()
    x = {"inputs": torch.randn(1, 5, 8), "target": 0}
    with pytest.raises(TypeError, match="model="):
        captum_gim.compare(lambda t: net(t), [x])
    rep = captum_gim.compare(lambda t: net(t), [x, x], model=net, reduce_dims=1,
                             methods=["gim", "ig"], sweep=False, n_bootstrap=10)
    assert [m.key for m in rep.methods] == ["gim", "ig"]
    with pytest.raises(ValueError, match="batch size 1"):
        captum_gim.compare(net, [{"inputs": torch.randn(2, 5, 8)}])


def test_import_stays_light():
    code = "import sys, captum_gim; print('captum_gim.evaluation' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False"
