r"""GIM rules for Hugging Face ``transformers`` models.

Registered lazily by :func:`captum_gim.rules.ensure_ecosystem_rules` once ``transformers``
has been imported. Four rules:

- ``transformers.attention`` (every ``PreTrainedModel``): the attention softmax. It uses the
  library's own extension points: at import, this module registers the attention
  functions ``"captum_gim_eager"`` and ``"captum_gim_sdpa"`` with ``AttentionInterface``
  (and the matching mask functions with ``AttentionMaskInterface``, so the model builds
  exactly the masks of the implementation it was loaded with). Inside a
  :func:`~captum_gim.gim_backward` scope, the model's configs are switched from
  ``"eager"``/``"sdpa"`` to the GIM key, and restored exactly afterwards (also after an
  error). The GIM attention function calls the *original* implementation, so forward
  values are bit-for-bit those of the plain model, and attaches GIM's backward pass as a
  custom autograd function (the original's own backward never runs): the attention
  probabilities are recomputed explicitly from ``q``, ``k``, ``v`` and the mask (scaling,
  soft-capping, sliding windows, padding, grouped-query heads, exactly as the original
  implementation), the softmax's vector-Jacobian product is evaluated at temperature ``T``
  (TSG), and the gradients reaching ``q``, ``k`` and ``v`` are multiplied by 1/4, 1/4 and
  1/2. The recomputation runs in float32 for half-precision models, in chunks of heads and
  blocks of query rows (bounded memory; masked key blocks are skipped), and is checked
  once per scope against the original output (:class:`GIMAttentionMismatchWarning`).
  With attention dropout (training mode) the output is the explicit attention's own
  draw. Attention modules of other models (even ones sharing the same
  config object) keep their plain gradient: the function only modifies modules that
  belong to a model inside a scope. ``use_cache`` is switched off in the scope.
- ``transformers.norm``: every RMSNorm/LayerNorm-like class of ``transformers``
  (``LlamaRMSNorm``, ``GemmaRMSNorm`` with its ``1 + weight``, Qwen3's ``q_norm`` /
  ``k_norm``, Gemma2's post-norms, ``T5LayerNorm``...), found by what the class is and
  computes rather than by ``isinstance``. Its own forward runs under a
  :class:`~torch.overrides.TorchFunctionMode` that detaches ``rsqrt`` / ``sqrt`` / ``std``
  (and ``x ** ±0.5``) and turns ``F.rms_norm`` / ``F.layer_norm`` into their frozen
  versions, so ``1/rms`` (or the standard deviation) is a constant in the backward pass and
  the forward value does not change. ``torch.nn.LayerNorm`` (GPT-2, BERT, ViT...) is
  handled by :mod:`captum_gim.rules.torch_nn`.
- ``transformers.gated_mlp``: MLPs with separate ``gate_proj`` / ``up_proj`` (SwiGLU,
  GeGLU) or a fused ``gate_up_proj`` (Phi-3): the gradients reaching both branches are
  multiplied by 1/2.
- ``transformers.experts``: mixture-of-experts blocks whose experts are fused parameter
  tensors (``gate_up_proj`` of shape ``(experts, 2 * intermediate, hidden)``, the
  ``@use_experts_implementation`` classes of transformers 5: Mixtral, Qwen2-MoE, ...),
  under every experts implementation (``eager``, ``batched_mm``, ``grouped_mm``). The
  router softmax and the routing-weight product keep their true gradient.

Scopes nest, overlap and run in several threads at once: each module is patched once
however many scopes use it (reference-counted, undone when the last leaves), and what the
patch computes is read at call time from the innermost scope open on the model in the
calling context (:mod:`captum_gim._context`); elsewhere the model runs as it always does.

The package: :mod:`.support` (the support matrix), :mod:`.detect` (which modules are what),
:mod:`.attention` (the attention functions and the config switch), :mod:`.norms`,
:mod:`.mlp`, :mod:`.experts`.

What cannot be supported is listed in :data:`SUPPORT_MATRIX` (``family -> attention
implementation -> dtype -> status``; :func:`support_table` renders it) and strict mode
names the reason for every attention module it cannot handle.
"""

from __future__ import annotations

from typing import Tuple

from ..._compat import transformers_problem

if transformers_problem() is not None:  # older than the tested floor: refuse, with the reason
    raise ImportError(transformers_problem())

from transformers import PreTrainedModel

from ...registry import Rule
from . import attention, detect, experts, legacy, mlp, norms, support
from .attention import (
    _ATTENTION_FUNCTIONS,
    _explicit_attention,
    _original_attention,
    _prepare,
    install_model,
    model_configs,
)
from .detect import _covers, _explain, attention_support, is_fused_experts, is_gated_mlp, is_hf_norm
from .experts import install_experts
from .legacy import install_legacy_attention, is_legacy_attention
from .mlp import install_gated_mlp
from .norms import install_norm
from .support import (
    GIM_ATTENTION_PREFIX,
    SUPPORT_MATRIX,
    SUPPORTED_ATTENTION_IMPLEMENTATIONS,
    GIMAttentionMismatchWarning,
    support_table,
)
from ...ops.attention import AttentionSemantics as _Semantics
from ...ops.attention import gim_attention_grads as _gim_attention_grads

_model_configs = model_configs

__all__ = [
    "RULES",
    "GIM_ATTENTION_PREFIX",
    "SUPPORTED_ATTENTION_IMPLEMENTATIONS",
    "SUPPORT_MATRIX",
    "support_table",
    "attention_support",
    "GIMAttentionMismatchWarning",
    "model_rule",
    "norm_rule",
    "gated_mlp_rule",
    "experts_rule",
    "legacy_attention_rule",
]



model_rule = Rule(
    "transformers.attention",
    install_model,
    kind="model",
    types=(PreTrainedModel,),
    covers=_covers,
    explain=_explain,
    note=(
        "attention softmaxes get TSG and q/k/v division through transformers' "
        "AttentionInterface (eager and sdpa); MoE router softmaxes are left alone; "
        "use_cache is off in the scope"
    ),
)

norm_rule = Rule("transformers.norm", install_norm, kind="norm", predicate=is_hf_norm)

gated_mlp_rule = Rule(
    "transformers.gated_mlp", install_gated_mlp, kind="gated_mlp", predicate=is_gated_mlp
)

experts_rule = Rule(
    "transformers.experts",
    install_experts,
    kind="gated_mlp",
    predicate=is_fused_experts,
    note="experts' gate and up branches x1/2; routing weights keep their true gradient",
)

legacy_attention_rule = Rule(
    "transformers.legacy_attention",
    install_legacy_attention,
    kind="attention",
    predicate=is_legacy_attention,
    note=(
        "transformers 4.x attention classes without AttentionInterface (BERT, RoBERTa, "
        "Qwen2-MoE): GIM's functional layer on the module"
    ),
)

RULES: Tuple[Rule, ...] = (experts_rule, gated_mlp_rule, norm_rule, legacy_attention_rule, model_rule)
