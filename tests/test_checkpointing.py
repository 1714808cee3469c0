"""Gradient checkpointing gives the attributions computed without it.

Hugging Face ``gradient_checkpointing_enable()`` (train and eval mode) and
``torch.utils.checkpoint`` around ``torch.nn`` blocks: the checkpointed block is recomputed
in the backward pass, in the context of whoever runs the backward pass, where the scope's
settings are looked up again, so the recomputation is GIM's too. The reentrant variant
cannot be used with ``torch.autograd.grad`` (PyTorch refuses; Captum computes gradients
that way) but works with ``.backward()`` inside :func:`gim_backward`. For blocks that only
the functional layer covers, the non-reentrant recomputation runs outside the model's
forward, and PyTorch's ``CheckpointError`` says so (never a silent plain gradient).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from _scope_state import snapshot
from captum_gim import GIMAttribution, LayerGIM, gim_backward


class Net(nn.Module):
    def __init__(self, block, use_reentrant=None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([block() for _ in range(2)])
        self.head = nn.Linear(16, 3)
        self.use_reentrant = use_reentrant  # None: no checkpointing

    def forward(self, x: Tensor) -> Tensor:
        for b in self.blocks:
            if self.use_reentrant is None:
                x = b(x)
            else:
                x = checkpoint(b, x, use_reentrant=self.use_reentrant)
        return self.head(x[:, -1])


def _torch_nn_block() -> nn.Module:
    return nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)


class FunctionalBlock(nn.Module):
    """Only the functional layer covers this one (F.layer_norm, SDPA)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(16))
        self.qkv, self.o = nn.Linear(16, 48), nn.Linear(16, 16)

    def forward(self, x: Tensor) -> Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(F.layer_norm(x, (D,), self.w)).split(D, -1)
        q, k, v = (t.view(B, L, 4, D // 4).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return x + self.o(a.transpose(1, 2).reshape(B, L, D))


X = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_torch_nn_blocks_checkpointed(mode: str) -> None:
    torch.manual_seed(0)
    net = Net(_torch_nn_block).train(mode == "train")
    ref = GIMAttribution(net).attribute(X, target=1)
    plain = GIMAttribution(net, temperature=1.0, freeze_norms=False, divide_grads=False).attribute(X, target=1)
    assert not torch.allclose(ref, plain)
    before = snapshot(net)
    net.use_reentrant = False
    torch.testing.assert_close(GIMAttribution(net).attribute(X, target=1), ref, atol=0, rtol=0)
    # the reentrant variant, with .backward() (PyTorch refuses it with autograd.grad)
    net.use_reentrant = True
    x = X.clone().requires_grad_()
    with gim_backward(net):
        net(x)[:, 1].sum().backward()
    torch.testing.assert_close(x.grad * X, ref, atol=1e-6, rtol=1e-5)
    assert snapshot(net) == before


def test_functional_only_blocks_are_refused_loudly_when_checkpointed() -> None:
    torch.manual_seed(0)
    net = Net(FunctionalBlock).eval()
    ref = GIMAttribution(net).attribute(X, target=1)
    net.use_reentrant = False
    with pytest.raises(Exception, match="[Rr]ecomputed"):
        GIMAttribution(net).attribute(X, target=1)
    net.use_reentrant = None
    torch.testing.assert_close(GIMAttribution(net).attribute(X, target=1), ref, atol=0, rtol=0)


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("kwargs", [None, {"use_reentrant": False}], ids=["default", "non-reentrant"])
def test_hf_gradient_checkpointing_enable(mode: str, kwargs) -> None:
    pytest.importorskip("transformers")
    from test_hf_helpers import build_llama

    model = build_llama("sdpa")  # no dropout in the config: train mode computes the same
    ids = torch.randint(4, 64, (2, 7), generator=torch.Generator().manual_seed(1))

    def forward(i: Tensor) -> Tensor:
        return model(input_ids=i).logits[:, -1]

    emb = model.get_input_embeddings()
    ref = LayerGIM(forward, emb, model=model).attribute(ids, target=5)
    plain = LayerGIM(forward, emb, model=model, temperature=1.0, freeze_norms=False,
                     divide_grads=False).attribute(ids, target=5)
    assert not torch.allclose(ref, plain)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    try:
        model.train(mode == "train")
        assert model.model.gradient_checkpointing
        before = snapshot(model)
        got = LayerGIM(forward, emb, model=model).attribute(ids, target=5)
        assert snapshot(model) == before
    finally:
        model.gradient_checkpointing_disable()
        model.eval()
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)
