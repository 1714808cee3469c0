"""Text result objects: next-token and classification helpers against LayerGIM computed
by hand at the embeddings; DataFrame, visualize_text and LLMAttributionResult renderings;
the recommended baseline token per model kind."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from test_hf_helpers import build_llama  # noqa: E402
from test_hf_llm import WORDS, make_tokenizer  # noqa: E402

from captum_gim import LayerGIM  # noqa: E402
from captum_gim.adapters.transformers import (  # noqa: E402
    TextAttribution,
    next_token_attribution,
    recommended_baseline_token,
    text_classification_attribution,
)


def bert_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {t: i for i, t in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]",
    )


@pytest.fixture(scope="module")
def lm():
    return build_llama("sdpa", pad_token_id=0, bos_token_id=2, eos_token_id=3)


@pytest.fixture(scope="module")
def clf():
    cfg = transformers.BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, num_labels=3, max_position_embeddings=32,
        id2label={0: "neg", 1: "neu", 2: "pos"}, label2id={"neg": 0, "neu": 1, "pos": 2},
    )
    torch.manual_seed(0)
    m = transformers.BertForSequenceClassification(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m


def test_recommended_baseline_token() -> None:
    tok = make_tokenizer()
    assert recommended_baseline_token(tok, "causal-lm") == tok.pad_token_id == 0
    bt = bert_tokenizer()
    assert recommended_baseline_token(bt, "encoder") == bt.pad_token_id == 0
    assert recommended_baseline_token(bt, "encoder", "[MASK]") == 4
    assert recommended_baseline_token(bt, "encoder", 7) == 7
    bt.pad_token = None
    assert recommended_baseline_token(bt, "encoder") == 4  # [MASK] when there is no [PAD]
    tok.pad_token = None
    assert recommended_baseline_token(tok, "causal-lm") == tok.eos_token_id
    tok.eos_token = None
    with pytest.raises(ValueError, match="name one"):
        recommended_baseline_token(tok, "causal-lm")
    with pytest.raises(ValueError, match="model_kind"):
        recommended_baseline_token(tok, "seq2seq")
    with pytest.raises(ValueError, match="no token"):
        recommended_baseline_token(make_tokenizer(), "causal-lm", "zebra")


def test_next_token_result_equals_layer_gim(lm) -> None:
    tok = make_tokenizer()
    prompt = "the quick brown fox jumps over the lazy"
    res = next_token_attribution(lm, tok, prompt, answer="dog")
    assert isinstance(res, TextAttribution)
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    assert res.tokens == ["<s>"] + prompt.split()
    assert res.target == tok.convert_tokens_to_ids("dog") and res.target_label == "dog"
    lg = LayerGIM(lambda x: lm(input_ids=x).logits[:, -1], lm.get_input_embeddings(), model=lm)
    by_hand = lg.attribute(ids, baselines=torch.zeros_like(ids), target=res.target).sum(-1)[0]
    torch.testing.assert_close(res.scores, by_hand, atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(res.output, lm(input_ids=ids).logits[0, -1])
    greedy = next_token_attribution(lm, tok, prompt)
    assert greedy.target == int(res.output.argmax())

    df = res.to_dataframe()
    assert list(df.columns) == ["position", "token", "score"]
    assert list(df.token) == res.tokens
    assert torch.allclose(torch.tensor(df.score.values, dtype=torch.float32), res.scores)
    fig, ax = res.plot()
    assert fig is not None
    import matplotlib.pyplot as plt

    plt.close("all")
    llm = res.to_llm_result()
    assert llm.token_attr.shape == (1, len(res.tokens)) and llm.output_tokens == ["dog"]


def test_classification_result_equals_layer_gim(clf) -> None:
    tok = bert_tokenizer()
    text = "the cat sat on the mat"
    res = text_classification_attribution(clf, tok, text, temperature=1.5)
    ids = tok(text, return_tensors="pt")["input_ids"]
    assert res.tokens == ["[CLS]"] + text.split() + ["[SEP]"]
    with torch.no_grad():
        logits = clf(input_ids=ids).logits[0]
    assert res.target == int(logits.argmax())
    assert res.target_label == clf.config.id2label[res.target]
    lg = LayerGIM(lambda x: clf(input_ids=x).logits, clf.get_input_embeddings(), model=clf, temperature=1.5)
    by_hand = lg.attribute(ids, baselines=tok.pad_token_id, target=res.target).sum(-1)[0]
    torch.testing.assert_close(res.scores, by_hand, atol=1e-6, rtol=1e-5)
    # and it is GIM, not the plain gradient
    off = LayerGIM(
        lambda x: clf(input_ids=x).logits, clf.get_input_embeddings(), model=clf,
        temperature=1.0, freeze_norms=False, divide_grads=False,
    ).attribute(ids, baselines=0, target=res.target).sum(-1)[0]
    assert (off - res.scores).abs().max() > 1e-4

    other = text_classification_attribution(clf, tok, text, target=0, baseline_token="[MASK]")
    by_hand0 = lg.attribute(ids, baselines=4, target=0).sum(-1)[0]
    assert other.baseline_token_id == 4
    torch.testing.assert_close(other.scores, LayerGIM(
        lambda x: clf(input_ids=x).logits, clf.get_input_embeddings(), model=clf
    ).attribute(ids, baselines=4, target=0).sum(-1)[0], atol=1e-6, rtol=1e-5)
    assert (by_hand0 - other.scores).abs().max() > 0  # temperature 1.5 vs 2.0 differ

    pytest.importorskip("IPython")
    html = res.visualize()
    assert "[CLS]" in html.data and res.target_label in html.data
