r"""Attention with GIM's backward pass: TSG on the probabilities and the q/k/v division.

- :func:`gim_attention`: ``F.scaled_dot_product_attention``'s forward, GIM's backward
  recomputed from q, k and v (SDPA's argument semantics).
- :func:`gim_attention_grads`: the one chunked GIM attention backward (heads in chunks,
  query rows in blocks, masked key blocks skipped, grouped-query heads, soft-capping,
  bias gradients and gradients into returned attention weights) that the Hugging Face
  eager and SDPA paths call.
- :func:`attention_scores_mask`, :func:`masked_scores`, :func:`repeat_heads`: the
  explicit-attention helpers those paths share.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .scale import scale_grad
from .softmax import _check_temperature, _softmax_at, _up, tsg_softmax, tsg_vjp

__all__ = [
    "gim_attention",
    "gim_attention_grads",
    "attention_scores_mask",
    "AttentionSemantics",
    "causal_keep",
    "masked_scores",
    "repeat_heads",
]

_HALF = (torch.float16, torch.bfloat16)
#: Transient memory (bytes) the explicit attention backward aims at per chunk of heads.
_BACKWARD_CHUNK_BYTES = 16 * 2**20


def _expand_kv_heads(k: Tensor, q_heads: int) -> Tensor:
    if k.dim() < 3 or k.shape[-3] == q_heads:
        return k
    rep = q_heads // k.shape[-3]
    return k.repeat_interleave(rep, dim=-3)


def attention_scores_mask(
    attn_mask: Optional[Tensor],
    is_causal: bool,
    q_len: int,
    k_len: int,
    dtype: torch.dtype,
    device: torch.device,
) -> Optional[Tensor]:
    """An additive float mask equivalent to SDPA's ``attn_mask`` / ``is_causal``."""
    bias: Optional[Tensor] = None
    if is_causal:
        # top-left aligned, as scaled_dot_product_attention(is_causal=True)
        causal = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril()
        bias = torch.zeros(q_len, k_len, dtype=dtype, device=device).masked_fill(
            ~causal, float("-inf")
        )
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            m = torch.zeros(attn_mask.shape, dtype=dtype, device=device).masked_fill(
                ~attn_mask, float("-inf")
            )
        else:
            m = attn_mask.to(dtype)
        bias = m if bias is None else bias + m
    return bias


class _GIMAttention(torch.autograd.Function):
    """SDPA forward; GIM backward recomputed from q, k, v (no attention matrix is kept)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attn_mask: Optional[Tensor],
        is_causal: bool,
        scale: Optional[float],
        enable_gqa: bool,
        temperature: float,
        qk_factor: float,
        v_factor: float,
    ) -> Tensor:
        kwargs = {"enable_gqa": True} if enable_gqa else {}
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attn_mask, dropout_p=0.0, is_causal=is_causal,
            scale=scale, **kwargs,
        )
        ctx.save_for_backward(query, key, value, attn_mask)
        ctx.is_causal = is_causal
        ctx.scale = scale
        ctx.enable_gqa = enable_gqa
        ctx.temperature = temperature
        ctx.qk_factor = qk_factor
        ctx.v_factor = v_factor
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        query, key, value, attn_mask = ctx.saved_tensors
        q, k, v, g = _up(query), _up(key), _up(value), _up(grad_out)
        kv_heads = k.shape[-3] if k.dim() >= 3 else None
        if ctx.enable_gqa and q.dim() >= 3:
            k, v = _expand_kv_heads(k, q.shape[-3]), _expand_kv_heads(v, q.shape[-3])
        scale = 1.0 / math.sqrt(q.shape[-1]) if ctx.scale is None else ctx.scale
        scores = torch.matmul(q, k.transpose(-2, -1)) * scale
        bias = attention_scores_mask(
            attn_mask, ctx.is_causal, q.shape[-2], k.shape[-2], scores.dtype, scores.device
        )
        if bias is not None:
            scores = scores + bias
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # fully masked rows: no gradient
        grad_v = torch.matmul(probs.transpose(-2, -1), g)
        del probs
        grad_p = torch.matmul(g, v.transpose(-2, -1))
        s_t = _softmax_at(scores, -1, ctx.temperature).nan_to_num(0.0)
        grad_s = tsg_vjp(s_t, grad_p, -1)
        del s_t, grad_p
        grad_q = torch.matmul(grad_s, k) * (scale * ctx.qk_factor)
        grad_k = torch.matmul(grad_s.transpose(-2, -1), q) * (scale * ctx.qk_factor)
        grad_v = grad_v * ctx.v_factor
        if ctx.enable_gqa and kv_heads is not None and grad_k.shape[-3] != kv_heads:
            rep = grad_k.shape[-3] // kv_heads
            grad_k = grad_k.unflatten(-3, (kv_heads, rep)).sum(-3)
            grad_v = grad_v.unflatten(-3, (kv_heads, rep)).sum(-3)
        grad_k = _sum_to(grad_k, key.shape)
        grad_v = _sum_to(grad_v, value.shape)
        grad_q = _sum_to(grad_q, query.shape)
        grad_mask = None
        if attn_mask is not None and ctx.needs_input_grad[3] and attn_mask.is_floating_point():
            grad_mask = _sum_to(grad_s, attn_mask.shape).to(attn_mask.dtype)
        return (
            grad_q.to(query.dtype),
            grad_k.to(key.dtype),
            grad_v.to(value.dtype),
            grad_mask,
            None, None, None, None, None, None,
        )


def _sum_to(t: Tensor, shape: torch.Size) -> Tensor:
    """Sum a broadcast gradient back to ``shape``."""
    if t.shape == shape:
        return t
    while t.dim() > len(shape):
        t = t.sum(0)
    dims = tuple(i for i, (a, b) in enumerate(zip(t.shape, shape)) if b == 1 and a != 1)
    return t.sum(dims, keepdim=True) if dims else t


def gim_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    *,
    temperature: float = 2.0,
    divide_grads: bool = True,
) -> Tensor:
    r"""Scaled-dot-product attention with GIM's backward pass.

    Takes the arguments of :func:`torch.nn.functional.scaled_dot_product_attention`
    (``attn_mask`` boolean, True = attend, or additive float; ``is_causal`` top-left
    aligned). The forward value is SDPA's own output, bit-for-bit. The backward pass
    evaluates the softmax's vector-Jacobian product at ``softmax(scores / T)`` (TSG) and,
    with ``divide_grads``, multiplies the gradients reaching ``query`` and ``key`` by 1/4
    and the gradient reaching ``value`` by 1/2 (each of the products ``QKᵀ`` and ``PV``
    halves the gradient it passes to each operand). Like a fused kernel, it keeps only
    q, k and v for the backward pass and recomputes the attention matrix there.

    With dropout (``dropout_p > 0``, training only) the attention is computed explicitly,
    so the forward value is that of the same dropout mask applied to the explicit
    softmax.
    """
    _check_temperature(temperature)
    qk = 0.25 if divide_grads else 1.0
    vf = 0.5 if divide_grads else 1.0
    if dropout_p == 0.0:
        return _GIMAttention.apply(
            query, key, value, attn_mask, bool(is_causal), scale, bool(enable_gqa),
            float(temperature), qk, vf,
        )
    query, key, value = scale_grad(query, qk), scale_grad(key, qk), scale_grad(value, vf)
    head_scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    if enable_gqa and query.dim() >= 3:
        key = _expand_kv_heads(key, query.shape[-3])
        value = _expand_kv_heads(value, query.shape[-3])
    scores = torch.matmul(query, key.transpose(-2, -1)) * head_scale
    bias = attention_scores_mask(
        attn_mask, is_causal, query.shape[-2], key.shape[-2], scores.dtype, scores.device
    )
    if bias is not None:
        scores = scores + bias
    probs = tsg_softmax(scores, dim=-1, temperature=temperature)
    return torch.matmul(F.dropout(probs, p=dropout_p, training=True), value)


# --------------------------------------------------------------------------------------
# The chunked backward of explicit attention (Hugging Face eager and SDPA semantics)
# --------------------------------------------------------------------------------------



@dataclass(frozen=True)
class AttentionSemantics:
    """How the original implementation turns q, k, v into attention probabilities."""

    scaling: float
    softcap: Optional[float]
    dropout: float
    zero_empty_rows: bool  # SDPA: a query with no key to attend to outputs zeros


def causal_keep(q_len: int, k_len: int, device: torch.device) -> Tensor:
    """Boolean keep-mask of ``scaled_dot_product_attention(is_causal=True)`` (top-left).

    Not :func:`captum_gim.ops.attention_scores_mask`: that builds an additive float mask,
    and the backward here needs a boolean one to skip the key blocks no query may attend.
    """
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril().view(1, 1, q_len, k_len)


def repeat_heads(x: Tensor, rep: int) -> Tensor:
    if rep == 1:
        return x
    b, h, n, d = x.shape
    return x[:, :, None].expand(b, h, rep, n, d).reshape(b, h * rep, n, d)


def masked_scores(
    a: Tensor,
    bias: Optional[Tensor],
    keep: Optional[Tensor],
    softcap: Optional[float],
) -> Tuple[Tensor, Optional[Tensor]]:
    """Scores as they enter the softmax; also ``tanh(a / softcap)`` when soft-capping.

    ``a`` (the scaled ``q @ kᵀ``, a fresh tensor of the caller's) may be overwritten: the
    mask is applied in place, to ``a`` or to the product or sum made here, none of which
    autograd saves for its backward (``tanh`` saves ``u``, which is left alone).
    """
    u = None
    z = a
    if softcap is not None:
        u = torch.tanh(a / softcap)
        z = u * softcap
    if bias is not None:
        z = z + bias.to(z.dtype)
    if keep is not None:
        z.masked_fill_(~keep, torch.finfo(z.dtype).min)
    return z, u


def _slice4(t: Optional[Tensor], heads: Tuple[int, int], rows: Tuple[int, int], cols: Tuple[int, int]) -> Optional[Tensor]:
    """``t[:, h0:h1, r0:r1, c0:c1]`` on a (B, H, Lq, Lk) tensor, skipping broadcast dims."""
    if t is None:
        return None
    while t.dim() < 4:
        t = t.unsqueeze(0)
    idx = [slice(None)] * 4
    for d, (lo, hi) in zip((1, 2, 3), (heads, rows, cols)):
        if t.shape[d] != 1:
            idx[d] = slice(lo, hi)
    return t[tuple(idx)]


def _kept_columns(keep_blk: Tensor) -> Tuple[int, int]:
    """First and one-past-last key column that any query row of the block may attend."""
    cols = keep_blk.reshape(-1, keep_blk.shape[-1]).any(dim=0).nonzero()
    if cols.numel() == 0:
        return 0, 0
    return int(cols[0]), int(cols[-1]) + 1


def gim_attention_grads(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    bias: Optional[Tensor],
    keep: Optional[Tensor],
    grad_out: Optional[Tensor],
    grad_weights: Optional[Tensor],
    sem: AttentionSemantics,
    temperature: float,
    factors: Tuple[float, float, float],
    need_bias_grad: bool,
    out: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor], Optional[float]]:
    r"""GIM gradients of q, k, v (and the additive bias), in the work dtype.

    ``grad_out`` is laid out like the attention functions' output ``(B, Lq, H, Dv)``;
    ``grad_weights`` like their weights ``(B, H, Lq, Lk)``. ``factors`` multiply the
    gradients of q, k and v (the division of multiplicative interactions).

    The work is split into chunks of heads and blocks of query rows so that the transient
    ``(B, H, rows, Lk)`` tensors take about ``_BACKWARD_CHUNK_BYTES`` (counted as six such
    tensors; a chunk holds at least one group of heads sharing a key head and, with a
    keep-mask, always ``min(Lq, 128)`` rows, so it can exceed that). With a boolean keep-mask
    (SDPA semantics), each block only visits the key columns some of its rows may attend
    (causal and sliding-window masks skip most of the masked area, as fused kernels do).

    When ``out`` is given, also returns the largest difference between ``P @ V``
    recomputed here and ``out`` (a check that the explicit attention reproduces the
    original).

    :func:`captum_gim.ops.gim_attention`'s backward computes the same formulas for SDPA's
    arguments; this one adds what HF attention needs (soft-capping, bias gradients,
    gradients into returned weights, eager/SDPA row semantics) and the chunking.
    """
    bsz, hq, q_len, _ = query.shape
    hkv, k_len = key.shape[1], key.shape[2]
    dv = value.shape[-1]
    rep = hq // hkv
    work = torch.float32 if query.dtype in _HALF else query.dtype
    nbytes = torch.finfo(work).bits // 8
    restrict = sem.zero_empty_rows and keep is not None and q_len > 1
    block = min(q_len, 128) if restrict else q_len
    step = max(1, _BACKWARD_CHUNK_BYTES // max(1, bsz * rep * block * k_len * nbytes * 6))
    if step < hkv and not restrict and q_len > 1:  # one head group is still too big: block rows
        block = max(1, min(q_len, _BACKWARD_CHUNK_BYTES // max(1, bsz * rep * k_len * nbytes * 6)))
    g_bias = torch.zeros(bias.shape, dtype=work, device=bias.device) if need_bias_grad else None
    g = grad_out.transpose(1, 2) if grad_out is not None else None
    # empty query rows (SDPA outputs zeros there) only matter when some row is empty
    zero_rows = None
    if sem.zero_empty_rows and keep is not None:
        row_ok = keep.any(dim=-1, keepdim=True)
        if not bool(row_ok.all()):
            zero_rows = row_ok
    max_diff: Optional[float] = 0.0 if out is not None else None
    gqs: List[Tensor] = []
    gks: List[Tensor] = []
    gvs: List[Tensor] = []
    for g0 in range(0, hkv, step):
        g1 = min(hkv, g0 + step)
        h0, h1 = g0 * rep, g1 * rep
        qs = query[:, h0:h1].to(work)
        kr = repeat_heads(key[:, g0:g1].to(work), rep)
        vr = repeat_heads(value[:, g0:g1].to(work), rep)
        gs_all = g[:, h0:h1].to(work) if g is not None else None
        gq_rows: List[Tensor] = []
        # accumulators for k and v: created on the first block that needs one
        acc: Dict[str, Optional[Tensor]] = {"k": None, "v": None}

        def accumulate(name: str, part: Tensor, c0: int, c1: int, like: Tensor) -> None:
            cur = acc[name]
            if cur is None and c0 == 0 and c1 == k_len:
                acc[name] = part
                return
            if cur is None:
                cur = acc[name] = torch.zeros(like.shape, dtype=work, device=like.device)
            cur[:, :, c0:c1] += part

        for i0 in range(0, q_len, block):
            i1 = min(q_len, i0 + block)
            keep_b = _slice4(keep, (h0, h1), (i0, i1), (0, k_len))
            c0, c1 = _kept_columns(keep_b) if restrict else (0, k_len)
            if c1 <= c0:  # every row of the block is empty: SDPA outputs zeros
                gq_rows.append(torch.zeros_like(qs[:, :, i0:i1]))
                continue
            qb = qs[:, :, i0:i1]
            kb, vb = kr[:, :, c0:c1], vr[:, :, c0:c1]
            z, u = masked_scores(
                torch.matmul(qb * sem.scaling, kb.transpose(-1, -2)),
                _slice4(bias, (h0, h1), (i0, i1), (c0, c1)),
                _slice4(keep_b, (0, h1 - h0), (0, i1 - i0), (c0, c1)),
                sem.softcap,
            )
            probs = torch.softmax(z, dim=-1)
            probs_t = probs if temperature == 1.0 else torch.softmax(z.div_(temperature), dim=-1)
            del z
            if zero_rows is not None:
                rows = _slice4(zero_rows, (h0, h1), (i0, i1), (0, 1)).to(work)
                probs.mul_(rows)
                if probs_t is not probs:
                    probs_t.mul_(rows)
            grad_p: Optional[Tensor] = None
            if gs_all is not None:
                gb = gs_all[:, :, i0:i1]
                grad_p = torch.matmul(gb, vb.transpose(-1, -2))
                accumulate("v", torch.matmul(probs.transpose(-1, -2), gb), c0, c1, vr)
                if out is not None:
                    recon = torch.matmul(probs, vb)
                    ref = out[:, i0:i1, h0:h1].transpose(1, 2).to(work)
                    max_diff = max(max_diff or 0.0, float((recon - ref).abs().max()))
            w = _slice4(grad_weights, (h0, h1), (i0, i1), (c0, c1))
            if w is not None:
                grad_p = w.to(work) if grad_p is None else grad_p + w.to(work)
            del probs
            assert grad_p is not None
            # TSG (in place on a fresh tensor: never on the incoming weights gradient)
            grad_z = tsg_vjp(probs_t, grad_p if w is None else grad_p * 1.0, -1, inplace=True)
            del grad_p, probs_t
            if g_bias is not None:
                view = _slice4(g_bias, (h0, h1), (i0, i1), (c0, c1))
                view += grad_z.sum_to_size(view.shape)
            if u is not None:  # d(c * tanh(a / c)) / da = 1 - tanh^2
                grad_z = grad_z * (1.0 - u * u)
            gq_rows.append(torch.matmul(grad_z, kb))
            accumulate("k", torch.matmul(grad_z.transpose(-1, -2), qb), c0, c1, kr)
            del grad_z
        gqs.append(gq_rows[0] if len(gq_rows) == 1 else torch.cat(gq_rows, dim=2))
        gk_acc = acc["k"] if acc["k"] is not None else torch.zeros(kr.shape, dtype=work, device=kr.device)
        gv_acc = acc["v"] if acc["v"] is not None else torch.zeros(vr.shape, dtype=work, device=vr.device)
        if rep != 1:
            gk_acc = gk_acc.view(bsz, g1 - g0, rep, k_len, -1).sum(2)
            gv_acc = gv_acc.view(bsz, g1 - g0, rep, k_len, dv).sum(2)
        gks.append(gk_acc)
        gvs.append(gv_acc)
    fq, fk, fv = factors
    gq = (gqs[0] if len(gqs) == 1 else torch.cat(gqs, dim=1)) * (sem.scaling * fq)
    gk = (gks[0] if len(gks) == 1 else torch.cat(gks, dim=1)) * (sem.scaling * fk)
    gv = gvs[0] if len(gvs) == 1 else torch.cat(gvs, dim=1)
    if fv != 1.0:
        gv = gv * fv
    return gq, gk, gv, g_bias, max_diff
