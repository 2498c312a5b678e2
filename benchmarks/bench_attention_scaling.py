"""How one attention layer's latency grows with the token grid: global, window, ReLU linear and sparse grouped.

One attention layer forward (qkv Linear, attention, proj Linear; width 384, 6 heads, batch 1, the same weights
for every method) on token grids of 14x14 ... 64x64, fp32 and bf16:

* global: ``vitkit.layers.attention.Attention`` (SDPA over all H*W tokens);
* window: Swin window attention, M = 7, the map zero-padded to a multiple of 7 (as Swin does). Uses
  ``vitkit.layers.window_attention.WindowAttention`` when that module exists and can be driven (its signature is
  read at run time), else a partition + ``Attention`` (SDPA per window) fallback; the output says which ran;
* linear: ``vitkit.layers.linear_attention.ReLULinearAttention`` (EfficientViT-style, computed in fp32 inside);
* sparse: ``vitkit.layers.sparse_window.SparseWindowAttention``, 50% of the tokens kept at random, G = 49, M = 7;
  the layout (sort + grouping) is built inside every call, i.e. included in the time (its cost alone is also
  reported; a stage of blocks would share it);
* global-sdpa (reference, not a layer): the SDPA call of "global" alone, on precomputed q, k, v, to show the
  quadratic part without the projections, which are linear in N and dominate at small N.

Timing (docs/method.md, "One timing method"): ``torch.inference_mode``, warm-up, the methods timed in alternating
rounds with ``vitkit.tools.timing.time_alternating`` (each sample ≥ ``--min-sample-seconds``, ``--samples`` clean
samples per pass), after ``wait_for_quiet``; ``--passes`` sweeps over the grids, alternately ascending and
descending. The contention threshold is **0.1** (``--max-contention``, default): samples during which other
processes took more than 10% of the machine are discarded and re-taken. A cell's figure is the **median over all
kept samples of all passes** (never the faster pass; each pass's median is kept as extra information). A cell is
marked when a pass could not get a clean sample (``noisy``: the median of its contended samples stands in, †) or
when the median contention of its samples is above the threshold (*). Cells whose slowest call exceeds
``--slow-call-seconds`` get ``--slow-samples`` samples only.

Every run APPENDS its raw records to ``--results`` (JSON lines, default
``benchmarks/results/attention_scaling.jsonl``), as each cell finishes: one ``{"kind": "meta", "run_id"}`` record
(machine, settings, command), one ``{"kind": "cell"}`` record per pass, precision, grid and method (samples in ms,
each sample's contention, discarded count, note, FLOPs, kept tokens, sparse layout ms, cell contention, seconds
waited), and one ``{"kind": "end"}`` record. Every table and the plot come from that file alone
(:func:`render_scaling`, the ``vitkit report`` block ``script script=benchmarks/bench_attention_scaling.py
function=render_scaling part=table|fits|summary``); the exponents are least-squares fits of log(ms) (and of
log(FLOPs)) on log(H*W) over all grids and over the upper half of them, computed there.

    python benchmarks/bench_attention_scaling.py            # full run, ≈ 10-30 min on 2 cores (waits for quiet)
    python benchmarks/bench_attention_scaling.py --quick    # 3 grids, 3 samples, one pass (recorded as quick)
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vitkit.errors import ConfigError
from vitkit.layers.attention import Attention
from vitkit.layers.linear_attention import ReLULinearAttention
from vitkit.layers.sparse_window import SparseWindowAttention, build_groups, grid_coords
from vitkit.tools.ablate import read_results
from vitkit.tools.inference import native_bf16_supported
from vitkit.tools.report import select_run_meta
from vitkit.tools.timing import (
    Candidate,
    ContentionMeter,
    append_jsonl,
    cpu_name,
    end_record,
    machine_load,
    time_alternating,
    utc_now,
    wait_for_quiet,
)
from vitkit.utils import amx_supported

METHODS = ("global", "window", "linear", "sparse", "global-sdpa")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MAX_CONTENTION = 0.1  # the stated threshold: other processes' share of the machine above which a sample is re-taken
HERE = Path(__file__).resolve().parent
DEFAULT_RESULTS = HERE / "results" / "attention_scaling.jsonl"


# ---------------------------------------------------------------------------- window attention
def _partition(x: torch.Tensor, m: int) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """(B, H, W, C) -> zero-padded to multiples of m -> (B * nW, m * m, C)."""
    B, H, W, C = x.shape
    ph, pw = (-H) % m, (-W) % m
    if ph or pw:
        x = F.pad(x, (0, 0, 0, pw, 0, ph))
    Hp, Wp = H + ph, W + pw
    win = x.view(B, Hp // m, m, Wp // m, m, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, m * m, C)
    return win, (B, H, W, Hp)


def _unpartition(win: torch.Tensor, m: int, shape: tuple[int, int, int, int]) -> torch.Tensor:
    B, H, W, Hp = shape
    C = win.shape[-1]
    Wp = win.shape[0] // B // (Hp // m) * m
    x = win.view(B, Hp // m, Wp // m, m, m, C).permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, C)
    return x[:, :H, :W]


class FallbackWindowAttention(nn.Module):
    """Non-shifted Swin window attention: pad, partition, SDPA per window (vitkit Attention), merge, crop."""

    def __init__(self, dim: int, num_heads: int, window_size: int) -> None:
        super().__init__()
        self.window_size = window_size
        self.attn = Attention(dim, num_heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C)
        win, shape = _partition(x, self.window_size)
        return _unpartition(self.attn(win), self.window_size, shape)


class _WindowsAdapter(nn.Module):
    """Drives a WindowAttention that takes windows (B * nW, M², C): partition and merge around it."""

    def __init__(self, inner: nn.Module, window_size: int) -> None:
        super().__init__()
        self.inner, self.window_size = inner, window_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        win, shape = _partition(x, self.window_size)
        return _unpartition(self.inner(win), self.window_size, shape)


def build_window_attention(dim: int, heads: int, m: int) -> tuple[nn.Module, str]:
    """vitkit's WindowAttention when it exists and runs, else the fallback; returns (module taking (B, H, W, C),
    description)."""
    try:
        from vitkit.layers import window_attention as wa_mod
    except Exception as e:  # not written yet, or broken
        return FallbackWindowAttention(dim, heads, m), f"fallback: partition + vitkit Attention/SDPA " \
                                                         f"(vitkit.layers.window_attention not importable: {e!r})"
    cls = getattr(wa_mod, "WindowAttention", None)
    if cls is None:
        return FallbackWindowAttention(dim, heads, m), "fallback (no WindowAttention class in " \
                                                         "vitkit.layers.window_attention)"
    sig = inspect.signature(cls)
    errors = []
    for ws in (m, (m, m)):
        kwargs: dict[str, Any] = {}
        for name, value in (("dim", dim), ("num_heads", heads), ("window_size", ws)):
            if name in sig.parameters:
                kwargs[name] = value
        try:
            inner = cls(**kwargs).eval()
        except Exception as e:
            errors.append(f"{kwargs}: {e!r}")
            continue
        probe_hw = torch.randn(1, 2 * m, 2 * m, dim)
        with torch.inference_mode():
            for wrap, desc in ((lambda mod: _WindowsAdapter(mod, m), "windows (B*nW, M*M, C)"),
                               (lambda mod: mod, "maps (B, H, W, C)")):
                module = wrap(inner)
                try:
                    out = module(probe_hw)
                    if tuple(out.shape) == tuple(probe_hw.shape):
                        return module, f"vitkit.layers.window_attention.WindowAttention{sig}, called on {desc}"
                    errors.append(f"{desc}: output {tuple(out.shape)}")
                except Exception as e:
                    errors.append(f"{desc}: {e!r}")
    return FallbackWindowAttention(dim, heads, m), "fallback: partition + vitkit Attention/SDPA (could not drive " \
                                                     f"WindowAttention{sig}: {'; '.join(errors)[:300]})"


def _share_weights(src: Attention, dst: nn.Module) -> None:
    """Copy qkv/proj into ``dst`` wherever it has modules of those names (relative bias etc. keep their init)."""
    for name, mod in dst.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        ref = getattr(src, leaf, None) if leaf in ("qkv", "proj") else None
        if isinstance(mod, nn.Linear) and isinstance(ref, nn.Linear) and mod.weight.shape == ref.weight.shape:
            mod.load_state_dict(ref.state_dict())


# ---------------------------------------------------------------------------- FLOPs
def attention_flops(method: str, side: int, dim: int, heads: int, m: int, group: int, keep: float) -> int:
    """2 x multiply-accumulates of one layer: projections (qkv + proj) plus the attention products."""
    n = side * side
    d = dim // heads
    if method == "global":
        return 2 * n * 4 * dim * dim + 2 * 2 * n * n * dim
    if method == "window":
        npad = math.ceil(side / m) ** 2 * m * m
        return 2 * npad * 4 * dim * dim + 2 * 2 * npad * m * m * dim
    if method == "global-sdpa":
        return 2 * 2 * n * n * dim
    if method == "linear":
        return 2 * n * 4 * dim * dim + 2 * 2 * n * d * (d + 1) * heads
    kept = round(keep * n)
    slots = math.ceil(kept / group) * group
    return 2 * slots * 3 * dim * dim + 2 * kept * dim * dim + 2 * 2 * slots * group * dim


# ---------------------------------------------------------------------------- one cell
def _random_keep(side: int, keep: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = side * side
    return grid_coords(side, side)[torch.randperm(n, generator=g)[: round(keep * n)].sort().values]


def _time_layout(coords: torch.Tensor, group: int, m: int, min_s: float = 0.05) -> float:
    build_groups(coords, group, m)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < min_s or n < 3:
        build_groups(coords, group, m)
        n += 1
    return (time.perf_counter() - t0) / n


def make_candidates(side: int, precision: str, args: argparse.Namespace, window: nn.Module, base: Attention,
                    linear: ReLULinearAttention, sparse: SparseWindowAttention) -> tuple[list[Candidate], dict]:
    dtype = DTYPES[precision]
    g = torch.Generator().manual_seed(side)
    x = torch.randn(1, side * side, args.dim, generator=g).to(dtype)
    x_map = x.view(1, side, side, args.dim)
    coords = _random_keep(side, args.keep, seed=1000 + side)
    x_sparse = torch.randn(coords.shape[0], args.dim, generator=g).to(dtype)
    for mod in (base, window, linear, sparse):
        mod.to(dtype)
    q, k, v = base.qkv(x).reshape(1, -1, 3, args.heads, args.dim // args.heads).permute(2, 0, 3, 1, 4).unbind(0)
    fns: dict[str, Callable[[], Any]] = {
        "global": lambda: base(x),
        "window": lambda: window(x_map),
        "linear": lambda: linear(x),
        "sparse": lambda: sparse(x_sparse, coords),
        "global-sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
    }
    cands = [Candidate(m, "vitkit", precision, fns[m], False) for m in args.methods]
    extra = {"kept_tokens": int(coords.shape[0]), "layout_ms": 1000 * _time_layout(coords, args.group, args.window)}
    return cands, extra


def measure_cell(side: int, precision: str, args: argparse.Namespace, meter: ContentionMeter, window: nn.Module,
                 base: Attention, linear: ReLULinearAttention, sparse: SparseWindowAttention
                 ) -> list[dict[str, Any]]:
    """Time every method at one grid size and precision (alternating rounds); one raw record per method."""
    cands, extra = make_candidates(side, precision, args, window, base, linear, sparse)
    waited = wait_for_quiet(meter, args.max_contention, max_wait_s=args.max_wait)
    probe = []
    for c in cands:  # one call each, to size the cell
        t0 = time.perf_counter()
        c.fn()
        probe.append(time.perf_counter() - t0)
    slow = max(probe) > args.slow_call_seconds
    samples = args.slow_samples if slow else args.samples
    with meter.measure() as cell:
        time_alternating(cands, samples, args.min_sample_seconds, args.max_contention, max_rounds=3 * samples,
                         warmup=1 if slow else 2, meter=meter, backoff_s=1.0)
    return [{"method": c.name, "precision": precision, "side": side, "tokens": side * side,
             "kept": extra["kept_tokens"] if c.name == "sparse" else side * side,
             "flops": attention_flops(c.name, side, args.dim, args.heads, args.window, args.group, args.keep),
             "samples_ms": [round(1000 * s, 6) for s in c.samples],
             "contention": [None if math.isnan(x) else round(x, 4) for x in c.contention],
             "discarded": c.discarded, "note": c.note, "layout_ms": round(extra["layout_ms"], 6),
             "cell_contention": round(cell["contention"], 4), "waited_s": round(waited, 2), "slow": slow}
            for c in cands]


def run(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure every cell, appending its raw records to ``args.results`` as soon as it is done (an interrupted run
    keeps what it measured; only a run with its ``end`` record counts as ``latest``). Returns the run's id and
    meta record."""
    torch.set_num_threads(args.threads)
    meter = ContentionMeter()
    torch.manual_seed(0)
    base = Attention(args.dim, args.heads).eval()
    window, window_impl = build_window_attention(args.dim, args.heads, args.window)
    window.eval()
    _share_weights(base, window)
    linear = ReLULinearAttention(args.dim, args.heads).eval()
    sparse = SparseWindowAttention(args.dim, args.heads, args.group, args.window).eval()
    _share_weights(base, linear)
    _share_weights(base, sparse)
    run_id = utc_now()
    meta = {
        "kind": "meta", "run_id": run_id,
        "machine": {"cpu": cpu_name(), "cpu_flags": _simd_flags(), "cores": os.cpu_count(),
                    "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "python": platform.python_version(), "native_bf16": native_bf16_supported(),
                    "amx": amx_supported()},
        "settings": {"window_impl": window_impl, "dim": args.dim, "heads": args.heads, "window": args.window,
                     "group": args.group, "keep": args.keep, "grids": args.grids, "precisions": args.precisions,
                     "methods": args.methods, "samples": args.samples, "slow_samples": args.slow_samples,
                     "slow_call_s": args.slow_call_seconds, "passes": args.passes,
                     "min_sample_s": args.min_sample_seconds, "max_contention": args.max_contention,
                     "max_wait_s": args.max_wait, "quick": args.quick},
        "command": args.command, "load_before": machine_load(),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
    append_jsonl(args.results, [meta])
    mach = meta["machine"]
    log(f"attention scaling, run {run_id}: {mach['cpu']} ({mach['cpu_flags']}), {mach['threads']} threads, torch "
        f"{mach['torch']}; native bf16: {mach['native_bf16']}; records -> {args.results}")
    log(f"window attention: {window_impl}")
    t_start = time.perf_counter()
    with torch.inference_mode():
        for p in range(args.passes):
            order = sorted(args.grids) if p % 2 == 0 else sorted(args.grids, reverse=True)
            for precision in args.precisions:
                for side in order:
                    rows = measure_cell(side, precision, args, meter, window, base, linear, sparse)
                    append_jsonl(args.results, [{"kind": "cell", "run_id": run_id, "pass": p + 1, **r} for r in rows])
                    r0 = rows[0]
                    log(f"pass {p + 1} {precision} {side:3d}x{side:<3d}: " + "  ".join(
                        f"{r['method']} {statistics.median(r['samples_ms']):8.2f} ms" + ("!" if r["note"] else "")
                        for r in rows)
                        + f"  | sparse layout {r0['layout_ms']:.2f} ms; cell contention "
                        f"{100 * r0['cell_contention']:.0f}%, discarded {sum(r['discarded'] for r in rows)}, "
                        f"waited {r0['waited_s']:.0f} s" + (f", {len(r0['samples_ms'])} samples (slow cell)"
                                                            if r0["slow"] else ""))
    append_jsonl(args.results, [end_record(run_id, t_start)])
    return {"run_id": run_id, "meta": meta}


# ---------------------------------------------------------------------------- from the results file: the renderer
def read_records(path: str | Path) -> list[dict[str, Any]]:
    """The records of a results file (a missing file is an error here: the tables need a run)."""
    if not Path(path).is_file():
        raise ConfigError(f"{path}: results file not found")
    return read_results(path)


def select_run(records: list[dict[str, Any]], run: str = "latest"
               ) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any] | None]:
    """(meta, cell records, end record or None) of one run: ``run`` is a run_id, or ``latest``: the last run in the
    file that finished (has its ``end`` record) and is not a ``--quick`` one."""
    meta = select_run_meta(records, run)
    ends = {r["run_id"]: r for r in records if r.get("kind") == "end"}
    cells = [r for r in records if r.get("kind") == "cell" and r["run_id"] == meta["run_id"]]
    if not cells:
        raise ConfigError(f"run {meta['run_id']} has no cell records")
    return meta, cells, ends.get(meta["run_id"])


def contention_median(values: list[float | None]) -> float | None:
    """Median of sample contentions; a noisy stand-in (None: all its samples were above the threshold, so its
    contention is unknown but high) counts as infinitely contended, so a median that falls on one is ``inf``."""
    return statistics.median(math.inf if v is None else v for v in values) if values else None


def combine(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (precision, grid, method) from the records of every pass: ``ms`` is the median over ALL kept
    samples of all passes (never the faster pass); ``pass_ms`` (each pass's median) is extra information only.
    ``contention`` is the median of the samples' contention (:func:`contention_median`), ``noisy`` whether a pass
    had no clean sample."""
    groups: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for r in cells:
        groups.setdefault((r["precision"], r["side"], r["method"]), []).append(r)
    rows = []
    for (precision, side, method), passes in groups.items():
        passes = sorted(passes, key=lambda r: r["pass"])
        samples = [s for r in passes for s in r["samples_ms"]]
        measured = [c for r in passes for c in r["contention"]]
        rows.append({"precision": precision, "side": side, "tokens": side * side, "method": method,
                     "kept": passes[0]["kept"], "flops": passes[0]["flops"], "ms": statistics.median(samples),
                     "samples": len(samples), "discarded": sum(r["discarded"] for r in passes),
                     "pass_ms": {r["pass"]: statistics.median(r["samples_ms"]) for r in passes},
                     "contention": contention_median(measured), "sample_contention": measured,
                     "noisy": any("noisy" in r["note"] for r in passes),
                     "layout_ms": statistics.median(r["layout_ms"] for r in passes),
                     "cell_contention": max(r["cell_contention"] for r in passes),
                     "waited_s": sum(r["waited_s"] for r in passes)})
    order = {p: i for i, p in enumerate(DTYPES)}
    methods = {m: i for i, m in enumerate(METHODS)}
    return sorted(rows, key=lambda r: (order.get(r["precision"], 99), r["side"], methods.get(r["method"], 99)))


def _fit(tokens: list[int], values: list[float]) -> float | None:
    """Least-squares slope of log(value) on log(tokens); None with fewer than two grids."""
    if len(tokens) < 2:
        return None
    slope, _ = np.polyfit(np.log(tokens), np.log(values), 1)
    return float(slope)


def upper_half(sides: list[int]) -> list[int]:
    sides = sorted(set(sides))
    return sides[len(sides) // 2:]


def fit_exponents(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every fit, per (precision, method): latency and FLOP count, over all grids and over the upper half of the
    run's grids, and each pass's latency alone over all grids."""
    upper = upper_half([r["side"] for r in rows])
    fits = []
    for precision in [p for p in DTYPES if any(r["precision"] == p for r in rows)]:
        for method in [m for m in METHODS if any(r["method"] == m for r in rows)]:
            pts = sorted((r for r in rows if r["precision"] == precision and r["method"] == method),
                         key=lambda r: r["tokens"])
            if len(pts) < 2:
                continue
            up = [r for r in pts if r["side"] in upper]
            passes = sorted(set.intersection(*(set(r["pass_ms"]) for r in pts)))
            fits.append({
                "precision": precision, "method": method, "grids": [r["side"] for r in pts], "upper_grids": upper,
                "exponent": _fit([r["tokens"] for r in pts], [r["ms"] for r in pts]),
                "exponent_upper": _fit([r["tokens"] for r in up], [r["ms"] for r in up]),
                "flop_exponent": _fit([r["tokens"] for r in pts], [r["flops"] for r in pts]),
                "flop_exponent_upper": _fit([r["tokens"] for r in up], [r["flops"] for r in up]),
                "pass_exponents": {p: _fit([r["tokens"] for r in pts], [r["pass_ms"][p] for r in pts])
                                   for p in passes}})
    return fits


def mark_threshold(meta: dict[str, Any], threshold: float | str | None = None) -> float:
    """The contention above which a cell is marked: ``threshold`` when given, else the run's ``--max-contention``
    capped at 0.2 (the upper end of docs/method.md's "normally 10-20%"), so that a run which kept every sample
    (``--max-contention 1``) is still judged."""
    if threshold is not None:
        return float(threshold)
    return min(float(meta["settings"]["max_contention"]), 0.2)


def _mark(row: dict[str, Any], threshold: float) -> str:
    return ("†" if row["noisy"] else "") + ("*" if row["contention"] is not None
                                            and row["contention"] > threshold else "")


def _ms(value: float) -> str:
    return f"{value:.2f}" if value >= 1 else f"{value:.3g}"


def _exp(value: float | None) -> str:
    return "-" if value is None else f"{round(value, 2) + 0.0:.2f}"  # + 0.0: no "-0.00"


def _share(value: float | None, limit: float) -> str:
    if value is None:
        return "-"
    return f"> {100 * limit:.0f}% (noisy)" if math.isinf(value) else f"{100 * value:.0f}%"


def _grids(sides: list[int]) -> str:
    return ", ".join(f"{s}²" for s in sides)


def _machine_line(meta: dict[str, Any]) -> str:
    m, s = meta["machine"], meta["settings"]
    return (f"Run {meta['run_id']}: {m['cpu']} ({m['cores']} cores; SIMD flags: {m['cpu_flags']}; bf16 "
            f"{'native' if m['native_bf16'] else 'emulated'}), {m['threads']} threads, torch {m['torch']}, Python "
            f"{m['python']}. Width {s['dim']}, {s['heads']} heads, batch 1; M = {s['window']}, G = {s['group']}, "
            f"sparse keeps {100 * s['keep']:.0f}% of the tokens. Window attention: {s['window_impl']}.")


def format_table(meta: dict[str, Any], rows: list[dict[str, Any]], end: dict[str, Any] | None,
                 threshold: float) -> str:
    s = meta["settings"]
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    lines = [_machine_line(meta), "",
             "| grid | tokens | precision | " + " | ".join(f"{m} ms" for m in methods)
             + " | sparse layout ms | contention (median of samples) | samples kept / discarded |",
             "|---|---:|---|" + "---:|" * len(methods) + "---:|---:|---:|"]
    marked = 0
    for precision in [p for p in DTYPES if any(r["precision"] == p for r in rows)]:
        for side in sorted({r["side"] for r in rows if r["precision"] == precision}):
            cell = {r["method"]: r for r in rows if r["precision"] == precision and r["side"] == side}
            vals = []
            for m in methods:
                r = cell.get(m)
                mark = _mark(r, threshold) if r else ""
                marked += bool(mark)
                vals.append(f"{_ms(r['ms'])}{mark}" if r else "-")
            layout = cell["sparse"]["layout_ms"] if "sparse" in cell else None
            contention = contention_median([c for r in cell.values() for c in r["sample_contention"]])
            lines.append(f"| {side}×{side} | {side * side} | {precision} | " + " | ".join(vals)
                         + f" | {'-' if layout is None else f'{layout:.2f}'}"
                         + f" | {_share(contention, s['max_contention'])}"
                         + f" | {sum(r['samples'] for r in cell.values())} / "
                           f"{sum(r['discarded'] for r in cell.values())} |")
    total = sum(1 for r in rows)
    waited = sum(r["waited_s"] for r in rows if r["method"] == rows[0]["method"])
    lines += ["", f"Latency: the median over all kept samples of {s['passes']} pass(es) (per pass {s['samples']} "
              f"samples of ≥ {s['min_sample_s']} s per method, {s['slow_samples']} for calls > {s['slow_call_s']} s;"
              f" alternating rounds). Samples during which other processes took more than "
              f"{100 * s['max_contention']:.0f}% of the machine were discarded and re-taken. "
              f"* = the median contention of the cell's samples is above {100 * threshold:.0f}%; † = noisy: in some "
              f"pass no sample could be taken under {100 * s['max_contention']:.0f}%, the median of the contended "
              f"ones stands in (and counts as contended). Contention: the share of the machine other processes "
              f"took during each kept sample, median over the row's samples; waited {waited:.0f} s for a quiet "
              "machine in all"
              + (f"; {end['seconds'] / 60:.1f} min." if end else "; the run did not finish.")]
    if marked * 2 > total:
        lines += ["", f"**Most figures of this table ({marked} of {total}) are contended.**"]
    return "\n".join(lines)


def format_fits(meta: dict[str, Any], rows: list[dict[str, Any]], fits: list[dict[str, Any]]) -> str:
    if not fits:
        return "No fit: fewer than two grids were measured."
    upper = fits[0]["upper_grids"]
    passes = sorted({p for f in fits for p in f["pass_exponents"]})
    lines = ["| method | precision | latency exponent (all grids) | latency exponent (upper half: "
             f"{_grids(upper)}) | FLOP-count exponent (all grids) | FLOP-count exponent (upper half) | "
             "latency exponent, each pass alone (all grids) |", "|---|---|---:|---:|---:|---:|---:|"]
    for f in fits:
        each = ", ".join(_exp(f["pass_exponents"].get(p)) for p in passes) if len(passes) > 1 else "-"
        lines.append(f"| {f['method']} | {f['precision']} | {_exp(f['exponent'])} | {_exp(f['exponent_upper'])} | "
                     f"{_exp(f['flop_exponent'])} | {_exp(f['flop_exponent_upper'])} | {each} |")
    grids = sorted({r["side"] for r in rows})
    lines += ["", f"Exponent: least-squares slope of log(latency) (or log(FLOP count)) on log(tokens), over all "
              f"grids ({_grids(grids)}) and over the upper half ({_grids(upper)}); latency = the median over all "
              "samples of every pass, as in the latency table; tokens = H·W (sparse attends to "
              f"{100 * meta['settings']['keep']:.0f}% of them)."]
    return "\n".join(lines)


def _label(method: str, meta: dict[str, Any]) -> str:
    s = meta["settings"]
    return {"global": "global attention layer", "global-sdpa": "global, SDPA core alone",
            "window": f"window (Swin, M = {s['window']})", "linear": "ReLU linear",
            "sparse": f"sparse grouped, {100 * s['keep']:.0f}% kept"}.get(method, method)


def format_summary(meta: dict[str, Any], rows: list[dict[str, Any]], fits: list[dict[str, Any]],
                   threshold: float) -> str:
    precisions = [p for p in DTYPES if any(r["precision"] == p for r in rows)]
    largest = {p: max(r["side"] for r in rows if r["precision"] == p) for p in precisions}
    by = {(f["method"], f["precision"]): f for f in fits}
    head = ["method"]
    for p in precisions:
        head += [f"exponent {p} (all grids)", f"exponent {p} (upper half)"]
    head += [f"{largest[p]}×{largest[p]} {p} ms" for p in precisions]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    order = ("global", "global-sdpa", "window", "linear", "sparse")
    for method in [m for m in order if any(r["method"] == m for r in rows)]:
        cells = []
        for p in precisions:
            f = by.get((method, p))
            cells += [_exp(f["exponent"] if f else None), _exp(f["exponent_upper"] if f else None)]
        for p in precisions:
            r = next((r for r in rows if r["method"] == method and r["precision"] == p and r["side"] == largest[p]),
                     None)
            cells.append(f"{_ms(r['ms'])}{_mark(r, threshold)}" if r else "-")
        lines.append(f"| {_label(method, meta)} | " + " | ".join(cells) + " |")
    grids = sorted({r["side"] for r in rows})
    m = meta["machine"]
    lines += ["", f"Run {meta['run_id']}, {m['cpu']}, {m['threads']} threads. Exponents: least-squares slope of "
              f"log(latency) on log(tokens) over all grids ({_grids(grids)}) and over the upper half "
              f"({_grids(upper_half(grids))}); ms: median over all samples of all passes"
              + (f"; * = median sample contention above {100 * threshold:.0f}%, † = noisy cell"
                 if any(_mark(r, threshold) for r in rows) else "") + "."]
    return "\n".join(lines)


def plot(meta: dict[str, Any], rows: list[dict[str, Any]], fits: list[dict[str, Any]], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"global": "tab:red", "window": "tab:blue", "linear": "tab:green", "sparse": "tab:purple",
              "global-sdpa": "tab:orange"}
    m, s = meta["machine"], meta["settings"]
    fig, ax = plt.subplots(figsize=(10, 5.5))
    for f in fits:
        pts = sorted((r["tokens"], r["ms"]) for r in rows
                     if r["method"] == f["method"] and r["precision"] == f["precision"])
        n, ms = zip(*pts)
        ax.plot(n, ms, marker="o", color=colors.get(f["method"], "black"),
                linestyle="-" if f["precision"] == "fp32" else "--",
                label=f"{f['method']} {f['precision']} (slope {f['exponent']:.2f})")
    n_all = sorted({r["tokens"] for r in rows})
    ref = min(r["ms"] for r in rows if r["tokens"] == n_all[0])
    for k, style in ((1, ":"), (2, "-.")):
        ax.plot(n_all, [ref * (n / n_all[0]) ** k for n in n_all], color="gray", linestyle=style, linewidth=1,
                label=f"∝ N^{k}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    sides = sorted({r["side"] for r in rows})
    ax.set_xlabel(f"tokens N = H·W (grid {sides[0]}² … {sides[-1]}²; sparse keeps {100 * s['keep']:.0f}%)")
    ax.set_ylabel("latency of one attention layer (ms, median of all samples)")
    ax.set_title(f"One attention layer, dim {s['dim']}, {s['heads']} heads, batch 1, {m['threads']} threads, run "
                 f"{meta['run_id']}\n{m['cpu']} (bf16 {'native' if m['native_bf16'] else 'emulated'})", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="solid fp32, dashed bf16",
              title_fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render_scaling(doc_dir: str | Path, plots: bool = True,
                   results: str = "../benchmarks/results/attention_scaling.jsonl", part: str = "table",
                   run: str = "latest", image: str | None = None, threshold: str | float | None = None) -> str:
    """Markdown for ``vitkit report`` (kind ``script``), from the results file alone (``results`` and ``image``
    relative to ``doc_dir``), for run ``run`` (a run_id, or ``latest``: the last finished full run):

    * ``part=table``: latency per grid, precision and method (median over all samples of all passes), marks,
      contention, samples kept / discarded;
    * ``part=fits``: every exponent: latency and FLOP count, all grids and upper half, each precision (and each
      pass alone, as extra information);
    * ``part=summary``: method, exponents per precision (all / upper half), ms at the largest grid.

    With ``image`` the text ends with its link; with ``plots`` too, the log-log plot is redrawn there.
    ``threshold``: contention above which a cell is marked (default: the run's ``--max-contention``, at most 0.2).
    """
    doc_dir = Path(doc_dir)
    meta, cells, end = select_run(read_records(doc_dir / results), run)
    rows = combine(cells)
    fits = fit_exponents(rows)
    limit = mark_threshold(meta, threshold)
    if part == "table":
        text = format_table(meta, rows, end, limit)
    elif part == "fits":
        text = format_fits(meta, rows, fits)
    elif part == "summary":
        text = format_summary(meta, rows, fits, limit)
    else:
        raise ConfigError(f"part={part!r}: one of table, fits, summary")
    if image:
        if plots:
            plot(meta, rows, fits, doc_dir / image)
        text += f"\n\n![attention scaling]({image})"
    return text


def _simd_flags() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                seen = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
                return " ".join(seen) or "no AVX2"
    return "unknown flags"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grids", nargs="+", type=int, default=[14, 20, 28, 40, 48, 56, 64])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--window", type=int, default=7, help="window size M (window and sparse)")
    parser.add_argument("--group", type=int, default=49, help="sparse group size G")
    parser.add_argument("--keep", type=float, default=0.5, help="fraction of tokens the sparse method keeps")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--samples", type=int, default=5, help="clean samples per method and cell, per pass")
    parser.add_argument("--passes", type=int, default=2, help="sweeps over the grids (alternately ascending and "
                        "descending); a cell's figure is the median over the samples of all passes")
    parser.add_argument("--slow-samples", type=int, default=3, help="samples for cells with a call slower than "
                        "--slow-call-seconds")
    parser.add_argument("--slow-call-seconds", type=float, default=1.0)
    parser.add_argument("--min-sample-seconds", type=float, default=0.3)
    parser.add_argument("--max-contention", type=float, default=MAX_CONTENTION,
                        help="samples during which other processes took more than this share of the machine are "
                        f"discarded and re-taken; cells above it are marked (default {MAX_CONTENTION})")
    parser.add_argument("--max-wait", type=float, default=30.0, help="seconds to wait for a quiet machine per cell")
    parser.add_argument("--quick", action="store_true", help="grids 14, 28, 56; 3 samples of ≥ 0.1 s, one pass "
                        "(recorded as quick: never the 'latest' run of the docs)")
    parser.add_argument("--results", default=str(DEFAULT_RESULTS),
                        help="JSON-lines file the raw records are appended to (default: %(default)s)")
    parser.add_argument("--plot", default=str(HERE / "attention_scaling.png"),
                        help="log-log plot of this run ('' to skip; default: %(default)s)")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.command = shlex.join(["python", "benchmarks/bench_attention_scaling.py", *argv])
    if args.quick:
        args.grids, args.samples, args.slow_samples, args.min_sample_seconds, args.passes = [14, 28, 56], 3, 2, 0.1, 1
    done = run(args, log=lambda s: print(s, flush=True))
    results = os.path.abspath(args.results)
    for part in ("table", "fits", "summary"):
        print()
        print(render_scaling(Path.cwd(), plots=False, results=results, part=part, run=done["run_id"]))
    if args.plot:
        render_scaling(Path.cwd(), plots=True, results=results, part="summary", run=done["run_id"],
                       image=os.path.abspath(args.plot))
        print(f"\nplot: {args.plot}")
    print(f"records: {results} (run_id {done['run_id']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
