"""timm ``resnet`` checkpoints (resnet18 / 34 / 50 / 101 / 152 and the other plain ResNet v1.5 weights; torchvision's
ResNet has the same keys) -> vitkit :class:`~vitkit.models.resnet.ResNet` (``vitkit convert timm-resnet``).

Read off the weights: the block (``conv3`` means bottlenecks), the layers and blocks per layer, the widths (each
layer's first ``conv1``), the stem width and input channels (``conv1``), the stem (a 7×7 ``conv1`` is timm's
stride-2 stem with max-pool) and the classes (``fc``, none without it). The names are vitkit's already.

A timm ``config.json`` beside the weights (``architecture``, ``global_pool``, ``model_args``,
``pretrained_cfg``) gives the image size, pooling, mean/std and class names; without it they come from ``--arg``
or are announced (``AssumedValueWarning``). Refused with the key or setting that shows it: deep stems
(``resnet*c/d/s/t``: ``conv1.0``), average-pool shortcuts (``avg_down``), ResNeXt / wide bottlenecks (grouped or
wider 3×3 convs), squeeze-excitation and other attention modules, norms without running statistics, pooling
other than ``avg``, and config settings the weights cannot show (``output_stride``, anti-aliasing, another
activation or norm).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any

import torch

from ..errors import CheckpointError, ConfigError
from ..models.resnet import ResNet
from ._common import ConvertArg, assume, check_consumed, load_converted, save_converted, strip_prefix
from .timm import (
    StateDict,
    architecture,
    config_arg,
    config_img_size,
    get,
    indices,
    pick,
    read_timm_checkpoint,
    timm_pretrained_cfg,
)

# --arg keys the converter reads itself; every other key is a constructor argument of ResNet
CONVERTER_KEYS = ("mean", "std")
_BN = r"(weight|bias|running_mean|running_var|num_batches_tracked)"
_KEY = re.compile(rf"^(conv1\.weight|bn1\.{_BN}|layer\d+\.\d+\.(conv[123]\.weight|bn[123]\.{_BN}|downsample\.0\.weight|"
                  rf"downsample\.1\.{_BN})|fc\.(weight|bias))$")
# timm model_args the weights may not show -> the values vitkit's ResNet builds (a layer by its timm name)
_FIXED_ARGS: dict[str, tuple[Any, ...]] = {
    "output_stride": (32,), "cardinality": (1,), "base_width": (64,), "stem_type": ("",),
    "replace_stem_pool": (False,), "block_reduce_first": (1,), "down_kernel_size": (1,), "avg_down": (False,),
    "aa_layer": (None,), "attn_layer": (None,), "act_layer": ("relu",), "norm_layer": ("batchnorm", "batchnorm2d"),
}


def _check_config(config: dict[str, Any] | None, source: str) -> None:
    """Refuse a timm config whose ResNet differs from vitkit's in a way the weights may not show."""
    arch = architecture(config) or ""
    if arch.startswith(("resnetaa", "resnetblur")):
        raise ConfigError(f"{source}: {arch} uses anti-aliased downsampling; vitkit's ResNet does not")
    for key, accepted in _FIXED_ARGS.items():
        given = config_arg(config, key)
        if given is not None and (given.lower() if isinstance(given, str) else given) not in accepted:
            raise ConfigError(f"{source}: config.json sets {key}={given!r}; vitkit's ResNet builds "
                              f"{key}={accepted[0]!r} only")


def timm_resnet_args(state: StateDict, config: dict[str, Any] | None, options: dict[str, Any], source: str
                     ) -> dict[str, Any]:
    """ResNet's constructor arguments for a timm ResNet state dict, its config (or None) and the ``--arg``s."""
    _check_config(config, source)
    if "conv1.0.weight" in state:
        raise CheckpointError(f"{source}: conv1.0.weight: a deep 3-conv stem (timm's resnet*c/d/s/t); vitkit's "
                              f"ResNet has a single-conv stem")
    conv1 = get(state, "conv1.weight", source)
    if conv1.ndim != 4 or conv1.shape[-1] != conv1.shape[-2] or conv1.shape[-1] not in (3, 7):
        raise CheckpointError(f"{source}: conv1.weight {tuple(conv1.shape)} is neither timm's 7x7 stem nor a 3x3 "
                              f"(CIFAR) stem")
    if "bn1.running_mean" not in state:
        raise CheckpointError(f"{source}: bn1 has no running statistics (GroupNorm or frozen norms?); vitkit's "
                              f"ResNet uses BatchNorm")
    if conv1.shape[-1] == 7:
        stem = options.get("stem", "imagenet")
    else:
        stem = options.get("stem") or assume(source, "stem", "small", "a 3x3 conv1 is no timm stem; read as the "
                                             "CIFAR one: stride 1, no max-pool")
    stages = indices(state, r"^layer(\d+)\.")
    if not stages or stages != list(range(1, len(stages) + 1)) or len(stages) > 4:
        raise CheckpointError(f"{source}: expected layer1 .. layerN (1 to 4 layers), found layers {stages}")
    bottleneck = "layer1.0.conv3.weight" in state
    layers, widths, in_chs = [], [], conv1.shape[0]
    for i in stages:
        blocks = indices(state, rf"^layer{i}\.(\d+)\.")
        if blocks != list(range(len(blocks))):
            raise CheckpointError(f"{source}: layer{i} has blocks {blocks}, expected 0 .. {len(blocks) - 1}")
        width = get(state, f"layer{i}.0.conv1.weight", source).shape[0]
        for j in blocks:
            _check_block(state, f"layer{i}.{j}", width, bottleneck, source)
        out = width * (4 if bottleneck else 1)
        needs_proj = i > 1 or in_chs != out
        if needs_proj != (f"layer{i}.0.downsample.0.weight" in state):
            what = "lacks the projection shortcut (downsample.0/1) that vitkit's ResNet builds" if needs_proj else \
                "has a projection shortcut (downsample.0/1) where vitkit's ResNet keeps the identity"
            raise CheckpointError(f"{source}: layer{i}.0 {what} (an average-pool shortcut, avg_down, does not "
                                  f"convert)")
        layers.append(len(blocks))
        widths.append(width)
        in_chs = out
    fc = state.get("fc.weight")
    if fc is not None and (fc.ndim != 2 or fc.shape[1] != in_chs):
        raise CheckpointError(f"{source}: fc.weight {tuple(fc.shape)} does not take the last layer's {in_chs} "
                              f"features")
    global_pool = pick(options, "global_pool", config_arg(config, "global_pool"), "avg", source,
                       "timm's ResNet default")
    if global_pool != "avg":
        raise ConfigError(f"{source}: global_pool {global_pool!r} is not supported (vitkit's ResNet averages: 'avg')")
    img_size = pick(options, "img_size", config_img_size(config), 224, source, "no timm config.json tells it")
    return dict(block="bottleneck" if bottleneck else "basic", layers=layers, widths=widths, stem=stem,
                stem_width=conv1.shape[0], in_chans=conv1.shape[1], num_classes=fc.shape[0] if fc is not None else 0,
                img_size=list(img_size) if isinstance(img_size, tuple) else img_size, global_pool=global_pool)


def _check_block(state: StateDict, prefix: str, width: int, bottleneck: bool, source: str) -> None:
    """Refuse grouped (ResNeXt) or widened 3×3 convolutions and attention modules inside a block."""
    extra = sorted(k for k in state if k.startswith(prefix + ".") and not _KEY.match(k))
    if extra:
        raise CheckpointError(f"{source}: {extra[0]}: modules vitkit's ResNet blocks do not have (squeeze-excitation,"
                              f" attention, average-pool shortcuts) ({len(extra)} such keys)")
    conv2 = get(state, f"{prefix}.conv2.weight", source)
    if conv2.ndim != 4 or conv2.shape[0] != width or conv2.shape[1] != width:
        raise CheckpointError(f"{source}: {prefix}.conv2.weight {tuple(conv2.shape)} is not a plain {width}-wide "
                              f"3x3 conv (ResNeXt groups or a wide ResNet?); vitkit's ResNet has neither")
    if bottleneck and get(state, f"{prefix}.conv3.weight", source).shape[0] != 4 * width:
        raise CheckpointError(f"{source}: {prefix}.conv3.weight {tuple(state[prefix + '.conv3.weight'].shape)}: a "
                              f"bottleneck expands its width {width} 4x in vitkit's ResNet")


def convert_timm_resnet_state_dict(state: StateDict, config: dict[str, Any] | None = None,
                                   source: str = "state dict", **overrides: Any) -> tuple[dict[str, Any], StateDict]:
    """(ResNet constructor arguments, vitkit state dict) of a timm or torchvision ResNet state dict and its timm
    config (or None); ``overrides`` as ``--arg``. Keys of any other layout are an error naming them."""
    state = strip_prefix(dict(state), "module.")
    args = timm_resnet_args(state, config, overrides, source)
    out: StateDict = {k: state.pop(k) for k in [k for k in state if _KEY.match(k)]}
    check_consumed(state, source)
    for key in [k for k in out if k.endswith(".running_mean")]:  # counters some exports drop; eval never reads them
        out.setdefault(key[:-len("running_mean")] + "num_batches_tracked", torch.zeros((), dtype=torch.long))
    return {**args, **{k: v for k, v in overrides.items() if k not in CONVERTER_KEYS}}, out


def load_timm_resnet(src: str | os.PathLike, **overrides: Any) -> ResNet:
    """Build a vitkit ResNet from a timm ResNet checkpoint (a weights file or hub folder; a timm config.json beside
    it is read). ``overrides``: ``mean``, ``std`` and constructor arguments (``img_size``, ``drop_rate``, ...)."""
    state, config, weights = read_timm_checkpoint(src)
    source = str(weights)
    args, converted = convert_timm_resnet_state_dict(state, config, source, **overrides)
    ctor = {k: v for k, v in overrides.items() if k not in CONVERTER_KEYS}
    convert: Callable[[dict[str, Any]], StateDict] = lambda _: converted  # noqa: E731
    model = load_converted(ResNet, {k: v for k, v in args.items() if k not in ctor}, ctor, convert, source)
    model.pretrained_cfg = timm_pretrained_cfg(model, config, overrides, source)
    model.model_name = architecture(config) or "timm_resnet"
    return model


def convert_timm_resnet(src: str | os.PathLike, dst: str | os.PathLike, **overrides: Any) -> ResNet:
    """Convert a timm (or torchvision) ResNet checkpoint into a vitkit checkpoint folder ``dst``; returns the
    model."""
    return save_converted(load_timm_resnet(src, **overrides), src, dst)


ARGS: tuple[ConvertArg, ...] = (
    ConvertArg("img_size", "image size of pretrained_cfg (the network takes any size)", 224, "config", matters=True),
    ConvertArg("global_pool", "timm pooling: only avg converts", "avg", "config", matters=True),
    ConvertArg("stem", "imagenet (7x7 stride 2 + max-pool) or small (3x3 stride 1): read off conv1's kernel",
               "imagenet", "weights", matters=True),
    ConvertArg("mean", "normalisation mean, one per channel", None, "config"),
    ConvertArg("std", "normalisation std, one per channel", None, "config"),
    ConvertArg("drop_rate", "dropout before fc, for fine-tuning", 0.0),
    ConvertArg("drop_path_rate", "stochastic depth, for fine-tuning", 0.0),
)
