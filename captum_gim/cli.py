r"""The ``captum-gim`` command (also ``python -m captum_gim``).

Subcommands:

- ``compare``: GIM against Integrated Gradients and Captum's gradient methods on a
  model: faithfulness (comprehensiveness, sufficiency, deletion), agreement with known
  evidence, Captum's infidelity, time and memory. Writes a table to stdout and a JSON
  report, PNG plots and an HTML page to ``--out``.
- ``demo``: the quick comparison on the embedded default (what ``make demo`` runs).
- ``attribute``: attribute every row of a dataset (JSONL or CSV) into resumable shard
  files, in one process or several (``torchrun``, ``accelerate launch``); see
  :mod:`captum_gim.dataset`.

Examples::

    captum-gim compare --quick                       # embedded default, ~15 s on 2 CPU cores
    captum-gim compare --model minilm --quick        # pretrained all-MiniLM-L6-v2
    captum-gim compare --model ./my-checkpoint --inputs texts.txt --out results/mine
    captum-gim demo
    captum-gim attribute --model ./my-classifier --data reviews.jsonl --out attr/
    accelerate launch --multi_gpu --num_processes 2 -m captum_gim attribute \
        --model ./my-lm --data prompts.jsonl --out attr/
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

__all__ = ["main", "build_parser", "run_compare", "run_attribute", "QUICK", "FULL"]


def _per_target(examples: Dict[str, int], **samples: int) -> Dict[str, Dict[str, int]]:
    return {kind: {"n_examples": n, **samples} for kind, n in examples.items()}


#: per-target settings with ``--quick``: examples, bootstrap resamples, infidelity samples,
#: GradientShap samples
QUICK: Dict[str, Dict[str, int]] = _per_target(
    {"default": 40, "minilm": 32, "pyhealth": 32, "checkpoint": 32},
    n_bootstrap=1000, infidelity_samples=10, gradshap_samples=10,
)
# the pretrained 6-layer MiniLM costs about 20x the embedded default per forward pass: its
# quick run checks fewer perturbations per example for infidelity
QUICK["minilm"]["infidelity_samples"] = 5
#: the budget sweep's GradientShap / NoiseTunnel(GIM) sample counts when --samples is not
#: given (quick MiniLM: the two smaller ones)
SAMPLES: Dict[Tuple[bool, str], str] = {(True, "minilm"): "5,10"}
DEFAULT_SAMPLES = "5,10,20"
#: torch CPU threads when --threads is not given (checkpoints: torch's default)
THREADS: Dict[str, int] = {"default": 1, "pyhealth": 1, "minilm": 2}
#: per-target settings without ``--quick`` (same fields as :data:`QUICK`)
FULL: Dict[str, Dict[str, int]] = _per_target(
    {"default": 256, "minilm": 32, "pyhealth": 128, "checkpoint": 32},
    n_bootstrap=2000, infidelity_samples=50, gradshap_samples=20,
)


def _add_compare_options(p: argparse.ArgumentParser, demo: bool = False) -> None:
    if not demo:
        p.add_argument(
            "--model", default="default",
            help="default (embedded synthetic task), minilm (pretrained all-MiniLM-L6-v2, "
            "sentence similarity), pyhealth (synthetic EHR cohort on a PyHealth Transformer), "
            "or a local Hugging Face checkpoint directory (default: %(default)s)")
        p.add_argument(
            "--inputs", default=None, metavar="FILE",
            help="text file of inputs, one per line (for minilm and checkpoints; a tab separates "
            "the two sentences of a pair; for a causal LM: a JSONL file of {\"prompt\": ..., "
            "\"answer\": ...} or one prompt per line, answered with the model's greedy next "
            "token). Lines starting with '#' are skipped")
        p.add_argument(
            "--baseline-token", default=None, metavar="TOKEN",
            help="causal language models: the baseline token put at every prompt position and "
            "used to mask tokens (a token of the vocabulary, or its id; default: pad, else EOS)")
        p.add_argument("--quick", action="store_true",
                       help="fewer examples and samples (at least 32 examples): measured on 2 "
                       "CPU cores, about 15 s for the embedded default and for the PyHealth "
                       "target (training included) and a little over a minute for minilm")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="where to write report.json, the plots and report.html "
                   "(default: results/compare-<model>)" if not demo else "output directory")
    p.add_argument("--n-steps", type=int, default=50,
                   help="Integrated Gradients steps, for IG and IG-GIM (default: %(default)s)")
    p.add_argument("--steps", default="4,8,16,50", metavar="N,N,...",
                   help="the budget sweep's IG and IG-GIM step counts (IG(1) and IG(2), GIM's own "
                   "budget, are always added; default: %(default)s)")
    p.add_argument("--samples", default=None, metavar="N,N,...",
                   help="the budget sweep's GradientShap and NoiseTunnel(GIM) sample counts "
                   "(default: 5,10,20; 5,10 for minilm with --quick)")
    p.add_argument("--no-sweep", action="store_true",
                   help="no budget sweep: each method at one budget (--n-steps, --gradshap-samples)")
    p.add_argument("--seed", type=int, default=0, help="seed for everything random (default: 0)")
    p.add_argument("--n-examples", type=int, default=None, help="examples to explain")
    p.add_argument("--temperature", type=float, default=2.0, help="GIM's TSG temperature (default: 2)")
    p.add_argument("--methods", default=None,
                   help="comma-separated subset of: gim, gim-tsg, gim-norm, gim-div, gim-off, ig, "
                   "ig-gim, saliency, ixg, gradshap, nt-gim, random; a budget with @: ig@8 "
                   "(default: all)")
    p.add_argument("--bootstrap", type=int, default=None, help="bootstrap resamples for the CIs")
    p.add_argument("--infidelity-samples", type=int, default=None,
                   help="perturbations per example for Captum's infidelity")
    p.add_argument("--gradshap-samples", type=int, default=None, help="GradientShap samples")
    p.add_argument("--internal-batch-size", type=int, default=None,
                   help="IG's internal batch size (lower it if IG runs out of memory)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 for default and pyhealth, 2 for minilm, "
                   "torch's default for checkpoint directories)")
    p.add_argument("--show", type=int, default=4, help="examples shown on the HTML page (default: 4)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    r"""The argument parser of ``captum-gim``."""
    parser = argparse.ArgumentParser(
        prog="captum-gim",
        description="GIM (Gradient Interaction Modifications) for Captum: compare GIM with "
        "Integrated Gradients and Captum's gradient methods on your model.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"captum-gim {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    compare = sub.add_parser(
        "compare",
        help="faithfulness, ground-truth agreement and cost of GIM vs IG and Captum's methods",
        description="Compare GIM with Integrated Gradients, IG-GIM, Saliency, InputXGradient, "
        "GradientShap, each GIM rule alone and a random floor: comprehensiveness and "
        "sufficiency (ERASER AOPC), deletion curves, ground-truth AUROC and top-1 hits where "
        "the evidence is known, Captum's infidelity, wall time and peak memory, with "
        "bootstrap confidence intervals.",
    )
    _add_compare_options(compare)
    demo = sub.add_parser(
        "demo", help="the quick comparison on the embedded default (make demo)",
        description="Run `captum-gim compare --quick` on the embedded default task and say "
        "where the report is.",
    )
    _add_compare_options(demo, demo=True)
    attribute = sub.add_parser(
        "attribute",
        help="attribute every row of a dataset into resumable shard files (multi-process "
        "with torchrun or accelerate launch)",
        description="Attribute every row of a JSONL or CSV file with GIM (or IG, IG-GIM, "
        "Saliency, InputXGradient, GradientShap) in padded batches, into parquet or "
        "safetensors shards of --shard-size rows, with index.json and errors.jsonl. Run the "
        "same command again to resume after a crash; start it with torchrun or accelerate "
        "launch to share the shards between processes.",
    )
    _add_attribute_options(attribute)
    return parser


def _add_attribute_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="M",
                   help="a Hugging Face checkpoint directory (causal LM: rows with 'prompt' and "
                   "optionally 'answer'; sequence classifier: 'text' and optionally 'label'), "
                   "default or minilm (the built-in tasks), or a Python entry point "
                   "module:function returning a Backend, a PyHealth model or (forward_func, "
                   "model)")
    p.add_argument("--data", required=True, metavar="FILE", help="a .jsonl or .csv file")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="the output folder (a folder of an unfinished run is resumed)")
    p.add_argument("--method", default="gim",
                   choices=("gim", "ig", "ig-gim", "saliency", "ixg", "gradshap"),
                   help="the attribution method (default: %(default)s)")
    p.add_argument("--target", default=None,
                   help="auto (default: the row's answer/label, else the prediction), "
                   "predicted, or one target for every row (a token, a class index or name)")
    p.add_argument("--baseline-token", default=None, metavar="TOKEN",
                   help="the baseline token at every position (a token or id; PyHealth: a "
                   "code; default: pad/EOS for causal LMs, [PAD] for classifiers, zeros for "
                   "PyHealth)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per batch (default: %(default)s)")
    p.add_argument("--shard-size", type=int, default=1000,
                   help="rows per shard file (default: %(default)s)")
    p.add_argument("--format", default="parquet", choices=("parquet", "safetensors"),
                   help="shard file format (default: %(default)s)")
    p.add_argument("--n-steps", type=int, default=50,
                   help="Integrated Gradients steps, for ig and ig-gim (default: %(default)s)")
    p.add_argument("--n-samples", type=int, default=20,
                   help="GradientShap samples (default: %(default)s)")
    p.add_argument("--internal-batch-size", type=int, default=None,
                   help="the most forward rows at once for IG and GradientShap")
    p.add_argument("--temperature", type=float, default=2.0,
                   help="GIM's TSG temperature (default: 2)")
    p.add_argument("--seed", type=int, default=0, help="seeds every random draw (default: 0)")
    p.add_argument("--max-length", type=int, default=None,
                   help="the most tokens of a text; longer rows are reported as bad rows "
                   "(default: the model's limit)")
    p.add_argument("--device", default="auto",
                   help="cpu, cuda or auto (default: auto; with several processes each takes "
                   "the GPU of its local rank)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads per process (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _target_kind(model: str) -> str:
    from .evaluation.tasks import TASK_NAMES

    return model if model in TASK_NAMES else "checkpoint"


def _safe_name(model: str) -> str:
    name = Path(model).name if _target_kind(model) == "checkpoint" else model
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "model"


def _counts(text: str, flag: str) -> Tuple[int, ...]:
    try:
        out = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated positive integers, got {text!r}") from None
    if not out or min(out) < 1:
        raise ValueError(f"{flag} takes comma-separated positive integers, got {text!r}")
    return out


def run_compare(args: argparse.Namespace, argv: Sequence[str]) -> Any:
    r"""Run ``compare`` with parsed arguments; returns the
    :class:`~captum_gim.evaluation.report.Report` (also written to disk).

    Started by ``torchrun`` or ``accelerate launch`` (several processes), the processes
    share the examples and rank 0 gathers the values, writes the report and returns it;
    the other ranks return None."""
    import torch

    start = time.perf_counter()
    kind = _target_kind(args.model)
    threads = args.threads
    if threads is None:
        # the small built-in targets: one thread is about as fast, reproducible, and far
        # faster than several on a shared, busy machine; MiniLM gains from two
        threads = THREADS.get(kind)
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    from .dataset.distributed import from_env, process_group

    info = from_env()  # several processes (torchrun, accelerate launch): share the examples
    try:
        with process_group(info):
            return _compare(args, argv, kind, start, info.local_rank if info.distributed else None)
    finally:
        torch.set_num_threads(old_threads)


def _compare(
    args: argparse.Namespace, argv: Sequence[str], kind: str, start: float,
    local_rank: Optional[int] = None,
) -> Any:
    import torch

    from .evaluation.compare import run_comparison
    from .evaluation.methods import CompareSettings
    from .evaluation.tasks import load_task

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is available; use --device cpu")
    if device == "cuda" and local_rank is not None:  # one GPU per process
        device = f"cuda:{local_rank % torch.cuda.device_count()}"
    if args.inputs is not None and kind in ("default", "pyhealth"):
        raise ValueError(
            f"--inputs is for --model minilm and checkpoint directories; the {kind} target "
            "brings its own examples (choose them with --seed and --n-examples)"
        )
    for name in ("n_steps", "n_examples", "bootstrap", "infidelity_samples", "gradshap_samples"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "bootstrap" else 1):
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
    defaults = (QUICK if args.quick else FULL)[kind]

    def given_or_default(value: Optional[int], key: str) -> int:
        return value if value is not None else defaults[key]

    n_examples = given_or_default(args.n_examples, "n_examples")
    out = Path(args.out) if args.out else Path("results") / f"compare-{_safe_name(args.model)}"
    progress = not args.no_progress
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    samples_text = args.samples or SAMPLES.get((bool(args.quick), kind), DEFAULT_SAMPLES)
    steps, samples = _counts(args.steps, "--steps"), _counts(samples_text, "--samples")

    task = load_task(args.model, inputs=args.inputs, n_examples=n_examples, seed=args.seed,
                     device=device, progress=progress,
                     baseline_token=getattr(args, "baseline_token", None))
    settings = CompareSettings(
        n_steps=args.n_steps,
        seed=args.seed,
        temperature=args.temperature,
        methods=methods,
        n_bootstrap=given_or_default(args.bootstrap, "n_bootstrap"),
        infidelity_samples=given_or_default(args.infidelity_samples, "infidelity_samples"),
        gradshap_samples=given_or_default(args.gradshap_samples, "gradshap_samples"),
        internal_batch_size=args.internal_batch_size,
        measure_memory=not args.no_memory,
        progress=progress,
        n_show=args.show,
        sweep=not args.no_sweep,
        steps=steps,
        samples=samples,
    )
    report = run_comparison(task, settings)
    if report is None:  # not rank 0 of a multi-process run: rank 0 reports
        return None
    report.command = "captum-gim " + shlex.join(list(argv))
    report.settings.update(quick=bool(args.quick), model=args.model, inputs=args.inputs, device=device)
    report.wall_seconds_total = time.perf_counter() - start
    report.save(out)

    print()
    print(report.task["description"])
    print(f"{report.task['n_examples']} examples, score: {report.task['score']}, "
          f"device: {device}, seed: {args.seed}")
    print()
    print(report.table())
    if report.summary:
        print()
        print(report.summary)
    print()
    print(f"Report: {out / 'report.html'}")
    print(f"JSON:   {out / 'report.json'}")
    print(f"Plots:  {', '.join(str(out / p) for p in report.files['plots'])}")
    print(f"({report.wall_seconds_total:.1f} s in all)")
    return report


def run_attribute(args: argparse.Namespace) -> Any:
    r"""Run ``attribute`` with parsed arguments; returns the
    :class:`~captum_gim.dataset.run.AttributeRun` of this process."""
    from .dataset.run import attribute_dataset

    return attribute_dataset(
        args.model, args.data, args.out, method=args.method, target=args.target,
        baseline_token=args.baseline_token, batch_size=args.batch_size,
        shard_size=args.shard_size, format=args.format, n_steps=args.n_steps,
        n_samples=args.n_samples, internal_batch_size=args.internal_batch_size,
        seed=args.seed, temperature=args.temperature, max_length=args.max_length,
        device=args.device, threads=args.threads, progress=not args.no_progress,
    )


def main(argv: Optional[List[str]] = None) -> int:
    r"""Entry point of the ``captum-gim`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "demo":
        args.model, args.inputs, args.quick = "default", None, True
        if args.out is None:
            args.out = os.path.join("results", "demo")
    # attribute: an entry point returning the wrong kind of object is a TypeError
    expected = (ValueError, FileNotFoundError, ImportError) + (
        (TypeError,) if args.command == "attribute" else ())
    try:
        if args.command == "attribute":
            run_attribute(args)
        else:
            run_compare(args, argv)
    except expected as e:
        print(f"captum-gim {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
