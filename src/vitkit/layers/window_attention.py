"""Swin window attention: softmax attention inside M×M windows, with a learned relative position bias.

Cost is linear in the number of tokens (each token attends to M² others), which is what lets a hierarchical
backbone run at high resolution. Every other block shifts the window grid by M/2 so that information crosses
window borders; the shift is a cyclic roll of the map, and :func:`shifted_window_mask` keeps tokens that the
roll brought together from different image regions from attending to each other.

Conventions follow the reference implementations (Microsoft's Swin, Hugging Face ``SwinModel``), so that their
weights load and their outputs are matched:

* a map whose sides are not multiples of the window is zero-padded at the bottom/right *after* ``norm1``; the
  padded tokens take part in attention as keys (the references do not mask them) and are cropped afterwards;
* when the map is not larger than the window, the window shrinks to the map and the block does not shift;
* the shift mask adds -100 (not -inf) between regions, as the references do (exp(-100) underflows to 0 in fp32).

Layout: blocks take and return NHWC maps (B, H, W, C), so padding, rolling and merging need no reshapes.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttentionMapSource
from .drop import DropPath
from .mlp import Mlp

MASK_VALUE = -100.0


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C), H and W multiples of ``window`` -> (B * num_windows, window², C), windows row-major."""
    B, H, W, C = x.shape
    x = x.view(B, H // window, window, W // window, window, C).transpose(2, 3)
    return x.reshape(-1, window * window, C)


def window_reverse(windows: torch.Tensor, window: int, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (B * num_windows, window², C) -> (B, H, W, C)."""
    C = windows.shape[-1]
    x = windows.view(-1, height // window, width // window, window, window, C).transpose(2, 3)
    return x.reshape(-1, height, width, C)


def relative_position_index(window: int, table_window: int | None = None) -> torch.Tensor:
    """(window², window²) index of each token pair's 2D offset in a (2T - 1)² table, T = ``table_window``.

    T defaults to ``window``; a smaller window (a map smaller than the window the table was trained for)
    reads the central offsets of the larger table.
    """
    T = table_window or window
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = coords[:, :, None] - coords[:, None, :]
    return (rel[0] + T - 1) * (2 * T - 1) + (rel[1] + T - 1)


@functools.lru_cache(maxsize=64)
def _shift_mask_cpu(height: int, width: int, window: int, shift: int) -> torch.Tensor:
    def regions(n: int) -> torch.Tensor:  # 0: [0, n-M), 1: [n-M, n-shift), 2: [n-shift, n)
        idx = torch.arange(n, device="cpu")  # cached for the process: never a caller's torch.device (meta)
        return (idx >= n - window).long() + (idx >= n - shift).long()

    img = (regions(height)[:, None] * 3 + regions(width)[None, :]).float()[None, :, :, None]
    labels = window_partition(img, window).squeeze(-1)  # (num_windows, M²)
    differ = labels[:, None, :] != labels[:, :, None]
    return torch.zeros(differ.shape, device="cpu").masked_fill(differ, MASK_VALUE)


def shifted_window_mask(height: int, width: int, window: int, shift: int,
                        device: torch.device | str | None = None) -> torch.Tensor:
    """(num_windows, M², M²) additive mask for a map of (padded) size height × width rolled by ``shift``:
    0 between tokens of the same original region, -100 between tokens the cyclic roll brought together.

    Cached per process, except while torch.export / torch.compile trace: there the tensors are fake ones, and a
    cached fake tensor would be handed to every later eager call."""
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return _shift_mask_cpu.__wrapped__(height, width, window, shift).to(device)
    return _shift_mask_cpu(height, width, window, shift).to(device)


class WindowAttention(AttentionMapSource, nn.Module):
    """Multi-head attention over windows (B * num_windows, M², C) with a relative position bias per head.

    The bias table has (2M - 1)² rows, one per 2D offset between two tokens of a window (Swin's
    ``relative_position_bias_table``); ``mask`` (num_windows, M², M²) is added on top for shifted windows.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int = 7, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, qk_scale: float | None = None) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        if window_size < 1:
            raise ValueError(f"window_size must be >= 1, got {window_size}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.window_size = window_size
        self.scale = qk_scale if qk_scale is not None else self.head_dim**-0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", relative_position_index(window_size), persistent=False)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def relative_position_bias(self, window: int | None = None) -> torch.Tensor:
        """(heads, window², window²) bias for windows of ``window`` (default: the table's own size)."""
        window = window or self.window_size
        if window == self.window_size:
            index = self.relative_position_index
        else:
            index = relative_position_index(window, self.window_size).to(self.relative_position_bias_table.device)
        n = window * window
        return self.relative_position_bias_table[index.reshape(-1)].reshape(n, n, -1).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, window: int | None = None
                ) -> torch.Tensor:
        """``x``: (B * num_windows, window², C), windows of one image consecutive; ``mask``: (num_windows, N, N)."""
        Bw, N, C = x.shape
        window = window or self.window_size
        if window * window != N:
            raise ValueError(f"WindowAttention expects {window}x{window} = {window * window} tokens per window, "
                             f"got {N}")
        q, k, v = self.qkv(x).reshape(Bw, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.relative_position_bias(window).unsqueeze(0)  # (1, heads, N, N)
        if mask is not None:
            nw = mask.shape[0]
            if Bw % nw:
                raise ValueError(f"{Bw} windows are not a whole number of images of {nw} windows each")
            bias = (bias.unsqueeze(0) + mask.to(bias.dtype)[None, :, None])  # (1, nW, heads, N, N)
            bias = bias.expand(Bw // nw, -1, -1, -1, -1).reshape(Bw, self.num_heads, N, N)
        out = self._attend(q, k, v, self.scale, bias, self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(Bw, N, C)))


def effective_window(height: int, width: int, window: int, shift: int) -> tuple[int, int]:
    """(window, shift) used on a height × width map: a map not larger than the window is one window, unshifted."""
    if min(height, width) <= window:
        return min(height, width), 0
    return window, shift


class SwinBlock(nn.Module):
    """Swin block on NHWC maps: x + attn(norm1(x)) over (shifted) windows, then x + mlp(norm2(x)).

    ``shift_size`` is 0 for a regular block and M // 2 for a shifted one. Parameter names (``norm1``,
    ``attn.qkv``, ``attn.proj``, ``attn.relative_position_bias_table``, ``norm2``, ``mlp.fc1``, ``mlp.fc2``) are
    those of the official implementation, and those of :class:`~vitkit.layers.sparse_window.SparseWindowBlock`
    minus the bias table.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int = 7, shift_size: int = 0,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, qk_scale: float | None = None,
                 proj_drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0, norm_eps: float = 1e-5,
                 act: str = "gelu") -> None:
        super().__init__()
        if not 0 <= shift_size < window_size:
            raise ValueError(f"shift_size must be in [0, window_size={window_size}), got {shift_size}")
        self.window_size = window_size
        self.shift_size = shift_size
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = WindowAttention(dim, num_heads, window_size, qkv_bias=qkv_bias, attn_drop=attn_drop,
                                    proj_drop=proj_drop, qk_scale=qk_scale)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act=act, drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """The attention branch on an NHWC map: pad, roll, partition, attend, merge, roll back, crop."""
        B, H, W, C = x.shape
        window, shift = effective_window(H, W, self.window_size, self.shift_size)
        pad_b, pad_r = (-H) % window, (-W) % window
        if pad_b or pad_r:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        Hp, Wp = H + pad_b, W + pad_r
        if shift:
            x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
        mask = shifted_window_mask(Hp, Wp, window, shift, x.device) if shift else None
        x = window_reverse(self.attn(window_partition(x, window), mask, window), window, Hp, Wp)
        if shift:
            x = torch.roll(x, shifts=(shift, shift), dims=(1, 2))
        return x[:, :H, :W] if pad_b or pad_r else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attend(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2×2 neighbourhood -> one token: concat (4C) -> LayerNorm -> Linear 4C -> 2C without bias.

    Odd sides are zero-padded at the bottom/right first (as the references do), so H×W becomes ⌈H/2⌉×⌈W/2⌉.
    The concat order is (0,0), (1,0), (0,1), (1,1) (row, col), the order of the official weights.
    """

    def __init__(self, dim: int, out_dim: int | None = None, norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.out_dim = out_dim or 2 * dim
        self.norm = nn.LayerNorm(4 * dim, eps=norm_eps)
        self.reduction = nn.Linear(4 * dim, self.out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, H, W, _ = x.shape
        if H % 2 or W % 2:
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))
