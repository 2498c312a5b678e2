"""A folder of class subfolders of image files, read with Pillow through :mod:`vitkit.data.image_io`.

Every file is checked when the dataset is built: its header, including the size it declares against
the image limits (so a decompression bomb is reported here, not in the middle of training), or with
``check="decode"`` a full decode. Unreadable files are never dropped silently: they are listed (path and
reason) in ``bad_images`` and in a :class:`BadImageWarning`, and more than ``max_bad_images`` of them is an
error, because a dataset that quietly loses part of its images gives results nobody can reproduce.

A file that passes the header check but fails to decode later (a truncated JPEG) is handled the same way
during training: recorded in ``bad_images``, reported with a :class:`BadImageWarning`, and replaced by the
next sample that loads, until the total of bad files passes ``max_bad_images``; then it is a DataError.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from vitkit.data.base import BadImageWarning, Stats, as_size, compute_mean_std, stratified_indices
from vitkit.data.image_io import (
    BadImageError,
    ImageLimits,
    check_image_source,
    decode_image,
    get_image_limits,
    resize_center_crop,
    to_mode,
)
from vitkit.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
CHECKS = ("header", "decode")
_LIST_LIMIT = 10  # paths shown in one message; all of them stay in ``bad_images``


def _format_bad(bad: Sequence[tuple[str, str]], more: str = "") -> str:
    """The bad files as one line, ``path: reason; path: reason; ... and N more``: a message (a warning or an
    error the command line prints) is one line, whatever the reasons Pillow gave."""
    shown = "; ".join(f"{path}: {' '.join(reason.split())}" for path, reason in bad[:_LIST_LIMIT])
    return shown + (f"; and {len(bad) - _LIST_LIMIT} more{more}" if len(bad) > _LIST_LIMIT else "")


def _check_mode(check: str) -> str:
    check = "header" if check == "verify" else check  # "verify": the old name of "header"
    if check not in CHECKS:
        raise DataError(f"check must be 'header' or 'decode', got {check!r}")
    return check


def check_image(
    path: str,
    mode: Literal["header", "decode", "verify"] = "header",
    *,
    num_channels: int | None = None,
    size: tuple[int, int] | None = None,
    limits: ImageLimits | None = None,
) -> str | None:
    """None if ``path`` passes the check, else the reason (without the path).

    "header" (alias "verify") reads the header, refuses sizes beyond the image limits and checks PNG chunk
    checksums, without decoding, which is fast; "decode" decodes the pixels too (to ``size`` and
    ``num_channels`` when given, exactly as loading does) and so also catches truncated JPEG/WebP data.
    """
    try:
        check_image_source(path, _check_mode(mode), num_channels=num_channels, size=size, limits=limits)
    except BadImageError as e:
        return e.reason
    return None


def load_image(
    path: str, num_channels: int, size: tuple[int, int] | None, limits: ImageLimits | None = None
) -> torch.Tensor:
    """Read one file as a uint8 C×H×W tensor (EXIF orientation applied), or raise DataError naming it.

    The declared size is checked against ``limits`` (default: the limits in force) before decoding.
    """
    return decode_image(path, num_channels, size, limits)


class ImageFolder(Dataset):
    """``root/<class>/**/<image>`` with sorted class folder names as class indices.

    Args:
        root: folder whose subfolders are the classes (hidden folders are ignored).
        image_size: output (h, w) or int; shorter-side bicubic resize + center crop. None keeps each
            file's own size (then batches only stack if all files have the same size).
        num_channels: 1 ("L") or 3 ("RGB"); transparent images are composited onto white.
        max_bad_images: how many unreadable files may be left out (with a warning) before it is an error;
            files found at build time and files that fail to decode later count together.
        check: "header" (header, declared size and checksums; fast) or "decode" (every file is decoded
            as training will); "verify" is an old name of "header".
        mean, std: normalisation stats; if None they are computed lazily from up to ``stats_samples``
            images on first access.
        limits: the image limits (pixels, aspect ratio, formats); default: those in force when the dataset
            is built (:func:`vitkit.data.image_io.get_image_limits`). They travel with the dataset into
            DataLoader workers.

    A file that fails to decode in ``__getitem__`` is appended to ``bad_images``, reported with a
    :class:`BadImageWarning` and replaced by the next sample (in index order, wrapping around) that loads,
    with that sample's label; once ``len(bad_images)`` exceeds ``max_bad_images`` it is a DataError naming
    the file. With DataLoader workers, each worker holds its own copy of the dataset, so each worker
    records and counts the files it meets itself (the message says which worker): the main process's
    ``bad_images`` does not see them, and a bad file can be reported once per worker. The bound then holds
    per worker; use ``check="decode"`` to find every bad file before training instead.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        image_size: int | tuple[int, int] | None,
        num_channels: int = 3,
        max_bad_images: int = 0,
        check: Literal["header", "decode", "verify"] = "header",
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        stats_samples: int = 2000,
        limits: ImageLimits | None = None,
    ) -> None:
        if num_channels not in (1, 3):
            raise DataError(f"num_channels must be 1 or 3, got {num_channels}")
        check = _check_mode(check)
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"{self.root}: image folder root does not exist or is not a folder")
        self.image_size = as_size(image_size)
        self.num_channels = num_channels
        self.stats_samples = stats_samples
        self.max_bad_images = max_bad_images
        self.limits = limits or get_image_limits()
        class_dirs = sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not class_dirs:
            raise DataError(f"{self.root}: no class subfolders found (expected root/<class_name>/<image files>)")
        self.classes = [p.name for p in class_dirs]
        found = [(path, label) for label, d in enumerate(class_dirs) for path in self._image_files(d)]
        if not found:
            raise DataError(
                f"{self.root}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in any of the "
                f"{len(class_dirs)} class folders"
            )
        self.bad_images: list[tuple[str, str]] = []
        self.samples: list[tuple[str, int]] = []
        for path, label in found:
            reason = check_image(path, check, num_channels=num_channels, size=self.image_size, limits=self.limits)
            if reason is None:
                self.samples.append((path, label))
            else:
                self.bad_images.append((path, reason))
        if len(self.bad_images) > max_bad_images:
            raise DataError(
                f"{self.root}: {len(self.bad_images)} unreadable image files, more than max_bad_images="
                f"{max_bad_images}: {_format_bad(self.bad_images)}"
            )
        if self.bad_images:
            warnings.warn(
                f"{self.root}: left out {len(self.bad_images)} unreadable image files "
                f"(max_bad_images={max_bad_images}): {_format_bad(self.bad_images, ' (dataset.bad_images lists all)')}",
                BadImageWarning,
                stacklevel=2,
            )
        self._bad_paths = {path for path, _ in self.bad_images}
        counts = np.bincount([label for _, label in self.samples], minlength=len(self.classes))
        empty = [self.classes[i] for i in np.flatnonzero(counts == 0)]
        if empty:
            warnings.warn(f"{self.root}: class folders without usable images: {empty}", UserWarning, stacklevel=2)
        self._mean = tuple(float(m) for m in mean) if mean is not None else None
        self._std = tuple(float(s) for s in std) if std is not None else None

    @staticmethod
    def _image_files(folder: Path) -> list[str]:
        files = []
        # Symlinked class folders work; symlinked folders below them are not followed (no loops).
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            files += [
                os.path.join(dirpath, f)
                for f in sorted(filenames)
                if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)
            ]
        return files

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]

    def _with_samples(self, indices: torch.Tensor) -> ImageFolder:
        """A view of some files: the same classes, limits and statistics, its own copy of ``bad_images`` (the
        files left out at build time count against its ``max_bad_images`` too; files found bad later are
        recorded in it only)."""
        part = copy.copy(self)
        part.samples = [self.samples[int(i)] for i in indices]
        part.bad_images, part._bad_paths = list(self.bad_images), set(self._bad_paths)
        return part

    def split_off(self, fraction: float, seed: int = 0) -> tuple[ImageFolder, ImageFolder]:
        """(rest, held_out): a class-stratified, seeded ``fraction`` of the files held out (``data.val_fraction``:
        a validation split for a folder that has only train/)."""
        if not 0.0 < fraction < 1.0:
            raise DataError(f"{self.root}: a held-out fraction must be in (0, 1), got {fraction}")
        held = stratified_indices(self.targets, fraction, seed)
        keep = torch.ones(len(self), dtype=torch.bool)
        keep[held] = False
        return self._with_samples(torch.nonzero(keep).flatten()), self._with_samples(held)

    def _stats(self) -> tuple[Stats, Stats]:
        if self._mean is None or self._std is None:
            self._mean, self._std = compute_mean_std(self, max_samples=self.stats_samples)
        return self._mean, self._std

    @property
    def mean(self) -> Stats:
        return self._stats()[0]

    @property
    def std(self) -> Stats:
        return self._stats()[1]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        if path not in self._bad_paths:
            try:
                return self._load(path), label
            except BadImageError as e:
                self._record_bad(path, e.reason)
        return self._replacement(index)

    def _load(self, path: str) -> torch.Tensor:
        return decode_image(path, self.num_channels, self.image_size, self.limits)

    def _record_bad(self, path: str, reason: str) -> None:
        """Count a file that failed to decode after the build check: warn, or raise past ``max_bad_images``."""
        self.bad_images.append((path, reason))
        self._bad_paths.add(path)
        total = len(self.bad_images)
        worker = get_worker_info()
        where = f" (counted in DataLoader worker {worker.id}; each worker counts its own)" if worker else ""
        if total > self.max_bad_images:
            raise DataError(
                f"{path}: cannot load image: {reason}; that makes {total} unreadable image files in {self.root}, "
                f"more than max_bad_images={self.max_bad_images}{where}"
            )
        warnings.warn(
            f"{path}: cannot load image: {reason}; skipped and replaced by the next loadable sample "
            f"({total} unreadable image files in {self.root}, max_bad_images={self.max_bad_images}){where}",
            BadImageWarning,
            stacklevel=3,
        )

    def _replacement(self, index: int) -> tuple[torch.Tensor, int]:
        """The next sample after ``index`` (wrapping around) that loads: deterministic, whatever the order."""
        n = len(self.samples)
        for step in range(1, n):
            path, label = self.samples[(index + step) % n]
            if path in self._bad_paths:
                continue
            try:
                return self._load(path), label
            except BadImageError as e:
                self._record_bad(path, e.reason)
        raise DataError(f"{self.root}: none of the {n} image files can be loaded any more (see dataset.bad_images)")

    def subset(self, fraction: float, seed: int = 0) -> ImageFolder:
        """Class-stratified, seeded ``fraction`` of the files (nested across fractions for one seed)."""
        return self._with_samples(stratified_indices(self.targets, fraction, seed))

    def __repr__(self) -> str:
        return (
            f"ImageFolder(root={str(self.root)!r}, n={len(self)}, classes={len(self.classes)}, "
            f"size={self.image_size}, channels={self.num_channels}, bad={len(self.bad_images)})"
        )


__all__ = [
    "CHECKS",
    "IMAGE_EXTENSIONS",
    "BadImageError",
    "ImageFolder",
    "ImageLimits",
    "check_image",
    "load_image",
    "resize_center_crop",
    "to_mode",
]
