"""One factor per operand: the gradient that reaches q and k through *returned* attention
weights gets the same division (x1/4) as through the attention output.

GIM_SPEC: "the gradient reaching the attention query is multiplied by 1/4, the key by 1/4
and the value by 1/2, whatever path the gradient took". The attributed outputs here use
the attention output *and* the returned weights, for ``nn.MultiheadAttention``
(``need_weights=True``, averaged or per head, with and without masks) and a Hugging Face
eager Llama (``output_attentions=True``). The references are textbook forwards with GIM
written as straight-through expressions on q, k and v (as the paper's hooks do); they do
not use captum_gim.
"""

from __future__ import annotations

import math
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captum_gim import gim_backward

CONFIGS = [(1.0, False, False), (1.0, False, True), (2.0, False, True), (3.0, True, True)]
IDS = ["plain", "divide", "tsg+divide", "gim-T3"]


def tb_scale(x: Tensor, s: float) -> Tensor:
    return x if s == 1.0 else x * s + (x * (1.0 - s)).detach()


def tb_softmax(z: Tensor, T: float) -> Tensor:
    s = torch.softmax(z, dim=-1)
    if T == 1.0:
        return s
    sur = T * torch.softmax(z / T, dim=-1)
    return s.detach() + sur - sur.detach()


def _mha_reference(
    mha: nn.MultiheadAttention, x: Tensor, mask: Optional[Tensor], average: bool, T: float, divide: bool
):
    """Self-attention (batch_first) by hand: returns (output, weights)."""
    B, L, E = x.shape
    H = mha.num_heads
    d = E // H
    W, b = mha.in_proj_weight, mha.in_proj_bias
    q, k, v = (x @ W[i * E : (i + 1) * E].T + b[i * E : (i + 1) * E] for i in range(3))
    if divide:
        q, k, v = tb_scale(q, 0.25), tb_scale(k, 0.25), tb_scale(v, 0.5)
    q, k, v = (t.view(B, L, H, d).transpose(1, 2) for t in (q, k, v))
    s = q @ k.transpose(-1, -2) / math.sqrt(d)
    if mask is not None:
        s = s.masked_fill(mask, float("-inf"))
    p = tb_softmax(s, T)
    o = (p @ v).transpose(1, 2).reshape(B, L, E)
    o = o @ mha.out_proj.weight.T + mha.out_proj.bias
    return o, (p.mean(1) if average else p)


def _objective(out: Tensor, weights: Tensor) -> Tensor:
    # uses both: the output and (non-linearly) the weights
    return out[..., 0].sum() + 3.0 * (weights**2).sum()


@pytest.mark.parametrize("average", [True, False])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("T,freeze,divide", CONFIGS, ids=IDS)
def test_mha_weights_path_against_reference(average, masked, T, freeze, divide) -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    x0 = torch.randn(2, 5, 8)
    mask = torch.triu(torch.ones(5, 5, dtype=torch.bool), 1) if masked else None

    x_ref = x0.clone().requires_grad_()
    _objective(*_mha_reference(mha, x_ref, mask, average, T, divide)).backward()

    x = x0.clone().requires_grad_()
    # the plain forward with autograd on (with it off, nn.MultiheadAttention may take its
    # fused fast path, whose rounding differs)
    plain_out, plain_w = mha(x, x, x, need_weights=True, attn_mask=mask, average_attn_weights=average)
    with gim_backward(mha, temperature=T, freeze_norms=freeze, divide_grads=divide, strict=True):
        out, w = mha(x, x, x, need_weights=True, attn_mask=mask, average_attn_weights=average)
        assert torch.equal(out, plain_out) and torch.equal(w, plain_w)  # forward unchanged
        _objective(out, w).backward()
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-4)


def test_mha_weights_only_path_gets_a_quarter() -> None:
    """An output of the weights alone: q and k x1/4 (not x1/2) with only division on."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    x0 = torch.randn(2, 4, 8)

    def grad(scope: bool) -> Tensor:
        x = x0.clone().requires_grad_()
        if scope:
            with gim_backward(mha, temperature=1.0, freeze_norms=False):
                (mha(x, x, x, need_weights=True)[1] ** 2).sum().backward()
        else:
            (mha(x, x, x, need_weights=True)[1] ** 2).sum().backward()
        return x.grad

    # the weights depend on x only through q and k, each x1/4: the whole gradient is x1/4
    torch.testing.assert_close(grad(True), 0.25 * grad(False), atol=1e-7, rtol=1e-5)


# --- Hugging Face eager attention with output_attentions ---------------------------------


def _llama_reference(model, e: Tensor, T: float, freeze: bool, divide: bool):
    """Llama by hand from its weights: (logits, [per-layer attention probabilities])."""
    from test_hf_helpers import causal_keep, tb_attention_heads, tb_rms, tb_rope

    cfg = model.config
    H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = cfg.hidden_size // H
    B, L, _ = e.shape
    theta = cfg.rope_parameters["rope_theta"] if hasattr(cfg, "rope_parameters") else cfg.rope_theta
    half = 0.5 if divide else 1.0

    def proj(lin: nn.Linear, t: Tensor) -> Tensor:
        return t @ lin.weight.T + (lin.bias if lin.bias is not None else 0.0)

    x, probs = e, []
    pos = torch.arange(L)
    for layer in model.model.layers:
        a = layer.self_attn
        h = tb_rms(x, layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon, freeze)
        q = proj(a.q_proj, h).view(B, L, H, d).transpose(1, 2)
        k = proj(a.k_proj, h).view(B, L, Hkv, d).transpose(1, 2)
        v = proj(a.v_proj, h).view(B, L, Hkv, d).transpose(1, 2)
        q, k = tb_rope(q, theta, pos), tb_rope(k, theta, pos)
        o, p = tb_attention_heads(q, k, v, causal_keep(L), T, divide, d**-0.5)
        probs.append(p)
        x = x + proj(a.o_proj, o.transpose(1, 2).reshape(B, L, H * d))
        n = layer.post_attention_layernorm
        h = tb_rms(x, n.weight, n.variance_epsilon, freeze)
        mlp = layer.mlp
        gate = F.silu(tb_scale(proj(mlp.gate_proj, h), half))
        x = x + proj(mlp.down_proj, gate * tb_scale(proj(mlp.up_proj, h), half))
    n = model.model.norm
    return proj(model.lm_head, tb_rms(x, n.weight, n.variance_epsilon, freeze)), probs


@pytest.mark.parametrize("T,freeze,divide", CONFIGS, ids=IDS)
def test_hf_eager_output_attentions_against_reference(T, freeze, divide) -> None:
    pytest.importorskip("transformers")
    from test_hf_helpers import build_llama

    model = build_llama("eager")
    ids = torch.randint(4, 64, (2, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        e0 = model.get_input_embeddings()(ids)
        ref_logits, ref_probs = _llama_reference(model, e0, 1.0, False, False)
        out = model(inputs_embeds=e0, output_attentions=True)
    torch.testing.assert_close(ref_logits, out.logits, atol=2e-5, rtol=1e-5)  # the model's math
    torch.testing.assert_close(ref_probs[0], out.attentions[0], atol=1e-6, rtol=1e-5)

    def objective(logits: Tensor, attentions) -> Tensor:
        return logits[:, -1, 5].sum() + 5.0 * sum((a[..., :, 1:] ** 2).sum() for a in attentions)

    e_ref = e0.clone().requires_grad_()
    objective(*_llama_reference(model, e_ref, T, freeze, divide)).backward()

    e = e0.clone().requires_grad_()
    with gim_backward(model, temperature=T, freeze_norms=freeze, divide_grads=divide, strict=True):
        res = model(inputs_embeds=e, output_attentions=True)
        objective(res.logits, res.attentions).backward()
    torch.testing.assert_close(e.grad, e_ref.grad, atol=1e-5, rtol=1e-4)
