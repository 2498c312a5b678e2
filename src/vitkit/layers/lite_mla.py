"""LiteMLA: EfficientViT's lightweight multi-scale linear attention (Cai et al., ICCV 2023).

x (B, C, H, W) -> 1×1 conv to q, k, v -> multi-scale aggregation -> ReLU linear attention per head -> 1×1 conv + BN.

* **ReLU linear attention.** With q, k passed through ReLU, attention is
  ``out_i = Σ_j (q_i·k_j) v_j / Σ_j (q_i·k_j)``. Forming the d×d product ``[V; 1] Kᵀ`` first makes the cost
  linear in the number of tokens N: v is padded with a row of ones, so numerator and normaliser come out of the
  same two matmuls.
  ``eps = 1e-15`` is added to the normaliser (a query whose ReLU'd q is zero gets a zero output).
  The linear path is :func:`vitkit.layers.linear_attention.relu_linear_attention` (tokens-first, so the
  channels-first maps go in and come out as transposed views). For small maps (``H·W <= dim``) the N×N matrix
  is cheaper and the official code forms it (the "quadratic" path); both paths are the same function. Either
  runs in fp32 with autocast disabled: sums over N overflow or lose precision in fp16/bf16.
* **Multi-scale aggregation.** For each scale s (official default ``(5,)``) the qkv map also goes through a
  depthwise s×s conv and a grouped 1×1 conv (groups = 3·heads, so it mixes channels within each head's q, k or
  v only); the aggregated tokens form extra heads that attend alongside the base heads. ``scales=()`` is no
  aggregation at all (the ablation of EfficientViT's multi-scale tokens): the base heads alone, and ``proj``
  takes heads·dim channels instead of (1 + len(scales))·heads·dim.
* **Channel layout** (as the official code): after concatenating [qkv, aggregated qkv...] along channels, the
  map is read as (B, heads_total, 3·dim, H·W), so each head owns [q (dim), k (dim), v (dim)] consecutive
  channels, and the aggregated branches' heads come after the base heads.

Attention maps: while :func:`~vitkit.layers.attention.capture_attention` is active, every LiteMLA takes the
explicit N×N path (whatever the map size; the output is the same function) and records its normalised map
(B, heads_total, N_query, N_key), rows summing to 1. A query whose ReLU'd q is all zero attends to nothing (its
output is zero); its row is recorded as uniform (see
:func:`~vitkit.layers.linear_attention.rows_as_probabilities`).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttentionMapSource
from .linear_attention import relu_linear_attention, rows_as_probabilities
from .mbconv import ConvNormAct


def relu_quadratic_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-15
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The same function through the explicit map: (..., d, N) q, k, v -> (output (..., d, N), attention
    (..., N_key, N_query) whose columns sum to 1 over the keys)."""
    attn = k.transpose(-2, -1) @ q
    attn = attn / (attn.sum(dim=-2, keepdim=True) + eps)
    return v @ attn, attn


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    try:
        return torch.autocast(device_type=device_type, enabled=False)
    except RuntimeError:  # a device type autocast does not know (e.g. meta): nothing to disable
        return contextlib.nullcontext()


class LiteMLA(AttentionMapSource, nn.Module):
    """Multi-scale ReLU linear attention on a (B, C, H, W) map; names as the official module (qkv, aggreg, proj).

    ``heads`` defaults to ``int(in_channels // dim * heads_ratio)``; ``force_path`` (``"linear"`` /
    ``"quadratic"``) overrides the official size rule, for tests and benchmarks.
    """

    def __init__(self, in_channels: int, out_channels: int | None = None, dim: int = 8, heads: int | None = None,
                 heads_ratio: float = 1.0, scales: tuple[int, ...] = (5,), eps: float = 1e-15) -> None:
        super().__init__()
        out_channels = out_channels or in_channels
        heads = heads or int(in_channels // dim * heads_ratio)
        if heads < 1:
            raise ValueError(f"LiteMLA on {in_channels} channels with dim {dim} and heads_ratio {heads_ratio} has "
                             f"no heads; use a smaller dim")
        bad = [s for s in scales if isinstance(s, bool) or not isinstance(s, int) or s < 1 or s % 2 == 0]
        if bad:
            raise ValueError(f"aggregation scales must be odd kernel sizes, got {list(scales)}")
        self.dim = dim
        self.heads = heads
        self.eps = eps
        self.force_path: str | None = None
        total = heads * dim
        self.qkv = ConvNormAct(in_channels, 3 * total, 1, norm=False, act=None)
        # per scale: depthwise s×s, then 1×1 within each head's q, k or v (index names 0/1 as the official code)
        self.aggreg = nn.ModuleList([
            nn.Sequential(
                nn.Conv2d(3 * total, 3 * total, s, padding=s // 2, groups=3 * total, bias=False),
                nn.Conv2d(3 * total, 3 * total, 1, groups=3 * heads, bias=False),
            )
            for s in scales])
        self.proj = ConvNormAct(total * (1 + len(scales)), out_channels, 1, norm=True, act=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(x)
        qkv = torch.cat([qkv, *(aggregate(qkv) for aggregate in self.aggreg)], dim=1)
        B, _, H, W = qkv.shape
        # (B, heads_total, 3·dim, N): each head's channels are [q | k | v], kept channels-first as the official code
        out = self.attend(qkv.reshape(B, -1, 3 * self.dim, H * W))
        return self.proj(out.reshape(B, -1, H, W).to(qkv.dtype))

    def attend(self, qkv: torch.Tensor) -> torch.Tensor:
        """(B, heads, 3·dim, N) -> (B, heads, dim, N) in fp32, by the path the official rule picks."""
        path = self.force_path or ("quadratic" if qkv.shape[-1] <= self.dim else "linear")
        if path not in ("linear", "quadratic"):
            raise ValueError(f"force_path must be None, 'linear' or 'quadratic', got {self.force_path!r}")
        if self.attn_sink is not None:
            path = "quadratic"
        with _autocast_off(qkv.device.type):
            q, k, v = qkv.float().split(self.dim, dim=-2)
            q, k = F.relu(q), F.relu(k)
            if path == "linear":  # the shared tokens-first function, on transposed views
                q, k, v = (t.transpose(-2, -1) for t in (q, k, v))
                return relu_linear_attention(q, k, v, self.eps).transpose(-2, -1)
            out, attn = relu_quadratic_attention(q, k, v, self.eps)
            if self.attn_sink is not None:
                self._record(rows_as_probabilities(attn.transpose(-2, -1)))
            return out

    def extra_repr(self) -> str:
        return f"heads={self.heads}, dim={self.dim}, scales={[m[0].kernel_size[0] for m in self.aggreg]}"
