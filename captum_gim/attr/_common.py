r"""Helpers shared by the attribution classes: model resolution and input checks."""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence, Tuple

from torch import Tensor, nn

from captum._utils.typing import TargetType

from ..config import GIMConfig
from ..registry import RuleRegistry
from ..scope import gim_backward

__all__ = [
    "GIMSettings",
    "resolve_model",
    "check_float_inputs",
    "checked_forward",
    "validate_target",
]


class GIMSettings:
    r"""What :class:`GIMAttribution` and :class:`LayerGIM` share: the model whose backward
    pass is modified, the GIM settings, and the scope they run in."""

    def _init_gim(
        self,
        forward_func: Callable[..., Any],
        model: Optional[nn.Module],
        temperature: float,
        freeze_norms: bool,
        divide_grads: bool,
        keep_norm_mean: bool,
        strict: bool,
        registry: Optional[RuleRegistry],
    ) -> None:
        # validate now rather than at the first attribute() call
        GIMConfig(temperature, freeze_norms, divide_grads, keep_norm_mean)
        self.model: nn.Module = resolve_model(forward_func, model)
        self.temperature = temperature
        self.freeze_norms = freeze_norms
        self.divide_grads = divide_grads
        self.keep_norm_mean = keep_norm_mean
        self.strict = strict
        self.registry = registry
        #: the :class:`~captum_gim.GIMReport` of the last ``attribute`` call
        self.last_report: Any = None

    def scope(self) -> Any:
        r"""The :func:`~captum_gim.gim_backward` scope this attribution runs in."""
        return gim_backward(
            self.model,
            temperature=self.temperature,
            freeze_norms=self.freeze_norms,
            divide_grads=self.divide_grads,
            keep_norm_mean=self.keep_norm_mean,
            strict=self.strict,
            registry=self.registry,
        )


def resolve_model(forward_func: Callable[..., Any], model: Optional[nn.Module]) -> nn.Module:
    r"""The module whose backward pass GIM modifies.

    ``model`` if given; else ``forward_func`` if it is an ``nn.Module``; else the module a
    bound method belongs to (``model.forward``, ``model.predict``); else a clear error.
    """
    if model is not None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model= must be a torch.nn.Module, got {type(model).__name__}")
        return model
    if isinstance(forward_func, nn.Module):
        return forward_func
    owner = getattr(forward_func, "__self__", None)
    if isinstance(owner, nn.Module):
        return owner
    if isinstance(forward_func, functools.partial):
        return resolve_model(forward_func.func, None)
    raise TypeError(
        "GIM needs to know which torch.nn.Module's backward pass to modify, and "
        f"{getattr(forward_func, '__name__', type(forward_func).__name__)!r} is neither a "
        "module nor a method of one. Pass it explicitly: GIMAttribution(forward_func, "
        "model=my_model)."
    )


def check_float_inputs(inputs: Tuple[Tensor, ...], method: str) -> None:
    for i, x in enumerate(inputs):
        if not isinstance(x, Tensor):
            raise TypeError(f"{method}: input {i} is a {type(x).__name__}, expected a Tensor")
        if not x.is_floating_point():
            raise TypeError(
                f"{method}: input {i} has dtype {x.dtype}; gradients need floating-point "
                "inputs. For token ids, attribute at the embedding layer with "
                "captum_gim.LayerGIM(model, model.get_input_embeddings()) (or any "
                "nn.Embedding), or pass the embeddings themselves as inputs."
            )


def _check_index(idx: Any, shape: Sequence[int], where: str, negative_ok: bool) -> None:
    """``idx`` (an int or a tuple of ints/slices) must select inside ``shape``.

    Captum indexes ints and tuples with Python indexing (negative indices allowed) and
    lists / tensors of ints with ``gather`` (they are not)."""
    idx_t = idx if isinstance(idx, tuple) else (idx,)
    if len(idx_t) > len(shape):
        raise ValueError(
            f"target {where}{idx!r} has {len(idx_t)} indices but the output has only "
            f"{len(shape)} dimension(s) per example (shape {tuple(shape)})"
        )
    for j, (i, n) in enumerate(zip(idx_t, shape)):
        if isinstance(i, slice):
            continue
        if isinstance(i, Tensor):
            i = int(i.item())
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"target {where}{idx!r}: index {i!r} is not an integer")
        low = -n if negative_ok else 0
        if not low <= i < n:
            raise ValueError(
                f"target {where}{idx!r} is out of range for a model output of shape "
                f"(batch, {', '.join(map(str, shape))}): index {j} must be in [{low}, {n}). "
                "Pass a class index that exists in the output."
            )


def validate_target(output: Tensor, target: TargetType) -> None:
    r"""Raise a clear error if ``target`` cannot select from ``output``, before Captum does."""
    if target is None:
        if output.dim() > 1 and output[0].numel() != 1:
            raise ValueError(
                f"the model returns {output[0].numel()} values per example (output shape "
                f"{tuple(output.shape)}), so a target is needed: pass target=<class index> "
                "(or a tuple / list / tensor of them, as in Captum)."
            )
        return
    if output.dim() < 2:
        raise ValueError(
            f"target={target!r} was given but the model returns one value per example "
            f"(output shape {tuple(output.shape)}); pass target=None."
        )
    per_example = tuple(output.shape[1:])
    batch = output.shape[0]
    if isinstance(target, (int, tuple)) and not isinstance(target, bool):
        _check_index(target, per_example, "", negative_ok=True)
    elif isinstance(target, Tensor):
        if target.numel() == 1:
            _check_index(int(target.item()), per_example, "", negative_ok=True)
        else:
            if target.dim() != 1 or target.shape[0] != batch:
                raise ValueError(
                    f"a target tensor must hold one index or one per example ({batch}), "
                    f"got shape {tuple(target.shape)}"
                )
            for k, t in enumerate(target.tolist()):
                _check_index(int(t), per_example, f"[{k}] = ", negative_ok=False)
    elif isinstance(target, list):
        if len(target) != batch:
            raise ValueError(
                f"a target list must have one entry per example: got {len(target)} for a "
                f"batch of {batch}"
            )
        for k, t in enumerate(target):
            _check_index(t, per_example, f"[{k}] = ", negative_ok=isinstance(t, tuple))
    else:
        raise TypeError(
            f"target must be None, an int, a tuple, a tensor or a list, got {type(target).__name__}"
        )


def checked_forward(forward_func: Callable[..., Any], target: TargetType) -> Callable[..., Any]:
    r"""``forward_func`` that validates ``target`` against its output shape."""

    def forward(*args: Any, **kwargs: Any) -> Any:
        out = forward_func(*args, **kwargs)
        if isinstance(out, Tensor):
            validate_target(out if out.dim() > 0 else out.reshape(1), target)
        return out

    return forward
