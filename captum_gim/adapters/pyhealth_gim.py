r"""``PyHealthGIM``: a drop-in for ``pyhealth.interpret.methods.GIM``, through Captum.

Import through :mod:`captum_gim.pyhealth` (which checks that PyHealth is installed).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping, Optional

from torch import Tensor, nn

from pyhealth.interpret.methods.base_interpreter import BaseInterpreter

from ..attr._common import make_config
from ..attr.gim import GIMAttribution
from ..config import GIMConfig
from ..rules.pyhealth import pyhealth_compatible_registry
from ..scope import GIMReport
from .pyhealth import Baseline, PyHealthAdapter, TargetSpec

__all__ = ["PyHealthGIM"]


class PyHealthGIM(BaseInterpreter):
    r"""GIM for PyHealth models: a drop-in for ``pyhealth.interpret.methods.GIM``.

    Same constructor and ``attribute(target_class_idx=None, **batch)`` signature as
    PyHealth's interpreter, the same dictionary out (``{feature_key: tensor shaped like the
    raw input values}``), so it works wherever PyHealth's does
    (``ComprehensivenessMetric``, ``SufficiencyMetric``, ``Evaluator.evaluate_attribution``).
    It runs through Captum (:class:`~captum_gim.GIMAttribution` on a
    :class:`PyHealthAdapter`).

    How it differs from PyHealth 2.1's GIM (``pyhealth_compatible=True`` reproduces
    PyHealth's output exactly, to compare and migrate):

    - It returns GIM-gradient x (input - baseline), an attribution whose sum over the
      features of a patient approximates the change in the logit; PyHealth returns the
      bare gradient (``multiply_by_inputs=False`` gives that here).
    - LayerNorm keeps the gradient of its mean subtraction (the GIM reference's freeze);
      PyHealth detaches the mean as well (``keep_norm_mean=False``).
    - Attention modules are matched by class identity
      (``pyhealth.models.transformer.Attention``), not by the class name ``Attention``.
    - StageNet's cumulative softmax is not attention and gets no TSG, which the report
      (``last_report``) says; on StageNet GIM equals the plain gradient, as in PyHealth
      (whose docstring claims otherwise).
    - Masks: zeros in continuous features are data, not padding (see
      :class:`PyHealthAdapter`); PyHealth masks every zero of a 2-D continuous feature.
    - The model is left as it was: its training flag, its gradients (``.grad``) and
      modules. PyHealth's interpreter switches the model to eval mode for good and
      clears its parameter gradients.

    Args:
        model (pyhealth.models.BaseModel): ``MLP``, ``StageNet``, ``StageAttentionNet``,
            ``Transformer`` or any model implementing ``Interpretable``.
        temperature (float): TSG temperature for attention softmaxes. Default: 2.0.
        freeze_norms (bool): freeze LayerNorm statistics. Default: True.
        divide_grads (bool): query/key x1/4, value x1/2. Default: True.
        multiply_by_inputs (bool): gradient x (input - baseline) (default) or the bare
            gradient.
        keep_norm_mean (bool): LayerNorm's mean keeps its gradient. Default: True.
        pyhealth_compatible (bool): reproduce ``pyhealth.interpret.methods.GIM`` (bare
            gradient, PyHealth's LayerNorm and attention arithmetic, PyHealth's masks,
            temperatures below 1 raised to 1). ``multiply_by_inputs`` and
            ``keep_norm_mean`` are then ignored. Default: False.
        strict (bool): raise if the model has attention- or norm-like modules no rule
            matches. Default: False (warn).
        config (GIMConfig, optional): the four GIM settings as one object (then leave
            their keywords at the defaults).

    Examples::

        >>> from captum_gim.pyhealth import PyHealthGIM
        >>> gim = PyHealthGIM(model, temperature=2.0)          # doctest: +SKIP
        >>> batch = next(iter(test_loader))                    # doctest: +SKIP
        >>> attributions = gim.attribute(**batch)              # doctest: +SKIP
        >>> attributions["conditions"].shape                   # doctest: +SKIP
        torch.Size([32, 17])
        >>> print(gim.last_report)                             # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        temperature: float = 2.0,
        freeze_norms: bool = True,
        divide_grads: bool = True,
        multiply_by_inputs: bool = True,
        *,
        keep_norm_mean: bool = True,
        pyhealth_compatible: bool = False,
        strict: bool = False,
        config: Optional[GIMConfig] = None,
    ) -> None:
        # BaseInterpreter.__init__ is deliberately not called: it switches the model to
        # eval mode for good. attribute() does that for its own duration only.
        self.model = model
        self.pyhealth_compatible = bool(pyhealth_compatible)
        #: the one GIMConfig of this interpreter, built here and passed down
        cfg = make_config(
            config,
            temperature=temperature,
            freeze_norms=freeze_norms,
            divide_grads=divide_grads,
            keep_norm_mean=keep_norm_mean,
        )
        if self.pyhealth_compatible:
            if not (cfg.freeze_norms and cfg.divide_grads):
                raise ValueError(
                    "pyhealth_compatible=True reproduces PyHealth's GIM, which always freezes "
                    "LayerNorm and divides attention gradients; leave freeze_norms and "
                    "divide_grads at True, or use pyhealth_compatible=False."
                )
            cfg = dataclasses.replace(
                cfg, temperature=max(cfg.temperature, 1.0), keep_norm_mean=False
            )
            multiply_by_inputs = False
        self.config: GIMConfig = cfg
        self.adapter = PyHealthAdapter(
            model, mask_mode="pyhealth" if self.pyhealth_compatible else "padding"
        )
        self.multiply_by_inputs = multiply_by_inputs
        self.gim = GIMAttribution(
            self.adapter,
            model=model,
            config=self.config,
            multiply_by_inputs=multiply_by_inputs,
            strict=strict,
            registry=pyhealth_compatible_registry() if self.pyhealth_compatible else None,
        )
        self.last_report: Optional[GIMReport] = None

    def attribute(  # type: ignore[override]
        self,
        target_class_idx: TargetSpec = None,
        baselines: Optional[Mapping[str, Baseline]] = None,
        **kwargs: Any,
    ) -> Dict[str, Tensor]:
        r"""GIM attributions for one batch.

        Args:
            target_class_idx (int, sequence or Tensor, optional): the class to explain;
                a no-op for single-logit (binary) models; None: the predicted class.
            baselines (dict, optional): per feature key, see
                :meth:`PyHealthAdapter.prepare`. Default: zero embeddings for token
                features, zeros for continuous values.
            **kwargs: the batch (``**batch`` from ``get_dataloader``); keys other than
                the model's feature keys (labels, ids) are ignored.

        Returns:
            dict of str to Tensor: ``{feature_key: attributions}``, each shaped like the
            raw input values (token features: one score per code).
        """
        attributions = self.adapter.attribute(
            self.gim, kwargs, target_class_idx=target_class_idx, baselines=baselines
        )
        self.last_report = self.gim.last_report
        return attributions

    @property
    def temperature(self) -> float:
        """``config.temperature``."""
        return self.config.temperature

    @property
    def freeze_norms(self) -> bool:
        """``config.freeze_norms``."""
        return self.config.freeze_norms

    @property
    def divide_grads(self) -> bool:
        """``config.divide_grads``."""
        return self.config.divide_grads

    @property
    def keep_norm_mean(self) -> bool:
        """``config.keep_norm_mean``."""
        return self.config.keep_norm_mean

    def __repr__(self) -> str:
        mode = ", pyhealth_compatible=True" if self.pyhealth_compatible else ""
        return (
            f"PyHealthGIM(model={type(self.model).__name__}, temperature={self.temperature}"
            f"{mode})"
        )
