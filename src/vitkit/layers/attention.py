"""Multi-head self-attention with a fused qkv projection.

The fast path calls ``F.scaled_dot_product_attention`` and never materialises the attention matrix.
When a caller wants the attention probabilities (visualisation, attention rollout), the modules
switch to an explicit softmax path for that call only; see :func:`capture_attention`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn


class AttentionMapSource:
    """Mixin for every module that can report its attention probabilities.

    While ``attn_sink`` is a list, the module computes attention explicitly and appends the
    probabilities (B, heads, N_query, N_key) to it, in execution order.
    """

    attn_sink: list[torch.Tensor] | None = None

    def _record(self, attn: torch.Tensor) -> None:
        if self.attn_sink is not None:
            self.attn_sink.append(attn)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                attn_bias: torch.Tensor | None = None, dropout_p: float = 0.0) -> torch.Tensor:
        """softmax(q kᵀ · scale + bias) v: SDPA normally, written out when maps are captured (or SDPA is slow)."""
        if attn_bias is not None and attn_bias.dtype not in (q.dtype, torch.bool):
            attn_bias = attn_bias.to(q.dtype)
        if self.attn_sink is None and not _slow_sdpa_backward(q) and not _explicit_is_faster(q, k):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, dropout_p=dropout_p, scale=scale)
        logits = (q * scale) @ k.transpose(-2, -1)
        if attn_bias is not None:
            if attn_bias.dtype == torch.bool:
                logits = logits.masked_fill(~attn_bias, float("-inf"))
            else:
                logits = logits + attn_bias
        attn = logits.softmax(dim=-1)
        self._record(attn)
        attn = F.dropout(attn, dropout_p, training=dropout_p > 0)
        return attn @ v


@contextmanager
def capture_attention(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect the attention probabilities of every attention layer of ``model`` during one forward.

    Example::

        with capture_attention(model) as maps:
            model(images)
        # maps[i]: (B, heads, N, N) for the i-th attention layer that ran
    """
    sources = [m for m in model.modules() if isinstance(m, AttentionMapSource)]
    maps: list[torch.Tensor] = []
    for m in sources:
        m.attn_sink = maps
    try:
        yield maps
    finally:
        for m in sources:
            m.attn_sink = None


def _slow_sdpa_backward(q: torch.Tensor) -> bool:
    """True where SDPA's backward is known to be slow: bf16 on CPU (torch 2.13's CPU flash-attention backward
    measured 5x slower than the explicit softmax path for ViT-sized sequences). Forward-only calls keep SDPA."""
    return q.dtype == torch.bfloat16 and q.device.type == "cpu" and q.requires_grad and torch.is_grad_enabled()


EXPLICIT_BF16_MAX_KEYS = 256  # the longest key sequence the explicit bf16 path was measured faster for (197)


def _explicit_is_faster(q: torch.Tensor, k: torch.Tensor) -> bool:
    """True for bf16 CPU inference on short sequences, where the explicit q kᵀ -> softmax -> @ v (two bf16 GEMMs
    through oneDNN) beats torch 2.13's CPU flash-attention kernel: 11.0 vs 17.4-21.1 ms (two runs) for
    (32, 6, 197, 64) on a 2-core AVX512-BF16 EPYC, same max |Δ| to an fp32 reference; whole-model effect in
    benchmarks/RESULTS.md. The full (N, N) map is
    materialised, so long sequences keep SDPA."""
    return (q.dtype == torch.bfloat16 and q.device.type == "cpu" and not torch.is_grad_enabled()
            and k.shape[-2] <= EXPLICIT_BF16_MAX_KEYS)


class Attention(AttentionMapSource, nn.Module):
    """Multi-head self-attention: one ``qkv`` Linear laid out as (3, heads, head_dim), then SDPA.

    ``attn_bias`` (broadcastable to (B, heads, N, N)) is added to the logits before the softmax; it
    carries relative position biases and masks.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        qk_scale: float | None = None,
        proj_bias: bool = True,
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"embed dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale if qk_scale is not None else self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None = None, queries: slice | None = None
                ) -> torch.Tensor:
        return self.proj_drop(self.proj(self.mix(x, attn_bias, queries)))

    def mix(self, x: torch.Tensor, attn_bias: torch.Tensor | None = None, queries: slice | None = None
            ) -> torch.Tensor:
        """Attention up to (not including) the output projection: (B, N, C) -> (B, N_query, C).

        Separate from :meth:`forward` so that fused inference blocks can hand the projection the residual too.
        ``queries`` keeps only those query tokens (keys and values stay complete), e.g. ``slice(0, 1)`` when
        only the CLS token's output is needed.

        q, k and v stay strided views of the qkv output: SDPA's CPU flash kernel takes any strides, and making
        them contiguous only adds copies (measured slower). Its output is laid out (B, N, heads, head_dim) in
        memory, so the transpose + reshape below costs nothing.
        """
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if queries is not None:
            q = q[:, :, queries]
            if attn_bias is not None and attn_bias.shape[-2] != 1:
                attn_bias = attn_bias[..., queries, :]
        out = self._attend(q, k, v, self.scale, attn_bias, self.attn_drop if self.training else 0.0)
        return out.transpose(1, 2).reshape(B, q.shape[2], C)
