"""MAE's mask ratio on Fashion-MNIST: pretrain at each ratio, probe the frozen encoder, fine-tune on few labels.

The note's claim (003: MAE works at 75% masking where BERT masks 15%) as a study under docs/method.md: for every
mask ratio and seed,

1. **pretrain** ``configs/fmnist/mae_tiny.yaml`` at that ``model.args.mask_ratio`` for ``--pretrain-epochs``
   (the same epochs for every ratio), 10% of the training images held out: the task's own k-NN and linear
   probes of the frozen encoder are evaluated on that validation split, and on the test set once, at the end;
2. **fine-tune** that seed's encoder with ``--finetune-recipe`` (10% of the labels, layer decay 0.75, the same
   validation split), test read once by the final model;
3. optionally (``--timing``) time one MAE training step per ratio in alternating rounds in one process: what a
   higher ratio saves.

Every run is a JSON record in ``--results`` (``record``: ``pretrain`` / ``finetune`` / ``timing``) with every
metric, the machine and wall-clock; a run whose resolved configuration (``key``) is already there is skipped, so
more seeds (``--seeds 3``) train only the new ones. Two trainings run side by side (``--jobs 2``, one thread each).

    python benchmarks/mae_mask_ratio.py --seeds 2 --jobs 2 --pretrain-epochs 8 --timing \\
        --results docs/mae_mask_ratio/results.jsonl
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

from vitkit.tools.timing import append_jsonl, utc_now

RATIOS = (0.15, 0.3, 0.5, 0.75, 0.9)
PRETRAIN = "configs/fmnist/mae_tiny.yaml"
FINETUNE = "configs/fmnist/finetune_tiny.yaml"
HELD_OUT = "data.val_fraction=0.1"


def label(ratio: float) -> str:
    return f"r{round(100 * ratio)}"


def train_phase(name: str, recipe: str, runs: dict[str, tuple[float, int, list[str]]], out: Path, jobs: int,
                results: Path) -> dict[str, Path]:
    """Train every (ratio, seed) of one phase not yet in ``results``; returns each key's run folder."""
    from vitkit.engine.config import load_config
    from vitkit.tools.ablate import _train_pending, read_results, run_key

    done = {r["key"] for r in read_results(results) if r.get("record") == name}
    pending, meta, folders = {}, {}, {}
    for tag, (ratio, seed, over) in runs.items():
        cfg = load_config(recipe, over)
        key = run_key(cfg)
        folders[tag] = out / "runs" / key
        if key in done:
            print(f"{name} {tag}: already in {results}, skipped")
            continue
        pending[key] = (over, cfg.train.epochs, cfg.model.name)
        meta[key] = {"study": "mae_mask_ratio", "record": name, "key": key, "ratio": ratio, "label": label(ratio),
                     "seed": seed, "recipe": recipe, "overrides": over}

    def record(key: str, rec: dict[str, Any]) -> None:
        append_jsonl(results, [{**meta[key], **rec}])
        print(f"{name} {meta[key]['label']} seed {meta[key]['seed']}: recorded")

    if pending:
        # the runs' own train.threads (the same for all: only ratio and seed differ), as `vitkit ablate` passes
        # it; unset, each of the jobs gets cores // jobs threads
        _train_pending(recipe, pending, out, jobs, record, recipe_threads=cfg.train.threads)
    return folders


def time_steps(ratios: tuple[float, ...], results: Path, batch: int, threads: int, samples: int = 5,
               min_sample_s: float = 1.0) -> None:
    """One MAE training step (forward, backward, AdamW) per ratio, alternating in one process."""
    import torch

    from vitkit.engine.distributed import autocast_dtype
    from vitkit.models import create_model
    from vitkit.tools.ablate import machine_facts
    from vitkit.tools.timing import Candidate, ContentionMeter, machine_load, time_alternating

    torch.set_num_threads(threads)
    dtype = autocast_dtype(torch.device("cpu"), "auto")  # as the recipe's train.bf16: auto
    x = torch.randn(batch, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    cands = []
    for ratio in ratios:
        torch.manual_seed(0)
        model = create_model("mae_vit_fmnist_tiny", mask_ratio=ratio, norm_pix_loss=True).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(m=model, o=opt) -> None:
            with torch.inference_mode(False), torch.enable_grad(), \
                    torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = m(x)[0]
                loss.backward()  # (time_alternating runs under inference mode: train steps leave it here)
                o.step()
                o.zero_grad(set_to_none=True)

        cands.append(Candidate(label(ratio), "vitkit", "bf16" if dtype else "fp32", step, False))
    invocation, load_before = utc_now(), machine_load()
    time_alternating(cands, samples=samples, min_sample_s=min_sample_s, max_contention=0.2, meter=ContentionMeter())
    for ratio, c in zip(ratios, cands):
        sec = statistics.median(c.samples)
        append_jsonl(results, [{"study": "mae_mask_ratio", "record": "timing", "ratio": ratio, "label": c.name,
                         "batch": batch, "threads": threads, "precision": c.precision, "ms_per_step": 1e3 * sec,
                         "img_s": batch / sec,
                         "min_sample_s": min_sample_s, "max_contention": 0.2,
                         "samples": len(c.samples), "contention": [round(v, 4) for v in c.contention if v == v],
                         "discarded": c.discarded, "noisy": "noisy" in c.note, "machine": machine_facts(),
                         "load_1m": [load_before, machine_load()], "invocation": invocation}])
        print(f"{c.name}: {1e3 * sec:.1f} ms per step of {batch}")


CURVES = {"linear probe (frozen)": ("pretrain", "test.linear_top1"), "k-NN (frozen)": ("pretrain", "test.knn_top1"),
          "fine-tuned, 10% of the labels": ("finetune", "test.top1")}


def render_plot(doc_dir: str | Path, plots: bool = True, results: str = "mae_mask_ratio/results.jsonl",
                image: str = "mae_mask_ratio/accuracy.png") -> str:
    """Markdown for ``vitkit report`` (kind ``script``): test top-1 of the frozen encoder's probes and of the
    fine-tuned ViT against the mask ratio, each seed a dot, from the results file alone."""
    from vitkit.errors import ConfigError
    from vitkit.tools.ablate import read_results
    from vitkit.tools.report import field
    from vitkit.viz.plots import plot_lines

    records = read_results(Path(doc_dir) / results)
    series: dict[str, list[tuple[float, list[float]]]] = {}
    for name, (kind, metric) in CURVES.items():
        by_ratio: dict[float, list[float]] = {}
        for r in records:
            value = field(r, metric) if r.get("record") == kind else None
            if isinstance(value, (int, float)):
                by_ratio.setdefault(100 * r["ratio"], []).append(100 * value)
        if by_ratio:
            series[name] = sorted(by_ratio.items())
    if not series:
        raise ConfigError(f"{Path(doc_dir) / results}: no pretrain or finetune records to plot")
    if plots:
        ratios = sorted({x for points in series.values() for x, _ in points})
        plot_lines(series, Path(doc_dir) / image, "MAE on Fashion-MNIST: test top-1 against the mask ratio "
                   "(dots: seeds)", "mask ratio (% of the 49 patches hidden)", "test top-1 (%)",
                   xticks=[(x, f"{x:g}") for x in ratios])
    return f"![test top-1 against the mask ratio]({image})"


def main(argv: list[str] | None = None) -> int:
    from vitkit.errors import VitkitError

    try:
        return run(argv)
    except VitkitError as e:  # a bad override or recipe: one line, not a traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


def run(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ratios", type=float, nargs="+", default=list(RATIOS))
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--pretrain-epochs", type=int, default=10)
    ap.add_argument("--finetune-recipe", default=FINETUNE)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--output-dir", type=Path, default=Path("runs/mae_mask_ratio"))
    ap.add_argument("--results", type=Path, required=True, help="JSON-lines file the records are appended to")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more overrides for every run")
    ap.add_argument("--pretrain-set", action="append", default=[], metavar="KEY=VALUE",
                    help="more overrides for the pretrainings")
    ap.add_argument("--finetune-set", action="append", default=[], metavar="KEY=VALUE",
                    help="more overrides for the fine-tunings")
    ap.add_argument("--timing", action="store_true", help="also time one training step per ratio (one process)")
    ap.add_argument("--timing-batch", type=int, default=256)
    ap.add_argument("--timing-samples", type=int, default=5, help="kept samples per ratio (median)")
    ap.add_argument("--timing-min-seconds", type=float, default=1.0, help="shortest sample")
    ap.add_argument("--threads", type=int, default=2, help="threads of the timing process")
    args = ap.parse_args(argv)
    ratios = tuple(args.ratios)
    pre = {f"{label(r)}_s{s}": (r, s, [f"model.args.mask_ratio={r}", f"train.epochs={args.pretrain_epochs}",
                                       f"train.seed={s}", HELD_OUT, *args.set, *args.pretrain_set])
           for s in range(args.seeds) for r in ratios}
    folders = train_phase("pretrain", PRETRAIN, pre, args.output_dir / "pretrain", args.jobs, args.results)
    fine = {tag: (r, s, [f"model.pretrained={folders[tag]}", "optim.layer_decay=0.75", f"train.seed={s}",
                         HELD_OUT, *args.set, *args.finetune_set]) for tag, (r, s, _) in pre.items()}
    train_phase("finetune", args.finetune_recipe, fine, args.output_dir / "finetune", args.jobs, args.results)
    if args.timing:
        time_steps(ratios, args.results, args.timing_batch, args.threads, args.timing_samples,
                   args.timing_min_seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
