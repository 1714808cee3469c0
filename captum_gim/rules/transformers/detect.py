r"""Which modules are Hugging Face's, and what they are: attention that dispatches through
``AttentionInterface``, norms, gated MLPs, fused experts (by what a class is and computes)."""

from __future__ import annotations

import inspect
import re
import sys
from typing import Any, Callable, Dict, Optional, Tuple

from torch import nn

import transformers

from ..._compat import legacy_hf_attention
from .support import GIM_ATTENTION_PREFIX, LEGACY_ATTENTION_CLASSES, SUPPORTED_ATTENTION_IMPLEMENTATIONS

try:  # transformers >= 4.53 (the package refuses older ones before importing this)
    from transformers.masking_utils import AttentionMaskInterface
except ImportError:  # pragma: no cover - older transformers
    AttentionMaskInterface = None

__all__ = ["attention_support", "is_hf_norm", "gated_branches", "is_gated_mlp", "is_fused_experts"]




def _is_hf_class(module: nn.Module) -> bool:
    mod = type(module).__module__ or ""
    return mod.startswith(("transformers.", "transformers_modules"))


def _forward_globals(cls: type) -> Dict[str, Any]:
    fwd = getattr(cls, "forward", None)
    try:
        return inspect.unwrap(fwd).__globals__  # type: ignore[union-attr]
    except AttributeError:
        return {}


_SOURCE_CACHE: Dict[type, str] = {}


def _forward_source(cls: type) -> str:
    if cls not in _SOURCE_CACHE:
        try:
            _SOURCE_CACHE[cls] = inspect.getsource(inspect.unwrap(cls.forward))
        except (OSError, TypeError, AttributeError):
            _SOURCE_CACHE[cls] = ""
    return _SOURCE_CACHE[cls]


def _uses_attention_interface(module: nn.Module) -> bool:
    return "ALL_ATTENTION_FUNCTIONS" in _forward_source(type(module))


def _is_legacy_attention(module: nn.Module) -> bool:
    return _is_hf_class(module) and type(module).__name__ in LEGACY_ATTENTION_CLASSES


def _looks_like_attention(module: nn.Module) -> bool:
    name = type(module).__name__
    return bool(re.search(r"attention|attn|selfatt", name, re.I)) and not re.search(
        r"norm$", name, re.I
    )


def _base_implementation(impl: Optional[str]) -> Optional[str]:
    if impl is not None and impl.startswith(GIM_ATTENTION_PREFIX):
        return impl[len(GIM_ATTENTION_PREFIX) :]
    return impl


def _module_reason(module: nn.Module) -> Optional[str]:
    """Why GIM cannot handle this module's attention (None: it can)."""
    config = getattr(module, "config", None)
    impl = _base_implementation(getattr(config, "_attn_implementation", None))
    if impl not in SUPPORTED_ATTENTION_IMPLEMENTATIONS:
        return (
            f"attention implementation {impl!r} is not supported by GIM (supported: "
            f"{', '.join(SUPPORTED_ATTENTION_IMPLEMENTATIONS)}); load the model with "
            "attn_implementation='sdpa' (or 'eager'), or call "
            "model.set_attn_implementation('sdpa') before attributing"
        )
    if AttentionMaskInterface is None:
        return (
            f"transformers {transformers.__version__} has no AttentionMaskInterface; "
            "GIM's attention rule needs transformers >= 4.53"
        )
    if "s_aux" in _forward_source(type(module)):
        return "attention sinks (s_aux) are not modelled by GIM's attention"
    if impl == "eager" and _eager_function(module) is None:
        return "its eager attention function could not be found (no eager_attention_forward)"
    return None


def attention_support(module: nn.Module) -> Optional[str]:
    r"""Why GIM's ``transformers`` rules cannot give ``module`` GIM attention, or None.

    ``module`` is an attention module (or a wrapper of one, such as ``BertAttention``).
    It is supported when it (or a module inside it) dispatches through transformers'
    ``AttentionInterface`` with the ``eager`` or ``sdpa`` implementation; with
    transformers 4.x, also when it is one of the attention classes that compute attention
    themselves and that GIM's functional layer covers (:data:`LEGACY_ATTENTION_CLASSES`).
    """
    users = [m for m in module.modules() if _uses_attention_interface(m)]
    if not users:
        if legacy_hf_attention() and any(_is_legacy_attention(m) for m in module.modules()):
            # transformers 4.x families with their own attention classes (BERT, RoBERTa,
            # Qwen2-MoE): the functional layer gives their explicit softmax attention or
            # F.scaled_dot_product_attention GIM's backward, and in strict mode raises at
            # run time if it meets an attention softmax it does not recognise
            return None
        return (
            f"{type(module).__name__} computes attention without transformers' "
            "AttentionInterface, so GIM has no rule for its softmax"
        )
    for m in users:
        reason = _module_reason(m)
        if reason is not None:
            return reason
    return None


def _covers(module: nn.Module) -> bool:
    return _looks_like_attention(module) and attention_support(module) is None


def _explain(module: nn.Module) -> Optional[str]:
    if not _looks_like_attention(module):
        return None
    return attention_support(module)




def _eager_function(module: nn.Module) -> Optional[Callable[..., Any]]:
    globs = _forward_globals(type(module))
    fn = globs.get("eager_attention_forward")
    if fn is None:
        fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    return fn


_NORM_NAME = re.compile(r"(rms_?norm|layer_?norm)", re.I)
_NOT_A_NORM = re.compile(r"batch|group|instance|weight_?norm|spectral", re.I)
_NORM_SOURCE = re.compile(r"rsqrt|\.sqrt\(|sqrt\(|rms_norm|layer_norm|\.std\(|\*\*\s*-?0\.5")


def is_hf_norm(module: nn.Module) -> bool:
    if not _is_hf_class(module):
        return False
    # torch.nn.LayerNorm / RMSNorm subclasses that keep torch's forward: torch_nn's rules
    for base in (nn.LayerNorm, getattr(nn, "RMSNorm", None)):
        if base is not None and isinstance(module, base) and type(module).forward is base.forward:
            return False
    name = type(module).__name__
    if _NOT_A_NORM.search(name):
        return False
    if _NORM_NAME.search(name):
        return True
    # any other "...Norm" class whose forward computes an rms or a standard deviation
    return name.lower().endswith("norm") and bool(_NORM_SOURCE.search(_forward_source(type(module))))


_GATED_PAIRS: Tuple[Tuple[str, ...], ...] = (
    ("gate_proj", "up_proj"),  # Llama, Mistral, Qwen, Gemma (SwiGLU / GeGLU)
    ("gate_up_proj",),  # Phi-3: one fused projection
    ("w1", "w3"),  # Mixtral-style experts in transformers 4.x
)


def gated_branches(module: nn.Module) -> Optional[Tuple[str, ...]]:
    children = dict(module.named_children())
    for names in _GATED_PAIRS:
        if all(isinstance(children.get(n), nn.Module) for n in names) and (
            "down_proj" in children or "w2" in children
        ):
            return names
    return None


def is_gated_mlp(module: nn.Module) -> bool:
    return _is_hf_class(module) and gated_branches(module) is not None


def is_fused_experts(module: nn.Module) -> bool:
    if not _is_hf_class(module):
        return False
    p = getattr(module, "gate_up_proj", None)
    return (
        isinstance(p, nn.Parameter)
        and p.dim() == 3
        and getattr(module, "has_gate", True)
        and hasattr(module, "down_proj")
    )
