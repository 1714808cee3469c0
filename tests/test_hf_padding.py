"""Padded batches: each row's GIM attribution equals that row attributed alone.

Left and right padding with an attention mask, for decoders (through
``answer_token_attribution``, whose target is each row's last real token) and encoders
(through ``LayerGIM``), under eager and SDPA attention (SDPA gives fully masked query rows
zeros, eager a uniform row: GIM's backward follows each).
"""

from __future__ import annotations

import pytest
import torch

from test_hf_helpers import BUILDERS

from captum_gim import LayerGIM
from captum_gim.adapters.transformers import answer_token_attribution

DECODERS = [
    ("llama", "sdpa"),
    ("llama", "eager"),
    ("mistral", "sdpa"),  # sliding window 4 < length 7
    ("qwen2", "sdpa"),
    ("gemma2", "eager"),
    ("phi3", "sdpa"),
    ("gpt2", "sdpa"),  # absolute positions: left padding needs generate's position ids
    ("gpt2", "eager"),
    ("mixtral", "sdpa"),
]

LONG = torch.tensor([11, 23, 5, 17, 42, 8, 30])
SHORT = torch.tensor([9, 14, 33, 21])
PAD = 0


def _batch(side: str, pad_id: int = PAD):
    n = len(LONG) - len(SHORT)
    pad = torch.full((n,), pad_id)
    short = torch.cat([pad, SHORT]) if side == "left" else torch.cat([SHORT, pad])
    mask_short = torch.cat([torch.zeros(n), torch.ones(len(SHORT))]) if side == "left" else (
        torch.cat([torch.ones(len(SHORT)), torch.zeros(n)])
    )
    ids = torch.stack([LONG, short])
    mask = torch.stack([torch.ones(len(LONG)), mask_short]).long()
    return ids, mask


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name,impl", DECODERS)
def test_decoder_rows_equal_rows_alone(name: str, impl: str, side: str) -> None:
    model = BUILDERS[name](impl)
    ids, mask = _batch(side)
    answers = [5, 7]
    batch = answer_token_attribution(model, ids, answers, attention_mask=mask, strict=True)
    alone_long = answer_token_attribution(model, LONG[None], 5, strict=True)
    alone_short = answer_token_attribution(model, SHORT[None], 7, strict=True)
    real = mask[1].bool()
    torch.testing.assert_close(batch[0], alone_long[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(batch[1][real], alone_short[0], atol=1e-5, rtol=1e-4)
    assert torch.all(batch[1][~real] == 0)
    assert alone_short.abs().max() > 1e-3


@pytest.mark.parametrize("name,impl,pad_id", [
    ("bert", "sdpa", 0), ("bert", "eager", 0), ("roberta", "sdpa", 1), ("roberta", "eager", 1),
])
def test_encoder_rows_equal_rows_alone(name: str, impl: str, pad_id: int) -> None:
    model = BUILDERS[name](impl)
    ids, mask = _batch("right", pad_id)

    def fwd(x, m=None):
        return model(input_ids=x, attention_mask=m).logits

    lg = LayerGIM(fwd, model.get_input_embeddings(), model=model, strict=True)
    batch = lg.attribute(ids, baselines=pad_id, target=[1, 2], additional_forward_args=(mask,))
    long_alone = lg.attribute(LONG[None], baselines=pad_id, target=1)
    short_alone = lg.attribute(SHORT[None], baselines=pad_id, target=2)
    torch.testing.assert_close(batch[0], long_alone[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(batch[1][: len(SHORT)], short_alone[0], atol=1e-5, rtol=1e-4)
    assert short_alone.abs().max() > 1e-3
