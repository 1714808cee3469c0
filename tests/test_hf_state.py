"""Scopes on Hugging Face models leave no state behind and touch nothing outside them.

The attention implementation and ``use_cache`` of every config are restored exactly, also
after errors; other instances of the same class (even one sharing the config object) get
plain gradients inside the scope; what is registered with transformers changes no model
by itself; strict mode names what cannot be supported and why.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from test_hf_helpers import SEQ, assert_clean, build_gpt2, build_llama, family

import captum_gim.rules.transformers as hf_rules
import captum_gim.rules.transformers.attention as hf_attention
from captum_gim._context import open_scopes
from captum_gim._patching import installed_count
from captum_gim import (
    LayerGIM,
    Rule,
    UnmatchedModulesError,
    UnmatchedModulesWarning,
    default_registry,
    gim_backward,
)
from captum_gim.registry import Handle

transformers = pytest.importorskip("transformers")


def _ids() -> Tensor:
    return torch.randint(4, 64, (2, SEQ), generator=torch.Generator().manual_seed(4))


def _snapshot(model: nn.Module):
    return [
        (id(c), c.__dict__.get("_attn_implementation_internal"), c.__dict__.get("use_cache", "<none>"))
        for c in hf_rules._model_configs(model)
    ]


def _grad(model: nn.Module, e0: Tensor) -> Tensor:
    e = e0.clone().requires_grad_()
    model(inputs_embeds=e).logits[:, -1, 5].sum().backward()
    return e.grad


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_config_switched_inside_and_restored_exactly(impl: str) -> None:
    model = build_llama(impl)
    before = _snapshot(model)
    with gim_backward(model):
        assert model.config._attn_implementation == "captum_gim_" + impl
        assert model.config.use_cache is False
        out = model(input_ids=_ids())
        assert out.past_key_values is None  # no KV cache inside the scope
    assert _snapshot(model) == before
    assert model.config._attn_implementation == impl and model.config.use_cache is True
    assert_clean(model)
    assert installed_count() == 0 and not open_scopes()


def test_config_restored_after_error_in_forward_and_backward() -> None:
    model = build_llama("sdpa")
    before = _snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        with gim_backward(model):
            model(input_ids=_ids())
            raise RuntimeError("boom")
    assert _snapshot(model) == before
    with pytest.raises(IndexError):
        with gim_backward(model):
            model(input_ids=torch.tensor([[1000]]))  # out of the vocabulary
    assert _snapshot(model) == before
    assert_clean(model)


def test_config_restored_when_a_later_rule_fails_to_install() -> None:
    model = build_llama("sdpa")
    before = _snapshot(model)
    registry = default_registry.copy()
    hf_rules_list = [r for r in registry.rules if r.name.startswith("transformers.")]
    assert hf_rules_list, "the transformers rules are registered once transformers is imported"

    def fail(_m, _c) -> Handle:
        raise ValueError("install failed")

    registry.register(Rule("fails", fail, kind="norm", types=(type(model.model.norm),)))
    with pytest.raises(ValueError, match="install failed"):
        with gim_backward(model, registry=registry):
            pass
    assert _snapshot(model) == before
    assert_clean(model)


@pytest.mark.parametrize("share_config", [False, True])
def test_other_instance_gets_plain_gradients(share_config: bool) -> None:
    model = build_llama("sdpa")
    other = (
        hf_rules_test_twin(model) if share_config else build_llama("sdpa")
    )
    e0 = model.get_input_embeddings()(_ids()).detach()
    plain_other = _grad(other, e0)
    plain_model = _grad(model, e0)
    with gim_backward(model):
        gim_model = _grad(model, e0)
        inside_other = _grad(other, e0)
    assert torch.equal(inside_other, plain_other)
    assert (gim_model - plain_model).abs().max() > 1e-3
    if share_config:
        assert other.config is model.config


def hf_rules_test_twin(model: nn.Module) -> nn.Module:
    """Another instance of the same class built on the very same config object."""
    twin = type(model)(model.config)
    twin.load_state_dict(model.state_dict())
    twin.eval()
    assert twin.config is model.config
    return twin


def test_registered_keys_change_no_model_outside_a_scope() -> None:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa_attention_forward
    assert ALL_MASK_ATTENTION_FUNCTIONS["sdpa"] is sdpa_mask
    assert "captum_gim_sdpa" in ALL_ATTENTION_FUNCTIONS
    model = build_llama("sdpa")
    assert model.config._attn_implementation == "sdpa"
    # a model switched to the GIM key by hand, but in no scope: plain forward and gradient
    ref = build_llama("sdpa")
    e0 = model.get_input_embeddings()(_ids()).detach()
    model.config._attn_implementation_internal = "captum_gim_sdpa"
    try:
        assert torch.equal(_grad(model, e0), _grad(ref, e0))
    finally:
        model.config._attn_implementation_internal = "sdpa"


def test_nested_scopes_innermost_wins_and_unwinds() -> None:
    model = build_llama("sdpa")
    e0 = model.get_input_embeddings()(_ids()).detach()
    with gim_backward(model, temperature=3.0):
        t3 = _grad(model, e0)
    with gim_backward(model, temperature=2.0):
        t2 = _grad(model, e0)
    with gim_backward(model, temperature=2.0):
        with gim_backward(model, temperature=3.0):
            inner = _grad(model, e0)
        after_inner = _grad(model, e0)
    assert not torch.equal(t2, t3)  # the temperatures are told apart
    assert torch.equal(inner, t3) and torch.equal(after_inner, t2)
    assert model.config._attn_implementation == "sdpa"
    assert_clean(model)


def test_output_attentions_under_eager_unchanged() -> None:
    model = build_llama("eager")
    ids = _ids()
    with torch.no_grad():
        plain = model(input_ids=ids, output_attentions=True).attentions
    emb = model.get_input_embeddings()
    with gim_backward(model):
        e = emb(ids).detach().requires_grad_()
        out = model(inputs_embeds=e, output_attentions=True)
        # gradients through the returned attention weights take GIM's softmax path too
        (out.attentions[0][:, :, -1, 0].sum() + out.logits[:, -1, 5].sum()).backward()
    for a, b in zip(plain, out.attentions):
        assert torch.equal(a, b.detach())
    assert torch.isfinite(e.grad).all()


def test_training_mode_dropout_runs() -> None:
    model = build_llama("sdpa", attention_dropout=0.2).train()
    e = model.get_input_embeddings()(_ids()).detach().requires_grad_()
    with gim_backward(model):
        model(inputs_embeds=e).logits[:, -1, 5].sum().backward()
    assert torch.isfinite(e.grad).all()


def test_strict_mode_names_unsupported_attention_implementation() -> None:
    model = build_llama("sdpa")
    model.config._attn_implementation_internal = "flash_attention_2"
    try:
        with pytest.raises(UnmatchedModulesError, match=r"flash_attention_2.*attn_implementation='sdpa'"):
            with gim_backward(model, strict=True):
                pass
        with pytest.warns(UnmatchedModulesWarning, match="not supported by GIM"):
            with gim_backward(model, strict=False):
                assert model.config._attn_implementation == "flash_attention_2"  # left alone
        assert model.config._attn_implementation == "flash_attention_2"
    finally:
        model.config._attn_implementation_internal = "sdpa"


def test_strict_mode_names_attention_without_the_interface() -> None:
    cfg = transformers.BloomConfig(vocab_size=64, hidden_size=32, n_layer=1, n_head=4)
    model = transformers.BloomForCausalLM(cfg).eval()
    with pytest.raises(UnmatchedModulesError, match="without transformers' AttentionInterface"):
        with gim_backward(model, strict=True):
            pass
    assert_clean(model)


def test_support_matrix_and_table() -> None:
    matrix = hf_rules.SUPPORT_MATRIX
    for fam in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "gpt2",
                "bert", "roberta", "vit", "mixtral"):
        assert matrix[fam]["eager"]["float32"] == "supported"
    assert matrix["gemma2"]["sdpa"]["float32"].startswith("unsupported")
    table = hf_rules.support_table()
    assert table.splitlines()[0].startswith("| family | attention |")
    assert "gemma2 | sdpa | unsupported" in table
    assert hf_rules.support_table("rst").startswith("   * - family")


def test_layer_gim_report_and_no_leaks_across_many_calls() -> None:
    f = family("gpt2")
    lg = LayerGIM(f.forward, f.layer, model=f.model, strict=True)
    for _ in range(3):
        lg.attribute(f.inputs, target=f.target, additional_forward_args=f.extra)
    assert "transformers.attention" in lg.last_report.by_rule()
    assert_clean(f.model)
    assert f.model.config._attn_implementation == "sdpa"
    assert installed_count() == 0 and not open_scopes()


def test_gpt2_upcast_and_reordered_eager_path() -> None:
    """GPT-2's eager path behind `reorder_and_upcast_attn` keeps its own forward value."""
    model = build_gpt2("eager", reorder_and_upcast_attn=True)
    ref = build_gpt2("eager")
    ids = _ids()
    with torch.no_grad():
        try:
            plain = model(input_ids=ids).logits
        except RuntimeError as e:  # transformers 4.53: a mask one column too long
            if int(transformers.__version__.split(".")[0]) >= 5:
                raise
            pytest.skip(f"transformers {transformers.__version__}'s own GPT-2 upcast path raises: {e}")
    e0 = model.get_input_embeddings()(ids).detach()
    with gim_backward(model, strict=True):
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids).logits, plain)
        got = _grad(model, e0)
    with gim_backward(ref, strict=True):
        expected = _grad(ref, e0)  # the same math in fp32 without the upcast path
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_attention_the_rule_does_not_model_is_reported(monkeypatch) -> None:
    """If a model's attention computes something else, the first backward warns."""
    model = build_llama("eager")
    real = hf_attention._original_attention

    def doubled_scale(module, impl):
        fn = real(module, impl)
        return lambda m, q, k, v, mask, **kw: fn(m, q, k, v, mask, **{**kw, "scaling": 2 * kw["scaling"]})

    monkeypatch.setattr(hf_attention, "_original_attention", doubled_scale)
    e0 = model.get_input_embeddings()(_ids()).detach()
    with pytest.warns(hf_rules.GIMAttentionMismatchWarning, match="LlamaAttention"):
        with gim_backward(model):
            _grad(model, e0)
