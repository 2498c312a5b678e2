"""docs/efficient.md's records: the SparseViT study's results file, the study script's record writer and renderers,
and the EfficientViT benchmark's records (no training, no timing)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vitkit.tools.ablate import read_results
from vitkit.tools.report import load_script
from vitkit.tools.timing import Candidate

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "efficient" / "results.jsonl"


def _script(name: str):
    path = ROOT / "benchmarks" / f"{name}.py"
    return load_script(path)


@pytest.fixture(scope="module")
def study():
    return _script("sparsevit_study")


def test_results_file_holds_every_variant_each_from_one_source():
    records = [r for r in read_results(RESULTS) if r["study"] == "sparsevit"]
    sources = {v: {r["source"] for r in records if r["variant"] == v} for v in ("adapt", "adapt8", "heldout")}
    assert sources == {"adapt": {"0b7155c:docs/efficient/sparsevit.json"},
                       "adapt8": {"0b7155c:docs/efficient/sparsevit_adapt8.json"},
                       "heldout": {"benchmarks/sparsevit_study.py --out runs/eff2/study.json"}}
    for r in records:
        if r["record"] == "lr_probe":  # the dense recipe's learning rate, checked on val (one epoch each)
            assert r["variant"] == "heldout_lr_probe" and r["epoch"] == 1 and 0 < r["val"]["mAP"] < 1
            continue
        assert r["machine"]["cpu"] and r["threads"] == 2 and r["record"] in ("eval", "pick", "timing")
        if r["record"] in ("eval", "pick") and r.get("ratios") is not None:
            assert 0 < r["test"]["mAP"] < 1 and "exact_match" in r["test"]


def test_picks_agree_with_the_evaluations_and_every_configuration_is_timed(study):
    records = read_results(RESULTS)
    for variant in ("adapt", "adapt8", "heldout"):
        mine = [r for r in records if r.get("variant") == variant]
        evals = {(r["seed"], r["model"], tuple(r["ratios"])): r["test"] for r in mine
                 if r["record"] == "eval" and r["ratios"] is not None}
        timed = {(r["row"], r["batch"], r["state"]) for r in mine if r["record"] == "timing"}
        for r in mine:
            if r["record"] == "pick" and r["ratios"] is not None:
                assert r["test"] == evals[(r["seed"], r["model"], tuple(r["ratios"]))]
                assert r["config"] == study.config_label(r["ratios"])
                if r["model"] == "adapted":
                    assert r["search"]["split"] == "val" and r["search"]["predicted_ms"] <= r["search"]["budget_ms"]
        for _, _, ratios in evals:
            for batch in (8, 1):
                for state in ("settled", "fresh"):
                    assert (study.config_label(ratios), batch, state) in timed


def _result() -> dict:
    """A two-seed study work file in the form the script's phases write (two stages, made-up numbers)."""
    full, uni, pick = "(1.0, 1.0)", "(0.5, 0.5)", "(0.5, 1.0)"

    def scores(base: float) -> dict:
        return {full: {"mAP": base, "exact_match": 0.4}, uni: {"mAP": base - 0.03, "exact_match": 0.3},
                pick: {"mAP": base - 0.01, "exact_match": 0.35}}

    seeds = []
    for s, base in enumerate((0.80, 0.82)):
        budget = {"budget_ms": 8.0, "best": {"ratios": [0.5, 1.0], "latency_ms": 7.5, "metric": base},
                  "best_measured_ms": 9.0, "evaluated": 10,
                  "uniform_baseline": {"ratios": [0.5, 0.5], "latency_ms": 7.0, "metric": base - 0.02,
                                       "measured_ms": 8.5}}
        seeds.append({"dense_run": f"runs/d{s}", "adapted_run": f"runs/a{s}", "dense_ratios": [1.0, 1.0],
                      "search": {"dense_ms": 12.0, "dense_metric": base, "budgets": {"1.25x": budget},
                                 "out_dir": f"runs/s{s}"},
                      "adapted": scores(base), "dense_pruned": scores(base - 0.05)})
    cells = {full: {"ms": 10.0, "samples": 7}, uni: {"ms": 6.0, "samples": 7}, pick: {"ms": 8.0, "samples": 7},
             "dense, no shift": {"ms": 9.5, "samples": 7}}
    return {"threads": 2, "seeds": seeds, "table_dense_ms": 10.0, "eval_images": 500,
            "latency_ms": {"8": cells, "1": cells},
            "latency_ms_fresh": {"8": {k: {**v, "ms": v["ms"] * 1.2} for k, v in cells.items()}, "1": cells}}


def test_records_round_trip_into_the_renderers(study, tmp_path):
    records = study.study_records(_result(), "toy", {"cpu": "test"}, "test", finished_at="now")
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    kinds = [r["record"] for r in records]
    assert kinds.count("eval") == 12 and kinds.count("pick") == 4 and kinds.count("timing") == 16
    assert all(r["finished_at"] == "now" for r in records)
    table = study.render_sparsevit_table(tmp_path, results="results.jsonl", variant="toy")
    assert "| **searched, 1.25x budget** | (0.5, 1.0) | 8.00 | 8.00 | 1.25 | 1.25 | 80.00 ± 1.41 (79.00 / 81.00) | " \
           "+4.00 | 75.00 ± 1.41 (74.00 / 76.00) |" in table
    assert "| uniform 0.5 | (0.5, 0.5) | 6.00 | 6.00 | 1.67 | 1.67 |" in table
    speed = study.render_sparsevit_speed(tmp_path, results="results.jsonl", variant="toy")
    assert "| 1.25x | 0 | (0.5, 1.0) | 80.00 | 7.50 (1.33×) | 9.00 (1.33×) | 8.00 (1.25×) | 1.25× | no | " \
           "uniform 0.5: 78.00, 1.67× |" in speed
    goal = study.render_sparsevit_goal(tmp_path, results="results.jsonl", variant="toy")
    assert "goal **not reached (under 1.5× on seed 0, 1)**" in goal
    assert "(dense run − searched 1.25x − 0.5 < 0)" in goal
    assert study.render_sparsevit_plot(tmp_path, plots=False, results="results.jsonl", variant="toy",
                                       image="toy.png") == "![test mAP against measured latency, toy](toy.png)"
    with pytest.raises(ValueError, match="no records of SparseViT variant 'other'"):
        study.render_sparsevit_table(tmp_path, results="results.jsonl", variant="other")


def test_a_variant_already_recorded_is_refused(study, tmp_path):
    results = tmp_path / "results.jsonl"
    results.write_text(json.dumps({"study": "sparsevit", "variant": "adapt"}) + "\n")
    with pytest.raises(SystemExit):
        study.main(["--dense", "a", "--adapted", "b", "--variant", "adapt", "--results", str(results)])


def test_efficientvit_records_and_skipped_trainings(tmp_path, monkeypatch, capsys):
    bench = _script("bench_efficientvit")
    args = bench.main.__globals__["argparse"].Namespace(threads=2, min_sample_seconds=0.5, max_contention=0.2)
    cand = Candidate("vit_fmnist_tiny", "vitkit", "fp32", lambda: None, False, samples=[0.04, 0.05, 0.06])
    rec = bench.timing_record(cand, 64, 0.46, args, {"cpu": "test"}, "inv")
    assert rec["ms"] == pytest.approx(50.0) and rec["img_s"] == pytest.approx(1280.0)
    assert rec["study"] == "efficientvit" and rec["record"] == "timing" and rec["samples"] == 3
    # every (model, seed) already recorded: nothing is trained
    from vitkit.engine.config import load_config
    from vitkit.tools import ablate

    results = tmp_path / "results.jsonl"
    keys = [ablate.run_key(load_config(ROOT / "configs/fmnist/demo.yaml",
                                       [f"model.name={m}", f"train.seed={s}", *bench.TRAIN_OVERRIDES]))
            for s in range(2) for m in bench.TRAIN_MODELS]
    results.write_text("".join(json.dumps({"study": "efficientvit", "record": "train", "key": k}) + "\n"
                               for k in keys))
    monkeypatch.setattr(ablate, "_run_record", lambda *a, **k: pytest.fail("trained a recorded run"))
    train_args = bench.main.__globals__["argparse"].Namespace(
        results=str(results), train_seeds=2, train_model=None, recipe=str(ROOT / "configs/fmnist/demo.yaml"),
        set=[], runs=str(tmp_path / "runs"))
    assert bench.train_runs(train_args) == 0
    assert "trained 0 run(s)" in capsys.readouterr().out


def test_a_timed_model_takes_constructor_overrides():
    """``--model NAME:KEY=VALUE,...`` times an ablated variant (values as YAML; brackets keep their commas)."""
    bench = _script("bench_efficientvit")
    assert bench.model_spec("vit_fmnist_tiny") == ("vit_fmnist_tiny", {})
    assert bench.model_spec("efficientvit_fmnist_tiny:local_dwconv=false,scales=[3,5]") == (
        "efficientvit_fmnist_tiny", {"local_dwconv": False, "scales": [3, 5]})
    assert bench.model_spec("efficientvit_fmnist_tiny:scales=[]")[1] == {"scales": []}
    with pytest.raises(bench.main.__globals__["argparse"].ArgumentTypeError, match="must look like KEY=VALUE"):
        bench.model_spec("vit_fmnist_tiny:depth")
