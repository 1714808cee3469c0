"""Half precision: bf16 and fp16 models run in a GIM scope, and bf16 agrees with fp32.

Attributions of a bf16 (or fp16) copy of a model must have cosine similarity >= 0.99 with
the fp32 model's, per example; forward values inside the scope stay those of the plain
half-precision model.
"""

from __future__ import annotations

import copy

import pytest
import torch
from captum.attr import LayerGradientXActivation

from test_hf_helpers import cosine, family

from captum_gim import LayerGIM, gim_backward

CASES = [
    ("llama", "sdpa"),
    ("llama", "eager"),
    ("gemma", "sdpa"),
    ("gemma2", "eager"),
    ("phi3", "sdpa"),
    ("gpt2", "sdpa"),
    ("bert", "sdpa"),
    ("vit", "sdpa"),
    ("mixtral", "sdpa"),
]


def _attr(f, model):
    lg = LayerGIM(f.forward_of(model), f.layer_of(model), model=model, strict=True)
    x = f.inputs.to(next(model.parameters()).dtype) if f.kind == "image" else f.inputs
    return lg.attribute(x, target=f.target, additional_forward_args=f.extra or None)


def _plain(f, model):
    x = f.inputs.to(next(model.parameters()).dtype) if f.kind == "image" else f.inputs
    lg = LayerGradientXActivation(f.forward_of(model), f.layer_of(model))
    return lg.attribute(x, target=f.target, additional_forward_args=f.extra or None)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name,impl", CASES)
def test_half_precision_agrees_with_fp32(name: str, impl: str, dtype: torch.dtype) -> None:
    f = family(name, impl, batch=3)
    half = copy.deepcopy(f.model).to(dtype)
    ref = _attr(f, f.model)
    got = _attr(f, half)
    assert got.dtype == dtype and torch.isfinite(got).all()
    cos = cosine(got.float(), ref)
    # where the model's own half-precision gradient already departs from its fp32 one
    # (a router that picks other experts, a normaliser rounded differently: transformers
    # 4.x Mixtral and Gemma), GIM's cannot be expected to agree; every other example must
    plain = cosine(_plain(f, half).float(), _plain(f, f.model))
    stable = plain >= 0.99
    if not stable.any():
        pytest.skip(f"{name} in {dtype}: the model's own gradient departs from fp32 ({plain})")
    assert (cos[stable] >= 0.99).all(), (cos, plain)

    # forward values in the scope: those of the plain half-precision model
    x = f.inputs.to(dtype) if f.kind == "image" else f.inputs
    fwd = f.forward_of(half)
    with torch.no_grad():
        plain = fwd(x, *f.extra)
    with gim_backward(half, strict=True):
        with torch.no_grad():
            inside = fwd(x, *f.extra)
    assert torch.equal(plain, inside)
