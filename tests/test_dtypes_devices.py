"""fp32, fp16 and bf16 models; CUDA where present."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from captum_gim import GIMAttribution, LayerGIM, gim_backward

from conftest import assert_model_clean

CUDA = torch.cuda.is_available()
devices = ["cpu"] + (["cuda"] if CUDA else [])


class TokenClassifier(nn.Module):
    def __init__(self, V=30, E=32, H=4):
        super().__init__()
        self.emb = nn.Embedding(V, E)
        layer = nn.TransformerEncoderLayer(E, H, 64, dropout=0.0, batch_first=True, norm_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm = nn.RMSNorm(E)
        self.head = nn.Linear(E, 4)

    def forward(self, ids, kpm=None):
        return self.head(self.norm(self.enc(self.emb(ids), src_key_padding_mask=kpm)).mean(1))


def _model(device, dtype):
    torch.manual_seed(0)
    return TokenClassifier().to(device=device, dtype=dtype).eval()


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_runs_and_agrees_with_fp32(device, dtype):
    ids = torch.randint(0, 30, (3, 9), device=device)
    ref_model = _model(device, torch.float32)
    ref = LayerGIM(ref_model, ref_model.emb).attribute(ids, target=1).sum(-1)
    model = _model(device, dtype)
    out = LayerGIM(model, model.emb).attribute(ids, target=1)
    assert out.dtype == dtype and out.device.type == device
    got = out.float().sum(-1)
    cos = torch.nn.functional.cosine_similarity(got, ref, dim=-1)
    assert torch.all(cos > 0.98), cos
    assert_model_clean(model)


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_forward_unchanged_in_every_dtype(device, dtype):
    model = _model(device, dtype)
    ids = torch.randint(0, 30, (2, 7), device=device)
    kpm = torch.zeros(2, 7, dtype=torch.bool, device=device)
    kpm[1, 5:] = True
    with torch.no_grad():
        y0 = model(ids, kpm)
    with gim_backward(model):
        with torch.no_grad():
            y1 = model(ids, kpm)
        e = model.emb(ids).detach().requires_grad_(True)
        y2 = model.head(model.norm(model.enc(e, src_key_padding_mask=kpm)).mean(1))
    y3 = model.head(model.norm(model.enc(model.emb(ids), src_key_padding_mask=kpm)).mean(1))
    assert torch.equal(y0, y1)
    assert torch.equal(y2, y3)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.gpu
def test_cuda_matches_cpu_fp32():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cpu_model = _model("cpu", torch.float32)
    gpu_model = _model("cuda", torch.float32)
    x = torch.randn(2, 6, 32)
    a = GIMAttribution(lambda e: cpu_model.head(cpu_model.norm(cpu_model.enc(e)).mean(1)), cpu_model).attribute(x, target=2)
    b = GIMAttribution(lambda e: gpu_model.head(gpu_model.norm(gpu_model.enc(e)).mean(1)), gpu_model).attribute(
        x.cuda(), target=2
    )
    torch.testing.assert_close(b.cpu(), a, atol=1e-4, rtol=1e-3)
