"""Batch-wise augmentation and normalisation with kornia (no torchvision).

Datasets hand out uint8 batches; these modules turn them into normalised float batches in a few
vectorised ops, so augmentation costs milliseconds per batch instead of a Python loop per image,
and can run on the GPU next to the model.

Train pipeline order: scale to [0, 1] → (resize) → crop → horizontal flip → RandAugment/TrivialAugment
→ normalise → random erasing. Erasing comes after normalisation so its fill value 0 is the dataset's
mean colour rather than black. Mixup/CutMix (:class:`MixupCutmix`) is separate because it also
changes the labels. Contrastive pretraining draws two independently augmented views of each image
(:class:`ContrastiveViews`, settings in :class:`ViewConfig`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import kornia.augmentation as K
import torch
import torch.nn.functional as F
from kornia.augmentation.auto import RandAugment, TrivialAugment
from torch import nn

from vitkit.data.base import as_size
from vitkit.errors import ConfigError, DataError


def settings_from_dict(cls: type, d: Mapping[str, Any] | None, section: str) -> Any:
    """A settings dataclass from a plain/OmegaConf mapping; unknown keys fail by name, so typos never pass."""
    d = dict(d or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"unknown {section} keys {unknown}; valid keys: {sorted(known)}")
    return cls(**d)


@dataclass
class AugmentConfig:
    """Training augmentation options; the defaults apply none, so every choice is explicit in a config.

    ``randaugment_m`` is kornia's magnitude scale, 1..29 (30 = maximum). kornia draws one operation
    path per call for the whole batch; ``auto_augment_groups`` > 1 splits the batch so each group draws
    its own operations (more variety per step, a little slower).
    """

    crop: Literal["none", "random_resized", "pad_crop"] = "none"
    crop_scale: tuple[float, float] = (0.35, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    crop_padding: int = 4
    hflip: bool = False
    auto_augment: Literal["none", "randaugment", "trivialaugment"] = "none"
    randaugment_n: int = 2
    randaugment_m: int = 9
    auto_augment_groups: int = 1
    random_erasing: float = 0.0
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_prob: float = 1.0
    mix_switch_prob: float = 0.5
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        choices = {
            "crop": ("none", "random_resized", "pad_crop"),
            "auto_augment": ("none", "randaugment", "trivialaugment"),
        }
        for key, valid in choices.items():
            if getattr(self, key) not in valid:
                raise ConfigError(f"augment.{key}={getattr(self, key)!r}; valid: {', '.join(valid)}")
        self.crop_scale = tuple(self.crop_scale)  # type: ignore[assignment]  # YAML gives lists
        self.crop_ratio = tuple(self.crop_ratio)  # type: ignore[assignment]
        checks = {
            "random_erasing": 0 <= self.random_erasing <= 1,
            "mix_prob": 0 <= self.mix_prob <= 1,
            "mix_switch_prob": 0 <= self.mix_switch_prob <= 1,
            "label_smoothing": 0 <= self.label_smoothing < 1,
            "mixup_alpha": self.mixup_alpha >= 0,
            "cutmix_alpha": self.cutmix_alpha >= 0,
            "randaugment_m": 0 < self.randaugment_m < 30,
            "randaugment_n": self.randaugment_n >= 1,
            "auto_augment_groups": self.auto_augment_groups >= 1,
            "crop_padding": self.crop_padding >= 0,
            "crop_scale": len(self.crop_scale) == 2 and 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1,
            "crop_ratio": len(self.crop_ratio) == 2 and 0 < self.crop_ratio[0] <= self.crop_ratio[1],
        }
        for key, ok in checks.items():
            if not ok:
                raise ConfigError(f"augment.{key}={getattr(self, key)!r} is out of range")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> AugmentConfig:
        """Build from a plain/OmegaConf mapping, rejecting unknown keys so typos do not pass silently."""
        return settings_from_dict(cls, d, "augment")


class Normalize(nn.Module):
    """(x - mean) / std per channel, with the stats as buffers so ``.to(device)`` moves them."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise DataError(f"bad normalisation stats mean={tuple(mean)} std={tuple(std)}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class PolicyAugment(nn.Module):
    """RandAugment/TrivialAugment from kornia, made to work on 1-channel batches and per group.

    kornia's "color" (saturation) op requires 3 channels. Gray batches are repeated to 3 channels and
    channel 0 is taken back: every op keeps the three channels equal on a gray image (saturation of
    a gray image is a no-op), so this is exactly the 1-channel result.
    """

    def __init__(self, policy: nn.Module, groups: int = 1) -> None:
        super().__init__()
        self.policy = policy
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gray = x.shape[1] == 1
        if gray:
            x = x.expand(-1, 3, -1, -1).contiguous()
        parts = x.chunk(self.groups) if self.groups > 1 else (x,)
        out = torch.cat([self.policy(p) for p in parts]) if len(parts) > 1 else self.policy(x)
        return out[:, :1] if gray else out


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True).clamp_(0, 1)


class BatchTransform(nn.Module):
    """uint8 or [0, 1] float batch (B, C, H, W) → normalised float32 batch, augmented when training."""

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        image_size: tuple[int, int] | None = None,
        augment: nn.Module | None = None,
        erase: nn.Module | None = None,
        resize_first: bool = True,
    ) -> None:
        super().__init__()
        self.num_channels = len(mean)
        self.image_size = image_size
        self.resize_first = resize_first
        self.augment = augment
        self.normalize = Normalize(mean, std)
        self.erase = erase

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.num_channels:
            raise DataError(
                f"transform expects a (B, {self.num_channels}, H, W) batch, got shape {tuple(x.shape)}"
            )
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        if self.image_size is not None and self.resize_first:
            x = _resize(x, self.image_size)
        if self.augment is not None:
            x = self.augment(x)
        x = self.normalize(x)
        if self.erase is not None:
            x = self.erase(x)
        return x


def build_transforms(
    cfg: AugmentConfig | Mapping[str, Any] | None,
    train: bool,
    mean: Sequence[float],
    std: Sequence[float],
    image_size: int | tuple[int, int] | None = None,
) -> BatchTransform:
    """Batch transform for training (``train=True``, augmented per ``cfg``) or evaluation (scale + normalise).

    ``image_size`` is the model's input size; batches of another size are resized (bicubic, or by the
    random resized crop itself). Mixup/CutMix is not included: see :func:`build_mixup`.
    """
    if not isinstance(cfg, AugmentConfig):
        cfg = AugmentConfig.from_dict(cfg)
    size = as_size(image_size)
    if not train:
        return BatchTransform(mean, std, size)
    ops: list[nn.Module] = []
    resize_first = True
    if cfg.crop == "random_resized":
        if size is None:
            raise DataError("random_resized crop needs an image_size")
        ops.append(K.RandomResizedCrop(size, scale=cfg.crop_scale, ratio=cfg.crop_ratio))
        resize_first = False
    elif cfg.crop == "pad_crop":
        if size is None:
            raise DataError("pad_crop needs an image_size")
        ops.append(K.RandomCrop(size, padding=cfg.crop_padding))
    if cfg.hflip:
        ops.append(K.RandomHorizontalFlip())
    if cfg.auto_augment == "randaugment":
        ops.append(PolicyAugment(RandAugment(n=cfg.randaugment_n, m=cfg.randaugment_m), cfg.auto_augment_groups))
    elif cfg.auto_augment == "trivialaugment":
        ops.append(PolicyAugment(TrivialAugment(), cfg.auto_augment_groups))
    augment = nn.Sequential(*ops) if ops else None
    erase = K.RandomErasing(p=cfg.random_erasing, value=0.0) if cfg.random_erasing > 0 else None
    return BatchTransform(mean, std, size, augment, erase, resize_first=resize_first)


class MixupCutmix(nn.Module):
    """Mixup or CutMix on a float batch, returning soft targets (B, num_classes) that sum to 1.

    One mixing coefficient per batch, pairing each image with the batch in reverse order (the cheap
    batch-level form). With probability ``prob`` a batch is mixed; CutMix is chosen with
    ``switch_prob`` when both alphas are > 0. Label smoothing is applied to the targets either way.
    """

    def __init__(
        self,
        num_classes: int,
        mixup_alpha: float = 0.8,
        cutmix_alpha: float = 1.0,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if num_classes < 2 or mixup_alpha < 0 or cutmix_alpha < 0 or not 0 <= label_smoothing < 1:
            raise ConfigError(
                f"bad mixup/cutmix settings: num_classes={num_classes}, mixup_alpha={mixup_alpha}, "
                f"cutmix_alpha={cutmix_alpha}, label_smoothing={label_smoothing}"
            )
        self.num_classes = num_classes
        self.mixup_alpha, self.cutmix_alpha = mixup_alpha, cutmix_alpha
        self.prob, self.switch_prob, self.label_smoothing = prob, switch_prob, label_smoothing

    def smooth_one_hot(self, labels: torch.Tensor) -> torch.Tensor:
        off = self.label_smoothing / self.num_classes
        targets = torch.full((labels.shape[0], self.num_classes), off, device=labels.device)
        return targets.scatter_(1, labels.view(-1, 1), 1.0 - self.label_smoothing + off)

    @staticmethod
    def _beta(alpha: float) -> float:
        a = torch.tensor(float(alpha))
        return float(torch.distributions.Beta(a, a).sample())

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not images.is_floating_point() or images.dim() != 4:
            raise DataError(f"mixup/cutmix needs a float (B, C, H, W) batch, got {tuple(images.shape)} {images.dtype}")
        if labels.shape != (images.shape[0],):
            raise DataError(f"labels shape {tuple(labels.shape)} does not match batch of {images.shape[0]}")
        targets = self.smooth_one_hot(labels.long())
        use_mixup, use_cutmix = self.mixup_alpha > 0, self.cutmix_alpha > 0
        if not (use_mixup or use_cutmix) or float(torch.rand(())) >= self.prob:
            return images, targets
        cutmix = use_cutmix and (not use_mixup or float(torch.rand(())) < self.switch_prob)
        partner = images.flip(0)
        if cutmix:
            lam = self._beta(self.cutmix_alpha)
            h, w = images.shape[-2:]
            cut = math.sqrt(1.0 - lam)
            ch, cw = int(h * cut), int(w * cut)
            cy, cx = int(torch.randint(h, ())), int(torch.randint(w, ()))
            y1, y2 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
            x1, x2 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
            images = images.clone()
            images[:, :, y1:y2, x1:x2] = partner[:, :, y1:y2, x1:x2]
            lam = 1.0 - (y2 - y1) * (x2 - x1) / (h * w)  # the box was clipped: use its real area
        else:
            lam = self._beta(self.mixup_alpha)
            images = images * lam + partner * (1.0 - lam)
        return images, targets * lam + targets.flip(0) * (1.0 - lam)


def build_mixup(cfg: AugmentConfig | Mapping[str, Any] | None, num_classes: int) -> MixupCutmix | None:
    """The mixup/cutmix module for ``cfg``, or None when neither is enabled (use the loss's label smoothing)."""
    if not isinstance(cfg, AugmentConfig):
        cfg = AugmentConfig.from_dict(cfg)
    if cfg.mixup_alpha <= 0 and cfg.cutmix_alpha <= 0:
        return None
    return MixupCutmix(
        num_classes, cfg.mixup_alpha, cfg.cutmix_alpha, cfg.mix_prob, cfg.mix_switch_prob, cfg.label_smoothing
    )


# ---------------------------------------------------------------------------- two views for contrastive learning
@dataclass
class ViewConfig:
    """Augmentation of one view in contrastive pretraining (SimCLR's recipe, sized for small images).

    The order is crop -> flip -> colour jitter (with probability ``jitter_prob``) -> grayscale -> blur ->
    normalise. Strong crops are what the objective learns most from; colour jitter stops the encoder from
    matching views by their intensity histogram. On 1-channel images saturation, hue and grayscale conversion
    mean nothing and are left out (kornia's saturation/hue steps need 3 channels); brightness and contrast
    stay. ``blur_kernel=None`` picks an odd kernel of about 10 % of the image side (at least 3), as SimCLR.
    """

    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True
    jitter_prob: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4  # 3-channel images only
    hue: float = 0.1  # 3-channel images only
    grayscale_prob: float = 0.2  # 3-channel images only
    blur_prob: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel: int | None = None

    def __post_init__(self) -> None:
        self.crop_scale = tuple(self.crop_scale)  # type: ignore[assignment]  # YAML gives lists
        self.crop_ratio = tuple(self.crop_ratio)  # type: ignore[assignment]
        self.blur_sigma = tuple(self.blur_sigma)  # type: ignore[assignment]
        checks = {
            "crop_scale": len(self.crop_scale) == 2 and 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1,
            "crop_ratio": len(self.crop_ratio) == 2 and 0 < self.crop_ratio[0] <= self.crop_ratio[1],
            "jitter_prob": 0 <= self.jitter_prob <= 1,
            "brightness": 0 <= self.brightness < 1,
            "contrast": 0 <= self.contrast < 1,
            "saturation": 0 <= self.saturation < 1,
            "hue": 0 <= self.hue <= 0.5,
            "grayscale_prob": 0 <= self.grayscale_prob <= 1,
            "blur_prob": 0 <= self.blur_prob <= 1,
            "blur_sigma": len(self.blur_sigma) == 2 and 0 < self.blur_sigma[0] <= self.blur_sigma[1],
            "blur_kernel": self.blur_kernel is None or (self.blur_kernel >= 3 and self.blur_kernel % 2 == 1),
        }
        for key, ok in checks.items():
            if not ok:
                raise ConfigError(f"views.{key}={getattr(self, key)!r} is out of range"
                                  + (" (an odd size >= 3)" if key == "blur_kernel" else ""))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> ViewConfig:
        """Build from a plain/OmegaConf mapping; an unknown key is a ConfigError naming it."""
        return settings_from_dict(cls, d, "views")


class ContrastiveViews(nn.Module):
    """uint8 or [0, 1] float batch (B, C, H, W) -> two normalised views (each (B, C, *image_size)).

    Each call of the view pipeline draws its own crop, flip, jitter and blur for every image (kornia samples
    per image from the global RNG), so the two views of an image are independent draws, and a seed fixes both.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], image_size: int | tuple[int, int],
                 cfg: ViewConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or ViewConfig()
        size = as_size(image_size)
        if size is None:
            raise DataError("contrastive views need an image_size for their random resized crop")
        self.cfg = cfg
        color = len(mean) == 3
        ops: list[nn.Module] = [K.RandomResizedCrop(size, scale=cfg.crop_scale, ratio=cfg.crop_ratio)]
        if cfg.hflip:
            ops.append(K.RandomHorizontalFlip())
        saturation, hue = (cfg.saturation, cfg.hue) if color else (0.0, 0.0)
        if cfg.jitter_prob > 0 and max(cfg.brightness, cfg.contrast, saturation, hue) > 0:
            ops.append(K.ColorJitter(cfg.brightness, cfg.contrast, saturation, hue, p=cfg.jitter_prob))
        if color and cfg.grayscale_prob > 0:
            ops.append(K.RandomGrayscale(p=cfg.grayscale_prob))
        if cfg.blur_prob > 0:
            kernel = cfg.blur_kernel or max(3, (min(size) // 10) | 1)
            ops.append(K.RandomGaussianBlur((kernel, kernel), cfg.blur_sigma, p=cfg.blur_prob))
        # the crop resizes to image_size itself, so nothing is resized before it
        self.view = BatchTransform(mean, std, size, nn.Sequential(*ops), resize_first=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.view(x), self.view(x)


def build_contrastive_views(cfg: ViewConfig | Mapping[str, Any] | None, mean: Sequence[float],
                            std: Sequence[float], image_size: int | tuple[int, int]) -> ContrastiveViews:
    """The two-view augmentation of contrastive pretraining; ``cfg`` is a :class:`ViewConfig`, a mapping of
    its fields (unknown keys fail by name) or None for the defaults."""
    if not isinstance(cfg, ViewConfig):
        cfg = ViewConfig.from_dict(cfg)
    return ContrastiveViews(mean, std, image_size, cfg)
