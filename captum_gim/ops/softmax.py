r"""Temperature-scaled softmax gradients (TSG): the formula, written once.

``tsg_vjp`` is the vector-Jacobian product every attention path uses (torch.nn,
Hugging Face eager and SDPA, PyHealth default mode, :func:`~captum_gim.ops.gim_attention`):
``s_T * (g - sum(g * s_T))`` with ``s_T = softmax(z / T)`` and **no** ``1/T`` factor.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["tsg_softmax", "tsg_vjp"]


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

def tsg_vjp(s_t: Tensor, g: Tensor, dim: int = -1, *, inplace: bool = False) -> Tensor:
    r"""TSG's vector-Jacobian product ``s_T * (g - sum(g * s_T, dim))``.

    Args:
        s_t (Tensor): ``softmax(z / T)`` (the probabilities at temperature ``T``).
        g (Tensor): the gradient reaching the softmax output, in ``s_t``'s dtype.
        dim (int): the softmax dimension.
        inplace (bool): overwrite ``g`` (a fresh tensor of the caller's) with
            ``g * s_T - s_T * sum(g * s_T)``, the same product without a transient
            tensor of the size of ``g`` (the chunked attention backward uses it).

    Returns:
        Tensor: the gradient reaching the scores ``z``.
    """
    if inplace:
        grad_z = g.mul_(s_t)
        return grad_z.addcmul_(s_t, grad_z.sum(dim=dim, keepdim=True), value=-1.0)
    return s_t * (g - (g * s_t).sum(dim=dim, keepdim=True))


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
        grad_z = tsg_vjp(s_t, g, ctx.dim)
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
