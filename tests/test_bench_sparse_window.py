"""benchmarks/bench_sparse_window.py: the latency records of the sparse window study and the doc's table from them
(stand-in scenes; no timing is asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from vitkit.tools.report import load_script

ROOT = Path(__file__).resolve().parents[1]


def test_records_count_the_padding_and_the_table_takes_ratios_within_one_invocation(tmp_path, monkeypatch):
    bench = load_script(ROOT / "benchmarks" / "bench_sparse_window.py")
    x = torch.full((2, 1, 112, 112), -1.0)
    x[0, :, 0:28, 0:28] = 1.0  # one item in the corner window, one in the middle
    x[1, :, 40:68, 44:72] = 0.5
    monkeypatch.setattr(bench, "load_scenes", lambda batch: x[:batch])
    results = tmp_path / "r.jsonl"
    argv = ["--batch", "2", "--keep", "0.3", "--repeats", "1", "--min-sample-seconds", "0", "--max-contention", "1",
            "--threads", "1", "--results", str(results)]
    assert bench.main(argv) == 0
    records = {r["variant"]: r for r in map(json.loads, results.read_text().splitlines())}
    assert set(records) == {"dense", "equal_30", "window_30"}
    dense, equal, window = records["dense"], records["equal_30"], records["window_30"]
    assert dense["tokens"][0] == 2 * 28 * 28 and equal["tokens"] == window["tokens"]
    assert equal["tokens"][0] == 2 * round(0.3 * 28 * 28)
    # equal-size groups fill their slots but one group per image; padded windows leave slots empty
    assert equal["slots"][0] < window["slots"][0] and equal["slots"][0] - equal["tokens"][0] < 2 * 49
    assert all(r["machine"]["cores"] and r["invocation"] == dense["invocation"] for r in records.values())
    table = bench.render_latency(tmp_path, results="r.jsonl")
    row = next(line for line in table.splitlines() if line.startswith("| equal_30"))
    ratio = window["ms"] / equal["ms"]
    assert f"| {ratio:.2f} |" in row and f"| {equal['tokens'][0]:,} | {equal['slots'][0]:,} |" in row
    assert "batch 2 test scenes" in table
