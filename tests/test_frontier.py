"""The cost-quality frontier and the verdict words, on cases worked out by hand."""

from __future__ import annotations

import numpy as np

from captum_gim.evaluation.frontier import frontier_report, pareto, paired, verdict
from captum_gim.evaluation.types import MethodResult, MetricSummary


def test_pareto_by_hand():
    # cost, quality (higher better): b dominates c (cheaper and better); a is cheapest;
    # d is the best; e ties d's quality at a higher cost, so d dominates it
    pts = [{"key": "a", "cost": 1, "mean": 0.2}, {"key": "b", "cost": 2, "mean": 0.6},
           {"key": "c", "cost": 3, "mean": 0.5}, {"key": "d", "cost": 5, "mean": 0.9},
           {"key": "e", "cost": 8, "mean": 0.9}]
    assert pareto(pts, higher_is_better=True) == ["a", "b", "d"]
    # lower is better: the cheapest low value wins; a (0.2) dominates everything costlier and worse
    assert pareto(pts, higher_is_better=False) == ["a"]
    # within a tolerance of 0.15, c (0.5) is as good as b (0.6) but costs more: still off;
    # e (0.9) ties d at a higher cost: off
    assert pareto(pts, higher_is_better=True, tolerance=0.15) == ["a", "b", "d"]
    # a tolerance of 0.45 makes a (0.2) as good as b (0.6), and b as good as d (0.9): each
    # costs less, so only a is left
    assert pareto(pts, higher_is_better=True, tolerance=0.45) == ["a"]


def test_verdict_needs_the_ci_to_exclude_zero_and_the_tolerance():
    assert verdict(MetricSummary(0.05, 0.01, 0.09), True, 1e-3) == "better"
    assert verdict(MetricSummary(0.05, 0.01, 0.09), False, 1e-3) == "worse"
    assert verdict(MetricSummary(0.05, -0.01, 0.09), True, 1e-3) == "no clear difference"
    # excludes zero, but inside the tolerance: never better or worse
    assert verdict(MetricSummary(0.0004, 0.0002, 0.0006), True, 1e-3) == "same"
    # excludes zero, mean below the tolerance, CI partly outside it
    assert verdict(MetricSummary(0.0008, 0.0001, 0.002), True, 1e-3) == "no clear difference"
    # a mean beyond the tolerance, the CI clear of zero only by float noise (methods that
    # agree on most examples): not a side, prints as [+0.0000, ...]
    assert verdict(MetricSummary(0.044, 3.6e-6, 0.094), True, 1e-3) == "no clear difference"
    assert verdict(MetricSummary(0.044, 2e-4, 0.094), True, 1e-3) == "better"


def test_paired_difference_is_over_examples():
    rng = np.random.default_rng(0)
    d = paired([1.0, 2.0, 3.0, float("nan")], [0.5, 1.5, 2.5, 1.0], 200, 0.95, rng)
    assert d.n == 3 and abs(d.mean - 0.5) < 1e-12 and d.ci_low == d.ci_high == 0.5


def _method(key, time_ms, values, family="Captum"):
    return MethodResult(
        key=key, name=key.upper(), family=family, description="", baseline="task baseline",
        base=key.split("@")[0], budget=None, multiplies_by_inputs=True, signed=True,
        metrics={"comprehensiveness_aopc": MetricSummary(float(np.mean(values)), None, None, len(values))},
        median_time_ms=time_ms, passes=time_ms, peak_memory_mib=None, deletion_curve={},
        per_example={"comprehensiveness_aopc": list(values)})


def test_frontier_names_the_cheapest_within_the_ci_and_places_gim():
    best = [0.9, 0.8, 1.0, 0.7, 0.9, 0.8]
    # 0.005 below the best on average (over the 1e-3 tolerance), noisy: its CI contains zero
    close = [b - 0.005 + 0.03 * (-1) ** i for i, b in enumerate(best)]
    methods = [
        _method("gim", 2.0, [b - 0.3 for b in best], family="GIM"),
        _method("cheap", 1.0, close),
        _method("ig", 10.0, best),
        _method("random", 0.1, [0.95] * 6, family="floor"),
    ]
    rep = frontier_report(methods, matched=("cheap",), n_boot=200)
    f = rep["by_cost"]["median_time_ms"]["comprehensiveness_aopc"]
    assert f["best"]["key"] == "ig"
    assert f["cheapest_within_ci_of_best"]["key"] == "cheap"
    assert f["frontier"] == ["cheap", "ig"]  # the floor is left out
    assert f["focus"] == {"key": "gim", "on_frontier": False, "gap": f["focus"]["gap"],
                          "best_at_most_as_costly": "cheap"}
    assert abs(f["focus"]["gap"] - 0.295) < 1e-9  # (best - 0.005) - (best - 0.3)
    (m,) = rep["matched_budget"]
    assert m["versus"] == "cheap" and m["differences"]["comprehensiveness_aopc"]["verdict"] == "worse"
