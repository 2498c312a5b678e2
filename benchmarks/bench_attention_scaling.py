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

Timing: ``torch.inference_mode``, warm-up, the four methods timed in alternating rounds with
``vitkit.tools.timing.time_alternating`` (each sample ≥ ``--min-sample-seconds``, median of ``--samples``;
samples during which other processes took more than ``--max-contention`` of the CPU are discarded and re-taken),
after ``wait_for_quiet``. Cells whose slowest call exceeds ``--slow-call-seconds`` get ``--slow-samples``
samples only. The exponent is a least-squares fit of log(latency) on log(H*W) over all grids and over the
upper half of them.

    python benchmarks/bench_attention_scaling.py --out attention_scaling.json      # full run, ≈ 4 min, 2 cores
    python benchmarks/bench_attention_scaling.py --quick                           # 3 grids, 3 samples
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vitkit.layers.attention import Attention
from vitkit.layers.linear_attention import ReLULinearAttention
from vitkit.layers.sparse_window import SparseWindowAttention, build_groups, grid_coords
from vitkit.tools.inference import native_bf16_supported
from vitkit.tools.timing import Candidate, ContentionMeter, cpu_name, machine_load, time_alternating, wait_for_quiet

METHODS = ("global", "window", "linear", "sparse", "global-sdpa")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


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
                 base: Attention, linear: ReLULinearAttention, sparse: SparseWindowAttention) -> list[dict[str, Any]]:
    """Time every method at one grid size and precision (alternating rounds); one row per method."""
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
    rows = []
    for c in cands:
        med = statistics.median(c.samples)
        spread = (max(c.samples) - min(c.samples)) / med if len(c.samples) > 1 else 0.0
        flops = attention_flops(c.name, side, args.dim, args.heads, args.window, args.group, args.keep)
        rows.append(dict(method=c.name, precision=precision, side=side, tokens=side * side,
                         kept=extra["kept_tokens"] if c.name == "sparse" else side * side, ms=1000 * med,
                         spread=spread, samples=len(c.samples), discarded=c.discarded, gflop=flops / 1e9,
                         note=c.note, layout_ms=extra["layout_ms"], cell_contention=cell["contention"],
                         waited_s=waited, slow=slow))
    return rows


def combine_passes(passes: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    """One row per (method, precision, grid) from every pass: the fastest pass median counts (host-level noise,
    which the contention meter cannot see from inside a VM, only ever adds time); the others are kept."""
    best = min(passes, key=lambda r: r["ms"])
    row = dict(best)
    row["pass_ms"] = [r["ms"] for r in passes]
    row["pass_spread"] = (max(row["pass_ms"]) - best["ms"]) / best["ms"]
    row["cell_contention"] = max(r["cell_contention"] for r in passes)
    row["layout_ms"] = min(r["layout_ms"] for r in passes) if row["method"] == "sparse" else None
    row["gflops"] = row["gflop"] / (row["ms"] / 1000)
    return row


def run(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict[str, Any]:
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
    meta = {
        "cpu": cpu_name(), "cpu_flags": _simd_flags(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(), "native_bf16": native_bf16_supported(),
        "window_impl": window_impl, "dim": args.dim, "heads": args.heads, "window": args.window,
        "group": args.group, "keep": args.keep, "grids": args.grids, "samples": args.samples, "passes": args.passes,
        "min_sample_s": args.min_sample_seconds, "max_contention": args.max_contention,
        "load_before": machine_load(), "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
    }
    log(f"attention scaling: {meta['cpu']} ({meta['cpu_flags']}), {meta['threads']} threads, torch "
        f"{meta['torch']}; native bf16: {meta['native_bf16']}")
    log(f"window attention: {window_impl}")
    cells: dict[tuple[str, int], list[dict[str, Any]]] = {}  # (precision, side) -> the rows of every pass
    t_start = time.perf_counter()
    with torch.inference_mode():
        for p in range(args.passes):
            order = args.grids if p % 2 == 0 else list(reversed(args.grids))
            for precision in args.precisions:
                for side in order:
                    rows = measure_cell(side, precision, args, meter, window, base, linear, sparse)
                    cells.setdefault((precision, side), []).append(rows)
                    r0 = rows[0]
                    log(f"pass {p + 1} {precision} {side:3d}x{side:<3d}: " + "  ".join(
                        f"{r['method']} {r['ms']:8.2f} ms" for r in rows)
                        + f"  | sparse layout {r0['layout_ms']:.2f} ms; cell contention "
                        f"{100 * r0['cell_contention']:.0f}%, waited {r0['waited_s']:.0f} s"
                        + (f", {r0['samples']} samples (slow cell)" if r0["slow"] else ""))
    rows = [combine_passes(passes) for key in sorted(cells, key=lambda k: (args.precisions.index(k[0]), k[1]))
            for passes in zip(*cells[key])]
    meta["seconds"] = time.perf_counter() - t_start
    meta["load_after"] = machine_load()
    return {"meta": meta, "rows": rows, "fits": fit_exponents(rows, args)}


# ---------------------------------------------------------------------------- fits and output
def _fit(tokens: list[int], values: list[float]) -> float:
    slope, _ = np.polyfit(np.log(tokens), np.log(values), 1)
    return float(slope)


def fit_exponents(rows: list[dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    fits = []
    upper = sorted(args.grids)[len(args.grids) // 2:]
    for precision in args.precisions:
        for method in args.methods:
            pts = sorted((r["tokens"], r["ms"], r["gflop"]) for r in rows
                         if r["method"] == method and r["precision"] == precision)
            if len(pts) < 2:
                continue
            n, ms, gf = zip(*pts)
            up = [p for p in pts if math.isqrt(p[0]) in upper]
            enough = len(up) >= 2
            per_pass = [r["pass_ms"] for r in sorted((r for r in rows if r["method"] == method
                                                       and r["precision"] == precision), key=lambda r: r["tokens"])]
            pass_exps = [_fit(n, [pm[i] for pm in per_pass]) for i in range(min(len(pm) for pm in per_pass))]
            fits.append(dict(method=method, precision=precision, exponent=_fit(n, ms), pass_exponents=pass_exps,
                             exponent_upper=_fit([p[0] for p in up], [p[1] for p in up]) if enough else None,
                             flop_exponent=_fit(n, gf),
                             flop_exponent_upper=_fit([p[0] for p in up], [p[2] for p in up]) if enough else None,
                             upper_grids=upper))
    return fits


def format_markdown(result: dict[str, Any]) -> str:
    meta, rows, fits = result["meta"], result["rows"], result["fits"]
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    precisions = [p for p in DTYPES if any(r["precision"] == p for r in rows)]
    lines = [f"Machine: {meta['cpu']} ({meta['cores']} cores; SIMD flags: {meta['cpu_flags']}; bf16 "
             f"{'native' if meta['native_bf16'] else 'emulated'}), {meta['threads']} threads, torch {meta['torch']}. "
             f"Width {meta['dim']}, {meta['heads']} heads, batch 1; M = {meta['window']}, G = {meta['group']}, "
             f"sparse keeps {100 * meta['keep']:.0f}%. Window attention: {meta['window_impl']}.", "",
             "| grid | tokens | precision | " + " | ".join(f"{m} ms" for m in methods)
             + " | sparse layout ms | contention |",
             "|---|---:|---|" + "---:|" * len(methods) + "---:|---:|"]
    for p in precisions:
        for side in sorted({r["side"] for r in rows}):
            cell = {r["method"]: r for r in rows if r["precision"] == p and r["side"] == side}
            if not cell:
                continue
            vals = []
            for m in methods:
                r = cell.get(m)
                flag = "*" if r and (r["spread"] > 0.15 or r.get("pass_spread", 0) > 0.15 or r["note"]) else ""
                vals.append(f"{r['ms']:.2f}{flag}" if r else "-")
            anyr = next(iter(cell.values()))
            layout = cell.get("sparse", {}).get("layout_ms")
            layout_s = f"{layout:.2f}" if layout is not None else "-"
            lines.append(f"| {side}×{side} | {side * side} | {p} | " + " | ".join(vals)
                         + f" | {layout_s} | {100 * anyr['cell_contention']:.0f}% |")
    lines += ["", f"Latency: the fastest of {meta['passes']} pass medians ({meta['samples']} samples of ≥ "
              f"{meta['min_sample_s']} s per pass; fewer for calls > 1 s). * = samples or passes differ by > 15%.",
              "", "| method | precision | exponent (all grids) | exponent (upper half: "
              + ", ".join(f"{s}²" for s in fits[0]["upper_grids"]) + ") | each pass alone (all grids) "
              "| FLOP-count exponent (all / upper) |",
              "|---|---|---:|---:|---:|---:|"]
    for f in fits:
        up = f"{f['exponent_upper']:.2f}" if f["exponent_upper"] is not None else "-"
        fup = f"{f['flop_exponent_upper']:.2f}" if f["flop_exponent_upper"] is not None else "-"
        each = ", ".join(f"{e:.2f}" for e in f["pass_exponents"])
        lines.append(f"| {f['method']} | {f['precision']} | {f['exponent']:.2f} | {up} | {each} | "
                     f"{f['flop_exponent']:.2f} / {fup} |")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, meta = result["rows"], result["meta"]
    fits = {(f["method"], f["precision"]): f["exponent"] for f in result["fits"]}
    colors = {"global": "tab:red", "window": "tab:blue", "linear": "tab:green", "sparse": "tab:purple",
              "global-sdpa": "tab:orange"}
    fig, ax = plt.subplots(figsize=(10, 5.5))
    for (method, precision), exp in fits.items():
        pts = sorted((r["tokens"], r["ms"]) for r in rows if r["method"] == method and r["precision"] == precision)
        n, ms = zip(*pts)
        ax.plot(n, ms, marker="o", color=colors[method], linestyle="-" if precision == "fp32" else "--",
                label=f"{method} {precision} (slope {exp:.2f})")
    n_all = sorted({r["tokens"] for r in rows})
    ref = min(r["ms"] for r in rows if r["tokens"] == n_all[0])
    for k, style in ((1, ":"), (2, "-.")):
        ax.plot(n_all, [ref * (n / n_all[0]) ** k for n in n_all], color="gray", linestyle=style, linewidth=1,
                label=f"∝ N^{k}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tokens N = H·W (grid 14² … 64²; sparse keeps 50%)")
    ax.set_ylabel("latency of one attention layer (ms)")
    ax.set_title(f"One attention layer, dim {meta['dim']}, {meta['heads']} heads, batch 1, "
                 f"{meta['threads']} threads\n{meta['cpu']} (bf16 {'native' if meta['native_bf16'] else 'emulated'})",
                 fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="solid fp32, dashed bf16",
              title_fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
                        "descending); the fastest pass median counts")
    parser.add_argument("--slow-samples", type=int, default=3, help="samples for cells with a call slower than "
                        "--slow-call-seconds")
    parser.add_argument("--slow-call-seconds", type=float, default=1.0)
    parser.add_argument("--min-sample-seconds", type=float, default=0.3)
    parser.add_argument("--max-contention", type=float, default=0.1)
    parser.add_argument("--max-wait", type=float, default=30.0, help="seconds to wait for a quiet machine per cell")
    parser.add_argument("--quick", action="store_true", help="grids 14, 28, 56; 3 samples of ≥ 0.1 s")
    parser.add_argument("--out", help="write the raw results (JSON) here")
    parser.add_argument("--plot", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                       "attention_scaling.png"), help="log-log plot ('' to skip)")
    args = parser.parse_args(argv)
    if args.quick:
        args.grids, args.samples, args.slow_samples, args.min_sample_seconds, args.passes = [14, 28, 56], 3, 2, 0.1, 1
    result = run(args, log=lambda s: print(s, flush=True))
    print()
    print(format_markdown(result))
    m = result["meta"]
    print(f"\n{m['seconds']:.0f} s; load average {m['load_before']} -> {m['load_after']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    if args.plot:
        plot(result, args.plot)
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
