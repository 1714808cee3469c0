r"""Attribute a whole dataset: :func:`attribute_dataset`, the function behind ``captum-gim attribute``.

The run, in every process (one, or several started by ``torchrun`` / ``accelerate
launch``):

1. read the rows (:func:`~captum_gim.dataset.reader.load_rows`) and build the model's
   backend (:func:`~captum_gim.dataset.entry.resolve_backend`);
2. rank 0 prepares the output folder: removes a killed run's temporary files, and checks
   the recorded arguments (``run.json``) or records them; a mismatch stops every process;
3. the dataset is cut into shards of ``shard_size`` rows; a shard whose file exists is
   finished and skipped; the others are dealt round-robin to the processes;
4. per shard: every row is encoded (bad rows go to the shard's errors file), the rows
   are batched by length (:func:`~captum_gim.dataset.batching.plan_batches`) and
   attributed, and the shard's errors file and then its shard file are written (each
   written whole, then renamed into place);
5. once every process finished, rank 0 merges the errors files into ``errors.jsonl`` and
   writes ``index.json``.

A run killed at any point and started again with the same arguments computes only the
missing shards; the files are byte-identical to those of an uninterrupted run, with any
number of processes: batches are planned from a shard's rows only, every random draw is
seeded by the row, the torch thread count is fixed (``threads``), and nothing written
depends on the process, the time or the paths.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from .backend import Backend, BadRow, parse_target
from .distributed import (
    ProcessInfo,
    all_succeeded,
    barrier,
    broadcast_object,
    from_env,
    process_group,
    shards_of_rank,
)
from .manifest import SCHEMA, build_index, prepare_folder
from .methods import METHODS, MethodSettings, row_seed
from .reader import Rows, load_rows
from .shards import (
    ERRORS_NAME,
    FORMATS,
    INDEX_NAME,
    atomic_write,
    encode_shard,
    errors_name,
    json_bytes,
    merge_errors,
    plan_shards,
    shard_name,
    write_errors,
)

__all__ = ["AttributeRun", "attribute_dataset", "DEFAULTS"]

#: the defaults of :func:`attribute_dataset` (and of the command's options)
DEFAULTS: Dict[str, Any] = {
    "method": "gim",
    "batch_size": 8,
    "shard_size": 1000,
    "format": "parquet",
    "n_steps": 50,
    "n_samples": 20,
    "seed": 0,
    "temperature": 2.0,
    "device": "auto",
    "threads": 1,
}


@dataclass
class AttributeRun:
    r"""What one process of a run did.

    Attributes:
        out (Path): the output folder.
        n_rows (int): rows in the dataset.
        n_shards (int): shards of the dataset.
        computed (list of int): the shards this process computed.
        skipped (int): shards already finished when the run started.
        examples (int): rows this process attributed or refused.
        seconds (float): this process's time in the shard loop.
        rank (int): this process's rank.
        world_size (int): the number of processes.
        index (dict, optional): the content of ``index.json`` (rank 0; None elsewhere).
    """

    out: Path
    n_rows: int
    n_shards: int
    computed: List[int] = field(default_factory=list)
    skipped: int = 0
    examples: int = 0
    seconds: float = 0.0
    rank: int = 0
    world_size: int = 1
    index: Optional[Dict[str, Any]] = None

    @property
    def examples_per_second(self) -> float:
        r"""Rows per second of this process's shard loop (0 when it computed nothing)."""
        return self.examples / self.seconds if self.seconds > 0 else 0.0

    @property
    def n_records(self) -> Optional[int]:
        r"""Rows attributed (from the index; None off rank 0)."""
        return None if self.index is None else int(self.index["n_records"])

    @property
    def n_errors(self) -> Optional[int]:
        r"""Bad rows (from the index; None off rank 0)."""
        return None if self.index is None else int(self.index["n_errors"])


def _positive(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _device(device: Union[str, Any], info: ProcessInfo) -> Any:
    import torch

    text = str(device)
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available; use --device cpu")
        return torch.device("cuda", info.local_rank % torch.cuda.device_count())
    dev = torch.device(text)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {text}: no CUDA device is available; use --device cpu")
    return dev


def _versions() -> Dict[str, Optional[str]]:
    from importlib import metadata

    import captum
    import torch

    from .._version import __version__

    out: Dict[str, Optional[str]] = {"captum_gim": __version__, "torch": torch.__version__,
                                     "captum": captum.__version__}
    for name in ("transformers", "pyhealth"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _record(model_desc: str, rows: Rows, backend: Backend, ms: MethodSettings, options: Dict[str, Any]) -> Dict[str, Any]:
    m = ms.method
    arguments = {
        "model": model_desc,
        "method": m,
        "n_steps": ms.n_steps if m in ("ig", "ig-gim") else None,
        "n_samples": ms.n_samples if m == "gradshap" else None,
        "internal_batch_size": ms.internal_batch_size if m in ("ig", "ig-gim", "gradshap") else None,
        "temperature": ms.config.temperature if m in ("gim", "ig-gim") else None,
        "seed": ms.seed,
        **options,
    }
    return {
        "schema": SCHEMA,
        "arguments": arguments,
        "data": {"fingerprint": rows.fingerprint, "n_rows": rows.n_rows,
                 "columns": list(rows.columns), "kind": rows.kind},
        "model_settings": {"kind": backend.kind, "columns": list(backend.columns),
                           **backend.settings()},
        "versions": _versions(),
    }


def _shard(backend: Backend, rows: Rows, start: int, stop: int, batch_size: int, seed: int,
           bar: Any) -> tuple:
    import torch

    from .batching import plan_batches

    items, errors = [], []
    for r in range(start, stop):
        try:
            items.append(backend.encode(r, rows[r]))
        except BadRow as e:
            errors.append(e.record(r))
            bar.update(1)
    records = []
    for batch in plan_batches([it.length for it in items], batch_size):
        chosen = [items[i] for i in batch]
        torch.manual_seed(row_seed(seed, chosen[0].row))  # any other draw: seeded by the batch's rows
        out = backend.attribute(chosen)
        if len(out) != len(chosen):
            raise RuntimeError(f"{type(backend).__name__}.attribute returned {len(out)} records "
                               f"for {len(chosen)} rows")
        for it, rec in zip(chosen, out):
            if isinstance(rec, BadRow):
                errors.append(rec.record(it.row))
            else:
                records.append(rec)
        bar.update(len(chosen))
    records.sort(key=lambda r: int(r["row"]))
    return records, errors


def attribute_dataset(
    model: Any,
    data: Any,
    out: Union[str, Path],
    *,
    method: str = DEFAULTS["method"],
    target: Union[None, int, str] = None,
    baseline_token: Union[None, int, str] = None,
    batch_size: int = DEFAULTS["batch_size"],
    shard_size: int = DEFAULTS["shard_size"],
    format: str = DEFAULTS["format"],
    n_steps: int = DEFAULTS["n_steps"],
    n_samples: int = DEFAULTS["n_samples"],
    internal_batch_size: Optional[int] = None,
    seed: int = DEFAULTS["seed"],
    temperature: float = DEFAULTS["temperature"],
    max_length: Optional[int] = None,
    device: Any = DEFAULTS["device"],
    threads: Optional[int] = DEFAULTS["threads"],
    progress: bool = True,
) -> AttributeRun:
    r"""Attribute every row of ``data`` with ``model``, into shard files under ``out``.

    Run it once per process: started by ``torchrun`` or ``accelerate launch``, the
    processes share the shards (see :mod:`captum_gim.dataset.run`). Started again after
    a crash with the same arguments, it computes only the missing shards.

    Args:
        model: a Hugging Face checkpoint directory (causal LM or sequence classifier),
            ``"default"`` or ``"minilm"``, a ``"module:function"`` entry point, or what
            such a function returns (a :class:`~captum_gim.dataset.backend.Backend`, a
            PyHealth model, ``(forward_func, model)``); see
            :mod:`captum_gim.dataset.entry`.
        data: a JSONL or CSV file, a ``datasets.Dataset``, a list of dicts, or a PyHealth
            ``SampleDataset``.
        out: the output folder (created; a folder of a previous run is resumed).
        method (str): ``gim`` (default), ``ig``, ``ig-gim``, ``saliency``, ``ixg`` or
            ``gradshap`` (:mod:`captum_gim.dataset.methods`).
        target: ``None``/``"auto"`` (the row's ``answer``/``label`` when it has one, else
            the model's prediction), ``"predicted"``, or one target for every row (a
            token of a causal LM, a class index or name).
        baseline_token: the baseline token (Hugging Face models: a token or id; PyHealth:
            a code; ``(forward_func, model)``: a number). Default: the model kind's own.
        batch_size (int): rows per batch (padded to the longest).
        shard_size (int): rows per shard file.
        format (str): ``parquet`` or ``safetensors``.
        n_steps (int): Integrated Gradients steps (``ig``, ``ig-gim``).
        n_samples (int): GradientShap samples.
        internal_batch_size (int, optional): the most forward rows at once for IG and
            GradientShap.
        seed (int): seeds every random draw (per row).
        temperature (float): GIM's TSG temperature (``gim``, ``ig-gim``).
        max_length (int, optional): the most tokens of a text (longer rows are bad rows;
            default: the model's limit).
        device: ``"auto"`` (a GPU when there is one, the process's local rank picking
            it), ``"cpu"``, ``"cuda"`` or a ``torch.device``.
        threads (int, optional): torch CPU threads per process (default 1: results do not
            depend on the machine's core count; None: torch's default).
        progress (bool): a progress bar with examples/s (rank 0).

    Returns:
        AttributeRun: what this process did; on rank 0 also the index.

    Raises:
        ArgumentsMismatch: ``out`` holds a run made with other arguments.
        ValueError: a bad argument, or data without the columns the model needs.
        FileNotFoundError: the data or the model does not exist.

    Examples::

        >>> run = attribute_dataset("./my-classifier", "reviews.jsonl", "attr/")  # doctest: +SKIP
        >>> run.index["n_records"], run.index["n_errors"]                         # doctest: +SKIP
        (9998, 2)
    """
    import torch

    from .entry import describe_model, resolve_backend

    _positive("batch_size", batch_size)
    _positive("shard_size", shard_size)
    _positive("threads", threads, allow_none=True)
    _positive("max_length", max_length, allow_none=True)
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    from ..config import GIMConfig

    settings = MethodSettings(method=method, n_steps=n_steps, n_samples=n_samples,
                              internal_batch_size=internal_batch_size, seed=seed,
                              config=GIMConfig(temperature=temperature))
    parsed_target = parse_target(target)
    out = Path(out)
    info = from_env()
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        with process_group(info):
            dev = _device(device, info)
            rows = load_rows(data)
            backend = resolve_backend(model, settings, device=dev, target=parsed_target,
                                      baseline_token=baseline_token, max_length=max_length)
            backend.check_columns(rows.columns, rows.kind)
            options = {"target": None if parsed_target is None else str(parsed_target),
                       "baseline_token": None if baseline_token is None else str(baseline_token),
                       "max_length": max_length, "batch_size": batch_size,
                       "shard_size": shard_size, "format": format, "device": dev.type,
                       "threads": threads}
            record = _record(describe_model(model), rows, backend, settings, options)
            return _run(info, out, rows, backend, record, batch_size, shard_size, format, seed,
                        progress)
    finally:
        torch.set_num_threads(old_threads)


def _run(info: ProcessInfo, out: Path, rows: Rows, backend: Backend, record: Dict[str, Any],
         batch_size: int, shard_size: int, fmt: str, seed: int, progress: bool) -> AttributeRun:
    from tqdm.auto import tqdm

    verdict: Optional[str] = None
    refusal: Optional[ValueError] = None
    if info.is_main:
        try:
            prep = prepare_folder(out, record)
            if progress and prep["resumed"]:
                print(f"resuming the run in {out}", file=sys.stderr)
        except ValueError as e:
            refusal, verdict = e, str(e)
    verdict = broadcast_object(info, verdict)  # a refusal stops every process
    if refusal is not None:
        raise refusal
    if verdict is not None:
        raise ValueError(verdict)
    plan = plan_shards(rows.n_rows, shard_size)
    todo = [k for k in range(len(plan)) if not (out / shard_name(k, fmt)).is_file()]
    barrier(info)  # every process listed the finished shards before any writes one
    mine = shards_of_rank(todo, info)
    result = AttributeRun(out=out, n_rows=rows.n_rows, n_shards=len(plan), computed=[],
                          skipped=len(plan) - len(todo), rank=info.rank, world_size=info.world_size)
    total = sum(plan[k][1] - plan[k][0] for k in mine)
    desc = "attributing" + (f" (rank 0 of {info.world_size})" if info.distributed else "")
    bar = tqdm(total=total, desc=desc, unit="ex", disable=not (progress and info.is_main),
               dynamic_ncols=True, file=sys.stderr)
    error: Optional[BaseException] = None
    start = time.perf_counter()
    try:
        for k in mine:
            s0, s1 = plan[k]
            records, errors = _shard(backend, rows, s0, s1, batch_size, seed, bar)
            write_errors(out / errors_name(k), errors)  # before the shard: it marks "finished"
            atomic_write(out / shard_name(k, fmt), encode_shard(records, backend.columns, fmt))
            result.computed.append(k)
            result.examples += s1 - s0
    except BaseException as e:  # every process must reach the all-reduce below
        error = e
    finally:
        result.seconds = time.perf_counter() - start
        bar.close()
    if progress and info.distributed:
        print(f"rank {info.rank} of {info.world_size}: computed shards {result.computed} "
              f"({result.examples} rows, {result.examples_per_second:.1f} examples/s)",
              file=sys.stderr)
    ok = all_succeeded(info, error is None)
    if error is not None:
        raise error
    if not ok:
        raise RuntimeError("another process of the run failed (see its error); the finished "
                           "shards are kept: run the same command again to resume")
    if info.is_main:
        merge_errors(out, len(plan), out / ERRORS_NAME)
        index = build_index(out, record, plan, fmt)
        atomic_write(out / INDEX_NAME, json_bytes(index))
        result.index = index
        if progress:
            print(f"{index['n_records']} rows attributed, {index['n_errors']} bad rows "
                  f"({ERRORS_NAME}), {len(plan)} shards ({result.skipped} finished before) in "
                  f"{out}", file=sys.stderr)
    barrier(info)  # the index exists when any process returns
    return result
