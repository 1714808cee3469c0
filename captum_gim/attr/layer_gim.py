r"""``LayerGIM``: GIM at a layer (the embedding layer of token models)."""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Tuple, Union, cast

import torch
from torch import Tensor, nn

from captum._utils.common import (
    _format_additional_forward_args,
    _format_output,
    _format_tensor_into_tuples,
)
from captum._utils.gradient import _forward_layer_eval, compute_layer_gradients_and_eval
from captum._utils.typing import BaselineType, TargetType
from captum.attr import LayerGradientXActivation
from captum.attr._utils.common import _tensorize_baseline
from captum.log import log_usage

from ..registry import RuleRegistry
from ._common import GIMSettings, checked_forward

__all__ = ["LayerGIM"]


class LayerGIM(GIMSettings, LayerGradientXActivation):
    r"""GIM attributed at a layer: ``GIM-gradient(layer output) * (layer(x) - layer(baseline))``.

    For token models, pass the embedding layer (``model.get_input_embeddings()``): the
    inputs are token ids, baselines are token ids too (as Captum's
    ``LayerIntegratedGradients`` takes them), and the result is per token and hidden
    unit; sum over the last dimension for one score per token. It subclasses Captum's
    ``LayerGradientXActivation`` so that ``captum.attr.LLMGradientAttribution`` accepts it.

    Args:
        forward_func (Callable): the model or a function of it.
        layer (nn.Module): the layer to attribute at.
        model (nn.Module, optional): the module whose backward pass is modified (default:
            resolved from ``forward_func`` as in :class:`GIMAttribution`).
        temperature, freeze_norms, divide_grads, keep_norm_mean, strict, registry: as
            in :class:`GIMAttribution`.
        multiply_by_inputs (bool): multiply by the layer activation difference (default)
            or return the bare GIM gradient at the layer.
        device_ids (list of int, optional): for ``DataParallel`` forward functions, as in
            Captum.
    """

    def __init__(
        self,
        forward_func: Callable[..., Tensor],
        layer: nn.Module,
        model: Optional[nn.Module] = None,
        *,
        temperature: float = 2.0,
        freeze_norms: bool = True,
        divide_grads: bool = True,
        multiply_by_inputs: bool = True,
        keep_norm_mean: bool = True,
        strict: bool = False,
        registry: Optional[RuleRegistry] = None,
        device_ids: Union[None, List[int]] = None,
    ) -> None:
        if not isinstance(layer, nn.Module):
            raise TypeError(
                f"LayerGIM attributes at one layer: pass an nn.Module, got {type(layer).__name__}"
            )
        LayerGradientXActivation.__init__(
            self, forward_func, layer, device_ids=device_ids, multiply_by_inputs=multiply_by_inputs
        )
        self._init_gim(
            forward_func, model, temperature, freeze_norms, divide_grads, keep_norm_mean,
            strict, registry,
        )

    @log_usage(part_of_slo=True)
    def attribute(  # type: ignore[override]
        self,
        inputs: Union[Tensor, Tuple[Tensor, ...]],
        baselines: BaselineType = None,
        target: TargetType = None,
        additional_forward_args: Optional[object] = None,
        attribute_to_layer_input: bool = False,
        grad_kwargs: Optional[dict] = None,
    ) -> Union[Tensor, Tuple[Tensor, ...]]:
        r"""
        Args:
            inputs (Tensor or tuple[Tensor, ...]): model inputs (token ids for an
                embedding layer); dimension 0 is the batch.
            baselines (scalar, Tensor or tuple, optional): baselines *in input space*
                (e.g. a token id, or a tensor of token ids shaped like ``inputs`` or with
                batch size 1), passed through the model to get the layer's baseline
                activation. None: a zero layer activation (gradient x activation).
            target (int, tuple, Tensor or list, optional): as in Captum.
            additional_forward_args (Any, optional): extra arguments of ``forward_func``.
            attribute_to_layer_input (bool): attribute to the layer's input instead of
                its output. Default: False.
            grad_kwargs (dict, optional): passed to ``torch.autograd.grad``.

        Returns:
            *Tensor* or *tuple[Tensor, ...]*: attributions shaped like the layer output
            (a tuple if the layer returns several tensors).

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
        """
        inputs_tuple = _format_tensor_into_tuples(inputs)
        additional_forward_args = _format_additional_forward_args(additional_forward_args)
        with self.scope() as report:
            self.last_report = report
            layer_gradients, layer_evals = compute_layer_gradients_and_eval(
                checked_forward(self.forward_func, target),
                self.layer,
                inputs_tuple,
                target,
                additional_forward_args,
                device_ids=self.device_ids,
                attribute_to_layer_input=attribute_to_layer_input,
                grad_kwargs=grad_kwargs,
            )
        layer_gradients = cast(Tuple[Tensor, ...], layer_gradients)
        layer_evals = cast(Tuple[Tensor, ...], layer_evals)
        if not self.multiplies_by_inputs:
            return _format_output(len(layer_evals) > 1, tuple(layer_gradients))
        if baselines is None:
            deltas = tuple(layer_evals)
        else:
            base_evals = self._baseline_layer_eval(
                inputs_tuple, baselines, additional_forward_args, attribute_to_layer_input
            )
            deltas = tuple(e - b for e, b in zip(layer_evals, base_evals))
        return _format_output(
            len(layer_evals) > 1, tuple(g * d for g, d in zip(layer_gradients, deltas))
        )

    def _baseline_layer_eval(
        self,
        inputs: Tuple[Tensor, ...],
        baselines: BaselineType,
        additional_forward_args: Any,
        attribute_to_layer_input: bool,
    ) -> Tuple[Tensor, ...]:
        baselines_tuple = baselines if isinstance(baselines, tuple) else (baselines,)
        if len(baselines_tuple) != len(inputs):
            raise ValueError(
                f"got {len(baselines_tuple)} baseline(s) for {len(inputs)} input(s); give one "
                "per input (a token id, or a tensor of ids shaped like the input)"
            )
        tensors = []
        for x, b in zip(inputs, baselines_tuple):
            if isinstance(b, Tensor) and b.dim() == 0:
                b = b.item()
            if isinstance(b, (int, float)):
                b = torch.full_like(x, b)
            elif not isinstance(b, Tensor):
                raise TypeError(f"a baseline must be a number or a Tensor, got {type(b).__name__}")
            elif b.shape[1:] != x.shape[1:] or b.shape[0] not in (1, x.shape[0]):
                raise ValueError(
                    f"baseline shape {tuple(b.shape)} does not fit input shape "
                    f"{tuple(x.shape)}: use the input's shape or batch size 1"
                )
            tensors.append(b.to(x.device))
        base = _tensorize_baseline(inputs, tuple(tensors))
        with torch.no_grad():
            if self.device_ids is None:
                return _layer_eval_until(
                    self.forward_func, base, self.layer, additional_forward_args,
                    attribute_to_layer_input,
                )
            evals = _forward_layer_eval(
                self.forward_func,
                base,
                self.layer,
                additional_forward_args,
                device_ids=self.device_ids,
                attribute_to_layer_input=attribute_to_layer_input,
            )
        return cast(Tuple[Tensor, ...], evals)


class _ReachedLayer(Exception):
    """Raised by a forward hook to stop a forward pass once the layer has run."""


def _layer_eval_until(
    forward_func: Callable[..., Any],
    inputs: Tuple[Tensor, ...],
    layer: nn.Module,
    additional_forward_args: Any,
    attribute_to_layer_input: bool,
) -> Tuple[Tensor, ...]:
    r"""The layer's output (or input) for ``inputs``, without running the rest of the model.

    The baseline activation only needs the model up to the layer (for token models: the
    embedding lookup), so the forward pass is stopped there; the hook is removed in any case.
    """
    captured: List[Tuple[Tensor, ...]] = []

    def hook(module: nn.Module, args: Tuple[Any, ...], output: Any) -> None:
        value = args if attribute_to_layer_input else output
        captured.append(value if isinstance(value, tuple) else (value,))
        raise _ReachedLayer

    handle = layer.register_forward_hook(hook)
    try:
        extra = additional_forward_args if additional_forward_args is not None else ()
        forward_func(*inputs, *extra)
    except _ReachedLayer:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(
            "the baseline forward pass never reached the attributed layer; check that "
            "forward_func calls it"
        )
    return tuple(t for t in captured[0] if isinstance(t, Tensor))
