r"""The paper's setting for Hugging Face language models, in one call.

:func:`answer_token_attribution` attributes the raw logit of an answer token at the last
position of a causal language model to the input tokens, with GIM through
:class:`~captum_gim.LayerGIM` on ``model.get_input_embeddings()``: the result per token is
``sum over hidden units of GIM-grad * (emb(ids) - emb(baseline_ids))``, the baseline being
one fixed token id at every position (Edin et al., 2025). Batches with padding are
supported through ``attention_mask`` (left or right padding; the "last position" is each
row's last real token, and pad positions get zero attribution).

Example::

    >>> from captum_gim.adapters.transformers import answer_token_attribution
    >>> scores = answer_token_attribution(model, input_ids, answer_token_id=42)  # doctest: +SKIP
    >>> scores.shape                                                              # doctest: +SKIP
    torch.Size([1, 12])
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..attr._common import make_config
from ..attr.layer_gim import LayerGIM
from ..config import GIMConfig
from .text_result import MODEL_KINDS, TextAttribution, recommended_baseline_token

__all__ = [
    "answer_token_attribution",
    "last_token_logits",
    "default_baseline_token_id",
    "next_token_attribution",
    "text_classification_attribution",
    "recommended_baseline_token",
    "TextAttribution",
    "MODEL_KINDS",
]

TokenIds = Union[int, Sequence[int], Tensor]


def default_baseline_token_id(model: nn.Module) -> int:
    r"""The baseline token used when none is given: the pad token, else EOS, else BOS, else 0."""
    config = getattr(model, "config", None)
    for attr in ("pad_token_id", "eos_token_id", "bos_token_id"):
        value = getattr(config, attr, None)
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if isinstance(value, int) and value >= 0:
            return value
    return 0


def _last_positions(input_ids: Tensor, attention_mask: Optional[Tensor]) -> Tensor:
    """Index of each row's last real token."""
    batch, length = input_ids.shape
    if attention_mask is None:
        return torch.full((batch,), length - 1, dtype=torch.long, device=input_ids.device)
    ar = torch.arange(length, device=input_ids.device).expand(batch, -1)
    last = torch.where(attention_mask.bool(), ar, torch.full_like(ar, -1)).max(dim=1).values
    if (last < 0).any():
        raise ValueError("attention_mask has a row with no real token (all zeros)")
    return last


def _accepts(model: nn.Module, name: str) -> bool:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _auto_position_ids(model: nn.Module, attention_mask: Optional[Tensor]) -> Optional[Tensor]:
    """``generate``'s position ids for left-padded rows of a causal LM, else None."""
    if attention_mask is None or not bool((attention_mask[:, 0] == 0).any()):
        return None
    can_generate = getattr(model, "can_generate", None)
    if not (callable(can_generate) and can_generate()) or not _accepts(model, "position_ids"):
        return None
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 1)


def last_token_logits(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Optional[Tensor] = None,
    position_ids: Optional[Tensor] = None,
    last_positions: Optional[Tensor] = None,
) -> Tensor:
    r"""Raw logits ``(batch, vocab)`` of ``model`` at each row's last real position.

    Used as the forward function of :func:`answer_token_attribution`; handy on its own as
    a Captum ``forward_func`` (``target`` = the answer token id).
    """
    kwargs: dict = {"input_ids": input_ids, "use_cache": False}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    logits = model(**kwargs).logits
    if last_positions is None:
        last_positions = _last_positions(input_ids, attention_mask)
    rows = torch.arange(logits.shape[0], device=logits.device)
    return logits[rows, last_positions.to(logits.device)]


def _targets(answer_token_id: TokenIds, batch: int) -> Union[int, Tensor]:
    if isinstance(answer_token_id, int):
        return answer_token_id
    t = torch.as_tensor(answer_token_id, dtype=torch.long).flatten()
    if t.numel() == 1:
        return int(t.item())
    if t.numel() != batch:
        raise ValueError(f"answer_token_id: give one id, or one per row ({batch}); got {t.numel()}")
    return t


def answer_token_attribution(
    model: nn.Module,
    input_ids: Tensor,
    answer_token_id: TokenIds,
    *,
    attention_mask: Optional[Tensor] = None,
    baseline_token_id: Optional[int] = None,
    position_ids: Union[str, Tensor, None] = "auto",
    temperature: float = GIMConfig.temperature,
    freeze_norms: bool = GIMConfig.freeze_norms,
    divide_grads: bool = GIMConfig.divide_grads,
    keep_norm_mean: bool = GIMConfig.keep_norm_mean,
    strict: bool = False,
    sum_hidden: bool = True,
    config: Optional[GIMConfig] = None,
) -> Tensor:
    r"""GIM attribution of an answer token's raw logit at the last position, per input token.

    The paper's setting: the target is the raw logit (not the log-probability) of
    ``answer_token_id`` at the last position; the baseline is ``baseline_token_id`` at
    every position; the attribution at the embedding layer is
    ``GIM-grad * (emb(ids) - emb(baseline))``, summed over the hidden size.

    Args:
        model (nn.Module): a Hugging Face causal LM (``...ForCausalLM``) or any module
            whose output has ``.logits`` of shape ``(batch, length, vocab)`` and which has
            ``get_input_embeddings()``.
        input_ids (Tensor): token ids, ``(batch, length)`` (or ``(length,)``).
        answer_token_id (int, sequence or Tensor): the answer token, or one per row.
        attention_mask (Tensor, optional): ``(batch, length)``, 1 for real tokens. Rows may
            be left- or right-padded; each row's target is taken at its last real token
            and pad positions get zero attribution.
        baseline_token_id (int, optional): the baseline token at every position. Default:
            the model's pad token, else EOS, else BOS, else 0
            (:func:`default_baseline_token_id`).
        position_ids ("auto", Tensor or None): ``"auto"`` (default) passes the position ids
            ``generate`` would use when a causal LM gets left-padded rows (so a padded row
            sees the positions it would see alone); None never passes any.
        temperature, freeze_norms, divide_grads, keep_norm_mean, strict, config: as in
            :class:`~captum_gim.LayerGIM` (one ``GIMConfig`` is built here and passed on).
        sum_hidden (bool): sum over the hidden size (default) or return
            ``(batch, length, hidden)``.

    Returns:
        Tensor: ``(batch, length)`` attributions (``(batch, length, hidden)`` with
        ``sum_hidden=False``), in the embedding's dtype.

    Examples::

        >>> import torch, transformers
        >>> from captum_gim.adapters.transformers import answer_token_attribution
        >>> cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
        >>> model = transformers.LlamaForCausalLM(cfg).eval()
        >>> ids = torch.tensor([[3, 5, 7, 9]])
        >>> answer_token_attribution(model, ids, answer_token_id=11).shape
        torch.Size([1, 4])
    """
    settings = make_config(
        config,
        temperature=temperature,
        freeze_norms=freeze_norms,
        divide_grads=divide_grads,
        keep_norm_mean=keep_norm_mean,
    )
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
        if attention_mask is not None and attention_mask.dim() == 1:
            attention_mask = attention_mask.unsqueeze(0)
    if input_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"input_ids must hold token ids (an integer tensor), got {input_ids.dtype}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} does not match input_ids "
            f"shape {tuple(input_ids.shape)}"
        )
    get_emb = getattr(model, "get_input_embeddings", None)
    if not callable(get_emb):
        raise TypeError(
            "answer_token_attribution needs a model with get_input_embeddings() (a Hugging "
            "Face model); for other models use captum_gim.LayerGIM with your embedding layer"
        )
    if isinstance(position_ids, str):
        if position_ids != "auto":
            raise ValueError(f"position_ids must be 'auto', a Tensor or None, got {position_ids!r}")
        position_ids = _auto_position_ids(model, attention_mask)
    base_id = default_baseline_token_id(model) if baseline_token_id is None else baseline_token_id
    last = _last_positions(input_ids, attention_mask)
    method = LayerGIM(
        functools.partial(last_token_logits, model),
        get_emb(),
        model=model,
        config=settings,
        strict=strict,
    )
    attr = method.attribute(
        input_ids,
        baselines=torch.full_like(input_ids, int(base_id)),
        target=_targets(answer_token_id, input_ids.shape[0]),
        additional_forward_args=(attention_mask, position_ids, last),
    )
    assert isinstance(attr, Tensor)
    attr = attr.detach()
    if attention_mask is not None:
        attr = attr * attention_mask.to(attr.dtype).unsqueeze(-1)
    return attr.sum(-1) if sum_hidden else attr


def _tokens(tokenizer: Any, ids: Tensor) -> List[str]:
    return [str(t) for t in tokenizer.convert_ids_to_tokens(ids.tolist())]


def next_token_attribution(
    model: nn.Module,
    tokenizer: Any,
    prompt: str,
    answer: Union[None, int, str] = None,
    *,
    baseline_token: Union[None, int, str] = None,
    strict: bool = False,
    config: Optional[GIMConfig] = None,
    **settings: Any,
) -> TextAttribution:
    r"""GIM attribution of a causal LM's next token to the prompt's tokens.

    The paper's setting through :func:`answer_token_attribution`: the raw logit of
    ``answer`` at the last position; the baseline is
    ``recommended_baseline_token(tokenizer, "causal-lm", baseline_token)`` at every
    position.

    Args:
        model (nn.Module): a Hugging Face ``...ForCausalLM``.
        tokenizer: its tokenizer.
        prompt (str): the prompt.
        answer (int or str, optional): the answer token (id or token string); None: the
            model's own greedy next token.
        baseline_token (int or str, optional): overrides the recommended baseline.
        strict, config, \*\*settings: as in :func:`answer_token_attribution`
            (``temperature``, ``freeze_norms``, ``divide_grads``, ``keep_norm_mean``).

    Returns:
        TextAttribution: tokens, scores, the answer token and the last-position logits.

    Examples::

        >>> res = next_token_attribution(model, tokenizer, "the cat sat on the")  # doctest: +SKIP
        >>> res.to_dataframe()                                                  # doctest: +SKIP
    """
    cfg = make_config(config, **settings)
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = last_token_logits(model, ids)[0]
    if answer is None:
        target = int(logits.argmax())
    elif isinstance(answer, str):
        target = int(tokenizer.convert_tokens_to_ids(answer))
    else:
        target = int(answer)
    base = recommended_baseline_token(tokenizer, "causal-lm", baseline_token)
    scores = answer_token_attribution(
        model, ids, target, baseline_token_id=base, strict=strict, config=cfg
    )[0]
    return TextAttribution(
        tokens=_tokens(tokenizer, ids[0]),
        scores=scores,
        target=target,
        target_label=str(tokenizer.convert_ids_to_tokens(target)),
        output=logits,
        baseline_token_id=base,
    )


def text_classification_attribution(
    model: nn.Module,
    tokenizer: Any,
    text: str,
    target: Optional[int] = None,
    *,
    baseline_token: Union[None, int, str] = None,
    strict: bool = False,
    config: Optional[GIMConfig] = None,
    **settings: Any,
) -> TextAttribution:
    r"""GIM attribution of a sequence classifier's class logit to the text's tokens.

    :class:`~captum_gim.LayerGIM` at ``model.get_input_embeddings()``, the target being
    the raw logit of ``target`` (default: the predicted class), the baseline
    ``recommended_baseline_token(tokenizer, "encoder", baseline_token)`` at every
    position (special tokens included, as in the causal-LM setting).

    Args:
        model (nn.Module): a Hugging Face ``...ForSequenceClassification``.
        tokenizer: its tokenizer.
        text (str): the text.
        target (int, optional): the class; None: the predicted class.
        baseline_token, strict, config, \*\*settings: as in :func:`next_token_attribution`.

    Returns:
        TextAttribution: tokens, scores, the class (label from ``config.id2label``) and
        the logits.

    Examples::

        >>> res = text_classification_attribution(clf, tokenizer, "a fine film")  # doctest: +SKIP
        >>> res.visualize()                                                     # doctest: +SKIP
    """
    cfg = make_config(config, **settings)
    enc = tokenizer(text, return_tensors="pt")
    ids = enc["input_ids"]
    mask = enc.get("attention_mask")

    def forward(x: Tensor, attention_mask: Optional[Tensor]) -> Tensor:
        return model(input_ids=x, attention_mask=attention_mask).logits

    with torch.no_grad():
        logits = forward(ids, mask)[0]
    cls = int(logits.argmax()) if target is None else int(target)
    base = recommended_baseline_token(tokenizer, "encoder", baseline_token)
    method = LayerGIM(forward, model.get_input_embeddings(), model=model, config=cfg, strict=strict)
    attr = method.attribute(
        ids, baselines=base, target=cls, additional_forward_args=(mask,)
    )
    assert isinstance(attr, Tensor)
    labels = getattr(getattr(model, "config", None), "id2label", None) or {}
    return TextAttribution(
        tokens=_tokens(tokenizer, ids[0]),
        scores=attr.detach()[0].sum(-1),
        target=cls,
        target_label=str(labels.get(cls, cls)),
        output=logits,
        baseline_token_id=base,
    )
