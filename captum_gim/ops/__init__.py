r"""The autograd functions GIM is built from.

Every modified backward pass in :mod:`captum_gim` is made of the functions in this package
(``softmax``, ``norms``, ``scale``, ``attention``), so each formula lives in one place and
is tested once against an explicit Jacobian (``tests/test_ops.py``). None of them changes a forward value: each forward is computed
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

from .attention import (
    AttentionSemantics,
    attention_scores_mask,
    causal_keep,
    gim_attention,
    gim_attention_grads,
    masked_scores,
    repeat_heads,
)
from .norms import frozen_layer_norm, frozen_rms_norm
from .scale import scale_grad, straight_through
from .softmax import tsg_softmax, tsg_vjp

__all__ = [
    "tsg_softmax",
    "tsg_vjp",
    "scale_grad",
    "frozen_layer_norm",
    "frozen_rms_norm",
    "gim_attention",
    "gim_attention_grads",
    "straight_through",
    "attention_scores_mask",
    "AttentionSemantics",
    "causal_keep",
    "masked_scores",
    "repeat_heads",
]
