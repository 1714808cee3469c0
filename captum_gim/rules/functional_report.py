r"""What the functional layer says about the operations of one forward pass.

Every normalisation, attention softmax and gated product that ran is an :class:`Entry`
with its cover; :func:`report` records each on its scope (``scope.record(path,
class_name, op, cover)``), and for the ops left at ``"none"`` raises
:class:`~captum_gim.errors.UncoveredOperationError` (strict scope) or warns once with
:class:`~captum_gim.errors.UncoveredOperationWarning`.
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Set, Tuple

from torch import nn

from ..errors import UncoveredOperationError, UncoveredOperationWarning

__all__ = ["Where", "Entry", "report"]


@dataclass
class Where:
    """Where an operation ran: module path and class, the scope in force."""

    path: str
    class_name: str
    scope: Any
    ignored: Optional[str] = None  # the class the scope's registry ignores, if any


@dataclass
class Entry:
    """One operation that ran and its cover (``rule:...``, ``functional:...``, ``none``...)."""

    where: Where
    op: str
    cover: str
    reason: str = ""


_warned: Set[Tuple[Any, ...]] = set()
_warned_lock = threading.Lock()


def _describe(entries: List[Entry]) -> str:
    return "\n".join(
        f"  - '{e.where.path or '<root>'}' ({e.where.class_name}): {e.op}"
        + (f" [{e.reason}]" if e.reason else "")
        for e in entries
    )


def _message(root: nn.Module, entries: List[Entry], strict: bool) -> str:
    classes = sorted({e.where.class_name for e in entries})
    head = (
        f"GIM: these normalisation / attention operations ran in the forward pass of "
        f"{type(root).__name__} with no rule and no exact functional cover, so they "
        f"{'would keep' if strict else 'keep'} their plain gradient:\n"
    )
    return head + _describe(entries) + (
        "\nCover them with a rule for the module class (captum_gim.register_rule; see the "
        "'writing your own rule' guide), or mark the class as needing none "
        f"(registry.ignore({classes[0]})), "
        + ("or pass strict=False to go on with a warning." if strict else
           "or pass strict=True to make this an error.")
    )


def report(root: nn.Module, entries: List[Entry], raise_errors: bool) -> None:
    """Record every entry on its scope; raise for a strict scope with uncovered ops, else
    warn once per model class and list."""
    seen: Set[Tuple[int, str, str, str]] = set()
    uncovered: Dict[int, Tuple[Any, List[Entry]]] = {}
    for e in entries:
        w = e.where
        k = (id(w.scope), w.path, e.op, e.cover)
        if k in seen:
            continue
        seen.add(k)
        record = getattr(w.scope, "record", None)
        if record is not None:
            record(w.path, w.class_name, e.op, e.cover)
        if e.cover == "none":
            uncovered.setdefault(id(w.scope), (w.scope, []))[1].append(e)
    if not raise_errors:
        return
    for scope, items in uncovered.values():
        if getattr(scope, "strict", False):
            raise UncoveredOperationError(_message(root, items, True))
    for scope, items in uncovered.values():
        wkey = (type(root).__qualname__, tuple((e.where.path, e.op, e.reason) for e in items))
        with _warned_lock:
            if wkey in _warned:
                continue
            _warned.add(wkey)
        warnings.warn(_message(root, items, False), UncoveredOperationWarning, stacklevel=3)
