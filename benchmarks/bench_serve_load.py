"""Overload test of ``vitkit serve`` on 127.0.0.1: a burst of N concurrent clients, with optional slow connections.

Starts ``vitkit serve RUN`` in a subprocess on a free local port (nothing else is ever contacted), waits for
``/health``, then N client threads, released together, POST one image each to ``/predict`` (``--requests`` in
all). Meanwhile one thread times ``GET /health`` every 100 ms, one samples the server's RSS every 50 ms, and with
``--slow K`` K more connections send half a request header and stall (slowloris). Prints the answers by status
(200, 503 with and without ``Retry-After``, others, connection errors), p50/p95/max latency overall and per
status, ``/health`` latency under load, the server's idle and peak RSS (VmRSS / VmHWM from /proc, Linux), and how
many slow connections the server closed. Exit code 0 when every answer is 200 or 503 with ``Retry-After`` and
``/health`` always answered, else 1.

    python benchmarks/bench_serve_load.py RUN [--clients 500] [--requests N] [--image small|big]
        [--explain rollout|none] [--slow 0] [--serve-args="--max-pending 64 --request-timeout 30"]

``--image big`` uploads a small PNG that decodes to 6300x6300 RGB (39.7 MP, under the 40-MP limit): the decode
memory budget is what bounds the server's memory then. ``benchmarks/bench_serve.py`` is the throughput study
(requests below the admission limit).
"""

from __future__ import annotations

import argparse
import io
import os
import selectors
import shlex
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import _free_port, _rss_peak_mb, wait_until_up  # noqa: E402

from vitkit.tools.timing import cpu_name  # noqa: E402


def _rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _image(kind: str) -> bytes:
    buf = io.BytesIO()
    if kind == "big":  # compresses to ~130 KB, decodes to 6300 x 6300 x 3
        Image.new("RGB", (6300, 6300), (120, 30, 200)).save(buf, format="PNG")
    else:
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _quantiles(values: list[float]) -> str:
    if not values:
        return "- / - / -"
    values = sorted(values)
    p95 = values[min(len(values) - 1, int(round(0.95 * (len(values) - 1))))]
    return f"{statistics.median(values):.0f} / {p95:.0f} / {values[-1]:.0f}"


def _slow_connections(port: int, n: int) -> list[socket.socket]:
    out = []
    for _ in range(n):
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le")  # and never more
            s.setblocking(False)
            out.append(s)
        except OSError:
            break
    return out


def _wait_closed(sockets: list[socket.socket], opened: float, limit: float) -> list[float]:
    """Seconds after ``opened`` at which the server closed each slow connection (within ``limit``)."""
    sel = selectors.DefaultSelector()
    for s in sockets:
        sel.register(s, selectors.EVENT_READ)
    closed = []
    while sel.get_map() and time.perf_counter() - opened < limit:
        for key, _ in sel.select(timeout=0.2):
            try:
                data = key.fileobj.recv(4096)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if not data:
                closed.append(time.perf_counter() - opened)
                sel.unregister(key.fileobj)
    for s in sockets:
        s.close()
    return closed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="a run folder or checkpoint folder")
    p.add_argument("--clients", type=int, default=500, help="concurrent clients, released together (default 500)")
    p.add_argument("--requests", type=int, default=None, help="requests in all (default: one per client)")
    p.add_argument("--image", choices=["small", "big"], default="small")
    p.add_argument("--explain", default="rollout", choices=["rollout", "last", "grad", "none"])
    p.add_argument("--slow", type=int, default=0, help="slow-header connections held open during the load")
    p.add_argument("--serve-args", default="",
                   help="more flags for vitkit serve, e.g. --serve-args=\"--max-pending 16\"")
    p.add_argument("--client-timeout", type=float, default=120.0)
    args = p.parse_args(argv)
    n_requests = args.requests or args.clients

    port = _free_port()
    cmd = [sys.executable, "-m", "vitkit.cli", "serve", args.run, "--host", "127.0.0.1", "--port", str(port),
           "--explain", args.explain, *shlex.split(args.serve_args)]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    image = _image(args.image)
    rss_samples: list[float] = []
    health: list[tuple[int, float]] = []
    stop = threading.Event()
    try:
        wait_until_up(server, base)
        with httpx.Client(timeout=30) as warm:  # the first forward
            warm.post(base + "/predict", files={"file": ("w.png", _image("small"), "image/png")})
        rss_idle = _rss_peak_mb(server.pid)

        def sample_rss() -> None:
            while not stop.is_set():
                value = _rss_mb(server.pid)
                if value is not None:
                    rss_samples.append(value)
                stop.wait(0.05)

        def probe_health() -> None:
            with httpx.Client(timeout=30) as c:
                while not stop.is_set():
                    t = time.perf_counter()
                    try:
                        code = c.get(base + "/health").status_code
                    except httpx.HTTPError:
                        code = -1
                    health.append((code, 1000 * (time.perf_counter() - t)))
                    stop.wait(0.1)

        watchers = [threading.Thread(target=sample_rss, daemon=True), threading.Thread(target=probe_health,
                                                                                       daemon=True)]
        for t in watchers:
            t.start()
        slow = _slow_connections(port, args.slow)
        slow_opened = time.perf_counter()

        client = httpx.Client(timeout=args.client_timeout,
                              limits=httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients))
        barrier = threading.Barrier(min(args.clients, n_requests))

        def call(i: int) -> tuple[int, bool, float]:
            if i < barrier.parties:
                barrier.wait()
            t = time.perf_counter()
            try:
                r = client.post(base + "/predict", files={"file": (f"{i}.png", image, "image/png")})
                code, retry = r.status_code, "retry-after" in r.headers
            except httpx.HTTPError:
                code, retry = -1, False
            return code, retry, 1000 * (time.perf_counter() - t)

        start = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            results = list(pool.map(call, range(n_requests)))
        wall = time.perf_counter() - start
        closed = _wait_closed(slow, slow_opened, limit=90) if slow else []
        stop.set()
        for t in watchers:
            t.join(5)
        client.close()
        rss_peak = _rss_peak_mb(server.pid)
    finally:
        stop.set()
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()

    codes = Counter(code for code, _, _ in results)
    shed = sum(1 for code, retry, _ in results if code == 503 and retry)
    cpu = cpu_name()
    flags = f" {args.serve_args}" if args.serve_args else ""
    print(f"machine: {cpu}, {os.cpu_count()} cores; server `vitkit serve {args.run} --explain {args.explain}{flags}`")
    print(f"{n_requests} requests from {args.clients} concurrent clients released together, image {args.image} "
          f"({len(image):,} bytes), {args.slow} slow-header connections; 127.0.0.1\n")
    others = ", ".join(f"{c}: {n}" for c, n in sorted(codes.items()) if c not in (200, 503)) or "0"
    print("| clients | 200 | 503 (Retry-After) | other | p50 / p95 / max ms (all) | 200 ms | 503 ms | "
          "/health p50 / max ms | server RSS idle / peak MB | wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    health_ms = [ms for code, ms in health if code == 200]
    health_bad = sum(1 for code, _ in health if code != 200)
    print(f"| {args.clients} | {codes.get(200, 0)} | {codes.get(503, 0)} ({shed}) | {others} | "
          f"{_quantiles([ms for _, _, ms in results])} | {_quantiles([ms for c, _, ms in results if c == 200])} | "
          f"{_quantiles([ms for c, _, ms in results if c == 503])} | "
          f"{statistics.median(health_ms) if health_ms else float('nan'):.0f} / "
          f"{max(health_ms) if health_ms else float('nan'):.0f}"
          f"{f' ({health_bad} failed)' if health_bad else ''} | "
          f"{rss_idle:.0f} / {max([rss_peak or 0.0, *rss_samples]):.0f} | {wall:.1f} |")
    if args.slow:
        print(f"\nslow-header connections: {len(slow)} opened, {len(closed)} closed by the server"
              + (f", the last after {max(closed):.1f} s" if closed else ""))
    ok = all(code == 200 or (code == 503 and retry) for code, retry, _ in results) and health_bad == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
