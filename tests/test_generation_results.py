"""docs/generation.md reads its tables and verdicts from docs/generation/results.jsonl: the records trace back to the
JSON files they were converted from, the doc is current, and benchmarks/bench_generation.py appends records of the
same schema (a quality set already recorded is not measured again; speed ratios come from one process)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from vitkit.tools.report import load_script

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "generation" / "results.jsonl"


@pytest.fixture(scope="module")
def bench():
    path = ROOT / "benchmarks" / "bench_generation.py"
    module = load_script(path)
    return module


def _git_json(source: str):
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "show", source], capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip(f"git cannot show {source} here")
    return json.loads(out.stdout)


def test_converted_records_are_exactly_the_jsons_numbers(bench):
    records = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
    converted = [r for r in records if "source" in r]
    assert converted, "the converted records name their source"
    by_source: dict[str, list] = {}
    for r in converted:
        by_source.setdefault(r["source"], []).append(r)
    for source, rs in by_source.items():
        j = _git_json(source)
        m = j["machine"]
        for r in rs:
            assert r["study"] == "generation" and r["process"] == source
            assert r["threads"] == m["threads"] and r["load_1m"] == [m["load_before"], m["load_after"]]
            assert r["machine"]["cpu"] == m["cpu"] and r["machine"]["cores"] == m["logical_cpus"]
            assert r["machine"]["torch"] == m["torch"] and r["machine"]["amx"] == m["amx"]
        if "floor" in j:
            (floor,) = [r for r in rs if r["kind"] == "floor"]
            assert {k: floor[k] for k in j["floor"]} == j["floor"] and floor["n"] == j["n"]
            (judge,) = [r for r in rs if r["kind"] == "classifier"]
            assert judge["judge"] == j["classifier"]["run"] and judge["test_acc"] == j["classifier"]["test_acc"]
            toks = [r for r in rs if r["kind"] == "tokenizer"]
            assert len(toks) == len(j["tokenizers"])
            assert [{k: t[k] for k in jt} for t, jt in zip(toks, j["tokenizers"])] == j["tokenizers"]
        quality = [r for r in rs if r["kind"] == "quality"]
        assert len(quality) == sum(len(g["runs"]) for g in j["generators"])
        for g in j["generators"]:
            for run in g["runs"]:
                (r,) = [q for q in quality if q["generator"] == g["name"] and q["run"] == run["run"]]
                assert {k: r[k] for k in run} == run
                assert r["settings"] == g["settings"] and r["steps"] == g["steps"]
                assert r["seed"] == bench.seed_of(run["run"])
            if "speed" in g:
                (r,) = [s for s in rs if s["kind"] == "speed" and s["generator"] == g["name"]]
                assert {k: r[k] for k in g["speed"]} == g["speed"]
    keys = [bench.record_key(r) for r in records]
    assert len(keys) == len(set(keys)), "one record per measured thing"


def test_generation_doc_is_current():
    from vitkit.tools.report import report

    assert report([ROOT / "docs" / "generation.md"], check=True) == []


def _speed(bench, name, sec, process, batch=50):
    cand = SimpleNamespace(samples=[sec, sec * 1.1, sec * 0.9], contention=[0.01, float("nan"), 0.02],
                           discarded=1, note="")
    return {"kind": "speed", "generator": name, "steps": "6", "settings": {},
            **bench.speed_record(cand, None, batch), "threads": 2, "load_1m": [1.0, 1.0], "process": process}


def test_speed_table_and_goal_take_ratios_within_the_latest_process(bench, tmp_path):
    rows = [_speed(bench, "raster", 1.0, "old"), _speed(bench, "var", 0.1, "old"),
            _speed(bench, "raster", 0.6, "new"), _speed(bench, "var", 0.3, "new"),
            _speed(bench, "raster", 0.05, "b1"), _speed(bench, "var", 0.01, "b1", batch=1)]
    rows[4]["batch"] = 1
    path = tmp_path / "r.jsonl"
    assert len(bench.append_records(path, rows)) == 6
    assert rows[0]["contention"] == [0.01, None, 0.02] and rows[0]["noisy"] is False
    table = bench.render_speed(tmp_path, results="r.jsonl", batches="1,50")
    var = next(line for line in table.splitlines() if line.startswith("| VAR"))
    assert "| 5.00 |" in var and var.endswith("| 2.00 |"), var  # 0.05 / 0.01 at batch 1, 0.6 / 0.3 at batch 50
    assert "10.00" not in table  # never the old process's ratio, never across processes
    goal = bench.render_speed_goal(tmp_path, results="r.jsonl", goal="5")
    assert "**5.00×**" in goal and "**goal reached**" in goal and "**2.00×**" in goal and "not reached" in goal


def test_quality_table_and_append_skip_recorded_keys(bench, tmp_path):
    base = {"kind": "quality", "settings": {}, "steps": "6", "judge": "j", "n": 20, "sample_seed": 0,
            "process": "p", "threads": 1, "load_1m": [0.1, 0.2]}
    rows = [{**base, "generator": "var", "run": f"runs/v_s{s}", "seed": s, "fd": 1.0 + s, "class_acc": 0.5}
            for s in (0, 1)]
    path = tmp_path / "r.jsonl"
    assert len(bench.append_records(path, rows)) == 2
    assert bench.append_records(path, [{**rows[0], "fd": 9.0}]) == []  # the same measurement: kept once
    table = bench.render_quality(tmp_path, results="r.jsonl")
    assert "| VAR | 6 | 1.500 ± 0.707 | 50.0% ± 0.0 | 2 | s0: 1.000, 50.0%; s1: 2.000, 50.0% |" in table
    assert bench.seed_of("runs/gen_hart_s1") == 1 and bench.seed_of("runs/gen_hart_s12/") == 12
    assert bench.seed_of("runs/gen_classifier") is None


@dataclasses.dataclass
class _TaskArgs:
    sample_seed: int = 0


def test_main_appends_records_and_measures_only_new_runs(bench, tmp_path, monkeypatch):
    """main() with stand-ins for the data, the judge and the generators: the schema, the skip, the speed cells."""
    g = torch.Generator().manual_seed(0)
    data = SimpleNamespace(images=torch.randint(0, 256, (40, 1, 28, 28), dtype=torch.uint8, generator=g),
                           labels=torch.arange(10).repeat(4), classes=list(range(10)))
    cfg = {"mean": [0.5], "std": [0.5]}

    class Judge:
        def __init__(self, run):
            self.name, self.model = "fake_judge", torch.nn.Linear(3, 2)

        def __call__(self, images01):
            feats = torch.stack([images01.mean((1, 2, 3)), images01.std((1, 2, 3)), images01[:, 0, 0, 0]], 1)
            noise = 1e-3 * torch.randn(feats.shape, generator=g)
            return feats + noise, torch.zeros(images01.shape[0], dtype=torch.long)

    sampled = []

    class Task:
        name = "ar"

        def __init__(self):
            self.args = _TaskArgs()

        def sample_images(self, model, labels):
            sampled.append(labels.shape[0])
            return torch.rand(labels.shape[0], 1, 28, 28, generator=g) * 2 - 1

    def load_generator(run, seed=0, **settings):
        model = torch.nn.Linear(2, 2)
        model.pretrained_cfg, model.order, model.num_tokens = cfg, "raster", 49
        return model, Task(), None

    monkeypatch.setattr(bench, "build_dataset", lambda name, split: data)
    monkeypatch.setattr(bench, "Judge", Judge)
    monkeypatch.setattr(bench, "load_generator", load_generator)
    results = tmp_path / "results.jsonl"
    argv = ["--classifier", "runs/judge", "--generator", "raster=runs/r_s0", "--generator", "var=runs/v_s0,runs/v_s1",
            "--per-class", "2", "--batch", "20", "--speed-batch", "2", "--repeats", "1", "--min-sample-seconds", "0",
            "--max-contention", "1", "--threads", "1", "--results", str(results)]
    with pytest.raises(SystemExit):  # records without the campaign they belong to
        bench.main(argv)
    argv += ["--campaign", "t"]
    assert bench.main(argv) == 0
    first = [json.loads(line) for line in results.read_text().splitlines()]
    kinds = [r["kind"] for r in first]
    assert kinds.count("quality") == 3 and kinds.count("speed") == 2 and kinds.count("floor") == 1
    assert kinds.count("classifier") == 1
    for r in first:
        assert r["study"] == "generation" and r["machine"]["cores"] and "native_bf16" in r["machine"]
        assert r["threads"] == 1 and len(r["load_1m"]) == 2 and r["process"] and r["finished_at"]
        assert r["campaign"] == "t"
    (v1,) = [r for r in first if r["kind"] == "quality" and r["run"] == "runs/v_s1"]
    assert v1["seed"] == 1 and v1["n"] == 20 and v1["sample_seed"] == 0 and v1["params"] == 6
    (sv,) = [r for r in first if r["kind"] == "speed" and r["generator"] == "var"]
    assert sv["batch"] == 2 and sv["run"] == "runs/v_s0" and sv["seed"] == 0 and len(sv["contention"]) == 1
    assert sv["x_raster"] > 0
    quality_sets = sum(1 for n in sampled if n == 20)
    assert quality_sets == 3

    sampled.clear()
    argv[argv.index("var=runs/v_s0,runs/v_s1")] = "var=runs/v_s0,runs/v_s1,runs/v_s2"
    assert bench.main(argv) == 0
    second = [json.loads(line) for line in results.read_text().splitlines()][len(first):]
    assert sum(1 for n in sampled if n == 20) == 1  # only the new training run's quality set
    assert [r["run"] for r in second if r["kind"] == "quality"] == ["runs/v_s2"]
    assert sum(r["kind"] == "speed" for r in second) == 2  # a new process: new speed cells
    assert not any(r["kind"] in ("floor", "classifier") for r in second)


def test_training_records_trace_the_setup_to_the_run_and_its_weights(bench, tmp_path):
    """A run's summary and config become a ``training`` record; its weights' hash tells a retrained run apart, so
    it is measured anew; the training table and every block read one campaign."""
    from _tiny import save_tiny_classifier_run
    from vitkit.engine.config import config_to_yaml, load_config

    run = tmp_path / "runs" / "judge"
    save_tiny_classifier_run(run)
    cfg = load_config(ROOT / "configs" / "fmnist" / "demo.yaml", ["data.val_fraction=0.1", "train.threads=1"])
    (run / "config.yaml").write_text(config_to_yaml(cfg))
    summary = {"model": "vit_fmnist_tiny", "task": "classification", "primary_metric": "top1", "mode": "max",
               "finished": True, "epochs_done": 3, "steps": 1266, "best": {"epoch": 2, "top1": 0.855},
               "eval_split": "val", "test": {"top1": 0.8475}, "train_wall_clock_s": 300.0, "train_img_s": 500.0,
               "params": 12345}
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "metrics.jsonl").write_text(json.dumps({"epoch": 3, "fit_elapsed_s": 360.0}) + "\n")
    r = bench.training_record(str(run), "judge")
    assert r["run_id"] == bench.weights_id(str(run)) and len(r["run_id"]) == 16
    assert (r["best"], r["best_epoch"], r["test"], r["val_fraction"], r["train_threads"]) == (0.855, 2, 0.8475, 0.1, 1)
    assert r["params"] == 12345 and r["fit_elapsed_s"] == 360.0 and r["steps"] == 1266
    assert bench.training_record(str(run / "checkpoints" / "best"), "judge") is None  # a checkpoint: no summary
    assert bench.weights_id(str(tmp_path / "nowhere")) is None

    import vitkit

    torch.manual_seed(1)
    vitkit.create_model("vit_fmnist_tiny", embed_dim=24, depth=2, num_heads=2).save_pretrained(
        run / "checkpoints" / "best")
    again = bench.training_record(str(run), "judge")
    assert again["run_id"] != r["run_id"] and again["config_key"] == r["config_key"]
    path = tmp_path / "r.jsonl"
    assert len(bench.append_records(path, [{**r, "campaign": "a", "process": "p"},
                                           {**again, "campaign": "b", "process": "p", "seed": 1}])) == 2
    table = bench.render_training(tmp_path, results="r.jsonl", campaign="a")
    assert "| judge | `" in table and "| 85.50% (2) | 84.75% | 5.0 min / 6.0 min |" in table and "| 1 |" not in table
    assert "1 runs, 1 training thread(s) each; validation split: 10% of the training images" in table
    with pytest.raises(ValueError, match="no records of campaign 'c'"):
        bench.render_training(tmp_path, results="r.jsonl", campaign="c")
