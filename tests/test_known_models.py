"""The functional layer is skipped only where module rules account for every module, and
skipping it changes no number.

:mod:`captum_gim.rules.known` decides, once per model plan, whether the function-level
interception (a per-call cost of every torch call in the forward pass) has anything to
add. These tests check the decision on the kinds of model it covers and that the
attributions of models it skips equal those computed with the functional layer forced on.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import captum_gim.scope as scope_mod
from captum_gim import GIMAttribution, LayerGIM, RuleRegistry, default_registry, gim_backward


def _uses_functional(model: nn.Module, registry=None) -> bool:
    """Whether a scope on ``model`` hooks its root (the functional layer's entry point)."""
    with gim_backward(model, registry=registry):
        return bool(model._forward_pre_hooks) or bool(model._forward_hooks)


class UserBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(self.lin(x), (8,))  # a norm no module rule sees


def test_torch_nn_models_are_accounted_for() -> None:
    layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
    model = nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False),
                          nn.Flatten(), nn.Linear(24, 3), nn.GELU())
    assert not _uses_functional(model)


@pytest.mark.parametrize(
    "model",
    [
        lambda: nn.Sequential(UserBlock(), nn.Linear(8, 2)),  # a user's class
        lambda: nn.Sequential(nn.Linear(8, 8), nn.Softmax(-1)),  # a softmax module
    ],
    ids=["user-class", "softmax-module"],
)
def test_other_models_keep_the_functional_layer(model) -> None:
    assert _uses_functional(model())


def test_a_registry_without_the_norm_rule_keeps_the_functional_layer() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    assert not _uses_functional(model)
    bare = RuleRegistry()  # no rule at all: the LayerNorm is no longer accounted for
    assert _uses_functional(model, registry=bare)


def _force_functional(monkeypatch) -> None:
    monkeypatch.setattr(scope_mod, "fully_accounted", lambda *a, **k: False)
    scope_mod._PLANS.clear()


def test_skipping_changes_no_number_torch_nn(monkeypatch) -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    model = nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False),
                          nn.Flatten(), nn.Linear(80, 3)).eval()
    x = torch.randn(2, 5, 16)
    fast = GIMAttribution(model).attribute(x, target=1)
    _force_functional(monkeypatch)
    assert _uses_functional(model)
    slow = GIMAttribution(model).attribute(x, target=1)
    scope_mod._PLANS.clear()
    assert torch.equal(fast, slow)


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert", "qwen2_moe", "gemma2"])
def test_skipping_changes_no_number_hf(name: str, monkeypatch) -> None:
    pytest.importorskip("transformers")
    from test_hf_helpers import family

    f = family(name, impl="eager" if name == "gemma2" else "sdpa")
    assert not _uses_functional(f.model)
    fast = LayerGIM(f.forward, f.layer, model=f.model, strict=True).attribute(
        f.inputs, target=f.target, additional_forward_args=f.extra)
    _force_functional(monkeypatch)
    assert _uses_functional(f.model)
    slow = LayerGIM(f.forward, f.layer, model=f.model, strict=True).attribute(
        f.inputs, target=f.target, additional_forward_args=f.extra)
    scope_mod._PLANS.clear()
    torch.testing.assert_close(fast, slow, atol=0, rtol=0)


def test_hf_model_with_a_user_module_keeps_the_functional_layer() -> None:
    pytest.importorskip("transformers")
    from test_hf_helpers import build_llama

    model = build_llama("sdpa")
    assert not _uses_functional(model)
    model.model.layers[0].extra = UserBlock()  # a module of the user's in the tree
    assert _uses_functional(model)  # the plan was re-made: the module tree changed


def test_hf_family_outside_the_matrix_keeps_the_functional_layer() -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BloomConfig(vocab_size=64, hidden_size=32, n_layer=1, n_head=4)
    model = transformers.BloomForCausalLM(cfg).eval()
    with pytest.warns(Warning):
        assert _uses_functional(model)
