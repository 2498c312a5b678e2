"""benchmarks/mae_mask_ratio.py end to end on a tiny setting (digits, one epoch): each ratio's pretraining, the
fine-tuning from that seed's encoder, the step timing, and a re-run that trains nothing already recorded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vitkit.errors import ConfigError
from vitkit.tools.report import load_script

ROOT = Path(__file__).resolve().parents[1]


def test_pretrain_then_finetune_per_ratio_and_seed_records_and_skips(tmp_path, capsys):
    study = load_script(ROOT / "benchmarks" / "mae_mask_ratio.py")
    results = tmp_path / "r.jsonl"
    argv = ["--ratios", "0.5", "0.75", "--seeds", "1", "--pretrain-epochs", "1", "--jobs", "1",
            "--output-dir", str(tmp_path / "out"), "--results", str(results), "--set", "data.name=digits",
            "--set", "train.batch_size=64", "--pretrain-set", "model.args.encoder_args.img_size=8",
            "--pretrain-set", "model.args.encoder_args.patch_size=2", "--pretrain-set", "task.args.probe_epochs=2",
            "--finetune-set", "model.args.img_size=8", "--finetune-set", "model.args.patch_size=2",
            "--finetune-set", "train.epochs=1"]
    assert study.main(argv) == 0
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert [(r["record"], r["label"]) for r in records] == [("pretrain", "r50"), ("pretrain", "r75"),
                                                            ("finetune", "r50"), ("finetune", "r75")]
    pre, fine = records[:2], records[2:]
    assert all(r["eval_split"] == "val" and "linear_top1" in r["test"] and "knn_top1" in r["best"] for r in pre)
    assert all("top1" in r["test"] and r["seed"] == 0 for r in fine)
    # each fine-tuning starts from its own ratio's pretraining run
    for p, f in zip(pre, fine):
        assert f"model.pretrained={tmp_path / 'out' / 'pretrain' / 'runs' / p['key']}" in f["overrides"]
    assert study.main(argv) == 0  # nothing new to train
    assert len(results.read_text().splitlines()) == 4 and "already in" in capsys.readouterr().out
    assert study.main([*argv, "--timing", "--timing-batch", "4", "--timing-samples", "1",
                       "--timing-min-seconds", "0", "--threads", "1"]) == 0
    timing = [json.loads(line) for line in results.read_text().splitlines()][4:]
    assert [t["label"] for t in timing] == ["r50", "r75"] and all(t["ms_per_step"] > 0 for t in timing)
    assert study.main([*argv, "--set", "data.nonsense=1"]) == 2  # one line, no traceback
    assert "data.nonsense" in capsys.readouterr().err
    # the doc's plot reads the same records: one point per ratio on each curve, every seed a dot
    assert study.render_plot(tmp_path, results="r.jsonl", image="acc.png") == \
        "![test top-1 against the mask ratio](acc.png)"
    assert (tmp_path / "acc.png").stat().st_size > 0


def test_render_plot_without_study_records_names_the_file(tmp_path):
    study = load_script(ROOT / "benchmarks" / "mae_mask_ratio.py")
    (tmp_path / "r.jsonl").write_text(json.dumps({"record": "timing", "ratio": 0.75, "ms_per_step": 3.0}) + "\n")
    with pytest.raises(ConfigError, match="r.jsonl: no pretrain or finetune records"):
        study.render_plot(tmp_path, results="r.jsonl", image="acc.png")
