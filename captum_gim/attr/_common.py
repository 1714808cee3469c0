r"""Helpers shared by the attribution classes: settings, model resolution, input checks.

Every check here runs before a GIM scope is entered (or, for what can only be known from
the model's output, as soon as the forward pass returns, before any gradient is taken), so
a bad call fails with a message that names the problem instead of an ``IndexError`` or
``AttributeError`` from inside Captum, and leaves the model exactly as it was.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Mapping
from typing import Any, Callable, ContextManager, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from captum._utils.typing import TargetType

from ..config import GIMConfig
from ..registry import RuleRegistry
from ..scope import GIMReport, gim_backward

__all__ = [
    "GIMSettings",
    "make_config",
    "open_scope",
    "resolve_model",
    "check_batch",
    "check_float_inputs",
    "check_target_form",
    "check_output",
    "checked_forward",
    "validate_target",
]

#: Whether this ``gim_backward`` takes the settings as one ``config=`` object (read once
#: at import); otherwise they are passed as its keywords, named by ``GIMConfig``'s fields.
_SCOPE_TAKES_CONFIG = "config" in inspect.signature(gim_backward).parameters


def make_config(config: Optional[GIMConfig] = None, **settings: Any) -> GIMConfig:
    r"""The one :class:`~captum_gim.GIMConfig` of an entry point.

    Args:
        config (GIMConfig, optional): settings built by the caller; then every keyword in
            ``settings`` must be left at its default.
        **settings: ``GIMConfig``'s fields (``temperature``, ``freeze_norms``,
            ``divide_grads``, ``keep_norm_mean``) as the entry point received them.

    Returns:
        GIMConfig: ``config``, or one built (and validated) from ``settings``.

    Examples::

        >>> make_config(temperature=3.0).temperature
        3.0
    """
    if config is None:
        return GIMConfig(**settings)
    if not isinstance(config, GIMConfig):
        raise TypeError(f"config= must be a captum_gim.GIMConfig, got {type(config).__name__}")
    defaults = GIMConfig()
    changed = sorted(k for k, v in settings.items() if v != getattr(defaults, k))
    if changed:
        raise ValueError(
            f"pass the settings either as config= or as keywords, not both: got config= and "
            f"{', '.join(changed)}=. Use dataclasses.replace(config, {changed[0]}=...) to "
            "change one field of a config."
        )
    return config


def open_scope(
    model: nn.Module, config: GIMConfig, strict: bool, registry: Optional[RuleRegistry]
) -> ContextManager[GIMReport]:
    r"""``gim_backward`` for ``model`` with ``config`` (passed as one object where the
    installed ``gim_backward`` takes it, else field by field)."""
    if _SCOPE_TAKES_CONFIG:
        return gim_backward(model, config=config, strict=strict, registry=registry)  # type: ignore[call-arg]
    return gim_backward(model, strict=strict, registry=registry, **dataclasses.asdict(config))


class GIMSettings:
    r"""What :class:`GIMAttribution` and :class:`LayerGIM` share: the model whose backward
    pass is modified, one :class:`~captum_gim.GIMConfig`, and the scope they run in.

    ``temperature``, ``freeze_norms``, ``divide_grads`` and ``keep_norm_mean`` read (and,
    when set, replace) ``config``; the config is built once, in the constructor.
    """

    config: GIMConfig

    def _init_gim(
        self,
        forward_func: Callable[..., Any],
        model: Optional[nn.Module],
        config: GIMConfig,
        strict: bool,
        registry: Optional[RuleRegistry],
    ) -> None:
        if not isinstance(config, GIMConfig):
            raise TypeError(f"config must be a GIMConfig, got {type(config).__name__}")
        self.model: nn.Module = resolve_model(forward_func, model)
        self.config = config
        self.strict = strict
        self.registry = registry
        #: the :class:`~captum_gim.GIMReport` of the last ``attribute`` call
        self.last_report: Any = None

    def _replace(self, **change: Any) -> None:
        self.config = dataclasses.replace(self.config, **change)

    @property
    def temperature(self) -> float:
        """``config.temperature``: the TSG temperature."""
        return self.config.temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        self._replace(temperature=value)

    @property
    def freeze_norms(self) -> bool:
        """``config.freeze_norms``."""
        return self.config.freeze_norms

    @freeze_norms.setter
    def freeze_norms(self, value: bool) -> None:
        self._replace(freeze_norms=value)

    @property
    def divide_grads(self) -> bool:
        """``config.divide_grads``."""
        return self.config.divide_grads

    @divide_grads.setter
    def divide_grads(self, value: bool) -> None:
        self._replace(divide_grads=value)

    @property
    def keep_norm_mean(self) -> bool:
        """``config.keep_norm_mean``."""
        return self.config.keep_norm_mean

    @keep_norm_mean.setter
    def keep_norm_mean(self, value: bool) -> None:
        self._replace(keep_norm_mean=value)

    def scope(self) -> ContextManager[GIMReport]:
        r"""The :func:`~captum_gim.gim_backward` scope this attribution runs in."""
        return open_scope(self.model, self.config, self.strict, self.registry)


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


def check_batch(inputs: Tuple[Any, ...], method: str) -> int:
    r"""Every input is a tensor with a batch dimension holding at least one example.

    Returns:
        int: the batch size (of the first input).
    """
    if not inputs:
        raise ValueError(f"{method}.attribute got no inputs: pass a tensor (batch first)")
    for i, x in enumerate(inputs):
        if not isinstance(x, Tensor):
            raise TypeError(f"{method}: input {i} is a {type(x).__name__}, expected a Tensor")
        if x.dim() == 0:
            raise ValueError(
                f"{method}: input {i} is a 0-dimensional tensor; dimension 0 of every input "
                "is the batch, so give it one: x.unsqueeze(0) for a single example"
            )
        if x.shape[0] == 0:
            raise ValueError(
                f"{method}: the batch is empty (input {i} has shape {tuple(x.shape)}); "
                "pass at least one example"
            )
    return int(inputs[0].shape[0])


def check_float_inputs(inputs: Tuple[Tensor, ...], method: str) -> None:
    check_batch(inputs, method)
    for i, x in enumerate(inputs):
        if not x.is_floating_point():
            raise TypeError(
                f"{method}: input {i} has dtype {x.dtype}; gradients need floating-point "
                "inputs. For token ids, attribute at the embedding layer with "
                "captum_gim.LayerGIM(model, model.get_input_embeddings()) (or any "
                "nn.Embedding), or pass the embeddings themselves as inputs."
            )



def _is_integer_index(i: Any) -> bool:
    if isinstance(i, Tensor):
        return i.numel() == 1 and not (
            i.is_floating_point() or i.is_complex() or i.dtype == torch.bool
        )
    return isinstance(i, int) and not isinstance(i, bool)


def _bad_index(target: Any, i: Any, where: str) -> TypeError:
    what = f"dtype {i.dtype}" if isinstance(i, Tensor) else type(i).__name__
    return TypeError(
        f"target {where}{target!r}: {i!r} ({what}) is not an integer index. Targets select "
        "outputs by position: pass ints (int(t)), an integer tensor (t.long()), or tuples of "
        "ints for outputs with more than two dimensions."
    )


def check_target_form(target: TargetType, batch: int) -> None:
    r"""Raise a clear error for a ``target`` Captum cannot use, before anything runs.

    Accepted, as in Captum: None; an int; a tuple of ints (and slices); an integer tensor
    holding one index or one per example; a list of ints or of tuples, one per example.
    """
    if target is None:
        return
    if isinstance(target, Tensor):
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise TypeError(
                f"target is a tensor of dtype {target.dtype}; targets are output indices, so "
                f"they must be integers: pass target.long() (values {target.flatten()[:4].tolist()}"
                f"{'...' if target.numel() > 4 else ''})"
            )
        if target.numel() == 0:
            raise ValueError("target is an empty tensor: give one index, or one per example")
        if target.numel() > 1 and (target.dim() != 1 or target.shape[0] != batch):
            raise ValueError(
                f"a target tensor must hold one index or one per example ({batch}), got "
                f"shape {tuple(target.shape)}"
            )
        return
    if isinstance(target, list):
        if any(isinstance(t, Tensor) for t in target):
            raise TypeError(
                "target is a list of tensors; Captum takes one integer tensor (or a list of "
                "ints): pass torch.stack(target) (0-d tensors) or torch.cat(target) "
                "(1-element tensors), or [int(t) for t in target]"
            )
        if len(target) != batch:
            raise ValueError(
                f"a target list must have one entry per example: got {len(target)} for a "
                f"batch of {batch}"
            )
        kinds = {tuple if isinstance(t, tuple) else type(t) for t in target}
        for k, t in enumerate(target):
            items = t if isinstance(t, tuple) else (t,)
            for i in items:
                if not (isinstance(i, slice) or _is_integer_index(i)):
                    raise _bad_index(t, i, f"[{k}] = ")
        if len(kinds) > 1:
            raise TypeError(
                "a target list must hold only ints or only tuples (Captum decides by its "
                f"first element), got {sorted(k.__name__ for k in kinds)}"
            )
        return
    if isinstance(target, tuple):
        for i in target:
            if not (isinstance(i, slice) or _is_integer_index(i)):
                raise _bad_index(target, i, "")
        return
    if not _is_integer_index(target):
        if isinstance(target, (bool, float)):
            raise _bad_index(target, target, "")
        raise TypeError(
            "target must be None, an int, a tuple, an integer tensor or a list, got "
            f"{type(target).__name__}"
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
    check_target_form(target, output.shape[0])
    per_example = tuple(output.shape[1:])
    if isinstance(target, (int, tuple)):
        _check_index(target, per_example, "", negative_ok=True)
    elif isinstance(target, Tensor):
        if target.numel() == 1:
            _check_index(int(target.item()), per_example, "", negative_ok=True)
        else:
            for k, t in enumerate(target.tolist()):
                _check_index(int(t), per_example, f"[{k}] = ", negative_ok=False)
    elif isinstance(target, list):
        for k, t in enumerate(target):
            _check_index(t, per_example, f"[{k}] = ", negative_ok=isinstance(t, tuple))


def _short(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"Tensor{tuple(value.shape)}"
    return type(value).__name__


def _pick(out: Any) -> Optional[str]:
    """The expression that takes the output tensor from ``out`` (``.logits``, ``[0]``)."""
    if isinstance(out, Mapping):
        keys = [k for k, v in out.items() if isinstance(v, Tensor)]
        if not keys:
            return None
        key = "logits" if "logits" in keys else keys[0]
        if type(out) is not dict and isinstance(key, str) and key.isidentifier():
            return f".{key}"  # a ModelOutput (or any mapping with attribute access)
        return f"[{key!r}]"
    if isinstance(out, (tuple, list)):
        for i, v in enumerate(out):
            if isinstance(v, Tensor):
                return f"[{i}]"
    return None


def check_output(out: Any, method: str, layer_arg: str = "") -> Tensor:
    r"""``out`` if it is a tensor; else a ``TypeError`` saying what came back and showing
    the one-line wrapper that makes ``forward_func`` return the tensor to attribute."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, Mapping):
        items = list(out.items())
        shown = ", ".join(f"{k!r}: {_short(v)}" for k, v in items[:6])
        desc = f"a {type(out).__name__} {{{shown}{', ...' if len(items) > 6 else ''}}}"
    elif isinstance(out, (tuple, list)):
        shown = ", ".join(_short(v) for v in out[:6])
        desc = f"a {type(out).__name__} of {len(out)} ({shown}{', ...' if len(out) > 6 else ''})"
    else:
        desc = f"a {type(out).__name__}"
    pick = _pick(out)
    fix = (
        f"Wrap the model so that it returns that tensor, e.g. {method}(lambda *a: "
        f"model(*a){pick}{layer_arg}, model=model)."
        if pick is not None
        else "Wrap the model so that it returns one tensor of outputs (batch first)."
    )
    raise TypeError(
        f"{method} needs forward_func to return one tensor (the outputs to attribute, "
        f"batch first), but it returned {desc}. {fix}"
    )


def checked_forward(
    forward_func: Callable[..., Any], target: TargetType, method: str, layer_arg: str = ""
) -> Callable[..., Any]:
    r"""``forward_func`` that checks its output is one tensor ``target`` can select from,
    as soon as it returns (before any gradient is taken)."""

    def forward(*args: Any, **kwargs: Any) -> Any:
        out = check_output(forward_func(*args, **kwargs), method, layer_arg)
        validate_target(out if out.dim() > 0 else out.reshape(1), target)
        return out

    return forward
