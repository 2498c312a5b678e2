"""EfficientViT (Cai et al., ICCV 2023; MIT HAN lab), the classification B-series: a convolutional network whose
last stages add global context with ReLU linear attention, so the cost stays linear in the number of pixels.

image -> stem [3×3 s2 conv + BN + act -> DSConv residuals] -> 2 local stages [MBConv s2 -> MBConv residuals]
-> attention stages [MBConv s2 (fewer norms) -> EfficientViTBlocks] -> head [1×1 conv + BN + act -> global
average pool -> Linear (no bias) -> LayerNorm -> act -> dropout -> Linear].

An EfficientViTBlock is ``x + LiteMLA(x)`` (global context, :mod:`vitkit.layers.lite_mla`) followed by
``x + MBConv(x)`` (local detail). Every stage but the stem starts with a stride-2 block without shortcut.

Layout choices (the official code at mit-han-lab/efficientvit, ``EfficientViTBackbone`` + ``ClsHead``; its
weights load through ``vitkit convert efficientvit``):

* ``widths``/``depths`` list the stem first, as the official ``width_list``/``depth_list``: entries 1-2 are the
  local (MBConv) stages, entries 3+ the attention stages. ``expand_ratio == 1`` makes every local block a DSConv,
  as in the official ``build_local_block``.
* Stage numbering follows the official backbone's outputs ``stage0`` (the stem) .. ``stage4``: ``num_stages``
  counts the stem, and ``forward_intermediates`` indexes these maps (strides 2, 4, 8, 16, 32 with
  ``stem_stride=2``). There is no final norm, so its ``norm`` flag changes nothing.
* ``stem_stride`` (official: 2) lets small images keep a useful map size (see the Fashion-MNIST config).
* ``head_widths=None`` builds a plain global-average-pool + Linear head (for backbone-only checkpoints).
* ``drop_path_rate`` rises linearly over the residual branches of the stages (stem excluded), as the official
  ``apply_droppath`` does (without its schedule over training progress).
* Activation names are vitkit's: the official ``hswish`` is ``hardswish``.
* ``attn_eps`` is the linear attention's normaliser eps: the official 1e-15 by default; timm's port uses 1e-5
  (``vitkit convert timm`` sets it).
* Ablation switches (the paper's answer to ReLU linear attention's blunt, global maps): ``local_dwconv=False``
  drops the depthwise 3×3 conv (and its activation) from the MBConv after every LiteMLA, leaving a pointwise FFN
  of the same expand ratio (1×1 expand + act -> 1×1 project); ``scales=()`` drops the multi-scale aggregation
  (see :mod:`vitkit.layers.lite_mla`). The defaults are the official model, with the official state-dict keys;
  ``local_dwconv=False`` only removes the ``local_module.depth_conv`` keys of the attention stages.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn

from ..data.constants import FMNIST_CLASSES, FMNIST_MEAN, FMNIST_STD, IMAGENET_MEAN, IMAGENET_STD
from ..layers.drop import DropPath
from ..layers.lite_mla import LiteMLA
from ..layers.mbconv import ConvNormAct, DSConv, MBConv, build_act
from ..layers.patch_embed import check_image_batch
from ..layers.weight_init import trunc_normal_linears_
from ..utils import to_2tuple
from ._base import VitkitModel, check_model_args, stage_intermediates
from ._registry import register_config


class EfficientViTStem(nn.Module):
    """3×3 conv (stride ``stride``) + BN + act, then ``depth`` residual DSConvs at that width."""

    def __init__(self, in_chans: int, width: int, depth: int, act: str, stride: int = 2) -> None:
        super().__init__()
        self.in_conv = ConvNormAct(in_chans, width, 3, stride, act=act)
        self.blocks = nn.ModuleList([DSConv(width, width, act=act, residual=True) for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.in_conv(x)
        for block in self.blocks:
            x = block(x)
        return x


def _local_block(in_channels: int, out_channels: int, stride: int, expand_ratio: float, act: str,
                 fewer_norm: bool = False, residual: bool = False, drop_path: float = 0.0) -> nn.Module:
    """The official ``build_local_block``: a DSConv when there is no expansion, else an MBConv."""
    if expand_ratio == 1:
        return DSConv(in_channels, out_channels, stride, act=act, fewer_norm=fewer_norm, residual=residual,
                      drop_path=drop_path)
    return MBConv(in_channels, out_channels, stride, expand_ratio, act=act, fewer_norm=fewer_norm,
                  residual=residual, drop_path=drop_path)


class EfficientViTBlock(nn.Module):
    """Global context then local detail, each a residual branch: ``x + LiteMLA(x)``, then ``x + MBConv(x)``.

    ``local_dwconv=False`` (an ablation) makes the local branch a pointwise FFN: the MBConv without its depthwise
    conv, so the block mixes positions only inside LiteMLA (its attention and multi-scale aggregation)."""

    def __init__(self, channels: int, dim: int, expand_ratio: float, scales: tuple[int, ...], act: str,
                 heads_ratio: float = 1.0, drop_path: tuple[float, float] = (0.0, 0.0), eps: float = 1e-15,
                 local_dwconv: bool = True) -> None:
        super().__init__()
        self.context_module = LiteMLA(channels, channels, dim=dim, heads_ratio=heads_ratio, scales=scales, eps=eps)
        self.context_drop = DropPath(drop_path[0]) if drop_path[0] > 0 else nn.Identity()
        self.local_module = MBConv(channels, channels, expand_ratio=expand_ratio, act=act, fewer_norm=True,
                                   residual=True, drop_path=drop_path[1])
        if not local_dwconv:  # 1×1 expand (+act) -> 1×1 project; the other keys stay the official ones
            self.local_module.depth_conv = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.context_drop(self.context_module(x))
        return self.local_module(x)


class EfficientViTStage(nn.Module):
    """One resolution: a stride-2 block that changes the width (no shortcut), then residual blocks."""

    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class ClsHead(nn.Module):
    """The official ``ClsHead``: 1×1 conv + BN + act -> pool -> Linear (no bias) -> LayerNorm -> act -> dropout ->
    Linear. Without ``widths`` it is pool -> dropout -> Linear."""

    def __init__(self, in_channels: int, widths: tuple[int, int] | None, num_classes: int, act: str,
                 drop_rate: float = 0.0) -> None:
        super().__init__()
        if widths is not None:
            self.in_conv = ConvNormAct(in_channels, widths[0], 1, act=act)
            self.fc = nn.Linear(widths[0], widths[1], bias=False)
            self.norm = nn.LayerNorm(widths[1])
            self.act = build_act(act)
            self.num_features = widths[1]
        else:
            self.in_conv = self.fc = self.norm = self.act = nn.Identity()
            self.num_features = in_channels
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(drop_rate)
        self.classifier = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.pool(self.in_conv(x)).flatten(1)
        x = self.drop(self.act(self.norm(self.fc(x))))
        return x if pre_logits else self.classifier(x)


class EfficientViT(VitkitModel):
    """EfficientViT classifier: stem, local stages, attention stages and the official head (see the module
    docstring). The defaults are EfficientViT-B0; ``forward_features`` gives the last stage's map."""

    head_prefixes = ("head.classifier.",)  # a checkpoint for another label set keeps the rest of the head

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        widths: tuple[int, ...] = (8, 16, 32, 64, 128),
        depths: tuple[int, ...] = (1, 2, 2, 2, 2),
        dim: int = 16,
        expand_ratio: float = 4.0,
        head_widths: tuple[int, int] | None = (1024, 1280),
        scales: tuple[int, ...] = (5,),
        heads_ratio: float = 1.0,
        act: str = "hardswish",
        stem_stride: int = 2,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        attn_eps: float = 1e-15,
        local_dwconv: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(local_dwconv, bool):
            raise ValueError(f"local_dwconv must be true or false, got {local_dwconv!r}")
        check_model_args(num_classes, dict(img_size=img_size, in_chans=in_chans, dim=dim, expand_ratio=expand_ratio,
                                           heads_ratio=heads_ratio, attn_eps=attn_eps),
                         dict(drop_rate=drop_rate, drop_path_rate=drop_path_rate))
        widths, depths = list(widths), list(depths)
        _check_layout(widths, depths, head_widths, stem_stride)
        build_act(act)  # an unknown activation fails here, with the list of known ones
        self.img_size = to_2tuple(img_size)
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.widths = tuple(widths)
        self.num_stages = len(widths)  # the stem is stage 0, as in the official backbone's outputs
        self.grad_checkpointing = False

        self.stem = EfficientViTStem(in_chans, widths[0], depths[0], act, stem_stride)
        # one drop-path rate per residual branch of the stages, rising linearly (the official apply_droppath)
        n_branches = sum(d - 1 for d in depths[1:3]) + 2 * sum(depths[3:])
        rates = iter([drop_path_rate * (i + 1) / n_branches for i in range(n_branches)])
        self.stages = nn.ModuleList()
        in_ch = widths[0]
        for i, (w, d) in enumerate(zip(widths[1:], depths[1:]), start=1):
            if i <= 2:  # local stages
                blocks = [_local_block(in_ch, w, 2, expand_ratio, act)]
                blocks += [_local_block(w, w, 1, expand_ratio, act, residual=True, drop_path=next(rates))
                           for _ in range(d - 1)]
            else:  # attention stages
                blocks = [_local_block(in_ch, w, 2, expand_ratio, act, fewer_norm=True)]
                blocks += [EfficientViTBlock(w, dim, expand_ratio, tuple(scales), act, heads_ratio,
                                             (next(rates), next(rates)), attn_eps, local_dwconv) for _ in range(d)]
            self.stages.append(EfficientViTStage(blocks))
            in_ch = w
        self.head = ClsHead(widths[-1], tuple(head_widths) if head_widths else None, num_classes, act, drop_rate)
        self.num_features = self.head.num_features
        self._init_weights()
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if in_chans == 3 else ((0.5,) * in_chans, (0.5,) * in_chans)
        self.pretrained_cfg = {"input_size": (in_chans, *self.img_size), "mean": mean, "std": std,
                               "interpolation": "bicubic"}

    def _init_weights(self) -> None:
        """Truncated-normal (std 0.02) Linears with zero biases; convolutions and norms keep PyTorch's init."""
        trunc_normal_linears_(self)

    # ------------------------------------------------------------------ forward
    def _call(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
        return block(x)

    def _run_stages(self, x: torch.Tensor, take: set[int] | frozenset[int] = frozenset(),
                    stop_after: int | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Images -> (last map, the maps of the stages in ``take``); stage 0 is the stem."""
        check_image_batch(x, self.in_chans, (1, 1), None, type(self).__name__)
        weight = self.stem.in_conv.conv.weight
        x = x.to(weight.dtype) if x.dtype != weight.dtype else x
        collected = []
        for i, stage in enumerate([self.stem, *self.stages]):
            if i == 0:
                x = stage.in_conv(x)
            for block in stage.blocks:
                x = self._call(block, x)
            if i in take:
                collected.append(x)
            if stop_after is not None and i >= stop_after:
                break
        return x, collected

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images -> (B, widths[-1], H/32, W/32) map of the last stage (the official ``stage_final``)."""
        return self._run_stages(x)[0]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Last-stage map -> (B, num_features) features before the classifier (``pre_logits=True``) or logits."""
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | tuple[int, ...] | None = None,
        norm: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ):
        """Per-stage maps (stage 0 = stem .. ``num_stages - 1``), for dense tasks.

        ``indices`` selects stages as ``TokenClassifier.forward_intermediates`` selects blocks. ``norm`` is
        accepted for interface compatibility; EfficientViT has no final norm. Returns the list, or
        ``(last map, list)`` unless ``intermediates_only``.
        """
        return stage_intermediates(self, x, indices, output_fmt, intermediates_only)

    # ------------------------------------------------------------------ heads, training switches
    def reset_classifier(self, num_classes: int, class_names: list[str] | None = None) -> None:
        """Replace the final Linear (e.g. for fine-tuning on another label set); the rest of the head stays."""
        self.head.classifier = self.new_head(num_classes, class_names)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in backward: less memory, about a third more compute."""
        self.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        return set()  # no tokens or tables; norms and biases are handled by the optimiser factory

    @property
    def num_lr_layers(self) -> int:
        return sum(len(s.blocks) for s in self.stages) + 2

    def lr_layer_id(self, name: str) -> int:
        """0: stem; block j (counted over all stages): j + 1; head: the top."""
        if name.startswith("stem."):
            return 0
        if name.startswith("stages."):
            parts = name.split(".")
            stage = int(parts[1])
            return sum(len(s.blocks) for s in self.stages[:stage]) + int(parts[3]) + 1
        return self.num_lr_layers - 1


def _check_layout(widths: list[int], depths: list[int], head_widths: Any, stem_stride: int) -> None:
    """Reject layouts the official builder would reject or silently mis-build."""
    if len(widths) != len(depths) or len(widths) < 3:
        raise ValueError(f"widths {widths} and depths {depths} need one entry each for the stem and at least the "
                         f"two local stages")
    ints = lambda v: all(isinstance(i, int) and not isinstance(i, bool) for i in v)  # noqa: E731
    if not ints(widths) or min(widths) < 1:
        raise ValueError(f"widths {widths} must be positive ints")
    if not ints(depths) or min(depths) < 0 or min(depths[1:3]) < 1:
        raise ValueError(f"depths {depths} must be ints >= 0, and >= 1 for the two local stages")
    if head_widths is not None and (len(head_widths) != 2 or not ints(head_widths) or min(head_widths) < 1):
        raise ValueError(f"head_widths must be two positive ints (conv width, hidden width) or None, "
                         f"got {head_widths}")
    if stem_stride not in (1, 2):
        raise ValueError(f"stem_stride must be 1 or 2, got {stem_stride}")


# ---------------------------------------------------------------------- registered configurations
# name: (widths, depths, dim, head_widths), from the official efficientvit_backbone_b0..b3 (backbone.py) and
# efficientvit_cls_b0..b3 (cls.py) at mit-han-lab/efficientvit; expand ratio 4, scales (5,), hswish everywhere.
EFFICIENTVIT_SIZES = {
    "efficientvit_b0": ((8, 16, 32, 64, 128), (1, 2, 2, 2, 2), 16, (1024, 1280)),
    "efficientvit_b1": ((16, 32, 64, 128, 256), (1, 2, 3, 3, 4), 16, (1536, 1600)),
    "efficientvit_b2": ((24, 48, 96, 192, 384), (1, 3, 4, 4, 6), 32, (2304, 2560)),
    "efficientvit_b3": ((32, 64, 128, 256, 512), (1, 4, 6, 6, 9), 32, (2304, 2560)),
}
for _name, (_widths, _depths, _dim, _head) in EFFICIENTVIT_SIZES.items():
    register_config(_name, EfficientViT, {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "interpolation": "bicubic"},
                    img_size=224, widths=_widths, depths=_depths, dim=_dim, head_widths=_head)

# Fashion-MNIST (28×28, 1 channel): a stride-1 stem keeps B0's five-level pyramid at 28, 14, 7, 4, 2 instead of
# 14 .. 1, so both attention stages see more than one token: 4×4 = 16 tokens > dim (the linear path) and
# 2×2 = 4 tokens <= dim (the quadratic path, as B0's last stage at 64×64). B0's depths less one local block,
# widths between B0's and B1's at the attention stages, dim 8 (6 and 10 heads) and a small head give 0.39M
# parameters, near swin_fmnist_tiny (0.40M) and vit_fmnist_tiny (0.46M).
_FMNIST_CFG = {"mean": FMNIST_MEAN, "std": FMNIST_STD, "class_names": FMNIST_CLASSES}
register_config("efficientvit_fmnist_tiny", EfficientViT, _FMNIST_CFG, img_size=28, in_chans=1, num_classes=10,
                widths=(16, 24, 32, 48, 80), depths=(1, 1, 2, 2, 2), dim=8, head_widths=(192, 256), stem_stride=1,
                drop_path_rate=0.05)
