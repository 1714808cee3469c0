r"""Evaluating attributions: the metrics, tasks and comparison behind ``captum-gim compare``
and :func:`captum_gim.compare`.

Layers, bottom first (each imports only from those before it):

- :mod:`~captum_gim.evaluation.types`: :class:`Example`, :class:`Task`, ``METRICS`` and the
  typed report data (:class:`MetricSummary`, :class:`MethodResult`).
- :mod:`~captum_gim.evaluation.metrics`: comprehensiveness, sufficiency (ERASER AOPC),
  deletion curves, ground-truth AUROC and top-1 hits, Captum's infidelity for unit
  removal, bootstrap confidence intervals; :mod:`~captum_gim.evaluation.resources`:
  time and peak memory.
- :mod:`~captum_gim.evaluation.tasks`: what is explained (the embedded default, MiniLM,
  PyHealth, a local Hugging Face checkpoint).
- :mod:`~captum_gim.evaluation.table`, :mod:`~captum_gim.evaluation.plots`,
  :mod:`~captum_gim.evaluation.page`, :mod:`~captum_gim.evaluation.frontier`: the
  table, the figures, the HTML page, the cost-quality frontier.
- :mod:`~captum_gim.evaluation.report`: :class:`Report`.
- :mod:`~captum_gim.evaluation.methods` and :mod:`~captum_gim.evaluation.compare`: the
  methods and the comparison; :mod:`~captum_gim.evaluation.api`: :func:`compare`.
"""

from .metrics import (
    CURVE_FRACTIONS,
    ERASER_FRACTIONS,
    UnitLayout,
    bootstrap_ci,
    faithfulness,
    ground_truth_auroc,
    rank_units,
    top1_hit,
    unit_infidelity,
)
from .tasks import load_task
from .types import METRICS, Example, MethodResult, MetricSummary, Task

__all__ = [
    "CURVE_FRACTIONS",
    "ERASER_FRACTIONS",
    "METRICS",
    "UnitLayout",
    "bootstrap_ci",
    "faithfulness",
    "ground_truth_auroc",
    "rank_units",
    "top1_hit",
    "unit_infidelity",
    "Example",
    "Task",
    "MethodResult",
    "MetricSummary",
    "Report",
    "load_task",
]


def __getattr__(name: str):  # the comparison imports captum; load it when asked for
    if name == "Report":
        from .report import Report

        return Report
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
