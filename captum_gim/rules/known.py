r"""Models the module rules account for completely, so the functional layer has nothing to add.

The functional layer (:mod:`captum_gim.rules.functional`) intercepts every torch call of a
model's forward to find normalisations and attention softmaxes that no module rule
covers. That costs Python time per call (about 10-25 µs), which dominates on small inputs.
It can be skipped when every module of the model is accounted for:

- matched by a rule of the registry in use (enabled or not: a rule switched off by the
  settings leaves that part plain, as the functional layer would too);
- or a ``torch.nn`` class that computes no LayerNorm, RMSNorm or attention softmax of its
  own: containers, linear and convolution layers, embeddings, dropout, pooling,
  activations other than the softmaxes, the ``nn.Transformer*`` composites (whose norms and
  attention are submodules), batch/group/instance norms (not GIM norms);
- or, when the registry holds all four built-in Hugging Face rules and the root model was
  matched by ``transformers.attention``, a class of a Hugging Face model family that the
  support matrix lists as supported for the model's attention implementation, or one of
  transformers' shared building blocks (``transformers.activations``,
  ``transformers.pytorch_utils``). Those families are checked against textbook references
  and eager == SDPA in the test suite.

Any other class (a user's, a subclass of a torch or transformers class defined elsewhere,
an HF family outside the matrix) keeps the functional layer on, with its coverage report
and strict-mode checks at run time.
"""

from __future__ import annotations

import sys
from typing import Any, Iterable, Optional, Tuple

from torch import nn

__all__ = ["fully_accounted"]

_TORCH_NN_MODULES = (
    "torch.nn.modules.container",
    "torch.nn.modules.linear",
    "torch.nn.modules.conv",
    "torch.nn.modules.sparse",
    "torch.nn.modules.dropout",
    "torch.nn.modules.pooling",
    "torch.nn.modules.flatten",
    "torch.nn.modules.padding",
    "torch.nn.modules.pixelshuffle",
    "torch.nn.modules.upsampling",
    "torch.nn.modules.channelshuffle",
    "torch.nn.modules.fold",
    "torch.nn.modules.transformer",
    "torch.nn.modules.batchnorm",
    "torch.nn.modules.instancenorm",
)
#: classes of torch.nn.modules.activation / .normalization that are GIM-relevant: they
#: count only when a rule matched them
_RELEVANT = frozenset(
    ("Softmax", "Softmin", "LogSoftmax", "Softmax2d", "MultiheadAttention", "LayerNorm", "RMSNorm")
)
_HF_SHARED = ("transformers.activations", "transformers.pytorch_utils")


def _torch_nn_known(cls: type) -> bool:
    mod = cls.__module__
    if mod in _TORCH_NN_MODULES:
        return True
    if mod in ("torch.nn.modules.activation", "torch.nn.modules.normalization"):
        return cls.__name__ not in _RELEVANT
    return False


def _attn_impl(model: nn.Module) -> Optional[str]:
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None) if config is not None else None
    return impl if isinstance(impl, str) else None


def _hf_known(cls: type, impl: Optional[str], matrix: Any) -> bool:
    mod = cls.__module__
    if mod in _HF_SHARED:
        return True
    parts = mod.split(".")
    if len(parts) < 4 or parts[:2] != ["transformers", "models"]:
        return False
    row = matrix.get(parts[2])
    if not row or impl not in row:
        return False
    return all(status == "supported" for status in row[impl].values())


def _support_matrix() -> Any:
    if "transformers" not in sys.modules:
        return None
    try:
        from .transformers.support import SUPPORT_MATRIX
    except Exception:  # an unusable transformers: nothing of it is known
        return None
    return SUPPORT_MATRIX


#: the built-in Hugging Face rules; their families are known only where all of them are in use
HF_RULES = frozenset(
    ("transformers.attention", "transformers.norm", "transformers.gated_mlp", "transformers.experts")
)


def fully_accounted(
    model: nn.Module, matches: Iterable[Tuple[nn.Module, str]], rule_names: Iterable[str]
) -> bool:
    r"""Whether every module of ``model`` is matched by a rule or of a known class.

    Args:
        model (nn.Module): the root module.
        matches (iterable of (module, rule name)): what the registry's rules matched.
        rule_names (iterable of str): the names of every rule in the registry.

    Returns:
        bool: True when the functional layer would find nothing to cover.
    """
    matches = list(matches)
    done = {id(m) for m, _ in matches}
    hf_rules = HF_RULES <= set(rule_names) and any(
        m is model and name == "transformers.attention" for m, name in matches
    )
    impl = _attn_impl(model)
    matrix = _support_matrix() if hf_rules else None
    for module in model.modules():
        if id(module) in done:
            continue
        cls = type(module)
        if _torch_nn_known(cls):
            continue
        if matrix is not None and cls.__module__.startswith("transformers.") \
                and _hf_known(cls, impl, matrix):
            continue
        return False
    return True
