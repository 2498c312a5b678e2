"""Timing that survives a shared, small machine: the one method every vitkit benchmark and search uses.

* Candidates run in the same process, in alternating rounds whose order rotates, each sample lasting at least
  ``min_sample_s``; the figure to report is the median over samples, never the best one.
* Contention is measured, not guessed: during every sample the CPU time used by *other* processes (from
  ``/proc/stat`` minus this process' own time) is recorded; samples where others took more than
  ``max_contention`` of the machine are discarded and re-taken.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _machine_busy_ticks() -> int | None:
    try:
        with open("/proc/stat") as f:
            parts = f.readline().split()
    except OSError:
        return None
    # user nice system idle iowait irq softirq steal ...: busy = all but idle and iowait
    values = [int(v) for v in parts[1:9]]
    return sum(values) - values[3] - values[4]


def _own_ticks() -> int:
    t = os.times()  # this process (all threads) + waited-for children
    return round((t.user + t.system + t.children_user + t.children_system) * _CLK_TCK)


class ContentionMeter:
    """CPU share that other processes took while a block of code ran (0 = machine was ours, 1 = all of it).

    The tick sources and the clock can be injected, so the arithmetic is testable without a busy machine.
    """

    def __init__(self, busy_ticks: Callable[[], int | None] = _machine_busy_ticks,
                 own_ticks: Callable[[], int] = _own_ticks, clock: Callable[[], float] = time.perf_counter,
                 cpus: int | None = None) -> None:
        self.busy_ticks, self.own_ticks, self.clock = busy_ticks, own_ticks, clock
        self.available = busy_ticks() is not None
        self.cpus = cpus or os.cpu_count() or 1

    @contextlib.contextmanager
    def measure(self) -> Iterator[dict[str, float]]:
        result = {"contention": 0.0, "seconds": 0.0}
        busy0, own0, t0 = self.busy_ticks(), self.own_ticks(), self.clock()
        yield result
        elapsed = self.clock() - t0
        busy1, own1 = self.busy_ticks(), self.own_ticks()
        result["seconds"] = elapsed
        if busy0 is not None and busy1 is not None and elapsed > 0:
            others = max(0, (busy1 - busy0) - (own1 - own0))
            # ticks are 1/CLK_TCK s coarse: over a window of a few ms one tick of another process would read as
            # more than the whole machine, so the share is kept in [0, 1]
            result["contention"] = min(1.0, others / (elapsed * _CLK_TCK * self.cpus))


def wait_for_quiet(meter: ContentionMeter, max_contention: float, max_wait_s: float = 600.0,
                   window_s: float = 2.0) -> float:
    """Sleep until other processes use less than ``max_contention`` of the machine over ``window_s`` (or give up
    after ``max_wait_s``); returns the seconds waited."""
    start = time.perf_counter()
    while time.perf_counter() - start < max_wait_s:
        with meter.measure() as m:
            time.sleep(window_s)
        if m["contention"] <= max_contention:
            break
    return time.perf_counter() - start


def machine_load() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


@dataclass
class Candidate:
    """One thing to time: ``fn`` runs one batch. ``prepare`` (optional) runs before each of its samples and
    warm-ups, outside the timed region: e.g. switching a shared model to this candidate's configuration."""

    name: str
    library: str
    precision: str
    fn: Callable[[], Any]
    is_peer: bool
    compile_s: float | None = None
    note: str = ""
    samples: list[float] = field(default_factory=list)
    contention: list[float] = field(default_factory=list)  # other processes' CPU share during each kept sample
    discarded: int = 0
    prepare: Callable[[], Any] | None = None
    flops: float | None = None  # what one call computes, where the caller counts it (it may differ by candidate)

    def ready(self) -> None:
        if self.prepare is not None:
            self.prepare()


def time_alternating(cands: list[Candidate], samples: int = 5, min_sample_s: float = 0.5,
                     max_contention: float = 0.1, max_rounds: int | None = None, warmup: int = 2,
                     meter: ContentionMeter | None = None, log: Callable[[str], None] | None = None,
                     backoff_s: float = 2.0, budget_s: float | None = None) -> None:
    """Fill ``cand.samples`` (seconds per call) by timing all candidates in alternating, rotating rounds.

    Each candidate first runs ``warmup`` calls and one more timed call that sizes its samples (calls per sample so
    that one lasts ``min_sample_s``; ``min_sample_s=0``: one call per sample). Samples during which other
    processes took more than ``max_contention`` of the machine are discarded (``max_contention=1``: none are) and
    re-taken, up to ``max_rounds`` rounds; ``budget_s`` (seconds from the start, warm-up included) also ends the
    rounds, after the first. A candidate left without a clean sample keeps the median of its discarded ones (or
    one call), flagged ``noisy`` in its note. Report the median of ``cand.samples``."""
    meter = meter or ContentionMeter()
    max_rounds = max_rounds or samples * 4
    start = time.perf_counter()
    disturbed: list[list[float]] = [[] for _ in cands]
    with torch.inference_mode():
        per_call = []
        for c in cands:
            c.ready()
            for _ in range(warmup):
                c.fn()
            t0 = time.perf_counter()
            c.fn()
            per_call.append(time.perf_counter() - t0)
        reps = [max(1, math.ceil(min_sample_s / max(t, 1e-6))) for t in per_call]
        for r in range(max_rounds):
            if all(len(c.samples) >= samples for c in cands):
                break
            if budget_s is not None and r and time.perf_counter() - start > budget_s:
                break
            order = list(range(len(cands)))
            order = order[r % len(order):] + order[:r % len(order)]
            for i in order:
                c = cands[i]
                if len(c.samples) >= samples:
                    continue
                c.ready()
                with meter.measure() as m:
                    t0 = time.perf_counter()
                    for _ in range(reps[i]):
                        c.fn()
                    dt = (time.perf_counter() - t0) / reps[i]
                if m["contention"] <= max_contention:
                    c.samples.append(dt)
                    c.contention.append(m["contention"])
                else:
                    c.discarded += 1
                    disturbed[i].append(dt)
                    time.sleep(backoff_s)  # let the other job finish instead of burning rounds
        clean = [len(c.samples) for c in cands]
        for c, spoiled in zip(cands, disturbed):  # never quiet enough: an estimate, flagged as such
            if not c.samples:
                c.contention.append(math.nan)  # not measured clean: the note says so
                if spoiled:
                    c.samples.append(statistics.median(spoiled))
                else:
                    c.ready()
                    t0 = time.perf_counter()
                    c.fn()
                    c.samples.append(time.perf_counter() - t0)
                c.note = (c.note + " noisy").strip()
        if log:
            log("  " + ", ".join(f"{c.name}: {n} ok/{c.discarded} discarded" for c, n in zip(cands, clean)))


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), which every benchmark prints with its figures."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"



# ---------------------------------------------------------------------------- raw records of a benchmark run
# Every benchmark appends JSON lines to a committed results file (docs/method.md §1): a ``meta`` record (run_id,
# command, settings, machine), one record per measured cell with its raw samples and their contention, and an
# ``end`` record; ``vitkit report`` renders a run from them (``select_run_meta``: the latest finished run).


def utc_now() -> str:
    """A run id / timestamp: ISO-8601 UTC to the second."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def append_jsonl(path: str | os.PathLike[str], records: list[dict[str, Any]]) -> None:
    """Append ``records`` to the JSON-lines file ``path`` (folders made), one strict-JSON line each (no NaN)."""
    from pathlib import Path

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.writelines(json.dumps(r, allow_nan=False) + "\n" for r in records)


def end_record(run_id: str, started: float) -> dict[str, Any]:
    """The record that closes a run (``started``: its ``time.perf_counter()``): only a run with one counts as
    finished (``report.select_run_meta``)."""
    return {"kind": "end", "run_id": run_id, "seconds": round(time.perf_counter() - started, 1),
            "load_after": machine_load(), "finished_at": utc_now()}


def machine_record() -> dict[str, Any]:
    """What a timing depends on: CPU and its flags, cores, threads, bf16/AMX support, torch and Python."""
    from ..utils import amx_supported, cpu_flags, native_bf16_supported

    flags = cpu_flags()
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "cpu_flags": " ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
                                  if f in flags),
            "native_bf16": native_bf16_supported(), "amx": amx_supported(), "torch": torch.__version__,
            "python": platform.python_version()}


def candidate_record(c: Candidate, **fields: Any) -> dict[str, Any]:
    """One timed candidate's raw figures: every kept sample (ms per call) with its contention, and the discards."""
    return {**fields, "name": c.name, "library": c.library, "precision": c.precision,
            "samples_ms": [s * 1e3 for s in c.samples],
            "contention": [None if math.isnan(x) else x for x in c.contention], "discarded": c.discarded,
            "note": c.note.strip()}
