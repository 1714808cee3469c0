"""LLMs through Captum: ``LLMGradientAttribution(LayerGIM(...), tokenizer)`` end to end.

A tiny Llama and a real fast tokenizer built offline with the ``tokenizers`` library
(wrapped in ``transformers.PreTrainedTokenizerFast``; Captum 0.9 needs its offsets
mapping), a multi-token target, and the plots of ``LLMAttributionResult``. Also the
paper's one-call helper, checked against ``LayerGIM`` used by hand.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pytest
import torch
from captum.attr import LayerGradientXActivation, LLMGradientAttribution, TextTokenInput

from test_hf_helpers import build_llama

from captum_gim import LayerGIM
from captum_gim.adapters.transformers import (
    answer_token_attribution,
    default_baseline_token_id,
    last_token_logits,
)

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

WORDS = (
    "the a cat dog mat sat ran on and in of to is was it big small red blue house tree "
    "bird sun moon sky river runs sits sees under over near far quick slow brown lazy fox "
    "jumps eats home day night"
).split()


def make_tokenizer() -> "transformers.PreTrainedTokenizerFast":
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    specials = ["[PAD]", "[UNK]", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", vocab["<s>"])]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="<s>", eos_token="</s>"
    )


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    m = build_llama("sdpa", pad_token_id=0, bos_token_id=2, eos_token_id=3)
    assert m.config.vocab_size >= len(tokenizer)
    return m


PROMPT = "the quick brown fox jumps over the lazy"
TARGET = "dog and sits"


def _manual(lm, tokenizer, method_cls, **method_kwargs):
    """Per target token: the wrapped method's attribution of log p(token), summed over hidden."""
    prompt = tokenizer.encode(PROMPT, return_tensors="pt")
    target = tokenizer.encode(TARGET, add_special_tokens=False)
    rows = []
    for i, tok in enumerate(target):
        ids = torch.cat([prompt, torch.tensor([target[:i]], dtype=torch.long)], dim=1)

        def fwd(x, tok=tok):
            return torch.log_softmax(lm(input_ids=x).logits[:, -1], dim=-1)[:, tok]

        m = method_cls(fwd, lm.get_input_embeddings(), **method_kwargs)
        a = m.attribute(ids).sum(-1)[0, : prompt.shape[1]]
        rows.append(a.detach())
    return torch.stack(rows)


def _has_skip_tokens(llm) -> bool:
    import inspect

    return "skip_tokens" in inspect.signature(llm.attribute).parameters


def test_llm_gradient_attribution_end_to_end(model, tokenizer) -> None:
    llm = LLMGradientAttribution(LayerGIM(model, model.get_input_embeddings()), tokenizer)
    inp = TextTokenInput(PROMPT, tokenizer)
    # Captum 0.8 tokenizes a str target with the special tokens unless told to skip them
    # (its skip_tokens); 0.9 encodes it without them and has no skip_tokens
    skip = {"skip_tokens": [tokenizer.bos_token_id]} if _has_skip_tokens(llm) else {}
    result = llm.attribute(inp, target=TARGET, **skip)
    n_target = len(tokenizer.encode(TARGET, add_special_tokens=False))
    n_prompt = len(tokenizer.encode(PROMPT))
    assert n_target == 3
    assert result.token_attr.shape == (n_target, n_prompt)
    assert result.seq_attr.shape == (n_prompt,)
    assert result.output_tokens == TARGET.split()
    assert result.input_tokens[0] == "<s>" and result.input_tokens[1:] == PROMPT.split()

    # it is GIM: the same numbers as LayerGIM by hand, and not the plain gradient
    expected = _manual(model, tokenizer, LayerGIM, model=model)
    torch.testing.assert_close(result.token_attr, expected, atol=1e-5, rtol=1e-4)
    plain = _manual(model, tokenizer, LayerGradientXActivation)
    assert (result.token_attr - plain).abs().max() > 1e-3
    torch.testing.assert_close(result.seq_attr, expected.sum(0), atol=1e-5, rtol=1e-4)

    fig, ax = result.plot_token_attr(show=False)
    assert fig is not None and ax is not None
    fig2, ax2 = result.plot_seq_attr(show=False)
    assert fig2 is not None and ax2 is not None
    import matplotlib.pyplot as plt

    plt.close("all")
    assert model.config._attn_implementation == "sdpa" and model.config.use_cache is True


def test_llm_gradient_attribution_with_skip_tokens_and_generation(model, tokenizer) -> None:
    llm = LLMGradientAttribution(LayerGIM(model, model.get_input_embeddings()), tokenizer)
    inp = TextTokenInput(PROMPT, tokenizer, skip_tokens=["<s>"])
    result = llm.attribute(inp, gen_args={"max_new_tokens": 2, "do_sample": False})
    assert result.token_attr.shape == (2, len(PROMPT.split()))
    assert torch.isfinite(result.token_attr).all()


def test_answer_token_attribution_is_the_papers_setting(model, tokenizer) -> None:
    ids = tokenizer(["the cat sat on the", "a big red"], return_tensors="pt", padding=True)
    input_ids, mask = ids["input_ids"], ids["attention_mask"]
    answer = tokenizer.convert_tokens_to_ids("mat")
    base = default_baseline_token_id(model)
    assert base == 0  # the pad token

    got = answer_token_attribution(model, input_ids[:1], answer)
    # by hand: raw logit at the last position, baseline = one token everywhere, summed
    lg = LayerGIM(lambda x: model(input_ids=x).logits[:, -1], model.get_input_embeddings(), model=model)
    by_hand = lg.attribute(input_ids[:1], baselines=torch.full_like(input_ids[:1], base), target=answer)
    torch.testing.assert_close(got, by_hand.sum(-1), atol=1e-6, rtol=1e-5)

    per_hidden = answer_token_attribution(model, input_ids[:1], answer, sum_hidden=False)
    assert per_hidden.shape == (*input_ids[:1].shape, model.config.hidden_size)

    # right-padded batch (the tokenizer's default): row 2 equals row 2 alone
    batch = answer_token_attribution(model, input_ids, [answer, answer], attention_mask=mask)
    alone = answer_token_attribution(model, input_ids[1:2, : int(mask[1].sum())], answer)
    torch.testing.assert_close(batch[1, : int(mask[1].sum())], alone[0], atol=1e-5, rtol=1e-4)
    assert torch.all(batch[1, int(mask[1].sum()) :] == 0)

    logits = last_token_logits(model, input_ids, mask)
    with torch.no_grad():
        full = model(input_ids=input_ids, attention_mask=mask).logits
    assert torch.equal(logits[1], full[1, int(mask[1].sum()) - 1])


def test_answer_token_attribution_errors(model) -> None:
    ids = torch.tensor([[2, 5, 6]])
    with pytest.raises(TypeError, match="integer tensor"):
        answer_token_attribution(model, ids.float(), 5)
    with pytest.raises(ValueError, match="one per row"):
        answer_token_attribution(model, ids, [1, 2, 3])
    with pytest.raises(ValueError, match="does not match"):
        answer_token_attribution(model, ids, 5, attention_mask=torch.ones(1, 2))
    with pytest.raises(ValueError, match="no real token"):
        answer_token_attribution(model, ids, 5, attention_mask=torch.zeros(1, 3))
