"""What MAE's masking buys: one MAE training step vs. one full-token step of the same encoder.

MAE step: ``model(images)`` (encoder on the 25% visible patches + CLS, decoder on all patches), backward, AdamW.
Full-token step: the same encoder as a classifier on all patches (cross-entropy), backward, AdamW. Same batch,
same encoder architecture (MAE's sin-cos positions in both), fp32 and bf16 autocast.

Timing (docs/method.md, "One timing method"): per case and precision, the two steps are two ``Candidate``s (one
call = one step) timed by ``vitkit.tools.timing.time_alternating``: warm-up, then alternating, rotating rounds,
each sample as many whole steps as last ``--min-sample-seconds``; samples during which other processes took more
than ``--max-contention`` of the machine are discarded and re-taken; the figure is the median ms per step over the
kept samples. Every run APPENDS its raw records to ``--results`` (one ``meta`` record, one ``cell`` record per
case, precision and step with every kept sample in ms and its contention, a ``profile`` record with
``--profile``, one ``end``); :func:`render_mae_step` (the ``vitkit report`` block ``script
script=benchmarks/bench_mae.py function=render_mae_step part=table|machine|profile``) builds the tables from it.

    python benchmarks/bench_mae.py                                  # ViT-B/16 at 224 (batch 8), FMNIST tiny (256)
    python benchmarks/bench_mae.py --cases fmnist_tiny --samples 10
    python benchmarks/bench_mae.py --cases vit_b16:fp32 fmnist_tiny:fp32,bf16   # precisions per case
    python benchmarks/bench_mae.py --cases fmnist_tiny --profile    # where the MAE step's time goes

The optimizer is the engine's (``vitkit.engine.optim.build_optimizer``: fused AdamW, weight-decay groups), so
the step is what ``vitkit train`` runs.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import vitkit
from vitkit.engine.config import OptimConfig
from vitkit.engine.optim import build_optimizer
from vitkit.errors import ConfigError
from vitkit.models import MaskedAutoencoderViT
from vitkit.tools.ablate import read_results
from vitkit.tools.report import contention_mark, median_contention, select_run_meta
from vitkit.tools.timing import (
    Candidate,
    ContentionMeter,
    append_jsonl,
    candidate_record,
    end_record,
    machine_load,
    machine_record,
    time_alternating,
    utc_now,
    wait_for_quiet,
)

DEFAULT_RESULTS = Path(__file__).resolve().parent / "results" / "mae_step.jsonl"
PRECISIONS = {"fp32": "fp32", "bf16": "bf16 autocast"}  # key -> label in the table
MAX_CONTENTION = 0.1


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
    """One training step per call. ``time_alternating`` runs its calls under ``torch.inference_mode``; a training
    step needs autograd, so the call switches it back on."""
    opt = build_optimizer(model, OptimConfig(lr=1e-4, weight_decay=0.05))

    def step() -> None:
        with torch.inference_mode(False), torch.enable_grad():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = loss_fn()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step


def bench_case(key: str, precision: str, args: argparse.Namespace, meter: ContentionMeter, run_id: str,
               log: Callable[[str], None]) -> list[dict[str, Any]]:
    """The MAE and the full-token step of one case and precision, alternating; one cell record per step."""
    case = CASES[key]
    bf16 = precision == "bf16"
    mae, full, x, y = build(case)
    waited = (wait_for_quiet(meter, args.max_contention, max_wait_s=args.max_wait)
              if args.max_contention < 1 and args.max_wait > 0 else 0.0)
    cands = [Candidate("mae", "vitkit", precision, make_step(mae, lambda: mae(x).loss, bf16), False),
             Candidate("full", "vitkit", precision, make_step(full, lambda: F.cross_entropy(full(x), y), bf16),
                       False)]
    time_alternating(cands, samples=args.samples, min_sample_s=args.min_sample_seconds,
                     max_contention=args.max_contention, warmup=args.warmup, meter=meter, log=log)
    n = mae.encoder.grid[0] * mae.encoder.grid[1]
    keep = int(n * (1 - mae.mask_ratio))
    common = {"kind": "cell", "run_id": run_id, "case": key, "label": case.label, "mae_model": case.mae,
              "classifier": case.classifier, "decoder": f"{mae.decoder_embed.out_features} × {len(mae.decoder_blocks)}",
              "batch": case.batch, "mask_ratio": mae.mask_ratio, "waited_s": round(waited, 1)}
    tokens = {"mae": mae.num_prefix_tokens + keep, "full": mae.num_prefix_tokens + n}
    return [candidate_record(c, **common, step=c.name, encoder_tokens=tokens[c.name]) for c in cands]


def profile_mae_step(case: Case, bf16: bool, rows: int) -> dict[str, Any]:
    """One profiled MAE step, split into encoder / decoder / loss / backward / optimizer ranges; printed, and
    returned as the phases and the top operators by self CPU time."""
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
    phases = sorted((e for e in events if e.key.startswith("mae.")), key=lambda e: -e.cpu_time_total)
    total = sum(e.cpu_time_total for e in phases)
    print(f"\nMAE step, {case.label}, batch {case.batch}, {'bf16 autocast' if bf16 else 'fp32'}: "
          f"{total / 1e3:.0f} ms in the phases below")
    for e in phases:
        print(f"  {e.key:32s} {e.cpu_time_total / 1e3:9.1f} ms  {100 * e.cpu_time_total / total:5.1f}%")
    print()
    print(events.table(sort_by="self_cpu_time_total", row_limit=rows))
    ops = [e for e in events if e.self_cpu_time_total > 0 and not e.key.startswith("mae.")]
    self_total = sum(e.self_cpu_time_total for e in ops) or 1.0
    top = sorted(ops, key=lambda e: -e.self_cpu_time_total)[:rows]
    return {"total_ms": total / 1e3,
            "phases": [{"phase": e.key, "ms": e.cpu_time_total / 1e3, "share": e.cpu_time_total / total}
                       for e in phases],
            "top_ops": [{"op": e.key, "self_ms": e.self_cpu_time_total / 1e3,
                         "share": e.self_cpu_time_total / self_total} for e in top]}


def parse_case(spec: str, default_precisions: list[str]) -> tuple[str, list[str]]:
    """``name`` or ``name:fp32,bf16``."""
    name, _, precisions = spec.partition(":")
    if name not in CASES:
        raise SystemExit(f"unknown case {name!r}; choose from {sorted(CASES)}")
    chosen = precisions.split(",") if precisions else default_precisions
    if not set(chosen) <= {"fp32", "bf16"}:
        raise SystemExit(f"precisions are fp32 and bf16, got {precisions!r}")
    return name, chosen


def run(args: argparse.Namespace, log: Callable[[str], None]) -> str:
    """Measure every case and precision; append the records to ``args.results``; return the run id."""
    torch.set_num_threads(args.threads)
    cases = [parse_case(c, args.precisions) for c in args.cases]
    run_id = utc_now()
    meta = {"kind": "meta", "run_id": run_id, "command": args.command, "machine": machine_record(),
            "settings": {k: getattr(args, k) for k in ("cases", "precisions", "samples", "min_sample_seconds",
                                                       "warmup", "max_contention", "max_wait", "threads", "profile")},
            "load_before": machine_load()}
    append_jsonl(args.results, [meta])
    m = meta["machine"]
    log(f"MAE step, run {run_id}: {m['cpu']}, torch {m['torch']}, {m['threads']} threads, native bf16: "
        f"{m['native_bf16']}, load average {meta['load_before']} on {m['cores']} CPUs")
    start = time.perf_counter()
    meter = ContentionMeter()
    for name, precisions in cases:
        for precision in precisions:
            records = bench_case(name, precision, args, meter, run_id, log)
            append_jsonl(args.results, records)
            log(f"  {name} {precision}: " + ", ".join(
                f"{r['step']} {statistics.median(r['samples_ms']):.1f} ms" for r in records))
    if args.profile is not None:
        name, precisions = parse_case(args.profile or args.cases[0], args.precisions)
        found = profile_mae_step(CASES[name], precisions[0] == "bf16", args.profile_rows)
        append_jsonl(args.results, [{"kind": "profile", "run_id": run_id, "case": name, "label": CASES[name].label,
                                     "batch": CASES[name].batch, "precision": precisions[0], **found}])
    append_jsonl(args.results, [end_record(run_id, start)])
    return run_id


# ---------------------------------------------------------------------------- from the results file: the tables
def _ms(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}"


def spread(r: dict[str, Any]) -> float:
    """(max - min) / median of a cell's kept samples."""
    return (max(r["samples_ms"]) - min(r["samples_ms"])) / statistics.median(r["samples_ms"])


def render_mae_step(doc_dir: str | Path, plots: bool = True, results: str = "results/mae_step.jsonl",
                    part: str = "table", run: str = "latest") -> str:
    """Markdown for ``vitkit report`` (kind ``script``) from the results file alone (``results`` relative to
    ``doc_dir``): ``part=table`` MAE vs full-token step per case and precision, ``part=machine`` the machine and
    method line, ``part=profile`` the profiled MAE step's phases and top operators."""
    records = read_results(Path(doc_dir) / results)
    meta = select_run_meta(records, run)
    recs = [r for r in records if r.get("run_id") == meta["run_id"] and r.get("kind") != "meta"]
    m, s = meta["machine"], meta["settings"]
    limit = s["max_contention"]
    if part == "machine":
        before = meta.get("load_before")
        load = "" if before is None else f"; load average {before:.1f} at the start"
        return (f"Run {meta['run_id']}: {m['cpu']} ({m['cores']} logical CPUs; {m['cpu_flags'] or 'no AVX2'}; AMX "
                f"{'yes' if m['amx'] else 'no'}; native bf16 {'yes' if m['native_bf16'] else 'no'}), "
                f"{s['threads']} threads; torch {m['torch']}{load}. "
                f"One step = forward, backward and the engine's fused AdamW on one random batch. Per cell the median "
                f"of {s['samples']} kept samples, each ≥ {s['min_sample_seconds']} s of whole steps, the MAE and "
                f"the full-token step alternating in rotating rounds after {s['warmup']} warm-up steps and one "
                f"sizing step; samples with more than {100 * limit:.0f}% of the CPU taken by other processes "
                f"discarded and re-taken; * median contention above that, † no clean sample; spread = (max − min) "
                f"/ median of the kept samples, the larger of the two steps'. Command: `{meta['command']}`.")
    if part == "profile":
        lines = []
        for p in (r for r in recs if r.get("kind") == "profile"):
            lines += [f"MAE step, {p['label']}, batch {p['batch']}, {PRECISIONS.get(p['precision'], p['precision'])}"
                      f" (torch.profiler, one step): {p['total_ms']:.0f} ms in these phases.", "",
                      "| phase | ms | share |", "|---|---:|---:|"]
            lines += [f"| {ph['phase']} | {ph['ms']:.1f} | {100 * ph['share']:.1f}% |" for ph in p["phases"]]
            lines += ["", "| operator | self ms | share of self CPU time |", "|---|---:|---:|"]
            lines += [f"| {op['op']} | {op['self_ms']:.1f} | {100 * op['share']:.1f}% |" for op in p["top_ops"]]
            lines.append("")
        return "\n".join(lines).strip() or "This run profiled nothing (no --profile)."
    if part != "table":
        raise ConfigError(f"part={part!r}: one of table, machine, profile")
    cells = [r for r in recs if r.get("kind") == "cell"]
    lines = ["| model | batch | precision | encoder tokens (MAE / full) | MAE step ms | full-token step ms | "
             "full / MAE | spread | median contention (MAE / full) |",
             "|---|---|---|---|---|---|---|---|---|"]
    keys = list(dict.fromkeys((r["case"], r["precision"]) for r in cells))
    for key in keys:
        pair = {r["step"]: r for r in cells if (r["case"], r["precision"]) == key}
        if set(pair) != {"mae", "full"}:
            continue
        mae, full = pair["mae"], pair["full"]
        mae_ms, full_ms = statistics.median(mae["samples_ms"]), statistics.median(full["samples_ms"])
        cont = " / ".join("—" if c is None else f"{100 * c:.1f}%" for c in map(median_contention, (mae, full)))
        lines.append(f"| {mae['label']} (`{mae['mae_model']}`, decoder {mae['decoder']}) | {mae['batch']} | "
                     f"{PRECISIONS.get(key[1], key[1])} | {mae['encoder_tokens']} / {full['encoder_tokens']} | "
                     f"{_ms(mae_ms)}{contention_mark(mae, limit)} | {_ms(full_ms)}{contention_mark(full, limit)} | "
                     f"**{full_ms / mae_ms:.2f}** | {100 * max(spread(mae), spread(full)):.0f}% | {cont} |")
    if not any(r.get("kind") == "end" for r in recs):
        lines.append(f"\nRun {meta['run_id']} did not finish: the table shows the cells it measured.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", nargs="+", default=["vit_b16", "fmnist_tiny"],
                   help=f"cases {sorted(CASES)}, each optionally with its precisions: fmnist_tiny:fp32,bf16")
    p.add_argument("--precisions", nargs="+", choices=list(PRECISIONS), default=list(PRECISIONS),
                   help="precisions of cases that name none")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per model before the samples")
    p.add_argument("--samples", "--rounds", dest="samples", type=int, default=5,
                   help="kept samples per step and cell (the median is reported)")
    p.add_argument("--min-sample-seconds", type=float, default=1.0,
                   help="each sample runs whole steps for at least this long")
    p.add_argument("--max-contention", type=float, default=MAX_CONTENTION,
                   help="samples during which other processes took more of the CPU are discarded and re-taken")
    p.add_argument("--max-wait", type=float, default=60.0, help="seconds to wait for a quiet machine per cell")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--profile", nargs="?", const="", default=None, metavar="CASE",
                   help="also profile one MAE step of CASE (default: the first case, at its first precision)")
    p.add_argument("--profile-rows", type=int, default=20)
    p.add_argument("--results", default=str(DEFAULT_RESULTS), help="JSON lines the records are appended to")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    args.command = shlex.join(["python", "benchmarks/bench_mae.py", *argv])
    run_id = run(args, log=lambda s: print(s, file=sys.stderr, flush=True))
    results = os.path.abspath(args.results)
    for part in ("machine", "table") + (("profile",) if args.profile is not None else ()):
        print(render_mae_step("/", False, results, part, run_id) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
