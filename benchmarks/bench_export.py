"""CPU latency of an exported ONNX model in onnxruntime against vitkit eager and ``prepare_for_inference``.

For each ``--model`` (random weights, seeded) at its own input size: the model is exported with
:func:`vitkit.tools.export.export_onnx` (parity-checked), then three runtimes are timed in one process on the
same batch, fp32, with the same thread count (``--threads``, default all cores; torch intra-op threads and
onnxruntime intra-op threads, onnxruntime inter-op 1):

* ``eager``: the plain model under ``torch.inference_mode`` (the reference of the ratios);
* ``prepared``: ``prepare_for_inference(model, precision="fp32")`` (packed oneDNN Linears with fused
  bias/GELU/residual, CLS shortcut; exact to fp32 rounding);
* ``onnxruntime``: ``InferenceSession`` on the exported file, CPUExecutionProvider, all graph optimisations.

Timing (docs/method.md, "One timing method"): :func:`vitkit.tools.timing.time_alternating` — warm-up calls, then
the runtimes in alternating, rotating rounds, each sample at least ``--min-sample-seconds`` long; samples during
which other processes took more than ``--max-contention`` of the CPU are discarded and re-taken; the figure is the
median of the ``--repeats`` kept samples (never the best). Every run APPENDS its raw records to ``--results``: one
``meta`` record (command, settings, machine), one ``export`` record per model, one ``cell`` record per model,
batch and runtime (every kept sample in ms with its contention, the discards, max |Δ| vs eager, the input shape),
one ``end`` record. :func:`render_export` (the ``vitkit report`` block ``script
script=benchmarks/bench_export.py function=render_export``) builds the table from that file alone.

    python benchmarks/bench_export.py                                   # vit_fmnist_tiny + vit_small_patch16_224
    python benchmarks/bench_export.py --model vit_fmnist_tiny --repeats 3 --min-sample-seconds 0.2 --quick
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitkit.errors import ConfigError
from vitkit.models import create_model
from vitkit.tools.ablate import read_results
from vitkit.tools.export import export_onnx
from vitkit.tools.inference import prepare_for_inference
from vitkit.tools.report import run_records
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

DEFAULT_MODELS = ["vit_fmnist_tiny", "vit_small_patch16_224"]
RUNTIMES = ("eager", "prepared", "onnxruntime")
SPREAD_NOTE = 0.15  # (max - min) / median of the kept samples above which the row notes the spread
HERE = Path(__file__).resolve().parent
DEFAULT_RESULTS = HERE / "results" / "export.jsonl"


def machine() -> dict[str, Any]:
    import onnxruntime

    return {**machine_record(), "onnxruntime": onnxruntime.__version__}


def ort_session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


# ---------------------------------------------------------------------------- measuring
def bench_model(name: str, args: argparse.Namespace, folder: Path, meter: ContentionMeter, run_id: str,
                log) -> None:
    """Export ``name``, then time the three runtimes per batch; the records are appended as each cell finishes."""
    torch.manual_seed(0)
    model = create_model(name).eval()
    c, h, w = model.pretrained_cfg["input_size"]
    t0 = time.perf_counter()
    report = export_onnx(model, folder / f"{name}.onnx")
    export_s = time.perf_counter() - t0
    append_jsonl(args.results, [{"kind": "export", "run_id": run_id, "model": name, "seconds": round(export_s, 2),
                                 "file_bytes": report["file_bytes"], "check_max_abs_diff": report["max_abs_diff"]}])
    log(f"{name}: exported in {export_s:.1f} s, {report['file_bytes'] / 1e6:.1f} MB, "
        f"export check max |Δ| {report['max_abs_diff']:.1e}")
    session = ort_session(folder / f"{name}.onnx", args.threads)
    prepared = prepare_for_inference(model, precision="fp32")
    for batch in args.batches:
        x = torch.randn(batch, c, h, w, generator=torch.Generator().manual_seed(batch))
        xn = x.numpy()
        with torch.inference_mode():
            ref = model(x)
            diffs = {"eager": 0.0, "prepared": float((prepared(x) - ref).abs().max()),
                     "onnxruntime": float(np.abs(session.run(None, {"pixel_values": xn})[0] - ref.numpy()).max())}
        cands = [
            Candidate("eager", "vitkit", "fp32", lambda x=x: model(x), False),
            Candidate("prepared", "vitkit", "fp32", lambda x=x: prepared(x), False),
            Candidate("onnxruntime", "onnxruntime", "fp32", lambda xn=xn: session.run(None, {"pixel_values": xn}),
                      True),
        ]
        waited = wait_for_quiet(meter, args.max_contention, max_wait_s=args.max_wait) if args.max_contention < 1 else 0
        time_alternating(cands, samples=args.repeats, min_sample_s=args.min_sample_seconds,
                         max_contention=args.max_contention, meter=meter, log=log)
        append_jsonl(args.results, [candidate_record(
            cnd, kind="cell", run_id=run_id, model=name, batch=batch, input_shape=[batch, c, h, w],
            max_abs_diff=diffs[cnd.name], waited_s=round(waited, 1)) for cnd in cands])
        log(f"{name} batch {batch}: " + "  ".join(
            f"{cnd.name} {1e3 * statistics.median(cnd.samples):.2f} ms" for cnd in cands))


def run(args: argparse.Namespace, log) -> str:
    """One benchmark run: meta, export and cell records, end; returns its run_id."""
    torch.set_num_threads(args.threads)
    meter = ContentionMeter()
    run_id = utc_now()
    meta = {"kind": "meta", "run_id": run_id, "command": args.command, "machine": machine(),
            "settings": {k: getattr(args, k) for k in ("model", "batches", "threads", "repeats",
                                                       "min_sample_seconds", "max_contention", "max_wait",
                                                       "quick")},
            "load_before": machine_load()}
    append_jsonl(args.results, [meta])
    m = meta["machine"]
    log(f"export, run {run_id}: {m['cpu']} ({m['cpu_flags']}), {args.threads} threads; torch {m['torch']}, "
        f"onnxruntime {m['onnxruntime']}; records -> {args.results}")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.model:
            bench_model(name, args, Path(tmp), meter, run_id, log)
    append_jsonl(args.results, [end_record(run_id, start)])
    return run_id


# ---------------------------------------------------------------------------- from the results file: the table
def cell_ms(r: dict[str, Any]) -> float:
    """A cell's figure: the median of all its kept samples (ms per batch)."""
    return statistics.median(r["samples_ms"])


def _notes(r: dict[str, Any], limit: float) -> str:
    """The row's notes: ``noisy`` (no clean sample), median contention above the threshold, a wide spread."""
    notes = [r["note"]] if r.get("note") else []
    cont = [v for v in r["contention"] if v is not None and not math.isnan(v)]
    if cont and statistics.median(cont) > limit:
        notes.append(f"contended {100 * statistics.median(cont):.0f}%")
    samples = r["samples_ms"]
    spread = (max(samples) - min(samples)) / cell_ms(r) if len(samples) > 1 else 0.0
    if spread > SPREAD_NOTE:
        notes.append(f"spread {100 * spread:.0f}%")
    return "; ".join(notes)


def _load(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def render_export(doc_dir: str | Path, plots: bool = True, results: str = "results/export.jsonl",
                  run: str = "latest", part: str = "table") -> str:
    """Markdown for ``vitkit report`` (kind ``script``) from the results file alone (``results`` relative to
    ``doc_dir``), for run ``run`` (a run_id, or ``latest``: the last finished full run): ``part=table`` one row
    per model, batch and runtime; ``part=machine`` the machine, versions and samples policy."""
    path = Path(doc_dir) / results
    if not path.is_file():
        raise ConfigError(f"{path}: results file not found")
    meta, recs = run_records(read_results(path), run)
    m, s = meta["machine"], meta["settings"]
    limit = s["max_contention"]
    end = next((r for r in recs if r.get("kind") == "end"), {})
    if part == "machine":
        policy = (f"samples with more than {100 * limit:.0f}% of the CPU taken by other processes discarded and "
                  f"re-taken" if limit < 1 else "every sample kept whatever the contention")
        return (f"Run {meta['run_id']}: {m['cpu']} ({m['cores']} logical CPUs; {m['cpu_flags']}; AMX "
                f"{'yes' if m['amx'] else 'no'}), {s['threads']} threads for torch and onnxruntime; torch "
                f"{m['torch']}, onnxruntime {m['onnxruntime']}, Python {m['python']}. fp32, median of "
                f"{s['repeats']} kept samples (each ≥ {s['min_sample_seconds']} s) per runtime after warm-up, "
                f"the runtimes alternating; {policy}; 1-min load average {_load(meta.get('load_before'))} before, "
                f"{_load(end.get('load_after'))} after. Command: `{meta['command']}`.")
    if part != "table":
        raise ConfigError(f"part={part!r}: one of table, machine")
    cells = [r for r in recs if r.get("kind") == "cell"]
    if not cells:
        raise ConfigError(f"run {meta['run_id']} has no cell records")
    eager = {(r["model"], r["batch"]): cell_ms(r) for r in cells if r["name"] == "eager"}
    lines = ["| model | input | batch | runtime | ms/batch | img/s | × eager | max \\|Δ\\| | samples ok/discarded "
             "| notes |", "|---|---|---:|---|---:|---:|---:|---:|---|---|"]
    for r in cells:
        ms = cell_ms(r)
        base = eager.get((r["model"], r["batch"]))
        ratio = f"{base / ms:.2f}" if base is not None else "n/a"
        shape = "x".join(str(d) for d in r["input_shape"][1:])
        lines.append(f"| {r['model']} | {shape} | {r['batch']} | {r['name']} | {ms:.2f} | {1e3 * r['batch'] / ms:.1f} "
                     f"| {ratio} | {r['max_abs_diff']:.1e} | {len(r['samples_ms'])}/{r['discarded']} | "
                     f"{_notes(r, limit)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", nargs="+", default=DEFAULT_MODELS, help="registered model names (random weights)")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch and onnxruntime threads")
    p.add_argument("--repeats", type=int, default=5, help="kept samples per runtime; the table shows the median")
    p.add_argument("--min-sample-seconds", type=float, default=0.5)
    p.add_argument("--max-contention", type=float, default=0.1,
                   help="discard samples where other processes took more than this CPU share (1 = keep all)")
    p.add_argument("--max-wait", type=float, default=120.0, help="seconds to wait for a quiet machine per cell")
    p.add_argument("--quick", action="store_true", help="record the run as quick: never the 'latest' of the docs")
    p.add_argument("--results", default=str(DEFAULT_RESULTS),
                   help="JSON-lines file the raw records are appended to (default: %(default)s)")
    p.add_argument("--markdown", help="also write the machine line and the table to this file")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    if args.threads < 1 or args.repeats < 1 or any(b < 1 for b in args.batches):
        p.error("--threads, --repeats and --batches must be >= 1")
    args.command = shlex.join(["python", "benchmarks/bench_export.py", *argv])
    run_id = run(args, log=lambda s: print(s, file=sys.stderr, flush=True))
    results = os.path.abspath(args.results)
    text = "\n\n".join(render_export("/", False, results, run_id, part) for part in ("machine", "table"))
    print(text)
    print(f"\nrecords: {results} (run_id {run_id})")
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
