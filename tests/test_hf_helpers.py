"""Tiny Hugging Face models and textbook GIM references shared by ``tests/test_hf_*.py``.

Every model is built from a config with seeded random weights (no hub). Weights are
re-drawn with a larger spread than transformers' 0.02 initialisation so that every GIM rule
changes the result measurably (``test_hf_reference`` checks this for each rule alone).

The reference pieces here are written from the formulas in GIM_SPEC.md with plain
autograd ("straight-through" expressions whose forward is the ordinary op and whose
gradient is GIM's); they do not use ``captum_gim``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import pytest
import torch
from torch import Tensor, nn

transformers = pytest.importorskip("transformers")

VOCAB = 64
SEQ = 7

# --- textbook GIM pieces ------------------------------------------------------------------


def tb_scale(x: Tensor, s: float) -> Tensor:
    """Forward x; gradient multiplied by s."""
    if s == 1.0:
        return x
    return x * s + (x * (1.0 - s)).detach()


def tb_softmax(z: Tensor, T: float) -> Tensor:
    """Forward softmax(z); vector-Jacobian product of T * softmax(z / T)."""
    s = torch.softmax(z, dim=-1)
    if T == 1.0:
        return s
    sur = T * torch.softmax(z / T, dim=-1)
    return s.detach() + sur - sur.detach()


def tb_rms(x: Tensor, w: Tensor, eps: float, freeze: bool, one_plus: bool = False) -> Tensor:
    xf = x.float()
    r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if freeze:
        r = r.detach()
    return xf * r * ((1.0 + w.float()) if one_plus else w)


def tb_layer_norm(x: Tensor, ln: nn.LayerNorm, freeze: bool) -> Tensor:
    mu = x.mean(-1, keepdim=True)
    std = torch.sqrt(((x - mu) ** 2).mean(-1, keepdim=True) + ln.eps)
    if freeze:
        std = std.detach()
    return (x - mu) / std * ln.weight + ln.bias


def tb_attention_heads(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    keep: Optional[Tensor],
    T: float,
    divide: bool,
    scaling: float,
    softcap: Optional[float] = None,
    bias: Optional[Tensor] = None,
    zero_empty_rows: bool = False,
) -> Tuple[Tensor, Tensor]:
    """q: (B, H, Lq, d); k, v: (B, Hkv, Lk, d); keep: bool, broadcastable to (B, H, Lq, Lk).

    Masked scores are set to the dtype's lowest value (as HF masks do), so a fully masked
    query row is uniform, or zero with ``zero_empty_rows`` (SDPA). Returns the per-head
    output (B, H, Lq, d) and the probabilities (B, H, Lq, Lk).
    """
    if divide:
        q, k, v = tb_scale(q, 0.25), tb_scale(k, 0.25), tb_scale(v, 0.5)
    rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    s = q @ k.transpose(-1, -2) * scaling
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    if bias is not None:
        s = s + bias
    if keep is not None:
        s = s.masked_fill(~keep, torch.finfo(s.dtype).min)
    p = tb_softmax(s, T)
    if zero_empty_rows and keep is not None:
        p = p * keep.any(-1, keepdim=True)
    return p @ v, p


def tb_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    keep: Tensor,
    T: float,
    divide: bool,
    scaling: float,
    softcap: Optional[float] = None,
) -> Tensor:
    """As :func:`tb_attention_heads`, with the heads merged: returns (B, L, H * d)."""
    o, _ = tb_attention_heads(q, k, v, keep, T, divide, scaling, softcap)
    b, h, L, d = o.shape
    return o.transpose(1, 2).reshape(b, L, h * d)


def tb_rope(x: Tensor, theta: float, positions: Tensor) -> Tensor:
    d = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float) / d))
    ang = positions[:, None].float() * inv[None]
    cos = torch.cat([ang.cos(), ang.cos()], -1)
    sin = torch.cat([ang.sin(), ang.sin()], -1)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    rot = torch.cat([-x2, x1], -1)
    return x * cos + rot * sin


def rope_theta(cfg: Any) -> float:
    """The RoPE base: ``rope_parameters["rope_theta"]`` (transformers 5), ``rope_theta`` (4.x)."""
    rp = getattr(cfg, "rope_parameters", None)
    if isinstance(rp, dict) and "rope_theta" in rp:
        return float(rp["rope_theta"])
    return float(cfg.rope_theta)


#: transformers 4.x (module layouts differ: MoE experts as a ModuleList, Gemma's embedding
#: scale applied by the model rather than by its embedding module...)
TRANSFORMERS_4 = int(transformers.__version__.split(".")[0]) < 5


def causal_keep(L: int, window: Optional[int] = None) -> Tensor:
    i = torch.arange(L)[:, None]
    j = torch.arange(L)[None, :]
    keep = j <= i
    if window is not None:
        keep = keep & (j > i - window)
    return keep


# --- tiny models ------------------------------------------------------------------------------


def randomize(model: nn.Module, seed: int = 0, std: float = 0.3) -> nn.Module:
    """Seeded weights with a spread that makes every GIM rule matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if p.dim() >= 2:
                p.copy_(noise * std)
            else:
                p.add_(0.1 * noise)
    return model.eval()


@dataclass
class Family:
    """A tiny model of one family and how to attribute it at its embedding layer."""

    name: str
    model: nn.Module
    kind: str  # "lm" (target: a token's logit at the last position), "cls" or "image"
    inputs: Tensor
    extra: Tuple[Any, ...]
    target: Any

    @property
    def layer(self) -> nn.Module:
        return self.layer_of(self.model)

    def layer_of(self, model: nn.Module) -> nn.Module:
        """The attribution layer of ``model`` (this family's model or a copy of it)."""
        if self.kind == "image":
            return model.vit.embeddings
        return model.get_input_embeddings()

    def forward(self, x: Tensor, *extra: Any) -> Tensor:
        return self.forward_of(self.model)(x, *extra)

    def forward_of(self, model: nn.Module) -> Callable[..., Tensor]:
        """The attributed output of ``model`` (this family's model or a copy of it)."""

        def forward(x: Tensor, *extra: Any) -> Tensor:
            mask = extra[0] if extra else None
            if self.kind == "lm":
                return model(input_ids=x, attention_mask=mask).logits[:, -1]
            if self.kind == "cls":
                return model(input_ids=x, attention_mask=mask).logits
            return model(pixel_values=x).logits

        return forward


def _build(cls_name: str, config_name: str, impl: str, **kw: Any) -> nn.Module:
    config = getattr(transformers, config_name)(attn_implementation=impl, **kw)
    torch.manual_seed(0)
    return randomize(getattr(transformers, cls_name)(config))


def _builder(cls_name: str, config_name: str, **defaults: Any) -> Callable[..., nn.Module]:
    """``build(impl="sdpa", **overrides)`` for one family."""

    def build(impl: str = "sdpa", **kw: Any) -> nn.Module:
        return _build(cls_name, config_name, impl, **{**defaults, **kw})

    return build


def _ids(batch: int = 2, seq: int = SEQ, seed: int = 1) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, VOCAB, (batch, seq), generator=g)


_COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2)
_DECODER = dict(_COMMON, num_attention_heads=4, max_position_embeddings=64, tie_word_embeddings=False)
_GQA = dict(_DECODER, num_key_value_heads=2)
_ENCODER = dict(_COMMON, num_attention_heads=4, max_position_embeddings=64, num_labels=3)
_GEMMA2 = dict(
    _GQA,
    head_dim=8,
    query_pre_attn_scalar=8,
    sliding_window=4,
    attn_logit_softcapping=1.5,
    final_logit_softcapping=5.0,
    pad_token_id=0,
)

build_llama = _builder("LlamaForCausalLM", "LlamaConfig", **_GQA)
build_mistral = _builder("MistralForCausalLM", "MistralConfig", **_GQA, sliding_window=4, head_dim=8)
build_qwen2 = _builder("Qwen2ForCausalLM", "Qwen2Config", **_GQA)
build_qwen3 = _builder("Qwen3ForCausalLM", "Qwen3Config", **_GQA, head_dim=8)
build_gemma = _builder(
    "GemmaForCausalLM", "GemmaConfig", **_DECODER, num_key_value_heads=1, head_dim=8, pad_token_id=0
)
build_phi3 = _builder(
    "Phi3ForCausalLM", "Phi3Config", **_GQA, pad_token_id=0, bos_token_id=1, eos_token_id=2
)
build_gpt2 = _builder(
    "GPT2LMHeadModel", "GPT2Config",
    vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2,
)
build_bert = _builder("BertForSequenceClassification", "BertConfig", **_ENCODER)
build_roberta = _builder("RobertaForSequenceClassification", "RobertaConfig", **_ENCODER, pad_token_id=1)
build_vit = _builder(
    "ViTForImageClassification", "ViTConfig",
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
    image_size=8, patch_size=4, num_channels=3, num_labels=3,
)
build_mixtral = _builder(
    "MixtralForCausalLM", "MixtralConfig", **_GQA, num_local_experts=4, num_experts_per_tok=2
)
build_qwen2_moe = _builder(
    "Qwen2MoeForCausalLM", "Qwen2MoeConfig", **_GQA, num_experts=4, num_experts_per_tok=2,
    moe_intermediate_size=24, shared_expert_intermediate_size=32,
)


def build_gemma2(impl: str = "eager", **kw: Any) -> nn.Module:
    cfg = {**_GEMMA2, **kw}
    if impl == "sdpa":  # transformers refuses sdpa for Gemma2 (soft-capping); force it
        model = _build("Gemma2ForCausalLM", "Gemma2Config", "eager", **cfg)
        model.config._attn_implementation_internal = "sdpa"
        return model
    return _build("Gemma2ForCausalLM", "Gemma2Config", impl, **cfg)


BUILDERS: Dict[str, Callable[..., nn.Module]] = {
    "llama": build_llama,
    "mistral": build_mistral,
    "qwen2": build_qwen2,
    "qwen3": build_qwen3,
    "gemma": build_gemma,
    "gemma2": build_gemma2,
    "phi3": build_phi3,
    "gpt2": build_gpt2,
    "bert": build_bert,
    "roberta": build_roberta,
    "vit": build_vit,
    "mixtral": build_mixtral,
    "qwen2_moe": build_qwen2_moe,
}
FAMILIES = tuple(BUILDERS)
_KIND = {"bert": "cls", "roberta": "cls", "vit": "image"}


def family(name: str, impl: str = "sdpa", batch: int = 2, **kw: Any) -> Family:
    model = BUILDERS[name](impl, **kw)
    kind = _KIND.get(name, "lm")
    if kind == "image":
        g = torch.Generator().manual_seed(1)
        x = torch.randn(batch, 3, 8, 8, generator=g)
        return Family(name, model, kind, x, (), 1)
    ids = _ids(batch)
    mask = torch.ones_like(ids)
    target = 5 if kind == "lm" else 1
    return Family(name, model, kind, ids, (mask,), target)


def cosine(a: Tensor, b: Tensor) -> Tensor:
    """Per-example cosine similarity of two attribution tensors."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-30)


def assert_clean(model: nn.Module) -> None:
    """No instance-level forward, hook or instance attribute of ours left on any module."""
    for name, m in model.named_modules():
        assert "forward" not in m.__dict__, f"forward left swapped on {name or '<root>'}"
        assert "_apply_gate" not in m.__dict__, f"_apply_gate left on {name}"
        for hooks in (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks):
            assert len(hooks) == 0, f"hook left on {name or '<root>'}"


def test_builders_are_deterministic() -> None:
    a, b = build_llama(), build_llama()
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
