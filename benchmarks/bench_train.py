"""Training-step throughput: vitkit's engine driving a vitkit ViT vs. the same engine driving a transformers ViT.

Both models have the Fashion-MNIST recipe's architecture (28x28x1, patch 4, width 96, depth 6, 3 heads, MLP 192,
10 classes) and are trained by the very same loop: ``Trainer._optimizer_step`` of the vitkit engine (batch
augmentation, loss with label smoothing, backward, gradient clipping, AdamW, LR schedule). Only the module differs.
Peak RSS is measured per case in a fresh child process (``--rss-steps`` steps), before anything else runs.

Timing (docs/method.md, "One timing method"): per precision, one ``Candidate`` per model whose call is ONE
optimizer step (a fresh batch from a pool of pre-drawn ones each call), timed by
``vitkit.tools.timing.time_alternating``: warm-up steps, then the two models in alternating, rotating rounds, each
sample as many whole steps as last ``--min-sample-seconds``; samples during which other processes took more than
``--max-contention`` of the machine are discarded and re-taken. The figure is the median ms per step over the kept
samples; img/s = batch / median. Every run APPENDS its raw records to ``--results`` (one ``meta`` record, one
``cell`` record per model and precision with every kept sample in ms per step and its contention, params and peak
RSS, one ``end``); :func:`render_train_step` (the ``vitkit report`` block ``script
script=benchmarks/bench_train.py function=render_train_step part=table|machine``) builds the table from that file.

    python benchmarks/bench_train.py                  # fp32 and bf16, batch 256
    python benchmarks/bench_train.py --precisions fp32 --samples 7 --batch-size 128
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitkit.errors import ConfigError
from vitkit.tools.ablate import read_results
from vitkit.tools.report import contention_mark, median_contention, run_records
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

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "fmnist" / "vit_tiny.yaml"
DEFAULT_RESULTS = Path(__file__).resolve().parent / "results" / "train_step.jsonl"
MODELS = ("vitkit", "transformers")
PRECISIONS = {"fp32": "fp32", "bf16": "bf16 autocast"}  # key -> label in the table
MAX_CONTENTION = 0.1


class HFClassifier(nn.Module):
    """transformers' ViTForImageClassification behind the plain ``model(images) -> logits`` interface."""

    def __init__(self) -> None:
        super().__init__()
        from vitkit.utils import make_torchvision_importable

        make_torchvision_importable()  # transformers' vision models import torchvision
        from transformers import ViTConfig, ViTForImageClassification

        cfg = ViTConfig(image_size=28, patch_size=4, num_channels=1, hidden_size=96, num_hidden_layers=6,
                        num_attention_heads=3, intermediate_size=192, num_labels=10, layer_norm_eps=1e-6)
        cfg._attn_implementation = "sdpa"
        self.vit = ViTForImageClassification(cfg)
        self.pretrained_cfg = {"input_size": (1, 28, 28)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit(pixel_values=x).logits


def build_trainer(kind: str, bf16: bool, batch_size: int, out: Path):
    from vitkit.engine import Trainer, load_config
    from vitkit.engine.optim import build_optimizer, build_scheduler

    cfg = load_config(RECIPE, [f"train.bf16={str(bf16).lower()}", f"train.batch_size={batch_size}",
                               "model.args.drop_path_rate=0.0", f"output_dir={out}", "train.progress=false"])
    trainer = Trainer(cfg)
    if kind == "transformers":
        model = HFClassifier()
        trainer.model = trainer.train_model = model
        trainer.optimizer = build_optimizer(model, cfg.optim)
        trainer.scheduler = build_scheduler(trainer.optimizer, cfg.schedule, cfg.optim.lr, trainer.steps_per_epoch,
                                            cfg.train.epochs)
    trainer.model.train()
    return trainer


def batches(trainer, n: int):
    g = torch.Generator().manual_seed(0)
    ds = trainer.train_set
    out = []
    for _ in range(n):
        idx = torch.randint(0, len(ds), (trainer.micro_batch,), generator=g)
        out.append([(ds.images[idx], ds.labels[idx])])
    return out


def step_fn(trainer, data: list) -> Callable[[], None]:
    """One optimizer step per call, on the next batch of ``data`` (cycled). ``time_alternating`` runs its calls
    under ``torch.inference_mode``; a training step needs autograd, so the call switches it back on."""
    pool = itertools.cycle(data)

    def step() -> None:
        with torch.inference_mode(False), torch.enable_grad():
            trainer._optimizer_step(next(pool))

    return step


def peak_rss_child(kind: str, bf16: bool, batch_size: int, steps: int, threads: int) -> float:
    """Peak resident memory (MiB) of a fresh process that builds the case and runs ``steps`` training steps."""
    cmd = [sys.executable, __file__, "--child", kind, "--batch-size", str(batch_size), "--rss-steps", str(steps),
           "--threads", str(threads)]
    if bf16:
        cmd.append("--bf16")
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])["peak_rss_mib"]


def machine(models: list[str]) -> dict[str, Any]:
    out = machine_record()
    if "transformers" in models:
        from vitkit.utils import make_torchvision_importable

        make_torchvision_importable()
        import transformers

        out["transformers"] = transformers.__version__
    return out


def run(args: argparse.Namespace, log: Callable[[str], None]) -> str:
    """Measure every (model, precision) case; append the records to ``args.results``; return the run id."""
    torch.set_num_threads(args.threads)
    run_id = utc_now()
    meta = {"kind": "meta", "run_id": run_id, "command": args.command, "machine": machine(args.models),
            "settings": {k: getattr(args, k) for k in ("models", "precisions", "batch_size", "samples",
                                                       "min_sample_seconds", "warmup", "max_contention", "max_wait",
                                                       "threads", "rss", "rss_steps", "pool")},
            "load_before": machine_load()}
    append_jsonl(args.results, [meta])
    start = time.perf_counter()
    # Children first: Linux keeps a process's RSS high-water mark across fork+exec, so they must be started
    # while this process is still small.
    rss = {(k, p): peak_rss_child(k, p == "bf16", args.batch_size, args.rss_steps, args.threads) if args.rss else None
           for p in args.precisions for k in args.models}
    meter = ContentionMeter()
    torch.manual_seed(0)
    for precision in args.precisions:
        trainers = {k: build_trainer(k, precision == "bf16", args.batch_size, Path(args.out) / k)
                    for k in args.models}
        data = batches(next(iter(trainers.values())), args.pool)
        waited = (wait_for_quiet(meter, args.max_contention, max_wait_s=args.max_wait)
                  if args.max_contention < 1 and args.max_wait > 0 else 0.0)
        cands = [Candidate(k, k, precision, step_fn(t, data), k != "vitkit") for k, t in trainers.items()]
        time_alternating(cands, samples=args.samples, min_sample_s=args.min_sample_seconds,
                         max_contention=args.max_contention, warmup=args.warmup, meter=meter, log=log)
        append_jsonl(args.results, [
            candidate_record(c, kind="cell", run_id=run_id, model=k, batch_size=args.batch_size,
                             params=sum(p.numel() for p in trainers[k].model.parameters()),
                             peak_rss_mib=rss[(k, precision)], waited_s=round(waited, 1))
            for k, c in zip(trainers, cands)])
        log(f"{precision}: " + "  ".join(f"{c.name} {statistics.median(c.samples) * 1e3:.1f} ms/step" for c in cands))
        del trainers, cands
    append_jsonl(args.results, [end_record(run_id, start)])
    return run_id


# ---------------------------------------------------------------------------- from the results file: the table
def img_per_s(r: dict[str, Any]) -> float:
    """Training throughput of a cell record: batch / median ms per step."""
    return r["batch_size"] * 1e3 / statistics.median(r["samples_ms"])


def render_train_step(doc_dir: str | Path, plots: bool = True, results: str = "results/train_step.jsonl",
                      part: str = "table", run: str = "latest") -> str:
    """Markdown for ``vitkit report`` (kind ``script``) from the results file alone (``results`` relative to
    ``doc_dir``): ``part=table`` the throughput table, ``part=machine`` the machine and method line."""
    records = read_results(Path(doc_dir) / results)
    meta, cells = run_records(records, run, kind="cell")
    m, s = meta["machine"], meta["settings"]
    limit = s["max_contention"]
    if part == "machine":
        peers = f", transformers {m['transformers']}" if "transformers" in m else ""
        rss = (f"peak RSS of each case in a fresh child process ({s['rss_steps']} steps)" if s["rss"]
               else "peak RSS not measured")
        return (f"Run {meta['run_id']}: {m['cpu']} ({m['cores']} logical CPUs; {m['cpu_flags'] or 'no AVX2'}; AMX "
                f"{'yes' if m['amx'] else 'no'}), {s['threads']} threads; torch {m['torch']}{peers}. Batch "
                f"{s['batch_size']}; per case the median of {s['samples']} kept samples, each ≥ "
                f"{s['min_sample_seconds']} s of whole optimizer steps (img/s = batch / median ms per step), the "
                f"models alternating in rotating rounds within a precision after {s['warmup']} warm-up steps and one "
                f"sizing step; "
                f"samples with more than {100 * limit:.0f}% of the CPU taken by other processes discarded and "
                f"re-taken; * median contention above that, † no clean sample; {rss}. "
                f"Command: `{meta['command']}`.")
    if part != "table":
        raise ConfigError(f"part={part!r}: one of table, machine")
    finished = any(r.get("kind") == "end" and r.get("run_id") == meta["run_id"] for r in records)
    note = "" if finished else f"\n\nRun {meta['run_id']} did not finish: the table shows the cases it measured."
    lines = ["| model | precision | params | train img/s | vs transformers | peak RSS (MiB) | median contention |",
             "|---|---|---|---|---|---|---|"]
    for r in cells:
        peer = next((p for p in cells if p["model"] == "transformers" and p["precision"] == r["precision"]), None)
        ratio = img_per_s(r) / img_per_s(peer) if peer else None
        vs = "—" if ratio is None else (f"{ratio:.2f}×" if r["model"] == "transformers" else f"**{ratio:.2f}×**")
        rss = "—" if r.get("peak_rss_mib") is None else f"{r['peak_rss_mib']:.0f}"
        cont = median_contention(r)
        lines.append(f"| {r['model']} | {PRECISIONS.get(r['precision'], r['precision'])} | {r['params'] / 1e6:.3f}M | "
                     f"{img_per_s(r):.0f}{contention_mark(r, limit)} | {vs} | {rss} | "
                     f"{'—' if cont is None else f'{100 * cont:.1f}%'} |")
    return "\n".join(lines) + note


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--precisions", nargs="+", choices=list(PRECISIONS), default=list(PRECISIONS))
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--samples", "--rounds", dest="samples", type=int, default=5,
                   help="kept samples per case (the median is reported)")
    p.add_argument("--min-sample-seconds", type=float, default=3.0,
                   help="each sample runs whole steps for at least this long")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per case before the samples")
    p.add_argument("--max-contention", type=float, default=MAX_CONTENTION,
                   help="samples during which other processes took more of the CPU are discarded and re-taken")
    p.add_argument("--max-wait", type=float, default=60.0, help="seconds to wait for a quiet machine per precision")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--pool", type=int, default=8, help="pre-drawn batches the steps cycle through")
    p.add_argument("--no-rss", dest="rss", action="store_false", help="skip the peak-RSS child processes")
    p.add_argument("--rss-steps", type=int, default=3, help="training steps of each peak-RSS child process")
    p.add_argument("--results", default=str(DEFAULT_RESULTS), help="JSON lines the records are appended to")
    p.add_argument("--child", choices=MODELS, help=argparse.SUPPRESS)
    p.add_argument("--bf16", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default="/tmp/vitkit_bench_train")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    if args.child:
        torch.set_num_threads(args.threads)
        trainer = build_trainer(args.child, args.bf16, args.batch_size, Path(args.out) / "child")
        for group in batches(trainer, args.rss_steps):
            trainer._optimizer_step(group)
        print(json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
        return 0
    args.command = shlex.join(["python", "benchmarks/bench_train.py", *argv])
    run_id = run(args, log=lambda s: print(s, file=sys.stderr, flush=True))
    results = os.path.abspath(args.results)
    for part in ("machine", "table"):
        print(render_train_step("/", False, results, part, run_id) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
