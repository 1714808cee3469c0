"""``captum-gim attribute`` killed and resumed: the command is started in a subprocess,
killed with SIGKILL once its first shard file appears, started again with the same
arguments, and every file of the folder must equal, byte for byte, those of an
uninterrupted run. Arguments that differ from the recorded ones are refused by name;
those that cannot change the files (progress) are accepted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict

import pytest

pytest.importorskip("transformers")
pytest.importorskip("datasets")
pytest.importorskip("pyarrow")

from _tiny_lm import save, word_tokenizer  # noqa: E402
from test_attribute_hf import TEXTS, classifier, write_jsonl  # noqa: E402

from captum_gim.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def folder_bytes(folder: Path) -> Dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    ckpt = save(classifier(), root / "bert", word_tokenizer())
    rows = [{"text": TEXTS[i % len(TEXTS)] if i % 11 != 5 else ""} for i in range(48)]
    for i in range(0, 48, 7):
        rows[i]["label"] = i % 3
    data = write_jsonl(root / "rows.jsonl", rows)
    return root, ckpt, data


def _argv(ckpt: Path, data: Path, out: Path, *extra: str):
    return ["attribute", "--model", str(ckpt), "--data", str(data), "--out", str(out),
            "--shard-size", "3", "--batch-size", "2", *extra]


def test_killed_run_resumes_to_identical_files(setup, tmp_path):
    root, ckpt, data = setup
    whole = tmp_path / "whole"
    assert main(_argv(ckpt, data, whole, "--no-progress")) == 0
    expected = folder_bytes(whole)
    assert len([n for n in expected if n.endswith(".parquet")]) == 16
    assert {"index.json", "run.json", "errors.jsonl"} <= set(expected)

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "captum_gim", *_argv(ckpt, data, out, "--no-progress")],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while not (out / "shard-00000.parquet").exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no shard written in 120 s"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    written = sorted(p.name for p in out.glob("shard-*.parquet"))
    assert written and len(written) < 16 and not (out / "index.json").exists()
    # a temporary file as a kill during a write leaves it: removed on resume
    (out / ".shard-00015.parquet.tmp-4242").write_bytes(b"half a shard")

    assert main(_argv(ckpt, data, out, "--no-progress")) == 0
    assert folder_bytes(out) == expected


def test_changed_arguments_are_refused(setup, tmp_path, capsys):
    root, ckpt, data = setup
    out = tmp_path / "o"
    assert main(_argv(ckpt, data, out, "--no-progress")) == 0
    before = folder_bytes(out)
    assert main(_argv(ckpt, data, out, "--no-progress", "--method", "ig", "--n-steps", "4")) == 1
    err = capsys.readouterr().err
    assert "arguments.method: recorded 'gim', now 'ig'" in err and "arguments.n_steps" in err
    assert main(["attribute", "--model", str(ckpt), "--data", str(data), "--out", str(out),
                 "--shard-size", "4", "--batch-size", "2", "--no-progress"]) == 1
    assert "arguments.shard_size: recorded 3, now 4" in capsys.readouterr().err
    other = write_jsonl(tmp_path / "other.jsonl", [{"text": "a dog"}])
    assert main(_argv(ckpt, other, out, "--no-progress")) == 1
    assert "data.fingerprint" in capsys.readouterr().err
    # the progress display does not change the files: accepted, nothing recomputed
    assert main(_argv(ckpt, data, out)) == 0
    assert "resuming" in capsys.readouterr().err
    assert folder_bytes(out) == before
