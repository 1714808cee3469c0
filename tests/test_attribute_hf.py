"""``attribute`` on Hugging Face checkpoints (tiny GPT-2, Llama and BERT classifier saved to
folders): every record of a padded batch equals the direct call on that row alone
(``answer_token_attribution``, ``text_classification_attribution``, Captum's
``LayerIntegratedGradients``) within 1e-5; bad rows are reported with their row numbers
and the run goes on; parquet and safetensors hold the same records."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("datasets")
pytest.importorskip("pyarrow")

from _tiny_lm import save, tiny_gpt2, tiny_llama, vocab_size, word_tokenizer  # noqa: E402

from captum_gim.adapters.transformers import (  # noqa: E402
    answer_token_attribution,
    last_token_logits,
    text_classification_attribution,
)
from captum_gim.dataset import attribute_dataset, load_attributions  # noqa: E402

PROMPTS = [
    "the cat sat on the", "a dog ran to the park and", "it", "the quick brown fox jumps over the lazy",
    "a bird saw the tree", "the big red dog was", "then it ran home", "the small blue mat is",
]
TEXTS = [
    "the cat sat on the mat", "a dog ran", "the quick brown fox jumps over the lazy dog", "it saw a bird",
    "big", "the red tree and the blue rug", "then the cat ran home", "a small dog",
]
LABELS = ["neg", "neu", "pos"]


def classifier(seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        vocab_size=vocab_size(), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, num_labels=3, pad_token_id=0,
        id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)},
    )
    return transformers.BertForSequenceClassification(cfg).eval()


def write_jsonl(path: Path, rows: List[Dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> Dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return {
        "gpt2": save(tiny_gpt2(), root / "gpt2", word_tokenizer()),
        "llama": save(tiny_llama(), root / "llama", word_tokenizer(bos=True)),
        "bert": save(classifier(), root / "bert", word_tokenizer()),
    }


def _load(path: Path, kind: str):
    import transformers

    auto = transformers.AutoModelForCausalLM if kind == "lm" else transformers.AutoModelForSequenceClassification
    model = auto.from_pretrained(str(path)).eval()
    return model, transformers.AutoTokenizer.from_pretrained(str(path))


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_causal_lm_batch_equals_each_row_alone(ckpts, tmp_path, name):
    rows = [{"prompt": p} for p in PROMPTS]
    rows[1]["answer"] = "home"  # the others: the greedy next token
    rows[5]["answer"] = "tree"
    data = write_jsonl(tmp_path / "p.jsonl", rows)
    run = attribute_dataset(ckpts[name], data, tmp_path / "out", batch_size=3, shard_size=5,
                            progress=False)
    assert run.index["n_records"] == len(PROMPTS) and run.index["n_errors"] == 0
    records = load_attributions(tmp_path / "out")
    assert [r["row"] for r in records] == list(range(len(PROMPTS)))
    model, tok = _load(ckpts[name], "lm")
    base = tok.pad_token_id
    for rec, row in zip(records, rows):
        ids = tok(row["prompt"], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = last_token_logits(model, ids)[0]
        target = tok.convert_tokens_to_ids(row["answer"]) if "answer" in row else int(logits.argmax())
        ref = answer_token_attribution(model, ids, target, baseline_token_id=base)[0]
        assert rec["target"] == target and rec["token_ids"] == ids[0].tolist()
        assert rec["tokens"] == tok.convert_ids_to_tokens(ids[0].tolist())
        np.testing.assert_allclose(rec["scores"], ref.numpy(), atol=1e-5, rtol=0)
        assert rec["output"] == pytest.approx(float(logits[target]), abs=1e-5)
        assert rec["prediction"] == int(logits.argmax())


def test_classifier_batch_equals_each_row_alone(ckpts, tmp_path):
    rows = [{"text": t} for t in TEXTS]
    rows[2]["label"] = "pos"
    rows[4]["label"] = 0
    data = write_jsonl(tmp_path / "c.jsonl", rows)
    attribute_dataset(ckpts["bert"], data, tmp_path / "out", batch_size=4, shard_size=3,
                      progress=False)
    records = load_attributions(tmp_path / "out")
    model, tok = _load(ckpts["bert"], "clf")
    for rec, row in zip(records, rows):
        label = row.get("label")
        target = None if label is None else (LABELS.index(label) if isinstance(label, str) else label)
        ref = text_classification_attribution(model, tok, row["text"], target)
        assert rec["target"] == ref.target and rec["target_label"] == LABELS[ref.target]
        np.testing.assert_allclose(rec["scores"], ref.scores.numpy(), atol=1e-5, rtol=0)
        np.testing.assert_allclose(rec["logits"], ref.output.numpy(), atol=1e-5, rtol=0)
        assert rec["tokens"] == ref.tokens


def test_classifier_ig_equals_layer_integrated_gradients(ckpts, tmp_path):
    from captum.attr import LayerIntegratedGradients

    data = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in TEXTS[:5]])
    attribute_dataset(ckpts["bert"], data, tmp_path / "out", method="ig", n_steps=8,
                      batch_size=5, progress=False)
    model, tok = _load(ckpts["bert"], "clf")

    def forward(ids, mask):
        return model(input_ids=ids, attention_mask=mask).logits

    lig = LayerIntegratedGradients(forward, model.get_input_embeddings())
    for rec, text in zip(load_attributions(tmp_path / "out"), TEXTS[:5]):
        enc = tok(text, return_tensors="pt")
        ref = lig.attribute(enc["input_ids"], baselines=torch.full_like(enc["input_ids"], tok.pad_token_id),
                            target=rec["target"], additional_forward_args=(enc["attention_mask"],),
                            n_steps=8)
        np.testing.assert_allclose(rec["scores"], ref[0].sum(-1).detach().numpy(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["gradshap", "saliency", "ig-gim"])
def test_other_methods_do_not_depend_on_the_batch(ckpts, tmp_path, method):
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": p} for p in PROMPTS[:6]])
    runs = []
    for bs in (1, 4):
        out = tmp_path / f"b{bs}"
        attribute_dataset(ckpts["llama"], data, out, method=method, batch_size=bs, n_steps=4,
                          n_samples=3, progress=False)
        runs.append(load_attributions(out))
    for a, b in zip(*runs):
        assert a["target"] == b["target"]
        np.testing.assert_allclose(a["scores"], b["scores"], atol=1e-5, rtol=0)
    assert any(np.abs(r["scores"]).sum() > 0 for r in runs[0])


def test_bad_rows_are_reported_and_the_run_goes_on(ckpts, tmp_path):
    rows = [{"prompt": p} for p in PROMPTS]
    rows[1] = {"prompt": ""}                               # empty
    rows[3]["answer"] = "zebra"                            # not a token of the vocabulary
    rows[4]["answer"] = "the cat"                          # two tokens
    rows[6] = {"prompt": " ".join(["the"] * 12)}           # over --max-length
    rows.append({"prompt": None})                          # missing
    data = write_jsonl(tmp_path / "p.jsonl", rows)
    run = attribute_dataset(ckpts["gpt2"], data, tmp_path / "out", batch_size=4, shard_size=3,
                            max_length=10, progress=False)
    errors = [json.loads(x) for x in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()]
    assert [(e["row"], e["reason"]) for e in errors] == [
        (1, "empty-text"), (3, "bad-answer"), (4, "bad-answer"), (6, "too-long"), (8, "empty-text")]
    assert "12 tokens" in errors[3]["message"] and "zebra" in errors[1]["message"]
    assert [r["row"] for r in load_attributions(tmp_path / "out")] == [0, 2, 5, 7]
    assert run.index["n_errors"] == 5 and run.index["n_records"] == 4
    assert [s["n_errors"] for s in run.index["shards"]] == [1, 2, 2]


def test_classifier_bad_label_and_unknown_target(ckpts, tmp_path):
    data = write_jsonl(tmp_path / "c.jsonl", [{"text": "a dog", "label": "maybe"},
                                              {"text": "the cat", "label": 7},
                                              {"text": "it ran", "label": "neu"}])
    run = attribute_dataset(ckpts["bert"], data, tmp_path / "out", progress=False)
    errors = [json.loads(x) for x in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()]
    assert [(e["row"], e["reason"]) for e in errors] == [(0, "bad-label"), (1, "bad-label")]
    assert [r["target"] for r in load_attributions(tmp_path / "out")] == [1]
    assert run.index["n_records"] == 1
    with pytest.raises(ValueError, match="not a class"):
        attribute_dataset(ckpts["bert"], data, tmp_path / "o2", target="maybe", progress=False)
    with pytest.raises(ValueError, match="needs a 'text' column"):
        attribute_dataset(ckpts["bert"], [{"prompt": "x"}], tmp_path / "o3", progress=False)


def test_safetensors_holds_the_same_records(ckpts, tmp_path):
    data = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in TEXTS[:5]])
    attribute_dataset(ckpts["bert"], data, tmp_path / "pq", shard_size=2, progress=False)
    attribute_dataset(ckpts["bert"], data, tmp_path / "st", shard_size=2, format="safetensors",
                      progress=False)
    assert sorted(p.name for p in (tmp_path / "st").glob("shard-*.safetensors")) == [
        "shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"]
    assert load_attributions(tmp_path / "pq") == load_attributions(tmp_path / "st")
    df = load_attributions(tmp_path / "st", as_dataframe=True)
    assert list(df["row"]) == [0, 1, 2, 3, 4] and "scores" in df.columns
