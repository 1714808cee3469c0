r"""The report of a comparison: :class:`Report`, with its text table, summary, JSON,
DataFrame, and :meth:`Report.save` (JSON, PNG plots, an HTML page)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Dict, Sequence, Union

from .table import columns, fmt, fmt_diff, fmt_memory, table_rows
from .types import METRICS, ReportData, to_jsonable

__all__ = ["Report", "table_rows", "fmt_memory", "write_json", "to_jsonable"]

PLOTS = {
    "deletion_curves.png": "Deletion curves",
    "metrics.png": "Metrics",
    "frontier.png": "Cost against quality: the frontier",
}


class Report(ReportData):
    r"""The result of :func:`captum_gim.compare` and ``captum-gim compare``.

    Attributes are those of :class:`~captum_gim.evaluation.types.ReportData`: ``methods``
    (one :class:`~captum_gim.evaluation.types.MethodResult` each), ``sweep``, ``frontier``,
    ``summary``... Methods: :meth:`table`, :meth:`to_json`, :meth:`to_dataframe`,
    :meth:`save`.
    """

    def table(self) -> str:
        r"""The per-method table: mean ± half-width of the CI, the baseline each method
        uses, time, passes and memory (plus per-group means when the task has groups)."""
        lines = columns(table_rows(self))
        info = self.task.get("info") or {}
        base = self.task.get("baseline", "task baseline")
        if base == "task baseline":
            base = (f"the {info['baseline_token']} token at every rankable position" if info.get("baseline_token")
                    else str(info.get("baseline") or "the task's baseline (see report.json)"))
        lines.append(
            f"± : half-width of the {self.settings['ci_level']:.0%} bootstrap CI over "
            f"{self.task['n_examples']} examples; Baseline: 'task baseline' is {base}; "
            "ms/ex: median wall time per example; passes: forward+backward rows per example; "
            "peak MiB: see 'measurement' in report.json.")
        groups = self.group_table()
        return "\n".join(lines) + ("\n\n" + groups if groups else "")

    def group_table(self, metrics: Sequence[str] = ("gt_auroc", "comprehensiveness_aopc")) -> str:
        r"""Per-group means (e.g. per kind of planted evidence) for the methods without a
        budget suffix; empty when the task has no groups."""
        groups = self.task.get("groups")
        if not groups:
            return ""
        methods = [r for r in self.methods if "@" not in r.key]
        metrics = [m for m in metrics if any(((r.by_group or {}).get(g) or {}).get(m) is not None
                                             for r in methods for g in groups)]
        if not metrics:
            return ""
        rows = [["Method", ""] + [f"{METRICS[m][0]} {g}" for m in metrics for g in groups]]
        for r in methods:
            bg = r.by_group or {}
            rows.append([r.name, ""] + [fmt((bg.get(g) or {}).get(m), m) for m in metrics for g in groups])
        lines = columns(rows)
        n = {g: ((methods[0].by_group or {}).get(g) or {}).get("n") for g in groups}
        lines.append("means per group (" + ", ".join(f"{g}: {k} examples" for g, k in n.items()) + ")")
        return "\n".join(lines)

    def versus(self, key: str = "gim") -> str:
        r"""Paired differences of method ``key`` against the reference method, in words."""
        rec = self.method(key)
        if rec is None or not rec.vs_reference:
            return ""
        vs = rec.vs_reference
        ref = self.method(vs["reference"])
        lines = [f"{rec.name} - {ref.name if ref else vs['reference']} (paired over examples, "
                 f"{self.settings['ci_level']:.0%} CI; tolerance {self.settings.get('tolerance', 0):g}):"]
        for m, (label, _) in METRICS.items():
            d = vs.get(m)
            if m == "time_ms" or not d or d.get("mean") is None:
                continue
            lines.append(f"  {label:9s} {fmt_diff(d)}  {d['verdict']}")
        if vs.get("median_time_ratio") is not None:
            lines.append(f"  time      {vs['median_time_ratio']:.3g}x the median time of "
                         f"{ref.name if ref else vs['reference']}")
        return "\n".join(lines)

    def summary_text(self) -> str:
        r"""GIM and IG-GIM against the reference, the frontier and the matched budgets."""
        parts = [self.versus("gim"), self.versus("ig-gim"), (self.frontier or {}).get("summary", "")]
        return "\n\n".join(p for p in parts if p)

    def save(self, directory: Union[str, Path], plots: bool = True) -> Dict[str, Path]:
        r"""Write ``report.json``, ``table.txt``, the PNG plots and ``report.html``.

        Args:
            directory (str or Path): created if missing.
            plots (bool): also draw the plots (needs matplotlib).

        Returns:
            dict: file kind -> path.
        """
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        written: Dict[str, Path] = {}
        if plots:
            from .plots import plot_deletion_curves, plot_frontier, plot_metrics

            draw = {"deletion_curves.png": plot_deletion_curves, "metrics.png": plot_metrics,
                    "frontier.png": plot_frontier}
            for name in PLOTS:
                written[name] = draw[name](self, out / name)
        self.files = {"json": "report.json", "html": "report.html", "table": "table.txt", "csv": "table.csv",
                      "plots": [p for p in PLOTS if p in written]}
        from .page import comparison_html

        table = self.table()
        written["html"] = comparison_html(self, {PLOTS[p]: p for p in self.files["plots"]}, out / "report.html")
        (out / "table.txt").write_text(table + ("\n\n" + self.summary if self.summary else "") + "\n")
        written["table"] = out / "table.txt"
        with open(out / "table.csv", "w", newline="", encoding="utf-8") as fh:
            csv.writer(fh).writerows(table_rows(self))
        written["csv"] = out / "table.csv"
        written["json"] = write_json(self, out / "report.json")
        return written


def write_json(report: Union[ReportData, Dict[str, Any]], path: Path) -> Path:
    r"""Write ``report`` as strict JSON (no NaN)."""
    data = report.to_dict() if isinstance(report, ReportData) else to_jsonable(report)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, allow_nan=False) + "\n")
    return path
