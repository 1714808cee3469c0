"""``attribute`` on a PyHealth Transformer (synthetic cohort, trained for two epochs): every
patient's record of a padded batch equals ``PyHealthGIM`` (GIM) or Captum's
``IntegratedGradients`` through ``PyHealthAdapter`` on that patient alone; raw JSONL
samples processed with the model's processors give the records of the ``SampleDataset``;
unknown codes and empty features are bad rows with their row numbers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("pyhealth")
pytest.importorskip("pyarrow")

from _pyhealth_synth import ehr_dataset, ehr_samples, single_thread, train  # noqa: E402,F401
from pyhealth.datasets import get_dataloader  # noqa: E402
from pyhealth.models import Transformer  # noqa: E402

from captum_gim.dataset import attribute_dataset, load_attributions  # noqa: E402
from captum_gim.pyhealth import PyHealthAdapter, PyHealthGIM  # noqa: E402

N = 24


@pytest.fixture(scope="module")
def cohort():
    ds = ehr_dataset(n=N)
    torch.manual_seed(0)
    model = train(Transformer(ds, embedding_dim=16, heads=2, num_layers=1), ds, epochs=2)
    return ds, model


def _split(rec, key):
    idx = [i for i, f in enumerate(rec["features"]) if f == key]
    return np.asarray(rec["scores"])[idx], [rec["tokens"][i] for i in idx]


def test_batches_equal_pyhealth_gim_on_each_patient_alone(cohort, tmp_path):
    ds, model = cohort
    run = attribute_dataset(model, ds, tmp_path / "out", batch_size=8, shard_size=10, progress=False)
    assert run.index["n_records"] == N and run.index["model_settings"]["kind"] == "pyhealth"
    records = load_attributions(tmp_path / "out")
    vocab = {i: c for c, i in ds.input_processors["codes"].code_vocab.items()}
    for rec, batch in zip(records, get_dataloader(ds, 1)):
        ref = PyHealthGIM(model).attribute(**batch)
        codes, names = _split(rec, "codes")
        labs, lab_names = _split(rec, "labs")
        np.testing.assert_allclose(codes, ref["codes"][0].numpy(), atol=1e-5, rtol=0)
        np.testing.assert_allclose(labs, ref["labs"][0].reshape(-1).numpy(), atol=1e-5, rtol=0)
        assert names == [vocab[int(i)] for i in batch["codes"][0]]
        assert lab_names[:2] == ["labs[0,0]", "labs[0,1]"]
        np.testing.assert_allclose([v for v, f in zip(rec["values"], rec["features"]) if f == "labs"],
                                   batch["labs"][0].reshape(-1).numpy(), atol=1e-6)
        with torch.no_grad():
            logit = float(model(**batch)["logit"].reshape(-1)[0])
        assert rec["target"] == 0 and rec["output"] == pytest.approx(logit, abs=1e-5)
        assert rec["id"] == batch["patient_id"][0] and rec["prediction"] == int(logit > 0)


def test_ig_equals_captum_through_the_adapter_alone(cohort, tmp_path):
    from captum.attr import IntegratedGradients

    ds, model = cohort
    adapter = PyHealthAdapter(model)
    attribute_dataset((adapter, model), ds, tmp_path / "out", method="ig", n_steps=6,
                      batch_size=5, shard_size=12, progress=False)
    records = load_attributions(tmp_path / "out")
    for rec, batch in list(zip(records, get_dataloader(ds, 1)))[:8]:
        ref = adapter.attribute(IntegratedGradients(adapter), batch, n_steps=6)
        np.testing.assert_allclose(_split(rec, "codes")[0], ref["codes"][0].numpy(), atol=1e-5, rtol=0)
        np.testing.assert_allclose(_split(rec, "labs")[0], ref["labs"][0].reshape(-1).numpy(),
                                   atol=1e-5, rtol=0)


def test_raw_jsonl_rows_equal_the_sample_dataset_and_bad_rows(cohort, tmp_path):
    ds, model = cohort
    attribute_dataset(model, ds, tmp_path / "ds", batch_size=4, shard_size=8, progress=False)
    samples = ehr_samples(N)  # the samples the dataset was made from
    lines = []
    for s in samples:
        lines.append(dict(s, labs=[[t.isoformat() for t in s["labs"][0]], s["labs"][1]]))
    lines.insert(3, dict(lines[0], patient_id="x1", codes=["NOPE", "C01", "ALSO"]))
    lines.insert(7, dict(lines[0], patient_id="x2", codes=[]))
    path = tmp_path / "raw.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    run = attribute_dataset(model, path, tmp_path / "raw", batch_size=4, shard_size=8, progress=False)
    errors = [json.loads(x) for x in (tmp_path / "raw" / "errors.jsonl").read_text().splitlines()]
    assert [(e["row"], e["reason"]) for e in errors] == [(3, "unknown-codes"), (7, "empty-input")]
    assert "['ALSO', 'NOPE']" in errors[0]["message"]
    raw = load_attributions(tmp_path / "raw")
    assert [r["row"] for r in raw] == [i for i in range(N + 2) if i not in (3, 7)]
    for a, b in zip(load_attributions(tmp_path / "ds"), raw):
        assert a["tokens"] == b["tokens"] and a["id"] == b["id"]
        np.testing.assert_allclose(a["scores"], b["scores"], atol=1e-6, rtol=0)
    assert run.index["n_errors"] == 2
