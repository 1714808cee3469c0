r"""What the built-in tasks share: the model cache and freezing a model for attribution."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Optional, TypeVar

import torch
from torch import nn

__all__ = ["cache_dir", "frozen", "CacheKey", "load_cached", "save_cached"]

M = TypeVar("M", bound=nn.Module)


def cache_dir() -> Path:
    r"""Where trained default models are cached.

    ``$CAPTUM_GIM_CACHE`` if set, else the user cache directory
    (``platformdirs.user_cache_dir("captum-gim")``, or ``~/.cache/captum-gim`` without
    platformdirs).
    """
    env = os.environ.get("CAPTUM_GIM_CACHE")
    if env:
        return Path(env)
    try:
        import platformdirs

        return Path(platformdirs.user_cache_dir("captum-gim"))
    except ImportError:  # pragma: no cover - platformdirs is a dev dependency
        return Path.home() / ".cache" / "captum-gim"


def frozen(model: M, device: torch.device) -> M:
    r"""``model`` on ``device`` in eval mode, its parameters not requiring gradients
    (the methods differentiate the inputs only)."""
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class CacheKey:
    r"""Mixin for the frozen settings dataclass of a trained, cached model: ``key()`` is
    a hash of every setting, the cache file's key."""

    def key(self) -> str:
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def load_cached(
    path: Path, model: nn.Module, accept: Callable[[Dict[str, Any]], bool] = lambda blob: True
) -> Optional[Dict[str, Any]]:
    r"""Load the state dict cached at ``path`` into ``model``; returns the cached metrics,
    or None when there is no file, ``accept(blob)`` is false, or the file is unreadable
    (with a warning: the caller trains again)."""
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if not accept(blob):
            return None
        model.load_state_dict(blob["state_dict"])
        return dict(blob["metrics"])
    except Exception as e:  # a broken cache file: train again
        warnings.warn(f"ignoring unreadable cached model {path}: {e}", stacklevel=3)
        return None


def save_cached(blob: Dict[str, Any], path: Path) -> None:
    r"""``torch.save`` through a temporary file, so concurrent runs never read a
    half-written one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{uuid.uuid4().hex}")
    torch.save(blob, tmp)
    tmp.replace(path)
