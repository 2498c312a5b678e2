"""Quality and sampling speed of vitkit's image generators on Fashion-MNIST, side by side.

Quality, in one process, for trained runs (``vitkit train --config configs/generation/...``):

* **Fréchet distance (FD)** between Gaussians fitted to the features of a Fashion-MNIST classifier trained by
  vitkit (``--classifier RUN``; the features are its pre-logits, ``forward_head(forward_features(x),
  pre_logits=True)``: the pooled and normed token the head reads). The reference statistics come from the whole
  Fashion-MNIST test set (10,000 images); every evaluated set has the same size N (``--per-class`` × 10 classes),
  because FD from N samples is biased upwards by an amount that depends on N. Two anchors at the same N: the
  **floor** (N real training images) and each tokenizer's **reconstructions** of N test images (what a perfect
  generator over its codes would reach).
* **Classifier accuracy on class-conditional samples**: the share of samples generated for class c that the same
  classifier puts in class c (its accuracy on the real test set is printed for scale).
* Tokenizers: PSNR of the round trip on the whole test set, codebook usage and perplexity, and for a multi-scale
  tokenizer the PSNR of decoding the continuous latent f (the bound HART's residual can reach).

Speed: every generator's ``task.sample_images`` (sampling and decoding, with its recipe's settings: cfg,
top-k, MaskGIT steps, diffusion steps) at the same batch, timed in alternating rounds as the other benchmarks
(:func:`vitkit.tools.timing.time_alternating`, samples with more than ``--max-contention`` of the CPU taken by other
processes discarded), images/s and the ratio to the raster generator.

A generator spec is ``NAME=RUN[,RUN...][@key=value,...]``: several runs are training seeds of one method
(mean ± std over them); settings after ``@`` override its sampling (``steps``, ``cfg``, ``top_k``,
``temperature``). HART's discrete part alone is ``hart-discrete=RUNS@steps=0``.

    python benchmarks/bench_generation.py --classifier runs/gen_classifier \\
        --tokenizer vq=runs/gen_vq_fmnist --tokenizer msvq=runs/gen_msvq_fmnist \\
        --generator raster=runs/gen_ar_raster_s0,runs/gen_ar_raster_s1 --generator masked=runs/gen_ar_masked_s0 \\
        --generator var=runs/gen_var_s0,runs/gen_var_s1 --out docs/generation/results.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitkit.data import build_dataset
from vitkit.tasks.generative import frechet_distance, gaussian, to_unit
from vitkit.tools.evaluate import evaluate_checkpoint, load_model, resolve_model_dir
from vitkit.tools.inference import cpu_flags
from vitkit.tools.predict import load_generator
from vitkit.tools.timing import Candidate, ContentionMeter, cpu_name, machine_load, time_alternating, wait_for_quiet

NUM_CLASSES = 10


# ----------------------------------------------------------------------------------------------- statistics
class Judge:
    """The vitkit classifier whose features and predictions score image sets given as [0, 1] pixels."""

    def __init__(self, run: str, batch: int = 500) -> None:
        self.model = load_model(run)
        cfg = self.model.pretrained_cfg
        self.mean = torch.tensor(cfg["mean"], dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(cfg["std"], dtype=torch.float32).view(1, -1, 1, 1)
        self.batch = batch
        self.name = json.loads((resolve_model_dir(run) / "config.json").read_text()).get("model_name", "?")

    @torch.inference_mode()
    def __call__(self, images01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pre-logit features (N, D), predicted classes (N,))."""
        feats, preds = [], []
        for start in range(0, images01.shape[0], self.batch):
            x = (images01[start:start + self.batch].float() - self.mean) / self.std
            tokens = self.model.forward_features(x)
            feats.append(self.model.forward_head(tokens, pre_logits=True).float())
            preds.append(self.model.forward_head(tokens).argmax(-1))
        return torch.cat(feats), torch.cat(preds)


def stratified(labels: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
    """``per_class`` indices of each class, drawn with ``seed``, sorted by class."""
    g = torch.Generator().manual_seed(seed)
    picks = []
    for c in range(NUM_CLASSES):
        idx = (labels == c).nonzero().flatten()
        picks.append(idx[torch.randperm(idx.numel(), generator=g)[:per_class]])
    return torch.cat(picks)


def score(judge: Judge, images01: torch.Tensor, labels: torch.Tensor, ref: tuple[torch.Tensor, torch.Tensor]
          ) -> dict[str, float]:
    feats, preds = judge(images01)
    return {"fd": frechet_distance(*gaussian(feats), *ref), "class_acc": float((preds == labels).float().mean())}


# ----------------------------------------------------------------------------------------------- parts
def parse_spec(text: str) -> tuple[str, list[str], dict[str, Any]]:
    """``NAME=RUN[,RUN...][@key=value,...]`` -> (name, runs, sampling settings)."""
    if "=" not in text:
        raise SystemExit(f"--generator/--tokenizer {text!r}: expected NAME=RUN[,RUN...][@key=value,...]")
    name, rest = text.split("=", 1)
    runs, _, opts = rest.partition("@")
    settings: dict[str, Any] = {}
    for item in filter(None, opts.split(",")):
        key, _, value = item.partition("=")
        settings[key] = float(value) if key in ("cfg", "temperature", "top_p") else int(value)
    return name, [r for r in runs.split(",") if r], settings


def tokenizer_rows(judge: Judge, specs: list[str], test01: torch.Tensor, test_labels: torch.Tensor,
                   subset: torch.Tensor, ref: tuple[torch.Tensor, torch.Tensor], log) -> list[dict[str, Any]]:
    """Per tokenizer run: its own task's evaluation on the whole test set (PSNR through the codes and decoding f,
    codebook usage and perplexity), and the judge's FD / accuracy on its reconstructions of the ``subset``."""
    rows = []
    for spec in specs:
        name, runs, _ = parse_spec(spec)
        for run in runs:
            metrics, _ = evaluate_checkpoint(run, data="fashion_mnist", split="test")
            vq = load_model(run)
            cfg = vq.pretrained_cfg
            mean = torch.tensor(cfg["mean"]).view(1, -1, 1, 1)
            std = torch.tensor(cfg["std"]).view(1, -1, 1, 1)
            with torch.inference_mode():
                f = vq.encode((test01[subset] - mean) / std)
                rec = to_unit(vq.idx_to_img(vq.quantize.f_to_idx_or_fhat(f, to_fhat=False), last_one=True), cfg)
                cont = to_unit(vq.decode(f), cfg)
            row = {"tokenizer": name, "run": run, "scales": list(vq.patch_nums), "psnr": metrics["psnr"],
                   "psnr_continuous": metrics["psnr_continuous"], "codebook_usage": metrics["codebook_usage"],
                   "perplexity": metrics["codebook_perplexity"],
                   **{f"rec_{k}": v for k, v in score(judge, rec, test_labels[subset], ref).items()}}
            if len(vq.patch_nums) > 1:
                row.update({f"continuous_{k}": v for k, v in score(judge, cont, test_labels[subset], ref).items()})
            log(f"tokenizer {name} ({run}): {row}")
            rows.append(row)
    return rows


def sample_set(model, task, labels: torch.Tensor, seed: int, batch: int) -> torch.Tensor:
    """Class-conditional samples for ``labels`` in [0, 1]; each chunk has its own sampling seed."""
    images = []
    base = task.args
    for i, start in enumerate(range(0, labels.shape[0], batch)):
        task.args = dataclasses.replace(base, sample_seed=seed * 100_003 + i)
        images.append(to_unit(task.sample_images(model, labels[start:start + batch]), model.pretrained_cfg))
    task.args = base
    return torch.cat(images).float()


def describe_steps(model, task) -> str:
    name = task.name
    if name == "ar":
        return f"{task.args.steps}" if model.order == "masked" else f"{model.num_tokens}"
    scales = len(model.patch_nums)
    if name == "hart" and getattr(model, "residual_diffusion", False) and task.args.diffusion_steps != 0:
        diff = model.diffloss.sampling_steps if task.args.diffusion_steps < 0 else task.args.diffusion_steps
        return f"{scales} + {diff} diffusion"
    return f"{scales}"


def mean_std(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


# ----------------------------------------------------------------------------------------------- figure
def draw_grid(panels: dict[str, torch.Tensor], per_row: int, class_names: list[str], path: Path) -> None:
    """One panel per method: a row per class, ``per_row`` samples each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(0.9 + len(panels) * (0.3 * per_row + 0.15), 3.6), squeeze=False)
    for ax, (name, images) in zip(axes[0], panels.items()):
        rows = []
        for c in range(NUM_CLASSES):
            chunk = images[c * per_row:(c + 1) * per_row, 0]
            rows.append(torch.cat(list(torch.nn.functional.pad(chunk, (1, 1, 1, 1), value=1.0)), dim=1))
        ax.imshow(torch.cat(rows, dim=0).numpy(), cmap="gray", vmin=0, vmax=1)
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0][0].set_yticks([30 * c + 15 for c in range(NUM_CLASSES)], class_names, fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classifier", required=True, help="a vitkit Fashion-MNIST classification run or checkpoint")
    ap.add_argument("--tokenizer", action="append", default=[], help="NAME=RUN[,RUN...] (vq runs)")
    ap.add_argument("--generator", action="append", default=[], help="NAME=RUN[,RUN...][@key=value,...]")
    ap.add_argument("--per-class", type=int, default=100, help="samples per class for FD and accuracy (N = 10×)")
    ap.add_argument("--sample-seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=100, help="sampling batch for the quality sets")
    ap.add_argument("--speed-batch", type=int, default=50, help="batch of the timed sampling calls (0: no timing)")
    ap.add_argument("--repeats", type=int, default=3, help="timed samples per generator (median)")
    ap.add_argument("--min-sample-seconds", type=float, default=0.5)
    ap.add_argument("--max-contention", type=float, default=0.3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--grid", type=Path, default=None, help="PNG: samples of every method side by side")
    ap.add_argument("--grid-per-class", type=int, default=6)
    ap.add_argument("--out", type=Path, default=None, help="JSON with every figure")
    ap.add_argument("--only", choices=["all", "quality", "speed"], default="all",
                    help="quality sets and tokenizers only, or speed only (e.g. on a quieter machine)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    load_before = machine_load()

    test = build_dataset("fashion_mnist", "test")
    train = build_dataset("fashion_mnist", "train")
    test01, test_labels = test.images.float() / 255, test.labels.long()
    judge = Judge(args.classifier)
    t0 = time.perf_counter()
    test_feats, test_preds = judge(test01)
    ref = gaussian(test_feats)
    n = args.per_class * NUM_CLASSES
    result: dict[str, Any] = {
        "classifier": {"run": args.classifier, "model": judge.name,
                       "test_acc": float((test_preds == test_labels).float().mean()),
                       "feature_dim": int(test_feats.shape[1])},
        "n": n}
    quality = args.only != "speed"
    if quality:
        real = stratified(train.labels.long(), args.per_class, seed=args.sample_seed)
        result["floor"] = score(judge, train.images[real].float() / 255, train.labels[real].long(), ref)
        subset = stratified(test_labels, args.per_class, seed=args.sample_seed)
        log(f"classifier {result['classifier']}; floor (N={n} real training images) {result['floor']} "
            f"[{time.perf_counter() - t0:.0f} s]")
        result["tokenizers"] = tokenizer_rows(judge, args.tokenizer, test01, test_labels, subset, ref, log)

    labels = torch.arange(NUM_CLASSES).repeat_interleave(args.per_class)
    grid_labels = torch.arange(NUM_CLASSES).repeat_interleave(args.grid_per_class)
    panels = {"test images": test01[stratified(test_labels, args.grid_per_class, seed=1)]}
    generators, speed_cands = [], []
    for spec in args.generator:
        name, runs, settings = parse_spec(spec)
        per_run = []
        for i, run in enumerate(runs):
            model, task, names = load_generator(run, seed=args.sample_seed, **settings)
            if quality:
                t1 = time.perf_counter()
                images = sample_set(model, task, labels, args.sample_seed, args.batch)
                seconds = time.perf_counter() - t1
                per_run.append({"run": run, **score(judge, images, labels, ref), "quality_set_s": seconds})
                log(f"{name} ({run}): {per_run[-1]}")
            if i == 0:
                if args.grid is not None:
                    panels[name] = sample_set(model, task, grid_labels, args.sample_seed + 1, args.batch)
                steps = describe_steps(model, task)
                if args.speed_batch and args.only != "quality":
                    speed_labels = torch.arange(args.speed_batch) % NUM_CLASSES
                    speed_cands.append(Candidate(name, "vitkit", "fp32",
                                                 lambda m=model, t=task, y=speed_labels: t.sample_images(m, y),
                                                 name == "raster"))
        entry = {"name": name, "settings": settings, "steps": steps, "runs": per_run}
        if quality:
            entry.update(fd=mean_std([r["fd"] for r in per_run]), class_acc=mean_std([r["class_acc"] for r in per_run]))
        generators.append(entry)
    result["generators"] = generators

    if speed_cands:
        meter = ContentionMeter()
        if args.max_contention < 1:
            wait_for_quiet(meter, args.max_contention, max_wait_s=300)
        with torch.inference_mode():
            time_alternating(speed_cands, samples=args.repeats, min_sample_s=args.min_sample_seconds,
                             max_contention=args.max_contention, meter=meter, log=log, warmup=1)
        med = {c.name: statistics.median(c.samples) for c in speed_cands}
        base = med.get("raster", next(iter(med.values())))
        for g in generators:
            sec = med[g["name"]]
            g["speed"] = {"batch": args.speed_batch, "s_per_batch": sec, "img_s": args.speed_batch / sec,
                          "ms_per_img": 1e3 * sec / args.speed_batch, "x_raster": base / sec,
                          "samples": len(next(c for c in speed_cands if c.name == g["name"]).samples)}

    flags = cpu_flags()
    result["machine"] = {
        "cpu": cpu_name(),
        "logical_cpus": os.cpu_count(), "threads": args.threads,
        "avx512_bf16": "avx512_bf16" in flags, "amx": "amx_bf16" in flags, "torch": torch.__version__,
        "load_before": load_before, "load_after": machine_load()}
    print(format_tables(result))
    if args.grid is not None:
        draw_grid(panels, args.grid_per_class, [str(c) for c in test.classes], args.grid)
        log(f"wrote {args.grid}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        log(f"wrote {args.out}")
    return 0


def format_tables(r: dict[str, Any]) -> str:
    m = r["machine"]
    c = r["classifier"]
    lines = [f"Machine: {m['cpu']} ({m['logical_cpus']} logical CPUs, avx512_bf16 {m['avx512_bf16']}, AMX {m['amx']}),"
             f" {m['threads']} threads, torch {m['torch']}; 1-min load {m['load_before']} before, "
             f"{m['load_after']} after."]
    if "floor" in r:
        lines += [f"Judge: {c['run']} ({c['model']}), test accuracy {100 * c['test_acc']:.2f}%, {c['feature_dim']}-d "
                  f"pre-logit features; FD against the 10,000 test images, N = {r['n']} per set.", "",
                  "| set | steps | FD ↓ | classifier acc ↑ |", "|---|---|---:|---:|",
                  f"| real training images (floor) | | {r['floor']['fd']:.3f} | {100 * r['floor']['class_acc']:.1f}% |"]
        for t in r["tokenizers"]:
            lines.append(f"| {t['tokenizer']} reconstructions ({'+'.join(f'{p}²' for p in t['scales'])} codes) | | "
                         f"{t['rec_fd']:.3f} | {100 * t['rec_class_acc']:.1f}% |")
            if "continuous_fd" in t:
                lines.append(f"| {t['tokenizer']} decoding continuous f | | {t['continuous_fd']:.3f} | "
                             f"{100 * t['continuous_class_acc']:.1f}% |")
        for g in r["generators"]:
            k = len(g["runs"])
            fd = f"{g['fd'][0]:.3f}" + (f" ± {g['fd'][1]:.3f}" if k > 1 else "")
            acc = f"{100 * g['class_acc'][0]:.1f}%" + (f" ± {100 * g['class_acc'][1]:.1f}" if k > 1 else "")
            lines.append(f"| {g['name']} ({k} run{'s' if k > 1 else ''}) | {g['steps']} | {fd} | {acc} |")
        lines += ["", "| tokenizer | PSNR dB | PSNR decoding f | codebook usage | perplexity |",
                  "|---|---:|---:|---:|---:|"]
        for t in r["tokenizers"]:
            lines.append(f"| {t['tokenizer']} | {t['psnr']:.2f} | {t['psnr_continuous']:.2f} | "
                         f"{100 * t['codebook_usage']:.0f}% | {t['perplexity']:.0f} |")
    timed = [g for g in r["generators"] if "speed" in g]
    if timed:
        lines += ["", f"Sampling speed (sampling + decoding, batch {timed[0]['speed']['batch']}, median of timed "
                  "samples):", "", "| generator | steps | s/batch | img/s | ms/img | × raster |",
                  "|---|---|---:|---:|---:|---:|"]
        for g in timed:
            s = g["speed"]
            lines.append(f"| {g['name']} | {g['steps']} | {s['s_per_batch']:.3f} | {s['img_s']:.1f} | "
                         f"{s['ms_per_img']:.2f} | {s['x_raster']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
