r"""The per-method table of a report, as rows of strings: the text table and the HTML
table are both built from :func:`table_rows`."""

from __future__ import annotations

from typing import List, Optional

from .types import METRICS, QUALITY_METRICS, MetricSummary, ReportData

__all__ = ["table_rows", "columns", "fmt", "fmt_memory", "fmt_diff"]


def fmt(x: Optional[float], metric: str) -> str:
    if x is None:
        return "n/a"
    if metric == "infidelity":
        return f"{x:.3g}"
    if metric == "time_ms":
        return f"{x:.3g}" if x < 100 else f"{x:.0f}"
    return f"{x:.3f}"


def fmt_diff(d: dict) -> str:
    r"""A paired difference ``mean [ci_low, ci_high]`` with four decimals: one digit finer
    than the comparisons' tolerance (0.001), so a verdict can be checked by eye."""
    return f"{d['mean']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}]"


def _cell(s: Optional[MetricSummary], metric: str) -> str:
    if s is None or s.mean is None:
        return "n/a"
    half = s.half_width
    return fmt(s.mean, metric) if half is None else f"{fmt(s.mean, metric)}±{fmt(half, metric)}"


def fmt_memory(mib: Optional[float]) -> str:
    r"""Peak memory for the table: ``< 1 MiB`` below what the measurement resolves."""
    if mib is None:
        return "n/a"
    if mib < 1.0:
        return "< 1 MiB"
    return f"{mib:.1f}" if mib < 100 else f"{mib:.0f}"


def table_rows(report: ReportData) -> List[List[str]]:
    r"""Header and rows of the per-method table (the text table and the HTML table)."""
    metrics = [m for m in QUALITY_METRICS if report.has_ground_truth or not m.startswith("gt_")]
    header = ["Method", "Baseline"] + [
        f"{METRICS[m][0]} {'↑' if METRICS[m][1] else '↓'}" for m in metrics
    ] + ["ms/ex", "passes", "peak MiB"]
    rows = [header]
    for r in report.methods:
        row = [r.name, r.baseline] + [_cell(r.metrics.get(m), m) for m in metrics]
        row += [fmt(r.median_time_ms, "time_ms"),
                "n/a" if r.passes is None else f"{r.passes:g}", fmt_memory(r.peak_memory_mib)]
        rows.append(row)
    return rows


def columns(rows: List[List[str]]) -> List[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]

    def line(cells: List[str]) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))

    return [line(rows[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in rows[1:]]
