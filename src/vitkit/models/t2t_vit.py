"""Tokens-to-Token ViT (Yuan et al., 2021): a ViT whose tokenizer models local structure.

image -> soft split (overlapping 7×7/4 windows as tokens) -> [token block -> tokens back to a map ->
soft split 3×3/2] ×2 -> Linear to embed_dim -> [CLS] + tokens + fixed 1D sinusoid -> pre-norm blocks ->
LayerNorm -> pooling -> head.

Switches:

* ``tokens_type``: ``performer`` (linear-cost kernel attention in the token blocks, the default of T2T-ViT-7..24)
  | ``transformer`` (single-head softmax attention, the T2T-ViT_t models). See :mod:`vitkit.layers.t2t`.
* ``t2t_kernels``: one (kernel, stride, padding) per soft split; the product of the strides is the total
  down-sampling (16 for the official schedule). Small images get their own schedule (see the FMNIST configs).
* ``pool``: ``cls`` | ``gap``; ``dynamic_img_size``: any image size divisible by the total stride.
* ``qk_scale``: the backbone's attention scale (default head_dim^-0.5). The official *pretrained* factories set
  embed_dim^-0.5, so converted ImageNet checkpoints carry that value (see :mod:`vitkit.convert.t2t`).

Position embedding: the sinusoid over positions 0..N (CLS at 0) is fixed, so it is a non-persistent buffer that
is recomputed for any token count. Changing the resolution (at load time or at forward time) needs no
interpolation and nothing in the checkpoint depends on it.

Attention maps: the performer has no attention matrix and records nothing; with ``tokens_type='transformer'``
``attention_maps`` returns the two token-block maps (B, 1, N_i, N_i) first, then the backbone maps.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..data.constants import FMNIST_CLASSES, FMNIST_MEAN, FMNIST_STD, IMAGENET_MEAN, IMAGENET_STD
from ..errors import InputShapeError
from ..layers import Block, check_image_batch
from ..layers.t2t import TokensToToken, sinusoid_table
from ..layers.weight_init import trunc_normal_linears_
from ..utils import to_2tuple
from ._base import TokenClassifier, check_model_args, check_pool
from ._registry import register_config

TOKENS_TYPES = ("performer", "transformer")
OFFICIAL_KERNELS = ((7, 4, 2), (3, 2, 1), (3, 2, 1))


class T2TViT(TokenClassifier):
    stem_prefixes = ("cls_token", "tokens_to_token.")

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        tokens_type: str = "performer",
        token_dim: int = 64,
        t2t_kernels: tuple[tuple[int, int, int], ...] = OFFICIAL_KERNELS,
        performer_kernel_ratio: float = 0.5,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        qk_scale: float | None = None,
        class_token: bool = True,
        pool: str = "cls",
        dynamic_img_size: bool = False,
        norm_eps: float = 1e-5,
        act: str = "gelu",
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        check_model_args(num_classes, dict(img_size=img_size, in_chans=in_chans, token_dim=token_dim,
                                           embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                                           mlp_ratio=mlp_ratio),
                         dict(drop_rate=drop_rate, attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate))
        if tokens_type not in TOKENS_TYPES:
            raise ValueError(f"tokens_type must be one of {TOKENS_TYPES}, got {tokens_type!r}")
        check_pool(pool, class_token)
        self.img_size = to_2tuple(img_size)
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.num_features = embed_dim
        self.tokens_type = tokens_type
        self.pool = pool
        self.dynamic_img_size = dynamic_img_size
        self.num_prefix_tokens = 1 if class_token else 0

        self.tokens_to_token = TokensToToken(in_chans, embed_dim, token_dim, t2t_kernels, tokens_type, norm_eps,
                                             performer_kernel_ratio, act)
        r = self.tokens_to_token.reduction
        self.reduction = (r, r)
        if any(s % r for s in self.img_size):
            raise ValueError(f"img_size {self.img_size} is not divisible by the total T2T stride {r}")
        self.grid = self.tokens_to_token.output_grid(self.img_size)
        if min(self.grid) < 1:
            raise ValueError(f"img_size {self.img_size} is too small for the soft splits {t2t_kernels}")

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.register_buffer("pos_embed", self._pos_table(self.grid), persistent=False)
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale, proj_drop=drop_rate,
                  attn_drop=attn_drop_rate, drop_path=dpr[i], norm_eps=norm_eps, act=act)
            for i in range(depth)
        ])
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.pre_logits = nn.Identity()
        self.head_drop = nn.Identity()  # the official head has no dropout
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if in_chans == 3 else ((0.5,) * in_chans, (0.5,) * in_chans)
        self.pretrained_cfg = {"input_size": (in_chans, *self.img_size), "mean": mean, "std": std,
                               "interpolation": "bicubic"}

    def _init_weights(self) -> None:
        """Truncated-normal Linears and CLS token (std 0.02), zero biases; the performer's ``w`` stays as drawn."""
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        trunc_normal_linears_(self)

    def _pos_table(self, grid: tuple[int, int]) -> torch.Tensor:
        return sinusoid_table(self.num_prefix_tokens + grid[0] * grid[1], self.embed_dim)[None]

    # ------------------------------------------------------------------ embedding and blocks
    def embed_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        check_image_batch(x, self.in_chans, self.reduction, None if self.dynamic_img_size else self.img_size,
                          type(self).__name__)
        expected = self.tokens_to_token.output_grid((x.shape[-2], x.shape[-1]))
        if min(expected) < 1:
            raise InputShapeError(f"image size {x.shape[-2]}x{x.shape[-1]} is too small for the soft splits "
                                  f"{self.tokens_to_token.kernels} of this {type(self).__name__}")
        x, grid = self.tokens_to_token(self.input_dtype(x))
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        pos = self.pos_embed if grid == self.grid else self._pos_table(grid).to(x.device)
        return self.pos_drop(x + pos.to(x.dtype)), grid

    # ------------------------------------------------------------------ optimiser metadata
    def no_weight_decay(self) -> set[str]:
        return {"cls_token"} if self.cls_token is not None else set()


# ---------------------------------------------------------------------- registered configurations
# name: (embed_dim, depth, num_heads, mlp_ratio), from the paper (Table 1) / the official factories; token_dim 64.
T2T_SIZES = {
    "7": (256, 7, 4, 2.0),
    "10": (256, 10, 4, 2.0),
    "12": (256, 12, 4, 2.0),
    "14": (384, 14, 6, 3.0),
    "19": (448, 19, 7, 3.0),
    "24": (512, 24, 8, 3.0),
}
_IMAGENET_CFG = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}
for _size, (_dim, _depth, _heads, _mlp) in T2T_SIZES.items():
    _args = dict(img_size=224, token_dim=64, embed_dim=_dim, depth=_depth, num_heads=_heads, mlp_ratio=_mlp)
    register_config(f"t2t_vit_{_size}", T2TViT, _IMAGENET_CFG, tokens_type="performer", **_args)
    if _size in ("14", "19", "24"):  # the official T2T-ViT_t variants: softmax token transformers
        register_config(f"t2t_vit_t_{_size}", T2TViT, _IMAGENET_CFG, tokens_type="transformer", **_args)

# Fashion-MNIST (28×28, 1 channel). The official splits would shrink 28 to 7 after the first split and to 2 at the
# end, so the first soft split keeps the resolution (3×3 windows, stride 1) and the two re-structurization steps
# halve it as in the paper: 28 -> 28 -> 14 -> 7, i.e. 49 tokens, the token count of the patch-4 ViT FMNIST
# configs. The backbone is the same as the ViT counterpart's (vit_fmnist_tiny: 96 wide, 6 blocks, 3 heads, mlp 2),
# so a comparison isolates the tokenizer; token_dim = embed_dim / 6 keeps the T2T module small, and the totals
# stay within ~3% of the ViT's (t2t_vit_fmnist_tiny 472k vs vit_fmnist_tiny 456k; small 2.47M vs 2.39M).
FMNIST_KERNELS = ((3, 1, 1), (3, 2, 1), (3, 2, 1))
_FMNIST_CFG = {"mean": FMNIST_MEAN, "std": FMNIST_STD, "class_names": FMNIST_CLASSES}
_FMNIST_BASE: dict[str, Any] = dict(img_size=28, in_chans=1, num_classes=10, t2t_kernels=FMNIST_KERNELS,
                                    mlp_ratio=2.0)
_FMNIST_CONFIGS = {
    "t2t_vit_fmnist_tiny": dict(embed_dim=96, depth=6, num_heads=3, token_dim=16),
    "t2t_vit_t_fmnist_tiny": dict(embed_dim=96, depth=6, num_heads=3, token_dim=16, tokens_type="transformer"),
    "t2t_vit_fmnist_small": dict(embed_dim=192, depth=8, num_heads=3, token_dim=32),
}
for _name, _cfg in _FMNIST_CONFIGS.items():
    register_config(_name, T2TViT, _FMNIST_CFG, **{**_FMNIST_BASE, **_cfg})
