"""``vitkit ablate``: train the variants of a base recipe under one protocol and tabulate the outcome.

Each study answers one of the ViT paper's design claims (see ``STUDIES``). Every variant is the base recipe
plus a few dotted overrides, trained by the same engine with the same data, augmentation, budget and seeds.
Runs are keyed by their full resolved configuration, so a variant shared by two studies (the baseline,
for one) is trained once, and a second invocation skips every run already in ``results.jsonl``; a run that
was interrupted is resumed from its last checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import statistics
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..utils import atomic_write_text
from .config import config_to_dict, load_config
from .trainer import train


@dataclass(frozen=True)
class Variant:
    label: str
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class Study:
    name: str
    claim: str
    variants: tuple[Variant, ...]
    lr_multipliers: tuple[float, ...] = (1.0,)  # a learning-rate sweep per variant (pooling study)
    steps_matched_fraction: bool = field(default=False)  # data-size: epochs / fraction, same optimizer steps
    # with steps_matched_fraction: the data fraction the recipe's epoch count is meant for (1.0: the full set)
    reference_fraction: float = 1.0
    evals_per_run: int | None = None  # evaluate this many times per run (long small-data runs), else the recipe's
    scale_warmup: bool = False  # with steps_matched_fraction: warm-up epochs scaled too (same warm-up steps)
    # Δ against the first variant with the same label suffix ("..._10pct" vs "scratch_10pct"), not the first row
    compare_within_suffix: bool = False

    @property
    def needs_pretrained(self) -> bool:
        return any("{pretrained." in o for v in self.variants for o in v.overrides)


M = "model.args."
STUDIES: dict[str, Study] = {s.name: s for s in (
    Study("pos_embed", "No position embedding is worse; learned 1D, 2D and relative barely differ.", (
        Variant("none", (f"{M}pos_embed=none",)),
        Variant("learned_1d", (f"{M}pos_embed=learned_1d",)),
        Variant("learned_2d", (f"{M}pos_embed=learned_2d",)),
        Variant("relative", (f"{M}pos_embed=relative", f"{M}pos_placement=every_layer")),
    )),
    Study("pos_placement", "Adding the embedding at the input, at every layer, or at every layer with one "
          "shared table barely differs (shared may be slightly better).", (
        Variant("input", (f"{M}pos_placement=input",)),
        Variant("every_layer", (f"{M}pos_placement=every_layer",)),
        Variant("every_layer_shared", (f"{M}pos_placement=every_layer_shared",)),
    )),
    Study("pooling", "CLS token and global average pooling reach the same accuracy once the learning rate is "
          "tuned for each.", (
        Variant("cls", (f"{M}pool=cls",)),
        Variant("gap", (f"{M}pool=gap", f"{M}class_token=false")),
    ), lr_multipliers=(0.5, 1.0, 2.0, 4.0)),
    Study("overlap", "Overlapping patches barely differ from non-overlapping ones.", (
        Variant("non_overlapping", ()),
        # twice the base patch size at the base stride: each patch shares half its width with a neighbour,
        # and the token grid (hence the compute of the blocks) stays the same
        Variant("overlapping", (f"{M}patch_size={{2 * patch}}", f"{M}patch_stride={{patch}}")),
    )),
    Study("hybrid", "A hybrid CNN stem helps when data is small.", (
        Variant("pure", ()),
        Variant("hybrid", ("model.name=vit_fmnist_hybrid_tiny",)),
    )),
    Study("data_size", "Without a convolution's inductive bias, ViT trained on small data falls behind: the "
          "hybrid's lead grows as the training set shrinks.", tuple(
        Variant(f"{kind}_{int(frac * 100)}pct", (*over, f"data.train_fraction={frac}"))
        for kind, over in (("pure", ()), ("hybrid", ("model.name=vit_fmnist_hybrid_tiny",)))
        for frac in (0.1, 0.3, 1.0)
    ), steps_matched_fraction=True),
    Study("t2t", "Tokens-to-Token (T2T-ViT) learns richer local structure than patch embedding and beats a ViT "
          "of the same size on mid-size data (the T2T note).", (
        Variant("vit", ()),
        Variant("t2t_performer", ("model.name=t2t_vit_fmnist_tiny",)),
        Variant("t2t_transformer", ("model.name=t2t_vit_t_fmnist_tiny",)),
    )),
    Study("window", "Window attention (Swin) makes attention cost linear in the number of tokens, and shifting the "
          "windows every other block lets information cross window borders; a hierarchical Swin of the same "
          "size competes with a ViT (the efficient-ViT note).", (
        Variant("vit", ()),
        Variant("swin", ("~model.args", "model.name=swin_fmnist_tiny", f"{M}embed_dim=40", f"{M}depths=[2,2]",
                         f"{M}num_heads=[2,4]")),
        Variant("swin_noshift", ("~model.args", "model.name=swin_fmnist_tiny", f"{M}embed_dim=40",
                                 f"{M}depths=[2,2]", f"{M}num_heads=[2,4]", f"{M}shift_windows=false")),
        # one stage of 2x2 windows and no merging: without shifts the four windows meet only in the final pooling
        Variant("swin_1stage", ("~model.args", "model.name=swin_fmnist_tiny", f"{M}embed_dim=64", f"{M}depths=[4]",
                                f"{M}num_heads=[2]")),
        Variant("swin_1stage_noshift", ("~model.args", "model.name=swin_fmnist_tiny", f"{M}embed_dim=64",
                                        f"{M}depths=[4]", f"{M}num_heads=[2]", f"{M}shift_windows=false")),
    )),
    Study("ssl", "Self-supervised pretraining (MAE; contrastive) on the unlabelled training images helps when "
          "labels are few: fine-tuning from a pretrained encoder beats the same ViT trained from scratch on 1% "
          "and 10% of the labels (the self-supervised part of the efficient-ML note).", tuple(
        Variant(f"{init}_{int(frac * 100)}pct", (*over, f"data.train_fraction={frac}"))
        for frac in (0.01, 0.1)
        for init, over in (
            ("scratch", ()),
            ("mae", ("model.pretrained={pretrained.mae}", "optim.layer_decay=0.75")),
            ("contrastive", ("model.pretrained={pretrained.contrastive}", "optim.layer_decay=0.75")),
        )
    ), steps_matched_fraction=True, reference_fraction=0.1, evals_per_run=5, scale_warmup=True,
        compare_within_suffix=True),
)}


def _base_patch(base_cfg) -> int:
    from ..models import model_defaults

    return int(base_cfg.model.args.get("patch_size") or model_defaults(base_cfg.model.name).get("patch_size", 16))


def _fill_pretrained(item: str, pretrained: dict[str, str], study: Study, variant: Variant) -> str:
    """``{pretrained.NAME}`` -> the checkpoint given with ``--pretrained NAME=PATH``."""
    while "{pretrained." in item:
        start = item.index("{pretrained.")
        end = item.index("}", start)
        name = item[start + len("{pretrained."):end]
        if name not in pretrained:
            raise ConfigError(f"study {study.name}, variant {variant.label}: needs a pretrained checkpoint "
                              f"'{name}'; pass --pretrained {name}=PATH (a run folder or checkpoint folder)")
        item = item[:start] + str(pretrained[name]) + item[end + 1:]
    return item


def _variant_overrides(study: Study, variant: Variant, lr_mult: float, base_cfg,
                       pretrained: dict[str, str] | None = None) -> list[str]:
    patch = _base_patch(base_cfg)
    over = [_fill_pretrained(o.replace("{2 * patch}", str(2 * patch)).replace("{patch}", str(patch)),
                             pretrained or {}, study, variant) for o in variant.overrides]
    if lr_mult != 1.0:
        over.append(f"optim.lr={base_cfg.optim.lr * lr_mult:.6g}")
    epochs = base_cfg.train.epochs
    if study.steps_matched_fraction:
        frac = next((float(o.split("=")[1]) for o in over if o.startswith("data.train_fraction=")), 1.0)
        scale = study.reference_fraction / frac
        epochs = max(1, round(base_cfg.train.epochs * scale))
        over.append(f"train.epochs={epochs}")
        if study.scale_warmup:
            over.append(f"schedule.warmup_epochs={base_cfg.schedule.warmup_epochs * scale:g}")
    if study.evals_per_run:
        over.append(f"train.eval_every={max(1, epochs // study.evals_per_run)}")
    return over


def run_key(cfg) -> str:
    """Identify a run by what it trains: the config with the model's arguments fully resolved."""
    from ..models import resolve_model_args

    data = config_to_dict(cfg)
    resolved = resolve_model_args(cfg.model.name, **cfg.model.args)
    if resolved is not None:
        data["model"]["args"] = resolved
    data.pop("output_dir", None)
    for how_not_what in ("threads", "progress"):  # these change speed or display, not the trained model
        data["train"].pop(how_not_what, None)
    data["data"].pop("num_workers", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _read_results(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _run_record(recipe: str | Path, over: list[str], run_dir: Path, epochs: int, model: str) -> dict[str, Any]:
    """Train one variant (resuming its folder if a checkpoint is there) and keep what the tables need."""
    resume = run_dir if (run_dir / "checkpoints" / "last").is_dir() else None
    summary = train(recipe, [*over, f"output_dir={run_dir}", "train.progress=false"], resume=resume)
    return {"top1": summary["final"]["top1"], "best_top1": summary["best"]["top1"], "params": summary["params"],
            "train_img_s": summary["train_img_s"], "wall_clock_s": summary["train_wall_clock_s"],
            "epochs": epochs, "model": model, "run_dir": str(run_dir)}


def die_with_parent() -> None:
    """Worker initializer: on Linux, ask the kernel to SIGTERM this worker when the process that started it dies
    (even by SIGKILL), so an interrupted ``vitkit ablate`` leaves no orphan trainings running; a killed training
    resumes from its last checkpoint on the next call."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _train_pending(recipe: str | Path, pending: dict[str, tuple[list[str], int, str]], out: Path, jobs: int,
                   record: Callable[[str, dict[str, Any]], None], threads_fixed: bool = False) -> None:
    """Run every pending training, ``jobs`` at a time, and record each one as soon as it ends.

    On a small CPU, several single-threaded runs side by side use the cores better than one run that splits
    small matrix products over threads; each worker gets ``cores // jobs`` threads unless the recipe fixes
    ``train.threads`` (``threads_fixed``).
    """
    if jobs <= 1:
        for key, (over, epochs, model) in pending.items():
            record(key, _run_record(recipe, over, out / "runs" / key, epochs, model))
        return
    threads = [] if threads_fixed else [f"train.threads={max(1, (os.cpu_count() or 1) // jobs)}"]
    # spawn, not fork: a forked child would inherit the parent's OpenMP thread pool in an undefined state
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=die_with_parent) as pool:
        futures = {pool.submit(_run_record, recipe, [*threads, *over], out / "runs" / key, epochs, model): key
                   for key, (over, epochs, model) in pending.items()}
        for future in as_completed(futures):
            record(futures[future], future.result())


def run_ablation(recipe: str | Path, studies: list[str], seeds: int, output_dir: str | Path,
                 overrides: list[str] | None = None, variants: list[str] | None = None,
                 jobs: int = 1, pretrained: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Train every (study, variant, lr, seed) not yet done; write results, tables and plots; return rows.

    ``jobs`` trainings run side by side (separate processes); results are appended as each one ends, so an
    interrupted ablation resumes with what is left. ``pretrained`` names the checkpoints that variants
    refer to as ``{pretrained.NAME}`` (the ssl study: ``mae`` and ``contrastive``).
    """
    unknown = [s for s in studies if s not in STUDIES]
    if unknown:
        raise ConfigError(f"unknown study {unknown}; choose from {sorted(STUDIES)} or 'all'")
    if jobs < 1:
        raise ConfigError(f"jobs must be at least 1, got {jobs}")
    if seeds < 1:
        raise ConfigError(f"seeds must be at least 1, got {seeds}")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.jsonl"
    done = {r["key"]: r for r in _read_results(results_path)}
    base_over = list(overrides or [])
    base_cfg = load_config(recipe, base_over)
    planned: list[tuple[str, dict[str, Any]]] = []  # (key, row without results), in table order
    pending: dict[str, tuple[list[str], int, str]] = {}  # runs to train, each key once
    for study_name in studies:
        study = STUDIES[study_name]
        chosen = [v for v in study.variants if variants is None or v.label in variants]
        if not chosen:
            raise ConfigError(f"study {study_name}: none of {variants} is a variant; "
                              f"choose from {[v.label for v in study.variants]}")
        for variant in chosen:
            for lr_mult in study.lr_multipliers:
                for seed in range(seeds):
                    over = [*base_over, *_variant_overrides(study, variant, lr_mult, base_cfg, pretrained),
                            f"train.seed={seed}"]
                    cfg = load_config(recipe, over)
                    key = run_key(cfg)
                    if key not in done:
                        pending.setdefault(key, (over, cfg.train.epochs, cfg.model.name))
                    planned.append((key, {"study": study_name, "variant": variant.label, "seed": seed,
                                          "lr": cfg.optim.lr, "lr_mult": lr_mult, "overrides": over}))

    def record(key: str, result: dict[str, Any]) -> None:
        done[key] = {"key": key, **result}
        with open(results_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(done[key]) + "\n")

    _train_pending(recipe, pending, out, jobs, record, threads_fixed=base_cfg.train.threads is not None)
    rows = [{**done[key], **row} for key, row in planned]
    for study_name in studies:
        study_rows = [r for r in rows if r["study"] == study_name]
        atomic_write_text(out / f"ablation_{study_name}.md", format_table(STUDIES[study_name], study_rows))
        from ..viz.plots import plot_ablation

        plot_ablation(summarize(STUDIES[study_name], study_rows), f"{study_name}: {STUDIES[study_name].claim}",
                      out / f"ablation_{study_name}.png")
    atomic_write_text(out / "ablations.md", "\n\n".join(
        format_table(STUDIES[s], [r for r in rows if r["study"] == s]) for s in studies) + "\n")
    return rows


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(study: Study, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per (variant, lr): mean/std over seeds; with an LR sweep, each variant's best LR is marked."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["variant"], r["lr"]), []).append(r)
    lines = []
    for (variant, lr), rs in groups.items():
        mean, std = _mean_std([100 * r["top1"] for r in rs])
        lines.append({"variant": variant, "lr": lr, "mean": mean, "std": std, "n": len(rs),
                      "params": rs[0]["params"], "img_s": statistics.fmean(r["train_img_s"] for r in rs),
                      "wall_clock": statistics.fmean(r["wall_clock_s"] for r in rs),
                      "epochs": rs[0]["epochs"], "best_lr": False})
    if len(study.lr_multipliers) > 1:
        for variant in {ln["variant"] for ln in lines}:
            best = max((ln for ln in lines if ln["variant"] == variant), key=lambda ln: ln["mean"])
            best["best_lr"] = True
    return lines


def format_table(study: Study, rows: list[dict[str, Any]]) -> str:
    lines = summarize(study, rows)
    sweep = len(study.lr_multipliers) > 1
    ref = next((ln for ln in lines if ln["best_lr"] or not sweep), None)
    suffix = lambda ln: ln["variant"].rsplit("_", 1)[-1]
    refs = {}
    if study.compare_within_suffix:
        for ln in lines:
            refs.setdefault(suffix(ln), ln)
    out = [f"### {study.name}", "", f"Claim: {study.claim}", "",
           "| variant | " + ("lr | " if sweep else "") + "test top-1 (mean ± std) | seeds | "
           + ("Δ vs first of its group (±2 SE) | " if refs else "Δ vs first (±2 SE) | ") +
           "params | train img/s | wall-clock (s) | epochs |",
           "|---|" + ("---|" if sweep else "") + "---|---|---|---|---|---|---|"]
    for ln in lines:
        ref = refs.get(suffix(ln), ref) if refs else ref
        if ref is None or ln is ref:
            delta = "—"
        else:
            se = math.sqrt(ln["std"] ** 2 / max(1, ln["n"]) + ref["std"] ** 2 / max(1, ref["n"]))
            delta = f"{ln['mean'] - ref['mean']:+.2f} (±{2 * se:.2f})"
        mark = " (best lr)" if ln["best_lr"] else ""
        out.append(f"| {ln['variant']}{mark} | " + (f"{ln['lr']:.2g} | " if sweep else "") +
                   f"{ln['mean']:.2f} ± {ln['std']:.2f} | {ln['n']} | {delta} | {ln['params'] / 1e6:.3f}M | "
                   f"{ln['img_s']:.0f} | {ln['wall_clock']:.0f} | {ln['epochs']} |")
    if sweep:
        out += ["", "With a learning-rate sweep, Δ compares each row with the first variant at its best "
                "learning rate; the best learning rate is chosen on the test set, as the claim's protocol has "
                "no separate validation split here."]
    return "\n".join(out)
