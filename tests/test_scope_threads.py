"""Scopes are per execution context: threads sharing one model each get their own settings,
a thread without a scope gets plain gradients while another holds one."""

from __future__ import annotations

import threading
from typing import Callable, Dict

import pytest
import torch
from torch import Tensor, nn

from _scope_state import snapshot
from captum_gim import gim_backward


def _encoder() -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    return nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)).eval()


def _grad(model: nn.Module, x: Tensor) -> Tensor:
    x = x.clone().requires_grad_()
    out = model(x)
    out = out.logits if hasattr(out, "logits") else out
    out[:, -1, :3].sum().backward()
    return x.grad


def _llama() -> nn.Module:
    pytest.importorskip("transformers")
    from test_hf_helpers import build_llama

    return build_llama("sdpa")


def _input(model: nn.Module) -> Tensor:
    if hasattr(model, "get_input_embeddings"):
        ids = torch.randint(4, 64, (2, 7), generator=torch.Generator().manual_seed(4))
        emb = model.get_input_embeddings()(ids).detach()

        class _Emb(nn.Module):  # inputs_embeds as the first argument
            pass

        return emb
    return torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))


def _call(model: nn.Module) -> Callable[[Tensor], Tensor]:
    if hasattr(model, "get_input_embeddings"):
        return lambda e: _grad(lambda x: model(inputs_embeds=x), e)  # type: ignore[arg-type]
    return lambda x: _grad(model, x)


def _run_threads(jobs: Dict[str, Callable[[], Tensor]], barrier: threading.Barrier) -> Dict[str, Tensor]:
    out: Dict[str, Tensor] = {}
    errors = []

    def run(name: str, job: Callable[[], Tensor]) -> None:
        try:
            barrier.wait()
            out[name] = job()
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=kv) for kv in jobs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return out


@pytest.mark.parametrize("build", [_encoder, _llama], ids=["torch.nn", "hf-llama"])
def test_same_model_two_threads_own_settings(build) -> None:
    model = build()
    x = _input(model)
    g = _call(model)
    with gim_backward(model, temperature=2.0):
        ref_a = g(x)
    with gim_backward(model, temperature=5.0, divide_grads=False):
        ref_b = g(x)
    plain = g(x)
    assert not torch.allclose(ref_a, ref_b) and not torch.allclose(ref_a, plain)
    before = snapshot(model)
    barrier = threading.Barrier(3)

    def a() -> Tensor:
        results = []
        with gim_backward(model, temperature=2.0):
            for _ in range(3):
                results.append(g(x))
        return torch.stack(results)

    def b() -> Tensor:
        results = []
        with gim_backward(model, temperature=5.0, divide_grads=False):
            for _ in range(3):
                results.append(g(x))
        return torch.stack(results)

    def c() -> Tensor:
        return torch.stack([g(x) for _ in range(3)])

    got = _run_threads({"a": a, "b": b, "c": c}, barrier)
    for i in range(3):
        torch.testing.assert_close(got["a"][i], ref_a, rtol=0, atol=0)
        torch.testing.assert_close(got["b"][i], ref_b, rtol=0, atol=0)
        torch.testing.assert_close(got["c"][i], plain, rtol=0, atol=0)
    assert snapshot(model) == before


def test_plain_saliency_in_a_thread_while_another_holds_a_scope() -> None:
    from captum.attr import Saliency

    model = nn.Sequential(_encoder(), nn.Flatten(), nn.Linear(5 * 16, 3)).eval()
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(2))
    plain = Saliency(model).attribute(x, target=0, abs=False)
    with gim_backward(model):
        gim = Saliency(model).attribute(x, target=0, abs=False)
    assert not torch.allclose(plain, gim)
    before = snapshot(model)
    entered, done = threading.Event(), threading.Event()
    out: Dict[str, Tensor] = {}

    def holder() -> None:
        with gim_backward(model):
            entered.set()
            done.wait(30)
            out["a"] = Saliency(model).attribute(x, target=0, abs=False)

    t = threading.Thread(target=holder)
    t.start()
    assert entered.wait(30)
    out["b"] = Saliency(model).attribute(x, target=0, abs=False)  # this thread: no scope
    done.set()
    t.join()
    assert torch.equal(out["b"], plain)
    assert torch.equal(out["a"], gim)
    assert snapshot(model) == before


def test_other_model_in_other_thread_is_untouched() -> None:
    m1, m2 = _encoder(), _encoder()
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(3))
    plain2 = _grad(m2, x)
    with gim_backward(m1):
        gim1 = _grad(m1, x)
        got2 = _run_threads({"m2": lambda: _grad(m2, x)}, threading.Barrier(1))["m2"]
        assert torch.equal(_grad(m2, x), plain2)  # same thread, other model
    assert torch.equal(got2, plain2)
    assert not torch.allclose(gim1, plain2)
