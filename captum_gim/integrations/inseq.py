r"""GIM as an `inseq <https://github.com/inseq-team/inseq>`__ attribution method.

Importing this module registers the method ``"gim"`` with inseq::

    import inseq
    import captum_gim.integrations.inseq  # noqa: F401  (registers "gim")

    model = inseq.load_model(hf_model, "gim", tokenizer=tokenizer)
    out = model.attribute("the cat sat on the", generation_args={"max_new_tokens": 3})
    out.show()

Every generated step is attributed (decoder-only and encoder-decoder models alike), with
inseq's own output objects. At each step the attributed output is inseq's step target
(by default the probability of the generated token; ``attributed_fn="logit"`` gives the
paper's raw logit) and the attribution is taken at the input embeddings:
``GIM-grad * embedding`` per token and hidden unit (Captum's ``InputXGradient``
convention, a zero baseline), which is what :class:`~captum_gim.LayerGIM` on
``model.get_input_embeddings()`` gives with ``baselines=None``. Like inseq's other
gradient methods the scores are granular (``token x step x hidden`` in each
``out.sequence_attributions[i].source_attributions`` / ``target_attributions``); inseq's
default view (``.show()``) aggregates the hidden units with the L2 norm, and summing
them over the last dimension gives the paper's signed per-token score.

GIM's settings go to ``load_model``: ``inseq.load_model(m, "gim", temperature=1.5)``
(also ``freeze_norms``, ``divide_grads``, ``keep_norm_mean``).
"""

from __future__ import annotations

from typing import Any

from ..attr import GIMAttribution

try:
    from inseq.attr.feat.gradient_attribution import GradientAttributionRegistry
except ImportError as e:  # pragma: no cover - exercised without the extra
    raise ImportError(
        "captum_gim.integrations.inseq needs inseq: pip install 'captum-gim[inseq]' "
        "(inseq 0.7.1 runs on CPU with --no-deps plus rich, jaxtyping, typeguard<=2.13.3, "
        "treescope, protobuf and sentencepiece; see the inseq page of the docs)"
    ) from e

__all__ = ["GIMInseqAttribution"]


class GIMInseqAttribution(GradientAttributionRegistry):
    r"""inseq's ``"gim"`` method: :class:`~captum_gim.GIMAttribution` at the input
    embeddings of every generation step, inside GIM's scope on the Hugging Face model.

    Args:
        attribution_model: the inseq model (built by ``inseq.load_model``).
        temperature, freeze_norms, divide_grads, keep_norm_mean: GIM's settings, as in
            :class:`~captum_gim.GIMAttribution`.
    """

    method_name = "gim"

    def __init__(
        self,
        attribution_model: Any,
        temperature: float = 2.0,
        freeze_norms: bool = True,
        divide_grads: bool = True,
        keep_norm_mean: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(attribution_model)
        self.method = GIMAttribution(
            self.attribution_model,
            model=attribution_model.model,
            temperature=temperature,
            freeze_norms=freeze_norms,
            divide_grads=divide_grads,
            keep_norm_mean=keep_norm_mean,
        )
