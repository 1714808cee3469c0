"""GIM on PyHealth models: against an independent reference, forward values unchanged,
PyHealth-compatible mode exact, rules matched by class identity, the StageNet note."""

from __future__ import annotations

import copy
import math

import pytest

pytest.importorskip("pyhealth")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from pyhealth.interpret.methods import GIM as PyHealthOwnGIM  # noqa: E402
from pyhealth.models import MLP, StageAttentionNet, StageNet, Transformer  # noqa: E402
from pyhealth.models import transformer as ph_transformer  # noqa: E402

from captum_gim import gim_backward  # noqa: E402
from captum_gim.pyhealth import PyHealthAdapter, PyHealthGIM  # noqa: E402
from captum_gim.scope import UnmatchedModulesError  # noqa: E402

from _pyhealth_synth import (  # noqa: E402, F401  (ehr, ehr_flat, sn, single_thread: fixtures)
    by_hand_grad_x_input,
    ehr,
    ehr_flat,
    first_batch,
    single_thread,
    sn,
    train,
)
from conftest import assert_model_clean, ref_layer_norm, ref_scale, ref_tsg_softmax  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Feature .* does not have mask information")


@pytest.fixture(scope="module")
def transformer(ehr):
    ds, _ = ehr
    torch.manual_seed(0)
    return train(Transformer(ds, embedding_dim=16, heads=2, num_layers=2, dropout=0.1), ds, 8)


@pytest.fixture(scope="module")
def mlp(ehr_flat):
    ds, _ = ehr_flat
    torch.manual_seed(0)
    return train(MLP(ds, embedding_dim=16, hidden_dim=16), ds, 5)


@pytest.fixture(scope="module")
def stagenet(sn):
    ds, _ = sn
    torch.manual_seed(0)
    return train(StageNet(ds, embedding_dim=8, chunk_size=8, levels=2), ds, 3)


@pytest.fixture(scope="module")
def stageattn(sn):
    ds, _ = sn
    torch.manual_seed(0)
    return train(StageAttentionNet(ds, embedding_dim=8, chunk_size=8, levels=2, num_heads=2), ds, 3)


# --- an independent reference: GIM attention and frozen LayerNorm swapped in by hand -----


class RefAttention(nn.Module):
    """PyHealth's scaled-dot-product attention with GIM's backward, from the straight-through
    textbook pieces in conftest (no captum_gim code)."""

    def __init__(self, temperature: float) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, query, key, value, mask=None, dropout=None):
        q, k, v = ref_scale(query, 0.25), ref_scale(key, 0.25), ref_scale(value, 0.5)
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
        if mask is not None:
            scores = scores.masked_fill(mask == 0, -1e9)
        p = ref_tsg_softmax(scores, self.temperature)
        if dropout is not None:
            p = dropout(p)
        return p @ v, p


class RefFrozenLayerNorm(nn.Module):
    def __init__(self, ln: nn.LayerNorm, keep_mean: bool = True) -> None:
        super().__init__()
        self.ln, self.keep_mean = ln, keep_mean

    def forward(self, x):
        return ref_layer_norm(x, self.ln.weight, self.ln.bias, self.ln.eps, True, self.keep_mean)


def hand_swapped(model: nn.Module, temperature: float, keep_mean: bool = True) -> nn.Module:
    """A deep copy of ``model`` with every PyHealth Attention and nn.LayerNorm replaced by
    the reference modules above (by setattr on the parent, as one would by hand)."""
    ref = copy.deepcopy(model)
    for parent in list(ref.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, ph_transformer.Attention):
                setattr(parent, name, RefAttention(temperature))
            elif isinstance(child, nn.LayerNorm):
                setattr(parent, name, RefFrozenLayerNorm(child, keep_mean))
    return ref


@pytest.mark.parametrize("T", [2.0, 3.0])
def test_transformer_gim_equals_the_reference(T, transformer, ehr):
    ds, by_id = ehr
    model = copy.deepcopy(transformer).double()  # float64: compare to 1e-10, not to float noise
    batch = first_batch(ds, 10)
    expected = by_hand_grad_x_input(hand_swapped(model, T), batch, by_id)
    gim = PyHealthGIM(model, temperature=T)
    got = gim.attribute(**batch)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-9, atol=1e-11)
    # and GIM is not the plain gradient here
    plain = by_hand_grad_x_input(model, batch, by_id)
    assert not torch.allclose(got["codes"], plain["codes"], rtol=1e-3, atol=1e-5)
    assert_model_clean(model)


@pytest.mark.parametrize("T", [2.0, 3.0])
def test_stageattentionnet_gim_equals_the_reference(T, stageattn, sn):
    ds, by_id = sn
    batch = first_batch(ds, 8)
    expected = by_hand_grad_x_input(hand_swapped(stageattn, T), batch, by_id)
    got = PyHealthGIM(stageattn, temperature=T).attribute(**batch)
    for key in expected:  # StageNet layers build float32 state, so float32 here
        scale = expected[key].abs().max()
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-5 * float(scale))
    plain = by_hand_grad_x_input(stageattn, batch, by_id)
    assert not torch.allclose(got["codes"], plain["codes"], rtol=1e-3, atol=1e-5)


def test_keep_norm_mean_false_matches_a_mean_detaching_reference(transformer, ehr):
    ds, by_id = ehr
    model = copy.deepcopy(transformer).double()
    batch = first_batch(ds, 6)
    expected = by_hand_grad_x_input(hand_swapped(model, 2.0, keep_mean=False), batch, by_id)
    got = PyHealthGIM(model, keep_norm_mean=False).attribute(**batch)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-9, atol=1e-11)
    # and the mean's gradient does matter here
    kept = PyHealthGIM(model).attribute(**batch)
    assert not torch.allclose(got["codes"], kept["codes"], rtol=1e-3, atol=1e-5)


def test_stagenet_gim_is_the_plain_gradient_and_says_why(stagenet, sn):
    ds, by_id = sn
    batch = first_batch(ds, 8)
    gim = PyHealthGIM(stagenet, temperature=3.0)
    got = gim.attribute(**batch)
    expected = by_hand_grad_x_input(stagenet, batch, by_id)
    for key in expected:  # nothing installed: the same operations, bit for bit
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)
    report = gim.last_report
    assert report.unmatched == []
    assert [r for _, _, r, installed in report.matches if installed] == []
    assert set(report.by_rule()) == {"pyhealth.StageNet (no TSG)"}
    assert any("not attention" in n and "no TSG" in n for n in report.notes)


# --- forward values are the plain model's, bit for bit ------------------------------------


@pytest.mark.parametrize("name", ["transformer", "stageattn"])
def test_forward_values_unchanged_bit_for_bit(name, request, ehr, sn):
    model = request.getfixturevalue(name)
    ds, _ = sn if name == "stageattn" else ehr
    batch = first_batch(ds, 8)
    adapter = PyHealthAdapter(model)
    prepared = adapter.prepare(batch)
    seen = {}

    def record(tag):
        def hook(module, args, output):
            outs = output if isinstance(output, tuple) else (output,)
            seen.setdefault(tag, []).append(tuple(o.detach().clone() for o in outs))

        return hook

    handles = [
        m.register_forward_hook(record(n))
        for n, m in model.named_modules()
        if isinstance(m, (ph_transformer.Attention, nn.LayerNorm))
    ]
    try:
        plain = adapter(*prepared.inputs, *prepared.additional_forward_args)
        for T in (2.0, 3.0):
            with gim_backward(adapter, temperature=T) as report:
                assert report.by_rule(installed_only=True)["pyhealth.Attention"]
                gim_out = adapter(*prepared.inputs, *prepared.additional_forward_args)
            assert torch.equal(gim_out, plain)
    finally:
        for h in handles:
            h.remove()
    assert seen
    for tag, calls in seen.items():
        first = calls[0]
        for later in calls[1:]:
            assert all(torch.equal(a, b) for a, b in zip(first, later)), tag
    assert_model_clean(model)


# --- pyhealth_compatible: PyHealth's own GIM, exactly ----------------------------------------


@pytest.mark.parametrize("name", ["transformer", "stagenet", "stageattn", "mlp"])
@pytest.mark.parametrize("T", [1.0, 2.0, 3.0])
def test_pyhealth_compatible_reproduces_pyhealth_exactly(name, T, request, ehr, sn, ehr_flat):
    model = request.getfixturevalue(name)
    ds, _ = {"transformer": ehr, "stagenet": sn, "stageattn": sn, "mlp": ehr_flat}[name]
    batch = first_batch(ds, 12)
    theirs = PyHealthOwnGIM(model, temperature=T).attribute(**batch)
    ours = PyHealthGIM(model, temperature=T, pyhealth_compatible=True).attribute(**batch)
    assert set(ours) == set(theirs)
    for key in theirs:
        assert ours[key].shape == theirs[key].shape
        assert torch.equal(ours[key], theirs[key]), (key, (ours[key] - theirs[key]).abs().max())


def test_default_differs_from_pyhealth_as_documented(transformer, ehr):
    """Ours is gradient x input; PyHealth's the bare gradient (and a mean-detached LayerNorm)."""
    ds, _ = ehr
    batch = first_batch(ds, 6)
    bare = PyHealthGIM(transformer, multiply_by_inputs=False, keep_norm_mean=False).attribute(**batch)
    theirs = PyHealthOwnGIM(transformer).attribute(**batch)
    torch.testing.assert_close(bare["codes"], theirs["codes"], rtol=1e-4, atol=1e-6)
    ours = PyHealthGIM(transformer).attribute(**batch)
    assert not torch.allclose(ours["codes"], theirs["codes"], rtol=1e-2, atol=1e-4)


# --- rules: by class identity, complete on PyHealth's interpretable models ------------------


@pytest.mark.parametrize("name", ["transformer", "stagenet", "stageattn"])
def test_strict_mode_finds_nothing_unmatched(name, request, ehr, sn):
    model = request.getfixturevalue(name)
    ds, _ = sn if name.startswith("stage") else ehr
    gim = PyHealthGIM(model, strict=True)
    gim.attribute(**first_batch(ds, 4))
    assert gim.last_report.unmatched == []


def test_mlp_has_nothing_to_modify(mlp, ehr_flat):
    ds, _ = ehr_flat
    model = mlp
    gim = PyHealthGIM(model, strict=True)
    gim.attribute(**first_batch(ds, 4))
    assert gim.last_report.matches == [] and gim.last_report.unmatched == []


def test_rules_match_by_identity_not_by_name(transformer, ehr):
    ds, _ = ehr

    class Attention(nn.Module):  # a stranger that merely shares the name (and a softmax)
        def __init__(self):
            super().__init__()
            self.softmax = nn.Softmax(dim=-1)

        def forward(self, q, k, v, mask=None, dropout=None):
            p = self.softmax(q @ k.transpose(-2, -1))
            return p @ v, p

    class MyAttention(ph_transformer.Attention):  # a subclass with its own forward
        def forward(self, query, key, value, mask=None, dropout=None):
            return super().forward(query, key, value, mask, dropout)

    model = copy.deepcopy(transformer)
    blocks = model.transformer["codes"].transformer
    blocks[0].attention.attention = Attention()
    blocks[1].attention.attention = MyAttention()
    gim = PyHealthGIM(model)
    with pytest.warns(UserWarning, match="no GIM rule matches"):
        gim.attribute(**first_batch(ds, 4))
    unmatched = {n for n, _ in gim.last_report.unmatched}
    assert {
        "transformer.codes.transformer.0.attention.attention",
        "transformer.codes.transformer.1.attention.attention",
    } <= unmatched
    assert not any(n.startswith("transformer.labs") for n in unmatched)
    with pytest.raises(UnmatchedModulesError):
        PyHealthGIM(model, strict=True).attribute(**first_batch(ds, 4))
    # the real class, in the labs stream, still matched
    assert "transformer.labs.transformer.0.attention.attention" in gim.last_report.by_rule()["pyhealth.Attention"]


# --- other input layouts: nested visits, StageNet codes without times ----------------------


@pytest.mark.filterwarnings("ignore:Feature .* does not have time intervals")
@pytest.mark.parametrize("model_cls", [Transformer, StageNet, StageAttentionNet])
def test_nested_visits_and_missing_times(model_cls):
    import random

    from pyhealth.datasets import create_sample_dataset

    rng = random.Random(0)
    samples = []
    for i in range(16):
        visits = [rng.sample(["A", "B", "C", "D", "E", "F"], rng.randint(1, 3)) for _ in range(rng.randint(1, 4))]
        samples.append(
            {"patient_id": f"p{i}", "visits": visits, "first": (None, [v[0] for v in visits]), "y": i % 2}
        )
    ds = create_sample_dataset(samples, {"visits": "nested_sequence", "first": "stagenet"}, {"y": "binary"})
    kw = dict(embedding_dim=8) if model_cls is Transformer else dict(embedding_dim=8, chunk_size=4, levels=2)
    if model_cls is StageAttentionNet:
        kw["num_heads"] = 2
    torch.manual_seed(0)
    model = model_cls(ds, **kw).eval()
    batch = first_batch(ds, 6)
    assert batch["first"][0] is None  # no times: an additional forward argument that is None
    gim = PyHealthGIM(model, strict=True)
    got = gim.attribute(**batch)
    assert got["visits"].shape == batch["visits"].shape  # one score per code of each visit
    assert got["first"].shape == batch["first"][1].shape
    alone = gim.attribute(**first_batch(ds, 1))
    for key in got:
        a1 = alone[key][0]
        torch.testing.assert_close(got[key][0][tuple(slice(0, n) for n in a1.shape)], a1, rtol=1e-4, atol=1e-6)
    theirs = PyHealthOwnGIM(model).attribute(**batch)
    ours = PyHealthGIM(model, pyhealth_compatible=True).attribute(**batch)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
