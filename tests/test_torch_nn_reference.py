"""Full GIM on small torch.nn transformers against a slow textbook forward with the same weights."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from captum.attr import InputXGradient, Saliency
from captum_gim import GIMAttribution, gim_backward

from conftest import (
    assert_model_clean,
    ref_encoder_layer,
    ref_layer_norm,
    ref_mha,
    ref_rms_norm,
)

SETTINGS = [
    dict(temperature=T, freeze_norms=f, divide_grads=d)
    for T, f, d in itertools.product([1.0, 2.0, 3.0], [False, True], [False, True])
]


def _grad(fn, x):
    x = x.detach().clone().requires_grad_(True)
    out = fn(x)
    return torch.autograd.grad(out.sum(), x)[0]


def _gim_grad(model, x, target, **kw):
    return GIMAttribution(model, multiply_by_inputs=False, **kw).attribute(x, target=target)


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("kw", SETTINGS, ids=lambda k: "T{temperature}-f{freeze_norms:d}-d{divide_grads:d}".format(**k))
def test_encoder_layer_against_reference(norm_first, kw):
    torch.manual_seed(0)
    E, H, L = 12, 3, 5
    layer = nn.TransformerEncoderLayer(E, H, 24, dropout=0.0, batch_first=True, norm_first=norm_first).double().eval()
    head = nn.Linear(E, 1).double()
    model = nn.Sequential(layer, head)
    x = torch.randn(3, L, E, dtype=torch.float64)
    T, f, d = kw["temperature"], kw["freeze_norms"], kw["divide_grads"]
    ref = _grad(lambda t: head(ref_encoder_layer(layer, t, None, T, f, d))[..., 0].sum(-1), x)
    got = GIMAttribution(lambda t: model(t)[..., 0].sum(-1), model, multiply_by_inputs=False, **kw).attribute(x)
    torch.testing.assert_close(got, ref)
    assert_model_clean(model)


@pytest.mark.parametrize("T", [1.0, 2.0, 3.0])
def test_encoder_stack_with_padding_mask_against_reference(T):
    torch.manual_seed(1)
    E, H, L = 8, 2, 6
    layer = nn.TransformerEncoderLayer(E, H, 16, dropout=0.0, batch_first=True)
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).double().eval()
    x = torch.randn(2, L, E, dtype=torch.float64)
    pad = torch.zeros(2, L, dtype=torch.bool)
    pad[0, 4:] = True
    bias = torch.zeros(2, 1, 1, L, dtype=torch.float64).masked_fill(pad[:, None, None, :], -float("inf"))

    w = torch.randn(L, E, dtype=torch.float64)  # a plain sum of a LayerNorm output has no gradient

    def ref_fwd(t):
        for lyr in enc.layers:
            t = ref_encoder_layer(lyr, t, bias, T, True, True)
        return (t * w).sum((1, 2))

    ref = _grad(ref_fwd, x)
    got = GIMAttribution(
        lambda t, m: (enc(t, src_key_padding_mask=m) * w).sum((1, 2)),
        enc,
        multiply_by_inputs=False,
        temperature=T,
    ).attribute(x, additional_forward_args=(pad,))
    torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("mask_kind", ["none", "causal_bool", "float", "key_padding", "causal_flag"])
@pytest.mark.parametrize("batch_first", [True, False])
def test_mha_masks_against_reference(need_weights, mask_kind, batch_first):
    torch.manual_seed(2)
    E, H, L = 8, 2, 5
    mha = nn.MultiheadAttention(E, H, batch_first=batch_first).double().eval()
    x = torch.randn(2, L, E, dtype=torch.float64)
    kwargs, bias = {}, None
    causal = torch.ones(L, L, dtype=torch.bool).triu(1)  # True = masked (MHA convention)
    if mask_kind == "causal_bool":
        kwargs["attn_mask"] = causal
        bias = torch.zeros(L, L, dtype=torch.float64).masked_fill(causal, -float("inf"))
    elif mask_kind == "causal_flag":
        kwargs["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(L, dtype=torch.float64)
        kwargs["is_causal"] = True
        bias = kwargs["attn_mask"]
    elif mask_kind == "float":
        kwargs["attn_mask"] = torch.randn(L, L, dtype=torch.float64)
        bias = kwargs["attn_mask"]
    elif mask_kind == "key_padding":
        kpm = torch.zeros(2, L, dtype=torch.bool)
        kpm[1, 3:] = True
        kwargs["key_padding_mask"] = kpm
        bias = torch.zeros(2, 1, 1, L, dtype=torch.float64).masked_fill(kpm[:, None, None], -float("inf"))

    def fwd(t):
        inp = t if batch_first else t.transpose(0, 1)
        out = mha(inp, inp, inp, need_weights=need_weights, **kwargs)[0]
        out = out if batch_first else out.transpose(0, 1)
        return out.sum((1, 2))

    ref = _grad(lambda t: ref_mha(mha, t, t, t, bias, 2.0, True).sum((1, 2)), x)
    got = GIMAttribution(fwd, mha, multiply_by_inputs=False).attribute(x)
    torch.testing.assert_close(got, ref)
    plain = Saliency(fwd).attribute(x, abs=False)
    assert not torch.allclose(got, plain)  # GIM changed something
    assert_model_clean(mha)


def test_mha_cross_attention_separate_kv_dims_and_bias_kv():
    """kdim/vdim != embed_dim, add_bias_kv, add_zero_attn: compare to finite structure."""
    torch.manual_seed(3)
    E, H = 8, 2
    for kw in (dict(kdim=5, vdim=7), dict(add_bias_kv=True), dict(add_zero_attn=True)):
        mha = nn.MultiheadAttention(E, H, batch_first=True, **kw).double().eval()
        q = torch.randn(2, 4, E, dtype=torch.float64)
        k = torch.randn(2, 6, kw.get("kdim", E), dtype=torch.float64)
        v = torch.randn(2, 6, kw.get("vdim", E), dtype=torch.float64)
        for nw in (False, True):
            y0 = mha(q, k, v, need_weights=nw)
            with gim_backward(mha, temperature=1.0, divide_grads=False):
                y1 = mha(q, k, v, need_weights=nw)
            assert torch.equal(y0[0], y1[0])
            # T=1 and no division: gradients equal the plain ones
            g_plain = _grad(lambda t: mha(t, k, v, need_weights=nw)[0].sum(), q)
            with gim_backward(mha, temperature=1.0, divide_grads=False):
                g_gim = _grad(lambda t: mha(t, k, v, need_weights=nw)[0].sum(), q)
            torch.testing.assert_close(g_gim, g_plain)
            # division alone: q's gradient is exactly 1/4 of the plain one (T = 1)
            with gim_backward(mha, temperature=1.0, divide_grads=True):
                g_div = _grad(lambda t: mha(t, k, v, need_weights=nw)[0].sum(), q)
            torch.testing.assert_close(g_div, g_plain / 4)
        assert_model_clean(mha)


def _ref_decoder_layer(layer, x, mem, tgt_bias, T, f, d):
    def ln(m, h):
        return ref_layer_norm(h, m.weight, m.bias, m.eps, f)

    def ff(h):
        return layer.linear2(layer.activation(layer.linear1(h)))

    sa = lambda h: ref_mha(layer.self_attn, h, h, h, tgt_bias, T, d)
    ca = lambda h: ref_mha(layer.multihead_attn, h, mem, mem, None, T, d)
    if layer.norm_first:
        x = x + sa(ln(layer.norm1, x))
        x = x + ca(ln(layer.norm2, x))
        return x + ff(ln(layer.norm3, x))
    x = ln(layer.norm1, x + sa(x))
    x = ln(layer.norm2, x + ca(x))
    return ln(layer.norm3, x + ff(x))


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("T", [2.0, 3.0])
def test_decoder_layer_causal_against_reference(norm_first, T):
    torch.manual_seed(4)
    E, H, L, S = 8, 2, 4, 5
    layer = nn.TransformerDecoderLayer(E, H, 16, dropout=0.0, batch_first=True, norm_first=norm_first).double().eval()
    mem = torch.randn(2, S, E, dtype=torch.float64)
    x = torch.randn(2, L, E, dtype=torch.float64)
    tgt_mask = nn.Transformer.generate_square_subsequent_mask(L, dtype=torch.float64)
    w = torch.randn(L, E, dtype=torch.float64)  # a plain sum of a LayerNorm output has no gradient

    ref = _grad(lambda t: (_ref_decoder_layer(layer, t, mem, tgt_mask, T, True, True) * w).sum((1, 2)), x)
    got = GIMAttribution(
        lambda t: (layer(t, mem, tgt_mask=tgt_mask, tgt_is_causal=True) * w).sum((1, 2)),
        layer,
        multiply_by_inputs=False,
        temperature=T,
    ).attribute(x)
    torch.testing.assert_close(got, ref)
    # gradient to the memory as well (cross-attention keys and values)
    ref_m = _grad(lambda m: (_ref_decoder_layer(layer, x, m, tgt_mask, T, True, True) * w).sum((1, 2)), mem)
    got_m = GIMAttribution(
        lambda m: (layer(x, m, tgt_mask=tgt_mask) * w).sum((1, 2)), layer, multiply_by_inputs=False, temperature=T
    ).attribute(mem)
    torch.testing.assert_close(got_m, ref_m)


def test_full_nn_transformer_matches_reference_and_rules_report():
    torch.manual_seed(5)
    E, H = 8, 2
    tr = nn.Transformer(E, H, num_encoder_layers=2, num_decoder_layers=1, dim_feedforward=16, dropout=0.0, batch_first=True).double().eval()
    src = torch.randn(2, 5, E, dtype=torch.float64)
    tgt = torch.randn(2, 3, E, dtype=torch.float64)
    w = torch.randn(3, E, dtype=torch.float64)  # a plain sum of a LayerNorm output has no gradient

    def ref_fwd(s):
        m = s
        for lyr in tr.encoder.layers:
            m = ref_encoder_layer(lyr, m, None, 2.0, True, True)
        m = ref_layer_norm(m, tr.encoder.norm.weight, tr.encoder.norm.bias, tr.encoder.norm.eps, True)
        y = _ref_decoder_layer(tr.decoder.layers[0], tgt, m, None, 2.0, True, True)
        y = ref_layer_norm(y, tr.decoder.norm.weight, tr.decoder.norm.bias, tr.decoder.norm.eps, True)
        return (y * w).sum((1, 2))

    ref = _grad(ref_fwd, src)
    attr = GIMAttribution(lambda s: (tr(s, tgt) * w).sum((1, 2)), tr, multiply_by_inputs=False)
    got = attr.attribute(src)
    assert ref.abs().max() > 1e-3
    torch.testing.assert_close(got, ref)
    by_rule = attr.last_report.by_rule()
    assert len(by_rule["torch.nn.MultiheadAttention"]) == 2 + 2  # 2 enc self, 1 dec self + 1 cross
    assert "encoder.norm" in by_rule["torch.nn.LayerNorm"] and "decoder.norm" in by_rule["torch.nn.LayerNorm"]
    assert_model_clean(tr)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_variants_and_rms_norm(bias, affine):
    torch.manual_seed(6)
    ln = nn.LayerNorm(6, elementwise_affine=affine, bias=bias).double()
    if affine:
        with torch.no_grad():
            ln.weight.normal_()
            if bias:
                ln.bias.normal_()
    rms = nn.RMSNorm(6, eps=1e-6).double()
    with torch.no_grad():
        rms.weight.normal_()
    model = nn.Sequential(nn.Linear(6, 6).double(), ln, nn.Linear(6, 6).double(), rms, nn.Linear(6, 2).double())
    x = torch.randn(4, 6, dtype=torch.float64)

    def ref_fwd(t, f, keep_mean=True):
        h = model[0](t)
        h = ref_layer_norm(h, ln.weight, ln.bias, ln.eps, f, keep_mean)
        h = ref_rms_norm(model[2](h), rms.weight, rms.eps, f)
        return model[4](h)[:, 1]

    for keep_mean in (True, False):
        got = GIMAttribution(model, multiply_by_inputs=False, keep_norm_mean=keep_mean).attribute(x, target=1)
        torch.testing.assert_close(got, _grad(lambda t: ref_fwd(t, True, keep_mean), x))
    plain = GIMAttribution(model, multiply_by_inputs=False, freeze_norms=False).attribute(x, target=1)
    torch.testing.assert_close(plain, _grad(lambda t: ref_fwd(t, False), x))


def test_softmax_outside_attention_keeps_true_gradient():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(5, 4), nn.Softmax(-1), nn.Linear(4, 2)).double()
    x = torch.randn(3, 5, dtype=torch.float64)
    got = GIMAttribution(model).attribute(x, target=0)
    torch.testing.assert_close(got, InputXGradient(model).attribute(x, target=0))


def test_each_rule_alone_changes_only_its_part(encoder_classifier):
    """On an encoder: TSG alone and division alone change attention-driven gradients;
    freeze alone equals the reference with only frozen norms."""
    model = encoder_classifier.double()
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    base = GIMAttribution(model, temperature=1.0, freeze_norms=False, divide_grads=False).attribute(x, target=1)
    torch.testing.assert_close(base, InputXGradient(model).attribute(x, target=1))
    for kw in (dict(temperature=2.0), dict(freeze_norms=True), dict(divide_grads=True)):
        full = {**dict(temperature=1.0, freeze_norms=False, divide_grads=False), **kw}
        a = GIMAttribution(model, **full).attribute(x, target=1)
        assert not torch.allclose(a, base), kw

    def ref_fwd(t, T, f, d):
        for lyr in model.encoder.layers:
            t = ref_encoder_layer(lyr, t, None, T, f, d)
        return model.head(t.mean(1))[:, 1]

    for T, f, d in itertools.product([1.0, 2.0], [False, True], [False, True]):
        got = _gim_grad(model, x, 1, temperature=T, freeze_norms=f, divide_grads=d)
        torch.testing.assert_close(got, _grad(lambda t: ref_fwd(t, T, f, d), x))
