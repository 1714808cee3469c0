r"""Frozen normalisation: the LayerNorm standard deviation / RMSNorm ``1/rms`` constant."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .softmax import _up

__all__ = ["frozen_layer_norm", "frozen_rms_norm"]


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


#: dtypes whose LayerNorm statistics are kept from the forward kernel (for half precision
#: the CPU kernel returns them rounded to the input dtype; they are recomputed in float32)
_SAVE_STATS = (torch.float32, torch.float64)


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
        if x.dtype in _SAVE_STATS:
            # the kernel F.layer_norm runs, with the statistics it computed (same output)
            y, mean, rstd = torch.native_layer_norm(x, normalized_shape, weight, bias, eps)
            ctx.save_for_backward(x, weight, mean, rstd)
        else:  # half precision: the backward recomputes the statistics in float32
            y = F.layer_norm(x, normalized_shape, weight, bias, eps)
            ctx.save_for_backward(x, weight, None, None)
        ctx.normalized_shape = normalized_shape
        ctx.eps = eps
        ctx.keep_mean = keep_mean
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        x, weight, mean, inv_std = ctx.saved_tensors
        dims, batch_dims, xf, gf, gw = _frozen_norm_grad_parts(
            x, g, weight, len(ctx.normalized_shape)
        )
        if inv_std is None:
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
