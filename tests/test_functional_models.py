"""Function-level GIM on real model code from other projects, each against a textbook GIM
reference written in explicit operations (q/k/v gradients scaled, detached statistics, the
TSG softmax written out; conftest's pieces, independent of captum_gim.ops): a nanoGPT-style
GPT (with telling and with obscure class names), a hand-written LayerNorm class, timm's
VisionTransformer (fused and explicit attention, and with q/k norms), torchvision's
VisionTransformer. Forward outputs under the mode are bit-identical."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captum_gim.config import GIMConfig
from captum_gim.rules.functional import install_functional
from conftest import ref_attention, ref_layer_norm, ref_mha

DT = torch.float64
TOL = 1e-5


@dataclass
class Scope:
    """Stand-in for captum_gim._context.ActiveScope."""

    config: GIMConfig = field(default_factory=GIMConfig)
    strict: bool = True
    records: List[Tuple[str, str, str, str]] = field(default_factory=list)

    def record(self, path: str, class_name: str, op: str, cover: str) -> None:
        self.records.append((path, class_name, op, cover))


def _cotangent(out: Tensor) -> Tensor:
    return torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(3))


def gim_grad(model: nn.Module, x: Tensor, scope: Optional[Scope]) -> Tuple[Tensor, Tensor]:
    h = install_functional(model, lambda: scope)
    try:
        x = x.detach().clone().requires_grad_(x.is_floating_point())
        out = model(x)
    finally:
        h.remove()
    (g,) = torch.autograd.grad(out, x, _cotangent(out))
    return out, g


def ref_grad(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    x = x.detach().clone().requires_grad_(True)
    out = fn(x)
    (g,) = torch.autograd.grad(out, x, _cotangent(out))
    return g


def rel(a: Tensor, b: Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# --- nanoGPT ------------------------------------------------------------------------------


def make_gpt(ln_name: str, attn_name: str, flash: bool):
    """nanoGPT's model.py (Karpathy), trimmed; classes built fresh under the given names."""

    def ln_init(self, ndim, bias):
        nn.Module.__init__(self)
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def ln_forward(self, input):
        return F.layer_norm(input, self.weight.shape, self.weight, self.bias, 1e-5)

    LayerNormCls = type(ln_name, (nn.Module,), {"__init__": ln_init, "forward": ln_forward})

    def attn_init(self, n_embd, n_head, block_size):
        nn.Module.__init__(self)
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.n_head, self.n_embd, self.flash = n_head, n_embd, flash
        self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size))

    def attn_forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if self.flash:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
            att = F.softmax(att, dim=-1)
            y = att @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)

    Attn = type(attn_name, (nn.Module,), {"__init__": attn_init, "forward": attn_forward})

    class MLP(nn.Module):
        def __init__(self, n_embd):
            super().__init__()
            self.c_fc = nn.Linear(n_embd, 4 * n_embd)
            self.gelu = nn.GELU()
            self.c_proj = nn.Linear(4 * n_embd, n_embd)

        def forward(self, x):
            return self.c_proj(self.gelu(self.c_fc(x)))

    class Block(nn.Module):
        def __init__(self, n_embd, n_head, block_size):
            super().__init__()
            self.ln_1 = LayerNormCls(n_embd, True)
            self.attn = Attn(n_embd, n_head, block_size)
            self.ln_2 = LayerNormCls(n_embd, True)
            self.mlp = MLP(n_embd)

        def forward(self, x):
            x = x + self.attn(self.ln_1(x))
            return x + self.mlp(self.ln_2(x))

    class GPT(nn.Module):
        def __init__(self, vocab=50, block_size=16, n_layer=2, n_head=2, n_embd=16):
            super().__init__()
            self.transformer = nn.ModuleDict(dict(
                wte=nn.Embedding(vocab, n_embd),
                wpe=nn.Embedding(block_size, n_embd),
                h=nn.ModuleList([Block(n_embd, n_head, block_size) for _ in range(n_layer)]),
                ln_f=LayerNormCls(n_embd, True),
            ))
            self.lm_head = nn.Linear(n_embd, vocab, bias=False)
            self.transformer.wte.weight = self.lm_head.weight
            for p in self.parameters():  # non-trivial norm weights
                nn.init.normal_(p, 0.0, 0.3)

        def forward(self, tok_emb):  # attributed at the token embeddings, as LayerGIM does
            t = tok_emb.shape[1]
            pos = torch.arange(0, t, dtype=torch.long)
            x = tok_emb + self.transformer.wpe(pos)
            for block in self.transformer.h:
                x = block(x)
            x = self.transformer.ln_f(x)
            return self.lm_head(x[:, [-1], :])

    torch.manual_seed(0)
    return GPT().to(DT).eval()


def ref_gpt(model, x: Tensor, T: float = 2.0) -> Tensor:
    tr = model.transformer
    L = x.shape[1]
    causal = torch.zeros(L, L, dtype=DT).masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), float("-inf"))
    h = x + tr.wpe(torch.arange(L))
    for blk in tr.h:
        a = blk.attn
        y = ref_layer_norm(h, blk.ln_1.weight, blk.ln_1.bias, 1e-5, True)
        q, k, v = a.c_attn(y).split(a.n_embd, dim=2)
        B, C = y.shape[0], a.n_embd
        q, k, v = (t.view(B, L, a.n_head, C // a.n_head).transpose(1, 2) for t in (q, k, v))
        o = ref_attention(q, k, v, causal, T, True).transpose(1, 2).reshape(B, L, C)
        h = h + a.c_proj(o)
        h = h + blk.mlp(ref_layer_norm(h, blk.ln_2.weight, blk.ln_2.bias, 1e-5, True))
    h = ref_layer_norm(h, tr.ln_f.weight, tr.ln_f.bias, 1e-5, True)
    return model.lm_head(h[:, [-1], :])


def _gpt_input(model) -> Tensor:
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))
    return model.transformer.wte(ids).detach()


@pytest.mark.parametrize("flash", [True, False], ids=["sdpa", "explicit"])
@pytest.mark.parametrize("names", [("LayerNorm", "CausalSelfAttention"), ("Smoother", "Mixer")])
def test_nanogpt_against_reference(names, flash):
    model = make_gpt(*names, flash=flash)
    x = _gpt_input(model)
    scope = Scope()
    out, g = gim_grad(model, x, scope)
    assert torch.equal(out, model(x))
    rg = ref_grad(lambda e: ref_gpt(model, e), x)
    g0 = ref_grad(model, x)
    assert (g - rg).abs().max().item() < TOL
    assert rel(g0, rg) > 1e-2  # plain gradient differs: the check above can fail
    covers = {(p, c, cov) for p, c, _op, cov in scope.records}
    attn_cover = "functional:scaled_dot_product_attention" if flash else "functional:attention-softmax"
    assert ("transformer.h.0.attn", names[1], attn_cover) in covers
    assert ("transformer.ln_f", names[0], "functional:layer_norm") in covers
    assert all(r[3] != "none" for r in scope.records)


def test_nanogpt_names_do_not_matter():
    x = _gpt_input(make_gpt("LayerNorm", "CausalSelfAttention", True))
    _, g1 = gim_grad(make_gpt("LayerNorm", "CausalSelfAttention", True), x, Scope())
    _, g2 = gim_grad(make_gpt("Smoother", "Mixer", True), x, Scope())
    assert torch.equal(g1, g2)


class LN(nn.Module):
    """A user's LayerNorm written out by hand."""

    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d, dtype=DT))
        self.b = nn.Parameter(torch.randn(d, dtype=DT))

    def forward(self, x):
        mean = x.mean(-1, keepdim=True)
        var = ((x - mean) ** 2).mean(-1, keepdim=True)
        return (x - mean) / torch.sqrt(var + 1e-5) * self.w + self.b


def test_hand_written_layer_norm_class_in_a_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), LN(6), nn.GELU(), nn.Linear(6, 3)).to(DT)
    x = torch.randn(4, 6, dtype=DT)
    scope = Scope()
    out, g = gim_grad(model, x, scope)
    assert torch.equal(out, model(x))
    ln = model[1]
    rg = ref_grad(lambda x: model[3](model[2](ref_layer_norm(model[0](x), ln.w, ln.b, 1e-5, True))), x)
    assert (g - rg).abs().max().item() < TOL
    assert scope.records == [("1", "LN", "sqrt(mean of squares or variance)", "functional:hand-written-norm")]


# --- timm ---------------------------------------------------------------------------------


def make_timm_vit(qk_norm: bool = False, fused: bool = True):
    timm_vit = pytest.importorskip("timm.models.vision_transformer")
    torch.manual_seed(0)
    m = timm_vit.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5,
        qk_norm=qk_norm,
    ).to(DT).eval()
    for p in m.parameters():
        nn.init.normal_(p, 0.0, 0.2)
    for blk in m.blocks:
        blk.attn.fused_attn = fused
    return m


def ref_timm_vit(m, x: Tensor, T: float = 2.0) -> Tensor:
    def ln(mod, h):
        return ref_layer_norm(h, mod.weight, mod.bias, mod.eps, True)

    h = m.patch_embed(x)
    h = torch.cat([m.cls_token.expand(h.shape[0], -1, -1), h], dim=1) + m.pos_embed
    for blk in m.blocks:
        a = blk.attn
        y = ln(blk.norm1, h)
        B, N, C = y.shape
        q, k, v = a.qkv(y).reshape(B, N, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if isinstance(a.q_norm, nn.LayerNorm):
            q, k = ln(a.q_norm, q), ln(a.k_norm, k)
        o = ref_attention(q, k, v, None, T, True).transpose(1, 2).reshape(B, N, C)
        h = h + a.proj(o)
        h = h + blk.mlp(ln(blk.norm2, h))
    h = ln(m.norm, h)
    return m.head(h[:, 0])


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "explicit"])
@pytest.mark.parametrize("qk_norm", [False, True], ids=["plain", "qk_norm"])
def test_timm_vision_transformer(qk_norm, fused):
    m = make_timm_vit(qk_norm, fused)
    x = torch.randn(2, 3, 32, 32, dtype=DT, generator=torch.Generator().manual_seed(2))
    scope = Scope()
    out, g = gim_grad(m, x, scope)
    assert torch.equal(out, m(x))
    rg = ref_grad(lambda x: ref_timm_vit(m, x), x)
    g0 = ref_grad(m, x)
    assert (g - rg).abs().max().item() < TOL * max(1.0, rg.abs().max().item())
    assert rel(g0, rg) > 1e-2
    assert all(r[3] != "none" for r in scope.records)
    if qk_norm:
        assert ("blocks.0.attn.q_norm", "LayerNorm", "layer_norm", "functional:layer_norm") in scope.records


# --- torchvision --------------------------------------------------------------------------


def make_tv_vit():
    tvm = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    m = tvm.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
        num_classes=5,
    ).to(DT).eval()
    for p in m.parameters():
        nn.init.normal_(p, 0.0, 0.2)
    return m


def ref_tv_vit(m, x: Tensor, T: float = 2.0) -> Tensor:
    def ln(mod, h):
        return ref_layer_norm(h, mod.weight, mod.bias, mod.eps, True)

    h = m._process_input(x)
    h = torch.cat([m.class_token.expand(h.shape[0], -1, -1), h], dim=1)
    h = h + m.encoder.pos_embedding
    for blk in m.encoder.layers:
        y = ln(blk.ln_1, h)
        h = h + ref_mha(blk.self_attention, y, y, y, None, T, True)
        h = h + blk.mlp(ln(blk.ln_2, h))
    h = ln(m.encoder.ln, h)
    return m.heads(h[:, 0])


def test_torchvision_vision_transformer():
    m = make_tv_vit()
    x = torch.randn(2, 3, 32, 32, dtype=DT, generator=torch.Generator().manual_seed(2))
    scope = Scope()
    out, g = gim_grad(m, x, scope)
    assert torch.equal(out, m(x))
    rg = ref_grad(lambda x: ref_tv_vit(m, x), x)
    g0 = ref_grad(m, x)
    assert (g - rg).abs().max().item() < TOL * max(1.0, rg.abs().max().item())
    assert rel(g0, rg) > 1e-2
    assert ("encoder.layers.encoder_layer_0.self_attention", "MultiheadAttention",
            "multi_head_attention_forward", "functional:multi_head_attention_forward") in scope.records
    assert all(r[3] != "none" for r in scope.records)


# --- Hugging Face, by computation only ----------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_hf_llama_functional_equals_the_hf_rules(impl):
    """With no rule at all, a tiny Llama (GQA, RMSNorm written out, SwiGLU) gets the same
    GIM gradient as the Hugging Face rules give it."""
    transformers = pytest.importorskip("transformers")
    from captum_gim import gim_backward

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        attn_implementation=impl,
    )
    m = transformers.LlamaForCausalLM(cfg).to(DT).eval()
    emb = m.model.embed_tokens(torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))).detach()

    def grad() -> Tensor:
        e = emb.clone().requires_grad_(True)
        return torch.autograd.grad(m(inputs_embeds=e).logits[:, -1, 3].sum(), e)[0]

    with gim_backward(m):
        g_rules = grad()
    scope = Scope()
    h = install_functional(m, lambda: scope)
    g_fun = grad()
    h.remove()
    g0 = grad()
    assert (g_fun - g_rules).abs().max().item() < (1e-12 if impl == "sdpa" else 1e-6)
    assert rel(g0, g_rules) > 1e-2
    covers = {(c, cov) for _p, c, _op, cov in scope.records}
    assert ("LlamaRMSNorm", "functional:hand-written-norm") in covers
    assert ("LlamaMLP", "functional:gated-mlp") in covers


# --- end to end through GIMAttribution ------------------------------------------------------


class LastLogits(nn.Module):
    """(B, L, E) token embeddings -> (B, V) logits at the last position."""

    def __init__(self, gpt: nn.Module) -> None:
        super().__init__()
        self.gpt = gpt

    def forward(self, x: Tensor) -> Tensor:
        return self.gpt(x)[:, -1, :]


@pytest.mark.parametrize("names", [
    pytest.param(("LayerNorm", "CausalSelfAttention"), marks=pytest.mark.xfail(
        strict=False, reason="scope.py's name-based strict pre-check still refuses classes "
        "named like norms/attention before the functional layer can cover them (CORE)")),
    ("Smoother", "Mixer"),
])
def test_gim_attribution_strict_on_nanogpt(names):
    from captum_gim import GIMAttribution

    gpt = make_gpt(*names, flash=True)
    model = LastLogits(gpt)
    x = _gpt_input(gpt)
    attr = GIMAttribution(model, strict=True).attribute(x, target=3)
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(ref_gpt(gpt, xr)[:, -1, 3].sum(), xr)
    assert (attr - g * x).abs().max().item() < TOL


def test_gim_attribution_strict_names_an_uncovered_softmax():
    from captum_gim import GIMAttribution
    from captum_gim.errors import UncoveredOperationError

    class Mixer(nn.Module):  # a name strict mode's name check does not flag
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 12).to(DT)
            self.head = nn.Linear(4, 3).to(DT)

        def forward(self, x):
            q, k, v = self.proj(x).split(4, -1)
            e = torch.exp(q @ k.transpose(-2, -1))
            return self.head(((e / e.sum(-1, keepdim=True)) @ v).mean(1))

    with pytest.raises(UncoveredOperationError, match="exp of attention scores"):
        GIMAttribution(Mixer(), strict=True).attribute(torch.randn(2, 5, 4, dtype=DT), target=0)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("which", ["nanogpt", "timm-qk_norm-explicit", "torchvision"])
def test_gim_attribution_end_to_end(which):
    """Through GIMAttribution (non-strict: scope.py's name pre-check only warns), each model
    gets the textbook GIM attribution: gradient x input."""
    from captum_gim import GIMAttribution

    if which == "nanogpt":
        gpt = make_gpt("LayerNorm", "CausalSelfAttention", True)
        model, x = LastLogits(gpt), _gpt_input(gpt)
        ref = lambda e: ref_gpt(gpt, e)[:, -1, 3]  # noqa: E731
        target = 3
    else:
        model = make_timm_vit(True, False) if which.startswith("timm") else make_tv_vit()
        x = torch.randn(2, 3, 32, 32, dtype=DT, generator=torch.Generator().manual_seed(4))
        fn = ref_timm_vit if which.startswith("timm") else ref_tv_vit
        ref = lambda e: fn(model, e)[:, 1]  # noqa: E731
        target = 1
    attr = GIMAttribution(model).attribute(x, target=target)
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(ref(xr).sum(), xr)
    assert (attr - g * x).abs().max().item() < TOL * max(1.0, (g * x).abs().max().item())
