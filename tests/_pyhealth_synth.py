"""Synthetic PyHealth cohorts and tiny trained models for the ``test_pyhealth*`` tests.

Only imported by test modules that already called ``pytest.importorskip("pyhealth")``.
Every patient is synthetic; nothing is downloaded. The module-scoped fixtures at the end
(``single_thread``, ``ehr``, ``ehr_flat``, ``sn``) are shared by importing them.

The label is decided by one planted code: a patient is positive exactly when ``PLANT``
is among their codes. Lab values are noise (with genuine zeros in them) so that the
continuous path is exercised without carrying the signal.
"""

from __future__ import annotations

import contextlib
import random
from datetime import datetime, timedelta
from typing import Any, Dict, Iterator, List, Tuple

import pytest
import torch

from pyhealth.datasets import create_sample_dataset, get_dataloader

PLANT = "PLANT"
CODES = [f"C{i:02d}" for i in range(40)]
N_LABS = 3


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """One intra-op thread: the models are tiny, and two threads competing with other
    processes mostly spin-wait (the tutorial's training loop on a loaded 2-core machine:
    1.7 s on one thread, 14 s on two)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _labs(rng: random.Random, steps: int) -> List[List[float]]:
    rows = []
    for _ in range(steps):
        row = [round(rng.gauss(0.0, 1.0), 3) for _ in range(N_LABS)]
        if rng.random() < 0.3:  # genuine zeros: a lab that reads exactly 0.0
            row[rng.randrange(N_LABS)] = 0.0
        rows.append(row)
    return rows


def _planted_codes(rng: random.Random, i: int, max_codes: int) -> Tuple[List[str], int]:
    """3 to ``max_codes`` distinct codes; every other patient (even ``i``) is positive and
    has one of them replaced by ``PLANT``."""
    k = rng.randint(3, max_codes)
    codes = rng.sample(CODES, k)
    y = int(i % 2 == 0)
    if y:
        codes[rng.randrange(k)] = PLANT
    return codes, y


def ehr_samples(n: int = 240, seed: int = 0, labs: str = "timeseries") -> List[Dict[str, Any]]:
    """Samples for ``{"codes": "sequence", "labs": labs}`` models.

    ``labs="timeseries"``: ``[time, 3]`` per patient (Transformer); ``labs="tensor"``: one
    row of 3 values (MLP, whose own forward cannot take 3-D continuous values)."""
    rng = random.Random(seed)
    t0 = datetime(2024, 1, 1)
    samples = []
    for i in range(n):
        codes, y = _planted_codes(rng, i, max_codes=10)
        steps = rng.randint(2, 6)
        stamps = [t0 + timedelta(hours=h) for h in range(steps)]
        samples.append(
            {
                "patient_id": f"p{i}",
                "visit_id": "v0",
                "codes": codes,
                "labs": (stamps, _labs(rng, steps)) if labs == "timeseries" else _labs(rng, 1)[0],
                "label": y,
            }
        )
    return samples


def stagenet_samples(n: int = 160, seed: int = 1) -> List[Dict[str, Any]]:
    """Samples for ``{"codes": "stagenet", "labs": "stagenet_tensor"}`` (StageNet models)."""
    rng = random.Random(seed)
    samples = []
    for i in range(n):
        codes, y = _planted_codes(rng, i, max_codes=8)
        k = len(codes)
        times = [0.0] + [round(rng.uniform(0.5, 3.0), 2) for _ in range(k - 1)]
        steps = rng.randint(2, 5)
        lab_times = [0.0] + [1.0] * (steps - 1)
        samples.append(
            {
                "patient_id": f"p{i}",
                "visit_id": "v0",
                "codes": (times, codes),
                "labs": (lab_times, _labs(rng, steps)),
                "label": y,
            }
        )
    return samples


def ehr_dataset(n: int = 240, seed: int = 0, label: str = "binary", labs: str = "timeseries"):
    samples = ehr_samples(n, seed, labs)
    if label == "multiclass":
        for s in samples:
            s["label"] = (2 if PLANT in s["codes"] else 0) if len(s["codes"]) % 2 else 1
    return create_sample_dataset(
        samples,
        {"codes": "sequence", "labs": labs},
        {"label": label},
        dataset_name=f"synthetic-ehr-{label}-{labs}",
    )


def stagenet_dataset(n: int = 160, seed: int = 1):
    return create_sample_dataset(
        stagenet_samples(n, seed),
        {"codes": "stagenet", "labs": "stagenet_tensor"},
        {"label": "binary"},
        dataset_name="synthetic-stagenet",
    )


def train(model: torch.nn.Module, dataset, epochs: int, lr: float = 1e-2, seed: int = 0) -> torch.nn.Module:
    """A few epochs of Adam; returns the model in eval mode."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    with one_thread():
        for epoch in range(epochs):
            for batch in get_dataloader(dataset, 32, shuffle=True, seed=seed + epoch):
                loss = model(**batch)["loss"]
                opt.zero_grad()
                loss.backward()
                opt.step()
    opt.zero_grad(set_to_none=True)
    return model.eval()


def first_batch(dataset, batch_size: int = 12) -> Dict[str, Any]:
    return next(iter(get_dataloader(dataset, batch_size, shuffle=False)))


def accuracy(model, dataset) -> float:
    right = total = 0
    with torch.no_grad():
        for batch in get_dataloader(dataset, 64):
            out = model(**batch)
            pred = (out["y_prob"] > 0.5).float() if out["y_prob"].shape[-1] == 1 else out["y_prob"].argmax(-1, keepdim=True).float()
            right += int((pred == out["y_true"].float().reshape(pred.shape)).sum())
            total += pred.shape[0]
    return right / max(total, 1)


# --- attributions computed by hand, independently of captum_gim ------------------------


def samples_by_id(samples: List[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    return {s["patient_id"]: s for s in samples}


def true_lengths(batch: Dict[str, Any], by_id: Dict[str, Dict[str, Any]], key: str) -> torch.Tensor:
    """The real (unpadded) length of each patient's ``key`` sequence, from the samples."""
    out = []
    for pid in batch["patient_id"]:
        v = by_id[pid][key]
        out.append(len(v[1]) if isinstance(v, tuple) else len(v))
    return torch.tensor(out)


def length_mask(lengths: torch.Tensor, size: int) -> torch.Tensor:
    return torch.arange(size).unsqueeze(0) < lengths.unsqueeze(1)


def by_hand_grad_x_input(
    model: torch.nn.Module,
    batch: Dict[str, Any],
    by_id: Dict[str, Dict[str, Any]],
    target: int = 0,
) -> Dict[str, torch.Tensor]:
    """Gradient x input at the embeddings, from ``get_embedding_model`` and
    ``forward_from_embedding`` only, with masks built from the true sequence lengths.

    Works for the two synthetic cohorts (``codes`` + ``labs``; StageNet's ``(time, value)``
    tuples or plain tensors). Zero baselines: the attribution of a code is
    ``sum_e grad_e * emb_e``, of a lab value ``grad * value``.
    """
    stagenet = isinstance(batch["codes"], tuple)
    ids = batch["codes"][1] if stagenet else batch["codes"]
    labs = batch["labs"][1] if stagenet else batch["labs"]
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    emb_model = model.get_embedding_model()
    with torch.no_grad():
        e = emb_model({"codes": ids})["codes"]
    e = e.detach().clone().requires_grad_(True)
    x = labs.detach().to(dtype).clone().requires_grad_(True)
    el = emb_model({"labs": x})["labs"]
    mc = length_mask(true_lengths(batch, by_id, "codes"), ids.shape[1])
    if labs.dim() >= 3:
        ml = length_mask(true_lengths(batch, by_id, "labs"), labs.shape[1])
    else:  # one row of values: nothing to pad
        ml = torch.ones(labs.shape[0], 1, dtype=torch.bool)
    if stagenet:
        kw = {"codes": (batch["codes"][0], e, mc), "labs": (batch["labs"][0], el, ml)}
    else:
        kw = {"codes": (e, mc), "labs": (el, ml)}
    logits = model.forward_from_embedding(**kw)["logit"]
    g_e, g_x = torch.autograd.grad(logits[:, target].sum(), (e, x))
    return {"codes": (g_e * e).sum(-1).detach(), "labs": (g_x * x).detach()}


# --- module-scoped fixtures, shared by ``from _pyhealth_synth import ...`` -----------------


@pytest.fixture(scope="module", autouse=True)
def single_thread() -> Iterator[None]:
    with one_thread():
        yield


@pytest.fixture(scope="module")
def ehr():
    """The timeseries cohort (Transformer): ``(dataset, samples by patient id)``."""
    return ehr_dataset(), samples_by_id(ehr_samples())


@pytest.fixture(scope="module")
def ehr_flat():
    """One row of labs per patient (MLP): ``(dataset, samples by patient id)``."""
    return ehr_dataset(labs="tensor"), samples_by_id(ehr_samples(labs="tensor"))


@pytest.fixture(scope="module")
def sn():
    """The StageNet cohort: ``(dataset, samples by patient id)``."""
    return stagenet_dataset(), samples_by_id(stagenet_samples())
