"""Reports people can read: the table's cells, memory below resolution, baseline notes, HTML."""

from __future__ import annotations

from captum_gim.evaluation.page import html_table
from captum_gim.evaluation.table import fmt_memory, table_rows
from captum_gim.evaluation.types import MethodResult, MetricSummary, ReportData


def _m(key, baseline, mem):
    return MethodResult(
        key=key, name=key, family="Captum", description="", baseline=baseline, base=key,
        budget=None, multiplies_by_inputs=True, signed=True,
        metrics={"comprehensiveness_aopc": MetricSummary(0.5, 0.4, 0.6, 10)},
        median_time_ms=1.234, passes=1.0, peak_memory_mib=mem, deletion_curve={})


def _report():
    return ReportData(schema="s", date="d", settings={"ci_level": 0.95}, task={"n_examples": 10},
                      measurement={}, versions={}, examples_shown=[],
                      methods=[_m("GIM", "task baseline", 0.04), _m("InputXGradient", "zero", 12.3)])


def test_memory_below_resolution():
    assert fmt_memory(0.02) == "< 1 MiB" and fmt_memory(None) == "n/a"
    assert fmt_memory(2.5) == "2.5" and fmt_memory(250.0) == "250"


def test_rows_say_the_baseline_and_the_ci():
    header, gim, ixg = table_rows(_report())
    assert header[:3] == ["Method", "Baseline", "Comp ↑"]
    assert "GT-AUROC ↑" not in header  # no ground truth: no ground-truth columns
    assert gim[1] == "task baseline" and ixg[1] == "zero"
    assert gim[2] == "0.500±0.100"
    assert gim[-1] == "< 1 MiB" and ixg[-1] == "12.3"


def test_html_table_is_a_table():
    page = html_table(table_rows(_report()))
    assert page.count("<tr") == 3 and "<th>Baseline</th>" in page and "class='gim'" in page
    assert "<pre" not in page
