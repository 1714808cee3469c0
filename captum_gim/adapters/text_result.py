r"""Per-token attributions of a text model, with the renderings Captum offers.

:class:`TextAttribution` holds the tokens, their scores, the target and the model output
of one text; it renders through Captum's ``visualize_text`` (HTML, needs IPython) and
``LLMAttributionResult`` plots (matplotlib), and converts to a pandas ``DataFrame``.
:func:`recommended_baseline_token` is the one baseline token per model kind that the
helpers, the CLI and the docs use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional, Union

from torch import Tensor

__all__ = ["TextAttribution", "recommended_baseline_token", "MODEL_KINDS"]

#: The model kinds :func:`recommended_baseline_token` knows.
MODEL_KINDS = ("causal-lm", "encoder")


def recommended_baseline_token(
    tokenizer: Any, model_kind: str, baseline_token: Optional[Union[int, str]] = None
) -> int:
    r"""The baseline token id for GIM at the embeddings: one token at every position.

    - ``"causal-lm"`` (``...ForCausalLM``): the pad token, else EOS, else the token named
      with ``baseline_token`` (the paper's setting; a causal LM's pad/EOS token carries
      no content of the prompt).
    - ``"encoder"`` (BERT-style encoders and sequence classifiers): ``[PAD]``, else
      ``[MASK]``. ``[PAD]`` is chosen over ``[MASK]`` because a fine-tuned classifier saw
      ``[PAD]`` at every padded position of every batch (its embedding is what "no token"
      looks like to the model), while ``[MASK]`` is a token the MLM head was trained to
      fill in with content, and fine-tuning never shows it; Captum's BERT tutorials use
      ``[PAD]`` as the reference token for the same reason.

    ``baseline_token`` (an id, or a token string), when given, wins over both.

    Args:
        tokenizer: a Hugging Face tokenizer (``pad_token_id``, ``eos_token_id``,
            ``mask_token_id``, ``convert_tokens_to_ids``).
        model_kind (str): ``"causal-lm"`` or ``"encoder"``.
        baseline_token (int or str, optional): a user-named baseline token.

    Returns:
        int: the token id.

    Examples::

        >>> recommended_baseline_token(tokenizer, "causal-lm")  # doctest: +SKIP
        0
    """
    if model_kind not in MODEL_KINDS:
        raise ValueError(f"model_kind must be one of {MODEL_KINDS}, got {model_kind!r}")
    if baseline_token is not None:
        if isinstance(baseline_token, str):
            tid = tokenizer.convert_tokens_to_ids(baseline_token)
            unk = getattr(tokenizer, "unk_token_id", None)
            if not isinstance(tid, int) or (tid == unk and baseline_token != tokenizer.unk_token):
                raise ValueError(f"the tokenizer has no token {baseline_token!r}")
            return int(tid)
        return int(baseline_token)
    names = ("pad_token_id", "eos_token_id") if model_kind == "causal-lm" else (
        "pad_token_id", "mask_token_id")
    for name in names:
        value = getattr(tokenizer, name, None)
        if isinstance(value, int) and value >= 0:
            return value
    raise ValueError(
        f"the tokenizer has no {' or '.join(n[:-3] for n in names)} token to use as the "
        "baseline; name one: baseline_token=<token id or string>"
    )


@dataclass
class TextAttribution:
    r"""One text's per-token attributions.

    Attributes:
        tokens (list of str): the input tokens, in order.
        scores (Tensor): ``(len(tokens),)``, one score per token (GIM-gradient x
            (embedding - baseline embedding), summed over the hidden size).
        target (int): the attributed output index (class, or answer token id).
        target_label (str): a readable name of the target (class label or token).
        output (Tensor): the model's output the target was taken from (logits).
        baseline_token_id (int): the baseline token used at every position.
    """

    tokens: List[str]
    scores: Tensor
    target: int
    target_label: str
    output: Tensor
    baseline_token_id: int
    extra: dict = field(default_factory=dict)

    def to_dataframe(self) -> Any:
        r"""A pandas ``DataFrame``: ``position``, ``token``, ``score`` (needs pandas)."""
        import pandas as pd

        return pd.DataFrame(
            {
                "position": range(len(self.tokens)),
                "token": list(self.tokens),
                "score": self.scores.detach().cpu().double().numpy(),
            }
        )

    def visualization_record(self, true_class: Optional[Union[int, str]] = None) -> Any:
        r"""Captum's ``VisualizationDataRecord`` for this text (scores normalised by their
        largest absolute value, as Captum's tutorials do)."""
        from captum.attr import visualization as viz

        VisualizationDataRecord = viz.VisualizationDataRecord

        s = self.scores.detach().cpu().double()
        norm = float(s.abs().max()) or 1.0
        probs = self.output.detach().float().softmax(-1)
        return VisualizationDataRecord(
            s / norm,
            float(probs[self.target]),
            self.target_label,
            self.target_label if true_class is None else true_class,
            self.target_label,
            float(s.sum()),
            list(self.tokens),
            0.0,
        )

    def visualize(self) -> Any:
        r"""Captum's ``visualize_text`` HTML (returns the ``IPython.display.HTML``)."""
        try:
            import IPython  # noqa: F401
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(
                "Captum's visualize_text needs IPython: pip install ipython (or use "
                ".plot() / .to_dataframe(), which do not)"
            ) from e
        from captum.attr import visualization as viz

        return viz.visualize_text([self.visualization_record()])

    def to_llm_result(self) -> Any:
        r"""Captum's ``LLMAttributionResult`` (one output token: the target)."""
        from captum.attr import LLMAttributionResult

        s = self.scores.detach().cpu()
        return LLMAttributionResult(
            input_tokens=list(self.tokens),
            output_tokens=[self.target_label],
            seq_attr=s,
            token_attr=s.unsqueeze(0),
        )

    def plot(self, show: bool = False) -> Any:
        r"""``LLMAttributionResult.plot_token_attr``: returns ``(figure, axes)``."""
        return self.to_llm_result().plot_token_attr(show=show)
