"""The convolutional image encoder and decoder of VQ tokenizers (VQGAN's, as VAR uses them): ResNet blocks with
GroupNorm and SiLU, 2× down/upsampling between resolutions, and single-head self-attention at the lowest resolution
and in the middle.

image (B, C, H, W) -> :class:`Encoder` -> features (B, z, H / 2^(levels-1), W / 2^(levels-1)) -> :class:`Decoder` ->
image. Module names are those of the official VAR code (``basic_vae.py``: ``down.0.block.1.conv2``, ``mid.attn_1``,
``up.3.upsample.conv`` ...), so its weights load by name; ``ch_mult``, ``num_res_blocks`` and the channel counts are
arguments.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttentionMapSource

NORM_GROUPS = 32  # the official GroupNorm: every width must be a multiple of 32


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(NORM_GROUPS, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GroupNorm -> SiLU -> conv3×3, twice, plus a 1×1-conv shortcut when the width changes."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _group_norm(out_channels)
        self.dropout = nn.Dropout(dropout) if dropout > 1e-6 else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(AttentionMapSource, nn.Module):
    """Single-head self-attention over all positions of a feature map (1×1 convs for qkv and output)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        # channels are laid out (q, k, v) × C; tokens are the H·W positions
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).transpose(-1, -2).unbind(1)
        out = self._attend(q[:, None], k[:, None], v[:, None], int(C) ** -0.5)  # (B, 1 head, HW, C)
        return x + self.proj_out(out[:, 0].transpose(1, 2).reshape(B, C, H, W))


class Downsample2x(nn.Module):
    """conv3×3 stride 2 after padding one row/column at the bottom/right (the official asymmetric padding)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample2x(nn.Module):
    """Nearest-neighbour 2× upsampling, then conv3×3."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class _Level(nn.Module):
    """One resolution of the encoder or decoder: ``block`` (ResNet blocks), ``attn`` (one attention block after
    each ResNet block, at the lowest resolution only, else empty) and an optional resampler."""

    def __init__(self, widths: list[tuple[int, int]], attention: bool, dropout: float) -> None:
        super().__init__()
        self.block = nn.ModuleList([ResnetBlock(i, o, dropout) for i, o in widths])
        self.attn = nn.ModuleList([AttnBlock(o) for _, o in widths] if attention else [])

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        return h


class _Mid(nn.Module):
    def __init__(self, channels: int, attention: bool, dropout: float) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels) if attention else nn.Identity()
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    """image (B, in_channels, H, W) -> features (B, z_channels, H / 2^(levels-1), W / 2^(levels-1))."""

    def __init__(self, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, in_channels: int, z_channels: int,
                 dropout: float = 0.0, using_sa: bool = True, using_mid_sa: bool = True) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        width = ch
        for i, mult in enumerate(ch_mult):
            out = ch * mult
            widths = [(width if j == 0 else out, out) for j in range(num_res_blocks)]
            level = _Level(widths, attention=using_sa and i == len(ch_mult) - 1, dropout=dropout)
            if i != len(ch_mult) - 1:
                level.downsample = Downsample2x(out)
            self.down.append(level)
            width = out
        self.mid = _Mid(width, using_mid_sa, dropout)
        self.norm_out = _group_norm(width)
        self.conv_out = nn.Conv2d(width, z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """features (B, z_channels, h, w) -> image (B, out_channels, h·2^(levels-1), w·2^(levels-1)).

    ``up`` is indexed like the encoder's ``down`` (``up.0`` is the full resolution) but runs from the last
    level; every level has ``num_res_blocks + 1`` ResNet blocks.
    """

    def __init__(self, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, out_channels: int, z_channels: int,
                 dropout: float = 0.0, using_sa: bool = True, using_mid_sa: bool = True) -> None:
        super().__init__()
        width = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, width, 3, padding=1)
        self.mid = _Mid(width, using_mid_sa, dropout)
        levels: list[_Level] = []
        for i in reversed(range(len(ch_mult))):
            out = ch * ch_mult[i]
            widths = [(width if j == 0 else out, out) for j in range(num_res_blocks + 1)]
            level = _Level(widths, attention=using_sa and i == len(ch_mult) - 1, dropout=dropout)
            if i != 0:
                level.upsample = Upsample2x(out)
            levels.insert(0, level)
            width = out
        self.up = nn.ModuleList(levels)
        self.norm_out = _group_norm(width)
        self.conv_out = nn.Conv2d(width, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))
