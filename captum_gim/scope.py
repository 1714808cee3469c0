r"""``gim_backward``: GIM's backward pass for one model, inside a ``with`` block.

Example::

    >>> import torch
    >>> from captum.attr import IntegratedGradients
    >>> from captum_gim import gim_backward
    >>> layer = torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True).eval()
    >>> model = torch.nn.Sequential(layer, torch.nn.Flatten(), torch.nn.Linear(16 * 5, 3))
    >>> x = torch.randn(2, 5, 16)
    >>> with gim_backward(model) as report:          # IntegratedGradients is now "IG-GIM"
    ...     attr = IntegratedGradients(model).attribute(x, target=0, n_steps=8)
    >>> sorted(report.by_rule())
    ['torch.nn.LayerNorm', 'torch.nn.MultiheadAttention']
"""

from __future__ import annotations

import contextlib
import threading
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Set, Tuple

import torch
from torch import nn

from . import _context
from ._patching import Handle, acquire, combine_handles, install_rule
from .config import GIMConfig
from .errors import UnmatchedModulesError, UnmatchedModulesWarning
from .registry import Plan, RuleRegistry, default_registry
from .rules.known import fully_accounted

__all__ = ["gim_backward", "GIMReport", "UnmatchedModulesError", "UnmatchedModulesWarning"]


@dataclass
class GIMReport:
    r"""What :func:`gim_backward` did to a model.

    Attributes:
        config (GIMConfig): the settings in force.
        matches (list of (module name, class name, rule name, installed)): every module a
            rule matched; ``installed`` is False where the rule's switch is off in ``config``.
        unmatched (list of (module name, class name)): attention- or norm-like modules
            that no rule matched (they keep their plain gradient).
        notes (list of str): what rules had to say (e.g. softmaxes deliberately left alone).
        coverage (list of (module path, class name, op, cover)): the normalisations and
            attention softmaxes the functional layer saw run, and what covered each.
    """

    config: GIMConfig
    matches: List[Tuple[str, str, str, bool]] = field(default_factory=list)
    unmatched: List[Tuple[str, str]] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    coverage: List[Tuple[str, str, str, str]] = field(default_factory=list)

    def by_rule(self, installed_only: bool = False) -> Dict[str, List[str]]:
        """Module names grouped by the rule that matched them."""
        out: Dict[str, List[str]] = {}
        for name, _cls, rule, installed in self.matches:
            if installed or not installed_only:
                out.setdefault(rule, []).append(name)
        return out

    def __str__(self) -> str:
        lines = [f"GIM backward ({self.config})"]
        for rule, names in self.by_rule().items():
            shown = ", ".join(n or "<root>" for n in names[:6])
            more = f" and {len(names) - 6} more" if len(names) > 6 else ""
            lines.append(f"  {rule}: {len(names)} module(s): {shown}{more}")
        if self.unmatched:
            lines.append(
                "  no rule (plain gradient): "
                + ", ".join(f"{n} ({c})" for n, c in self.unmatched)
            )
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


_warned: Set[Tuple[str, Tuple[Tuple[str, str], ...]]] = set()
_warned_lock = threading.Lock()


def _unmatched_message(plan: Plan) -> str:
    return (
        "no GIM rule matches these attention- or norm-like modules, so they would keep "
        f"their plain gradient: {plan.describe_unmatched()}. Register a rule for them "
        "(captum_gim.register_rule, see the 'writing your own rule' guide), mark them as "
        "needing none (registry.ignore(TheClass)), or pass strict=False to go on anyway."
    )


def _warn_once(key: Any, message: str, category: type = UnmatchedModulesWarning) -> None:
    with _warned_lock:
        if key in _warned:
            return
        _warned.add(key)
    warnings.warn(message, category, stacklevel=5)


def _check_unmatched(model: nn.Module, plan: Plan, strict: bool) -> None:
    if not plan.unmatched:
        return
    if strict:
        raise UnmatchedModulesError(_unmatched_message(plan))
    _warn_once((type(model).__qualname__, tuple(plan.unmatched)), _unmatched_message(plan))


def _is_script(module: nn.Module) -> bool:
    return isinstance(module, getattr(torch.jit, "ScriptModule", ()))


def _scripted(model: nn.Module) -> List[str]:
    """Names of the TorchScript (scripted or traced) modules of ``model``."""
    return [n or "<root>" for n, m in model.named_modules() if _is_script(m)]


def _check_scripted(model: nn.Module, names: List[str], strict: bool) -> None:
    if not names:
        return
    message = (
        f"GIM cannot modify the backward pass of TorchScript modules ({', '.join(names[:5])}"
        f"{' ...' if len(names) > 5 else ''}): a scripted or traced graph runs none of the "
        "Python forwards, hooks or function modes GIM works through, so its gradient would "
        "be the plain gradient. Attribute the original Python module instead (before "
        "torch.jit.script / torch.jit.trace)."
    )
    if strict:
        raise UnmatchedModulesError(message)
    _warn_once(("script", type(model).__qualname__, tuple(names)), message)


def _report(plan: Plan, config: GIMConfig) -> GIMReport:
    report = GIMReport(config=config, unmatched=list(plan.unmatched))
    seen_notes: Set[str] = set()
    for m in plan.matches:
        report.matches.append((m.name, m.class_name, m.rule.name, m.rule.is_enabled(config)))
        if m.rule.note and m.rule.note not in seen_notes:
            seen_notes.add(m.rule.note)
            report.notes.append(f"{m.rule.name}: {m.rule.note}")
    return report


# ---------------------------------------------------------------------------------------
# Plans, cached per model and registry (invalidated when the modules or rules change)
# ---------------------------------------------------------------------------------------


@dataclass
class _Cached:
    model: "weakref.ReferenceType[nn.Module]"
    fingerprint: Tuple[Any, ...]
    plan: Plan
    modules: frozenset
    #: names of the TorchScript modules (scripted or traced)
    scripted: List[str]
    #: whether the functional layer has anything to add (:mod:`captum_gim.rules.known`)
    functional: bool


_plan_lock = threading.Lock()
_PLANS: Dict[Tuple[int, int], _Cached] = {}


def _fingerprint(model: nn.Module, registry: RuleRegistry) -> Tuple[Any, ...]:
    mods = tuple((id(m), type(m)) for m in model.modules())
    cfg = getattr(model, "config", None)
    impl = getattr(cfg, "_attn_implementation", None) if cfg is not None else None
    return (registry.version, len(registry), impl, mods)


def _plan(model: nn.Module, registry: RuleRegistry) -> _Cached:
    """The plan of ``registry`` for ``model`` and what follows from it, computed once per
    model, registry and module tree (re-planned when a module is added, removed or
    replaced, the rules change, or the attention implementation is switched)."""
    key = (id(model), id(registry))
    fp = _fingerprint(model, registry)
    with _plan_lock:
        hit = _PLANS.get(key)
        if hit is not None and hit.model() is model and hit.fingerprint == fp:
            return hit
    plan = registry.plan(model)
    functional = not fully_accounted(
        model, [(m.module, m.rule.name) for m in plan.matches], [r.name for r in registry.rules]
    )
    made = _Cached(
        weakref.ref(model), fp, plan, frozenset(i for i, _t in fp[-1]), _scripted(model),
        functional,
    )
    with _plan_lock:
        if len(_PLANS) > 256:  # models that are gone
            for k in [k for k, v in _PLANS.items() if v.model() is None]:
                del _PLANS[k]
        _PLANS[key] = made
    return made


def _functional_installer() -> Optional[Any]:
    try:
        from .rules.functional import install_functional
    except (ImportError, AttributeError):
        return None
    return install_functional


@contextlib.contextmanager
def gim_backward(
    model: nn.Module,
    *,
    temperature: float = 2.0,
    freeze_norms: bool = True,
    divide_grads: bool = True,
    keep_norm_mean: bool = True,
    strict: bool = False,
    registry: Optional[RuleRegistry] = None,
    config: Optional[GIMConfig] = None,
) -> Iterator[GIMReport]:
    r"""Give ``model`` GIM's backward pass inside the ``with`` block; restore it on exit.

    Inside the block any gradient computed through ``model`` (Captum's ``Saliency``,
    ``InputXGradient``, ``IntegratedGradients``, ``GradientShap``, ``NoiseTunnel``... or a
    plain ``backward()``) is a GIM gradient. Forward outputs do not change.

    The scope belongs to this model in this execution context (thread or asyncio task):
    the rules are installed once per module instance, shared by every open scope and
    undone when the last one leaves, and what they compute is chosen at call time from the
    settings of the innermost scope open on this model in the calling context. Another
    thread using the same model at the same moment gets the plain gradient (or its own
    scope's settings). Scopes nest and may be exited in any order; when the last one
    exits, the model is exactly as before, also when the block raises.

    Args:
        model (nn.Module): the model whose backward pass is modified.
        temperature (float): TSG temperature for attention softmaxes. Default: 2.0.
        freeze_norms (bool): freeze LayerNorm std / RMSNorm ``1/rms``. Default: True.
        divide_grads (bool): q,k x1/4, v x1/2, gated-MLP branches x1/2. Default: True.
        keep_norm_mean (bool): LayerNorm's mean keeps its gradient. Default: True.
        strict (bool): raise :class:`UnmatchedModulesError` before changing anything if
            the model has attention- or norm-like modules that no rule matches, or is
            (or contains) a TorchScript module; when False (default), warn once instead.
        registry (RuleRegistry, optional): the rules to use. Default: the default
            registry (built-in rules plus those added with :func:`register_rule`).
        config (GIMConfig, optional): the four settings as one object (then leave the
            four keywords at their defaults).

    Returns:
        GIMReport: which modules each rule matched (yielded by the ``with``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"gim_backward needs the torch.nn.Module whose backward to modify, "
            f"got {type(model).__name__}"
        )
    settings = dict(
        temperature=temperature,
        freeze_norms=freeze_norms,
        divide_grads=divide_grads,
        keep_norm_mean=keep_norm_mean,
    )
    if config is None:
        config = GIMConfig(**settings)  # type: ignore[arg-type]
    elif not isinstance(config, GIMConfig):
        raise TypeError(f"config= must be a captum_gim.GIMConfig, got {type(config).__name__}")
    elif any(v != getattr(GIMConfig(), k) for k, v in settings.items()):
        raise ValueError("pass the settings either as config= or as keywords, not both")
    from .rules import ensure_ecosystem_rules, integration_problems

    if registry is None:
        registry = default_registry
    ensure_ecosystem_rules(registry)
    for problem in integration_problems(model):
        _warn_once(("integration", problem), problem, UserWarning)
    cached = _plan(model, registry)
    plan, modules = cached.plan, cached.modules
    _check_scripted(model, cached.scripted, strict)
    _check_unmatched(model, plan, strict)
    report = _report(plan, config)
    active = _context.ActiveScope(
        model=model,
        config=config,
        strict=strict,
        registry=registry,
        modules=modules,
        rules={id(m.module): m.rule for m in plan.matches if m.rule.is_enabled(config)},
        coverage=report.coverage,
    )
    handles: List[Handle] = []
    entered = False
    try:
        for match in plan.matches:
            if match.rule.is_enabled(config):
                handles.append(install_rule(match.module, match.rule, config))
        functional = _functional_installer() if cached.functional else None
        if functional is not None and not _is_script(model):  # a script root takes no hooks
            handles.append(
                acquire(model, "functional", lambda: functional(model, _getter(model)))[0]
            )
        _context.enter(active)
        entered = True
        yield report
    finally:
        if entered:
            _context.leave(active)
        combine_handles(handles).remove()


def _getter(model: nn.Module) -> Any:
    ref = weakref.ref(model)

    def get_active() -> Optional[_context.ActiveScope]:
        m = ref()
        return _context.active_for_model(m) if m is not None else None

    return get_active
