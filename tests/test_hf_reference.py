"""GIM on Hugging Face models against textbook forwards written here from the models' math.

Each reference re-implements the model's forward pass by hand from its weights (embedding
output in, logits out), with GIM's three modifications written as plain-autograd
straight-through expressions (``test_hf_helpers.tb_*``). The GIM gradient at the embedding
output must match the reference (atol 1e-5, rtol 1e-4) for every combination of the three
rules; the reference forward must also reproduce the model's logits (so it is the model's
math), and each combination's reference gradient must differ from the plain one (so the
rules are not too weak on these weights to be seen).
"""

from __future__ import annotations

import math
from typing import Callable

import pytest
import torch
from torch import Tensor, nn

from test_hf_helpers import (
    SEQ,
    build_gemma2,
    build_gpt2,
    build_llama,
    causal_keep,
    rope_theta,
    tb_attention,
    tb_layer_norm,
    tb_rms,
    tb_rope,
    tb_scale,
)

from captum_gim import gim_backward

pytestmark = pytest.mark.slow

# (temperature, freeze_norms, divide_grads): plain, each rule alone, all three
CONFIGS = [
    (1.0, False, False),
    (2.0, False, False),
    (1.0, True, False),
    (1.0, False, True),
    (2.0, True, True),
    (3.0, True, True),
]
IDS = pytest.mark.parametrize(
    "T,freeze,divide", CONFIGS, ids=["plain", "tsg", "freeze", "divide", "gim", "gim-T3"]
)


def _proj(lin: nn.Linear, x: Tensor) -> Tensor:
    return x @ lin.weight.T + (lin.bias if lin.bias is not None else 0.0)


def ref_llama(model, e: Tensor, T: float, freeze: bool, divide: bool) -> Tensor:
    cfg = model.config
    H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = cfg.hidden_size // H
    B, L, _ = e.shape
    pos = torch.arange(L)
    theta = rope_theta(cfg)
    half = 0.5 if divide else 1.0
    x = e
    for layer in model.model.layers:
        a = layer.self_attn
        h = tb_rms(x, layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon, freeze)
        q = _proj(a.q_proj, h).view(B, L, H, d).transpose(1, 2)
        k = _proj(a.k_proj, h).view(B, L, Hkv, d).transpose(1, 2)
        v = _proj(a.v_proj, h).view(B, L, Hkv, d).transpose(1, 2)
        q, k = tb_rope(q, theta, pos), tb_rope(k, theta, pos)
        o = tb_attention(q, k, v, causal_keep(L), T, divide, d**-0.5)
        x = x + _proj(a.o_proj, o)
        n = layer.post_attention_layernorm
        h = tb_rms(x, n.weight, n.variance_epsilon, freeze)
        mlp = layer.mlp
        gate = torch.nn.functional.silu(tb_scale(_proj(mlp.gate_proj, h), half))
        x = x + _proj(mlp.down_proj, gate * tb_scale(_proj(mlp.up_proj, h), half))
    n = model.model.norm
    x = tb_rms(x, n.weight, n.variance_epsilon, freeze)
    return _proj(model.lm_head, x)


def _gelu_new(x: Tensor) -> Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def ref_gpt2(model, e: Tensor, T: float, freeze: bool, divide: bool) -> Tensor:
    cfg = model.config
    H = cfg.n_head
    d = cfg.n_embd // H
    B, L, E = e.shape
    tr = model.transformer
    x = e + tr.wpe.weight[:L]

    def conv1d(c, h):  # transformers' Conv1D: x @ W + b with W of shape (in, out)
        return h @ c.weight + c.bias

    for blk in tr.h:
        h = tb_layer_norm(x, blk.ln_1, freeze)
        q, k, v = conv1d(blk.attn.c_attn, h).split(E, dim=-1)
        q, k, v = (t.view(B, L, H, d).transpose(1, 2) for t in (q, k, v))
        o = tb_attention(q, k, v, causal_keep(L), T, divide, d**-0.5)
        x = x + conv1d(blk.attn.c_proj, o)
        h = tb_layer_norm(x, blk.ln_2, freeze)
        x = x + conv1d(blk.mlp.c_proj, _gelu_new(conv1d(blk.mlp.c_fc, h)))
    x = tb_layer_norm(x, tr.ln_f, freeze)
    return x @ model.lm_head.weight.T


def ref_gemma2(model, e: Tensor, T: float, freeze: bool, divide: bool) -> Tensor:
    cfg = model.config
    H, Hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    B, L, _ = e.shape
    pos = torch.arange(L)
    theta = rope_theta(cfg)
    half = 0.5 if divide else 1.0
    eps = cfg.rms_norm_eps

    def norm(m, h):  # Gemma: x / rms * (1 + w)
        return tb_rms(h, m.weight, eps, freeze, one_plus=True)

    x = e  # the scaled embedding's output (embeddings * sqrt(hidden))
    if not hasattr(model.model.embed_tokens, "embed_scale"):
        # transformers < 5.4: a plain embedding; the model scales its output itself
        x = e * torch.tensor(cfg.hidden_size**0.5, dtype=e.dtype)
    for i, layer in enumerate(model.model.layers):
        a = layer.self_attn
        window = cfg.sliding_window if cfg.layer_types[i] == "sliding_attention" else None
        h = norm(layer.input_layernorm, x)
        q = _proj(a.q_proj, h).view(B, L, H, d).transpose(1, 2)
        k = _proj(a.k_proj, h).view(B, L, Hkv, d).transpose(1, 2)
        v = _proj(a.v_proj, h).view(B, L, Hkv, d).transpose(1, 2)
        q, k = tb_rope(q, theta, pos), tb_rope(k, theta, pos)
        o = tb_attention(
            q, k, v, causal_keep(L, window), T, divide, cfg.query_pre_attn_scalar**-0.5,
            softcap=cfg.attn_logit_softcapping,
        )
        x = x + norm(layer.post_attention_layernorm, _proj(a.o_proj, o))
        h = norm(layer.pre_feedforward_layernorm, x)
        mlp = layer.mlp
        act = torch.nn.functional.gelu(tb_scale(_proj(mlp.gate_proj, h), half), approximate="tanh")
        m = _proj(mlp.down_proj, act * tb_scale(_proj(mlp.up_proj, h), half))
        x = x + norm(layer.post_feedforward_layernorm, m)
    x = norm(model.model.norm, x)
    logits = _proj(model.lm_head, x)
    c = cfg.final_logit_softcapping
    return torch.tanh(logits / c) * c


def _check(model, reference: Callable, T: float, freeze: bool, divide: bool, token: int = 5) -> None:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(4, 64, (2, SEQ), generator=g)
    with torch.no_grad():
        e0 = model.get_input_embeddings()(ids)
        expected_logits = model(input_ids=ids).logits
        ref_logits = reference(model, e0, 1.0, False, False)
    torch.testing.assert_close(ref_logits, expected_logits, atol=2e-5, rtol=1e-5)

    def ref_grad(*settings) -> torch.Tensor:
        e = e0.clone().requires_grad_()
        reference(model, e, *settings)[:, -1, token].sum().backward()
        return e.grad

    expected = ref_grad(T, freeze, divide)
    if (T, freeze, divide) != (1.0, False, False):  # the rules visibly change the gradient
        assert (expected - ref_grad(1.0, False, False)).abs().max() > 1e-2

    e_gim = e0.clone().requires_grad_()
    with gim_backward(model, temperature=T, freeze_norms=freeze, divide_grads=divide, strict=True):
        model(inputs_embeds=e_gim).logits[:, -1, token].sum().backward()
    torch.testing.assert_close(e_gim.grad, expected, atol=1e-5, rtol=1e-4)


@IDS
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_llama_matches_textbook(impl: str, T: float, freeze: bool, divide: bool) -> None:
    _check(build_llama(impl), ref_llama, T, freeze, divide)


@IDS
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_gpt2_matches_textbook(impl: str, T: float, freeze: bool, divide: bool) -> None:
    _check(build_gpt2(impl), ref_gpt2, T, freeze, divide)


@IDS
def test_gemma2_matches_textbook(T: float, freeze: bool, divide: bool) -> None:
    # soft-capped attention logits (TSG sees the capped scores), sliding windows, post-norms
    _check(build_gemma2("eager"), ref_gemma2, T, freeze, divide)
