"""benchmarks/bench_export.py and bench_serve.py: raw records appended per run, their tables rebuilt from them alone.

Each script runs once on the tiniest settings into a temporary results file; the rendered figures are checked
against medians and percentiles recomputed here from the records (hand-made records cover the marks)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from _tiny import save_tiny_classifier_run
from vitkit.errors import ConfigError
from vitkit.tools.ablate import read_results
from vitkit.tools.report import load_script

ROOT = Path(__file__).resolve().parents[1]


def _rows(table: str) -> list[list[str]]:
    """The cells of every body row of a Markdown table (header and separator left out)."""
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip()[2:-2].split(" | ")] for line in lines[1:]]


def _write(path: Path, records: list[dict]) -> None:
    with open(path, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def _check_run_shape(records: list[dict], kind: str) -> list[dict]:
    """meta first, end last, one run_id throughout; the ``kind`` records of that run."""
    assert records[0]["kind"] == "meta" and records[-1]["kind"] == "end"
    run_id = records[0]["run_id"]
    assert {r["run_id"] for r in records} == {run_id}
    assert records[0]["command"].startswith("python benchmarks/") and records[0]["machine"]["cores"] >= 1
    return [r for r in records if r["kind"] == kind]


# ---------------------------------------------------------------------------- bench_export
@pytest.fixture(scope="module")
def export_bench():
    return load_script(ROOT / "benchmarks" / "bench_export.py")


def test_export_run_records_and_table_from_them(export_bench, tmp_path, capsys):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    results = tmp_path / "results" / "export.jsonl"
    assert export_bench.main(["--model", "vit_fmnist_tiny", "--batches", "1", "2", "--repeats", "2",
                              "--min-sample-seconds", "0.01", "--max-contention", "1.0", "--threads", "1",
                              "--results", str(results)]) == 0
    records = read_results(results)
    cells = _check_run_shape(records, "cell")
    meta = records[0]
    assert meta["settings"]["repeats"] == 2 and meta["machine"]["onnxruntime"] == ort.__version__
    assert [r["model"] for r in records if r["kind"] == "export"] == ["vit_fmnist_tiny"]
    assert [(r["batch"], r["name"]) for r in cells] == [(b, n) for b in (1, 2) for n in export_bench.RUNTIMES]
    for r in cells:
        assert len(r["samples_ms"]) == len(r["contention"]) == 2 and all(v > 0 for v in r["samples_ms"])
        assert all(c is None or 0 <= c <= 1 for c in r["contention"]) and r["discarded"] == 0
        assert r["input_shape"] == [r["batch"], 1, 28, 28]
        assert r["max_abs_diff"] == 0.0 if r["name"] == "eager" else r["max_abs_diff"] < 1e-4

    table = export_bench.render_export(tmp_path, plots=False, results="results/export.jsonl")
    assert table == export_bench.render_export(tmp_path, results="results/export.jsonl", run=meta["run_id"])
    rows = _rows(table)
    assert len(rows) == len(cells) and all(len(row) == 10 for row in rows)
    eager = {r["batch"]: statistics.median(r["samples_ms"]) for r in cells if r["name"] == "eager"}
    for row, r in zip(rows, cells):
        ms = statistics.median(r["samples_ms"])
        assert row[:4] == ["vit_fmnist_tiny", "1x28x28", str(r["batch"]), r["name"]]
        assert row[4:9] == [f"{ms:.2f}", f"{1e3 * r['batch'] / ms:.1f}", f"{eager[r['batch']] / ms:.2f}",
                            f"{r['max_abs_diff']:.1e}", "2/0"]
    machine = export_bench.render_export(tmp_path, results="results/export.jsonl", part="machine")
    assert f"onnxruntime {ort.__version__}" in machine and "median of 2 kept samples" in machine
    assert meta["command"] in machine
    assert "vit_fmnist_tiny" in capsys.readouterr().out  # main prints the table it rendered


def _export_meta(run_id: str) -> dict:
    return {"kind": "meta", "run_id": run_id, "command": "python benchmarks/bench_export.py",
            "machine": {"cpu": "Test CPU", "cores": 2, "threads": 2, "cpu_flags": "avx2", "amx": False,
                        "torch": "t", "python": "3", "onnxruntime": "o"},
            "settings": {"model": ["m"], "batches": [4], "threads": 2, "repeats": 3, "min_sample_seconds": 0.5,
                         "max_contention": 0.1, "max_wait": 1.0, "quick": False}, "load_before": 0.5}


def _export_cell(run_id: str, name: str, samples: list[float], contention: list, note: str = "") -> dict:
    return {"kind": "cell", "run_id": run_id, "model": "m", "batch": 4, "input_shape": [4, 3, 8, 8], "name": name,
            "library": "x", "precision": "fp32", "samples_ms": samples, "contention": contention,
            "discarded": 1, "note": note, "max_abs_diff": 0.0, "waited_s": 0.0}


def test_export_table_marks_and_run_selection(export_bench, tmp_path):
    finished = [_export_meta("R1"),
                _export_cell("R1", "eager", [10.0, 10.2, 10.1], [0.0, 0.01, 0.02]),
                _export_cell("R1", "prepared", [5.0, 9.0, 6.0], [0.3, 0.2, 0.25]),  # contended, wide spread
                _export_cell("R1", "onnxruntime", [8.0], [None], note="noisy"),
                {"kind": "end", "run_id": "R1", "seconds": 1.0, "load_after": 0.7, "finished_at": "x"}]
    unfinished = [_export_meta("R2"), _export_cell("R2", "eager", [99.0], [0.0])]  # no end record: not latest
    _write(tmp_path / "export.jsonl", finished + unfinished)
    table = export_bench.render_export(tmp_path, results="export.jsonl")
    rows = {row[3]: row for row in _rows(table)}
    assert rows["eager"][4] == f"{statistics.median([10.0, 10.2, 10.1]):.2f}" and rows["eager"][9] == ""
    prepared = statistics.median([5.0, 9.0, 6.0])
    assert rows["prepared"][6] == f"{statistics.median([10.0, 10.2, 10.1]) / prepared:.2f}"
    assert rows["prepared"][9] == f"contended 25%; spread {100 * 4.0 / prepared:.0f}%"
    assert rows["onnxruntime"][9] == "noisy" and rows["onnxruntime"][8] == "1/1"
    assert "0.50 before, 0.70 after" in export_bench.render_export(tmp_path, results="export.jsonl",
                                                                     part="machine")
    with pytest.raises(ConfigError, match="part="):
        export_bench.render_export(tmp_path, results="export.jsonl", part="cells")
    with pytest.raises(ConfigError, match="not found"):
        export_bench.render_export(tmp_path, results="missing.jsonl")


# ---------------------------------------------------------------------------- bench_serve
@pytest.fixture(scope="module")
def serve_bench():
    return load_script(ROOT / "benchmarks" / "bench_serve.py")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny run folder as training leaves it (see tests/test_serve.py)."""
    run = tmp_path_factory.mktemp("run")
    save_tiny_classifier_run(run)
    (run / "config.yaml").write_text("data:\n  name: fashion_mnist\n")
    return run


def _p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20, method="inclusive")[18]


def test_serve_run_records_and_table_from_them(serve_bench, run_dir, tmp_path):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    results = tmp_path / "results" / "serve_load.jsonl"
    assert serve_bench.main([str(run_dir), "--requests", "6", "--clients", "3", "--results", str(results)]) == 0
    records = read_results(results)
    loads = _check_run_shape(records, "load")
    assert records[0]["settings"]["run"] == str(run_dir) and records[0]["settings"]["explain"] == ["rollout", "none"]
    assert [r["explain"] for r in loads] == ["rollout", "none"]  # one run holds both rows
    for r in loads:
        assert len(r["latency_ms"]) == len(r["status"]) == 6 and set(r["status"]) == {200}
        assert all(ms > 0 for ms in r["latency_ms"]) and r["wall_s"] > 0 and r["warmup_status"] == 200
        if Path("/proc/self/status").is_file():
            assert 0 < r["rss_idle_mb"] <= r["rss_peak_mb"]

    table = serve_bench.render_serve_load(tmp_path, plots=False, results="results/serve_load.jsonl")
    rows = _rows(table)
    assert len(rows) == 2
    for row, r in zip(rows, loads):
        lat = r["latency_ms"]
        assert row == [r["explain"], "6", "3", "6", "0", f"{statistics.median(lat):.1f}", f"{_p95(lat):.1f}",
                       f"{max(lat):.1f}", f"{6 / r['wall_s']:.1f}",
                       f"{r['rss_idle_mb']:.0f} / {r['rss_peak_mb']:.0f}"]
    machine = serve_bench.render_serve_load(tmp_path, results="results/serve_load.jsonl", part="machine")
    assert str(run_dir) in machine and "6 requests" in machine and records[0]["command"] in machine


def test_serve_table_counts_errors_apart(serve_bench, tmp_path):
    meta = {"kind": "meta", "run_id": "S1", "command": "python benchmarks/bench_serve.py RUN",
            "machine": {"cpu": "Test CPU", "cores": 2, "threads": 2, "cpu_flags": "avx2", "amx": False,
                        "torch": "t", "python": "3"},
            "settings": {"run": "RUN", "requests": 8, "clients": 4, "explain": ["none"], "images": "random",
                         "host": "127.0.0.1"}}
    latency = [10.0, 12.0, 5000.0, 11.0, 14.0, 9000.0, 13.0, 1.0]
    status = [200, 200, 503, 200, 200, 503, 200, -1]  # the slow 503s and the failed call are not latencies
    load = {"kind": "load", "run_id": "S1", "explain": "none", "requests": 8, "clients": 4, "latency_ms": latency,
            "status": status, "warmup_ms": 20.0, "warmup_status": 200, "wall_s": 0.5, "rss_idle_mb": None,
            "rss_peak_mb": None}
    _write(tmp_path / "serve.jsonl", [meta, load, {"kind": "end", "run_id": "S1", "seconds": 1.0}])
    (row,) = _rows(serve_bench.render_serve_load(tmp_path, results="serve.jsonl"))
    ok = [ms for ms, code in zip(latency, status) if code == 200]
    assert row == ["none", "8", "4", str(len(ok)), "-1: 1, 503: 2", f"{statistics.median(ok):.1f}",
                   f"{_p95(ok):.1f}", f"{max(ok):.1f}", f"{8 / 0.5:.1f}", "n/a / n/a"]
    # a run without its end record is never the latest
    lines = (tmp_path / "serve.jsonl").read_text().splitlines()
    (tmp_path / "unfinished.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(ConfigError, match="no finished"):
        serve_bench.render_serve_load(tmp_path, results="unfinished.jsonl")
