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
from typing import Dict, List, Tuple

from torch import nn

from ..registry import Handle, RuleRegistry, default_registry
from . import torch_nn

__all__ = ["torch_nn", "ensure_ecosystem_rules", "integration_problems", "ECOSYSTEMS", "SUPPORTED"]

#: package name -> module of captum_gim.rules that holds its rules (a ``RULES`` tuple)
ECOSYSTEMS: Dict[str, str] = {
    "transformers": "captum_gim.rules.transformers",
    "pyhealth": "captum_gim.rules.pyhealth",
}

#: package name -> the versions the rules are written for
SUPPORTED: Dict[str, str] = {"transformers": ">=4.53", "pyhealth": ">=2.1"}

_lock = threading.Lock()
_loaded: Dict[str, List[Handle]] = {}
#: package -> why its rules could not be loaded (the package is installed but unusable)
_broken: Dict[str, str] = {}

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
                rules = tuple(mod.RULES)
            except ModuleNotFoundError as e:
                if e.name == module_name:  # that ecosystem's rules are not written yet
                    _loaded[package] = []
                    continue
                _broken[package] = _problem(package, e)
                _loaded[package] = []
                continue
            except Exception as e:  # an installed version the rules cannot use
                _broken[package] = _problem(package, e)
                _loaded[package] = []
                continue
            _loaded[package] = [registry.register(r, first=False) for r in rules]


def _problem(package: str, error: BaseException) -> str:
    version = getattr(sys.modules.get(package), "__version__", "unknown")
    return (
        f"captum_gim: the installed {package} {version} cannot be used by GIM's {package} "
        f"rules (supported: {package}{SUPPORTED.get(package, '')}): {type(error).__name__}: "
        f"{error}. Its modules keep their plain gradient; torch.nn modules are not affected."
    )


def integration_problems(model: nn.Module) -> Tuple[str, ...]:
    r"""Why the rules of an ecosystem ``model`` uses could not be loaded (one line each)."""
    if not _broken:
        return ()
    used = {type(m).__module__.partition(".")[0] for m in model.modules()}
    return tuple(msg for pkg, msg in _broken.items() if pkg in used)
