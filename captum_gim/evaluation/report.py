r"""Writing a comparison report: the stdout table, the summary lines and the JSON file."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from .compare import METRICS

__all__ = ["format_table", "format_group_table", "format_summary", "write_json", "to_jsonable"]


def _fmt(x: Optional[float], metric: str) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if metric == "infidelity":
        return f"{x:.3g}"
    if metric == "time_ms":
        return f"{x:.3g}" if x < 100 else f"{x:.0f}"
    return f"{x:.3f}"


def _cell(stats: Optional[Dict[str, Any]], metric: str) -> str:
    if not stats or stats.get("mean") is None:
        return "n/a"
    m, lo, hi = stats["mean"], stats.get("ci_low"), stats.get("ci_high")
    if lo is None or hi is None or metric == "time_ms":
        return _fmt(m, metric)
    half = (hi - lo) / 2.0
    return f"{_fmt(m, metric)}±{_fmt(half, metric)}"


def _columns(header: List[str], rows: List[List[str]]) -> List[str]:
    r"""Header, rule and rows, aligned: the first column left, the others right."""
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]

    def line(cells: List[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return [line(header), "  ".join("-" * w for w in widths)] + [line(row) for row in rows]


def format_table(report: Dict[str, Any]) -> str:
    r"""The per-method table: mean ± half-width of the confidence interval."""
    metrics = [m for m in METRICS if m != "time_ms"]
    has_gt = any(
        (r["metrics"].get("gt_auroc") or {}).get("n") for r in report["methods"]
    )
    if not has_gt:
        metrics = [m for m in metrics if not m.startswith("gt_")]
    header = ["Method"] + [
        f"{METRICS[m][0]} {'↑' if METRICS[m][1] else '↓'}" for m in metrics
    ] + ["ms/ex", "peak MiB"]
    rows: List[List[str]] = []
    for r in report["methods"]:
        row = [r["name"]] + [_cell(r["metrics"].get(m), m) for m in metrics]
        row.append(_fmt(r.get("median_time_ms"), "time_ms"))
        mem = r.get("peak_memory_mib")
        row.append("n/a" if mem is None else (f"{mem:.2f}" if mem < 10 else f"{mem:.1f}"))
        rows.append(row)
    lines = _columns(header, rows)
    ci = report["settings"]["ci_level"]
    lines.append(
        f"± : half-width of the {ci:.0%} bootstrap CI over {report['task']['n_examples']} "
        "examples; ms/ex: median wall time per example; peak MiB: see report.json "
        "'measurement'."
    )
    return "\n".join(lines)


def format_group_table(report: Dict[str, Any], metrics: Sequence[str] = ("gt_auroc", "comprehensiveness_aopc")) -> str:
    r"""Per-group means (e.g. per kind of planted evidence), one column per group and
    metric; empty when the task has no groups."""
    groups = report["task"].get("groups")
    if not groups:
        return ""
    metrics = [
        m for m in metrics
        if any(((r.get("by_group") or {}).get(g) or {}).get(m) is not None
               for r in report["methods"] for g in groups)
    ]
    if not metrics:
        return ""
    header = ["Method"] + [f"{METRICS[m][0]} {g}" for m in metrics for g in groups]
    rows = []
    for r in report["methods"]:
        bg = r.get("by_group") or {}
        rows.append([r["name"]] + [_fmt((bg.get(g) or {}).get(m), m) for m in metrics for g in groups])
    lines = _columns(header, rows)
    n = {g: ((report["methods"][0].get("by_group") or {}).get(g) or {}).get("n") for g in groups}
    lines.append("means per group (" + ", ".join(f"{g}: {k} examples" for g, k in n.items()) + ")")
    return "\n".join(lines)


def format_summary(report: Dict[str, Any], method: str = "gim", tolerance: float = 1e-3) -> str:
    r"""Paired differences of ``method`` against the reference method, in words.

    A difference is "better" or "worse" when its confidence interval excludes zero,
    and "same" when the whole interval lies within ``tolerance`` of zero (differences
    at float precision, e.g. between probabilities of 0.9999).
    """
    rec = next((r for r in report["methods"] if r["key"] == method), None)
    if rec is None or not rec.get("vs_reference"):
        return ""
    vs = rec["vs_reference"]
    ref = next(r for r in report["methods"] if r["key"] == vs["reference"])
    parts = []
    for m, (label, higher) in METRICS.items():
        d = vs.get(m)
        if not d or d.get("mean") is None or m == "time_ms":
            continue
        lo, hi = d["ci_low"], d["ci_high"]
        if lo is not None and hi is not None and max(abs(lo), abs(hi)) < tolerance:
            verdict = f"same (|difference| < {tolerance:g})"
        elif lo is not None and hi is not None and (lo > 0 or hi < 0):
            better = (d["mean"] > 0) == higher
            verdict = "better" if better else "worse"
        else:
            verdict = "no clear difference"
        parts.append(f"  {label:9s} {d['mean']:+.3f} [{lo:+.3f}, {hi:+.3f}]  {verdict}")
    ratio = vs.get("median_time_ratio")
    lines = [f"{rec['name']} - {ref['name']} (paired over examples, {report['settings']['ci_level']:.0%} CI):"]
    lines += parts
    if ratio is not None:
        lines.append(f"  time      {ratio:.3g}x the median time of {ref['name']}")
    return "\n".join(lines)


def to_jsonable(obj: Any) -> Any:
    r"""``obj`` with NaN and infinities as None and tuples as lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        try:
            return to_jsonable(obj.item())
        except (TypeError, ValueError):
            return str(obj)
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    return str(obj)


def write_json(report: Dict[str, Any], path: Path) -> Path:
    r"""Write ``report`` as strict JSON (no NaN)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_jsonable(report), indent=1, allow_nan=False) + "\n")
    return path
