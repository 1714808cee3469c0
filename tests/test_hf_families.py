"""Every supported Hugging Face family: eager == SDPA, forward unchanged, rules off == Captum.

One tiny randomly initialised model per family (``test_hf_helpers.BUILDERS``): Llama (GQA),
Mistral (sliding window), Qwen2 (q/k/v biases), Qwen3 (q/k head norms), Gemma (1 + weight,
GeGLU, scaled embeddings), Gemma2 (soft-capping, post-norms), Phi3 (fused qkv and
gate_up_proj), GPT-2 (Conv1D, LayerNorm), BERT and RoBERTa (encoders), ViT (images),
Mixtral and Qwen2-MoE (fused experts).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from captum.attr import LayerGradientXActivation

from test_hf_helpers import FAMILIES, TRANSFORMERS_4, assert_clean, family

from captum_gim import LayerGIM, gim_backward
from captum_gim.rules.transformers import SUPPORT_MATRIX

#: what the report of each family must list (beyond the attention rule)
EXPECTED_RULES = {
    "llama": {"transformers.norm", "transformers.gated_mlp"},
    "mistral": {"transformers.norm", "transformers.gated_mlp"},
    "qwen2": {"transformers.norm", "transformers.gated_mlp"},
    "qwen3": {"transformers.norm", "transformers.gated_mlp"},
    "gemma": {"transformers.norm", "transformers.gated_mlp"},
    "gemma2": {"transformers.norm", "transformers.gated_mlp"},
    "phi3": {"transformers.norm", "transformers.gated_mlp"},
    "gpt2": {"torch.nn.LayerNorm"},
    "bert": {"torch.nn.LayerNorm"},
    "roberta": {"torch.nn.LayerNorm"},
    "vit": {"torch.nn.LayerNorm"},
    "mixtral": {"transformers.norm", "transformers.experts"},
    "qwen2_moe": {"transformers.norm", "transformers.experts", "transformers.gated_mlp"},
}
if TRANSFORMERS_4:  # experts are a ModuleList of gated MLPs (w1/w3, gate_proj/up_proj)
    EXPECTED_RULES["mixtral"] = {"transformers.norm", "transformers.gated_mlp"}
    EXPECTED_RULES["qwen2_moe"] = {"transformers.norm", "transformers.gated_mlp"}


def _gim(f, **kw):
    lg = LayerGIM(f.forward, f.layer, model=f.model, strict=True, **kw)
    return lg.attribute(f.inputs, target=f.target, additional_forward_args=f.extra or None)


@pytest.mark.parametrize("name", FAMILIES)
def test_eager_equals_sdpa(name: str) -> None:
    # Gemma2 soft-caps attention logits, which SDPA cannot; compare it without capping
    kw = {"attn_logit_softcapping": None} if name == "gemma2" else {}
    eager = _gim(family(name, "eager", **kw))
    sdpa = _gim(family(name, "sdpa", **kw))
    assert eager.abs().max() > 1e-3
    torch.testing.assert_close(eager, sdpa, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_forward_unchanged_in_scope(name: str, impl: str) -> None:
    if name == "gemma2" and impl == "sdpa":
        pytest.skip(SUPPORT_MATRIX["gemma2"]["sdpa"]["float32"])
    f = family(name, impl)
    emb = f.layer
    with torch.no_grad():
        plain = f.forward(f.inputs, *f.extra)
    # with gradients flowing (the attribution's own forward) and without
    with gim_backward(f.model, strict=True):
        with torch.no_grad():
            no_grad = f.forward(f.inputs, *f.extra)
        h = emb.register_forward_hook(lambda m, i, o: o.requires_grad_() if not o.requires_grad else o)
        try:
            with_grad = f.forward(f.inputs, *f.extra)
        finally:
            h.remove()
    assert torch.equal(plain, no_grad)
    assert torch.equal(plain, with_grad.detach())
    assert_clean(f.model)


@pytest.mark.parametrize("name", FAMILIES)
def test_all_rules_off_equals_captum(name: str) -> None:
    f = family(name, "sdpa" if name != "gemma2" else "eager")
    off = _gim(f, temperature=1.0, freeze_norms=False, divide_grads=False)
    ref = LayerGradientXActivation(f.forward, f.layer).attribute(
        f.inputs, target=f.target, additional_forward_args=f.extra or None
    )
    assert torch.equal(off, ref)
    gim = _gim(f)
    assert (gim - ref).abs().max() > 1e-3  # and GIM itself is not the plain gradient


@pytest.mark.parametrize("name", FAMILIES)
def test_strict_mode_covers_the_family(name: str) -> None:
    f = family(name, "sdpa" if name != "gemma2" else "eager")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no unmatched-module warning, no fallback warning
        with gim_backward(f.model, strict=True) as report:
            f.forward(f.inputs, *f.extra)
    rules = set(report.by_rule(installed_only=True))
    assert "transformers.attention" in rules
    assert EXPECTED_RULES[name] <= rules, rules
    assert not report.unmatched


def test_qwen3_head_norms_are_frozen() -> None:
    f = family("qwen3")
    with gim_backward(f.model) as report:
        pass
    norms = report.by_rule()["transformers.norm"]
    assert "model.layers.0.self_attn.q_norm" in norms
    assert "model.layers.0.self_attn.k_norm" in norms


def test_gemma2_post_norms_are_frozen() -> None:
    f = family("gemma2", "eager")
    with gim_backward(f.model) as report:
        pass
    norms = set(report.by_rule()["transformers.norm"])
    for n in ("post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"):
        assert f"model.layers.1.{n}" in norms


def test_vit_pixel_attribution_runs() -> None:
    from captum_gim import GIMAttribution

    f = family("vit")
    attr = GIMAttribution(f.forward, model=f.model, strict=True).attribute(f.inputs, target=1)
    assert attr.shape == f.inputs.shape and torch.isfinite(attr).all()
