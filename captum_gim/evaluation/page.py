r"""The HTML page of a comparison report: settings, real HTML tables, plots, and the
examples with every method's attribution side by side."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np

from ..viz import text_records_html
from .table import table_rows
from .types import ReportData

__all__ = ["comparison_html", "html_table"]

_CSS = (
    "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;line-height:1.4}"
    "table{border-collapse:collapse;margin:.5em 0;font-size:14px}"
    "td,th{padding:3px 8px;border-bottom:1px solid #ddd;text-align:right;vertical-align:top}"
    "td:first-child,th:first-child,td:nth-child(2),th:nth-child(2){text-align:left}"
    "th{background:#f3f3f3}tr.gim td{font-weight:bold;background:#fff3f3}"
    ".wrap{overflow-x:auto}pre{background:#f6f6f6;padding:1em;overflow-x:auto;font-size:13px}"
    "img{max-width:100%}"
)


def html_table(rows: List[List[str]], highlight: Tuple[str, ...] = ("GIM",)) -> str:
    r"""``rows`` (header first) as an HTML table; rows whose first cell is in ``highlight``
    are emphasised."""
    esc = html.escape
    out = ["<div class='wrap'><table><thead><tr>"]
    out += [f"<th>{esc(h)}</th>" for h in rows[0]]
    out.append("</tr></thead><tbody>")
    for r in rows[1:]:
        cls = " class='gim'" if r[0] in highlight else ""
        out.append(f"<tr{cls}>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>")
    out.append("</tbody></table></div>")
    return "".join(out)


def _frontier_table(report: ReportData) -> str:
    f = (report.frontier or {}).get("by_cost", {}).get("median_time_ms") or {}
    if not f:
        return ""
    names = {m.key: m.name for m in report.methods}
    rows = [["Metric", "Best", "Cheapest within the best's CI", "GIM"]]
    for metric, d in f.items():
        ch = d.get("cheapest_within_ci_of_best") or {}
        g = d.get("focus") or {}
        where = ("on the frontier" if g.get("on_frontier") else
                 f"{g['gap']:.3f} below ({names.get(g['best_at_most_as_costly'])} costs no more)") if g else "n/a"
        rows.append([metric, d["best"]["name"], ch.get("name", "n/a"), where])
    return html_table(rows, highlight=())


def _records_for_example(report: ReportData, ex: Dict[str, Any]) -> Tuple[List[Any], List[str]]:
    from captum.attr import visualization  # Captum's public name for its text plots

    VisualizationDataRecord = visualization.VisualizationDataRecord

    valid = ex["valid"]
    labels = ex.get("unit_labels") or [str(i) for i in range(len(valid))]
    keep = [i for i, v in enumerate(valid) if v]
    words = [labels[i] for i in keep]
    target = ex.get("target")
    attr_class = ex.get("target_label") or ("output" if target is None else str(target))
    records, heads = [], []
    full = ex.get("full_score") or 0.0
    if ex.get("evidence") is not None:
        truth = [1.0 if ex["evidence"][i] else 0.0 for i in keep]
        records.append(VisualizationDataRecord(truth, full, attr_class, ex.get("true_label") or "",
                                               attr_class, float(sum(truth)), words, 0.0))
        heads.append("ground truth")
    for m in report.methods:
        scores = ex["scores"].get(m.key)
        if scores is None or "@" in m.key:
            continue
        s = np.asarray([scores[i] for i in keep], dtype=float)
        peak = float(np.max(np.abs(s))) if s.size else 0.0
        records.append(VisualizationDataRecord((s / (peak if peak > 0 else 1.0)).tolist(), full,
                                               attr_class, ex.get("true_label") or "", attr_class,
                                               float(s.sum()), words, 0.0))
        heads.append(m.name)
    return records, heads


def comparison_html(report: ReportData, plots: Dict[str, str], path: Path) -> Path:
    r"""Write the HTML page of ``report`` to ``path``.

    Args:
        report (ReportData): from :func:`captum_gim.compare` or ``captum-gim compare``.
        plots (dict): caption -> image file name (relative to the page).
        path (Path): where to write the page.
    """
    esc = html.escape
    task, v = report.task, report.versions
    ver = ", ".join(f"{k} {esc(str(v[k]))}" for k in ("captum_gim", "torch", "captum", "python",
                                                      "transformers", "pyhealth") if v.get(k))
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>captum-gim compare: {esc(task['name'])}</title><style>{_CSS}</style></head><body>",
        f"<h1>GIM against Captum's gradient methods: {esc(task['name'])}</h1>",
        f"<p>{esc(task['description'])}</p>",
        f"<p><b>Command:</b> <code>{esc(str(report.command or ''))}</code><br>"
        f"<b>Date:</b> {esc(report.date)}<br><b>Versions:</b> {ver}<br>"
        f"<b>Examples:</b> {task['n_examples']}; <b>score:</b> {esc(task['score'])}; "
        f"<b>baseline:</b> {esc(str(task.get('baseline')))}; "
        f"<b>ground truth:</b> {esc(str(task.get('ground_truth') or 'not known'))}</p>",
        "<h2>Results</h2>",
        "<p>Mean ± half-width of the bootstrap CI over examples. The <i>Baseline</i> column says "
        "what each method compares the input with: rows other than 'task baseline' differ from "
        "the others in that too (InputXGradient uses zero, as Captum defines it).</p>",
        html_table(table_rows(report)),
    ]
    frontier = _frontier_table(report)
    if frontier:
        parts += ["<h2>Cost-quality frontier</h2>", "<p>Cost: median time per example. "
                  "'Cheapest within the best's CI': the cheapest method whose paired difference "
                  "from the best has a CI containing zero.</p>", frontier]
    if report.summary:
        parts.append(f"<h3>Paired differences</h3><pre>{esc(report.summary)}</pre>")
    parts.append("<h3>How each number was measured</h3><ul>")
    parts += [f"<li><b>{esc(k)}</b>: {esc(str(t))}</li>" for k, t in report.measurement.items()]
    parts.append("</ul>")
    for caption, file in plots.items():
        parts.append(f"<h3>{esc(caption)}</h3><img src='{esc(file)}' alt='{esc(caption)}'>")
    parts.append("<h2>Examples</h2><p>Each row: one method's attribution of the explained output, "
                 "per unit, scaled by its largest magnitude (green: for, red: against).</p>")
    for ex in report.examples_shown:
        title = f"Example {ex['index']}" + (f" ({esc(ex['group'])})" if ex.get("group") else "")
        parts.append(f"<h3>{title}</h3>")
        if ex.get("text"):
            parts.append(f"<p><code>{esc(ex['text'])}</code></p>")
        records, heads = _records_for_example(report, ex)
        parts.append(text_records_html(records, legend=True, row_headers=heads))
    parts.append("</body></html>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts))
    return path
