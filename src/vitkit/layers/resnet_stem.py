"""The CNN feature extractor of hybrid ViTs (R50+ViT in the ViT paper).

Weight-standardised convolutions with GroupNorm, as in BiT: they train well with small or per-device
batches, where BatchNorm statistics would be noisy.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class StdConv2d(nn.Conv2d):
    """Conv2d whose weight is standardised (zero mean, unit variance per output filter) at every call."""

    def __init__(self, *args, eps: float = 1e-6, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w = F.batch_norm(w.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0,
                         eps=self.eps).reshape_as(w)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


def group_norm(channels: int, groups: int = 32) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(groups, channels), channels, eps=1e-5)


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (strided) -> 1x1 expand, GroupNorm after each, projection shortcut when needed."""

    def __init__(self, in_chs: int, mid_chs: int, out_chs: int, stride: int) -> None:
        super().__init__()
        self.conv1 = StdConv2d(in_chs, mid_chs, 1, bias=False)
        self.norm1 = group_norm(mid_chs)
        self.conv2 = StdConv2d(mid_chs, mid_chs, 3, stride=stride, padding=1, bias=False)
        self.norm2 = group_norm(mid_chs)
        self.conv3 = StdConv2d(mid_chs, out_chs, 1, bias=False)
        self.norm3 = group_norm(out_chs)
        nn.init.zeros_(self.norm3.weight)  # each residual block starts as identity
        self.downsample = None
        if stride != 1 or in_chs != out_chs:
            self.downsample = nn.Sequential(StdConv2d(in_chs, out_chs, 1, stride=stride, bias=False),
                                            group_norm(out_chs))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.act(self.norm1(self.conv1(x)))
        x = self.act(self.norm2(self.conv2(x)))
        x = self.norm3(self.conv3(x))
        return self.act(x + shortcut)


class ResNetStem(nn.Module):
    """7x7/2 conv + max-pool (/4), then bottleneck stages; every stage after the first halves the map.

    ``layers=(3, 4, 9)`` with width 64 is the R50 stem of ViT-B/16 hybrids (output stride 16).
    """

    def __init__(self, in_chans: int = 3, width: int = 64, layers: tuple[int, ...] = (3, 4, 9)) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            StdConv2d(in_chans, width, 7, stride=2, padding=3, bias=False),
            group_norm(width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        stages = []
        in_chs, reduction = width, 4
        for i, depth in enumerate(layers):
            mid, out, stride = width * 2**i, width * 4 * 2**i, 1 if i == 0 else 2
            blocks = [Bottleneck(in_chs if j == 0 else out, mid, out, stride if j == 0 else 1) for j in range(depth)]
            stages.append(nn.Sequential(*blocks))
            in_chs, reduction = out, reduction * stride
        self.stages = nn.Sequential(*stages)
        self.out_channels = in_chs
        self.reduction = reduction

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))
