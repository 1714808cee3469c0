r"""The embedded default: a small transformer classifier with planted, redundant evidence.

The task: a sequence of 15 tokens after ``[CLS]`` is positive exactly when it contains
``alpha``, or both ``beta`` and ``gamma``. Positive test sequences come in four kinds:

- ``single``: ``alpha`` once;
- ``twice``: ``alpha`` twice (redundant: removing either copy changes little);
- ``conj``: ``beta`` and ``gamma`` (each necessary, neither sufficient);
- ``both``: ``alpha``, ``beta`` and ``gamma`` (redundant: two sufficient sets).

Negatives, ``single`` and ``twice`` sequences may also hold a lone ``beta`` or ``gamma``:
a near miss that is not evidence. The redundant kinds are the self-repair case GIM
was designed for: when one copy is removed the attention softmax moves its weight to
the other, so the plain gradient at each copy understates it. The ground-truth
evidence of a positive sequence is the set of positions that make it positive. Fillers (``w00``...), decoys (``delta``, ``omega``, as
frequent in both classes) and the baseline token ``[MASK]`` fill the rest; during
training a random share of non-trigger positions is replaced by ``[MASK]`` so that
removal-based metrics (which replace tokens by ``[MASK]``) stay in distribution.

The model (a ``[CLS]``-pooled, pre-norm ``nn.TransformerEncoder`` with learned positions
and a final ``LayerNorm``) trains in seconds on a CPU and is cached under
:func:`~captum_gim.evaluation.tasks.cache_dir`, keyed by a hash of its settings.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from ..types import Example, Task, softmax_score
from ._common import CacheKey, cache_dir, frozen, load_cached, save_cached

__all__ = [
    "SyntheticSettings",
    "TokenTransformerClassifier",
    "Vocabulary",
    "make_sequences",
    "train_synthetic_model",
    "load_synthetic_model",
    "synthetic_task",
]

KINDS = ("single", "twice", "conj", "both")


def training_kinds(n: int) -> List[str]:
    r"""``n`` kinds for a training or test set: half ``negative``, the rest the
    :data:`KINDS` in turn (shuffle them)."""
    return ["negative" if i % 2 == 0 else KINDS[(i // 2) % len(KINDS)] for i in range(n)]


@dataclass(frozen=True)
class SyntheticSettings(CacheKey):
    r"""Everything that determines the trained default model (the cache key)."""

    seq_len: int = 16
    n_fillers: int = 40
    d_model: int = 32
    n_heads: int = 4
    d_ff: int = 64
    n_layers: int = 2
    n_train: int = 6000
    epochs: int = 12
    batch_size: int = 64
    lr: float = 3e-3
    train_seed: int = 0
    version: int = 2


class Vocabulary:
    r"""Token names and ids of the synthetic task."""

    def __init__(self, n_fillers: int) -> None:
        self.tokens: List[str] = ["[PAD]", "[CLS]", "[MASK]", "alpha", "beta", "gamma"]
        self.tokens += ["delta", "omega"]
        n_special = len(self.tokens)
        self.tokens += [f"w{i:02d}" for i in range(n_fillers)]
        self.index: Dict[str, int] = {t: i for i, t in enumerate(self.tokens)}
        self.cls = self.index["[CLS]"]
        self.mask = self.index["[MASK]"]
        self.alpha, self.beta, self.gamma = (self.index[t] for t in ("alpha", "beta", "gamma"))
        self.decoys = (self.index["delta"], self.index["omega"])
        self.fillers = np.arange(n_special, n_special + n_fillers)

    def __len__(self) -> int:
        return len(self.tokens)

    def decode(self, ids: Tensor) -> List[str]:
        return [self.tokens[int(i)] for i in ids]


def make_sequences(
    vocab: Vocabulary,
    kinds: List[str],
    seq_len: int,
    rng: np.random.Generator,
    mask_augment: float = 0.0,
) -> Tuple[Tensor, Tensor]:
    r"""Sequences of the given kinds (``negative`` or one of :data:`KINDS`).

    ``alpha`` alone is sufficient; ``beta`` and ``gamma`` are sufficient together and
    neither is alone. Negatives and the ``single``/``twice`` kinds may carry a lone
    ``beta`` or ``gamma`` (a near miss, not evidence).

    Returns:
        (ids, evidence): ``(N, seq_len)`` token ids starting with ``[CLS]``, and a bool
        tensor marking the evidence positions.
    """
    n, body = len(kinds), seq_len - 1
    a, b, g = vocab.alpha, vocab.beta, vocab.gamma
    ids = rng.choice(vocab.fillers, size=(n, body))
    u = rng.random((n, body))
    ids = np.where(u < 0.15, rng.choice(np.array(vocab.decoys), size=(n, body)), ids)
    ids = np.where((u >= 0.15) & (u < 0.20), vocab.mask, ids)
    evidence = np.zeros((n, body), dtype=bool)
    for i, kind in enumerate(kinds):
        lone = [int(rng.choice([b, g]))] if rng.random() < 0.5 else []
        if kind == "negative":
            toks, ev = lone, [False] * len(lone)
        elif kind == "single":
            toks, ev = [a] + lone, [True] + [False] * len(lone)
        elif kind == "twice":
            toks, ev = [a, a] + lone, [True, True] + [False] * len(lone)
        elif kind == "conj":
            toks, ev = [b, g], [True, True]
        elif kind == "both":
            toks, ev = [a, b, g], [True, True, True]
        else:
            raise ValueError(f"unknown kind {kind!r}")
        if toks:
            pos = rng.choice(body, size=len(toks), replace=False)
            ids[i, pos] = toks
            evidence[i, pos] = ev
    if mask_augment > 0:
        # replace a random share of the other positions of some sequences by [MASK]
        chosen = rng.random(n) < mask_augment
        share = rng.random((n, 1))
        special = np.isin(ids, [a, b, g])
        drop = (rng.random((n, body)) < share) & chosen[:, None] & ~special
        ids = np.where(drop, vocab.mask, ids)
    cls = np.full((n, 1), vocab.cls)
    ids_t = torch.from_numpy(np.concatenate([cls, ids], axis=1)).long()
    ev_t = torch.from_numpy(np.concatenate([np.zeros((n, 1), bool), evidence], axis=1))
    return ids_t, ev_t


class TokenTransformerClassifier(nn.Module):
    r"""A ``[CLS]``-pooled transformer encoder classifier over token ids.

    ``forward(input_ids)`` returns logits; ``forward_embeds(embeds)`` does the same
    from the token embeddings (``self.embedding(input_ids)``), which is what
    attribution methods differentiate.
    """

    def __init__(
        self,
        vocab_size: int,
        seq_len: int,
        d_model: int,
        n_heads: int,
        d_ff: int,
        n_layers: int,
        n_classes: int = 2,
    ) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, d_model)
        self.position = nn.Parameter(torch.randn(seq_len, d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(
            d_model, n_heads, d_ff, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, n_classes)

    def forward_embeds(self, embeds: Tensor) -> Tensor:
        h = embeds + self.position[: embeds.shape[1]]
        h = self.encoder(h)
        return self.head(self.norm(h[:, 0]))

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.forward_embeds(self.embedding(input_ids))


def _build(settings: SyntheticSettings, vocab: Vocabulary) -> TokenTransformerClassifier:
    return TokenTransformerClassifier(
        len(vocab),
        settings.seq_len,
        settings.d_model,
        settings.n_heads,
        settings.d_ff,
        settings.n_layers,
    )


def _labelled_set(
    vocab: Vocabulary, n: int, seq_len: int, rng: np.random.Generator, mask_augment: float
) -> Tuple[Tensor, Tensor]:
    kinds = training_kinds(n)
    rng.shuffle(kinds)
    ids, _ = make_sequences(vocab, kinds, seq_len, rng, mask_augment=mask_augment)
    labels = torch.tensor([k != "negative" for k in kinds]).long()
    return ids, labels


def train_synthetic_model(
    settings: SyntheticSettings, progress: bool = True
) -> Tuple[TokenTransformerClassifier, Dict[str, float]]:
    r"""Train the default model from scratch (seconds on a CPU).

    Returns:
        (model, metrics): the model in eval mode and measured facts about the run
        (held-out accuracy, accuracy on sequences with half their tokens masked, final
        loss, seconds).
    """
    from tqdm.auto import tqdm

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is fastest and reproducible
    try:
        return _train(settings, progress, tqdm)
    finally:
        torch.set_num_threads(threads)


def _train(
    settings: SyntheticSettings, progress: bool, tqdm: Any
) -> Tuple[TokenTransformerClassifier, Dict[str, float]]:
    vocab = Vocabulary(settings.n_fillers)
    rng = np.random.default_rng(settings.train_seed)
    torch.manual_seed(settings.train_seed)
    model = _build(settings, vocab)
    x, y = _labelled_set(vocab, settings.n_train, settings.seq_len, rng, mask_augment=0.4)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.01)
    steps = settings.epochs * ((settings.n_train + settings.batch_size - 1) // settings.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=settings.lr, total_steps=steps)
    gen = torch.Generator().manual_seed(settings.train_seed)
    start = time.perf_counter()
    loss_value = float("nan")
    model.train()
    bar = tqdm(total=steps, desc="training the default model", disable=not progress, leave=False)
    for _ in range(settings.epochs):
        perm = torch.randperm(settings.n_train, generator=gen)
        for i in range(0, settings.n_train, settings.batch_size):
            idx = perm[i : i + settings.batch_size]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            loss_value = float(loss.item())
            bar.update(1)
    bar.close()
    seconds = time.perf_counter() - start
    model.eval()
    test_rng = np.random.default_rng(settings.train_seed + 10_000)
    xt, yt = _labelled_set(vocab, 2000, settings.seq_len, test_rng, mask_augment=0.0)
    xm, ym = _labelled_set(vocab, 2000, settings.seq_len, test_rng, mask_augment=1.0)
    with torch.no_grad():
        acc = float((model(xt).argmax(-1) == yt).float().mean())
        acc_masked = float((model(xm).argmax(-1) == ym).float().mean())
    metrics = {
        "test_accuracy": acc,
        "test_accuracy_masked": acc_masked,
        "final_train_loss": loss_value,
        "train_seconds": seconds,
        "n_test": 2000,
    }
    return model, metrics


def load_synthetic_model(
    settings: SyntheticSettings = SyntheticSettings(),
    progress: bool = True,
    directory: Optional[Path] = None,
) -> Tuple[TokenTransformerClassifier, Dict[str, object]]:
    r"""The default model: from the cache if there, else trained and cached.

    Returns:
        (model, info): the model (eval mode, CPU) and facts about it, including the
        cache path and whether it was loaded from the cache.
    """
    directory = directory if directory is not None else cache_dir() / "models"
    path = directory / f"synthetic-redundant-{settings.key()}.pt"
    vocab = Vocabulary(settings.n_fillers)
    model = _build(settings, vocab)
    cached = load_cached(path, model)
    if cached is not None:
        return model.eval(), {"cache_path": str(path), "from_cache": True, **cached}
    model, metrics = train_synthetic_model(settings, progress=progress)
    save_cached({"state_dict": model.state_dict(), "metrics": metrics,
                 "settings": dataclasses.asdict(settings)}, path)
    return model, {"cache_path": str(path), "from_cache": False, **metrics}


def synthetic_task(
    n_examples: int = 48,
    seed: int = 0,
    device: torch.device = torch.device("cpu"),
    progress: bool = True,
    settings: SyntheticSettings = SyntheticSettings(),
) -> Task:
    r"""The embedded default task: explain class 1 on positive test sequences.

    Args:
        n_examples (int): positive sequences to explain, the four kinds in turn.
        seed (int): draws the sequences.
        device (torch.device): where to run.
        progress (bool): show a progress bar if the model has to be trained.
        settings (SyntheticSettings): the model and training settings.
    """
    model, info = load_synthetic_model(settings, progress=progress)
    model = frozen(model, device)
    vocab = Vocabulary(settings.n_fillers)
    rng = np.random.default_rng([seed, 20_250_101])
    kinds = [KINDS[i % len(KINDS)] for i in range(n_examples)]
    ids, evidence = make_sequences(vocab, kinds, settings.seq_len, rng)
    ids = ids.to(device)
    base_ids = torch.full_like(ids, vocab.mask)
    base_ids[:, 0] = vocab.cls
    with torch.no_grad():
        emb = model.embedding(ids)
        base = model.embedding(base_ids)
        probs = torch.softmax(model(ids), dim=-1)[:, 1]
    valid = torch.ones(settings.seq_len, dtype=torch.bool)
    valid[0] = False
    examples = [
        Example(
            inputs=(emb[i : i + 1].clone(),),
            baselines=(base[i : i + 1].clone(),),
            target=1,
            valid=(valid,),
            evidence=(evidence[i],),
            unit_labels=vocab.decode(ids[i].cpu()),
            group=kinds[i],
            true_label="positive",
            target_label="positive",
            text=" ".join(vocab.decode(ids[i, 1:].cpu())),
        )
        for i in range(n_examples)
    ]
    info = dict(info)
    info.update(
        {
            "settings": dataclasses.asdict(settings),
            "n_parameters": int(sum(p.numel() for p in model.parameters())),
            "examples_mean_p_target": float(probs.mean()),
            "examples_accuracy": float((probs > 0.5).float().mean()),
            "groups": {k: kinds.count(k) for k in KINDS},
            "baseline_token": "[MASK]",
        }
    )
    return Task(
        name="default",
        description=(
            f"Embedded default: a {settings.n_layers}-layer pre-norm transformer encoder classifier "
            f"(d={settings.d_model}, {settings.n_heads} heads, [CLS] pooling) trained on a "
            "synthetic task: a sequence is positive iff it contains 'alpha', or both 'beta' "
            "and 'gamma' (a lone 'beta' or 'gamma' is a near miss). Explained: class "
            "'positive' on positive test sequences of four kinds: 'alpha' once (single), "
            "twice (twice: redundant), 'beta'+'gamma' (conj: each necessary), all three "
            "(both: redundant)."
        ),
        model=model,
        forward_func=model.forward_embeds,
        reduce_dims=(1,),
        examples=examples,
        score_fn=softmax_score,
        score_name="p(positive)",
        unit_name="token",
        ground_truth="the trigger positions (planted by construction)",
        info=info,
    )
