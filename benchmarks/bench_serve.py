"""Bounded load test of ``vitkit serve`` on 127.0.0.1: N requests from C concurrent clients, per overlay.

For each ``--explain`` overlay (default ``rollout none``: one run holds both rows of the table), starts ``vitkit
serve RUN --explain OVERLAY`` in a subprocess on a free local port (nothing else is ever contacted), waits for
``/health``, sends one warm-up request, then C client threads POST Fashion-MNIST test images (or random images
when the dataset is absent) to ``/predict`` until N requests are done; the server is stopped before the next
overlay starts its own.

Every run APPENDS its raw records to ``--results``: one ``meta`` record (model folder, requests, clients,
overlays, images, machine, command), one ``load`` record per overlay (every request's latency in ms and HTTP
status in request order, -1 where no answer came; the warm-up latency; the wall-clock of the N requests; the
server's RSS high-water mark (VmHWM, /proc, Linux) once idle and after the load), one ``end`` record.
:func:`render_serve_load` (the ``vitkit report`` block ``script script=benchmarks/bench_serve.py
function=render_serve_load``) builds the table from that file alone: p50 / p95 / max over the answered (200)
requests, p95 as ``statistics.quantiles(n=20, method="inclusive")[18]`` (linear interpolation between the
answered latencies, never above their max), req/s as N / wall-clock.

    python benchmarks/bench_serve.py RUN [--requests 200] [--clients 20] [--explain rollout none]
"""

from __future__ import annotations

import argparse
import io
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

import httpx
import numpy as np
from PIL import Image

from vitkit.errors import ConfigError
from vitkit.tools.ablate import read_results
from vitkit.tools.report import select_run_meta
from vitkit.tools.timing import append_jsonl, end_record, machine_load, machine_record, utc_now

OVERLAYS = ["rollout", "last", "grad", "none"]
HERE = Path(__file__).resolve().parent
DEFAULT_RESULTS = HERE / "results" / "serve_load.jsonl"


def wait_until_up(server: subprocess.Popen, base: str, timeout_s: float = 120.0,
                  log_file: IO[bytes] | None = None) -> None:
    """Poll ``/health`` until the server answers; exit with its last stderr (``log_file`` where it went to a
    file, else its pipe) if it dies or never answers. (bench_serve_load.py uses it too.)"""
    deadline = time.time() + timeout_s
    while True:
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if server.poll() is not None or time.time() > deadline:
            if log_file is not None:
                log_file.seek(0)
            source = log_file if log_file is not None else server.stderr
            err = source.read() if source is not None else b""
            raise SystemExit(f"server did not start: {err.decode(errors='replace')[-2000:]}")
        time.sleep(0.2)


def _images(n: int) -> tuple[list[bytes], str]:
    """``n`` PNG images and where they came from (Fashion-MNIST test images, or random ones without the data)."""
    from vitkit.data.fashion_mnist import find_dir, load_arrays

    folder = find_dir(None, "test")
    if folder:
        arrays, source = load_arrays(folder, "test")[0][:n], "Fashion-MNIST test images"
    else:
        arrays, source = np.random.default_rng(0).integers(0, 256, (n, 28, 28)), "random 28x28 images"
    out = []
    for a in arrays:
        buf = io.BytesIO()
        Image.fromarray(np.asarray(a, np.uint8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out, source


def _rss_peak_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------- measuring
def load_overlay(args: argparse.Namespace, explain: str, images: list[bytes]) -> dict[str, Any]:
    """One server with overlay ``explain``: a warm-up request, then ``args.requests`` from ``args.clients``
    threads; the raw latencies (ms) and statuses in request order, the wall-clock and the server's RSS."""
    port = _free_port()
    cmd = [sys.executable, "-m", "vitkit.cli", "serve", args.run, "--host", "127.0.0.1", "--port", str(port),
           "--explain", explain]
    base = f"http://127.0.0.1:{port}"
    # the server's log goes to a file: a pipe nobody reads would block the server once full
    with tempfile.TemporaryFile() as log_file:
        server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log_file)
        try:
            wait_until_up(server, base, log_file=log_file)
            rss_idle = _rss_peak_mb(server.pid)
            with httpx.Client(timeout=120, limits=httpx.Limits(max_connections=args.clients)) as client:

                def call(i: int) -> tuple[int, float]:
                    t = time.perf_counter()
                    try:
                        r = client.post(base + "/predict",
                                        files={"file": (f"{i}.png", images[i % len(images)], "image/png")})
                        code = r.status_code
                    except httpx.HTTPError:
                        code = -1
                    return code, 1e3 * (time.perf_counter() - t)

                warmup = call(0)  # the first forward
                start = time.perf_counter()
                with ThreadPoolExecutor(args.clients) as pool:
                    answers = list(pool.map(call, range(args.requests)))
                wall = time.perf_counter() - start
            rss_peak = _rss_peak_mb(server.pid)
        finally:
            server.terminate()
            server.wait(10)
    return {"explain": explain, "requests": args.requests, "clients": args.clients,
            "server_command": shlex.join(["vitkit", *cmd[3:]]),
            "latency_ms": [round(ms, 3) for _, ms in answers], "status": [code for code, _ in answers],
            "warmup_ms": round(warmup[1], 3), "warmup_status": warmup[0], "wall_s": round(wall, 4),
            "rss_idle_mb": rss_idle, "rss_peak_mb": rss_peak}


def run(args: argparse.Namespace, log) -> str:
    """One benchmark run: meta, one ``load`` record per overlay (appended as each finishes), end; its run_id."""
    run_id = utc_now()
    images, source = _images(args.requests)
    meta = {"kind": "meta", "run_id": run_id, "command": args.command, "machine": machine_record(),
            "settings": {"run": args.run, "requests": args.requests, "clients": args.clients,
                         "explain": args.explain, "images": source, "host": "127.0.0.1"},
            "load_before": machine_load()}
    append_jsonl(args.results, [meta])
    log(f"serve load, run {run_id}: {args.run}, {args.requests} requests from {args.clients} clients, overlays "
        f"{', '.join(args.explain)}; records -> {args.results}")
    start = time.perf_counter()
    for explain in args.explain:
        record = load_overlay(args, explain, images)
        append_jsonl(args.results, [{"kind": "load", "run_id": run_id, **record}])
        figures = load_figures(record)
        log(f"{explain}: {figures['ok']}/{args.requests} answered (errors: {figures['errors']}) in "
            f"{record['wall_s']:.1f} s, p50 {_num(figures['p50'], '.1f')} ms")
    append_jsonl(args.results, [end_record(run_id, start)])
    return run_id


# ---------------------------------------------------------------------------- from the results file: the table
def load_figures(r: dict[str, Any]) -> dict[str, Any]:
    """A ``load`` record's row: answered / error counts, p50 / p95 / max over the answered requests (ms), req/s."""
    ok = [ms for ms, code in zip(r["latency_ms"], r["status"]) if code == 200]
    codes = Counter(code for code in r["status"] if code != 200)
    return {"ok": len(ok), "errors": ", ".join(f"{c}: {n}" for c, n in sorted(codes.items())) or "0",
            "p50": statistics.median(ok) if ok else None,
            "p95": statistics.quantiles(ok, n=20, method="inclusive")[18] if len(ok) >= 2 else None,
            "max": max(ok) if ok else None, "req_s": len(r["status"]) / r["wall_s"]}


def _num(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def render_serve_load(doc_dir: str | Path, plots: bool = True, results: str = "results/serve_load.jsonl",
                      run: str = "latest", part: str = "table") -> str:
    """Markdown for ``vitkit report`` (kind ``script``) from the results file alone (``results`` relative to
    ``doc_dir``), for run ``run`` (a run_id, or ``latest``: the last finished run): ``part=table`` one row per
    overlay, ``part=machine`` the machine, the server command and the load."""
    path = Path(doc_dir) / results
    if not path.is_file():
        raise ConfigError(f"{path}: results file not found")
    records = read_results(path)
    meta = select_run_meta(records, run)
    loads = [r for r in records if r.get("kind") == "load" and r.get("run_id") == meta["run_id"]]
    if not loads:
        raise ConfigError(f"run {meta['run_id']} has no load records")
    m, s = meta["machine"], meta["settings"]
    if part == "machine":
        return (f"Run {meta['run_id']}: {m['cpu']} ({m['cores']} logical CPUs; {m['cpu_flags']}; AMX "
                f"{'yes' if m['amx'] else 'no'}), torch {m['torch']}, Python {m['python']}. Server `vitkit serve "
                f"{s['run']} --explain OVERLAY` on 127.0.0.1, one per overlay; {s['requests']} requests "
                f"({s['images']} as PNG) from {s['clients']} concurrent clients after one warm-up request; "
                f"p50 / p95 / max over the answered requests. Command: `{meta['command']}`.")
    if part != "table":
        raise ConfigError(f"part={part!r}: one of table, machine")
    lines = ["| overlay | requests | clients | ok | errors | p50 ms | p95 ms | max ms | req/s | "
             "server RSS idle / peak MB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in loads:
        f = load_figures(r)
        lines.append(f"| {r['explain']} | {r['requests']} | {r['clients']} | {f['ok']} | {f['errors']} | "
                     f"{_num(f['p50'], '.1f')} | {_num(f['p95'], '.1f')} | {_num(f['max'], '.1f')} | "
                     f"{f['req_s']:.1f} | {_num(r['rss_idle_mb'], '.0f')} / {_num(r['rss_peak_mb'], '.0f')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="a run folder or checkpoint folder")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--explain", nargs="+", default=["rollout", "none"], choices=OVERLAYS,
                   help="overlays, one server and one table row each (default: %(default)s)")
    p.add_argument("--results", default=str(DEFAULT_RESULTS),
                   help="JSON-lines file the raw records are appended to (default: %(default)s)")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    if args.requests < 1 or args.clients < 1:
        p.error("--requests and --clients must be >= 1")
    args.command = shlex.join(["python", "benchmarks/bench_serve.py", *argv])
    run_id = run(args, log=lambda s: print(s, file=sys.stderr, flush=True))
    results = os.path.abspath(args.results)
    print("\n\n".join(render_serve_load("/", False, results, run_id, part) for part in ("machine", "table")))
    print(f"\nrecords: {results} (run_id {run_id})")
    loads = [r for r in read_results(results) if r.get("kind") == "load" and r["run_id"] == run_id]
    return 0 if all(load_figures(r)["ok"] == r["requests"] for r in loads) else 1


if __name__ == "__main__":
    sys.exit(main())
