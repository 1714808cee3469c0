r"""GIM's cost against Captum's own methods, measured in one process, interleaved.

Model: a ``torch.nn.TransformerEncoder`` classifier (default 4 layers x 384 wide, 6 heads,
sequence 128). Methods: ``InputXGradient`` (the reference: one forward and one backward),
``GIMAttribution`` and ``IntegratedGradients(n_steps=50)``. Each round runs every method
once in a rotating order. Times are taken first, with the allocator as users run it; then
memory, as the peak above the pre-call level, measured by
``captum_gim.evaluation.resources.PeakMemory`` (CUDA: the allocator's peak; Linux CPU: the
kernel's resident-set high-water mark, with glibc handing freed blocks back so that it
follows live tensors). The report gives medians and ratios to InputXGradient.

Run: ``.venv/bin/python benchmarks/overhead.py [--rounds 5] [--device cpu] [--json out.json]``
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
from torch import nn

from captum.attr import InputXGradient, IntegratedGradients

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from captum_gim import GIMAttribution  # noqa: E402
from captum_gim.evaluation.resources import PeakMemory, memory_method, timed  # noqa: E402


class EncoderClassifier(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, classes: int = 4) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.encoder(x)).mean(1))


def measure_time(fn: Callable[[], torch.Tensor], device: str) -> float:
    return timed(fn, torch.device(device))[1]


def measure_memory(fn: Callable[[], torch.Tensor], device: str) -> float:
    """Peak bytes above the level at the call (see ``captum_gim.evaluation.resources``);
    NaN where no measurement is available."""
    peak = PeakMemory(torch.device(device))
    with peak.measure():
        out = fn()
    del out
    return float("nan") if peak.peak_bytes is None else float(peak.peak_bytes)


def measure_cpu_time(fn: Callable[[], torch.Tensor], device: str) -> float:
    """CPU seconds of this process (less sensitive than wall time to a busy machine)."""
    t0 = time.process_time()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    dt = time.process_time() - t0
    del out
    return dt


def save_json(result: Dict[str, object], path: Optional[str]) -> None:
    """Write a benchmark's result to ``path`` (nothing when it is None)."""
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)


def interleaved(
    methods: Dict[str, Callable[[], torch.Tensor]], rounds: int, probe: Callable[..., float], device: str
) -> Dict[str, List[float]]:
    """Run every method once per round, rotating the order, and collect ``probe``'s value."""
    names = list(methods)
    samples: Dict[str, List[float]] = {k: [] for k in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            samples[name].append(probe(methods[name], device))
    return samples


def main(argv: List[str] | None = None) -> Dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--ig-steps", type=int, default=50)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    model = EncoderClassifier(args.width, args.layers, args.heads).to(args.device).eval()
    x = torch.randn(args.batch, args.seq, args.width, device=args.device)
    methods: Dict[str, Callable[[], torch.Tensor]] = {
        "InputXGradient": lambda: InputXGradient(model).attribute(x, target=1),
        "GIM": lambda: GIMAttribution(model).attribute(x, target=1),
        f"IntegratedGradients({args.ig_steps})": lambda: IntegratedGradients(model).attribute(
            x, target=1, n_steps=args.ig_steps, internal_batch_size=args.batch * 10
        ),
    }
    for fn in methods.values():  # warm-up
        fn()
    # time first, with the allocator as users run it ...
    times = interleaved(methods, args.rounds, measure_time, args.device)
    # ... then memory (PeakMemory changes glibc's allocation policy while it measures)
    mems = interleaved(methods, max(2, args.rounds // 2), measure_memory, args.device)

    names = list(methods)
    ref_t = statistics.median(times["InputXGradient"])
    ref_m = max(1.0, statistics.median(mems["InputXGradient"]))
    rows = []
    for name in names:
        t = statistics.median(times[name])
        m = statistics.median(mems[name])
        rows.append(
            {
                "method": name,
                "median_time_s": t,
                "time_ratio_vs_ixg": t / ref_t,
                "peak_mem_mib": m / 2**20,
                "mem_ratio_vs_ixg": m / ref_m,
            }
        )
    print(
        f"model: TransformerEncoder {args.layers} layers x {args.width} wide, {args.heads} heads; "
        f"input {args.batch} x {args.seq}; device {args.device}; {args.rounds} interleaved rounds; "
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"{'method':28s} {'median s':>9s} {'x IxG':>7s} {'peak MiB':>9s} {'x IxG':>7s}")
    for row in rows:
        print(
            f"{row['method']:28s} {row['median_time_s']:9.3f} {row['time_ratio_vs_ixg']:7.2f} "
            f"{row['peak_mem_mib']:9.1f} {row['mem_ratio_vs_ixg']:7.2f}"
        )
    method = "PeakMemory" if memory_method(torch.device(args.device)) else "not measurable here"
    print(f"memory: {method} (captum_gim.evaluation.resources), one call per round")
    result = {"settings": vars(args), "torch": torch.__version__, "rows": rows}
    save_json(result, args.json)
    return result


if __name__ == "__main__":
    main()
