"""The pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

from __future__ import annotations

import torch
from torch import nn

from .attention import Attention
from .drop import DropPath
from .linear_attention import ReLULinearAttention
from .mlp import Mlp


class LayerScale(nn.Module):
    """Per-channel learnable residual scale (CaiT); small init keeps deep models stable."""

    def __init__(self, dim: int, init_values: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


def add_residual_branches(block: nn.Module, dim: int, mlp_ratio: float, mlp_dim: int | None, proj_drop: float,
                          drop_path: float, init_values: float | None, norm_eps: float, act: str) -> None:
    """Give a pre-norm block (after its ``norm1`` and ``attn``) the rest of :class:`Block`'s modules, in its order:
    ``ls1``, ``drop_path1``, ``norm2``, ``mlp``, ``ls2``, ``drop_path2`` (LayerScale only with ``init_values``,
    DropPath only with a rate > 0)."""
    block.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
    block.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
    block.norm2 = nn.LayerNorm(dim, eps=norm_eps)
    block.mlp = Mlp(dim, mlp_dim or int(dim * mlp_ratio), act=act, drop=proj_drop)
    block.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
    block.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()


class Block(nn.Module):
    """Pre-norm transformer block. Inference code may swap a block for an equivalent subclass built from the
    same modules (``tools.inference.FusedBlock.from_block``); parameter names stay the same."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        mlp_dim: int | None = None,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        init_values: float | None = None,
        norm_eps: float = 1e-6,
        act: str = "gelu",
        attn_kind: str = "softmax",
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        if attn_kind == "softmax":
            self.attn: nn.Module = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop,
                                             proj_drop=proj_drop, qk_scale=qk_scale)
        elif attn_kind == "relu_linear":  # EfficientViT's kernel in a plain block: the softmax-vs-ReLU ablation
            if attn_drop or qk_scale is not None:
                raise ValueError("ReLU linear attention has no attention dropout or qk_scale")
            self.attn = ReLULinearAttention(dim, num_heads, qkv_bias=qkv_bias)
        else:
            raise ValueError(f"attn_kind must be 'softmax' or 'relu_linear', got {attn_kind!r}")
        add_residual_branches(self, dim, mlp_ratio, mlp_dim, proj_drop, drop_path, init_values, norm_eps, act)

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None = None, queries: slice | None = None
                ) -> torch.Tensor:
        """``queries`` computes the output of those tokens only (keys and values still come from all tokens):
        exact, and cheaper when only e.g. the CLS token is read afterwards."""
        y = self.attn(self.norm1(x), attn_bias, queries)
        if queries is not None:
            x = x[:, queries]
        x = x + self.drop_path1(self.ls1(y))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x
