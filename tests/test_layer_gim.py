"""LayerGIM's baselines, reused layers and lists of layers, against references built by
hand with hooks (and the textbook GIM layer of ``conftest``), not with LayerGIM itself."""

from __future__ import annotations

from typing import List, Tuple

import pytest
import torch
from torch import Tensor, nn

from captum.attr import LayerGradientXActivation

try:
    from captum.testing.helpers.basic_models import BasicModelWithReusedModules
except ImportError:  # captum 0.8 ships no captum.testing: the same model as Captum 0.9's

    class BasicModelWithReusedModules(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin1 = nn.Linear(3, 2)
            self.relu = nn.ReLU()
            self.lin2 = nn.Linear(2, 2)

        def forward(self, inputs: Tensor) -> Tensor:
            return self.relu(self.lin2(self.relu(self.lin1(inputs))))


from captum_gim import GIMConfig, LayerGIM

from conftest import assert_model_clean, ref_encoder_layer

OFF = dict(temperature=1.0, freeze_norms=False, divide_grads=False)


class TokenModel(nn.Module):
    def __init__(self, V: int = 20, E: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, E)
        self.enc = nn.TransformerEncoderLayer(E, 2, 32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(E, 3)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(self.enc(self.emb(ids)).mean(1))


class SharedLayer(nn.Module):
    """ALBERT-style: one encoder layer applied twice."""

    def __init__(self, V: int = 20, E: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, E)
        self.layer = nn.TransformerEncoderLayer(E, 4, 32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(E, 3)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(self.layer(self.layer(self.emb(ids))).mean(1))


def _calls(model: nn.Module, layer: nn.Module, x: Tensor, want_input: bool) -> List[Tensor]:
    """The layer's output (or first input) at each of its calls, by hand with hooks."""
    seen: List[Tensor] = []

    def hook(mod, args, out=None):
        seen.append(args[0] if want_input else out)

    h = layer.register_forward_pre_hook(hook) if want_input else layer.register_forward_hook(hook)
    try:
        out = model(x)
    finally:
        h.remove()
    return seen, out


# --- baselines for token inputs -------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [0.5, 1.0, torch.tensor(0.5), torch.full((1, 5), 2.0), (0.5,)],
    ids=["float", "integral-float", "0d-float-tensor", "float-tensor", "tuple-of-float"],
)
def test_float_baselines_for_token_ids_are_refused(bad) -> None:
    torch.manual_seed(0)
    model = TokenModel().eval()
    ids = torch.randint(1, 20, (2, 5))
    with pytest.raises(TypeError, match=r"integer ids .*pad_token_id"):
        LayerGIM(model, model.emb).attribute(ids, baselines=bad, target=0)
    assert_model_clean(model)


def test_integer_baselines_are_token_ids() -> None:
    torch.manual_seed(1)
    model = TokenModel().eval()
    ids = torch.randint(1, 20, (2, 5))
    grad = LayerGIM(model, model.emb, multiply_by_inputs=False).attribute(ids, target=0)
    for b in (3, torch.tensor(3), torch.full((1, 5), 3), torch.full((2, 5), 3, dtype=torch.int32)):
        got = LayerGIM(model, model.emb).attribute(ids, baselines=b, target=0)
        torch.testing.assert_close(got, grad * (model.emb(ids) - model.emb(torch.full_like(ids, 3))))
    # float inputs keep float baselines (a layer inside a float model)
    x = torch.randn(2, 5, 16)
    body = lambda e: model.head(model.enc(e).mean(1))  # noqa: E731
    LayerGIM(body, model.enc, model=model).attribute(x, baselines=0.5, target=0)


# --- a layer called more than once per forward ------------------------------------------


@pytest.mark.parametrize("to_input", [False, True], ids=["layer-output", "layer-input"])
def test_reused_module_pairs_baseline_with_the_last_call(to_input: bool) -> None:
    """Captum's BasicModelWithReusedModules calls ``relu`` twice; the gradient, the
    activation and the baseline activation all come from the second call."""
    torch.manual_seed(2)
    model = BasicModelWithReusedModules().eval()
    x = torch.randn(4, 3)
    b = torch.randn(4, 3)
    target = 1

    acts, out = _calls(model, model.relu, x.requires_grad_(), to_input)
    assert len(acts) == 2
    (g,) = torch.autograd.grad(out[:, target].sum(), acts[1])
    with torch.no_grad():
        base_acts, _ = _calls(model, model.relu, b, to_input)
    expected = g * (acts[1] - base_acts[1])

    got = LayerGIM(model, model.relu).attribute(
        x.detach(), baselines=b, target=target, attribute_to_layer_input=to_input
    )
    torch.testing.assert_close(got, expected.detach())
    # pairing the baseline with the first call (the old behaviour) gives other numbers
    first = g * (acts[1] - base_acts[0])
    assert (first - expected).abs().max() > 1e-2
    # no baseline: Captum's LayerGradientXActivation (no attention, no norm: GIM is plain)
    lgxa = LayerGradientXActivation(model, model.relu).attribute(
        x.detach(), target=target, attribute_to_layer_input=to_input
    )
    torch.testing.assert_close(
        LayerGIM(model, model.relu).attribute(x.detach(), target=target, attribute_to_layer_input=to_input),
        lgxa,
    )
    assert_model_clean(model)


def test_shared_transformer_layer_against_the_textbook() -> None:
    """The second call's input of a shared encoder layer, with token baselines: the GIM
    gradient through the second call is the textbook GIM encoder layer's."""
    torch.manual_seed(3)
    model = SharedLayer().eval()
    ids = torch.randint(1, 20, (2, 6))
    base = torch.zeros_like(ids)
    target = 2
    with torch.no_grad():
        h1 = model.layer(model.emb(ids))
        h1_base = model.layer(model.emb(base))
    h = h1.clone().requires_grad_(True)
    out = model.head(ref_encoder_layer(model.layer, h, None, 2.0, True, True).mean(1))
    (g,) = torch.autograd.grad(out[:, target].sum(), h)
    expected = g * (h1 - h1_base)

    got = LayerGIM(model, model.layer).attribute(
        ids, baselines=0, target=target, attribute_to_layer_input=True
    )
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    # the baseline from the first call (the embedding of token 0) would be far off
    wrong = g * (h1 - model.emb(base).detach())
    assert (wrong - expected).abs().max() > 1e-2
    # and the textbook reference is not the plain gradient
    plain_out = model.head(ref_encoder_layer(model.layer, h, None, 1.0, False, False).mean(1))
    (g_plain,) = torch.autograd.grad(plain_out[:, target].sum(), h)
    assert (g_plain - g).abs().max() > 1e-3
    assert_model_clean(model)


def test_calls_must_match_between_input_and_baseline() -> None:
    class Loop(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x: Tensor) -> Tensor:
            h = self.lin(x)
            if bool((x[:, 0] > 0).all()):
                h = self.lin(h)
            return h

    model = Loop()
    with pytest.raises(RuntimeError, match="equally often"):
        LayerGIM(model, model.lin).attribute(torch.ones(2, 3), baselines=-1.0, target=0)
    assert_model_clean(model)


# --- a list of layers ------------------------------------------------------------------


def test_list_of_layers_returns_a_list() -> None:
    torch.manual_seed(4)
    model = TokenModel().eval()
    ids = torch.randint(1, 20, (3, 5))
    layers = [model.emb, model.enc]
    many = LayerGIM(model, layers).attribute(ids, baselines=0, target=1)
    assert isinstance(many, list) and len(many) == 2
    for layer, got in zip(layers, many):
        torch.testing.assert_close(got, LayerGIM(model, layer).attribute(ids, baselines=0, target=1))
    # GIM off: Captum's LayerGradientXActivation with the same list, exactly
    ref = LayerGradientXActivation(model, layers).attribute(ids, target=1)
    off = LayerGIM(model, layers, **OFF).attribute(ids, target=1)
    assert isinstance(off, list)
    for a, b in zip(off, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # GIM on differs from the plain gradient at the embedding
    assert (many[0] - LayerGIM(model, model.emb, **OFF).attribute(ids, baselines=0, target=1)).abs().max() > 1e-4
    bare = LayerGIM(model, layers, multiply_by_inputs=False).attribute(ids, target=1)
    assert [t.shape for t in bare] == [t.shape for t in many]
    assert_model_clean(model)


def test_layer_argument_is_checked() -> None:
    model = TokenModel()
    with pytest.raises(TypeError, match="list of them"):
        LayerGIM(model, "emb")
    with pytest.raises(TypeError, match="list of them"):
        LayerGIM(model, [])


def test_one_config_object() -> None:
    model = TokenModel().eval()
    cfg = GIMConfig(temperature=3.0, divide_grads=False)
    a = LayerGIM(model, model.emb, config=cfg)
    assert a.config is cfg and a.temperature == 3.0 and a.divide_grads is False
    b = LayerGIM(model, model.emb, temperature=3.0, divide_grads=False)
    assert b.config == cfg
    ids = torch.randint(1, 20, (2, 5))
    torch.testing.assert_close(a.attribute(ids, target=0), b.attribute(ids, target=0))
    with pytest.raises(ValueError, match="not both"):
        LayerGIM(model, model.emb, config=cfg, temperature=1.5)
    b.temperature = 1.5  # the readable attributes replace the config (validated)
    assert b.config == GIMConfig(temperature=1.5, divide_grads=False)
    with pytest.raises(ValueError):
        b.temperature = -1.0
