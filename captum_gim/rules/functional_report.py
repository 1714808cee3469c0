r"""Where the functional layer is in a forward pass, and what it says about what ran.

Every normalisation, attention softmax and gated product that ran is an :class:`Entry`
with its cover; :func:`report` records each on its scope (``scope.record(path,
class_name, op, cover)``), and for the ops left at ``"none"`` raises
:class:`~captum_gim.errors.UncoveredOperationError` (strict scope) or warns once with
:class:`~captum_gim.errors.UncoveredOperationWarning`.
"""

from __future__ import annotations

import threading
import warnings
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Set, Tuple

from torch import nn

from ..errors import UncoveredOperationError, UncoveredOperationWarning

__all__ = ["Where", "Entry", "report", "STATE", "acquire_global_hooks", "release_global_hooks"]

#: the state of the root forward running in the functional mode in this context (a
#: ``functional._CallState``: ``frames``, ``path``, ``names``), or None
STATE: ContextVar[Optional[Any]] = ContextVar("captum_gim_functional", default=None)


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


# The module path of the running forward is kept by process-wide module hooks, held only
# while some thread runs a root forward in the mode: hooks on the submodules themselves
# would change what runs (nn.TransformerEncoderLayer skips its fused path when any of its
# modules has a hook). Each call looks up the calling context's state; others return.
_global_lock = threading.Lock()
_global_users = 0
_global_handles: List[Any] = []


def acquire_global_hooks() -> None:
    """Hold the process-wide path-keeping module hooks (reference-counted)."""
    global _global_users
    with _global_lock:
        if _global_users == 0:
            from torch.nn.modules.module import (
                register_module_forward_hook,
                register_module_forward_pre_hook,
            )

            _global_handles[:] = [
                register_module_forward_pre_hook(_any_pre),
                register_module_forward_hook(_any_post, always_call=True),
            ]
        _global_users += 1


def release_global_hooks() -> None:
    """Release them; the last user removes them."""
    global _global_users
    with _global_lock:
        _global_users -= 1
        if _global_users == 0:
            for h in _global_handles:
                h.remove()
            _global_handles.clear()


def _any_pre(module: nn.Module, args: Any) -> None:
    st = STATE.get()
    if st is None or not st.frames:
        return
    for key, name in st.names.get(id(module), ()):
        st.path.append((key, name, module))


def _any_post(module: nn.Module, args: Any, result: Any) -> None:
    st = STATE.get()
    if st is None:
        return
    path = st.path
    i = len(path) - 1
    while i >= 0 and path[i][2] is not module:
        i -= 1
    if i < 0:
        return
    while i > 0 and path[i - 1][2] is module:
        i -= 1
    del path[i:]
