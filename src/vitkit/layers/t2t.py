"""Pieces of the Tokens-to-Token module (T2T-ViT, Yuan et al. 2021).

* :class:`SoftSplit`: ``nn.Unfold`` as a tokenizer. Overlapping k×k windows become tokens whose features are
  ordered (channel, kh, kw), so neighbouring tokens share pixels and local structure survives.
* :class:`TokenAttention`: the single-head attention of the ``transformer`` token block. Its input width
  (C·k²) differs from its output width (``token_dim``), so it cannot be the square :class:`Attention`.
* :class:`PerformerAttention`: the linear-cost kernel attention of the ``performer`` token block (FAVOR+ with
  positive random features), used because the first T2T step sees thousands of tokens.
* :class:`TokenBlock`: norm -> token attention (with the value as skip) -> norm -> MLP, the shape of both
  official token blocks.
* :func:`sinusoid_table`: the interleaved 1D sine-cosine table the T2T backbone uses for positions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttentionMapSource
from .mlp import Mlp

Grid = tuple[int, int]


def sinusoid_table(num_positions: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """(num_positions, dim): channel j is sin (j even) or cos (j odd) of pos / temperature^(2·(j//2)/dim).

    Interleaved, unlike :func:`~vitkit.layers.sincos_1d` (which puts all sines first); computed in float64
    so that the table is the same bit for bit wherever it is rebuilt.
    """
    pos = torch.arange(num_positions, dtype=torch.float64)[:, None]
    j = torch.arange(dim, dtype=torch.float64)
    angles = pos / temperature ** (2 * torch.div(j, 2, rounding_mode="floor") / dim)
    table = torch.where(j.long() % 2 == 0, angles.sin(), angles.cos())
    return table.float()


def unfold_grid(grid: Grid, kernel: int, stride: int, padding: int) -> Grid:
    """The (h, w) window grid ``nn.Unfold(kernel, stride=stride, padding=padding)`` makes from a (h, w) map."""
    return tuple((n + 2 * padding - kernel) // stride + 1 for n in grid)  # type: ignore[return-value]


class SoftSplit(nn.Module):
    """(B, C, H, W) -> (B, h·w, C·k·k) overlapping windows, plus the window grid (h, w)."""

    def __init__(self, kernel: int, stride: int, padding: int) -> None:
        super().__init__()
        if kernel < 1 or stride < 1 or padding < 0:
            raise ValueError(f"soft split needs kernel, stride >= 1 and padding >= 0, got {(kernel, stride, padding)}")
        self.kernel, self.stride, self.padding = kernel, stride, padding

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Grid]:
        grid = unfold_grid((x.shape[-2], x.shape[-1]), self.kernel, self.stride, self.padding)
        cols = F.unfold(x, self.kernel, stride=self.stride, padding=self.padding)
        return cols.transpose(1, 2), grid

    def extra_repr(self) -> str:
        return f"kernel={self.kernel}, stride={self.stride}, padding={self.padding}"


class TokenAttention(AttentionMapSource, nn.Module):
    """Single-head attention from ``in_dim`` to ``dim`` whose skip connection is the value, not the input.

    The logits are scaled by ``in_dim ** -0.5`` (the official T2T code derives the scale from the input width,
    not from ``dim``); converted checkpoints only reproduce their outputs with that scale.
    """

    def __init__(self, in_dim: int, dim: int, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, qk_scale: float | None = None) -> None:
        super().__init__()
        self.dim = dim
        self.scale = qk_scale if qk_scale is not None else in_dim**-0.5
        self.qkv = nn.Linear(in_dim, 3 * dim, bias=qkv_bias)  # rows laid out (3, 1 head, dim)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, 1, self.dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = self._attend(q, k, v, self.scale, dropout_p=self.attn_drop if self.training else 0.0)
        return v.squeeze(1) + self.proj_drop(self.proj(out.squeeze(1)))


class PerformerAttention(nn.Module):
    """Linear kernel attention with positive orthogonal random features (Choromanski et al., FAVOR+).

    φ(u) = exp(w·u − |u|²/2) / sqrt(m) estimates the softmax kernel, so attention becomes
    y = φ(q) (φ(k)ᵀ v) / (φ(q) · Σ φ(k)): O(N) instead of O(N²), which is what makes the first T2T step
    (3136 tokens at 224²) affordable. ``w`` (m × dim, orthogonal rows × sqrt(m)) is drawn once and kept
    fixed: a non-trainable parameter, saved in the state dict so a checkpoint reproduces its outputs.

    There is no attention matrix, so this module records nothing under ``capture_attention``.
    The fused ``qkv`` rows are ordered (q, k, v) like every vitkit attention; the official ``kqv`` is
    reordered by the converter.
    """

    def __init__(self, in_dim: int, dim: int, kernel_ratio: float = 0.5, proj_drop: float = 0.0,
                 eps: float = 1e-8) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.m = int(dim * kernel_ratio)
        if self.m < 1:
            raise ValueError(f"performer with dim {dim} and kernel_ratio {kernel_ratio} has no random features")
        self.qkv = nn.Linear(in_dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.w = nn.Parameter(nn.init.orthogonal_(torch.empty(self.m, dim)) * math.sqrt(self.m),
                              requires_grad=False)

    def features(self, u: torch.Tensor) -> torch.Tensor:
        """φ(u): (B, N, dim) -> (B, N, m), in fp32 because of the exponential."""
        u = u.float()
        return torch.exp(u @ self.w.float().t() - 0.5 * u.square().sum(-1, keepdim=True)) / math.sqrt(self.m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).split(self.dim, dim=-1)
        # exp() features and the 1e-8 normaliser need fp32: keep autocast from moving these matmuls to 16 bits
        with torch.autocast(x.device.type, enabled=False):
            qp, kp = self.features(q), self.features(k)
            denom = qp @ kp.sum(dim=1).unsqueeze(-1)             # (B, N, 1)
            kv = kp.transpose(1, 2) @ v.float()                  # (B, m, dim)
            y = ((qp @ kv) / (denom + self.eps)).to(v.dtype)
        return v + self.proj_drop(self.proj(y))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, random_features={self.m}"


class TokenBlock(nn.Module):
    """x -> attn(norm1(x)) (which adds its own value skip) -> + mlp(norm2(·)); width changes in attn."""

    def __init__(self, in_dim: int, dim: int, kind: str = "performer", mlp_ratio: float = 1.0,
                 norm_eps: float = 1e-5, act: str = "gelu", drop: float = 0.0, attn_drop: float = 0.0,
                 kernel_ratio: float = 0.5) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(in_dim, eps=norm_eps)
        if kind == "performer":
            self.attn: nn.Module = PerformerAttention(in_dim, dim, kernel_ratio, proj_drop=drop)
        elif kind == "transformer":
            self.attn = TokenAttention(in_dim, dim, attn_drop=attn_drop, proj_drop=drop)
        else:
            raise ValueError(f"token block kind must be 'performer' or 'transformer', got {kind!r}")
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act=act, drop=drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TokensToToken(nn.Module):
    """The T2T tokenizer: soft split, then (token block -> back to a map -> soft split) per later step, then a
    Linear to ``embed_dim``.

    ``kernels`` lists one (kernel, stride, padding) per soft split; the official schedule is
    ((7, 4, 2), (3, 2, 1), (3, 2, 1)), 16× down in all. Each re-structurization reshapes the tokens to the
    window grid the previous split really produced (h, w), so non-square images work (the official code
    assumes a square of side int(sqrt(N))).
    """

    def __init__(self, in_chans: int, embed_dim: int, token_dim: int = 64,
                 kernels: tuple[tuple[int, int, int], ...] = ((7, 4, 2), (3, 2, 1), (3, 2, 1)),
                 kind: str = "performer", norm_eps: float = 1e-5, kernel_ratio: float = 0.5, act: str = "gelu",
                 drop: float = 0.0, attn_drop: float = 0.0) -> None:
        super().__init__()
        kernels = tuple(tuple(k) for k in kernels)
        if not kernels or any(len(k) != 3 for k in kernels):
            raise ValueError(f"t2t kernels must be a non-empty list of (kernel, stride, padding), got {kernels}")
        self.kernels = kernels
        self.splits = nn.ModuleList([SoftSplit(*k) for k in kernels])
        in_dims = [in_chans * kernels[0][0] ** 2] + [token_dim * k[0] ** 2 for k in kernels[1:-1]]
        self.token_blocks = nn.ModuleList([
            TokenBlock(d, token_dim, kind, norm_eps=norm_eps, act=act, drop=drop, attn_drop=attn_drop,
                       kernel_ratio=kernel_ratio)
            for d in in_dims[:len(kernels) - 1]
        ])
        last_in = token_dim if len(kernels) > 1 else in_chans
        self.project = nn.Linear(last_in * kernels[-1][0] ** 2, embed_dim)
        self.reduction = math.prod(k[1] for k in kernels)

    def output_grid(self, grid: Grid) -> Grid:
        for k in self.kernels:
            grid = unfold_grid(grid, *k)
        return grid

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Grid]:
        """(B, C, H, W) -> ((B, h·w, embed_dim) tokens, (h, w))."""
        tokens, grid = self.splits[0](x)
        for block, split in zip(self.token_blocks, self.splits[1:]):
            tokens = block(tokens)
            fmap = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], grid[0], grid[1])
            tokens, grid = split(fmap)
        return self.project(tokens), grid
