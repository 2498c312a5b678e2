"""Accuracy-vs-time of a training recipe on this machine: trains it with the engine and appends one record.

    torchrun --nproc_per_node=2 benchmarks/bench_recipe.py --config configs/fmnist/vit_fast.yaml
    python benchmarks/bench_recipe.py --config configs/fmnist/vit_fast.yaml --set model.args.embed_dim=128

The whole wall-clock (data loading, training, every evaluation, checkpoints) is measured around the call; the
engine's own summary gives the training-only time and the median training images/s (all processes together).
The record (``--results``, default benchmarks/results/recipe.jsonl) keeps the command, the machine, the summary
and every evaluation with the seconds since the command started, so time-to-accuracy is read from it:
``render_recipe`` (``vitkit report``) draws the table of benchmarks/RESULTS.md, ``render_recipe_curves`` the plot.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--output-dir", default=None, help="default: runs/bench_<recipe name>")
    p.add_argument("--results", default=str(HERE / "results" / "recipe.jsonl"))
    p.add_argument("--label", default=None, help="the row's name in the tables (default: the recipe file's stem)")
    args = p.parse_args(argv)
    from vitkit.engine import train
    from vitkit.tools.timing import append_jsonl, machine_load, machine_record, utc_now

    out = args.output_dir or f"runs/bench_{Path(args.config).stem}"
    started_at, load_before = utc_now(), machine_load()
    start = time.perf_counter()
    s = train(args.config, [*args.overrides, f"output_dir={out}"])
    total = time.perf_counter() - start
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only the first process reports
        return 0
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    launcher = f"torchrun --nproc_per_node={processes}" if processes > 1 else "python"
    command = " ".join([launcher, "benchmarks/bench_recipe.py --config", args.config,
                        *(f"--set {o}" for o in args.overrides)])
    history = [json.loads(line) for line in Path(out, "metrics.jsonl").read_text().splitlines() if line.strip()]
    startup = total - history[-1]["fit_elapsed_s"] if history else 0.0
    key = s["primary_metric"]
    record: dict[str, Any] = {
        "kind": "recipe", "run_id": started_at, "label": args.label or Path(args.config).stem, "command": command,
        "recipe": args.config, "overrides": args.overrides, "model": s["model"], "params": s["params"],
        "epochs": s["epochs_done"], "metric": key, "final": s["final"].get(key), "best": s["best"].get(key),
        "best_epoch": s["best"].get("epoch"), "test": (s.get("test") or {}).get(key), "eval_split": s["eval_split"],
        "train_wall_clock_s": s["train_wall_clock_s"], "total_wall_clock_s": total, "train_img_s": s["train_img_s"],
        "processes": processes, "threads": torch.get_num_threads(), "machine": machine_record(),
        "load_before": load_before, "load_after": machine_load(), "finished_at": utc_now(),
        # every evaluation: the seconds since the command started (data loading included) when it was done
        "evals": [{"epoch": h["epoch"], "seconds": startup + h["fit_elapsed_s"], key: h[f"eval_{key}"]}
                  for h in history if f"eval_{key}" in h],
    }
    append_jsonl(args.results, [record])
    Path(out, "bench_recipe.json").write_text(json.dumps(record, indent=2))
    print(render_rows([record]))
    return 0


def _first_reaching(record: dict[str, Any], target: float) -> dict[str, Any] | None:
    return next((e for e in record["evals"] if e[record["metric"]] >= target), None)


def render_rows(records: list[dict[str, Any]], target: float = 0.92) -> str:
    lines = [f"| command | model | params | epochs | split evaluated | final | best (epoch) "
             f"| first ≥ {100 * target:g}% | train wall-clock | total wall-clock | train img/s |",
             "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        first = _first_reaching(r, target) if r.get("evals") else None
        reach = "-" if not r.get("evals") else "no" if first is None else f"epoch {first['epoch']}" \
            if first["seconds"] is None else f"{first['seconds'] / 60:.1f} min (epoch {first['epoch']})"
        best_epoch = "-" if r["best_epoch"] is None else r["best_epoch"]
        lines.append(f"| `{r['command']}` | {r['model']} | {r['params'] / 1e6:.2f}M | {r['epochs']} "
                     f"| {r['eval_split']} | {100 * r['final']:.2f}% | {100 * r['best']:.2f}% ({best_epoch}) "
                     f"| {reach} | {r['train_wall_clock_s'] / 60:.1f} min | {r['total_wall_clock_s'] / 60:.1f} min "
                     f"| {r['train_img_s']:.0f} |")
    return "\n".join(lines)


def _records(doc_dir: str | Path, results: str, labels: str | None) -> list[dict[str, Any]]:
    from vitkit.tools.ablate import read_results

    records = [r for r in read_results(Path(doc_dir) / results) if r.get("kind") == "recipe"]
    if labels:
        wanted = labels.split(",")
        records = [r for r in records if r["label"] in wanted]
        records.sort(key=lambda r: wanted.index(r["label"]))
    return records


def render_recipe(doc_dir: str | Path, plots: bool = True, results: str = "results/recipe.jsonl",
                  labels: str | None = None, target: str = "0.92") -> str:
    """The table of the records (``labels``: comma-separated, in this order; default all), from the file alone."""
    return render_rows(_records(doc_dir, results, labels), float(target))


def render_recipe_curves(doc_dir: str | Path, plots: bool = True, results: str = "results/recipe.jsonl",
                         labels: str | None = None, image: str = "recipe/time_to_accuracy.png",
                         target: str = "0.92") -> str:
    """Accuracy against the command's wall-clock for every record with its evaluations, one line each."""
    records = [r for r in _records(doc_dir, results, labels)  # the evaluations' times known
               if r.get("evals") and all(e["seconds"] is not None for e in r["evals"])]
    if plots:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.2))
        for r in records:
            ax.plot([e["seconds"] / 60 for e in r["evals"]], [100 * e[r["metric"]] for e in r["evals"]], marker=".",
                    label=f"{r['label']} ({r['eval_split']})")
        ax.axhline(100 * float(target), color="gray", lw=0.8, ls="--")
        ax.set(xlabel="minutes since the command started", ylabel="top-1 (%)", ylim=(70, 100))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = Path(doc_dir) / image
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return f"![accuracy against wall-clock]({image})"


if __name__ == "__main__":
    sys.exit(main())
