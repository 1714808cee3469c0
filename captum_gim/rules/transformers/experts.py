r"""Fused mixture-of-experts blocks (transformers 5: ``gate_up_proj`` of shape ``(E, 2I, H)``)
under every experts implementation: the gate and up branches of each expert x 1/2."""

from __future__ import annotations

import weakref
from typing import Any, Dict

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..._context import active_for
from ..._patching import Handle, acquire, combine_handles
from ...config import GIMConfig
from ...ops import scale_grad

__all__ = ["install_experts"]


class _ExpertsMode(TorchFunctionMode):
    r"""Active inside a fused-experts forward that loops over experts itself ("eager").

    Tags views of ``gate_up_proj`` taken by indexing, and halves the gradient of every
    linear map / matrix product that uses one: the gate and up branches of each expert.
    """

    _VIEWS = {
        Tensor.__getitem__, Tensor.t, Tensor.transpose, Tensor.permute, Tensor.view,
        Tensor.reshape, Tensor.contiguous, torch.transpose, torch.t, torch.permute,
        torch.reshape,
    }
    _PRODUCTS = {
        F.linear, torch.matmul, Tensor.matmul, Tensor.__matmul__, torch.bmm, Tensor.bmm,
        torch.mm, Tensor.mm,
    }

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self._tagged: Dict[int, "weakref.ref[Tensor]"] = {id(weight): weakref.ref(weight)}
        self.halved = 0

    def _is_tagged(self, t: Any) -> bool:
        if not isinstance(t, Tensor):
            return False
        ref = self._tagged.get(id(t))
        return ref is not None and ref() is t

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in self._VIEWS and args and self._is_tagged(args[0]) and isinstance(out, Tensor):
            self._tagged[id(out)] = weakref.ref(out)
        elif func in self._PRODUCTS and isinstance(out, Tensor):
            operands = list(args[:2]) + [kwargs.get("weight")]
            if any(self._is_tagged(a) for a in operands):
                self.halved += 1
                return scale_grad(out, 0.5)
        return out


def _experts_loop_themselves(module: nn.Module) -> bool:
    impl = getattr(getattr(module, "config", None), "_experts_implementation", None)
    return impl in (None, "eager")


def _patch_experts(module: nn.Module) -> Handle:
    _no = object()
    previous_forward = module.__dict__.get("forward", _no)
    original_forward = module.forward
    had_apply_gate = "_apply_gate" in module.__dict__
    previous_apply_gate = module.__dict__.get("_apply_gate")
    bound_apply_gate = getattr(module, "_apply_gate", None)
    state = {"eager": False}

    def active() -> bool:
        scope = active_for(module)
        return scope is not None and scope.config.divide_grads

    def apply_gate(gate_up_out: Tensor) -> Tensor:
        # batched_mm / grouped_mm implementations: gate_up_out holds both branches
        if not state["eager"] and active():
            gate_up_out = scale_grad(gate_up_out, 0.5)
        return bound_apply_gate(gate_up_out)  # type: ignore[misc]

    def forward(*args: Any, **kwargs: Any) -> Any:
        if not _experts_loop_themselves(module) or not active():
            return original_forward(*args, **kwargs)
        state["eager"] = True
        try:
            with _ExpertsMode(module.gate_up_proj):
                return original_forward(*args, **kwargs)
        finally:
            state["eager"] = False

    object.__setattr__(module, "forward", forward)

    def undo_forward() -> None:
        if module.__dict__.get("forward") is forward:
            if previous_forward is _no:
                del module.__dict__["forward"]
            else:
                object.__setattr__(module, "forward", previous_forward)

    handles = [Handle(undo_forward)]
    if bound_apply_gate is not None:
        object.__setattr__(module, "_apply_gate", apply_gate)

        def undo() -> None:
            if module.__dict__.get("_apply_gate") is apply_gate:
                if had_apply_gate:
                    object.__setattr__(module, "_apply_gate", previous_apply_gate)
                else:
                    del module.__dict__["_apply_gate"]

        handles.append(Handle(undo))
    return combine_handles(handles)


def install_experts(module: nn.Module, config: GIMConfig) -> Handle:
    r"""Patch the experts block once; the patch reads the active settings at call time."""
    return acquire(module, "transformers.experts", lambda: _patch_experts(module))[0]
