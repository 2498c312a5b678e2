"""CPU inference throughput: vitkit vs transformers' ViT (sdpa, eager) and timm when importable.

Thin wrapper around :mod:`vitkit.tools.bench` (the same as ``vitkit bench``); see that module for the method
(same process, identical weights, alternating rounds, contention-checked medians, per-case peak RSS in child
processes, matmul peaks measured in-process).

    python benchmarks/bench_inference.py --results benchmarks/results/inference.jsonl   # ViT-S/16 + ViT-B/16, ...
    python benchmarks/bench_inference.py --quick               # ViT-S only, no compile / RSS: a smoke run
    python benchmarks/bench_inference.py --markdown results.md --json results.json

With ``--results`` every sample is appended to that file; ``render_inference`` (``vitkit report``, marker kind
``script``) rebuilds the tables of benchmarks/RESULTS.md from it.
"""

from __future__ import annotations

import sys
from pathlib import Path

from vitkit.tools.ablate import read_results
from vitkit.tools.bench import bench_main, format_summary, format_table, result_from_records


def render_inference(doc_dir: str | Path, plots: bool = True, results: str = "results/inference.jsonl",
                     run: str = "latest", part: str = "summary") -> str:
    """``part=summary``: best peer vs vitkit eager / compiled per cell; ``part=full``: every case, the peaks,
    kernels and accuracy. From the records of run ``run`` alone."""
    result = result_from_records(read_results(Path(doc_dir) / results), run)
    if part == "summary":
        m = result["meta"]
        return (f"Run {m['run_id']}: {m['machine']['cpu']} ({m['machine']['cores']} logical CPUs; "
                f"{m['machine']['cpu_flags']}; AMX {'yes' if m['machine']['amx'] else 'no'}), {m['threads']} "
                f"threads, torch {m['torch']}, transformers {m.get('transformers', '-')}; median of "
                f"{m['settings']['samples']} kept samples of ≥ {m['settings']['min_sample_s']} s per case, samples "
                f"with more than {100 * m['settings']['max_contention']:.0f}% of the CPU taken by other processes "
                f"discarded and re-taken; {m['wall_s'] / 60:.0f} min in all.\n\n" + format_summary(result))
    return format_table(result)


if __name__ == "__main__":
    sys.exit(bench_main(sys.argv[1:]))
