"""CPU inference: vitkit's PyTorch path against onnxruntime and OpenVINO on vitkit's own ONNX export, and int8.

For each model (ViT-S/16 and Swin-T at 224, random weights, seeded), precision (fp32, bf16) and batch (1, 32),
one process times, on the same batch and the same weights, with the same thread count (``--threads``):

* ``torch``: ``prepare_for_inference`` (packed oneDNN Linears, fused bias/GELU/residual, CLS shortcut), and
  ``torch compiled``: the same with ``compile=True`` (inductor, weights frozen), unless ``--no-compile``;
* ``onnxruntime`` (fp32 only; its CPU provider has no bf16 GEMMs): the exported file, all graph optimisations,
  ``session.intra_op.allow_spinning=0`` so its pool does not spin into the next runtime's turn;
* ``openvino``: the same file, CPU plugin, latency hint, one stream, reshaped to the static batch; bf16 through
  ``INFERENCE_PRECISION_HINT``.

The cell's figure is **best vitkit / best peer** (throughput ratio, > 1: vitkit faster), both medians from the
same alternating rounds. The int8 section (``--int8``) times ViT-S at batch 32: torch fp32 and int8 (PT2E, x86
Inductor quantizer, compiled) and OpenVINO fp32 and int8 (NNCF), and reports int8 / fp32 per runtime. With
``--run RUN`` (a trained Fashion-MNIST classifier) it also measures the accuracy cost: test top-1 of fp32 and of
both int8 models, and top-1 agreement with fp32 on 1,000 test images; ViT-S's agreement is measured on 1,000
image-like inputs (random weights: small logit margins, a conservative setting).

Timing (docs/method.md, "One timing method"): ``vitkit.tools.timing.time_alternating`` — warm-up, then the
candidates in alternating, rotating rounds, each sample ≥ ``--min-sample-seconds``; samples during which other
processes took more than ``--max-contention`` of the machine are discarded and re-taken; the median of the kept
samples is the figure (never the best). Every run APPENDS its raw records to ``--results`` (one ``meta`` record,
one ``cell`` record per candidate with every sample and its contention, ``accuracy`` records, one ``end``);
:func:`render_runtimes` (the ``vitkit report`` block ``script script=benchmarks/bench_runtimes.py
function=render_runtimes``) builds the tables from that file alone.

    python benchmarks/bench_runtimes.py --int8 --run RUN     # the full comparison (make bench)

(The recorded runs took 14.5 minutes with 7 samples of ≥ 0.5 s and 13.2 minutes with the defaults, 5 of ≥ 0.4 s,
by their ``end`` records; start-up adds about half a minute.)
    python benchmarks/bench_runtimes.py --quick              # ViT-S fp32 batch 1 only, 3 samples (recorded as quick)
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

import torch

from vitkit.errors import ConfigError
from vitkit.models import create_model
from vitkit.tools.ablate import read_results
from vitkit.tools.bench import realistic_images
from vitkit.tools.report import contention_mark, run_records
from vitkit.tools.runtimes import Runtime, build_runtime, export_for_runtimes
from vitkit.tools.timing import (
    Candidate,
    ContentionMeter,
    append_jsonl,
    end_record,
    machine_load,
    machine_record,
    time_alternating,
    utc_now,
    wait_for_quiet,
)

MODELS = {"vit_s16": "vit_small_patch16_224", "swin_t": "swin_tiny_patch4_window7_224"}
MAX_CONTENTION = 0.1
GOAL = 1.1  # issue #27: vitkit >= 1.1x the best of OpenVINO and onnxruntime in every cell
INT8_GOAL = 1.5  # issue #27: int8 >= 1.5x fp32 at batch 32 on ViT-S
HERE = Path(__file__).resolve().parent
DEFAULT_RESULTS = HERE / "results" / "runtimes.jsonl"


def machine() -> dict[str, Any]:
    import onnxruntime
    import openvino

    return {**machine_record(), "onnxruntime": onnxruntime.__version__, "openvino": openvino.__version__}


# ---------------------------------------------------------------------------- measuring
def _measure(runtimes: list[Runtime], x: torch.Tensor, ref: torch.Tensor, args: argparse.Namespace,
             meter: ContentionMeter, log) -> list[dict[str, Any]]:
    """Time ``runtimes`` alternating on ``x``; one record per runtime (samples in ms with their contention)."""
    waited = wait_for_quiet(meter, args.max_contention, max_wait_s=args.max_wait) if args.max_contention < 1 else 0
    cands = [Candidate(rt.name, rt.backend, rt.precision, (lambda rt=rt: rt(x)), rt.backend != "torch")
             for rt in runtimes]
    time_alternating(cands, samples=args.samples, min_sample_s=args.min_sample_seconds,
                     max_contention=args.max_contention, meter=meter, log=log)
    rows = []
    for rt, c in zip(runtimes, cands):
        with torch.inference_mode():
            out = rt(x)
        rows.append({"runtime": rt.name, "backend": rt.backend, "precision": rt.precision,
                     "samples_ms": [1e3 * s for s in c.samples],
                     "contention": [None if math.isnan(v) else v for v in c.contention],
                     "discarded": c.discarded, "note": c.note, "waited_s": round(waited, 1),
                     "compile_s": rt.info.get("compile_s"),
                     "max_abs_diff": float((out - ref).abs().max()),
                     "top1_agree": float((out.argmax(-1) == ref.argmax(-1)).float().mean())})
    return rows


def _build(model: torch.nn.Module, backend: str, precision: str, onnx_path: Path, threads: int,
           calibration: torch.Tensor | None, x: torch.Tensor, compile: bool = False) -> Runtime:
    """A runtime, called once on ``x`` so that compilation (torch) or the static reshape (OpenVINO) happens here;
    the seconds that first call took are kept as ``info["compile_s"]``."""
    rt = build_runtime(model, backend, precision, threads=threads, calibration=calibration, onnx_path=onnx_path,
                       compile=compile)
    start = time.perf_counter()
    with torch.inference_mode():
        rt(x)
    rt.info["compile_s"] = round(time.perf_counter() - start, 2)
    return rt


def _profile_torch(rt: Runtime, x: torch.Tensor, calls: int) -> list[dict[str, Any]]:
    """Self CPU time per operator of ``calls`` calls of a torch runtime (torch.profiler), largest first."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            rt(x)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:8]
    return [{"op": e.key, "share": e.self_cpu_time_total / total, "ms_per_call": e.self_cpu_time_total / 1e3 / calls}
            for e in top]


def _profile_openvino(rt: Runtime, x: torch.Tensor, calls: int) -> list[dict[str, Any]]:
    """OpenVINO's own per-node timings (``PERF_COUNT``), summed by node type, largest first."""
    model = rt.model.clone()
    model.reshape({model.inputs[0].get_any_name(): list(x.shape)})
    request = rt.core.compile_model(model, "CPU", {**rt.config, "PERF_COUNT": "YES"}).create_infer_request()
    totals: dict[str, float] = {}
    for _ in range(calls):
        request.infer(x.numpy())
        for info in request.get_profiling_info():
            key = f"{info.node_type} ({info.exec_type})"
            totals[key] = totals.get(key, 0.0) + info.real_time.total_seconds()
    total = sum(totals.values()) or 1.0
    top = sorted(totals.items(), key=lambda kv: -kv[1])[:8]
    return [{"op": k, "share": v / total, "ms_per_call": 1e3 * v / calls} for k, v in top]


def _profile_cell(rts: list[Runtime], rows: list[dict[str, Any]], x: torch.Tensor) -> dict[str, Any] | None:
    """Where the time goes in a cell vitkit loses (below the goal): the best torch runtime and the best peer."""
    ms = {r["runtime"]: statistics.median(r["samples_ms"]) for r in rows}
    ours = min((rt for rt in rts if rt.backend == "torch"), key=lambda rt: ms[rt.name])
    peer = min((rt for rt in rts if rt.backend != "torch"), key=lambda rt: ms[rt.name])
    if ms[peer.name] / ms[ours.name] >= GOAL:
        return None
    calls = max(3, min(20, int(2000 / ms[ours.name])))
    out = {"torch_runtime": ours.name, "torch_ops": _profile_torch(ours, x, calls), "peer_runtime": peer.name}
    if peer.backend == "openvino":
        out["peer_ops"] = _profile_openvino(peer, x, calls)
    return out


def run(args: argparse.Namespace, log) -> str:
    torch.set_num_threads(args.threads)
    meter = ContentionMeter()
    run_id = utc_now()
    meta = {"kind": "meta", "run_id": run_id, "machine": machine(), "command": args.command,
            "settings": {k: getattr(args, k) for k in ("models", "precisions", "batches", "samples",
                                                       "min_sample_seconds", "max_contention", "threads",
                                                       "compile", "int8", "run", "quick", "profile")},
            "load_before": machine_load()}
    os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
    append_jsonl(args.results, [meta])
    m = meta["machine"]
    log(f"runtimes, run {run_id}: {m['cpu']} ({m['cpu_flags']}), {args.threads} threads; torch {m['torch']}, "
        f"onnxruntime {m['onnxruntime']}, openvino {m['openvino']}")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for key in args.models:
            torch.manual_seed(0)
            model = create_model(MODELS[key]).eval()
            onnx_path = export_for_runtimes(model, Path(tmp) / key)
            for batch in args.batches:
                x = realistic_images(batch, 224, seed=batch)
                with torch.inference_mode():
                    ref = model(x)
                for precision in args.precisions:
                    rts = [_build(model, "torch", precision, onnx_path, args.threads, None, x)]
                    if args.compile:
                        rts.append(_build(model, "torch", precision, onnx_path, args.threads, None, x, compile=True))
                    if precision == "fp32":
                        rts.append(_build(model, "onnxruntime", "fp32", onnx_path, args.threads, None, x))
                    rts.append(_build(model, "openvino", precision, onnx_path, args.threads, None, x))
                    rows = _measure(rts, x, ref, args, meter, log)
                    append_jsonl(args.results, [{"kind": "cell", "run_id": run_id, "section": "runtimes", "model": key,
                                            "batch": batch, "cell_precision": precision, **r} for r in rows])
                    log(f"{key} {precision} batch {batch}: " + "  ".join(
                        f"{r['runtime']} {statistics.median(r['samples_ms']):.1f} ms" for r in rows))
                    losing = _profile_cell(rts, rows, x) if args.profile else None
                    if losing:
                        append_jsonl(args.results, [{"kind": "profile", "run_id": run_id, "model": key, "batch": batch,
                                                "cell_precision": precision, **losing}])
                    del rts
            if args.int8 and key == "vit_s16":
                _int8_section(model, onnx_path, args, meter, run_id, log)
        if args.int8 and args.run:
            append_jsonl(args.results, [{"kind": "accuracy", "run_id": run_id, **_run_accuracy(args, log)}])
    append_jsonl(args.results, [end_record(run_id, start)])
    return run_id


def _int8_section(model: torch.nn.Module, onnx_path: Path, args: argparse.Namespace, meter: ContentionMeter,
                  run_id: str, log) -> None:
    """ViT-S batch 32: fp32 and int8 of torch and OpenVINO, alternating; top-1 agreement on 1,000 inputs."""
    calibration = realistic_images(300, 224, seed=7)
    x = realistic_images(32, 224, seed=32)
    with torch.inference_mode():
        ref = model(x)
    rts = [_build(model, "torch", "fp32", onnx_path, args.threads, None, x),
           _build(model, "torch", "int8", onnx_path, args.threads, calibration, x),
           _build(model, "openvino", "fp32", onnx_path, args.threads, None, x),
           _build(model, "openvino", "int8", onnx_path, args.threads, calibration, x)]
    rows = _measure(rts, x, ref, args, meter, log)
    append_jsonl(args.results, [{"kind": "cell", "run_id": run_id, "section": "int8", "model": "vit_s16", "batch": 32,
                            "cell_precision": "int8", **r} for r in rows])
    log("int8 vit_s16 batch 32: " + "  ".join(f"{r['runtime']} {statistics.median(r['samples_ms']):.1f} ms"
                                              for r in rows))
    agree = {}
    images = realistic_images(1000, 224, seed=1000)
    with torch.inference_mode():
        fp32 = torch.cat([model(images[i:i + 50]) for i in range(0, 1000, 50)]).argmax(-1)
        for rt in rts[1::2]:
            agree[rt.name] = float((torch.cat([rt(images[i:i + 32]) for i in range(0, 1000, 32)]).argmax(-1)
                                    == fp32).float().mean())
    what = "vit_s16 random weights, 1000 image-like inputs"
    append_jsonl(args.results, [{"kind": "accuracy", "run_id": run_id, "what": what, "top1_agree_with_fp32": agree}])


def _run_accuracy(args: argparse.Namespace, log) -> dict[str, Any]:
    """Test top-1 of a trained run in fp32 and int8 (torch PT2E, OpenVINO NNCF); agreement on 1,000 test images."""
    from vitkit.data import build_dataset
    from vitkit.tools.evaluate import _input_spec, eval_data_settings, load_model, resolve_model_dir, task_for_model
    from vitkit.tools.runtimes import calibration_images

    folder = resolve_model_dir(args.run)
    model = load_model(folder)
    channels, size = _input_spec(model)
    name, split, settings = eval_data_settings(folder, split="test")
    dataset = build_dataset(name, split, image_size=size, num_channels=channels, **settings)
    task = task_for_model(model, folder)
    task.setup(model)
    items = [dataset[i] for i in range(len(dataset))]
    images = torch.stack([image for image, _ in items])
    labels = torch.tensor([int(label) for _, label in items])
    x = task.prepare_batch(images, train=False).float()
    calibration = calibration_images(folder, 300, model=model)
    out: dict[str, Any] = {"what": f"trained run {args.run}", "model": getattr(model, "model_name", None),
                           "test_images": len(labels)}
    with torch.inference_mode():
        ref = torch.cat([model(x[i:i + 500]) for i in range(0, len(x), 500)])
        out["top1"] = {"fp32": float((ref.argmax(-1) == labels).float().mean())}
        out["top1_agree_with_fp32"] = {}
        for backend in ("torch", "openvino"):
            rt = build_runtime(model, backend, "int8", threads=args.threads, calibration=calibration)
            pred = torch.cat([rt(x[i:i + 500]) for i in range(0, len(x), 500)]).argmax(-1)
            out["top1"][rt.name] = float((pred == labels).float().mean())
            out["top1_agree_with_fp32"][rt.name] = float((pred[:1000] == ref[:1000].argmax(-1)).float().mean())
    log(f"int8 accuracy on {args.run}: {out['top1']}; agreement {out['top1_agree_with_fp32']}")
    return out


# ---------------------------------------------------------------------------- from the results file: the tables
def _ms(r: dict[str, Any]) -> float:
    return statistics.median(r["samples_ms"])


def render_runtimes(doc_dir: str | Path, plots: bool = True, results: str = "results/runtimes.jsonl",
                    part: str = "cells", run: str = "latest") -> str:
    """Markdown for ``vitkit report`` (kind ``script``) from the results file alone (``results`` relative to
    ``doc_dir``): ``part=cells`` the 8-cell comparison, ``part=int8`` the int8 speed and accuracy,
    ``part=machine`` the machine line."""
    meta, recs = run_records(read_results(Path(doc_dir) / results), run)
    m, s = meta["machine"], meta["settings"]
    limit = s["max_contention"]
    if part == "machine":
        return (f"Run {meta['run_id']}: {m['cpu']} ({m['cores']} logical CPUs; {m['cpu_flags']}; AMX "
                f"{'yes' if m['amx'] else 'no'}), {s['threads']} threads for every runtime; torch {m['torch']}, "
                f"onnxruntime {m['onnxruntime']}, OpenVINO {m['openvino']}. Median of {s['samples']} kept samples "
                f"(each ≥ {s['min_sample_seconds']} s) per runtime, alternating; samples with more than "
                f"{100 * limit:.0f}% of the CPU taken by other processes discarded and re-taken; * median "
                f"contention above that, † no clean sample. Command: `{meta['command']}`.")
    cells = [r for r in recs if r.get("kind") == "cell"]
    if part == "cells":
        lines = ["| model | precision | batch | vitkit best (ms) | peer best (ms) | vitkit / peer | goal ≥ 1.1× | "
                 "every runtime: median ms (max \\|Δ\\| vs fp32 eager) |", "|---|---|---:|---|---|---:|---|---|"]
        keys = sorted({(r["model"], r["cell_precision"], r["batch"]) for r in cells if r["section"] == "runtimes"},
                      key=lambda k: (list(MODELS).index(k[0]), k[1], k[2]))
        for model, precision, batch in keys:
            rows = [r for r in cells if r["section"] == "runtimes" and (r["model"], r["cell_precision"],
                                                                         r["batch"]) == (model, precision, batch)]
            ours = min((r for r in rows if r["backend"] == "torch"), key=_ms)
            peer = min((r for r in rows if r["backend"] != "torch"), key=_ms)
            ratio = _ms(peer) / _ms(ours)
            each = "; ".join(f"{r['runtime']} {_ms(r):.1f}{contention_mark(r, limit)} ({r['max_abs_diff']:.1e})"
                             for r in rows)
            lines.append(f"| {model} | {precision} | {batch} | {ours['runtime']} {_ms(ours):.1f} | {peer['runtime']} "
                         f"{_ms(peer):.1f} | {ratio:.2f}× | {'met' if ratio >= GOAL else 'not met'} | {each} |")
        return "\n".join(lines)
    if part == "int8":
        rows = {r["runtime"]: r for r in cells if r["section"] == "int8"}
        lines = ["| runtime | median ms (batch 32) | img/s | int8 / fp32 of the same runtime | max \\|Δ\\| vs fp32 "
                 "eager | top-1 agreement (the batch) |", "|---|---:|---:|---:|---:|---:|"]
        for name, r in rows.items():
            base = rows.get(name.replace("int8", "fp32"))
            speed = f"{_ms(base) / _ms(r):.2f}×" if r["precision"] == "int8" and base else ""
            lines.append(f"| {name} | {_ms(r):.1f}{contention_mark(r, limit)} | {32e3 / _ms(r):.1f} | {speed} | "
                         f"{r['max_abs_diff']:.2e} | {100 * r['top1_agree']:.1f}% |")
        for acc in (r for r in recs if r.get("kind") == "accuracy"):
            agree = ", ".join(f"{k} {100 * v:.1f}%" for k, v in acc["top1_agree_with_fp32"].items())
            text = f"- {acc['what']}: top-1 agreement with fp32: {agree}"
            if "top1" in acc:
                text += "; test top-1 " + ", ".join(f"{k} {100 * v:.2f}%" for k, v in acc["top1"].items())
            lines.append(text if len(lines) > 2 + len(rows) else "\n" + text)
        return "\n".join(lines)
    if part == "profile":
        lines = []
        for r in (r for r in recs if r.get("kind") == "profile"):
            lines.append(f"**{r['model']} {r['cell_precision']} batch {r['batch']}** — {r['torch_runtime']} "
                         f"(torch.profiler, self CPU time) vs {r['peer_runtime']} (OpenVINO PERF_COUNT, by node type):")
            lines += ["", "| torch op | share | ms/call | OpenVINO node | share | ms/call |",
                      "|---|---:|---:|---|---:|---:|"]
            peer = r.get("peer_ops") or []
            for i in range(max(len(r["torch_ops"]), len(peer))):
                a = r["torch_ops"][i] if i < len(r["torch_ops"]) else None
                b = peer[i] if i < len(peer) else None
                left = f"{a['op']} | {100 * a['share']:.0f}% | {a['ms_per_call']:.2f}" if a else " | | "
                right = f"{b['op']} | {100 * b['share']:.0f}% | {b['ms_per_call']:.2f}" if b else " | | "
                lines.append(f"| {left} | {right} |")
            lines.append("")
        return "\n".join(lines).strip() or "Every cell met the goal: nothing was profiled."
    raise ConfigError(f"part={part!r}: one of cells, int8, profile, machine")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--samples", type=int, default=5, help="kept samples per runtime and cell (the median is shown)")
    p.add_argument("--min-sample-seconds", type=float, default=0.4)
    p.add_argument("--max-contention", type=float, default=MAX_CONTENTION)
    p.add_argument("--max-wait", type=float, default=60.0, help="seconds to wait for a quiet machine per cell")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile candidate")
    p.add_argument("--int8", action="store_true", help="the int8 section (ViT-S batch 32, torch PT2E and NNCF)")
    p.add_argument("--run", help="a trained classifier run: int8 test top-1 and agreement with fp32")
    p.add_argument("--no-profile", dest="profile", action="store_false",
                   help="skip profiling the cells vitkit loses (torch.profiler and OpenVINO's PERF_COUNT)")
    p.add_argument("--quick", action="store_true", help="ViT-S fp32 batch 1, 3 samples (recorded as quick)")
    p.add_argument("--results", default=str(DEFAULT_RESULTS), help="JSON lines the records are appended to")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    args.command = shlex.join(["python", "benchmarks/bench_runtimes.py", *argv])
    if args.quick:
        args.models, args.precisions, args.batches, args.samples, args.min_sample_seconds = (
            ["vit_s16"], ["fp32"], [1], 3, 0.1)
    run_id = run(args, log=lambda s: print(s, file=sys.stderr, flush=True))
    results = os.path.abspath(args.results)
    for part in ("machine", "cells") + (("int8",) if args.int8 else ()) + (("profile",) if args.profile else ()):
        print(render_runtimes("/", False, results, part, run_id) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
