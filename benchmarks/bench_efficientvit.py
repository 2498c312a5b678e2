"""CPU latency of EfficientViT against ViT and Swin at Fashion-MNIST size, in one process (for docs/efficient.md).

Random-weight models (seeded), fp32 eager under ``torch.inference_mode``, timed in alternating rotating rounds by
:func:`vitkit.tools.timing.time_alternating` (samples with more than ``--max-contention`` of the CPU taken by other
processes discarded); the table gives the median ms per batch and the ratio to the first model.

    python benchmarks/bench_efficientvit.py                       # batch 1 and 64, all cores
    python benchmarks/bench_efficientvit.py --batch 64 --model efficientvit_fmnist_tiny --model vit_fmnist_tiny
    python benchmarks/bench_efficientvit.py --model efficientvit_fmnist_tiny \
        --model efficientvit_fmnist_tiny:local_dwconv=false --model "efficientvit_fmnist_tiny:scales=[]"

With ``--results FILE`` every timing cell is appended to FILE as a JSON record (``study: efficientvit``, ``record:
timing``: model, parameters, batch, median ms, img/s, kept samples, largest contention, discarded samples, the
machine, the 1-min load, and ``invocation``, the same for every cell of one command: ratios are only taken within
one batch of one invocation, the same alternating rounds). ``--train-seeds N`` also trains the accuracy comparison
of docs/efficient.md (``--train-model``, by default EfficientViT and the tiny ViT, with ``--recipe`` at seeds
0..N-1, one thread per run, a 10% validation split held out of the training images so that the test set is read
once, by the final model) and appends one ``record: train`` per run with every metric it reported (the record of
``vitkit ablate``); a run whose resolved configuration (``key``) is already in FILE is skipped, so more seeds train
only the new ones. The doc's re-run, in one command:

    python benchmarks/bench_efficientvit.py --train-seeds 2 --results docs/efficient/results.jsonl
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
from vitkit.tools.inference import cpu_flags
from vitkit.tools.timing import (
    Candidate,
    ContentionMeter,
    append_jsonl,
    machine_load,
    time_alternating,
    utc_now,
    wait_for_quiet,
)

DEFAULT_MODELS = ["efficientvit_fmnist_tiny", "vit_fmnist_tiny", "vit_fmnist_small", "swin_fmnist_tiny"]
TRAIN_MODELS = ["efficientvit_fmnist_tiny", "vit_fmnist_tiny"]
# the accuracy comparison's recipe settings beyond --recipe: one thread per run, test read once (docs/method.md §4)
TRAIN_OVERRIDES = ["train.threads=1", "data.val_fraction=0.1"]


def model_spec(text: str) -> tuple[str, dict[str, Any]]:
    """``NAME[:KEY=VALUE,...]``: a registry name and constructor overrides, values read as YAML
    (``efficientvit_fmnist_tiny:local_dwconv=false,scales=[]``); the whole text labels the timing."""
    import re

    import yaml

    name, _, rest = text.partition(":")
    kwargs = {}
    for item in re.split(r",(?![^\[]*\])", rest) if rest else []:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise argparse.ArgumentTypeError(f"--model {text!r}: {item!r} must look like KEY=VALUE")
        kwargs[key.strip()] = yaml.safe_load(value)
    return name, kwargs


def timing_record(cand: Candidate, batch: int, params_m: float, args: argparse.Namespace, machine: dict[str, Any],
                  invocation: str) -> dict[str, Any]:
    """One timing cell: the median of the kept samples and what the rounds saw."""
    med = statistics.median(cand.samples)
    seen = [c for c in getattr(cand, "contention", []) if c == c]  # NaN: never measured clean
    return {"study": "efficientvit", "record": "timing", "model": cand.name, "params_m": params_m, "batch": batch,
            "threads": args.threads, "precision": "fp32", "ms": 1e3 * med, "img_s": batch / med,
            "samples": len(cand.samples), "min_sample_s": args.min_sample_seconds,
            "max_contention": args.max_contention, "contention_max": max(seen) if seen else None,
            "discarded": cand.discarded, "noisy": "noisy" in cand.note, "machine": machine,
            "load_1m": machine_load(), "invocation": invocation,
            "finished_at": utc_now(),
            "source": "benchmarks/bench_efficientvit.py"}


def train_runs(args: argparse.Namespace) -> int:
    """Train every (model, seed) of the accuracy comparison not yet in ``--results``; one record per run."""
    from vitkit.engine.config import load_config
    from vitkit.tools.ablate import _run_record, read_results, run_key

    done = {r.get("key") for r in read_results(args.results) if r.get("study") == "efficientvit"}
    trained = 0
    for seed in range(args.train_seeds):
        for name in args.train_model or TRAIN_MODELS:
            over = [f"model.name={name}", f"train.seed={seed}", *TRAIN_OVERRIDES, *args.set]
            cfg = load_config(args.recipe, over)
            key = run_key(cfg)
            if key in done:
                print(f"{name} seed {seed}: already in {args.results}, skipped")
                continue
            run_dir = Path(args.runs) / f"{name}_s{seed}"
            record = _run_record(args.recipe, over, run_dir, cfg.train.epochs, name)
            append_jsonl(args.results, [{"study": "efficientvit", "record": "train", "key": key, "seed": seed,
                                   "recipe": str(args.recipe), "overrides": over, **record,
                                   "source": "benchmarks/bench_efficientvit.py"}])
            done.add(key)
            trained += 1
    print(f"trained {trained} run(s); records in {args.results}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", default=None,
                    help="NAME[:KEY=VALUE,...]: a registry name and constructor overrides, e.g. "
                         "efficientvit_fmnist_tiny:local_dwconv=false (repeatable; the first is the reference)")
    ap.add_argument("--batch", type=int, action="append", default=None, help="batch sizes (default 1 and 64)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--min-sample-seconds", type=float, default=0.5)
    ap.add_argument("--max-contention", type=float, default=0.2)
    ap.add_argument("--results", default=None, help="append every timing cell (and training run) to this JSON-lines "
                                                     "file, e.g. docs/efficient/results.jsonl")
    ap.add_argument("--train-seeds", type=int, default=0,
                    help="also train the accuracy comparison at seeds 0..N-1 (needs --results; default: only time)")
    ap.add_argument("--train-model", action="append", default=None,
                    help=f"models trained with --train-seeds (default: {' and '.join(TRAIN_MODELS)})")
    ap.add_argument("--recipe", default="configs/fmnist/demo.yaml", help="training recipe (default: %(default)s)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help=f"more recipe overrides for the trainings (always: {' '.join(TRAIN_OVERRIDES)})")
    ap.add_argument("--no-timing", action="store_true",
                    help="only the training runs (e.g. a second process training other --train-model's meanwhile)")
    ap.add_argument("--runs", default="runs/eff", help="folder of the training runs (default: %(default)s)")
    args = ap.parse_args(argv)
    if args.train_seeds and not args.results:
        ap.error("--train-seeds needs --results: the runs' records are what the doc reads")
    torch.set_num_threads(args.threads)
    names = args.model or DEFAULT_MODELS
    meter = ContentionMeter()
    flags = cpu_flags()
    machine, invocation = None, utc_now()
    if args.results:
        from vitkit.tools.ablate import machine_facts

        machine = machine_facts()
    print(f"{os.cpu_count()} logical CPUs, avx512_bf16 {'avx512_bf16' in flags}, AMX {'amx_bf16' in flags}; "
          f"{args.threads} threads; torch {torch.__version__}; 1-min load {machine_load()}")
    print("\n| model | params | batch | ms/batch | img/s | × first |\n|---|---:|---:|---:|---:|---:|")
    for batch in [] if args.no_timing else args.batch or [1, 64]:
        cands, params = [], {}
        for name in names:
            torch.manual_seed(0)
            registry_name, overrides = model_spec(name)
            model = create_model(registry_name, **overrides).eval()
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
        if args.results:
            append_jsonl(args.results,
                         [timing_record(c, batch, params[c.name], args, machine, invocation) for c in cands])
    if args.results and not args.no_timing:
        print(f"appended the timings to {args.results}")
    return train_runs(args) if args.train_seeds else 0


if __name__ == "__main__":
    sys.exit(main())
