"""data.val_fraction: choices on a split carved from the training images, the test set read once at the end."""

from __future__ import annotations

import json

import pytest
import torch

from vitkit.data import build_dataset
from vitkit.engine.trainer import train
from vitkit.errors import ConfigError

TINY = ["data.name=digits", "model.name=vit_fmnist_tiny", "model.args.img_size=8", "model.args.patch_size=2",
        "model.args.embed_dim=16", "model.args.num_heads=2", "model.args.depth=1", "train.batch_size=64",
        "train.epochs=2", "train.max_steps=null", "train.progress=false"]


def test_split_off_is_stratified_disjoint_and_seeded():
    data = build_dataset("digits", "train")
    rest, val = data.split_off(0.2, seed=0)
    assert len(rest) + len(val) == len(data)
    counts = torch.bincount(val.labels, minlength=10).float() / torch.bincount(data.labels, minlength=10).float()
    assert torch.allclose(counts, torch.full((10,), 0.2), atol=0.02)
    again_rest, again_val = data.split_off(0.2, seed=0)
    assert torch.equal(again_val.images, val.images) and not torch.equal(data.split_off(0.2, seed=1)[1].labels,
                                                                         val.labels)
    with pytest.raises(Exception, match=r"\(0, 1\)"):
        data.split_off(1.0)


def test_training_picks_on_validation_and_reads_test_once(tmp_path):
    summary = train("configs/fmnist/vit_tiny.yaml", [*TINY, "data.val_fraction=0.2", f"output_dir={tmp_path}"])
    test_size, train_size = len(build_dataset("digits", "test")), len(build_dataset("digits", "train"))
    assert summary["eval_split"] == "val" and summary["test"]["count"] == test_size
    assert summary["final"]["count"] == pytest.approx(0.2 * train_size, abs=10)  # evaluations ran on validation
    history = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(h["eval_count"] == summary["final"]["count"] for h in history if "eval_count" in h)
    with pytest.raises(ConfigError, match=r"data.val_fraction=1.0 must be in \[0, 1\)"):
        train("configs/fmnist/vit_tiny.yaml", [*TINY, "data.val_fraction=1.0", f"output_dir={tmp_path}/x"])
