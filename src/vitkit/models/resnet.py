"""ResNet (He et al., CVPR 2016): the convolutional baseline the Vision Transformers are compared against.

image -> stem [conv1 + bn1 + ReLU (-> max-pool)] -> layer1 .. layerN [residual blocks; every layer after the
first halves the map in its first block] -> global average pool -> dropout -> fc.

Layout choices (timm's ``timm.models.resnet.ResNet``, whose weights load through ``vitkit convert timm-resnet``
with the same parameter names: ``conv1``, ``bn1``, ``layer{i}.{j}.conv1/bn1/conv2/bn2[/conv3/bn3]``,
``layer{i}.0.downsample.0/1``, ``fc``; torchvision's ResNet has these names too):

* ``block``: ``"basic"`` (two 3×3 convs, ResNet-18/34) or ``"bottleneck"`` (1×1 reduce, 3×3 with the stride,
  1×1 expand ×4, ResNet-50+; the stride on the 3×3 conv is ResNet v1.5, as timm and torchvision).
* ``stem``: ``"imagenet"`` is timm's 7×7 stride-2 conv + 3×3 stride-2 max-pool (/4); ``"small"`` is one 3×3
  stride-1 conv and no pooling, the CIFAR stem that keeps a 28×28 or 32×32 image's detail.
* ``widths`` are the stages' base widths (a bottleneck stage outputs 4× its width); ``stem_width`` defaults to
  the first of them (timm fixes 64).
* ``forward_intermediates`` numbers the stem 0 (after its ReLU, before the max-pool, as timm's ``act1``
  feature) and the layers 1 .. N.
* A CNN has no attention: ``attention_maps`` refuses with one line (attention rollout needs a transformer).
* ``drop_path_rate`` rises linearly over the blocks from 0 (timm's rule); BatchNorm eps 1e-5, ReLU everywhere.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from ..data.constants import FMNIST_CLASSES, FMNIST_MEAN, FMNIST_STD, IMAGENET_MEAN, IMAGENET_STD
from ..errors import ConfigError
from ..layers.drop import DropPath
from ..layers.patch_embed import check_image_batch
from ..utils import to_2tuple
from ._base import VitkitModel, check_model_args, stage_intermediates
from ._registry import register_config

BLOCKS = ("basic", "bottleneck")
STEMS = ("imagenet", "small")
DEFAULT_WIDTHS = (64, 128, 256, 512)


def _downsample(in_chs: int, out_chs: int, stride: int) -> nn.Sequential | None:
    """The projection shortcut (1×1 conv + BN) where the shape changes; None keeps the identity."""
    if stride == 1 and in_chs == out_chs:
        return None
    return nn.Sequential(nn.Conv2d(in_chs, out_chs, 1, stride, bias=False), nn.BatchNorm2d(out_chs))


class BasicBlock(nn.Module):
    """3×3 conv (stride) -> BN -> ReLU -> 3×3 conv -> BN, plus the shortcut, then ReLU."""

    expansion = 1

    def __init__(self, in_chs: int, width: int, stride: int = 1, drop_path: float = 0.0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.act2 = nn.ReLU()
        self.downsample = _downsample(in_chs, width, stride)

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        return self.act2(self.drop_path(x) + shortcut)


class BottleneckBlock(nn.Module):
    """1×1 conv -> BN -> ReLU -> 3×3 conv (stride) -> BN -> ReLU -> 1×1 conv to 4× the width -> BN, plus the
    shortcut, then ReLU (timm's and torchvision's ``Bottleneck``)."""

    expansion = 4

    def __init__(self, in_chs: int, width: int, stride: int = 1, drop_path: float = 0.0) -> None:
        super().__init__()
        out_chs = width * self.expansion
        self.conv1 = nn.Conv2d(in_chs, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.act2 = nn.ReLU()
        self.conv3 = nn.Conv2d(width, out_chs, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_chs)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.act3 = nn.ReLU()
        self.downsample = _downsample(in_chs, out_chs, stride)

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.bn3(self.conv3(x))
        return self.act3(self.drop_path(x) + shortcut)


BLOCK_CLASSES: dict[str, type[BasicBlock] | type[BottleneckBlock]] = {"basic": BasicBlock,
                                                                       "bottleneck": BottleneckBlock}


class ResNet(VitkitModel):
    """ResNet classifier (see the module docstring); the defaults are ResNet-18. ``forward_features`` gives the
    last layer's map, ``forward_head`` pools and classifies it."""

    head_prefixes = ("fc.",)  # a checkpoint for another label set loads without its classifier

    def __init__(
        self,
        block: Literal["basic", "bottleneck"] = "basic",
        layers: tuple[int, ...] = (2, 2, 2, 2),
        widths: tuple[int, ...] | None = None,
        stem: Literal["imagenet", "small"] = "imagenet",
        stem_width: int | None = None,
        in_chans: int = 3,
        num_classes: int = 1000,
        img_size: int | tuple[int, int] = 224,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        global_pool: Literal["avg"] = "avg",
    ) -> None:
        super().__init__()
        layers = list(layers)
        widths = list(DEFAULT_WIDTHS[:len(layers)] if widths is None else widths)
        _check_layout(block, layers, widths, stem, stem_width, global_pool)
        stem_width = widths[0] if stem_width is None else stem_width
        check_model_args(num_classes, dict(img_size=img_size, in_chans=in_chans, stem_width=stem_width),
                         dict(drop_rate=drop_rate, drop_path_rate=drop_path_rate))
        self.img_size = to_2tuple(img_size)
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.num_stages = len(layers) + 1  # the stem is stage 0, as timm's feature_info
        self.grad_checkpointing = False

        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_chans, stem_width, 7, 2, 3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(3, 2, 1)
        else:
            self.conv1 = nn.Conv2d(in_chans, stem_width, 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.act1 = nn.ReLU()

        block_cls = BLOCK_CLASSES[block]
        total = sum(layers)
        in_chs, index = stem_width, 0
        for i, (depth, width) in enumerate(zip(layers, widths)):
            blocks = []
            for j in range(depth):
                rate = drop_path_rate * index / max(total - 1, 1)  # timm's linear rule over all blocks
                blocks.append(block_cls(in_chs, width, 2 if i > 0 and j == 0 else 1, rate))
                in_chs, index = width * block_cls.expansion, index + 1
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.num_features = in_chs
        self.fc = nn.Linear(in_chs, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if in_chans == 3 else ((0.5,) * in_chans, (0.5,) * in_chans)
        self.pretrained_cfg = {"input_size": (in_chans, *self.img_size), "mean": mean, "std": std,
                               "interpolation": "bilinear"}

    def _init_weights(self) -> None:
        """timm's: Kaiming-normal (fan-out) convolutions, BN weight 1 / bias 0, and the last BN of each residual
        branch zeroed so every block starts as the identity; PyTorch's default Linear."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for blk in self.blocks():
            blk.zero_init_last()

    # ------------------------------------------------------------------ structure
    def stages(self) -> list[nn.Sequential]:
        """The layers ``layer1`` .. ``layerN`` in order."""
        return [getattr(self, f"layer{i}") for i in range(1, self.num_stages)]

    def blocks(self) -> list[nn.Module]:
        """Every residual block, in order."""
        return [blk for stage in self.stages() for blk in stage]

    def fsdp_units(self) -> list[nn.Module]:
        """The residual blocks are the FSDP / activation-checkpointing units (``engine.fsdp.block_units``)."""
        return self.blocks()

    # ------------------------------------------------------------------ forward
    def _call(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
        return block(x)

    def _run_stages(self, x: torch.Tensor, take: set[int] | frozenset[int] = frozenset(),
                    stop_after: int | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Images -> (last map, the maps of the stages in ``take``); stage 0 is the stem before its max-pool."""
        check_image_batch(x, self.in_chans, (1, 1), None, type(self).__name__)
        weight = self.conv1.weight
        x = x.to(weight.dtype) if x.dtype != weight.dtype else x
        x = self.act1(self.bn1(self.conv1(x)))
        collected = [x] if 0 in take else []
        if stop_after == 0:
            return x, collected
        x = self.maxpool(x)
        for i, stage in enumerate(self.stages(), start=1):
            for blk in stage:
                x = self._call(blk, x)
            if i in take:
                collected.append(x)
            if stop_after is not None and i >= stop_after:
                break
        return x, collected

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images -> (B, num_features, h, w) map of the last layer (stride 32 with the ImageNet stem
        and four layers)."""
        return self._run_stages(x)[0]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Last-layer map -> (B, num_features) pooled features (``pre_logits=True``) or logits."""
        x = x.mean(dim=(2, 3))
        x = F.dropout(x, self.drop_rate, self.training) if self.drop_rate else x
        return x if pre_logits else self.fc(x)

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
        """Per-stage maps (stage 0 = the stem, 1 .. N = ``layer1`` .. ``layerN``), for dense tasks.

        ``indices`` selects stages as ``TokenClassifier.forward_intermediates`` selects blocks. ``norm`` is
        accepted for interface compatibility; a ResNet has no final norm. Returns the list, or
        ``(last map, list)`` unless ``intermediates_only``.
        """
        return stage_intermediates(self, x, indices, output_fmt, intermediates_only)

    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor, **forward_kwargs: Any) -> list[torch.Tensor]:
        """Refused: a ResNet has no attention layer (``forward_intermediates`` gives its feature maps)."""
        raise ConfigError(f"{type(self).__name__} is a convolutional network: it has no attention layers, so no "
                          f"attention maps; use forward_intermediates for its per-stage feature maps")

    # ------------------------------------------------------------------ heads, training switches
    def reset_classifier(self, num_classes: int, class_names: list[str] | None = None) -> None:
        """Replace ``fc`` (e.g. for fine-tuning on another label set)."""
        self.fc = self.new_head(num_classes, class_names)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in backward: less memory, about a third more compute."""
        self.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        return set()  # no tokens or tables; BN parameters and biases are handled by the optimiser factory

    @property
    def num_lr_layers(self) -> int:
        return len(self.blocks()) + 2

    def lr_layer_id(self, name: str) -> int:
        """0: the stem; block j (counted over all layers): j + 1; ``fc``: the top."""
        if name.startswith(("conv1.", "bn1.")):
            return 0
        if name.startswith("layer"):
            stage, block = name.split(".")[:2]
            return sum(len(s) for s in self.stages()[:int(stage[5:]) - 1]) + int(block) + 1
        return self.num_lr_layers - 1


def _check_layout(block: str, layers: list[int], widths: list[int], stem: str, stem_width: Any,
                  global_pool: str) -> None:
    """Reject layouts that would build another network than asked, with the argument that is wrong."""
    ints = lambda v: all(isinstance(i, int) and not isinstance(i, bool) for i in v)  # noqa: E731
    if block not in BLOCKS:
        raise ValueError(f"block must be one of {BLOCKS}, got {block!r}")
    if stem not in STEMS:
        raise ValueError(f"stem must be one of {STEMS}, got {stem!r}")
    if global_pool != "avg":
        raise ValueError(f"global_pool must be 'avg' (vitkit's ResNet averages), got {global_pool!r}")
    if not 1 <= len(layers) <= 4 or not ints(layers) or min(layers) < 1:
        raise ValueError(f"layers {layers} must list 1 to 4 stages of >= 1 blocks each")
    if len(widths) != len(layers) or not ints(widths) or min(widths) < 1:
        raise ValueError(f"widths {widths} must give one positive int per stage of layers {layers}")
    if stem_width is not None and (not ints([stem_width]) or stem_width < 1):
        raise ValueError(f"stem_width must be a positive int or None (the first width), got {stem_width!r}")


# ---------------------------------------------------------------------- registered configurations
# timm's resnet18 / resnet34 (basic blocks) and resnet50 (bottlenecks): 7×7 stem, widths 64-512, 224×224.
RESNET_SIZES = {"resnet18": ("basic", (2, 2, 2, 2)), "resnet34": ("basic", (3, 4, 6, 3)),
                "resnet50": ("bottleneck", (3, 4, 6, 3))}
for _name, (_block, _layers) in RESNET_SIZES.items():
    register_config(_name, ResNet, {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "interpolation": "bilinear"},
                    block=_block, layers=_layers, widths=DEFAULT_WIDTHS, img_size=224)

# Fashion-MNIST (28×28, 1 channel): the CIFAR stem (3×3 stride 1, no max-pool), then basic blocks at 28, 14, 7
# and 4 pixels: layers (2, 2, 2, 1), widths 16-128. Forward FLOPs of one image (torch.utils.flop_counter's
# FlopCounterMode, 2 per multiply-add): 47.7M against vit_fmnist_tiny's 44.4M (+7.5%; tests/test_resnet.py
# measures both), and 0.41M parameters against its 0.46M.
register_config("resnet_fmnist_tiny", ResNet, {"mean": FMNIST_MEAN, "std": FMNIST_STD, "class_names": FMNIST_CLASSES},
                block="basic", layers=(2, 2, 2, 1), widths=(16, 32, 64, 128), stem="small", img_size=28,
                in_chans=1, num_classes=10)
