"""The evaluation metrics against cases whose answers are known by construction.

Toy models here are additive (``f(x) = sum_i w_i x_i``: removing unit ``i`` lowers the
output by exactly ``w_i x_i``) or an OR of two units (either one alone is enough), so
every expected number is worked out by hand in the test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from captum_gim.evaluation.metrics import (
    CURVE_FRACTIONS,
    ERASER_FRACTIONS,
    UnitLayout,
    bin_counts,
    bootstrap_ci,
    curve_counts,
    faithfulness,
    ground_truth_auroc,
    rank_units,
    removal_masks,
    top1_hit,
    unit_infidelity,
)

W = torch.tensor([4.0, 3.0, 2.0, 1.0])


def additive(x: torch.Tensor) -> torch.Tensor:
    """f(x) = sum_i w_i x_i for x of shape (B, 4)."""
    return x @ W


def additive_score(batch):
    return additive(batch[0])


# --------------------------------------------------------------------------- layout


def test_unit_layout_scores_and_apply():
    tokens = torch.arange(24, dtype=torch.float32).reshape(1, 4, 6)  # 4 tokens of width 6
    values = torch.tensor([[10.0, 20.0]])  # 2 continuous values
    valid = (torch.tensor([False, True, True, True]), torch.tensor([True, True]))
    layout = UnitLayout((tokens, values), (1, 0), valid)
    assert layout.n_units == 6 and layout.n_valid == 5
    assert layout.valid.tolist() == [False, True, True, True, True, True]
    scores = layout.scores((tokens, values))
    # token scores are the sums over the embedding dimension
    assert scores.tolist() == [15.0, 51.0, 87.0, 123.0, 10.0, 20.0]
    remove = torch.zeros(2, 6, dtype=torch.bool)
    remove[0, 2] = True  # token 2
    remove[1, 5] = True  # value 1
    base = (torch.full_like(tokens, -1.0), torch.zeros_like(values))
    t, v = layout.apply(remove, (tokens, values), base)
    assert t.shape == (2, 4, 6) and v.shape == (2, 2)
    assert torch.equal(t[0, 2], torch.full((6,), -1.0))
    assert torch.equal(t[0, [0, 1, 3]], tokens[0, [0, 1, 3]])
    assert torch.equal(t[1], tokens[0]) and v[1].tolist() == [10.0, 0.0]
    assert v[0].tolist() == [10.0, 20.0]


def test_rank_units_orders_by_score_and_breaks_ties_by_key():
    scores = torch.tensor([1.0, 5.0, 5.0, float("nan"), 3.0])
    valid = torch.tensor([True, True, True, True, False])
    tie = torch.tensor([0.0, 0.9, 0.1, 0.0, 0.0])
    assert rank_units(scores, valid, tie).tolist() == [2, 1, 0, 3]  # NaN last, unit 4 invalid
    assert rank_units(scores, valid).tolist() == [1, 2, 0, 3]  # position order without a key


def test_bin_and_curve_counts():
    # ERASER bins as PyHealth counts them: max(1, floor(f * n))
    assert bin_counts(15) == [1, 1, 1, 3, 7]
    assert bin_counts(200) == [2, 10, 20, 40, 100]
    assert bin_counts(1) == [1, 1, 1, 1, 1]
    assert bin_counts(0) == [0] * 5
    # the curve rounds half up: 0.5 * 5 = 2.5 -> 3
    counts = curve_counts(5, (0.0, 0.1, 0.5, 0.9, 1.0))
    assert counts == [0, 1, 3, 5, 5]


def test_removal_masks():
    order = torch.tensor([3, 0, 2])
    m = removal_masks(order, [0, 1, 2], 5)
    assert m.tolist() == [
        [False] * 5,
        [False, False, False, True, False],
        [True, False, False, True, False],
    ]
    keep = removal_masks(order, [1], 5, keep=True)  # keep unit 3, remove the other ranked ones
    assert keep.tolist() == [[True, False, True, False, False]]


# --------------------------------------------------------------------------- faithfulness


def _additive_case(order):
    x = torch.ones(1, 4)
    layout = UnitLayout((x,), (0,))
    return faithfulness(additive_score, layout, (x,), (torch.zeros_like(x),), torch.tensor(order))


def test_faithfulness_additive_perfect_ranking():
    # contributions 4, 3, 2, 1 (total 10); n = 4 units -> bins [1, 1, 1, 1, 2]
    res = _additive_case([0, 1, 2, 3])
    assert res.full_score == pytest.approx(10.0)
    assert res.comprehensiveness == pytest.approx([4, 4, 4, 4, 7])
    assert res.comprehensiveness_aopc == pytest.approx(23 / 5)
    # sufficiency keeps the top k: full - (top-k contributions)
    assert res.sufficiency == pytest.approx([6, 6, 6, 6, 3])
    assert res.sufficiency_aopc == pytest.approx(27 / 5)
    # deletion curve: score after removing round(f * 4) units, f = 0, 0.05, ..., 1
    after_k = [10.0, 6.0, 3.0, 1.0, 0.0]
    ks = [int(math.floor(f * 4 + 0.5)) for f in CURVE_FRACTIONS]
    expected = [after_k[k] for k in ks]
    assert res.curve == pytest.approx(expected)
    assert res.curve[0] == 10.0 and res.curve[-1] == 0.0
    assert res.deletion_auc == pytest.approx(np.trapezoid(expected, CURVE_FRACTIONS))
    # by hand: 3 points at 10, then 5 each at 6, 3 and 1, then 3 at 0, spaced 0.05:
    # 0.05 * (30 + 30 + 15 + 5 + 0 - (10 + 0) / 2) = 3.75
    assert res.deletion_auc == pytest.approx(3.75)


def test_faithfulness_worst_ranking_is_worse():
    best, worst = _additive_case([0, 1, 2, 3]), _additive_case([3, 2, 1, 0])
    assert worst.comprehensiveness == pytest.approx([1, 1, 1, 1, 3])
    assert worst.sufficiency == pytest.approx([9, 9, 9, 9, 7])
    assert worst.comprehensiveness_aopc < best.comprehensiveness_aopc
    assert worst.sufficiency_aopc > best.sufficiency_aopc
    assert worst.deletion_auc > best.deletion_auc


def test_faithfulness_redundant_or_model():
    # f = max(x0, x1): either unit alone is enough (redundant evidence), units 2..9 are noise
    def score(batch):
        return torch.maximum(batch[0][:, 0], batch[0][:, 1])

    x = torch.ones(1, 10)
    layout = UnitLayout((x,), (0,))
    base = (torch.zeros_like(x),)
    res = faithfulness(score, layout, (x,), base, torch.arange(10))
    # bins for n = 10: [1, 1, 1, 2, 5]: removing one copy changes nothing, both everything
    assert res.comprehensiveness == pytest.approx([0, 0, 0, 1, 1])
    assert res.sufficiency == pytest.approx([0, 0, 0, 0, 0])
    # a ranking that puts one copy last never removes both until the end
    res2 = faithfulness(score, layout, (x,), base, torch.tensor([0, 2, 3, 4, 5, 6, 7, 8, 9, 1]))
    assert res2.comprehensiveness == pytest.approx([0] * 5)
    assert res2.deletion_auc > res.deletion_auc


def test_faithfulness_ignores_invalid_units_and_batches():
    x = torch.ones(1, 4)
    valid = (torch.tensor([True, True, False, True]),)
    layout = UnitLayout((x,), (0,), valid)
    order = rank_units(torch.tensor([4.0, 3.0, 100.0, 1.0]), layout.valid)
    assert order.tolist() == [0, 1, 3]  # the invalid unit is never ranked or removed
    res = faithfulness(additive_score, layout, (x,), (torch.zeros_like(x),), order, max_batch=2)
    # n = 3 -> bins [1, 1, 1, 1, 1]; the last curve point still keeps unit 2 (worth 2)
    assert res.comprehensiveness == pytest.approx([4] * 5)
    assert res.curve[-1] == pytest.approx(2.0)


# --------------------------------------------------------------------------- ground truth


def test_ground_truth_auroc_and_top1():
    scores = torch.tensor([3.0, 2.0, 1.0, 0.0])
    ev = torch.tensor([True, False, True, False])
    # pairs (evidence > other): 3>2, 3>0, 1<2, 1>0 -> 3/4
    assert ground_truth_auroc(scores, ev) == pytest.approx(0.75)
    assert ground_truth_auroc(torch.tensor([1.0, 1.0]), torch.tensor([True, False])) == 0.5
    assert math.isnan(ground_truth_auroc(scores, torch.ones(4, dtype=torch.bool)))
    # invalid units are left out: without unit 1 every evidence unit beats unit 3
    assert ground_truth_auroc(scores, ev, torch.tensor([True, False, True, True])) == 1.0
    assert top1_hit(torch.tensor([2, 0]), ev) == 1.0
    assert top1_hit(torch.tensor([1, 0]), ev) == 0.0
    assert math.isnan(top1_hit(torch.tensor([], dtype=torch.long), ev))


def test_random_ranking_matches_analytic_expectation():
    rng = np.random.default_rng(0)
    n, n_ev, trials = 12, 3, 3000
    ev = torch.zeros(n, dtype=torch.bool)
    ev[:n_ev] = True
    aurocs, hits, comps = [], [], []
    x = torch.ones(1, n)
    w = torch.arange(1.0, n + 1.0)
    layout = UnitLayout((x,), (0,))
    valid = torch.ones(n, dtype=torch.bool)
    for t in range(trials):
        s = torch.from_numpy(rng.standard_normal(n))
        order = rank_units(s, valid)
        aurocs.append(ground_truth_auroc(s, ev))
        hits.append(top1_hit(order, ev))
        if t < 400:
            res = faithfulness(lambda b: b[0] @ w, layout, (x,), (torch.zeros_like(x),), order)
            comps.append(res.comprehensiveness_aopc)
    # AUROC of random scores: 1/2; top-1 hit: n_ev / n
    assert np.mean(aurocs) == pytest.approx(0.5, abs=0.02)
    assert np.mean(hits) == pytest.approx(n_ev / n, abs=0.025)
    # removing k random units of an additive model removes k/n of the total on average
    total = float(w.sum())
    expected = np.mean([k / n * total for k in bin_counts(n)])
    assert np.mean(comps) == pytest.approx(expected, rel=0.06)


# --------------------------------------------------------------------------- infidelity


def _linear_model():
    w = torch.tensor([[1.0], [-2.0], [0.5], [3.0]])  # (unit, out) weights of 4 tokens

    def forward(emb):  # emb (B, 4, 2): logit = sum_i w_i * (e_i0 + e_i1)
        return (emb.sum(-1) @ w)  # (B, 1)

    return forward, w


def test_infidelity_zero_for_exact_attributions_and_scale_invariant():
    forward, w = _linear_model()
    x = torch.randn(1, 4, 2, generator=torch.Generator().manual_seed(0))
    b = torch.full_like(x, 0.3)
    layout = UnitLayout((x,), (1,))
    grad = w[:, 0].reshape(1, 4, 1).expand_as(x)  # d logit / d emb
    exact = grad * (x - b)  # completeness holds exactly for a linear model

    def infid(attr, mult=True, seed=0):
        return unit_infidelity(
            forward, layout, (x,), (b,), (attr,), target=0, n_perturb_samples=30,
            multiply_by_inputs=mult, generator=torch.Generator().manual_seed(seed))

    assert infid(exact) == pytest.approx(0.0, abs=1e-4)
    assert infid(5.0 * exact) == pytest.approx(0.0, abs=1e-4)  # normalize=True
    # a local method's attribution (the gradient) with Captum's local convention
    assert infid(grad.clone(), mult=False) == pytest.approx(0.0, abs=1e-4)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    assert infid(noise) > 0.1
    assert infid(exact, seed=3) == pytest.approx(0.0, abs=1e-4)


def test_infidelity_never_removes_invalid_units():
    # unit 3 may not be removed: a wrong attribution there cannot cost anything, while the
    # same wrong attribution on a removable unit does
    forward, w = _linear_model()
    x = torch.randn(1, 4, 2, generator=torch.Generator().manual_seed(0))
    b = torch.zeros_like(x)
    exact = w[:, 0].reshape(1, 4, 1) * (x - b)
    wrong = exact.clone()
    wrong[0, 3] = 50.0

    def infid(valid):
        layout = UnitLayout((x,), (1,), (valid,))
        return unit_infidelity(
            forward, layout, (x,), (b,), (wrong,), target=0, n_perturb_samples=30,
            generator=torch.Generator().manual_seed(0))

    assert infid(torch.tensor([True, True, True, False])) == pytest.approx(0.0, abs=1e-4)
    assert infid(torch.ones(4, dtype=torch.bool)) > 0.1


# --------------------------------------------------------------------------- bootstrap


def test_bootstrap_ci():
    rng = np.random.default_rng(0)
    c = bootstrap_ci([2.0] * 10, rng=rng)
    assert c["mean"] == c["ci_low"] == c["ci_high"] == 2.0 and c["n"] == 10
    v = np.random.default_rng(1).normal(1.0, 1.0, 400)
    c = bootstrap_ci(v.tolist(), n_boot=2000, rng=np.random.default_rng(2))
    se = v.std(ddof=1) / math.sqrt(v.size)
    assert c["ci_low"] < c["mean"] < c["ci_high"]
    # the percentile interval of the mean is close to mean +- 1.96 standard errors
    assert c["ci_high"] - c["ci_low"] == pytest.approx(2 * 1.96 * se, rel=0.15)
    c = bootstrap_ci([1.0, float("nan"), 3.0], rng=np.random.default_rng(0))
    assert c["n"] == 2 and c["mean"] == 2.0
    c = bootstrap_ci([float("nan")])
    assert c["n"] == 0 and math.isnan(c["mean"])
    a = bootstrap_ci(v.tolist(), rng=np.random.default_rng(5))
    b = bootstrap_ci(v.tolist(), rng=np.random.default_rng(5))
    assert a == b  # deterministic for a seed


def test_eraser_fractions_are_the_papers():
    assert ERASER_FRACTIONS == (0.01, 0.05, 0.10, 0.20, 0.50)
