"""Two CPU processes started by accelerate's launcher (``accelerate launch --multi_gpu
--num_processes 2``: torchrun underneath, gloo on a machine without GPUs):

- ``-m captum_gim attribute`` shares the shards between the processes (both compute some)
  and writes files byte-identical to a one-process run, the index included;
- ``-m captum_gim compare`` gathers the per-example values on rank 0 before the
  statistics: every metric's per-example values and confidence interval equal a
  one-process run's (times and memory aside).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("accelerate")
pytest.importorskip("transformers")
pytest.importorskip("pyarrow")

from _tiny_lm import save, word_tokenizer  # noqa: E402
from test_attribute_hf import TEXTS, classifier, write_jsonl  # noqa: E402
from test_attribute_resume import folder_bytes  # noqa: E402

from captum_gim.cli import main  # noqa: E402

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _accelerate(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    assert exe, "accelerate's launcher is not installed"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [exe, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), "-m", "captum_gim", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_two_processes_write_the_files_of_one(tmp_path):
    ckpt = save(classifier(), tmp_path / "bert", word_tokenizer())
    rows = [{"text": TEXTS[i % len(TEXTS)] if i != 9 else ""} for i in range(26)]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    args = ["attribute", "--model", str(ckpt), "--data", str(data), "--shard-size", "4",
            "--batch-size", "3"]
    assert main([*args, "--out", str(tmp_path / "one"), "--no-progress"]) == 0
    proc = _accelerate(*args, "--out", str(tmp_path / "two"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    computed = dict(re.findall(r"rank (\d) of 2: computed shards (\[[\d, ]*\])", proc.stderr))
    assert set(computed) == {"0", "1"}, proc.stderr[-2000:]
    shards = sorted(json.loads(computed["0"]) + json.loads(computed["1"]))
    assert shards == list(range(7)) and json.loads(computed["1"])  # both processes worked
    assert folder_bytes(tmp_path / "two") == folder_bytes(tmp_path / "one")


def test_compare_two_processes_gathers_the_values_of_one(tmp_path):
    args = ["compare", "--n-examples", "6", "--bootstrap", "200", "--methods", "gim,ig,saliency",
            "--no-sweep", "--n-steps", "8", "--infidelity-samples", "4", "--no-memory",
            "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    proc = _accelerate(*args, "--out", str(tmp_path / "two"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("Report:") == 1  # rank 0 alone reports
    one = json.loads((tmp_path / "one" / "report.json").read_text())
    two = json.loads((tmp_path / "two" / "report.json").read_text())
    assert [m["key"] for m in one["methods"]] == [m["key"] for m in two["methods"]] == ["gim", "ig", "saliency"]
    for a, b in zip(one["methods"], two["methods"]):
        names = [k for k in a["per_example"] if k != "time_ms"]
        assert names and all(len(a["per_example"][k]) == 6 for k in names)
        for k in names:
            assert a["per_example"][k] == b["per_example"][k], (a["key"], k)
            assert a["metrics"][k] == b["metrics"][k], (a["key"], k)
        assert a["deletion_curve"] == b["deletion_curve"]
        assert len(b["per_example"]["time_ms"]) == 6
    assert one["examples_shown"] == two["examples_shown"]
