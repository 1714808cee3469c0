"""Strict means strict, by behaviour (issues 9.2 and 15.4): every normalisation and
attention softmax that runs in the forward pass is covered or named; nothing of the
functional layer survives a forward pass (also one that raises); it acts only in the
context whose scope is active; torch.compile is refused clearly."""

from __future__ import annotations

import math
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any, List, Optional, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import _get_current_function_mode_stack

from captum_gim.config import GIMConfig
from captum_gim.errors import UncoveredOperationError, UncoveredOperationWarning
from captum_gim.registry import RuleRegistry
from captum_gim.rules.functional import install_functional
from conftest import ref_attention

DT = torch.float64


@dataclass
class Scope:
    """Stand-in for captum_gim._context.ActiveScope."""

    config: GIMConfig = field(default_factory=GIMConfig)
    strict: bool = True
    records: List[Tuple[str, str, str, str]] = field(default_factory=list)
    registry: Any = None

    def record(self, path: str, class_name: str, op: str, cover: str) -> None:
        self.records.append((path, class_name, op, cover))


class ExpSoftmax(nn.Module):
    """Attention whose softmax is written out with exp: cannot be given TSG."""

    def forward(self, q, k, v):
        s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        e = torch.exp(s - s.amax(-1, keepdim=True))
        return (e / e.sum(-1, keepdim=True)) @ v


class PoolNoMatmul(nn.Module):
    """Attention whose value product is an elementwise product and a sum."""

    def forward(self, q, k, v):
        p = torch.softmax(q @ k.transpose(-2, -1), -1)
        return (p.unsqueeze(-1) * v.unsqueeze(-3)).sum(-2)


class DropoutSDPA(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=0.5)


class Net(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 12).to(DT)
        self.inner = inner

    def forward(self, x):
        q, k, v = self.proj(x).split(4, -1)
        return self.inner(q, k, v)


def _x() -> Tensor:
    return torch.randn(2, 5, 4, dtype=DT, generator=torch.Generator().manual_seed(0), requires_grad=True)


def _snapshot(model: nn.Module):
    from torch.nn.modules import module as M

    return [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()] + [
        (len(M._global_forward_hooks), len(M._global_forward_pre_hooks))
    ]


def test_only_the_root_gets_hooks():
    model = Net(ExpSoftmax())
    before = _snapshot(model)
    h = install_functional(model, lambda: None)
    during = _snapshot(model)
    h.remove()
    assert during[0] == (before[0][0] + 1, before[0][1] + 1) and during[1:] == before[1:]
    assert _snapshot(model) == before


@pytest.mark.parametrize(
    "inner, op",
    [(ExpSoftmax(), "exp of attention scores"), (PoolNoMatmul(), "attention softmax"),
     (DropoutSDPA(), "scaled_dot_product_attention")],
    ids=["exp-softmax", "no-value-matmul", "sdpa-dropout"],
)
def test_strict_names_module_class_op_and_how_to_cover(inner, op):
    model = Net(inner)
    before = _snapshot(model)
    scope = Scope()
    h = install_functional(model, lambda: scope)
    returned = []
    with pytest.raises(UncoveredOperationError) as info:
        returned.append(model(_x()))
    h.remove()
    msg = str(info.value)
    assert returned == []  # raised before returning anything
    assert f"'inner' ({type(inner).__name__}): {op}" in msg
    assert "register_rule" in msg and f"registry.ignore({type(inner).__name__})" in msg
    assert ("inner", type(inner).__name__, op, "none") in scope.records
    assert _get_current_function_mode_stack() == []
    assert _snapshot(model) == before


def test_non_strict_warns_once_with_the_same_list():
    model = Net(ExpSoftmax())
    scope = Scope(strict=False)
    h = install_functional(model, lambda: scope)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        model(_x())
        model(_x())
    h.remove()
    hits = [x for x in w if issubclass(x.category, UncoveredOperationWarning)]
    assert len(hits) == 1
    assert "'inner' (ExpSoftmax): exp of attention scores" in str(hits[0].message)


def test_registry_ignore_silences_strict():
    reg = RuleRegistry()
    reg.ignore(ExpSoftmax)
    model = Net(ExpSoftmax())
    scope = Scope(registry=reg)
    h = install_functional(model, lambda: scope)
    model(_x())
    h.remove()
    assert ("inner", "ExpSoftmax", "exp of attention scores", "ignored:ExpSoftmax") in scope.records


def test_unconfirmed_statistic_is_named():
    class Odd(nn.Module):
        def forward(self, x):
            return x.flip(-1) * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    scope = Scope()
    model = Odd()
    h = install_functional(model, lambda: scope)
    with pytest.raises(UncoveredOperationError, match=r"rsqrt\(mean of squares or variance\)"):
        model(_x())
    h.remove()


def test_exception_in_forward_leaves_nothing():
    class Boom(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln = nn.LayerNorm(4).to(DT)

        def forward(self, x):
            self.ln(x)
            raise ValueError("boom")

    model = Boom()
    before = _snapshot(model)
    scope = Scope()
    h = install_functional(model, lambda: scope)
    with pytest.raises(ValueError, match="boom"):
        model(_x())
    assert _get_current_function_mode_stack() == []
    assert ("ln", "LayerNorm", "layer_norm", "functional:layer_norm") in scope.records
    h.remove()
    assert _snapshot(model) == before
    # and the model works again, inside and outside a scope
    h = install_functional(model.ln, lambda: scope)
    model.ln(_x())
    h.remove()
    assert _get_current_function_mode_stack() == []


def test_keyboard_interrupt_is_cleaned_up_by_the_next_call():
    class Stop(nn.Module):
        stop = True

        def forward(self, x):
            y = F.layer_norm(x, (4,))
            if self.stop:
                raise KeyboardInterrupt
            return y

    model = Stop()
    scope = Scope()
    h = install_functional(model, lambda: scope)
    with pytest.raises(KeyboardInterrupt):
        model(_x())
    assert len(_get_current_function_mode_stack()) == 1  # nn.Module runs no hook for it
    model.stop = False
    before = _snapshot(model)
    model(_x())
    assert _get_current_function_mode_stack() == []
    h.remove()
    from torch.nn.modules import module as M

    assert not M._global_forward_hooks and not M._global_forward_pre_hooks


def test_other_models_in_the_same_thread_are_untouched():
    torch.manual_seed(0)
    a, b = nn.LayerNorm(4).to(DT), nn.LayerNorm(4).to(DT)
    scope = Scope()
    h = install_functional(a, lambda: scope)
    x = _x()
    a(x)
    (gb,) = torch.autograd.grad((b(x) * torch.arange(4.0, dtype=DT)).sum(), x)
    (g0,) = torch.autograd.grad((F.layer_norm(x, (4,), b.weight, b.bias) * torch.arange(4.0, dtype=DT)).sum(), x)
    h.remove()
    assert torch.equal(gb, g0)
    assert [r[0] for r in scope.records] == [""]


def test_nested_roots_and_reentrant_calls_compose():
    """A root calling itself and another installed root: one mode, every op covered once."""

    class Inner(nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v)

    class Outer(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.depth = 0

        def forward(self, q, k, v):
            if self.depth == 0:
                self.depth = 1
                q = self(q, k, v)  # re-entrant call of the same root
                self.depth = 0
            return self.inner(q, k, v)

    inner = Inner()
    outer = Outer(inner)
    s_in, s_out = Scope(), Scope()
    h1 = install_functional(inner, lambda: s_in)
    h2 = install_functional(outer, lambda: s_out)
    q, k, v = (torch.randn(1, 2, 4, 4, dtype=DT, generator=torch.Generator().manual_seed(i), requires_grad=True) for i in range(3))
    out = outer(q, k, v)
    assert _get_current_function_mode_stack() == []
    h1.remove()
    h2.remove()
    g = torch.autograd.grad(out.sum(), (q, k, v))

    def ref(q, k, v):
        return ref_attention(ref_attention(q, k, v, None, 2.0, True), k, v, None, 2.0, True)

    qr, kr, vr = (t.detach().requires_grad_(True) for t in (q, k, v))
    gr = torch.autograd.grad(ref(qr, kr, vr).sum(), (qr, kr, vr))
    for a, b in zip(g, gr):
        assert (a - b).abs().max().item() < 1e-10
    # the inner root's own (active) scope records its ops
    assert {r[3] for r in s_in.records} == {"functional:scaled_dot_product_attention"}


def test_two_threads_one_scope():
    """Same model, two threads at the same time: only the one with a scope gets GIM."""
    torch.manual_seed(0)
    barrier = threading.Barrier(2, timeout=30)
    active = threading.local()

    class Model(nn.Module):
        def forward(self, q, k, v):
            barrier.wait()  # both threads are inside the forward pass now
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    model = Model()
    scope = Scope()
    h = install_functional(model, lambda: scope if getattr(active, "on", False) else None)
    q, k, v = (torch.randn(1, 2, 5, 4, dtype=DT, generator=torch.Generator().manual_seed(i)) for i in range(3))
    results: dict = {}

    def work(on: bool) -> None:
        active.on = on
        xs = tuple(t.clone().requires_grad_(True) for t in (q, k, v))
        out = model(*xs)
        results[on] = torch.autograd.grad(out.sum(), xs)

    ts = [threading.Thread(target=work, args=(on,)) for on in (True, False)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    h.remove()
    xs = tuple(t.clone().requires_grad_(True) for t in (q, k, v))
    plain = torch.autograd.grad(F.scaled_dot_product_attention(*xs, is_causal=True).sum(), xs)
    causal = torch.zeros(5, 5, dtype=DT).masked_fill(~torch.ones(5, 5, dtype=torch.bool).tril(), float("-inf"))
    gim = torch.autograd.grad(ref_attention(*xs, causal, 2.0, True).sum(), xs)
    for a, b in zip(results[False], plain):
        assert torch.equal(a, b)
    for a, b in zip(results[True], gim):
        assert (a - b).abs().max().item() < 1e-10
    assert len(scope.records) == 1


def test_torch_compile_is_refused_clearly():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    scope = Scope()
    h = install_functional(model, lambda: scope)
    compiled = torch.compile(model, backend="eager")
    with pytest.raises(RuntimeError, match="torch.compile"):
        compiled(torch.randn(2, 4))
    h.remove()
    assert _get_current_function_mode_stack() == []


def test_no_grad_forward_records_nothing_and_never_raises():
    model = Net(ExpSoftmax())
    scope = Scope()
    h = install_functional(model, lambda: scope)
    with torch.no_grad():
        model(_x())
    h.remove()
    assert scope.records == []


class ScaledLN(nn.LayerNorm):
    """A LayerNorm subclass with its own forward calling the parent's (issue 9's table)."""

    def forward(self, x):
        return super().forward(x) * 2.0


def test_layer_norm_subclass_with_own_forward_is_frozen_end_to_end():
    from captum_gim import GIMAttribution
    from conftest import ref_layer_norm

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), ScaledLN(4), nn.Linear(4, 3)).to(DT)
    nn.init.normal_(model[1].weight)
    x = torch.randn(3, 4, dtype=DT)
    attr = GIMAttribution(model, strict=True).attribute(x, target=1)
    xr = x.clone().requires_grad_(True)
    ln = model[1]
    out = model[2](ref_layer_norm(model[0](xr), ln.weight, ln.bias, ln.eps, True) * 2.0)[:, 1]
    (g,) = torch.autograd.grad(out.sum(), xr)
    (g0,) = torch.autograd.grad(model(xr)[:, 1].sum(), xr)
    assert (attr - g * x).abs().max().item() < 1e-10
    assert (g - g0).abs().max().item() > 1e-3


def test_reentrant_checkpoint_is_named():
    """use_reentrant=True runs the block with autograd off and recomputes it plainly in the
    backward pass: strict mode names the norm that would keep its plain gradient."""
    from torch.utils.checkpoint import checkpoint

    class Ckpt(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln = nn.LayerNorm(4).to(DT)

        def forward(self, x):
            return checkpoint(self.ln, x, use_reentrant=True)

    model = Ckpt()
    scope = Scope()
    h = install_functional(model, lambda: scope)
    with pytest.raises(UncoveredOperationError, match="use_reentrant"):
        model(_x())
    h.remove()
    assert _get_current_function_mode_stack() == []
