r"""The attribution methods of ``attribute``, on a batch of inputs in embedding space.

Every method explains ``forward(*inputs, *additional_forward_args)[row, target[row]]``
per row, with the same inputs (token embeddings, or a PyHealth adapter's inputs) and the
same baselines:

- ``gim``: :class:`~captum_gim.GIMAttribution`, GIM-gradient x (input - baseline). (Hugging
  Face models attribute GIM at the embedding layer with :class:`~captum_gim.LayerGIM`
  instead, the same quantity; see :mod:`captum_gim.dataset.hf`.)
- ``ig``: Captum's ``IntegratedGradients`` (``n_steps``, Gauss-Legendre), from the baseline.
- ``ig-gim``: the same inside :func:`~captum_gim.gim_backward` (IG with GIM gradients).
- ``saliency``: Captum's ``Saliency`` (absolute gradient; no baseline).
- ``ixg``: Captum's ``InputXGradient`` (gradient x input: Captum's zero baseline).
- ``gradshap``: GradientShap with the baseline as the one reference and no noise
  (Captum's ``GradientShap(stdevs=0)``): the mean over ``n_samples`` points
  ``baseline + u (input - baseline)``, ``u ~ U(0, 1)``, of the gradient, times
  ``input - baseline``. Captum draws ``u`` from NumPy's global generator for the whole
  batch, which makes a row's result depend on its batch; here each row's ``u`` come from
  its own generator, seeded by ``(seed, row number)``, so a row gets the same
  attribution in any batch, process or resumed run.

Scores are summed over the trailing ``reduce`` dimensions by the callers.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..attr import GIMAttribution
from ..config import GIMConfig
from ..scope import gim_backward

__all__ = ["METHODS", "MethodSettings", "attribute_inputs", "row_seed"]

#: the methods of ``attribute --method``
METHODS: Tuple[str, ...] = ("gim", "ig", "ig-gim", "saliency", "ixg", "gradshap")


@dataclass(frozen=True)
class MethodSettings:
    r"""One attribution method and its budget.

    Attributes:
        method (str): one of :data:`METHODS`.
        n_steps (int): Integrated Gradients steps (``ig``, ``ig-gim``).
        n_samples (int): GradientShap samples.
        internal_batch_size (int, optional): the most forward rows at once for IG and
            GradientShap (lower it when they run out of memory).
        seed (int): seeds GradientShap's draws (per row).
        config (GIMConfig): GIM's settings (``gim``, ``ig-gim``).
    """

    method: str = "gim"
    n_steps: int = 50
    n_samples: int = 20
    internal_batch_size: Optional[int] = None
    seed: int = 0
    config: GIMConfig = field(default_factory=GIMConfig)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        for name in ("n_steps", "n_samples"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        ibs = self.internal_batch_size
        if ibs is not None and (isinstance(ibs, bool) or not isinstance(ibs, int) or ibs < 1):
            raise ValueError(f"internal_batch_size must be a positive integer, got {ibs!r}")


def row_seed(seed: int, row: int) -> int:
    r"""The seed of one row's random draws: a stable hash of ``(seed, row)``."""
    return zlib.crc32(f"{int(seed)}:{int(row)}".encode())


def _repeat_args(args: Tuple[Any, ...], batch: int, times: int) -> Tuple[Any, ...]:
    return tuple(
        torch.cat([a] * times) if isinstance(a, Tensor) and a.dim() > 0 and a.shape[0] == batch
        else a
        for a in args
    )


def _gradient_shap(
    forward: Callable[..., Tensor],
    inputs: Tuple[Tensor, ...],
    baselines: Tuple[Tensor, ...],
    target: Tensor,
    args: Tuple[Any, ...],
    settings: MethodSettings,
    rows: Sequence[int],
) -> Tuple[Tensor, ...]:
    batch, n = inputs[0].shape[0], settings.n_samples
    coef = torch.stack(
        [torch.rand(n, generator=torch.Generator().manual_seed(row_seed(settings.seed, r)),
                    dtype=torch.float64) for r in rows],
        dim=1,
    )  # (n_samples, batch)
    per_chunk = n if settings.internal_batch_size is None else max(1, settings.internal_batch_size // batch)
    sums = [torch.zeros_like(x) for x in inputs]
    for s0 in range(0, n, per_chunk):
        c = coef[s0 : s0 + per_chunk]
        k = c.shape[0]
        points = []
        for x, b in zip(inputs, baselines):
            ck = c.to(device=x.device, dtype=x.dtype).reshape(k, batch, *([1] * (x.dim() - 1)))
            p = (b.unsqueeze(0) + ck * (x - b).unsqueeze(0)).reshape(k * batch, *x.shape[1:])
            points.append(p.detach().requires_grad_(True))
        with torch.enable_grad():
            out = forward(*points, *_repeat_args(args, batch, k))
            t = target.repeat(k).to(out.device)
            sel = out.reshape(out.shape[0], -1).gather(1, t.unsqueeze(1))
            grads = torch.autograd.grad(sel.sum(), points)
        for i, g in enumerate(grads):
            sums[i] = sums[i] + g.reshape(k, batch, *g.shape[1:]).sum(0)
    return tuple((s / n) * (x - b) for s, x, b in zip(sums, inputs, baselines))


def attribute_inputs(
    forward: Callable[..., Tensor],
    model: nn.Module,
    inputs: Tuple[Tensor, ...],
    baselines: Tuple[Tensor, ...],
    target: Tensor,
    additional_forward_args: Tuple[Any, ...],
    settings: MethodSettings,
    rows: Sequence[int],
) -> Tuple[Tensor, ...]:
    r"""Attributions of ``settings.method`` for a batch, shaped like ``inputs``.

    Args:
        forward: ``forward(*inputs, *additional_forward_args) -> (batch, outputs)``.
        model: the module whose backward GIM modifies (``gim``, ``ig-gim``).
        inputs: float tensors with the batch first.
        baselines: shaped like ``inputs`` (unused by ``saliency`` and ``ixg``).
        target: ``(batch,)`` the output explained per row.
        additional_forward_args: further forward arguments (masks...), batch first.
        settings: the method and its budget.
        rows: the dataset row number of each batch row (seeds GradientShap).
    """
    from captum.attr import InputXGradient, IntegratedGradients, Saliency

    m, afa = settings.method, tuple(additional_forward_args)
    if m in ("saliency", "ixg"):  # leaves that require grad, as Captum wants them
        inputs = tuple(x.detach().requires_grad_(True) for x in inputs)
    if m == "gim":
        out = GIMAttribution(forward, model=model, config=settings.config).attribute(
            inputs, baselines=baselines, target=target, additional_forward_args=afa)
    elif m in ("ig", "ig-gim"):
        ig = IntegratedGradients(forward, multiply_by_inputs=True)
        kw = dict(baselines=baselines, target=target, additional_forward_args=afa,
                  n_steps=settings.n_steps, internal_batch_size=settings.internal_batch_size)
        if m == "ig":
            out = ig.attribute(inputs, **kw)
        else:
            with gim_backward(model, config=settings.config):
                out = ig.attribute(inputs, **kw)
    elif m == "saliency":
        out = Saliency(forward).attribute(inputs, target=target, abs=True, additional_forward_args=afa)
    elif m == "ixg":
        out = InputXGradient(forward).attribute(inputs, target=target, additional_forward_args=afa)
    else:
        out = _gradient_shap(forward, inputs, baselines, target, afa, settings, rows)
    out = out if isinstance(out, tuple) else (out,)
    return tuple(o.detach() for o in out)


def finite_or_raise(t: Tensor, what: str) -> Tensor:
    r"""``t``, or a clear error when it holds NaN or infinity."""
    if not bool(torch.isfinite(t).all()):
        raise FloatingPointError(f"{what} holds NaN or infinite values")
    return t

