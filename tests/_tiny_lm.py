"""Tiny Hugging Face language models built offline for the causal-LM, inseq and
device-map tests: seeded random weights, a word-level tokenizer made with ``tokenizers``.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import torch

#: the test vocabulary; sentences below use only these words
WORDS: List[str] = (
    "the a cat dog sat on mat rug ran to park home is was big small red blue and "
    "it then saw bird tree under over quick brown fox jumps lazy".split()
)
SPECIALS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]


def word_tokenizer(bos: bool = False, pad: bool = True):
    r"""A ``PreTrainedTokenizerFast`` over :data:`WORDS` (WordLevel + Whitespace);
    with ``bos=True`` it prepends ``[BOS]`` like Llama's tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="[BOS] $A", pair="[BOS] $A $B", special_tokens=[("[BOS]", vocab["[BOS]"])]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]" if pad else None,
        bos_token="[BOS]",
        eos_token="[EOS]",
    )


def vocab_size() -> int:
    return len(SPECIALS) + len(WORDS)


def tiny_llama(seed: int = 0, layers: int = 2):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=0, bos_token_id=2, eos_token_id=3, tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0, layers: int = 2):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        vocab_size=vocab_size(), n_embd=32, n_layer=layers, n_head=4, n_positions=64,
        bos_token_id=2, eos_token_id=3,
    )
    return transformers.GPT2LMHeadModel(cfg).eval()


def save(model, path: Path, tokenizer=None) -> Path:
    r"""``save_pretrained`` the model (and the tokenizer, if given) into ``path``."""
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    return path
