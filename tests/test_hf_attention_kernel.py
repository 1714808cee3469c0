"""GIM's attention backward (the one the transformers rule attaches) against plain autograd.

``_gim_attention_grads`` works in chunks of heads and blocks of query rows and skips key
columns no row of a block may attend. Here it is compared, on long sequences that need
several chunks and blocks, with the same attention written with plain autograd and the
textbook straight-through pieces of ``test_hf_helpers`` (no ``captum_gim`` code): causal,
sliding-window and padding masks (with fully masked rows), grouped-query heads,
soft-capping, a learned additive bias, and gradients flowing into the attention weights.
The rule's own autograd version (``_explicit_attention``, used with dropout) is checked
against the same reference.
"""

from __future__ import annotations

from typing import Optional

import pytest
import torch
from torch import Tensor

from test_hf_helpers import tb_attention_heads

import captum_gim.ops.attention as gim_ops_attention
from captum_gim import GIMConfig
import captum_gim.rules.transformers as R


def _inputs(B=2, Hq=4, Hkv=2, L=300, D=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, L, D, generator=g, dtype=torch.float64).to(dtype) for h in (Hq, Hkv, Hkv))
    return q, k, v


def _keep(L: int, window: Optional[int], left_pad: int) -> Tensor:
    i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
    keep = j <= i
    if window is not None:
        keep = keep & (j > i - window)
    keep = keep.expand(2, 1, L, L).clone()
    keep[1, :, :, :left_pad] = False  # left padding in row 1: its first queries see nothing
    return keep


def _reference(q, k, v, bias, keep, sem, scope):
    """The attention of ``sem`` from the textbook pieces; output laid out (B, L, H, D)."""
    out, probs = tb_attention_heads(
        q, k, v, keep, scope.temperature, scope.divide_grads, sem.scaling, sem.softcap,
        bias, sem.zero_empty_rows,
    )
    return out.transpose(1, 2), probs


def _run(attention, q, k, v, bias, g_out, g_w):
    """Output, probabilities and the gradients of q, k, v (and bias) of ``<out, g_out> +
    <probs, g_w>`` through ``attention(q, k, v, bias)``, with plain autograd."""
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    b_leaf = bias.clone().requires_grad_() if bias is not None else None
    out, probs = attention(*leaves, b_leaf)
    loss = (out * g_out).sum() + ((probs * g_w).sum() if g_w is not None else 0.0)
    wrt = leaves + ([b_leaf] if b_leaf is not None else [])
    return out.detach(), probs.detach(), torch.autograd.grad(loss, wrt)


def _compare(q, k, v, bias, keep, sem, T=2.0, divide=True, with_weights=False, chunk=None, monkeypatch=None):
    if chunk is not None:
        monkeypatch.setattr(gim_ops_attention, "_BACKWARD_CHUNK_BYTES", chunk)
    scope = GIMConfig(temperature=T, divide_grads=divide)
    factors = (0.25, 0.25, 0.5) if divide else (1.0, 1.0, 1.0)
    g = torch.Generator().manual_seed(9)
    B, Hq, L, D = q.shape
    g_out = torch.randn(B, L, Hq, v.shape[-1], generator=g, dtype=q.dtype)
    g_w = torch.randn(B, Hq, L, k.shape[2], generator=g, dtype=q.dtype) if with_weights else None

    out, probs, expected = _run(
        lambda q, k, v, b: _reference(q, k, v, b, keep, sem, scope), q, k, v, bias, g_out, g_w
    )

    gq, gk, gv, gb, diff = R._gim_attention_grads(
        q, k, v, bias, keep, g_out, g_w, sem, T, factors, bias is not None, out
    )
    got = [gq, gk, gv] + ([gb] if bias is not None else [])
    assert len(got) == len(expected)
    for a, e in zip(got, expected):
        assert e.abs().max() > 1e-2
        torch.testing.assert_close(a, e, atol=2e-5, rtol=1e-4)
    assert diff is not None and diff < 1e-4  # P @ V recomputed == the forward output

    # the rule's autograd version of the same attention (its dropout path)
    ex_out, ex_probs, ex_grads = _run(
        lambda q, k, v, b: R._explicit_attention(q, k, v, b, keep, sem, scope), q, k, v, bias, g_out, g_w
    )
    torch.testing.assert_close(ex_out, out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ex_probs, probs, atol=1e-6, rtol=1e-5)
    for a, e in zip(ex_grads, expected):
        torch.testing.assert_close(a, e, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("window", [None, 64])
@pytest.mark.parametrize("chunk", [None, 1], ids=["default-chunks", "one-head-per-chunk"])
def test_sdpa_semantics_masks_and_blocks(window, chunk, monkeypatch) -> None:
    q, k, v = _inputs()
    keep = _keep(q.shape[2], window, left_pad=50)
    sem = R._Semantics(q.shape[-1] ** -0.5, None, 0.0, True)
    _compare(q, k, v, None, keep, sem, chunk=chunk, monkeypatch=monkeypatch)


def test_eager_semantics_softcap_additive_mask_and_row_blocks(monkeypatch) -> None:
    q, k, v = _inputs()
    L = q.shape[2]
    keep = _keep(L, None, left_pad=50)
    mask = torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
    sem = R._Semantics(0.3, 2.0, 0.0, False)  # eager: fully masked rows are uniform
    # a budget that forces blocks of query rows on the dense (eager) path too
    _compare(q, k, v, mask, None, sem, chunk=2 * 300 * 4 * 6 * 40, monkeypatch=monkeypatch)


@pytest.mark.parametrize("T,divide", [(1.0, False), (3.0, True)])
def test_learned_bias_and_weights_gradients(T, divide) -> None:
    q, k, v = _inputs(L=64)
    g = torch.Generator().manual_seed(5)
    bias = torch.randn(1, 4, 64, 64, generator=g)  # e.g. a relative-position bias
    keep = _keep(64, None, left_pad=0)
    sem = R._Semantics(0.25, None, 0.0, True)
    _compare(q, k, v, bias, keep, sem, T=T, divide=divide, with_weights=True)


def test_half_precision_inputs_work_in_float32() -> None:
    q, k, v = _inputs(L=40, dtype=torch.bfloat16)
    sem = R._Semantics(0.25, None, 0.0, True)
    keep = _keep(40, None, 0)
    g_out = torch.randn(2, 40, 4, 16, generator=torch.Generator().manual_seed(3)).bfloat16()
    got = R._gim_attention_grads(q, k, v, None, keep, g_out, None, sem, 2.0, (1, 1, 1), False)
    assert all(t.dtype == torch.float32 for t in got[:3])
    # exactly the float32 computation on the upcast inputs
    up = [t.float() for t in (q, k, v)]
    ref = R._gim_attention_grads(*up, None, keep, g_out.float(), None, sem, 2.0, (1, 1, 1), False)
    for a, e in zip(got[:3], ref[:3]):
        assert torch.isfinite(a).all() and torch.equal(a, e)
