"""Accuracy-vs-time of a training recipe on this machine: trains it with the engine and prints a RESULTS row.

    torchrun --nproc_per_node=2 benchmarks/bench_recipe.py --config configs/fmnist/vit_fast.yaml
    python benchmarks/bench_recipe.py --config configs/fmnist/vit_fast.yaml --set model.args.embed_dim=128

The whole wall-clock (data loading, training, every evaluation, checkpoints) is measured around the call; the
engine's own summary gives the training-only time and the median training images/s (all processes together).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--output-dir", default=None, help="default: runs/bench_<recipe name>")
    args = p.parse_args(argv)
    from vitkit.engine import train

    out = args.output_dir or f"runs/bench_{Path(args.config).stem}"
    start = time.perf_counter()
    s = train(args.config, [*args.overrides, f"output_dir={out}"])
    total = time.perf_counter() - start
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only the first process reports
        return 0
    row = {"recipe": args.config, "overrides": args.overrides, "model": s["model"], "params": s["params"],
           "epochs": s["epochs_done"], "best_top1": s["best"]["top1"], "final_top1": s["final"]["top1"],
           "train_wall_clock_s": s["train_wall_clock_s"], "total_wall_clock_s": total,
           "train_img_s": s["train_img_s"], "threads": torch.get_num_threads(), "torch": torch.__version__,
           "processes": int(os.environ.get("WORLD_SIZE", "1"))}
    Path(out, "bench_recipe.json").write_text(json.dumps(row, indent=2))
    launcher = f"torchrun --nproc_per_node={row['processes']}" if row["processes"] > 1 else "python"
    sets = [f"--set {o}" for o in args.overrides]
    cmd = " ".join([launcher, "benchmarks/bench_recipe.py --config", args.config, *sets])
    print("| recipe | model | params | epochs | final test top-1 | best test top-1 | train wall-clock "
          "| total wall-clock | train img/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    final, best = s["final"]["top1"], s["best"]["top1"]
    print(f"| `{cmd}` | {s['model']} | {s['params'] / 1e6:.2f}M | {s['epochs_done']} | {100 * final:.2f}% | "
          f"{100 * best:.2f}% | {s['train_wall_clock_s'] / 60:.1f} min | {total / 60:.1f} min | "
          f"{s['train_img_s']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
