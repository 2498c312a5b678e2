"""Convolution building blocks of EfficientViT (MIT HAN lab): conv + BN + activation, depthwise-separable
(DSConv) and inverted-residual (MBConv) blocks.

The submodule names are the official ones (``conv``/``norm``; ``depth_conv``, ``point_conv``, ``inverted_conv``)
so that official weights load by a plain rename. Two official conventions matter for parity:

* every convolution uses "same" padding ``k // 2`` (so a stride-2 3×3 conv maps n to ceil(n / 2));
* ``fewer_norm``: the blocks of the attention stages put a bias instead of BatchNorm on every convolution but
  the last one (the projection keeps BN and has no bias).

The residual shortcut lives inside the block (``residual=True``) rather than in a wrapper module, so the
parameter names stay one level flatter than the official ``ResidualBlock.main``.
"""

from __future__ import annotations

import torch
from torch import nn

from .drop import DropPath
from .mlp import get_act_layer


def build_act(name: str | None) -> nn.Module:
    """An activation by name (vitkit's names, plus ``relu6``); None gives the identity."""
    if name is None:
        return nn.Identity()
    if name == "relu6":
        return nn.ReLU6()
    return get_act_layer(name)


class ConvNormAct(nn.Module):
    """Conv2d ("same" padding) -> BatchNorm2d (optional) -> activation (optional), the official ``ConvLayer``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, groups: int = 1,
                 bias: bool = False, norm: bool = True, act: str | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2,
                              groups=groups, bias=bias)
        self.norm = nn.BatchNorm2d(out_channels) if norm else nn.Identity()
        self.act = build_act(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class DSConv(nn.Module):
    """Depthwise k×k conv (+act) -> pointwise 1×1 conv, no activation after it (a linear bottleneck).

    The stem's residual blocks (and every local block when ``expand_ratio == 1``).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, kernel_size: int = 3,
                 act: str | None = "hardswish", fewer_norm: bool = False, residual: bool = False,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        _check_residual(residual, in_channels, out_channels, stride)
        self.residual = residual
        self.depth_conv = ConvNormAct(in_channels, in_channels, kernel_size, stride, groups=in_channels,
                                      bias=fewer_norm, norm=not fewer_norm, act=act)
        self.point_conv = ConvNormAct(in_channels, out_channels, 1, norm=True, act=None)
        self.drop_path = DropPath(drop_path) if residual and drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.point_conv(self.depth_conv(x))
        return x + self.drop_path(out) if self.residual else out


class MBConv(nn.Module):
    """Inverted residual: 1×1 expand (+act) -> depthwise k×k (+act, carries the stride) -> 1×1 project.

    The expanded width is ``round(in_channels * expand_ratio)``, as in the official code.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, expand_ratio: float = 4.0,
                 kernel_size: int = 3, act: str | None = "hardswish", fewer_norm: bool = False,
                 residual: bool = False, drop_path: float = 0.0) -> None:
        super().__init__()
        _check_residual(residual, in_channels, out_channels, stride)
        mid = round(in_channels * expand_ratio)
        if mid < 1:
            raise ValueError(f"expand_ratio {expand_ratio} leaves no channels for width {in_channels}")
        self.residual = residual
        self.inverted_conv = ConvNormAct(in_channels, mid, 1, bias=fewer_norm, norm=not fewer_norm, act=act)
        self.depth_conv = ConvNormAct(mid, mid, kernel_size, stride, groups=mid, bias=fewer_norm,
                                      norm=not fewer_norm, act=act)
        self.point_conv = ConvNormAct(mid, out_channels, 1, norm=True, act=None)
        self.drop_path = DropPath(drop_path) if residual and drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.point_conv(self.depth_conv(self.inverted_conv(x)))
        return x + self.drop_path(out) if self.residual else out


def _check_residual(residual: bool, in_channels: int, out_channels: int, stride: int) -> None:
    if residual and (in_channels != out_channels or stride != 1):
        raise ValueError(f"an identity shortcut needs stride 1 and equal widths, got {in_channels}->{out_channels} "
                         f"with stride {stride}")
