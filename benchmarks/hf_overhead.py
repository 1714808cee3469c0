r"""GIM's cost on Hugging Face models against Captum's ``LayerGradientXActivation``.

Two tiny-width, several-layer models built from configs (random weights, no hub), both
with ``attn_implementation="sdpa"``:

- ``bert``: ``BertForSequenceClassification``, 4 layers x 256 wide, 4 heads;
- ``llama``: ``LlamaForCausalLM``, 4 layers x 256 wide, 8 query / 4 key-value heads
  (grouped-query attention), SwiGLU MLP, target = one logit at the last position.

Both methods attribute at the embedding layer with one forward and one backward
(``baselines=None``): ``LayerGradientXActivation`` (the reference) and ``LayerGIM``.
``LayerGIM + baseline`` adds the paper's baseline (a gradient-free forward that stops at
the embedding layer).
Methods run once per round in a rotating order; wall times first, then process CPU times
(less sensitive to other processes on a shared machine), then peak memory
(``captum_gim.evaluation.resources.PeakMemory``: CPU, the kernel's resident-set
high-water mark with glibc returning freed blocks; CUDA, the allocator's peak). The table gives medians and
ratios to ``LayerGradientXActivation``; the goal is within 1.5x at sequence 512 on CPU.

Run: ``.venv/bin/python benchmarks/hf_overhead.py [--seq 512] [--rounds 5] [--json out.json]``
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
from typing import Callable, Dict, List, Tuple

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import transformers  # noqa: E402
from captum.attr import LayerGradientXActivation  # noqa: E402
from overhead import (  # noqa: E402
    interleaved, measure_cpu_time, measure_memory, measure_time, save_json,
)

from captum_gim import LayerGIM  # noqa: E402
from captum_gim.evaluation.resources import memory_method  # noqa: E402


def build(kind: str, width: int, layers: int, seq: int, device: str) -> Tuple[nn.Module, Callable, int]:
    torch.manual_seed(0)
    common = dict(
        hidden_size=width,
        num_hidden_layers=layers,
        intermediate_size=4 * width if kind == "bert" else int(2.6875 * width),
        max_position_embeddings=max(seq, 512),
        attn_implementation="sdpa",
    )
    if kind == "bert":
        cfg = transformers.BertConfig(vocab_size=1000, num_attention_heads=4, num_labels=3, **common)
        model = transformers.BertForSequenceClassification(cfg)

        def fwd(ids: torch.Tensor) -> torch.Tensor:
            return model(input_ids=ids).logits

        target = 1
    else:
        cfg = transformers.LlamaConfig(
            vocab_size=1000, num_attention_heads=8, num_key_value_heads=4, **common
        )
        model = transformers.LlamaForCausalLM(cfg)

        def fwd(ids: torch.Tensor) -> torch.Tensor:
            return model(input_ids=ids, use_cache=False).logits[:, -1]

        target = 7
    return model.to(device).eval(), fwd, target


def make_methods(kind: str, args: argparse.Namespace) -> Dict[str, Callable[[], torch.Tensor]]:
    model, fwd, target = build(kind, args.width, args.layers, args.seq, args.device)
    emb = model.get_input_embeddings()
    ids = torch.randint(4, 1000, (args.batch, args.seq), device=args.device)
    base = torch.zeros_like(ids)
    return {
        "LayerGradientXActivation": lambda: LayerGradientXActivation(fwd, emb).attribute(
            ids, target=target
        ),
        "LayerGIM": lambda: LayerGIM(fwd, emb, model=model).attribute(ids, target=target),
        "LayerGIM + baseline": lambda: LayerGIM(fwd, emb, model=model).attribute(
            ids, baselines=base, target=target
        ),
    }


def main(argv: List[str] | None = None) -> Dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="bert,llama")
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    kinds = [k.strip() for k in args.models.split(",")]
    methods = {k: make_methods(k, args) for k in kinds}
    for per_model in methods.values():  # warm-up
        for fn in per_model.values():
            fn()
    # time first, with the allocator as users run it ...
    times = {k: interleaved(methods[k], args.rounds, measure_time, args.device) for k in kinds}
    cpu = {k: interleaved(methods[k], args.rounds, measure_cpu_time, args.device) for k in kinds}
    # ... then memory (PeakMemory changes glibc's allocation policy while it measures)
    mems = {
        k: interleaved(methods[k], max(2, args.rounds // 2), measure_memory, args.device)
        for k in kinds
    }
    rows: List[Dict[str, object]] = []
    ref = "LayerGradientXActivation"
    for k in kinds:
        ref_t = statistics.median(times[k][ref])
        ref_c = statistics.median(cpu[k][ref])
        ref_m = max(1.0, statistics.median(mems[k][ref]))
        for name in methods[k]:
            t = statistics.median(times[k][name])
            c = statistics.median(cpu[k][name])
            m = statistics.median(mems[k][name])
            rows.append(
                {
                    "model": k,
                    "method": name,
                    "median_time_s": t,
                    "time_ratio": t / ref_t,
                    "median_cpu_s": c,
                    "cpu_ratio": c / ref_c,
                    "peak_mem_mib": m / 2**20,
                    "mem_ratio": m / ref_m,
                }
            )

    print(
        f"models: {args.layers} layers x {args.width} wide, sdpa; input {args.batch} x {args.seq}; "
        f"device {args.device}; {args.rounds} interleaved rounds; torch {torch.__version__}, "
        f"transformers {transformers.__version__}, {platform.machine()}, "
        f"{torch.get_num_threads()} threads"
    )
    print(
        f"{'model':6s} {'method':26s} {'wall s':>8s} {'x LGxA':>7s} {'cpu s':>8s} {'x LGxA':>7s} "
        f"{'peak MiB':>9s} {'x LGxA':>7s}"
    )
    for r in rows:
        print(
            f"{r['model']:6s} {r['method']:26s} {r['median_time_s']:8.3f} {r['time_ratio']:7.2f} "
            f"{r['median_cpu_s']:8.3f} {r['cpu_ratio']:7.2f} {r['peak_mem_mib']:9.1f} "
            f"{r['mem_ratio']:7.2f}"
        )
    method = "PeakMemory" if memory_method(torch.device(args.device)) else "not measurable here"
    print(f"memory: {method} (captum_gim.evaluation.resources), one call per round")
    result = {"settings": vars(args), "rows": rows}
    save_json(result, args.json)
    return result


if __name__ == "__main__":
    main()
