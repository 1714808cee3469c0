r"""GIM and every Captum gradient method for PyHealth models.

Needs the ``pyhealth`` extra (``pip install captum-gim[pyhealth]``; PyHealth 2.1 needs
Python >= 3.12).

- :class:`PyHealthGIM`: a drop-in for ``pyhealth.interpret.methods.GIM`` (same
  constructor and ``attribute(**batch)``), returning GIM-gradient x input by default,
  with ``pyhealth_compatible=True`` to reproduce PyHealth's own output.
- :class:`PyHealthAdapter`: turns a ``get_dataloader`` batch into Captum's inputs,
  additional forward arguments and forward function, and Captum's attributions back into
  ``{feature_key: tensor}``; use it with ``IntegratedGradients``, ``Saliency``,
  ``InputXGradient``, ``NoiseTunnel``, ``GradientShap``, with or without
  :func:`captum_gim.gim_backward`.
- :func:`plot_timeseries_attributions`: attributions over visits, any matplotlib backend.

Example::

    >>> from captum_gim.pyhealth import PyHealthGIM
    >>> attributions = PyHealthGIM(model).attribute(**batch)  # doctest: +SKIP
"""

from __future__ import annotations

import sys

_INSTALL_HINT = (
    "captum_gim.pyhealth needs PyHealth: pip install captum-gim[pyhealth] "
    "(PyHealth 2.1 needs Python >= 3.12)"
)

if sys.version_info < (3, 12):  # pragma: no cover - depends on the interpreter
    raise ImportError(
        f"{_INSTALL_HINT}; this is Python {sys.version_info.major}.{sys.version_info.minor}."
    )

try:
    import pyhealth as _pyhealth  # noqa: F401  (absolute import: the PyHealth package)
except ImportError as _e:  # pragma: no cover - depends on the environment
    raise ImportError(f"{_INSTALL_HINT}. ({_e})") from _e

from .viz import plot_timeseries_attributions
from .adapters.pyhealth import MASK_MODES, PyHealthAdapter, PyHealthInputs
from .adapters.pyhealth_gim import PyHealthGIM
from .rules.pyhealth import pyhealth_compatible_registry

__all__ = [
    "PyHealthAdapter",
    "PyHealthGIM",
    "PyHealthInputs",
    "MASK_MODES",
    "plot_timeseries_attributions",
    "pyhealth_compatible_registry",
]
