"""Errors that name the problem (empty batch, non-tensor outputs, bad targets), raised
before anything is left changed: a snapshot of every module's ``__dict__``, its hook
dicts, the global hooks and the HF config is the same before and after the failed call."""

from __future__ import annotations

import re
from typing import Any, Dict

import pytest
import torch
from torch import nn

from captum_gim import GIMAttribution, LayerGIM


def snapshot(model: nn.Module) -> Dict[str, Any]:
    state: Dict[str, Any] = {}
    for name, m in model.named_modules():
        d = {}
        for k, v in m.__dict__.items():
            if isinstance(v, dict):  # _parameters, _buffers, _modules, every hook dict
                d[k] = tuple((kk, id(vv)) for kk, vv in v.items())
            elif isinstance(v, (bool, int, float, str, type(None))):
                d[k] = v
            else:
                d[k] = id(v)
        state[name] = d
    g = torch.nn.modules.module
    state["<global hooks>"] = tuple(
        len(getattr(g, n)) for n in dir(g) if n.startswith("_global_") and n.endswith("hooks")
    )
    cfg = getattr(model, "config", None)
    if cfg is not None:
        state["<config>"] = repr(sorted((k, repr(v)) for k, v in vars(cfg).items()))
    return state


class Clf(nn.Module):
    def __init__(self, kind: str = "tensor") -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.enc = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(16, 3)
        self.kind = kind

    def forward(self, x):
        h = self.enc(self.emb(x) if not x.is_floating_point() else x)
        out = self.head(h.mean(1))
        if self.kind == "tuple":
            return out, h
        if self.kind == "dict":
            return {"logits": out, "hidden": h}
        return out


def _methods(model):
    return [
        (lambda: GIMAttribution(model), torch.randn(2, 5, 16)),
        (lambda: LayerGIM(model, model.emb), torch.randint(0, 20, (2, 5))),
    ]


def _raises(model, exc, match, call):
    before = snapshot(model)
    with pytest.raises(exc, match=match) as info:
        call()
    assert snapshot(model) == before
    return str(info.value)


@pytest.mark.parametrize("which", [0, 1], ids=["GIMAttribution", "LayerGIM"])
def test_empty_batch(which) -> None:
    model = Clf().eval()
    make, x = _methods(model)[which]
    _raises(model, ValueError, "batch is empty", lambda: make().attribute(x[:0], target=0))


@pytest.mark.parametrize("which", [0, 1], ids=["GIMAttribution", "LayerGIM"])
@pytest.mark.parametrize(
    "target, exc, match",
    [
        (torch.tensor([0.0, 1.0]), TypeError, r"dtype torch.float32.*target.long\(\)"),
        (torch.tensor(1.0), TypeError, r"dtype torch.float32"),
        ([torch.tensor(0), torch.tensor(1)], TypeError, r"list of tensors.*torch.stack"),
        (1.0, TypeError, "not an integer index"),
        ([0, 1, 2], ValueError, "one entry per example"),
        (torch.tensor([0, 1, 2]), ValueError, "one per example"),
    ],
    ids=["float-tensor", "float-scalar-tensor", "list-of-tensors", "float", "long-list", "long-tensor"],
)
def test_bad_targets(which, target, exc, match) -> None:
    model = Clf().eval()
    make, x = _methods(model)[which]
    _raises(model, exc, match, lambda: make().attribute(x, target=target))


@pytest.mark.parametrize("kind, pick", [("tuple", "[0]"), ("dict", "['logits']")])
@pytest.mark.parametrize("which", [0, 1], ids=["GIMAttribution", "LayerGIM"])
def test_non_tensor_outputs_show_the_wrapper(kind, pick, which) -> None:
    torch.manual_seed(0)
    model = Clf(kind).eval()
    make, x = _methods(model)[which]
    msg = _raises(model, TypeError, f"returned a {kind}", lambda: make().attribute(x, target=1))
    assert f"lambda *a: model(*a){pick}" in msg
    # the wrapper the message shows works, and gives the plain model's attribution
    expr = re.search(r"e\.g\. (.*)\.$", msg).group(1)
    ns = {"GIMAttribution": GIMAttribution, "LayerGIM": LayerGIM, "model": model, "layer": model.emb}
    fixed = eval(expr, ns)
    plain = Clf().eval()
    plain.load_state_dict(model.state_dict())
    ref = _methods(plain)[which][0]().attribute(x, target=1)
    torch.testing.assert_close(fixed.attribute(x, target=1), ref)


def test_hf_model_output() -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, num_labels=3, max_position_embeddings=16,
    )
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(cfg).eval()
    ids = torch.randint(1, 30, (2, 6))
    msg = _raises(
        model, TypeError, "returned a SequenceClassifierOutput",
        lambda: LayerGIM(model, model.get_input_embeddings()).attribute(ids, target=0),
    )
    assert "lambda *a: model(*a).logits, layer, model=model" in msg
    ns = {"LayerGIM": LayerGIM, "model": model, "layer": model.get_input_embeddings()}
    fixed = eval(re.search(r"e\.g\. (.*)\.$", msg).group(1), ns)
    assert fixed.attribute(ids, target=0).shape == (2, 6, 16)
    emb = model.get_input_embeddings()(ids).detach()
    _raises(
        model, TypeError, "returned a SequenceClassifierOutput",
        lambda: GIMAttribution(lambda e: model(inputs_embeds=e), model=model).attribute(emb, target=0),
    )


# --- PyHealth: codes outside the vocabulary, batches of mismatched size ------------------


@pytest.fixture(scope="module")
def ph():
    pytest.importorskip("pyhealth")
    from _pyhealth_synth import ehr_dataset, first_batch
    from pyhealth.models import Transformer

    ds = ehr_dataset(n=24)
    torch.manual_seed(0)
    model = Transformer(ds, embedding_dim=8, heads=1, num_layers=1)  # left in train mode
    return model, first_batch(ds, 6)


def _ph_cases(batch):
    codes = batch["codes"]
    value = codes[0] if isinstance(codes, (tuple, list)) else codes
    rest = tuple(codes[1:]) if isinstance(codes, (tuple, list)) else ()
    big = value.clone()
    big[1, 0] = 10_000
    neg = value.clone()
    neg[0, 0] = -3
    short = value[:4]

    def put(v):
        return dict(batch, codes=(v, *rest) if rest else v)

    return {
        "out-of-vocabulary": (put(big), "outside the model's vocabulary"),
        "negative-id": (put(neg), "outside the model's vocabulary"),
        "mismatched": (put(short), "different numbers of patients"),
    }


@pytest.mark.parametrize("case", ["out-of-vocabulary", "negative-id", "mismatched"])
def test_pyhealth_batch_errors(ph, case) -> None:
    from captum_gim.pyhealth import PyHealthGIM

    model, batch = ph
    bad, match = _ph_cases(batch)[case]
    gim = PyHealthGIM(model)
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        gim.attribute(**bad)
    assert snapshot(model) == before and model.training  # training flag untouched
    gim.attribute(**batch)  # the good batch works (and leaves the flag as it was)
    assert model.training


def test_pyhealth_config_once(ph) -> None:
    from captum_gim import GIMConfig
    from captum_gim.pyhealth import PyHealthGIM

    model, _ = ph
    g = PyHealthGIM(model, temperature=3.0, keep_norm_mean=False)
    assert g.config == GIMConfig(temperature=3.0, keep_norm_mean=False)
    assert g.gim.config is g.config and g.temperature == 3.0
    compat = PyHealthGIM(model, temperature=0.5, pyhealth_compatible=True)
    assert compat.config == GIMConfig(temperature=1.0, keep_norm_mean=False)
    assert PyHealthGIM(model, config=GIMConfig(temperature=1.5)).gim.temperature == 1.5
