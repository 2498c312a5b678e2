"""benchmarks/bench_recipe.py: one record per recipe run, time-to-accuracy from it, tables rebuilt from records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_data import data_no_system_dirs, write_fake_fmnist  # noqa: F401  (fixture)
from vitkit.tools.report import load_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def bench():
    return load_script(ROOT / "benchmarks" / "bench_recipe.py")


def test_a_run_appends_its_record_with_timed_evaluations(bench, tmp_path, data_no_system_dirs):  # noqa: F811
    write_fake_fmnist(tmp_path / "fm", n_train=40, n_test=20)
    results = tmp_path / "results" / "recipe.jsonl"
    over = [f"data.data_dir={tmp_path / 'fm'}", "train.epochs=2", "train.batch_size=16", "train.progress=false",
            "model.args.depth=1", "model.args.embed_dim=16", "model.args.num_heads=2"]
    argv = ["--config", str(ROOT / "configs" / "fmnist" / "demo.yaml"), "--output-dir", str(tmp_path / "run"),
            "--results", str(results), "--label", "tiny"]
    for o in over:
        argv += ["--set", o]
    assert bench.main(argv) == 0
    (record,) = [json.loads(line) for line in results.read_text().splitlines()]
    assert record["kind"] == "recipe" and record["label"] == "tiny" and record["epochs"] == 2
    assert record["machine"]["cpu"] and record["total_wall_clock_s"] > record["train_wall_clock_s"] > 0
    seconds = [e["seconds"] for e in record["evals"]]
    assert len(seconds) >= 1 and seconds == sorted(seconds) and seconds[-1] <= record["total_wall_clock_s"]
    assert record["evals"][-1]["top1"] == pytest.approx(record["final"])
    table = bench.render_recipe(tmp_path, results="results/recipe.jsonl", target="0.0")
    assert f"{seconds[0] / 60:.1f} min (epoch {record['evals'][0]['epoch']})" in table  # reached at once
    assert "| no |" in bench.render_recipe(tmp_path, results="results/recipe.jsonl", target="1.01")
    assert bench.render_recipe_curves(tmp_path, results="results/recipe.jsonl", image="c.png").endswith("(c.png)")
    assert (tmp_path / "c.png").is_file()


def test_the_committed_records_render(bench):
    table = bench.render_recipe(ROOT / "benchmarks", labels="vit_fast")
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    record = next(json.loads(line) for line in (ROOT / "benchmarks/results/recipe.jsonl").read_text().splitlines()
                  if json.loads(line)["label"] == "vit_fast")
    assert len(rows) == 1 and f"{100 * record['final']:.2f}%" in rows[0]
