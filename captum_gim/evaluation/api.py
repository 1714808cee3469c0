r"""The comparison from Python, on your own model: :func:`compare`."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .compare import run_comparison
from .methods import CompareSettings
from .report import Report
from .types import Example, Task, output_score, softmax_score

__all__ = ["compare", "as_example"]

ExampleLike = Union[Example, Mapping[str, Any]]


def _tuple(x: Any) -> Optional[Tuple[Any, ...]]:
    if x is None:
        return None
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def as_example(ex: ExampleLike) -> Example:
    r"""An :class:`~captum_gim.evaluation.types.Example` from an Example or a dict with
    ``inputs`` (a tensor or tuple of tensors, batch size 1), and optionally ``target``,
    ``baselines`` (default: zeros, as in Captum), ``evidence`` (the ground-truth mask: one
    bool per unit), ``valid``, ``additional_forward_args`` and display fields."""
    if isinstance(ex, Example):
        return ex
    d = dict(ex)
    inputs = _tuple(d.pop("inputs"))
    if inputs is None or not all(isinstance(x, Tensor) for x in inputs):
        raise ValueError("each example needs 'inputs': a tensor or a tuple of tensors")
    for x in inputs:
        if x.shape[:1] != (1,):
            raise ValueError(f"inputs must have batch size 1, got shape {tuple(x.shape)}")
    baselines = _tuple(d.pop("baselines", None))
    if baselines is None:
        baselines = tuple(torch.zeros_like(x) for x in inputs)
    baselines = tuple(b.expand_as(x) if isinstance(b, Tensor) else torch.full_like(x, float(b))
                      for b, x in zip(baselines, inputs))
    evidence = _tuple(d.pop("evidence", d.pop("mask", None)))
    evidence = None if evidence is None else tuple(torch.as_tensor(e).bool() for e in evidence)
    valid = _tuple(d.pop("valid", None))
    valid = None if valid is None else tuple(torch.as_tensor(v).bool() for v in valid)
    return Example(inputs=inputs, baselines=baselines, evidence=evidence, valid=valid,
                   additional_forward_args=_tuple(d.pop("additional_forward_args", None)), **d)


def compare(
    forward_func_or_model: Union[nn.Module, Callable[..., Tensor]],
    examples: Sequence[ExampleLike],
    *,
    model: Optional[nn.Module] = None,
    reduce_dims: Union[int, Sequence[int]] = 0,
    score: str = "probability",
    methods: Optional[Sequence[str]] = None,
    steps: Sequence[int] = (4, 8, 16, 50),
    samples: Sequence[int] = (5, 10, 20),
    sweep: bool = True,
    n_steps: int = 50,
    temperature: float = 2.0,
    seed: int = 0,
    n_bootstrap: int = 1000,
    infidelity_samples: int = 10,
    gradshap_samples: int = 10,
    measure_memory: bool = False,
    progress: bool = False,
    name: str = "model",
    description: str = "a model given to captum_gim.compare",
    unit_name: str = "feature",
    **settings: Any,
) -> Report:
    r"""Compare GIM with Integrated Gradients and Captum's gradient methods on your model.

    The same methods and metrics as ``captum-gim compare``: GIM, each GIM rule alone,
    Integrated Gradients and IG-GIM (at ``n_steps`` and, with ``sweep``, at every count of
    ``steps`` plus 1 and 2), Saliency, InputXGradient, GradientShap and NoiseTunnel(GIM)
    (at ``samples``), a random floor; comprehensiveness and sufficiency (ERASER AOPC),
    deletion AUC, ground-truth AUROC and top-1 hits where examples carry ``evidence``,
    Captum's infidelity, time, passes, the cost-quality frontier.

    Args:
        forward_func_or_model (nn.Module or callable): ``f(*inputs, *additional_forward_args)``.
        examples (sequence): :class:`~captum_gim.evaluation.types.Example` objects or dicts
            (see :func:`as_example`): ``inputs`` with batch size 1, ``target``,
            ``baselines`` (default zeros), ``evidence`` (optional ground-truth mask, one
            bool per unit).
        model (nn.Module, optional): the module whose backward GIM modifies (default:
            ``forward_func_or_model`` when it is a module).
        reduce_dims (int or sequence of int): per input, how many trailing dimensions are
            summed into one unit (1 for token embeddings ``(1, seq, dim)``; 0: every
            element is a unit).
        score (str): what removal metrics measure: ``probability`` (softmax of the
            target; sigmoid for one logit) or ``output`` (the raw output).
        methods (sequence of str, optional): a subset of the method keys (``gim``, ``ig``,
            ``ig@8``...).
        steps, samples, sweep, n_steps, temperature, seed: see
            :class:`~captum_gim.evaluation.methods.CompareSettings`.
        n_bootstrap, infidelity_samples, gradshap_samples, measure_memory, progress: the same.
        name, description, unit_name: for the report.
        \*\*settings: further :class:`~captum_gim.evaluation.methods.CompareSettings` fields.

    Returns:
        Report: ``.table()``, ``.to_json()``, ``.to_dataframe()``, ``.save(directory)``;
        ``.methods``, ``.sweep``, ``.frontier``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import captum_gim
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> net = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 2)).eval()
        >>> xs = [{"inputs": torch.randn(1, 6), "target": 1} for _ in range(8)]
        >>> report = captum_gim.compare(net, xs, methods=["gim", "ig", "ixg"],
        ...                             sweep=False, n_bootstrap=50)
        >>> [m.key for m in report.methods]
        ['gim', 'ig', 'ixg']
        >>> print(report.table().splitlines()[0].split()[:2])
        ['Method', 'Baseline']
    """
    module = model if model is not None else forward_func_or_model
    if not isinstance(module, nn.Module):
        raise TypeError("pass model=: the nn.Module whose backward GIM modifies "
                        "(forward_func_or_model is not a module)")
    exs = [as_example(e) for e in examples]
    if not exs:
        raise ValueError("compare needs at least one example")
    n_inputs = len(exs[0].inputs)
    dims = tuple(reduce_dims) if isinstance(reduce_dims, (tuple, list)) else (int(reduce_dims),) * n_inputs
    if score not in ("probability", "output"):
        raise ValueError(f"score must be 'probability' or 'output', got {score!r}")
    has_gt = any(e.evidence is not None for e in exs)
    task = Task(
        name=name, description=description, model=module, forward_func=forward_func_or_model,
        reduce_dims=dims, examples=exs,
        score_fn=softmax_score if score == "probability" else output_score,
        score_name="p(target)" if score == "probability" else "output[target]", unit_name=unit_name,
        ground_truth="the examples' evidence masks" if has_gt else None,
        baseline_name="the examples' baselines",
    )
    cfg = CompareSettings(
        n_steps=n_steps, seed=seed, temperature=temperature,
        methods=list(methods) if methods else None, sweep=sweep, steps=tuple(steps),
        samples=tuple(samples), n_bootstrap=n_bootstrap, infidelity_samples=infidelity_samples,
        gradshap_samples=gradshap_samples, measure_memory=measure_memory, progress=progress,
        **settings)
    return run_comparison(task, cfg)
