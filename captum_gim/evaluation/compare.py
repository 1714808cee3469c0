r"""The comparison behind ``captum-gim compare``: GIM against Integrated Gradients and
Captum's gradient methods, on faithfulness, agreement with known evidence, and cost.

Every method attributes the same forward function at the same inputs (token
embeddings) with the same baselines (the baseline token at every rankable position):

- ``gim``: :class:`~captum_gim.GIMAttribution` (TSG at ``T``, norm freeze, gradient
  division), gradient x (input - baseline);
- ``gim-tsg``, ``gim-norm``, ``gim-div``: one GIM rule alone; ``gim-off``: no rule
  (plain gradient x (input - baseline), the control for the three);
- ``ig``: Captum's ``IntegratedGradients`` (``n_steps``, Gauss-Legendre);
- ``ig-gim``: the same inside :func:`~captum_gim.gim_backward` ("IG-GIM");
- ``saliency``: Captum's ``Saliency`` (absolute gradient);
- ``ixg``: Captum's ``InputXGradient`` (gradient x input, i.e. a zero baseline, as Captum
  defines it);
- ``gradshap``: Captum's ``GradientShap`` (baseline distribution: the baseline);
- ``random``: Gaussian noise, the floor.

Units are ranked by their summed attribution, highest first (signed: evidence *for*
the explained output ranks first; ``Saliency`` is unsigned), ties broken by a random key
that is the same for every method. See :mod:`captum_gim.evaluation.metrics` for the
metrics. Results are deterministic for a given seed, except wall time and memory.
"""

from __future__ import annotations

import datetime as _dt
import math
import platform
import sys
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from ..attr import GIMAttribution
from ..scope import gim_backward
from .metrics import (
    CURVE_FRACTIONS,
    ERASER_FRACTIONS,
    UnitLayout,
    bootstrap_ci,
    expand_args,
    faithfulness,
    ground_truth_auroc,
    rank_units,
    top1_hit,
    unit_infidelity,
)
from .resources import PeakMemory, memory_method, timed
from .tasks import Example, Task

__all__ = [
    "CompareSettings",
    "MethodSpec",
    "METHOD_KEYS",
    "METRICS",
    "build_methods",
    "run_comparison",
    "versions",
]

#: every method, in report order
METHOD_KEYS: Tuple[str, ...] = (
    "gim",
    "gim-tsg",
    "gim-norm",
    "gim-div",
    "gim-off",
    "ig",
    "ig-gim",
    "saliency",
    "ixg",
    "gradshap",
    "random",
)

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


@dataclass
class CompareSettings:
    r"""Settings of one comparison (all of them go into the report).

    Attributes:
        n_steps (int): Integrated Gradients steps (IG and IG-GIM). Default: 50.
        seed (int): seeds everything random (tie-breaks, GradientShap, the random
            floor, infidelity perturbations, bootstrap).
        temperature (float): GIM's TSG temperature. Default: 2.0.
        methods (list of str, optional): method keys to run (default: all).
        fractions (tuple of float): ERASER bins.
        curve_fractions (tuple of float): deletion-curve grid.
        n_bootstrap (int): bootstrap resamples for the confidence intervals.
        ci_level (float): confidence level. Default: 0.95.
        infidelity_samples (int): perturbations per example for infidelity.
        infidelity_remove_prob (float): chance that a unit is removed in a perturbation.
        gradshap_samples (int): GradientShap samples per example.
        internal_batch_size (int, optional): IG's internal batch size.
        measure_memory (bool): measure peak memory (one extra call per method).
        progress (bool): tqdm progress bars.
        reference (str): the method paired differences are computed against.
        n_show (int): examples kept (with every method's unit scores) for the HTML page.
    """

    n_steps: int = 50
    seed: int = 0
    temperature: float = 2.0
    methods: Optional[List[str]] = None
    fractions: Tuple[float, ...] = ERASER_FRACTIONS
    curve_fractions: Tuple[float, ...] = CURVE_FRACTIONS
    n_bootstrap: int = 1000
    ci_level: float = 0.95
    infidelity_samples: int = 20
    infidelity_remove_prob: float = 0.3
    gradshap_samples: int = 20
    internal_batch_size: Optional[int] = None
    measure_memory: bool = True
    progress: bool = True
    reference: str = "ig"
    n_show: int = 4


@dataclass
class MethodSpec:
    r"""One attribution method as the comparison runs it.

    Attributes:
        key (str): short id (``gim``, ``ig``...).
        name (str): display name.
        family (str): ``GIM``, ``GIM ablation``, ``Captum`` or ``floor``.
        description (str): what exactly is computed.
        multiplies_by_inputs (bool): whether attributions are multiplied by
            ``input - baseline`` (decides infidelity's perturbation convention).
        signed (bool): whether attributions carry a sign.
        attribute (Callable): ``attribute(example, seed) -> tuple of Tensors`` shaped
            like the inputs.
        gim (dict, optional): GIM settings, for GIM methods.
        report (Callable, optional): returns what the GIM rules matched.
    """

    key: str
    name: str
    family: str
    description: str
    multiplies_by_inputs: bool
    signed: bool
    attribute: Callable[[Example, int], Tuple[Tensor, ...]]
    gim: Optional[Dict[str, Any]] = None
    report: Optional[Callable[[], Any]] = None


def _runner(
    method: Any, baselines: bool = True, **kwargs: Any
) -> Callable[[Example, int], Tuple[Tensor, ...]]:
    r"""``attribute(example, seed)``: ``method.attribute`` on the example's inputs, target
    and forward arguments (and its baselines, unless ``baselines=False``), plus ``kwargs``."""

    def run(ex: Example, seed: int) -> Tuple[Tensor, ...]:
        extra = {"baselines": ex.baselines} if baselines else {}
        out = method.attribute(
            ex.inputs, target=ex.target, additional_forward_args=ex.additional_forward_args,
            **extra, **kwargs,
        )
        return out if isinstance(out, tuple) else (out,)

    return run


def build_methods(task: Task, settings: CompareSettings) -> List[MethodSpec]:
    r"""The methods to compare, in report order (restricted to ``settings.methods``)."""
    from captum.attr import (
        GradientShap,
        InputXGradient,
        IntegratedGradients,
        Saliency,
    )

    f = task.forward_func
    model = task.model
    T = settings.temperature
    specs: List[MethodSpec] = []

    def gim(key: str, name: str, family: str, temp: float, freeze: bool, divide: bool, what: str) -> None:
        method = GIMAttribution(
            f, model=model, temperature=temp, freeze_norms=freeze, divide_grads=divide
        )
        specs.append(
            MethodSpec(
                key, name, family, what, True, True, _runner(method),
                gim={"temperature": temp, "freeze_norms": freeze, "divide_grads": divide},
                report=lambda: method.last_report,
            )
        )

    gim("gim", "GIM", "GIM", T, True, True,
        f"GIMAttribution (T={T:g}, norm freeze, gradient division): GIM gradient x (input - baseline)")
    gim("gim-tsg", "GIM: TSG only", "GIM ablation", T, False, False,
        f"GIMAttribution with only temperature-scaled softmax gradients (T={T:g})")
    gim("gim-norm", "GIM: norm freeze only", "GIM ablation", 1.0, True, False,
        "GIMAttribution with only the LayerNorm/RMSNorm freeze")
    gim("gim-div", "GIM: grad division only", "GIM ablation", 1.0, False, True,
        "GIMAttribution with only the q,k x1/4, v x1/2 (gated MLP x1/2) gradient division")
    gim("gim-off", "GIM: no rules", "GIM ablation", 1.0, False, False,
        "GIMAttribution with every rule off: plain gradient x (input - baseline)")

    run_ig = _runner(
        IntegratedGradients(f, multiply_by_inputs=True),
        n_steps=settings.n_steps,
        internal_batch_size=settings.internal_batch_size,
    )

    specs.append(MethodSpec(
        "ig", "IntegratedGradients", "Captum",
        f"captum.attr.IntegratedGradients, n_steps={settings.n_steps} (gausslegendre), "
        "baseline: the baseline token", True, True, run_ig))

    ig_report: Dict[str, Any] = {}

    def run_ig_gim(ex: Example, seed: int) -> Tuple[Tensor, ...]:
        with gim_backward(model, temperature=T) as report:
            ig_report["last"] = report
            return run_ig(ex, seed)

    specs.append(MethodSpec(
        "ig-gim", "IG-GIM", "GIM",
        f"captum.attr.IntegratedGradients (n_steps={settings.n_steps}) inside "
        f"gim_backward(T={T:g}, all rules)", True, True, run_ig_gim,
        gim={"temperature": T, "freeze_norms": True, "divide_grads": True},
        report=lambda: ig_report.get("last")))

    specs.append(MethodSpec(
        "saliency", "Saliency", "Captum", "captum.attr.Saliency (absolute gradient)",
        False, False, _runner(Saliency(f), baselines=False, abs=True)))
    specs.append(MethodSpec(
        "ixg", "InputXGradient", "Captum",
        "captum.attr.InputXGradient: gradient x input (Captum's definition: a zero baseline)",
        True, True, _runner(InputXGradient(f), baselines=False)))
    specs.append(MethodSpec(
        "gradshap", "GradientShap", "Captum",
        f"captum.attr.GradientShap, n_samples={settings.gradshap_samples}, stdevs=0, "
        "baseline distribution: the baseline", True, True,
        _runner(GradientShap(f, multiply_by_inputs=True),
                n_samples=settings.gradshap_samples, stdevs=0.0)))

    def run_random(ex: Example, seed: int) -> Tuple[Tensor, ...]:
        g = torch.Generator().manual_seed(seed)
        return tuple(torch.randn(x.shape, generator=g, dtype=torch.float32).to(x.device) for x in ex.inputs)

    specs.append(MethodSpec(
        "random", "Random", "floor", "Gaussian noise (seeded): the floor every method should beat",
        True, True, run_random))

    if settings.methods:
        wanted = [m.lower() for m in settings.methods]
        unknown = [m for m in wanted if m not in METHOD_KEYS]
        if unknown:
            raise ValueError(
                f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHOD_KEYS)}"
            )
        specs = [s for s in specs if s.key in wanted]
    return specs


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([abs(int(p)) for p in parts]).generate_state(1)[0])


def _seed_global(seed: int) -> None:
    # torch for most methods; numpy because Captum's GradientShap draws its path
    # coefficients with np.random
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))


def versions(task: Optional[Task] = None) -> Dict[str, Optional[str]]:
    r"""Versions of everything that shapes the numbers."""
    import captum

    from .. import __version__

    out: Dict[str, Optional[str]] = {
        "captum_gim": __version__,
        "torch": torch.__version__,
        "captum": captum.__version__,
        "numpy": np.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "torch_threads": str(torch.get_num_threads()),
    }
    from importlib import metadata

    for name in ("transformers", "pyhealth", "matplotlib"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    if task is not None and task.device.type == "cuda":
        out["cuda_device"] = torch.cuda.get_device_name(task.device)
    return out


def _report_summary(report: Any) -> Optional[Dict[str, Any]]:
    if report is None:
        return None
    return {
        "installed": {k: len(v) for k, v in report.by_rule(installed_only=True).items()},
        "matched": {k: len(v) for k, v in report.by_rule().items()},
        "unmatched": [f"{n} ({c})" for n, c in report.unmatched],
        "notes": list(report.notes),
    }


@dataclass
class _PerExample:
    r"""What every method's evaluation of one example shares: its units, the shared
    tie-break key, the evidence flattened per unit, and its removal score function."""

    ex: Example
    layout: UnitLayout
    tiebreak: Tensor
    evidence: Optional[Tensor]
    score_fn: Callable[[Tuple[Tensor, ...]], Tensor]


def _prepare(task: Task, ex: Example, tiebreak_seed: int) -> _PerExample:
    layout = UnitLayout(ex.inputs, task.reduce_dims, ex.valid)
    tiebreak = torch.from_numpy(np.random.default_rng(tiebreak_seed).random(layout.n_units))
    evidence = (
        torch.cat([e.reshape(-1).bool().cpu() for e in ex.evidence])
        if ex.evidence is not None else None
    )

    def score_fn(batch: Tuple[Tensor, ...]) -> Tensor:
        args = expand_args(ex.additional_forward_args, batch[0].shape[0]) or ()
        return task.score_fn(task.forward_func(*batch, *args), ex.target)

    return _PerExample(ex, layout, tiebreak, evidence, score_fn)


def _evaluate_example(
    task: Task,
    spec: MethodSpec,
    prep: _PerExample,
    attributions: Tuple[Tensor, ...],
    settings: CompareSettings,
    seed: int,
) -> Tuple[Dict[str, float], List[float], Tensor]:
    ex, layout = prep.ex, prep.layout
    scores = layout.scores(attributions)
    order = rank_units(scores, layout.valid, prep.tiebreak)
    faith = faithfulness(
        prep.score_fn, layout, ex.inputs, ex.baselines, order,
        fractions=settings.fractions, curve_fractions=settings.curve_fractions,
    )
    if prep.evidence is not None:
        auroc = ground_truth_auroc(scores, prep.evidence, layout.valid)
        top1 = top1_hit(order, prep.evidence)
    else:
        auroc = top1 = float("nan")
    infid = unit_infidelity(
        task.forward_func,
        layout,
        ex.inputs,
        ex.baselines,
        tuple(a.detach() for a in attributions),
        target=ex.target,
        additional_forward_args=ex.additional_forward_args,
        n_perturb_samples=settings.infidelity_samples,
        remove_prob=settings.infidelity_remove_prob,
        multiply_by_inputs=spec.multiplies_by_inputs,
        generator=torch.Generator().manual_seed(seed),
    )
    values = {
        "comprehensiveness_aopc": faith.comprehensiveness_aopc,
        "sufficiency_aopc": faith.sufficiency_aopc,
        "deletion_auc": faith.deletion_auc,
        "gt_auroc": auroc,
        "gt_top1": top1,
        "infidelity": infid,
        "full_score": faith.full_score,
    }
    for f_, c in zip(settings.fractions, faith.comprehensiveness):
        values[f"comprehensiveness@{f_:g}"] = c
    for f_, s in zip(settings.fractions, faith.sufficiency):
        values[f"sufficiency@{f_:g}"] = s
    return values, faith.curve, scores


def _finite(x: float) -> Optional[float]:
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else float(x)


def run_comparison(task: Task, settings: CompareSettings) -> Dict[str, Any]:
    r"""Run every method on every example of ``task`` and aggregate.

    Returns:
        dict: the report (JSON-ready apart from NaN, which the writer turns into
        null): ``settings``, ``task``, ``versions``, ``date``, ``methods`` (one record
        per method with every metric as mean and confidence interval, per-example
        values, the deletion curve, per-group means, paired differences against the
        reference method, time and memory) and ``examples_shown`` for the HTML page.
    """
    with warnings.catch_warnings():
        # Captum warns that our inputs did not require gradients: it sets that itself
        warnings.filterwarnings("ignore", message="Input Tensor .* did not already require")
        np_state = np.random.get_state()
        devices = [task.device.index or 0] if task.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):  # leave the caller's RNGs alone
                return _run(task, settings)
        finally:
            np.random.set_state(np_state)


def _run(task: Task, settings: CompareSettings) -> Dict[str, Any]:
    from tqdm.auto import tqdm

    specs = build_methods(task, settings)
    if not specs:
        raise ValueError("no method to run")
    examples = task.examples
    n = len(examples)
    if n == 0:
        raise ValueError("the task has no examples")
    device = task.device
    prepared = [_prepare(task, ex, _seed(settings.seed, 1, i)) for i, ex in enumerate(examples)]
    shown = list(range(min(settings.n_show, n)))
    per_method: Dict[str, Dict[str, Any]] = {
        spec.key: {"values": {}, "curves": [], "shown": {}, "times": []} for spec in specs
    }
    # warm-up (untimed): first-call costs (lazy init, imports, allocator) are not the method's
    for spec in specs:
        m_idx = METHOD_KEYS.index(spec.key)  # seeds follow the method, not its position
        _seed_global(_seed(settings.seed, 2, m_idx))
        spec.attribute(examples[0], _seed(settings.seed, 3, m_idx, 0))
    bar = tqdm(total=len(specs) * n, desc="attributing", disable=not settings.progress, unit="attr")
    # examples outside, methods inside: a change of machine load during the run affects
    # every method alike instead of whichever method happens to run then
    for i, ex in enumerate(examples):
        for spec in specs:
            m_idx = METHOD_KEYS.index(spec.key)
            data = per_method[spec.key]
            s = _seed(settings.seed, 3, m_idx, i)
            _seed_global(s)
            attrs, seconds = timed(lambda: spec.attribute(ex, s), device)
            data["times"].append(seconds)
            vals, curve, scores = _evaluate_example(task, spec, prepared[i], attrs, settings, s)
            for k, v in vals.items():
                data["values"].setdefault(k, []).append(v)
            data["curves"].append(curve)
            if i in shown:
                data["shown"][i] = scores.tolist()
            bar.update(1)
    bar.close()
    for spec in specs:
        data = per_method[spec.key]
        data["values"]["time_ms"] = [t * 1000.0 for t in data.pop("times")]
        data["rules"] = _report_summary(spec.report() if spec.report else None)

    mem_how = memory_method(device) if settings.measure_memory else None
    if settings.measure_memory and mem_how is not None:
        # after all timing: the CPU measurement changes malloc settings
        longest = max(range(n), key=lambda i: sum(x.numel() for x in examples[i].inputs))
        for spec in tqdm(specs, desc="peak memory", disable=not settings.progress):
            m_idx = METHOD_KEYS.index(spec.key)
            _seed_global(_seed(settings.seed, 4, m_idx))
            meter = PeakMemory(device)
            with meter.measure():
                out = spec.attribute(examples[longest], _seed(settings.seed, 3, m_idx, longest))
                del out
            per_method[spec.key]["peak_memory_bytes"] = meter.peak_bytes
    return _aggregate(task, settings, specs, per_method, prepared, shown, mem_how)


def _ci(values: Sequence[float], settings: CompareSettings, *key: int) -> Dict[str, Any]:
    rng = np.random.default_rng(_seed(settings.seed, 5, *key))
    out = bootstrap_ci(values, settings.n_bootstrap, settings.ci_level, rng)
    return {k: (_finite(v) if isinstance(v, float) else v) for k, v in out.items()}


def _aggregate(
    task: Task,
    settings: CompareSettings,
    specs: List[MethodSpec],
    per_method: Dict[str, Dict[str, Any]],
    prepared: List[_PerExample],
    shown: List[int],
    mem_how: Optional[str],
) -> Dict[str, Any]:
    examples = task.examples
    groups = sorted({ex.group for ex in examples if ex.group is not None})
    group_index = {g: [i for i, ex in enumerate(examples) if ex.group == g] for g in groups}
    ref = settings.reference if settings.reference in per_method else None
    records = []
    for spec in specs:
        m_idx = METHOD_KEYS.index(spec.key)
        data = per_method[spec.key]
        vals = data["values"]
        metrics = {}
        for j, name in enumerate(list(METRICS) + [k for k in vals if k not in METRICS]):
            if name in vals:
                metrics[name] = _ci(vals[name], settings, m_idx, j)
        curves = np.asarray(data["curves"], dtype=np.float64)
        curve_ci = [_ci(curves[:, c].tolist(), settings, m_idx, 100 + c) for c in range(curves.shape[1])]
        by_group: Dict[str, Dict[str, Optional[float]]] = {}
        for g, idx in group_index.items():
            by_group[g] = {
                name: _finite(float(np.nanmean([vals[name][i] for i in idx])))
                if any(not math.isnan(vals[name][i]) for i in idx) else None
                for name in METRICS if name != "time_ms"
            }
            by_group[g]["n"] = len(idx)
        vs_ref = None
        if ref is not None and spec.key != ref:
            rv = per_method[ref]["values"]
            vs_ref = {"reference": ref}
            for j, name in enumerate(METRICS):
                a, b = vals.get(name), rv.get(name)
                if a is None or b is None:
                    continue
                diffs = [x - y for x, y in zip(a, b)]
                vs_ref[name] = _ci(diffs, settings, m_idx, 200 + j)
            t_self = float(np.median(vals["time_ms"]))
            t_ref = float(np.median(rv["time_ms"]))
            vs_ref["median_time_ratio"] = _finite(t_self / t_ref) if t_ref > 0 else None
        peak = data.get("peak_memory_bytes")
        records.append(
            {
                "key": spec.key,
                "name": spec.name,
                "family": spec.family,
                "description": spec.description,
                "multiplies_by_inputs": spec.multiplies_by_inputs,
                "signed": spec.signed,
                "gim_settings": spec.gim,
                "gim_rules": data["rules"],
                "metrics": metrics,
                "median_time_ms": _finite(float(np.median(vals["time_ms"]))),
                "peak_memory_mib": None if peak is None else peak / 2**20,
                "deletion_curve": {
                    "fractions": list(settings.curve_fractions),
                    "mean": [c["mean"] for c in curve_ci],
                    "ci_low": [c["ci_low"] for c in curve_ci],
                    "ci_high": [c["ci_high"] for c in curve_ci],
                },
                "by_group": by_group or None,
                "vs_reference": vs_ref,
                "per_example": {k: [_finite(x) for x in v] for k, v in vals.items()},
            }
        )
    shown_examples = []
    for i in shown:
        prep = prepared[i]
        ex = prep.ex
        shown_examples.append(
            {
                "index": i,
                "text": ex.text,
                "group": ex.group,
                "true_label": ex.true_label,
                "target": ex.target,
                "target_label": ex.target_label,
                "unit_labels": ex.unit_labels,
                "valid": prep.layout.valid.tolist(),
                "evidence": prep.evidence.tolist() if prep.evidence is not None else None,
                "full_score": _finite(per_method[specs[0].key]["values"]["full_score"][i]),
                "scores": {spec.key: per_method[spec.key]["shown"][i] for spec in specs},
            }
        )
    settings_dict = asdict(settings)
    settings_dict["methods"] = [s.key for s in specs]
    return {
        "schema": "captum-gim/compare/1",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "settings": settings_dict,
        "task": {
            "name": task.name,
            "description": task.description,
            "n_examples": len(examples),
            "unit": task.unit_name,
            "score": task.score_name,
            "ground_truth": task.ground_truth,
            "groups": groups or None,
            "device": str(task.device),
            "info": task.info,
        },
        "measurement": {
            "time": "wall time of one attribute() call per example (batch of 1), after one "
            "untimed warm-up call per method; methods interleaved example by example; "
            f"{torch.get_num_threads()} torch thread(s) on {task.device}",
            "memory": mem_how,
            "ranking": "units ranked by summed attribution, highest first; ties broken by a "
            "seeded random key shared by all methods",
            "comprehensiveness": "p(full) - p(top-k units replaced by the baseline), mean over "
            f"bins {list(settings.fractions)} of the units (k = max(1, floor(f*n)))",
            "sufficiency": "p(full) - p(only the top-k units kept, the rest replaced), same bins",
            "deletion_auc": "area under the score after removing the top fraction f of units, "
            "f on the curve grid (k = round(f*n))",
            "infidelity": "captum.metrics.infidelity (normalize=True), perturbations remove each "
            f"unit with probability {settings.infidelity_remove_prob}",
            "ci": f"{settings.ci_level:.0%} percentile bootstrap over examples, "
            f"{settings.n_bootstrap} resamples",
        },
        "versions": versions(task),
        "methods": records,
        "examples_shown": shown_examples,
    }
