"""A full snapshot of everything a GIM scope may change, for before/after comparisons."""

from __future__ import annotations

import sys
from typing import Any, List, Tuple

import torch
from torch import nn


def snapshot(model: nn.Module) -> Tuple[Any, ...]:
    r"""Module ``__dict__`` keys and forward identities, every hook dict, config fields
    (``_attn_implementation``, ``use_cache``), the torch function-mode stack and the
    transformers attention registry keys."""
    mods: List[Any] = []
    for name, m in model.named_modules():
        d = m.__dict__
        hooks = tuple(
            tuple(getattr(m, h).keys())
            for h in (
                "_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                "_backward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                "_forward_pre_hooks_with_kwargs", "_state_dict_hooks", "_load_state_dict_pre_hooks",
            )
            if hasattr(m, h)
        )
        extra = tuple(sorted(k for k in d if not k.startswith("_") and k != "training"))
        mods.append((name, extra, d.get("forward"), d.get("_apply_gate"), hooks))
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "__dict__"):
            mods.append(
                (
                    name, "config",
                    cfg.__dict__.get("_attn_implementation_internal"),
                    getattr(cfg, "_attn_implementation", None),
                    cfg.__dict__.get("use_cache", "<none>"),
                )
            )
    modes = tuple(type(x) for x in torch.overrides._get_current_function_mode_stack())
    tf = sys.modules.get("transformers")
    keys: Tuple[str, ...] = ()
    if tf is not None:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        keys = tuple(sorted(ALL_ATTENTION_FUNCTIONS.keys()))
    from captum_gim._context import open_scopes
    from captum_gim._patching import installed_count

    return (tuple(mods), modes, keys, installed_count(), len(open_scopes()))
