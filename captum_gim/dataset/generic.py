r"""Any model on numeric inputs in ``attribute``: ``(forward_func, model)`` from an entry point.

:class:`TensorBackend` attributes ``forward_func(inputs)[row, target]``, the inputs being
one float tensor per row, read from the row's ``inputs`` cell (a number list, nested for
more dimensions: JSON ``[[0.1, 2.0], [0.3, 1.5]]``). Optional cells: ``baseline`` (a
number, or a list shaped like ``inputs``; default: the run's ``--baseline-token`` read
as a number, else 0) and ``label`` (the output index to explain; default: the
prediction). ``forward_func`` maps a ``(batch, *shape)`` tensor to ``(batch, outputs)``.

A model without an attention mask cannot be given padded rows, so rows are batched only
with rows of the same shape: a planned batch is split into runs of equal shape (each a
separate call), which keeps every row's result that of the row alone. Output columns:
``row``, ``shape`` (the input's shape), ``scores`` (the attribution, flattened row-major),
``target``, ``output``, ``prediction``, ``logits``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from .backend import Backend, BadRow, Encoded, integral, is_missing
from .methods import MethodSettings, attribute_inputs

__all__ = ["TensorBackend", "same_shape_runs"]


def same_shape_runs(shapes: Sequence[Tuple[int, ...]]) -> List[List[int]]:
    r"""Positions ``0..len(shapes)-1`` grouped by equal shape, each group in position order,
    groups in the order of their first position."""
    groups: Dict[Tuple[int, ...], List[int]] = {}
    for i, s in enumerate(shapes):
        groups.setdefault(tuple(s), []).append(i)
    return list(groups.values())


def _as_array(value: Any, what: str) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise BadRow("invalid-row", f"{what} must be a number list (nested for more "
                     "dimensions) of equal-length lists") from None
    if not np.isfinite(arr).all():
        raise BadRow("invalid-row", f"{what} holds NaN or infinite values")
    return arr


class TensorBackend(Backend):
    r"""A forward function on one float tensor per row (see the module's docstring).

    Args:
        forward_func (callable): ``(batch, *shape) -> (batch, outputs)``.
        model (nn.Module): the module whose backward GIM modifies (``gim``, ``ig-gim``);
            it holds every module ``forward_func`` runs.
        settings (MethodSettings): the method and its budget.
        target (int or str, optional): ``None``/``"auto"``: the row's ``label`` when it
            has one, else the prediction; ``"predicted"``; or one output index for every row.
        baseline (float, optional): the baseline value where a row has no ``baseline``.
        device (torch.device): where the tensors go.
        dtype (torch.dtype): the inputs' dtype (default: the model's first floating
            parameter's, else float32).
    """

    kind = "tensor"
    columns = ("row", "shape", "scores", "target", "output", "prediction", "logits")

    def __init__(
        self,
        forward_func: Callable[..., Tensor],
        model: nn.Module,
        settings: MethodSettings,
        *,
        target: Union[None, int, str] = None,
        baseline: Optional[float] = None,
        device: torch.device = torch.device("cpu"),
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        if not callable(forward_func):
            raise TypeError(f"forward_func must be callable, got {type(forward_func).__name__}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.forward_func = forward_func
        self.model = model
        self.method = settings
        self.device = device
        if dtype is None:
            dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        self.dtype = dtype
        self.baseline = 0.0 if baseline is None else float(baseline)
        if not math.isfinite(self.baseline):
            raise ValueError(f"the baseline must be a finite number, got {baseline!r}")
        self.predicted_only = target == "predicted"
        self.fixed_target: Optional[int] = None
        if target is not None and target != "predicted":
            idx = integral(target)
            if idx is None or idx < 0:
                raise ValueError(f"--target must be an output index (an integer >= 0), got {target!r}")
            self.fixed_target = idx

    def check_columns(self, columns: Sequence[str], rows_kind: str) -> None:
        if rows_kind != "records" or "inputs" not in columns:
            raise ValueError(
                "a (forward_func, model) entry point needs an 'inputs' column (numbers, nested "
                f"lists for more dimensions; optionally 'baseline' and 'label'); the data has "
                f"columns {list(columns)}"
            )

    def encode(self, row: int, record: Mapping[str, Any]) -> Encoded:
        value = record.get("inputs")
        if value is None or (isinstance(value, (list, tuple)) and len(value) == 0) or is_missing(value):
            raise BadRow("empty-input", "the inputs are empty")
        x = _as_array(value, "inputs")
        if x.size == 0:
            raise BadRow("empty-input", "the inputs are empty")
        b_cell = record.get("baseline")
        if b_cell is None or is_missing(b_cell):
            b = np.full_like(x, self.baseline)
        else:
            b = _as_array(b_cell, "baseline")
            try:
                b = np.broadcast_to(b, x.shape).copy()
            except ValueError:
                raise BadRow("invalid-row", f"the baseline's shape {b.shape} does not fit the "
                             f"inputs' shape {x.shape}") from None
        target = self.fixed_target
        if target is None and not self.predicted_only:
            label = record.get("label")
            if label is not None and not is_missing(label):
                target = integral(label)
                if target is None or target < 0:
                    raise BadRow("bad-label", f"the label {label!r} is not an output index")
        return Encoded(row=row, length=int(x.size), data=(x, b), target=target)

    def _run(self, items: List[Encoded]) -> List[Any]:
        x = torch.as_tensor(np.stack([it.data[0] for it in items]), dtype=self.dtype, device=self.device)
        with torch.no_grad():
            logits = self.forward_func(x)
        if not isinstance(logits, Tensor) or logits.dim() < 2:
            raise TypeError("forward_func must return a (batch, outputs) tensor (use "
                            "out.unsqueeze(-1) for one output)")
        logits = logits.reshape(logits.shape[0], -1)
        n_out = logits.shape[1]
        bad = {i: BadRow("bad-label", f"output {it.target} does not exist (the model has {n_out})")
               for i, it in enumerate(items) if it.target is not None and it.target >= n_out}
        if bad:  # attribute the others alone: a row's result never depends on a bad row
            good = [it for i, it in enumerate(items) if i not in bad]
            done = iter(self._run(good) if good else [])
            return [bad[i] if i in bad else next(done) for i in range(len(items))]
        b = torch.as_tensor(np.stack([it.data[1] for it in items]), dtype=self.dtype, device=self.device)
        pred = logits.argmax(-1).tolist()
        targets = torch.tensor([p if it.target is None else it.target for it, p in zip(items, pred)],
                               dtype=torch.long, device=self.device)
        attr = attribute_inputs(self.forward_func, self.model, (x,), (b,), targets, (),
                                self.method, [it.row for it in items])[0]
        scores = attr.float().cpu().numpy()
        logits_np = logits.float().cpu().numpy()
        return [
            {
                "row": it.row,
                "shape": list(it.data[0].shape),
                "scores": scores[i].reshape(-1),
                "target": int(targets[i]),
                "output": float(logits_np[i, int(targets[i])]),
                "prediction": int(pred[i]),
                "logits": logits_np[i],
            }
            for i, it in enumerate(items)
        ]

    def attribute(self, items: List[Encoded]) -> List[Any]:
        out: List[Any] = []
        for run in same_shape_runs([it.data[0].shape for it in items]):
            out += self._run([items[i] for i in run])
        return out

    def settings(self) -> Dict[str, Any]:
        return {"baseline": self.baseline, "dtype": str(self.dtype).replace("torch.", ""),
                "batching": "equal shapes only (no padding)"}
