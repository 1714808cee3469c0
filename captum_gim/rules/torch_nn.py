r"""Built-in rules for ``torch.nn``: LayerNorm, RMSNorm and MultiheadAttention.

``nn.TransformerEncoderLayer``, ``nn.TransformerDecoderLayer``, ``nn.TransformerEncoder``,
``nn.TransformerDecoder`` and ``nn.Transformer`` are built from these modules and call them
as modules, so they are covered too (their fused fast path is only taken when no
gradient is needed, and so never inside an attribution).
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import GIMConfig
from ..ops import frozen_layer_norm, frozen_rms_norm, gim_attention, scale_grad, tsg_softmax
from ..registry import Handle, Rule, replace_forward

__all__ = ["layer_norm_rule", "rms_norm_rule", "multihead_attention_rule", "RULES"]


def _install_layer_norm(module: nn.Module, config: GIMConfig) -> Handle:
    m: nn.LayerNorm = module  # type: ignore[assignment]

    def forward(input: Tensor) -> Tensor:
        return frozen_layer_norm(
            input, m.normalized_shape, m.weight, m.bias, m.eps, keep_mean=config.keep_norm_mean
        )

    return replace_forward(m, forward)


def _install_rms_norm(module: nn.Module, config: GIMConfig) -> Handle:
    m: nn.RMSNorm = module  # type: ignore[assignment]

    def forward(x: Tensor) -> Tensor:
        return frozen_rms_norm(x, m.normalized_shape, m.weight, m.eps)

    return replace_forward(m, forward)


def gim_multihead_attention_forward(
    m: nn.MultiheadAttention,
    config: GIMConfig,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Optional[Tensor] = None,
    need_weights: bool = True,
    attn_mask: Optional[Tensor] = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> Tuple[Tensor, Optional[Tensor]]:
    r"""``nn.MultiheadAttention.forward`` (its non-fused path) with GIM's backward pass.

    The steps are those of ``F.multi_head_attention_forward``, in the same order, so the
    forward output is identical. With ``need_weights`` the softmax is explicit (TSG) and
    the gradients reaching q and k are multiplied by 1/4, v by 1/2, on every path: also
    where the attributed output uses the returned attention weights (halving at each
    product instead would give q and k only 1/2 on that path). Without, SDPA runs as
    before and :func:`~captum_gim.ops.gim_attention` supplies the same backward pass.
    """
    T = config.temperature
    qk_factor = 0.25 if config.divide_grads else 1.0
    v_factor = 0.5 if config.divide_grads else 1.0

    is_batched = query.dim() == 3
    key_padding_mask = F._canonical_mask(
        mask=key_padding_mask,
        mask_name="key_padding_mask",
        other_type=F._none_or_dtype(attn_mask),
        other_name="attn_mask",
        target_type=query.dtype,
    )
    attn_mask = F._canonical_mask(
        mask=attn_mask,
        mask_name="attn_mask",
        other_type=None,
        other_name="",
        target_type=query.dtype,
        check_other=False,
    )
    if m.batch_first and is_batched:
        # keep `query is key is value` true where it was: the packed in-projection of
        # self-attention is one matmul, and the forward value must not change
        if key is value:
            if query is key:
                query = key = value = query.transpose(1, 0)
            else:
                query, key = (x.transpose(1, 0) for x in (query, key))
                value = key
        else:
            query, key, value = (x.transpose(1, 0) for x in (query, key, value))

    num_heads = m.num_heads
    is_batched = F._mha_shape_check(query, key, value, key_padding_mask, attn_mask, num_heads)
    if not is_batched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    tgt_len, bsz, embed_dim = query.shape
    # both masks are already float (canonical) here; F.multi_head_attention_forward
    # canonicalises them a second time, which changes nothing
    if is_causal and attn_mask is None:
        raise RuntimeError(
            "Need attn_mask if specifying the is_causal hint. You may use the Transformer "
            "module method `generate_square_subsequent_mask` to create this mask."
        )
    if is_causal and key_padding_mask is None and not need_weights:
        attn_mask = None
    elif key_padding_mask is not None:
        is_causal = False
    if embed_dim != m.embed_dim:
        raise AssertionError(f"was expecting embedding dimension of {m.embed_dim}, but got {embed_dim}")
    head_dim = embed_dim // num_heads

    if m._qkv_same_embed_dim:
        q, k, v = F._in_projection_packed(query, key, value, m.in_proj_weight, m.in_proj_bias)
    else:
        if m.in_proj_bias is None:
            b_q = b_k = b_v = None
        else:
            b_q, b_k, b_v = m.in_proj_bias.chunk(3)
        q, k, v = F._in_projection(
            query, key, value, m.q_proj_weight, m.k_proj_weight, m.v_proj_weight, b_q, b_k, b_v
        )

    src_len = key.shape[0]
    if attn_mask is not None:
        if attn_mask.dim() == 2:
            if attn_mask.shape != (tgt_len, src_len):
                raise RuntimeError(
                    f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be "
                    f"{(tgt_len, src_len)}."
                )
            attn_mask = attn_mask.unsqueeze(0)
        elif attn_mask.dim() == 3:
            if attn_mask.shape != (bsz * num_heads, tgt_len, src_len):
                raise RuntimeError(
                    f"The shape of the 3D attn_mask is {attn_mask.shape}, but should be "
                    f"{(bsz * num_heads, tgt_len, src_len)}."
                )
        else:
            raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")

    if m.bias_k is not None and m.bias_v is not None:
        k = torch.cat([k, m.bias_k.repeat(1, bsz, 1)])
        v = torch.cat([v, m.bias_v.repeat(1, bsz, 1)])
        if attn_mask is not None:
            attn_mask = F.pad(attn_mask, (0, 1))
        if key_padding_mask is not None:
            key_padding_mask = F.pad(key_padding_mask, (0, 1))

    q = q.view(tgt_len, bsz * num_heads, head_dim).transpose(0, 1)
    k = k.view(k.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
    v = v.view(v.shape[0], bsz * num_heads, head_dim).transpose(0, 1)

    if m.add_zero_attn:
        zero_attn_shape = (bsz * num_heads, 1, head_dim)
        k = torch.cat([k, torch.zeros(zero_attn_shape, dtype=k.dtype, device=k.device)], dim=1)
        v = torch.cat([v, torch.zeros(zero_attn_shape, dtype=v.dtype, device=v.device)], dim=1)
        if attn_mask is not None:
            attn_mask = F.pad(attn_mask, (0, 1))
        if key_padding_mask is not None:
            key_padding_mask = F.pad(key_padding_mask, (0, 1))

    src_len = k.size(1)
    if key_padding_mask is not None:
        key_padding_mask = (
            key_padding_mask.view(bsz, 1, 1, src_len)
            .expand(-1, num_heads, -1, -1)
            .reshape(bsz * num_heads, 1, src_len)
        )
        attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask

    dropout_p = m.dropout if m.training else 0.0

    if need_weights:
        E = q.shape[-1]
        q_scaled = scale_grad(q * math.sqrt(1.0 / float(E)), qk_factor)
        k_t = scale_grad(k, qk_factor).transpose(-2, -1)
        if attn_mask is not None:
            scores = torch.baddbmm(attn_mask, q_scaled, k_t)
        else:
            scores = torch.bmm(q_scaled, k_t)
        weights = tsg_softmax(scores, dim=-1, temperature=T)
        probs = F.dropout(weights, p=dropout_p) if dropout_p > 0.0 else weights
        attn_output = torch.bmm(probs, scale_grad(v, v_factor))
        attn_output = attn_output.transpose(0, 1).reshape(tgt_len * bsz, embed_dim)
        attn_output = F.linear(attn_output, m.out_proj.weight, m.out_proj.bias)
        attn_output = attn_output.view(tgt_len, bsz, attn_output.size(1))
        attn_weights: Optional[Tensor] = weights.view(bsz, num_heads, tgt_len, src_len)
        if average_attn_weights:
            attn_weights = attn_weights.mean(dim=1)
        if not is_batched:
            attn_output = attn_output.squeeze(1)
            attn_weights = attn_weights.squeeze(0)
    else:
        if attn_mask is not None:
            if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
                attn_mask = attn_mask.unsqueeze(0)
            else:
                attn_mask = attn_mask.view(bsz, num_heads, -1, src_len)
        q = q.view(bsz, num_heads, tgt_len, head_dim)
        k = k.view(bsz, num_heads, src_len, head_dim)
        v = v.view(bsz, num_heads, src_len, head_dim)
        attn_output = gim_attention(
            q,
            k,
            v,
            attn_mask,
            dropout_p,
            is_causal,
            temperature=T,
            divide_grads=config.divide_grads,
        )
        attn_output = attn_output.permute(2, 0, 1, 3).reshape(bsz * tgt_len, embed_dim)
        attn_output = F.linear(attn_output, m.out_proj.weight, m.out_proj.bias)
        attn_output = attn_output.view(tgt_len, bsz, attn_output.size(1))
        if not is_batched:
            attn_output = attn_output.squeeze(1)
        attn_weights = None

    if m.batch_first and is_batched:
        attn_output = attn_output.transpose(1, 0)
    return attn_output, attn_weights


def _install_mha(module: nn.Module, config: GIMConfig) -> Handle:
    return replace_forward(module, functools.partial(gim_multihead_attention_forward, module, config))


def _own_forward(base: type) -> Callable[[nn.Module], bool]:
    """Instances of ``base`` (or subclasses) that still run ``base.forward``.

    A subclass that overrides ``forward`` (e.g. transformers' ``ConvNextLayerNorm`` with
    its channels-first layout) computes something else; replacing its forward with
    ``base``'s would change its output, so it is left to other rules (or strict mode).
    """

    def predicate(m: nn.Module) -> bool:
        return isinstance(m, base) and type(m).forward is base.forward

    return predicate


layer_norm_rule = Rule(
    "torch.nn.LayerNorm",
    _install_layer_norm,
    kind="norm",
    predicate=_own_forward(nn.LayerNorm),
)

_rms_types: Tuple[type, ...] = (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()
rms_norm_rule: Optional[Rule] = (
    Rule("torch.nn.RMSNorm", _install_rms_norm, kind="norm", predicate=_own_forward(nn.RMSNorm))
    if _rms_types
    else None
)


multihead_attention_rule = Rule(
    "torch.nn.MultiheadAttention",
    _install_mha,
    kind="attention",
    predicate=_own_forward(nn.MultiheadAttention),
    exclusive=True,
)

RULES = tuple(r for r in (multihead_attention_rule, layer_norm_rule, rms_norm_rule) if r)
