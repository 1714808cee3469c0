r"""The methods ``compare`` runs, each as a :class:`MethodSpec`.

Every method attributes the same forward function at the same inputs (token
embeddings) with the same baselines (the baseline token at every rankable position),
except where its row says otherwise (``baseline``):

- ``gim``: :class:`~captum_gim.GIMAttribution` (TSG at ``T``, norm freeze, gradient
  division), gradient x (input - baseline);
- ``gim-tsg``, ``gim-norm``, ``gim-div``: one GIM rule alone; ``gim-off``: no rule
  (plain gradient x (input - baseline), the control for the three);
- ``ig``: Captum's ``IntegratedGradients`` (``n_steps``, Gauss-Legendre);
- ``ig-gim``: the same inside :func:`~captum_gim.gim_backward` ("IG-GIM");
- ``saliency``: Captum's ``Saliency`` (absolute gradient, no baseline);
- ``ixg``: Captum's ``InputXGradient`` (gradient x input: a zero baseline, as Captum
  defines it);
- ``gradshap``: Captum's ``GradientShap`` (baseline distribution: the baseline);
- ``nt-gim``: Captum's ``NoiseTunnel`` (SmoothGrad) around GIM;
- ``random``: Gaussian noise, the floor.

The budget sweep adds ``ig@N`` and ``ig-gim@N`` (N steps) and ``gradshap@N`` and
``nt-gim@N`` (N samples); ``ig@1`` and ``ig@2`` are always in a sweep: they cost about
what GIM costs (matched budgets).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..attr import GIMAttribution
from ..scope import gim_backward
from .metrics import CURVE_FRACTIONS, ERASER_FRACTIONS
from .types import Example, Task

__all__ = ["CompareSettings", "MethodSpec", "METHOD_KEYS", "SWEPT", "build_methods", "method_seed"]

#: every method without a budget suffix, in report order
METHOD_KEYS: Tuple[str, ...] = (
    "gim", "gim-tsg", "gim-norm", "gim-div", "gim-off", "ig", "ig-gim", "saliency", "ixg",
    "gradshap", "nt-gim", "random",
)
#: the methods with a budget: key -> what the budget counts
SWEPT: Dict[str, str] = {"ig": "steps", "ig-gim": "steps", "gradshap": "samples", "nt-gim": "samples"}
#: IG step counts always added to a sweep: GIM's own budget, about
MATCHED_STEPS: Tuple[int, ...] = (1, 2)


@dataclass
class CompareSettings:
    r"""Settings of one comparison (all of them go into the report).

    Attributes:
        n_steps (int): Integrated Gradients steps of ``ig`` and ``ig-gim``. Default: 50.
        seed (int): seeds everything random (tie-breaks, GradientShap, the random
            floor, infidelity perturbations, bootstrap).
        temperature (float): GIM's TSG temperature. Default: 2.0.
        methods (list of str, optional): method keys to run (default: all); budgeted
            keys such as ``ig@8`` are accepted.
        sweep (bool): add the budget sweep (see ``steps`` and ``samples``).
        steps (tuple of int): IG and IG-GIM step counts of the sweep.
        samples (tuple of int): GradientShap and NoiseTunnel(GIM) sample counts of the sweep.
        nt_stdev (float): NoiseTunnel's noise, as a fraction of each input's standard
            deviation.
        fractions (tuple of float): ERASER bins.
        curve_fractions (tuple of float): deletion-curve grid.
        n_bootstrap (int): bootstrap resamples for the confidence intervals.
        ci_level (float): confidence level. Default: 0.95.
        tolerance (float): differences smaller than this are never called better or worse.
        infidelity_samples (int): perturbations per example for infidelity.
        infidelity_remove_prob (float): chance that a unit is removed in a perturbation.
        gradshap_samples (int): GradientShap (and NoiseTunnel) samples outside the sweep.
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
    sweep: bool = True
    steps: Tuple[int, ...] = (4, 8, 16, 50)
    samples: Tuple[int, ...] = (5, 10, 20)
    nt_stdev: float = 0.1
    fractions: Tuple[float, ...] = ERASER_FRACTIONS
    curve_fractions: Tuple[float, ...] = CURVE_FRACTIONS
    n_bootstrap: int = 1000
    ci_level: float = 0.95
    tolerance: float = 1e-3
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
        key (str): short id (``gim``, ``ig``, ``ig@8``...).
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
        baseline (str): what the method compares the input with.
        base (str): the key without a budget.
        budget (int, optional): steps or samples.
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
    baseline: str = "task baseline"
    base: str = ""
    budget: Optional[int] = None


def method_seed(key: str) -> int:
    r"""A stable number per method key: seeds follow the method, not its position."""
    return zlib.crc32(key.encode())


def _runner(method: Any, baselines: bool = True, **kwargs: Any) -> Callable[[Example, int], Tuple[Tensor, ...]]:
    def run(ex: Example, seed: int) -> Tuple[Tensor, ...]:
        extra = {"baselines": ex.baselines} if baselines else {}
        out = method.attribute(ex.inputs, target=ex.target,
                               additional_forward_args=ex.additional_forward_args, **extra, **kwargs)
        return out if isinstance(out, tuple) else (out,)

    return run


def _budgets(settings: CompareSettings) -> Dict[str, List[int]]:
    r"""Budgets per swept method (the unsuffixed method's own budget included)."""
    own = {"ig": settings.n_steps, "ig-gim": settings.n_steps,
           "gradshap": settings.gradshap_samples, "nt-gim": settings.gradshap_samples}
    out = {k: [v] for k, v in own.items()}
    if settings.sweep:
        for k, kind in SWEPT.items():
            extra = list(settings.steps if kind == "steps" else settings.samples)
            if k == "ig":
                extra += list(MATCHED_STEPS)
            out[k] = sorted(set(out[k]) | set(extra))
    for m in settings.methods or ():  # budgets asked for by name (ig@3)
        key, _, n = m.strip().lower().partition("@")
        if key in SWEPT and n.isdigit() and int(n) > 0:
            out[key] = sorted(set(out[key]) | {int(n)})
    return out


def build_methods(task: Task, settings: CompareSettings) -> List[MethodSpec]:
    r"""The methods to compare, in report order (restricted to ``settings.methods``)."""
    from captum.attr import GradientShap, InputXGradient, IntegratedGradients, NoiseTunnel, Saliency

    f, model, T = task.forward_func, task.model, settings.temperature
    specs: List[MethodSpec] = []
    on = {"temperature": T, "freeze_norms": True, "divide_grads": True}

    def gim(key: str, name: str, family: str, temp: float, freeze: bool, divide: bool, what: str) -> None:
        method = GIMAttribution(f, model=model, temperature=temp, freeze_norms=freeze, divide_grads=divide)
        specs.append(MethodSpec(
            key, name, family, what, True, True, _runner(method),
            gim={"temperature": temp, "freeze_norms": freeze, "divide_grads": divide},
            report=lambda: method.last_report, base=key))

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
    budgets = _budgets(settings)

    def suffix(key: str, n: int) -> str:
        own = settings.n_steps if SWEPT[key] == "steps" else settings.gradshap_samples
        return key if n == own else f"{key}@{n}"

    ig = IntegratedGradients(f, multiply_by_inputs=True)
    for n in budgets["ig"]:
        specs.append(MethodSpec(
            suffix("ig", n), f"IG({n})", "Captum",
            f"captum.attr.IntegratedGradients, n_steps={n} (gausslegendre), baseline: the baseline",
            True, True, _runner(ig, n_steps=n, internal_batch_size=settings.internal_batch_size),
            base="ig", budget=n))
    for n in budgets["ig-gim"]:
        specs.append(_ig_gim(suffix("ig-gim", n), n, ig, model, settings))
    specs.append(MethodSpec(
        "saliency", "Saliency", "Captum", "captum.attr.Saliency (absolute gradient)",
        False, False, _runner(Saliency(f), baselines=False, abs=True), baseline="none", base="saliency"))
    specs.append(MethodSpec(
        "ixg", "InputXGradient", "Captum",
        "captum.attr.InputXGradient: gradient x input (Captum's definition: a zero baseline)",
        True, True, _runner(InputXGradient(f), baselines=False), baseline="zero", base="ixg"))
    shap = GradientShap(f, multiply_by_inputs=True)
    for n in budgets["gradshap"]:
        specs.append(MethodSpec(
            suffix("gradshap", n), f"GradientShap({n})", "Captum",
            f"captum.attr.GradientShap, n_samples={n}, stdevs=0, baseline distribution: the baseline",
            True, True, _runner(shap, n_samples=n, stdevs=0.0), base="gradshap", budget=n))
    nt = NoiseTunnel(GIMAttribution(f, model=model, temperature=T))
    for n in budgets["nt-gim"]:
        specs.append(MethodSpec(
            suffix("nt-gim", n), f"NoiseTunnel(GIM, {n})", "GIM",
            f"captum.attr.NoiseTunnel (smoothgrad, nt_samples={n}, stdev {settings.nt_stdev:g} x "
            f"the input's std) around GIM (T={T:g}, all rules)",
            True, True, _noise_runner(nt, n, settings.nt_stdev), gim=on, base="nt-gim", budget=n))

    def run_random(ex: Example, seed: int) -> Tuple[Tensor, ...]:
        g = torch.Generator().manual_seed(seed)
        return tuple(torch.randn(x.shape, generator=g, dtype=torch.float32).to(x.device) for x in ex.inputs)

    specs.append(MethodSpec(
        "random", "Random", "floor", "Gaussian noise (seeded): the floor every method should beat",
        True, True, run_random, baseline="n/a", base="random"))
    return _select(specs, settings.methods)


def _ig_gim(key: str, n: int, ig: Any, model: Any, settings: CompareSettings) -> MethodSpec:
    T = settings.temperature
    run_ig = _runner(ig, n_steps=n, internal_batch_size=settings.internal_batch_size)
    last: Dict[str, Any] = {}

    def run(ex: Example, seed: int) -> Tuple[Tensor, ...]:
        with gim_backward(model, temperature=T) as report:
            last["report"] = report
            return run_ig(ex, seed)

    return MethodSpec(
        key, f"IG-GIM({n})", "GIM",
        f"captum.attr.IntegratedGradients (n_steps={n}) inside gim_backward(T={T:g}, all rules)",
        True, True, run, gim={"temperature": T, "freeze_norms": True, "divide_grads": True},
        report=lambda: last.get("report"), base="ig-gim", budget=n)


def _noise_runner(nt: Any, n: int, frac: float) -> Callable[[Example, int], Tuple[Tensor, ...]]:
    def run(ex: Example, seed: int) -> Tuple[Tensor, ...]:
        stdevs = tuple(float(frac * x.float().std()) for x in ex.inputs)
        out = nt.attribute(ex.inputs, nt_type="smoothgrad", nt_samples=n, stdevs=stdevs,
                           baselines=ex.baselines, target=ex.target,
                           additional_forward_args=ex.additional_forward_args)
        return out if isinstance(out, tuple) else (out,)

    return run


def _select(specs: List[MethodSpec], methods: Optional[Sequence[str]]) -> List[MethodSpec]:
    if not methods:
        return specs
    wanted = [m.strip().lower() for m in methods]
    known = {s.key for s in specs}
    unknown = [m for m in wanted if m not in known and m.split("@")[0] not in METHOD_KEYS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHOD_KEYS)}"
                         " (with @N for a budget: ig@8, gradshap@10)")
    # a bare swept key selects it at every budget of the sweep
    return [s for s in specs if s.key in wanted or (s.base in wanted and s.base in SWEPT)]
