"""PyHealthAdapter / PyHealthGIM on real PyHealth objects (synthetic patients, tiny models).

Rules off equals gradient x input computed by hand; masks; variable sequence lengths;
every Captum gradient method; PyHealth's metrics; the model left as it was; errors.
"""

from __future__ import annotations

import pytest

pytest.importorskip("pyhealth")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from captum.attr import (  # noqa: E402
    GradientShap,
    InputXGradient,
    IntegratedGradients,
    NoiseTunnel,
    Saliency,
)
from pyhealth.datasets import create_sample_dataset, get_dataloader  # noqa: E402
from pyhealth.models import MLP, RNN, StageAttentionNet, StageNet, Transformer  # noqa: E402

from captum_gim import GIMAttribution, gim_backward  # noqa: E402
from captum_gim.pyhealth import PyHealthAdapter, PyHealthGIM  # noqa: E402

from _pyhealth_synth import (  # noqa: E402, F401  (ehr, ehr_flat, sn, single_thread: fixtures)
    by_hand_grad_x_input,
    ehr,
    ehr_dataset,
    ehr_flat,
    first_batch,
    length_mask,
    single_thread,
    sn,
    train,
    true_lengths,
)
from conftest import assert_model_clean  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Feature .* does not have mask information")

RULES_OFF = dict(temperature=1.0, freeze_norms=False, divide_grads=False)


@pytest.fixture(scope="module")
def models(ehr, ehr_flat, sn):
    ds, _ = ehr
    fds, _ = ehr_flat
    sds, _ = sn
    torch.manual_seed(0)
    out = {
        "transformer": train(Transformer(ds, embedding_dim=16, heads=2, num_layers=2, dropout=0.1), ds, 8),
        "mlp": train(MLP(fds, embedding_dim=16, hidden_dim=16), fds, 8),
        "stagenet": train(StageNet(sds, embedding_dim=8, chunk_size=8, levels=2), sds, 3),
        "stageattn": train(
            StageAttentionNet(sds, embedding_dim=8, chunk_size=8, levels=2, num_heads=2), sds, 3
        ),
    }
    return out


@pytest.fixture(scope="module")
def data(ehr, ehr_flat, sn):
    return {"transformer": ehr, "mlp": ehr_flat, "stagenet": sn, "stageattn": sn}


ALL = ["transformer", "mlp", "stagenet", "stageattn"]


# --- rules off: plain gradient x input, computed by hand -------------------------------


@pytest.mark.parametrize("name", ALL)
def test_rules_off_equals_grad_x_input_by_hand(name, models, data):
    model = models[name]
    ds, by_id = data[name]
    batch = first_batch(ds, 10)
    expected = by_hand_grad_x_input(model, batch, by_id)
    got = PyHealthGIM(model, **RULES_OFF).attribute(**batch)
    assert set(got) == {"codes", "labs"}
    for key in expected:  # the same operations in the same order: bit for bit
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)
    # the same through Captum's own InputXGradient on the adapter
    adapter = PyHealthAdapter(model)
    ixg = adapter.attribute(InputXGradient(adapter), batch)
    for key in expected:
        torch.testing.assert_close(ixg[key], expected[key], rtol=0, atol=0)


@pytest.mark.parametrize("name", ["transformer", "stagenet"])
def test_adapter_logits_match_the_model_for_unpadded_patients(name, models, data):
    model = models[name]
    ds, _ = data[name]
    adapter = PyHealthAdapter(model)
    for i, alone in enumerate(get_dataloader(ds, 1)):  # one patient: no padding
        if i == 4:
            break
        prepared = adapter.prepare(alone)
        with torch.no_grad():
            ref = model(**alone)["logit"]
        torch.testing.assert_close(prepared.logits, ref, rtol=1e-6, atol=1e-7)


# --- masks --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_masks_follow_the_true_lengths(name, models, data):
    model = models[name]
    ds, by_id = data[name]
    batch = first_batch(ds, 16)
    prepared = PyHealthAdapter(model).prepare(batch)
    codes = batch["codes"][1] if isinstance(batch["codes"], tuple) else batch["codes"]
    labs = batch["labs"][1] if isinstance(batch["labs"], tuple) else batch["labs"]
    lens_c = true_lengths(batch, by_id, "codes")
    assert torch.equal(prepared.masks["codes"].bool(), length_mask(lens_c, codes.shape[1]))
    if labs.dim() == 2:  # one row of values per patient: no time axis, nothing masked
        assert prepared.masks["labs"].shape == (16, 1) and bool(prepared.masks["labs"].all())
        assert bool((labs == 0).any())
        return
    lens_l = true_lengths(batch, by_id, "labs")
    assert torch.equal(prepared.masks["labs"].bool(), length_mask(lens_l, labs.shape[1]))
    # the synthetic labs do contain genuine zeros, inside real time steps
    assert bool(((labs == 0) & length_mask(lens_l, labs.shape[1]).unsqueeze(-1)).any())


def _zero_row_patient(ds):
    """One patient whose middle lab time step reads 0.0 for every lab."""
    from datetime import datetime, timedelta

    t0 = datetime(2024, 1, 1)
    sample = {
        "patient_id": "zero-row",
        "visit_id": "v0",
        "codes": ["PLANT", "C01", "C02"],
        "labs": ([t0 + timedelta(hours=h) for h in range(3)], [[0.5, -1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 2.0]]),
        "label": 1,
    }
    one = create_sample_dataset(
        [sample],
        {"codes": "sequence", "labs": "timeseries"},
        {"label": "binary"},
        input_processors=ds.input_processors,
        output_processors=ds.output_processors,
    )
    return first_batch(one, 1)


def test_genuine_zero_time_step_is_not_masked(models, ehr):
    model = models["transformer"]
    ds, _ = ehr
    batch = _zero_row_patient(ds)
    prepared = PyHealthAdapter(model).prepare(batch)
    assert prepared.masks["labs"].tolist() == [[True, True, True]]
    with torch.no_grad():
        ref = model(**batch)["logit"]
    torch.testing.assert_close(prepared.logits, ref, rtol=1e-6, atol=1e-7)
    # the all-zero visit is attended: its labs get a (bare) gradient ...
    ours = PyHealthGIM(model, multiply_by_inputs=False).attribute(**batch)["labs"]
    assert ours[0, 1].abs().sum() > 0
    # ... whereas PyHealth's interpreters treat it as padding and give it none
    theirs = PyHealthGIM(model, pyhealth_compatible=True).attribute(**batch)["labs"]
    assert theirs[0, 1].abs().sum() == 0


def test_user_masks_override(models, ehr):
    model = models["transformer"]
    ds, _ = ehr
    batch = first_batch(ds, 4)
    adapter = PyHealthAdapter(model)
    assert not bool(adapter.prepare(batch).masks["labs"].all())  # the derived mask pads
    full = torch.ones(batch["labs"].shape[:2], dtype=torch.bool)
    prepared = adapter.prepare(batch, masks={"labs": full})
    assert torch.equal(prepared.masks["labs"], full)
    # and it is the mask the model gets
    passed = prepared.additional_forward_args[adapter.additional_arg_names.index(("labs", "mask"))]
    assert torch.equal(passed, full)


# --- batching ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_each_patient_gets_the_same_attributions_as_alone(name, models, data):
    model = models[name]
    ds, by_id = data[name]
    batch = first_batch(ds, 8)
    lens_c = true_lengths(batch, by_id, "codes")
    flat = batch["labs"].dim() == 2 if isinstance(batch["labs"], torch.Tensor) else False
    lens_l = torch.full_like(lens_c, 3) if flat else true_lengths(batch, by_id, "labs")
    assert len(set(lens_c.tolist())) > 1 and (flat or len(set(lens_l.tolist())) > 1)  # padded
    gim = PyHealthGIM(model)
    together = gim.attribute(**batch)
    for i, single in enumerate(get_dataloader(ds, 1)):
        if i == 8:
            break
        alone = gim.attribute(**single)
        lc, ll = int(lens_c[i]), int(lens_l[i])
        torch.testing.assert_close(together["codes"][i, :lc], alone["codes"][0, :lc], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(together["labs"][i, :ll], alone["labs"][0, :ll], rtol=1e-4, atol=1e-6)
        assert together["codes"][i, lc:].abs().sum() == 0  # padding gets nothing
        assert together["labs"][i, ll:].abs().sum() == 0


# --- any Captum gradient method, with or without GIM ------------------------------------


@pytest.mark.parametrize("with_gim", [False, True], ids=["plain", "gim"])
@pytest.mark.parametrize("name", ["transformer", "stageattn"])
def test_captum_methods_run_through_the_adapter(name, with_gim, models, data):
    model = models[name]
    ds, _ = data[name]
    batch = first_batch(ds, 6)
    adapter = PyHealthAdapter(model)
    codes = batch["codes"][1] if isinstance(batch["codes"], tuple) else batch["codes"]
    labs = batch["labs"][1] if isinstance(batch["labs"], tuple) else batch["labs"]
    methods = {
        "ig": (IntegratedGradients(adapter), dict(n_steps=8)),
        "saliency": (Saliency(adapter), dict(abs=False)),
        "ixg": (InputXGradient(adapter), {}),
        "nt": (NoiseTunnel(IntegratedGradients(adapter)), dict(nt_samples=2, nt_type="smoothgrad", stdevs=0.01, n_steps=4)),
        "gshap": (GradientShap(adapter), dict(n_samples=3, stdevs=0.01)),
        "gim": (GIMAttribution(adapter), {}),
    }
    for label, (method, kw) in methods.items():
        torch.manual_seed(0)
        if with_gim:
            with gim_backward(adapter) as report:
                out = adapter.attribute(method, batch, **kw)
            assert report.by_rule(installed_only=True).get("pyhealth.Attention")
        else:
            out = adapter.attribute(method, batch, **kw)
        assert out["codes"].shape == codes.shape, label
        assert out["labs"].shape == labs.shape, label
        assert all(torch.isfinite(v).all() for v in out.values()), label
        assert all(v.abs().sum() > 0 for v in out.values()), label
    assert_model_clean(model)


def test_integrated_gradients_completeness(models, ehr_flat):
    """IG's attributions sum to logit(x) - logit(baseline): additional forward arguments
    (the masks MLP's mean pooling divides by) are expanded correctly along Captum's
    internal batch. (MLP: on a pre-norm Transformer a zero baseline puts LayerNorm at
    var = 0, where the path is too steep for a Riemann sum.)"""
    model = models["mlp"]
    ds, _ = ehr_flat
    batch = first_batch(ds, 6)
    adapter = PyHealthAdapter(model)
    with adapter.eval_mode():
        prepared = adapter.prepare(batch)
        attr, delta = IntegratedGradients(adapter).attribute(
            prepared.inputs, n_steps=64, return_convergence_delta=True, **prepared.captum_kwargs()
        )
    total = sum(a.reshape(a.shape[0], -1).sum(1) for a in attr)
    with torch.no_grad():
        base = adapter(*prepared.baselines, *prepared.additional_forward_args)[:, 0]
    assert (prepared.logits[:, 0] - base).abs().min() > 1.0  # far above the tolerances
    torch.testing.assert_close(total, prepared.logits[:, 0] - base, rtol=1e-2, atol=2e-2)
    assert delta.abs().max() < 2e-2  # ReLU kinks: measured 7e-3 with 64 steps


# --- targets ----------------------------------------------------------------------------


def test_targets_resolved_as_pyhealth_does():
    ds = ehr_dataset(n=60, label="multiclass")
    torch.manual_seed(0)
    model = Transformer(ds, embedding_dim=8, heads=1, num_layers=1).eval()
    batch = first_batch(ds, 6)
    adapter = PyHealthAdapter(model)
    p_none = adapter.prepare(batch)
    assert torch.equal(p_none.target, p_none.logits.argmax(-1))
    assert adapter.prepare(batch, target_class_idx=2).target.tolist() == [2] * 6
    assert adapter.prepare(batch, target_class_idx=[0, 1, 2, 0, 1, 2]).target.tolist() == [0, 1, 2, 0, 1, 2]
    with pytest.raises(ValueError, match="out of range"):
        adapter.prepare(batch, target_class_idx=3)
    # the same as PyHealth's own interpreter: pyhealth_compatible equals PyHealth's GIM
    from pyhealth.interpret.methods import GIM

    for t in (None, 1):
        ref = GIM(model).attribute(target_class_idx=t, **batch)
        got = PyHealthGIM(model, pyhealth_compatible=True).attribute(target_class_idx=t, **batch)
        for key in ref:
            assert torch.equal(got[key], ref[key])


def test_binary_target_is_output_zero(models, ehr_flat):
    ds, _ = ehr_flat
    batch = first_batch(ds, 4)
    adapter = PyHealthAdapter(models["mlp"])
    assert adapter.prepare(batch, target_class_idx=5).target.tolist() == [0, 0, 0, 0]


def test_baselines(models, ehr):
    model = models["transformer"]
    ds, _ = ehr
    batch = first_batch(ds, 4)
    gim = PyHealthGIM(model)
    zero = gim.attribute(**batch)
    same = gim.attribute(baselines={"labs": 0.0}, **batch)
    torch.testing.assert_close(zero["labs"], same["labs"])
    unk = gim.attribute(baselines={"codes": 1}, **batch)  # <unk> tokens, padding stays padding
    assert not torch.allclose(unk["codes"], zero["codes"])
    assert unk["codes"][batch["codes"] == 0].abs().sum() == 0
    with pytest.raises(KeyError, match="unknown feature"):
        gim.attribute(baselines={"nope": 0.0}, **batch)
    with pytest.raises(TypeError, match="token ids"):
        gim.attribute(baselines={"codes": 0.5}, **batch)


# --- PyHealth's metrics -----------------------------------------------------------------


@pytest.mark.parametrize("name", ["transformer", "stagenet"])
def test_pyhealth_metrics_accept_the_output(name, models, data):
    from pyhealth.metrics.interpretability import (
        ComprehensivenessMetric,
        Evaluator,
        SufficiencyMetric,
    )
    from pyhealth.metrics.interpretability.utils import threshold_sample_filter

    model = models[name]
    ds, _ = data[name]
    batch = first_batch(ds, 8)
    attributions = PyHealthGIM(model).attribute(**batch)
    for cls in (ComprehensivenessMetric, SufficiencyMetric):
        metric = cls(model, percentages=[10, 50], sample_filter=threshold_sample_filter(0.0))
        scores, valid = metric.compute(batch, attributions)
        assert scores.shape == (8,) and bool(torch.isfinite(scores).all())
        assert bool(valid.any())
    evaluator = Evaluator(model, percentages=[20])
    loader = get_dataloader(ds, 16)
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # the Evaluator prints progress
        results = evaluator.evaluate_attribution(
            [b for b, _ in zip(loader, range(2))], PyHealthGIM(model)
        )
    assert set(results) == {"comprehensiveness", "sufficiency"}


# --- the model is left as it was ------------------------------------------------------------


def _snapshot(model: nn.Module):
    return {
        "modules": [(n, type(m), id(m)) for n, m in model.named_modules()],
        "training": [m.training for m in model.modules()],
        "forward_in_dict": [n for n, m in model.named_modules() if "forward" in m.__dict__],
        "hooks": [
            (n, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for n, m in model.named_modules()
        ],
        "params": {n: (p.detach().clone(), p.requires_grad, None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()},
    }


def _assert_same(before, after):
    assert before["modules"] == after["modules"]
    assert before["training"] == after["training"]
    assert before["forward_in_dict"] == after["forward_in_dict"] == []
    assert before["hooks"] == after["hooks"]
    for n, (v, rg, g) in before["params"].items():
        v2, rg2, g2 = after["params"][n]
        assert torch.equal(v, v2) and rg == rg2, n
        assert (g is None and g2 is None) or torch.equal(g, g2), n


@pytest.mark.parametrize("name", ["transformer", "stageattn"])
def test_model_left_as_it_was(name, models, data):
    model = models[name]
    ds, _ = data[name]
    batch = first_batch(ds, 4)
    # a training model with one submodule deliberately in eval mode and stale gradients
    model.train()
    next(iter(model.children())).eval()
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    try:
        before = _snapshot(model)
        PyHealthGIM(model).attribute(**batch)
        PyHealthGIM(model, pyhealth_compatible=True).attribute(**batch)
        adapter = PyHealthAdapter(model)
        with gim_backward(adapter):
            adapter.attribute(IntegratedGradients(adapter), batch, n_steps=4)
        with pytest.raises(ValueError):  # failures half-way leave nothing behind either
            PyHealthGIM(model).attribute(baselines={"labs": torch.zeros(7, 7, 7)}, **batch)
        with pytest.raises(Exception):
            with gim_backward(adapter):
                adapter.attribute(IntegratedGradients(adapter), batch, method="no-such-method")
        _assert_same(before, _snapshot(model))
    finally:
        for p in model.parameters():
            p.grad = None
        model.eval()


def test_training_mode_warning(models, ehr_flat):
    model = models["mlp"]
    ds, _ = ehr_flat
    model.train()
    try:
        with pytest.warns(UserWarning, match="training mode"):
            PyHealthAdapter(model).prepare(first_batch(ds, 2))
    finally:
        model.eval()


# --- clear errors -------------------------------------------------------------------------


def test_unsupported_models_get_clear_errors(ehr):
    ds, _ = ehr
    with pytest.raises(TypeError, match=r"RNN .*forward_from_embedding, get_embedding_model.*Interpretable"):
        PyHealthAdapter(RNN(ds, embedding_dim=8, hidden_dim=8))
    with pytest.raises(TypeError, match=r"forward_from_embedding"):
        PyHealthGIM(RNN(ds, embedding_dim=8, hidden_dim=8))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        PyHealthAdapter(object())  # type: ignore[arg-type]

    class NoEmbedding(MLP):
        def get_embedding_model(self):
            return None

    with pytest.raises(TypeError, match="returned None"):
        PyHealthAdapter(NoEmbedding(ds, embedding_dim=8, hidden_dim=8))


def test_bad_batches_get_clear_errors(models, ehr_flat):
    ds, _ = ehr_flat
    batch = first_batch(ds, 2)
    adapter = PyHealthAdapter(models["mlp"])
    with pytest.raises(KeyError, match="'labs'"):
        adapter.prepare({"codes": batch["codes"]})
    with pytest.raises(TypeError, match="takes 2 inputs"):
        adapter(batch["codes"].float())
    with pytest.raises(ValueError, match="pyhealth_compatible"):
        PyHealthGIM(models["mlp"], pyhealth_compatible=True, divide_grads=False)
