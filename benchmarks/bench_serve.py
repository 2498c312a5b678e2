"""Bounded load test of ``vitkit serve`` on 127.0.0.1: N requests from C concurrent clients.

Starts ``vitkit serve RUN`` in a subprocess on a free local port (nothing else is ever contacted), waits for
``/health``, then C client threads POST Fashion-MNIST test images (or random images when the dataset is absent)
to ``/predict`` until N requests are done. Prints p50/p95/max latency, throughput, errors by status, and the
server's peak RSS (VmHWM from /proc, Linux), as a Markdown table.

    python benchmarks/bench_serve.py RUN [--requests 200] [--clients 20] [--explain rollout|none]
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from vitkit.tools.timing import cpu_name


def wait_until_up(server: subprocess.Popen, base: str, timeout_s: float = 120.0) -> None:
    """Poll ``/health`` until the server answers; exit with its last stderr if it dies or never answers."""
    deadline = time.time() + timeout_s
    while True:
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if server.poll() is not None or time.time() > deadline:
            raise SystemExit(f"server did not start: {server.stderr.read().decode()[-2000:]}")
        time.sleep(0.2)


def _images(n: int) -> list[bytes]:
    from vitkit.data.fashion_mnist import find_dir, load_arrays

    folder = find_dir(None, "test")
    arrays = load_arrays(folder, "test")[0][:n] if folder else np.random.default_rng(0).integers(0, 256, (n, 28, 28))
    out = []
    for a in arrays:
        buf = io.BytesIO()
        Image.fromarray(np.asarray(a, np.uint8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="a run folder or checkpoint folder")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--explain", default="rollout", choices=["rollout", "last", "grad", "none"])
    args = p.parse_args(argv)

    port = _free_port()
    cmd = [sys.executable, "-m", "vitkit.cli", "serve", args.run, "--host", "127.0.0.1", "--port", str(port),
           "--explain", args.explain]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(server, base)
        rss_idle = _rss_peak_mb(server.pid)
        images = _images(args.requests)
        client = httpx.Client(timeout=120, limits=httpx.Limits(max_connections=args.clients))

        def call(i: int) -> tuple[int, float]:
            t = time.perf_counter()
            try:
                r = client.post(base + "/predict", files={"file": (f"{i}.png", images[i % len(images)], "image/png")})
                code = r.status_code
            except httpx.HTTPError:
                code = -1
            return code, time.perf_counter() - t

        call(0)  # warm-up (first forward)
        start = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            results = list(pool.map(call, range(args.requests)))
        wall = time.perf_counter() - start
        rss_peak = _rss_peak_mb(server.pid)
    finally:
        server.terminate()
        server.wait(10)

    lat = sorted(1000 * dt for code, dt in results if code == 200)
    codes = Counter(code for code, _ in results)
    cpu = cpu_name()
    flags = Path("/proc/cpuinfo").read_text()
    isa = "AMX" if "amx_tile" in flags else "AVX512-BF16" if "avx512_bf16" in flags else "AVX2"
    print(f"machine: {cpu} ({isa}), {os.cpu_count()} cores; server `vitkit serve {args.run} --explain {args.explain}`")
    print(f"{args.requests} requests, {args.clients} concurrent clients, 127.0.0.1\n")
    print("| requests | clients | ok | errors | p50 ms | p95 ms | max ms | req/s | server RSS idle / peak MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    errors = ", ".join(f"{c}: {n}" for c, n in sorted(codes.items()) if c != 200) or "0"
    q = statistics.quantiles(lat, n=20) if len(lat) >= 2 else [float("nan")] * 19
    print(f"| {args.requests} | {args.clients} | {codes.get(200, 0)} | {errors} | {statistics.median(lat):.1f} | "
          f"{q[18]:.1f} | {max(lat):.1f} | {args.requests / wall:.1f} | "
          f"{rss_idle:.0f} / {rss_peak:.0f} |")
    return 0 if codes.get(200, 0) == args.requests else 1


if __name__ == "__main__":
    sys.exit(main())
