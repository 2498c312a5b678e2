"""CPU latency of EfficientViT against ViT and Swin at Fashion-MNIST size, in one process (for docs/efficient.md).

Random-weight models (seeded), fp32 eager under ``torch.inference_mode``, timed in alternating rotating rounds by
:func:`vitkit.tools.timing.time_alternating` (samples with more than ``--max-contention`` of the CPU taken by other
processes discarded); the table gives the median ms per batch and the ratio to the first model.

    python benchmarks/bench_efficientvit.py                       # batch 1 and 64, all cores
    python benchmarks/bench_efficientvit.py --batch 64 --model efficientvit_fmnist_tiny --model vit_fmnist_tiny
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

from vitkit.models import create_model
from vitkit.tools.inference import cpu_flags
from vitkit.tools.timing import Candidate, ContentionMeter, machine_load, time_alternating, wait_for_quiet

DEFAULT_MODELS = ["efficientvit_fmnist_tiny", "vit_fmnist_tiny", "vit_fmnist_small", "swin_fmnist_tiny"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", default=None, help="registry names (the first is the reference)")
    ap.add_argument("--batch", type=int, action="append", default=None, help="batch sizes (default 1 and 64)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--min-sample-seconds", type=float, default=0.5)
    ap.add_argument("--max-contention", type=float, default=0.2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = args.model or DEFAULT_MODELS
    meter = ContentionMeter()
    flags = cpu_flags()
    print(f"{os.cpu_count()} logical CPUs, avx512_bf16 {'avx512_bf16' in flags}, AMX {'amx_bf16' in flags}; "
          f"{args.threads} threads; torch {torch.__version__}; 1-min load {machine_load()}")
    print("\n| model | params | batch | ms/batch | img/s | × first |\n|---|---:|---:|---:|---:|---:|")
    for batch in args.batch or [1, 64]:
        cands, params = [], {}
        for name in names:
            torch.manual_seed(0)
            model = create_model(name).eval()
            c, h, w = model.pretrained_cfg["input_size"]
            x = torch.randn(batch, c, h, w, generator=torch.Generator().manual_seed(batch))
            params[name] = sum(p.numel() for p in model.parameters()) / 1e6
            cands.append(Candidate(name, "vitkit", "fp32", lambda m=model, x=x: m(x), False))
        if args.max_contention < 1:
            wait_for_quiet(meter, args.max_contention, max_wait_s=120)
        with torch.inference_mode():
            time_alternating(cands, samples=args.repeats, min_sample_s=args.min_sample_seconds,
                             max_contention=args.max_contention, meter=meter)
        med = {cand.name: statistics.median(cand.samples) for cand in cands}
        first = med[names[0]]
        for name in names:
            print(f"| {name} | {params[name]:.2f}M | {batch} | {1e3 * med[name]:.2f} | {batch / med[name]:.0f} | "
                  f"{first / med[name]:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
