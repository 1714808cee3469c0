"""``captum-gim compare`` on causal LM checkpoints, the paper's setting (issue 11.1).

Tiny ``LlamaForCausalLM`` / ``GPT2LMHeadModel`` checkpoints with seeded random weights and
a word-level tokenizer are saved into temporary directories and compared in-process
through ``captum_gim.cli.main``. The report's GIM scores are checked against an
independent path: :class:`~captum_gim.LayerGIM` on the embedding layer with token ids
(through ``answer_token_attribution`` for one-token answers, and a hand-written
teacher-forced log-probability for longer ones), on a freshly loaded model.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

sys.path.insert(0, str(Path(__file__).parent))
from _tiny_lm import save, tiny_gpt2, tiny_llama, word_tokenizer  # noqa: E402

from captum_gim import LayerGIM  # noqa: E402
from captum_gim.adapters.transformers import answer_token_attribution  # noqa: E402
from captum_gim.cli import main  # noqa: E402
from captum_gim.evaluation.tasks.hf_causal import (  # noqa: E402
    TARGET_LOGIT,
    TARGET_LOGPROB,
    read_prompts,
)
from captum_gim.evaluation.tasks.hf_load import quiet_transformers  # noqa: E402

FAST = ["--quick", "--no-progress", "--no-memory", "--methods", "gim,ig,random",
        "--bootstrap", "20", "--n-steps", "4", "--infidelity-samples", "2"]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    return {
        "llama": save(tiny_llama(seed=1), d / "llama", word_tokenizer(bos=True)),
        # no pad token anywhere: the baseline falls back to EOS
        "gpt2": save(tiny_gpt2(seed=2), d / "gpt2", word_tokenizer(pad=False)),
        "no_tokenizer": save(tiny_llama(seed=1), d / "no_tokenizer"),
    }


def _run(capsys, model: Path, inputs: Path, out: Path, *extra: str):
    rc = main(["compare", "--model", str(model), "--inputs", str(inputs), "--out", str(out),
               *FAST, *extra])
    captured = capsys.readouterr()
    report = json.loads((out / "report.json").read_text()) if rc == 0 else None
    return rc, report, captured


def _load(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with quiet_transformers():
        return (AutoModelForCausalLM.from_pretrained(str(path)).eval(),
                AutoTokenizer.from_pretrained(str(path)))


def _shown(report, i):
    ex = next(e for e in report["examples_shown"] if e["index"] == i)
    return torch.tensor(ex["scores"]["gim"], dtype=torch.float64), ex


@pytest.mark.slow
def test_llama_prompts_greedy_answer_matches_layer_gim(ckpts, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# a comment\nthe cat sat on the\n\nthe quick brown fox jumps over the lazy\n")
    rc, report, captured = _run(capsys, ckpts["llama"], prompts, tmp_path / "out")
    assert rc == 0, captured.err
    info = report["task"]["info"]
    assert info["target"] == TARGET_LOGIT
    assert info["baseline_token"] == "[PAD]" and info["baseline_token_id"] == 0
    assert info["baseline_token_source"] == "pad token"
    assert report["task"]["n_examples"] == 2
    # transformers' load chatter is not shown
    assert "UNEXPECTED" not in captured.out + captured.err
    assert "Loading weights" not in captured.out + captured.err

    model, tok = _load(ckpts["llama"])
    for i, text in enumerate(["the cat sat on the", "the quick brown fox jumps over the lazy"]):
        ids = tok(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            greedy = int(model(ids).logits[0, -1].argmax())
        scores, ex = _shown(report, i)
        assert ex["unit_labels"] == tok.convert_ids_to_tokens(ids[0].tolist())
        assert ex["unit_labels"][0] == "[BOS]" and ex["valid"][0] is False  # BOS is not ranked
        assert ex["target"] == greedy
        want = answer_token_attribution(model, ids, greedy, baseline_token_id=0)[0].double()
        assert want.abs().max() > 1e-4  # not vacuous
        torch.testing.assert_close(scores, want, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_gpt2_jsonl_eos_baseline_and_multi_token_answer(ckpts, tmp_path, capsys):
    jsonl = tmp_path / "qa.jsonl"
    jsonl.write_text(
        json.dumps({"prompt": "the dog ran to the", "answer": "park"}) + "\n"
        + json.dumps({"prompt": "a big red bird sat on the", "answer": "tree then"}) + "\n"
    )
    rc, report, captured = _run(capsys, ckpts["gpt2"], jsonl, tmp_path / "out")
    assert rc == 0, captured.err
    info = report["task"]["info"]
    assert info["baseline_token"] == "[EOS]" and info["baseline_token_source"] == "eos token"
    assert info["targets"] == [TARGET_LOGIT, TARGET_LOGPROB]
    assert "teacher-forced" in info["target"]

    model, tok = _load(ckpts["gpt2"])
    eos = tok.eos_token_id
    # one-token answer: the logit of "park" at the last position
    ids = tok("the dog ran to the", return_tensors="pt")["input_ids"]
    scores, ex = _shown(report, 0)
    park = tok.convert_tokens_to_ids("park")
    assert ex["target"] == park
    want = answer_token_attribution(model, ids, park, baseline_token_id=eos)[0].double()
    torch.testing.assert_close(scores, want, rtol=1e-4, atol=1e-6)

    # two-token answer: LayerGIM at the embedding of prompt + answer ids, the target a
    # teacher-forced log-probability written here; the answer positions are their own
    # baseline, so only the prompt is attributed
    prompt = tok("a big red bird sat on the", return_tensors="pt")["input_ids"]
    answer = tok("tree then", add_special_tokens=False, return_tensors="pt")["input_ids"]
    full = torch.cat([prompt, answer], 1)
    n = prompt.shape[1]

    def logprob(ids):
        logp = model(input_ids=ids, use_cache=False).logits.log_softmax(-1)
        return logp[:, n - 1, answer[0, 0]] + logp[:, n, answer[0, 1]]

    base = torch.cat([torch.full_like(prompt, eos), answer], 1)
    attr = LayerGIM(logprob, model.get_input_embeddings(), model=model).attribute(
        full, baselines=base)
    want = attr.sum(-1)[0, :n].double()
    assert attr.sum(-1)[0, n:].abs().max() == 0
    scores, ex = _shown(report, 1)
    assert ex["target"] is None and TARGET_LOGPROB in ex["target_label"]
    assert want.abs().max() > 1e-4
    torch.testing.assert_close(scores, want, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_baseline_token_option(ckpts, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("the cat sat on the\n")
    rc, report, captured = _run(capsys, ckpts["llama"], prompts, tmp_path / "out",
                                "--baseline-token", "[UNK]")
    assert rc == 0, captured.err
    assert report["task"]["info"]["baseline_token"] == "[UNK]"
    assert report["task"]["info"]["baseline_token_source"] == "--baseline-token"
    model, tok = _load(ckpts["llama"])
    ids = tok("the cat sat on the", return_tensors="pt")["input_ids"]
    scores, ex = _shown(report, 0)
    want = answer_token_attribution(model, ids, ex["target"], baseline_token_id=1)[0].double()
    torch.testing.assert_close(scores, want, rtol=1e-4, atol=1e-6)


def test_no_tokenizer_files_is_refused(ckpts, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("the cat sat on the\n")
    rc, _, captured = _run(capsys, ckpts["no_tokenizer"], prompts, tmp_path / "out")
    assert rc == 1
    assert "has no tokenizer files" in captured.err
    assert "tokenizer.save_pretrained" in captured.err
    assert not (tmp_path / "out" / "report.json").exists()


def test_mostly_unknown_tokens_is_refused(ckpts, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("le chat est assis sur le\nthe cat\n")  # 6 of 8 words unknown
    rc, _, captured = _run(capsys, ckpts["llama"], prompts, tmp_path / "out")
    assert rc == 1
    assert "6 of 8 input tokens (75%) into the unknown token '[UNK]'" in captured.err


def test_few_unknown_tokens_pass_the_check(ckpts):
    from captum_gim.evaluation.tasks.hf_load import check_known_tokens, load_tokenizer

    tok = load_tokenizer(ckpts["llama"])
    assert check_known_tokens(tok, ["the cat sat on the zebra"], ckpts["llama"]) == pytest.approx(1 / 6)


def test_causal_lm_needs_inputs_and_a_known_baseline_token(ckpts, tmp_path, capsys):
    rc = main(["compare", "--model", str(ckpts["llama"]), "--no-progress"])
    assert rc == 1 and "JSONL" in capsys.readouterr().err
    prompts = tmp_path / "p.txt"
    prompts.write_text("the cat sat on the\n")
    rc, _, captured = _run(capsys, ckpts["llama"], prompts, tmp_path / "o", "--baseline-token", "zebra")
    assert rc == 1 and "'zebra' is not a token of the vocabulary" in captured.err


def test_read_prompts(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text('{"prompt": "a b", "answer": "c"}\n\n{"prompt": "d"}\n')
    ps = read_prompts(str(f))
    assert [(p.prompt, p.answer) for p in ps] == [("a b", "c"), ("d", None)]
    f.write_text('{"prompt": "a b", "answer": ""}\n')
    with pytest.raises(ValueError, match="x.jsonl:1: the answer must be a non-empty string"):
        read_prompts(str(f))
    f.write_text('{"text": "a"}\n')
    with pytest.raises(ValueError, match="string prompt"):
        read_prompts(str(f))
    t = tmp_path / "x.txt"
    t.write_text("# c\nfirst prompt\n{not json}\n")
    assert [p.prompt for p in read_prompts(str(t))] == ["first prompt", "{not json}"]


def test_quiet_transformers_hides_the_load_report(ckpts, capfd):
    import logging

    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()
    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    hf_logger = logging.getLogger("transformers")
    hf_logger.addHandler(handler)
    try:
        # loading a causal LM as its base model leaves lm_head.weight unused: a load report
        AutoModel.from_pretrained(str(ckpts["llama"]))
        loud = capfd.readouterr()
        assert any("lm_head.weight" in r for r in records)  # the checks below can fail
        assert "Loading weights" in loud.err
        records.clear()
        with quiet_transformers():
            AutoModel.from_pretrained(str(ckpts["llama"]))
        quiet = capfd.readouterr()
    finally:
        hf_logger.removeHandler(handler)
    assert not any("lm_head.weight" in r for r in records)
    assert "lm_head.weight" not in quiet.out + quiet.err
    assert "Loading weights" not in quiet.out + quiet.err
