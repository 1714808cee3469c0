r"""Captum attribution classes: :class:`GIMAttribution` and :class:`LayerGIM`."""

from .gim import GIMAttribution
from .layer_gim import LayerGIM

__all__ = ["GIMAttribution", "LayerGIM"]
