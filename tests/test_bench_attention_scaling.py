"""benchmarks/bench_attention_scaling.py: raw records appended per run, every table rebuilt from them alone."""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

import numpy as np
import pytest

from vitkit.errors import ConfigError
from vitkit.tools import report
from vitkit.tools.report import load_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_attention_scaling.py"


@pytest.fixture(scope="module")
def bench():
    return load_script(SCRIPT)


def _meta(run_id: str, quick: bool = False, max_contention: float = 0.1) -> dict:
    return {"kind": "meta", "run_id": run_id,
            "machine": {"cpu": "Test CPU", "cpu_flags": "avx2", "cores": 2, "threads": 2, "torch": "x",
                        "python": "3", "native_bf16": False, "amx": False},
            "settings": {"window_impl": "fallback", "dim": 384, "heads": 6, "window": 7, "group": 49, "keep": 0.5,
                         "grids": [14, 20, 28, 40], "precisions": ["fp32", "bf16"], "methods": ["global", "window"],
                         "samples": 3, "slow_samples": 2, "slow_call_s": 1.0, "passes": 2, "min_sample_s": 0.3,
                         "max_contention": max_contention, "max_wait_s": 30.0, "quick": quick},
            "command": "python benchmarks/bench_attention_scaling.py", "load_before": 0.1}


def _cell(run_id: str, pas: int, precision: str, side: int, method: str, samples: list[float],
          contention: list[float | None] | None = None, note: str = "") -> dict:
    return {"kind": "cell", "run_id": run_id, "pass": pas, "method": method, "precision": precision, "side": side,
            "tokens": side * side, "kept": side * side, "flops": (side * side) ** (2 if method == "global" else 1),
            "samples_ms": samples, "contention": contention if contention is not None else [0.0] * len(samples),
            "discarded": 0, "note": note, "layout_ms": 0.2, "cell_contention": 0.05, "waited_s": 1.0,
            "slow": False}


# latency laws: pass 1 has three samples, pass 2 two slower ones; the median of all five is pass 1's largest
LAW = {"global": lambda n: 1e-4 * n ** 1.8 + 0.01 * n, "window": lambda n: 0.003 * n}
PASS1 = (1.0, 1.2, 1.5)
PASS2 = (2.0, 2.5)
GRIDS = (14, 20, 28, 40)


def _hand_records(run_id: str = "R1") -> list[dict]:
    records = [_meta(run_id)]
    for precision, speed in (("fp32", 1.0), ("bf16", 0.6)):
        for side in GRIDS:
            for method, law in LAW.items():
                base = law(side * side) * speed
                c1, c2, note = None, None, ""
                if (precision, side, method) == ("fp32", 20, "global"):
                    c1 = [0.5, 0.6, 0.0]  # kept, but contended: the cell's median contention is 0.5
                    c2 = [0.4, 0.0]
                if (precision, side, method) == ("bf16", 28, "window"):
                    c2, note = [None], "noisy"  # pass 2 never got a clean sample: one stand-in
                records.append(_cell(run_id, 1, precision, side, method, [base * f for f in PASS1], c1))
                records.append(_cell(run_id, 2, precision, side, method,
                                     [base * PASS2[0]] if note else [base * f for f in PASS2], c2, note))
    return records + [{"kind": "end", "run_id": run_id, "seconds": 60.0, "load_after": 0.2, "finished_at": "x"}]


def _write(path: Path, records: list[dict]) -> None:
    with open(path, "a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def _table_rows(text: str) -> dict[tuple[str, str], list[str]]:
    """(first cell, second cell) -> cells of every table row in ``text``."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[(cells[0], cells[1])] = cells
    return rows


def test_median_of_all_samples_and_every_fit_from_records(bench, tmp_path):
    _write(tmp_path / "r.jsonl", _hand_records())
    table = bench.render_scaling(tmp_path, results="r.jsonl", part="table")
    fits = bench.render_scaling(tmp_path, results="r.jsonl", part="fits")
    summary = bench.render_scaling(tmp_path, results="r.jsonl", part="summary")

    def median_all(precision, side, method):
        speed = 1.0 if precision == "fp32" else 0.6
        base = LAW[method](side * side) * speed
        pass2 = PASS2[:1] if (precision, side, method) == ("bf16", 28, "window") else PASS2
        return statistics.median([base * f for f in (*PASS1, *pass2)])

    header = next(cells for key, cells in _table_rows(table).items() if key == ("grid", "tokens"))
    by_key = {}  # (precision, grid) -> {column: cell}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == len(header) and cells[2] in ("fp32", "bf16"):
            by_key[(cells[2], cells[0])] = dict(zip(header, cells))
    for precision in ("fp32", "bf16"):
        for side in GRIDS:
            for method in LAW:
                shown = float(by_key[(precision, f"{side}×{side}")][f"{method} ms"].rstrip("*†"))
                assert shown == pytest.approx(median_all(precision, side, method), abs=0.006), (precision, method)
    base = LAW["global"](40 * 40)
    assert statistics.median(PASS1) * base < 0.9 * median_all("fp32", 40, "global")  # not the faster pass
    # marks: contended (median contention 0.4 > 0.1) and noisy cells
    assert by_key[("fp32", "20×20")]["global ms"].endswith("*")
    assert "†" in by_key[("bf16", "28×28")]["window ms"]
    assert not by_key[("fp32", "14×14")]["global ms"].endswith(("*", "†"))
    assert by_key[("fp32", "14×14")]["samples kept / discarded"] == "10 / 0"

    # every fit: latency and FLOPs, all grids and upper half, per precision, equal to a least-squares fit by hand
    assert "upper half: 28², 40²" in fits
    fit_rows = _table_rows(fits)
    tokens = [s * s for s in GRIDS]
    for precision in ("fp32", "bf16"):
        for method in LAW:
            cells = fit_rows[(method, precision)]
            ms = [median_all(precision, s, method) for s in GRIDS]
            exp_all = np.polyfit(np.log(tokens), np.log(ms), 1)[0]
            exp_up = np.polyfit(np.log(tokens[2:]), np.log(ms[2:]), 1)[0]
            flop = 2.0 if method == "global" else 1.0
            assert cells[2:6] == [f"{exp_all:.2f}", f"{exp_up:.2f}", f"{flop:.2f}", f"{flop:.2f}"]
            assert len(cells[6].split(", ")) == 2  # each pass alone: extra information
    assert fit_rows[("global", "fp32")][2] != fit_rows[("global", "fp32")][3]  # the upper half is its own fit

    # the summary: fp32 and bf16 exponents (all / upper), ms at the largest grid
    srows = _table_rows(summary)
    head = srows[("method", "exponent fp32 (all grids)")]
    assert head == ["method", "exponent fp32 (all grids)", "exponent fp32 (upper half)", "exponent bf16 (all grids)",
                    "exponent bf16 (upper half)", "40×40 fp32 ms", "40×40 bf16 ms"]
    window = next(cells for key, cells in srows.items() if key[0].startswith("window"))
    assert window[1:5] == [fit_rows[("window", "fp32")][2], fit_rows[("window", "fp32")][3],
                           fit_rows[("window", "bf16")][2], fit_rows[("window", "bf16")][3]]
    assert float(window[5]) == pytest.approx(median_all("fp32", 40, "window"), abs=0.006)


def test_latest_is_the_last_finished_full_run(bench, tmp_path):
    path = tmp_path / "r.jsonl"
    _write(path, _hand_records("A"))
    quick = [r | {"run_id": "B"} for r in _hand_records("B")]
    quick[0]["settings"] = quick[0]["settings"] | {"quick": True}
    _write(path, quick)
    _write(path, [r for r in _hand_records("C") if r["kind"] != "end"])  # interrupted
    assert "Run A:" in bench.render_scaling(tmp_path, results="r.jsonl", part="table")
    assert "Run C:" in bench.render_scaling(tmp_path, results="r.jsonl", part="table", run="C")
    assert "did not finish" in bench.render_scaling(tmp_path, results="r.jsonl", part="table", run="C")
    with pytest.raises(ConfigError, match="no run 'D'"):
        bench.render_scaling(tmp_path, results="r.jsonl", run="D")
    with pytest.raises(ConfigError, match="part="):
        bench.render_scaling(tmp_path, results="r.jsonl", part="other")
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in quick))
    with pytest.raises(ConfigError, match="no finished full run"):
        bench.render_scaling(tmp_path, results="q.jsonl")


def test_report_block_and_plot(tmp_path):
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "benchmarks").mkdir()
    shutil.copy(SCRIPT, tmp_path / "benchmarks" / SCRIPT.name)
    (tmp_path / "docs").mkdir()
    _write(tmp_path / "benchmarks" / "r.jsonl", _hand_records())
    doc = tmp_path / "docs" / "window.md"
    head = "<!-- report: script script=benchmarks/bench_attention_scaling.py function=render_scaling " \
           "results=../benchmarks/r.jsonl part=summary image=../benchmarks/scaling.png -->"
    doc.write_text(f"# Window\n\n{head}\nstale\n<!-- /report -->\n")
    assert report.report([doc], check=True)  # stale block: differs, nothing written
    assert not (tmp_path / "benchmarks" / "scaling.png").exists()
    report.report([doc])
    text = doc.read_text()
    assert "| window (Swin, M = 7) |" in text and "![attention scaling](../benchmarks/scaling.png)" in text
    assert (tmp_path / "benchmarks" / "scaling.png").stat().st_size > 0
    assert report.report([doc], check=True) == []


def test_tiny_run_appends_records(bench, tmp_path):
    path = tmp_path / "out" / "scaling.jsonl"
    path.parent.mkdir()
    _write(path, _hand_records("older"))
    before = path.read_text()
    assert bench.main(["--grids", "4", "6", "8", "--precisions", "fp32", "--methods", "global", "window", "sparse",
                       "--dim", "32", "--heads", "2", "--samples", "2", "--passes", "2", "--min-sample-seconds",
                       "0.001", "--max-contention", "1", "--max-wait", "0", "--results", str(path),
                       "--plot", ""]) == 0
    text = path.read_text()
    assert text.startswith(before)  # appended
    records = [json.loads(line) for line in text[len(before):].splitlines()]
    meta, cells, end = records[0], records[1:-1], records[-1]
    assert meta["kind"] == "meta" and end == end | {"kind": "end", "run_id": meta["run_id"]}
    assert {"cpu", "cpu_flags", "cores", "threads", "torch", "python", "native_bf16"} <= set(meta["machine"])
    assert meta["settings"]["max_contention"] == 1.0 and "--grids 4 6 8" in meta["command"]
    assert len(cells) == 2 * 3 * 3
    for c in cells:
        assert c["kind"] == "cell" and c["run_id"] == meta["run_id"]
        assert len(c["samples_ms"]) == len(c["contention"]) == 2
        assert {"discarded", "note", "flops", "kept", "layout_ms", "cell_contention", "waited_s"} <= set(c)
    assert {c["pass"] for c in cells} == {1, 2}
    assert next(c for c in cells if c["method"] == "sparse" and c["side"] == 8)["kept"] == 32
    fits = bench.render_scaling(tmp_path, results="out/scaling.jsonl", part="fits")
    assert "upper half: 6², 8²" in fits
    assert all(f"| {m} | fp32 |" in fits for m in ("global", "window", "sparse"))
    summary = bench.render_scaling(tmp_path, results="out/scaling.jsonl", part="summary")
    assert "8×8 fp32 ms" in summary and meta["run_id"] in summary
