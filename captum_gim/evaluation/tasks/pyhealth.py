r"""The ``pyhealth`` target of ``captum-gim compare``: a synthetic EHR cohort on a
PyHealth Transformer, attributed through :class:`captum_gim.pyhealth.PyHealthAdapter`.

Every patient is synthetic. Each has a list of diagnosis codes and a short lab time
series (noise, with genuine zeros). A patient is positive exactly when their codes
contain ``ALPHA``, or both ``BETA`` and ``GAMMA``; negatives (and some positives) may
carry a lone ``BETA`` or ``GAMMA``. Explained: the positive class of positive patients
of four kinds, as in the embedded default: ``single`` (``ALPHA`` once), ``twice``
(``ALPHA`` twice: redundant), ``conj`` (``BETA`` + ``GAMMA``: each necessary), ``both``
(all three: redundant). The evidence is those codes; lab values are never evidence.

Units are the codes (attributed at their embeddings) and every lab value. Removing a
code replaces its embedding by that of ``<unk>``; removing a lab value sets it to 0.
The trained model is cached like the default one, keyed by its settings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import random
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Dict, List, Tuple

import numpy as np
import torch

from .synthetic import KINDS, training_kinds
from ..types import Example, Task, softmax_score
from ._common import CacheKey, cache_dir, frozen, load_cached, save_cached

__all__ = ["PyHealthSettings", "ehr_samples", "pyhealth_task"]

FILLERS = [f"C{i:02d}" for i in range(40)]
N_LABS = 3


@dataclass(frozen=True)
class PyHealthSettings(CacheKey):
    r"""Everything that determines the trained PyHealth model (the cache key)."""

    n_train: int = 800
    embedding_dim: int = 32
    heads: int = 2
    num_layers: int = 2
    epochs: int = 12
    lr: float = 5e-3
    batch_size: int = 32
    train_seed: int = 0
    version: int = 1


def _patient(rng: random.Random, i: int, kind: str) -> Tuple[Dict[str, Any], List[bool]]:
    k = rng.randint(4, 10)
    codes = rng.sample(FILLERS, k)
    lone = [rng.choice(["BETA", "GAMMA"])] if rng.random() < 0.5 else []
    planted = {
        "negative": ([], lone),
        "single": (["ALPHA"], lone),
        "twice": (["ALPHA", "ALPHA"], lone),
        "conj": (["BETA", "GAMMA"], []),
        "both": (["ALPHA", "BETA", "GAMMA"], []),
    }[kind]
    evidence_codes, other = planted
    evidence = [False] * len(codes)
    for code, is_ev in [(c, True) for c in evidence_codes] + [(c, False) for c in other]:
        pos = rng.randint(0, len(codes))
        codes.insert(pos, code)
        evidence.insert(pos, is_ev)
    steps = rng.randint(2, 5)
    t0 = datetime(2024, 1, 1)
    stamps = [t0 + timedelta(hours=h) for h in range(steps)]
    labs = []
    for _ in range(steps):
        row = [round(rng.gauss(0.0, 1.0), 3) for _ in range(N_LABS)]
        if rng.random() < 0.3:
            row[rng.randrange(N_LABS)] = 0.0
        labs.append(row)
    sample = {
        "patient_id": f"p{i}",
        "visit_id": "v0",
        "codes": codes,
        "labs": (stamps, labs),
        "label": int(kind != "negative"),
    }
    return sample, evidence


def ehr_samples(kinds: List[str], seed: int) -> Tuple[List[Dict[str, Any]], List[List[bool]]]:
    r"""Synthetic patients of the given kinds, and the evidence mask of each one's codes."""
    rng = random.Random(seed)
    out = [_patient(rng, i, k) for i, k in enumerate(kinds)]
    return [s for s, _ in out], [e for _, e in out]


_SCHEMA = ({"codes": "sequence", "labs": "timeseries"}, {"label": "binary"})


def _train_kinds(n: int, seed: int) -> List[str]:
    kinds = training_kinds(n)
    random.Random(seed).shuffle(kinds)
    return kinds


def _code_vocab(dataset: Any) -> Dict[str, int]:
    vocab = getattr(dataset.input_processors["codes"], "code_vocab", None) or {}
    return {str(k): int(v) for k, v in dict(vocab).items()}


@contextlib.contextmanager
def _quiet_pyhealth() -> Any:
    r"""PyHealth's INFO logging (and prints) off for the block, restored after."""
    log = logging.getLogger("pyhealth")
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        log.setLevel(level)


def _train(model: Any, dataset: Any, settings: PyHealthSettings, progress: bool) -> Dict[str, float]:
    from pyhealth.datasets import get_dataloader
    from tqdm.auto import tqdm

    torch.manual_seed(settings.train_seed)
    opt = torch.optim.Adam(model.parameters(), lr=settings.lr)
    start = time.perf_counter()
    model.train()
    loss_value = float("nan")
    bar = tqdm(range(settings.epochs), desc="training the PyHealth model", disable=not progress,
               leave=False)
    for epoch in bar:
        for batch in get_dataloader(dataset, settings.batch_size, shuffle=True,
                                    seed=settings.train_seed + epoch):
            loss = model(**batch)["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss_value = float(loss.item())
    model.eval()
    return {"train_seconds": time.perf_counter() - start, "final_train_loss": loss_value}


def _accuracy(model: Any, dataset: Any) -> float:
    from pyhealth.datasets import get_dataloader

    right = total = 0
    with torch.no_grad():
        for batch in get_dataloader(dataset, 128):
            out = model(**batch)
            pred = (out["y_prob"].reshape(-1) > 0.5).long()
            right += int((pred == out["y_true"].reshape(-1).long()).sum())
            total += pred.numel()
    return right / max(1, total)


def pyhealth_task(
    n_examples: int = 64,
    seed: int = 0,
    device: torch.device = torch.device("cpu"),
    progress: bool = True,
    settings: PyHealthSettings = PyHealthSettings(),
) -> Task:
    r"""The PyHealth target: explain the positive class of synthetic positive patients.

    Args:
        n_examples (int): positive patients to explain (the four kinds in turn).
        seed (int): draws them.
        device (torch.device): where to run.
        progress (bool): progress bar while training.
        settings (PyHealthSettings): the model and its training.
    """
    try:
        from captum_gim.pyhealth import PyHealthAdapter
    except ImportError as e:
        raise ImportError(
            f"--model pyhealth needs PyHealth and captum_gim.pyhealth ({e}). Install the "
            "extra: pip install captum-gim[pyhealth] (Python >= 3.12)."
        ) from e
    from pyhealth.datasets import create_sample_dataset, get_dataloader
    from pyhealth.models import Transformer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # PyHealth logs its processors' vocabularies ("Label label vocab: ..."): not ours to show
        with warnings.catch_warnings(), _quiet_pyhealth():
            warnings.simplefilter("ignore")
            train_samples, _ = ehr_samples(_train_kinds(settings.n_train, settings.train_seed),
                                           settings.train_seed)
            train_ds = create_sample_dataset(train_samples, *_SCHEMA,
                                             dataset_name="captum-gim-synthetic-ehr")
            torch.manual_seed(settings.train_seed)
            model = Transformer(train_ds, embedding_dim=settings.embedding_dim,
                                heads=settings.heads, dropout=0.0, num_layers=settings.num_layers)
            path = cache_dir() / "models" / f"pyhealth-transformer-{settings.key()}.pt"
            vocab = _code_vocab(train_ds)
            info: Dict[str, Any] = {"cache_path": str(path)}
            cached = load_cached(path, model, accept=lambda blob: blob.get("vocab") == vocab)
            loaded = cached is not None
            if loaded:
                info.update(cached)
            else:
                metrics = _train(model, train_ds, settings, progress)
                test_samples, _ = ehr_samples(_train_kinds(1000, settings.train_seed + 7),
                                              settings.train_seed + 10_000)
                test_ds = create_sample_dataset(
                    test_samples, *_SCHEMA, input_processors=train_ds.input_processors,
                    output_processors=train_ds.output_processors)
                metrics["test_accuracy"] = _accuracy(model, test_ds)
                metrics["n_test"] = 1000
                save_cached({"state_dict": model.state_dict(), "metrics": metrics, "vocab": vocab},
                            path)
                info.update(metrics)
            info["from_cache"] = loaded
            model = frozen(model, device)

            kinds = [KINDS[i % len(KINDS)] for i in range(n_examples)]
            eval_samples, evidence = ehr_samples(kinds, int(np.random.SeedSequence([seed, 77]).generate_state(1)[0]))
            eval_ds = create_sample_dataset(
                eval_samples, *_SCHEMA, input_processors=train_ds.input_processors,
                output_processors=train_ds.output_processors)
            adapter = PyHealthAdapter(model).to(device)
            unk = vocab.get("<unk>")
            inv_vocab = {v: k for k, v in vocab.items()}
            examples: List[Example] = []
            probs = []
            for i, batch in enumerate(get_dataloader(eval_ds, 1, shuffle=False)):
                prep = adapter.prepare(batch, baselines={"codes": unk} if unk is not None else None)
                keys = prep.feature_keys
                ci, li = keys.index("codes"), keys.index("labs")
                code_ids = batch["codes"][0] if isinstance(batch["codes"], (tuple, list)) else batch["codes"]
                code_ids = code_ids[0]
                labels = [f"{inv_vocab.get(int(c), str(int(c)))}" for c in code_ids]
                labs = prep.inputs[li][0]
                lab_labels = [f"lab{j}@t{t}={float(labs[t, j]):.2f}"
                              for t in range(labs.shape[0]) for j in range(labs.shape[1])]
                valid = [torch.ones(prep.inputs[k].shape[1:prep.inputs[k].dim() - (1 if k == ci else 0)],
                                    dtype=torch.bool) for k in range(len(keys))]
                ev = [torch.zeros_like(v) for v in valid]
                ev[ci] = torch.tensor(evidence[i], dtype=torch.bool)
                if ev[ci].shape != valid[ci].shape:
                    raise RuntimeError(
                        f"patient {i}: {ev[ci].shape[0]} codes planted but the processor kept "
                        f"{valid[ci].shape[0]}")
                unit_labels = []
                for k in range(len(keys)):
                    unit_labels += labels if k == ci else lab_labels
                probs.append(float(torch.sigmoid(prep.logits.reshape(-1)[0])))
                examples.append(
                    Example(
                        inputs=prep.inputs,
                        baselines=prep.baselines,
                        target=int(prep.target.reshape(-1)[0]),
                        additional_forward_args=prep.additional_forward_args,
                        valid=tuple(valid),
                        evidence=tuple(ev),
                        unit_labels=unit_labels,
                        group=kinds[i],
                        true_label="positive",
                        target_label="positive",
                        text="codes: " + " ".join(labels),
                    )
                )
    finally:
        torch.set_num_threads(threads)
    info.update(
        {
            "settings": dataclasses.asdict(settings),
            "n_parameters": int(sum(p.numel() for p in model.parameters())),
            "examples_mean_p_target": float(np.mean(probs)) if probs else None,
            "examples_accuracy": float(np.mean([p > 0.5 for p in probs])) if probs else None,
            "groups": {k: kinds.count(k) for k in KINDS},
            "baseline": "codes: the <unk> embedding; labs: 0.0" if unk is not None else "zeros",
            "feature_keys": list(adapter.feature_keys),
        }
    )
    return Task(
        name="pyhealth",
        description=(
            f"PyHealth 2.1 Transformer ({settings.num_layers} layers, embedding "
            f"{settings.embedding_dim}, {settings.heads} heads) trained on a synthetic "
            "EHR cohort: a patient is positive iff their codes contain ALPHA, or both BETA and "
            "GAMMA (a lone BETA or GAMMA is a near miss); lab time series are noise. Explained "
            "through captum_gim.pyhealth.PyHealthAdapter: the positive class of positive "
            "patients, kinds single / twice (redundant) / conj / both (redundant)."
        ),
        model=adapter,
        forward_func=adapter.forward,
        reduce_dims=tuple(1 if k in adapter.token_keys else 0 for k in adapter.feature_keys),
        examples=examples,
        score_fn=softmax_score,
        score_name="p(positive)",
        unit_name="code or lab value",
        ground_truth="the planted codes (ALPHA; BETA and GAMMA together); lab values never",
        info=info,
    )
