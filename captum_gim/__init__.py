r"""captum-gim: GIM (Gradient Interaction Modifications) for Captum.

The public API:

- :class:`GIMAttribution`: GIM as a Captum ``GradientAttribution``.
- :class:`LayerGIM`: GIM at a layer (token models: the embedding layer).
- :func:`gim_backward`: a scope in which any gradient through one model is a GIM gradient.
- :class:`Rule`, :class:`RuleRegistry`, :func:`register_rule`, :func:`replace_forward`:
  which modules get which modified backward; add your own.
- :mod:`captum_gim.ops`: the autograd functions every rule is built from.
- :func:`compare`: GIM against Integrated Gradients and Captum's methods on your model
  (loaded on first use).
"""

from ._version import __version__
from .attr import GIMAttribution, LayerGIM
from .config import GIMConfig
from .registry import (
    Handle,
    Rule,
    RuleRegistry,
    combine_handles,
    default_registry,
    register_rule,
    replace_forward,
)
from .scope import GIMReport, UnmatchedModulesError, UnmatchedModulesWarning, gim_backward

__all__ = [
    "__version__",
    "GIMAttribution",
    "LayerGIM",
    "gim_backward",
    "GIMConfig",
    "GIMReport",
    "Handle",
    "Rule",
    "RuleRegistry",
    "combine_handles",
    "default_registry",
    "register_rule",
    "replace_forward",
    "UnmatchedModulesError",
    "UnmatchedModulesWarning",
    "compare",
]


def __getattr__(name: str):  # the comparison pulls in the evaluation package: load it when asked for
    if name == "compare":
        from .evaluation.api import compare

        return compare
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
