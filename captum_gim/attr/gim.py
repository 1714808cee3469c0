r"""``GIMAttribution``: GIM as a Captum ``GradientAttribution``."""

from __future__ import annotations

from typing import Callable, Optional, cast

from torch import Tensor, nn

from captum._utils.common import (
    _format_additional_forward_args,
    _format_output,
    _format_tensor_into_tuples,
    _is_tuple,
)
from captum._utils.typing import BaselineType, TargetType, TensorOrTupleOfTensorsGeneric
from captum.attr import GradientAttribution
from captum.attr._utils.common import _format_input_baseline, _validate_input
from captum.log import log_usage

from ..config import GIMConfig
from ..registry import RuleRegistry
from ._common import (
    GIMSettings,
    check_float_inputs,
    check_target_form,
    checked_forward,
    make_config,
)

__all__ = ["GIMAttribution"]


class GIMAttribution(GIMSettings, GradientAttribution):
    r"""Gradient Interaction Modifications (GIM) for any model Captum can attribute.

    GIM (Edin et al., 2025, *GIM: Improved Interpretability for Large Language Models*)
    keeps the forward pass and changes the backward pass in three places where plain
    gradients under-report a feature's importance because the network "self-repairs":
    attention softmaxes get a temperature-scaled gradient (TSG), normalisation layers
    treat their scale as a constant, and the operands of multiplicative interactions
    (attention q, k, v; gated MLP branches) get a uniformly divided gradient. The
    attribution is ``GIM-gradient * (inputs - baselines)`` (or the bare GIM gradient
    with ``multiply_by_inputs=False``).

    With ``temperature=1.0, freeze_norms=False, divide_grads=False`` it equals Captum's
    ``InputXGradient`` (and ``Saliency(abs=False)`` without the multiplication).

    Args:
        forward_func (Callable): the model or any function of it that returns the
            output to attribute.
        model (nn.Module, optional): the module whose backward pass is modified. When
            None: ``forward_func`` if it is a module, else the module a bound method
            belongs to; otherwise a ``TypeError`` asks for it.
        temperature (float): TSG temperature ``T`` (1.0: plain softmax gradient).
            Default: 2.0.
        freeze_norms (bool): freeze LayerNorm/RMSNorm scales. Default: True.
        divide_grads (bool): divide gradients at multiplicative interactions.
            Default: True.
        multiply_by_inputs (bool): return ``gradient * (inputs - baselines)``
            (default) or the bare GIM gradient.
        keep_norm_mean (bool): LayerNorm's mean keeps its gradient. Default: True.
        strict (bool): raise if the model has attention- or norm-like modules that no
            rule matches (default False: warn once).
        registry (RuleRegistry, optional): rules to use instead of the default registry.
        config (GIMConfig, optional): the four settings above as one object (then leave
            those keywords at their defaults). Built once here either way, and read back
            through :attr:`config` (``.temperature`` etc. read it too).
    """

    def __init__(
        self,
        forward_func: Callable[..., Tensor],
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
    ) -> None:
        settings = make_config(
            config,
            temperature=temperature,
            freeze_norms=freeze_norms,
            divide_grads=divide_grads,
            keep_norm_mean=keep_norm_mean,
        )
        GradientAttribution.__init__(self, forward_func)
        self._init_gim(forward_func, model, settings, strict, registry)
        self._multiply_by_inputs = multiply_by_inputs

    @log_usage(part_of_slo=True)
    def attribute(
        self,
        inputs: TensorOrTupleOfTensorsGeneric,
        baselines: BaselineType = None,
        target: TargetType = None,
        additional_forward_args: Optional[object] = None,
    ) -> TensorOrTupleOfTensorsGeneric:
        r"""
        Args:
            inputs (Tensor or tuple[Tensor, ...]): floating-point inputs; dimension 0 is
                the batch. A tuple of tensors gives a tuple of attributions.
            baselines (scalar, Tensor or tuple, optional): as in Captum: a number, a
                tensor shaped like the input (or with batch size 1), or a tuple of these
                per input. Default: zeros. Only used with ``multiply_by_inputs``.
            target (int, tuple, Tensor or list, optional): output indices, in every form
                Captum accepts (an int or 1-element tensor for all examples; a list or 1D
                tensor with one index per example; a tuple, or a list of tuples, for
                outputs with more than two dimensions). None for scalar outputs.
            additional_forward_args (Any, optional): extra arguments passed to
                ``forward_func`` after the inputs; not attributed.

        Returns:
            *Tensor* or *tuple[Tensor, ...]*: attributions shaped like ``inputs``
            (a tuple exactly when ``inputs`` is a tuple).

        Examples::

            >>> import torch
            >>> from captum_gim import GIMAttribution
            >>> layer = torch.nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
            >>> model = torch.nn.Sequential(layer.eval(), torch.nn.Flatten(),
            ...                             torch.nn.Linear(8 * 4, 3))
            >>> x = torch.randn(2, 4, 8)
            >>> attr = GIMAttribution(model).attribute(x, target=1)
            >>> attr.shape
            torch.Size([2, 4, 8])
        """
        is_inputs_tuple = _is_tuple(inputs)
        inputs_tuple, baselines_tuple = _format_input_baseline(inputs, baselines)
        method = type(self).__name__
        check_float_inputs(inputs_tuple, method)
        check_target_form(target, inputs_tuple[0].shape[0])
        _validate_input(inputs_tuple, baselines_tuple)
        additional_forward_args = _format_additional_forward_args(additional_forward_args)

        # Differentiate with respect to aliases (same storage, no copy) of inputs that do
        # not require grad, instead of flipping requires_grad on the caller's tensors as
        # Captum does: a tensor shared by threads attributing at once stays untouched.
        grad_inputs = tuple(
            x if x.requires_grad else x.detach().requires_grad_() for x in inputs_tuple
        )
        with self.scope() as report:
            self.last_report = report
            gradients = self.gradient_func(
                checked_forward(self.forward_func, target, method),
                grad_inputs,
                target,
                additional_forward_args,
            )

        if self.multiplies_by_inputs:
            attributions = tuple(
                grad * (x - b) for grad, x, b in zip(gradients, inputs_tuple, baselines_tuple)
            )
        else:
            attributions = tuple(gradients)
        return cast(
            TensorOrTupleOfTensorsGeneric, _format_output(is_inputs_tuple, attributions)
        )

    def attribute_future(self) -> Callable:
        r"""Not implemented: GIM computes its gradients synchronously."""
        raise NotImplementedError("attribute_future is not implemented for GIMAttribution")

    @property
    def multiplies_by_inputs(self) -> bool:
        return self._multiply_by_inputs
