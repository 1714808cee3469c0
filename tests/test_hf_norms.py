"""Hugging Face norm classes are found by what they are and frozen per the spec.

For each class: the forward inside the scope is bit-for-bit the plain forward, and the
input gradient is the frozen one (``1/rms``, or the standard deviation, a constant; a
LayerNorm's mean keeps its gradient unless ``keep_norm_mean=False``), written out here.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

transformers = pytest.importorskip("transformers")

from transformers.models.convnext.modeling_convnext import ConvNextLayerNorm  # noqa: E402
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm  # noqa: E402
from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRMSNorm  # noqa: E402
from transformers.models.mixtral.modeling_mixtral import MixtralRMSNorm  # noqa: E402
from transformers.models.phi3.modeling_phi3 import Phi3RMSNorm  # noqa: E402
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm  # noqa: E402
from transformers.models.t5.modeling_t5 import T5LayerNorm  # noqa: E402

from captum_gim import gim_backward  # noqa: E402

D = 16


def _randomize(norm: nn.Module) -> nn.Module:
    with torch.no_grad():
        norm.weight.copy_(torch.randn(norm.weight.shape, generator=torch.Generator().manual_seed(0)))
    return norm


def _eps(norm: nn.Module) -> float:
    return getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))


RMS_NORMS = {
    "LlamaRMSNorm": (lambda: LlamaRMSNorm(D), False),
    "Qwen3RMSNorm": (lambda: Qwen3RMSNorm(D), False),
    "MixtralRMSNorm": (lambda: MixtralRMSNorm(D), False),
    "Phi3RMSNorm": (lambda: Phi3RMSNorm(D), False),
    "T5LayerNorm": (lambda: T5LayerNorm(D), False),
    "GemmaRMSNorm": (lambda: GemmaRMSNorm(D), True),  # (1 + weight)
    "Gemma2RMSNorm": (lambda: Gemma2RMSNorm(D), True),
}


def _run(norm: nn.Module, x: Tensor, g: Tensor, **kw):
    holder = nn.Sequential(norm)
    with torch.no_grad():
        plain = holder(x)
    x = x.clone().requires_grad_()
    with gim_backward(holder, strict=True, **kw) as report:
        y = holder(x)
    (y.float() * g).sum().backward()
    assert report.by_rule(installed_only=True) == {"transformers.norm": ["0"]}
    return plain, y.detach(), x.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", RMS_NORMS)
def test_rms_norm_classes_freeze_inverse_rms(name: str, dtype: torch.dtype) -> None:
    make, one_plus = RMS_NORMS[name]
    norm = _randomize(make()).to(dtype)
    gen = torch.Generator().manual_seed(1)
    x = (3 * torch.randn(2, 5, D, generator=gen)).to(dtype)
    g = torch.randn(2, 5, D, generator=gen)
    plain, inside, grad = _run(norm, x, g)
    assert torch.equal(plain, inside)
    xf = x.float()
    inv_rms = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + _eps(norm))
    w = norm.weight.float()
    w = 1.0 + w if one_plus else w
    expected = g * w * inv_rms
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=5e-2, rtol=2e-2)
    torch.testing.assert_close(grad.float(), expected, **tol)


@pytest.mark.parametrize("keep_mean", [True, False])
@pytest.mark.parametrize("fmt", ["channels_first", "channels_last"])
def test_layer_norm_subclass_with_own_forward(fmt: str, keep_mean: bool) -> None:
    """ConvNext's LayerNorm (an nn.LayerNorm subclass computing by hand when channels-first)."""
    norm = ConvNextLayerNorm(D, eps=1e-6, data_format=fmt)
    with torch.no_grad():
        norm.weight.normal_(generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    shape = (2, D, 3, 3) if fmt == "channels_first" else (2, 3, 3, D)
    x = 2 * torch.randn(shape, generator=gen) + 1.0
    g = torch.randn(shape, generator=gen)
    plain, inside, grad = _run(norm, x, g, keep_norm_mean=keep_mean)
    assert torch.equal(plain, inside)
    dim = 1 if fmt == "channels_first" else -1
    wshape = (1, D, 1, 1) if fmt == "channels_first" else (D,)
    std = torch.sqrt(x.var(dim, unbiased=False, keepdim=True) + 1e-6)
    expected = g * norm.weight.view(wshape) / std
    if keep_mean:
        expected = expected - expected.mean(dim, keepdim=True)
    torch.testing.assert_close(grad, expected, atol=1e-5, rtol=1e-5)


def _fake_hf(cls: type) -> type:
    cls.__module__ = "transformers.models.fake.modeling_fake"
    return cls


@_fake_hf
class FancyNorm(nn.Module):
    """Not named RMSNorm: found because it is a '...Norm' whose forward computes an rms."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.full((D,), 2.0))

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * x / (x.pow(2).mean(-1, keepdim=True) + 1e-6) ** 0.5


@_fake_hf
class OddRMSNorm(nn.Module):
    """Named like a norm but computes nothing GIM can freeze: a warning says so."""

    def forward(self, x: Tensor) -> Tensor:
        return x * 2.0


def test_norm_found_by_what_it_computes() -> None:
    norm = FancyNorm()
    gen = torch.Generator().manual_seed(2)
    x, g = torch.randn(3, D, generator=gen), torch.randn(3, D, generator=gen)
    plain, inside, grad = _run(norm, x, g)
    assert torch.equal(plain, inside)
    rms = (x.pow(2).mean(-1, keepdim=True) + 1e-6) ** 0.5
    torch.testing.assert_close(grad, 2.0 * g / rms, atol=1e-6, rtol=1e-6)


def test_norm_with_nothing_to_freeze_warns() -> None:
    holder = nn.Sequential(OddRMSNorm())
    with pytest.warns(UserWarning, match="OddRMSNorm computed no rsqrt"):
        with gim_backward(holder):
            holder(torch.randn(2, D))
