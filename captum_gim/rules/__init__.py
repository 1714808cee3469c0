r"""Built-in rules, grouped by the ecosystem whose modules they match.

- :mod:`captum_gim.rules.torch_nn`: ``torch.nn`` (always registered).
- ``captum_gim.rules.transformers``: Hugging Face models (registered when ``transformers``
  has been imported, i.e. whenever a Hugging Face model exists in the process).
- ``captum_gim.rules.pyhealth``: PyHealth models (likewise for ``pyhealth``).

Ecosystem rules are registered lazily, the first time :func:`captum_gim.gim_backward`
runs after that package was imported, so importing :mod:`captum_gim` never imports
``transformers`` or ``pyhealth``.
"""

from __future__ import annotations

import importlib
import sys
import threading
from typing import Dict, List

from ..registry import Handle, RuleRegistry, default_registry
from . import torch_nn

__all__ = ["torch_nn", "ensure_ecosystem_rules", "ECOSYSTEMS"]

#: package name -> module of captum_gim.rules that holds its rules (a ``RULES`` tuple)
ECOSYSTEMS: Dict[str, str] = {
    "transformers": "captum_gim.rules.transformers",
    "pyhealth": "captum_gim.rules.pyhealth",
}

_lock = threading.Lock()
_loaded: Dict[str, List[Handle]] = {}

for _rule in torch_nn.RULES:
    default_registry.register(_rule, first=False)


def ensure_ecosystem_rules(registry: RuleRegistry = default_registry) -> None:
    r"""Register the rules of every supported ecosystem that is already imported.

    They are appended after the rules already there, so rules a user registered keep
    their precedence.
    """
    if registry is not default_registry:
        return
    for package, module_name in ECOSYSTEMS.items():
        if package not in sys.modules:
            continue
        with _lock:
            if package in _loaded:
                continue
            try:
                mod = importlib.import_module(module_name)
            except ModuleNotFoundError as e:
                if e.name == module_name:  # that ecosystem's rules are not written yet
                    _loaded[package] = []
                    continue
                raise
            _loaded[package] = [registry.register(r, first=False) for r in mod.RULES]
