"""The scope: nothing survives it (errors included), strict mode, the registry, bad input."""

from __future__ import annotations

import threading
import warnings

import pytest
import torch
from torch import nn

from captum.attr import Saliency
from captum_gim import (
    GIMAttribution,
    LayerGIM,
    Rule,
    RuleRegistry,
    UnmatchedModulesError,
    UnmatchedModulesWarning,
    default_registry,
    gim_backward,
    register_rule,
    replace_forward,
)
from captum_gim.ops import frozen_rms_norm

from conftest import assert_model_clean, ref_rms_norm

F_ATTRS = ("softmax", "scaled_dot_product_attention", "layer_norm", "rms_norm", "multi_head_attention_forward")


def _snapshot_functions():
    return {
        **{f"F.{n}": getattr(torch.nn.functional, n) for n in F_ATTRS},
        "torch.softmax": torch.softmax,
        "torch.bmm": torch.bmm,
        "torch.matmul": torch.matmul,
        "torch.rsqrt": torch.rsqrt,
        "Tensor.softmax": torch.Tensor.softmax,
        "MHA.forward": nn.MultiheadAttention.forward,
        "LN.forward": nn.LayerNorm.forward,
        "RMS.forward": nn.RMSNorm.forward,
    }


def _instance_attrs(model):
    return {name: set(m.__dict__) for name, m in model.named_modules()}


class Boom(RuntimeError):
    pass


def test_error_inside_forward_leaves_nothing_behind(encoder_classifier):
    before_f, before_attrs = _snapshot_functions(), _instance_attrs(encoder_classifier)

    def bad_forward(x):
        encoder_classifier(x)
        raise Boom("inside forward")

    with pytest.raises(Boom):
        GIMAttribution(bad_forward, encoder_classifier).attribute(torch.randn(2, 6, 16), target=0)
    assert_model_clean(encoder_classifier)
    assert _snapshot_functions() == before_f
    assert _instance_attrs(encoder_classifier) == before_attrs


def test_bad_target_gives_clear_error_and_leaves_nothing(encoder_classifier):
    x = torch.randn(2, 6, 16)
    attr = GIMAttribution(encoder_classifier)
    with pytest.raises(ValueError, match=r"out of range.*\[-3, 3\)"):
        attr.attribute(x, target=3)
    with pytest.raises(ValueError, match="one entry per example"):
        attr.attribute(x, target=[0, 1, 2])
    with pytest.raises(ValueError, match="out of range"):
        attr.attribute(x, target=[0, 7])
    with pytest.raises(ValueError, match="out of range"):
        attr.attribute(x, target=torch.tensor([0, -1]))
    with pytest.raises(ValueError, match="a target is needed"):
        attr.attribute(x)
    with pytest.raises(ValueError, match="2 indices"):
        attr.attribute(x, target=(0, 1))
    with pytest.raises(ValueError, match=r"\[-3, 3\)"):
        attr.attribute(x, target=-4)
    # negative ints index from the end, as in Captum
    torch.testing.assert_close(attr.attribute(x, target=-1), attr.attribute(x, target=2))
    assert_model_clean(encoder_classifier)


def test_keyboard_interrupt_inside_scope_restores(encoder_classifier):
    before = _instance_attrs(encoder_classifier)
    with pytest.raises(KeyboardInterrupt):
        with gim_backward(encoder_classifier):
            assert "forward" in encoder_classifier.encoder.layers[0].self_attn.__dict__
            raise KeyboardInterrupt
    assert_model_clean(encoder_classifier)
    assert _instance_attrs(encoder_classifier) == before


def test_keyboard_interrupt_during_backward_restores(encoder_classifier):
    class Interrupting(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            y = self.inner(x)

            def hook(g):
                raise KeyboardInterrupt

            y.register_hook(hook)
            return y

    wrapped = Interrupting(encoder_classifier)
    with pytest.raises(KeyboardInterrupt):
        GIMAttribution(wrapped).attribute(torch.randn(1, 6, 16), target=0)
    assert_model_clean(wrapped)


def test_failing_install_undoes_earlier_rules(encoder_classifier):
    reg = default_registry.copy()

    def explode(module, config):
        raise Boom("install failed")

    reg.register(Rule("explodes-on-head", explode, kind="model", types=(nn.Linear,), predicate=None))
    with pytest.raises(Boom):
        with gim_backward(encoder_classifier, registry=reg):
            pass
    assert_model_clean(encoder_classifier)


def test_forward_unchanged_and_nested_scopes(encoder_classifier):
    x = torch.randn(3, 6, 16)
    y0 = encoder_classifier(x)
    with gim_backward(encoder_classifier):
        y1 = encoder_classifier(x)
        with gim_backward(encoder_classifier, temperature=3.0):
            y2 = encoder_classifier(x)
        y3 = encoder_classifier(x)
    assert torch.equal(y0, y1) and torch.equal(y0, y2) and torch.equal(y0, y3)
    assert_model_clean(encoder_classifier)


def test_other_instance_of_same_class_is_unaffected():
    torch.manual_seed(0)
    a = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True).eval()
    b = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True).eval()
    x = torch.randn(2, 4, 8)
    plain_b = Saliency(b).attribute(x, target=(0, 0), abs=False)
    with gim_backward(a):
        inside_b = Saliency(b).attribute(x, target=(0, 0), abs=False)
        inside_a = Saliency(a).attribute(x, target=(0, 0), abs=False)
    torch.testing.assert_close(inside_b, plain_b, rtol=0, atol=0)
    assert not torch.allclose(inside_a, Saliency(a).attribute(x, target=(0, 0), abs=False))


def test_other_thread_model_unaffected():
    torch.manual_seed(1)
    a = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True).eval()
    b = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True).eval()
    x = torch.randn(2, 4, 8)
    expected = Saliency(b).attribute(x, target=(0, 0), abs=False)
    results = {}
    inside = threading.Event()
    done = threading.Event()

    def other():
        inside.wait(5)
        results["b"] = Saliency(b).attribute(x, target=(0, 0), abs=False)
        done.set()

    t = threading.Thread(target=other)
    t.start()
    with gim_backward(a):
        inside.set()
        done.wait(10)
    t.join()
    torch.testing.assert_close(results["b"], expected, rtol=0, atol=0)


def test_integer_inputs_point_to_layer_gim(encoder_classifier):
    with pytest.raises(TypeError, match="LayerGIM"):
        GIMAttribution(encoder_classifier).attribute(torch.randint(0, 5, (2, 6, 16)), target=0)
    assert_model_clean(encoder_classifier)


def test_unresolvable_model_says_pass_model():
    def f(x):
        return x.sum(-1)

    with pytest.raises(TypeError, match="model="):
        GIMAttribution(f)
    # a bound method resolves to its module
    lin = nn.Linear(3, 2)
    assert GIMAttribution(lin.forward).model is lin
    with pytest.raises(TypeError, match="model= must be"):
        GIMAttribution(f, model=object())


def test_bad_settings_rejected():
    lin = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="temperature"):
        GIMAttribution(lin, temperature=0)
    with pytest.raises(ValueError, match="temperature"):
        GIMAttribution(lin, temperature=float("nan"))
    with pytest.raises(TypeError, match="freeze_norms"):
        GIMAttribution(lin, freeze_norms="yes")
    with pytest.raises(TypeError):
        gim_backward("not a model").__enter__()


class MyAttention(nn.Module):
    """A hand-written attention no built-in rule knows."""

    def __init__(self, d=8):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        return torch.softmax(q @ k.transpose(-2, -1) / 8**0.5, -1) @ v


class MyRMSNorm(nn.Module):
    def __init__(self, d=8, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def _custom_model():
    torch.manual_seed(2)
    return nn.Sequential(MyAttention(), MyRMSNorm(), nn.Linear(8, 2)).double()


def test_strict_mode_raises_before_any_change_naming_modules():
    model = _custom_model()
    with pytest.raises(UnmatchedModulesError, match=r"'0' \(MyAttention\).*'1' \(MyRMSNorm\)"):
        GIMAttribution(model, strict=True).attribute(torch.randn(2, 3, 8, dtype=torch.float64), target=(0, 0))
    assert_model_clean(model)


def test_non_strict_warns_once():
    model = _custom_model()
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        GIMAttribution(model).attribute(x, target=(0, 0))
        GIMAttribution(model).attribute(x, target=(0, 0))
    unmatched = [x for x in w if issubclass(x.category, UnmatchedModulesWarning)]
    assert len(unmatched) == 1 and "MyAttention" in str(unmatched[0].message)


def test_user_rule_register_and_remove():
    model = _custom_model()
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    rule = Rule(
        "test.MyRMSNorm",
        lambda m, cfg: replace_forward(m, lambda h: frozen_rms_norm(h, m.weight.shape, m.weight, m.eps)),
        kind="norm",
        types=(MyRMSNorm,),
    )
    handle = register_rule(rule)
    try:
        assert "test.MyRMSNorm" in default_registry
        default_registry.ignore(MyAttention)
        got = GIMAttribution(model, multiply_by_inputs=False, strict=True, temperature=1.0, divide_grads=False).attribute(
            x, target=(0, 1)
        )
    finally:
        handle.remove()
        default_registry._ignored.remove(MyAttention)
    assert "test.MyRMSNorm" not in default_registry

    xr = x.clone().requires_grad_(True)
    ref = model[2](ref_rms_norm(model[0](xr), model[1].weight, 1e-6, True))[:, 0, 1].sum()
    torch.testing.assert_close(got, torch.autograd.grad(ref, xr)[0])
    assert_model_clean(model)


def test_registry_object_passed_to_attribution_and_precedence():
    model = _custom_model()
    reg = RuleRegistry()
    calls = []

    def install(m, cfg):
        calls.append(type(m).__name__)
        return replace_forward(m, m.forward)

    reg.register(Rule("all-norms", install, kind="norm", types=(MyRMSNorm,)))
    reg.register(Rule("first", install, kind="attention", types=(MyAttention,)))
    assert [r.name for r in reg] == ["first", "all-norms"]
    with pytest.raises(ValueError, match="already registered"):
        reg.register(Rule("first", install, types=(MyAttention,)))
    GIMAttribution(model, registry=reg, strict=True).attribute(torch.randn(1, 3, 8, dtype=torch.float64), target=(0, 0))
    assert calls == ["MyAttention", "MyRMSNorm"]
    # switched-off kinds are matched and reported but not installed
    calls.clear()
    with gim_backward(model, registry=reg, freeze_norms=False) as report:
        pass
    assert calls == ["MyAttention"]
    assert ("1", "MyRMSNorm", "all-norms", False) in report.matches
    assert "all-norms" in str(report)


def test_replace_forward_restores_previous_instance_forward():
    lin = nn.Linear(2, 2)
    custom = lambda x: x * 0  # noqa: E731
    lin.forward = custom
    h = replace_forward(lin, lambda x: x)
    assert lin.forward is not custom
    h.remove()
    assert lin.forward is custom
    h.remove()  # idempotent
    del lin.forward
    assert "forward" not in lin.__dict__
