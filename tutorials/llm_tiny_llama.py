# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # LLM attribution: `LLMGradientAttribution` with `LayerGIM` on a tiny Llama
#
# Captum's `LLMGradientAttribution` explains which prompt tokens a language model's
# answer depends on, one row per generated token. It accepts gradient methods attributed
# at the embedding layer; `captum_gim.LayerGIM` is one of them, so GIM plugs in with one
# line:
#
# ```python
# LLMGradientAttribution(LayerGIM(model, model.get_input_embeddings()), tokenizer)
# ```
#
# Everything here is built offline: a word-level fast tokenizer trained with the
# `tokenizers` library on a dozen sentences, and a 2-layer `LlamaForCausalLM` from a
# config, trained for a few seconds to memorise them. No model hub, no download.
# Plots go to `$CAPTUM_GIM_TUTORIAL_OUT` (default `results/tutorials`).

# %%
import os
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no window

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from captum.attr import LayerIntegratedGradients, LLMGradientAttribution, TextTokenInput
from captum_gim import LayerGIM
from captum_gim.adapters.transformers import answer_token_attribution, last_token_logits

torch.manual_seed(0)
torch.set_num_threads(1)  # tiny models: one thread is fastest, and polite on shared CPUs
OUT = Path(os.environ.get("CAPTUM_GIM_TUTORIAL_OUT", "results/tutorials")) / "llm_tiny_llama"
OUT.mkdir(parents=True, exist_ok=True)
START = time.perf_counter()

# %% [markdown]
# ## A fast tokenizer, built offline
#
# Captum's LLM attribution needs a *fast* tokenizer (it asks for offset mappings), so we
# train a `tokenizers` word-level model and wrap it in `PreTrainedTokenizerFast`. A
# post-processor puts `<s>` in front of every encoded text, as Llama's tokenizer does.

# %%
FACTS = [
    "the capital of france is paris .",
    "the capital of italy is rome .",
    "the capital of spain is madrid .",
    "the capital of japan is tokyo .",
    "the river in paris is the seine .",
    "the river in rome is the tiber .",
    "the river in london is the thames .",
    "alice lives in paris and bob lives in rome .",
    "bob likes pizza and alice likes cheese .",
    "the cat sat on the mat .",
    "the dog sat on the log .",
]

raw = Tokenizer(models.WordLevel(unk_token="<unk>"))
raw.pre_tokenizer = pre_tokenizers.Whitespace()
raw.train_from_iterator(
    FACTS, trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "<s>", "</s>"])
)
raw.post_processor = processors.TemplateProcessing(
    single="<s> $A", special_tokens=[("<s>", raw.token_to_id("<s>"))]
)
tokenizer = PreTrainedTokenizerFast(
    tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
)
print(len(tokenizer), "tokens;", tokenizer.tokenize("the capital of france is"))

# %% [markdown]
# ## A tiny Llama, trained on the facts
#
# Grouped-query attention (4 query heads, 2 key/value heads), RMSNorm, a SwiGLU MLP:
# the same building blocks as a real Llama, at toy width. We stop training early, while
# the model is still unsure (it gives "paris" some probability after "bob lives in"):
# a model that is certain of its answer has a log-probability that is flat around 0,
# and every gradient method (GIM included) then sees almost no gradient. That is
# saturation, which Integrated Gradients avoids by integrating along a path; the last
# section shows the GIM paper's own target, the raw logit, which does not saturate.

# %%
config = LlamaConfig(
    vocab_size=len(tokenizer),
    hidden_size=48,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=tokenizer.pad_token_id,
    bos_token_id=tokenizer.bos_token_id,
    eos_token_id=tokenizer.eos_token_id,
)
model = LlamaForCausalLM(config)
batch = tokenizer(FACTS, padding=True, return_tensors="pt")
labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
model.train()
for step in range(40):
    loss = model(**batch, labels=labels).loss
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
model.eval()
print(f"final training loss {loss.item():.3f} ({time.perf_counter() - START:.1f}s)")

prompt = "alice lives in paris and bob lives in"
ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
with torch.no_grad():
    answer = model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=tokenizer.pad_token_id)
print(repr(prompt), "->", repr(tokenizer.decode(answer[0, ids.shape[1] :])))
with torch.no_grad():
    next_token = model(ids).logits[0, -1].softmax(-1)
print({tokenizer.convert_ids_to_tokens(int(i)): round(float(p), 3) for p, i in zip(*next_token.topk(3))})

# %% [markdown]
# ## GIM through `LLMGradientAttribution`
#
# The target is the continuation whose log-probability we explain, token by token.
# `baselines` is passed through to `LayerGIM.attribute`: a token id (here `<pad>`) at
# every position, as in the GIM paper; the attribution of each token is
# `GIM-gradient x (embedding(token) - embedding(<pad>))`, summed over the hidden size.
# We skip `<s>` in the display.
#
# `LayerGIM` applies GIM's rules to whatever modules of the model the registry matches.
# The Hugging Face rules (registered once `transformers` is imported) handle Llama's
# attention (in whichever implementation it was loaded), its `LlamaRMSNorm`s and its
# gated MLP; the report printed below lists every module each rule matched. An attention
# or norm module that no rule matched would be named in a warning (an error with
# `strict=True`).

# %%
target = "rome ."
inp = TextTokenInput(prompt, tokenizer, skip_tokens=[tokenizer.bos_token_id])

gim = LayerGIM(model, model.get_input_embeddings())
llm_gim = LLMGradientAttribution(gim, tokenizer)
t0 = time.perf_counter()
result_gim = llm_gim.attribute(inp, target=target, baselines=tokenizer.pad_token_id)
t_gim = time.perf_counter() - t0
# LLMGradientAttribution works on a copy of the method; the report is on that copy
print(llm_gim.attr_method.last_report)

llm_ig = LLMGradientAttribution(LayerIntegratedGradients(model, model.get_input_embeddings()), tokenizer)
t0 = time.perf_counter()
result_ig = llm_ig.attribute(inp, target=target, baselines=tokenizer.pad_token_id, n_steps=32)
t_ig = time.perf_counter() - t0
print(f"GIM {t_gim:.2f}s, IG (32 steps) {t_ig:.2f}s")

# %% [markdown]
# ## Token-level heat maps
#
# `LLMAttributionResult.token_attr` has one row per target token and one column per
# prompt token; `plot_token_attr` draws it, `plot_seq_attr` draws the sum over the
# target tokens.

# %%
print("prompt tokens:", result_gim.input_tokens)
print("GIM, summed over the answer:", [round(v, 3) for v in result_gim.seq_attr.tolist()])
print("IG,  summed over the answer:", [round(v, 3) for v in result_ig.seq_attr.tolist()])

token_figs = {}
for name, result in [("gim", result_gim), ("ig", result_ig)]:
    fig, ax = result.plot_token_attr(show=False)
    token_figs[name] = fig
    ax.set_title(f"{name.upper()}: which prompt tokens the answer {target!r} depends on")
    fig.savefig(OUT / f"token_attr_{name}.png", dpi=80, bbox_inches="tight")
    fig, ax = result.plot_seq_attr(show=False)
    fig.savefig(OUT / f"seq_attr_{name}.png", dpi=80, bbox_inches="tight")
    matplotlib.pyplot.close("all")
print("wrote", sorted(p.name for p in OUT.glob("*.png")))

# %% [markdown]
# In a notebook the heat maps show here (as a script, open the PNG files): GIM, then IG.

# %%
token_figs["gim"]

# %%
token_figs["ig"]

# %% [markdown]
# ## The GIM paper's setting: the raw logit of the answer
#
# The paper attributes the *raw logit* of the answer token at the last position (not its
# log-probability), with one fixed baseline token at every position, and sums over the
# hidden size. `captum_gim.adapters.transformers.answer_token_attribution` does that in one
# call: `LayerGIM` on the input embeddings, with `last_token_logits` (the logits at the
# last position) as the forward function. For Integrated Gradients we give Captum's
# `LayerIntegratedGradients` that same forward function.

# %%
answer_id = tokenizer.convert_tokens_to_ids("rome")
# one score per token, <s> included
scores = answer_token_attribution(model, ids, answer_id, baseline_token_id=tokenizer.pad_token_id)[0]
paper_ig = LayerIntegratedGradients(
    lambda input_ids: last_token_logits(model, input_ids), model.get_input_embeddings()
)
scores_ig = paper_ig.attribute(ids, baselines=tokenizer.pad_token_id, target=answer_id, n_steps=32)
scores_ig = scores_ig.sum(-1)[0].detach()
print(f"{'token':>8} {'GIM':>8} {'IG':>8}")
for tok, a, b in zip(tokenizer.convert_ids_to_tokens(ids[0]), scores.tolist(), scores_ig.tolist()):
    print(f"{tok:>8} {a:8.3f} {b:8.3f}")
print(f"done in {time.perf_counter() - START:.1f}s")
