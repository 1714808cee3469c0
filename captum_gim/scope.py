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
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Set, Tuple

from torch import nn

from .config import GIMConfig
from .errors import UnmatchedModulesError, UnmatchedModulesWarning
from .registry import Handle, Match, Plan, RuleRegistry, combine_handles, default_registry

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
    """

    config: GIMConfig
    matches: List[Tuple[str, str, str, bool]] = field(default_factory=list)
    unmatched: List[Tuple[str, str]] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

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


def _check_unmatched(model: nn.Module, plan: Plan, strict: bool) -> None:
    if not plan.unmatched:
        return
    if strict:
        raise UnmatchedModulesError(_unmatched_message(plan))
    key = (type(model).__qualname__, tuple(plan.unmatched))
    with _warned_lock:
        if key in _warned:
            return
        _warned.add(key)
    warnings.warn(_unmatched_message(plan), UnmatchedModulesWarning, stacklevel=4)


def _report(plan: Plan, config: GIMConfig) -> GIMReport:
    report = GIMReport(config=config, unmatched=list(plan.unmatched))
    seen_notes: Set[str] = set()
    for m in plan.matches:
        report.matches.append((m.name, m.class_name, m.rule.name, m.rule.is_enabled(config)))
        if m.rule.note and m.rule.note not in seen_notes:
            seen_notes.add(m.rule.note)
            report.notes.append(f"{m.rule.name}: {m.rule.note}")
    return report


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
) -> Iterator[GIMReport]:
    r"""Give ``model`` GIM's backward pass inside the ``with`` block; restore it on exit.

    Inside the block any gradient computed through ``model`` (Captum's ``Saliency``,
    ``InputXGradient``, ``IntegratedGradients``, ``GradientShap``, ``NoiseTunnel``... or a
    plain ``backward()``) is a GIM gradient. Forward outputs do not change. Only this
    model instance is changed (other instances of the same class, other threads' models
    and ``torch`` itself are untouched), and every change is undone on exit, also when
    the block raises (including ``KeyboardInterrupt``). Scopes nest.

    Args:
        model (nn.Module): the model whose backward pass is modified.
        temperature (float): TSG temperature for attention softmaxes. Default: 2.0.
        freeze_norms (bool): freeze LayerNorm std / RMSNorm ``1/rms``. Default: True.
        divide_grads (bool): q,k x1/4, v x1/2, gated-MLP branches x1/2. Default: True.
        keep_norm_mean (bool): LayerNorm's mean keeps its gradient. Default: True.
        strict (bool): raise :class:`UnmatchedModulesError` before changing anything if
            the model has attention- or norm-like modules that no rule matches; when
            False (default), warn once with the same list.
        registry (RuleRegistry, optional): the rules to use. Default: the default
            registry (built-in rules plus those added with :func:`register_rule`).

    Returns:
        GIMReport: which modules each rule matched (yielded by the ``with``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"gim_backward needs the torch.nn.Module whose backward to modify, "
            f"got {type(model).__name__}"
        )
    config = GIMConfig(
        temperature=temperature,
        freeze_norms=freeze_norms,
        divide_grads=divide_grads,
        keep_norm_mean=keep_norm_mean,
    )
    from .rules import ensure_ecosystem_rules

    if registry is None:
        registry = default_registry
    ensure_ecosystem_rules(registry)
    plan = registry.plan(model)
    _check_unmatched(model, plan, strict)
    report = _report(plan, config)
    handles: List[Handle] = []
    try:
        for match in plan.matches:
            if match.rule.is_enabled(config):
                handles.append(_install(match, config))
        yield report
    finally:
        combine_handles(handles).remove()


def _install(match: Match, config: GIMConfig) -> Handle:
    handle = match.rule.install(match.module, config)
    if not isinstance(handle, Handle) and not hasattr(handle, "remove"):
        raise TypeError(
            f"rule {match.rule.name!r} must return a Handle from install(), "
            f"got {type(handle).__name__}"
        )
    return handle
