r"""Which GIM rule, if any, is computing right now in this execution context.

Module rules (torch.nn, Hugging Face, PyHealth, the user's) wrap the computation they
replace in :func:`inside_rule`; the functional layer (:mod:`captum_gim.rules.functional`),
which intercepts ``F.layer_norm``, ``F.scaled_dot_product_attention``, softmaxes... inside a
model's forward, leaves everything that runs inside a rule alone (module rules take
precedence) and records it as covered by that rule.

The state is a :class:`contextvars.ContextVar`, so it is per thread and per asyncio task.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Iterator, Optional

__all__ = ["inside_rule", "current_rule"]

_RULE: ContextVar[Optional[str]] = ContextVar("captum_gim_current_rule", default=None)


@contextlib.contextmanager
def inside_rule(name: str) -> Iterator[None]:
    """Mark the enclosed computation as handled by the rule called ``name``."""
    token = _RULE.set(name)
    try:
        yield
    finally:
        _RULE.reset(token)


def current_rule() -> Optional[str]:
    """The name of the rule whose computation is running, or None."""
    return _RULE.get()
