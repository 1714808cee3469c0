r"""GIM's memory and time at long contexts, against Captum's ``LayerGradientXActivation``.

A Llama-architecture causal LM built from a config (random weights, no hub):
``--layers`` x ``--width`` wide, 8 query / 4 key-value heads, SwiGLU MLP,
``attn_implementation="sdpa"``, float32. The explained output is one logit at the last
position, attributed at the embedding layer with one forward and one backward pass by each
method, at every sequence length of ``--seqs`` (batch 1).

GIM's attention backward recomputes the attention probabilities from q, k and v in chunks
of heads and blocks of query rows (``captum_gim.ops.attention``), so it never holds a full
``heads x L x L`` matrix; this measures what that costs and saves.

Peak memory is ``captum_gim.evaluation.resources.PeakMemory`` (CPU: the kernel's
resident-set high-water mark above the level at the call; CUDA: the allocator's peak), one
call per method and length; time is the median of ``--rounds`` calls, in a rotating order
(``benchmarks/overhead.py``'s ``interleaved``).

Run: ``.venv/bin/python benchmarks/long_context.py [--seqs 512,1024,2048,4096] [--json out.json]``
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

import transformers  # noqa: E402
from captum.attr import LayerGradientXActivation  # noqa: E402

from captum_gim import LayerGIM  # noqa: E402
from overhead import interleaved, measure_memory, measure_time, save_json  # noqa: E402


def build(width: int, layers: int, max_len: int, device: str):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=1000, hidden_size=width, intermediate_size=int(2.6875 * width),
        num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4,
        max_position_embeddings=max_len, attn_implementation="sdpa",
    )
    model = transformers.LlamaForCausalLM(cfg).to(device).eval()

    def forward(ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids, use_cache=False).logits[:, -1]

    return model, forward


def main(argv: Optional[List[str]] = None) -> Dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seqs", default="512,1024,2048,4096")
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    seqs = [int(s) for s in args.seqs.split(",")]
    model, forward = build(args.width, args.layers, max(seqs), args.device)
    emb = model.get_input_embeddings()
    methods: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "LayerGradientXActivation": lambda ids: LayerGradientXActivation(forward, emb).attribute(
            ids, target=7),
        "LayerGIM": lambda ids: LayerGIM(forward, emb, model=model).attribute(ids, target=7),
    }
    device = torch.device(args.device)
    rows = []
    for L in seqs:
        ids = torch.randint(4, 1000, (1, L), generator=torch.Generator().manual_seed(L)).to(device)
        calls = {name: (lambda fn=fn, ids=ids: fn(ids)) for name, fn in methods.items()}
        for fn in calls.values():  # warm-up
            fn()
        peaks = interleaved(calls, 1, measure_memory, args.device)
        mem = {name: v[0] / 2**20 for name, v in peaks.items()}
        times = interleaved(calls, args.rounds, measure_time, args.device)
        ref = "LayerGradientXActivation"
        for name in methods:
            t = statistics.median(times[name])
            rows.append(dict(seq=L, method=name, median_s=t,
                             time_ratio=t / statistics.median(times[ref]),
                             peak_mib=mem[name], mem_ratio=mem[name] / mem[ref]))
    print(f"Llama {args.layers} layers x {args.width} wide (8 q / 4 kv heads, sdpa, float32), "
          f"batch 1; device {args.device}; torch {torch.__version__}, transformers "
          f"{transformers.__version__}, {platform.machine()}, {torch.get_num_threads()} threads")
    print(f"{'seq':>6s} {'method':26s} {'time s':>8s} {'x LGxA':>7s} {'peak MiB':>9s} {'x LGxA':>7s}")
    for r in rows:
        print(f"{r['seq']:6d} {r['method']:26s} {r['median_s']:8.3f} {r['time_ratio']:7.2f} "
              f"{r['peak_mib']:9.1f} {r['mem_ratio']:7.2f}")
    result = {"settings": vars(args), "rows": rows}
    save_json(result, args.json)
    return result


if __name__ == "__main__":
    main()
