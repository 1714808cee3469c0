r"""Rules and the registry that matches them to the modules of one model.

A :class:`Rule` says *what it matches* (module types, a predicate for duck-typed classes)
and *how it changes the backward pass* of one matched module instance (its ``install``
function, which returns a handle that undoes the change). Rules never touch a class,
a ``torch`` function or anything outside the module instance they are given.

A :class:`RuleRegistry` is an ordered list of rules. :meth:`RuleRegistry.plan` walks a
model and gives each module the first rule that matches it; modules that look like
attention or normalisation layers but match no rule are reported, so that strict mode
can refuse to run. ``default_registry`` holds the built-in rules; :func:`register_rule`
adds one of yours (it takes precedence over the built-ins) and returns a handle whose
``remove()`` takes it out again.

Example::

    >>> import torch
    >>> from captum_gim import Rule, register_rule, replace_forward
    >>> from captum_gim.ops import frozen_rms_norm
    >>> class MyNorm(torch.nn.Module):
    ...     def __init__(self, d):
    ...         super().__init__()
    ...         self.weight = torch.nn.Parameter(torch.ones(d))
    ...     def forward(self, x):
    ...         return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight
    >>> rule = Rule(
    ...     "my-norm",
    ...     kind="norm",
    ...     types=(MyNorm,),
    ...     install=lambda m, cfg: replace_forward(
    ...         m, lambda x: frozen_rms_norm(x, m.weight.shape, m.weight, 1e-6)
    ...     ),
    ... )
    >>> handle = register_rule(rule)
    >>> handle.remove()
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Tuple, Type, Union

from torch import nn

from ._patching import Handle, combine_handles, replace_forward
from .config import GIMConfig

__all__ = [
    "Handle",
    "Rule",
    "RuleRegistry",
    "Match",
    "Plan",
    "default_registry",
    "register_rule",
    "replace_forward",
    "combine_handles",
    "looks_like_attention_or_norm",
    "RULE_KINDS",
]

#: The kinds of rules; each kind is switched on by one field of :class:`GIMConfig`.
RULE_KINDS = ("attention", "norm", "gated_mlp", "model", "passthrough")


def _enabled_by_default(kind: str, config: GIMConfig) -> bool:
    if kind == "attention":
        return config.uses_tsg or config.divide_grads
    if kind == "norm":
        return config.freeze_norms
    if kind == "gated_mlp":
        return config.divide_grads
    return not config.is_identity


@dataclass
class Rule:
    r"""One modification of the backward pass, for the modules it matches.

    Args:
        name (str): a short unique name, shown in reports.
        install (Callable[[nn.Module, GIMConfig], Handle]): changes one matched module
            instance and returns a :class:`Handle` that undoes it. Use
            :func:`replace_forward` for the common case.
        kind (str): one of ``"attention"``, ``"norm"``, ``"gated_mlp"``, ``"model"``,
            ``"passthrough"``. The kind decides which :class:`GIMConfig` switch turns the
            rule on (attention: TSG or division; norm: ``freeze_norms``; gated_mlp:
            ``divide_grads``); a ``passthrough`` rule installs nothing and only marks
            modules as deliberately left with their true gradient.
        types (tuple of types): module classes matched with ``isinstance``.
        predicate (Callable[[nn.Module], bool], optional): matches duck-typed classes;
            a module matches if it is an instance of ``types`` *or* the predicate holds.
        exclusive (bool): the rule handles the module's whole subtree; descendants are
            not given to other rules.
        covers (Callable[[nn.Module], bool], optional): descendants for which this returns
            True count as handled by this rule in strict mode (e.g. attention modules whose
            attention function a model-level rule replaces), while other rules may still
            match them.
        enabled (Callable[[GIMConfig], bool], optional): overrides the kind's default
            switch.
        note (str): a line for the report (e.g. why a softmax is left alone).
        explain (Callable[[nn.Module], Optional[str]], optional): for a descendant that
            looks like attention or normalisation but that ``covers`` does not cover, a
            sentence saying why this rule cannot handle it (e.g. an unsupported attention
            implementation); strict mode's error and the warning show it.
    """

    name: str
    install: Callable[[nn.Module, GIMConfig], Handle]
    kind: str = "attention"
    types: Tuple[Type[nn.Module], ...] = ()
    predicate: Optional[Callable[[nn.Module], bool]] = None
    exclusive: bool = False
    covers: Optional[Callable[[nn.Module], bool]] = None
    enabled: Optional[Callable[[GIMConfig], bool]] = None
    note: str = ""
    explain: Optional[Callable[[nn.Module], Optional[str]]] = None

    def __post_init__(self) -> None:
        if self.kind not in RULE_KINDS:
            raise ValueError(f"kind must be one of {RULE_KINDS}, got {self.kind!r}")
        if isinstance(self.types, type):
            self.types = (self.types,)
        self.types = tuple(self.types)
        if not self.types and self.predicate is None:
            raise ValueError(f"rule {self.name!r} needs `types` or a `predicate` to match")

    def matches(self, module: nn.Module) -> bool:
        if self.types and isinstance(module, self.types):
            return True
        return bool(self.predicate(module)) if self.predicate is not None else False

    def is_enabled(self, config: GIMConfig) -> bool:
        if self.kind == "passthrough":
            return False
        if self.enabled is not None:
            return bool(self.enabled(config))
        return _enabled_by_default(self.kind, config)


_ATTN_OR_NORM = re.compile(
    r"(attention|attn|selfatt|layernorm|layer_norm|rmsnorm|rms_norm|groupnorm|instancenorm|norm$)",
    re.IGNORECASE,
)
_NOT_SELF_REPAIRING = re.compile(r"batchnorm|syncbatchnorm|weightnorm|spectralnorm", re.I)


def looks_like_attention_or_norm(module: nn.Module) -> bool:
    r"""Heuristic used by strict mode: the class name says attention or (layer/RMS/...)norm.

    Batch normalisation is not flagged: in evaluation mode it is an affine map with no
    per-example statistics, so there is nothing for GIM to freeze.
    """
    name = type(module).__name__
    return bool(_ATTN_OR_NORM.search(name)) and not _NOT_SELF_REPAIRING.search(name)


@dataclass
class Match:
    """One module and the rule that matched it."""

    name: str
    module: nn.Module
    rule: Rule

    @property
    def class_name(self) -> str:
        return type(self.module).__name__


@dataclass
class Plan:
    """What a registry would do to a model: the matches, and what no rule matched."""

    matches: List[Match] = field(default_factory=list)
    unmatched: List[Tuple[str, str]] = field(default_factory=list)
    #: module name -> why the rule above it cannot handle it (from ``Rule.explain``)
    reasons: Dict[str, str] = field(default_factory=dict)

    def describe_unmatched(self) -> str:
        return ", ".join(
            f"'{n or '<root>'}' ({c})" + (f" [{self.reasons[n]}]" if n in self.reasons else "")
            for n, c in self.unmatched
        )


class RuleRegistry:
    r"""An ordered set of :class:`Rule` objects; the first rule that matches a module wins.

    Args:
        rules (iterable of Rule, optional): initial rules, highest precedence first.
    """

    def __init__(self, rules: Iterable[Rule] = ()) -> None:
        self._rules: List[Rule] = []
        self._ignored: List[Union[Type[nn.Module], Callable[[nn.Module], bool]]] = []
        self._lock = threading.RLock()
        #: bumped by every change of the rules or the ignored classes (plans cache on it)
        self.version = 0
        for r in rules:
            self.register(r, first=False)

    @property
    def rules(self) -> Tuple[Rule, ...]:
        with self._lock:
            return tuple(self._rules)

    def __iter__(self):
        return iter(self.rules)

    def __len__(self) -> int:
        return len(self._rules)

    def __contains__(self, name: object) -> bool:
        return any(r.name == name for r in self.rules)

    def get(self, name: str) -> Rule:
        for r in self.rules:
            if r.name == name:
                return r
        raise KeyError(f"no rule named {name!r}; known: {[r.name for r in self.rules]}")

    def register(self, rule: Rule, *, first: bool = True, replace: bool = False) -> Handle:
        r"""Add ``rule``; with ``first`` (default) it takes precedence over existing rules.

        Returns a :class:`Handle` whose ``remove()`` takes the rule out again.
        Raises ``ValueError`` if a rule of that name exists, unless ``replace=True``.
        """
        if not isinstance(rule, Rule):
            raise TypeError(f"expected a captum_gim.Rule, got {type(rule).__name__}")
        with self._lock:
            old = [r for r in self._rules if r.name == rule.name]
            if old and not replace:
                raise ValueError(
                    f"a rule named {rule.name!r} is already registered; "
                    "pass replace=True to swap it"
                )
            for r in old:
                self._rules.remove(r)
            if first:
                self._rules.insert(0, rule)
            else:
                self._rules.append(rule)
            self.version += 1

        def undo() -> None:
            with self._lock:
                if rule in self._rules:
                    self._rules.remove(rule)
                    self.version += 1

        return Handle(undo)

    def ignore(self, what: Union[Type[nn.Module], Callable[[nn.Module], bool]]) -> Handle:
        r"""Tell strict mode that modules of this type (or passing this predicate) need no rule."""
        with self._lock:
            self._ignored.append(what)
            self.version += 1

        def undo() -> None:
            with self._lock:
                if what in self._ignored:
                    self._ignored.remove(what)
                    self.version += 1

        return Handle(undo)

    def _is_ignored(self, module: nn.Module) -> bool:
        for w in self._ignored:
            if isinstance(w, type):
                if isinstance(module, w):
                    return True
            elif w(module):
                return True
        return False

    def copy(self) -> "RuleRegistry":
        new = RuleRegistry(self.rules)
        new._ignored = list(self._ignored)
        return new

    def plan(self, model: nn.Module) -> Plan:
        r"""Match every module of ``model`` (root included) to its first matching rule."""
        rules = self.rules
        plan = Plan()
        exclusive_prefixes: List[str] = []
        coverers: List[Tuple[str, Rule]] = []
        candidates: List[Tuple[str, nn.Module]] = []
        matched_names: List[str] = []
        for name, module in model.named_modules(remove_duplicate=True):
            if any(_is_below(name, p) for p in exclusive_prefixes):
                continue
            rule = next((r for r in rules if r.matches(module)), None)
            if rule is None:
                if looks_like_attention_or_norm(module) and not self._is_ignored(module):
                    candidates.append((name, module))
                continue
            plan.matches.append(Match(name, module, rule))
            matched_names.append(name)
            if rule.exclusive:
                exclusive_prefixes.append(name)
            if rule.covers is not None:
                coverers.append((name, rule))
        for name, module in candidates:
            covered = any(
                _is_below(name, cname) and r.covers is not None and r.covers(module)
                for cname, r in coverers
            ) or any(_is_below(m, name) for m in matched_names)  # a wrapper of a matched module
            if not covered:
                plan.unmatched.append((name, type(module).__name__))
                for cname, r in coverers:
                    if r.explain is not None and _is_below(name, cname):
                        reason = r.explain(module)
                        if reason:
                            plan.reasons[name] = reason
                            break
        return plan


def _is_below(name: str, prefix: str) -> bool:
    """``name`` is a strict descendant of ``prefix`` in ``named_modules`` naming."""
    if name == prefix:
        return False
    return prefix == "" or name.startswith(prefix + ".")


#: The registry used when none is given. Built-in rules are added by :mod:`captum_gim.rules`.
default_registry = RuleRegistry()


def register_rule(
    rule: Rule,
    *,
    registry: Optional[RuleRegistry] = None,
    first: bool = True,
    replace: bool = False,
) -> Handle:
    r"""Add ``rule`` to ``registry`` (default: :data:`default_registry`).

    Returns a :class:`Handle`; ``handle.remove()`` unregisters the rule.
    """
    return (registry if registry is not None else default_registry).register(
        rule, first=first, replace=replace
    )
