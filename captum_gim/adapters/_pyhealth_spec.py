r"""What :class:`~captum_gim.adapters.pyhealth.PyHealthAdapter` checks and records about
a PyHealth model: its interface, and one spec per feature key."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, List, Tuple

from torch import Tensor, nn

_REQUIRED = ("forward_from_embedding", "get_embedding_model")
_SUPPORTED = "MLP, StageNet, StageAttentionNet, Transformer"

@dataclass(frozen=True)
class _FeatureSpec:
    key: str
    schema: Tuple[str, ...]
    is_token: bool
    pad_id: int

    @property
    def append_mask(self) -> bool:
        """No ``"mask"`` in the schema: the adapter derives one and appends it."""
        return "mask" not in self.schema

    @property
    def extra_fields(self) -> Tuple[str, ...]:
        """This feature's entries of ``additional_forward_args``: the schema's other
        fields, then the appended mask."""
        rest = tuple(f for f in self.schema if f != "value")
        return rest + ("mask",) if self.append_mask else rest


def _missing_interface(model: Any) -> List[str]:
    missing = [name for name in _REQUIRED if not callable(getattr(model, name, None))]
    if not hasattr(model, "feature_keys"):
        missing.append("feature_keys")
    dataset = getattr(model, "dataset", None)
    if dataset is None or not hasattr(dataset, "input_processors"):
        missing.append("dataset.input_processors")
    return missing


def _check_model(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"PyHealthAdapter needs a PyHealth model (a torch.nn.Module), got {type(model).__name__}"
        )
    name = type(model).__name__
    missing = _missing_interface(model)
    if missing:
        raise TypeError(
            f"{name} cannot be attributed through PyHealthAdapter: it lacks "
            f"{', '.join(missing)}. Attribution at the embeddings needs a model that "
            "implements pyhealth.interpret.api.Interpretable (forward_from_embedding and "
            f"get_embedding_model), as PyHealth's {_SUPPORTED} do. Use one of those, or "
            f"implement the two methods on {name}."
        )
    try:
        from pyhealth.interpret.api import Interpretable
    except ImportError:  # pragma: no cover - very old PyHealth
        Interpretable = None  # type: ignore[assignment,misc]
    if Interpretable is not None and not isinstance(model, Interpretable):
        warnings.warn(
            f"{name} has forward_from_embedding and get_embedding_model but does not "
            "subclass pyhealth.interpret.api.Interpretable; assuming it follows that "
            "interface.",
            UserWarning,
            stacklevel=3,
        )
    if model.get_embedding_model() is None:
        raise TypeError(
            f"{name}.get_embedding_model() returned None: PyHealthAdapter attributes at the "
            "embeddings and needs the model's embedding stage."
        )


def _is_token(processor: Any, key: str) -> bool:
    try:
        return bool(processor.is_token())
    except NotImplementedError as e:
        raise TypeError(
            f"feature {key!r}: its processor {type(processor).__name__} does not say whether "
            "its values are token ids or continuous values (is_token() is not "
            "implemented), so it cannot be attributed."
        ) from e


def _tuple(x: Any) -> Tuple[Any, ...]:
    if isinstance(x, Tensor):
        return (x,)
    if isinstance(x, (tuple, list)):
        return tuple(x)
    raise TypeError(f"expected a tensor or a tuple of tensors, got {type(x).__name__}")
