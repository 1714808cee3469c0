"""Captum's contract, checked the way Captum's own tests check their methods."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from captum.attr import (
    InputXGradient,
    IntegratedGradients,
    LayerGradientXActivation,
    LayerIntegratedGradients,
    NoiseTunnel,
    Saliency,
)
from captum.metrics import infidelity, sensitivity_max
from captum_gim import GIMAttribution, LayerGIM, gim_backward

from conftest import assert_model_clean

OFF = dict(temperature=1.0, freeze_norms=False, divide_grads=False)


class MultiOut(nn.Module):
    """(B, L, E) -> (B, 2, 3): exercises tuple targets."""

    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 6)

    def forward(self, x):
        return self.head(self.layer(x).mean(1)).view(-1, 2, 3)


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.proj = nn.Linear(4, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x, y, scale=1.0):
        h = self.layer(x + self.proj(y))
        return self.head(h.mean(1)) * scale


def _per_example(attr, x, target_list):
    return torch.cat([attr.attribute(x[i : i + 1], target=t) for i, t in enumerate(target_list)])


def test_every_target_form_matches_per_example(encoder_classifier):
    torch.manual_seed(0)
    x = torch.randn(4, 6, 16)
    attr = GIMAttribution(encoder_classifier)
    targets = [0, 2, 1, 2]
    ref = _per_example(attr, x, targets)
    torch.testing.assert_close(attr.attribute(x, target=targets), ref)
    torch.testing.assert_close(attr.attribute(x, target=torch.tensor(targets)), ref)
    same = _per_example(attr, x, [1] * 4)
    torch.testing.assert_close(attr.attribute(x, target=1), same)
    torch.testing.assert_close(attr.attribute(x, target=torch.tensor(1)), same)
    torch.testing.assert_close(attr.attribute(x, target=torch.tensor([1])), same)


def test_tuple_targets_on_3d_output():
    torch.manual_seed(1)
    model = MultiOut().eval()
    x = torch.randn(3, 5, 8)
    attr = GIMAttribution(model)
    tl = [(0, 1), (1, 2), (0, 0)]
    ref = torch.cat([attr.attribute(x[i : i + 1], target=t) for i, t in enumerate(tl)])
    torch.testing.assert_close(attr.attribute(x, target=tl), ref)
    one = torch.cat([attr.attribute(x[i : i + 1], target=(1, 1)) for i in range(3)])
    torch.testing.assert_close(attr.attribute(x, target=(1, 1)), one)
    # rules off: Captum's InputXGradient with the same tuple targets
    torch.testing.assert_close(
        GIMAttribution(model, **OFF).attribute(x, target=tl), InputXGradient(model).attribute(x, target=tl)
    )


def test_rules_off_equals_input_x_gradient_and_saliency(encoder_classifier):
    torch.manual_seed(2)
    x = torch.randn(3, 6, 16)
    ixg = InputXGradient(encoder_classifier).attribute(x, target=2)
    torch.testing.assert_close(GIMAttribution(encoder_classifier, **OFF).attribute(x, target=2), ixg, rtol=0, atol=0)
    sal = Saliency(encoder_classifier).attribute(x, target=2, abs=False)
    got = GIMAttribution(encoder_classifier, multiply_by_inputs=False, **OFF).attribute(x, target=2)
    torch.testing.assert_close(got, sal, rtol=0, atol=0)
    assert GIMAttribution(encoder_classifier).multiplies_by_inputs
    assert not GIMAttribution(encoder_classifier, multiply_by_inputs=False).multiplies_by_inputs


def test_tuple_inputs_and_additional_forward_args():
    torch.manual_seed(3)
    model = TwoInputs().eval()
    x, y = torch.randn(2, 5, 8), torch.randn(2, 5, 4)
    attr = GIMAttribution(model)
    out = attr.attribute((x, y), target=1, additional_forward_args=(2.0,))
    assert isinstance(out, tuple) and len(out) == 2
    assert out[0].shape == x.shape and out[1].shape == y.shape
    # scale=2 doubles the gradient of a linear head
    out1 = attr.attribute((x, y), target=1, additional_forward_args=1.0)
    torch.testing.assert_close(out[0], 2 * out1[0])
    off = GIMAttribution(model, **OFF).attribute((x, y), target=1, additional_forward_args=(2.0,))
    ref = InputXGradient(model).attribute((x, y), target=1, additional_forward_args=(2.0,))
    for a, b in zip(off, ref):
        torch.testing.assert_close(a, b)
    # a single tensor in gives a single tensor out
    single = GIMAttribution(lambda t: model(t, y), model).attribute(x, target=1)
    assert isinstance(single, torch.Tensor) and single.shape == x.shape


def test_baselines_all_forms(encoder_classifier):
    torch.manual_seed(4)
    x = torch.randn(3, 6, 16)
    attr = GIMAttribution(encoder_classifier)
    grad = GIMAttribution(encoder_classifier, multiply_by_inputs=False).attribute(x, target=0)
    torch.testing.assert_close(attr.attribute(x, target=0), grad * x)
    torch.testing.assert_close(attr.attribute(x, baselines=0.5, target=0), grad * (x - 0.5))
    b1 = torch.randn(1, 6, 16)
    torch.testing.assert_close(attr.attribute(x, baselines=b1, target=0), grad * (x - b1))
    bn = torch.randn(3, 6, 16)
    torch.testing.assert_close(attr.attribute(x, baselines=bn, target=0), grad * (x - bn))
    torch.testing.assert_close(attr.attribute(x, baselines=(bn,), target=0), grad * (x - bn))
    # the baseline only multiplies: it never changes the gradient
    with pytest.raises(AssertionError):
        attr.attribute(x, baselines=torch.randn(2, 6, 16), target=0)


def test_noise_tunnel_smoothgrad_and_vargrad(encoder_classifier):
    torch.manual_seed(5)
    x = torch.randn(2, 6, 16)
    gim = GIMAttribution(encoder_classifier)
    for nt_type in ("smoothgrad", "smoothgrad_sq", "vargrad"):
        torch.manual_seed(7)
        out = NoiseTunnel(gim).attribute(x, nt_type=nt_type, nt_samples=4, stdevs=0.1, target=1)
        assert out.shape == x.shape and torch.isfinite(out).all()
    # with zero noise, smoothgrad is the mean of identical GIM attributions
    out = NoiseTunnel(gim).attribute(x, nt_type="smoothgrad", nt_samples=3, stdevs=0.0, target=1)
    torch.testing.assert_close(out, gim.attribute(x, target=1), atol=1e-6, rtol=1e-5)
    # rules off: identical to NoiseTunnel(InputXGradient) with the same seed
    torch.manual_seed(13)
    a = NoiseTunnel(GIMAttribution(encoder_classifier, **OFF)).attribute(x, nt_type="vargrad", nt_samples=3, target=1)
    torch.manual_seed(13)
    b = NoiseTunnel(InputXGradient(encoder_classifier)).attribute(x, nt_type="vargrad", nt_samples=3, target=1)
    torch.testing.assert_close(a, b)
    assert_model_clean(encoder_classifier)


def test_captum_metrics_infidelity_and_sensitivity(encoder_classifier):
    """Both metrics take GIM as they take Captum's methods; with fixed perturbations the
    values are checked against the definitions computed by hand."""
    torch.manual_seed(6)
    x = torch.randn(2, 6, 16)
    gim = GIMAttribution(encoder_classifier)
    attr = gim.attribute(x, target=0)
    noise = torch.randn(1, 6, 16) * 0.05

    def perturb(inputs):  # the same perturbation every sample: the mean is one term
        n = noise.expand_as(inputs)
        return n, inputs - n

    inf = infidelity(encoder_classifier, perturb, x, attr, target=0, n_perturb_samples=3)
    with torch.no_grad():
        drop = encoder_classifier(x)[:, 0] - encoder_classifier(x - noise)[:, 0]
    expected = ((noise * attr).sum((1, 2)) - drop) ** 2
    torch.testing.assert_close(inf, expected, atol=1e-7, rtol=1e-4)

    delta = torch.randn(1, 6, 16) * 0.02
    sens = sensitivity_max(gim.attribute, x, perturb_func=lambda inp: inp + delta, target=0, n_perturb_samples=3)
    moved = gim.attribute(x + delta, target=0)
    expected_s = (moved - attr).flatten(1).norm(dim=1) / attr.flatten(1).norm(dim=1)
    torch.testing.assert_close(sens, expected_s, atol=1e-6, rtol=1e-4)
    assert torch.all(sens > 0)


def test_batch_independence(encoder_classifier):
    torch.manual_seed(8)
    x = torch.randn(5, 6, 16)
    attr = GIMAttribution(encoder_classifier)
    full = attr.attribute(x, target=2)
    for i in range(5):
        torch.testing.assert_close(full[i : i + 1], attr.attribute(x[i : i + 1], target=2), atol=1e-6, rtol=1e-5)
    # changing other rows leaves row 0 alone
    x2 = x.clone()
    x2[1:] = torch.randn(4, 6, 16)
    torch.testing.assert_close(attr.attribute(x2, target=2)[0], full[0], atol=1e-6, rtol=1e-5)


def test_inside_no_grad_and_no_grad_written(encoder_classifier):
    torch.manual_seed(9)
    x = torch.randn(2, 6, 16)
    ref = GIMAttribution(encoder_classifier).attribute(x, target=1)
    with torch.no_grad():
        got = GIMAttribution(encoder_classifier).attribute(x, target=1)
    torch.testing.assert_close(got, ref)
    assert all(p.grad is None for p in encoder_classifier.parameters())
    xr = x.clone().requires_grad_(True)
    GIMAttribution(encoder_classifier).attribute(xr, target=1)
    assert xr.grad is None and xr.requires_grad
    assert not x.requires_grad


def test_integrated_gradients_inside_scope_is_ig_gim(encoder_classifier):
    torch.manual_seed(10)
    x = torch.randn(2, 6, 16)
    ig = IntegratedGradients(encoder_classifier)
    plain = ig.attribute(x, target=0, n_steps=8)
    with gim_backward(encoder_classifier, **OFF):
        off = ig.attribute(x, target=0, n_steps=8)
    torch.testing.assert_close(off, plain)
    with gim_backward(encoder_classifier) as report:
        ig_gim = ig.attribute(x, target=0, n_steps=8)
    assert not torch.allclose(ig_gim, plain)
    assert report.by_rule()["torch.nn.MultiheadAttention"] == ["encoder.layers.0.self_attn", "encoder.layers.1.self_attn"]
    # n_steps=1 with a zero baseline at the midpoint is not GIM, but IG-GIM's gradients are:
    # the Riemann sum of GIM gradients along the path, checked with the left rule at 2 points
    ig_left = IntegratedGradients(encoder_classifier, multiply_by_inputs=False)
    with gim_backward(encoder_classifier):
        a = ig_left.attribute(x, target=0, n_steps=2, method="riemann_left")
    g0 = GIMAttribution(encoder_classifier, multiply_by_inputs=False).attribute(0 * x, target=0)
    g1 = GIMAttribution(encoder_classifier, multiply_by_inputs=False).attribute(0.5 * x, target=0)
    torch.testing.assert_close(a, (g0 + g1) / 2, atol=1e-6, rtol=1e-5)


# --- LayerGIM --------------------------------------------------------------------------


class TokenModel(nn.Module):
    def __init__(self, V=20, E=16):
        super().__init__()
        self.emb = nn.Embedding(V, E)
        self.enc = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(E, 2, 32, dropout=0.0, batch_first=True), 2, enable_nested_tensor=False
        )
        self.norm = nn.LayerNorm(E)
        self.head = nn.Linear(E, 3)

    def forward(self, ids):
        return self.head(self.norm(self.enc(self.emb(ids))).mean(1))


def test_layer_gim_rules_off_equals_layer_gradient_x_activation():
    torch.manual_seed(11)
    model = TokenModel().eval()
    ids = torch.randint(0, 20, (3, 7))
    ref = LayerGradientXActivation(model, model.emb).attribute(ids, target=1)
    got = LayerGIM(model, model.emb, **OFF).attribute(ids, target=1)
    torch.testing.assert_close(got, ref)


def test_layer_gim_baselines_in_input_space():
    torch.manual_seed(12)
    model = TokenModel().eval()
    ids = torch.randint(1, 20, (2, 7))
    grad = LayerGIM(model, model.emb, multiply_by_inputs=False).attribute(ids, target=2)
    full = LayerGIM(model, model.emb).attribute(ids, baselines=0, target=2)
    delta = model.emb(ids) - model.emb(torch.zeros_like(ids))
    torch.testing.assert_close(full, grad * delta)
    base_t = torch.zeros(1, 7, dtype=torch.long)
    torch.testing.assert_close(LayerGIM(model, model.emb).attribute(ids, baselines=base_t, target=2), full)
    # no baseline: gradient x activation
    torch.testing.assert_close(LayerGIM(model, model.emb).attribute(ids, target=2), grad * model.emb(ids))
    # the embedding gradient equals GIMAttribution on the embeddings
    g2 = GIMAttribution(lambda e: model.head(model.norm(model.enc(e)).mean(1)), model, multiply_by_inputs=False)
    torch.testing.assert_close(grad, g2.attribute(model.emb(ids).detach(), target=2))


def test_layer_integrated_gradients_inside_scope_uses_gim_gradients():
    """LayerIntegratedGradients ('riemann_right', 2 steps) inside gim_backward is the mean of the
    GIM layer gradients at alpha = 1/2 and 1, times the activation difference."""
    torch.manual_seed(13)
    model = TokenModel().eval()
    ids = torch.randint(1, 20, (2, 6))
    lig = LayerIntegratedGradients(model, model.emb, multiply_by_inputs=False)
    with gim_backward(model):
        a = lig.attribute(ids, baselines=torch.zeros_like(ids), target=0, n_steps=2, method="riemann_right")
    e, e0 = model.emb(ids).detach(), model.emb(torch.zeros_like(ids)).detach()
    body = lambda h: model.head(model.norm(model.enc(h)).mean(1))
    g = GIMAttribution(body, model, multiply_by_inputs=False)
    expect = (g.attribute(e0 + 0.5 * (e - e0), target=0) + g.attribute(e, target=0)) / 2
    torch.testing.assert_close(a, expect, atol=1e-6, rtol=1e-5)
    # and at alpha = 1 the GIM layer gradient is LayerGIM's
    b = LayerGIM(model, model.emb, multiply_by_inputs=False).attribute(ids, target=0)
    torch.testing.assert_close(b, g.attribute(e, target=0), atol=1e-6, rtol=1e-5)


def test_llm_gradient_attribution_accepts_layer_gim():
    from captum.attr import LLMGradientAttribution

    class Tok:
        """Minimal tokenizer with what LLMGradientAttribution's TextTokenInput uses."""

        def encode(self, text, return_tensors=None, add_special_tokens=True):
            ids = [1 + (ord(c) % 18) for c in text.replace(" ", "")]
            return torch.tensor([ids]) if return_tensors == "pt" else ids

        def decode(self, ids):
            ids = ids.reshape(-1).tolist() if isinstance(ids, torch.Tensor) else ids
            ids = ids if isinstance(ids, list) else [ids]
            return "".join(chr(97 + int(i)) for i in ids)

        def convert_ids_to_tokens(self, ids):
            ids = ids.reshape(-1).tolist() if isinstance(ids, torch.Tensor) else ids
            return [chr(97 + int(i)) for i in (ids if isinstance(ids, list) else [ids])]

        def __call__(self, text, return_offsets_mapping=False, add_special_tokens=True, **kw):
            ids = self.encode(text)
            out = {"input_ids": ids}
            if return_offsets_mapping:
                out["offset_mapping"] = [(i, i + 1) for i in range(len(ids))]
            return out

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 16)
            self.layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
            self.out = nn.Linear(16, 20)
            self.device = torch.device("cpu")

        def forward(self, ids, **kw):
            L = ids.shape[1]
            mask = nn.Transformer.generate_square_subsequent_mask(L)
            h = self.layer(self.emb(ids), src_mask=mask, is_causal=True)

            class Out:
                logits = self.out(h)

            return Out()

        def get_input_embeddings(self):
            return self.emb

    torch.manual_seed(14)
    lm = LM().eval()
    layer_gim = LayerGIM(lm, lm.emb)
    llm_attr = LLMGradientAttribution(layer_gim, Tok())
    from captum.attr import TextTokenInput

    inp = TextTokenInput("abcd", Tok())
    res = llm_attr.attribute(inp, target=torch.tensor([3, 5]))
    assert res.token_attr.shape == (2, 4)
    # the first row is LayerGIM on the log-probability of the first target token, by hand
    ids = inp.to_model_input()  # the token ids (to_tensor() is a perturbation indicator)
    logp = lambda t: torch.log_softmax(lm(t).logits[:, -1], -1)[:, 3]  # noqa: E731
    by_hand = LayerGIM(logp, lm.emb, model=lm).attribute(ids).sum(-1)[0]
    torch.testing.assert_close(res.token_attr[0], by_hand, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(res.seq_attr, res.token_attr.sum(0))
    assert_model_clean(lm)
