"""A run folder is never overwritten silently: refuse, resume or overwrite, as asked."""

from __future__ import annotations

import json

import pytest

from vitkit.cli import main as cli_main
from vitkit.engine.trainer import train
from vitkit.errors import ConfigError

TINY = ["data.name=digits", "model.name=vit_fmnist_tiny", "model.args.img_size=8", "model.args.patch_size=2",
        "model.args.embed_dim=16", "model.args.num_heads=2", "model.args.depth=1", "train.batch_size=64",
        "train.epochs=1", "train.max_steps=null", "train.progress=false"]


def test_second_training_into_a_run_is_refused_resumed_or_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    first = train("configs/fmnist/vit_tiny.yaml", [*TINY, f"output_dir={out}"])
    lines = (out / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match=r"already holds a run; continue it with `vitkit train --resume"):
        train("configs/fmnist/vit_tiny.yaml", [*TINY, f"output_dir={out}"])
    assert (out / "metrics.jsonl").read_text() == lines  # untouched
    args = ["train", "--config", "configs/fmnist/vit_tiny.yaml", "--output-dir", str(out),
            *[a for o in TINY for a in ("--set", o)]]
    assert cli_main(args) == 2 and "--if-exists resume|overwrite" in capsys.readouterr().err
    # resume: a finished run is continued (nothing left to train), its history kept
    again = train("configs/fmnist/vit_tiny.yaml", [*TINY, f"output_dir={out}"], if_exists="resume")
    assert again["steps"] == first["steps"] and (out / "metrics.jsonl").read_text() == lines
    # resume with more epochs continues where it stopped
    more = train("configs/fmnist/vit_tiny.yaml", [*TINY, f"output_dir={out}", "train.epochs=2"], if_exists="resume")
    assert more["epochs_done"] == 2 and len((out / "metrics.jsonl").read_text().splitlines()) == 2
    # overwrite: the old run's checkpoints and metrics go first
    (out / "checkpoints" / "stale-marker").mkdir()
    fresh = train("configs/fmnist/vit_tiny.yaml", [*TINY, f"output_dir={out}"], if_exists="overwrite")
    assert fresh["epochs_done"] == 1 and not (out / "checkpoints" / "stale-marker").exists()
    assert [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1]


def test_summary_names_a_best_checkpoint_only_when_there_is_one(tmp_path, capsys):
    summary = train("configs/fmnist/vit_tiny.yaml", [*TINY, "train.max_steps=3", f"output_dir={tmp_path}/r"])
    assert summary["best_checkpoint"] is None and "no best checkpoint" in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["file", "fifo", "device"])
def test_output_dir_that_is_not_a_folder_is_refused(tmp_path, kind):
    import os

    target = {"file": tmp_path / "plain", "fifo": tmp_path / "pipe", "device": "/dev/null"}[kind]
    if kind == "file":
        target.write_text("keep me")
    elif kind == "fifo":
        os.mkfifo(target)
    with pytest.raises(ConfigError, match="output_dir must be a folder"):
        train("configs/fmnist/vit_tiny.yaml", [*TINY, f"output_dir={target}"])
    if kind == "file":
        assert target.read_text() == "keep me"
