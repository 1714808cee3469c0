r"""Faithfulness and agreement metrics for token (and feature) attributions.

Everything here works on *units*: the things an attribution ranks (tokens, medical
codes, time steps...). An example's inputs are a tuple of tensors with a batch
dimension of 1; for each input, the trailing ``reduce_dims`` dimensions (the
embedding size of a token input; none for continuous values) are summed to give one
score per unit, and "removing" a unit replaces all its values by the baseline's.
:class:`UnitLayout` holds that bookkeeping.

The metrics:

- :func:`faithfulness`: ERASER's comprehensiveness and sufficiency (DeYoung et al.,
  2020), as in the GIM paper: cumulatively replace the top-k ranked units by the
  baseline and measure the drop of the model's score; AOPC = the mean over the
  bins of k (1, 5, 10, 20 and 50 % of the units, at least one unit, counted as
  PyHealth's implementation does). Plus a deletion curve (the score after removing
  the top fraction f of units, f on a fixed grid) and its area.
- :func:`ground_truth_auroc` and :func:`top1_hit`: agreement with known evidence.
- :func:`unit_infidelity`: Captum's :func:`captum.metrics.infidelity` with a
  perturbation that removes random subsets of units.
- :func:`bootstrap_ci`: a percentile bootstrap over examples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

#: numpy >= 2.0 has trapezoid (trapz is deprecated there); 1.x (Captum 0.8 pins numpy < 2) has trapz
_trapezoid = getattr(np, "trapezoid", None) or np.trapz

__all__ = [
    "ERASER_FRACTIONS",
    "CURVE_FRACTIONS",
    "UnitLayout",
    "rank_units",
    "bin_counts",
    "curve_counts",
    "removal_masks",
    "FaithfulnessResult",
    "faithfulness",
    "ground_truth_auroc",
    "top1_hit",
    "unit_infidelity",
    "bootstrap_ci",
    "expand_args",
]

#: ERASER's bins: the fractions of units removed (comprehensiveness) or kept (sufficiency).
ERASER_FRACTIONS: Tuple[float, ...] = (0.01, 0.05, 0.10, 0.20, 0.50)
#: The fractions of units removed at which the deletion curve is sampled.
CURVE_FRACTIONS: Tuple[float, ...] = tuple(i / 20 for i in range(21))


class UnitLayout:
    r"""Where the units of one example live in its input tensors.

    Args:
        inputs (tuple[Tensor, ...]): the example's inputs, each with batch size 1.
        reduce_dims (sequence of int): for each input, how many trailing dimensions
            make up one unit (1 for token embeddings ``(1, L, D)``: a unit is a token;
            0 for continuous values: every value is a unit).
        valid (tuple[Tensor, ...], optional): for each input, a bool tensor of its unit
            shape saying which units may be ranked and removed (False for padding and
            special tokens). Default: all.
    """

    def __init__(
        self,
        inputs: Tuple[Tensor, ...],
        reduce_dims: Sequence[int],
        valid: Optional[Tuple[Tensor, ...]] = None,
    ) -> None:
        if len(reduce_dims) != len(inputs):
            raise ValueError(f"need one reduce_dims entry per input, got {len(reduce_dims)}")
        self.reduce_dims = tuple(int(r) for r in reduce_dims)
        self.unit_shapes: Tuple[Tuple[int, ...], ...] = tuple(
            tuple(x.shape[1 : x.dim() - r]) for x, r in zip(inputs, self.reduce_dims)
        )
        self.sizes = tuple(int(math.prod(s)) for s in self.unit_shapes)
        self.n_units = int(sum(self.sizes))
        if valid is None:
            flat = torch.ones(self.n_units, dtype=torch.bool)
        else:
            parts = []
            for v, shape in zip(valid, self.unit_shapes):
                if tuple(v.shape) != shape:
                    raise ValueError(f"valid mask of shape {tuple(v.shape)}, expected {shape}")
                parts.append(v.reshape(-1).bool().cpu())
            flat = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool)
        self.valid = flat
        self.n_valid = int(flat.sum())

    def scores(self, attributions: Tuple[Tensor, ...], row: int = 0) -> Tensor:
        r"""One float64 score per unit (all units, flattened input by input): the
        attribution of row ``row`` summed over each input's ``reduce_dims``."""
        out = []
        for a, r in zip(attributions, self.reduce_dims):
            a = a[row].detach().to("cpu", torch.float64)
            if r:
                a = a.sum(dim=tuple(range(a.dim() - r, a.dim())))
            out.append(a.reshape(-1))
        return torch.cat(out)

    def split(self, flat: Tensor) -> Tuple[Tensor, ...]:
        r"""A flat per-unit tensor ``(..., n_units)`` cut into one tensor per input,
        shaped ``(..., *unit_shape)``."""
        lead = flat.shape[:-1]
        parts = torch.split(flat, list(self.sizes), dim=-1)
        return tuple(p.reshape(*lead, *s) for p, s in zip(parts, self.unit_shapes))

    def apply(
        self, remove: Tensor, inputs: Tuple[Tensor, ...], baselines: Tuple[Tensor, ...]
    ) -> Tuple[Tensor, ...]:
        r"""Inputs with units replaced by the baseline.

        Args:
            remove (Tensor): bool ``(K, n_units)``; True where the unit is replaced.
            inputs, baselines (tuple[Tensor, ...]): batch size 1 (or ``K``) each.

        Returns:
            tuple[Tensor, ...]: inputs with batch size ``K``.
        """
        out = []
        for m, x, b, r in zip(self.split(remove), inputs, baselines, self.reduce_dims):
            m = m.to(x.device).reshape(*m.shape, *([1] * r))
            b = b.expand_as(x) if b.shape != x.shape else b
            out.append(torch.where(m, b, x))
        return tuple(out)


def rank_units(scores: Tensor, valid: Tensor, tiebreak: Optional[Tensor] = None) -> Tensor:
    r"""The valid units ordered from most to least important.

    Args:
        scores (Tensor): one score per unit (higher = more important).
        valid (Tensor): bool, which units take part.
        tiebreak (Tensor, optional): a secondary key (e.g. random numbers) that orders
            units with equal scores; default: position order.

    Returns:
        LongTensor: unit indices, most important first (only valid units).
    """
    idx = torch.nonzero(valid).flatten().numpy()
    s = scores.detach().cpu().double().numpy()[idx]
    s = np.where(np.isnan(s), -np.inf, s)
    t = (
        tiebreak.detach().cpu().double().numpy()[idx]
        if tiebreak is not None
        else np.arange(idx.size, dtype=np.float64)
    )
    order = np.lexsort((t, -s))  # last key is primary
    return torch.from_numpy(idx[order].copy()).long()


def bin_counts(n: int, fractions: Sequence[float] = ERASER_FRACTIONS) -> List[int]:
    r"""Units in each ERASER bin: ``max(1, floor(f * n))`` (never more than ``n``)."""
    return [min(n, max(1, int(math.floor(f * n + 1e-9)))) for f in fractions] if n else [0] * len(fractions)


def curve_counts(n: int, fractions: Sequence[float] = CURVE_FRACTIONS) -> List[int]:
    r"""Units removed at each point of the deletion curve: ``round(f * n)`` (half up)."""
    return [int(math.floor(f * n + 0.5)) for f in fractions]


def removal_masks(order: Tensor, counts: Sequence[int], n_units: int, keep: bool = False) -> Tensor:
    r"""Bool masks ``(len(counts), n_units)``, True where a unit is replaced.

    With ``keep=False`` row ``i`` removes the top ``counts[i]`` units of ``order``
    (comprehensiveness, deletion); with ``keep=True`` it removes every ranked unit
    *except* the top ``counts[i]`` (sufficiency). Units not in ``order`` (invalid
    ones) are never removed.
    """
    masks = torch.zeros(len(counts), n_units, dtype=torch.bool)
    for i, k in enumerate(counts):
        chosen = order[k:] if keep else order[:k]
        masks[i, chosen] = True
    return masks


@dataclass
class FaithfulnessResult:
    r"""Removal-based faithfulness of one ranking on one example.

    Attributes:
        full_score (float): the model's score on the intact input.
        comprehensiveness (list of float): ``full - score(top-k removed)`` per bin.
        sufficiency (list of float): ``full - score(only top-k kept)`` per bin.
        comprehensiveness_aopc (float): mean of ``comprehensiveness`` (higher = better).
        sufficiency_aopc (float): mean of ``sufficiency`` (lower = better).
        curve (list of float): the score after removing the top ``f`` of the units,
            for each ``f`` in the curve fractions (the first point is ``full_score``).
        deletion_auc (float): trapezoidal area under ``curve`` over ``f`` in [0, 1]
            (lower = better: the score falls sooner).
    """

    full_score: float
    comprehensiveness: List[float]
    sufficiency: List[float]
    comprehensiveness_aopc: float
    sufficiency_aopc: float
    curve: List[float]
    deletion_auc: float


def faithfulness(
    score_fn: Callable[[Tuple[Tensor, ...]], Tensor],
    layout: UnitLayout,
    inputs: Tuple[Tensor, ...],
    baselines: Tuple[Tensor, ...],
    order: Tensor,
    fractions: Sequence[float] = ERASER_FRACTIONS,
    curve_fractions: Sequence[float] = CURVE_FRACTIONS,
    max_batch: int = 64,
) -> FaithfulnessResult:
    r"""Comprehensiveness, sufficiency (AOPC over ERASER bins) and a deletion curve.

    Args:
        score_fn (Callable): maps a batch of (perturbed) inputs to one score per row,
            e.g. the softmax probability of the explained class.
        layout (UnitLayout): the example's units.
        inputs, baselines (tuple[Tensor, ...]): batch size 1; a removed unit takes the
            baseline's values.
        order (Tensor): ranked unit indices, most important first (:func:`rank_units`).
        fractions (sequence of float): ERASER bins. Default: 1, 5, 10, 20, 50 %.
        curve_fractions (sequence of float): where to sample the deletion curve.
        max_batch (int): the most perturbed inputs scored in one forward pass.

    Returns:
        FaithfulnessResult
    """
    n = int(order.numel())
    bins = bin_counts(n, fractions)
    curve_k = curve_counts(n, curve_fractions)
    remove_k = sorted(set(bins) | set(curve_k) | {0})
    masks = torch.cat(
        [
            removal_masks(order, remove_k, layout.n_units, keep=False),
            removal_masks(order, bins, layout.n_units, keep=True),
        ]
    )
    scores: List[float] = []
    with torch.no_grad():
        for start in range(0, masks.shape[0], max_batch):
            batch = layout.apply(masks[start : start + max_batch], inputs, baselines)
            scores += score_fn(batch).detach().reshape(-1).to("cpu", torch.float64).tolist()
    removed = dict(zip(remove_k, scores[: len(remove_k)]))
    kept = scores[len(remove_k) :]
    full = removed[0]
    comp = [full - removed[k] for k in bins]
    suff = [full - s for s in kept]
    curve = [removed[k] for k in curve_k]
    auc = float(_trapezoid(curve, list(curve_fractions))) if len(curve) > 1 else float("nan")
    return FaithfulnessResult(
        full_score=full,
        comprehensiveness=comp,
        sufficiency=suff,
        comprehensiveness_aopc=float(np.mean(comp)) if comp else float("nan"),
        sufficiency_aopc=float(np.mean(suff)) if suff else float("nan"),
        curve=curve,
        deletion_auc=auc,
    )


def ground_truth_auroc(scores: Tensor, evidence: Tensor, valid: Optional[Tensor] = None) -> float:
    r"""AUROC of the scores for telling evidence units from the others.

    The Mann-Whitney statistic: the probability that a random evidence unit scores
    higher than a random non-evidence unit, ties counting one half. NaN when the
    valid units are all evidence or all not.
    """
    s = scores.detach().cpu().double()
    e = evidence.detach().cpu().bool().reshape(-1)
    if valid is not None:
        v = valid.cpu().bool().reshape(-1)
        s, e = s[v], e[v]
    pos, neg = s[e].numpy(), s[~e].numpy()
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (pos.size * neg.size))


def top1_hit(order: Tensor, evidence: Tensor) -> float:
    r"""1.0 if the top-ranked unit is evidence, else 0.0 (NaN for an empty ranking)."""
    if order.numel() == 0:
        return float("nan")
    return float(bool(evidence.reshape(-1)[order[0]]))


def expand_args(args: Optional[Tuple[Any, ...]], n: int) -> Optional[Tuple[Any, ...]]:
    r"""Repeat every tensor of ``additional_forward_args`` (batch size 1) ``n`` times."""
    if args is None:
        return None
    return tuple(
        a.expand(n, *a.shape[1:]) if isinstance(a, Tensor) and a.dim() and a.shape[0] == 1 else a
        for a in args
    )


def unit_infidelity(
    forward_func: Callable[..., Tensor],
    layout: UnitLayout,
    inputs: Tuple[Tensor, ...],
    baselines: Tuple[Tensor, ...],
    attributions: Tuple[Tensor, ...],
    target: Any = None,
    additional_forward_args: Optional[Tuple[Any, ...]] = None,
    n_perturb_samples: int = 20,
    remove_prob: float = 0.3,
    multiply_by_inputs: bool = True,
    normalize: bool = True,
    generator: Optional[torch.Generator] = None,
) -> float:
    r"""Captum's :func:`~captum.metrics.infidelity` for unit removal.

    Each perturbation replaces a random subset of the valid units (each with
    probability ``remove_prob``) by the baseline. Following Captum's convention the
    perturbation passed to the metric is ``(x - x') / (x - baseline)`` (1 on removed
    units) for attributions that multiply by the inputs, and ``x - x'`` for local
    ones (``Saliency``), so ``I . attribution`` estimates ``f(x) - f(x')``.
    ``normalize=True`` (default) rescales the attributions by the least-squares
    optimal factor first, so that methods whose attributions differ only by a
    constant factor (GIM divides gradients) score the same.

    Returns:
        float: the infidelity (lower = better).
    """
    from captum.metrics import infidelity

    baselines = tuple(b.expand_as(x) for b, x in zip(baselines, inputs))

    def perturb(xs: Any, bs: Any) -> Tuple[Tuple[Tensor, ...], Tuple[Tensor, ...]]:
        # Captum passes bare tensors for a single input, tuples otherwise
        xs = xs if isinstance(xs, tuple) else (xs,)
        bs = bs if isinstance(bs, tuple) else (bs,)
        u = torch.rand(xs[0].shape[0], layout.n_units, generator=generator)
        perturbed = layout.apply((u < remove_prob) & layout.valid, xs, bs)
        # the removed values that differ from the baseline: 1 (multiply-by-inputs
        # convention) or the change itself (local convention)
        perturbation = tuple(
            (xp != x).to(x.dtype) if multiply_by_inputs else x - xp
            for x, xp in zip(xs, perturbed)
        )
        return perturbation, perturbed

    value = infidelity(
        forward_func,
        perturb,
        inputs,
        attributions,
        baselines=baselines,
        additional_forward_args=additional_forward_args,
        target=target,
        n_perturb_samples=n_perturb_samples,
        normalize=normalize,
    )
    return float(value.reshape(-1)[0].item())


def bootstrap_ci(
    values: Sequence[float],
    n_boot: int = 1000,
    level: float = 0.95,
    rng: Optional[np.random.Generator] = None,
) -> Dict[str, float]:
    r"""Mean and percentile-bootstrap confidence interval over examples.

    NaN values (e.g. AUROC on an example without evidence) are left out; ``n`` says
    how many values were used.

    Returns:
        dict: ``mean``, ``ci_low``, ``ci_high``, ``n``, ``std``.
    """
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=np.float64)
    if v.size == 0:
        return {"mean": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "n": 0, "std": float("nan")}
    rng = rng if rng is not None else np.random.default_rng(0)
    if v.size == 1 or n_boot <= 0:
        lo = hi = float(v.mean())
    else:
        idx = rng.integers(0, v.size, size=(n_boot, v.size))
        means = v[idx].mean(axis=1)
        alpha = (1.0 - level) / 2.0
        lo, hi = (float(q) for q in np.quantile(means, [alpha, 1.0 - alpha]))
    return {
        "mean": float(v.mean()),
        "ci_low": lo,
        "ci_high": hi,
        "n": int(v.size),
        "std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
    }
