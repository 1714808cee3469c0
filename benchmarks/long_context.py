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
call per method and length, in a fresh order per length; time is the median of
``--rounds`` calls.

Run: ``.venv/bin/python benchmarks/long_context.py [--seqs 512,1024,2048,4096] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import transformers  # noqa: E402
from captum.attr import LayerGradientXActivation  # noqa: E402

from captum_gim import LayerGIM  # noqa: E402
from captum_gim.evaluation.resources import PeakMemory  # noqa: E402


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
    for i, L in enumerate(seqs):
        ids = torch.randint(4, 1000, (1, L), generator=torch.Generator().manual_seed(L)).to(device)
        names = list(methods) if i % 2 == 0 else list(reversed(methods))
        for name in names:  # warm-up
            methods[name](ids)
        mem: Dict[str, float] = {}
        for name in names:
            peak = PeakMemory(device)
            with peak.measure():
                out = methods[name](ids)
            del out
            mem[name] = float("nan") if peak.peak_bytes is None else peak.peak_bytes / 2**20
        times: Dict[str, List[float]] = {n: [] for n in names}
        for r in range(args.rounds):
            for name in names if r % 2 == 0 else list(reversed(names)):
                t0 = time.perf_counter()
                methods[name](ids)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - t0)
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
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
