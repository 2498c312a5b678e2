"""The SparseViT study's numbers and pictures (docs/efficient.md) from trained dense and sparsity-adapted Swin runs.

Per seed (``--dense`` and ``--adapted`` list the runs in the same seed order):

1. ``vitkit sparsevit search`` on the adapted run (:func:`vitkit.tools.search.run_search`), budgets given as
   speed-up targets over the dense model (``--speedup``), candidates scored on the **val** scenes (made from
   Fashion-MNIST *training* images), so nothing is picked on the test numbers below;
2. on the **test** scenes (Fashion-MNIST test images only): mAP and exact match of the dense run, of the adapted
   run dense, at each searched pick and at every uniform keep ratio (the same ratio in every stage), and of the
   *dense* run pruned without adaptation (at the picks and the uniform ratios), which shows what adaptation buys;
3. latency measured directly, not predicted: every configuration above timed in alternating rotating rounds
   (:func:`vitkit.tools.timing.time_alternating`, rounds where other processes took more than ``--max-contention``
   of the CPU discarded), fp32, ``--threads`` threads, at each ``--latency-batch``; plus the dense model with
   window shifting turned off, because a pruned stage runs its shifted blocks unshifted (the shift would need
   neighbours that may be pruned) and that alone changes the cost.

With ``--low-res``, dense runs trained on the scenes downscaled (SparseViT's question, Chen et al., 2023: *sparse at
high resolution or dense at low resolution?*) are scored on the test scenes downscaled the same way and timed in the
same rounds.

Pictures: test mAP against measured latency (dense, uniform ratios with and without adaptation, searched picks)
and the windows stage 1 keeps on test scenes at the pick of each budget.

    python benchmarks/sparsevit_study.py --dense runs/eff/dense_s0,runs/eff/dense_s1 \\
        --adapted runs/eff/adapt_s0,runs/eff/adapt_s1 --speedup 1.25 1.5 2 \\
        --search-dir runs/eff --out docs/efficient/sparsevit.json --figures docs/efficient
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitkit.tools.evaluate import load_model, resolve_model_dir, task_for_model
from vitkit.tools.search import DEFAULT_CHOICES, eval_batches, measure_latency_table, run_search, settle
from vitkit.tools.timing import Candidate, ContentionMeter, cpu_name, machine_load, time_alternating, wait_for_quiet

Ratios = tuple[float, ...]


@torch.inference_mode()
def score(model, task, batches, ratios: Ratios) -> dict[str, float]:
    model.set_keep_ratios(ratios)
    metrics = task.evaluate(model, batches)
    model.set_keep_ratios([1.0] * model.num_stages)
    return {"mAP": float(metrics["mAP"]), "exact_match": float(metrics["exact_match"])}


def time_configs(model, configs: list[Ratios], others: dict[str, torch.nn.Module], batch: int, threads: int,
                 repeats: int, max_contention: float, meter: ContentionMeter) -> dict[str, float]:
    """Median ms per batch of each keep-ratio configuration of ``model`` and of each of ``others`` (whole models
    at their own input size), all timed in the same alternating rounds."""
    torch.set_num_threads(threads)

    def images(m) -> torch.Tensor:
        c, h, w = m.pretrained_cfg["input_size"]
        return torch.randn(batch, c, h, w, generator=torch.Generator().manual_seed(batch))

    x = images(model)

    def run(r: Ratios):
        model.set_keep_ratios(r)
        return model(x)

    cands = [Candidate(str(r), "vitkit", "fp32", lambda r=r: run(r), False) for r in configs]
    inputs = {name: images(m) for name, m in others.items()}
    cands += [Candidate(name, "vitkit", "fp32", lambda m=m, xm=inputs[name]: m(xm), False)
              for name, m in others.items()]
    if max_contention < 1:
        wait_for_quiet(meter, max_contention, max_wait_s=120)
    time_alternating(cands, samples=repeats, min_sample_s=0.5, max_contention=max_contention, meter=meter)
    model.set_keep_ratios([1.0] * model.num_stages)
    return {cand.name: 1e3 * statistics.median(cand.samples) for cand in cands}


@torch.inference_mode()
def kept_windows_figure(model, task, batches, picks: dict[str, Ratios], path: Path, n: int = 6) -> None:
    """Test scenes with the stage-1 windows each budget's pick prunes shaded (importance = L2 norm)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    images = batches[0][0][:n]
    stage = model.stages[0]
    tokens = model.embed(images)
    grid = tokens.shape[1] // min(stage.window_size, tokens.shape[1])
    cell = images.shape[-1] / grid
    fig, axes = plt.subplots(len(picks), n, figsize=(1.6 * n, 1.7 * len(picks)), squeeze=False)
    for row, (label, ratios) in enumerate(picks.items()):
        kept = stage.run_pruned(tokens, ratios[0])[1]
        for col in range(n):
            ax = axes[row][col]
            ax.imshow(images[col, 0].numpy(), cmap="gray")
            kept_here = set(kept[col].tolist())
            for idx in range(grid * grid):
                r, c = divmod(idx, grid)
                ax.add_patch(Rectangle((c * cell - 0.5, r * cell - 0.5), cell, cell, lw=0.6, ec="tab:orange",
                                       fc="none" if idx in kept_here else (0.85, 0.1, 0.1, 0.45)))
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(f"{label}\nkeep {ratios[0]:g}", fontsize=8)
    fig.suptitle("stage-1 windows at each budget's pick on test scenes: pruned ones shaded red", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def tradeoff_figure(result: dict[str, Any], batch: int, path: Path) -> None:
    """Test mAP (mean over seeds) against measured latency at ``batch``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lat = result["latency_ms"][str(batch)]
    seeds = result["seeds"]
    mean = lambda key, what: 100 * float(np.mean([s[what][key]["mAP"] for s in seeds]))
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    uni = [str(tuple([r] * len(seeds[0]["dense_ratios"]))) for r in result["choices"]]
    ax.plot([lat[u] for u in uni], [mean(u, "adapted") for u in uni], "o-", label="uniform ratio, adapted")
    for r, u in zip(result["choices"], uni):
        ax.annotate(f"{r:g}", (lat[u], mean(u, "adapted")), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.plot([lat[u] for u in uni], [mean(u, "dense_pruned") for u in uni], "s--", c="0.5",
            label="uniform ratio, dense model (no adaptation)")
    for i, s in enumerate(seeds):
        for key, pick in s["search"]["budgets"].items():
            if not pick["best"]:
                continue
            r = str(tuple(pick["best"]["ratios"]))
            ax.scatter([lat[r]], [100 * s["adapted"][r]["mAP"]], marker="*", s=140, zorder=3,
                       c=f"C{2 + list(s['search']['budgets']).index(key)}",
                       label=f"searched pick, {key} budget" if i == 0 else None)
    dense = str(tuple(seeds[0]["dense_ratios"]))
    if "low_res" in seeds[0]:
        low = 100 * float(np.mean([s["low_res"]["mAP"] for s in seeds]))
        ax.scatter([lat["dense, low resolution"]], [low], marker="D", c="tab:purple", zorder=3,
                   label="dense, scenes downscaled (low resolution)")
    ax.axhline(mean(dense, "dense_pruned"), c="k", lw=0.8, ls=":", label="dense run (mean of seeds)")
    ax.axhline(mean(dense, "dense_pruned") - 0.5, c="tab:red", lw=0.8, ls=":", label="−0.5 point")
    ax.axvline(lat[dense] / 1.5, c="tab:red", lw=0.8, ls="--", label="1.5× faster than dense")
    ax.set_xlabel(f"measured latency, ms per batch of {batch} ({result['threads']} threads, fp32)")
    ax.set_ylabel("test mAP (%)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dense", required=True, help="dense runs, comma-separated, one per seed")
    ap.add_argument("--adapted", required=True, help="sparsity-adapted runs, same seed order")
    ap.add_argument("--low-res", default=None,
                    help="dense runs trained on the scenes downscaled (e.g. model.args.img_size=56), one per seed: "
                         "SparseViT's 'dense, low resolution' alternative")
    ap.add_argument("--speedup", type=float, nargs="+", default=[1.25, 1.5, 2.0])
    ap.add_argument("--choices", type=float, nargs="+", default=list(DEFAULT_CHOICES))
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--latency-batch", type=int, nargs="+", default=[8, 1], help="the first one prices the search")
    ap.add_argument("--eval-images", type=int, default=1000, help="val scenes scoring each search candidate")
    ap.add_argument("--test-images", type=int, default=None, help="test scenes (default: all the run's)")
    ap.add_argument("--population", type=int, default=12)
    ap.add_argument("--generations", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--table-repeats", type=int, default=31, help="rounds timing the search's latency table")
    ap.add_argument("--max-contention", type=float, default=0.2)
    ap.add_argument("--search-dir", default="runs/sparsevit_study")
    ap.add_argument("--out", default="docs/efficient/sparsevit.json")
    ap.add_argument("--figures", default="docs/efficient")
    ap.add_argument("--finish", default=None, metavar="JSON", help=argparse.SUPPRESS)  # the timing phase
    args = ap.parse_args(argv)
    if args.finish:
        return finish(args)
    dense_runs, adapted_runs = args.dense.split(","), args.adapted.split(",")
    low_runs = args.low_res.split(",") if args.low_res else []
    if len(dense_runs) != len(adapted_runs) or (low_runs and len(low_runs) != len(dense_runs)):
        ap.error("--dense, --adapted (and --low-res) need one run per seed each, in the same order")
    torch.set_num_threads(args.threads)
    print(f"{cpu_name()}, {args.threads} threads, torch {torch.__version__}, 1-min load {machine_load()}")

    # one latency table for every seed (same architecture, so the same budgets), timed once with care
    model = load_model(adapted_runs[0]).eval()
    c, h, w = model.pretrained_cfg["input_size"]
    table = measure_latency_table(model, torch.randn(args.latency_batch[0], c, h, w,
                                                     generator=torch.Generator().manual_seed(0)),
                                  args.choices, repeats=args.table_repeats)
    searches = []
    for i, adapted_run in enumerate(adapted_runs):
        searches.append(run_search(adapted_run, out_dir=Path(args.search_dir) / f"search_s{i}",
                                   speedups=args.speedup, eval_images=args.eval_images,
                                   latency_batch=args.latency_batch[0], choices=args.choices,
                                   population=args.population, generations=args.generations, seed=i, table=table))
    full = tuple([1.0] * model.num_stages)
    configs = sorted({full, *(tuple([r] * model.num_stages) for r in args.choices),
                      *(tuple(b["best"]["ratios"]) for s in searches for b in s["budgets"].values() if b["best"])},
                     reverse=True)
    seeds = []
    for i, (dense_run, adapted_run, search) in enumerate(zip(dense_runs, adapted_runs, searches)):
        adapted, dense = load_model(adapted_run), load_model(dense_run)
        task = task_for_model(adapted, resolve_model_dir(adapted_run))
        task.setup(adapted)
        batches = eval_batches(resolve_model_dir(adapted_run), task, "fmnist_scenes", "test", limit=args.test_images)
        picks = {key: tuple(b["best"]["ratios"]) for key, b in search["budgets"].items() if b["best"]}
        entry = {"dense_run": dense_run, "adapted_run": adapted_run, "dense_ratios": full, "search": search,
                 "adapted": {str(r): score(adapted, task, batches, r) for r in configs},
                 "dense_pruned": {str(r): score(dense, task, batches, r) for r in configs}}
        if low_runs:
            low = load_model(low_runs[i]).eval()
            low_task = task_for_model(low, resolve_model_dir(low_runs[i]))
            low_task.setup(low)  # its eval transform downsizes the test scenes as training did
            low_batches = eval_batches(resolve_model_dir(low_runs[i]), low_task, "fmnist_scenes", "test",
                                       limit=args.test_images)
            entry["low_res"] = {"run": low_runs[i], "input_size": low.pretrained_cfg["input_size"],
                                **score(low, low_task, low_batches, full)}
        seeds.append(entry)
        print(f"seed {i}: dense run test mAP {100 * entry['dense_pruned'][str(full)]['mAP']:.2f}, adapted dense "
              f"{100 * entry['adapted'][str(full)]['mAP']:.2f}; picks "
              + ", ".join(f"{k} {r} {100 * entry['adapted'][str(r)]['mAP']:.2f}" for k, r in picks.items()))
        if i == 0:
            Path(args.figures).mkdir(parents=True, exist_ok=True)
            kept_windows_figure(adapted, task, batches, picks, Path(args.figures) / "sparsevit_kept_windows.png")

    result = {"machine": cpu_name(), "threads": args.threads, "torch": torch.__version__, "choices": args.choices,
              "speedups": args.speedup, "configs": [list(r) for r in configs], "seeds": seeds}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=float))
    # timing in a fresh process, settled by one large dense batch (vitkit.tools.search.settle) so every
    # configuration is timed in the same, steady state whatever this process evaluated before
    timing = [sys.executable, __file__, "--finish", str(out), "--threads", str(args.threads),
              "--repeats", str(args.repeats), "--max-contention", str(args.max_contention), "--figures", args.figures,
              "--latency-batch", *map(str, args.latency_batch), "--dense", args.dense, "--adapted", args.adapted]
    return subprocess.run(timing, check=False).returncode


def finish(args: argparse.Namespace) -> int:
    """Time every configuration of a study's JSON (written by the first phase), add the figures, print tables."""
    out = Path(args.finish)
    result = json.loads(out.read_text())
    torch.set_num_threads(args.threads)
    seeds = result["seeds"]
    model = load_model(seeds[0]["adapted_run"]).eval()
    no_shift = load_model(seeds[0]["adapted_run"]).eval()  # same weights, every block unshifted: timing only
    for stage in no_shift.stages:
        for blk in stage.blocks:
            blk.shift_size = 0
    others = {"dense, no shift": no_shift}
    if "low_res" in seeds[0]:
        others["dense, low resolution"] = load_model(seeds[0]["low_res"]["run"]).eval()
    configs = [tuple(float(v) for v in r) for r in result["configs"]]
    meter = ContentionMeter()
    # first as a fresh process finds them, then settled: every model once through a large batch (see settle)
    for key in ("latency_ms_fresh", "latency_ms"):
        if key == "latency_ms":
            for m in (model, *others.values()):
                c, h, w = m.pretrained_cfg["input_size"]
                settle(m, torch.randn(max(args.latency_batch), c, h, w))
        result[key] = {str(b): time_configs(model, configs, others, b, args.threads, args.repeats,
                                            args.max_contention, meter) for b in args.latency_batch}
    out.write_text(json.dumps(result, indent=1, default=float))
    tradeoff_figure(result, args.latency_batch[0], Path(args.figures) / "sparsevit_tradeoff.png")
    print(summary(result))
    return 0


def summary(result: dict[str, Any]) -> str:
    """The doc's tables (markdown) from the study's JSON: every configuration's measured latency and test mAP
    (mean ± std over seeds, then each seed), and whether the SparseViT goal (≥ 1.5× at ≤ 0.5 point) is reached."""
    seeds, lat = result["seeds"], result["latency_ms"]
    full = str(tuple(seeds[0]["dense_ratios"]))
    batches = list(lat)
    dense = [100 * s["dense_pruned"][full]["mAP"] for s in seeds]  # each seed's dense run, unpruned

    def stats(vals: list[float]) -> str:
        sd = f" ± {statistics.stdev(vals):.2f}" if len(vals) > 1 else ""
        return f"{statistics.mean(vals):.2f}{sd} ({' / '.join(f'{v:.2f}' for v in vals)})"

    head = " | ".join(f"ms, batch {b}" for b in batches)
    fresh = result.get("latency_ms_fresh", lat)
    b0 = batches[0]
    lines = [f"| configuration | keep ratios (stage 1, 2, 3) | {head} | × dense (batch {b0}) | "
             "× dense, fresh process | test mAP %, adapted | Δ vs dense run | test mAP %, dense run pruned |",
             "|---" * (7 + len(batches)) + "|"]

    def row(label: str, rs: list[str]) -> str:
        """``rs``: the ratios each seed uses (one for all, or a seed's own pick)."""
        ms = {b: statistics.mean(lat[b][r] for r in rs) for b in batches}
        adapted = [100 * s["adapted"][r]["mAP"] for s, r in zip(seeds, rs)]
        pruned = [100 * s["dense_pruned"][r]["mAP"] for s, r in zip(seeds, rs)]
        delta = statistics.mean(a - d for a, d in zip(adapted, dense))
        shown = rs[0] if len(set(rs)) == 1 else " / ".join(rs)
        fresh_ms = statistics.mean(fresh[b0][r] for r in rs)
        return (f"| {label} | {shown} | " + " | ".join(f"{ms[b]:.2f}" for b in batches)
                + f" | {lat[b0][full] / ms[b0]:.2f} | {fresh[b0][full] / fresh_ms:.2f} | {stats(adapted)} | "
                f"{delta:+.2f} | {stats(pruned)} |")

    lines.append(f"| dense run | {full} | " + " | ".join(f"{lat[b][full]:.2f}" for b in batches)
                 + f" | 1.00 | 1.00 (dense {fresh[b0][full]:.2f} ms) | - | 0 | {stats(dense)} |")
    lines.append(row("adapted, dense", [full] * len(seeds)))
    goal = []
    for key in seeds[0]["search"]["budgets"]:
        if not all(s["search"]["budgets"][key]["best"] for s in seeds):
            lines.append(f"| searched, {key} budget | no candidate fits | " + " | ".join("-" for _ in batches)
                         + " | - | - | - | - | - |")
            continue
        rs = [str(tuple(s["search"]["budgets"][key]["best"]["ratios"])) for s in seeds]
        lines.append(row(f"**searched, {key} budget**", rs))
        speedup = lat[batches[0]][full] / statistics.mean(lat[batches[0]][r] for r in rs)
        loss = statistics.mean(d - 100 * s["adapted"][r]["mAP"] for s, r, d in zip(seeds, rs, dense))
        goal.append((key, speedup, loss))
    for r in sorted(result["choices"], reverse=True)[1:]:
        lines.append(row(f"uniform {r:g}", [str(tuple([r] * len(seeds[0]["dense_ratios"])))] * len(seeds)))
    lines.append("| dense, no shift (timing only) | - | " + " | ".join(f"{lat[b]['dense, no shift']:.2f}"
                                                                         for b in batches)
                 + f" | {lat[b0][full] / lat[b0]['dense, no shift']:.2f} | "
                 f"{fresh[b0][full] / fresh[b0]['dense, no shift']:.2f} | - | - | - |")
    if "low_res" in seeds[0]:
        low = [100 * s["low_res"]["mAP"] for s in seeds]
        size = "×".join(map(str, seeds[0]["low_res"]["input_size"][1:]))
        name = "dense, low resolution"
        lines.append(f"| dense run on scenes downscaled to {size} | - | "
                     + " | ".join(f"{lat[b][name]:.2f}" for b in batches)
                     + f" | {lat[b0][full] / lat[b0][name]:.2f} | {fresh[b0][full] / fresh[b0][name]:.2f} | - | "
                     f"{statistics.mean(low) - statistics.mean(dense):+.2f} | {stats(low)} |")
    lines.append("")
    for key, speedup, loss in goal:
        ok = speedup >= 1.5 and loss <= 0.5
        lines.append(f"- {key} budget: {speedup:.2f}× faster at batch {batches[0]}, {loss:.2f} points of mAP lost "
                     f"against the dense run (mean over seeds): goal (≥ 1.5× at ≤ 0.5 point) "
                     f"{'reached' if ok else 'not reached'}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
