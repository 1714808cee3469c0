r"""``LayerGIM``: GIM at a layer (the embedding layer of token models)."""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union, cast

import torch
from torch import Tensor, nn

from captum._utils.common import _format_additional_forward_args, _format_output
from captum._utils.gradient import _forward_layer_eval, compute_layer_gradients_and_eval
from captum._utils.typing import BaselineType, ModuleOrModuleList, TargetType
from captum.attr import LayerGradientXActivation
from captum.attr._utils.common import _tensorize_baseline
from captum.log import log_usage

from ..config import GIMConfig
from ..registry import RuleRegistry
from ._common import (
    GIMSettings,
    check_batch,
    check_target_form,
    checked_forward,
    make_config,
)

__all__ = ["LayerGIM"]

LayerAttribution = Union[Tensor, Tuple[Tensor, ...]]


def _layer_list(layer: Any) -> List[nn.Module]:
    layers = [layer] if isinstance(layer, nn.Module) else layer
    if (
        not isinstance(layers, (list, tuple))
        or not layers
        or not all(isinstance(m, nn.Module) for m in layers)
    ):
        raise TypeError(
            "LayerGIM attributes at a layer: pass an nn.Module, or a list of them (as "
            f"LayerGradientXActivation takes), got {type(layer).__name__}"
        )
    return list(layers)


class LayerGIM(GIMSettings, LayerGradientXActivation):
    r"""GIM attributed at a layer: ``GIM-gradient(layer output) * (layer(x) - layer(baseline))``.

    For token models, pass the embedding layer (``model.get_input_embeddings()``): the
    inputs are token ids, baselines are token ids too (as Captum's
    ``LayerIntegratedGradients`` takes them), and the result is per token and hidden
    unit; sum over the last dimension for one score per token. It subclasses Captum's
    ``LayerGradientXActivation`` so that ``captum.attr.LLMGradientAttribution`` accepts it.

    A layer the model calls more than once per forward pass is attributed at its last
    call, as in Captum (whose gradient comes from the last call): the activation, the
    gradient and the baseline activation all come from that call.

    Args:
        forward_func (Callable): the model or a function of it.
        layer (nn.Module or list of nn.Module): the layer to attribute at; with a list,
            ``attribute`` returns a list with one attribution per layer, in order (as
            ``LayerGradientXActivation``).
        model (nn.Module, optional): the module whose backward pass is modified (default:
            resolved from ``forward_func`` as in :class:`GIMAttribution`).
        temperature, freeze_norms, divide_grads, keep_norm_mean, strict, registry, config:
            as in :class:`GIMAttribution`.
        multiply_by_inputs (bool): multiply by the layer activation difference (default)
            or return the bare GIM gradient at the layer.
        device_ids (list of int, optional): for ``DataParallel`` forward functions, as in
            Captum.
    """

    def __init__(
        self,
        forward_func: Callable[..., Tensor],
        layer: ModuleOrModuleList,
        model: Optional[nn.Module] = None,
        *,
        temperature: float = GIMConfig.temperature,
        freeze_norms: bool = GIMConfig.freeze_norms,
        divide_grads: bool = GIMConfig.divide_grads,
        multiply_by_inputs: bool = True,
        keep_norm_mean: bool = GIMConfig.keep_norm_mean,
        strict: bool = False,
        registry: Optional[RuleRegistry] = None,
        config: Optional[GIMConfig] = None,
        device_ids: Union[None, List[int]] = None,
    ) -> None:
        _layer_list(layer)
        settings = make_config(
            config,
            temperature=temperature,
            freeze_norms=freeze_norms,
            divide_grads=divide_grads,
            keep_norm_mean=keep_norm_mean,
        )
        if isinstance(layer, tuple):
            layer = list(layer)
        LayerGradientXActivation.__init__(
            self, forward_func, layer, device_ids=device_ids, multiply_by_inputs=multiply_by_inputs
        )
        self._init_gim(forward_func, model, settings, strict, registry)

    @log_usage(part_of_slo=True)
    def attribute(  # type: ignore[override]
        self,
        inputs: Union[Tensor, Tuple[Tensor, ...]],
        baselines: BaselineType = None,
        target: TargetType = None,
        additional_forward_args: Optional[object] = None,
        attribute_to_layer_input: bool = False,
        grad_kwargs: Optional[dict] = None,
    ) -> Union[LayerAttribution, List[LayerAttribution]]:
        r"""
        Args:
            inputs (Tensor or tuple[Tensor, ...]): model inputs (token ids for an
                embedding layer); dimension 0 is the batch.
            baselines (scalar, Tensor or tuple, optional): baselines *in input space*,
                passed through the model to get the layer's baseline activation. For
                integer inputs (token ids) they must be token ids: an int, or an integer
                tensor shaped like ``inputs`` or with batch size 1; a float is refused
                (it would be truncated to an id). None: a zero layer activation
                (gradient x activation).
            target (int, tuple, Tensor or list, optional): as in Captum.
            additional_forward_args (Any, optional): extra arguments of ``forward_func``.
            attribute_to_layer_input (bool): attribute to the layer's input instead of
                its output. Default: False.
            grad_kwargs (dict, optional): passed to ``torch.autograd.grad``.

        Returns:
            *Tensor* or *tuple[Tensor, ...]*, or a *list* of them: attributions shaped
            like the layer output (or input); a tuple if the layer returns several
            tensors; a list, one per layer, when the layer was given as a list.

        Examples::

            >>> import torch
            >>> from captum_gim import LayerGIM
            >>> class Tiny(torch.nn.Module):
            ...     def __init__(self):
            ...         super().__init__()
            ...         self.emb = torch.nn.Embedding(10, 8)
            ...         self.enc = torch.nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
            ...         self.head = torch.nn.Linear(8, 2)
            ...     def forward(self, ids):
            ...         return self.head(self.enc(self.emb(ids)).mean(1))
            >>> model = Tiny().eval()
            >>> ids = torch.tensor([[1, 2, 3, 4]])
            >>> attr = LayerGIM(model, model.emb).attribute(ids, baselines=0, target=1)
            >>> attr.sum(-1).shape          # one score per token
            torch.Size([1, 4])
            >>> both = LayerGIM(model, [model.emb, model.enc]).attribute(ids, target=1)
            >>> [a.shape for a in both]
            [torch.Size([1, 4, 8]), torch.Size([1, 4, 8])]
        """
        inputs_tuple = _as_tuple(inputs)
        check_target_form(target, check_batch(inputs_tuple, "LayerGIM"))
        additional_forward_args = _format_additional_forward_args(additional_forward_args)
        layers = _layer_list(self.layer)
        base: Optional[Tuple[Tensor, ...]] = None
        if self.multiplies_by_inputs and baselines is not None:
            base = _format_baselines(inputs_tuple, baselines)  # refuse bad ones up front

        counter = _CallCounter(layers, attribute_to_layer_input)
        forward = counter.counting(
            checked_forward(self.forward_func, target, "LayerGIM", ", layer")
        )
        with counter, self.scope() as report:
            self.last_report = report
            layer_gradients, layer_evals = compute_layer_gradients_and_eval(
                forward,
                self.layer,
                inputs_tuple,
                target,
                additional_forward_args,
                device_ids=self.device_ids,
                attribute_to_layer_input=attribute_to_layer_input,
                grad_kwargs=grad_kwargs,
            )
        grads = _per_layer(self.layer, layer_gradients)
        evals = _per_layer(self.layer, layer_evals)
        if not self.multiplies_by_inputs:
            results = [_format_output(len(e) > 1, g) for g, e in zip(grads, evals)]
        else:
            deltas = evals
            if base is not None:
                base_evals = self._baseline_layer_evals(
                    base, additional_forward_args, attribute_to_layer_input, counter.counts
                )
                deltas = [
                    tuple(e - b for e, b in zip(ev, bv)) for ev, bv in zip(evals, base_evals)
                ]
            results = [
                _format_output(len(e) > 1, tuple(g * d for g, d in zip(gs, ds)))
                for gs, ds, e in zip(grads, deltas, evals)
            ]
        return results[0] if isinstance(self.layer, nn.Module) else results

    def _baseline_layer_evals(
        self,
        base: Tuple[Tensor, ...],
        additional_forward_args: Any,
        attribute_to_layer_input: bool,
        calls: List[int],
    ) -> List[Tuple[Tensor, ...]]:
        with torch.no_grad():
            if self.device_ids is None and not isinstance(self.forward_func, nn.DataParallel):
                return _layer_evals_at_calls(
                    self.forward_func, base, _layer_list(self.layer), calls,
                    additional_forward_args, attribute_to_layer_input,
                )
            # DataParallel: Captum's own evaluation, which keeps the last call per device,
            # as its gradient does
            evals = _forward_layer_eval(
                self.forward_func,
                base,
                self.layer,
                additional_forward_args,
                device_ids=self.device_ids,
                attribute_to_layer_input=attribute_to_layer_input,
            )
        return _per_layer(self.layer, evals)


def _as_tuple(inputs: Any) -> Tuple[Any, ...]:
    return inputs if isinstance(inputs, tuple) else (inputs,)


def _per_layer(layer: ModuleOrModuleList, value: Any) -> List[Tuple[Tensor, ...]]:
    """Captum's per-layer results as a list of tuples, one per layer."""
    items = [value] if isinstance(layer, nn.Module) else list(value)
    return [tuple(v) if isinstance(v, (tuple, list)) else (v,) for v in items]


def _is_integer(x: Tensor) -> bool:
    return not (x.is_floating_point() or x.is_complex())


def _format_baselines(inputs: Tuple[Tensor, ...], baselines: BaselineType) -> Tuple[Tensor, ...]:
    r"""Baselines in input space as tensors shaped like ``inputs``; token ids stay ids."""
    baselines_tuple = baselines if isinstance(baselines, tuple) else (baselines,)
    if len(baselines_tuple) != len(inputs):
        raise ValueError(
            f"got {len(baselines_tuple)} baseline(s) for {len(inputs)} input(s); give one "
            "per input (a token id, or a tensor of ids shaped like the input)"
        )
    tensors = []
    for i, (x, b) in enumerate(zip(inputs, baselines_tuple)):
        if isinstance(b, bool) or not isinstance(b, (int, float, Tensor)):
            raise TypeError(f"a baseline must be a number or a Tensor, got {type(b).__name__}")
        is_float = isinstance(b, float) or (isinstance(b, Tensor) and not _is_integer(b))
        if _is_integer(x) and is_float:
            shown = repr(b) if not isinstance(b, Tensor) else f"a {b.dtype} tensor"
            raise TypeError(
                f"LayerGIM: input {i} holds integer ids ({x.dtype}) but baseline {i} is "
                f"{shown}; it would be cast to an id (0.5 becomes token 0). Pass token ids: "
                "an int (e.g. tokenizer.pad_token_id, or captum_gim.adapters.transformers."
                "recommended_baseline_token(tokenizer, model_kind)), or an integer tensor of "
                "ids shaped like the input or with batch size 1."
            )
        if isinstance(b, Tensor) and b.dim() == 0:
            b = b.item()
        if isinstance(b, (int, float)):
            b = torch.full_like(x, b)
        elif b.shape[1:] != x.shape[1:] or b.shape[0] not in (1, x.shape[0]):
            raise ValueError(
                f"baseline shape {tuple(b.shape)} does not fit input shape "
                f"{tuple(x.shape)}: use the input's shape or batch size 1"
            )
        tensors.append(b.to(device=x.device, dtype=x.dtype))
    return _tensorize_baseline(inputs, tuple(tensors))


class _CallCounter:
    r"""Counts each layer's calls during the attributed forward pass (not during a
    backward-time recomputation such as gradient checkpointing's): the call Captum's
    gradient comes from is the last one, so the baseline pass stops at the same call."""

    def __init__(self, layers: Sequence[nn.Module], attribute_to_layer_input: bool) -> None:
        self.layers = list(layers)
        self.counts = [0] * len(self.layers)
        self._pre = attribute_to_layer_input
        self._active = False
        self._handles: List[Any] = []

    def _hook(self, i: int) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            if self._active:
                self.counts[i] += 1

        return hook

    def counting(self, forward: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            self._active = True
            try:
                return forward(*args, **kwargs)
            finally:
                self._active = False

        return wrapped

    def __enter__(self) -> "_CallCounter":
        for i, layer in enumerate(self.layers):
            register = layer.register_forward_pre_hook if self._pre else layer.register_forward_hook
            self._handles.append(register(self._hook(i)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


class _ReachedLayer(Exception):
    """Raised by a hook to stop a forward pass once every layer has had its call."""


def _layer_evals_at_calls(
    forward_func: Callable[..., Any],
    inputs: Tuple[Tensor, ...],
    layers: List[nn.Module],
    calls: List[int],
    additional_forward_args: Any,
    attribute_to_layer_input: bool,
) -> List[Tuple[Tensor, ...]]:
    r"""Each layer's output (or input) at its ``calls[i]``-th call for ``inputs``, without
    running the model further than needed.

    The baseline activation only needs the model up to the layer's last call (for token
    models: the embedding lookup), so the forward pass is stopped there; hooks are removed
    in any case.
    """
    seen = [0] * len(layers)
    captured: Dict[int, Tuple[Tensor, ...]] = {}

    def hook_for(i: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Tuple[Any, ...], output: Any = None) -> None:
            seen[i] += 1
            if seen[i] != calls[i]:
                return
            value = args if attribute_to_layer_input else output
            value = value if isinstance(value, (tuple, list)) else (value,)
            captured[i] = tuple(t for t in value if isinstance(t, Tensor))
            if len(captured) == len(layers):
                raise _ReachedLayer

        return hook

    handles = []
    try:
        for i, layer in enumerate(layers):
            register = (
                layer.register_forward_pre_hook
                if attribute_to_layer_input
                else layer.register_forward_hook
            )
            handles.append(register(hook_for(i)))
        extra = additional_forward_args if additional_forward_args is not None else ()
        forward_func(*inputs, *extra)
    except _ReachedLayer:
        pass
    finally:
        for h in handles:
            h.remove()
    missing = [i for i in range(len(layers)) if i not in captured]
    if missing:
        i = missing[0]
        raise RuntimeError(
            f"the baseline forward pass called layer {i} ({type(layers[i]).__name__}) "
            f"{seen[i]} time(s) but the input pass called it {calls[i]} time(s); LayerGIM "
            "pairs the baseline activation with the call the gradient comes from (the "
            "last), so both passes must call the layer equally often"
        )
    return [captured[i] for i in range(len(layers))]
