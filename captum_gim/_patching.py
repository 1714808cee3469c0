r"""Handles, ``replace_forward`` and the once-per-module, reference-counted install.

Every change captum-gim makes to a module instance is made once, however many scopes
(in however many threads) use it, and undone when the last of them leaves:

- :func:`acquire` runs an install function the first time a ``(object, key)`` pair is
  asked for and undoes it when the last holder releases its handle.
- A rule's ``install(module, config)`` is called in *capture* mode: a
  :func:`replace_forward` inside it does not set anything, it registers the replacement
  for ``(module, rule, config)`` in the module's dispatch table. One dispatcher forward
  per module (installed with :func:`acquire`) picks, at call time, the replacement for the
  settings active for this model in this context (:mod:`captum_gim._context`), or the
  original forward when there are none. A rule whose install does something else than
  :func:`replace_forward` keeps that change for the scope that made it (its handle is
  removed when that scope exits).
"""

from __future__ import annotations

import threading
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Callable, Dict, FrozenSet, Hashable, List, Optional, Sequence, Tuple

from torch import nn

from ._context import active_for
from ._coverage import inside_rule
from .config import GIMConfig

__all__ = [
    "Handle",
    "replace_forward",
    "combine_handles",
    "acquire",
    "install_rule",
    "installed_count",
]


class Handle:
    r"""Undoes one change to one module. ``remove()`` is idempotent."""

    def __init__(self, undo: Callable[[], None]) -> None:
        self._undo: Optional[Callable[[], None]] = undo

    def remove(self) -> None:
        undo, self._undo = self._undo, None
        if undo is not None:
            undo()

    def __enter__(self) -> "Handle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


class _HandleList(Handle):
    def __init__(self, handles: Sequence[Handle]) -> None:
        self._handles = list(handles)
        super().__init__(self._remove_all)

    def _remove_all(self) -> None:
        errors: List[BaseException] = []
        for h in reversed(self._handles):
            try:
                h.remove()
            except BaseException as e:  # keep undoing the rest
                errors.append(e)
        if errors:
            raise errors[0]


def combine_handles(handles: Sequence[Handle]) -> Handle:
    r"""One handle that removes several, in reverse order, even if one of them fails."""
    return _HandleList(handles)


class _Captured(Handle):
    """What :func:`replace_forward` returns in capture mode: nothing to undo."""

    def __init__(self) -> None:
        super().__init__(lambda: None)


_NO_FORWARD = object()
#: (module being installed, replacements captured for it) while a rule installs
_CAPTURE: ContextVar[Optional[Tuple[nn.Module, List[Callable[..., Any]]]]] = ContextVar(
    "captum_gim_capture", default=None
)


def replace_forward(module: nn.Module, forward: Callable[..., object]) -> Handle:
    r"""Make ``module(...)`` call ``forward`` instead of its own ``forward``.

    Inside a rule's ``install`` (called by :func:`~captum_gim.gim_backward`), the
    replacement is registered for the scope's settings and chosen at call time, only in
    the execution context where that scope is open; the module's own forward runs
    everywhere else. Called directly, the replacement is an attribute of this one
    instance (never of its class); the returned handle restores exactly what was there
    before. Hooks registered on the module keep working either way.
    """
    cap = _CAPTURE.get()
    if cap is not None and cap[0] is module:
        cap[1].append(forward)
        return _Captured()
    previous = module.__dict__.get("forward", _NO_FORWARD)
    object.__setattr__(module, "forward", forward)

    def undo() -> None:
        if module.__dict__.get("forward", _NO_FORWARD) is not forward:
            # someone replaced our replacement; leave theirs, but never leak ours
            return
        if previous is _NO_FORWARD:
            del module.__dict__["forward"]
        else:
            object.__setattr__(module, "forward", previous)

    return Handle(undo)


# ---------------------------------------------------------------------------------------
# Reference-counted installs
# ---------------------------------------------------------------------------------------


@dataclass
class _Installed:
    target: Any
    handle: Handle
    count: int
    state: Any = None


_lock = threading.RLock()
_INSTALLED: Dict[Tuple[int, Hashable], _Installed] = {}


def acquire(target: Any, key: Hashable, install: Callable[[], Any]) -> Tuple[Handle, Any]:
    r"""Install once per ``(target, key)``; the last released handle undoes it.

    Args:
        target: the object changed (a module, a config...); kept alive while installed.
        key: what is installed on it.
        install: makes the change; returns a :class:`Handle`, or ``(Handle, state)``.

    Returns:
        (Handle, state): this holder's handle (``remove()`` releases it) and the state the
        install returned (shared by every holder).
    """
    k = (id(target), key)
    with _lock:
        entry = _INSTALLED.get(k)
        if entry is None or entry.target is not target:
            made = install()
            handle, state = made if isinstance(made, tuple) else (made, None)
            entry = _INSTALLED[k] = _Installed(target, handle, 0, state)
        entry.count += 1

    def release() -> None:
        handle = None
        with _lock:
            current = _INSTALLED.get(k)
            if current is not entry:
                return
            entry.count -= 1
            if entry.count == 0:
                del _INSTALLED[k]
                handle = entry.handle
        if handle is not None:
            handle.remove()

    return Handle(release), entry.state


def installed_count() -> int:
    """How many installs are in place (all threads); 0 when no scope is open."""
    with _lock:
        return len(_INSTALLED)


# ---------------------------------------------------------------------------------------
# The forward dispatcher
# ---------------------------------------------------------------------------------------

_RUNNING: ContextVar[FrozenSet[int]] = ContextVar("captum_gim_running", default=frozenset())


class _Dispatch:
    """The one installed forward of a module: the replacement for the active settings."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        # A module with an accelerate hook (device_map offload: the hook loads the weights
        # before the forward and offloads them after) keeps the forward it wraps in
        # ``_old_forward``: install there, under the hook, so the hook runs around GIM too.
        hooked = getattr(module, "_hf_hook", None) is not None and "_old_forward" in module.__dict__
        self.attr = "_old_forward" if hooked else "forward"
        self.previous = module.__dict__.get(self.attr, _NO_FORWARD)
        self.original: Callable[..., Any] = (
            self.previous if self.previous is not _NO_FORWARD else type(module).forward.__get__(module)
        )
        #: (id(rule), config) -> (rule, replacement)
        self.table: Dict[Tuple[int, GIMConfig], Tuple[Any, Callable[..., Any]]] = {}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        m = self.module
        scope = active_for(m)
        if scope is not None:
            rule = scope.rules.get(id(m))
            entry = self.table.get((id(rule), scope.config)) if rule is not None else None
            if entry is not None and entry[0] is rule:
                running = _RUNNING.get()
                if id(m) not in running:  # a replacement calling the module's forward
                    token = _RUNNING.set(running | {id(m)})
                    try:
                        with inside_rule(rule.name):
                            return entry[1](*args, **kwargs)
                    finally:
                        _RUNNING.reset(token)
        return self.original(*args, **kwargs)

    def install(self) -> Handle:
        attr = self.attr
        object.__setattr__(self.module, attr, self)

        def undo() -> None:
            d = self.module.__dict__
            if d.get(attr, _NO_FORWARD) is not self:
                return  # someone replaced the dispatcher; leave theirs
            if self.previous is _NO_FORWARD:
                del d[attr]
            else:
                object.__setattr__(self.module, attr, self.previous)

        return Handle(undo)


def _capture(module: nn.Module, rule: Any, config: GIMConfig) -> Tuple[List[Callable[..., Any]], Any]:
    token = _CAPTURE.set((module, []))
    try:
        handle = rule.install(module, config)
        captured = _CAPTURE.get()[1]  # type: ignore[index]
    finally:
        _CAPTURE.reset(token)
    if not isinstance(handle, Handle) and not hasattr(handle, "remove"):
        raise TypeError(
            f"rule {rule.name!r} must return a Handle from install(), got {type(handle).__name__}"
        )
    return captured, handle


def _is_captured(handle: Any) -> bool:
    if isinstance(handle, _Captured):
        return True
    if isinstance(handle, _HandleList):
        return all(_is_captured(h) for h in handle._handles)
    return False


def install_rule(module: nn.Module, rule: Any, config: GIMConfig) -> Handle:
    r"""Make ``rule`` apply to ``module`` with ``config`` for the calling scope.

    Replacement forwards are registered with the module's dispatcher (installed once,
    reference-counted) and built once per settings; anything else the rule's install does
    is kept until the returned handle is removed.
    """
    k = (id(rule), config)
    with _lock:
        current = _INSTALLED.get((id(module), "forward"))
        if current is not None and current.target is module:
            entry = current.state.table.get(k)
            if entry is not None and entry[0] is rule:
                return acquire(module, "forward", lambda: _new_dispatch(module))[0]
        # capture before the dispatcher exists, so that the rule sees the module's own forward
        captured, own = _capture(module, rule, config)
        if not captured:
            return own  # nothing to dispatch: the rule changes the module itself
        handle, dispatch = acquire(module, "forward", lambda: _new_dispatch(module))
        dispatch.table[k] = (rule, captured[-1])
    if _is_captured(own):
        return handle
    return combine_handles([handle, own])


def _new_dispatch(module: nn.Module) -> Tuple[Handle, _Dispatch]:
    d = _Dispatch(module)
    return d.install(), d
