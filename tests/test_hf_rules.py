"""Each GIM rule alone changes what it should on Hugging Face models, and nothing else.

Gradients are captured at module outputs inside one-layer models, where what lies
downstream of the captured tensor is known exactly, so each rule's effect is an exact
ratio (or no change at all).
"""

from __future__ import annotations

from typing import Dict, List

import pytest
import torch
from torch import Tensor, nn

from test_hf_helpers import (
    SEQ,
    TRANSFORMERS_4,
    build_gpt2,
    build_llama,
    build_mixtral,
    build_phi3,
    build_qwen2_moe,
)

from captum_gim import gim_backward

ONLY_T = dict(temperature=2.0, freeze_norms=False, divide_grads=False)
ONLY_FREEZE = dict(temperature=1.0, freeze_norms=True, divide_grads=False)
ONLY_DIVIDE = dict(temperature=1.0, freeze_norms=False, divide_grads=True)
PLAIN = dict(temperature=1.0, freeze_norms=False, divide_grads=False)


def _ids(seed: int = 2) -> Tensor:
    return torch.randint(4, 64, (2, SEQ), generator=torch.Generator().manual_seed(seed))


def _grads(model: nn.Module, modules: Dict[str, nn.Module], settings: dict, params=()) -> Dict[str, Tensor]:
    """Gradients of a last-position logit at the outputs of ``modules`` (and ``params``)."""
    grads: Dict[str, Tensor] = {}
    handles = []

    def capture(name: str):
        def hook(_m, _i, out):
            t = out[0] if isinstance(out, tuple) else out
            t.register_hook(lambda g: grads.__setitem__(name, g.detach().clone()))

        return hook

    for name, m in modules.items():
        handles.append(m.register_forward_hook(capture(name)))
    model.zero_grad(set_to_none=True)
    try:
        with gim_backward(model, **settings):
            model(input_ids=_ids()).logits[:, -1, 5].sum().backward()
    finally:
        for h in handles:
            h.remove()
    for name, p in params:
        grads[name] = p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
    return grads


def _close(a: Tensor, b: Tensor) -> None:
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_divide_alone_scales_only_the_attention_operands(impl: str) -> None:
    """GPT-2 (no gated MLP): q, k x1/4 and v x1/2 at the projection; nothing else moves."""
    model = build_gpt2(impl, n_layer=1)
    blk = model.transformer.h[0]
    mods = {"qkv": blk.attn.c_attn, "attn_out": blk.attn, "mlp": blk.mlp, "ln1": blk.ln_1}
    plain = _grads(model, mods, PLAIN)
    div = _grads(model, mods, ONLY_DIVIDE)
    E = model.config.n_embd
    for part, (lo, s) in {"q": (0, 0.25), "k": (E, 0.25), "v": (2 * E, 0.5)}.items():
        _close(div["qkv"][..., lo : lo + E], s * plain["qkv"][..., lo : lo + E])
    _close(div["attn_out"], plain["attn_out"])  # downstream of attention: untouched
    _close(div["mlp"], plain["mlp"])
    assert not torch.allclose(div["ln1"], plain["ln1"])  # ...and upstream it shows


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_tsg_alone_changes_only_the_softmax_path(impl: str) -> None:
    model = build_gpt2(impl, n_layer=1)
    blk = model.transformer.h[0]
    mods = {"qkv": blk.attn.c_attn, "attn_out": blk.attn}
    plain = _grads(model, mods, PLAIN)
    tsg = _grads(model, mods, ONLY_T)
    E = model.config.n_embd
    _close(tsg["attn_out"], plain["attn_out"])
    _close(tsg["qkv"][..., 2 * E :], plain["qkv"][..., 2 * E :])  # v: P^T g with the true P
    assert (tsg["qkv"][..., :E] - plain["qkv"][..., :E]).abs().max() > 1e-4  # q changed


def test_divide_alone_halves_both_gated_mlp_branches() -> None:
    model = build_llama("sdpa", num_hidden_layers=1)
    mlp = model.model.layers[0].mlp
    mods = {"gate": mlp.gate_proj, "up": mlp.up_proj, "down": mlp.down_proj}
    plain = _grads(model, mods, PLAIN)
    div = _grads(model, mods, ONLY_DIVIDE)
    _close(div["gate"], 0.5 * plain["gate"])
    _close(div["up"], 0.5 * plain["up"])
    _close(div["down"], plain["down"])


def test_divide_alone_halves_phi3_fused_gate_up() -> None:
    model = build_phi3("sdpa", num_hidden_layers=1)
    mlp = model.model.layers[0].mlp
    mods = {"gate_up": mlp.gate_up_proj, "down": mlp.down_proj}
    plain = _grads(model, mods, PLAIN)
    div = _grads(model, mods, ONLY_DIVIDE)
    _close(div["gate_up"], 0.5 * plain["gate_up"])
    _close(div["down"], plain["down"])


def test_freeze_alone_makes_inverse_rms_a_constant() -> None:
    """At the final RMSNorm: grad_in = w * grad_out / rms exactly, with rms from the input."""
    model = build_llama("sdpa", num_hidden_layers=1)
    norm = model.model.norm
    seen: Dict[str, Tensor] = {}

    def hook(_m, inputs, out):
        x = inputs[0]
        seen["x"] = x.detach()
        x.register_hook(lambda g: seen.__setitem__("gx", g))
        out.register_hook(lambda g: seen.__setitem__("gy", g))

    h = norm.register_forward_hook(hook)
    try:
        with gim_backward(model, **ONLY_FREEZE):
            model(input_ids=_ids()).logits[:, -1, 5].sum().backward()
    finally:
        h.remove()
    x = seen["x"]
    inv_rms = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    _close(seen["gx"], seen["gy"] * norm.weight * inv_rms)


@pytest.mark.parametrize("experts_impl", ["eager", "batched_mm", "grouped_mm"])
def test_moe_experts_halved_router_untouched(experts_impl: str) -> None:
    model = build_mixtral("sdpa", num_hidden_layers=1, experts_implementation=experts_impl)
    if TRANSFORMERS_4:
        if experts_impl != "eager":
            pytest.skip("experts implementations (batched_mm, grouped_mm) are transformers 5's")
        _moe_modulelist_halved_router_untouched(model)
        return
    moe = model.model.layers[0].mlp
    params = [
        ("gate_up", moe.experts.gate_up_proj),
        ("down", moe.experts.down_proj),
        ("router", moe.gate.weight),
    ]
    plain = _grads(model, {}, PLAIN, params)
    div = _grads(model, {}, ONLY_DIVIDE, params)
    tsg = _grads(model, {}, ONLY_T, params)
    _close(div["gate_up"], 0.5 * plain["gate_up"])  # both branches of every expert
    _close(div["down"], plain["down"])
    _close(div["router"], plain["router"])  # routing weights keep their true gradient
    for k in ("gate_up", "down", "router"):  # router softmax: no TSG
        _close(tsg[k], plain[k])


def _moe_modulelist_halved_router_untouched(model: nn.Module) -> None:
    """transformers 4.x: Mixtral's experts are a ModuleList of w1 (gate), w3 (up), w2 (down)."""
    moe = model.model.layers[0].block_sparse_moe
    names = [(i, n) for i in range(len(moe.experts)) for n in ("w1", "w3", "w2")]
    params = [(f"{n}{i}", getattr(moe.experts[i], n).weight) for i, n in names]
    params.append(("router", moe.gate.weight))
    plain = _grads(model, {}, PLAIN, params)
    div = _grads(model, {}, ONLY_DIVIDE, params)
    tsg = _grads(model, {}, ONLY_T, params)
    assert sum(float(plain[f"w1{i}"].abs().sum() > 0) for i in range(len(moe.experts))) >= 2
    for i, n in names:  # both branches of every expert halved, the down projection not
        _close(div[f"{n}{i}"], (1.0 if n == "w2" else 0.5) * plain[f"{n}{i}"])
    _close(div["router"], plain["router"])  # routing weights keep their true gradient
    for k in plain:  # router softmax: no TSG
        _close(tsg[k], plain[k])


def test_moe_experts_implementations_agree() -> None:
    """GIM attributions do not depend on the experts kernel transformers dispatches to."""
    out: List[Tensor] = []
    for impl in ("eager", "batched_mm", "grouped_mm"):
        model = build_qwen2_moe("sdpa", experts_implementation=impl)
        e = model.get_input_embeddings()(_ids()).detach().requires_grad_()
        with gim_backward(model, strict=True):
            model(inputs_embeds=e).logits[:, -1, 5].sum().backward()
        out.append(e.grad)
    _close(out[0], out[1])
    _close(out[0], out[2])


def test_keep_norm_mean_is_irrelevant_for_rms_norms() -> None:
    model = build_llama("sdpa")
    e0 = model.get_input_embeddings()(_ids()).detach()
    res = []
    for keep in (True, False):
        e = e0.clone().requires_grad_()
        with gim_backward(model, keep_norm_mean=keep):
            model(inputs_embeds=e).logits[:, -1, 5].sum().backward()
        res.append(e.grad)
    _close(res[0], res[1])
