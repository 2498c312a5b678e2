"""CPU inference throughput: vitkit vs transformers' ViT (sdpa, eager) and timm when importable.

Thin wrapper around :mod:`vitkit.tools.bench` (the same as ``vitkit bench``); see that module for the method
(same process, identical weights, alternating rounds, contention-checked medians, per-case peak RSS in child
processes, matmul peaks measured in-process).

    python benchmarks/bench_inference.py                       # ViT-S/16 + ViT-B/16, batch 1 and 32, fp32 + bf16
    python benchmarks/bench_inference.py --quick               # ViT-S only, no compile / RSS: a smoke run
    python benchmarks/bench_inference.py --markdown results.md --json results.json
"""

from __future__ import annotations

import sys

from vitkit.tools.bench import bench_main

if __name__ == "__main__":
    sys.exit(bench_main(sys.argv[1:]))
