"""CPU latency of an exported ONNX model in onnxruntime against vitkit eager and ``prepare_for_inference``.

For each ``--model`` (random weights, seeded) at its own input size: the model is exported with
:func:`vitkit.tools.export.export_onnx` (parity-checked), then three runtimes are timed in one process on the
same batch, fp32, with the same thread count (``--threads``, default all cores; torch intra-op threads and
onnxruntime intra-op threads, onnxruntime inter-op 1):

* ``eager``: the plain model under ``torch.inference_mode`` (the reference of the ratios);
* ``prepared``: ``prepare_for_inference(model, precision="fp32")`` (packed oneDNN Linears with fused
  bias/GELU/residual, CLS shortcut; exact to fp32 rounding);
* ``onnxruntime``: ``InferenceSession`` on the exported file, CPUExecutionProvider, all graph optimisations.

Timing reuses :func:`vitkit.tools.timing.time_alternating`: warm-up calls, then the runtimes in alternating,
rotating rounds, each sample at least ``--min-sample-seconds`` long; samples during which other processes took
more than ``--max-contention`` of the CPU are discarded and re-taken; the table shows the median of
``--repeats`` samples. The machine line gives the CPU, its bf16/AMX flags (fp32 here, but they say which oneDNN
kernels exist), the versions, and the load average before and after.

    python benchmarks/bench_export.py                                   # vit_fmnist_tiny + vit_small_patch16_224
    python benchmarks/bench_export.py --model vit_fmnist_tiny --repeats 3 --min-sample-seconds 0.2   # smoke run
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitkit.models import create_model
from vitkit.tools.export import export_onnx
from vitkit.tools.inference import cpu_flags, prepare_for_inference
from vitkit.tools.timing import Candidate, ContentionMeter, cpu_name, machine_load, time_alternating, wait_for_quiet

DEFAULT_MODELS = ["vit_fmnist_tiny", "vit_small_patch16_224"]
RUNTIMES = ("eager", "prepared", "onnxruntime")


def machine_line(threads: int, load_before: float | None, load_after: float | None) -> str:
    import onnxruntime as ort

    flags = cpu_flags()
    marks = ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in ("avx512_bf16", "amx_bf16", "amx_tile"))
    load = lambda v: f"{v:.2f}" if v is not None else "n/a"  # noqa: E731
    return (f"Machine: {cpu_name()} ({os.cpu_count()} logical CPUs; {marks}); {threads} threads for torch and "
            f"onnxruntime; torch {torch.__version__}, onnxruntime {ort.__version__}, Python "
            f"{platform.python_version()}; 1-min load average {load(load_before)} before, {load(load_after)} after.")


def ort_session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def bench_model(name: str, batches: list[int], threads: int, args: argparse.Namespace, folder: Path,
                meter: ContentionMeter, log) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    model = create_model(name).eval()
    c, h, w = model.pretrained_cfg["input_size"]
    t0 = time.perf_counter()
    report = export_onnx(model, folder / f"{name}.onnx")
    log(f"{name}: exported in {time.perf_counter() - t0:.1f} s, {report['file_bytes'] / 1e6:.1f} MB, "
        f"export check max |Δ| {report['max_abs_diff']:.1e}")
    session = ort_session(folder / f"{name}.onnx", threads)
    prepared = prepare_for_inference(model, precision="fp32")
    rows = []
    for batch in batches:
        x = torch.randn(batch, c, h, w, generator=torch.Generator().manual_seed(batch))
        xn = x.numpy()
        with torch.inference_mode():
            ref = model(x)
            diffs = {"prepared": float((prepared(x) - ref).abs().max()),
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
        med = {cnd.name: statistics.median(cnd.samples) for cnd in cands}
        for cnd in cands:
            spread = (max(cnd.samples) - min(cnd.samples)) / med[cnd.name] if len(cnd.samples) > 1 else 0.0
            sec = med[cnd.name]
            rows.append({"model": name, "input": f"{c}x{h}x{w}", "batch": batch, "runtime": cnd.name,
                         "ms": 1e3 * sec, "img_s": batch / sec, "ratio": med["eager"] / sec,
                         "max_abs_diff": diffs.get(cnd.name, 0.0), "samples": len(cnd.samples),
                         "discarded": cnd.discarded, "spread": spread, "note": cnd.note, "waited_s": waited})
    return rows


def format_table(rows: list[dict[str, Any]], machine: str, args: argparse.Namespace) -> str:
    lines = [machine,
             f"fp32, median of {args.repeats} samples (each >= {args.min_sample_seconds} s) after warm-up; samples "
             f"with more than {100 * args.max_contention:.0f}% CPU taken by other processes discarded and re-taken. "
             "\"x eager\" > 1 is faster than eager; max |Δ| is the largest logit difference from eager on the "
             "timed batch.",
             "",
             "| model | input | batch | runtime | ms/batch | img/s | × eager | max \\|Δ\\| | samples ok/discarded "
             "| notes |",
             "|---|---|---:|---|---:|---:|---:|---:|---|---|"]
    for r in rows:
        notes = [r["note"]] if r["note"] else []
        if r["spread"] > 0.15:
            notes.append(f"spread {100 * r['spread']:.0f}%")
        lines.append(f"| {r['model']} | {r['input']} | {r['batch']} | {r['runtime']} | {r['ms']:.2f} | "
                     f"{r['img_s']:.1f} | {r['ratio']:.2f} | {r['max_abs_diff']:.1e} | "
                     f"{r['samples']}/{r['discarded']} | {'; '.join(notes)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", nargs="+", default=DEFAULT_MODELS, help="registered model names (random weights)")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch and onnxruntime threads")
    p.add_argument("--repeats", type=int, default=5, help="timed samples per runtime; the table shows the median")
    p.add_argument("--min-sample-seconds", type=float, default=0.5)
    p.add_argument("--max-contention", type=float, default=0.1,
                   help="discard samples where other processes took more than this CPU share (1 = keep all)")
    p.add_argument("--max-wait", type=float, default=120.0, help="seconds to wait for a quiet machine per cell")
    p.add_argument("--markdown", help="also write the table to this file")
    args = p.parse_args(argv)
    if args.threads < 1 or args.repeats < 1 or any(b < 1 for b in args.batches):
        p.error("--threads, --repeats and --batches must be >= 1")
    torch.set_num_threads(args.threads)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    meter = ContentionMeter()
    load_before = machine_load()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.model:
            rows += bench_model(name, args.batches, args.threads, args, Path(tmp), meter, log)
    table = format_table(rows, machine_line(args.threads, load_before, machine_load()), args)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
