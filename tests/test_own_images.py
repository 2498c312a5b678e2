"""Your own images: the README's recipe trains on a class-per-folder tree with train/ and val/ as it is."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vitkit.engine.trainer import train
from vitkit.errors import ConfigError, DataError

RECIPE = "configs/own/vit_folder.yaml"
SMALL = ["train.epochs=1", "train.batch_size=8", "model.args.depth=1", "model.args.embed_dim=24",
         "model.args.num_heads=2", "train.progress=false"]


def _folder(root, splits=("train", "val")):
    rng = np.random.default_rng(0)
    for split in splits:
        for label, tone in (("cat", 60), ("dog", 190)):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(8 if split == "train" else 4):
                w, h = (int(v) for v in rng.integers(40, 300, size=2))  # any size and aspect ratio
                pixels = np.clip(rng.normal(tone, 30, (h, w, 3)), 0, 255).astype(np.uint8)
                fmt = ("png", "jpeg", "webp")[i % 3]
                Image.fromarray(pixels).save(folder / f"{i}.{fmt.replace('jpeg', 'jpg')}", format=fmt.upper())
    return root


def test_recipe_trains_on_train_and_val_folders(tmp_path):
    root = _folder(tmp_path / "my_images")
    summary = train(RECIPE, [f"data.root={root}", f"output_dir={tmp_path}/run", *SMALL])
    assert summary["finished"] and summary["final"]["count"] == 8  # evaluated on val/: no eval_split needed


def test_a_folder_without_val_holds_out_part_of_train(tmp_path):
    root = _folder(tmp_path / "only_train", splits=("train",))
    with pytest.raises(DataError, match="split folder not found"):
        train(RECIPE, [f"data.root={root}", f"output_dir={tmp_path}/a", *SMALL])
    summary = train(RECIPE, [f"data.root={root}", f"output_dir={tmp_path}/b", "data.val_fraction=0.25",
                             "data.eval_split=null", *SMALL])
    assert summary["eval_split"] == "val" and summary["final"]["count"] == 4


def test_missing_root_is_one_clear_error(tmp_path):
    with pytest.raises((ConfigError, DataError), match="root"):
        train(RECIPE, [f"output_dir={tmp_path}/x", *SMALL])
