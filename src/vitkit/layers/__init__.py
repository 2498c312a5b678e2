"""Building blocks shared by every vitkit model family."""

from .attention import Attention, AttentionMapSource, capture_attention
from .block import Block, LayerScale
from .drop import DropPath, drop_path
from .mlp import Mlp, get_act_layer
from .patch_embed import HybridEmbed, PatchEmbed, check_image_batch
from .pos_embed import (
    POS_EMBED_KINDS,
    SINCOS_ORDERS,
    LearnedPosEmbed1D,
    LearnedPosEmbed2D,
    RelativePositionBias,
    SinCosPosEmbed2D,
    build_pos_embed,
    resample_abs_pos_embed,
    sincos_1d,
    sincos_2d,
)
from .resnet_stem import ResNetStem, StdConv2d
from .sparse_window import GroupLayout, SparseWindowAttention, SparseWindowBlock, build_groups
from .window_attention import PatchMerging, SwinBlock, WindowAttention, window_partition, window_reverse

__all__ = [
    "Attention", "AttentionMapSource", "capture_attention", "Block", "LayerScale", "DropPath", "drop_path",
    "Mlp", "get_act_layer", "HybridEmbed", "PatchEmbed", "check_image_batch", "POS_EMBED_KINDS", "SINCOS_ORDERS",
    "LearnedPosEmbed1D", "LearnedPosEmbed2D", "RelativePositionBias", "SinCosPosEmbed2D", "build_pos_embed",
    "resample_abs_pos_embed", "sincos_1d", "sincos_2d", "ResNetStem", "StdConv2d",
    "GroupLayout", "SparseWindowAttention", "SparseWindowBlock", "build_groups", "PatchMerging", "SwinBlock",
    "WindowAttention", "window_partition", "window_reverse",
]
