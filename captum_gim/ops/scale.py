r"""Gradient scaling: the uniform gradient division of multiplicative interactions."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["scale_grad", "straight_through"]


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

def straight_through(value: Tensor, surrogate: Tensor) -> Tensor:
    r"""``value`` in the forward pass, the gradient of ``surrogate`` in the backward pass.

    ``value.detach() + (surrogate - surrogate.detach())``: the second term is exactly zero
    for finite values, so the forward result is bit-for-bit ``value``.
    """
    return value.detach() + (surrogate - surrogate.detach())
