"""timm checkpoints -> vitkit: ``vision_transformer`` (ViT, DeiT, DeiT distilled, registers, CLIP-style pre-norm),
``swin_transformer`` (:mod:`.timm_swin`) and ``efficientvit_mit`` B-series (:mod:`.timm_efficientvit`).

The input is a timm state dict (``.safetensors``, ``.pth``/``.bin``), or a timm hub folder holding one as
``model.safetensors`` / ``pytorch_model.bin``. A timm ``config.json`` beside the weights (what timm's
``push_to_hf_hub`` / ``save_for_hf`` write: ``architecture``, ``num_classes``, ``global_pool``, ``model_args``,
``pretrained_cfg``) gives what the weights cannot: heads, image size, pooling, activation, mean/std and class
names. Without it, those come from ``--arg``; a value that changes the outputs is then required or announced
(``AssumedValueWarning``), never taken silently. The family is read off the keys (or ``--arg family=...``).

ViT, read off the weights: width, depth, patch size, input channels, MLP width, qkv bias, LayerScale, the class /
distillation / register tokens, the position table (and whether it covers the prefix tokens, ``no_embed_class``,
when the image size tells), ``fc_norm``, ``norm_pre`` and the heads. Names are timm's already but for
``pos_embed`` -> ``pos_embed.weight`` and ``fc_norm`` -> ``pre_logits`` (vitkit's module between pooling and head).
A DeiT distilled checkpoint becomes a :class:`~vitkit.models.vit.DistilledVisionTransformer`.

Not convertible (an error naming the keys or the setting): attention pooling (``global_pool='map'``), ``max`` /
``avgmax`` pooling, q/k norms, gated MLPs, RMSNorm, parallel and post-norm blocks (``*_rpn_*``: its keys are those of
a pre-norm block, so only its config.json tells), EVA and every other timm family.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, ConfigError
from ..models._pretrained import read_state_dict
from ..models.vit import DistilledVisionTransformer, VisionTransformer
from ..schema import positive, read_json, value_problem
from ._common import ConvertArg, assume, check_consumed, load_converted, require_arg, save_converted, strip_prefix

StateDict = dict[str, torch.Tensor]
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# --arg keys the converter reads itself; every other key is a constructor argument of the vitkit model
CONVERTER_KEYS = ("family", "global_pool", "mean", "std")
TIMM_ACTS = {"gelu": "gelu", "gelu_tanh": "gelu_tanh", "quick_gelu": "quick_gelu", "silu": "silu", "swish": "silu",
             "relu": "relu", "hard_swish": "hardswish", "hardswish": "hardswish"}
# timm ViT size words -> {width: heads} (vision_transformer.py and deit.py); one width per word has one head count
VIT_HEADS = {"tiny": {192: 3}, "small": {384: 6}, "medium": {512: 8}, "mediumd": {512: 8}, "base": {768: 12},
             "large": {1024: 16}, "huge": {1280: 16}, "giant": {1408: 16}, "gigantic": {1664: 16},
             "betwixt": {640: 10}, "little": {320: 5}, "wee": {256: 4}, "pwee": {256: 4}, "xsmall": {256: 4},
             "so150m": {896: 14}, "so150m2": {832: 13}, "so400m": {1152: 16}}
VIT_HEADS_EXCEPTIONS = {"vit_base_patch16_gap_224": 16}
TIMM_POOLS = {"token": "cls", "avg": "gap", "": "none"}


# ---------------------------------------------------------------------------------------------- reading
def read_timm_checkpoint(src: str | os.PathLike) -> tuple[StateDict, dict[str, Any] | None, Path]:
    """(state dict without ``module.``, the timm config.json beside it or None, the weights file)."""
    src = Path(src)
    weights = src
    if src.is_dir():
        found = [src / name for name in WEIGHT_FILES if (src / name).is_file()]
        if not found:
            raise CheckpointError(f"{src} holds no weights: expected one of {', '.join(WEIGHT_FILES)}")
        weights = found[0]
    state = strip_prefix(read_state_dict(weights), "module.")
    config_path = weights.parent / "config.json"
    return state, (read_timm_config(config_path) if config_path.is_file() else None), weights


def read_timm_config(path: Path) -> dict[str, Any] | None:
    """A timm ``config.json`` (one with ``architecture``), its entries checked; None for another kind of config."""
    config = read_json(path)
    if "architecture" not in config:
        return None
    problems = []
    checks: list[tuple[str, Any, Any, Any]] = [("architecture", config.get("architecture"), str, None)]
    for key, kind in (("num_classes", int), ("global_pool", str), ("model_args", dict), ("pretrained_cfg", dict)):
        if key in config:
            checks.append((key, config[key], kind, None))
    pretrained = config.get("pretrained_cfg") if isinstance(config.get("pretrained_cfg"), dict) else {}
    for key, kind, rng in (("input_size", list[int], positive()), ("mean", list[float], None),
                           ("std", list[float], positive()), ("interpolation", str, None)):
        if pretrained.get(key) is not None:
            checks.append((f"pretrained_cfg.{key}", pretrained[key], kind, rng))
    for key, value, kind, rng in checks:
        problem = value_problem(key, value, kind, rng)
        if problem:
            problems.append(problem)
    if not problems and len(pretrained.get("input_size") or [0, 0, 0]) != 3:
        problems.append(f"pretrained_cfg.input_size={pretrained['input_size']!r} (must be [channels, height, width])")
    if problems:
        raise CheckpointError(f"{path}: " + "; ".join(problems))
    return config


def architecture(config: dict[str, Any] | None) -> str | None:
    """The timm model name of a config (without a ``.tag``)."""
    return config["architecture"].split(".")[0] if config else None


def config_arg(config: dict[str, Any] | None, key: str) -> Any:
    """A timm config's ``model_args[key]`` (``global_pool`` and ``num_classes`` also at the top level); None when
    it does not tell."""
    if not config:
        return None
    args = config.get("model_args") or {}
    if key in args:
        return args[key]
    return config.get(key) if key in ("global_pool", "num_classes") else None


def config_img_size(config: dict[str, Any] | None) -> tuple[int, int] | None:
    """The image size a timm config gives (``model_args.img_size``, else ``pretrained_cfg.input_size``)."""
    size = config_arg(config, "img_size")
    if size is None and config:
        input_size = (config.get("pretrained_cfg") or {}).get("input_size")
        size = input_size[1:] if input_size else None
    if size is None:
        return None
    if isinstance(size, int) and not isinstance(size, bool):
        return (size, size)
    if isinstance(size, list) and len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size):
        return (size[0], size[1])
    raise CheckpointError(f"config.json: img_size={size!r} must be an int or [height, width]")


def pick(options: dict[str, Any], key: str, from_config: Any, default: Any, source: str, why: str) -> Any:
    """``--arg key``, else what the config tells, else ``default`` announced with :func:`assume`."""
    if key in options:
        return options[key]
    if from_config is not None:
        return from_config
    return assume(source, key, default, why)


def timm_activation(name: Any, source: str) -> str:
    """vitkit's name of a timm ``act_layer`` string."""
    if not isinstance(name, str) or name not in TIMM_ACTS:
        raise ConfigError(f"{source}: activation {name!r} is not supported; use one of {sorted(TIMM_ACTS)}")
    return TIMM_ACTS[name]


def indices(state: StateDict, pattern: str) -> list[int]:
    """Sorted distinct integers captured by ``pattern`` (one group) over the keys."""
    rx = re.compile(pattern)
    return sorted({int(m[1]) for k in state if (m := rx.match(k))})


def get(state: StateDict, key: str, source: str) -> torch.Tensor:
    """``state[key]`` or an error naming the key (the tensor stays in ``state``)."""
    if key not in state:
        raise CheckpointError(f"{source}: expected key {key!r} of a timm checkpoint is missing")
    return state[key]


# ---------------------------------------------------------------------------------------------- ViT
_VIT_KEY = re.compile(r"^(cls_token|dist_token|reg_token|pos_embed|patch_embed\.proj\.(weight|bias)|"
                      r"norm_pre\.(weight|bias)|blocks\.\d+\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\."
                      r"(weight|bias)|blocks\.\d+\.ls[12]\.gamma|(norm|fc_norm|head|head_dist)\.(weight|bias))$")


def timm_vit_args(state: StateDict, config: dict[str, Any] | None, options: dict[str, Any],
                  source: str) -> tuple[type, dict[str, Any]]:
    """(VisionTransformer class, constructor arguments) of a timm ViT state dict, its config and ``--arg``s."""
    arch = architecture(config)
    if arch and "_rpn_" in arch:
        raise CheckpointError(f"{source}: {arch} uses post-norm blocks (ResPostBlock); vitkit's ViT is pre-norm")
    proj = get(state, "patch_embed.proj.weight", source)
    if proj.ndim != 4 or proj.shape[-1] != proj.shape[-2]:
        raise CheckpointError(f"{source}: patch_embed.proj.weight {tuple(proj.shape)} is not a square patch kernel")
    width, in_chans, patch = proj.shape[0], proj.shape[1], proj.shape[-1]
    depth = len(indices(state, r"^blocks\.(\d+)\."))
    fc1, fc2 = get(state, "blocks.0.mlp.fc1.weight", source), get(state, "blocks.0.mlp.fc2.weight", source)
    if fc1.shape[0] != fc2.shape[1]:
        raise CheckpointError(f"{source}: blocks.0.mlp.fc1 gives {fc1.shape[0]} features and fc2 takes {fc2.shape[1]} "
                              f"(a gated SwiGLU MLP?); vitkit's ViT MLP is fc1 -> act -> fc2")
    distilled, class_token = "dist_token" in state, "cls_token" in state
    reg_tokens = get(state, "reg_token", source).shape[1] if "reg_token" in state else 0
    prefix = int(class_token) + int(distilled) + reg_tokens
    fc_norm = "fc_norm.weight" in state
    guess = "token" if class_token and not fc_norm else "avg"
    told = config_arg(config, "global_pool")
    if told is None and (arch or distilled):  # the architecture's default: avg for the *_gap_* models
        told = "avg" if arch and "_gap" in arch and not distilled else "token"
    global_pool = pick(options, "global_pool", told, guess, source,
                       "fc_norm and the class token suggest it" if fc_norm or not class_token else "timm's default")
    if global_pool not in TIMM_POOLS:
        raise ConfigError(f"{source}: global_pool {global_pool!r} is not supported (vitkit pools {sorted(TIMM_POOLS)})")
    if distilled and global_pool != "token":
        raise ConfigError(f"{source}: a distilled DeiT reads the class and distillation tokens: global_pool must be "
                          f"'token', got {global_pool!r}")
    heads = config_arg(config, "num_heads")
    if heads is None and arch:
        size_word = arch.split("_")[1] if "_" in arch else ""
        heads = VIT_HEADS_EXCEPTIONS.get(arch, VIT_HEADS.get(size_word, {}).get(width))
    if "num_heads" not in options and heads is None:
        require_arg(source, "num_heads", options, f"the weights do not tell the number of attention heads (width "
                                                  f"{width}) and no timm config.json beside them does")
    img_size, no_embed_class = _vit_grid(state, config, options, patch, prefix, source)
    if arch and "quickgelu" in arch:
        act_from_config: str | None = "quick_gelu"
    elif arch and "siglip" in arch:
        act_from_config = "gelu_tanh"
    else:
        act_from_config = "gelu" if arch else None
    if isinstance(config_arg(config, "act_layer"), str):
        act_from_config = timm_activation(config_arg(config, "act_layer"), source)
    act = pick(options, "act", act_from_config, "gelu", source, "timm's ViT default, nn.GELU")
    eps = pick(options, "norm_eps", (1e-5 if "clip" in arch else 1e-6) if arch else None, 1e-6, source,
               "timm's ViT LayerNorm; CLIP models use 1e-5")
    args: dict[str, Any] = dict(
        img_size=img_size, patch_size=patch, in_chans=in_chans, embed_dim=width, depth=depth,
        num_heads=options.get("num_heads", heads), mlp_dim=fc1.shape[0], qkv_bias="blocks.0.attn.qkv.bias" in state,
        class_token=class_token, pool=TIMM_POOLS[global_pool],
        pos_embed="learned_1d" if "pos_embed" in state else "none",
        init_values=1e-5 if "blocks.0.ls1.gamma" in state else None, norm_eps=eps, act=act,
        num_classes=get(state, "head.weight", source).shape[0] if "head.weight" in state else 0,
        reg_tokens=reg_tokens, no_embed_class=no_embed_class, fc_norm=fc_norm, pre_norm="norm_pre.weight" in state,
    )
    return (DistilledVisionTransformer if distilled else VisionTransformer), args


def _vit_grid(state: StateDict, config: dict[str, Any] | None, options: dict[str, Any], patch: int, prefix: int,
              source: str) -> tuple[int | tuple[int, int], bool]:
    """(img_size, no_embed_class): the position table's length fixes one given the other."""
    given = options.get("img_size", config_img_size(config))
    table = state.get("pos_embed")
    if table is None:
        size = given if given is not None else assume(source, "img_size", 224, "there is no position table")
        return size, False
    rows = table.shape[1]
    if given is not None:
        h, w = (given, given) if isinstance(given, int) else given
        patches = (h // patch) * (w // patch)
        if rows == patches + prefix or (rows == patches and prefix == 0):
            return given, False
        if rows == patches:
            return given, True
        raise CheckpointError(f"{source}: pos_embed has {rows} rows; img_size {given} with patch {patch} gives "
                              f"{patches} patches (+ {prefix} prefix tokens)")
    by_layout = {False: rows - prefix, True: rows} if prefix else {False: rows}  # patch rows by no_embed_class
    fits = {nec: math.isqrt(n) for nec, n in by_layout.items() if n > 0 and math.isqrt(n) ** 2 == n}
    if len(fits) != 1:
        require_arg(source, "img_size", options, f"pos_embed's {rows} rows do not tell the image size (not one "
                                                 f"square grid)")
    ((no_embed_class, side),) = fits.items()
    return side * patch, no_embed_class


def convert_timm_vit_state_dict(state: StateDict, source: str = "state dict") -> StateDict:
    """timm ViT weights in vitkit's layout: ``pos_embed`` -> ``pos_embed.weight``, ``fc_norm`` -> ``pre_logits``;
    keys of any other layout (q/k norms, attention pooling, ...) are an error naming them."""
    state = dict(state)
    out: StateDict = {}
    for key in [k for k in state if _VIT_KEY.match(k)]:
        new = "pos_embed.weight" if key == "pos_embed" else re.sub(r"^fc_norm\.", "pre_logits.", key)
        out[new] = state.pop(key)
    check_consumed(state, source)
    return out


# ---------------------------------------------------------------------------------------------- dispatch
def detect_family(state: StateDict, source: str) -> str:
    """vit, swin or efficientvit, from the keys."""
    if any(re.match(r"^layers\.\d+\.blocks\.\d+\.attn\.relative_position_bias_table$", k) for k in state):
        return "swin"
    if "stem.in_conv.conv.weight" in state:
        return "efficientvit"
    if "patch_embed.proj.weight" in state and any(k.startswith("blocks.") for k in state):
        return "vit"
    if "conv1.weight" in state and any(k.startswith("layer1.") for k in state):
        raise CheckpointError(f"{source}: a timm ResNet state dict; convert it with `vitkit convert timm-resnet` "
                              f"(vitkit.convert.convert_timm_resnet)")
    raise CheckpointError(f"{source}: not a timm vision_transformer, swin_transformer or efficientvit_mit state dict "
                          f"(first keys: {', '.join(sorted(state)[:5])}); pass --arg family=vit|swin|efficientvit")


def _family_args(family: str) -> Callable[..., tuple[type, dict[str, Any], Callable[[dict[str, Any]], StateDict]]]:
    """The family's ``(state, config, options, source) -> (class, arguments, convert(final arguments))``."""
    if family == "vit":
        def vit(state: StateDict, config: dict[str, Any] | None, options: dict[str, Any], source: str
                ) -> tuple[type, dict[str, Any], Callable[[dict[str, Any]], StateDict]]:
            cls, args = timm_vit_args(state, config, options, source)
            return cls, args, lambda _: convert_timm_vit_state_dict(state, source)
        return vit
    if family == "swin":
        from .timm_swin import timm_swin
        return timm_swin
    if family == "efficientvit":
        from .timm_efficientvit import timm_efficientvit
        return timm_efficientvit
    raise ConfigError(f"--arg family={family!r}: choose vit, swin or efficientvit")


def convert_timm_state_dict(state: StateDict, config: dict[str, Any] | None = None, source: str = "state dict",
                            **overrides: Any) -> tuple[type, dict[str, Any], StateDict]:
    """(vitkit class, constructor arguments, vitkit state dict) of a timm state dict and its config (or None)."""
    state = strip_prefix(dict(state), "module.")
    family = overrides.get("family") or detect_family(state, source)
    cls, args, convert = _family_args(family)(state, config, overrides, source)
    final = {**args, **{k: v for k, v in overrides.items() if k not in CONVERTER_KEYS}}
    return cls, final, convert(final)


def timm_pretrained_cfg(model: Any, config: dict[str, Any] | None, options: dict[str, Any], source: str,
                        ) -> dict[str, Any]:
    """The model's ``pretrained_cfg`` with the config's mean/std, interpolation and crop, class names and ``--arg``
    mean/std (announced when nothing tells them)."""
    cfg = dict(model.pretrained_cfg)
    pretrained = (config or {}).get("pretrained_cfg") or {}
    for key in ("interpolation", "crop_pct", "crop_mode"):
        if pretrained.get(key) is not None:
            cfg[key] = pretrained[key]
    channels = model.in_chans
    for key in ("mean", "std"):
        value = options.get(key, pretrained.get(key))
        if value is None:
            value = assume(source, key, list(cfg[key]), "no timm config.json beside the weights")
        problem = value_problem(key, value, list[float], positive() if key == "std" else None)
        if problem is None and len(value) not in (1, channels):
            problem = f"{key}={value!r} (must hold one number, or one per input channel ({channels}))"
        if problem:
            raise ConfigError(f"{source}: {problem}")
        cfg[key] = tuple(value) * (channels if len(value) == 1 else 1)
    names = (config or {}).get("label_names")
    if isinstance(names, dict) and all(str(i) in names for i in range(len(names))):
        names = [names[str(i)] for i in range(len(names))]
    if isinstance(names, list) and len(names) == model.num_classes and all(isinstance(n, str) for n in names):
        cfg["class_names"] = names
    return cfg


def load_timm(src: str | os.PathLike, **overrides: Any):
    """Build a vitkit model from a timm checkpoint (file or hub folder, config.json beside it read when there).

    ``overrides``: ``family``, ``global_pool``, ``mean``, ``std`` (read by the converter), and constructor arguments
    of the vitkit model (``num_heads``, ``img_size``, ``act``, ``window_size``, ...).
    """
    state, config, weights = read_timm_checkpoint(src)
    source = str(weights)
    family = overrides.get("family") or detect_family(state, source)
    cls, args, convert = _family_args(family)(state, config, overrides, source)
    ctor_overrides = {k: v for k, v in overrides.items() if k not in CONVERTER_KEYS}
    model = load_converted(cls, args, ctor_overrides, convert, source)
    model.pretrained_cfg = timm_pretrained_cfg(model, config, overrides, source)
    model.model_name = architecture(config) or f"timm_{family}"
    return model


def convert_timm(src: str | os.PathLike, dst: str | os.PathLike, **overrides: Any):
    """Convert a timm ViT / DeiT, Swin or EfficientViT-B checkpoint (a weights file or hub folder, its config.json
    read when beside it) into a vitkit checkpoint folder ``dst``; returns the model."""
    return save_converted(load_timm(src, **overrides), src, dst)


ARGS: tuple[ConvertArg, ...] = (
    ConvertArg("family", "timm family: vit, swin or efficientvit", None, "weights"),
    ConvertArg("num_heads", "ViT attention heads (from config.json's model_args or architecture name)", None,
               "config", matters=True, required=True),
    ConvertArg("img_size", "image size (ViT: read off a square position table)", 224, "config", matters=True),
    ConvertArg("global_pool", "timm pooling: token, avg or '' (ViT); avg (Swin, EfficientViT)", "token", "config",
               matters=True),
    ConvertArg("act", "activation (timm: gelu for ViT and Swin, hardswish for EfficientViT)", "gelu", "config",
               matters=True),
    ConvertArg("norm_eps", "ViT LayerNorm eps (1e-5 for CLIP models)", 1e-6, "config", matters=True),
    ConvertArg("window_size", "Swin window (read off the relative position tables)", None, "weights", matters=True),
    ConvertArg("mean", "normalisation mean, one per channel", None, "config"),
    ConvertArg("std", "normalisation std, one per channel", None, "config"),
    ConvertArg("dynamic_img_size", "ViT: accept other image sizes (positions interpolated)", False),
    ConvertArg("drop_path_rate", "stochastic depth, for fine-tuning", 0.0),
    ConvertArg("drop_rate", "dropout, for fine-tuning", 0.0),
)
