r"""Hugging Face norms (``LlamaRMSNorm``, ``GemmaRMSNorm``, ``T5LayerNorm``...): the module's
own forward runs under a :class:`~torch.overrides.TorchFunctionMode` that makes ``1/rms``
(or the standard deviation) a constant of the backward pass; forward values do not change."""

from __future__ import annotations

import warnings
from typing import Any, Dict, Sequence, Set

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..._patching import Handle, replace_forward
from ...config import GIMConfig
from ...ops import frozen_layer_norm, frozen_rms_norm

__all__ = ["install_norm"]


_INV_STD_FUNCS = {torch.rsqrt, Tensor.rsqrt, torch.sqrt, Tensor.sqrt, torch.std, Tensor.std}
_POW_FUNCS = {torch.pow, Tensor.pow, Tensor.__pow__}
_MEAN_FUNCS = {torch.mean, Tensor.mean}


def _arg(args: Sequence[Any], kwargs: Dict[str, Any], i: int, name: str, default: Any = None) -> Any:
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


class _FreezeNormMode(TorchFunctionMode):
    r"""Active only inside one norm module's forward: its inverse std / rms is detached.

    A mode is popped while its own handler runs, so only the norm's leaf ops are seen.
    """

    def __init__(self, keep_mean: bool) -> None:
        super().__init__()
        self.keep_mean = keep_mean
        self.frozen = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if func in _INV_STD_FUNCS:
            self.frozen += 1
            return func(*args, **kwargs).detach()
        if func in _POW_FUNCS:
            exponent = _arg(args, kwargs, 1, "exponent")
            if isinstance(exponent, (int, float)) and abs(abs(float(exponent)) - 0.5) < 1e-12:
                self.frozen += 1
                return func(*args, **kwargs).detach()
        if func is F.rms_norm:
            self.frozen += 1
            return frozen_rms_norm(
                _arg(args, kwargs, 0, "input"),
                _arg(args, kwargs, 1, "normalized_shape"),
                _arg(args, kwargs, 2, "weight"),
                _arg(args, kwargs, 3, "eps"),
            )
        if func is F.layer_norm:
            self.frozen += 1
            return frozen_layer_norm(
                _arg(args, kwargs, 0, "input"),
                _arg(args, kwargs, 1, "normalized_shape"),
                _arg(args, kwargs, 2, "weight"),
                _arg(args, kwargs, 3, "bias"),
                _arg(args, kwargs, 4, "eps", 1e-5),
                keep_mean=self.keep_mean,
            )
        if not self.keep_mean and func in _MEAN_FUNCS:
            return func(*args, **kwargs).detach()
        return func(*args, **kwargs)


_warned_norms: Set[type] = set()


def install_norm(module: nn.Module, config: GIMConfig) -> Handle:
    r"""Run ``module``'s own forward with its inverse std / rms frozen (for ``config``)."""
    original = module.forward
    keep_mean = config.keep_norm_mean

    def forward(*args: Any, **kwargs: Any) -> Any:
        mode = _FreezeNormMode(keep_mean)
        with mode:
            out = original(*args, **kwargs)
        if mode.frozen == 0 and type(module) not in _warned_norms:
            _warned_norms.add(type(module))
            warnings.warn(
                f"captum_gim: {type(module).__name__} computed no rsqrt / sqrt / std / "
                "rms_norm / layer_norm that GIM could freeze, so it keeps its plain gradient. "
                "Register a rule for it (captum_gim.register_rule).",
                UserWarning,
                stacklevel=2,
            )
        return out

    return replace_forward(module, forward)
