r"""GIM rules for Hugging Face ``transformers`` models.

Registered lazily by :func:`captum_gim.rules.ensure_ecosystem_rules` once ``transformers``
has been imported. Four rules:

- ``transformers.attention`` (every ``PreTrainedModel``): the attention softmax. It uses the
  library's own extension points: at import, this module registers the attention
  functions ``"captum_gim_eager"`` and ``"captum_gim_sdpa"`` with ``AttentionInterface``
  (and the matching mask functions with ``AttentionMaskInterface``, so the model builds
  exactly the masks of the implementation it was loaded with). Inside a
  :func:`~captum_gim.gim_backward` scope, the model's configs are switched from
  ``"eager"``/``"sdpa"`` to the GIM key, and restored exactly afterwards (also after an
  error). The GIM attention function calls the *original* implementation, so forward
  values are bit-for-bit those of the plain model, and attaches GIM's backward pass as a
  custom autograd function (the original's own backward never runs): the attention
  probabilities are recomputed explicitly from ``q``, ``k``, ``v`` and the mask (scaling,
  soft-capping, sliding windows, padding, grouped-query heads, exactly as the original
  implementation), the softmax's vector-Jacobian product is evaluated at temperature ``T``
  (TSG), and the gradients reaching ``q``, ``k`` and ``v`` are multiplied by 1/4, 1/4 and
  1/2. The recomputation runs in float32 for half-precision models, in chunks of heads and
  blocks of query rows (bounded memory; masked key blocks are skipped), and is checked
  once per scope against the original output (:class:`GIMAttentionMismatchWarning`).
  With attention dropout (training mode) the output is the explicit attention's own
  draw. Attention modules of other models (even ones sharing the same
  config object) keep their plain gradient: the function only modifies modules that
  belong to a model inside a scope. ``use_cache`` is switched off in the scope.
- ``transformers.norm``: every RMSNorm/LayerNorm-like class of ``transformers``
  (``LlamaRMSNorm``, ``GemmaRMSNorm`` with its ``1 + weight``, Qwen3's ``q_norm`` /
  ``k_norm``, Gemma2's post-norms, ``T5LayerNorm``...), found by what the class is and
  computes rather than by ``isinstance``. Its own forward runs under a
  :class:`~torch.overrides.TorchFunctionMode` that detaches ``rsqrt`` / ``sqrt`` / ``std``
  (and ``x ** ±0.5``) and turns ``F.rms_norm`` / ``F.layer_norm`` into their frozen
  versions, so ``1/rms`` (or the standard deviation) is a constant in the backward pass and
  the forward value does not change. ``torch.nn.LayerNorm`` (GPT-2, BERT, ViT...) is
  handled by :mod:`captum_gim.rules.torch_nn`.
- ``transformers.gated_mlp``: MLPs with separate ``gate_proj`` / ``up_proj`` (SwiGLU,
  GeGLU) or a fused ``gate_up_proj`` (Phi-3): the gradients reaching both branches are
  multiplied by 1/2.
- ``transformers.experts``: mixture-of-experts blocks whose experts are fused parameter
  tensors (``gate_up_proj`` of shape ``(experts, 2 * intermediate, hidden)``, the
  ``@use_experts_implementation`` classes of transformers 5: Mixtral, Qwen2-MoE, ...),
  under every experts implementation (``eager``, ``batched_mm``, ``grouped_mm``). The
  router softmax and the routing-weight product keep their true gradient.

Scopes nest: each module is patched once however many scopes use it, and the innermost
scope that enables a rule sets its settings (a rule an inner scope switches off stays as
the outer scope set it).

What cannot be supported is listed in :data:`SUPPORT_MATRIX` (``family -> attention
implementation -> dtype -> status``; :func:`support_table` renders it) and strict mode
names the reason for every attention module it cannot handle.
"""

from __future__ import annotations

import inspect
import re
import sys
import threading
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

import transformers
from transformers import PreTrainedModel
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from ..config import GIMConfig
from ..ops import frozen_layer_norm, frozen_rms_norm, scale_grad, straight_through, tsg_softmax
from ..registry import Handle, Rule, combine_handles, replace_forward

try:  # transformers >= 4.53
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
except ImportError:  # pragma: no cover - older transformers
    ALL_MASK_ATTENTION_FUNCTIONS = None
    AttentionMaskInterface = None

__all__ = [
    "RULES",
    "GIM_ATTENTION_PREFIX",
    "SUPPORTED_ATTENTION_IMPLEMENTATIONS",
    "SUPPORT_MATRIX",
    "support_table",
    "attention_support",
    "GIMAttentionMismatchWarning",
    "model_rule",
    "norm_rule",
    "gated_mlp_rule",
    "experts_rule",
]

#: Prefix of the keys this module registers with ``AttentionInterface``.
GIM_ATTENTION_PREFIX = "captum_gim_"
#: Attention implementations whose semantics the GIM attention function reproduces.
SUPPORTED_ATTENTION_IMPLEMENTATIONS: Tuple[str, ...] = ("eager", "sdpa")

_HALF = (torch.float16, torch.bfloat16)
#: Transient memory (bytes) the explicit attention backward aims at per chunk of heads.
_BACKWARD_CHUNK_BYTES = 16 * 2**20


class GIMAttentionMismatchWarning(UserWarning):
    """The explicit attention GIM recomputes does not reproduce the model's attention output."""


# ---------------------------------------------------------------------------------------
# Support matrix
# ---------------------------------------------------------------------------------------

_OK = "supported"
_DTYPES = ("float32", "bfloat16", "float16")


def _row(**impls: str) -> Dict[str, Dict[str, str]]:
    return {impl: {dt: status for dt in _DTYPES} for impl, status in impls.items()}


_FLASH = (
    "unsupported: flash-attention kernels read the implementation name from the config; "
    "load the model with attn_implementation='sdpa' (or 'eager') for attributions"
)
_FLEX = "unsupported: flex_attention's BlockMask is not materialised; use 'sdpa' or 'eager'"

#: family -> attention implementation -> dtype -> status; anything not "supported" says
#: why not. Tests on tiny random models cover every "supported" float32 entry
#: (``tests/test_hf_families.py``) but only some half-precision ones: those of
#: ``tests/test_hf_dtypes.py`` (mostly sdpa; eager for Llama and Gemma2).
SUPPORT_MATRIX: Dict[str, Dict[str, Dict[str, str]]] = {
    "llama": _row(eager=_OK, sdpa=_OK, flash_attention_2=_FLASH, flex_attention=_FLEX),
    "mistral": _row(eager=_OK, sdpa=_OK, flash_attention_2=_FLASH, flex_attention=_FLEX),
    "qwen2": _row(eager=_OK, sdpa=_OK, flash_attention_2=_FLASH, flex_attention=_FLEX),
    "qwen3": _row(eager=_OK, sdpa=_OK, flash_attention_2=_FLASH, flex_attention=_FLEX),
    "gemma": _row(eager=_OK, sdpa=_OK, flash_attention_2=_FLASH, flex_attention=_FLEX),
    "gemma2": _row(
        eager=_OK,
        sdpa="unsupported by transformers: SDPA has no attention-logit soft-capping "
        "(Gemma2 declares _supports_sdpa = False); use 'eager'",
        flash_attention_2=_FLASH,
        flex_attention=_FLEX,
    ),
    "phi3": _row(eager=_OK, sdpa=_OK, flash_attention_2=_FLASH, flex_attention=_FLEX),
    "gpt2": _row(eager=_OK, sdpa=_OK, flash_attention_2=_FLASH),
    "bert": _row(eager=_OK, sdpa=_OK, flash_attention_2=_FLASH, flex_attention=_FLEX),
    "roberta": _row(eager=_OK, sdpa=_OK, flash_attention_2=_FLASH, flex_attention=_FLEX),
    "vit": _row(eager=_OK, sdpa=_OK, flash_attention_2=_FLASH, flex_attention=_FLEX),
    "mixtral": _row(eager=_OK, sdpa=_OK, flash_attention_2=_FLASH, flex_attention=_FLEX),
    "qwen2_moe": _row(eager=_OK, sdpa=_OK, flash_attention_2=_FLASH, flex_attention=_FLEX),
    "gpt_oss": _row(
        eager="unsupported: attention sinks (s_aux) are not modelled by GIM's attention",
        sdpa="unsupported: attention sinks (s_aux) are not modelled by GIM's attention",
    ),
}


def support_table(fmt: str = "markdown") -> str:
    r"""The support matrix as a table (one row per family and implementation).

    Args:
        fmt (str): ``"markdown"`` (default) or ``"rst"`` (a list-table body).

    Returns:
        str: the table.
    """
    header = ["family", "attention", *_DTYPES]
    rows = [
        [family, impl, *(dts.get(dt, "untested") for dt in _DTYPES)]
        for family, impls in SUPPORT_MATRIX.items()
        for impl, dts in impls.items()
    ]
    if fmt == "markdown":
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    if fmt == "rst":
        out = []
        for r in [header, *rows]:
            out.append("   * - " + r[0])
            out.extend("     - " + c for c in r[1:])
        return "\n".join(out)
    raise ValueError(f"fmt must be 'markdown' or 'rst', got {fmt!r}")


# ---------------------------------------------------------------------------------------
# Which modules belong to HF, and which use the attention interface
# ---------------------------------------------------------------------------------------


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
    ``AttentionInterface`` with the ``eager`` or ``sdpa`` implementation.
    """
    users = [m for m in module.modules() if _uses_attention_interface(m)]
    if not users:
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


# ---------------------------------------------------------------------------------------
# Attention: state of the scopes
# ---------------------------------------------------------------------------------------


@dataclass(eq=False)
class _AttentionScope:
    """What one scope asks of the attention modules of its model."""

    temperature: float
    divide_grads: bool
    checked: Set[type] = field(default_factory=set)

    @property
    def factors(self) -> Tuple[float, float, float]:
        """What the gradients reaching q, k and v are multiplied by."""
        return (0.25, 0.25, 0.5) if self.divide_grads else (1.0, 1.0, 1.0)


_state_lock = threading.RLock()
_ACTIVE: "weakref.WeakKeyDictionary[nn.Module, List[_AttentionScope]]" = weakref.WeakKeyDictionary()


def _active_scope(module: nn.Module) -> Optional[_AttentionScope]:
    scopes = _ACTIVE.get(module)
    return scopes[-1] if scopes else None


# ---------------------------------------------------------------------------------------
# Attention: the original implementation
# ---------------------------------------------------------------------------------------


def _eager_function(module: nn.Module) -> Optional[Callable[..., Any]]:
    globs = _forward_globals(type(module))
    fn = globs.get("eager_attention_forward")
    if fn is None:
        fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    return fn


def _uses_upcast_reordered(module: nn.Module) -> bool:
    """GPT-2's special eager path (behind a string comparison on the config)."""
    return bool(getattr(module, "reorder_and_upcast_attn", False)) and hasattr(
        module, "_upcast_and_reordered_attn"
    )


def _upcast_reordered(module: nn.Module, query, key, value, attention_mask, **kwargs):
    return module._upcast_and_reordered_attn(query, key, value, attention_mask)


def _original_attention(module: nn.Module, impl: str) -> Callable[..., Any]:
    """The function the model would call for ``impl`` had we not switched it."""
    if impl == "eager":
        if _uses_upcast_reordered(module):
            return _upcast_reordered
        fn = _eager_function(module)
        if fn is None:
            raise RuntimeError(
                f"captum_gim: cannot find the eager attention function of "
                f"{type(module).__name__}; load the model with attn_implementation='sdpa'"
            )
        return fn
    interface = _forward_globals(type(module)).get("ALL_ATTENTION_FUNCTIONS", ALL_ATTENTION_FUNCTIONS)
    return interface[impl]


# ---------------------------------------------------------------------------------------
# Attention: semantics of the original (mask, scaling, soft-capping, dropout)
# ---------------------------------------------------------------------------------------

from ..ops.attention import AttentionSemantics as _Semantics  # noqa: E402
from ..ops.attention import causal_keep as _causal_keep  # noqa: E402


def _prepare(
    impl: str,
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    attention_mask: Any,
    kwargs: Dict[str, Any],
) -> Tuple[Optional[Tensor], Optional[Tensor], _Semantics]:
    """Additive bias, boolean keep-mask and semantics equal to the original's.

    Raises ``NotImplementedError`` (with the reason) for what GIM cannot reproduce.
    """
    if attention_mask is not None and not isinstance(attention_mask, Tensor):
        raise NotImplementedError(f"attention masks of type {type(attention_mask).__name__}")
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError("attention sinks (s_aux)")
    if kwargs.get("cache") is not None:
        raise NotImplementedError("paged attention caches")
    scaling = kwargs.get("scaling")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    dropout = float(kwargs.get("dropout", 0.0) or 0.0)
    bias: Optional[Tensor] = None
    keep: Optional[Tensor] = None
    if attention_mask is not None:
        # older transformers pass masks longer than the keys and slice them like this
        attention_mask = attention_mask[..., : key.shape[-2]]
        if attention_mask.dtype == torch.bool:
            keep = attention_mask
        else:
            bias = attention_mask
    if impl == "eager":
        if _uses_upcast_reordered(module):  # ignores the kwargs: read the module
            scaling = float(module.scaling)
            dropout = float(module.attn_dropout.p)
        if not module.training:
            dropout = 0.0
        return bias, keep, _Semantics(float(scaling), kwargs.get("softcap"), dropout, False)
    # sdpa, as transformers.integrations.sdpa_attention.sdpa_attention_forward
    if kwargs.get("softcap") is not None:
        raise NotImplementedError("soft-capping under sdpa (transformers raises too)")
    q_len, k_len = query.shape[-2], key.shape[-2]
    is_causal = kwargs.get("is_causal")
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if q_len > 1 and attention_mask is None and is_causal:
        keep = _causal_keep(q_len, k_len, query.device)
    position_bias = kwargs.get("position_bias")
    if position_bias is not None:
        bias = position_bias if bias is None else bias + position_bias
    return bias, keep, _Semantics(float(scaling), None, dropout, True)


# ---------------------------------------------------------------------------------------
# Attention: GIM's backward pass
# ---------------------------------------------------------------------------------------


from ..ops.attention import _BACKWARD_CHUNK_BYTES, gim_attention_grads as _gim_attention_grads  # noqa: E402
from ..ops.attention import masked_scores as _masked_scores, repeat_heads as _repeat_heads  # noqa: E402


class _GIMAttentionGrad(torch.autograd.Function):
    r"""Identity on the original attention's outputs; GIM gradients for q, k, v, bias."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        out: Tensor,
        weights: Optional[Tensor],
        query: Tensor,
        key: Tensor,
        value: Tensor,
        bias: Optional[Tensor],
        keep: Optional[Tensor],
        sem: _Semantics,
        scope: _AttentionScope,
        check_cls: Optional[type],
    ):
        ctx.set_materialize_grads(False)
        ctx.sem = sem
        ctx.scope = scope
        ctx.check_cls = check_cls
        ctx.save_for_backward(query, key, value, bias, keep, out if check_cls else None)
        out_v = out.view_as(out)
        if weights is None:
            return out_v
        return out_v, weights.view_as(weights)

    @staticmethod
    def backward(ctx, grad_out: Optional[Tensor], grad_weights: Optional[Tensor] = None):  # type: ignore[override]
        query, key, value, bias, keep, out = ctx.saved_tensors
        if grad_out is None and grad_weights is None:
            return (None,) * 10
        scope: _AttentionScope = ctx.scope
        need_bias = bias is not None and ctx.needs_input_grad[5]
        gq, gk, gv, g_bias, diff = _gim_attention_grads(
            query, key, value, bias, keep, grad_out, grad_weights, ctx.sem,
            scope.temperature, scope.factors, need_bias, out,
        )
        if diff is not None:
            _report_mismatch(ctx.check_cls, out, diff)
        g_bias = g_bias.to(bias.dtype) if g_bias is not None else None
        return (
            None, None, gq.to(query.dtype), gk.to(key.dtype), gv.to(value.dtype), g_bias,
            None, None, None, None,
        )


def _report_mismatch(cls: type, out: Tensor, diff: float) -> None:
    tol = (3e-2 if out.dtype in _HALF else 1e-4) * (1.0 + float(out.detach().abs().max()))
    if diff > tol:
        warnings.warn(
            f"captum_gim: the attention GIM recomputed for {cls.__name__} differs from the "
            f"model's own attention output by {diff:.3g} (tolerance {tol:.3g}), so its GIM "
            "gradient is not the gradient of this model's attention. This model's attention "
            "does something GIM does not model; please report it, and use "
            "attn_implementation='eager' meanwhile.",
            GIMAttentionMismatchWarning,
            stacklevel=2,
        )


def _explicit_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    bias: Optional[Tensor],
    keep: Optional[Tensor],
    sem: _Semantics,
    scope: _AttentionScope,
) -> Tuple[Tensor, Tensor]:
    r"""The same attention with ordinary autograd ops (used with dropout and odd layouts).

    Returns ``(output (B, Lq, H, Dv) in value's dtype, probabilities)``. Not
    :func:`captum_gim.ops.gim_attention`: that one has SDPA's argument semantics only, and
    HF attention also needs soft-capping, a boolean mask together with an additive bias,
    and eager's uniform (not zero) fully masked rows.
    """
    fq, fk, fv = scope.factors
    query, key, value = scale_grad(query, fq), scale_grad(key, fk), scale_grad(value, fv)
    work = torch.float32 if query.dtype in _HALF else query.dtype
    rep = query.shape[1] // key.shape[1]
    kr = _repeat_heads(key.to(work), rep)
    vr = _repeat_heads(value.to(work), rep)
    a = torch.matmul(query.to(work), kr.transpose(-1, -2)) * sem.scaling
    z, _ = _masked_scores(a, bias, keep, sem.softcap)
    probs = tsg_softmax(z, dim=-1, temperature=scope.temperature)
    if sem.zero_empty_rows and keep is not None:
        probs = probs * keep.any(dim=-1, keepdim=True).to(work)
    dropped = F.dropout(probs, p=sem.dropout, training=True) if sem.dropout > 0 else probs
    out = torch.matmul(dropped, vr).transpose(1, 2).contiguous().to(value.dtype)
    return out, probs.to(query.dtype)


_warned_fallback: Set[Tuple[type, str]] = set()


def _warn_fallback(module: nn.Module, why: str) -> None:
    key = (type(module), why)
    if key in _warned_fallback:
        return
    _warned_fallback.add(key)
    warnings.warn(
        f"captum_gim: {type(module).__name__} keeps its plain attention gradient: GIM does "
        f"not model {why}.",
        UserWarning,
        stacklevel=3,
    )


def _make_attention_function(impl: str) -> Callable[..., Any]:
    def gim_attention_forward(
        module: nn.Module,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Any,
        **kwargs: Any,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        original = _original_attention(module, impl)
        scope = _active_scope(module)
        if (
            scope is None
            or not torch.is_grad_enabled()
            or not (query.requires_grad or key.requires_grad or value.requires_grad)
        ):
            return original(module, query, key, value, attention_mask, **kwargs)
        try:
            bias, keep, sem = _prepare(impl, module, query, key, attention_mask, kwargs)
        except NotImplementedError as e:
            _warn_fallback(module, str(e))
            return original(module, query, key, value, attention_mask, **kwargs)
        if sem.dropout > 0.0:
            # the original's dropout mask cannot be reproduced: the output is our own draw
            return _explicit_attention(query, key, value, bias, keep, sem, scope)
        # The original runs on stand-ins that require grad like q, k, v do (so it picks the
        # very kernel it picks in the plain model: bit-identical values); its graph is then
        # cut away, so that its own backward never runs.
        stand_ins = [t.detach().requires_grad_(t.requires_grad) for t in (query, key, value)]
        out, weights = original(module, *stand_ins, attention_mask, **kwargs)
        out = out.detach()
        if isinstance(weights, Tensor):
            weights = weights.detach()
        expected = (query.shape[0], query.shape[2], query.shape[1], value.shape[-1])
        if (
            tuple(out.shape) != expected
            or key.shape[0] != query.shape[0]
            or value.shape[0] != query.shape[0]
            or query.shape[1] % key.shape[1] != 0
        ):
            # unusual layouts (broadcast batches...): straight-through the explicit attention
            sur_out, sur_w = _explicit_attention(query, key, value, bias, keep, sem, scope)
            sur_out = sur_out.reshape(out.shape)
            w = straight_through(weights, sur_w) if isinstance(weights, Tensor) else weights
            return straight_through(out, sur_out), w
        check_cls = None
        with _state_lock:
            if type(module) not in scope.checked:
                scope.checked.add(type(module))
                check_cls = type(module)
        # weights GIM can give a gradient path to (sdpa returns None)
        w_shape = (expected[0], expected[2], expected[1], key.shape[2])
        usable = isinstance(weights, Tensor) and weights.shape == w_shape
        res = _GIMAttentionGrad.apply(
            out, weights if usable else None, query, key, value, bias, keep, sem, scope, check_cls
        )
        return res if usable else (res, weights)

    gim_attention_forward.__name__ = f"{GIM_ATTENTION_PREFIX}{impl}_attention_forward"
    gim_attention_forward.__qualname__ = gim_attention_forward.__name__
    return gim_attention_forward


_ATTENTION_FUNCTIONS: Dict[str, Callable[..., Any]] = {
    impl: _make_attention_function(impl) for impl in SUPPORTED_ATTENTION_IMPLEMENTATIONS
}


def _register_interfaces() -> None:
    """Add the GIM keys to AttentionInterface and AttentionMaskInterface (never overwrite)."""
    if AttentionMaskInterface is None:
        return
    for impl, fn in _ATTENTION_FUNCTIONS.items():
        key = GIM_ATTENTION_PREFIX + impl
        existing = AttentionInterface._global_mapping.get(key)
        if existing is not None and getattr(existing, "__name__", "") != fn.__name__:
            raise RuntimeError(
                f"captum_gim: the attention implementation key {key!r} is already registered "
                "by something else; captum_gim will not overwrite it"
            )
        AttentionInterface.register(key, fn)
        mask_fn = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping[impl]
        AttentionMaskInterface.register(key, mask_fn)


_register_interfaces()


# ---------------------------------------------------------------------------------------
# The model rule: switch attention, switch the KV cache off
# ---------------------------------------------------------------------------------------


def _set_impl(config: Any, value: Optional[str]) -> None:
    # the internal attribute: the public setter would also rewrite the sub-configs
    if isinstance(getattr(type(config), "_attn_implementation", None), property):
        config._attn_implementation_internal = value
    else:  # pragma: no cover - transformers before the property existed
        config._attn_implementation = value


def _model_configs(model: nn.Module) -> List[Any]:
    """Every config object the model's modules read, sub-configs included (each once)."""
    seen: Dict[int, Any] = {}

    def add(cfg: Any) -> None:
        if cfg is None or id(cfg) in seen or not hasattr(cfg, "_attn_implementation"):
            return
        seen[id(cfg)] = cfg
        for key in getattr(cfg, "sub_configs", {}) or {}:
            add(getattr(cfg, key, None))

    for m in model.modules():
        add(getattr(m, "config", None))
    return list(seen.values())


def _switch_attention(model: nn.Module, configs: List[Any], config: GIMConfig) -> Handle:
    scope = _AttentionScope(config.temperature, config.divide_grads)
    modules = list(model.modules())
    switched: List[Tuple[Any, Optional[str]]] = []
    with _state_lock:
        for m in modules:
            _ACTIVE.setdefault(m, []).append(scope)

    def undo() -> None:
        try:
            for cfg, impl in reversed(switched):
                _set_impl(cfg, impl)
        finally:
            with _state_lock:
                for m in modules:
                    scopes = _ACTIVE.get(m)
                    if scopes is not None:
                        if scope in scopes:
                            scopes.remove(scope)
                        if not scopes:
                            del _ACTIVE[m]

    try:
        if AttentionMaskInterface is not None:
            for cfg in configs:
                impl = cfg._attn_implementation  # _model_configs keeps configs that have one
                if impl in SUPPORTED_ATTENTION_IMPLEMENTATIONS:
                    switched.append((cfg, impl))
                    _set_impl(cfg, GIM_ATTENTION_PREFIX + impl)
    except BaseException:
        undo()
        raise
    return Handle(undo)


def _disable_cache(configs: List[Any]) -> Handle:
    saved: List[Tuple[Any, Any]] = []
    for cfg in configs:
        if "use_cache" in getattr(cfg, "__dict__", {}):
            saved.append((cfg, cfg.__dict__["use_cache"]))
            cfg.use_cache = False

    def undo() -> None:
        for cfg, value in reversed(saved):
            cfg.use_cache = value

    return Handle(undo)


def _install_model(module: nn.Module, config: GIMConfig) -> Handle:
    configs = _model_configs(module)
    handles: List[Handle] = []
    try:
        # a nested scope with plain attention must still override an outer scope's
        if config.uses_tsg or config.divide_grads or _active_scope(module) is not None:
            handles.append(_switch_attention(module, configs, config))
        handles.append(_disable_cache(configs))
    except BaseException:
        combine_handles(handles).remove()
        raise
    return combine_handles(handles)


# ---------------------------------------------------------------------------------------
# One patch per module, however many scopes nest on it (the innermost scope's settings win)
# ---------------------------------------------------------------------------------------

_patch_lock = threading.RLock()
_PATCHES: "weakref.WeakKeyDictionary[nn.Module, Dict[str, Tuple[Handle, List[Tuple[object, GIMConfig]]]]]" = (
    weakref.WeakKeyDictionary()
)


def _innermost(module: nn.Module, kind: str) -> Optional[GIMConfig]:
    entry = _PATCHES.get(module, {}).get(kind)
    return entry[1][-1][1] if entry and entry[1] else None


def _shared_patch(
    module: nn.Module,
    kind: str,
    config: GIMConfig,
    patch: Callable[[nn.Module], Handle],
) -> Handle:
    r"""Apply ``patch`` to ``module`` once; nested scopes only push their settings.

    The patched code reads the settings with ``_innermost(module, kind)``. The patch is
    undone when the last scope using it leaves, whatever the order.
    """
    token = object()
    with _patch_lock:
        per_module = _PATCHES.setdefault(module, {})
        if kind not in per_module:
            per_module[kind] = (patch(module), [])
        per_module[kind][1].append((token, config))

    def undo() -> None:
        handle = None
        with _patch_lock:
            per_module = _PATCHES.get(module, {})
            entry = per_module.get(kind)
            if entry is None:
                return
            entry[1][:] = [e for e in entry[1] if e[0] is not token]
            if not entry[1]:
                handle = entry[0]
                del per_module[kind]
                if not per_module:
                    del _PATCHES[module]
        if handle is not None:
            handle.remove()

    return Handle(undo)


# ---------------------------------------------------------------------------------------
# Norms: freeze 1/rms (or the standard deviation) inside the module's own forward
# ---------------------------------------------------------------------------------------

_INV_STD_FUNCS = {torch.rsqrt, Tensor.rsqrt, torch.sqrt, Tensor.sqrt, torch.std, Tensor.std}
_POW_FUNCS = {torch.pow, Tensor.pow, Tensor.__pow__}
_MEAN_FUNCS = {torch.mean, Tensor.mean}


def _arg(args: Sequence[Any], kwargs: Dict[str, Any], i: int, name: str, default: Any = None) -> Any:
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


class _FreezeNormMode(TorchFunctionMode):
    r"""Active only inside one norm module's forward: its inverse std / rms is detached.

    A mode is popped while its own handler runs, so only the norm's leaf ops are seen.
    """

    def __init__(self, keep_mean: bool) -> None:
        super().__init__()
        self.keep_mean = keep_mean
        self.frozen = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if func in _INV_STD_FUNCS:
            self.frozen += 1
            return func(*args, **kwargs).detach()
        if func in _POW_FUNCS:
            exponent = _arg(args, kwargs, 1, "exponent")
            if isinstance(exponent, (int, float)) and abs(abs(float(exponent)) - 0.5) < 1e-12:
                self.frozen += 1
                return func(*args, **kwargs).detach()
        if func is F.rms_norm:
            self.frozen += 1
            return frozen_rms_norm(
                _arg(args, kwargs, 0, "input"),
                _arg(args, kwargs, 1, "normalized_shape"),
                _arg(args, kwargs, 2, "weight"),
                _arg(args, kwargs, 3, "eps"),
            )
        if func is F.layer_norm:
            self.frozen += 1
            return frozen_layer_norm(
                _arg(args, kwargs, 0, "input"),
                _arg(args, kwargs, 1, "normalized_shape"),
                _arg(args, kwargs, 2, "weight"),
                _arg(args, kwargs, 3, "bias"),
                _arg(args, kwargs, 4, "eps", 1e-5),
                keep_mean=self.keep_mean,
            )
        if not self.keep_mean and func in _MEAN_FUNCS:
            return func(*args, **kwargs).detach()
        return func(*args, **kwargs)


_NORM_NAME = re.compile(r"(rms_?norm|layer_?norm)", re.I)
_NOT_A_NORM = re.compile(r"batch|group|instance|weight_?norm|spectral", re.I)
_NORM_SOURCE = re.compile(r"rsqrt|\.sqrt\(|sqrt\(|rms_norm|layer_norm|\.std\(|\*\*\s*-?0\.5")


def _is_hf_norm(module: nn.Module) -> bool:
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


_warned_norms: Set[type] = set()


def _install_norm(module: nn.Module, config: GIMConfig) -> Handle:
    return _shared_patch(module, "norm", config, _patch_norm)


def _patch_norm(module: nn.Module) -> Handle:
    original = module.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        cfg = _innermost(module, "norm")
        mode = _FreezeNormMode(cfg.keep_norm_mean if cfg is not None else True)
        with mode:
            out = original(*args, **kwargs)
        if mode.frozen == 0 and type(module) not in _warned_norms:
            _warned_norms.add(type(module))
            warnings.warn(
                f"captum_gim: {type(module).__name__} computed no rsqrt / sqrt / std / "
                "rms_norm / layer_norm that GIM could freeze, so it keeps its plain gradient. "
                "Register a rule for it (captum_gim.register_rule).",
                UserWarning,
                stacklevel=2,
            )
        return out

    return replace_forward(module, forward)


# ---------------------------------------------------------------------------------------
# Gated MLPs: gate and up branches x 1/2
# ---------------------------------------------------------------------------------------

_GATED_PAIRS: Tuple[Tuple[str, ...], ...] = (
    ("gate_proj", "up_proj"),  # Llama, Mistral, Qwen, Gemma (SwiGLU / GeGLU)
    ("gate_up_proj",),  # Phi-3: one fused projection
    ("w1", "w3"),  # Mixtral-style experts in transformers 4.x
)


def _gated_branches(module: nn.Module) -> Optional[Tuple[str, ...]]:
    children = dict(module.named_children())
    for names in _GATED_PAIRS:
        if all(isinstance(children.get(n), nn.Module) for n in names) and (
            "down_proj" in children or "w2" in children
        ):
            return names
    return None


def _is_gated_mlp(module: nn.Module) -> bool:
    return _is_hf_class(module) and _gated_branches(module) is not None


def _halve_output(_m: nn.Module, _inputs: Any, output: Any) -> Any:
    return scale_grad(output, 0.5) if isinstance(output, Tensor) else output


def _install_gated_mlp(module: nn.Module, config: GIMConfig) -> Handle:
    return _shared_patch(module, "gated_mlp", config, _patch_gated_mlp)


def _patch_gated_mlp(module: nn.Module) -> Handle:
    names = _gated_branches(module) or ()
    handles: List[Handle] = []
    for n in names:
        hook = getattr(module, n).register_forward_hook(_halve_output)
        handles.append(Handle(hook.remove))
    return combine_handles(handles)


# ---------------------------------------------------------------------------------------
# Fused MoE experts (transformers 5: gate_up_proj parameter of shape (E, 2I, H))
# ---------------------------------------------------------------------------------------


def _is_fused_experts(module: nn.Module) -> bool:
    if not _is_hf_class(module):
        return False
    p = getattr(module, "gate_up_proj", None)
    return (
        isinstance(p, nn.Parameter)
        and p.dim() == 3
        and getattr(module, "has_gate", True)
        and hasattr(module, "down_proj")
    )


class _ExpertsMode(TorchFunctionMode):
    r"""Active inside a fused-experts forward that loops over experts itself ("eager").

    Tags views of ``gate_up_proj`` taken by indexing, and halves the gradient of every
    linear map / matrix product that uses one: the gate and up branches of each expert.
    """

    _VIEWS = {
        Tensor.__getitem__, Tensor.t, Tensor.transpose, Tensor.permute, Tensor.view,
        Tensor.reshape, Tensor.contiguous, torch.transpose, torch.t, torch.permute,
        torch.reshape,
    }
    _PRODUCTS = {
        F.linear, torch.matmul, Tensor.matmul, Tensor.__matmul__, torch.bmm, Tensor.bmm,
        torch.mm, Tensor.mm,
    }

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self._tagged: Dict[int, "weakref.ref[Tensor]"] = {id(weight): weakref.ref(weight)}
        self.halved = 0

    def _is_tagged(self, t: Any) -> bool:
        if not isinstance(t, Tensor):
            return False
        ref = self._tagged.get(id(t))
        return ref is not None and ref() is t

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in self._VIEWS and args and self._is_tagged(args[0]) and isinstance(out, Tensor):
            self._tagged[id(out)] = weakref.ref(out)
        elif func in self._PRODUCTS and isinstance(out, Tensor):
            operands = list(args[:2]) + [kwargs.get("weight")]
            if any(self._is_tagged(a) for a in operands):
                self.halved += 1
                return scale_grad(out, 0.5)
        return out


def _experts_loop_themselves(module: nn.Module) -> bool:
    impl = getattr(getattr(module, "config", None), "_experts_implementation", None)
    return impl in (None, "eager")


def _install_experts(module: nn.Module, config: GIMConfig) -> Handle:
    return _shared_patch(module, "experts", config, _patch_experts)


def _patch_experts(module: nn.Module) -> Handle:
    original_forward = module.forward
    had_apply_gate = "_apply_gate" in module.__dict__
    previous_apply_gate = module.__dict__.get("_apply_gate")
    bound_apply_gate = getattr(module, "_apply_gate", None)
    state = {"eager": False}

    def apply_gate(gate_up_out: Tensor) -> Tensor:
        # batched_mm / grouped_mm implementations: gate_up_out holds both branches
        if not state["eager"]:
            gate_up_out = scale_grad(gate_up_out, 0.5)
        return bound_apply_gate(gate_up_out)  # type: ignore[misc]

    def forward(*args: Any, **kwargs: Any) -> Any:
        if not _experts_loop_themselves(module):
            return original_forward(*args, **kwargs)
        state["eager"] = True
        try:
            with _ExpertsMode(module.gate_up_proj):
                return original_forward(*args, **kwargs)
        finally:
            state["eager"] = False

    handles = [replace_forward(module, forward)]
    if bound_apply_gate is not None:
        object.__setattr__(module, "_apply_gate", apply_gate)

        def undo() -> None:
            if module.__dict__.get("_apply_gate") is apply_gate:
                if had_apply_gate:
                    object.__setattr__(module, "_apply_gate", previous_apply_gate)
                else:
                    del module.__dict__["_apply_gate"]

        handles.append(Handle(undo))
    return combine_handles(handles)


# ---------------------------------------------------------------------------------------
# The rules
# ---------------------------------------------------------------------------------------

model_rule = Rule(
    "transformers.attention",
    _install_model,
    kind="model",
    types=(PreTrainedModel,),
    covers=_covers,
    explain=_explain,
    note=(
        "attention softmaxes get TSG and q/k/v division through transformers' "
        "AttentionInterface (eager and sdpa); MoE router softmaxes are left alone; "
        "use_cache is off in the scope"
    ),
)

norm_rule = Rule("transformers.norm", _install_norm, kind="norm", predicate=_is_hf_norm)

gated_mlp_rule = Rule(
    "transformers.gated_mlp", _install_gated_mlp, kind="gated_mlp", predicate=_is_gated_mlp
)

experts_rule = Rule(
    "transformers.experts",
    _install_experts,
    kind="gated_mlp",
    predicate=_is_fused_experts,
    note="experts' gate and up branches x1/2; routing weights keep their true gradient",
)

RULES: Tuple[Rule, ...] = (experts_rule, gated_mlp_rule, norm_rule, model_rule)
