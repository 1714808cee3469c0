r"""The settings of one GIM backward pass."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["GIMConfig"]


@dataclass(frozen=True)
class GIMConfig:
    r"""Which of GIM's three gradient modifications are on, and how.

    Args:
        temperature (float): the TSG temperature ``T`` for attention softmaxes; ``1.0``
            leaves their gradient unchanged. Default: 2.0 (the paper's).
        freeze_norms (bool): treat the LayerNorm standard deviation and the RMSNorm
            ``1/rms`` factor as constants in the backward pass. Default: True.
        divide_grads (bool): multiply the gradient reaching attention q and k by 1/4,
            v by 1/2, and both branches of gated MLPs by 1/2. Default: True.
        keep_norm_mean (bool): with ``freeze_norms``, whether LayerNorm's mean
            subtraction keeps its gradient (the reference's behaviour, default) or is
            detached too (PyHealth 2.1's behaviour).
    """

    temperature: float = 2.0
    freeze_norms: bool = True
    divide_grads: bool = True
    keep_norm_mean: bool = True

    def __post_init__(self) -> None:
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)):
            raise TypeError(f"temperature must be a number, got {t!r}")
        if not math.isfinite(float(t)) or float(t) <= 0.0:
            raise ValueError(
                f"temperature must be a finite number > 0 (1.0 switches TSG off), got {t!r}"
            )
        object.__setattr__(self, "temperature", float(t))
        for name in ("freeze_norms", "divide_grads", "keep_norm_mean"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")

    @property
    def uses_tsg(self) -> bool:
        """Whether attention softmaxes get a modified gradient."""
        return self.temperature != 1.0

    @property
    def is_identity(self) -> bool:
        """True when every modification is off: GIM gradients are plain gradients."""
        return not (self.uses_tsg or self.freeze_norms or self.divide_grads)
