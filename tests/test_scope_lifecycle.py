"""Scopes under the conditions users create: exits in any order, nesting, generators,
asyncio tasks, random interleavings of enter/exit across threads (hypothesis), TorchScript
models, and an installed ecosystem package the rules cannot use.

Every test compares a full state snapshot (module ``__dict__``, hooks, config fields, the
torch function-mode stack, transformers' attention registry, captum-gim's own install
table and open scopes) before and after, and the numbers against single-threaded GIM.
"""

from __future__ import annotations

import asyncio
import gc
import os
import subprocess
import sys
import textwrap
import threading
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from _scope_state import snapshot
from captum_gim import GIMAttribution, UnmatchedModulesError, UnmatchedModulesWarning, gim_backward
from captum_gim._context import open_scopes
from captum_gim._patching import installed_count

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: a few distinct settings: (temperature, freeze_norms, divide_grads)
SETTINGS = [(2.0, True, True), (5.0, False, True), (1.0, True, False), (3.0, False, False)]


def _kw(i: int) -> Dict[str, object]:
    T, f, d = SETTINGS[i]
    return dict(temperature=T, freeze_norms=f, divide_grads=d)


def _encoder() -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    return nn.Sequential(enc, nn.Flatten(), nn.Linear(5 * 16, 3)).eval()


X = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))


def _grad(model: nn.Module, x: Tensor = X) -> Tensor:
    x = x.clone().requires_grad_()
    model(x)[:, 1].sum().backward()
    return x.grad


def _references(model: nn.Module) -> Tuple[Tensor, List[Tensor]]:
    plain = _grad(model)
    per_setting = []
    for i in range(len(SETTINGS)):
        with gim_backward(model, **_kw(i)):
            per_setting.append(_grad(model))
    for i, g in enumerate(per_setting):  # every setting is visibly different
        assert not torch.allclose(g, plain), i
        for h in per_setting[:i]:
            assert not torch.allclose(g, h)
    return plain, per_setting


def _assert_pristine(model: nn.Module, before) -> None:
    assert snapshot(model) == before
    assert installed_count() == 0 and not open_scopes()


# --- exits in any order, nesting -----------------------------------------------------------


@pytest.mark.parametrize("order", ["in-order", "out-of-order"])
def test_two_scopes_exited_in_any_order(order: str) -> None:
    model = _encoder()
    plain, ref = _references(model)
    before = snapshot(model)
    a, b = gim_backward(model, **_kw(0)), gim_backward(model, **_kw(1))
    a.__enter__()
    assert torch.equal(_grad(model), ref[0])
    b.__enter__()
    assert torch.equal(_grad(model), ref[1])  # the innermost wins
    if order == "out-of-order":
        a.__exit__(None, None, None)
        assert torch.equal(_grad(model), ref[1])  # b is still open, with its settings
        b.__exit__(None, None, None)
    else:
        b.__exit__(None, None, None)
        assert torch.equal(_grad(model), ref[0])
        a.__exit__(None, None, None)
    assert torch.equal(_grad(model), plain)
    _assert_pristine(model, before)


def test_hf_scopes_exited_out_of_order_restore_the_config() -> None:
    pytest.importorskip("transformers")
    from test_hf_helpers import build_llama

    model = build_llama("sdpa")
    e0 = model.get_input_embeddings()(torch.randint(4, 64, (2, 6))).detach()

    def grad() -> Tensor:
        e = e0.clone().requires_grad_()
        model(inputs_embeds=e).logits[:, -1, 5].sum().backward()
        return e.grad

    plain = grad()
    with gim_backward(model):
        ref = grad()
    with gim_backward(model, temperature=4.0):
        ref4 = grad()
    before = snapshot(model)
    a, b = gim_backward(model), gim_backward(model, temperature=4.0)
    a.__enter__()
    b.__enter__()
    a.__exit__(None, None, None)
    assert torch.equal(grad(), ref4)  # GIM attention still in force inside b
    b.__exit__(None, None, None)
    assert torch.equal(grad(), plain)
    assert model.config.use_cache is True and model.config._attn_implementation == "sdpa"
    _assert_pristine(model, before)
    assert not torch.allclose(ref, plain) and not torch.allclose(ref, ref4)


def test_three_nested_scopes_each_exit_order() -> None:
    import itertools

    model = _encoder()
    plain, ref = _references(model)
    before = snapshot(model)
    for order in itertools.permutations(range(3)):
        scopes = [gim_backward(model, **_kw(i)) for i in range(3)]
        for s in scopes:
            s.__enter__()
        still_open = [0, 1, 2]
        for i in order:
            assert torch.equal(_grad(model), ref[still_open[-1]])
            scopes[i].__exit__(None, None, None)
            still_open.remove(i)
        assert torch.equal(_grad(model), plain)
        _assert_pristine(model, before)


# --- generators and asyncio tasks -----------------------------------------------------------


def test_generator_holding_a_scope() -> None:
    model = _encoder()
    plain, ref = _references(model)
    before = snapshot(model)

    def stream(n: int):
        with gim_backward(model, **_kw(1)):
            for _ in range(n):
                yield _grad(model)

    got = list(stream(3))  # exhausted: the scope exits
    assert all(torch.equal(g, ref[1]) for g in got)
    _assert_pristine(model, before)

    gen = stream(5)
    assert torch.equal(next(gen), ref[1])
    gen.close()  # closed early: GeneratorExit runs the scope's exit
    assert torch.equal(_grad(model), plain)
    _assert_pristine(model, before)


def test_generator_closed_from_another_thread_leaves_no_active_scope() -> None:
    """A generator's scope is entered in the context of whoever resumed it; closed from
    another thread, its entry there cannot be removed, and must never be active again."""
    model = _encoder()
    plain, ref = _references(model)
    before = snapshot(model)

    def stream():
        with gim_backward(model, **_kw(0)):
            while True:
                yield _grad(model)

    gen = stream()
    assert torch.equal(next(gen), ref[0])
    t = threading.Thread(target=gen.close)
    t.start()
    t.join()
    assert torch.equal(_grad(model), plain)  # this context's stale entry is inert
    # a later scope in another thread installs the rules again: still plain here
    entered, done = threading.Event(), threading.Event()

    def holder() -> None:
        with gim_backward(model, **_kw(0)):
            entered.set()
            done.wait(30)

    h = threading.Thread(target=holder)
    h.start()
    assert entered.wait(30)
    try:
        assert torch.equal(_grad(model), plain)
    finally:
        done.set()
        h.join()
    del gen
    gc.collect()
    _assert_pristine(model, before)


def test_asyncio_tasks_each_get_their_own_scope() -> None:
    model = _encoder()
    plain, ref = _references(model)
    before = snapshot(model)

    async def job(i: Optional[int]) -> List[Tensor]:
        out = []
        if i is None:
            for _ in range(3):
                await asyncio.sleep(0)
                out.append(_grad(model))
            return out
        with gim_backward(model, **_kw(i)):
            for _ in range(3):
                await asyncio.sleep(0)  # the other tasks run in between
                x = X.clone().requires_grad_()
                y = model(x)[:, 1].sum()
                await asyncio.sleep(0)  # ... also between forward and backward
                y.backward()
                out.append(x.grad)
        return out

    async def main():
        return await asyncio.gather(job(0), job(1), job(None), job(2))

    r0, r1, rp, r2 = asyncio.run(main())
    assert all(torch.equal(g, ref[0]) for g in r0)
    assert all(torch.equal(g, ref[1]) for g in r1)
    assert all(torch.equal(g, ref[2]) for g in r2)
    assert all(torch.equal(g, plain) for g in rp)
    _assert_pristine(model, before)


# --- random interleavings across threads (hypothesis) --------------------------------------

_MODEL = None
_REFS = None


def _shared():
    global _MODEL, _REFS
    if _MODEL is None:
        _MODEL = _encoder()
        _REFS = _references(_MODEL)
    return _MODEL, _REFS


# one thread's program: ("enter", setting) | ("exit", which open scope, by position) | ("grad",)
_step = st.one_of(
    st.tuples(st.just("enter"), st.integers(0, len(SETTINGS) - 1)),
    st.tuples(st.just("exit"), st.integers(0, 5)),
    st.tuples(st.just("grad"), st.just(0)),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(programs=st.lists(st.lists(_step, min_size=1, max_size=6), min_size=2, max_size=3))
def test_random_interleavings_across_threads(programs) -> None:
    model, (plain, ref) = _shared()
    before = snapshot(model)
    steps = max(len(p) for p in programs)
    barrier = threading.Barrier(len(programs))
    errors: List[str] = []

    def run(program) -> None:
        open_: List[Tuple[object, int]] = []  # (scope, setting), innermost last
        try:
            for k in range(steps):
                barrier.wait(30)  # every thread takes its k-th step at the same moment
                if k >= len(program):
                    continue
                op, arg = program[k]
                if op == "enter":
                    cm = gim_backward(model, **_kw(arg))
                    cm.__enter__()
                    open_.append((cm, arg))
                elif op == "exit" and open_:
                    cm, _ = open_.pop(arg % len(open_))
                    cm.__exit__(None, None, None)
                elif op == "grad":
                    expected = ref[open_[-1][1]] if open_ else plain
                    if not torch.equal(_grad(model), expected):
                        errors.append(f"step {k}: wrong gradient with {[s for _, s in open_]} open")
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(repr(e))
            barrier.abort()
        finally:
            for cm, _ in reversed(open_):
                cm.__exit__(None, None, None)

    threads = [threading.Thread(target=run, args=(p,)) for p in programs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    _assert_pristine(model, before)


# --- TorchScript ----------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["script", "trace", "scripted-submodule"])
def test_torchscript_refused_in_strict_mode_and_warned_otherwise(how: str) -> None:
    from captum.attr import InputXGradient

    model = _encoder()
    if how == "script":
        m = torch.jit.script(model)
    elif how == "trace":
        m = torch.jit.trace(model, X, check_trace=False)
    else:
        m = nn.Sequential(torch.jit.script(nn.Linear(16, 16)), model)
    before = snapshot(m)
    with pytest.raises(UnmatchedModulesError, match="TorchScript"):
        GIMAttribution(m, strict=True).attribute(X, target=1)
    _assert_pristine(m, before)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = GIMAttribution(m).attribute(X, target=1)
    messages = [str(w.message) for w in caught if issubclass(w.category, UnmatchedModulesWarning)]
    assert any("TorchScript" in msg and "plain gradient" in msg for msg in messages), messages
    if how != "scripted-submodule":  # nothing of it can be GIM: the plain gradient, said so
        torch.testing.assert_close(got, InputXGradient(m).attribute(X, target=1), atol=0, rtol=0)
    _assert_pristine(m, before)


# --- an ecosystem package the rules cannot use ---------------------------------------------


def test_unusable_transformers_never_breaks_the_core(tmp_path) -> None:
    """A ``transformers`` the rules cannot use (here: one without the names they need):
    ``import captum_gim`` and torch.nn models work; a model of that package warns once,
    naming the installed version and the supported range."""
    fake = tmp_path / "transformers"
    fake.mkdir()
    (fake / "__init__.py").write_text('__version__ = "4.30.0"\n')
    (fake / "modeling_fake.py").write_text(
        "import torch\n"
        "class FakeAttention(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__(); self.proj = torch.nn.Linear(4, 4)\n"
        "    def forward(self, x):\n"
        "        return torch.softmax(self.proj(x), -1)\n"
    )
    code = textwrap.dedent(
        """
        import warnings, torch, transformers
        import captum_gim
        from transformers.modeling_fake import FakeAttention
        from captum_gim import GIMAttribution
        layer = torch.nn.TransformerEncoderLayer(8, 2, 16, batch_first=True).eval()
        m = torch.nn.Sequential(layer, torch.nn.Flatten(), torch.nn.Linear(24, 2))
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            a = GIMAttribution(m).attribute(torch.randn(2, 3, 8), target=0)
        assert a.shape == (2, 3, 8)
        assert not [x for x in w if "transformers" in str(x.message)], [str(x.message) for x in w]
        f = torch.nn.Sequential(FakeAttention(), torch.nn.Linear(4, 1))
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            for _ in range(3):
                GIMAttribution(f).attribute(torch.randn(2, 4), target=0)
        msgs = [str(x.message) for x in w if "cannot be used" in str(x.message)]
        assert len(msgs) == 1, msgs
        print(msgs[0])
        """
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), ROOT]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=str(tmp_path), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "transformers 4.30.0" in out.stdout and "supported: transformers>=" in out.stdout
