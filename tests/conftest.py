"""Shared fixtures and the textbook reference used by the core tests.

The reference GIM pieces here are written independently of ``captum_gim.ops``: each is a
plain-autograd "straight-through" expression whose forward is the ordinary op and whose
gradient is GIM's, derived from the formulas in GIM_SPEC.md.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import Tensor, nn

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

try:  # keep hypothesis fast and deterministic in CI
    from hypothesis import HealthCheck, settings

    settings.register_profile(
        "ci",
        max_examples=25,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow],
    )
    settings.load_profile("ci")
except ImportError:  # pragma: no cover
    pass


# --- textbook GIM pieces (independent of captum_gim.ops) ---------------------------------


def ref_tsg_softmax(z: Tensor, T: float, dim: int = -1) -> Tensor:
    """Forward softmax(z); gradient of T * softmax(z / T), i.e. Jacobian diag(s_T) - s_T s_T^T."""
    s = torch.softmax(z, dim=dim)
    if T == 1.0:
        return s
    sur = T * torch.softmax(z / T, dim=dim)
    return s.detach() + sur - sur.detach()


def ref_scale(x: Tensor, s: float) -> Tensor:
    """Forward x; gradient s."""
    return x * s + (x * (1 - s)).detach()


def ref_layer_norm(x: Tensor, w, b, eps: float, freeze: bool, keep_mean: bool = True) -> Tensor:
    mu = x.mean(-1, keepdim=True)
    if freeze and not keep_mean:
        mu = mu.detach()
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    std = torch.sqrt(var + eps)
    if freeze:
        std = std.detach()
    y = (x - mu) / std
    if w is not None:
        y = y * w
    if b is not None:
        y = y + b
    return y


def ref_rms_norm(x: Tensor, w, eps: float, freeze: bool) -> Tensor:
    r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    if freeze:
        r = r.detach()
    y = x * r
    return y * w if w is not None else y


def ref_attention(q, k, v, bias, T: float, divide: bool) -> Tensor:
    """q, k, v: (B, H, L, d); bias: additive mask broadcastable to (B, H, Lq, Lk) or None."""
    if divide:
        q, k, v = ref_scale(q, 0.25), ref_scale(k, 0.25), ref_scale(v, 0.5)
    scores = q @ k.transpose(-2, -1) / (q.shape[-1] ** 0.5)
    if bias is not None:
        scores = scores + bias
    return ref_tsg_softmax(scores, T) @ v


def ref_mha(mha: nn.MultiheadAttention, query, key, value, bias, T, divide) -> Tensor:
    """Batch-first textbook multi-head attention with the module's weights (packed in-proj)."""
    E, H = mha.embed_dim, mha.num_heads
    d = E // H
    w, b = mha.in_proj_weight, mha.in_proj_bias
    q = query @ w[:E].T + b[:E]
    k = key @ w[E : 2 * E].T + b[E : 2 * E]
    v = value @ w[2 * E :].T + b[2 * E :]
    B, Lq, Lk = query.shape[0], query.shape[1], key.shape[1]
    q = q.view(B, Lq, H, d).transpose(1, 2)
    k = k.view(B, Lk, H, d).transpose(1, 2)
    v = v.view(B, Lk, H, d).transpose(1, 2)
    o = ref_attention(q, k, v, bias, T, divide)
    o = o.transpose(1, 2).reshape(B, Lq, E)
    return o @ mha.out_proj.weight.T + mha.out_proj.bias


def ref_encoder_layer(layer: nn.TransformerEncoderLayer, x, bias, T, freeze, divide) -> Tensor:
    ln1, ln2 = layer.norm1, layer.norm2

    def ln(m, h):
        return ref_layer_norm(h, m.weight, m.bias, m.eps, freeze)

    def ff(h):
        return layer.linear2(layer.activation(layer.linear1(h)))

    if layer.norm_first:
        h = ln(ln1, x)
        x = x + ref_mha(layer.self_attn, h, h, h, bias, T, divide)
        return x + ff(ln(ln2, x))
    x = ln(ln1, x + ref_mha(layer.self_attn, x, x, x, bias, T, divide))
    return ln(ln2, x + ff(x))


# --- checks that nothing of a scope survives ---------------------------------------------


def assert_model_clean(model: nn.Module) -> None:
    """No instance-level forward, hook or stray attribute left on any module."""
    for name, m in model.named_modules():
        assert "forward" not in m.__dict__, f"forward left swapped on {name or '<root>'}"
        for hooks in (
            m._forward_hooks,
            m._forward_pre_hooks,
            m._backward_hooks,
            m._backward_pre_hooks,
        ):
            assert len(hooks) == 0, f"hook left on {name or '<root>'}"


@pytest.fixture
def encoder_classifier():
    """A small batch-first encoder classifier: (B, L, E) floats -> (B, C) logits."""
    torch.manual_seed(0)

    class Clf(nn.Module):
        def __init__(self, E=16, H=4, L=6, C=3, norm_first=False):
            super().__init__()
            layer = nn.TransformerEncoderLayer(
                E, H, 32, dropout=0.0, batch_first=True, norm_first=norm_first
            )
            self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.head = nn.Linear(E, C)

        def forward(self, x, key_padding_mask=None):
            h = self.encoder(x, src_key_padding_mask=key_padding_mask)
            return self.head(h.mean(1))

    return Clf().eval()
