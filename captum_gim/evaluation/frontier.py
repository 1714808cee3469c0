r"""The cost-quality frontier of a comparison, and paired differences said carefully.

For each quality metric, every method (the random floor excepted) is a point: its cost
(median wall time per example, or forward+backward passes per example) against its mean.
A method is *on the frontier* when no other method is at most as costly and at least as
good, and strictly one of the two. For GIM the report says whether it is on the frontier
and, if not, how far below it is: the best mean among methods at most as costly, minus
GIM's. The *cheapest method within the CI of the best* is the cheapest method whose paired
difference from the best method (bootstrap over examples) has a CI that contains zero.

Words: a paired difference is "better" or "worse" only when its CI excludes zero *and*
its mean exceeds the tolerance; "same" when the whole CI lies within the tolerance.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from .metrics import bootstrap_ci
from .table import fmt_diff
from .types import METRICS, QUALITY_METRICS, MethodResult, MetricSummary

__all__ = ["verdict", "paired", "pareto", "frontier_report", "frontier_summary", "COSTS"]

#: cost name -> how to read it from a method's result
COSTS: Dict[str, Callable[[MethodResult], Optional[float]]] = {
    "median_time_ms": lambda m: m.median_time_ms,
    "passes": lambda m: m.passes,
}


def verdict(diff: MetricSummary, higher_is_better: bool, tolerance: float) -> str:
    r"""``better``, ``worse``, ``same`` or ``no clear difference`` for a paired difference.

    Args:
        diff (MetricSummary): mean and CI of ``method - other`` over examples.
        higher_is_better (bool): which way the metric improves.
        tolerance (float): differences at most this large are never better or worse.
            The CI must also clear zero by a tenth of it (the precision the differences
            are printed with), so that floating-point noise between methods that agree on
            most examples is not read as a side.
    """
    lo, hi, mean = diff.ci_low, diff.ci_high, diff.mean
    if mean is None or lo is None or hi is None:
        return "n/a"
    if max(abs(lo), abs(hi)) < tolerance:
        return "same"
    if diff.excludes_zero(tolerance / 10) and abs(mean) > tolerance:
        return "better" if (mean > 0) == higher_is_better else "worse"
    return "no clear difference"


def paired(
    a: Sequence[Optional[float]], b: Sequence[Optional[float]], n_boot: int, level: float,
    rng: np.random.Generator,
) -> MetricSummary:
    r"""Mean and bootstrap CI of ``a - b`` over the examples where both have a value."""
    d = [x - y for x, y in zip(a, b)
         if x is not None and y is not None and not (math.isnan(x) or math.isnan(y))]
    return MetricSummary.from_dict(bootstrap_ci(d, n_boot, level, rng))


def pareto(points: Sequence[Dict[str, Any]], higher_is_better: bool, tolerance: float = 0.0) -> List[str]:
    r"""Keys of the points on the Pareto frontier (low ``cost``, good ``mean``), cheapest
    first. Means within ``tolerance`` of each other count as equal."""
    sign = 1.0 if higher_is_better else -1.0
    on = []
    for p in points:
        dominated = any(
            q is not p and q["cost"] <= p["cost"] and sign * (q["mean"] - p["mean"]) >= -tolerance
            and (q["cost"] < p["cost"] or sign * (q["mean"] - p["mean"]) > tolerance)
            for q in points
        )
        if not dominated:
            on.append(p)
    return [p["key"] for p in sorted(on, key=lambda p: (p["cost"], -sign * p["mean"]))]


def _metric_frontier(
    methods: List[MethodResult], metric: str, cost: str, focus: str, n_boot: int, level: float,
    tolerance: float, seed: int,
) -> Optional[Dict[str, Any]]:
    higher = METRICS[metric][1]
    sign = 1.0 if higher else -1.0
    pts = []
    for m in methods:
        c, mean = COSTS[cost](m), m.mean(metric)
        if m.family != "floor" and c is not None and c > 0 and mean is not None:
            pts.append({"key": m.key, "name": m.name, "cost": float(c), "mean": float(mean)})
    if len(pts) < 2:
        return None
    front = pareto(pts, higher, tolerance)
    by = {m.key: m for m in methods}
    top_mean = max(sign * p["mean"] for p in pts)
    # the best: the cheapest of those within the tolerance of the highest mean
    best = min((p for p in pts if sign * p["mean"] >= top_mean - tolerance), key=lambda p: p["cost"])
    rng = np.random.default_rng([seed, 7])
    cheapest = None
    for p in sorted(pts, key=lambda p: p["cost"]):
        if p["key"] == best["key"]:
            cheapest = {"key": p["key"], "name": p["name"], "is_best": True}
            break
        d = paired(by[p["key"]].per_example.get(metric, []), by[best["key"]].per_example.get(metric, []),
                   n_boot, level, rng)
        if d.ci_low is not None and d.ci_high is not None and (
                d.ci_low <= 0 <= d.ci_high or max(abs(d.ci_low), abs(d.ci_high)) < tolerance):
            cheapest = {"key": p["key"], "name": p["name"], "is_best": False,
                        "difference": d.__dict__, "cost_ratio": p["cost"] / best["cost"]}
            break
    out: Dict[str, Any] = {
        "metric": metric, "higher_is_better": higher, "cost": cost,
        "points": [dict(p, on_frontier=p["key"] in front) for p in pts],
        "frontier": front, "best": {"key": best["key"], "name": best["name"]},
        "cheapest_within_ci_of_best": cheapest, "focus": None,
    }
    f = next((p for p in pts if p["key"] == focus), None)
    if f is not None:
        others = [p for p in pts if p["cost"] <= f["cost"] and p is not f]
        top = max(others, key=lambda p: (sign * p["mean"], -p["cost"])) if others else f
        gap = sign * (top["mean"] - f["mean"])
        out["focus"] = {"key": focus, "on_frontier": focus in front,
                        "gap": gap if gap > tolerance else 0.0,
                        "best_at_most_as_costly": top["key"]}
    return out


def frontier_report(
    methods: List[MethodResult], *, focus: str = "gim", matched: Sequence[str] = ("ig@1", "ig@2"),
    n_boot: int = 1000, level: float = 0.95, tolerance: float = 1e-3, seed: int = 0,
) -> Dict[str, Any]:
    r"""The frontier of every quality metric against both costs, and ``focus`` against the
    ``matched`` methods (paired differences per metric).

    Returns:
        dict: ``by_cost`` (cost -> metric -> frontier, see the module doc),
        ``matched_budget`` (one entry per matched method) and ``tolerance``.
    """
    metrics = [m for m in QUALITY_METRICS if any((r.metrics.get(m) or MetricSummary(None)).n for r in methods)]
    by_cost = {
        cost: {m: f for m in metrics
               if (f := _metric_frontier(methods, m, cost, focus, n_boot, level, tolerance, seed))}
        for cost in COSTS
    }
    by = {m.key: m for m in methods}
    matched_out = []
    rng = np.random.default_rng([seed, 8])
    if focus in by:
        for key in matched:
            if key not in by:
                continue
            diffs = {}
            for m in metrics:
                d = paired(by[focus].per_example.get(m, []), by[key].per_example.get(m, []), n_boot, level, rng)
                diffs[m] = dict(d.__dict__, verdict=verdict(d, METRICS[m][1], tolerance))
            f_t, k_t = by[focus].median_time_ms, by[key].median_time_ms
            matched_out.append({
                "method": focus, "versus": key, "versus_name": by[key].name,
                "passes": [by[focus].passes, by[key].passes],
                "time_ratio": f_t / k_t if f_t and k_t else None, "differences": diffs,
            })
    return {"by_cost": by_cost, "matched_budget": matched_out, "tolerance": tolerance,
            "focus": focus}


def frontier_summary(frontier: Dict[str, Any], names: Dict[str, str]) -> str:
    r"""The frontier in words: per metric, the best method, the cheapest within its CI,
    and where the focus method sits (cost: median time per example)."""
    lines = []
    focus = frontier.get("focus", "gim")
    fname = names.get(focus, focus)
    for metric, f in frontier["by_cost"].get("median_time_ms", {}).items():
        label = METRICS[metric][0]
        best, ch = f["best"], f["cheapest_within_ci_of_best"]
        line = f"  {label:9s} best: {best['name']}"
        if ch and not ch["is_best"]:
            line += f"; cheapest within its CI: {ch['name']} ({ch['cost_ratio']:.2g}x its time)"
        elif ch:
            line += " (no cheaper method within its CI)"
        g = f.get("focus")
        if g is not None:
            if g["on_frontier"]:
                line += f"; {fname}: on the frontier"
            else:
                other = names.get(g["best_at_most_as_costly"], g["best_at_most_as_costly"])
                line += (f"; {fname}: {g['gap']:.3f} below the frontier ({other} costs no more)"
                         if g["gap"] > 0 else f"; {fname}: off the frontier ({other} is as good "
                         "and costs less)")
        lines.append(line)
    if lines:
        lines.insert(0, "Cost-quality frontier (cost: median time per example; random floor excluded):")
    tol = frontier.get("tolerance", 0.0)
    for mb in frontier.get("matched_budget", []):
        lines.append(f"{fname} vs {mb['versus_name']} (matched budget; paired 95% CI; "
                     f"tolerance {tol:g}):")
        for metric, d in mb["differences"].items():
            if d["mean"] is None:
                continue
            lines.append(f"  {METRICS[metric][0]:9s} {fmt_diff(d)}  {d['verdict']}")
    return "\n".join(lines)
