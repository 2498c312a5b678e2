"""The 8×8 handwritten digits (1797 images, 10 classes), shipped with vitkit for smoke tests.

It needs no download and trains in seconds, so every code path can be exercised on any machine.
The asset ``assets/digits.npz`` was generated once by :func:`write_digits_asset` from
``sklearn.datasets.load_digits`` (the UCI "Optical Recognition of Handwritten Digits" data as
distributed with scikit-learn under the BSD-3-Clause licence): pixels 0..16 are scaled to 0..255
and a class-stratified 80/20 train/test split (seed 0) is stored in the file itself, so the split
can never change with a numpy version.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from vitkit.data.base import (
    InMemoryImageDataset,
    adapt_channels,
    as_size,
    check_split,
    compute_mean_std,
    resize_images,
)
from vitkit.errors import DataError

ASSET = Path(__file__).parent / "assets" / "digits.npz"
CLASS_NAMES = [str(i) for i in range(10)]


def write_digits_asset(path: str | Path = ASSET, seed: int = 0) -> None:
    """Regenerate the asset from scikit-learn (needed only by maintainers; sklearn is not a dependency)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)
    labels = d.target.astype(np.uint8)
    rng = np.random.default_rng(seed)
    is_test = np.zeros(len(labels), dtype=bool)
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        is_test[idx[: round(0.2 * len(idx))]] = True
    np.savez_compressed(path, images=images, labels=labels, is_test=is_test)


def load_digits_arrays(path: str | Path = ASSET) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images N×8×8 uint8, labels N, is_test N bool) from the packaged asset, validated."""
    try:
        with np.load(path, allow_pickle=False) as z:
            images, labels, is_test = z["images"], z["labels"], z["is_test"]
    except (OSError, KeyError, ValueError) as e:
        raise DataError(f"{path}: cannot read the digits asset ({type(e).__name__}: {e})") from e
    n = images.shape[0]
    if images.shape[1:] != (8, 8) or images.dtype != np.uint8 or labels.shape != (n,) or is_test.shape != (n,):
        raise DataError(
            f"{path}: unexpected shapes images={images.shape} {images.dtype}, labels={labels.shape}, "
            f"is_test={is_test.shape}"
        )
    return images, labels, is_test.astype(bool)


def load_digits(
    split: str = "train",
    image_size: int | tuple[int, int] | None = None,
    num_channels: int | None = None,
) -> InMemoryImageDataset:
    """Digits ``split`` (1438 train / 359 test) as 1×8×8 uint8, optionally resized (bicubic) and/or 3-channel.

    Mean/std are those of the training split after resizing, so both splits share them.
    """
    check_split(split)
    images, labels, is_test = load_digits_arrays()
    x = torch.from_numpy(images).unsqueeze(1)
    size = as_size(image_size)
    if size is not None:
        x = resize_images(x, size)
    train_x = x[torch.from_numpy(~is_test)]
    mean, std = compute_mean_std(InMemoryImageDataset(train_x, labels[~is_test], CLASS_NAMES), max_samples=None)
    mask = torch.from_numpy(is_test if split == "test" else ~is_test)
    x = adapt_channels(x[mask], num_channels)
    if num_channels not in (None, 1):
        mean, std = mean * num_channels, std * num_channels
    return InMemoryImageDataset(
        x, torch.from_numpy(labels[mask.numpy()].astype(np.int64)), CLASS_NAMES, mean, std, name=f"digits/{split}"
    )
