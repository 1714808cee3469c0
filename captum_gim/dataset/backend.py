r"""What every model kind of ``attribute`` provides: rows in, records out.

A backend turns one dataset row into an :class:`Encoded` input (or refuses it with
:class:`BadRow`, which the run records in the errors file and goes on), and a batch of
encoded rows into one record per row (the shard columns of
:data:`captum_gim.dataset.shards.COLUMN_KINDS` that it lists in ``columns``), or a
:class:`BadRow` for a row found bad only once the model ran (an output index the model
does not have).

The backends: :mod:`captum_gim.dataset.hf` (Hugging Face causal LMs and sequence
classifiers), :mod:`captum_gim.dataset.ehr` (PyHealth models),
:mod:`captum_gim.dataset.generic` (any model on numeric inputs) and
:mod:`captum_gim.dataset.builtin` (the benchmark's tasks). Write your own by subclassing
:class:`Backend` and returning an instance from a ``module:function`` entry point (see
:mod:`captum_gim.dataset.entry`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

__all__ = ["BadRow", "Encoded", "Backend", "parse_target"]

#: why a row was refused (the ``reason`` of an errors-file line)
REASONS = (
    "empty-text",      # no text / prompt, or no token after tokenization
    "unknown-tokens",  # words outside a fixed vocabulary (the built-in default task)
    "empty-input",     # a PyHealth sample with no code or value in a feature
    "too-long",        # more tokens than the model (or --max-length) takes
    "unknown-codes",   # PyHealth codes outside the model's vocabulary
    "bad-answer",      # an answer that is not one known token
    "bad-label",       # a label that is not a class of the model
    "invalid-row",     # a value of the wrong type, or one the processor rejects
)


class BadRow(Exception):
    r"""A row that cannot be attributed; the run records it and goes on.

    Args:
        reason (str): one of :data:`REASONS`.
        message (str): what is wrong, for a person.
    """

    def __init__(self, reason: str, message: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown bad-row reason {reason!r}")
        super().__init__(message)
        self.reason = reason
        self.message = message

    def record(self, row: int) -> Dict[str, Any]:
        r"""The errors-file line of row ``row``."""
        return {"row": int(row), "reason": self.reason, "message": self.message}


@dataclass
class Encoded:
    r"""One row, ready to batch.

    Attributes:
        row (int): the dataset row number.
        length (int): its size (tokens, codes): rows of similar size share a batch.
        data (Any): what the backend needs (token ids, a processed sample...).
        target (int, optional): the output to explain, when the row or the run names
            it; None: the model's prediction.
    """

    row: int
    length: int
    data: Any
    target: Optional[int] = None


class Backend:
    r"""The interface of a model kind: rows in, one record per row out.

    Subclass it for a model the built-in backends do not cover, and return an instance
    from a ``module:function`` entry point (:mod:`captum_gim.dataset.entry`). The run
    calls :meth:`check_columns` once, :meth:`encode` on every row, then
    :meth:`attribute` on batches of encoded rows of similar :attr:`Encoded.length`.

    Attributes:
        kind (str): a name for the model kind (``causal-lm``, ``classifier``,
            ``pyhealth``, ``tensor``...), recorded in the index.
        columns (tuple of str): the shard columns each record holds, in order (names
            of :data:`captum_gim.dataset.shards.COLUMN_KINDS`).
        method (MethodSettings, optional): the method the backend computes; when a
            backend has it, a run refuses a ``--method`` that differs from it.
    """

    kind: str = ""
    columns: Tuple[str, ...] = ()

    def check_columns(self, columns: Sequence[str], rows_kind: str) -> None:
        r"""Raise ValueError when the dataset lacks a column this model kind needs."""
        raise NotImplementedError

    def encode(self, row: int, record: Mapping[str, Any]) -> Encoded:
        r"""One row as model input; raises :class:`BadRow` for a row that cannot be used."""
        raise NotImplementedError

    def attribute(self, items: List[Encoded]) -> List[Union[Dict[str, Any], BadRow]]:
        r"""One record per item (in the items' order), holding :attr:`columns`, or a
        :class:`BadRow` for an item that turned out bad. The result of an item must not
        depend on the other items of the batch (beyond floating-point rounding) nor on
        anything random that is not seeded by the item's row."""
        raise NotImplementedError

    def settings(self) -> Dict[str, Any]:
        r"""The resolved settings (baseline token, length limit...), recorded in the index."""
        return {}


def parse_target(target: Union[None, int, str]) -> Union[None, int, str]:
    r"""``--target``: None or ``"auto"`` (the row's ``answer``/``label`` when it has one,
    else the prediction), ``"predicted"`` (always the prediction), or a fixed target (an
    int, or a string the backend resolves: a token, a class name)."""
    if target is None:
        return None
    if isinstance(target, bool):
        raise ValueError(f"target must be an int or a string, got {target!r}")
    if isinstance(target, int):
        return target
    if not isinstance(target, str) or not target.strip():
        raise ValueError(f"target must be an int or a non-empty string, got {target!r}")
    text = target.strip()
    if text == "auto":
        return None
    if text == "predicted":
        return text
    try:
        return int(text)
    except ValueError:
        return target


def integral(value: Any) -> Optional[int]:
    r"""``value`` as an int when it is one (``3``, ``3.0``, ``"3"``); None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return None
    return None


def is_missing(value: Any) -> bool:
    r"""Whether a cell is empty: None, NaN (a blank CSV number), or a blank string."""
    if value is None:
        return True
    if isinstance(value, float) and value != value:
        return True
    return isinstance(value, str) and not value.strip()
