"""Dataset contract shared by every vitkit dataset, plus the in-memory dataset and batch helpers.

Datasets hand out **uint8** images of shape (C, H, W) and int labels. Conversion to float,
augmentation and normalisation happen later on whole batches (see :mod:`vitkit.data.transforms`),
because per-sample Python transforms are the bottleneck of small-image training on CPU.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, default_collate

from vitkit.errors import DataError
from vitkit.schema import machine_memory

Stats = tuple[float, ...]


class BadImageWarning(UserWarning):
    """Some image files were unreadable and were left out (the dataset lists them in ``bad_images``)."""


class ImageDataset(Protocol):
    """What the training code relies on, whatever the source of the images (a static type only:
    an ``isinstance`` check would evaluate the lazily computed ``mean``/``std`` on Python < 3.12)."""

    classes: list[str]
    num_channels: int
    image_size: tuple[int, int] | None

    @property
    def mean(self) -> Stats: ...

    @property
    def std(self) -> Stats: ...

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]: ...


class ImageBatch(NamedTuple):
    """A batch that is already stacked; its own type lets :func:`batch_collate` tell it from a sample list."""

    images: torch.Tensor
    labels: torch.Tensor


def data_root() -> Path:
    """Cache folder for downloaded data: ``$VITKIT_DATA`` if set, else ``./data`` (relative to the cwd)."""
    return Path(os.environ.get("VITKIT_DATA") or "data")


def as_size(image_size: int | Sequence[int] | None) -> tuple[int, int] | None:
    """Accept ``28`` or ``(28, 28)`` everywhere a size is configured, and reject anything else loudly."""
    if image_size is None:
        return None
    if isinstance(image_size, int):
        size = (image_size, image_size)
    else:
        size = tuple(int(s) for s in image_size)
    if len(size) != 2 or min(size) <= 0:
        raise DataError(f"image_size must be a positive int or (height, width), got {image_size!r}")
    return size  # type: ignore[return-value]


def check_split(split: str, valid: Sequence[str] = ("train", "test")) -> str:
    if split not in valid:
        raise DataError(f"unknown split {split!r}; valid splits: {', '.join(valid)}")
    return split


def stratified_indices(labels: Sequence[int] | torch.Tensor, fraction: float, seed: int = 0) -> torch.Tensor:
    """Sorted indices of a class-balanced ``fraction`` of the samples.

    Each class is shuffled once with ``seed`` and its first ``round(fraction * n_c)`` samples are taken,
    so for one seed the 10 % subset is contained in the 30 % one: data-size studies then compare
    growing training sets rather than unrelated samples.
    """
    if not 0.0 < fraction <= 1.0:
        raise DataError(f"subset fraction must be in (0, 1], got {fraction}")
    lab = torch.as_tensor(labels, dtype=torch.int64)
    gen = torch.Generator().manual_seed(seed)
    keep = []
    for c in torch.unique(lab).tolist():
        idx = torch.nonzero(lab == c).flatten()
        perm = idx[torch.randperm(len(idx), generator=gen)]
        k = max(1, round(fraction * len(idx)))
        keep.append(perm[:k])
    if not keep:
        return torch.zeros(0, dtype=torch.int64)
    return torch.sort(torch.cat(keep)).values


def resize_images(images: torch.Tensor, size: tuple[int, int], chunk: int = 4096) -> torch.Tensor:
    """Bicubic (antialiased) resize of a uint8 N×C×H×W tensor, in chunks to bound float memory."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    needed = images.shape[0] * images.shape[1] * size[0] * size[1]
    limit = machine_memory() // 2
    if needed > limit:
        raise DataError(f"resizing {images.shape[0]} in-memory images to {size[0]}x{size[1]} needs "
                        f"{needed / 2**30:.1f} GiB, more than half of this machine's memory "
                        f"({2 * limit / 2**30:.1f} GiB); choose a smaller data.image_size")
    out = torch.empty((images.shape[0], images.shape[1], *size), dtype=torch.uint8)
    for start in range(0, images.shape[0], chunk):
        part = images[start : start + chunk].float()
        part = F.interpolate(part, size=size, mode="bicubic", align_corners=False, antialias=True)
        out[start : start + chunk] = part.round_().clamp_(0, 255).to(torch.uint8)
    return out


def adapt_channels(images: torch.Tensor, num_channels: int | None) -> torch.Tensor:
    """Give a uint8 N×C×H×W tensor the requested channel count.

    1 → 3 repeats the gray channel (a free ``expand`` view); 3 → 1 uses ITU-R 601 luma, the same
    weights as Pillow's ``convert("L")``, so in-memory and image-folder data agree.
    """
    c = images.shape[1]
    if num_channels is None or num_channels == c:
        return images
    if c == 1 and num_channels == 3:
        return images.expand(-1, 3, -1, -1)
    if c == 3 and num_channels == 1:
        w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        return (images.float() * w).sum(1, keepdim=True).round_().clamp_(0, 255).to(torch.uint8)
    raise DataError(f"cannot convert images of shape {tuple(images.shape)} to {num_channels} channels")


def _stats_from_sums(total: torch.Tensor, total_sq: torch.Tensor, count: int) -> tuple[Stats, Stats]:
    mean = total / count
    var = (total_sq / count - mean**2).clamp_min(0)
    return tuple(float(m) for m in mean), tuple(float(s) for s in var.sqrt())


def compute_mean_std(dataset: Any, max_samples: int | None = 2000, seed: int = 0) -> tuple[Stats, Stats]:
    """Per-channel mean/std of pixel values scaled to [0, 1], from up to ``max_samples`` random images.

    A seeded sample keeps the stats reproducible while avoiding a full pass over a large folder.
    Works on anything indexable returning (uint8 C×H×W, label); images may differ in size.
    """
    n = len(dataset)
    if n == 0:
        raise DataError("cannot compute mean/std of an empty dataset")
    if max_samples is None or max_samples >= n:
        indices = torch.arange(n)
    else:
        indices = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_samples]
    images = getattr(dataset, "images", None)
    if isinstance(images, torch.Tensor):
        chunks: Any = (images[indices[i : i + 4096]] for i in range(0, len(indices), 4096))
    else:
        chunks = (dataset[int(i)][0].unsqueeze(0) for i in indices)
    total = total_sq = None
    count = 0
    for chunk in chunks:
        x = chunk.to(torch.float64).div_(255.0)
        s, sq = x.sum(dim=(0, 2, 3)), (x * x).sum(dim=(0, 2, 3))
        total = s if total is None else total + s
        total_sq = sq if total_sq is None else total_sq + sq
        count += x.shape[0] * x.shape[2] * x.shape[3]
    assert total is not None and total_sq is not None
    return _stats_from_sums(total, total_sq, count)


class InMemoryImageDataset(Dataset):
    """All images in one uint8 N×C×H×W tensor; small datasets (MNIST-like, CIFAR, digits) fit easily.

    ``__getitems__`` returns a whole stacked batch with a single index operation. Use it with
    :func:`batch_collate` (``DataLoader(ds, batch_size=..., collate_fn=batch_collate)``): the
    default collate would try to treat the batch as a list of samples.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor | Sequence[int] | np.ndarray,
        classes: Sequence[str],
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        name: str = "",
    ) -> None:
        self.name = name or type(self).__name__
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
            shape = tuple(images.shape) if hasattr(images, "shape") else type(images).__name__
            dtype = getattr(images, "dtype", None)
            raise DataError(f"{self.name}: images must be a uint8 N×C×H×W tensor, got {shape} {dtype}")
        labels = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels)
        if labels.dim() != 1 or labels.shape[0] != images.shape[0] or labels.is_floating_point():
            raise DataError(
                f"{self.name}: labels must be N={images.shape[0]} integers, got shape {tuple(labels.shape)} "
                f"{labels.dtype}"
            )
        labels = labels.to(torch.int64)
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= len(classes)):
            raise DataError(
                f"{self.name}: labels range {int(labels.min())}..{int(labels.max())} does not fit "
                f"{len(classes)} classes"
            )
        self.images = images
        self.labels = labels
        self.classes = list(classes)
        self.num_channels = int(images.shape[1])
        self.image_size: tuple[int, int] | None = (int(images.shape[2]), int(images.shape[3]))
        for what, stats in (("mean", mean), ("std", std)):
            if stats is not None and len(stats) != self.num_channels:
                raise DataError(f"{self.name}: {what} has {len(stats)} values for {self.num_channels} channels")
        self._mean = tuple(float(m) for m in mean) if mean is not None else None
        self._std = tuple(float(s) for s in std) if std is not None else None

    @property
    def mean(self) -> Stats:
        if self._mean is None:
            self._mean, self._std = compute_mean_std(self, max_samples=None)
        return self._mean

    @property
    def std(self) -> Stats:
        if self._std is None:
            self._mean, self._std = compute_mean_std(self, max_samples=None)
        return self._std

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])

    def __getitems__(self, indices: Sequence[int]) -> ImageBatch:
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return ImageBatch(self.images[idx], self.labels[idx])

    def subset(self, fraction: float, seed: int = 0) -> InMemoryImageDataset:
        """Class-stratified, seeded ``fraction`` of this dataset (nested across fractions for one seed)."""
        idx = stratified_indices(self.labels, fraction, seed)
        return InMemoryImageDataset(
            self.images[idx], self.labels[idx], self.classes, self._mean, self._std,
            name=f"{self.name}[{fraction:g}]",
        )

    def select_classes(self, classes: Sequence[int | str]) -> InMemoryImageDataset:
        """Only the images of ``classes`` (names or indices), relabelled 0..k-1 in the order given."""
        if isinstance(classes, (str, int)) or not len(classes):
            raise DataError(f"{self.name}: classes must be a non-empty list of class names or indices, "
                            f"got {classes!r}")
        picked = []
        for c in classes:
            if isinstance(c, str) and c in self.classes:
                picked.append(self.classes.index(c))
            elif isinstance(c, int) and not isinstance(c, bool) and 0 <= c < len(self.classes):
                picked.append(c)
            else:
                raise DataError(f"{self.name}: unknown class {c!r}; classes are 0..{len(self.classes) - 1} or "
                                f"{', '.join(self.classes)}")
        if len(set(picked)) != len(picked):
            raise DataError(f"{self.name}: classes {list(classes)} name a class twice")
        new_label = torch.full((len(self.classes),), -1, dtype=torch.int64)
        new_label[torch.tensor(picked)] = torch.arange(len(picked))
        idx = torch.nonzero(new_label[self.labels] >= 0).flatten()
        return InMemoryImageDataset(self.images[idx], new_label[self.labels[idx]], [self.classes[i] for i in picked],
                                    self._mean, self._std, name=f"{self.name}[{len(picked)} classes]")

    def split_off(self, fraction: float, seed: int = 0) -> tuple[InMemoryImageDataset, InMemoryImageDataset]:
        """(rest, held_out): a class-stratified, seeded ``fraction`` held out, e.g. a validation split carved
        from the training set so that choices (learning rate, epoch, pick) never look at the test set."""
        if not 0.0 < fraction < 1.0:
            raise DataError(f"{self.name}: a held-out fraction must be in (0, 1), got {fraction}")
        held = stratified_indices(self.labels, fraction, seed)
        keep = torch.ones(len(self), dtype=torch.bool)
        keep[held] = False
        rest = torch.nonzero(keep).flatten()
        make = lambda idx, tag: InMemoryImageDataset(  # noqa: E731
            self.images[idx], self.labels[idx], self.classes, self._mean, self._std, name=f"{self.name}[{tag}]")
        return make(rest, f"train-{fraction:g}"), make(held, f"val {fraction:g}")

    def __repr__(self) -> str:
        return (
            f"{self.name}(n={len(self)}, channels={self.num_channels}, size={self.image_size}, "
            f"classes={len(self.classes)})"
        )


class ImagesOnly(Dataset):
    """The images of a labelled dataset without its labels: what self-supervised pretraining trains on.

    Batches are plain uint8 (B, C, H, W) tensors; everything else (``classes``, ``mean``, ``std``, sizes)
    reads through to the wrapped dataset, so normalisation and input sizes stay the source's.
    """

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.dataset[index][0]

    def __getitems__(self, indices: Sequence[int]) -> torch.Tensor:
        if hasattr(self.dataset, "__getitems__"):
            return batch_images_of(self.dataset.__getitems__(indices))
        return torch.stack([self.dataset[int(i)][0] for i in indices])

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":  # not set yet (unpickling): avoid infinite recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __repr__(self) -> str:
        return f"ImagesOnly({self.dataset!r})"


def batch_images_of(batch: Any) -> torch.Tensor:
    return batch.images if isinstance(batch, ImageBatch) else batch_collate(batch).images


def images_only(dataset: Any) -> ImagesOnly:
    """An image-only view of any vitkit dataset (see :class:`ImagesOnly`)."""
    return dataset if isinstance(dataset, ImagesOnly) else ImagesOnly(dataset)


def batch_collate(batch: Any) -> ImageBatch | Any:
    """Collate for vitkit datasets: pass a pre-stacked :class:`ImageBatch` through, else stack samples.

    The DataLoader calls ``collate_fn(dataset.__getitems__(indices))`` when the dataset defines
    ``__getitems__`` and ``collate_fn([dataset[i] for i in indices])`` otherwise; both end here.
    """
    if isinstance(batch, (ImageBatch, torch.Tensor, Mapping)):  # pre-stacked (dict batches: captions, ...)
        return batch
    if isinstance(batch, Sequence) and batch and all(
        isinstance(s, (tuple, list)) and len(s) == 2 and isinstance(s[0], torch.Tensor) for s in batch
    ):
        shapes = {tuple(s[0].shape) for s in batch}
        if len(shapes) > 1:
            raise DataError(
                f"cannot stack images of different shapes {sorted(shapes)} into one batch; "
                "give the dataset an image_size"
            )
        images = torch.stack([s[0] for s in batch])
        labels = torch.as_tensor([int(s[1]) for s in batch], dtype=torch.int64)
        return ImageBatch(images, labels)
    return default_collate(batch)


def make_loader(
    dataset: Any,
    batch_size: int,
    shuffle: bool = False,
    num_workers: int = 0,
    drop_last: bool = False,
    seed: int | None = None,
    **kw: Any,
) -> DataLoader:
    """DataLoader wired with :func:`batch_collate` (the default collate cannot take pre-stacked batches).

    ``seed`` fixes the shuffling order independently of the global RNG, for reproducible epochs.
    """
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers, drop_last=drop_last,
        collate_fn=batch_collate, generator=generator, persistent_workers=num_workers > 0, **kw,
    )
