"""Function-level GIM (captum_gim.rules.functional), one operation at a time, against the
textbook reference of conftest (straight-through expressions independent of
captum_gim.ops): SDPA in every mask form, layer/RMS norm, multi-head attention, explicit
softmax attention and hand-written norms found by what they compute."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captum_gim._coverage import inside_rule
from captum_gim.config import GIMConfig
from captum_gim.rules.functional import install_functional
from conftest import ref_attention, ref_layer_norm, ref_mha, ref_rms_norm, ref_scale, ref_tsg_softmax

DT = torch.float64


@dataclass
class Scope:
    """Stand-in for captum_gim._context.ActiveScope."""

    config: GIMConfig = field(default_factory=GIMConfig)
    strict: bool = False
    records: List[Tuple[str, str, str, str]] = field(default_factory=list)
    registry: Any = None

    def record(self, path: str, class_name: str, op: str, cover: str) -> None:
        self.records.append((path, class_name, op, cover))


class Call(nn.Module):
    """A root module whose forward is ``fn(*inputs)`` (parameters may be attached)."""

    def __init__(self, fn: Callable[..., Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, *xs: Tensor) -> Tensor:
        return self.fn(*xs)


def grads(model: nn.Module, inputs: Tuple[Tensor, ...], scope: Optional[Scope], seed: int = 0):
    """Forward output and input gradients of ``<output, fixed random cotangent>``."""
    h = install_functional(model, lambda: scope)
    try:
        xs = tuple(x.detach().clone().requires_grad_(True) for x in inputs)
        out = model(*xs)
    finally:
        h.remove()
    g = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(seed))
    return out, torch.autograd.grad(out, xs, g, allow_unused=True)


def ref_grads(fn: Callable[..., Tensor], inputs: Tuple[Tensor, ...], seed: int = 0):
    xs = tuple(x.detach().clone().requires_grad_(True) for x in inputs)
    out = fn(*xs)
    g = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(seed))
    return out, torch.autograd.grad(out, xs, g, allow_unused=True)


def close(a, b, tol=1e-5) -> None:
    for x, y in zip(a, b):
        assert (x - y).abs().max().item() < tol, (x - y).abs().max().item()


def qkv(B=2, H=2, L=5, S=None, d=4, kv_heads=None):
    torch.manual_seed(0)
    S = S or L
    return (
        torch.randn(B, H, L, d, dtype=DT),
        torch.randn(B, kv_heads or H, S, d, dtype=DT),
        torch.randn(B, kv_heads or H, S, d, dtype=DT),
    )


# --- SDPA -------------------------------------------------------------------------------

MASKS = {
    "none": lambda L, S: None,
    "bool-2d": lambda L, S: torch.rand(L, S, generator=torch.Generator().manual_seed(1)) > 0.3,
    "bool-b11s": lambda L, S: torch.tensor([[True] * S, [True] * (S - 2) + [False] * 2])[:, None, None],
    "float-bhls": lambda L, S: torch.randn(2, 2, L, S, dtype=DT),
    "float-1ls": lambda L, S: torch.randn(1, L, S, dtype=DT),
}


def _additive(mask, L, S):
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=DT).masked_fill(~mask, float("-inf"))
    return mask


@pytest.mark.parametrize("mask", sorted(MASKS))
@pytest.mark.parametrize("T", [2.0, 1.0, 3.5])
def test_sdpa_masks_against_reference(mask, T):
    q, k, v = qkv(S=6)
    m = MASKS[mask](5, 6)
    if m is not None and m.dtype == torch.bool and m.dim() == 2:
        m[:, 0] = True  # no fully masked row
    scope = Scope(GIMConfig(temperature=T))
    model = Call(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=m))
    out, g = grads(model, (q, k, v), scope)
    ref_out, rg = ref_grads(lambda q, k, v: ref_attention(q, k, v, _additive(m, 5, 6), T, True), (q, k, v))
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, attn_mask=m))
    close(g, rg)
    assert ("", "Call", "scaled_dot_product_attention", "functional:scaled_dot_product_attention") in scope.records


def test_sdpa_causal_scale_and_gqa():
    q, k, v = qkv(H=4, kv_heads=2)
    causal = torch.zeros(5, 5, dtype=DT).masked_fill(~torch.ones(5, 5, dtype=torch.bool).tril(), float("-inf"))

    def ref(q, k, v):
        k2, v2 = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
        q, k2, v2 = ref_scale(q, 0.25), ref_scale(k2, 0.25), ref_scale(v2, 0.5)
        s = q @ k2.transpose(-2, -1) * 0.3 + causal
        return ref_tsg_softmax(s, 2.0) @ v2

    fn = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3, enable_gqa=True)  # noqa: E731
    out, g = grads(Call(fn), (q, k, v), Scope())
    _, rg = ref_grads(ref, (q, k, v))
    assert torch.equal(out, fn(q, k, v))
    close(g, rg)


def test_sdpa_identity_config_is_plain_gradient():
    q, k, v = qkv()
    cfg = GIMConfig(temperature=1.0, divide_grads=False, freeze_norms=False)
    fn = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    _, g = grads(Call(fn), (q, k, v), Scope(cfg))
    _, g0 = ref_grads(fn, (q, k, v))
    close(g, g0, 1e-12)


def test_no_scope_means_plain_gradient_and_no_records():
    q, k, v = qkv()
    fn = lambda q, k, v: F.scaled_dot_product_attention(q, k, v)  # noqa: E731
    _, g = grads(Call(fn), (q, k, v), None)
    _, g0 = ref_grads(fn, (q, k, v))
    _, gg = grads(Call(fn), (q, k, v), Scope())
    close(g, g0, 1e-12)
    assert (gg[0] - g0[0]).abs().max() > 1e-3  # GIM differs, so the check above can fail


# --- norms ------------------------------------------------------------------------------


@pytest.mark.parametrize("keep_mean", [True, False])
@pytest.mark.parametrize("affine", ["wb", "w", "none"])
def test_layer_norm(keep_mean, affine):
    torch.manual_seed(0)
    x = torch.randn(3, 4, 6, dtype=DT) * 3 + 1
    w = torch.randn(6, dtype=DT) if affine != "none" else None
    b = torch.randn(6, dtype=DT) if affine == "wb" else None
    fn = lambda x: F.layer_norm(x, (6,), w, b, 1e-5)  # noqa: E731
    out, g = grads(Call(fn), (x,), Scope(GIMConfig(keep_norm_mean=keep_mean)))
    _, rg = ref_grads(lambda x: ref_layer_norm(x, w, b, 1e-5, True, keep_mean), (x,))
    assert torch.equal(out, fn(x))
    close(g, rg)


def test_torch_layer_norm_and_rms_norm():
    torch.manual_seed(0)
    x = torch.randn(3, 6, dtype=DT) + 2
    w = torch.randn(6, dtype=DT)
    scope = Scope()
    _, g = grads(Call(lambda x: torch.layer_norm(x, (6,), w, None, 1e-6) + F.rms_norm(x, (6,), w, 1e-6)), (x,), scope)
    _, rg = ref_grads(lambda x: ref_layer_norm(x, w, None, 1e-6, True) + ref_rms_norm(x, w, 1e-6, True), (x,))
    close(g, rg)
    assert {r[3] for r in scope.records} == {"functional:layer_norm", "functional:rms_norm"}


def test_norm_freeze_off_is_plain():
    torch.manual_seed(0)
    x = torch.randn(3, 6, dtype=DT)
    fn = lambda x: F.rms_norm(x, (6,), None, 1e-6) * torch.arange(6.0, dtype=DT)  # noqa: E731
    _, g = grads(Call(fn), (x,), Scope(GIMConfig(freeze_norms=False)))
    _, g0 = ref_grads(fn, (x,))
    close(g, g0, 1e-12)


class LlamaStyleRMSNorm(nn.Module):
    """Hugging Face's RMSNorm, as written in transformers (not torch.nn.RMSNorm)."""

    def __init__(self, d: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d))
        self.variance_epsilon = eps

    def forward(self, hidden_states: Tensor) -> Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


HAND_NORMS = {
    "ln-mean-var": lambda x, w, b: (x - x.mean(-1, keepdim=True)) / torch.sqrt(((x - x.mean(-1, keepdim=True)) ** 2).mean(-1, keepdim=True) + 1e-5) * w + b,
    "ln-var": lambda x, w, b: (x - x.mean(-1, keepdim=True)) / (x.var(-1, keepdim=True, unbiased=False) + 1e-5).sqrt() * w + b,
    "ln-var_mean": lambda x, w, b: (lambda vm: (x - vm[1]) * torch.rsqrt(vm[0] + 1e-5))(torch.var_mean(x, -1, keepdim=True, correction=0)) * w + b,
    "rms-pow": lambda x, w, b: x * (x.pow(2).mean(-1, keepdim=True) + 1e-5).pow(-0.5) * w,
    "rms-square-sum": lambda x, w, b: x / torch.sqrt(x.square().sum(-1, keepdim=True) / x.shape[-1] + 1e-5) * w,
}


@pytest.mark.parametrize("kind", sorted(HAND_NORMS))
@pytest.mark.parametrize("keep_mean", [True, False])
def test_hand_written_norms_are_frozen(kind, keep_mean):
    torch.manual_seed(0)
    x = torch.randn(3, 4, 6, dtype=DT) * 2 + 0.5
    w, b = torch.randn(6, dtype=DT), torch.randn(6, dtype=DT)
    fn = lambda x: HAND_NORMS[kind](x, w, b)  # noqa: E731
    scope = Scope(GIMConfig(keep_norm_mean=keep_mean))
    out, g = grads(Call(fn), (x,), scope)
    if kind.startswith("ln"):
        ref = lambda x: ref_layer_norm(x, w, b, 1e-5, True, keep_mean)  # noqa: E731
    else:
        ref = lambda x: ref_rms_norm(x, w, 1e-5, True)  # noqa: E731
    _, rg = ref_grads(ref, (x,))
    _, g0 = ref_grads(fn, (x,))
    assert torch.equal(out, fn(x))
    close(g, rg)
    assert (g0[0] - rg[0]).abs().max() > 1e-3
    assert [r[3] for r in scope.records] == ["functional:hand-written-norm"]


def test_llama_style_rms_norm_class():
    torch.manual_seed(0)
    norm = LlamaStyleRMSNorm(6)
    x = torch.randn(2, 3, 6, dtype=torch.float32)
    scope = Scope()
    _, g = grads(norm, (x,), scope)
    _, rg = ref_grads(lambda x: ref_rms_norm(x, norm.weight, 1e-6, True), (x,))
    close(g, rg, 1e-5)
    assert scope.records == [("", "LlamaStyleRMSNorm", "rsqrt(mean of squares or variance)", "functional:hand-written-norm")]


def test_l2_normalisation_and_batch_statistics_are_not_norms():
    """x / ||x|| and standardisation over the batch keep their plain gradient."""
    torch.manual_seed(0)
    x = torch.randn(4, 6, dtype=DT)
    fn = lambda x: x / x.pow(2).sum(-1, keepdim=True).sqrt() + (x - x.mean(0)) / x.std(0)  # noqa: E731
    scope = Scope()
    _, g = grads(Call(fn), (x,), scope)
    _, g0 = ref_grads(fn, (x,))
    close(g, g0, 1e-12)
    assert scope.records == []


# --- explicit softmax attention ---------------------------------------------------------

def _explicit(form: str):
    def attn(q, k, v):
        d = q.shape[-1]
        if form == "matmul-F.softmax":
            s = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(d)
            return F.softmax(s, dim=-1) @ v
        if form == "at-Tensor.softmax-dtype":
            s = (q * d ** -0.5) @ k.transpose(-2, -1)
            return s.softmax(-1, dtype=torch.float64) @ v
        if form == "einsum-torch.softmax-masked":
            s = torch.einsum("bhqd,bhkd->bhqk", q, k) * d ** -0.5
            s = s.masked_fill(~torch.ones(5, 5, dtype=torch.bool).tril(), float("-inf"))
            return torch.einsum("bhqk,bhkd->bhqd", torch.softmax(s, dim=-1), v)
        if form == "bmm-baddbmm-softcap-dropout0":
            B, H, L, _ = q.shape
            q3, k3, v3 = (t.reshape(B * H, L, d) for t in (q, k, v))
            bias = torch.zeros(B * H, L, L, dtype=q.dtype)
            s = torch.baddbmm(bias, q3 / math.sqrt(d), k3.transpose(1, 2))
            s = torch.tanh(s / 5.0) * 5.0
            p = F.dropout(F.softmax(s.float(), dim=-1).type_as(q3), p=0.0, training=False)
            return torch.bmm(p, v3).view(B, H, L, d)
        raise AssertionError(form)

    return attn


def _ref_explicit(form: str):
    def attn(q, k, v):
        d = q.shape[-1]
        q, k, v = ref_scale(q, 0.25), ref_scale(k, 0.25), ref_scale(v, 0.5)
        s = q @ k.transpose(-2, -1) / math.sqrt(d)
        if form == "einsum-torch.softmax-masked":
            s = s.masked_fill(~torch.ones(5, 5, dtype=torch.bool).tril(), float("-inf"))
        if form == "bmm-baddbmm-softcap-dropout0":
            s = torch.tanh(s / 5.0) * 5.0
        return ref_tsg_softmax(s, 2.0) @ v

    return attn


FORMS = ["matmul-F.softmax", "at-Tensor.softmax-dtype", "einsum-torch.softmax-masked", "bmm-baddbmm-softcap-dropout0"]


@pytest.mark.parametrize("form", FORMS)
def test_explicit_softmax_attention(form):
    q, k, v = qkv()
    scope = Scope()
    out, g = grads(Call(_explicit(form)), (q, k, v), scope)
    _, rg = ref_grads(_ref_explicit(form), (q, k, v))
    assert torch.equal(out, _explicit(form)(q, k, v))
    close(g, rg)
    assert ("", "Call", "attention softmax", "functional:attention-softmax") in scope.records


def test_attention_weights_returned_keep_qk_quarter():
    """An output that also uses the attention weights: q and k stay x1/4 on every path."""
    q, k, v = qkv()

    def fn(q, k, v):
        p = torch.softmax(q @ k.transpose(-2, -1) / 2.0, -1)
        return (p @ v).sum(-1) + p.sum(-2)

    def ref(q, k, v):
        q, k, v = ref_scale(q, 0.25), ref_scale(k, 0.25), ref_scale(v, 0.5)
        p = ref_tsg_softmax(q @ k.transpose(-2, -1) / 2.0, 2.0)
        return (p @ v).sum(-1) + p.sum(-2)

    _, g = grads(Call(fn), (q, k, v), Scope())
    _, rg = ref_grads(ref, (q, k, v))
    close(g, rg)


def test_router_and_output_softmax_are_not_attention():
    torch.manual_seed(0)
    lin = nn.Linear(6, 4).double()

    class Router(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, x):
            return torch.softmax(self.lin(x), -1) * F.softmax(x @ lin.weight.T, -1)

    x = torch.randn(3, 6, dtype=DT)
    scope = Scope()
    _, g = grads(Router(), (x,), scope)
    _, g0 = ref_grads(Router(), (x,))
    close(g, g0, 1e-12)
    assert {r[3] for r in scope.records} == {"not-attention"}


# --- multi-head attention ---------------------------------------------------------------


class OwnMHA(nn.MultiheadAttention):
    """A subclass with its own forward (not matched by the torch.nn rule)."""

    def forward(self, x, need_weights=False):  # type: ignore[override]
        return super().forward(x, x, x, need_weights=need_weights)[0]


@pytest.mark.parametrize("need_weights", [False, True])
def test_multihead_attention_subclass(need_weights):
    torch.manual_seed(0)
    mha = OwnMHA(8, 2, batch_first=True).double().eval()
    x = torch.randn(2, 5, 8, dtype=DT)
    scope = Scope()
    model = Call(lambda x: mha(x, need_weights))
    model.mha = mha
    out, g = grads(model, (x,), scope)
    assert torch.equal(out, mha(x, need_weights))
    _, rg = ref_grads(lambda x: ref_mha(mha, x, x, x, None, 2.0, True), (x,))
    close(g, rg)
    assert ("mha", "OwnMHA", "multi_head_attention_forward", "functional:multi_head_attention_forward") in scope.records


def test_direct_multi_head_attention_forward_call():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2).double().eval()

    def fn(x):
        return F.multi_head_attention_forward(
            x, x, x, 8, 2, mha.in_proj_weight, mha.in_proj_bias, None, None, False, 0.0,
            mha.out_proj.weight, mha.out_proj.bias, training=False, need_weights=False,
        )[0]

    x = torch.randn(5, 2, 8, dtype=DT)  # (L, B, E)
    out, g = grads(Call(fn), (x,), Scope())
    _, rg = ref_grads(lambda x: ref_mha(mha, x.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1), None, 2.0, True).transpose(0, 1), (x,))
    assert torch.equal(out, fn(x))
    close(g, rg)


# --- module rules take precedence -------------------------------------------------------


def test_ops_inside_a_rule_are_left_to_it():
    torch.manual_seed(0)
    x = torch.randn(3, 6, dtype=DT)

    def fn(x):
        with inside_rule("my-rule"):
            return F.layer_norm(x, (6,)) * torch.arange(6.0, dtype=DT)

    scope = Scope()
    _, g = grads(Call(fn), (x,), scope)
    _, g0 = ref_grads(fn, (x,))
    close(g, g0, 1e-12)
    assert scope.records == [("", "Call", "layer_norm", "rule:my-rule")]


# --- gated MLPs ---------------------------------------------------------------------------


class SwiGLU(nn.Module):
    def __init__(self, fused: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fused = fused
        self.gate_up = nn.Linear(6, 16, bias=False).double()
        self.down = nn.Linear(8, 6, bias=False).double()

    def forward(self, x):
        if self.fused:
            gate, up = self.gate_up(x).chunk(2, dim=-1)
        else:
            w_g, w_u = self.gate_up.weight.chunk(2, dim=0)
            gate, up = x @ w_g.T, F.linear(x, w_u)
        return self.down(F.silu(gate) * up)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("divide", [True, False])
def test_gated_mlp_branches_halved(fused, divide):
    mlp = SwiGLU(fused)
    x = torch.randn(3, 6, dtype=DT, generator=torch.Generator().manual_seed(1))
    scope = Scope(GIMConfig(divide_grads=divide))
    out, g = grads(mlp, (x,), scope)
    s = 0.5 if divide else 1.0

    def ref(x):
        gate, up = F.linear(x, mlp.gate_up.weight).chunk(2, dim=-1)
        return mlp.down(ref_scale(F.silu(gate), s) * ref_scale(up, s))

    _, rg = ref_grads(ref, (x,))
    assert torch.equal(out, mlp(x))
    close(g, rg)
    assert scope.records == [("", "SwiGLU", "gated product", "functional:gated-mlp")]


def test_elementwise_gating_of_a_non_linear_tensor_is_left_alone():
    """x * sigmoid(x) (SiLU written out) and an attention output gate are not gated MLPs."""
    torch.manual_seed(0)
    lin = nn.Linear(6, 6).double()
    x = torch.randn(3, 6, dtype=DT)
    model = Call(lambda x: (x * torch.sigmoid(x)) * torch.sigmoid(lin(x)))
    model.lin = lin
    _, g = grads(model, (x,), Scope())
    _, g0 = ref_grads(model, (x,))
    close(g, g0, 1e-12)


def test_gate_on_another_path_is_not_a_gated_mlp():
    """Qwen2-MoE's shared expert: sigmoid(gate(x)) * expert(x), where expert(x) is a linear
    map of an *intermediate* tensor, not of x: a routing gate (true gradient, as the MoE
    routing weights), not the two branches of a gated MLP."""
    torch.manual_seed(0)
    gate, up, down = (nn.Linear(6, 1).double(), nn.Linear(6, 8).double(), nn.Linear(8, 6).double())
    model = Call(lambda x: torch.sigmoid(gate(x)) * down(F.gelu(up(x))))
    model.gate, model.up, model.down = gate, up, down
    x = torch.randn(3, 6, dtype=DT, generator=torch.Generator().manual_seed(2))
    scope = Scope()
    _, g = grads(model, (x,), scope)
    _, g0 = ref_grads(model, (x,))
    close(g, g0, 1e-12)
    assert not [r for r in scope.records if r[2] == "gated product"]


def test_channels_first_hand_written_layer_norm():
    """ConvNeXt's channels-first LayerNorm: statistics over dim 1 of (N, C, H, W)."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 3, 3, dtype=DT) * 2 + 1
    w, b = torch.randn(4, dtype=DT), torch.randn(4, dtype=DT)

    def fn(x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        return w[:, None, None] * ((x - u) / torch.sqrt(s + 1e-6)) + b[:, None, None]

    def ref(x):
        return ref_layer_norm(x.permute(0, 2, 3, 1), w, b, 1e-6, True).permute(0, 3, 1, 2)

    out, g = grads(Call(fn), (x,), Scope())
    _, rg = ref_grads(ref, (x,))
    assert torch.equal(out, fn(x))
    close(g, rg)


def test_alibi_style_baddbmm_with_keywords():
    """BLOOM's ``alibi.baddbmm(batch1=q, batch2=k, beta=1, alpha=scale)``."""
    q, k, v = (t.reshape(4, 5, 4) for t in qkv())
    alibi = torch.randn(4, 1, 5, dtype=DT)

    def fn(q, k, v):
        s = alibi.baddbmm(batch1=q, batch2=k.transpose(1, 2), beta=1.0, alpha=0.5)
        return torch.bmm(F.softmax(s, dim=-1), v)

    def ref(q, k, v):
        q, k, v = ref_scale(q, 0.25), ref_scale(k, 0.25), ref_scale(v, 0.5)
        return torch.bmm(ref_tsg_softmax(alibi + 0.5 * q @ k.transpose(1, 2), 2.0), v)

    out, g = grads(Call(fn), (q, k, v), Scope())
    _, rg = ref_grads(ref, (q, k, v))
    assert torch.equal(out, fn(q, k, v))
    close(g, rg)
