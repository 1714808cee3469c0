r"""Built-in rules for PyHealth (``pyhealth>=2.1``) models.

Registered lazily by :func:`captum_gim.rules.ensure_ecosystem_rules` the first time
:func:`captum_gim.gim_backward` runs after ``pyhealth`` was imported.

What the rules do:

- ``pyhealth.models.transformer.Attention`` (the scaled-dot-product helper used by
  PyHealth's ``Transformer``, by ``StageAttentionNet``'s multi-head attention and by every
  model built from ``TransformerBlock``): temperature-scaled softmax gradient (TSG) on the
  attention softmax and the uniform gradient division (query and key x1/4, value x1/2).
  The forward value is the plain module's, bit-for-bit.
- ``pyhealth.models.stagenet.StageNetLayer`` and
  ``pyhealth.models.stagenet_mha.StageNetAttentionLayer``: passthrough. Their softmaxes
  (the cumulative-softmax "cumax" master gates and the distance re-weighting of the
  convolution window) are not attention, so they keep their plain gradient; the report
  says so. The multi-head attention and ``attn_norm`` inside ``StageNetAttentionLayer``
  are still matched (by the rule above and by ``torch.nn.LayerNorm``).
- Normalisation: PyHealth's ``Transformer`` and ``StageAttentionNet`` use
  ``torch.nn.LayerNorm``, which :mod:`captum_gim.rules.torch_nn` already freezes.

Classes are matched by identity, never by name: a user class that happens to be called
``Attention`` is not touched, and a subclass that overrides ``forward`` is not matched (so
strict mode reports it instead of silently replacing its forward). The PyHealth classes
are looked up in ``sys.modules`` without importing anything: importing
``pyhealth.models`` takes seconds (it imports ``transformers``), and a model of a class
whose module was never imported cannot exist.

This module also holds :func:`pyhealth_compatible_registry`, a registry that reproduces
PyHealth 2.1's own ``pyhealth.interpret.methods.GIM`` backward pass (used by
``PyHealthGIM(pyhealth_compatible=True)``).
"""

from __future__ import annotations

import functools
import math
import sys
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor, nn

from ..config import GIMConfig
from ..ops import scale_grad, tsg_softmax
from ..registry import Handle, Rule, RuleRegistry, replace_forward

__all__ = [
    "RULES",
    "attention_rule",
    "stagenet_passthrough_rule",
    "gim_pyhealth_attention_forward",
    "pyhealth_compatible_registry",
]

_TRANSFORMER = "pyhealth.models.transformer"
_STAGENET = "pyhealth.models.stagenet"
_STAGENET_MHA = "pyhealth.models.stagenet_mha"


def _loaded_class(module_name: str, class_name: str) -> Optional[type]:
    """The class if its module is already imported; never imports anything."""
    mod = sys.modules.get(module_name)
    cls = getattr(mod, class_name, None) if mod is not None else None
    return cls if isinstance(cls, type) else None


def _is_instance(
    module_name: str, class_name: str, *, own_forward: bool = False
) -> Callable[[nn.Module], bool]:
    """Predicate: ``module`` is an instance of that PyHealth class (by identity); with
    ``own_forward``, only if its ``forward`` is the class's own (a subclass that overrides
    ``forward`` does not match)."""

    def predicate(module: nn.Module) -> bool:
        cls = _loaded_class(module_name, class_name)
        if cls is None or not isinstance(module, cls):
            return False
        return not own_forward or getattr(type(module), "forward", None) is cls.forward

    predicate.__name__ = f"is_{class_name}"
    predicate.__qualname__ = f"{module_name}.{class_name} (by identity)"
    return predicate


def _softmax_dim(module: nn.Module) -> int:
    sm = getattr(module, "softmax", None)
    dim = getattr(sm, "dim", None)
    return -1 if dim is None else int(dim)


def gim_pyhealth_attention_forward(
    module: nn.Module,
    config: GIMConfig,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    mask: Optional[Tensor] = None,
    dropout: Optional[nn.Module] = None,
) -> Tuple[Tensor, Tensor]:
    r"""``pyhealth.models.transformer.Attention.forward`` with GIM's backward pass.

    The operations are those of the PyHealth module, in the same order, so both returned
    tensors (the attended values and the attention weights) are bit-for-bit the plain
    module's. In the backward pass the softmax Jacobian is evaluated at
    ``softmax(scores / T)`` (no ``1/T`` factor) and, with ``divide_grads``, the gradients
    reaching ``query`` and ``key`` are multiplied by 1/4 and the one reaching ``value`` by
    1/2.

    Args:
        module (nn.Module): the ``Attention`` instance (for its softmax dimension).
        config (GIMConfig): the GIM settings.
        query, key, value (Tensor): ``[batch, heads, len, d_k]``.
        mask (Tensor, optional): 1 = attend, 0 = masked, broadcastable to the scores.
        dropout (nn.Module, optional): applied to the attention weights, as PyHealth does.

    Returns:
        tuple[Tensor, Tensor]: ``(attention @ value, attention)``.
    """
    if config.divide_grads:
        query = scale_grad(query, 0.25)
        key = scale_grad(key, 0.25)
        value = scale_grad(value, 0.5)
    scores = torch.matmul(query, key.transpose(-2, -1)) / math.sqrt(query.size(-1))
    if mask is not None:
        scores = scores.masked_fill(mask == 0, -1e9)
    p_attn = tsg_softmax(scores, dim=_softmax_dim(module), temperature=config.temperature)
    if dropout is not None:
        p_attn = dropout(p_attn)
    return torch.matmul(p_attn, value), p_attn


def _attention_installer(
    attend: Callable[..., Tuple[Tensor, Tensor]],
) -> Callable[[nn.Module, GIMConfig], Handle]:
    """An install function that makes an ``Attention`` instance call
    ``attend(module, config, query, key, value, mask=None, dropout=None)``."""

    def install(module: nn.Module, config: GIMConfig) -> Handle:
        return replace_forward(module, functools.partial(attend, module, config))

    return install


_install_attention = _attention_installer(gim_pyhealth_attention_forward)


def _no_install(module: nn.Module, config: GIMConfig) -> Handle:  # pragma: no cover
    return Handle(lambda: None)


#: GIM attention for ``pyhealth.models.transformer.Attention`` (Transformer,
#: StageAttentionNet, JambaEHR's transformer blocks).
attention_rule = Rule(
    "pyhealth.Attention",
    _install_attention,
    kind="attention",
    predicate=_is_instance(_TRANSFORMER, "Attention", own_forward=True),
    exclusive=True,
)

_STAGENET_NOTE = (
    "StageNet's softmaxes (the cumulative-softmax 'cumax' master gates and the distance "
    "re-weighting of the convolution window) are not attention: no TSG, plain gradient. "
    "StageNet has no attention, norm or gated product, so GIM gradients equal plain "
    "gradients on it (StageAttentionNet's multi-head attention and LayerNorm do get GIM)."
)

_is_stagenet = _is_instance(_STAGENET, "StageNetLayer")
_is_stagenet_mha = _is_instance(_STAGENET_MHA, "StageNetAttentionLayer")


def _is_stagenet_layer(module: nn.Module) -> bool:
    return _is_stagenet(module) or _is_stagenet_mha(module)


#: StageNet layers: deliberately left alone (with the note above in the report).
stagenet_passthrough_rule = Rule(
    "pyhealth.StageNet (no TSG)",
    _no_install,
    kind="passthrough",
    predicate=_is_stagenet_layer,
    note=_STAGENET_NOTE,
)

RULES: Tuple[Rule, ...] = (attention_rule, stagenet_passthrough_rule)


# --------------------------------------------------------------------------------------
# PyHealth 2.1 compatibility: the backward pass of pyhealth.interpret.methods.GIM
# --------------------------------------------------------------------------------------


# These copy PyHealth's autograd functions op for op, so that pyhealth_compatible=True is
# bit-for-bit PyHealth's output; captum_gim.ops would round differently (F.layer_norm
# forward, native softmax backward at T=1, half-precision upcasts, per-operand scaling).


class _PyHealthMatMulNorm(torch.autograd.Function):
    """``a @ b``; each operand gets half of the gradient (PyHealth's ``_MatMulNorm``)."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(a, b)
        return a @ b

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        a, b = ctx.saved_tensors
        grad_a = (grad_output @ b.transpose(-2, -1)) / 2.0
        grad_b = (a.transpose(-2, -1) @ grad_output) / 2.0
        return grad_a, grad_b


class _PyHealthTSG(torch.autograd.Function):
    """PyHealth's ``_TemperatureSoftmaxFn`` (temperatures below 1 are raised to 1)."""

    @staticmethod
    def forward(ctx, z: Tensor, dim: int, temperature: float) -> Tensor:  # type: ignore[override]
        ctx.dim = dim
        ctx.temperature = max(float(temperature), 1.0)
        ctx.save_for_backward(z)
        return torch.softmax(z, dim=dim)

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        (z,) = ctx.saved_tensors
        t = ctx.temperature
        s = torch.softmax(z, dim=ctx.dim) if t == 1.0 else torch.softmax(z / t, dim=ctx.dim)
        dot = (grad_output * s).sum(dim=ctx.dim, keepdim=True)
        return s * (grad_output - dot), None, None


class _PyHealthFrozenLayerNorm(torch.autograd.Function):
    """PyHealth's ``_FrozenLayerNormFn``: its own LayerNorm forward (not ``F.layer_norm``,
    so values may differ from the plain module's in the last bit) and ``g * w / std``
    as the input gradient (mean and standard deviation both constants)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: Tensor,
        normalized_shape: Tuple[int, ...],
        weight: Optional[Tensor],
        bias: Optional[Tensor],
        eps: float,
    ) -> Tensor:
        dims = tuple(range(-len(normalized_shape), 0))
        mean = x.mean(dim=dims, keepdim=True)
        var = x.var(dim=dims, unbiased=False, keepdim=True)
        std = torch.sqrt(var + eps)
        out = (x - mean) / std
        if weight is not None:
            out = out * weight
        if bias is not None:
            out = out + bias
        ctx.save_for_backward(weight, 1.0 / std)
        return out

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        weight, inv_std = ctx.saved_tensors
        if weight is not None:
            grad_x = grad_output * weight * inv_std
        else:
            grad_x = grad_output * inv_std
        # the affine parameters' gradients are never needed for attribution; PyHealth
        # computes them (and crashes without a weight), we skip them
        return grad_x, None, None, None, None


def _pyhealth_attention_forward(
    module: nn.Module,
    config: GIMConfig,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    mask: Optional[Tensor] = None,
    dropout: Optional[nn.Module] = None,
) -> Tuple[Tensor, Tensor]:
    """PyHealth 2.1's ``_AttentionGIM.forward`` (softmax over the last dimension, as there)."""
    qk = _PyHealthMatMulNorm.apply(query, key.transpose(-2, -1))
    scores = qk / math.sqrt(query.size(-1))
    if mask is not None:
        scores = scores.masked_fill(mask == 0, -1e9)
    p_attn = _PyHealthTSG.apply(scores, -1, config.temperature)
    if mask is not None:
        p_attn = p_attn.masked_fill(mask == 0, 0)
    if dropout is not None:
        p_attn = dropout(p_attn)
    return _PyHealthMatMulNorm.apply(p_attn, value), p_attn


_install_pyhealth_attention = _attention_installer(_pyhealth_attention_forward)


def _install_pyhealth_layer_norm(module: nn.Module, config: GIMConfig) -> Handle:
    m: nn.LayerNorm = module  # type: ignore[assignment]

    def forward(x: Tensor) -> Tensor:
        return _PyHealthFrozenLayerNorm.apply(x, m.normalized_shape, m.weight, m.bias, m.eps)

    return replace_forward(m, forward)


_is_attention_any_forward = _is_instance(_TRANSFORMER, "Attention")


def _is_pyhealth_named_attention(module: nn.Module) -> bool:
    # PyHealth 2.1 swaps any module whose class is *named* "Attention" and has an
    # nn.Softmax `softmax` attribute; we keep its reach to PyHealth's own class.
    return _is_attention_any_forward(module) and isinstance(
        getattr(module, "softmax", None), nn.Softmax
    )


def pyhealth_compatible_registry() -> RuleRegistry:
    r"""Rules that reproduce PyHealth 2.1's ``pyhealth.interpret.methods.GIM`` backward pass.

    Differences from the default rules, all PyHealth's choices:

    - LayerNorm: mean *and* standard deviation are constants (``keep_norm_mean=False``),
      and the forward is PyHealth's own arithmetic rather than ``F.layer_norm`` (so
      outputs can differ from the plain model in the last bit).
    - Attention: the gradient is halved at each of the two matrix products (equal to the
      q,k x1/4, v x1/2 division); attention weights are re-masked after the softmax;
      temperatures below 1 are raised to 1.

    Every other module keeps its plain gradient, as in PyHealth (whose docstring says all
    softmaxes get TSG, but only attention softmaxes are swapped).

    Returns:
        RuleRegistry: a fresh registry (the default one is not changed).

    Examples::

        >>> reg = pyhealth_compatible_registry()
        >>> [r.name for r in reg]
        ['pyhealth-2.1.Attention', 'pyhealth-2.1.LayerNorm', 'pyhealth.StageNet (no TSG)']
    """
    return RuleRegistry(
        [
            Rule(
                "pyhealth-2.1.Attention",
                _install_pyhealth_attention,
                kind="attention",
                predicate=_is_pyhealth_named_attention,
                exclusive=True,
                enabled=lambda cfg: True,
            ),
            Rule(
                "pyhealth-2.1.LayerNorm",
                _install_pyhealth_layer_norm,
                kind="norm",
                types=(nn.LayerNorm,),
                enabled=lambda cfg: True,
            ),
            stagenet_passthrough_rule,
        ]
    )
