"""Datasets (uint8 C×H×W images, int labels) and batch-wise kornia transforms.

``build_dataset`` is the single entry point configs use; the loaders it calls are exported too.
Heavy modules (kornia) load only when the transforms are first used.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitkit.data.base import (
    BadImageWarning,
    ImageBatch,
    ImageDataset,
    ImagesOnly,
    InMemoryImageDataset,
    as_size,
    batch_collate,
    compute_mean_std,
    images_only,
    make_loader,
    stratified_indices,
)
from vitkit.errors import DataError

if TYPE_CHECKING:
    from vitkit.data.image_folder import ImageFolder

DATASETS = ("fashion_mnist", "fmnist_scenes", "fmnist_captions", "caption_folder", "cifar10", "cifar100", "digits",
            "image_folder")
_SPLIT_DIRS = ("train", "val", "validation", "test")
# Extra keyword arguments each dataset accepts, so a misspelt config key is a clear error.
_EXTRA_KEYS = {
    "fashion_mnist": {"classes"},
    "fmnist_captions": {"num", "seed", "two_items"},
    "caption_folder": {"root"},
    "fmnist_scenes": {"canvas", "num_scenes", "num_eval_scenes", "min_items", "max_items", "seed",
                      "val_fraction"},
    "cifar10": {"classes"},
    "cifar100": {"label_type", "classes"},
    "digits": {"classes"},
    "image_folder": {"root", "check", "mean", "std", "stats_samples", "limits"},
}
# Loaders are imported on first use: ``python -m vitkit.data.fashion_mnist`` must not find its own module
# already imported by this package (runpy warns), and kornia should load only when transforms are used.
_LAZY = {
    "load_fashion_mnist": "fashion_mnist",
    "load_cifar": "cifar",
    "load_digits": "digits",
    "ImageFolder": "image_folder",
    "BadImageError": "image_io",
    "ImageLimits": "image_io",
    "decode_image": "image_io",
    "get_image_limits": "image_io",
    "set_image_limits": "image_io",
    "AugmentConfig": "transforms",
    "BatchTransform": "transforms",
    "MixupCutmix": "transforms",
    "build_mixup": "transforms",
    "build_transforms": "transforms",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"vitkit.data.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# The evaluation split is found by name: a folder with train/ and val/ (the usual ImageNet-style layout) serves
# split "test" from val/ when it has no test/. The reverse never happens: choices are not made on test.
_SPLIT_NAMES = {"test": ("test", "val", "validation"), "val": ("val", "validation")}


def _image_folder_root(root: str | Path, split: str) -> Path:
    """``root/<split>`` when root has split folders (for "test": test/, else val/ or validation/); else root
    itself, for the train split only."""
    root = Path(root)
    if any((root / s).is_dir() for s in _SPLIT_DIRS):
        found = next((root / s for s in _SPLIT_NAMES.get(split, (split,)) if (root / s).is_dir()), None)
        if found is None:
            present = [s for s in _SPLIT_DIRS if (root / s).is_dir()]
            raise DataError(f"{root / split}: split folder not found (found: {present})")
        return found
    if split != "train":
        raise DataError(
            f"{root}: has no train/val/test subfolders, so it can only serve split 'train' (asked for {split!r})"
        )
    return root


def build_dataset(
    name: str,
    split: str,
    data_dir: str | None = None,
    image_size: int | tuple[int, int] | None = None,
    num_channels: int | None = None,
    download: bool = False,
    max_bad_images: int = 0,
    **kw: Any,
) -> InMemoryImageDataset | ImageFolder:
    """Dataset ``name`` for ``split`` ("train"/"test"; image folders also "val").

    Extra keywords: ``root`` (image_folder; defaults to ``data_dir``), ``label_type`` ("fine"/"coarse",
    cifar100), ``check``/``mean``/``std``/``stats_samples``/``limits`` (image_folder), ``classes`` (the
    in-memory sets: keep only these classes, by name or index, relabelled 0..k-1 in the given order, e.g. a
    transfer target made of classes a pretraining never saw).
    """
    if name not in _EXTRA_KEYS:
        raise DataError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    unknown = sorted(set(kw) - _EXTRA_KEYS[name])
    if unknown:
        raise DataError(
            f"dataset {name!r} does not take {unknown}; extra keys it accepts: {sorted(_EXTRA_KEYS[name]) or 'none'}"
        )
    classes = kw.pop("classes", None)
    if classes is not None:
        data = build_dataset(name, split, data_dir, image_size, num_channels, download, max_bad_images, **kw)
        return data.select_classes(classes)
    if name == "fashion_mnist":
        from vitkit.data.fashion_mnist import load_fashion_mnist

        return load_fashion_mnist(split, data_dir, download, image_size, num_channels)
    if name in ("fmnist_captions", "caption_folder"):
        from vitkit.data.captions import load_caption_folder, load_fmnist_captions

        if name == "fmnist_captions":
            if (image_size is not None and as_size(image_size) != (28, 56)) or num_channels not in (None, 1):
                raise DataError("fmnist_captions: canvases are 1x28x56; image_size/num_channels cannot change them")
            return load_fmnist_captions(split, data_dir, download, **kw)
        root = Path(kw.pop("root", None) or data_dir or "")
        files = [root / f"{split}{ext}" for ext in (".jsonl", ".csv")]
        found = next((f for f in files if f.is_file()), None)
        if found is None:
            raise DataError(f"caption_folder: no {files[0].name} or {files[1].name} in {root} (rows: file, caption)")
        return load_caption_folder(root, found, num_channels or 3, image_size, max_bad_images)
    if name == "fmnist_scenes":
        from vitkit.data.scenes import load_fmnist_scenes

        if image_size is not None and as_size(image_size) != (kw.get("canvas", 112),) * 2:
            raise DataError("fmnist_scenes: set the canvas size with data.args.canvas, not data.image_size")
        if num_channels not in (None, 1):
            raise DataError(f"fmnist_scenes: scenes are gray (1 channel), the model asks for {num_channels}")
        return load_fmnist_scenes(split, data_dir, download, **kw)
    if name in ("cifar10", "cifar100"):
        from vitkit.data.cifar import load_cifar

        if download:
            raise DataError(f"{name}: automatic download is not supported; put the python-version archive in data_dir")
        return load_cifar(name, split, data_dir, image_size, num_channels, **kw)  # type: ignore[arg-type]
    if name == "digits":
        from vitkit.data.digits import load_digits

        return load_digits(split, image_size, num_channels)
    from vitkit.data.image_folder import ImageFolder

    root = kw.pop("root", None) or data_dir
    if root is None:
        raise DataError("image_folder needs root=<folder of class subfolders> (or data_dir)")
    return ImageFolder(
        _image_folder_root(root, split), image_size, num_channels or 3, max_bad_images=max_bad_images, **kw
    )


__all__ = [
    "DATASETS",
    "AugmentConfig",
    "BadImageError",
    "BadImageWarning",
    "BatchTransform",
    "ImageBatch",
    "ImageDataset",
    "ImageFolder",
    "ImageLimits",
    "ImagesOnly",
    "InMemoryImageDataset",
    "MixupCutmix",
    "batch_collate",
    "build_dataset",
    "build_mixup",
    "build_transforms",
    "compute_mean_std",
    "decode_image",
    "get_image_limits",
    "images_only",
    "load_cifar",
    "load_digits",
    "load_fashion_mnist",
    "make_loader",
    "set_image_limits",
    "stratified_indices",
]
