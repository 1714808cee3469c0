r"""The exceptions and warnings of captum-gim, in one place every layer may import."""

from __future__ import annotations

__all__ = [
    "UnmatchedModulesError",
    "UnmatchedModulesWarning",
    "UncoveredOperationError",
    "UncoveredOperationWarning",
]


class UnmatchedModulesError(RuntimeError):
    """Strict mode: the model has attention- or norm-like modules that no rule matches."""


class UnmatchedModulesWarning(UserWarning):
    """Non-strict mode: some attention- or norm-like modules keep their plain gradient."""


class UncoveredOperationError(UnmatchedModulesError):
    """Strict mode: a normalisation or attention softmax ran in the forward pass with no
    rule and no functional cover (raised before the forward pass returns anything)."""


class UncoveredOperationWarning(UnmatchedModulesWarning):
    """Non-strict mode: such an operation ran and keeps its plain gradient."""
