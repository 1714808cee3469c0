r"""Hugging Face checkpoints in ``attribute``: causal language models and sequence classifiers.

- Causal LM (``*ForCausalLM``, ``GPT2LMHeadModel``...): each row has ``prompt`` and
  optionally ``answer`` (one token; default: the model's greedy next token). The target
  is the answer token's raw logit at the last position; the baseline is one token (pad,
  else EOS, else ``--baseline-token``) at every position; GIM is attributed at the
  embedding layer by :func:`~captum_gim.adapters.transformers.answer_token_attribution`
  (:class:`~captum_gim.LayerGIM`), exactly the paper's setting.
- Sequence classifier (``*ForSequenceClassification``): each row has ``text`` and
  optionally ``label`` (a class index or name; default: the predicted class). The target
  is the class's raw logit; the baseline is ``[PAD]`` (else ``[MASK]``) at every position,
  special tokens included, as in
  :func:`~captum_gim.adapters.transformers.text_classification_attribution`; GIM through
  :class:`~captum_gim.LayerGIM` at the embedding layer.

The other methods (:mod:`captum_gim.dataset.methods`) attribute the same output at the token embeddings
(``inputs_embeds``) with the same baseline embeddings. Batches are right-padded
(:mod:`captum_gim.dataset.batching`); each row's scores cover its own tokens only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from ..adapters.transformers import answer_token_attribution, last_token_logits
from ..adapters.text_result import recommended_baseline_token
from ..attr import LayerGIM
from .backend import Backend, BadRow, Encoded, integral, is_missing
from .batching import pad_right
from .methods import MethodSettings, attribute_inputs

__all__ = ["load_checkpoint", "CausalLMBackend", "ClassifierBackend"]

_HF_COLUMNS = ("row", "tokens", "token_ids", "scores", "target", "target_label", "output",
               "prediction")


def _max_length(model: nn.Module, tokenizer: Any, given: Optional[int]) -> int:
    if given is not None:
        if isinstance(given, bool) or not isinstance(given, int) or given < 1:
            raise ValueError(f"max_length must be a positive integer, got {given!r}")
        return given
    cfg = getattr(model, "config", None)
    limits = [getattr(cfg, a, None) for a in ("max_position_embeddings", "n_positions")]
    tml = getattr(tokenizer, "model_max_length", None)
    limits.append(tml if isinstance(tml, int) and tml < 1_000_000 else None)
    found = [int(v) for v in limits if isinstance(v, int) and v > 0]
    return min(found) if found else 1_000_000


class _HFBackend(Backend):
    r"""What the two Hugging Face kinds share."""

    text_column = ""
    target_column = ""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        settings: MethodSettings,
        *,
        baseline_token: Union[None, int, str] = None,
        target: Union[None, int, str] = None,
        max_length: Optional[int] = None,
        device: torch.device = torch.device("cpu"),
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.method = settings
        self.device = device
        self.emb = model.get_input_embeddings()
        self.max_length = _max_length(model, tokenizer, max_length)
        model_kind = "causal-lm" if self.kind == "causal-lm" else "encoder"
        if isinstance(baseline_token, str) and baseline_token.strip().lstrip("-").isdigit() \
                and tokenizer.convert_tokens_to_ids(baseline_token) == getattr(tokenizer, "unk_token_id", None):
            baseline_token = int(baseline_token)
        self.base_id = int(recommended_baseline_token(tokenizer, model_kind, baseline_token))
        self.fixed_target = self._fixed_target(target)
        self.predicted_only = target == "predicted"

    # --------------------------------------------------------------- rows

    def check_columns(self, columns: Sequence[str], rows_kind: str) -> None:
        if rows_kind != "records" or self.text_column not in columns:
            raise ValueError(
                f"a {self.kind} checkpoint needs a {self.text_column!r} column (and optionally "
                f"{self.target_column!r}); the data has columns {list(columns)}"
            )

    def _fixed_target(self, target: Union[None, int, str]) -> Optional[int]:
        raise NotImplementedError

    def _row_target(self, value: Any) -> Optional[int]:
        raise NotImplementedError

    def encode(self, row: int, record: Mapping[str, Any]) -> Encoded:
        text = record.get(self.text_column)
        if is_missing(text):
            raise BadRow("empty-text", f"the {self.text_column} is empty")
        if not isinstance(text, str):
            raise BadRow("invalid-row", f"the {self.text_column} must be text, got "
                         f"{type(text).__name__} {text!r}")
        ids = list(self.tokenizer(text)["input_ids"])
        if not ids:
            raise BadRow("empty-text", f"the {self.text_column} has no token")
        if len(ids) > self.max_length:
            raise BadRow("too-long", f"the {self.text_column} is {len(ids)} tokens; the model "
                         f"takes at most {self.max_length} (--max-length)")
        target = self.fixed_target
        if target is None and not self.predicted_only:
            value = record.get(self.target_column)
            target = None if is_missing(value) else self._row_target(value)
        return Encoded(row=row, length=len(ids), data=ids, target=target)

    # --------------------------------------------------------------- batches

    def _batch(self, items: List[Encoded]) -> Tuple[Tensor, Tensor]:
        return pad_right([it.data for it in items], self.base_id, self.device)

    def _targets(self, items: List[Encoded], logits: Tensor) -> Tensor:
        pred = logits.argmax(-1).tolist()
        return torch.tensor([p if it.target is None else it.target for it, p in zip(items, pred)],
                            dtype=torch.long, device=self.device)

    def _records(
        self, items: List[Encoded], scores: Tensor, logits: Tensor, targets: Tensor
    ) -> List[Dict[str, Any]]:
        out = []
        scores = scores.float().cpu().numpy()
        logits_np = logits.float().cpu().numpy()
        pred = logits.argmax(-1).tolist()
        for i, it in enumerate(items):
            n = len(it.data)
            t = int(targets[i])
            rec = {
                "row": it.row,
                "tokens": [str(x) for x in self.tokenizer.convert_ids_to_tokens(list(it.data))],
                "token_ids": np.asarray(it.data, dtype=np.int64),
                "scores": scores[i, :n].astype(np.float32),
                "target": t,
                "target_label": self._label(t),
                "output": float(logits_np[i, t]),
                "prediction": int(pred[i]),
            }
            if "logits" in self.columns:
                rec["logits"] = logits_np[i].astype(np.float32)
            out.append(rec)
        return out

    def _label(self, target: int) -> str:
        raise NotImplementedError

    def settings(self) -> Dict[str, Any]:
        return {
            "baseline_token": str(self.tokenizer.convert_ids_to_tokens(self.base_id)),
            "baseline_token_id": self.base_id,
            "max_length": self.max_length,
            "padding": "right",
        }


class CausalLMBackend(_HFBackend):
    r"""A causal LM: ``prompt`` (+ ``answer``) rows, the answer token's logit at the last
    position (see the module's docstring)."""

    kind = "causal-lm"
    columns = _HF_COLUMNS
    text_column = "prompt"
    target_column = "answer"

    def _token(self, value: Any, what: str) -> int:
        as_id = integral(value) if not isinstance(value, str) else None
        if as_id is not None:
            if not 0 <= as_id < len(self.tokenizer):
                raise BadRow("bad-answer", f"{what} id {as_id} is outside the vocabulary")
            return as_id
        if not isinstance(value, str):
            raise BadRow("bad-answer", f"{what} must be a token string or id, got {value!r}")
        ids = self.tokenizer(value, add_special_tokens=False)["input_ids"]
        unk = getattr(self.tokenizer, "unk_token_id", None)
        if len(ids) != 1:
            raise BadRow("bad-answer", f"{what} {value!r} is {len(ids)} tokens; attribute "
                         "explains one answer token (give its first token)")
        if ids[0] == unk and value.strip() != self.tokenizer.unk_token:
            raise BadRow("bad-answer", f"{what} {value!r} is not in the vocabulary")
        return int(ids[0])

    def _fixed_target(self, target: Union[None, int, str]) -> Optional[int]:
        if target is None or target == "predicted":
            return None
        try:
            return self._token(target, "--target")
        except BadRow as e:
            raise ValueError(e.message) from None

    def _row_target(self, value: Any) -> Optional[int]:
        return self._token(value, "the answer")

    def _label(self, target: int) -> str:
        return str(self.tokenizer.convert_ids_to_tokens(target))

    def _embeds_forward(self, embeds: Tensor, mask: Tensor, last: Tensor) -> Tensor:
        logits = self.model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).logits
        return logits[torch.arange(logits.shape[0], device=logits.device), last.to(logits.device)]

    def attribute(self, items: List[Encoded]) -> List[Dict[str, Any]]:
        ids, mask = self._batch(items)
        with torch.no_grad():
            logits = last_token_logits(self.model, ids, mask)
        targets = self._targets(items, logits)
        if self.method.method == "gim":
            scores = answer_token_attribution(
                self.model, ids, targets, attention_mask=mask, baseline_token_id=self.base_id,
                config=self.method.config)
        else:
            last = mask.sum(1) - 1  # right padding: each row's last real token
            with torch.no_grad():
                x = self.emb(ids)
                b = self.emb(torch.full_like(ids, self.base_id))
            attr = attribute_inputs(self._embeds_forward, self.model, (x,), (b,), targets,
                                    (mask, last), self.method, [it.row for it in items])[0]
            scores = attr.sum(-1) * mask.to(attr.dtype)
        return self._records(items, scores, logits, targets)


class ClassifierBackend(_HFBackend):
    r"""A sequence classifier: ``text`` (+ ``label``) rows, the class's raw logit."""

    kind = "classifier"
    columns = _HF_COLUMNS + ("logits",)
    text_column = "text"
    target_column = "label"

    @property
    def _n_classes(self) -> int:
        return int(getattr(self.model.config, "num_labels", 0) or 0)

    def _class(self, value: Any, what: str) -> int:
        idx = integral(value)
        if idx is None and isinstance(value, str):
            label2id = getattr(self.model.config, "label2id", None) or {}
            if value in label2id:
                idx = int(label2id[value])
        if idx is None or not 0 <= idx < self._n_classes:
            names = list((getattr(self.model.config, "label2id", None) or {}))
            raise BadRow("bad-label", f"{what} {value!r} is not a class of the model (0.."
                         f"{self._n_classes - 1}{', or one of ' + str(names) if names else ''})")
        return idx

    def _fixed_target(self, target: Union[None, int, str]) -> Optional[int]:
        if target is None or target == "predicted":
            return None
        try:
            return self._class(target, "--target")
        except BadRow as e:
            raise ValueError(e.message) from None

    def _row_target(self, value: Any) -> Optional[int]:
        return self._class(value, "the label")

    def _label(self, target: int) -> str:
        id2label = getattr(self.model.config, "id2label", None) or {}
        return str(id2label.get(target, id2label.get(str(target), target)))

    def _ids_forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        return self.model(input_ids=ids, attention_mask=mask).logits

    def _embeds_forward(self, embeds: Tensor, mask: Tensor) -> Tensor:
        return self.model(inputs_embeds=embeds, attention_mask=mask).logits

    def attribute(self, items: List[Encoded]) -> List[Dict[str, Any]]:
        ids, mask = self._batch(items)
        with torch.no_grad():
            logits = self._ids_forward(ids, mask)
        targets = self._targets(items, logits)
        if self.method.method == "gim":
            attr = LayerGIM(self._ids_forward, self.emb, model=self.model,
                            config=self.method.config).attribute(
                ids, baselines=torch.full_like(ids, self.base_id), target=targets,
                additional_forward_args=(mask,))
        else:
            with torch.no_grad():
                x = self.emb(ids)
                b = self.emb(torch.full_like(ids, self.base_id))
            attr = attribute_inputs(self._embeds_forward, self.model, (x,), (b,), targets,
                                    (mask,), self.method, [it.row for it in items])[0]
        assert isinstance(attr, Tensor)
        scores = attr.detach().sum(-1) * mask.to(attr.dtype)
        return self._records(items, scores, logits, targets)


def load_checkpoint(
    path: Path,
    settings: MethodSettings,
    *,
    device: torch.device,
    baseline_token: Union[None, int, str] = None,
    target: Union[None, int, str] = None,
    max_length: Optional[int] = None,
) -> _HFBackend:
    r"""The backend for a local Hugging Face checkpoint directory.

    Raises:
        FileNotFoundError: no ``config.json`` in ``path``.
        ValueError: the checkpoint is neither a causal LM nor a sequence classifier, or has
            no tokenizer.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from ..evaluation.tasks import frozen
    from ..evaluation.tasks.hf_causal import is_causal_lm
    from ..evaluation.tasks.hf_load import checkpoint_config, load_tokenizer, quiet_transformers

    path = Path(path)
    config = checkpoint_config(path)
    archs = list(getattr(config, "architectures", None) or [])
    if is_causal_lm(archs):
        auto, cls = AutoModelForCausalLM, CausalLMBackend
    elif any(a.endswith("ForSequenceClassification") for a in archs):
        auto, cls = AutoModelForSequenceClassification, ClassifierBackend
    else:
        raise ValueError(
            f"{path} ({', '.join(archs) or config.model_type}) is neither a causal language "
            "model nor a sequence classifier; attribute takes those two kinds of checkpoint "
            "(or a module:function entry point)"
        )
    tokenizer = load_tokenizer(path)
    with quiet_transformers():
        model = auto.from_pretrained(str(path), local_files_only=True)
    model = frozen(model, device)
    return cls(model, tokenizer, settings, baseline_token=baseline_token, target=target,
               max_length=max_length, device=device)
