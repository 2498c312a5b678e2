"""Position embeddings for patch tokens, and their resampling to other grids.

Kinds (the ``pos_embed`` switch of the ViT family):

* ``none``: no position information at all.
* ``learned_1d``: one learned vector per token position, prefix (CLS) position included (the ViT default).
* ``learned_2d``: the ViT paper's appendix D.4 variant. Two learned tables, one per axis, each of width D/2;
  the embedding of patch (row i, column j) is the **concatenation** ``[row_table[i], col_table[j]]``.
  The CLS token gets its own learned vector.
* ``sincos_2d``: fixed 2D sine-cosine: half of the channels encodes the row, the other half the column, each
  as ``[sin(p*w_k), cos(p*w_k)]``. ``order='hw'`` (vitkit's default) puts the row half first; ``order='wh'``
  puts the column half first, the layout of MAE, big_vision and HF ViTMAE (whose checkpoints need it). The CLS
  position is zero. Nothing is stored in the state dict; other grids are recomputed, not interpolated.
* ``relative``: a learned per-head bias added to the attention logits, indexed by the 2D offset between two
  patches (a (2H-1)x(2W-1) table per head), plus three learned entries for CLS->patch, patch->CLS and
  CLS->CLS, as in BEiT.

Absolute kinds are modules called as ``x = pe(x, grid)``; the relative kind is called as
``bias = pe(grid)`` and the bias goes into attention.

Resolution change: learned tables are resampled bicubically (antialiased by default; the HF-ViT converter
switches antialias off to reproduce ``interpolate_pos_encoding`` exactly). Loading a state dict whose tables
were made for another grid resamples them by itself (see ``_load_from_state_dict``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError

POS_EMBED_KINDS = ("none", "learned_1d", "learned_2d", "sincos_2d", "relative")
SINCOS_ORDERS = ("hw", "wh")
Grid = tuple[int, int]


def infer_grid(num_positions: int, like: Grid, odd: bool = False) -> Grid:
    """Factor ``num_positions`` into (h, w) with the aspect ratio closest to ``like``.

    Checkpoints store flat tables; a square or same-aspect source grid is recovered unambiguously.
    """
    target = like[0] / like[1]
    best: Grid | None = None
    for h in range(1, num_positions + 1):
        if num_positions % h:
            continue
        w = num_positions // h
        if odd and (h % 2 == 0 or w % 2 == 0):
            continue
        if best is None or abs(math.log(h / w / target)) < abs(math.log(best[0] / best[1] / target)):
            best = (h, w)
    if best is None:
        raise CheckpointError(f"cannot factor {num_positions} positions into a grid")
    return best


def resample_grid_table(
    table: torch.Tensor, new_hw: Grid, mode: str = "bicubic", antialias: bool = True
) -> torch.Tensor:
    """Resample a (1, C, h, w) table to (1, C, *new_hw); computed in fp32, returned in the input dtype."""
    if tuple(table.shape[-2:]) == tuple(new_hw):
        return table
    dtype = table.dtype
    antialias = antialias and mode in ("bilinear", "bicubic")
    align = False if mode in ("bilinear", "bicubic") else None
    out = F.interpolate(table.float(), size=new_hw, mode=mode, align_corners=align, antialias=antialias)
    return out.to(dtype)


def resample_abs_pos_embed(
    posemb: torch.Tensor, old_grid: Grid, new_grid: Grid, num_prefix_tokens: int = 0,
    mode: str = "bicubic", antialias: bool = True,
) -> torch.Tensor:
    """Resample a (1, P + h*w, D) absolute table from ``old_grid`` to ``new_grid``; prefix rows are kept."""
    if tuple(old_grid) == tuple(new_grid):
        return posemb
    prefix, patch = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
    dim = patch.shape[-1]
    grid = patch.reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)
    grid = resample_grid_table(grid, new_grid, mode, antialias)
    patch = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim)
    return torch.cat([prefix, patch], dim=1)


def sincos_1d(positions: torch.Tensor, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """[sin(p*w_0..), cos(p*w_0..)] with w_k = temperature^(-k/(dim/2)); shape (len(positions), dim)."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even width, got {dim}")
    omega = 1.0 / temperature ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.double()[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def sincos_2d(grid: Grid, dim: int, temperature: float = 10000.0, order: str = "hw") -> torch.Tensor:
    """(h*w, dim), tokens row-major: ``order='hw'``: first half encodes the row, second half the column;
    ``'wh'``: the column first (MAE / big_vision / HF ViTMAE layout)."""
    if dim % 4:
        raise ValueError(f"sincos_2d needs an embed dim divisible by 4, got {dim}")
    if order not in SINCOS_ORDERS:
        raise ValueError(f"sin-cos order must be one of {SINCOS_ORDERS}, got {order!r}")
    rows = sincos_1d(torch.arange(grid[0]).repeat_interleave(grid[1]), dim // 2, temperature)
    cols = sincos_1d(torch.arange(grid[1]).repeat(grid[0]), dim // 2, temperature)
    return torch.cat([rows, cols] if order == "hw" else [cols, rows], dim=1)


class _AbsolutePosEmbed(nn.Module):
    """Common part of the absolute kinds: ``forward(x, grid)`` adds ``table(grid)`` to the tokens."""

    is_bias = False

    def __init__(self, grid: Grid, dim: int, num_prefix_tokens: int, interp: str, antialias: bool) -> None:
        super().__init__()
        self.grid = tuple(grid)
        self.dim = dim
        self.num_prefix_tokens = num_prefix_tokens
        self.interp = interp
        self.antialias = antialias

    def table(self, grid: Grid) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        return x + self.table(tuple(grid)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"grid={self.grid}, dim={self.dim}, num_prefix_tokens={self.num_prefix_tokens}"


class LearnedPosEmbed1D(_AbsolutePosEmbed):
    def __init__(self, grid: Grid, dim: int, num_prefix_tokens: int = 1, interp: str = "bicubic",
                 antialias: bool = True) -> None:
        super().__init__(grid, dim, num_prefix_tokens, interp, antialias)
        self.weight = nn.Parameter(torch.zeros(1, num_prefix_tokens + grid[0] * grid[1], dim))
        nn.init.trunc_normal_(self.weight, std=0.02)

    def table(self, grid: Grid) -> torch.Tensor:
        return resample_abs_pos_embed(self.weight, self.grid, grid, self.num_prefix_tokens, self.interp,
                                      self.antialias)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "weight"
        if key in state_dict and state_dict[key].shape != self.weight.shape:
            src = state_dict[key]
            if src.ndim == 2:
                src = src[None]
            n_patch = src.shape[1] - self.num_prefix_tokens
            if src.ndim != 3 or src.shape[-1] != self.dim or n_patch <= 0:
                raise CheckpointError(
                    f"{key}: checkpoint table has shape {tuple(state_dict[key].shape)}, "
                    f"model expects {tuple(self.weight.shape)}")
            old_grid = infer_grid(n_patch, self.grid)
            state_dict[key] = resample_abs_pos_embed(src, old_grid, self.grid, self.num_prefix_tokens,
                                                     self.interp, self.antialias)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class LearnedPosEmbed2D(_AbsolutePosEmbed):
    def __init__(self, grid: Grid, dim: int, num_prefix_tokens: int = 1, interp: str = "bicubic",
                 antialias: bool = True) -> None:
        super().__init__(grid, dim, num_prefix_tokens, interp, antialias)
        if dim % 2:
            raise ValueError(f"learned_2d needs an even embed dim, got {dim}")
        self.row = nn.Parameter(torch.zeros(grid[0], dim // 2))
        self.col = nn.Parameter(torch.zeros(grid[1], dim // 2))
        nn.init.trunc_normal_(self.row, std=0.02)
        nn.init.trunc_normal_(self.col, std=0.02)
        self.prefix = nn.Parameter(torch.zeros(1, num_prefix_tokens, dim)) if num_prefix_tokens else None
        if self.prefix is not None:
            nn.init.trunc_normal_(self.prefix, std=0.02)

    def _axis(self, table: torch.Tensor, length: int) -> torch.Tensor:
        if table.shape[0] == length:
            return table
        # (1, D/2, 1, n): a one-row image. Not a one-column image: torch 2.13's antialiased bicubic resampling of
        # a width-1 input returns its first value everywhere.
        t = table.t()[None, :, None, :]
        return resample_grid_table(t, (1, length), self.interp, self.antialias)[0, :, 0, :].t()

    def table(self, grid: Grid) -> torch.Tensor:
        rows, cols = self._axis(self.row, grid[0]), self._axis(self.col, grid[1])
        patch = torch.cat([rows[:, None, :].expand(-1, grid[1], -1), cols[None, :, :].expand(grid[0], -1, -1)],
                          dim=-1).reshape(1, grid[0] * grid[1], self.dim)
        if self.prefix is None:
            return patch
        return torch.cat([self.prefix, patch], dim=1)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name, length in (("row", self.grid[0]), ("col", self.grid[1])):
            key = prefix + name
            if key in state_dict and state_dict[key].shape[0] != length:
                state_dict[key] = self._axis(state_dict[key], length)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class SinCosPosEmbed2D(_AbsolutePosEmbed):
    def __init__(self, grid: Grid, dim: int, num_prefix_tokens: int = 1, interp: str = "bicubic",
                 antialias: bool = True, temperature: float = 10000.0, order: str = "hw") -> None:
        super().__init__(grid, dim, num_prefix_tokens, interp, antialias)
        self.temperature = temperature
        self.order = order
        self.register_buffer("weight", self._build(self.grid), persistent=False)

    def _build(self, grid: Grid) -> torch.Tensor:
        patch = sincos_2d(grid, self.dim, self.temperature, self.order)
        return torch.cat([torch.zeros(self.num_prefix_tokens, self.dim), patch])[None]

    def table(self, grid: Grid) -> torch.Tensor:
        if grid == self.grid:
            return self.weight
        return self._build(grid).to(self.weight.device)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", order={self.order}"


class RelativePositionBias(nn.Module):
    """Learned per-head bias on attention logits, indexed by the 2D offset between tokens."""

    is_bias = True

    def __init__(self, grid: Grid, num_heads: int, num_prefix_tokens: int = 1, interp: str = "bicubic",
                 antialias: bool = True) -> None:
        super().__init__()
        self.grid = tuple(grid)
        self.num_heads = num_heads
        self.num_prefix_tokens = num_prefix_tokens
        self.interp = interp
        self.antialias = antialias
        self.num_extra = 3 if num_prefix_tokens else 0
        self.table = nn.Parameter(torch.zeros(self._num_offsets(self.grid) + self.num_extra, num_heads))
        nn.init.trunc_normal_(self.table, std=0.02)
        self.register_buffer("index", self._build_index(self.grid), persistent=False)

    @staticmethod
    def _num_offsets(grid: Grid) -> int:
        return (2 * grid[0] - 1) * (2 * grid[1] - 1)

    def _build_index(self, grid: Grid) -> torch.Tensor:
        gh, gw = grid
        coords = torch.stack(torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")).flatten(1)
        rel = coords[:, :, None] - coords[:, None, :]  # (2, n, n)
        patch_index = (rel[0] + gh - 1) * (2 * gw - 1) + (rel[1] + gw - 1)
        p = self.num_prefix_tokens
        if not p:
            return patch_index
        n_off = self._num_offsets(grid)
        index = torch.empty(p + gh * gw, p + gh * gw, dtype=torch.long)
        index[p:, p:] = patch_index
        index[:p, p:] = n_off          # prefix -> patch
        index[p:, :p] = n_off + 1      # patch -> prefix
        index[:p, :p] = n_off + 2      # prefix -> prefix
        return index

    def _offset_table(self, table: torch.Tensor, src_grid: Grid, dst_grid: Grid) -> torch.Tensor:
        if src_grid == dst_grid:
            return table
        n_src = self._num_offsets(src_grid)
        grid_tab = table[:n_src].t().reshape(1, self.num_heads, 2 * src_grid[0] - 1, 2 * src_grid[1] - 1)
        new = resample_grid_table(grid_tab, (2 * dst_grid[0] - 1, 2 * dst_grid[1] - 1), self.interp, self.antialias)
        return torch.cat([new.reshape(self.num_heads, -1).t(), table[n_src:]], dim=0)

    def forward(self, grid: Grid) -> torch.Tensor:
        """The (heads, N, N) bias for a token grid."""
        grid = tuple(grid)
        if grid == self.grid:
            table, index = self.table, self.index
        else:
            table = self._offset_table(self.table, self.grid, grid)
            index = self._build_index(grid).to(self.table.device)
        n = index.shape[0]
        return table[index.reshape(-1)].reshape(n, n, self.num_heads).permute(2, 0, 1)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "table"
        if key in state_dict and state_dict[key].shape != self.table.shape:
            src = state_dict[key]
            n_off = src.shape[0] - self.num_extra
            if src.ndim != 2 or src.shape[1] != self.num_heads or n_off <= 0:
                raise CheckpointError(f"{key}: checkpoint table has shape {tuple(src.shape)}, "
                                      f"model expects {tuple(self.table.shape)}")
            odd = infer_grid(n_off, (2 * self.grid[0] - 1, 2 * self.grid[1] - 1), odd=True)
            src_grid = ((odd[0] + 1) // 2, (odd[1] + 1) // 2)
            state_dict[key] = self._offset_table(src, src_grid, self.grid)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"grid={self.grid}, num_heads={self.num_heads}, num_prefix_tokens={self.num_prefix_tokens}"


def build_pos_embed(kind: str, grid: Grid, dim: int, num_heads: int, num_prefix_tokens: int,
                    interp: str = "bicubic", antialias: bool = True, sincos_order: str = "hw") -> nn.Module | None:
    """Factory for the ``pos_embed`` switch; ``none`` returns None. ``sincos_order`` only affects ``sincos_2d``."""
    if kind == "none":
        return None
    if kind == "learned_1d":
        return LearnedPosEmbed1D(grid, dim, num_prefix_tokens, interp, antialias)
    if kind == "learned_2d":
        return LearnedPosEmbed2D(grid, dim, num_prefix_tokens, interp, antialias)
    if kind == "sincos_2d":
        return SinCosPosEmbed2D(grid, dim, num_prefix_tokens, interp, antialias, order=sincos_order)
    if kind == "relative":
        return RelativePositionBias(grid, num_heads, num_prefix_tokens, interp, antialias)
    raise ValueError(f"unknown pos_embed {kind!r}; choose one of {POS_EMBED_KINDS}")
