"""Fashion-MNIST scenes: 1-4 items at random places on an empty canvas, with a multi-label target.

Why: Fashion-MNIST images are small and full, so there is nothing to prune. A scene is mostly empty background
(4 items cover at most 4·28² / 112² = 25% of a 112×112 canvas), which is the setting where window pruning
(SparseViT) and sparse attention pay: most windows hold nothing.

Generator (seeded, documented, deterministic for a given seed and split):

* scene ``i`` of a split draws its number of items k uniformly from ``min_items..max_items``;
* k positions are drawn uniformly, each rejected while its 28×28 box would overlap a box already placed (a
  layout that leaves no room for the last items is redrawn; the generator raises if a canvas is too small);
* each item is a Fashion-MNIST image of **that split** (test scenes use test images only), drawn uniformly
  with replacement and pasted unchanged (28×28);
* the target is multi-hot over the 10 classes: which classes are present (two items may share a class);
* ``boxes`` (N, max_items, 5) keeps (class, row, col, height, width) per item, -1 where absent, for pictures
  and localisation checks.

The train split uses ``seed``, the test split ``seed + 1`` and the val split ``seed + 2``, so no two share a random
stream. The val split (for choices that must not see the test split: best epoch, searches) is made from a
seeded tenth of the training images that the train scenes never use (``val_fraction``), so its items are
unseen in training, as the test split's are.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..errors import DataError
from .base import ImageBatch, InMemoryImageDataset
from .constants import FMNIST_CLASSES

ITEM = 28


def compose_scenes(images: np.ndarray, labels: np.ndarray, num_scenes: int, canvas: int = 112,
                   min_items: int = 1, max_items: int = 4, seed: int = 0
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scenes (N, canvas, canvas) uint8, multi-hot targets (N, 10) uint8, boxes (N, max_items, 5) int)."""
    if not 1 <= min_items <= max_items:
        raise DataError(f"scenes: need 1 <= min_items <= max_items, got {min_items}, {max_items}")
    if canvas < ITEM or max_items * ITEM * ITEM > canvas * canvas // 2:
        raise DataError(f"scenes: a {canvas}x{canvas} canvas is too small for {max_items} items of {ITEM}x{ITEM} "
                        f"without overlap (keep the items under half of the canvas)")
    rng = np.random.default_rng(seed)
    num_classes = int(labels.max()) + 1 if len(labels) else len(FMNIST_CLASSES)
    scenes = np.zeros((num_scenes, canvas, canvas), np.uint8)
    targets = np.zeros((num_scenes, max(num_classes, len(FMNIST_CLASSES))), np.uint8)
    boxes = np.full((num_scenes, max_items, 5), -1, np.int64)
    span = canvas - ITEM + 1
    for i in range(num_scenes):
        k = int(rng.integers(min_items, max_items + 1))
        for _ in range(100):  # positions for all k items; an unlucky layout that blocks the last ones is redrawn
            placed: list[tuple[int, int]] = []
            for _ in range(200 * k):
                r, c = (int(v) for v in rng.integers(0, span, 2))
                if all(abs(r - pr) >= ITEM or abs(c - pc) >= ITEM for pr, pc in placed):
                    placed.append((r, c))
                    if len(placed) == k:
                        break
            if len(placed) == k:
                break
        else:
            raise DataError(f"scenes: could not place {k} items in scene {i} without overlap; use a larger canvas")
        for j, (r, c) in enumerate(placed):
            idx = int(rng.integers(0, len(images)))
            scenes[i, r:r + ITEM, c:c + ITEM] = images[idx]
            targets[i, labels[idx]] = 1
            boxes[i, j] = (labels[idx], r, c, ITEM, ITEM)
    return scenes, targets, boxes


class MultiLabelImageDataset(InMemoryImageDataset):
    """An in-memory image dataset whose target is a multi-hot (N, num_classes) vector instead of one class."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, classes: Sequence[str],
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None, name: str = "",
                 boxes: torch.Tensor | None = None) -> None:
        if targets.ndim != 2 or targets.shape != (images.shape[0], len(classes)):
            raise DataError(f"{name or 'dataset'}: targets must be (N={images.shape[0]}, {len(classes)}) multi-hot, "
                            f"got {tuple(targets.shape)}")
        # the parent checks images and stats; a dummy label vector passes its label checks
        super().__init__(images, torch.zeros(images.shape[0], dtype=torch.int64), classes, mean, std, name)
        self.labels = targets.to(torch.float32)
        self.boxes = boxes

    @property
    def multi_label(self) -> bool:
        return True

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]

    def __getitems__(self, indices: Sequence[int]) -> ImageBatch:
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return ImageBatch(self.images[idx], self.labels[idx])

    def subset(self, fraction: float, seed: int = 0) -> MultiLabelImageDataset:
        """A seeded random ``fraction`` of the scenes (multi-label targets have no single class to stratify by)."""
        if not 0 < fraction <= 1:
            raise DataError(f"fraction must be in (0, 1], got {fraction}")
        n = max(1, round(fraction * len(self)))
        idx = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n].sort().values
        return MultiLabelImageDataset(self.images[idx], self.labels[idx], self.classes, self._mean, self._std,
                                      f"{self.name}[{fraction:g}]", None if self.boxes is None else self.boxes[idx])


def load_fmnist_scenes(split: str = "train", data_dir: str | None = None, download: bool = False,
                       canvas: int = 112, num_scenes: int = 20_000, num_eval_scenes: int | None = None,
                       min_items: int = 1, max_items: int = 4, seed: int = 0,
                       val_fraction: float = 0.1) -> MultiLabelImageDataset:
    """The scene dataset of ``split``, generated from the Fashion-MNIST images of that split.

    ``split`` "val" is a third set of scenes for choices that must not look at the test split (best epoch,
    SparseViT's search). It is made from a class-stratified, seeded ``val_fraction`` of the Fashion-MNIST
    *training* images that the train scenes never use, so that validation scores are not flattered by items the
    model was trained on (``val_fraction=0``: the old behaviour, val scenes from the same images as train).
    ``num_scenes`` is the size of the train split, ``num_eval_scenes`` that of test and val (default 4,000 /
    2,000). Generation takes a few seconds per 10,000 scenes; nothing is cached.
    """
    from .fashion_mnist import load_fashion_mnist

    offsets = {"train": 0, "test": 1, "val": 2}
    if split not in offsets:
        raise DataError(f"fmnist_scenes: split must be one of {sorted(offsets)}, got {split!r}")
    if not 0 <= val_fraction < 1:
        raise DataError(f"fmnist_scenes: val_fraction must be in [0, 1), got {val_fraction!r}")
    source = load_fashion_mnist("test" if split == "test" else "train", data_dir, download)
    if split != "test" and val_fraction > 0:
        rest, held_out = source.split_off(val_fraction, seed=seed)
        source = held_out if split == "val" else rest
    n = num_scenes if split == "train" else num_eval_scenes or {"test": 4_000, "val": 2_000}[split]
    if not isinstance(n, int) or n < 1:
        raise DataError(f"scenes: num_scenes must be an integer >= 1, got {n!r}")
    scenes, targets, boxes = compose_scenes(source.images[:, 0].numpy(), source.labels.numpy(), n, canvas,
                                            min_items, max_items, seed + offsets[split])
    images = torch.from_numpy(scenes)[:, None]
    return MultiLabelImageDataset(images, torch.from_numpy(targets), FMNIST_CLASSES, None, None,
                                  name=f"fmnist_scenes/{split}", boxes=torch.from_numpy(boxes))
