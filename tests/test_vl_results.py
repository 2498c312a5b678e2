"""docs/vision_language.md's results file and benchmarks/vl_study.py's records, chance levels and renderers."""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

import pytest

from vitkit.tools.report import load_script

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "vision_language" / "results.jsonl"


@pytest.fixture(scope="module")
def vl_study():
    path = ROOT / "benchmarks" / "vl_study.py"
    module = load_script(path)
    return module


def _records() -> list[dict]:
    return [json.loads(line) for line in RESULTS.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_results_file_holds_one_record_per_run_and_a_chance_record():
    records = _records()
    runs = [r for r in records if r["kind"] == "run"]
    assert len({(r["family"], r["variant"], r["run"]) for r in runs}) == len(runs), "a run is recorded twice"
    assert {(r["family"], r["variant"]) for r in runs} >= {("clip", "clip"), ("vilt", "wpa"), ("vilt", "no-wpa")}
    for r in runs:
        assert r["seed"] == int(r["run"].rsplit("_s", 1)[1]), r["run"]
        assert r["metrics"] and all(isinstance(v, (int, float)) for v in r["metrics"].values())
        assert r["source"] and "machine" in r
    assert sum(r["kind"] == "chance" for r in records) >= 1


def test_t2i_chance_by_hand(vl_study):
    captions = ["a", "a", "b"]  # m = 2, 2, 1 of N = 3
    assert vl_study.t2i_chance(captions, 1) == Fraction(2 + 2 + 1, 9)
    assert vl_study.t2i_chance(captions, 2) == (1 + 1 + Fraction(2, 3)) / 3
    assert vl_study.t2i_chance(["x"] * 4, 1) == 1


def test_chance_record_is_what_the_test_canvases_give(vl_study):
    from vitkit.data.fashion_mnist import find_dir

    if find_dir(None, "test") is None:
        pytest.skip("Fashion-MNIST is not on this machine")
    chance = [r for r in _records() if r["kind"] == "chance"][-1]
    fresh = vl_study.chance_levels(ROOT / chance["recipes"]["clip"], ROOT / chance["recipes"]["vilt"])
    for family in ("clip", "vilt"):
        assert fresh[family].keys() == chance[family].keys()
        for key, value in fresh[family].items():
            assert math.isclose(value, chance[family][key], rel_tol=1e-12), (family, key)
    run = next(r for r in _records() if r["kind"] == "run" and r["family"] == "clip")
    assert chance["clip"]["distinct_captions"] == run["metrics"]["distinct_captions"]
    assert chance["clip"]["hard_negative_count"] == run["metrics"]["hard_negative_count"]


def _tmp_results(tmp_path: Path) -> Path:
    rows = [{"kind": "run", "family": "clip", "variant": "clip", "run": "r/c_s0", "seed": 0,
             "metrics": {"hard_negative_acc": 0.50, "t2i_recall@1": 0.04, "t2i_recall@5": 0.17}},
            {"kind": "run", "family": "clip", "variant": "clip", "run": "r/c_s1", "seed": 1,
             "metrics": {"hard_negative_acc": 0.52, "t2i_recall@1": 0.05, "t2i_recall@5": 0.19}},
            {"kind": "run", "family": "vilt", "variant": "wpa", "run": "r/w_s0", "seed": 0,
             "metrics": {"hard_neg_acc": 0.60}},
            {"kind": "run", "family": "vilt", "variant": "wpa", "run": "r/w_s1", "seed": 1,
             "metrics": {"hard_neg_acc": 0.62}},
            {"kind": "chance", "clip": {"t2i_recall@1": 0.0015, "t2i_recall@5": 0.0074}}]
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_render_verdict_reads_alternative_fields_and_the_chance_record(vl_study, tmp_path):
    _tmp_results(tmp_path)
    line = vl_study.render_verdict(tmp_path, results="results.jsonl", contrast="wpa:1,clip:-1", expect="above",
                                   value="metrics.hard_neg_acc*100|metrics.hard_negative_acc*100", says="hard")
    assert line.startswith("- hard (wpa − clip > 0): +10.00 [") and line.endswith("**holds**")
    line = vl_study.render_verdict(tmp_path, results="results.jsonl", contrast="clip:1", expect="above",
                                   value="metrics.t2i_recall@5*100", chance="clip.t2i_recall@5*100", says="t2i")
    assert "(clip − 0.74 > 0)" in line and "+17.26 [" in line


def test_render_table_names_its_lines(vl_study, tmp_path, monkeypatch):
    _tmp_results(tmp_path)
    monkeypatch.setitem(vl_study.TABLE_ROWS, "clip", [("text → image @1 / @5", ("t2i_recall@1", "t2i_recall@5"), "%"),
                                                      ("hard", ("hard_negative_acc",), "%")])
    table = vl_study.render_table(tmp_path, results="results.jsonl", family="clip", variants="clip:CLIP")
    assert "| text → image @1 / @5 | 4.5 / 18.0% (4.0 / 17.0, 5.0 / 19.0) | 0.15 / 0.74% |" in table
    assert "| hard | 51.0 ± 1.4% (50.0, 52.0) | — |" in table
    assert "`clip` lines 1 (seed 0, `r/c_s0`), 2 (seed 1, `r/c_s1`); chance: line 5" in table


def test_a_rerun_appends_and_skips_recorded_runs(vl_study, tmp_path, monkeypatch):
    results = tmp_path / "results.jsonl"
    calls = []

    def fake(kind, name, run, threads, extra_n):
        calls.append(run)
        return vl_study.run_record(kind, name, run, {"itm_acc": 0.8}, vl_study.seed_from_name(run), "test")

    monkeypatch.setattr(vl_study, "evaluate_run", fake)
    monkeypatch.setattr(vl_study.torch, "set_num_threads", lambda n: None)  # leave this process's threads alone
    assert vl_study.main(["--vilt", "wpa=runs/a_s0,runs/a_s1", "--results", str(results)]) == 0
    assert vl_study.main(["--vilt", "wpa=runs/a_s0,runs/a_s1,runs/a_s2", "--results", str(results)]) == 0
    assert calls == ["runs/a_s0", "runs/a_s1", "runs/a_s2"]
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [(r["run"], r["seed"], r["variant"]) for r in rows] == [(f"runs/a_s{i}", i, "wpa") for i in range(3)]
