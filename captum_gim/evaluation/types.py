r"""The data of an evaluation: what is explained (:class:`Example`, :class:`Task`), the
metrics (:data:`METRICS`), and what a comparison returns (:class:`MetricSummary`,
:class:`MethodResult`, :class:`ReportData`).

This module is the bottom of :mod:`captum_gim.evaluation`: it imports nothing else from
the package, so tasks, metrics, plots and the report can all build on it without cycles.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

__all__ = [
    "Example",
    "Task",
    "softmax_score",
    "output_score",
    "METRICS",
    "METRIC_TITLES",
    "QUALITY_METRICS",
    "MetricSummary",
    "MethodResult",
    "ReportData",
    "to_jsonable",
]

#: metric name -> (short label, True if higher is better)
METRICS: Dict[str, Tuple[str, bool]] = {
    "comprehensiveness_aopc": ("Comp", True),
    "sufficiency_aopc": ("Suff", False),
    "deletion_auc": ("DelAUC", False),
    "gt_auroc": ("GT-AUROC", True),
    "gt_top1": ("Top-1", True),
    "infidelity": ("Infid", False),
    "time_ms": ("ms/ex", False),
}
#: the quality metrics (every metric but time), in report order
QUALITY_METRICS: Tuple[str, ...] = tuple(m for m in METRICS if m != "time_ms")
#: metric name -> title for plots and pages
METRIC_TITLES: Dict[str, str] = {
    "comprehensiveness_aopc": "Comprehensiveness (AOPC)",
    "sufficiency_aopc": "Sufficiency (AOPC)",
    "deletion_auc": "Deletion AUC",
    "gt_auroc": "Ground-truth AUROC",
    "gt_top1": "Top-1 hit rate",
    "infidelity": "Infidelity",
    "time_ms": "Time per example (ms)",
}


@dataclass
class Example:
    r"""One example to explain.

    Attributes:
        inputs (tuple[Tensor, ...]): float inputs with batch size 1 (embedding space).
        baselines (tuple[Tensor, ...]): shaped like ``inputs``: every rankable unit
            replaced by the baseline token's embedding (or the baseline value), other
            units (special tokens, padding) equal to the input.
        target (int, optional): the output index explained (None for scalar outputs).
        additional_forward_args (tuple, optional): further forward arguments (masks...),
            tensors with batch size 1.
        valid (tuple[Tensor, ...], optional): per input, bool over its units: which
            ones are ranked and may be removed. Default: all.
        evidence (tuple[Tensor, ...], optional): per input, bool over its units: the
            ground-truth evidence, where known.
        unit_labels (list of str, optional): a display label per unit (all units of all
            inputs, flattened in order).
        group (str, optional): a subgroup name (e.g. the kind of planted evidence).
        true_label (str, optional): the label, for display.
        target_label (str, optional): the name of the explained output, for display.
        text (str, optional): a one-line description for display.
    """

    inputs: Tuple[Tensor, ...]
    baselines: Tuple[Tensor, ...]
    target: Optional[int] = None
    additional_forward_args: Optional[Tuple[Any, ...]] = None
    valid: Optional[Tuple[Tensor, ...]] = None
    evidence: Optional[Tuple[Tensor, ...]] = None
    unit_labels: Optional[List[str]] = None
    group: Optional[str] = None
    true_label: Optional[str] = None
    target_label: Optional[str] = None
    text: Optional[str] = None


def softmax_score(output: Tensor, target: Optional[int]) -> Tensor:
    r"""The softmax probability of ``target`` (sigmoid for a single-logit output)."""
    if output.dim() == 1 or output.shape[-1] == 1:
        return torch.sigmoid(output.reshape(output.shape[0]).float())
    return torch.softmax(output.float(), dim=-1)[:, 0 if target is None else target]


def output_score(output: Tensor, target: Optional[int]) -> Tensor:
    r"""The raw output (selected by ``target`` when given)."""
    if target is None or output.dim() == 1:
        return output.reshape(output.shape[0]).float()
    return output[:, target].float()


@dataclass
class Task:
    r"""A model and the examples to explain, as every attribution method sees them.

    Attributes:
        name (str): short name (``default``, ``minilm``...).
        description (str): what the model is and what it does.
        model (nn.Module): the module whose backward GIM modifies.
        forward_func (Callable): ``forward_func(*inputs, *additional_forward_args)``.
        reduce_dims (tuple of int): per input, trailing dimensions summed into one unit
            score (1 for token embeddings, 0 for continuous values).
        examples (list of Example): what to explain.
        score_fn (Callable): ``score_fn(output, target)``, one score per row: what
            removal-based metrics measure (e.g. the probability of the explained class).
        score_name (str): what ``score_fn`` returns, for plots.
        unit_name (str): what a unit is (token, code...), for plots.
        ground_truth (str, optional): how the evidence was defined, or None if unknown.
        baseline_name (str): what the baseline is, for the table (e.g. ``[MASK]``).
        info (dict): measured facts about the model (accuracy, size, training time...).
    """

    name: str
    description: str
    model: nn.Module
    forward_func: Callable[..., Tensor]
    reduce_dims: Tuple[int, ...]
    examples: List[Example]
    score_fn: Callable[[Tensor, Optional[int]], Tensor] = softmax_score
    score_name: str = "p(target class)"
    unit_name: str = "token"
    ground_truth: Optional[str] = None
    info: Dict[str, Any] = field(default_factory=dict)
    baseline_name: str = "task baseline"

    @property
    def device(self) -> torch.device:
        for p in self.model.parameters():
            return p.device
        return torch.device("cpu")


def _finite(x: Any) -> Optional[float]:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


@dataclass
class MetricSummary:
    r"""One metric of one method over the examples: mean and bootstrap CI.

    Attributes:
        mean (float, optional): mean over the examples with a value (None: no value).
        ci_low (float, optional): lower end of the percentile-bootstrap CI.
        ci_high (float, optional): upper end.
        n (int): how many examples had a value.
        std (float, optional): sample standard deviation.
    """

    mean: Optional[float]
    ci_low: Optional[float] = None
    ci_high: Optional[float] = None
    n: int = 0
    std: Optional[float] = None

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "MetricSummary":
        return cls(_finite(d.get("mean")), _finite(d.get("ci_low")), _finite(d.get("ci_high")),
                   int(d.get("n") or 0), _finite(d.get("std")))

    @property
    def half_width(self) -> Optional[float]:
        r"""Half the CI's width (None without a CI)."""
        if self.ci_low is None or self.ci_high is None:
            return None
        return (self.ci_high - self.ci_low) / 2.0

    def excludes_zero(self, margin: float = 0.0) -> bool:
        r"""Whether the CI lies entirely on one side of zero, by more than ``margin``
        (differences of a few ulps between methods that agree are not a side)."""
        return (self.ci_low is not None and self.ci_high is not None
                and (self.ci_low > margin or self.ci_high < -margin))


@dataclass
class MethodResult:
    r"""Everything measured for one method.

    Attributes:
        key (str): short id (``gim``, ``ig``, ``ig@8``...).
        name (str): display name.
        family (str): ``GIM``, ``GIM ablation``, ``Captum`` or ``floor``.
        description (str): what exactly is computed.
        baseline (str): what the method compares the input with ("task baseline" for
            most; ``zero`` for Captum's InputXGradient; ``none`` for Saliency).
        base (str): the method without its budget (``ig`` for ``ig@8``).
        budget (int, optional): IG steps or samples (None: one gradient).
        multiplies_by_inputs (bool): attributions multiplied by ``input - baseline``.
        signed (bool): attributions carry a sign.
        metrics (dict): metric name -> :class:`MetricSummary`.
        median_time_ms (float, optional): median wall time of one attribution.
        passes (float, optional): forward (+ backward) rows per attribution, counted.
        peak_memory_mib (float, optional): peak memory of one attribution.
        deletion_curve (dict): ``fractions``, ``mean``, ``ci_low``, ``ci_high``.
        by_group (dict, optional): group -> metric -> mean (and ``n``).
        vs_reference (dict, optional): paired differences against the reference method.
        per_example (dict): metric -> value per example.
        gim_settings (dict, optional): GIM settings, for GIM methods.
        gim_rules (dict, optional): what GIM's rules matched and installed.
    """

    key: str
    name: str
    family: str
    description: str
    baseline: str
    base: str
    budget: Optional[int]
    multiplies_by_inputs: bool
    signed: bool
    metrics: Dict[str, MetricSummary]
    median_time_ms: Optional[float]
    passes: Optional[float]
    peak_memory_mib: Optional[float]
    deletion_curve: Dict[str, List[Optional[float]]]
    by_group: Optional[Dict[str, Dict[str, Any]]] = None
    vs_reference: Optional[Dict[str, Any]] = None
    per_example: Dict[str, List[Optional[float]]] = field(default_factory=dict)
    gim_settings: Optional[Dict[str, Any]] = None
    gim_rules: Optional[Dict[str, Any]] = None

    def mean(self, metric: str) -> Optional[float]:
        r"""The mean of ``metric`` (None when not measured)."""
        s = self.metrics.get(metric)
        return None if s is None else s.mean

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "MethodResult":
        d = dict(d)
        d["metrics"] = {k: MetricSummary.from_dict(v) for k, v in d["metrics"].items()}
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class ReportData:
    r"""The result of a comparison, as data (see :class:`captum_gim.evaluation.Report`
    for the methods that print, plot and save it).

    Attributes:
        schema (str): the JSON schema's name and version.
        date (str): when it ran (UTC, ISO 8601).
        settings (dict): every setting of the comparison.
        task (dict): what was explained (name, description, examples, unit, score...).
        measurement (dict): how each number was measured, in words.
        versions (dict): versions of everything that shapes the numbers.
        methods (list of MethodResult): one per method, in report order.
        examples_shown (list of dict): examples with every method's unit scores.
        sweep (dict, optional): the budget sweep: which methods at which budgets.
        frontier (dict, optional): per metric, the cost-quality Pareto frontier, where
            GIM sits, the cheapest method within the CI of the best, and paired
            differences at matched budgets.
        summary (str): the text summary.
        command (str, optional): the command line, for CLI runs.
        files (dict, optional): the files written by :meth:`Report.save`.
        wall_seconds_total (float, optional): how long the whole run took.
    """

    schema: str
    date: str
    settings: Dict[str, Any]
    task: Dict[str, Any]
    measurement: Dict[str, Any]
    versions: Dict[str, Any]
    methods: List[MethodResult]
    examples_shown: List[Dict[str, Any]]
    sweep: Optional[Dict[str, Any]] = None
    frontier: Optional[Dict[str, Any]] = None
    summary: str = ""
    command: Optional[str] = None
    files: Optional[Dict[str, Any]] = None
    wall_seconds_total: Optional[float] = None

    def method(self, key: str) -> Optional[MethodResult]:
        r"""The result of the method ``key`` (None if it did not run)."""
        return next((m for m in self.methods if m.key == key), None)

    @property
    def has_ground_truth(self) -> bool:
        r"""Whether any method has a ground-truth metric."""
        return any((m.metrics.get("gt_auroc") or MetricSummary(None)).n for m in self.methods)

    def to_dict(self) -> Dict[str, Any]:
        r"""The report as plain JSON-ready data (NaN as None)."""
        return to_jsonable(dataclasses.asdict(self))

    def to_json(self, indent: Optional[int] = 1) -> str:
        r"""The report as strict JSON (no NaN)."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "ReportData":
        r"""Read a report back from :meth:`to_dict` (or a ``report.json``)."""
        d = dict(d)
        d["methods"] = [MethodResult.from_dict(m) for m in d["methods"]]
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dataframe(self) -> Any:
        r"""One row per method: mean and CI of every metric, time, passes, memory
        (needs pandas)."""
        try:
            import pandas as pd
        except ImportError as e:  # pragma: no cover - pandas is a dev dependency
            raise ImportError("Report.to_dataframe needs pandas: pip install pandas") from e
        rows = []
        for m in self.methods:
            row: Dict[str, Any] = {"key": m.key, "name": m.name, "family": m.family,
                                   "baseline": m.baseline, "budget": m.budget}
            for name, s in m.metrics.items():
                if name in METRICS:
                    row[name] = s.mean
                    row[f"{name}_ci_low"] = s.ci_low
                    row[f"{name}_ci_high"] = s.ci_high
            row.update(median_time_ms=m.median_time_ms, passes=m.passes,
                       peak_memory_mib=m.peak_memory_mib)
            rows.append(row)
        return pd.DataFrame(rows).set_index("key")


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
