r"""Which GIM settings are active for which model, in this execution context.

A :func:`~captum_gim.gim_backward` scope adds one :class:`ActiveScope` to a
:class:`contextvars.ContextVar` on entry and removes exactly that entry on exit, so:

- another thread (which starts with an empty context) or another asyncio task sees no
  scope of this one and gets plain gradients, even while this scope is open;
- scopes may exit in any order (an entry is removed by identity, never by resetting a
  token, which would also drop the entries of scopes entered later);
- for nested scopes on the same model, the innermost (most recently entered) wins.

Installed forwards, hooks and the registered Hugging Face attention functions call
:func:`active_for` at call time with the module they belong to, and run the original
computation when it returns None.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Dict, FrozenSet, List, Optional, Set, Tuple

from torch import nn

from .config import GIMConfig

__all__ = ["ActiveScope", "active_for", "active_for_model", "enter", "leave", "open_scopes"]


@dataclass(eq=False)
class ActiveScope:
    r"""One open :func:`~captum_gim.gim_backward` scope, as installed code sees it.

    Attributes:
        model (nn.Module): the scope's model.
        config (GIMConfig): its settings.
        strict (bool): whether uncovered operations raise.
        registry (object): the :class:`~captum_gim.RuleRegistry` in use (for ``ignore``).
        modules (frozenset of int): ``id`` of every module of the model.
        rules (dict): ``id(module) -> rule`` for the modules a rule matched.
        coverage (list of (path, class name, op, cover)): what the functional layer saw.
        checked (set of type): attention classes whose recomputation was checked already.
    """

    model: nn.Module
    config: GIMConfig
    strict: bool = False
    registry: Any = None
    modules: FrozenSet[int] = frozenset()
    rules: Dict[int, Any] = field(default_factory=dict)
    coverage: List[Tuple[str, str, str, str]] = field(default_factory=list)
    checked: Set[type] = field(default_factory=set)
    #: set when the scope exits. A scope entered inside a generator is entered in the
    #: context of whoever resumed it, and may be closed from another context (a garbage
    #: collector, another thread): the entry that cannot be removed there is then never
    #: active again.
    closed: bool = False

    def record(self, path: str, class_name: str, op: str, cover: str) -> None:
        """Note that ``op`` ran in ``path`` (``class_name``) with ``cover`` applying."""
        self.coverage.append((path, class_name, op, cover))


_SCOPES: ContextVar[Tuple[ActiveScope, ...]] = ContextVar("captum_gim_scopes", default=())


def open_scopes() -> Tuple[ActiveScope, ...]:
    """The scopes open in this context, outermost first."""
    return tuple(s for s in _SCOPES.get() if not s.closed)


def enter(scope: ActiveScope) -> None:
    """Add ``scope`` to this context (it becomes the innermost)."""
    _SCOPES.set(_SCOPES.get() + (scope,))


def leave(scope: ActiveScope) -> None:
    """Remove exactly ``scope`` from this context (whatever was entered after it stays)."""
    scope.closed = True
    scopes = _SCOPES.get()
    if any(s is scope or s.closed for s in scopes):
        _SCOPES.set(tuple(s for s in scopes if s is not scope and not s.closed))


def active_for(module: nn.Module) -> Optional[ActiveScope]:
    """The innermost scope in this context whose model contains ``module``, or None."""
    scopes = _SCOPES.get()
    if not scopes:
        return None
    key = id(module)
    for s in reversed(scopes):
        if key in s.modules and not s.closed:
            return s
    return None


def active_for_model(model: nn.Module) -> Optional[ActiveScope]:
    """The innermost scope in this context opened on ``model`` itself, or None."""
    for s in reversed(_SCOPES.get()):
        if s.model is model and not s.closed:
            return s
    return None
