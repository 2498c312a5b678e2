"""Turn an image (or a CNN feature map) into a sequence of patch tokens."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import InputShapeError
from ..utils import to_2tuple
from .resnet_stem import ResNetStem


def check_image_batch(x: torch.Tensor, in_chans: int, reduction: tuple[int, int],
                      fixed_size: tuple[int, int] | None, what: str = "model") -> tuple[int, int]:
    """Validate a (B, C, H, W) batch and return its token grid; raise a readable error otherwise."""
    if not isinstance(x, torch.Tensor):
        raise InputShapeError(f"{what} expects a torch.Tensor batch (B, C, H, W), got {type(x).__name__}")
    if x.ndim != 4:
        raise InputShapeError(f"{what} expects a 4D batch (B, C, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise InputShapeError(
            f"{what} expects normalised floating-point images, got {x.dtype}; for uint8 pixels use "
            f"x.float() / 255 and the model's mean/std (model.pretrained_cfg), as vitkit's transforms do")
    if x.shape[1] != in_chans:
        raise InputShapeError(
            f"{what} expects {in_chans} input channel(s), got {x.shape[1]} (input shape {tuple(x.shape)})")
    h, w = x.shape[-2:]
    if h % reduction[0] or w % reduction[1]:
        raise InputShapeError(
            f"image size {h}x{w} is not divisible by the patch stride {reduction[0]}x{reduction[1]} of this {what}")
    if fixed_size is not None and (h, w) != tuple(fixed_size):
        raise InputShapeError(
            f"{what} was built for {fixed_size[0]}x{fixed_size[1]} images, got {h}x{w}; build it with "
            f"img_size=({h}, {w}) (a checkpoint's position table is resampled on load) "
            f"or pass dynamic_img_size=True")
    return h // reduction[0], w // reduction[1]


class PatchEmbed(nn.Module):
    """Linear patch embedding as a convolution with kernel = patch size.

    ``stride < patch_size`` gives overlapping patches; the padding ``(patch - stride) / 2`` keeps the token
    grid at ``img_size / stride``, so overlapping and non-overlapping variants have the same token count.
    """

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int | tuple[int, int] = 16,
                 stride: int | tuple[int, int] | None = None, in_chans: int = 3, embed_dim: int = 768,
                 bias: bool = True) -> None:
        super().__init__()
        self.img_size = to_2tuple(img_size)
        self.patch_size = to_2tuple(patch_size)
        self.stride = to_2tuple(stride) if stride is not None else self.patch_size
        pad = []
        for k, s in zip(self.patch_size, self.stride):
            if s > k or (k - s) % 2:
                raise ValueError(f"patch stride {s} must be <= patch size {k} and differ from it by an even number")
            pad.append((k - s) // 2)
        self.in_chans = in_chans
        self.reduction = self.stride
        self.grid = (self.img_size[0] // self.stride[0], self.img_size[1] // self.stride[1])
        self.proj = nn.Conv2d(in_chans, embed_dim, self.patch_size, self.stride, tuple(pad), bias=bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.proj(x)
        grid = (x.shape[-2], x.shape[-1])
        return x.flatten(2).transpose(1, 2), grid


class HybridEmbed(nn.Module):
    """ViT-hybrid input: a ResNet stem's feature map cut into (usually 1x1) patches and projected."""

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 1, in_chans: int = 3,
                 embed_dim: int = 768, stem_layers: tuple[int, ...] = (3, 4, 9), stem_width: int = 64) -> None:
        super().__init__()
        self.img_size = to_2tuple(img_size)
        self.in_chans = in_chans
        self.backbone = ResNetStem(in_chans, stem_width, tuple(stem_layers))
        self.patch_size = to_2tuple(patch_size)
        r = self.backbone.reduction
        self.reduction = (r * self.patch_size[0], r * self.patch_size[1])
        self.grid = (self.img_size[0] // self.reduction[0], self.img_size[1] // self.reduction[1])
        self.proj = nn.Conv2d(self.backbone.out_channels, embed_dim, self.patch_size, self.patch_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.proj(self.backbone(x))
        grid = (x.shape[-2], x.shape[-1])
        return x.flatten(2).transpose(1, 2), grid
