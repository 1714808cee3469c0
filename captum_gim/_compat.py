r"""Which versions of torch, Captum and transformers captum_gim runs on, and what it relies on.

The one place that compares versions, and the one list of the private names of
``transformers`` and Captum that the code uses:

- :func:`version_of` / :func:`at_least`: the installed version of a package, read without
  importing it (``importlib.metadata``) unless it is imported already.
- :data:`FLOORS`: the oldest versions ``make test-matrix`` runs and passes; ``setup.cfg``
  declares exactly these (``tests/test_hf_compat.py`` checks that the two agree).
- :func:`transformers_problem`: why the installed ``transformers`` cannot be used by GIM's
  Hugging Face rules (older than the floor), or None.
- :func:`legacy_hf_attention`: whether ``transformers`` is a 4.x release, in which some
  families (BERT, RoBERTa, Qwen2-MoE...) still compute attention in their own module
  instead of through ``AttentionInterface``; GIM's functional layer covers those.
- :data:`PRIVATE_NAMES`: every name of ``transformers`` or Captum that is not public API and
  that captum_gim relies on, where, and the versions it was checked on.
  ``tests/test_hf_compat.py`` resolves each one against the installed versions (a renamed
  one fails a test in the matrix cell with that version) and checks, by reading the
  source, that every private name the package uses is listed here.

Importing this module imports neither ``transformers`` nor Captum.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from typing import NamedTuple, Optional, Tuple

__all__ = [
    "FLOORS",
    "CHECKED_ON",
    "PRIVATE_NAMES",
    "PrivateName",
    "version_of",
    "version_tuple",
    "at_least",
    "transformers_problem",
    "legacy_hf_attention",
]

#: The oldest version of each dependency that ``make test-matrix`` runs and passes (its
#: floor cells install ``setup.cfg``'s requirements with ``uv pip install --resolution
#: lowest-direct``, which picks exactly these). ``setup.cfg`` declares the same floors;
#: on Python >= 3.13 torch's is 2.6 (2.5's torch.compile does not run there) and Captum's
#: 0.9 (Captum 0.8 pins numpy < 2, which has no 3.13 wheels).
FLOORS = {
    "torch": "2.5",
    "captum": "0.8",
    "tqdm": "4.60",
    "matplotlib": "3.9.2",
    "transformers": "4.53",
    "tokenizers": "0.21",
    "pyhealth": "2.1",
}

#: The releases the names in :data:`PRIVATE_NAMES` were checked on (the test matrix's cells).
CHECKED_ON = {
    "transformers": ("4.53.0", "4.57.6", "5.0.0", "5.20.2", "5.23.0"),
    "captum": ("0.8.0", "0.9.0"),
    "torch": ("2.5.0", "2.6.0", "2.14.1"),
}


def version_tuple(text: str) -> Tuple[int, ...]:
    """``"4.57.6"`` -> ``(4, 57, 6)``; pre-release and local tails are dropped."""
    out = []
    for part in str(text).split("."):
        m = re.match(r"\d+", part)
        if m is None:
            break
        out.append(int(m.group()))
        if m.end() != len(part):  # "0rc1", "1+cu121": the number, then stop
            break
    return tuple(out)


def version_of(package: str) -> Optional[Tuple[int, ...]]:
    """The installed version of ``package`` as a tuple, or None when it is not installed."""
    mod = sys.modules.get(package)
    text = getattr(mod, "__version__", None) if mod is not None else None
    if text is None:
        try:
            text = metadata.version(package)
        except metadata.PackageNotFoundError:
            return None
    return version_tuple(text)


def at_least(package: str, version: str) -> bool:
    """``package`` is installed at ``version`` or newer."""
    have = version_of(package)
    return have is not None and have >= version_tuple(version)


def transformers_problem() -> Optional[str]:
    """Why the installed ``transformers`` cannot be used by GIM's rules, or None."""
    have = version_of("transformers")
    if have is None or have >= version_tuple(FLOORS["transformers"]):
        return None
    return (
        f"transformers {'.'.join(map(str, have))} is older than {FLOORS['transformers']}, "
        "the oldest release GIM's Hugging Face rules are tested with (they register attention "
        "and mask functions with AttentionInterface and AttentionMaskInterface, which "
        f"appeared in 4.53); upgrade: pip install 'transformers>={FLOORS['transformers']}'"
    )


def legacy_hf_attention() -> bool:
    """transformers 4.x: some families compute attention without ``AttentionInterface``.

    BERT, RoBERTa and Qwen2-MoE (among others) still have their own attention classes
    there (``BertSdpaSelfAttention``...): explicit ``softmax(q k^T)`` or
    ``F.scaled_dot_product_attention`` inside the module. GIM's functional layer gives
    those GIM attention (and checks at run time, in strict mode, that it recognised every
    attention softmax); transformers 5 moved them to ``AttentionInterface``.
    """
    have = version_of("transformers")
    return have is not None and have < (5,)


class PrivateName(NamedTuple):
    """A non-public name of ``transformers``, Captum or torch that captum_gim relies on.

    ``path`` is a Python expression that ``tests/test_hf_compat.py`` evaluates after
    importing the longest importable module prefix of it (``"transformers.LlamaConfig()
    ._attn_implementation"`` builds a config and reads the attribute). When ``path`` does
    not end with ``name`` (an attribute set inside a function), ``name`` must appear in the
    source of what it evaluates to. ``since`` / ``until``: it is expected in the releases
    ``since <= version < until`` (empty: no bound).
    """

    package: str
    name: str
    path: str
    used_in: str
    why: str
    since: str = ""
    until: str = ""


PRIVATE_NAMES: Tuple[PrivateName, ...] = (
    # --- transformers -----------------------------------------------------------------
    PrivateName(
        "transformers", "_attn_implementation",
        "transformers.LlamaConfig()._attn_implementation",
        "rules/transformers/attention.py, detect.py; scope.py; evaluation/tasks/hf*.py",
        "the attention implementation a config selects (read; no public getter)",
    ),
    PrivateName(
        "transformers", "_attn_implementation_internal",
        "transformers.LlamaConfig()._attn_implementation_internal",
        "rules/transformers/attention.py (_set_impl)",
        "set directly: the public setter also rewrites every sub-config",
    ),
    PrivateName(
        "transformers", "sub_configs",
        "transformers.LlamaConfig.sub_configs",
        "rules/transformers/attention.py (model_configs)",
        "the nested configs a model's modules read",
    ),
    PrivateName(
        "transformers", "ALL_ATTENTION_FUNCTIONS",
        "transformers.modeling_utils.ALL_ATTENTION_FUNCTIONS",
        "rules/transformers/attention.py, detect.py",
        "the global attention registry, and the name modeling files use for it (their "
        "forward's source naming it is how attention that dispatches through it is found)",
    ),
    PrivateName(
        "transformers", "ALL_MASK_ATTENTION_FUNCTIONS",
        "transformers.masking_utils.ALL_MASK_ATTENTION_FUNCTIONS",
        "rules/transformers/attention.py (_register_interfaces)",
        "the mask function registered for 'eager' / 'sdpa', registered again for GIM's keys",
    ),
    PrivateName(
        "transformers", "eager_attention_forward",
        "transformers.models.llama.modeling_llama.eager_attention_forward",
        "rules/transformers/detect.py (_eager_function)",
        "the module-level eager attention function of each modeling file",
    ),
    PrivateName(
        "transformers", "_upcast_and_reordered_attn",
        "transformers.models.gpt2.modeling_gpt2.GPT2Attention._upcast_and_reordered_attn",
        "rules/transformers/attention.py (GPT-2's reorder_and_upcast_attn path)",
        "GPT-2's own eager path behind config.reorder_and_upcast_attn",
    ),
    PrivateName(
        "transformers", "scale_attn_weights",
        "transformers.GPT2Config().scale_attn_weights",
        "rules/transformers/attention.py (_implicit_scaling)",
        "GPT-2 before transformers 5.4 has no module.scaling: its eager function reads "
        "scale_attn_weights and scale_attn_by_inverse_layer_idx from the module",
    ),
    PrivateName(
        "transformers", "_experts_implementation",
        "transformers.MixtralConfig()._experts_implementation",
        "rules/transformers/experts.py",
        "which experts implementation a fused-experts block uses (transformers 5)",
        since="5.0.0",
    ),
    PrivateName(
        "transformers", "_apply_gate",
        "transformers.models.mixtral.modeling_mixtral.MixtralExperts._apply_gate",
        "rules/transformers/experts.py",
        "where batched_mm / grouped_mm experts combine the gate and up branches (5.x; "
        "absent before 5.x: the eager loop is handled without it)",
        since="5.0.0",
    ),
    PrivateName(
        "transformers", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
        "transformers.models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
        "evaluation/tasks/hf_causal.py",
        "which config classes have a causal-LM head",
    ),
    PrivateName(
        "transformers", "scale_attn_by_inverse_layer_idx",
        "transformers.GPT2Config().scale_attn_by_inverse_layer_idx",
        "rules/transformers/attention.py (_gpt2_scaling)", "see scale_attn_weights",
    ),
    PrivateName(
        "transformers", "reorder_and_upcast_attn",
        "transformers.GPT2Config().reorder_and_upcast_attn",
        "rules/transformers/attention.py (_uses_upcast_reordered)",
        "GPT-2's switch for its own eager path",
    ),
    PrivateName(
        "transformers", "BertSdpaSelfAttention",
        "transformers.models.bert.modeling_bert.BertSdpaSelfAttention",
        "rules/transformers/support.py (LEGACY_ATTENTION_CLASSES)",
        "transformers 4.x attention classes the legacy rule matches by name (also "
        "BertSelfAttention, RobertaSelfAttention, RobertaSdpaSelfAttention, "
        "Qwen2MoeAttention, Qwen2MoeSdpaAttention); gone in 5.x, where the rule matches "
        "nothing",
        until="5.0.0",
    ),
    # --- Captum ---------------------------------------------------------------------------
    PrivateName(
        "captum", "_format_additional_forward_args",
        "captum._utils.common._format_additional_forward_args",
        "attr/layer_gim.py, attr/gim.py", "Captum's own argument normalisation",
    ),
    PrivateName(
        "captum", "_format_output", "captum._utils.common._format_output",
        "attr/layer_gim.py, attr/gim.py", "Captum's own output shaping",
    ),
    PrivateName(
        "captum", "_format_tensor_into_tuples", "captum._utils.common._format_tensor_into_tuples",
        "attr/gim.py", "Captum's own input normalisation",
    ),
    PrivateName(
        "captum", "_is_tuple", "captum._utils.common._is_tuple",
        "attr/gim.py", "Captum's own input normalisation",
    ),
    PrivateName(
        "captum", "_forward_layer_eval", "captum._utils.gradient._forward_layer_eval",
        "attr/layer_gim.py", "a layer's activations, as LayerGradientXActivation gets them",
    ),
    PrivateName(
        "captum", "compute_layer_gradients_and_eval",
        "captum._utils.gradient.compute_layer_gradients_and_eval",
        "attr/layer_gim.py", "a layer's gradients, as LayerGradientXActivation gets them",
    ),
    PrivateName(
        "captum", "TargetType", "captum._utils.typing.TargetType", "attr/*.py", "a type alias",
    ),
    PrivateName(
        "captum", "BaselineType", "captum._utils.typing.BaselineType", "attr/*.py", "a type alias",
    ),
    PrivateName(
        "captum", "ModuleOrModuleList", "captum._utils.typing.ModuleOrModuleList",
        "attr/layer_gim.py", "a type alias",
    ),
    PrivateName(
        "captum", "TensorOrTupleOfTensorsGeneric",
        "captum._utils.typing.TensorOrTupleOfTensorsGeneric", "attr/gim.py", "a type alias",
    ),
    PrivateName(
        "captum", "_format_input_baseline", "captum.attr._utils.common._format_input_baseline",
        "attr/gim.py", "Captum's own input and baseline normalisation",
    ),
    PrivateName(
        "captum", "_validate_input", "captum.attr._utils.common._validate_input",
        "attr/gim.py", "Captum's own input validation",
    ),
    PrivateName(
        "captum", "_tensorize_baseline", "captum.attr._utils.common._tensorize_baseline",
        "attr/layer_gim.py", "Captum's own baseline normalisation",
    ),
    PrivateName(
        "captum", "_get_color", "captum.attr._utils.visualization._get_color",
        "viz.py", "Captum's colours for text attributions",
    ),
    PrivateName(
        "captum", "format_special_tokens", "captum.attr._utils.visualization.format_special_tokens",
        "viz.py", "Captum's special-token formatting",
    ),
    PrivateName(
        "captum", "format_classname", "captum.attr._utils.visualization.format_classname",
        "viz.py", "Captum's class-name cells",
    ),
    PrivateName(
        "captum", "_initialize_cmap_and_vmin_vmax",
        "captum.attr._utils.visualization._initialize_cmap_and_vmin_vmax",
        "viz.py", "Captum's colour maps for time series",
    ),
    PrivateName(
        "captum", "_normalize_attr", "captum.attr._utils.visualization._normalize_attr",
        "viz.py", "Captum's attribution normalisation for plots",
    ),
    # --- torch (and accelerate) ----------------------------------------------------------
    PrivateName(
        "torch", "_call_impl", "torch.nn.Module._call_impl", "rules/functional.py",
        "recognising a module's own call frame",
    ),
    PrivateName(
        "torch", "_push_on_torch_function_stack", "torch._C._push_on_torch_function_stack",
        "rules/functional.py", "re-entering the TorchFunctionMode stack",
    ),
    PrivateName(
        "torch", "_pop_torch_function_stack", "torch._C._pop_torch_function_stack",
        "rules/functional.py", "leaving the TorchFunctionMode stack",
    ),
    PrivateName(
        "torch", "_C", "torch._C", "rules/functional.py", "torch's C extension (the two above)",
    ),
    PrivateName(
        "torch", "_get_current_function_mode_stack",
        "torch.overrides._get_current_function_mode_stack", "rules/functional.py",
        "the TorchFunctionMode stack in force",
    ),
    PrivateName(
        "torch", "_get_softmax_dim", "torch.nn.functional._get_softmax_dim",
        "rules/functional.py", "softmax's implicit dim, as F.softmax picks it",
    ),
    PrivateName(
        "torch", "_orig_mod", "torch._dynamo.eval_frame.OptimizedModule.__init__",
        "rules/functional.py", "the module a torch.compile wrapper holds (compiled models are refused)",
    ),
    PrivateName(
        "torch", "_qkv_same_embed_dim", "torch.nn.MultiheadAttention(4, 2)._qkv_same_embed_dim",
        "rules/torch_nn.py", "nn.MultiheadAttention's packed-projection flag",
    ),
    PrivateName(
        "torch", "_canonical_mask", "torch.nn.functional._canonical_mask",
        "rules/torch_nn.py", "F.multi_head_attention_forward's own mask handling",
    ),
    PrivateName(
        "torch", "_mha_shape_check", "torch.nn.functional._mha_shape_check",
        "rules/torch_nn.py", "F.multi_head_attention_forward's own shape check",
    ),
    PrivateName(
        "torch", "_in_projection_packed", "torch.nn.functional._in_projection_packed",
        "rules/torch_nn.py", "F.multi_head_attention_forward's own projections",
    ),
    PrivateName(
        "torch", "_in_projection", "torch.nn.functional._in_projection",
        "rules/torch_nn.py", "F.multi_head_attention_forward's own projections",
    ),
    PrivateName(
        "torch", "_none_or_dtype", "torch.nn.functional._none_or_dtype",
        "rules/torch_nn.py", "F.multi_head_attention_forward's own dtype check",
    ),
    PrivateName(
        "accelerate", "_hf_hook", "accelerate.hooks.add_hook_to_module",
        "_patching.py", "the hook accelerate's device_map dispatch puts on a module",
    ),
)
