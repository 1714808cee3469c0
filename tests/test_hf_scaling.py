"""Attention that is not the textbook default, on every supported transformers release.

Tiny models (configs, seeded random weights) whose attention differs from
``softmax(q k^T / sqrt(d))`` in the ways an upgrade of transformers can quietly break:

- a scale that is not ``head_dim ** -0.5``: Gemma2's ``query_pre_attn_scalar`` (5, with a
  head size of 8), GPT-2's per-layer ``1 / (layer + 1)`` (``scale_attn_by_inverse_layer_idx``;
  a ``module.scaling`` from transformers 5.4, two flags on the module before);
- attention-logit soft-capping and sliding windows (Gemma2; Mistral's window of 3);
- q/k norms (Qwen3 per head, OLMo2 over the whole projection) and q/k/v biases (Qwen2);
- an encoder with padding (BERT: through ``AttentionInterface`` in transformers 5, its own
  attention class, covered by GIM's functional layer, in 4.x).

Each model is checked against a textbook forward written here from its math, starting at
the input of its first layer (so the reference does not depend on where a release puts the
embedding scale): the textbook logits must equal the model's (so the textbook is this
release's model), and the GIM gradient at that input must equal the textbook GIM gradient.

The scale GIM's attention uses is recorded on every call and must equal the textbook scale
(the one that reproduces the model's logits): a mismatch fails the test, and
``GIMAttentionMismatchWarning`` is an error here. ``test_a_renamed_scaling_keyword_is_caught``
simulates a transformers that renames the ``scaling`` keyword and checks both notice.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from test_hf_helpers import (
    VOCAB,
    causal_keep,
    randomize,
    tb_attention_heads,
    tb_layer_norm,
    tb_rms,
    tb_rope,
    tb_scale,
)

import transformers
from transformers.modeling_utils import AttentionInterface

from captum_gim import gim_backward
from captum_gim._compat import legacy_hf_attention
from captum_gim.rules.transformers import GIMAttentionMismatchWarning
from captum_gim.rules.transformers import attention as hf_attention

pytestmark = pytest.mark.filterwarnings(
    "error::captum_gim.rules.transformers.support.GIMAttentionMismatchWarning"
)

SEQ = 7
# (temperature, freeze_norms, divide_grads)
SETTINGS = [(1.0, False, False), (2.0, True, True)]
SETTING_IDS = ["plain", "gim"]
BOTH = pytest.mark.parametrize("impl", ["eager", "sdpa"])
GIM_SETTINGS = pytest.mark.parametrize("T,freeze,divide", SETTINGS, ids=SETTING_IDS)


def _model(config_name: str, cls_name: str, impl: str, **kw: Any) -> nn.Module:
    if not hasattr(transformers, cls_name):
        pytest.skip(f"transformers {transformers.__version__} has no {cls_name}")
    config = getattr(transformers, config_name)(attn_implementation=impl, **kw)
    torch.manual_seed(0)
    return randomize(getattr(transformers, cls_name)(config))


_DECODER = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    tie_word_embeddings=False,
)


def _theta(cfg: Any) -> float:
    rp = getattr(cfg, "rope_parameters", None)  # transformers 5
    if isinstance(rp, dict) and "rope_theta" in rp:
        return float(rp["rope_theta"])
    return float(cfg.rope_theta)  # transformers 4


def _proj(lin: nn.Linear, x: Tensor) -> Tensor:
    return x @ lin.weight.T + (lin.bias if lin.bias is not None else 0.0)


# --- textbook forwards: (model, h0 = input of the first layer, settings) -> logits, scales --


class Ref:
    """What a textbook forward needs besides the model: GIM's settings and the padding."""

    def __init__(self, T: float, freeze: bool, divide: bool, mask: Optional[Tensor] = None):
        self.T, self.freeze, self.divide, self.mask = T, freeze, divide, mask
        self.scales: List[float] = []

    def attend(self, q: Tensor, k: Tensor, v: Tensor, keep: Optional[Tensor], scaling: float,
               softcap: Optional[float] = None) -> Tensor:
        """(B, H, L, d) heads -> (B, L, H * d), with the textbook GIM backward."""
        self.scales.append(scaling)
        if self.mask is not None:  # padded keys
            pad = self.mask.bool()[:, None, None, :]
            keep = pad if keep is None else keep & pad
        o, _ = tb_attention_heads(q, k, v, keep, self.T, self.divide, scaling, softcap)
        b, h, L, d = o.shape
        return o.transpose(1, 2).reshape(b, L, h * d)

    def half(self, x: Tensor) -> Tensor:
        return tb_scale(x, 0.5 if self.divide else 1.0)


def ref_llama_like(model: nn.Module, x: Tensor, r: Ref, qk_norm: str = "") -> Tensor:
    """Mistral / Qwen2 / Qwen3 / OLMo2: RMSNorm, RoPE, GQA, SwiGLU.

    ``qk_norm``: ``"head"`` (Qwen3: per head, before RoPE) or ``"full"`` (OLMo2: over the
    whole projection; OLMo2 also norms after attention and MLP instead of before).
    """
    cfg = model.config
    H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    B, L, _ = x.shape
    pos = torch.arange(L)
    window = getattr(cfg, "sliding_window", None) if getattr(cfg, "use_sliding_window", True) else None
    keep = causal_keep(L, window)

    def rms(m: nn.Module, h: Tensor) -> Tensor:
        eps = getattr(m, "variance_epsilon", None) or getattr(m, "eps")
        return tb_rms(h, m.weight, eps, r.freeze)

    post_norm = qk_norm == "full"
    for layer in model.model.layers:
        a = layer.self_attn
        h = x if post_norm else rms(layer.input_layernorm, x)
        q, k, v = _proj(a.q_proj, h), _proj(a.k_proj, h), _proj(a.v_proj, h)
        if qk_norm == "full":
            q, k = rms(a.q_norm, q), rms(a.k_norm, k)
        q, k, v = q.view(B, L, H, d), k.view(B, L, Hkv, d), v.view(B, L, Hkv, d)
        if qk_norm == "head":
            q, k = rms(a.q_norm, q), rms(a.k_norm, k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        theta = _theta(cfg)
        q, k = tb_rope(q, theta, pos), tb_rope(k, theta, pos)
        o = _proj(a.o_proj, r.attend(q, k, v, keep, d**-0.5))
        x = x + (rms(layer.post_attention_layernorm, o) if post_norm else o)
        h = x if post_norm else rms(layer.post_attention_layernorm, x)
        mlp = layer.mlp
        m = _proj(mlp.down_proj, F.silu(r.half(_proj(mlp.gate_proj, h))) * r.half(_proj(mlp.up_proj, h)))
        x = x + (rms(layer.post_feedforward_layernorm, m) if post_norm else m)
    x = rms(model.model.norm, x)
    return _proj(model.lm_head, x)


def ref_gemma2(model: nn.Module, x: Tensor, r: Ref) -> Tensor:
    """Gemma2: ``query_pre_attn_scalar``, soft-capped logits, sliding layers, 1 + w norms."""
    cfg = model.config
    H, Hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    B, L, _ = x.shape
    pos = torch.arange(L)

    def norm(m: nn.Module, h: Tensor) -> Tensor:
        return tb_rms(h, m.weight, cfg.rms_norm_eps, r.freeze, one_plus=True)

    for i, layer in enumerate(model.model.layers):
        a = layer.self_attn
        window = cfg.sliding_window if cfg.layer_types[i] == "sliding_attention" else None
        h = norm(layer.input_layernorm, x)
        q = _proj(a.q_proj, h).view(B, L, H, d).transpose(1, 2)
        k = _proj(a.k_proj, h).view(B, L, Hkv, d).transpose(1, 2)
        v = _proj(a.v_proj, h).view(B, L, Hkv, d).transpose(1, 2)
        q, k = tb_rope(q, _theta(cfg), pos), tb_rope(k, _theta(cfg), pos)
        o = r.attend(q, k, v, causal_keep(L, window), cfg.query_pre_attn_scalar**-0.5,
                     softcap=cfg.attn_logit_softcapping)
        x = x + norm(layer.post_attention_layernorm, _proj(a.o_proj, o))
        h = norm(layer.pre_feedforward_layernorm, x)
        mlp = layer.mlp
        act = F.gelu(r.half(_proj(mlp.gate_proj, h)), approximate="tanh")
        x = x + norm(layer.post_feedforward_layernorm, _proj(mlp.down_proj, act * r.half(_proj(mlp.up_proj, h))))
    logits = _proj(model.lm_head, norm(model.model.norm, x))
    c = cfg.final_logit_softcapping
    return torch.tanh(logits / c) * c


def _gelu_new(x: Tensor) -> Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def ref_gpt2(model: nn.Module, x: Tensor, r: Ref) -> Tensor:
    """GPT-2 with ``scale_attn_by_inverse_layer_idx``: layer i scales by d^-0.5 / (i + 1)."""
    cfg = model.config
    H = cfg.n_head
    d = cfg.n_embd // H
    B, L, E = x.shape
    tr = model.transformer

    def conv1d(c: nn.Module, h: Tensor) -> Tensor:  # transformers' Conv1D: x @ W + b
        return h @ c.weight + c.bias

    for i, blk in enumerate(tr.h):
        h = tb_layer_norm(x, blk.ln_1, r.freeze)
        q, k, v = conv1d(blk.attn.c_attn, h).split(E, dim=-1)
        q, k, v = (t.view(B, L, H, d).transpose(1, 2) for t in (q, k, v))
        scale = d**-0.5 / (i + 1 if cfg.scale_attn_by_inverse_layer_idx else 1)
        x = x + conv1d(blk.attn.c_proj, r.attend(q, k, v, causal_keep(L), scale))
        h = tb_layer_norm(x, blk.ln_2, r.freeze)
        x = x + conv1d(blk.mlp.c_proj, _gelu_new(conv1d(blk.mlp.c_fc, h)))
    return tb_layer_norm(x, tr.ln_f, r.freeze) @ model.lm_head.weight.T


def ref_bert(model: nn.Module, x: Tensor, r: Ref) -> Tensor:
    """BERT classifier: post-LN encoder layers, padded keys masked, tanh pooler."""
    cfg = model.config
    H = cfg.num_attention_heads
    d = cfg.hidden_size // H
    B, L, _ = x.shape
    for layer in model.bert.encoder.layer:
        s = layer.attention.self
        q, k, v = (_proj(p, x).view(B, L, H, d).transpose(1, 2) for p in (s.query, s.key, s.value))
        o = r.attend(q, k, v, None, d**-0.5)
        x = tb_layer_norm(_proj(layer.attention.output.dense, o) + x, layer.attention.output.LayerNorm, r.freeze)
        m = _proj(layer.output.dense, F.gelu(_proj(layer.intermediate.dense, x)))
        x = tb_layer_norm(m + x, layer.output.LayerNorm, r.freeze)
    pooled = torch.tanh(_proj(model.bert.pooler.dense, x[:, 0]))
    return _proj(model.classifier, pooled)


# --- the models --------------------------------------------------------------------------


def build_gemma2(impl: str) -> nn.Module:
    return _model(
        "Gemma2Config", "Gemma2ForCausalLM", impl, **_DECODER, head_dim=8,
        query_pre_attn_scalar=5, sliding_window=3, attn_logit_softcapping=1.5,
        final_logit_softcapping=5.0, pad_token_id=0,
    )


MODELS: Dict[str, Tuple[Callable[[str], nn.Module], Callable[..., Tensor], str]] = {
    # name: (build(impl), reference(model, h0, Ref), kind)
    "mistral-window": (
        lambda impl: _model("MistralConfig", "MistralForCausalLM", impl, **_DECODER,
                            head_dim=8, sliding_window=3),
        ref_llama_like, "lm",
    ),
    "qwen2-bias": (
        lambda impl: _model("Qwen2Config", "Qwen2ForCausalLM", impl, **_DECODER),
        ref_llama_like, "lm",
    ),
    "qwen3-qk-norm": (
        lambda impl: _model("Qwen3Config", "Qwen3ForCausalLM", impl, **_DECODER, head_dim=8),
        lambda m, x, r: ref_llama_like(m, x, r, qk_norm="head"), "lm",
    ),
    "olmo2-qk-norm": (
        lambda impl: _model("Olmo2Config", "Olmo2ForCausalLM", impl, **_DECODER, pad_token_id=0),
        lambda m, x, r: ref_llama_like(m, x, r, qk_norm="full"), "lm",
    ),
    "gemma2-scalar-softcap": (build_gemma2, ref_gemma2, "lm"),
    "gpt2-layer-scaling": (
        lambda impl: _model(
            "GPT2Config", "GPT2LMHeadModel", impl, vocab_size=VOCAB, n_embd=32, n_layer=2,
            n_head=4, n_positions=64, scale_attn_by_inverse_layer_idx=True,
        ),
        ref_gpt2, "lm",
    ),
    "bert-padding": (
        lambda impl: _model(
            "BertConfig", "BertForSequenceClassification", impl, vocab_size=VOCAB,
            hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, num_labels=3,
        ),
        ref_bert, "cls",
    ),
}

#: (model, attention implementation) pairs. Gemma2 soft-caps, which SDPA cannot (transformers
#: refuses it); GPT-2's SDPA path in transformers 4.x ignores scale_attn_by_inverse_layer_idx
#: (its eager path does not), so the per-layer scale is a property of its eager attention.
CASES = [
    (name, impl)
    for name in MODELS
    for impl in (("eager",) if name.startswith(("gemma2", "gpt2")) else ("eager", "sdpa"))
]


def _first_layer(model: nn.Module) -> nn.Module:
    if hasattr(model, "bert"):
        return model.bert.encoder.layer[0]
    if hasattr(model, "transformer"):
        return model.transformer.h[0]
    return model.model.layers[0]


def _inputs(kind: str) -> Tuple[Tensor, Optional[Tensor]]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(4, VOCAB, (2, SEQ), generator=g)
    if kind != "cls":
        return ids, None
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0  # the second row is padded
    return ids, mask


def _run(model: nn.Module, ids: Tensor, mask: Optional[Tensor], h0: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """The model's logits and the input of its first layer (replaced by ``h0`` if given)."""
    seen: Dict[str, Tensor] = {}

    def pre(module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]):
        if args:
            seen["h"] = args[0]
            if h0 is not None:
                return (h0, *args[1:]), kwargs
        else:
            seen["h"] = kwargs["hidden_states"]
            if h0 is not None:
                return args, {**kwargs, "hidden_states": h0}
        return None

    handle = _first_layer(model).register_forward_pre_hook(pre, with_kwargs=True)
    try:
        logits = model(input_ids=ids, attention_mask=mask).logits
    finally:
        handle.remove()
    return logits, seen["h"]


class _ScaleRecorder:
    """Every scale GIM's attention function uses (``_prepare``'s semantics), in call order."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.scales: List[float] = []
        real = hf_attention._prepare

        def recording(*args: Any, **kwargs: Any):
            out = real(*args, **kwargs)
            self.scales.append(out[2].scaling)
            return out

        monkeypatch.setattr(hf_attention, "_prepare", recording)


def _check(name: str, impl: str, T: float, freeze: bool, divide: bool, monkeypatch) -> None:
    build, reference, kind = MODELS[name]
    model = build(impl)
    ids, mask = _inputs(kind)
    target = (slice(None), -1, 5) if kind == "lm" else (slice(None), 1)
    with torch.no_grad():
        logits, h0 = _run(model, ids, mask, None)
        plain_ref = Ref(1.0, False, False, mask)
        ref_logits = reference(model, h0, plain_ref)
    # the textbook is this release's model (its scales reproduce the model's logits)
    torch.testing.assert_close(ref_logits, logits, atol=2e-5, rtol=1e-5)

    def ref_grad(T_: float, freeze_: bool, divide_: bool) -> Tensor:
        x = h0.clone().requires_grad_()
        reference(model, x, Ref(T_, freeze_, divide_, mask))[target].sum().backward()
        return x.grad

    expected = ref_grad(T, freeze, divide)
    if (T, freeze, divide) != (1.0, False, False):  # the rules visibly change the gradient
        assert (expected - ref_grad(1.0, False, False)).abs().max() > 1e-3

    rec = _ScaleRecorder(monkeypatch)
    x = h0.clone().requires_grad_()
    with gim_backward(model, temperature=T, freeze_norms=freeze, divide_grads=divide, strict=True):
        out, _ = _run(model, ids, mask, x)
        assert torch.equal(out, logits)  # the forward is the model's
        out[target].sum().backward()
    torch.testing.assert_close(x.grad, expected, atol=1e-5, rtol=1e-4)

    if T != 1.0 or divide:  # GIM's attention function recomputed the attention
        if legacy_hf_attention() and kind == "cls":
            # transformers 4.x BERT computes attention itself: GIM's functional layer
            # covers it with the scale of its own F.scaled_dot_product_attention / matmul
            assert rec.scales == []
        else:  # the scale GIM used is the model's own, layer by layer
            assert rec.scales == pytest.approx(plain_ref.scales, rel=1e-12), (rec.scales, plain_ref.scales)


@BOTH
@GIM_SETTINGS
def test_mistral_sliding_window(impl, T, freeze, divide, monkeypatch):
    _check("mistral-window", impl, T, freeze, divide, monkeypatch)


@BOTH
@GIM_SETTINGS
def test_qwen2_qkv_biases(impl, T, freeze, divide, monkeypatch):
    _check("qwen2-bias", impl, T, freeze, divide, monkeypatch)


@BOTH
@GIM_SETTINGS
def test_qwen3_per_head_qk_norms(impl, T, freeze, divide, monkeypatch):
    _check("qwen3-qk-norm", impl, T, freeze, divide, monkeypatch)


@BOTH
@GIM_SETTINGS
def test_olmo2_full_width_qk_norms(impl, T, freeze, divide, monkeypatch):
    _check("olmo2-qk-norm", impl, T, freeze, divide, monkeypatch)


@GIM_SETTINGS
def test_gemma2_query_pre_attn_scalar_softcap_window(T, freeze, divide, monkeypatch):
    _check("gemma2-scalar-softcap", "eager", T, freeze, divide, monkeypatch)


@GIM_SETTINGS
def test_gpt2_scale_by_inverse_layer_idx(T, freeze, divide, monkeypatch):
    _check("gpt2-layer-scaling", "eager", T, freeze, divide, monkeypatch)


@BOTH
@GIM_SETTINGS
def test_bert_encoder_with_padding(impl, T, freeze, divide, monkeypatch):
    _check("bert-padding", impl, T, freeze, divide, monkeypatch)


def test_the_test_models_do_not_use_the_default_scale():
    """Otherwise a GIM that ignored the model's scale would pass the tests above."""
    gemma2 = build_gemma2("eager")
    assert gemma2.config.query_pre_attn_scalar ** -0.5 != gemma2.config.head_dim ** -0.5
    gpt2 = MODELS["gpt2-layer-scaling"][0]("eager")
    assert gpt2.config.scale_attn_by_inverse_layer_idx and gpt2.config.n_layer > 1


@pytest.mark.parametrize("name", ["gemma2-scalar-softcap", "gpt2-layer-scaling"])
def test_a_renamed_scaling_keyword_is_caught(name, monkeypatch):
    """A transformers that passed the scale under another name must fail these tests.

    The model's attention modules call GIM's function with ``scale=`` instead of
    ``scaling=`` (the original still gets the right scale): GIM's recomputation then uses
    another scale, which the first backward reports as a GIMAttentionMismatchWarning, and
    which the recorded scales show.
    """
    build, reference, kind = MODELS[name]
    model = build("eager")
    key = hf_attention.GIM_ATTENTION_PREFIX + "eager"
    gim_fn = hf_attention._ATTENTION_FUNCTIONS["eager"]
    real_original = hf_attention._original_attention

    def renamed(module, query, key_, value, mask, **kw):  # what the module passes
        if "scaling" in kw:
            kw["scale"] = kw.pop("scaling")
        return gim_fn(module, query, key_, value, mask, **kw)

    def original(module, impl):  # the original understands the new name
        fn = real_original(module, impl)

        def call(m, q, k, v, mask, **kw):
            if "scale" in kw:
                kw["scaling"] = kw.pop("scale")
            return fn(m, q, k, v, mask, **kw)

        return call

    if name.startswith("gpt2") and not hasattr(_first_layer(model).attn, "scaling"):
        pytest.skip(
            f"transformers {transformers.__version__}'s GPT-2 passes no scaling keyword "
            "(its eager function reads the module's flags), so there is none to rename"
        )
    ids, mask = _inputs(kind)
    with torch.no_grad():
        logits, h0 = _run(model, ids, mask, None)
        textbook = Ref(1.0, False, False, mask)
        reference(model, h0, textbook)
    monkeypatch.setattr(hf_attention, "_original_attention", original)
    rec = _ScaleRecorder(monkeypatch)
    AttentionInterface.register(key, renamed)
    try:
        x = h0.clone().requires_grad_()
        with pytest.warns(GIMAttentionMismatchWarning):
            with gim_backward(model, strict=True):
                out, _ = _run(model, ids, mask, x)
                assert torch.equal(out, logits)  # the forward is still the model's
                out[:, -1, 5].sum().backward()
    finally:
        AttentionInterface.register(key, gim_fn)
    assert len(rec.scales) == len(textbook.scales)
    assert rec.scales != pytest.approx(textbook.scales, rel=1e-12)
