"""What MAE's masking buys: one MAE training step vs. one full-token step of the same encoder.

MAE step: ``model(images)`` (encoder on the 25% visible patches + CLS, decoder on all patches), backward, AdamW.
Full-token step: the same encoder as a classifier on all patches (cross-entropy), backward, AdamW. Same batch,
same encoder architecture (MAE's sin-cos positions in both), fp32 and bf16 autocast. Steps alternate between the
two models round by round (other processes share the CPU), after warm-up; medians are reported.

    python benchmarks/bench_mae.py                                  # ViT-B/16 at 224 (batch 8), FMNIST tiny (256)
    python benchmarks/bench_mae.py --cases fmnist_tiny --rounds 10
    python benchmarks/bench_mae.py --cases vit_b16:fp32 fmnist_tiny:fp32,bf16   # precisions per case
    python benchmarks/bench_mae.py --cases fmnist_tiny --profile    # where the MAE step's time goes

The optimizer is the engine's (``vitkit.engine.optim.build_optimizer``: fused AdamW, weight-decay groups), so
the step is what ``vitkit train`` runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import vitkit
from vitkit.engine.config import OptimConfig
from vitkit.engine.optim import build_optimizer
from vitkit.models import MaskedAutoencoderViT
from vitkit.tools.inference import native_bf16_supported


@dataclass
class Case:
    label: str
    mae: str
    classifier: str
    batch: int
    num_classes: int


CASES = {
    "vit_b16": Case("ViT-B/16, 224", "mae_vit_base_patch16", "vit_base_patch16_224", 8, 1000),
    "fmnist_tiny": Case("FMNIST tiny, 28", "mae_vit_fmnist_tiny", "vit_fmnist_tiny", 256, 10),
}


def build(case: Case) -> tuple[MaskedAutoencoderViT, nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    mae = vitkit.create_model(case.mae).train()
    enc = mae.encoder
    full = vitkit.create_model(case.classifier, num_classes=case.num_classes, pos_embed="sincos_2d",
                               pos_sincos_order="wh").train()
    x = torch.randn(case.batch, enc.in_chans, *enc.img_size)
    y = torch.randint(0, case.num_classes, (case.batch,))
    return mae, full, x, y


def make_step(model: nn.Module, loss_fn: Callable[[], torch.Tensor], bf16: bool) -> Callable[[], None]:
    opt = build_optimizer(model, OptimConfig(lr=1e-4, weight_decay=0.05))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def timed(step: Callable[[], None]) -> float:
    start = time.perf_counter()
    step()
    return (time.perf_counter() - start) * 1e3


def bench_case(case: Case, bf16: bool, warmup: int, rounds: int) -> dict:
    mae, full, x, y = build(case)
    steps = {"mae": make_step(mae, lambda: mae(x).loss, bf16),
             "full": make_step(full, lambda: F.cross_entropy(full(x), y), bf16)}
    for _ in range(warmup):
        for step in steps.values():
            step()
    samples: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            samples[name].append(timed(step))
    n = mae.encoder.grid[0] * mae.encoder.grid[1]
    keep = int(n * (1 - mae.mask_ratio))
    ms = {k: statistics.median(v) for k, v in samples.items()}
    return {"case": case.label, "batch": case.batch, "precision": "bf16 autocast" if bf16 else "fp32",
            "tokens": f"{mae.num_prefix_tokens + keep} / {mae.num_prefix_tokens + n}",
            "mae_ms": ms["mae"], "full_ms": ms["full"], "ratio": ms["full"] / ms["mae"],
            "spread": max((max(v) - min(v)) / statistics.median(v) for v in samples.values())}


def format_table(rows: list[dict]) -> str:
    lines = ["| model | batch | precision | encoder tokens (MAE / full) | MAE step ms | full-token step ms | "
             "full / MAE | spread |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['batch']} | {r['precision']} | {r['tokens']} | {r['mae_ms']:.0f} | "
                     f"{r['full_ms']:.0f} | {r['ratio']:.2f} | {100 * r['spread']:.0f}% |")
    return "\n".join(lines)


def profile_mae_step(case: Case, bf16: bool, rows: int) -> None:
    """One profiled MAE step, split into encoder / decoder / loss / backward / optimizer ranges."""
    from torch.profiler import ProfilerActivity, profile, record_function

    mae, _, x, _ = build(case)
    opt = build_optimizer(mae, OptimConfig(lr=1e-4, weight_decay=0.05))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            with record_function("mae.encoder (visible tokens)"):
                latent, mask, ids_restore, grid = mae.forward_encoder(x)
            with record_function("mae.decoder (all tokens)"):
                pred = mae.forward_decoder(latent, ids_restore, grid)
            with record_function("mae.loss"):
                loss = mae.forward_loss(x, pred, mask)
        with record_function("mae.backward"):
            loss.backward()
        with record_function("mae.optimizer (AdamW)"):
            opt.step()
            opt.zero_grad(set_to_none=True)

    step()  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = prof.key_averages()
    phases = [e for e in events if e.key.startswith("mae.")]
    total = sum(e.cpu_time_total for e in phases)
    print(f"\nMAE step, {case.label}, batch {case.batch}, {'bf16 autocast' if bf16 else 'fp32'}: "
          f"{total / 1e3:.0f} ms in the phases below")
    for e in sorted(phases, key=lambda e: -e.cpu_time_total):
        print(f"  {e.key:32s} {e.cpu_time_total / 1e3:9.1f} ms  {100 * e.cpu_time_total / total:5.1f}%")
    print()
    print(events.table(sort_by="self_cpu_time_total", row_limit=rows))


def parse_case(spec: str, default_precisions: list[str]) -> tuple[str, list[str]]:
    """``name`` or ``name:fp32,bf16``."""
    name, _, precisions = spec.partition(":")
    if name not in CASES:
        raise SystemExit(f"unknown case {name!r}; choose from {sorted(CASES)}")
    chosen = precisions.split(",") if precisions else default_precisions
    if not set(chosen) <= {"fp32", "bf16"}:
        raise SystemExit(f"precisions are fp32 and bf16, got {precisions!r}")
    return name, chosen


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", nargs="+", default=["vit_b16", "fmnist_tiny"],
                   help=f"cases {sorted(CASES)}, each optionally with its precisions: fmnist_tiny:fp32,bf16")
    p.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"],
                   help="precisions of cases that name none")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3, help="timed steps per model (medians reported)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--profile", nargs="?", const="", default=None, metavar="CASE",
                   help="also profile one MAE step of CASE (default: the first case, at its first precision)")
    p.add_argument("--profile-rows", type=int, default=20)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cases = [parse_case(c, args.precisions) for c in args.cases]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, native bf16: {native_bf16_supported()}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    rows = []
    for name, precisions in cases:
        for precision in precisions:
            rows.append(bench_case(CASES[name], precision == "bf16", args.warmup, args.rounds))
            print(f"  {rows[-1]['case']} {rows[-1]['precision']}: MAE {rows[-1]['mae_ms']:.0f} ms, "
                  f"full {rows[-1]['full_ms']:.0f} ms", flush=True)
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}\n")
    print(format_table(rows))
    if args.profile is not None:
        name, precisions = parse_case(args.profile or args.cases[0], args.precisions)
        profile_mae_step(CASES[name], precisions[0] == "bf16", args.profile_rows)


if __name__ == "__main__":
    main()
