"""Vision Transformer (Dosovitskiy et al., 2021), with every design switch the ViT paper ablates.

image -> patches (conv, or a ResNet stem for hybrids) -> [CLS] + tokens -> position information ->
pre-norm blocks (MHSA + MLP with residuals) -> LayerNorm -> pooling -> (pre-logits) -> head.

Switches (constructor arguments, so ablations are flags, not copies):

* ``pos_embed``: ``none`` | ``learned_1d`` | ``learned_2d`` | ``sincos_2d`` | ``relative`` (see
  :mod:`vitkit.layers.pos_embed` for how each is built and resampled).
* ``pos_sincos_order``: for ``sincos_2d``, ``hw`` (row channels first) or ``wh`` (column channels first, the
  MAE / big_vision / HF ViTMAE layout).
* ``pos_placement``: ``input`` (added once, before the first block) | ``every_layer`` (a separate table
  before each block) | ``every_layer_shared`` (one table added before each block). For ``relative``,
  the bias enters the first block's attention only, every block's attention with its own table, or every
  block's with one shared table. Only ``input`` with an absolute kind (or ``none``) lets tokens be dropped
  after :meth:`embed_tokens` (MAE masking); the others index their tables by the full token grid.
* ``pool``: ``cls`` | ``gap`` (mean of patch tokens) | ``none`` (all tokens go through the head);
  ``class_token`` switches the CLS token on or off.
* ``patch_stride < patch_size``: overlapping patches with the same token grid.
* ``stem='resnet'``: the hybrid model, patches cut from a ResNet feature map (``stem_layers``,
  ``stem_width``; ``patch_size`` then counts feature-map cells, usually 1).
* ``dynamic_img_size``: accept any image size divisible by the patch stride at forward time.
* ``attn_kind``: ``softmax`` | ``relu_linear`` (EfficientViT's ReLU linear attention in every block, same
  parameters: the study of whether ReLU attention can be as sharp as softmax).

Switches of timm's ViT (so its checkpoints convert, ``vitkit convert timm``):

* ``reg_tokens``: register tokens (Darcet et al., 2024) after [CLS], read by no head.
* ``no_embed_class``: the position table covers the patches only (DeiT-3, big_vision); prefix tokens get none.
* ``fc_norm``: the final LayerNorm acts on the pooled features instead of every token (timm's ``fc_norm``, its
  default with average pooling); it is then the ``pre_logits`` module and ``norm`` is the identity.
* ``pre_norm``: a LayerNorm on the embedded tokens before the blocks and no patch-projection bias (CLIP).
* :class:`DistilledVisionTransformer`: DeiT's distillation token and second head.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..data.constants import FMNIST_CLASSES, FMNIST_MEAN, FMNIST_STD, INCEPTION_MEAN, INCEPTION_STD
from ..errors import CheckpointError
from ..layers import SINCOS_ORDERS, Block, HybridEmbed, PatchEmbed, build_pos_embed, check_image_batch, sincos_2d
from ..layers.weight_init import trunc_normal_linears_
from ..utils import to_2tuple
from ._base import (
    POOL_TYPES,  # noqa: F401  (re-exported: the pool switch values)
    TokenClassifier,
    check_model_args,
    check_pool,
)
from ._registry import register_config

POS_PLACEMENTS = ("input", "every_layer", "every_layer_shared")


class VisionTransformer(TokenClassifier):
    per_block_prefixes = ("blocks.", "block_pos_embeds.")
    stem_prefixes = TokenClassifier.stem_prefixes + ("dist_token", "reg_token", "norm_pre.")
    distilled = False  # DistilledVisionTransformer: a distillation token and a second head

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        patch_stride: int | None = None,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        mlp_dim: int | None = None,
        qkv_bias: bool = True,
        class_token: bool = True,
        pool: str = "cls",
        pos_embed: str = "learned_1d",
        pos_sincos_order: str = "hw",
        pos_placement: str = "input",
        pos_interp: str = "bicubic",
        pos_interp_antialias: bool = True,
        dynamic_img_size: bool = False,
        stem: str = "patch",
        stem_layers: tuple[int, ...] = (3, 4, 9),
        stem_width: int = 64,
        init_values: float | None = None,
        norm_eps: float = 1e-6,
        act: str = "gelu",
        representation_size: int | None = None,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        reg_tokens: int = 0,
        no_embed_class: bool = False,
        fc_norm: bool = False,
        pre_norm: bool = False,
        attn_kind: str = "softmax",
    ) -> None:
        super().__init__()
        check_model_args(num_classes, dict(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                           embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                                           mlp_ratio=mlp_ratio),
                         dict(drop_rate=drop_rate, pos_drop_rate=pos_drop_rate, attn_drop_rate=attn_drop_rate,
                              drop_path_rate=drop_path_rate))
        check_pool(pool, class_token)
        if pos_placement not in POS_PLACEMENTS:
            raise ValueError(f"pos_placement must be one of {POS_PLACEMENTS}, got {pos_placement!r}")
        if pos_sincos_order not in SINCOS_ORDERS:
            raise ValueError(f"pos_sincos_order must be one of {SINCOS_ORDERS}, got {pos_sincos_order!r}")
        _check_timm_switches(self.distilled, reg_tokens, no_embed_class, fc_norm, representation_size, pool,
                             pos_embed, pos_placement)
        self.img_size = to_2tuple(img_size)
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.pool = pool
        self.pos_kind = pos_embed
        self.pos_sincos_order = pos_sincos_order
        self.pos_placement = pos_placement
        self.dynamic_img_size = dynamic_img_size
        self.no_embed_class = no_embed_class
        self.num_prefix_tokens = int(class_token) + int(self.distilled) + reg_tokens

        if stem == "patch":  # CLIP's pre-norm models have no bias in the patch projection
            self.patch_embed: nn.Module = PatchEmbed(self.img_size, patch_size, patch_stride, in_chans, embed_dim,
                                                     bias=not pre_norm)
        elif stem == "resnet":
            self.patch_embed = HybridEmbed(self.img_size, patch_size, in_chans, embed_dim, tuple(stem_layers),
                                           stem_width)
        else:
            raise ValueError(f"stem must be 'patch' or 'resnet', got {stem!r}")
        self.grid: tuple[int, int] = self.patch_embed.grid
        for size, r in zip(self.img_size, self.patch_embed.reduction):
            if size % r:
                raise ValueError(f"img_size {self.img_size} is not divisible by the patch stride {r}")

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if self.distilled else None
        self.reg_token = nn.Parameter(torch.zeros(1, reg_tokens, embed_dim)) if reg_tokens else None
        pos_prefix = 0 if no_embed_class else self.num_prefix_tokens
        make_pos = lambda: build_pos_embed(pos_embed, self.grid, embed_dim, num_heads, pos_prefix,
                                           pos_interp, pos_interp_antialias, pos_sincos_order)
        self.pos_embed = make_pos() if pos_placement != "every_layer" else None
        self.block_pos_embeds = (nn.ModuleList([make_pos() for _ in range(depth)])
                                 if pos_placement == "every_layer" and pos_embed != "none" else None)
        self.pos_drop = nn.Dropout(pos_drop_rate)
        self.norm_pre = nn.LayerNorm(embed_dim, eps=norm_eps) if pre_norm else nn.Identity()

        dpr = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, mlp_dim, qkv_bias, proj_drop=drop_rate, attn_drop=attn_drop_rate,
                  drop_path=dpr[i], init_values=init_values, norm_eps=norm_eps, act=act, attn_kind=attn_kind)
            for i in range(depth)
        ])
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps) if not fc_norm else nn.Identity()
        if fc_norm:  # timm's fc_norm: the final norm after pooling
            self.pre_logits: nn.Module = nn.LayerNorm(embed_dim, eps=norm_eps)
        elif representation_size:
            self.pre_logits = nn.Sequential(nn.Linear(embed_dim, representation_size), nn.Tanh())
        else:
            self.pre_logits = nn.Identity()
        self.num_features = representation_size or embed_dim
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if self.distilled:
            self.head_dist = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()
        self.pretrained_cfg = {"input_size": (in_chans, *self.img_size), "mean": (0.5,) * in_chans,
                               "std": (0.5,) * in_chans, "interpolation": "bicubic"}

    def _init_weights(self) -> None:
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        if self.reg_token is not None:
            nn.init.normal_(self.reg_token, std=1e-6)
        if self.dist_token is not None:
            nn.init.trunc_normal_(self.dist_token, std=0.02)
        trunc_normal_linears_(self)
        if isinstance(self.patch_embed, PatchEmbed):  # LeCun normal, as for a linear layer on flattened patches
            w = self.patch_embed.proj.weight
            nn.init.trunc_normal_(w, std=math.sqrt(1.0 / w[0].numel()))
            if self.patch_embed.proj.bias is not None:
                nn.init.zeros_(self.patch_embed.proj.bias)

    # ------------------------------------------------------------------ embedding and blocks
    def embed_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        check_image_batch(x, self.in_chans, self.patch_embed.reduction,
                          None if self.dynamic_img_size else self.img_size, type(self).__name__)
        x, grid = self.patch_embed(self.input_dtype(x))
        first = self._position_schedule()[0]
        absolute = first is not None and not first.is_bias  # the input position (block 0's, for every_layer*)
        if absolute and self.no_embed_class:  # a table for the patches only: added before the prefix joins
            x = first(x, grid)
        prefix = [t for t in (self.cls_token, self.dist_token, self.reg_token) if t is not None]
        if prefix:
            x = torch.cat([t.expand(x.shape[0], -1, -1).to(x.dtype) for t in prefix] + [x], dim=1)
        if absolute and not self.no_embed_class:
            x = first(x, grid)
        return self.norm_pre(self.pos_drop(x)), grid

    def _position_schedule(self) -> list[nn.Module | None]:
        """Which position module acts before (or, for a relative bias, inside) each block."""
        depth = len(self.blocks)
        if self.block_pos_embeds is not None:
            return list(self.block_pos_embeds)
        if self.pos_embed is None:
            return [None] * depth
        if self.pos_placement == "input":
            return [self.pos_embed] + [None] * (depth - 1)
        return [self.pos_embed] * depth

    def _block_inputs(self, i: int, x: torch.Tensor, grid: tuple[int, int], cache: dict
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if "schedule" not in cache:
            cache["schedule"] = self._position_schedule()
        pe = cache["schedule"][i]
        if pe is None:
            return x, None
        if pe.is_bias:  # a shared relative table is evaluated once per forward pass
            if id(pe) not in cache:
                cache[id(pe)] = pe(grid)[None]
            return x, cache[id(pe)]
        return (x if i == 0 else pe(x, grid)), None  # block 0's table was added by embed_tokens

    def _token_drop_blocker(self) -> str | None:
        if self.pos_kind == "relative":
            return "its relative position bias is indexed by the full token grid (pos_embed='relative')"
        if self.pos_kind != "none" and self.pos_placement != "input":
            return (f"it adds a position table over the full token grid before every block "
                    f"(pos_placement={self.pos_placement!r}); use pos_placement='input'")
        return None

    # ------------------------------------------------------------------ backbone transfer
    def adapt_backbone_state(self, state: dict[str, torch.Tensor], backbone: dict[str, Any]
                             ) -> tuple[dict[str, torch.Tensor], list[str]]:
        """A backbone pretrained with fixed sin-cos positions (MAE) stores no position weights.

        A learned table (``learned_1d``, input placement) then starts from those sin-cos values, computed for
        this model's grid, and is fine-tuned: what official MAE fine-tuning does. A ``sincos_2d`` model keeps
        fixed positions and needs the backbone's channel order. Any other kind is left to the usual
        missing-key error.
        """
        args = backbone.get("model_args", {})
        if args.get("pos_embed") != "sincos_2d" or "pos_embed.weight" in state:
            return state, []
        order = args.get("pos_sincos_order", "hw")
        if self.pos_kind == "sincos_2d":
            if self.pos_sincos_order != order:
                raise CheckpointError(f"the backbone was pretrained with pos_sincos_order={order!r}; build this "
                                      f"model with the same order (or a learned_1d table)")
            return state, []
        if self.pos_kind == "learned_1d" and self.pos_placement == "input":
            table = sincos_2d(self.grid, self.embed_dim, order=order)
            prefix = torch.zeros(self.pos_embed.num_prefix_tokens, self.embed_dim)
            state = {**state, "pos_embed.weight": torch.cat([prefix, table])[None]}
            return state, [f"pos_embed.weight (learned_1d) initialised from the backbone's fixed sincos_2d "
                           f"positions ({order})"]
        return state, []

    # ------------------------------------------------------------------ optimiser metadata
    def no_weight_decay(self) -> set[str]:
        """The tokens and position tables this model has (never decayed)."""
        tokens, tables = ("cls_token", "dist_token", "reg_token"), ("pos_embed.", "block_pos_embeds.")
        return {name for name, _ in self.named_parameters() if name in tokens or name.startswith(tables)}


def _check_timm_switches(distilled: bool, reg_tokens: int, no_embed_class: bool, fc_norm: bool,
                         representation_size: int | None, pool: str, pos_embed: str, pos_placement: str) -> None:
    """Reject combinations of the timm switches that would be silently mis-built."""
    if isinstance(reg_tokens, bool) or not isinstance(reg_tokens, int) or reg_tokens < 0:
        raise ValueError(f"reg_tokens must be an int >= 0, got {reg_tokens!r}")
    if no_embed_class and (pos_placement != "input" or pos_embed == "relative"):
        raise ValueError("no_embed_class needs an absolute position table added at the input (pos_placement='input')")
    if fc_norm and representation_size:
        raise ValueError("fc_norm and representation_size both act between pooling and the head; choose one")
    if distilled and pool != "cls":
        raise ValueError(f"the distilled head reads the CLS and distillation tokens: pool must be 'cls', got {pool!r}")


class DistilledVisionTransformer(VisionTransformer):
    """DeiT's distilled ViT (Touvron et al., 2021): a distillation token after [CLS] and a second head on it; the
    logits are the mean of both heads' (timm's ``VisionTransformerDistilled`` at inference).

    A class rather than a switch, because its head reads two tokens: code that computes the last block for the
    CLS token only (``tools.inference``) sees the overridden ``forward_head`` and keeps to the full forward.

    Training with a teacher (the classify task's ``distill_teacher``) calls :meth:`set_distilled_training`: in
    training mode the model then returns both heads' logits ``(cls, dist)``, one per DeiT loss term. In eval mode,
    or without that call, it returns their mean, so evaluation, export and serving see one logits tensor.
    """

    distilled = True
    distilled_training = False  # not a constructor argument: a saved model always answers with the mean
    head_prefixes = ("head.", "head_dist.")

    def set_distilled_training(self, enable: bool = True) -> None:
        """Return ``(cls_logits, dist_logits)`` in training mode from now on (the distillation loss needs both)."""
        self.distilled_training = enable

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False
                     ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        cls, dist = (self.head_drop(self.pre_logits(x[:, i])) for i in (0, 1))
        if pre_logits:
            return (cls + dist) / 2
        cls, dist = self.head(cls), self.head_dist(dist)
        if self.distilled_training and self.training:
            return cls, dist
        return (cls + dist) / 2

    def reset_classifier(self, num_classes: int, pool: str | None = None,
                         class_names: list[str] | None = None) -> None:
        """Replace both heads (the pooling stays 'cls')."""
        if pool not in (None, "cls"):
            raise ValueError(f"the distilled head reads the CLS and distillation tokens: pool must be 'cls', "
                             f"got {pool!r}")
        super().reset_classifier(num_classes, None, class_names)
        self.head_dist = self.new_head(num_classes, class_names)


# ---------------------------------------------------------------------- registered configurations
# name: (embed_dim, depth, num_heads)
VIT_SIZES = {
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    "huge": (1280, 32, 16),
}
# (size, patch, resolution): Ti/S/B/L/H at /32, /16, /14 and 224, plus the standard 384 fine-tuning sizes.
_VIT_CONFIGS = [(s, p, 224) for s in VIT_SIZES for p in (32, 16, 14)] + [
    ("tiny", 16, 384), ("small", 16, 384), ("small", 32, 384), ("base", 16, 384), ("base", 32, 384),
    ("large", 16, 384), ("large", 32, 384), ("huge", 14, 518),
]
for _size, _patch, _res in _VIT_CONFIGS:
    _dim, _depth, _heads = VIT_SIZES[_size]
    register_config(f"vit_{_size}_patch{_patch}_{_res}", VisionTransformer,
                    {"mean": INCEPTION_MEAN, "std": INCEPTION_STD},
                    img_size=_res, patch_size=_patch, embed_dim=_dim, depth=_depth, num_heads=_heads)

# Hybrids: a ResNet stem (output stride 16 for R50 = layers (3, 4, 9); 32 for R26 = (2, 2, 2, 2)) + 1x1 patches.
_HYBRID_CONFIGS = {
    "vit_small_r26_s32_224": dict(stem_layers=(2, 2, 2, 2), patch_size=1, embed_dim=384, num_heads=6),
    "vit_base_r50_s16_224": dict(stem_layers=(3, 4, 9), patch_size=1, embed_dim=768, num_heads=12),
    "vit_base_r50_s16_384": dict(stem_layers=(3, 4, 9), patch_size=1, embed_dim=768, num_heads=12, img_size=384),
    "vit_large_r50_s32_224": dict(stem_layers=(3, 4, 6, 3), patch_size=1, embed_dim=1024, depth=24,
                                  num_heads=16),
}
for _name, _cfg in _HYBRID_CONFIGS.items():
    register_config(_name, VisionTransformer, {"mean": INCEPTION_MEAN, "std": INCEPTION_STD},
                    **{"img_size": 224, "depth": 12, "stem": "resnet", **_cfg})

# Fashion-MNIST: 28x28 grayscale, 10 classes; patch 4 gives a 7x7 grid of 49 patch tokens.
_FMNIST_CFG = {"mean": FMNIST_MEAN, "std": FMNIST_STD, "class_names": FMNIST_CLASSES}
_FMNIST_BASE: dict[str, Any] = dict(img_size=28, in_chans=1, num_classes=10, patch_size=4)
_FMNIST_CONFIGS = {
    "vit_fmnist_tiny": dict(embed_dim=96, depth=6, num_heads=3, mlp_ratio=2.0),
    "vit_fmnist_small": dict(embed_dim=192, depth=8, num_heads=3, mlp_ratio=2.0),
    "vit_fmnist_base": dict(embed_dim=256, depth=12, num_heads=4, mlp_ratio=2.0),
    "vit_fmnist_p2_tiny": dict(embed_dim=96, depth=6, num_heads=3, mlp_ratio=2.0, patch_size=2),
    # Hybrid: 7x7/2 conv + max-pool + one bottleneck stage give a 7x7 map, then 1x1 patches: 49 tokens too.
    "vit_fmnist_hybrid_tiny": dict(embed_dim=96, depth=6, num_heads=3, mlp_ratio=2.0, stem="resnet",
                                   stem_layers=(1,), stem_width=16, patch_size=1),
}
for _name, _cfg in _FMNIST_CONFIGS.items():
    register_config(_name, VisionTransformer, _FMNIST_CFG, **{**_FMNIST_BASE, **_cfg})
# DeiT's distilled student at vit_fmnist_tiny's size (a teacher: the classify task's distill_teacher).
register_config("deit_fmnist_tiny_distilled", DistilledVisionTransformer, _FMNIST_CFG,
                **{**_FMNIST_BASE, **_FMNIST_CONFIGS["vit_fmnist_tiny"]})
