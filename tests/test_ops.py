"""Each autograd function in captum_gim.ops against an explicit Jacobian."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import jacrev

from captum_gim.ops import (
    frozen_layer_norm,
    frozen_rms_norm,
    gim_attention,
    scale_grad,
    straight_through,
    tsg_softmax,
)

from conftest import ref_attention


def _vjp(f, x, g):
    x = x.detach().clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(f(x), x, g)
    return gx


@pytest.mark.parametrize("T", [1.0, 2.0, 3.0, 0.5])
def test_tsg_softmax_matches_explicit_jacobian(T):
    torch.manual_seed(1)
    z = torch.randn(3, 7, dtype=torch.float64)
    g = torch.randn(3, 7, dtype=torch.float64)
    got = _vjp(lambda t: tsg_softmax(t, -1, T), z, g)
    for i in range(3):
        s_t = torch.softmax(z[i] / T, -1)
        J = torch.diag(s_t) - torch.outer(s_t, s_t)  # no 1/T factor
        torch.testing.assert_close(got[i], J.T @ g[i])
    assert torch.equal(tsg_softmax(z, -1, T), torch.softmax(z, -1))


def test_tsg_softmax_is_T_times_true_gradient_of_tempered_softmax():
    torch.manual_seed(2)
    z = torch.randn(4, 5, dtype=torch.float64)
    g = torch.randn(4, 5, dtype=torch.float64)
    T = 2.5
    got = _vjp(lambda t: tsg_softmax(t, -1, T), z, g)
    true = _vjp(lambda t: torch.softmax(t / T, -1), z, g)
    torch.testing.assert_close(got, T * true)


def test_tsg_softmax_other_dim_and_masked_entries():
    torch.manual_seed(3)
    z = torch.randn(4, 6, dtype=torch.float64)
    z[:, 2] = float("-inf")
    g = torch.randn(4, 6, dtype=torch.float64)
    got = _vjp(lambda t: tsg_softmax(t, 0, 2.0), z.T.contiguous(), g.T.contiguous()).T
    s_t = torch.softmax(z / 2.0, -1)
    expect = s_t * (g - (g * s_t).sum(-1, keepdim=True))
    torch.testing.assert_close(got, expect)
    assert torch.all(got[:, 2] == 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_tsg_softmax_half_precision(dtype):
    torch.manual_seed(4)
    z = torch.randn(2, 9, dtype=torch.float32)
    g = torch.randn(2, 9)
    got = _vjp(lambda t: tsg_softmax(t, -1, 2.0), z.to(dtype), g.to(dtype))
    assert got.dtype == dtype
    s_t = torch.softmax(z.to(dtype).float() / 2.0, -1)
    expect = s_t * (g.to(dtype).float() - (g.to(dtype).float() * s_t).sum(-1, keepdim=True))
    torch.testing.assert_close(got.float(), expect, atol=2e-2, rtol=2e-2)


def test_tsg_rejects_bad_temperature():
    with pytest.raises(ValueError, match="temperature"):
        tsg_softmax(torch.randn(3), -1, 0.0)


def test_scale_grad():
    x = torch.randn(5, dtype=torch.float64)
    g = torch.randn(5, dtype=torch.float64)
    torch.testing.assert_close(_vjp(lambda t: scale_grad(t, 0.25), x, g), 0.25 * g)
    assert torch.equal(scale_grad(x, 0.25), x)


@pytest.mark.parametrize("affine,bias", [(True, True), (True, False), (False, False)])
@pytest.mark.parametrize("keep_mean", [True, False])
def test_frozen_layer_norm_matches_jacobian_with_constant_std(affine, bias, keep_mean):
    torch.manual_seed(5)
    D = 6
    x = torch.randn(3, D, dtype=torch.float64) * 3 + 1
    w = torch.randn(D, dtype=torch.float64) if affine else None
    b = torch.randn(D, dtype=torch.float64) if bias else None
    g = torch.randn(3, D, dtype=torch.float64)
    got = _vjp(lambda t: frozen_layer_norm(t, D, w, b, 1e-5, keep_mean=keep_mean), x, g)
    for i in range(3):
        sigma = torch.sqrt(x[i].var(unbiased=False) + 1e-5)  # a constant
        mu0 = x[i].mean()

        def f(t):
            mu = t.mean() if keep_mean else mu0
            y = (t - mu) / sigma
            return y * w if w is not None else y

        J = jacrev(f)(x[i])
        torch.testing.assert_close(got[i], J.T @ g[i])
    assert torch.equal(frozen_layer_norm(x, D, w, b, 1e-5), F.layer_norm(x, (D,), w, b, 1e-5))


def test_frozen_layer_norm_parameter_grads_are_the_true_ones():
    torch.manual_seed(6)
    x = torch.randn(4, 5)
    w = torch.randn(5, requires_grad=True)
    b = torch.randn(5, requires_grad=True)
    g = torch.randn(4, 5)
    gw, gb = torch.autograd.grad(frozen_layer_norm(x, 5, w, b), (w, b), g)
    tw, tb = torch.autograd.grad(F.layer_norm(x, (5,), w, b), (w, b), g)
    torch.testing.assert_close(gw, tw)
    torch.testing.assert_close(gb, tb)


def test_frozen_layer_norm_multi_dim_shape():
    torch.manual_seed(7)
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    g = torch.randn(2, 3, 4, dtype=torch.float64)
    got = _vjp(lambda t: frozen_layer_norm(t, (3, 4)), x, g)
    for i in range(2):
        sigma = torch.sqrt(x[i].var(unbiased=False) + 1e-5)
        J = jacrev(lambda t: ((t - t.mean()) / sigma).flatten())(x[i]).reshape(12, 12)
        torch.testing.assert_close(got[i].flatten(), J.T @ g[i].flatten())


@pytest.mark.parametrize("with_weight", [True, False])
def test_frozen_rms_norm_matches_jacobian_with_constant_rms(with_weight):
    torch.manual_seed(8)
    D = 5
    x = torch.randn(3, D, dtype=torch.float64)
    w = torch.randn(D, dtype=torch.float64) if with_weight else None
    g = torch.randn(3, D, dtype=torch.float64)
    got = _vjp(lambda t: frozen_rms_norm(t, D, w, 1e-6), x, g)
    for i in range(3):
        inv_rms = torch.rsqrt(x[i].pow(2).mean() + 1e-6)
        J = jacrev(lambda t: t * inv_rms * (w if w is not None else 1.0))(x[i])
        torch.testing.assert_close(got[i], J.T @ g[i])
    assert torch.equal(frozen_rms_norm(x, D, w, 1e-6), F.rms_norm(x, (D,), w, 1e-6))


def test_straight_through():
    v = torch.randn(4)
    s = torch.randn(4, requires_grad=True)
    out = straight_through(v, 3 * s)
    assert torch.equal(out, v)
    (g,) = torch.autograd.grad(out.sum(), s)
    torch.testing.assert_close(g, torch.full((4,), 3.0))


@pytest.mark.parametrize("T", [1.0, 2.0, 3.0])
@pytest.mark.parametrize("divide", [False, True])
@pytest.mark.parametrize("mask", ["none", "bool", "float", "causal"])
def test_gim_attention_against_textbook(T, divide, mask):
    torch.manual_seed(9)
    B, H, L, d = 2, 3, 5, 4
    q, k, v = (torch.randn(B, H, L, d, dtype=torch.float64) for _ in range(3))
    g = torch.randn(B, H, L, d, dtype=torch.float64)
    attn_mask, is_causal, bias = None, False, None
    if mask == "bool":
        attn_mask = torch.rand(B, 1, L, L) > 0.3
        attn_mask[..., 0] = True
        bias = torch.zeros(B, 1, L, L, dtype=torch.float64).masked_fill(~attn_mask, -float("inf"))
    elif mask == "float":
        attn_mask = torch.randn(B, H, L, L, dtype=torch.float64)
        bias = attn_mask
    elif mask == "causal":
        is_causal = True
        bias = torch.full((L, L), -float("inf"), dtype=torch.float64).triu(1)

    def run(fn):
        qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
        out = fn(qq, kk, vv)
        return out, torch.autograd.grad(out, (qq, kk, vv), g)

    out, grads = run(
        lambda a, b_, c: gim_attention(
            a, b_, c, attn_mask, is_causal=is_causal, temperature=T, divide_grads=divide
        )
    )
    ref_out, ref_grads = run(lambda a, b_, c: ref_attention(a, b_, c, bias, T, divide))
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
    assert torch.equal(out, sdpa)  # forward value: SDPA's own, bit for bit
    torch.testing.assert_close(ref_out, out)
    for a, b_ in zip(grads, ref_grads):
        torch.testing.assert_close(a, b_)


def test_gim_attention_grouped_query_heads():
    torch.manual_seed(10)
    q = torch.randn(1, 4, 3, 2, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 3, 2, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 3, 2, dtype=torch.float64, requires_grad=True)
    out = gim_attention(q, k, v, enable_gqa=True, temperature=2.0)
    gk = torch.autograd.grad(out.sum(), k)[0]
    kk = k.detach().clone().requires_grad_(True)
    ref = ref_attention(q.detach(), kk.repeat_interleave(2, 1), v.detach().repeat_interleave(2, 1), None, 2.0, True)
    torch.testing.assert_close(torch.autograd.grad(ref.sum(), kk)[0], gk)
