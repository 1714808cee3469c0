r"""What GIM's Hugging Face rules support: the support matrix and its table."""

from __future__ import annotations

from typing import Dict, Tuple

__all__ = [
    "GIM_ATTENTION_PREFIX",
    "SUPPORTED_ATTENTION_IMPLEMENTATIONS",
    "SUPPORT_MATRIX",
    "support_table",
    "GIMAttentionMismatchWarning",
    "LEGACY_ATTENTION_CLASSES",
]

#: Prefix of the keys registered with ``AttentionInterface``.
GIM_ATTENTION_PREFIX = "captum_gim_"
#: Attention implementations whose semantics the GIM attention function reproduces.
SUPPORTED_ATTENTION_IMPLEMENTATIONS: Tuple[str, ...] = ("eager", "sdpa")


class GIMAttentionMismatchWarning(UserWarning):
    """The explicit attention GIM recomputes does not reproduce the model's attention output."""


#: transformers 4.x attention classes that compute attention themselves (no
#: ``AttentionInterface``) and that GIM's functional layer covers: their explicit
#: ``softmax(q k^T)`` or ``F.scaled_dot_product_attention`` gets GIM's backward, and strict
#: mode raises at run time if an attention softmax was not recognised. Each is tested on
#: transformers 4.53 and 4.57 (``make test-matrix``); transformers 5 moved these families
#: to ``AttentionInterface``. Other 4.x classes without the interface stay unsupported.
LEGACY_ATTENTION_CLASSES = frozenset(
    {
        "BertSelfAttention",
        "BertSdpaSelfAttention",
        "RobertaSelfAttention",
        "RobertaSdpaSelfAttention",
        "Qwen2MoeAttention",
        "Qwen2MoeSdpaAttention",
    }
)


_OK = "supported"
_DTYPES = ("float32", "bfloat16", "float16")


def _row(**impls: str) -> Dict[str, Dict[str, str]]:
    return {impl: {dt: status for dt in _DTYPES} for impl, status in impls.items()}


_FLASH = (
    "unsupported: flash-attention kernels read the implementation name from the config; "
    "load the model with attn_implementation='sdpa' (or 'eager') for attributions"
)
_FLEX = "unsupported: flex_attention's BlockMask is not materialised; use 'sdpa' or 'eager'"

#: family -> attention implementation -> dtype -> status; anything not "supported" says
#: why not. Tests on tiny random models cover every "supported" float32 entry
#: (``tests/test_hf_families.py``) but only some half-precision ones: those of
#: ``tests/test_hf_dtypes.py`` (mostly sdpa; eager for Llama and Gemma2).
SUPPORT_MATRIX: Dict[str, Dict[str, Dict[str, str]]] = {
    "llama": _row(eager=_OK, sdpa=_OK, flash_attention_2=_FLASH, flex_attention=_FLEX),
    "mistral": _row(eager=_OK, sdpa=_OK, flash_attention_2=_FLASH, flex_attention=_FLEX),
    "qwen2": _row(eager=_OK, sdpa=_OK, flash_attention_2=_FLASH, flex_attention=_FLEX),
    "qwen3": _row(eager=_OK, sdpa=_OK, flash_attention_2=_FLASH, flex_attention=_FLEX),
    "gemma": _row(eager=_OK, sdpa=_OK, flash_attention_2=_FLASH, flex_attention=_FLEX),
    "gemma2": _row(
        eager=_OK,
        sdpa="unsupported by transformers: SDPA has no attention-logit soft-capping "
        "(Gemma2 declares _supports_sdpa = False); use 'eager'",
        flash_attention_2=_FLASH,
        flex_attention=_FLEX,
    ),
    "phi3": _row(eager=_OK, sdpa=_OK, flash_attention_2=_FLASH, flex_attention=_FLEX),
    "gpt2": _row(eager=_OK, sdpa=_OK, flash_attention_2=_FLASH),
    "bert": _row(eager=_OK, sdpa=_OK, flash_attention_2=_FLASH, flex_attention=_FLEX),
    "roberta": _row(eager=_OK, sdpa=_OK, flash_attention_2=_FLASH, flex_attention=_FLEX),
    "vit": _row(eager=_OK, sdpa=_OK, flash_attention_2=_FLASH, flex_attention=_FLEX),
    "mixtral": _row(eager=_OK, sdpa=_OK, flash_attention_2=_FLASH, flex_attention=_FLEX),
    "qwen2_moe": _row(eager=_OK, sdpa=_OK, flash_attention_2=_FLASH, flex_attention=_FLEX),
    "gpt_oss": _row(
        eager="unsupported: attention sinks (s_aux) are not modelled by GIM's attention",
        sdpa="unsupported: attention sinks (s_aux) are not modelled by GIM's attention",
    ),
}


def support_table(fmt: str = "markdown") -> str:
    r"""The support matrix as a table (one row per family and implementation).

    Args:
        fmt (str): ``"markdown"`` (default) or ``"rst"`` (a list-table body).

    Returns:
        str: the table.
    """
    header = ["family", "attention", *_DTYPES]
    rows = [
        [family, impl, *(dts.get(dt, "untested") for dt in _DTYPES)]
        for family, impls in SUPPORT_MATRIX.items()
        for impl, dts in impls.items()
    ]
    if fmt == "markdown":
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    if fmt == "rst":
        out = []
        for r in [header, *rows]:
            out.append("   * - " + r[0])
            out.extend("     - " + c for c in r[1:])
        return "\n".join(out)
    raise ValueError(f"fmt must be 'markdown' or 'rst', got {fmt!r}")
