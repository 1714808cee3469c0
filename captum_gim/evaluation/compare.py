r"""The comparison behind ``captum-gim compare`` and :func:`captum_gim.compare`: every method
of :mod:`~captum_gim.evaluation.methods` on every example of a task, scored by the metrics
of :mod:`~captum_gim.evaluation.metrics`, timed, its forward passes counted, aggregated into
a :class:`~captum_gim.evaluation.report.Report`.

Units are ranked by their summed attribution, highest first (signed: evidence *for*
the explained output ranks first; ``Saliency`` is unsigned), ties broken by a random key
that is the same for every method. Results are deterministic for a given seed, except
wall time and memory.

Data-parallel: when a ``torch.distributed`` process group of several processes is open
(``captum-gim compare`` started by ``torchrun`` or ``accelerate launch`` opens one), each
process evaluates the examples ``rank, rank + world_size, ...``, every seed still being
that of the example, and the per-example values are gathered on rank 0, which puts them
back in example order, measures memory and computes the statistics: the report equals a
one-process run's (times and memory aside). :func:`run_comparison` returns None on the
other ranks.
"""

from __future__ import annotations

import dataclasses
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

from .frontier import frontier_report, frontier_summary, paired, verdict
from .methods import METHOD_KEYS, SWEPT, CompareSettings, MethodSpec, build_methods, method_seed
from .metrics import UnitLayout, bootstrap_ci, expand_args, faithfulness, ground_truth_auroc
from .metrics import rank_units, top1_hit, unit_infidelity
from .report import Report
from .resources import PeakMemory, memory_method, timed
from .types import METRICS, Example, MethodResult, MetricSummary, Task

__all__ = ["CompareSettings", "MethodSpec", "METHOD_KEYS", "METRICS", "build_methods", "run_comparison", "versions"]

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

    from .._version import __version__

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




def _finite(x: Any) -> Optional[float]:
    return None if x is None or not math.isfinite(float(x)) else float(x)


class _PassCounter:
    r"""Wraps the forward function: counts the rows pushed through it while ``active``
    (each row of a gradient method is one forward and one backward pass)."""

    def __init__(self, fn: Callable[..., Tensor]) -> None:
        self.fn, self.active, self.rows = fn, False, 0

    def __call__(self, *args: Any) -> Tensor:
        if self.active and args and isinstance(args[0], Tensor):
            self.rows += int(args[0].shape[0])
        return self.fn(*args)


@dataclass
class _Measured:
    r"""What one method produced over the examples, before aggregation."""

    spec: MethodSpec
    values: Dict[str, List[float]]
    curves: List[List[float]]
    shown: Dict[int, List[float]]
    passes: List[int]
    peak_bytes: Optional[int] = None


def _world() -> Tuple[int, int]:
    r"""``(rank, world_size)`` of an open ``torch.distributed`` group, else ``(0, 1)``."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather(measured: Dict[str, "_Measured"], times: Dict[str, List[float]], mine: List[int],
            n: int, world: int) -> Optional[Tuple[Dict[str, "_Measured"], Dict[str, List[float]]]]:
    r"""Every rank's per-example values on rank 0, in example order (None elsewhere)."""
    dist = torch.distributed
    part = {key: (m.values, m.curves, m.shown, m.passes, times[key]) for key, m in measured.items()}
    parts: Optional[List[Any]] = [None] * world if dist.get_rank() == 0 else None
    dist.gather_object((mine, part), parts, dst=0)
    if parts is None:
        return None
    where: Dict[int, Tuple[int, int]] = {}  # example -> (rank, position in that rank's list)
    for r, (idx, _) in enumerate(parts):
        for j, i in enumerate(idx):
            where[i] = (r, j)
    if sorted(where) != list(range(n)):
        raise RuntimeError("the processes did not cover every example once")
    order = [where[i] for i in range(n)]
    for key, m in measured.items():
        pick = [parts[r][1][key] for r in range(world)]
        m.values = {name: [pick[r][0][name][j] for r, j in order] for name in pick[0][0]}
        m.curves = [pick[r][1][j] for r, j in order]
        m.shown = {i: v for p in pick for i, v in p[2].items()}
        m.passes = [pick[r][3][j] for r, j in order]
        times[key] = [pick[r][4][j] for r, j in order]
    return measured, times


def run_comparison(task: Task, settings: CompareSettings) -> Optional[Report]:
    r"""Run every method on every example of ``task`` and aggregate.

    Inside an open ``torch.distributed`` group of several processes the examples are
    shared between them and the values gathered on rank 0 (see the module's docstring).

    Returns:
        Report: per method every metric as mean and confidence interval, per-example
        values, the deletion curve, per-group means, paired differences against the
        reference method, time, passes and memory; the budget sweep and the frontier.
        None on the ranks other than 0 of a multi-process run.
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


def _run(task: Task, settings: CompareSettings) -> Optional[Report]:
    from tqdm.auto import tqdm

    rank, world = _world()
    counter = _PassCounter(task.forward_func)
    specs = build_methods(dataclasses.replace(task, forward_func=counter), settings)
    if not specs:
        raise ValueError("no method to run")
    examples = task.examples
    n = len(examples)
    if n == 0:
        raise ValueError("the task has no examples")
    device = task.device
    prepared = [_prepare(task, ex, _seed(settings.seed, 1, i)) for i, ex in enumerate(examples)]
    shown = list(range(min(settings.n_show, n)))
    measured = {s.key: _Measured(s, {}, [], {}, []) for s in specs}
    times: Dict[str, List[float]] = {s.key: [] for s in specs}
    # warm-up (untimed): first-call costs (lazy init, imports, allocator) are not the method's
    for spec in specs:
        _seed_global(_seed(settings.seed, 2, method_seed(spec.key)))
        spec.attribute(examples[0], _seed(settings.seed, 3, method_seed(spec.key), 0))
    mine = list(range(rank, n, world))  # every example when one process runs
    bar = tqdm(total=len(specs) * len(mine), desc="attributing", unit="attr",
               disable=not settings.progress or rank != 0)
    # examples outside, methods inside: a change of machine load during the run affects
    # every method alike instead of whichever method happens to run then
    for i in mine:
        ex = examples[i]
        for spec in specs:
            data = measured[spec.key]
            s = _seed(settings.seed, 3, method_seed(spec.key), i)
            _seed_global(s)
            counter.rows, counter.active = 0, True
            try:
                attrs, seconds = timed(lambda: spec.attribute(ex, s), device)
            finally:
                counter.active = False
            data.passes.append(counter.rows)
            times[spec.key].append(seconds * 1000.0)
            vals, curve, scores = _evaluate_example(task, spec, prepared[i], attrs, settings, s)
            for k, v in vals.items():
                data.values.setdefault(k, []).append(v)
            data.curves.append(curve)
            if i in shown:
                data.shown[i] = scores.tolist()
            bar.update(1)
    bar.close()
    if world > 1:
        gathered = _gather(measured, times, mine, n, world)
        if gathered is None:
            return None
        measured, times = gathered
    for spec in specs:
        measured[spec.key].values["time_ms"] = times[spec.key]
    mem_how = memory_method(device) if settings.measure_memory else None
    if mem_how is not None:
        # after all timing: the CPU measurement changes malloc settings
        longest = max(range(n), key=lambda i: sum(x.numel() for x in examples[i].inputs))
        for spec in tqdm(specs, desc="peak memory", disable=not settings.progress):
            _seed_global(_seed(settings.seed, 4, method_seed(spec.key)))
            meter = PeakMemory(device)
            with meter.measure():
                out = spec.attribute(examples[longest], _seed(settings.seed, 3, method_seed(spec.key), longest))
                del out
            measured[spec.key].peak_bytes = meter.peak_bytes
    return _aggregate(task, settings, list(measured.values()), prepared, shown, mem_how)


def _ci(values: Sequence[float], settings: CompareSettings, *key: int) -> MetricSummary:
    rng = np.random.default_rng(_seed(settings.seed, 5, *key))
    return MetricSummary.from_dict(bootstrap_ci(values, settings.n_bootstrap, settings.ci_level, rng))


def _by_group(values: Dict[str, List[float]], group_index: Dict[str, List[int]]) -> Optional[Dict[str, Any]]:
    out: Dict[str, Dict[str, Any]] = {}
    for g, idx in group_index.items():
        out[g] = {}
        for name in METRICS:
            if name == "time_ms":
                continue
            xs = [values[name][i] for i in idx if not math.isnan(values[name][i])]
            out[g][name] = _finite(float(np.mean(xs))) if xs else None
        out[g]["n"] = len(idx)
    return out or None


def _vs_reference(m: _Measured, ref: Optional[_Measured], settings: CompareSettings) -> Optional[Dict[str, Any]]:
    if ref is None or ref is m:
        return None
    rng = np.random.default_rng(_seed(settings.seed, 6, method_seed(m.spec.key)))
    out: Dict[str, Any] = {"reference": ref.spec.key}
    for name, (_, higher) in METRICS.items():
        if name in m.values and name in ref.values:
            d = paired(m.values[name], ref.values[name], settings.n_bootstrap, settings.ci_level, rng)
            out[name] = dict(asdict(d), verdict=verdict(d, higher, settings.tolerance))
    t_self, t_ref = float(np.median(m.values["time_ms"])), float(np.median(ref.values["time_ms"]))
    out["median_time_ratio"] = _finite(t_self / t_ref) if t_ref > 0 else None
    return out


def _method_result(
    m: _Measured, ref: Optional[_Measured], settings: CompareSettings, group_index: Dict[str, List[int]]
) -> MethodResult:
    spec, vals = m.spec, m.values
    k = method_seed(spec.key)
    names = list(METRICS) + [name for name in vals if name not in METRICS]
    metrics = {name: _ci(vals[name], settings, k, j) for j, name in enumerate(names) if name in vals}
    curves = np.asarray(m.curves, dtype=np.float64)
    curve_ci = [_ci(curves[:, c].tolist(), settings, k, 100 + c) for c in range(curves.shape[1])]
    report = spec.report() if spec.report else None
    return MethodResult(
        key=spec.key, name=spec.name, family=spec.family, description=spec.description,
        baseline=spec.baseline, base=spec.base or spec.key, budget=spec.budget,
        multiplies_by_inputs=spec.multiplies_by_inputs, signed=spec.signed, metrics=metrics,
        median_time_ms=_finite(float(np.median(vals["time_ms"]))),
        passes=float(np.median(m.passes)) if m.passes else None,
        peak_memory_mib=None if m.peak_bytes is None else m.peak_bytes / 2**20,
        deletion_curve={"fractions": list(settings.curve_fractions),
                        "mean": [c.mean for c in curve_ci], "ci_low": [c.ci_low for c in curve_ci],
                        "ci_high": [c.ci_high for c in curve_ci]},
        by_group=_by_group(vals, group_index), vs_reference=_vs_reference(m, ref, settings),
        per_example={name: [_finite(x) for x in v] for name, v in vals.items()},
        gim_settings=spec.gim, gim_rules=_report_summary(report),
    )


def _shown_example(i: int, prep: _PerExample, measured: List[_Measured]) -> Dict[str, Any]:
    ex = prep.ex
    return {
        "index": i, "text": ex.text, "group": ex.group, "true_label": ex.true_label,
        "target": ex.target, "target_label": ex.target_label, "unit_labels": ex.unit_labels,
        "valid": prep.layout.valid.tolist(),
        "evidence": prep.evidence.tolist() if prep.evidence is not None else None,
        "full_score": _finite(measured[0].values["full_score"][i]),
        "scores": {m.spec.key: m.shown[i] for m in measured},
    }


def _measurement(task: Task, settings: CompareSettings, mem_how: Optional[str]) -> Dict[str, Any]:
    return {
        "time": "wall time of one attribute() call per example (batch of 1), after one "
        "untimed warm-up call per method; methods interleaved example by example; "
        f"{torch.get_num_threads()} torch thread(s) on {task.device}",
        "passes": "rows pushed through the forward function during one attribute() call "
        "(median over examples); gradient methods run one backward pass per row",
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
        f"{settings.n_bootstrap} resamples; paired differences are bootstrapped over the "
        f"differences per example; 'better'/'worse' only when the CI excludes zero and the "
        f"difference exceeds the tolerance {settings.tolerance:g}",
    }


def _aggregate(
    task: Task, settings: CompareSettings, measured: List[_Measured], prepared: List[_PerExample],
    shown: List[int], mem_how: Optional[str],
) -> Report:
    examples = task.examples
    groups = sorted({ex.group for ex in examples if ex.group is not None})
    group_index = {g: [i for i, ex in enumerate(examples) if ex.group == g] for g in groups}
    ref = next((m for m in measured if m.spec.key == settings.reference), None)
    methods = [_method_result(m, ref, settings, group_index) for m in measured]
    settings_dict = asdict(settings)
    settings_dict["methods"] = [m.key for m in methods]
    sweep = {
        "enabled": settings.sweep,
        "budgets": {base: [m.budget for m in methods if m.base == base] for base in SWEPT},
        "budget_kind": dict(SWEPT),
        "methods": [m.key for m in methods if m.budget is not None],
        "points": [{"key": m.key, "base": m.base, "budget": m.budget,
                    "median_time_ms": m.median_time_ms, "passes": m.passes,
                    "means": {k: m.mean(k) for k in METRICS if k != "time_ms"}} for m in methods],
    }
    frontier = frontier_report(methods, n_boot=settings.n_bootstrap, level=settings.ci_level,
                               tolerance=settings.tolerance, seed=settings.seed)
    report = Report(
        schema="captum-gim/compare/2",
        date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        settings=settings_dict,
        task={"name": task.name, "description": task.description, "n_examples": len(examples),
              "unit": task.unit_name, "score": task.score_name, "ground_truth": task.ground_truth,
              "baseline": task.baseline_name, "groups": groups or None,
              "device": str(task.device), "info": task.info},
        measurement=_measurement(task, settings, mem_how),
        versions=versions(task),
        methods=methods,
        examples_shown=[_shown_example(i, prepared[i], measured) for i in shown],
        sweep=sweep,
        frontier=frontier,
    )
    frontier["summary"] = frontier_summary(frontier, {m.key: m.name for m in methods})
    report.summary = report.summary_text()
    return report
