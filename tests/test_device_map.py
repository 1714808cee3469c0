"""Models dispatched with accelerate (``device_map=...``) get exactly the attributions of the
same model loaded whole (issue 11.4).

accelerate replaces ``forward`` on each dispatched module *instance* with a hook that
brings offloaded weights in (from the CPU or from disk) before the module runs and sends
them back after; GIM installs its forwards on module instances too. These tests load a
tiny checkpoint whole and with CPU + disk offload and compare ``answer_token_attribution``
(``LayerGIM`` at the embeddings) bit for bit, check that GIM did change the gradient, and
that accelerate's hooks are intact after the scope. A CUDA test (``device_map="auto"``)
runs where a GPU is present.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

sys.path.insert(0, str(Path(__file__).parent))
from _tiny_lm import save, tiny_gpt2, tiny_llama  # noqa: E402

from captum_gim.adapters.transformers import answer_token_attribution  # noqa: E402

IDS = torch.tensor([[2, 4, 6, 8, 9, 4, 11]])
ANSWER = 7

LLAMA_MAP = {
    "model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
    "model.layers.1": "disk", "model.norm": "cpu", "lm_head": "disk",
}
GPT2_MAP = {
    "transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.h.0": "disk",
    "transformer.h.1": "cpu", "transformer.ln_f": "disk", "lm_head": "cpu",
}


def _load(path: Path, **kwargs):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "some parameters are on the meta device"
    try:
        return AutoModelForCausalLM.from_pretrained(str(path), **kwargs).eval()
    finally:
        hf_logging.set_verbosity(verbosity)


def _hooked(model):
    return {n: m.forward for n, m in model.named_modules() if hasattr(m, "_hf_hook")}


def _check(make, device_map, tmp_path):
    path = save(make(seed=3), tmp_path / "ckpt")
    whole = _load(path)
    split = _load(path, device_map=device_map, offload_folder=str(tmp_path / "offload"))
    assert {"disk", "cpu"} <= set(split.hf_device_map.values())
    meta = [n for n, p in split.named_parameters() if p.device.type == "meta"]
    assert meta, "nothing was offloaded: the test would prove nothing"
    hooks = _hooked(split)
    assert hooks

    want = answer_token_attribution(whole, IDS, ANSWER, baseline_token_id=0)
    got = answer_token_attribution(split, IDS, ANSWER, baseline_token_id=0)
    plain = answer_token_attribution(whole, IDS, ANSWER, baseline_token_id=0, temperature=1.0,
                                     freeze_norms=False, divide_grads=False)
    assert not torch.allclose(want, plain, atol=1e-4), "GIM changed nothing: vacuous"
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # accelerate's hooks are left as they were, offloaded weights offloaded again
    assert _hooked(split) == hooks
    assert [n for n, p in split.named_parameters() if p.device.type == "meta"] == meta
    with torch.no_grad():
        torch.testing.assert_close(split(IDS).logits, whole(IDS).logits, rtol=0, atol=0)


@pytest.mark.slow
def test_llama_cpu_and_disk_offload_equals_whole(tmp_path):
    _check(tiny_llama, LLAMA_MAP, tmp_path)


@pytest.mark.slow
def test_gpt2_offloaded_layernorm_equals_whole(tmp_path):
    """GPT-2's torch.nn.LayerNorm modules carry accelerate hooks of their own (offloaded
    leaves with parameters): GIM's forward is installed under the hook, which keeps loading
    and offloading their weights."""
    _check(tiny_gpt2, GPT2_MAP, tmp_path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_device_map_auto_equals_whole(tmp_path):
    path = save(tiny_llama(seed=3), tmp_path / "ckpt")
    whole = _load(path).to("cuda")
    split = _load(path, device_map="auto")
    ids = IDS.to("cuda")
    want = answer_token_attribution(whole, ids, ANSWER, baseline_token_id=0)
    got = answer_token_attribution(split, ids, ANSWER, baseline_token_id=0)
    torch.testing.assert_close(got.cpu(), want.cpu(), rtol=1e-5, atol=1e-6)
