"""ReLU linear attention (EfficientViT's global attention): the one implementation, and a plain multi-head module.

With q = ReLU(x W_q) and k = ReLU(x W_k), attention is taken as

    out_i = sum_j (q_i · k_j) v_j / sum_j (q_i · k_j) = q_i (Kᵀ V) / q_i (Kᵀ 1),

so Kᵀ V (head_dim x head_dim per head) is formed once and the cost is O(N · d²) instead of O(N² · d). As in
EfficientViT, V is padded with ones so that the numerator and the denominator come out of the same two matmuls,
and the whole computation runs in fp32 (sums over N tokens overflow / lose precision in bf16/fp16), then casts
back to the input dtype.

:func:`relu_linear_attention` is shared: :class:`ReLULinearAttention` below (tokens-first, no multi-scale
aggregation or depthwise convolutions) and EfficientViT's :class:`~vitkit.layers.lite_mla.LiteMLA` (channels-first
maps, passed transposed) both call it.

Attention maps: the normalised ReLU attention is a distribution over keys for every query,
``A_ij = q_i·k_j / Σ_j q_i·k_j`` (:func:`relu_attention_map`, formed explicitly: N×N, for small N). While
:func:`~vitkit.layers.attention.capture_attention` is active, :class:`ReLULinearAttention` records it like a softmax
layer records its probabilities (the output still comes from the linear path), so sharpness statistics
(:mod:`vitkit.viz.attention_stats`) compare softmax and ReLU attention through one mechanism.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttentionMapSource


def relu_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-15) -> torch.Tensor:
    """(..., N, d) q, k (already non-negative) and (..., N, d_v) v -> (..., N, d_v), computed in fp32, returned in
    v's dtype. A query whose q is all zero gets a zero output (``eps`` in the normaliser).

    The products are formed in the order of EfficientViT's official code on its channels-first maps,
    ``([V; 1] Kᵀ) Q``, so that LiteMLA, which passes its (..., d, N) maps as transposed views, keeps the official
    numerics bit for bit."""
    dtype = v.dtype
    # channels-first views (..., d, N); transpose, not .mT, which the ONNX exporter cannot translate
    q, k, v = (t.float().transpose(-2, -1) for t in (q, k, v))
    vk = F.pad(v, (0, 0, 0, 1), value=1.0) @ k.transpose(-2, -1)  # (..., d_v + 1, d): the last row sums kᵀ1
    out = vk @ q  # (..., d_v + 1, N)
    return (out[..., :-1, :] / (out[..., -1:, :] + eps)).transpose(-2, -1).to(dtype)


def rows_as_probabilities(scores: torch.Tensor) -> torch.Tensor:
    """(..., N_query, N_key) non-negative scores -> rows that sum to exactly 1.

    A query whose ReLU'd q is zero has no attention at all (0/0; the eps of the linear path makes its output
    zero): its row becomes uniform, the distribution that prefers no key, so consumers such as attention rollout
    and the sharpness statistics always get probabilities.
    """
    total = scores.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, scores / total.clamp_min(torch.finfo(scores.dtype).tiny), 1.0 / scores.shape[-1])


def relu_attention_map(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The attention matrix ReLU linear attention implies, formed explicitly in fp32: (..., N_q, d) q and
    (..., N_k, d) k (already non-negative) -> (..., N_q, N_k), ``A_ij = q_i·k_j / Σ_j q_i·k_j``, rows summing to
    1 (:func:`rows_as_probabilities`). O(N²) memory: for inspection on small token counts, not for the forward."""
    return rows_as_probabilities(q.float() @ k.float().transpose(-2, -1))


class ReLULinearAttention(AttentionMapSource, nn.Module):
    """Multi-head ReLU linear attention with a fused ``qkv`` Linear and ``proj`` (names as in ``Attention``).

    (B, N, C) -> (B, N, C); cost linear in N. A token whose q is all zero (ReLU) gets a zero output. While maps
    are captured it also records :func:`relu_attention_map` (B, heads, N, N).
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, proj_bias: bool = True,
                 eps: float = 1e-15) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"embed dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.eps = eps
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None = None, queries: slice | None = None
                ) -> torch.Tensor:
        """``attn_bias`` has no meaning for a kernel without logits (an error); ``queries`` keeps those tokens'
        outputs (the keys are all tokens either way), as :class:`~vitkit.layers.attention.Attention` does."""
        if attn_bias is not None:
            raise ValueError("ReLU linear attention takes no additive attention bias (it has no logits)")
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = F.relu(q), F.relu(k)
        if self.attn_sink is not None:
            self._record(relu_attention_map(q, k))
        out = relu_linear_attention(q, k, v, self.eps)
        out = out.transpose(1, 2).reshape(B, N, C)
        return self.proj(out if queries is None else out[:, queries])
