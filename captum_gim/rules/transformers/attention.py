r"""GIM attention for Hugging Face models, through transformers' ``AttentionInterface``.

At import, ``"captum_gim_eager"`` and ``"captum_gim_sdpa"`` are registered once with
``AttentionInterface.register`` (and the matching mask functions with
``AttentionMaskInterface``). While any GIM scope is open on a model, its configs' attention
implementation is the GIM key (reference-counted; restored exactly when the last scope
leaves). The GIM attention function looks up the settings active for the calling attention
module's model in this execution context (:func:`captum_gim._context.active_for`) and,
with none, calls the original implementation unchanged: other threads, and this thread
outside a scope, get the plain attention. With settings, the original runs for the forward
value (bit-for-bit) and :func:`captum_gim.ops.gim_attention_grads` supplies the backward.
"""

from __future__ import annotations

import threading
import warnings
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from ..._context import ActiveScope, active_for
from ..._coverage import inside_rule
from ..._patching import Handle, acquire, combine_handles
from ...config import GIMConfig
from ...ops import straight_through, tsg_softmax, scale_grad
from ...ops.attention import _HALF, AttentionSemantics, causal_keep, gim_attention_grads, masked_scores, repeat_heads
from .detect import _eager_function, _forward_globals
from .support import GIM_ATTENTION_PREFIX, SUPPORTED_ATTENTION_IMPLEMENTATIONS, GIMAttentionMismatchWarning

try:  # transformers >= 4.53
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
except ImportError:  # pragma: no cover - older transformers
    ALL_MASK_ATTENTION_FUNCTIONS = None
    AttentionMaskInterface = None

__all__ = ["install_model", "model_configs"]

_Semantics = AttentionSemantics
_causal_keep = causal_keep
_masked_scores = masked_scores
_repeat_heads = repeat_heads
_gim_attention_grads = gim_attention_grads


_check_lock = threading.Lock()


def _factors(config: GIMConfig) -> Tuple[float, float, float]:
    """What the gradients reaching q, k and v are multiplied by."""
    return (0.25, 0.25, 0.5) if config.divide_grads else (1.0, 1.0, 1.0)


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


def _gpt2_scaling(module: nn.Module, query: Tensor) -> float:
    """GPT-2's scale: ``module.scaling`` (transformers >= 5.4), else from its two flags."""
    if hasattr(module, "scaling"):
        return float(module.scaling)
    scaling = query.shape[-1] ** -0.5 if module.scale_attn_weights else 1.0
    if getattr(module, "scale_attn_by_inverse_layer_idx", False):
        scaling /= float(module.layer_idx + 1)
    return scaling


def _legacy_gpt2(module: nn.Module) -> bool:
    """GPT-2's attention before transformers 5.4: flags instead of ``module.scaling``, and an
    eager path that applies its own causal mask (the ``bias`` buffer) before the mask."""
    return hasattr(module, "scale_attn_weights") and not hasattr(module, "scaling")


def _gpt2_causal_bias(module: nn.Module, query: Tensor, key: Tensor, mask: Optional[Tensor]) -> Tensor:
    """GPT-2's eager scores before 5.4 are ``where(causal, s, min) + mask``: as one additive
    bias, ``where(causal, 0, min) + mask`` (equal, also where both mask a score: -inf)."""
    q_len, k_len = query.shape[-2], key.shape[-2]
    causal = module.bias[:, :, k_len - q_len : k_len, :k_len]
    dtype = mask.dtype if mask is not None else query.dtype
    zero = torch.zeros((), dtype=dtype, device=query.device)
    low = torch.full((), torch.finfo(query.dtype).min, dtype=dtype, device=query.device)
    bias = torch.where(causal.to(query.device), zero, low)
    return bias if mask is None else bias + mask


def _implicit_scaling(impl: str, module: nn.Module, query: Tensor) -> float:
    """The scale the original applies when the caller passed no ``scaling``.

    SDPA's default (``head_dim ** -0.5``), except for GPT-2-style eager functions of
    transformers < 5.4, which read ``scale_attn_weights`` (and
    ``scale_attn_by_inverse_layer_idx``) from the module instead of taking ``scaling``.
    """
    if impl == "eager" and _legacy_gpt2(module):
        return _gpt2_scaling(module, query)
    return query.shape[-1] ** -0.5


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
    if kwargs.get("head_mask") is not None:  # transformers 4.x only
        raise NotImplementedError("head masks (head_mask)")
    scaling = kwargs.get("scaling")
    if scaling is None:
        scaling = _implicit_scaling(impl, module, query)
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
            scaling = _gpt2_scaling(module, query)
            dropout = float(module.attn_dropout.p)
        if not module.training:
            dropout = 0.0
        if (
            _legacy_gpt2(module)
            and keep is None
            and not getattr(module, "is_cross_attention", False)
            and isinstance(getattr(module, "bias", None), Tensor)
            and module.bias.dtype == torch.bool
        ):
            bias = _gpt2_causal_bias(module, query, key, bias)
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
        scope: ActiveScope,
        check_cls: type,
    ):
        ctx.set_materialize_grads(False)
        ctx.sem = sem
        ctx.scope = scope
        ctx.check_cls = check_cls
        # the same tensors on every call (gradient checkpointing recomputes and compares)
        ctx.save_for_backward(query, key, value, bias, keep, out)
        out_v = out.view_as(out)
        if weights is None:
            return out_v
        return out_v, weights.view_as(weights)

    @staticmethod
    def backward(ctx, grad_out: Optional[Tensor], grad_weights: Optional[Tensor] = None):  # type: ignore[override]
        query, key, value, bias, keep, out = ctx.saved_tensors
        if grad_out is None and grad_weights is None:
            return (None,) * 10
        scope: ActiveScope = ctx.scope
        need_bias = bias is not None and ctx.needs_input_grad[5]
        with _check_lock:  # the first backward of each attention class checks the recomputation
            check = ctx.check_cls not in scope.checked
            scope.checked.add(ctx.check_cls)
        gq, gk, gv, g_bias, diff = _gim_attention_grads(
            query, key, value, bias, keep, grad_out, grad_weights, ctx.sem,
            scope.config.temperature, _factors(scope.config), need_bias, out if check else None,
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
    config: GIMConfig,
) -> Tuple[Tensor, Tensor]:
    r"""The same attention with ordinary autograd ops (used with dropout and odd layouts).

    Returns ``(output (B, Lq, H, Dv) in value's dtype, probabilities)``. Not
    :func:`captum_gim.ops.gim_attention`: that one has SDPA's argument semantics only, and
    HF attention also needs soft-capping, a boolean mask together with an additive bias,
    and eager's uniform (not zero) fully masked rows.
    """
    fq, fk, fv = _factors(config)
    query, key, value = scale_grad(query, fq), scale_grad(key, fk), scale_grad(value, fv)
    work = torch.float32 if query.dtype in _HALF else query.dtype
    rep = query.shape[1] // key.shape[1]
    kr = _repeat_heads(key.to(work), rep)
    vr = _repeat_heads(value.to(work), rep)
    a = torch.matmul(query.to(work), kr.transpose(-1, -2)) * sem.scaling
    z, _ = _masked_scores(a, bias, keep, sem.softcap)
    probs = tsg_softmax(z, dim=-1, temperature=config.temperature)
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
        scope = active_for(module)
        if (
            scope is None
            or scope.config.is_identity
            or not (scope.config.uses_tsg or scope.config.divide_grads)
            or not torch.is_grad_enabled()
            or not (query.requires_grad or key.requires_grad or value.requires_grad)
        ):
            return original(module, query, key, value, attention_mask, **kwargs)
        with inside_rule("transformers.attention"):
            return _gim_forward(impl, original, scope, module, query, key, value, attention_mask, kwargs)

    gim_attention_forward.__name__ = f"{GIM_ATTENTION_PREFIX}{impl}_attention_forward"
    gim_attention_forward.__qualname__ = gim_attention_forward.__name__
    return gim_attention_forward


def _gim_forward(
    impl: str,
    original: Callable[..., Any],
    scope: ActiveScope,
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Any,
    kwargs: Dict[str, Any],
) -> Any:
    r"""The original's forward value with GIM's backward, for the settings of ``scope``."""
    try:
        bias, keep, sem = _prepare(impl, module, query, key, attention_mask, kwargs)
    except NotImplementedError as e:
        _warn_fallback(module, str(e))
        return original(module, query, key, value, attention_mask, **kwargs)
    if sem.dropout > 0.0:
        # the original's dropout mask cannot be reproduced: the output is our own draw
        return _explicit_attention(query, key, value, bias, keep, sem, scope.config)
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
        sur_out, sur_w = _explicit_attention(query, key, value, bias, keep, sem, scope.config)
        sur_out = sur_out.reshape(out.shape)
        w = straight_through(weights, sur_w) if isinstance(weights, Tensor) else weights
        return straight_through(out, sur_out), w
    check_cls = type(module)
    # weights GIM can give a gradient path to (sdpa returns None)
    w_shape = (expected[0], expected[2], expected[1], key.shape[2])
    usable = isinstance(weights, Tensor) and weights.shape == w_shape
    res = _GIMAttentionGrad.apply(
        out, weights if usable else None, query, key, value, bias, keep, sem, scope, check_cls
    )
    return res if usable else (res, weights)


_ATTENTION_FUNCTIONS: Dict[str, Callable[..., Any]] = {
    impl: _make_attention_function(impl) for impl in SUPPORTED_ATTENTION_IMPLEMENTATIONS
}


def _register_interfaces() -> None:
    """Add the GIM keys to AttentionInterface and AttentionMaskInterface (never overwrite)."""
    if AttentionMaskInterface is None:
        return
    for impl, fn in _ATTENTION_FUNCTIONS.items():
        key = GIM_ATTENTION_PREFIX + impl
        existing = ALL_ATTENTION_FUNCTIONS.get(key)
        if existing is not None and getattr(existing, "__name__", "") != fn.__name__:
            raise RuntimeError(
                f"captum_gim: the attention implementation key {key!r} is already registered "
                "by something else; captum_gim will not overwrite it"
            )
        AttentionInterface.register(key, fn)
        mask_fn = ALL_MASK_ATTENTION_FUNCTIONS[impl]
        AttentionMaskInterface.register(key, mask_fn)


_register_interfaces()




def _set_impl(config: Any, value: Optional[str]) -> None:
    # the internal attribute: the public setter would also rewrite the sub-configs
    if isinstance(getattr(type(config), "_attn_implementation", None), property):
        config._attn_implementation_internal = value
    else:  # pragma: no cover - transformers before the property existed
        config._attn_implementation = value


def model_configs(model: nn.Module) -> List[Any]:
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


_model_configs = model_configs


def _switch(cfg: Any) -> Handle:
    """Point ``cfg`` at the GIM attention function; the handle restores it exactly."""
    impl = cfg._attn_implementation
    if AttentionMaskInterface is None or impl not in SUPPORTED_ATTENTION_IMPLEMENTATIONS:
        return Handle(lambda: None)
    _set_impl(cfg, GIM_ATTENTION_PREFIX + impl)

    def undo() -> None:
        if cfg._attn_implementation == GIM_ATTENTION_PREFIX + impl:
            _set_impl(cfg, impl)

    return Handle(undo)


def _no_cache(cfg: Any) -> Handle:
    """``use_cache = False`` while a scope is open (attribution never decodes)."""
    if "use_cache" not in getattr(cfg, "__dict__", {}):
        return Handle(lambda: None)
    saved = cfg.__dict__["use_cache"]
    cfg.use_cache = False

    def undo() -> None:
        cfg.use_cache = saved

    return Handle(undo)


def install_model(module: nn.Module, config: GIMConfig) -> Handle:
    r"""Switch the model's configs to GIM attention while any scope is open (refcounted)."""
    handles: List[Handle] = []
    try:
        for cfg in model_configs(module):
            handles.append(acquire(cfg, "attn_implementation", lambda cfg=cfg: _switch(cfg))[0])
            handles.append(acquire(cfg, "use_cache", lambda cfg=cfg: _no_cache(cfg))[0])
    except BaseException:
        combine_handles(handles).remove()
        raise
    return combine_handles(handles)
