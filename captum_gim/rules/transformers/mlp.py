r"""Gated MLPs (SwiGLU, GeGLU; fused ``gate_up_proj``): gate and up branches x 1/2."""

from __future__ import annotations

from typing import Any, List

from torch import Tensor, nn

from ..._context import active_for
from ..._patching import Handle, acquire, combine_handles
from ...config import GIMConfig
from ...ops import scale_grad
from .detect import gated_branches

__all__ = ["install_gated_mlp"]


def _halver(mlp: nn.Module) -> Any:
    def hook(_m: nn.Module, _inputs: Any, output: Any) -> Any:
        scope = active_for(mlp)
        if scope is None or not scope.config.divide_grads or not isinstance(output, Tensor):
            return output
        return scale_grad(output, 0.5)

    return hook


def _hooks(module: nn.Module) -> Handle:
    handles: List[Handle] = []
    for n in gated_branches(module) or ():
        hook = getattr(module, n).register_forward_hook(_halver(module))
        handles.append(Handle(hook.remove))
    return combine_handles(handles)


def install_gated_mlp(module: nn.Module, config: GIMConfig) -> Handle:
    r"""Forward hooks on the branches (installed once; they read the active settings)."""
    return acquire(module, "transformers.gated_mlp", lambda: _hooks(module))[0]
