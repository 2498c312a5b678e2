"""timm ``efficientvit_mit`` B-series (``efficientvit_b0`` .. ``b3``) -> vitkit
:class:`~vitkit.models.efficientvit.EfficientViT` (``vitkit convert timm``).

timm's port keeps MIT's modules under other names; its backbone keys are renamed to the official layout and
handed to the official converter (:func:`vitkit.convert.efficientvit.convert_efficientvit_state_dict`), which
reads widths, depths, expansion, head width and scales off them. The head is read here (timm's may have no final
Linear: ``num_classes=0`` keeps the conv, Linear and LayerNorm): ``head.in_conv`` -> ``head.in_conv``,
``head.classifier.0/1/4`` -> ``head.fc`` / ``head.norm`` / ``head.classifier``.

What timm fixes and the official code does not: the linear attention's eps is 1e-5 (``attn_eps``), the stem has
stride 2, the head's activation is always hardswish (so the model's ``act`` must be too: timm's B models use
nothing else). EfficientViT-L (``efficientvit_l*``) is refused.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from ..errors import CheckpointError, ConfigError
from ..models.efficientvit import EfficientViT
from .efficientvit import convert_efficientvit_state_dict
from .timm import StateDict, config_arg, config_img_size, get, pick

TIMM_ATTN_EPS = 1e-5
_TO_OFFICIAL = (
    (re.compile(r"^stem\.in_conv\."), lambda m: "backbone.input_stem.op_list.0."),
    (re.compile(r"^stem\.res(\d+)\.main\."), lambda m: f"backbone.input_stem.op_list.{int(m[1]) + 1}.main."),
    (re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\.(context_module|local_module)\.main\."),
     lambda m: f"backbone.stages.{m[1]}.op_list.{m[2]}.{m[3]}.main."),
    (re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\.main\."), lambda m: f"backbone.stages.{m[1]}.op_list.{m[2]}.main."),
)
_HEAD = {"head.in_conv.": "head.in_conv.", "head.classifier.0.": "head.fc.", "head.classifier.1.": "head.norm.",
         "head.classifier.4.": "head.classifier."}


def _official_backbone(state: StateDict, source: str) -> StateDict:
    """The backbone keys in the official layout; anything else but the head is an error naming it."""
    out, left = {}, []
    for key, value in state.items():
        for rx, new in _TO_OFFICIAL:
            if m := rx.match(key):
                out[new(m) + key[m.end():]] = value
                break
        else:
            if not key.startswith("head."):
                left.append(key)
    if left:
        raise CheckpointError(f"{source}: keys the converter does not understand ({len(left)}): "
                              f"{', '.join(sorted(left)[:12])}")
    return out


def timm_efficientvit(state: StateDict, config: dict[str, Any] | None, options: dict[str, Any], source: str
                      ) -> tuple[type, dict[str, Any], Callable[[dict[str, Any]], StateDict]]:
    """(EfficientViT, constructor arguments, convert(final arguments)) of a timm EfficientViT-B state dict."""
    if "stem.res0.main.conv1.conv.weight" in state or any(".spatial_conv." in k for k in state):
        raise CheckpointError(f"{source}: this is a timm EfficientViT-L checkpoint (fused blocks); only the B-series "
                              f"is supported")
    backbone = {k: v for k, v in state.items() if not k.startswith("head.")}
    dim = {"dim": options["dim"]} if "dim" in options else {}
    args, converted = convert_efficientvit_state_dict(_official_backbone(backbone, source), source, **dim)
    head: StateDict = {}
    for key, value in state.items():
        prefix = next((p for p in _HEAD if key.startswith(p)), None)
        if prefix is not None:
            head[_HEAD[prefix] + key[len(prefix):]] = value
        elif key.startswith("head."):
            raise CheckpointError(f"{source}: keys the converter does not understand: {key}")
    converted.update(head)
    for key in [k for k in head if k.endswith(".running_mean")]:
        converted.setdefault(key[:-len("running_mean")] + "num_batches_tracked", head[key].new_zeros((), dtype=int))
    if "head.in_conv.conv.weight" in head:
        args["head_widths"] = [get(head, "head.in_conv.conv.weight", source).shape[0],
                               get(head, "head.fc.weight", source).shape[0]]
    args["num_classes"] = head["head.classifier.weight"].shape[0] if "head.classifier.weight" in head else 0
    global_pool = pick(options, "global_pool", config_arg(config, "global_pool"), "avg", source,
                       "timm's EfficientViT default")
    if global_pool != "avg":
        raise ConfigError(f"{source}: global_pool {global_pool!r} is not supported (vitkit's EfficientViT "
                          f"averages: 'avg')")
    act = pick(options, "act", "hardswish" if config else None, "hardswish", source, "timm's EfficientViT-B, "
               "nn.Hardswish")
    if act != "hardswish":
        raise ConfigError(f"{source}: act={act!r}: timm's EfficientViT head always uses hardswish, and vitkit's head "
                          f"shares the model's activation; only 'hardswish' converts exactly")
    img_size = pick(options, "img_size", config_img_size(config), 224, source, "no timm config.json tells it")
    args.update(img_size=list(img_size) if isinstance(img_size, tuple) else img_size, act=act, stem_stride=2,
                attn_eps=TIMM_ATTN_EPS)
    return EfficientViT, args, lambda _: converted
