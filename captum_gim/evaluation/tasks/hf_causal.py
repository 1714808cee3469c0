r"""Causal language models in ``captum-gim compare``, the paper's way (Edin et al., 2025).

For a ``*ForCausalLM`` (or ``*LMHeadModel``) checkpoint directory:

- ``--inputs`` is a JSONL file of ``{"prompt": ..., "answer": ...}`` objects (``answer``
  optional) or a text file with one prompt per line; a prompt without an answer is
  explained for the model's own greedy next token.
- The attributed output is the raw logit of the answer token at the last position. An
  answer of several tokens is explained through the sum of its tokens' log-probabilities,
  teacher-forced after the prompt (the report says which, per example and overall).
- The baseline is one token at every prompt position: ``--baseline-token`` if given,
  else the pad token, else EOS (of the tokenizer, else of the model config).
- Faithfulness replaces prompt tokens by that baseline token (the tokens the tokenizer
  added, e.g. BOS, are not ranked and never replaced).

Every method attributes at the word-embedding output (``inputs_embeds``), so GIM's score
of a prompt token is ``sum over hidden of GIM-grad * (emb(id) - emb(baseline id))``: what
:class:`~captum_gim.LayerGIM` on ``model.get_input_embeddings()`` gives for token ids.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .hf_load import check_known_tokens, load_tokenizer, quiet_transformers
from ..types import Example, Task, output_score
from ._common import frozen

__all__ = [
    "AnswerScore",
    "Prompt",
    "read_prompts",
    "is_causal_lm",
    "resolve_baseline_token",
    "causal_lm_task",
    "TARGET_LOGIT",
    "TARGET_LOGPROB",
]

#: target kinds, as written in the report (``task.info["target"]`` and per example)
TARGET_LOGIT = "answer-token logit at the last position"
TARGET_LOGPROB = "sum of the answer tokens' log-probabilities (teacher-forced)"


class AnswerScore(nn.Module):
    r"""What a causal LM's comparison explains, as a function of the prompt embeddings.

    ``forward(inputs_embeds, attention_mask)``: the raw logits at the last position,
    ``(batch, vocab)`` (``target`` = the answer token id).
    ``forward(inputs_embeds, attention_mask, answer_embeds, answer_ids)``: the sum of the
    answer tokens' log-probabilities, each predicted from the prompt and the answer
    tokens before it (teacher forcing), ``(batch,)``; the answer embeddings are fixed,
    only the prompt is attributed.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        inputs_embeds: Tensor,
        attention_mask: Tensor,
        answer_embeds: Optional[Tensor] = None,
        answer_ids: Optional[Tensor] = None,
    ) -> Tensor:
        if answer_ids is None or answer_embeds is None:
            out = self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                             use_cache=False)
            return out.logits[:, -1]
        batch, n_prompt = inputs_embeds.shape[:2]
        n_answer = answer_ids.shape[-1]
        embeds = torch.cat([inputs_embeds, answer_embeds.expand(batch, -1, -1)], dim=1)
        mask = torch.cat([attention_mask, attention_mask.new_ones(batch, n_answer)], dim=1)
        logits = self.model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).logits
        # position p predicts token p + 1: the answer's tokens come from n_prompt - 1 on
        pred = logits[:, n_prompt - 1 : n_prompt - 1 + n_answer].float().log_softmax(-1)
        ids = answer_ids.expand(batch, -1).to(pred.device)
        return pred.gather(-1, ids.unsqueeze(-1)).squeeze(-1).sum(-1)


class Prompt:
    r"""One input line: a prompt and, optionally, the answer to explain."""

    __slots__ = ("prompt", "answer", "where")

    def __init__(self, prompt: str, answer: Optional[str], where: str) -> None:
        self.prompt, self.answer, self.where = prompt, answer, where


def read_prompts(path: str) -> List[Prompt]:
    r"""The prompts of ``path``: JSONL of ``{"prompt": ..., "answer": ...}`` (``answer``
    optional; the file ends in ``.jsonl`` or its first line starts with ``{``), else one
    prompt per line. Blank lines and lines starting with ``#`` are skipped."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    content = [(n, line) for n, line in enumerate(lines, 1)
               if line.strip() and not line.lstrip().startswith("#")]
    if not content:
        raise ValueError(f"{path} holds no prompts")
    is_jsonl = path.endswith(".jsonl") or content[0][1].lstrip().startswith("{")
    out = []
    for n, line in content:
        where = f"{path}:{n}"
        if not is_jsonl:
            out.append(Prompt(line.strip(), None, where))
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not a JSON object ({e.msg}); each line of a JSONL "
                             'file is {"prompt": "...", "answer": "..."}') from e
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
            raise ValueError(f'{where}: expected {{"prompt": "...", "answer": "..."}} with a '
                             "string prompt")
        answer = obj.get("answer")
        if answer is not None and (not isinstance(answer, str) or not answer):
            raise ValueError(f"{where}: the answer must be a non-empty string (or left out, "
                             "for the model's greedy next token)")
        out.append(Prompt(obj["prompt"], answer, where))
    return out


def is_causal_lm(architectures: Sequence[str]) -> bool:
    r"""Whether a config's ``architectures`` name a causal language model (a class of
    transformers' causal-LM auto mapping, or one named ``...ForCausalLM`` /
    ``...LMHeadModel``)."""
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        known = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    except ImportError:  # pragma: no cover - transformers moved it
        known = set()
    return any(
        a.endswith(("ForCausalLM", "LMHeadModel")) or (a in known and "Conditional" not in a)
        for a in architectures
    )


def resolve_baseline_token(
    tokenizer: Any, config: Any, named: Optional[str] = None
) -> Tuple[int, str, str]:
    r"""The baseline token id, its text, and where it came from: ``named`` (a token of the
    vocabulary, or an id) if given, else the pad token, else EOS (the tokenizer's, else the
    model config's).

    Raises:
        ValueError: ``named`` is not in the vocabulary, or there is no pad or EOS token
            and no ``named`` one.
    """
    vocab_size = len(tokenizer)
    if named is not None:
        if named.strip().lstrip("-").isdigit():
            tid = int(named)
            if not 0 <= tid < vocab_size:
                raise ValueError(f"--baseline-token {named}: not a token id (0..{vocab_size - 1})")
        else:
            tid = tokenizer.convert_tokens_to_ids(named)
            if tid is None or (tid == tokenizer.unk_token_id and named != tokenizer.unk_token):
                raise ValueError(
                    f"--baseline-token {named!r} is not a token of the vocabulary; give a "
                    "token exactly as the tokenizer spells it, or its id"
                )
        return int(tid), str(tokenizer.convert_ids_to_tokens(int(tid))), "--baseline-token"
    for attr in ("pad", "eos"):
        tid = getattr(tokenizer, f"{attr}_token_id", None)
        if tid is None:
            tid = getattr(config, f"{attr}_token_id", None)
            if isinstance(tid, (list, tuple)):
                tid = tid[0] if tid else None
        if isinstance(tid, int) and 0 <= tid < vocab_size:
            return tid, str(tokenizer.convert_ids_to_tokens(tid)), f"{attr} token"
    raise ValueError(
        "the model has no pad and no EOS token to use as the baseline; name one with "
        "--baseline-token TOKEN (a token of the vocabulary, or its id)"
    )


def _special_mask(tokenizer: Any, ids: Sequence[int], special_tokens_mask: Any) -> Tensor:
    if special_tokens_mask is not None:
        return torch.as_tensor(special_tokens_mask[0], dtype=torch.bool)
    special = set(getattr(tokenizer, "all_special_ids", []) or []) - {tokenizer.unk_token_id}
    return torch.tensor([int(i) in special for i in ids], dtype=torch.bool)


def causal_lm_task(
    path: Path,
    inputs: Optional[str] = None,
    n_examples: int = 32,
    device: torch.device = torch.device("cpu"),
    max_length: int = 128,
    baseline_token: Optional[str] = None,
) -> Task:
    r"""A local causal language model on prompts, the paper's setting.

    Args:
        path (Path): the checkpoint directory (config, weights and tokenizer files).
        inputs (str): a JSONL file of ``{"prompt", "answer"}`` objects or a text file of
            prompts (see :func:`read_prompts`).
        n_examples (int): prompts to explain (the first ones).
        device (torch.device): where to run.
        max_length (int): prompt tokens kept (the last ones: the answer follows them).
        baseline_token (str, optional): the baseline token (default: pad, else EOS).

    Raises:
        ValueError: no ``inputs``, no usable tokenizer (see
            :func:`~captum_gim.evaluation.tasks.hf_load.load_tokenizer`), most input tokens
            unknown, an empty prompt, or no baseline token.
    """
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if inputs is None:
        raise ValueError(
            f"{path} is a causal language model: pass --inputs FILE, a JSONL file of "
            '{"prompt": "...", "answer": "..."} lines or a text file with one prompt per line '
            "(the answer is then the model's greedy next token)"
        )
    prompts = read_prompts(inputs)[:n_examples]
    tokenizer = load_tokenizer(path)
    texts = [p.prompt for p in prompts] + [p.answer for p in prompts if p.answer]
    check_known_tokens(tokenizer, texts, path)
    with quiet_transformers():
        hf = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True)
    base_id, base_tok, base_from = resolve_baseline_token(tokenizer, hf.config, baseline_token)
    emb_layer = hf.get_input_embeddings()
    model = frozen(AnswerScore(hf), device)
    tokenizer.truncation_side = "left"

    examples: List[Example] = []
    kinds: List[str] = []
    for p in prompts:
        enc = tokenizer(p.prompt, return_tensors="pt", truncation=True, max_length=max_length,
                        return_special_tokens_mask=True)
        ids = enc["input_ids"].to(device)
        if ids.shape[1] == 0:
            raise ValueError(f"{p.where}: the prompt has no tokens")
        special = _special_mask(tokenizer, ids[0].tolist(), enc.get("special_tokens_mask"))
        if bool(special.all()):
            raise ValueError(f"{p.where}: the prompt holds only special tokens; nothing to rank")
        mask = torch.ones_like(ids)
        with torch.no_grad():
            emb = emb_layer(ids)
            base = emb_layer(torch.full_like(ids, base_id))
        if p.answer is None:
            with torch.no_grad():
                answer_ids = [int(model(emb, mask).argmax(-1))]
            answer_from = "greedy"
        else:
            answer_ids = tokenizer(p.answer, add_special_tokens=False)["input_ids"]
            if not answer_ids:
                raise ValueError(f"{p.where}: the answer {p.answer!r} has no tokens")
            answer_from = "given"
        answer_text = tokenizer.decode(answer_ids)
        if len(answer_ids) == 1:
            target: Optional[int] = answer_ids[0]
            extra: Tuple[Any, ...] = (mask,)
            kind = TARGET_LOGIT
        else:
            a = torch.tensor([answer_ids], device=device)
            with torch.no_grad():
                a_emb = emb_layer(a)
            target, extra, kind = None, (mask, a_emb, a), TARGET_LOGPROB
        kinds.append(kind)
        examples.append(
            Example(
                inputs=(emb,),
                baselines=(base,),
                target=target,
                additional_forward_args=extra,
                valid=(~special,),
                unit_labels=tokenizer.convert_ids_to_tokens(ids[0].tolist()),
                true_label=f"answer ({answer_from})",
                target_label=f"{answer_text!r}: {kind}",
                text=f"{p.prompt} -> {answer_text}",
            )
        )
    target_kind = " / ".join(k for k in (TARGET_LOGIT, TARGET_LOGPROB) if k in kinds)
    archs = ", ".join(getattr(hf.config, "architectures", None) or [type(hf).__name__])
    return Task(
        name=path.name,
        description=(
            f"{path} ({archs}) as a causal language model: the {target_kind} of each prompt, "
            f"attributed to the prompt tokens; baseline: {base_tok!r} ({base_from}) at every "
            "prompt position."
        ),
        model=model,
        forward_func=model,  # through __call__, so forwards installed on the instance run
        reduce_dims=(1,),
        examples=examples,
        score_fn=output_score,
        score_name=" / ".join(
            name for name, k in (("answer-token logit", TARGET_LOGIT),
                                 ("sum of answer log-probs", TARGET_LOGPROB)) if k in kinds),
        unit_name="token",
        ground_truth=None,
        info={
            "checkpoint": str(path),
            "model_kind": "causal-lm",
            "target": target_kind,
            "targets": kinds,
            "baseline_token": base_tok,
            "baseline_token_id": base_id,
            "baseline_token_source": base_from,
            "answers": sorted({e.true_label for e in examples}),
            "n_parameters": int(sum(p.numel() for p in hf.parameters())),
            "attention_implementation": getattr(hf.config, "_attn_implementation", None),
        },
    )
