"""GIM inside inseq (issue 11.3): ``inseq.load_model(model, "gim")`` on tiny GPT-2 and Llama
(decoder-only) and BART (encoder-decoder) models built offline with a word-level
tokenizer. Each generation step's granular scores are checked against
:class:`~captum_gim.LayerGIM` on the embedding layer, computed directly on token ids
(``baselines=None``: GIM-grad x embedding) for the same step target (the raw logit).
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest
import torch

inseq = pytest.importorskip("inseq")
pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).parent))
from _tiny_lm import tiny_gpt2, tiny_llama, vocab_size, word_tokenizer  # noqa: E402

import captum_gim.integrations.inseq  # noqa: E402,F401  (registers "gim")
from captum_gim import LayerGIM  # noqa: E402

PROMPT = "the cat sat on the"
GEN = {"max_new_tokens": 3, "do_sample": False}


def _last_logits(model, ids, decoder_ids=None):
    if decoder_ids is None:
        return model(input_ids=ids, use_cache=False).logits[:, -1]
    return model(input_ids=ids, decoder_input_ids=decoder_ids, use_cache=False).logits[:, -1]


def test_gim_is_registered():
    assert "gim" in inseq.list_feature_attribution_methods()


@pytest.mark.slow
@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
def test_decoder_only_steps_equal_layer_gim(make):
    model, tok = make(seed=4), word_tokenizer()
    im = inseq.load_model(model, "gim", tokenizer=tok)
    out = im.attribute(PROMPT, generation_args=GEN, attributed_fn="logit", show_progress=False)
    seq = out.sequence_attributions[0]
    ids = torch.tensor([[t.id for t in seq.target]])
    n_prompt = len(tok(PROMPT)["input_ids"])
    n_steps = ids.shape[1] - n_prompt
    assert n_steps >= 1 and seq.target_attributions.shape[1] == n_steps
    emb = model.get_input_embeddings()
    plain_differs = False
    for j in range(n_steps):
        prefix, target = ids[:, : n_prompt + j], int(ids[0, n_prompt + j])
        want = LayerGIM(functools.partial(_last_logits, model), emb, model=model).attribute(
            prefix, target=target)[0]
        got = seq.target_attributions[: n_prompt + j, j]
        assert want.abs().max() > 1e-5
        torch.testing.assert_close(got.float(), want.float(), rtol=1e-4, atol=1e-6)
        plain = LayerGIM(functools.partial(_last_logits, model), emb, model=model, temperature=1.0,
                         freeze_norms=False, divide_grads=False).attribute(prefix, target=target)[0]
        plain_differs |= not torch.allclose(plain, want, atol=1e-5)
    assert plain_differs, "GIM equal to the plain gradient: the check would be vacuous"
    html = out.show(display=False, return_html=True)
    assert "quick" in html or "[EOS]" in html or len(html) > 100


@pytest.mark.slow
def test_encoder_decoder_steps_equal_layer_gim():
    import transformers

    torch.manual_seed(5)
    cfg = transformers.BartConfig(
        vocab_size=vocab_size(), d_model=32, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
        decoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=0, bos_token_id=2,
        eos_token_id=3, decoder_start_token_id=2, forced_eos_token_id=None, scale_embedding=False,
    )
    model = transformers.BartForConditionalGeneration(cfg).eval()
    tok = word_tokenizer()
    im = inseq.load_model(model, "gim", tokenizer=tok)
    # a forced target (random weights would stop at once): every step is attributed
    out = im.attribute(PROMPT, "the dog ran", attributed_fn="logit", attribute_target=True,
                       show_progress=False)
    seq = out.sequence_attributions[0]
    src = torch.tensor([[t.id for t in seq.source]])
    tgt = torch.tensor([[t.id for t in seq.target]])
    n_steps = tgt.shape[1] - 1
    assert n_steps >= 1
    assert seq.source_attributions.shape[:2] == (src.shape[1], n_steps)
    dec_emb = model.get_decoder().embed_tokens
    for j in range(n_steps):
        prefix, target = tgt[:, : j + 1], int(tgt[0, j + 1])
        # decoder-side scores: LayerGIM at the decoder's embedding layer
        g = functools.partial(_last_logits, model, src)
        want_tgt = LayerGIM(g, dec_emb, model=model).attribute(prefix, target=target)[0]
        torch.testing.assert_close(seq.target_attributions[: j + 1, j].float(), want_tgt.float(),
                                   rtol=1e-4, atol=1e-6)
        # source-side scores: LayerGIM at the encoder's embedding layer (when the encoder
        # has its own embedding module; a shared one is attributed at its last call)
        enc_emb = model.get_encoder().embed_tokens
        if enc_emb is not dec_emb:
            h = functools.partial(lambda dec, ids: _last_logits(model, ids, dec), prefix)
            want_src = LayerGIM(h, enc_emb, model=model).attribute(src, target=target)[0]
            torch.testing.assert_close(seq.source_attributions[:, j].float(), want_src.float(),
                                       rtol=1e-4, atol=1e-6)
        assert seq.source_attributions[:, j].abs().max() > 1e-6
