"""Property tests over shapes, heads, masks and temperatures (hypothesis)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from captum_gim import GIMAttribution, gim_backward
from captum_gim.ops import tsg_softmax

from conftest import assert_model_clean, ref_encoder_layer, ref_tsg_softmax

temperatures = st.sampled_from([1.0, 1.5, 2.0, 3.0, 4.0])


@given(
    heads=st.integers(1, 3),
    head_dim=st.integers(1, 4),
    length=st.integers(1, 6),
    batch=st.integers(1, 3),
    T=temperatures,
    norm_first=st.booleans(),
    pad=st.integers(0, 3),
    seed=st.integers(0, 2**16),
)
def test_encoder_layer_matches_reference(heads, head_dim, length, batch, T, norm_first, pad, seed):
    torch.manual_seed(seed)
    E = heads * head_dim
    layer = nn.TransformerEncoderLayer(E, heads, 2 * E, dropout=0.0, batch_first=True, norm_first=norm_first)
    layer = layer.double().eval()
    x = torch.randn(batch, length, E, dtype=torch.float64)
    kpm = torch.zeros(batch, length, dtype=torch.bool)
    kpm[0, max(1, length - pad) :] = True  # never mask a whole row
    bias = torch.zeros(batch, 1, 1, length, dtype=torch.float64).masked_fill(kpm[:, None, None], -float("inf"))

    w = torch.randn(batch, length, E, dtype=torch.float64)  # not .sum(): LayerNorm kills it
    xr = x.clone().requires_grad_(True)
    ref = torch.autograd.grad((ref_encoder_layer(layer, xr, bias, T, True, True) * w).sum(), xr)[0]
    with gim_backward(layer, temperature=T):
        xg = x.clone().requires_grad_(True)
        out = layer(xg, src_key_padding_mask=kpm)
        got = torch.autograd.grad((out * w).sum(), xg)[0]
    assert torch.equal(out, layer(x, src_key_padding_mask=kpm))  # forward unchanged
    torch.testing.assert_close(got, ref)
    assert_model_clean(layer)


@given(
    n=st.integers(1, 8),
    rows=st.integers(1, 4),
    T=temperatures,
    scale=st.floats(0.1, 20.0),
    seed=st.integers(0, 2**16),
)
def test_tsg_softmax_matches_straight_through_reference(n, rows, T, scale, seed):
    torch.manual_seed(seed)
    z = torch.randn(rows, n, dtype=torch.float64) * scale
    g = torch.randn(rows, n, dtype=torch.float64)
    a = z.clone().requires_grad_(True)
    b = z.clone().requires_grad_(True)
    ga = torch.autograd.grad(tsg_softmax(a, -1, T), a, g)[0]
    gb = torch.autograd.grad(ref_tsg_softmax(b, T), b, g)[0]
    torch.testing.assert_close(ga, gb)
    # the gradient is orthogonal to constant shifts (softmax is shift-invariant)
    torch.testing.assert_close(ga.sum(-1), torch.zeros(rows, dtype=torch.float64), atol=1e-10, rtol=0)


@given(batch=st.integers(2, 4), seed=st.integers(0, 2**16), T=temperatures)
def test_rows_are_independent(batch, seed, T):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), nn.Flatten(), nn.Linear(8 * 3, 2)
    ).double().eval()
    x = torch.randn(batch, 3, 8, dtype=torch.float64)
    attr = GIMAttribution(model, temperature=T)
    full = attr.attribute(x, target=1)
    for i in range(batch):
        torch.testing.assert_close(full[i : i + 1], attr.attribute(x[i : i + 1], target=1))


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_temperature_one_with_everything_off_is_plain_gradient(T):
    torch.manual_seed(0)
    model = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True).double().eval()
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    w = torch.randn(2, 3, 8, dtype=torch.float64)  # the sum of a LayerNorm output has no gradient
    xr = x.clone().requires_grad_(True)
    plain = torch.autograd.grad((model(xr) * w).sum(), xr)[0]
    with gim_backward(model, temperature=T, freeze_norms=False, divide_grads=False):
        xg = x.clone().requires_grad_(True)
        g = torch.autograd.grad((model(xg) * w).sum(), xg)[0]
    if T == 1.0:
        torch.testing.assert_close(g, plain)
    else:
        assert not torch.allclose(g, plain)
