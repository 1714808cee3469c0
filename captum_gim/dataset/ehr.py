r"""PyHealth models in ``attribute``: one record per patient (sample), codes and values scored.

Rows are either the processed samples of a PyHealth ``SampleDataset`` (from Python), or raw
sample dicts (a JSONL file, a list of dicts) processed here with the model's own
``model.dataset.input_processors``, exactly as PyHealth's task pipeline does. In raw rows
every feature is written as the task would produce it, in JSON: a code list
(``["I10", "E11"]``), a number list, or a ``(times, values)`` pair as a two-element list
whose first element is a list (times as numbers, or ISO 8601 strings, which are read as
``datetime``).

Attribution goes through :class:`captum_gim.pyhealth.PyHealthAdapter`: codes are
attributed at their embeddings (summed over the embedding dimension: one score per code),
continuous features per raw value. The baseline is zero (the zero embedding, 0.0: the
adapter's and PyHealth's convention), or with ``--baseline-token CODE`` that code's
embedding at every code position. Batches are padded by PyHealth's collate function and
masked by the adapter, so a patient's result does not depend on its batch.

The target: a single-logit model (binary, regression) always explains its logit;
otherwise ``--target`` (a class index or label), else the row's label when it holds one
(``auto``), else the predicted class. Bad rows: a missing or empty feature, a value the
processor rejects, and **unknown codes** (codes outside the model's vocabulary, which
PyHealth would silently turn into ``<unk>``; processed samples holding ``<unk>`` or an
id outside the vocabulary).

Columns: ``row``, ``id`` (the sample's ``patient_id``, else ``""``), ``features`` (the
feature key of each unit), ``tokens`` (the code, or ``key[t,j]`` for a value),
``values`` (a value's raw number; NaN for codes), ``scores``, ``target``,
``target_label``, ``output`` (the target's logit), ``prediction``, ``logits``.
"""

from __future__ import annotations

import datetime as _dt
import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from .backend import Backend, BadRow, Encoded, integral, is_missing
from .methods import MethodSettings, attribute_inputs

__all__ = ["PyHealthBackend"]


def _json_value(value: Any) -> Any:
    r"""A raw JSON cell as PyHealth's processors take it: ``[times, values]`` -> a tuple,
    ISO time strings -> ``datetime``."""
    if isinstance(value, list) and len(value) == 2 and isinstance(value[0], list):
        times = [_dt.datetime.fromisoformat(t) if isinstance(t, str) else t for t in value[0]]
        return (times, value[1])
    return value


def _is_processed(value: Any) -> bool:
    return isinstance(value, Tensor) or (isinstance(value, tuple) and any(isinstance(v, Tensor) for v in value))


def _value_part(processed: Any, schema: Tuple[str, ...]) -> Any:
    parts = processed if isinstance(processed, tuple) else (processed,)
    return parts[schema.index("value")] if len(parts) > schema.index("value") else None


class PyHealthBackend(Backend):
    r"""A PyHealth model through :class:`~captum_gim.pyhealth.PyHealthAdapter` (see the
    module's docstring).

    Args:
        model: a PyHealth model implementing ``Interpretable`` (eval mode, on ``device``).
        settings (MethodSettings): the method and its budget.
        adapter (PyHealthAdapter, optional): an adapter of ``model`` (default: a new one,
            ``mask_mode="padding"``).
        target: ``None`` (the row's label, else the prediction), ``"predicted"``, or a
            class (index or label).
        baseline_token (str, optional): a code whose embedding is the baseline of every
            code position (default: the zero embedding).
        device (torch.device): where the model runs.
    """

    kind = "pyhealth"
    columns = ("row", "id", "features", "tokens", "values", "scores", "target", "target_label",
               "output", "prediction", "logits")

    def __init__(self, model: nn.Module, settings: MethodSettings, *, adapter: Any = None,
                 target: Union[None, int, str] = None, baseline_token: Union[None, int, str] = None,
                 device: torch.device = torch.device("cpu")) -> None:
        from captum_gim.pyhealth import PyHealthAdapter

        if adapter is None:
            adapter = PyHealthAdapter(model)
        if not isinstance(adapter, PyHealthAdapter) or adapter.model is not model:
            raise TypeError("the forward function of a PyHealth model must be a PyHealthAdapter "
                            "of that model (or None)")
        self.model, self.adapter, self.method, self.device = model, adapter.to(device), settings, device
        self.processors = model.dataset.input_processors
        self.keys = tuple(adapter.feature_keys)
        self.schemas = {k: tuple(self.processors[k].schema()) for k in self.keys}
        self.vocabs: Dict[str, Dict[Any, int]] = {
            k: dict(getattr(self.processors[k], "code_vocab")) for k in adapter.token_keys}
        self.inverse = {k: {i: str(c) for c, i in v.items()} for k, v in self.vocabs.items()}
        labels = list(getattr(model, "label_keys", []) or [])
        self.label_key = labels[0] if len(labels) == 1 else None
        out_proc = model.dataset.output_processors.get(self.label_key) if self.label_key else None
        self.out_proc = out_proc
        self.n_outputs = int(model.get_output_size()) if hasattr(model, "get_output_size") else None
        self.label_names = {int(i): str(c) for c, i in (getattr(out_proc, "label_vocab", None) or {}).items()}
        self.mode = getattr(model, "mode", None)
        self.predicted_only = target == "predicted"
        self.fixed_target = None
        if target is not None and target != "predicted":
            self.fixed_target = self._class(target, ValueError)
        self.baseline_code = None if baseline_token is None else str(baseline_token)
        if self.baseline_code is not None:
            missing = [k for k, v in self.vocabs.items() if self.baseline_code not in v]
            if missing or not self.vocabs:
                raise ValueError(f"--baseline-token {self.baseline_code!r} is not a code of "
                                 f"feature(s) {missing or list(self.keys)}")

    # ---------------------------------------------------------------- targets

    def _class(self, value: Any, error: Any = None) -> Optional[int]:
        if self.n_outputs == 1:
            return 0
        idx = integral(value)
        if idx is None:
            names = {v: k for k, v in self.label_names.items()}
            idx = names.get(str(value))
        if idx is None or (self.n_outputs is not None and not 0 <= idx < self.n_outputs):
            msg = f"{value!r} is not a class of the model ({self.n_outputs} outputs)"
            raise (error(msg) if error is not None else BadRow("bad-label", msg))
        return idx

    def _row_target(self, record: Mapping[str, Any], raw: bool) -> Optional[int]:
        if self.fixed_target is not None or self.predicted_only:
            return self.fixed_target
        if self.n_outputs == 1:
            return 0
        if self.label_key is None or self.mode not in ("multiclass",):
            return None
        value = record.get(self.label_key)
        if value is None or is_missing(value):
            return None
        if isinstance(value, Tensor):
            if value.numel() != 1:
                return None
            return self._class(int(value.reshape(-1)[0]))
        if raw and self.out_proc is not None:
            try:
                return self._class(int(self.out_proc.process(value).reshape(-1)[0]))
            except (KeyError, ValueError, TypeError):
                raise BadRow("bad-label", f"the label {value!r} is not a class of the model") from None
        return self._class(value)

    # ---------------------------------------------------------------- rows

    def check_columns(self, columns: Sequence[str], rows_kind: str) -> None:
        missing = [k for k in self.keys if k not in columns]
        if missing:
            raise ValueError(f"the PyHealth model needs the feature(s) {missing}; the data has "
                             f"columns {list(columns)}")

    def _process(self, key: str, value: Any) -> Any:
        try:
            return self.processors[key].process(_json_value(value))
        except Exception as e:  # a processor rejects the value: a bad row, not a failed run
            raise BadRow("invalid-row", f"feature {key!r}: {type(e).__name__}: {e}") from None

    def _check_codes(self, key: str, ids: Tensor, raw: Any) -> None:
        vocab = self.vocabs[key]
        unk = vocab.get("<unk>")
        bad = (ids < 0) | (ids >= len(vocab))
        if unk is not None:
            bad |= ids == unk
        if bool(bad.any()):
            if isinstance(raw, list) and all(isinstance(c, str) for c in raw):
                shown = sorted({c for c in raw if c not in vocab})
            else:
                shown = sorted({int(i) for i in ids[bad].reshape(-1)})
            raise BadRow("unknown-codes", f"feature {key!r}: codes unknown to the model: {shown}")

    def encode(self, row: int, record: Mapping[str, Any]) -> Encoded:
        raw = not any(_is_processed(record.get(k)) for k in self.keys)
        sample: Dict[str, Any] = {}
        length = 0
        for key in self.keys:
            value = record.get(key)
            if value is None or (not isinstance(value, (Tensor, tuple, list)) and is_missing(value)):
                raise BadRow("empty-input", f"feature {key!r} is missing")
            processed = self._process(key, value) if raw else value
            v = _value_part(processed, self.schemas[key])
            if not isinstance(v, Tensor) or v.numel() == 0:
                raise BadRow("empty-input", f"feature {key!r} has no code or value")
            if key in self.vocabs:
                self._check_codes(key, v, value if raw else None)
            sample[key] = processed
            length += int(v.numel())
        return Encoded(row=row, length=length, data=(sample, str(record.get("patient_id", "") or "")),
                       target=self._row_target(record, raw))

    # ---------------------------------------------------------------- batches

    def _labels(self, key: str, v: Tensor) -> Tuple[List[str], List[float]]:
        if key in self.vocabs:
            inv = self.inverse[key]
            ids = v.reshape(-1).tolist()
            return [inv.get(int(i), str(int(i))) for i in ids], [math.nan] * len(ids)
        idx = np.argwhere(np.ones(tuple(v.shape), dtype=bool))
        return ([f"{key}[{','.join(str(int(j)) for j in ix)}]" for ix in idx],
                v.reshape(-1).double().tolist())

    def attribute(self, items: List[Encoded]) -> List[Any]:
        from pyhealth.datasets.utils import collate_fn_dict_with_padding

        batch = collate_fn_dict_with_padding([it.data[0] for it in items])
        baselines = None
        if self.baseline_code is not None:
            baselines = {k: self.vocabs[k][self.baseline_code] for k in self.vocabs}
        with self.adapter.eval_mode():
            prep = self.adapter.prepare(batch, baselines=baselines)
            targets = prep.target.clone()
            for i, it in enumerate(items):
                if it.target is not None:
                    targets[i] = it.target
            attrs = attribute_inputs(self.adapter, self.adapter, prep.inputs, prep.baselines, targets,
                                     prep.additional_forward_args, self.method, [it.row for it in items])
        per_key = self.adapter.to_feature_dict(attrs)
        logits = prep.logits.reshape(len(items), -1).float().cpu().numpy()
        out = []
        for i, it in enumerate(items):
            features: List[str] = []
            tokens: List[str] = []
            values: List[float] = []
            scores: List[np.ndarray] = []
            for key in self.keys:
                v = _value_part(it.data[0][key], self.schemas[key])
                a = per_key[key][i][tuple(slice(0, s) for s in v.shape)]
                names, vals = self._labels(key, v)
                features += [key] * len(names)
                tokens += names
                values += vals
                scores.append(a.float().cpu().numpy().reshape(-1))
            t = int(targets[i])
            pred = int(logits[i, 0] > 0) if logits.shape[1] == 1 else int(logits[i].argmax())
            label = self.label_names.get(1 if logits.shape[1] == 1 else t, str(t))
            out.append({
                "row": it.row, "id": it.data[1], "features": features, "tokens": tokens,
                "values": values, "scores": np.concatenate(scores) if scores else np.zeros(0),
                "target": t, "target_label": label, "output": float(logits[i, t]),
                "prediction": pred, "logits": logits[i],
            })
        return out

    def settings(self) -> Dict[str, Any]:
        return {"features": list(self.keys), "token_features": sorted(self.vocabs),
                "baseline": "zeros" if self.baseline_code is None else f"code {self.baseline_code}",
                "mask_mode": self.adapter.mask_mode, "n_outputs": self.n_outputs,
                "padding": "PyHealth collate (right), adapter masks"}
