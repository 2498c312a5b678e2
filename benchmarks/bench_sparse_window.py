"""Latency of sparse window attention on Fashion-MNIST scenes: equal-size groups vs padded windows vs dense.

One process, ``swin_scenes_tiny`` with every stage sparse (the models of the ``sparse_window`` study,
``configs/scenes/sparse_window.yaml``), fp32 eager under ``torch.inference_mode``, on a batch of real test scenes
(1-4 Fashion-MNIST items on an empty 112×112 canvas), timed in alternating rotating rounds by
:func:`vitkit.tools.timing.time_alternating` (samples with more than ``--max-contention`` of the CPU taken by other
processes discarded). At each kept share of the patches the two groupings compute the same tokens with the same
weights; only how they are grouped differs:

* ``equal``: the kept tokens, window-sorted, cut into groups of exactly M² (FlatFormer);
* ``window``: one group per non-empty window, padded to M² (the baseline FlatFormer replaces).

Besides time, each cell records what the groupings compute: kept tokens and attention slots (groups × M²) per
stage, so the padding's waste is a count, not only a timing.

    python benchmarks/bench_sparse_window.py --batch 64 --results docs/window/sparse_latency.jsonl

Each cell is one JSON record (``record: timing``) with the machine, the 1-min load and ``invocation`` (ratios are
only taken within one invocation); :func:`render_latency` builds the doc's table from them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

from vitkit.models import create_model
from vitkit.tools.timing import (
    Candidate,
    ContentionMeter,
    append_jsonl,
    machine_load,
    time_alternating,
    utc_now,
    wait_for_quiet,
)

MODEL = "swin_scenes_tiny"
KEEPS = (0.7, 0.5, 0.3)


def load_scenes(batch: int) -> torch.Tensor:
    """The first ``batch`` test scenes of the study's data (as in configs/scenes/sparse_window.yaml), normalised
    as the model expects."""
    from vitkit.data import build_dataset
    from vitkit.data.constants import FMNIST_MEAN, FMNIST_STD

    data = build_dataset("fmnist_scenes", "test", num_scenes=20000, num_eval_scenes=2000)
    images = data.images[:batch].float()
    images = images / 255 if data.images.dtype == torch.uint8 else images
    return (images - FMNIST_MEAN[0]) / FMNIST_STD[0]


def variants(keeps: tuple[float, ...]) -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = [("dense", {})]
    for keep in keeps:
        for grouping in ("equal", "window"):
            out.append((f"{grouping}_{round(100 * keep)}",
                        {"sparse_stages": [0, 1, 2], "token_keep_ratio": keep, "sparse_grouping": grouping}))
    return out


def work(model: torch.nn.Module, x: torch.Tensor) -> dict[str, list[int]]:
    """Kept tokens and attention slots (groups × group size) per stage, for one batch."""
    if not model.sparse_stages:
        maps = [x.shape[-1] // model.patch_size // 2**i for i in range(model.num_stages)]
        m = model.window_size
        slots = [x.shape[0] * (-(-s // m) * m) ** 2 for s in maps]  # padded dense windows
        return {"tokens": [x.shape[0] * s * s for s in maps], "slots": slots}
    keeps = model._stage_keeps(model.content_keep(x), model.embed(x))
    tokens, slots = [], []
    for stage, keep in zip(model.stages, keeps):
        b, r, c = keep.nonzero(as_tuple=True)
        layout = stage.blocks[0].layout(torch.stack([b, r, c], 1), x.shape[0])
        tokens.append(int(keep.sum()))
        slots.append(layout.num_groups * layout.group_size)
    return {"tokens": tokens, "slots": slots}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--keep", type=float, action="append", default=None, help="kept shares (default 0.7 0.5 0.3)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--min-sample-seconds", type=float, default=0.5)
    ap.add_argument("--max-contention", type=float, default=0.2)
    ap.add_argument("--results", default=None, help="append every cell to this JSON-lines file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    x = load_scenes(args.batch)
    invocation = utc_now()
    cands, counts = [], {}
    for name, flags in variants(tuple(args.keep or KEEPS)):
        torch.manual_seed(0)
        model = create_model(MODEL, **flags).eval()
        with torch.inference_mode():
            counts[name] = work(model, x)
        cands.append(Candidate(name, "vitkit", "fp32", lambda m=model: m(x), False))
    meter = ContentionMeter()
    if args.max_contention < 1:
        wait_for_quiet(meter, args.max_contention, max_wait_s=120)
    load_before = machine_load()
    time_alternating(cands, samples=args.repeats, min_sample_s=args.min_sample_seconds,
                     max_contention=args.max_contention, meter=meter)
    med = {c.name: statistics.median(c.samples) for c in cands}
    print("| variant | ms/batch | × dense | tokens per stage | attention slots per stage |\n|---|---:|---:|---|---|")
    for c in cands:
        print(f"| {c.name} | {1e3 * med[c.name]:.1f} | {med['dense'] / med[c.name]:.2f} | "
              f"{counts[c.name]['tokens']} | {counts[c.name]['slots']} |")
    if args.results:
        from vitkit.tools.ablate import machine_facts

        machine, load_after, finished = machine_facts(), machine_load(), utc_now()
        append_jsonl(args.results, [{
            "study": "sparse_window", "record": "timing", "variant": c.name, "model": MODEL,
            "batch": args.batch, "threads": args.threads, "precision": "fp32", "ms": 1e3 * med[c.name],
            "samples": len(c.samples), "contention": [round(v, 4) for v in c.contention if v == v],
            "discarded": c.discarded, "noisy": "noisy" in c.note, "max_contention": args.max_contention,
            "min_sample_s": args.min_sample_seconds, **counts[c.name], "machine": machine,
            "load_1m": [load_before, load_after], "invocation": invocation, "finished_at": finished}
            for c in cands])
        print(f"appended {len(cands)} records to {args.results}")
    return 0


# ----------------------------------------------------------------------------------------------- doc block
def render_latency(doc_dir: str | Path, plots: bool = True, results: str = "window/sparse_latency.jsonl",
                   invocation: str | None = None) -> str:
    """The latency table of one invocation (the latest by default): ms per batch, × dense, × the padded windows
    at the same kept share, and the tokens / attention slots of the first stage."""
    from vitkit.tools.ablate import read_results

    records = [r for r in read_results(Path(doc_dir) / results) if r.get("record") == "timing"]
    if not records:
        raise ValueError(f"{results}: no timing records")
    invocation = invocation or records[-1]["invocation"]
    rs = {r["variant"]: r for r in records if r["invocation"] == invocation}
    dense = rs["dense"]["ms"]
    out = ["| variant | ms per batch | × dense | × padded windows, same share | stage-1 tokens | stage-1 attention "
           "slots | median contention |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in rs.items():
        twin = rs.get("window_" + name.removeprefix("equal_")) if name.startswith("equal_") else None
        cont = statistics.median(r["contention"]) if r["contention"] else None
        cells = [name, f"{r['ms']:.1f}" + (" (noisy)" if r["noisy"] else ""), f"{dense / r['ms']:.2f}",
                 f"{twin['ms'] / r['ms']:.2f}" if twin else "—", f"{r['tokens'][0]:,}", f"{r['slots'][0]:,}",
                 f"{100 * cont:.0f}%" if cont is not None else "—"]
        out.append("| " + " | ".join(cells) + " |")
    first = next(iter(rs.values()))
    m = first["machine"]
    load = " → ".join(f"{x:.2f}" for x in first["load_1m"] if x is not None)
    return "\n".join(out) + (
        f"\n\nInvocation {invocation}: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, {first['threads']} "
        f"threads, batch {first['batch']} test scenes, fp32, median of {first['samples']} kept samples of ≥ "
        f"{first['min_sample_s']} s per variant (samples with more than {100 * first['max_contention']:.0f}% of the "
        f"CPU taken by other processes discarded), 1-min load {load}.")


if __name__ == "__main__":
    sys.exit(main())
