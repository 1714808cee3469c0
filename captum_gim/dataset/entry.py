r"""``--model``: from what the user names to a :class:`~captum_gim.dataset.backend.Backend`.

``--model`` is one of:

- a **Hugging Face checkpoint directory** (``config.json``, weights, tokenizer files): a
  causal language model or a sequence classifier (:mod:`captum_gim.dataset.hf`);
- ``default`` or ``minilm``: the built-in tasks of :mod:`captum_gim.dataset.builtin`
  (the embedded default classifier; all-MiniLM-L6-v2 sentence similarity);
- a **Python entry point** ``module:function`` (``module`` importable, or a file
  ``path/to/file.py:function``). The function is called once per process, with the
  keyword arguments it declares among ``device`` (``torch.device``), ``method``
  (:class:`~captum_gim.dataset.methods.MethodSettings`), ``target``, ``baseline_token``
  and ``max_length`` (the run's values; a function with ``**kwargs`` gets them all). It
  returns one of:

  - a :class:`~captum_gim.dataset.backend.Backend`: used as it is (it should honour
    ``method``; a backend with a ``method`` attribute that differs from the run's is
    refused, and one without it is refused unless the run asks for GIM with the default
    temperature);
  - a PyHealth model (``pyhealth.models.BaseModel`` implementing ``Interpretable``:
    ``MLP``, ``StageNet``, ``StageAttentionNet``, ``Transformer``), or the tuple
    ``(forward_func, model)`` with such a model and ``forward_func`` a
    :class:`~captum_gim.pyhealth.PyHealthAdapter` of it (to choose its ``mask_mode``) or
    None: the PyHealth backend (:mod:`captum_gim.dataset.ehr`);
  - ``(forward_func, model)`` with any other ``torch.nn.Module``: ``forward_func`` maps a
    ``(batch, *shape)`` float tensor to ``(batch, outputs)`` and ``model`` holds its
    modules (:mod:`captum_gim.dataset.generic`; rows hold numeric ``inputs``).

  The model is put in evaluation mode on the run's device and its parameters stop
  requiring gradients. The entry point is recorded as written: a changed function behind
  the same name is not detected on resume.

From Python, :func:`resolve_backend` also takes those return values directly.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Union

import torch
from torch import nn

from .backend import Backend
from .methods import MethodSettings

__all__ = ["BUILTIN", "resolve_backend", "load_entry_point", "describe_model", "is_pyhealth_model"]

#: ``--model`` names of the built-in tasks -> their entry points
BUILTIN: Dict[str, str] = {
    "default": "captum_gim.dataset.builtin:default_task",
    "minilm": "captum_gim.dataset.builtin:minilm_similarity",
}


def is_pyhealth_model(obj: Any) -> bool:
    r"""Whether ``obj`` looks like a PyHealth model (an ``nn.Module`` with ``feature_keys``
    and ``dataset.input_processors``), without importing PyHealth."""
    return (isinstance(obj, nn.Module) and hasattr(obj, "feature_keys")
            and hasattr(getattr(obj, "dataset", None), "input_processors"))


def load_entry_point(spec: str) -> Callable[..., Any]:
    r"""The function named by ``module:function`` (or ``path/to/file.py:function``).

    Raises:
        ValueError: ``spec`` has no ``:``, or the module has no such callable.
        ImportError: the module cannot be imported.
    """
    module_name, sep, func_name = spec.rpartition(":")
    if not sep or not module_name or not func_name:
        raise ValueError(f"--model {spec!r}: an entry point is written module:function")
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise FileNotFoundError(f"--model {spec!r}: no file {path}")
        name = f"_captum_gim_entry_{abs(hash(str(path.resolve())))}"
        loader_spec = importlib.util.spec_from_file_location(name, path)
        if loader_spec is None or loader_spec.loader is None:  # pragma: no cover
            raise ImportError(f"cannot load {path}")
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[name] = module
        loader_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    func = getattr(module, func_name, None)
    if not callable(func):
        raise ValueError(f"--model {spec!r}: {module_name} has no function {func_name!r}")
    return func


def _call(func: Callable[..., Any], options: Dict[str, Any]) -> Any:
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins
        return func()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return func(**options)
    return func(**{k: v for k, v in options.items() if k in params})


def _frozen(model: nn.Module, device: torch.device) -> nn.Module:
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _from_value(value: Any, settings: MethodSettings, options: Dict[str, Any], what: str) -> Backend:
    device = options["device"]
    if isinstance(value, Backend):
        method = getattr(value, "method", None)
        if isinstance(method, MethodSettings) and method != settings:
            raise ValueError(
                f"{what} returned a backend computing {method.method!r} with other settings "
                f"than the run's ({settings.method!r}): give the function a 'method' "
                "parameter and build the backend with it"
            )
        if not isinstance(method, MethodSettings) and (
                settings.method != "gim" or settings.config != MethodSettings().config):
            raise ValueError(
                f"{what} returned a backend without a 'method' attribute: it cannot take "
                "--method and its options; build it from the function's 'method' parameter"
            )
        return value
    forward, model = (value if isinstance(value, tuple) and len(value) == 2 else (None, value))
    if is_pyhealth_model(model):
        from .ehr import PyHealthBackend

        return PyHealthBackend(_frozen(model, device), settings, adapter=forward,
                               target=options.get("target"),
                               baseline_token=options.get("baseline_token"), device=device)
    if isinstance(value, tuple) and len(value) == 2 and callable(forward) and isinstance(model, nn.Module):
        from .generic import TensorBackend

        base = options.get("baseline_token")
        try:
            baseline = None if base is None else float(base)
        except ValueError:
            raise ValueError(f"--baseline-token {base!r}: a (forward_func, model) entry point "
                             "takes a number (the baseline value)") from None
        return TensorBackend(forward, _frozen(model, device), settings,
                             target=options.get("target"), baseline=baseline, device=device)
    raise TypeError(
        f"{what} returned {type(value).__name__}; return a captum_gim.dataset.backend.Backend, "
        "a PyHealth model, or (forward_func, model) (see captum_gim.dataset.entry)"
    )


def resolve_backend(
    model: Any,
    settings: MethodSettings,
    *,
    device: torch.device,
    target: Union[None, int, str] = None,
    baseline_token: Union[None, int, str] = None,
    max_length: Optional[int] = None,
) -> Backend:
    r"""The backend for ``model``: a checkpoint directory, ``default``/``minilm``, a
    ``module:function`` entry point, or what such a function may return.

    Args:
        model: see the module's docstring.
        settings: the method and its budget.
        device: where the model runs.
        target: ``--target`` (parsed by
            :func:`~captum_gim.dataset.backend.parse_target`).
        baseline_token: ``--baseline-token``.
        max_length: ``--max-length`` (token models).

    Returns:
        Backend: ready to encode and attribute rows.

    Raises:
        FileNotFoundError: a path that does not exist.
        ValueError: a string that is neither a checkpoint directory, a built-in name nor
            an entry point.
        TypeError: an entry point returning something else than the contract says.
    """
    options = {"device": device, "method": settings, "target": target,
               "baseline_token": baseline_token, "max_length": max_length}
    if isinstance(model, (str, Path)):
        text = str(model)
        path = Path(text)
        if path.is_dir():
            from .hf import load_checkpoint

            return load_checkpoint(path, settings, device=device, baseline_token=baseline_token,
                                   target=target, max_length=max_length)
        if text in BUILTIN:
            text = BUILTIN[text]
        if ":" in text and not path.exists():
            return _from_value(_call(load_entry_point(text), options), settings, options,
                               f"the entry point {text}")
        raise ValueError(
            f"--model {text!r} is neither a Hugging Face checkpoint directory, nor one of "
            f"{', '.join(BUILTIN)}, nor a module:function entry point"
        )
    return _from_value(model, settings, options, "the model given")


def describe_model(model: Any) -> str:
    r"""How ``model`` is recorded in ``run.json``: the string as given, else the class of
    the object (an object's weights are not fingerprinted)."""
    if isinstance(model, (str, Path)):
        return str(model)
    if isinstance(model, tuple):
        return "(" + ", ".join(describe_model(m) for m in model) + ")"
    if model is None:
        return "None"
    return f"<{type(model).__module__}.{type(model).__qualname__} object>"
