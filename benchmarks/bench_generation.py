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
        --generator var=runs/gen_var_s0,runs/gen_var_s1 --results docs/generation/results.jsonl

``--results FILE --campaign NAME`` appends one JSON record per measured thing (docs/method.md, rule 1): each
training run's own summary (``kind: training``: parameters, steps, the best epoch's validation metric, the test
metric read once, wall-clock), the judge (``kind: classifier``), the ``floor``, each ``tokenizer`` run, each
(generator, training run) ``quality`` set and each (generator, batch) ``speed`` cell, every one with the machine,
threads, 1-min load, the benchmark process (``process``: speed ratios are only taken between records of one
process), when it finished and its ``campaign``: the set of trainings it belongs to (the doc shows one campaign;
retraining everything is a new one). A run is identified by its folder and the hash of its weights (``run_id``,
``judge_id``), so a run retrained in the same folder is measured anew, while a quality set or tokenizer already in
the file with the same key (generator, run and weights, settings, judge, N, sampling seed) is not measured again:
adding a training seed measures only the new run. ``vitkit report`` rebuilds docs/generation.md from that file
with the ``render_*`` functions at the end of this script.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import math
import os
import re
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitkit.data import build_dataset
from vitkit.errors import CheckpointError
from vitkit.tasks.generative import frechet_distance, gaussian, to_unit
from vitkit.tools.evaluate import evaluate_checkpoint, load_model, resolve_model_dir
from vitkit.tools.inference import cpu_flags
from vitkit.tools.predict import load_generator
from vitkit.tools.timing import (
    Candidate,
    ContentionMeter,
    append_jsonl,
    cpu_name,
    machine_load,
    time_alternating,
    wait_for_quiet,
)

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
                   subset: torch.Tensor, ref: tuple[torch.Tensor, torch.Tensor], log,
                   known: Callable[[str, str], dict[str, Any] | None] = lambda name, run: None
                   ) -> list[dict[str, Any]]:
    """Per tokenizer run: its own task's evaluation on the whole test set (PSNR through the codes and decoding f,
    codebook usage and perplexity), and the judge's FD / accuracy on its reconstructions of the ``subset``.
    ``known(name, run)``: a row already recorded (not measured again)."""
    rows = []
    for spec in specs:
        name, runs, _ = parse_spec(spec)
        for run in runs:
            if (row := known(name, run)) is not None:
                log(f"tokenizer {name} ({run}): already in the results file, not measured again")
                rows.append(row)
                continue
            metrics, _ = evaluate_checkpoint(run, data="fashion_mnist", split="test")
            vq = load_model(run)
            cfg = vq.pretrained_cfg
            mean = torch.tensor(cfg["mean"]).view(1, -1, 1, 1)
            std = torch.tensor(cfg["std"]).view(1, -1, 1, 1)
            with torch.inference_mode():
                f = vq.encode((test01[subset] - mean) / std)
                rec = to_unit(vq.idx_to_img(vq.quantize.f_to_idx_or_fhat(f, to_fhat=False), last_one=True), cfg)
                cont = to_unit(vq.decode(f), cfg)
            row = {"tokenizer": name, "run": run, "run_id": weights_id(run), "params": count_params(vq),
                   "scales": list(vq.patch_nums),
                   "psnr": metrics["psnr"],
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


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def mean_std(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


# ----------------------------------------------------------------------------------------------- records
STUDY = "generation"
RECORD_FACTS = ("kind", "study", "judge", "judge_id", "n", "sample_seed", "threads", "load_1m", "machine", "process",
                "finished_at", "elapsed_s", "command", "source", "note", "campaign")
# what makes two records the same measurement (runs by folder and weights); a speed cell is new in every process
KEYS = {"classifier": ("judge", "judge_id", "campaign"), "floor": ("judge", "judge_id", "n", "sample_seed", "campaign"),
        "training": ("run", "run_id", "campaign"),
        "tokenizer": ("tokenizer", "run", "run_id", "judge", "judge_id", "n", "sample_seed", "campaign"),
        "quality": ("generator", "run", "run_id", "settings", "judge", "judge_id", "n", "sample_seed", "campaign"),
        "speed": ("generator", "batch", "process")}


def weights_id(run: str) -> str | None:
    """The first 16 hex digits of the sha256 of the weights a run folder (its best checkpoint) or checkpoint
    folder holds: which training a record measured. None where there are none (a stand-in model)."""
    try:
        weights = resolve_model_dir(run) / "model.safetensors"
        stat = weights.stat()
    except (CheckpointError, OSError):
        return None
    return _file_sha256(weights, stat.st_mtime_ns, stat.st_size)[:16]


@functools.cache  # a file is hashed once per process while it is unchanged (several records name each run)
def _file_sha256(path: Path, mtime_ns: int, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def training_record(run: str, role: str) -> dict[str, Any] | None:
    """What a training run's own ``summary.json`` and resolved ``config.yaml`` say about it (None for a
    checkpoint folder, which keeps neither): the setup figures the doc quotes, traceable to a record."""
    from vitkit.engine.config import load_config
    from vitkit.tools.ablate import run_key

    folder = Path(run)
    if not (folder / "summary.json").is_file() or not (folder / "config.yaml").is_file():
        return None
    s = json.loads((folder / "summary.json").read_text())
    cfg = load_config(folder / "config.yaml")
    lines = read_records(folder / "metrics.jsonl")  # (none: an empty list)
    metric = s.get("primary_metric")
    return {"kind": "training", "role": role, "run": run, "run_id": weights_id(run), "config_key": run_key(cfg),
            "model": s["model"], "task": s["task"], "model_args": dict(cfg.model.args), "params": s["params"],
            "seed": cfg.train.seed, "train_threads": cfg.train.threads, "batch_size": cfg.train.batch_size,
            "epochs": s["epochs_done"], "steps": s["steps"], "val_fraction": cfg.data.val_fraction,
            "eval_split": s.get("eval_split"), "primary_metric": metric, "mode": s.get("mode"),
            "best_epoch": s["best"].get("epoch"), "best": s["best"].get(metric),
            "test": (s.get("test") or {}).get(metric), "train_wall_clock_s": s["train_wall_clock_s"],
            "fit_elapsed_s": next((x["fit_elapsed_s"] for x in reversed(lines) if "fit_elapsed_s" in x), None),
            "train_img_s": s["train_img_s"], "finished": s.get("finished")}


def seed_of(run: str) -> int | None:
    """The training seed a run's folder names (``runs/gen_var_s1`` -> 1); None when it names none."""
    m = re.search(r"_s(\d+)(?:/|$)", run.rstrip("/"))
    return int(m.group(1)) if m else None


def record_key(r: dict[str, Any]) -> tuple:
    return (r["kind"], *(json.dumps(r.get(k), sort_keys=True) for k in KEYS[r["kind"]]))


def read_records(path: str | Path) -> list[dict[str, Any]]:
    from vitkit.tools.ablate import read_results

    return read_results(path)


def append_records(path: Path, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Append to the JSON-lines file ``path`` the records whose key is not there yet; returns those written."""
    have = {record_key(r) for r in read_records(path)}
    new = []
    for r in records:
        if record_key(r) not in have:
            have.add(record_key(r))
            new.append(r)
    append_jsonl(path, new)
    return new


def speed_record(cand: Candidate, base_s: float | None, batch: int) -> dict[str, Any]:
    """One timed cell: the median of the kept samples, the other processes' CPU share during each of them."""
    sec = statistics.median(cand.samples)
    return {"batch": batch, "s_per_batch": sec, "ms_per_img": 1e3 * sec / batch, "img_s": batch / sec,
            "x_raster": base_s / sec if base_s else None, "samples": len(cand.samples),
            "contention": [None if math.isnan(c) else round(c, 4) for c in cand.contention],
            "discarded": cand.discarded, "noisy": "noisy" in cand.note}


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
    ap.add_argument("--results", type=Path, default=None,
                    help="JSON-lines file the records are appended to (docs/generation/results.jsonl); quality "
                         "sets and tokenizers already recorded there are not measured again")
    ap.add_argument("--campaign", default=None,
                    help="the set of trainings the records belong to (needed with --results): docs/generation.md "
                         "shows one campaign")
    ap.add_argument("--only", choices=["all", "quality", "speed"], default="all",
                    help="quality sets and tokenizers only, or speed only (e.g. on a quieter machine)")
    args = ap.parse_args(argv)
    if args.results is not None and not args.campaign:
        ap.error("--results needs --campaign NAME: the set of trainings these records belong to")
    torch.set_num_threads(args.threads)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    load_before = machine_load()
    started = time.time()
    process = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)) + f"-{uuid.uuid4().hex[:8]}"
    done = {record_key(r): r for r in read_records(args.results)} if args.results is not None else {}
    records: list[dict[str, Any]] = []  # this process's, completed with the machine facts at the end

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
    keyed = {"judge": args.classifier, "judge_id": weights_id(args.classifier), "n": n,
             "sample_seed": args.sample_seed, "campaign": args.campaign}

    def recorded(kind: str, **fields: Any) -> dict[str, Any] | None:
        return done.get(record_key({"kind": kind, **keyed, **fields}))

    quality = args.only != "speed"
    if quality:
        real = stratified(train.labels.long(), args.per_class, seed=args.sample_seed)
        result["floor"] = score(judge, train.images[real].float() / 255, train.labels[real].long(), ref)
        subset = stratified(test_labels, args.per_class, seed=args.sample_seed)
        log(f"classifier {result['classifier']}; floor (N={n} real training images) {result['floor']} "
            f"[{time.perf_counter() - t0:.0f} s]")
        result["tokenizers"] = tokenizer_rows(judge, args.tokenizer, test01, test_labels, subset, ref, log,
                                              known=lambda name, run: recorded("tokenizer", tokenizer=name, run=run,
                                                                               run_id=weights_id(run)))
        c = result["classifier"]
        records += [{"kind": "classifier", **keyed, "model": c["model"], "test_acc": c["test_acc"],
                     "feature_dim": c["feature_dim"], "params": count_params(judge.model)},
                    {"kind": "floor", **result["floor"], **keyed},
                    *({"kind": "tokenizer", **{k: v for k, v in t.items() if k not in RECORD_FACTS}, **keyed}
                      for t in result["tokenizers"])]

    labels = torch.arange(NUM_CLASSES).repeat_interleave(args.per_class)
    grid_labels = torch.arange(NUM_CLASSES).repeat_interleave(args.grid_per_class)
    panels = {"test images": test01[stratified(test_labels, args.grid_per_class, seed=1)]}
    generators, speed_cands, first_run = [], [], {}
    for spec in args.generator:
        name, runs, settings = parse_spec(spec)
        per_run = []
        for i, run in enumerate(runs):
            model, task, names = load_generator(run, seed=args.sample_seed, **settings)
            run_id = weights_id(run)
            if quality and (old := recorded("quality", generator=name, run=run, run_id=run_id,
                                            settings=settings)) is not None:
                per_run.append({"run": run, "fd": old["fd"], "class_acc": old["class_acc"]})
                log(f"{name} ({run}): already in the results file, not measured again: {per_run[-1]}")
            elif quality:
                t1 = time.perf_counter()
                images = sample_set(model, task, labels, args.sample_seed, args.batch)
                seconds = time.perf_counter() - t1
                per_run.append({"run": run, **score(judge, images, labels, ref), "quality_set_s": seconds})
                log(f"{name} ({run}): {per_run[-1]}")
                records.append({"kind": "quality", "generator": name, "run": run, "run_id": run_id,
                                "seed": seed_of(run),
                                "settings": settings, "steps": describe_steps(model, task),
                                "params": count_params(model), **per_run[-1], **keyed})
            if i == 0:
                first_run[name] = run
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
    if quality:  # each run's own training summary, for the setup the doc describes
        roles = {args.classifier: "judge", **{run: f"tokenizer {name}" for spec in args.tokenizer
                                              for name, runs, _ in [parse_spec(spec)] for run in runs}}
        for g in generators:
            roles.update({r["run"]: g["name"] for r in g["runs"] if r["run"] not in roles})
        for run, role in roles.items():
            if (t := training_record(run, role)) is not None:
                records.append({**t, "campaign": args.campaign})

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
        steps_of = {g["name"]: (g["steps"], g["settings"]) for g in generators}
        for c in speed_cands:
            run = first_run[c.name]
            records.append({"kind": "speed", "generator": c.name, "run": run, "seed": seed_of(run),
                            "settings": steps_of[c.name][1], "steps": steps_of[c.name][0],
                            **speed_record(c, med.get("raster"), args.speed_batch), "repeats": args.repeats,
                            "min_sample_s": args.min_sample_seconds, "max_contention": args.max_contention})

    flags = cpu_flags()
    result["machine"] = {
        "cpu": cpu_name(),
        "logical_cpus": os.cpu_count(), "threads": args.threads,
        "avx512_bf16": "avx512_bf16" in flags, "amx": "amx_bf16" in flags, "torch": torch.__version__,
        "load_before": load_before, "load_after": machine_load()}
    if args.results is not None:
        from vitkit.tools.ablate import machine_facts

        facts = {"threads": args.threads, "load_1m": [load_before, result["machine"]["load_after"]],
                 "machine": {**machine_facts(), "avx512_bf16": "avx512_bf16" in flags}, "process": process,
                 "campaign": args.campaign,
                 "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                 "elapsed_s": round(time.time() - started, 1), "command": sys.argv[1:] if argv is None else argv}
        written = append_records(args.results, [{**r, "study": STUDY, **facts} for r in records])
        log(f"appended {len(written)} record(s) to {args.results} ({len(records) - len(written)} already there)")
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


# ----------------------------------------------------------------------------------------------- doc blocks
# `vitkit report` calls these for the `script` blocks of docs/generation.md (``results`` relative to the doc's
# folder); they read the records only, and the latest record of each key wins.
GENERATOR_LABELS = {"raster": "raster AR", "random": "random-order AR", "masked": "masked AR (MaskGIT), 8 steps",
                    "masked-4": "masked AR, 4 steps", "masked-16": "masked AR, 16 steps", "var": "VAR",
                    "hart-discrete": "HART, discrete tokens only", "hart": "HART, + residual by diffusion"}
TOKENIZER_LABELS = {"vq": "single-scale (for AR)", "msvq": "multi-scale, hybrid-trained (for VAR and HART)"}


def _records(doc_dir: str | Path, results: str, campaign: str | None = None) -> list[dict[str, Any]]:
    """The records of the results file; of one ``campaign`` (set of trainings) when one is named."""
    path = Path(doc_dir) / results
    if not path.is_file():
        raise FileNotFoundError(f"{path}: results file not found")
    records = read_records(path)
    if campaign is not None:
        records = [r for r in records if r.get("campaign") == campaign]
        if not records:
            raise ValueError(f"{path}: no records of campaign {campaign!r}")
    return records


def _latest(records: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """The records of ``kind``, the last of each key, in the order their keys first appear."""
    out: dict[tuple, dict[str, Any]] = {}
    for r in records:
        if r.get("kind") == kind:
            out[record_key(r)] = r
    return list(out.values())


def _origin(rs: list[dict[str, Any]]) -> str:
    return ", ".join(f"`{o}`" for o in dict.fromkeys(r.get("source") or r["process"] for r in rs))


def _mean_std(values: list[float], fmt: str, unit: str = "") -> str:
    if len(values) == 1:
        return f"{values[0]:{fmt}}{unit}"
    return f"{statistics.fmean(values):{fmt}}{unit} ± {statistics.stdev(values):{fmt}}"


def _sig3(x: float) -> str:
    return f"{x:.{max(0, 2 - math.floor(math.log10(abs(x))))}f}" if x else "0"


def render_machine(doc_dir: str | Path, plots: bool = True, results: str = "generation/results.jsonl",
                   campaign: str | None = None) -> str:
    """One line per machine the records name, with the threads and 1-min load of each benchmark process."""
    lines = []
    records = _records(doc_dir, results, campaign)
    machines = dict.fromkeys(json.dumps(r["machine"], sort_keys=True) for r in records)
    for m in machines:
        facts = json.loads(m)
        rs = [r for r in records if json.dumps(r["machine"], sort_keys=True) == m]
        procs = []
        for proc in dict.fromkeys(r["process"] for r in rs):
            pr = [r for r in rs if r["process"] == proc]
            kinds = "/".join(dict.fromkeys(r["kind"] + (f" b{r['batch']}" if "batch" in r else "") for r in pr))
            load = " → ".join(f"{x:.2f}" for x in pr[0]["load_1m"] if x is not None)
            threads = pr[0]["threads"]
            procs.append(f"{kinds} ({_origin(pr[:1])}: {threads} thread{'s' if threads > 1 else ''}, "
                         f"1-min load {load})")
        lines.append(f"- {facts['cpu']}, {facts['cores']} cores, native bf16 {'yes' if facts['native_bf16'] else 'no'}"
                     f", AMX {'yes' if facts['amx'] else 'no'}, torch {facts['torch']}"
                     + (f", Python {facts['python']}" if "python" in facts else "") + ": " + "; ".join(procs))
    return "\n".join(lines)


def render_training(doc_dir: str | Path, plots: bool = True, results: str = "generation/results.jsonl",
                    campaign: str | None = None, order: str | None = None) -> str:
    """The training runs as their own summaries recorded them: size, budget, the best epoch's validation metric
    (the checkpoint the benchmark used), the test metric read once at the end, and wall-clock."""
    runs = _latest(_records(doc_dir, results, campaign), "training")
    roles = order.split(",") if order else list(dict.fromkeys(r["role"] for r in runs))
    runs.sort(key=lambda r: (roles.index(r["role"]) if r["role"] in roles else len(roles), r["seed"], r["run"]))
    out = ["| role | run | model | params | seed | epochs (steps) | metric | best on val (epoch) | test, read once | "
           "wall-clock: training steps / with validation |", "|---|---|---|---:|---:|---|---|---:|---:|---|"]

    def show(metric: str, x: float) -> str:
        return f"{100 * x:.2f}%" if metric.startswith("top") else f"{x:.3f}" if abs(x) < 10 else f"{x:.2f}"

    for r in runs:
        metric = r["primary_metric"]
        best = f"{show(metric, r['best'])} ({r['best_epoch']})" if r["eval_split"] == "val" else "— (no validation)"
        test = show(metric, r["test"]) if r["test"] is not None else "—"
        clock = f"{r['train_wall_clock_s'] / 60:.1f} min" + (
            f" / {r['fit_elapsed_s'] / 60:.1f} min" if r["fit_elapsed_s"] is not None else "")
        out.append(f"| {r['role']} | `{r['run']}` | {r['model']} | {r['params'] / 1e6:.2f}M | {r['seed']} | "
                   f"{r['epochs']} ({r['steps']}) | {metric} ({'↑' if r['mode'] == 'max' else '↓'}) | "
                   f"{best} | {test} | {clock} |")
    threads = sorted({r["train_threads"] for r in runs})
    fractions = sorted({r["val_fraction"] for r in runs})
    return "\n".join(out) + (f"\n\n{len(runs)} runs, {'/'.join(map(str, threads))} training thread(s) each; "
                             f"validation split: {'/'.join(f'{100 * f:g}%' for f in fractions)} of the training "
                             f"images (data.val_fraction), which picks each run's best checkpoint; records from "
                             f"{_origin(runs)}.")


def render_tokenizers(doc_dir: str | Path, plots: bool = True, results: str = "generation/results.jsonl",
                      campaign: str | None = None) -> str:
    """The tokenizer table: PSNR through the codes and decoding f, the judge on their reconstructions, codebook."""
    out = ["| tokenizer | codes per image | PSNR (codes) | PSNR (decoding f) | FD of reconstructions: codes / f | "
           "judge acc.: codes / f | codebook usage | perplexity |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    toks = _latest(_records(doc_dir, results, campaign), "tokenizer")
    for t in toks:
        multi = len(t["scales"]) > 1
        codes = "+".join(f"{p}²" for p in t["scales"]) + f" = {sum(p * p for p in t['scales'])}"
        fd = f"{t['rec_fd']:.3f}" + (f" / {t['continuous_fd']:.3f}" if multi else "")
        acc = f"{100 * t['rec_class_acc']:.1f}%" + (f" / {100 * t['continuous_class_acc']:.1f}%" if multi else "")
        out.append(f"| `{t['tokenizer']}` {TOKENIZER_LABELS.get(t['tokenizer'], '')}, `{t['run']}` | {codes} | "
                   f"{t['psnr']:.2f} dB | " + (f"{t['psnr_continuous']:.2f} dB" if multi else "—") +
                   f" | {fd} | {acc} | {100 * t['codebook_usage']:.0f}% | {t['perplexity']:.0f} |")
    return "\n".join(out) + f"\n\nN = {toks[0]['n']:,} test images for FD and accuracy; records from {_origin(toks)}."


def render_quality(doc_dir: str | Path, plots: bool = True, results: str = "generation/results.jsonl",
                   campaign: str | None = None, order: str | None = None) -> str:
    """The sample-quality table: the floor, then mean ± std over training runs of FD and the judge's accuracy."""
    records = _records(doc_dir, results, campaign)
    quality = _latest(records, "quality")
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in quality:
        groups.setdefault(r["generator"], []).append(r)
    out = ["| method | steps per image | FD ↓ | judge accuracy on samples ↑ | training runs | per run: FD, acc. |",
           "|---|---|---:|---:|---:|---|"]
    floors = _latest(records, "floor")
    for f in floors:
        out.append(f"| real training images (floor) | — | {f['fd']:.3f} | {100 * f['class_acc']:.1f}% | — | |")
    for name in order.split(",") if order else groups:
        rs = sorted(groups[name], key=lambda r: (r["seed"] is None, r["seed"] or 0, r["run"]))
        per = "; ".join(f"s{r['seed']}: {r['fd']:.3f}, {100 * r['class_acc']:.1f}%" for r in rs)
        out.append(f"| {GENERATOR_LABELS.get(name, name)} | {rs[0]['steps']} | "
                   f"{_mean_std([r['fd'] for r in rs], '.3f')} | "
                   f"{_mean_std([100 * r['class_acc'] for r in rs], '.1f', '%')} | {len(rs)} | {per} |")
    judges = _latest(records, "classifier")
    notes = [f"judge `{j['judge']}` ({j['model']}): {100 * j['test_acc']:.2f}% on the 10,000 test images, "
             f"{j['feature_dim']}-d features" for j in judges]
    notes.append(f"N = {quality[0]['n']:,} images per set, sampling seed {quality[0]['sample_seed']}; records from "
                 f"{_origin(floors + quality)}")
    return "\n".join(out) + "\n\n" + "; ".join(notes) + "."


def _speed_processes(records: list[dict[str, Any]], batches: list[int]) -> dict[int, list[dict[str, Any]]]:
    """For each batch, the speed records of the last process that timed it (ratios only within one process)."""
    speed = _latest(records, "speed")
    chosen = {}
    for b in batches:
        procs = [r["process"] for r in speed if r["batch"] == b]
        if not procs:
            raise ValueError(f"no speed records at batch {b}")
        chosen[b] = [r for r in speed if r["batch"] == b and r["process"] == procs[-1]]
    return chosen


def render_speed(doc_dir: str | Path, plots: bool = True, results: str = "generation/results.jsonl",
                 campaign: str | None = None, order: str | None = None, batches: str = "1,50",
                 baseline: str = "raster") -> str:
    """Sampling speed per batch; × raster is the baseline's time over the method's, both from the same process."""
    bs = [int(b) for b in batches.split(",")]
    chosen = _speed_processes(_records(doc_dir, results, campaign), bs)
    names = order.split(",") if order else list(dict.fromkeys(r["generator"] for b in bs for r in chosen[b]))
    out = ["| method | steps | " + " | ".join(f"batch {b}: ms / image | img/s | × {baseline}" for b in bs) + " |",
           "|---|---|" + "---:|---:|---:|" * len(bs)]
    for name in names:
        cells, steps = [], "—"
        for b in bs:
            by = {r["generator"]: r for r in chosen[b]}
            r, base = by.get(name), by.get(baseline)
            if r is None:
                cells += ["—"] * 3
                continue
            steps = r["steps"]
            noisy = " (noisy)" if r.get("noisy") else ""
            cells += [_sig3(r["ms_per_img"]) + noisy, f"{r['img_s']:.1f}",
                      f"{base['s_per_batch'] / r['s_per_batch']:.2f}" if base else "—"]
        out.append(f"| {GENERATOR_LABELS.get(name, name)} | {steps} | " + " | ".join(cells) + " |")
    notes = []
    for b in bs:
        rs = chosen[b]
        load = " → ".join(f"{x:.2f}" for x in rs[0]["load_1m"] if x is not None)
        cont = [c for r in rs for c in r.get("contention") or [] if c is not None]
        counts = sorted({r["samples"] for r in rs})
        notes.append(f"batch {b}: one process, {_origin(rs[:1])}, {rs[0]['threads']} threads, median of "
                     f"{'-'.join(map(str, counts[::max(1, len(counts) - 1)]))} timed samples, 1-min load {load}"
                     + (f", other processes' share during kept samples ≤ {100 * max(cont):.0f}%" if cont else
                        ", per-sample contention not recorded"))
    return "\n".join(out) + "\n\n" + "; ".join(notes) + "."


def render_speed_goal(doc_dir: str | Path, plots: bool = True, results: str = "generation/results.jsonl",
                      campaign: str | None = None, generator: str = "var", baseline: str = "raster", goal: str = "5",
                      batches: str = "1,50") -> str:
    """A speed goal as a measured ratio of one process per batch: no seed interval, so not judged by the seed rule."""
    chosen = _speed_processes(_records(doc_dir, results, campaign), [int(b) for b in batches.split(",")])
    lines = []
    for b, rs in chosen.items():
        by = {r["generator"]: r for r in rs}
        g, base = by[generator], by[baseline]
        ratio = base["s_per_batch"] / g["s_per_batch"]
        lines.append(f"- sampling speed at batch {b}, {baseline}'s time ÷ {generator}'s (one process, "
                     f"{_origin(rs[:1])}; a measured ratio, no seed interval): {_sig3(base['ms_per_img'])} / "
                     f"{_sig3(g['ms_per_img'])} ms per image = **{ratio:.2f}×** against the goal ≥ {goal}× → "
                     f"**{'goal reached' if ratio >= float(goal) else 'goal not reached'}**")
    return "\n".join(lines)


def render_reconstruction(doc_dir: str | Path, plots: bool = True, results: str = "generation/results.jsonl",
                          campaign: str | None = None, tokenizer: str = "msvq") -> str:
    """Decoding the continuous latent f vs the codes, per tokenizer run, judged by the verdict rule (the generic
    ``verdict`` block contrasts groups of records, not two fields of one record)."""
    from vitkit.tools.verdict import contrast_interval, decide

    toks = [t for t in _latest(_records(doc_dir, results, campaign), "tokenizer") if t["tokenizer"] == tokenizer]
    runs = f"{len(toks)} tokenizer run{'s' if len(toks) > 1 else ''}"
    lines = []
    for name, f_key, codes_key, unit, expect, scale, fmt in (
            ("PSNR", "psnr_continuous", "psnr", "dB", "above", 1.0, ".2f"),
            ("FD of the reconstructions", "continuous_fd", "rec_fd", "FD", "below", 1.0, ".3f"),
            ("judge accuracy on the reconstructions", "continuous_class_acc", "rec_class_acc", "points", "above",
             100.0, ".1f")):
        f_values, codes = [scale * t[f_key] for t in toks], [scale * t[codes_key] for t in toks]
        interval = contrast_interval({"f": f_values, "codes": codes}, {"f": 1.0, "codes": -1.0})
        mean_f, mean_codes = statistics.fmean(f_values), statistics.fmean(codes)
        shown = f"{interval.show()} {unit}" if interval else f"{mean_f - mean_codes:+{fmt}} {unit}, no interval"
        lines.append(f"- {name}, `{tokenizer}` decoding f vs its codes ({runs}: {mean_f:{fmt}} vs {mean_codes:{fmt}}; "
                     f"f − codes {'> 0' if expect == 'above' else '< 0'}): {shown} → "
                     f"**{decide(interval, expect, seeds=len(toks))}**")
    return "\n".join(lines)

if __name__ == "__main__":
    sys.exit(main())
