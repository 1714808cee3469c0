r"""The autograd functions GIM is built from.

Every modified backward pass in :mod:`captum_gim` is made of the functions in this module,
so each formula lives in one place and is tested once against an explicit Jacobian
(``tests/test_ops.py``). None of them changes a forward value: each forward is computed
with the very PyTorch op the unmodified model would call, so outputs are bit-for-bit
those of the plain model.

- :func:`tsg_softmax`: temperature-scaled softmax gradient (TSG). The forward is
  ``softmax(z)``; the vector-Jacobian product is evaluated at ``s_T = softmax(z / T)``:
  ``grad_z = s_T * (g - sum(g * s_T))``, with **no** ``1/T`` factor.
- :func:`scale_grad`: identity forward, gradient multiplied by a constant (the uniform
  gradient division of multiplicative interactions).
- :func:`frozen_layer_norm`: ``F.layer_norm`` forward; the standard deviation
  ``sqrt(var + eps)`` is a constant in the backward pass, the mean keeps its gradient
  (or, with ``keep_mean=False``, is detached too, as PyHealth 2.1 does).
- :func:`frozen_rms_norm`: ``F.rms_norm`` forward; the ``1/rms`` factor is a constant.
- :func:`gim_attention`: scaled-dot-product attention whose forward is
  ``F.scaled_dot_product_attention`` itself and whose backward (TSG and the q/k/v gradient
  division) is recomputed from q, k and v.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "tsg_softmax",
    "scale_grad",
    "frozen_layer_norm",
    "frozen_rms_norm",
    "gim_attention",
    "straight_through",
]


def _check_temperature(temperature: float) -> None:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _up(t: Tensor) -> Tensor:
    """Half-precision tensors in float32; float32/float64 as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _softmax_at(z: Tensor, dim: int, temperature: float) -> Tensor:
    """``softmax(z / T)`` in at least float32 (half-precision scores are upcast)."""
    work = _up(z)
    if temperature != 1.0:
        work = work / temperature
    return torch.softmax(work, dim=dim)


class _TSGSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx, z: Tensor, dim: int, temperature: float, dtype: Optional[torch.dtype]
    ) -> Tensor:
        ctx.save_for_backward(z)
        ctx.dim = dim
        ctx.temperature = temperature
        return F.softmax(z, dim=dim, dtype=dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        (z,) = ctx.saved_tensors
        s_t = _softmax_at(z, ctx.dim, ctx.temperature)
        g = grad_out.to(s_t.dtype)
        grad_z = s_t * (g - (g * s_t).sum(dim=ctx.dim, keepdim=True))
        return grad_z.to(z.dtype), None, None, None


def tsg_softmax(
    z: Tensor,
    dim: int = -1,
    temperature: float = 2.0,
    dtype: Optional[torch.dtype] = None,
) -> Tensor:
    r"""Softmax whose backward pass is evaluated at temperature ``T``.

    Args:
        z (Tensor): attention scores exactly as they enter the softmax (scaled, masked,
            soft-capped).
        dim (int): the softmax dimension. Default: -1.
        temperature (float): ``T``. ``1.0`` gives the ordinary gradient. Default: 2.0.
        dtype (torch.dtype, optional): as in :func:`torch.nn.functional.softmax`.

    Returns:
        Tensor: ``softmax(z)``, bit-for-bit. Its vector-Jacobian product is
        ``s_T * (g - sum(g * s_T, dim))`` with ``s_T = softmax(z / T)``.

    Examples::

        >>> z = torch.tensor([[1.0, 2.0, 3.0]], requires_grad=True)
        >>> bool(torch.equal(tsg_softmax(z, temperature=2.0), torch.softmax(z, -1)))
        True
    """
    _check_temperature(temperature)
    if temperature == 1.0:
        return F.softmax(z, dim=dim, dtype=dtype)
    return _TSGSoftmax.apply(z, dim, float(temperature), dtype)


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:  # type: ignore[override]
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        return grad_out * ctx.scale, None


def scale_grad(x: Tensor, scale: float) -> Tensor:
    r"""Identity in the forward pass; multiplies the incoming gradient by ``scale``.

    Examples::

        >>> x = torch.ones(2, requires_grad=True)
        >>> scale_grad(x, 0.5).sum().backward()
        >>> x.grad
        tensor([0.5000, 0.5000])
    """
    if scale == 1.0 or not x.requires_grad:
        return x
    return _ScaleGrad.apply(x, float(scale))


def _frozen_norm_grad_parts(
    x: Tensor, g: Tensor, weight: Optional[Tensor], n_norm: int
) -> Tuple[Tuple[int, ...], Tuple[int, ...], Tensor, Tensor, Tensor]:
    """What both frozen-norm backward passes start from: the normalised and the batch
    dimensions, ``x`` and ``g`` in at least float32, and ``g * weight``."""
    norm_dims = tuple(range(x.dim() - n_norm, x.dim()))
    batch_dims = tuple(range(x.dim() - n_norm))
    xf, gf = _up(x), _up(g)
    gw = gf * _up(weight) if weight is not None else gf
    return norm_dims, batch_dims, xf, gf, gw


class _FrozenLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: Tensor,
        normalized_shape: Tuple[int, ...],
        weight: Optional[Tensor],
        bias: Optional[Tensor],
        eps: float,
        keep_mean: bool,
    ) -> Tensor:
        y = F.layer_norm(x, normalized_shape, weight, bias, eps)
        ctx.save_for_backward(x, weight)
        ctx.normalized_shape = normalized_shape
        ctx.eps = eps
        ctx.keep_mean = keep_mean
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        dims, batch_dims, xf, gf, gw = _frozen_norm_grad_parts(
            x, g, weight, len(ctx.normalized_shape)
        )
        mean = xf.mean(dim=dims, keepdim=True)
        var = xf.var(dim=dims, unbiased=False, keepdim=True)
        inv_std = torch.rsqrt(var + ctx.eps)
        grad_x = gw * inv_std
        if ctx.keep_mean:
            grad_x = grad_x - grad_x.mean(dim=dims, keepdim=True)
        grad_w = grad_b = None
        if weight is not None and ctx.needs_input_grad[2]:
            x_hat = (xf - mean) * inv_std
            grad_w = (gf * x_hat).sum(dim=batch_dims).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_b = gf.sum(dim=batch_dims).to(g.dtype)
        return grad_x.to(x.dtype), None, grad_w, grad_b, None, None


def frozen_layer_norm(
    x: Tensor,
    normalized_shape: Union[int, Sequence[int]],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    keep_mean: bool = True,
) -> Tensor:
    r"""``F.layer_norm`` with the standard deviation frozen in the backward pass.

    With ``y = (x - mean(x)) / sigma * w + b`` and ``sigma`` a constant, the input gradient
    is ``w * g / sigma`` minus its mean over the normalised dimensions (the mean
    subtraction keeps its gradient). ``keep_mean=False`` drops that centring, as
    PyHealth 2.1's GIM does.

    Examples::

        >>> x = torch.randn(2, 4)
        >>> bool(torch.equal(frozen_layer_norm(x, 4), torch.nn.functional.layer_norm(x, (4,))))
        True
    """
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    return _FrozenLayerNorm.apply(x, tuple(normalized_shape), weight, bias, eps, keep_mean)


class _FrozenRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: Tensor,
        normalized_shape: Tuple[int, ...],
        weight: Optional[Tensor],
        eps: Optional[float],
    ) -> Tensor:
        y = F.rms_norm(x, normalized_shape, weight, eps)
        ctx.save_for_backward(x, weight)
        ctx.normalized_shape = normalized_shape
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        dims, batch_dims, xf, gf, gw = _frozen_norm_grad_parts(
            x, g, weight, len(ctx.normalized_shape)
        )
        eps = ctx.eps if ctx.eps is not None else torch.finfo(x.dtype).eps
        inv_rms = torch.rsqrt(xf.pow(2).mean(dim=dims, keepdim=True) + eps)
        grad_x = gw * inv_rms
        grad_w = None
        if weight is not None and ctx.needs_input_grad[2]:
            grad_w = (gf * xf * inv_rms).sum(dim=batch_dims).to(weight.dtype)
        return grad_x.to(x.dtype), None, grad_w, None


def frozen_rms_norm(
    x: Tensor,
    normalized_shape: Union[int, Sequence[int]],
    weight: Optional[Tensor] = None,
    eps: Optional[float] = None,
) -> Tensor:
    r"""``F.rms_norm`` with ``1/rms`` frozen in the backward pass: ``grad_x = w * g / rms``.

    Examples::

        >>> x = torch.randn(2, 4)
        >>> bool(torch.equal(frozen_rms_norm(x, 4), torch.nn.functional.rms_norm(x, (4,))))
        True
    """
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    return _FrozenRMSNorm.apply(x, tuple(normalized_shape), weight, eps)


def straight_through(value: Tensor, surrogate: Tensor) -> Tensor:
    r"""``value`` in the forward pass, the gradient of ``surrogate`` in the backward pass.

    ``value.detach() + (surrogate - surrogate.detach())``: the second term is exactly zero
    for finite values, so the forward result is bit-for-bit ``value``.
    """
    return value.detach() + (surrogate - surrogate.detach())


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
        grad_s = s_t * (grad_p - (grad_p * s_t).sum(dim=-1, keepdim=True))
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
