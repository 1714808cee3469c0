r"""PyHealth models through Captum: :class:`PyHealthAdapter` and :class:`PyHealthGIM`.

Import through :mod:`captum_gim.pyhealth` (which checks that PyHealth is installed).

PyHealth models that implement ``pyhealth.interpret.api.Interpretable`` (``MLP``,
``StageNet``, ``StageAttentionNet``, ``Transformer``) split into an embedding stage
(``get_embedding_model()``) and a prediction stage (``forward_from_embedding``).
:class:`PyHealthAdapter` turns a batch from ``pyhealth.datasets.get_dataloader`` into what
any Captum gradient method takes:

- ``inputs``: one tensor per feature key, in ``model.feature_keys`` order. Token features
  (codes) as their embeddings ``[..., embedding_dim]``; continuous features as their raw
  values (they are embedded inside the forward function, so each raw value gets its own
  attribution).
- ``additional_forward_args``: everything else the model needs, flat (so Captum can
  expand it along the batch): the processor's other schema fields (``time``, ...) and
  one mask per feature.
- a forward function (the adapter itself, an ``nn.Module``) that calls
  ``model.forward_from_embedding`` and returns the logits.

and maps Captum's attributions back to ``{feature_key: tensor shaped like the raw input
values}`` (token features summed over the embedding dimension).

:class:`~captum_gim.adapters.pyhealth_gim.PyHealthGIM` is a drop-in replacement for
``pyhealth.interpret.methods.GIM``.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ._pyhealth_spec import _FeatureSpec, _check_model, _is_token, _tuple

__all__ = [
    "PyHealthAdapter",
    "PyHealthInputs",
    "MASK_MODES",
]

#: How masks are derived for features whose processor schema has no ``"mask"`` field.
MASK_MODES = ("padding", "pyhealth")

Baseline = Union[Tensor, int, float]
TargetSpec = Union[None, int, Sequence[int], Tensor]


@dataclass
class PyHealthInputs:
    r"""One batch, prepared for Captum by :meth:`PyHealthAdapter.prepare`.

    Attributes:
        inputs (tuple of Tensor): one per feature key (``feature_keys`` order); token
            features as embeddings, continuous features as raw float values.
        baselines (tuple of Tensor): shaped like ``inputs``. Default: zeros (the zero
            embedding for tokens, 0.0 for continuous values).
        additional_forward_args (tuple): the other schema fields and masks, flat.
        target (Tensor): ``[batch]`` class indices, resolved as PyHealth does.
        logits (Tensor): the model's logits on the batch (no gradient).
        feature_keys (tuple of str): the order of ``inputs``.
        masks (dict of str to Tensor): the mask passed to the model for each feature.
    """

    inputs: Tuple[Tensor, ...]
    baselines: Tuple[Tensor, ...]
    additional_forward_args: Tuple[Optional[Tensor], ...]
    target: Tensor
    logits: Tensor
    feature_keys: Tuple[str, ...]
    masks: Dict[str, Tensor]

    def captum_kwargs(self, baselines: bool = True) -> Dict[str, Any]:
        r"""``target``, ``additional_forward_args`` (and ``baselines``) for ``attribute``.

        Examples::

            >>> attr = IntegratedGradients(adapter).attribute(  # doctest: +SKIP
            ...     prepared.inputs, **prepared.captum_kwargs())
        """
        kw: Dict[str, Any] = {
            "target": self.target,
            "additional_forward_args": self.additional_forward_args,
        }
        if baselines:
            kw["baselines"] = self.baselines
        return kw


class PyHealthAdapter(nn.Module):
    r"""Any Captum gradient method on a PyHealth model, with or without GIM.

    The adapter is an ``nn.Module`` whose forward takes Captum's inputs (token features as
    embeddings, continuous features as raw values) followed by the additional forward
    arguments, calls ``model.forward_from_embedding`` and returns the logits. It holds the
    model as a submodule, so ``gim_backward(adapter)`` and ``GIMAttribution(adapter)``
    find every module of the model; it changes nothing on the model.

    Masks: for each feature, the mask comes from the batch when the processor's
    ``schema()`` has a ``"mask"`` field. Otherwise (``mask_mode="padding"``, default) from
    the padding convention of ``get_dataloader``: token features are padded with the
    ``<pad>`` id, and sequences of continuous values are padded at the end with all-zero
    time steps, so a time step is padding only if it and every later step are all zeros.
    Zeros inside the data (a lab value of 0.0, a whole visit of zeros followed by real
    visits) are never masked; only trailing all-zero time steps are taken for padding,
    as they cannot be told apart from it in a collated batch (pass ``masks=`` to
    :meth:`prepare` if your data has them). Feature values without a time axis
    (``[batch, n]``) get an all-true ``[batch, 1]`` mask. ``mask_mode="pyhealth"``
    derives masks as PyHealth 2.1's interpreters do (every zero of a 2-D continuous
    feature and every all-zero time step masked); it exists for :class:`PyHealthGIM`
    ``(pyhealth_compatible=True)``. Masks are fixed arguments, not inputs: an
    Integrated-Gradients path or a noise tunnel never changes which positions count as
    padding.

    What is explained: each patient's prediction as the model makes it for that patient
    alone. For token features that is exactly ``model(**batch)``. PyHealth's own forward
    (``Transformer``, ``StageNet``) derives continuous-feature masks from the embedded
    values, which treats zero-padded time steps as real ones, so a padded patient's
    ``model(**batch)`` logit can differ from the same patient's alone; the adapter's
    masks give the unpadded patient's logit in any batch.

    Args:
        model (pyhealth.models.BaseModel): a model implementing
            ``pyhealth.interpret.api.Interpretable`` (``MLP``, ``StageNet``,
            ``StageAttentionNet``, ``Transformer``).
        mask_mode (str): ``"padding"`` (default) or ``"pyhealth"``, see above.

    Examples::

        >>> from captum.attr import IntegratedGradients
        >>> from captum_gim import gim_backward
        >>> from captum_gim.pyhealth import PyHealthAdapter
        >>> adapter = PyHealthAdapter(model)                       # doctest: +SKIP
        >>> batch = next(iter(get_dataloader(dataset, batch_size=8)))  # doctest: +SKIP
        >>> with adapter.eval_mode():                              # doctest: +SKIP
        ...     prepared = adapter.prepare(batch)
        ...     with gim_backward(adapter):                        # IG with GIM gradients
        ...         attr = IntegratedGradients(adapter).attribute(
        ...             prepared.inputs, **prepared.captum_kwargs())
        >>> adapter.to_feature_dict(attr)["conditions"].shape      # doctest: +SKIP
        torch.Size([8, 12])
        >>> # or in one call, any Captum method:
        >>> adapter.attribute(IntegratedGradients(adapter), batch, n_steps=32)  # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, *, mask_mode: str = "padding") -> None:
        _check_model(model)
        if mask_mode not in MASK_MODES:
            raise ValueError(f"mask_mode must be one of {MASK_MODES}, got {mask_mode!r}")
        super().__init__()
        self.model = model
        self.mask_mode = mask_mode
        self._specs: Tuple[_FeatureSpec, ...] = tuple(
            self._make_spec(k) for k in model.feature_keys  # type: ignore[attr-defined]
        )
        self._warned_training = False

    # ------------------------------------------------------------------ structure

    def _make_spec(self, key: str) -> _FeatureSpec:
        processors = self.model.dataset.input_processors  # type: ignore[attr-defined]
        if key not in processors:
            raise TypeError(f"feature {key!r} has no input processor in model.dataset")
        proc = processors[key]
        schema = tuple(proc.schema())
        if "value" not in schema:
            raise TypeError(
                f"feature {key!r}: its processor {type(proc).__name__} has schema {schema} "
                "without a 'value' field, so there is nothing to attribute."
            )
        is_token = _is_token(proc, key)
        vocab = getattr(proc, "code_vocab", None)
        pad_id = int(vocab.get("<pad>", 0)) if isinstance(vocab, Mapping) else 0
        return _FeatureSpec(key, schema, is_token, pad_id)

    @property
    def feature_keys(self) -> Tuple[str, ...]:
        r"""The model's feature keys: the order of ``inputs`` and of the attributions."""
        return tuple(s.key for s in self._specs)

    @property
    def token_keys(self) -> Tuple[str, ...]:
        r"""Feature keys whose values are token ids (attributed at their embeddings)."""
        return tuple(s.key for s in self._specs if s.is_token)

    @property
    def additional_arg_names(self) -> Tuple[Tuple[str, str], ...]:
        r"""``(feature_key, field)`` for each entry of ``additional_forward_args``."""
        return tuple((s.key, f) for s in self._specs for f in s.extra_fields)

    @property
    def embedding_model(self) -> nn.Module:
        r"""The model's embedding stage (``model.get_embedding_model()``)."""
        return self.model.get_embedding_model()  # type: ignore[operator]

    @property
    def device(self) -> torch.device:
        r"""The device of the model's parameters."""
        dev = getattr(self.model, "device", None)
        if isinstance(dev, torch.device):
            return dev
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    @property
    def _float_dtype(self) -> torch.dtype:
        # PyHealth's interpreters cast continuous values with .float(); a model converted
        # with .double() gets double inputs instead
        if self.mask_mode == "pyhealth":
            return torch.float32
        for p in self.model.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.float32

    # ------------------------------------------------------------------ forward

    def forward(self, *args: Any) -> Tensor:
        r"""Logits from Captum's inputs followed by the additional forward arguments.

        Args:
            *args: ``len(feature_keys)`` input tensors (embeddings for token features,
                raw values for continuous ones), then ``additional_forward_args``.

        Returns:
            Tensor: ``model.forward_from_embedding(...)["logit"]``, ``[batch, outputs]``.
        """
        n = len(self._specs)
        n_extra = sum(len(s.extra_fields) for s in self._specs)
        if len(args) != n + n_extra:
            raise TypeError(
                f"PyHealthAdapter.forward takes {n} inputs ({', '.join(self.feature_keys)}) "
                f"and {n_extra} additional forward arguments "
                f"({', '.join(f'{k}.{f}' for k, f in self.additional_arg_names)}), "
                f"got {len(args)} arguments. Use adapter.prepare(batch) to build them."
            )
        extras = iter(args[n:])
        continuous = {s.key: v for s, v in zip(self._specs, args[:n]) if not s.is_token}
        embedded = self.embedding_model(continuous) if continuous else {}
        kwargs: Dict[str, Tuple[Any, ...]] = {}
        for spec, value in zip(self._specs, args[:n]):
            if not spec.is_token:
                value = embedded[spec.key]
            parts = [value if f == "value" else next(extras) for f in spec.schema]
            if spec.append_mask:
                parts.append(next(extras))
            kwargs[spec.key] = tuple(parts)
        out = self.model.forward_from_embedding(**kwargs)  # type: ignore[operator]
        logits = out["logit"] if isinstance(out, Mapping) else out
        if not isinstance(logits, Tensor):
            raise TypeError(
                f"{type(self.model).__name__}.forward_from_embedding must return a dict with "
                f"a 'logit' tensor, got {type(out).__name__}"
            )
        return logits

    # ------------------------------------------------------------------ masks

    def _mask(self, spec: _FeatureSpec, value: Tensor) -> Tensor:
        if self.mask_mode == "pyhealth":  # PyHealth 2.1's interpreters, exactly
            if spec.is_token:
                return (value != 0).int()
            if value.dim() >= 3:
                return (value.abs().sum(dim=-1) != 0).int()
            return (value != 0).int()
        if spec.is_token:
            return value != spec.pad_id
        if value.dim() >= 3:
            B, T = value.shape[0], value.shape[1]
            nonzero = value.reshape(B, T, -1).ne(0).any(dim=-1)
            steps = torch.arange(T, device=value.device)
            last = torch.where(nonzero, steps, torch.full_like(steps, -1)).max(dim=1).values
            # a patient whose values are all zero keeps its first step (never an empty sequence)
            return steps.unsqueeze(0) <= last.clamp(min=0).unsqueeze(1)
        return torch.ones(value.shape[0], 1, dtype=torch.bool, device=value.device)

    # ------------------------------------------------------------------ preparation

    def prepare(
        self,
        batch: Mapping[str, Any],
        *,
        target_class_idx: TargetSpec = None,
        baselines: Optional[Mapping[str, Baseline]] = None,
        masks: Optional[Mapping[str, Tensor]] = None,
    ) -> PyHealthInputs:
        r"""Turn a batch from ``get_dataloader`` into Captum's inputs.

        Args:
            batch (dict): a batch (feature keys, labels, ids...); keys that are not
                feature keys are ignored, labels included.
            target_class_idx (int, sequence, Tensor, optional): resolved as PyHealth's
                interpreters do: single-logit models (binary, regression) always use
                output 0; otherwise this class for every patient (an int), one class
                per patient (a sequence or 1-D tensor), or the predicted class
                (``None``: argmax of the logits, also for multilabel).
            baselines (dict, optional): per feature key, in raw-input space. Token
                features: token ids (an int such as 1 for ``<unk>``, or an integer tensor
                shaped like the ids; padding positions stay padding) or embeddings (a
                float tensor ``[..., embedding_dim]``). Continuous features: a number or a
                tensor broadcastable to the values. Missing keys: zeros (zero embedding,
                0.0).
            masks (dict, optional): per feature key, a mask to use instead of the
                derived one (shape as the model expects: ``[batch, time]`` for sequences).

        Returns:
            PyHealthInputs: ``inputs``, ``baselines``, ``additional_forward_args``,
            ``target``, ``logits``, ``masks``.
        """
        if self.model.training and not self._warned_training:
            self._warned_training = True
            warnings.warn(
                f"{type(self.model).__name__} is in training mode, so dropout makes the "
                "attributions random. Wrap the call in `with adapter.eval_mode():` (or "
                "call model.eval()).",
                UserWarning,
                stacklevel=2,
            )
        missing = [k for k in self.feature_keys if k not in batch]
        if missing:
            raise KeyError(
                f"the batch has no {', '.join(map(repr, missing))}: pass a batch from "
                f"pyhealth.datasets.get_dataloader with every feature key of the model "
                f"({', '.join(self.feature_keys)})"
            )
        self.check_batch(batch)
        device = self.device
        unknown = set(baselines or {}) - set(self.feature_keys)
        if unknown:
            raise KeyError(
                f"baselines for unknown feature(s) {sorted(unknown)}; feature keys: "
                f"{list(self.feature_keys)}"
            )
        unknown = set(masks or {}) - set(self.feature_keys)
        if unknown:
            raise KeyError(f"masks for unknown feature(s) {sorted(unknown)}")

        raw: Dict[str, Tensor] = {}
        extras: List[Optional[Tensor]] = []
        used_masks: Dict[str, Tensor] = {}
        for spec in self._specs:
            parts = _tuple(batch[spec.key])
            if len(parts) < len(spec.schema):
                raise ValueError(
                    f"feature {spec.key!r}: expected {len(spec.schema)} tensors "
                    f"{spec.schema}, got {len(parts)}"
                )
            fields = {f: parts[i] for i, f in enumerate(spec.schema)}
            value = fields["value"]
            if not isinstance(value, Tensor):
                raise TypeError(f"feature {spec.key!r}: 'value' is a {type(value).__name__}")
            value = value.to(device)
            raw[spec.key] = value
            if masks is not None and spec.key in masks:
                mask = masks[spec.key].to(device)
            elif not spec.append_mask:
                mask = fields["mask"].to(device)
            else:
                mask = self._mask(spec, value)
            used_masks[spec.key] = mask
            for f in spec.extra_fields:
                if f == "mask":
                    extras.append(mask)
                else:
                    t = fields[f]
                    extras.append(t.to(device) if isinstance(t, Tensor) else t)

        inputs = self._inputs(raw)
        bases = self._baselines(raw, inputs, baselines or {})
        extras_t = tuple(extras)
        with torch.no_grad():
            logits = self(*inputs, *extras_t).detach()
        target = self.resolve_target(logits, target_class_idx)
        return PyHealthInputs(
            inputs=inputs,
            baselines=bases,
            additional_forward_args=extras_t,
            target=target,
            logits=logits,
            feature_keys=self.feature_keys,
            masks=used_masks,
        )

    def _inputs(self, raw: Mapping[str, Tensor]) -> Tuple[Tensor, ...]:
        tokens = {s.key: raw[s.key] for s in self._specs if s.is_token}
        with torch.no_grad():
            embedded = self.embedding_model(tokens) if tokens else {}
        out: List[Tensor] = []
        for spec in self._specs:
            if spec.is_token:
                x = embedded[spec.key].detach().clone()
            else:
                x = raw[spec.key].detach().to(self._float_dtype).clone()
            out.append(x.requires_grad_(True))  # fresh leaves, ready for any Captum method
        return tuple(out)

    def _baselines(
        self,
        raw: Mapping[str, Tensor],
        inputs: Tuple[Tensor, ...],
        given: Mapping[str, Baseline],
    ) -> Tuple[Tensor, ...]:
        out: List[Tensor] = []
        for spec, x in zip(self._specs, inputs):
            b = given.get(spec.key)
            if b is None:
                out.append(torch.zeros_like(x, requires_grad=False))
                continue
            bt = torch.as_tensor(b, device=x.device)
            if spec.is_token and not bt.is_floating_point():
                ids = raw[spec.key]
                ids_b = torch.where(ids == spec.pad_id, ids, bt.to(ids.dtype).expand_as(ids))
                with torch.no_grad():
                    emb = self.embedding_model({spec.key: ids_b})[spec.key]
                out.append(emb.detach().clone())
                continue
            if spec.is_token and bt.dim() == 0:
                raise TypeError(
                    f"baseline for token feature {spec.key!r}: give token ids (an int, e.g. 1 "
                    "for <unk>) or embeddings (a float tensor [..., embedding_dim]), not a "
                    "float number"
                )
            try:
                out.append(bt.to(x.dtype).expand_as(x).detach().clone())
            except RuntimeError as e:
                raise ValueError(
                    f"baseline for {spec.key!r} has shape {tuple(bt.shape)}, which does not "
                    f"broadcast to the input shape {tuple(x.shape)}"
                ) from e
        return tuple(out)

    def check_batch(self, batch: Mapping[str, Any]) -> None:
        r"""Raise a clear error, before anything runs, for a batch whose features have
        different numbers of patients, no patient at all, or token ids outside the
        model's vocabulary."""
        sizes: Dict[str, int] = {}
        for spec in self._specs:
            if spec.key not in batch:
                continue  # reported by prepare(), with the list of feature keys
            parts = _tuple(batch[spec.key])
            for f, t in zip(spec.schema, parts):
                if isinstance(t, Tensor) and t.dim() > 0:
                    sizes[f"{spec.key}.{f}"] = int(t.shape[0])
            value = parts[spec.schema.index("value")] if len(parts) > spec.schema.index("value") else None
            if spec.is_token and isinstance(value, Tensor) and value.numel():
                n = self._vocab_size(spec.key)
                bad = (value < 0) | (value >= n) if n is not None else value < 0
                if bool(bad.any()):
                    where = [int(i) for i in bad.nonzero()[0]]
                    raise ValueError(
                        f"feature {spec.key!r}: code id {int(value[tuple(where)])} at "
                        f"{where} is outside the model's vocabulary (ids 0..{(n or 1) - 1}); "
                        "the batch must come from the dataset (input processors) the model "
                        "was built with"
                    )
        if len(set(sizes.values())) > 1:
            shown = ", ".join(f"{k}: {v}" for k, v in sizes.items())
            raise ValueError(
                f"the batch's features hold different numbers of patients ({shown}); every "
                "feature needs one row per patient, as get_dataloader collates them"
            )
        if sizes and next(iter(sizes.values())) == 0:
            raise ValueError("the batch is empty (no patient): pass at least one patient")

    def _vocab_size(self, key: str) -> Optional[int]:
        layers = getattr(self.embedding_model, "embedding_layers", None)
        layer = layers[key] if layers is not None and key in layers else None
        if isinstance(layer, nn.Embedding):
            return int(layer.num_embeddings)
        vocab = getattr(self.model.dataset.input_processors[key], "code_vocab", None)  # type: ignore[attr-defined]
        return len(vocab) if isinstance(vocab, Mapping) else None

    # ------------------------------------------------------------------ targets

    @staticmethod
    def resolve_target(logits: Tensor, target_class_idx: TargetSpec = None) -> Tensor:
        r"""``[batch]`` output indices, as PyHealth's interpreters resolve them.

        Single-logit outputs (binary, regression): always 0. Otherwise
        ``target_class_idx`` (an int for all patients, or one per patient), or the argmax
        of the logits when it is None.
        """
        B = logits.shape[0]
        n_out = logits.shape[-1] if logits.dim() > 1 else 1
        if n_out == 1:
            return torch.zeros(B, dtype=torch.long, device=logits.device)
        if target_class_idx is None:
            return logits.argmax(dim=-1)
        t = torch.as_tensor(target_class_idx, dtype=torch.long, device=logits.device)
        if t.dim() == 0:
            t = t.expand(B).clone()
        if t.shape != (B,):
            raise ValueError(
                f"target_class_idx must be an int or one index per patient ({B}), got shape "
                f"{tuple(t.shape)}"
            )
        if bool(((t < 0) | (t >= n_out)).any()):
            raise ValueError(
                f"target_class_idx {t.tolist()} out of range for a model with {n_out} outputs"
            )
        return t

    # ------------------------------------------------------------------ results

    def to_feature_dict(self, attributions: Union[Tensor, Sequence[Tensor]]) -> Dict[str, Tensor]:
        r"""Captum's attributions as ``{feature_key: tensor shaped like the raw values}``.

        Token features are summed over the embedding dimension (one score per code);
        continuous features keep one score per raw value.
        """
        attrs = (attributions,) if isinstance(attributions, Tensor) else tuple(attributions)
        if len(attrs) != len(self._specs):
            raise ValueError(
                f"expected {len(self._specs)} attribution tensors ({', '.join(self.feature_keys)}), "
                f"got {len(attrs)}"
            )
        return {
            spec.key: (a.sum(dim=-1) if spec.is_token else a).detach()
            for spec, a in zip(self._specs, attrs)
        }

    # ------------------------------------------------------------------ helpers

    @contextlib.contextmanager
    def eval_mode(self) -> Iterator["PyHealthAdapter"]:
        r"""Evaluation mode for the model inside the block; every module's own
        ``training`` flag is restored on exit."""
        flags = [(m, m.training) for m in self.model.modules()]
        try:
            self.model.eval()
            yield self
        finally:
            for m, flag in flags:
                m.training = flag

    def attribute(
        self,
        method: Any,
        batch: Mapping[str, Any],
        *,
        target_class_idx: TargetSpec = None,
        baselines: Optional[Mapping[str, Baseline]] = None,
        masks: Optional[Mapping[str, Tensor]] = None,
        **kwargs: Any,
    ) -> Any:
        r"""Run a Captum attribution built on this adapter on one batch.

        Args:
            method: a Captum attribution whose forward function is this adapter, e.g.
                ``IntegratedGradients(adapter)``, ``Saliency(adapter)``,
                ``NoiseTunnel(InputXGradient(adapter))``, ``GradientShap(adapter)``,
                ``GIMAttribution(adapter)``. Wrap the call in ``gim_backward(adapter)`` for
                the GIM-modified version of any of them.
            batch (dict): a batch from ``get_dataloader``.
            target_class_idx, baselines, masks: as in :meth:`prepare`. Baselines are
                passed only to methods that take them.
            **kwargs: passed to ``method.attribute`` (``n_steps``, ``nt_type``...).

        Returns:
            dict of str to Tensor: attributions shaped like the raw values (a tuple
            ``(dict, delta)`` with ``return_convergence_delta=True``). The model runs in
            evaluation mode; its training flags are restored afterwards.
        """
        self.check_batch(batch)  # before the training flags change
        with self.eval_mode():
            prepared = self.prepare(
                batch, target_class_idx=target_class_idx, baselines=baselines, masks=masks
            )
            kw = dict(kwargs)
            if "baselines" not in kw and _takes_baselines(method):
                kw["baselines"] = prepared.baselines
            result = method.attribute(
                prepared.inputs,
                target=prepared.target,
                additional_forward_args=prepared.additional_forward_args,
                **kw,
            )
        if kw.get("return_convergence_delta", False):
            attributions, delta = result
            return self.to_feature_dict(attributions), delta
        return self.to_feature_dict(result)


def _takes_baselines(method: Any) -> bool:
    inner = getattr(method, "attribution_method", None)  # NoiseTunnel
    if inner is not None and inner is not method:
        return _takes_baselines(inner)
    try:
        return "baselines" in inspect.signature(method.attribute).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return False
