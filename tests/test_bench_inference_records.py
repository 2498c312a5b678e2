"""`vitkit bench --results`: the raw records of a run, and the tables rebuilt from them alone."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from vitkit.tools import bench
from vitkit.tools.report import load_script

pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny_run(tmp_path, monkeypatch):
    monkeypatch.setitem(bench.MODEL_SPECS, "tiny", dict(label="tiny", embed_dim=32, depth=1, num_heads=2, mlp_dim=64,
                                                       patch_size=16, img_size=32, num_classes=10))
    cfg = bench.BenchConfig(models=["tiny"], batches=[2], precisions=["fp32"], samples=2, min_sample_s=0.01,
                            max_contention=1.0, compile=False, int8=False, plain=False, timm=False, rss=False,
                            accuracy=False, kernels=False, warmup=1, max_rounds=4, max_wait_s=0.0, quiet_window_s=0.0,
                            peak_squares=[], peak_samples=2, peak_min_sample_s=0.01, peak_budget_s=2.0)
    results = tmp_path / "results" / "inference.jsonl"
    returned = bench.run_benchmark(cfg, log=lambda s: None, results=str(results), command="vitkit bench --test")
    return results, returned


def test_records_hold_every_sample_and_rebuild_the_tables(tiny_run):
    results, returned = tiny_run
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert records[0]["kind"] == "meta" and records[-1]["kind"] == "end"
    assert records[0]["machine"]["cpu"] and records[0]["settings"]["samples"] == 2
    rows = [r for r in records if r["kind"] == "row"]
    assert {r["candidate"] for r in rows} == {"vitkit", "hf-sdpa", "hf-eager"}
    for r in rows:
        assert len(r["samples_ms"]) >= 2 and all(v > 0 for v in r["samples_ms"])
        assert len(r["contention"]) == len(r["samples_ms"])
    rebuilt = bench.result_from_records(records)
    med = {r["candidate"]: statistics.median(r["samples_ms"]) for r in rows}
    for r in rebuilt["rows"]:
        assert r["img_s"] == pytest.approx(2e3 / med[r["candidate"]])
    assert [r["img_s"] for r in rebuilt["rows"]] == pytest.approx([r["img_s"] for r in returned["rows"]])
    summary = bench.format_summary(rebuilt)
    peer = max(2e3 / med[k] for k in ("hf-sdpa", "hf-eager"))
    line = next(x for x in summary.splitlines() if x.startswith("| tiny |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert float(cells[3]) == pytest.approx(peer, abs=0.05)
    assert float(cells[5].strip("*")) == pytest.approx(2e3 / med["vitkit"] / peer, abs=0.005)
    assert cells[6] == "-"  # no compiled candidate in this run


def test_render_inference_reads_the_results_file(tiny_run, tmp_path):
    results, _ = tiny_run
    module = load_script(ROOT / "benchmarks" / "bench_inference.py")
    summary = module.render_inference(tmp_path, results="results/inference.jsonl")
    assert "| tiny | 2 | fp32 |" in summary and "threads" in summary
    full = module.render_inference(tmp_path, results="results/inference.jsonl", part="full")
    assert "transformers sdpa" in full
    # an unfinished run (no end record) is not "latest"
    lines = results.read_text().splitlines()
    results.write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(Exception, match="no finished full run"):
        module.render_inference(tmp_path, results="results/inference.jsonl")
