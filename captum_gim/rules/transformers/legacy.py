r"""transformers 4.x attention classes that compute attention themselves.

BERT, RoBERTa and Qwen2-MoE (:data:`~.support.LEGACY_ATTENTION_CLASSES`) have their own
attention classes in transformers 4.x (``BertSdpaSelfAttention``...): an explicit
``softmax(q k^T) @ v`` or ``F.scaled_dot_product_attention`` inside the module, not a call
through ``AttentionInterface``. The rule installs GIM's functional layer
(:mod:`captum_gim.rules.functional`) on each such module: inside its forward, in a GIM
scope, the attention gets GIM's backward (TSG, q/k x1/4, v x1/2), the scope's coverage
report lists it, and strict mode raises at run time if an attention softmax there was not
recognised. transformers 5 moved these families to ``AttentionInterface`` (the
``transformers.attention`` rule); there the rule matches nothing.
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from ..._compat import legacy_hf_attention
from ..._context import ActiveScope, active_for
from ..._patching import Handle, acquire
from ...config import GIMConfig
from .detect import _is_legacy_attention

__all__ = ["is_legacy_attention", "install_legacy_attention"]

#: transformers is imported (this package is loaded only then) and its version is fixed
_LEGACY = legacy_hf_attention()


def is_legacy_attention(module: nn.Module) -> bool:
    """A transformers 4.x attention module that GIM's functional layer covers."""
    return _LEGACY and _is_legacy_attention(module)


def _install(module: nn.Module) -> Handle:
    from ..functional import install_functional

    def get_active() -> Optional[ActiveScope]:
        return active_for(module)

    return install_functional(module, get_active)


def install_legacy_attention(module: nn.Module, config: GIMConfig) -> Handle:
    r"""The functional layer on ``module`` (installed once; it reads the active scope)."""
    return acquire(module, "transformers.legacy_attention", lambda: _install(module))[0]
