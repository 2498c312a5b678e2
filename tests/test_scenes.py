"""Fashion-MNIST scenes (data/scenes.py) and the multi-label task (tasks/multilabel.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from test_data import data_no_system_dirs, write_fake_fmnist  # noqa: F401  (fixture)
from vitkit.data.scenes import ITEM, MultiLabelImageDataset, compose_scenes
from vitkit.errors import ConfigError, DataError
from vitkit.tasks import TaskContext, build_task
from vitkit.tasks.multilabel import average_precision


def _source(n: int = 50, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(1, 256, (n, ITEM, ITEM), dtype=np.uint8)  # no zero pixel: items are visible
    return images, np.arange(n) % 10


def test_scenes_are_seeded_non_overlapping_and_labelled_by_their_items():
    images, labels = _source()
    a = compose_scenes(images, labels, 40, canvas=112, seed=3)
    b = compose_scenes(images, labels, 40, canvas=112, seed=3)
    c = compose_scenes(images, labels, 40, canvas=112, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b)) and not np.array_equal(a[0], c[0])
    scenes, targets, boxes = a
    for scene, target, box in zip(scenes, targets, boxes):
        items = box[box[:, 0] >= 0]
        assert 1 <= len(items) <= 4
        assert set(np.flatnonzero(target)) == set(items[:, 0].tolist())
        covered = np.zeros(scene.shape, bool)
        for _cls, r, c, h, w in items:
            assert not covered[r:r + h, c:c + w].any()  # no overlap
            covered[r:r + h, c:c + w] = True
            assert (scene[r:r + h, c:c + w] > 0).all()  # the pasted item is there
        assert (scene[~covered] == 0).all()  # empty background elsewhere


def test_scene_generator_refuses_impossible_settings():
    images, labels = _source()
    with pytest.raises(DataError, match="too small"):
        compose_scenes(images, labels, 1, canvas=40, max_items=4)
    with pytest.raises(DataError, match="min_items"):
        compose_scenes(images, labels, 1, min_items=3, max_items=2)


def test_multilabel_dataset_batches_and_subsets():
    images, labels = _source()
    scenes, targets, boxes = compose_scenes(images, labels, 30, seed=1)
    ds = MultiLabelImageDataset(torch.from_numpy(scenes)[:, None], torch.from_numpy(targets),
                                [str(i) for i in range(10)], boxes=torch.from_numpy(boxes))
    batch = ds.__getitems__([0, 5])
    assert batch.images.shape == (2, 1, 112, 112) and batch.labels.shape == (2, 10)
    assert batch.labels.dtype == torch.float32
    sub = ds.subset(0.5, seed=0)
    assert len(sub) == 15 and sub.boxes.shape[0] == 15
    with pytest.raises(DataError, match="multi-hot"):
        MultiLabelImageDataset(torch.zeros(3, 1, 8, 8, dtype=torch.uint8), torch.zeros(3), ["a"])


def test_average_precision_matches_a_hand_computation():
    scores = torch.tensor([[0.9, 0.1], [0.8, 0.7], [0.3, 0.2], [0.1, 0.9]])
    targets = torch.tensor([[1, 0], [0, 0], [1, 0], [0, 1]])
    ap = average_precision(scores, targets)
    # class 0: positives at ranks 1 and 3 -> (1/1 + 2/3) / 2; class 1: its one positive ranks first -> 1
    assert torch.allclose(ap, torch.tensor([(1 + 2 / 3) / 2, 1.0], dtype=torch.float64))
    assert torch.isnan(average_precision(scores, torch.zeros(4, 2)))[0]


class _Scenes:
    classes = [str(i) for i in range(10)]
    mean, std = (0.1,), (0.2,)


def test_multilabel_task_trains_and_evaluates_a_tiny_model():
    ctx = TaskContext(train_set=_Scenes())
    task = build_task("multilabel", None, ctx)
    model = task.build_model(type("M", (), {"name": "vit_fmnist_tiny", "pretrained": None,
                                             "args": dict(img_size=32, embed_dim=16, depth=1, num_heads=2)})())
    torch.manual_seed(0)
    x = torch.randn(6, 1, 32, 32)
    t = (torch.rand(6, 10) < 0.3).float()
    loss, stats = task.training_step(model, (x, t))
    loss.backward()
    assert stats["count"] == 6 and 0 <= stats["exact"] <= 6
    metrics = task.evaluate(model.eval(), [(x[:3], t[:3]), (x[3:], t[3:])])
    assert 0 <= metrics["mAP"] <= 1 and metrics["count"] == 6 and "mAP" in task.format_report(metrics)
    out = task.predict(model, x[:2], topk=3)
    assert len(out[0]["top"]) == 3 and isinstance(out[0]["present"], list)
    with pytest.raises(DataError, match="multi-hot"):
        task.training_step(model, (x, torch.zeros(6, dtype=torch.long)))


def test_multilabel_task_refuses_mixup_and_smoothing():
    from vitkit.data.transforms import AugmentConfig

    for aug in (AugmentConfig(mixup_alpha=0.8), AugmentConfig(label_smoothing=0.1)):
        with pytest.raises(ConfigError, match="multilabel"):
            build_task("multilabel", None, TaskContext(augment=aug, train_set=_Scenes()))


def test_val_scenes_hold_out_the_training_images_they_use(tmp_path, data_no_system_dirs):  # noqa: F811
    from vitkit.data.scenes import load_fmnist_scenes

    write_fake_fmnist(tmp_path / "fm", n_train=100, n_test=10)
    kw = {"data_dir": str(tmp_path / "fm"), "num_scenes": 60, "num_eval_scenes": 30, "canvas": 64, "max_items": 2}

    def items(ds: MultiLabelImageDataset) -> set[bytes]:
        out = set()
        for scene, box in zip(ds.images[:, 0].numpy(), ds.boxes.numpy()):
            for _cls, r, c, h, w in box[box[:, 0] >= 0]:
                out.add(scene[r:r + h, c:c + w].tobytes())
        return out

    train, val = items(load_fmnist_scenes("train", **kw)), items(load_fmnist_scenes("val", **kw))
    assert train and val and not train & val  # no item of a val scene was seen in training
    old_train = items(load_fmnist_scenes("train", val_fraction=0, **kw))
    assert old_train & items(load_fmnist_scenes("val", val_fraction=0, **kw))  # the old behaviour shared them
    with pytest.raises(DataError, match="val_fraction"):
        load_fmnist_scenes("val", val_fraction=1.5, **kw)


def test_a_dataset_with_its_own_val_split_reads_test_once_at_the_end(tmp_path, data_no_system_dirs):  # noqa: F811
    """data.test_split: choices on the scenes' val split, the test scenes read once by the final model; a sparse
    Swin keeping its own tokens (token_keep_ratio) trains on them; test_split cannot be the evaluated split."""
    from vitkit.engine.trainer import train
    from vitkit.errors import ConfigError

    write_fake_fmnist(tmp_path / "fm", n_train=100, n_test=20)
    over = ["task.name=multilabel", "data.name=fmnist_scenes", f"data.data_dir={tmp_path / 'fm'}",
            "data.args={num_scenes: 32, num_eval_scenes: 12, canvas: 56, max_items: 2}", "data.eval_split=val",
            "data.test_split=test", "model.name=swin_scenes_tiny", "model.args.img_size=56",
            "model.args.embed_dim=8", "model.args.depths=[1, 1]", "model.args.num_heads=[1, 2]",
            "model.args.sparse_stages=[0, 1]", "model.args.token_keep_ratio=0.3", "train.epochs=1",
            "train.batch_size=16", "train.progress=false", "train.bf16=false", f"output_dir={tmp_path / 'run'}"]
    summary = train(None, over)
    assert summary["eval_split"] == "val" and summary["final"]["count"] == 12 and summary["test"]["count"] == 12
    assert "mAP" in summary["test"]
    with pytest.raises(ConfigError, match="equals data.eval_split"):
        train(None, [*over[:-1], "data.eval_split=test", f"output_dir={tmp_path / 'x'}"])
    with pytest.raises(ConfigError, match="leave data.test_split null"):
        train(None, [*over[:-1], "data.val_fraction=0.1", f"output_dir={tmp_path / 'y'}"])
