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


def test_pretraining_probes_of_the_test_reading_use_the_test_images(tmp_path):
    """The k-NN / linear probes of a pretraining task score the split being evaluated: the final test reading
    probes the test images, not the validation split the task context holds during training."""
    encoder = dict(img_size=8, patch_size=2, embed_dim=16, depth=2, num_heads=2)
    summary = train(None, [
        "task.name=contrastive", "data.name=digits", "model.name=simclr_vit_fmnist_tiny",
        *(f"model.args.encoder_args.{k}={v}" for k, v in encoder.items()),
        "model.args.proj_hidden_dim=32", "model.args.proj_dim=16", "train.batch_size=64", "train.progress=false",
        "train.epochs=1", "task.args.probe_epochs=5", "data.val_fraction=0.2", f"output_dir={tmp_path}"])
    test_size = len(build_dataset("digits", "test"))
    assert summary["test"]["count"] == test_size
    # both readings score a probe; they were fitted on the same training features, so they only differ when the
    # scored images differ (validation: 20% of the training images; test: the test images)
    assert summary["test"]["knn_top1"] != summary["final"]["knn_top1"] or \
        summary["test"]["linear_top1"] != summary["final"]["linear_top1"]


def test_a_class_subset_is_relabelled_and_trains_as_its_own_task(tmp_path):
    """data.args.classes: only those classes, relabelled 0..k-1 in the given order (a transfer target of classes a
    pretraining never saw); the model's head follows; bad class lists fail naming the dataset."""
    from vitkit.errors import DataError

    full = build_dataset("digits", "train")
    part = build_dataset("digits", "train", classes=[7, "3"] if "3" in full.classes else [7, 3])
    assert part.classes == [full.classes[7], full.classes[3]] and len(part) == int(((full.labels == 7) |
                                                                                   (full.labels == 3)).sum())
    assert torch.equal(part.labels.bincount(), torch.tensor([(full.labels == 7).sum(), (full.labels == 3).sum()]))
    summary = train("configs/fmnist/vit_tiny.yaml", [*TINY, "train.epochs=1", "data.args={classes: [0, 1, 2]}",
                                                     "data.val_fraction=0.2", f"output_dir={tmp_path}"])
    from vitkit.tools.evaluate import load_model

    model = load_model(summary["best_checkpoint"])
    assert model.num_classes == 3 and model.pretrained_cfg["class_names"] == full.classes[:3]
    for bad, match in (([], "non-empty list"), ([11], "unknown class 11"), ([1, 1], "twice"), ("0", "list")):
        with pytest.raises(DataError, match=match):
            build_dataset("digits", "train", classes=bad)
    with pytest.raises(DataError, match="does not take"):
        build_dataset("fmnist_captions", "train", classes=[0])
