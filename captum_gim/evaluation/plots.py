r"""The plots of a comparison report: deletion curves, metric bars and the cost-quality
frontier. One colour per method; the GIM ablations share a family of oranges; budgeted
methods (``ig@8``...) share their method's hue, darker for larger budgets; GIM is drawn
last, on top, and every legend sits outside the axes."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from .types import METRIC_TITLES, METRICS, QUALITY_METRICS, MethodResult, ReportData

__all__ = ["method_colour", "plot_deletion_curves", "plot_metrics", "plot_frontier"]

_FIXED = {
    "gim": "#d62728", "saliency": "#17becf", "ixg": "#8c564b", "random": "#7f7f7f",
    "gim-tsg": "#fdae6b", "gim-norm": "#fd8d3c", "gim-div": "#e6550d", "gim-off": "#a63603",
}
#: swept methods: a sequential colour map per method
_SWEEP_MAPS = {"ig": "Blues", "ig-gim": "Purples", "gradshap": "Greens", "nt-gim": "RdPu"}


def method_colour(m: MethodResult, budgets: Sequence[int] = ()) -> str:
    r"""The colour of method ``m`` (``budgets``: every budget of its method, for the shade)."""
    if m.key in _FIXED:
        return _FIXED[m.key]
    cmap = colormaps[_SWEEP_MAPS.get(m.base, "Greys")]
    if m.budget is None or len(budgets) < 2:
        return _hex(cmap(0.75))
    rank = sorted(budgets).index(m.budget) / (len(budgets) - 1)
    return _hex(cmap(0.45 + 0.5 * rank))


def _hex(rgba: Tuple[float, ...]) -> str:
    return "#" + "".join(f"{int(round(255 * c)):02x}" for c in rgba[:3])


def _colours(report: ReportData) -> Dict[str, str]:
    budgets: Dict[str, List[int]] = {}
    for m in report.methods:
        if m.budget is not None:
            budgets.setdefault(m.base, []).append(m.budget)
    return {m.key: method_colour(m, budgets.get(m.base, [])) for m in report.methods}


def _z(m: MethodResult) -> float:
    return 10.0 if m.key == "gim" else (3.0 if m.family == "GIM" else 2.0)


def _title(metric: str) -> str:
    return f"{METRIC_TITLES[metric]} ({'higher' if METRICS[metric][1] else 'lower'} = better)"


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def _floats(values: Sequence[Optional[float]]) -> np.ndarray:
    return np.asarray([np.nan if v is None else v for v in values], dtype=float)


def _main_methods(report: ReportData) -> List[MethodResult]:
    return [m for m in report.methods if "@" not in m.key]


def plot_deletion_curves(report: ReportData, path: Path) -> Path:
    r"""Mean deletion curve with its CI band per method (budgeted variants left out), PNG."""
    colours = _colours(report)
    fig = Figure(figsize=(8.5, 4.8))
    ax = fig.subplots()
    for m in sorted(_main_methods(report), key=_z):
        c = m.deletion_curve
        xs = np.asarray(c["fractions"], dtype=float)
        ls = "--" if m.family == "GIM ablation" else (":" if m.family == "floor" else "-")
        auc = m.mean("deletion_auc")
        label = m.name + (f" (AUC {auc:.3f})" if auc is not None else "")
        lw = 3.0 if m.key == "gim" else 1.4
        ax.plot(xs, _floats(c["mean"]), ls, color=colours[m.key], label=label, lw=lw, zorder=_z(m))
        ax.fill_between(xs, _floats(c["ci_low"]), _floats(c["ci_high"]), color=colours[m.key],
                        alpha=0.07, zorder=_z(m) - 1)
    ax.set_xlabel(f"fraction of {report.task['unit']}s removed (most important first)", fontsize=12)
    ax.set_ylabel(report.task["score"], fontsize=12)
    ax.set_title(f"Deletion curves: {report.task['name']} (lower = more faithful)", fontsize=12)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    order = sorted(range(len(labels)), key=lambda i: [m.name for m in report.methods].index(
        labels[i].split(" (AUC")[0]))
    ax.legend([handles[i] for i in order], [labels[i] for i in order], fontsize=11,
              loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return _save(fig, path)


def _metrics_present(report: ReportData) -> List[str]:
    return [m for m in QUALITY_METRICS if any((r.metrics.get(m) and r.metrics[m].n) for r in report.methods)]


def plot_metrics(report: ReportData, path: Path) -> Path:
    r"""One horizontal bar chart per metric (mean and CI per method), PNG."""
    colours = _colours(report)
    metrics = _metrics_present(report)
    cols = 2
    rows = max(1, math.ceil(len(metrics) / cols))
    n = len(report.methods)
    fig = Figure(figsize=(10, max(3.0, 0.22 * n + 1.2) * rows))
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    y = np.arange(n)
    for j, (ax, metric) in enumerate(zip(axes, metrics)):
        means, errs = [], [[], []]
        for r in report.methods:
            s = r.metrics.get(metric)
            mu = np.nan if s is None or s.mean is None else s.mean
            lo = mu if s is None or s.ci_low is None else s.ci_low
            hi = mu if s is None or s.ci_high is None else s.ci_high
            means.append(mu)
            errs[0].append(max(0.0, mu - lo) if np.isfinite(mu) else 0.0)
            errs[1].append(max(0.0, hi - mu) if np.isfinite(mu) else 0.0)
        ax.barh(y, means, xerr=errs, color=[colours[r.key] for r in report.methods],
                edgecolor=["black" if r.key == "gim" else "none" for r in report.methods],
                capsize=2)
        ax.set_yticks(y, [r.name for r in report.methods] if j % cols == 0 else [""] * n, fontsize=11)
        ax.invert_yaxis()
        ax.set_title(_title(metric), fontsize=12)
        ax.grid(axis="x", alpha=0.3)
    for ax in axes[len(metrics):]:
        ax.set_visible(False)
    fig.suptitle(f"{report.task['name']}: mean and {report.settings['ci_level']:.0%} bootstrap CI over "
                 f"{report.task['n_examples']} examples", fontsize=12, y=1.005)
    fig.tight_layout()
    return _save(fig, path)


def _frontier_axes(ax: Axes, report: ReportData, metric: str, cost: str, colours: Dict[str, str]) -> None:
    f = ((report.frontier or {}).get("by_cost", {}).get(cost) or {}).get(metric)
    if not f:
        ax.set_visible(False)
        return
    pts = {p["key"]: p for p in f["points"]}
    by = {m.key: m for m in report.methods}
    for base in ("ig", "ig-gim", "gradshap", "nt-gim"):  # budget series as lines
        series = sorted((p for p in pts.values() if by[p["key"]].base == base), key=lambda p: p["cost"])
        if len(series) > 1:
            ax.plot([p["cost"] for p in series], [p["mean"] for p in series], "-", lw=0.8,
                    color=colours[series[-1]["key"]], alpha=0.6, zorder=1)
    front = [pts[k] for k in f["frontier"]]
    ax.step([p["cost"] for p in front], [p["mean"] for p in front], where="post", color="black",
            lw=1.0, ls="--", zorder=2, label="Pareto frontier")
    for key, p in sorted(pts.items(), key=lambda kv: _z(by[kv[0]])):
        m = by[key]
        gim = key == "gim"
        ax.scatter([p["cost"]], [p["mean"]], s=160 if gim else 36, marker="*" if gim else "o",
                   color=colours[key], edgecolor="black" if p["on_frontier"] else "none",
                   linewidth=1.0, zorder=_z(m) + 1, label=m.name)
    ax.set_xscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}"[0] in "25" else ""))
    ax.set_xlabel("median time per example (ms)" if cost == "median_time_ms"
                  else "forward+backward passes per example", fontsize=12)
    ax.set_title(_title(metric), fontsize=12)
    ax.grid(alpha=0.3, which="both")


def plot_frontier(report: ReportData, path: Path, metrics: Optional[Sequence[str]] = None) -> Path:
    r"""Each metric against measured cost (left: median time, right: passes counted),
    the Pareto frontier dashed, frontier points outlined, GIM a large star on top; PNG."""
    colours = _colours(report)
    metrics = list(metrics or [m for m in _metrics_present(report) if m in (
        "comprehensiveness_aopc", "sufficiency_aopc", "deletion_auc", "gt_auroc")])
    fig = Figure(figsize=(10, 3.4 * len(metrics) + 0.6))
    axes = fig.subplots(len(metrics), 2, squeeze=False)
    for row, metric in zip(axes, metrics):
        for ax, cost in zip(row, ("median_time_ms", "passes")):
            _frontier_axes(ax, report, metric, cost, colours)
    handles, labels = axes[0][0].get_legend_handles_labels()
    names = [m.name for m in report.methods] + ["Pareto frontier"]
    order = sorted(range(len(labels)), key=lambda i: names.index(labels[i]) if labels[i] in names else 0)
    fig.legend([handles[i] for i in order], [labels[i] for i in order], loc="upper center",
               bbox_to_anchor=(0.5, 0.0), ncol=3, fontsize=11, frameon=False)
    fig.suptitle(f"Cost against quality: {report.task['name']} "
                 f"({report.versions.get('torch_threads')} thread(s) on {report.task['device']}; "
                 "outlined: on the frontier)", fontsize=12, y=1.01)
    fig.tight_layout()
    return _save(fig, path)
