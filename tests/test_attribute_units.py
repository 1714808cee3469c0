"""``captum_gim.dataset`` piece by piece: shard plans, batch plans, padding, the shard
encodings (deterministic bytes, exact round trip), the recorded-arguments check, the
process environment, the data reader. Each against values written out by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from captum_gim.dataset.backend import BadRow, parse_target
from captum_gim.dataset.batching import pad_right, plan_batches
from captum_gim.dataset.distributed import ProcessInfo, from_env, shards_of_rank
from captum_gim.dataset.manifest import ArgumentsMismatch, differences, prepare_folder
from captum_gim.dataset.methods import row_seed
from captum_gim.dataset.reader import load_rows
from captum_gim.dataset.shards import (
    atomic_write,
    decode_shard,
    encode_shard,
    merge_errors,
    plan_shards,
    read_errors,
    remove_stale_temporaries,
    write_errors,
)


def test_plan_shards_are_fixed_row_ranges():
    assert plan_shards(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert plan_shards(8, 4) == [(0, 4), (4, 8)]
    assert plan_shards(0, 4) == []
    with pytest.raises(ValueError):
        plan_shards(10, 0)


def test_plan_batches_sorts_by_length_then_row():
    lengths = [5, 2, 5, 1, 2, 9]
    # sorted by (length, position): 3(1), 1(2), 4(2), 0(5), 2(5), 5(9)
    assert plan_batches(lengths, 2) == [[3, 1], [4, 0], [2, 5]]
    assert plan_batches(lengths, 10) == [[3, 1, 4, 0, 2, 5]]
    with pytest.raises(ValueError):
        plan_batches(lengths, 0)


def test_pad_right():
    ids, mask = pad_right([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    with pytest.raises(ValueError):
        pad_right([[1], []], 0)


def test_shards_of_rank_round_robin():
    todo = [0, 2, 3, 5, 6]
    assert shards_of_rank(todo, ProcessInfo(0, 2)) == [0, 3, 6]
    assert shards_of_rank(todo, ProcessInfo(1, 2)) == [2, 5]
    assert shards_of_rank(todo, ProcessInfo(0, 1)) == todo


def test_process_info_from_env():
    assert from_env({}) == ProcessInfo(0, 1, 0)
    assert from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == ProcessInfo(1, 2, 1)
    # Open MPI (accelerate's mpirun launcher) when torchrun's variables are absent
    env = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}
    assert from_env(env) == ProcessInfo(3, 4, 1)
    with pytest.raises(ValueError, match="RANK=2"):
        from_env({"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="not an integer"):
        from_env({"WORLD_SIZE": "two"})


def test_parse_target():
    assert parse_target(None) is None and parse_target("auto") is None
    assert parse_target("predicted") == "predicted"
    assert parse_target("3") == 3 and parse_target(2) == 2
    assert parse_target("pos") == "pos"
    with pytest.raises(ValueError):
        parse_target(True)


def test_bad_row_record():
    e = BadRow("too-long", "70 tokens")
    assert e.record(4) == {"row": 4, "reason": "too-long", "message": "70 tokens"}
    with pytest.raises(ValueError):
        BadRow("no-such-reason", "x")


def test_row_seed_is_stable():
    # crc32 of "7:12": the same in every process and Python version
    import zlib

    assert row_seed(7, 12) == zlib.crc32(b"7:12")
    assert row_seed(7, 12) != row_seed(7, 13)


RECORDS = [
    {"row": 0, "tokens": ["a", "b"], "token_ids": [3, 4], "scores": [0.5, -1.25], "target": 1,
     "target_label": "pos", "output": 2.5, "prediction": 1, "logits": [0.0, 2.5]},
    {"row": 3, "tokens": ["c"], "token_ids": [5], "scores": [float("nan")], "target": 0,
     "target_label": "neg", "output": -1.0, "prediction": 1, "logits": [-1.0, 3.0]},
]
COLUMNS = ("row", "tokens", "token_ids", "scores", "target", "target_label", "output",
           "prediction", "logits")


@pytest.mark.parametrize("fmt", ["parquet", "safetensors"])
def test_shard_round_trip_and_deterministic_bytes(fmt):
    data = encode_shard(RECORDS, COLUMNS, fmt)
    assert encode_shard([dict(r) for r in RECORDS], COLUMNS, fmt) == data
    # numpy arrays give the same bytes as lists
    as_np = [dict(r, scores=np.asarray(r["scores"], dtype=np.float32)) for r in RECORDS]
    assert encode_shard(as_np, COLUMNS, fmt) == data
    back = decode_shard(data, fmt)
    assert [list(r) for r in back] == [list(COLUMNS)] * 2
    assert back[0]["tokens"] == ["a", "b"] and back[0]["token_ids"] == [3, 4]
    assert back[0]["scores"] == [0.5, -1.25] and back[0]["output"] == 2.5
    assert math.isnan(back[1]["scores"][0]) and back[1]["row"] == 3
    assert back[1]["target_label"] == "neg" and back[1]["logits"] == [-1.0, 3.0]
    with pytest.raises(ValueError, match="lacks"):
        encode_shard([{"row": 0}], COLUMNS, fmt)


def test_errors_files_and_merge(tmp_path):
    write_errors(tmp_path / "shard-00000.errors.jsonl", [
        {"row": 3, "reason": "too-long", "message": "m"},
        {"row": 1, "reason": "empty-text", "message": "e"}])
    write_errors(tmp_path / "shard-00001.errors.jsonl", [])
    write_errors(tmp_path / "shard-00002.errors.jsonl", [{"row": 9, "reason": "bad-label", "message": "b"}])
    assert [e["row"] for e in read_errors(tmp_path / "shard-00000.errors.jsonl")] == [1, 3]
    assert merge_errors(tmp_path, 3, tmp_path / "errors.jsonl") == 3
    lines = (tmp_path / "errors.jsonl").read_text().splitlines()
    assert [json.loads(x)["row"] for x in lines] == [1, 3, 9]
    assert lines[0] == '{"message": "e", "reason": "empty-text", "row": 1}'


def test_atomic_write_and_stale_temporaries(tmp_path):
    atomic_write(tmp_path / "a.bin", b"xyz")
    assert (tmp_path / "a.bin").read_bytes() == b"xyz"
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]  # no temporary left
    (tmp_path / ".shard-00004.parquet.tmp-1234").write_bytes(b"half")
    assert remove_stale_temporaries(tmp_path) == [".shard-00004.parquet.tmp-1234"]
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_differences_and_prepare_folder(tmp_path):
    rec = {"schema": "s", "arguments": {"batch_size": 8, "method": "gim"}, "data": {"n_rows": 3}}
    assert differences(rec, rec) == []
    other = {"schema": "s", "arguments": {"batch_size": 4, "method": "gim"}, "data": {"n_rows": 3}}
    assert differences(rec, other) == [("arguments.batch_size", 8, 4)]
    assert prepare_folder(tmp_path / "o", rec)["resumed"] is False
    assert prepare_folder(tmp_path / "o", rec)["resumed"] is True
    with pytest.raises(ArgumentsMismatch, match="arguments.batch_size: recorded 8, now 4") as e:
        prepare_folder(tmp_path / "o", other)
    assert e.value.names == ["arguments.batch_size"]
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "shard-00000.parquet").write_bytes(b"")
    with pytest.raises(ValueError, match="not the folder of an attribute run"):
        prepare_folder(tmp_path / "p", rec)


def test_reader_jsonl_csv_records(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "a b", "label": 1}\n\n{"text": "c"}\n')
    rows = load_rows(tmp_path / "d.jsonl")
    assert len(rows) == 2 and rows[0] == {"text": "a b", "label": 1}
    assert rows[1]["text"] == "c" and rows[1]["label"] is None
    assert rows.fingerprint.startswith("sha256:") and rows.kind == "records"
    (tmp_path / "d.csv").write_text("text,label\nhello there,0\n,1\n")
    rows = load_rows(tmp_path / "d.csv")
    assert len(rows) == 2 and rows[0] == {"text": "hello there", "label": 0}
    assert rows[1]["text"] is None
    recs = load_rows([{"x": 1}, {"x": 2, "y": "z"}])
    assert recs.columns == ("x", "y") and recs[1] == {"x": 2, "y": "z"}
    assert load_rows([{"x": 1}]).fingerprint != load_rows([{"x": 2}]).fingerprint
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(ValueError, match="jsonl"):
        load_rows(tmp_path / "d.txt")
    with pytest.raises(FileNotFoundError):
        load_rows(tmp_path / "missing.jsonl")


def test_pad_right_device_and_dtype():
    ids, mask = pad_right([[1, 2]], 0, torch.device("cpu"))
    assert ids.dtype == mask.dtype == torch.long


def test_reader_datasets_fingerprint_is_the_content():
    datasets = pytest.importorskip("datasets")
    a = datasets.Dataset.from_dict({"text": ["a", "b"], "label": [1, 0]})
    b = datasets.Dataset.from_list([{"text": "a", "label": 1}, {"text": "b", "label": 0}])
    c = datasets.Dataset.from_dict({"text": ["a", "c"], "label": [1, 0]})
    assert load_rows(a).fingerprint == load_rows(b).fingerprint != load_rows(c).fingerprint
    assert load_rows(a)[1] == {"text": "b", "label": 0}
