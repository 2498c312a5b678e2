"""A folder of class subfolders of image files, read with Pillow.

Every file is checked when the dataset is built. Unreadable files are never dropped silently:
they are listed (path and reason) in ``bad_images`` and in a :class:`BadImageWarning`, and more
than ``max_bad_images`` of them is an error, because a dataset that quietly loses part of its
images gives results nobody can reproduce.
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
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from vitkit.data.base import BadImageWarning, Stats, as_size, compute_mean_std, stratified_indices
from vitkit.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
_LIST_LIMIT = 20  # paths shown in one message; all of them stay in ``bad_images``


def _format_bad(bad: Sequence[tuple[str, str]]) -> str:
    lines = [f"  {path}: {reason}" for path, reason in bad[:_LIST_LIMIT]]
    if len(bad) > _LIST_LIMIT:
        lines.append(f"  ... and {len(bad) - _LIST_LIMIT} more (see dataset.bad_images)")
    return "\n".join(lines)


def _on_white(im: Image.Image) -> Image.Image:
    """Composite an image with transparency onto white.

    Plain ``convert("RGB")`` would expose whatever colour the transparent pixels happen to store
    (often black), while logos, icons and product shots with alpha are meant to be seen on white.
    """
    rgba = im.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _high_depth_to_8bit(im: Image.Image) -> Image.Image:
    """16-bit / int / float gray images: Pillow's ``convert("L")`` clips instead of scaling, so scale here."""
    arr = np.asarray(im)
    if im.mode == "F":
        arr = arr * 255.0 if float(arr.max(initial=0.0)) <= 1.0 else arr
    elif im.mode.startswith("I;16") or float(arr.max(initial=0)) > 255:
        arr = arr / 257.0  # 0..65535 → 0..255
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")


def to_mode(im: Image.Image, num_channels: int) -> Image.Image:
    """Convert any Pillow mode to "L" (1 channel) or "RGB" (3 channels).

    Transparency (RGBA, LA, PA, palette with a transparent colour) is composited onto white;
    CMYK/YCbCr/LAB/HSV use Pillow's own conversions; 16-bit gray is scaled, not clipped.
    """
    target = {1: "L", 3: "RGB"}.get(num_channels)
    if target is None:
        raise DataError(f"num_channels must be 1 or 3, got {num_channels}")
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        im = _high_depth_to_8bit(im)
    has_alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info)
    if has_alpha:
        im = _on_white(im)
    elif im.mode not in ("1", "L", "P", "RGB"):
        im = im.convert("RGB")  # CMYK, YCbCr, LAB, HSV: not every pair has a direct conversion to "L"
    return im if im.mode == target else im.convert(target)


def resize_center_crop(im: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Shorter-side resize then center crop to ``size`` (h, w), done as one bicubic resize of the crop box.

    Cropping the central box with the target aspect ratio first and resizing it is the same result as
    resize-then-crop, but resamples fewer pixels. Pillow's bicubic filter antialiases when shrinking.
    """
    th, tw = size
    w, h = im.size
    if (w, h) == (tw, th):
        return im
    scale = max(th / h, tw / w)
    crop_w, crop_h = tw / scale, th / scale
    left, top = (w - crop_w) / 2, (h - crop_h) / 2
    return im.resize((tw, th), Image.Resampling.BICUBIC, box=(left, top, left + crop_w, top + crop_h))


def check_image(path: str, mode: Literal["verify", "decode"] = "verify") -> str | None:
    """None if Pillow can read ``path``, else the reason.

    "verify" checks the header and (for PNG) the chunk checksums without decoding, which is fast;
    "decode" decodes the pixels too and also catches truncated JPEG/WebP data.
    """
    try:
        with Image.open(path) as im:
            if mode == "decode":
                im.load()
            else:
                im.verify()
    except Exception as e:  # Pillow raises many types (OSError, SyntaxError, ValueError, struct.error...)
        return f"{type(e).__name__}: {e}"
    return None


def load_image(path: str, num_channels: int, size: tuple[int, int] | None) -> torch.Tensor:
    """Read one file as a uint8 C×H×W tensor (EXIF orientation applied), or raise DataError naming it."""
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            im = to_mode(im, num_channels)
            if size is not None:
                im = resize_center_crop(im, size)
            arr = np.array(im, dtype=np.uint8)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{path}: cannot load image ({type(e).__name__}: {e})") from e
    t = torch.from_numpy(arr)
    return t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1).contiguous()


class ImageFolder(Dataset):
    """``root/<class>/**/<image>`` with sorted class folder names as class indices.

    Args:
        root: folder whose subfolders are the classes (hidden folders are ignored).
        image_size: output (h, w) or int; shorter-side bicubic resize + center crop. None keeps each
            file's own size (then batches only stack if all files have the same size).
        num_channels: 1 ("L") or 3 ("RGB"); transparent images are composited onto white.
        max_bad_images: how many unreadable files may be dropped (with a warning) before it is an error.
        check: "verify" (header + checksums, fast) or "decode" (full decode of every file).
        mean, std: normalisation stats; if None they are computed lazily from up to ``stats_samples``
            images on first access.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        image_size: int | tuple[int, int] | None,
        num_channels: int = 3,
        max_bad_images: int = 0,
        check: Literal["verify", "decode"] = "verify",
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        stats_samples: int = 2000,
    ) -> None:
        if num_channels not in (1, 3):
            raise DataError(f"num_channels must be 1 or 3, got {num_channels}")
        if check not in ("verify", "decode"):
            raise DataError(f"check must be 'verify' or 'decode', got {check!r}")
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"{self.root}: image folder root does not exist or is not a folder")
        self.image_size = as_size(image_size)
        self.num_channels = num_channels
        self.stats_samples = stats_samples
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
            reason = check_image(path, check)
            if reason is None:
                self.samples.append((path, label))
            else:
                self.bad_images.append((path, reason))
        if len(self.bad_images) > max_bad_images:
            raise DataError(
                f"{self.root}: {len(self.bad_images)} unreadable image files, more than max_bad_images="
                f"{max_bad_images}:\n{_format_bad(self.bad_images)}"
            )
        if self.bad_images:
            warnings.warn(
                f"{self.root}: left out {len(self.bad_images)} unreadable image files "
                f"(max_bad_images={max_bad_images}):\n{_format_bad(self.bad_images)}",
                BadImageWarning,
                stacklevel=2,
            )
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
        return load_image(path, self.num_channels, self.image_size), label

    def subset(self, fraction: float, seed: int = 0) -> ImageFolder:
        """Class-stratified, seeded ``fraction`` of the files (nested across fractions for one seed)."""
        idx = stratified_indices(self.targets, fraction, seed).tolist()
        sub = copy.copy(self)
        sub.samples = [self.samples[i] for i in idx]
        return sub

    def __repr__(self) -> str:
        return (
            f"ImageFolder(root={str(self.root)!r}, n={len(self)}, classes={len(self.classes)}, "
            f"size={self.image_size}, channels={self.num_channels}, bad={len(self.bad_images)})"
        )
