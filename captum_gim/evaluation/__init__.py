r"""Evaluating attributions: the metrics, tasks and comparison behind ``captum-gim compare``.

- :mod:`~captum_gim.evaluation.metrics`: comprehensiveness, sufficiency (ERASER AOPC),
  deletion curves, ground-truth AUROC and top-1 hits, Captum's infidelity for unit
  removal, bootstrap confidence intervals.
- :mod:`~captum_gim.evaluation.tasks`: what is explained (the embedded default, MiniLM,
  PyHealth, a local Hugging Face checkpoint).
- :mod:`~captum_gim.evaluation.compare`: the methods and the comparison itself.
- :mod:`~captum_gim.evaluation.report`: the table and the JSON report.
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
from .tasks import Example, Task, load_task

__all__ = [
    "CURVE_FRACTIONS",
    "ERASER_FRACTIONS",
    "UnitLayout",
    "bootstrap_ci",
    "faithfulness",
    "ground_truth_auroc",
    "rank_units",
    "top1_hit",
    "unit_infidelity",
    "Example",
    "Task",
    "load_task",
]
