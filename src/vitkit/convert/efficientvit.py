"""Official EfficientViT classification checkpoints (github.com/mit-han-lab/efficientvit, ``EfficientViTCls`` =
``EfficientViTBackbone`` + ``ClsHead``; B-series) -> vitkit :class:`~vitkit.models.efficientvit.EfficientViT`.

Read off the weights: input channels, ``widths`` and ``depths`` (stem first), ``expand_ratio`` (expanded width
/ input width of the first MBConv; 1 when the local blocks are DSConvs), ``dim`` (the in-group width of the
aggregation's grouped 1×1 conv), heads and hence ``heads_ratio``, the aggregation ``scales`` (kernel sizes),
``head_widths`` and ``num_classes`` (a backbone-only file gives ``head_widths=None, num_classes=0``).

Not in the weights, so defaults unless passed (``--arg key=value``): ``act`` (read from ``act_func`` in a
``config.json`` beside the weights when there is one, else the official default ``hswish``, announced with an
``AssumedValueWarning``; the official names are accepted: ``hswish`` -> ``hardswish``, ``gelu`` -> ``gelu_tanh``,
the official GELU being the tanh approximation), ``img_size`` (224: metadata only, the model takes any size),
``stem_stride`` (2, as the official stem), ``dim`` (only needed when a checkpoint has no aggregation,
``scales=()``), ``drop_rate``, ``drop_path_rate``.

Key changes (everything else is the same name): ``backbone.input_stem.op_list.0`` -> ``stem.in_conv``,
``backbone.input_stem.op_list.{j}.main`` -> ``stem.blocks.{j-1}``, ``backbone.stages.{i}.op_list.{j}[.main]``
-> ``stages.{i}.blocks.{j}`` (``context_module.main`` / ``local_module.main`` -> ``context_module`` /
``local_module``), ``head.op_list.0`` -> ``head.in_conv``, ``head.op_list.2.linear`` -> ``head.fc``,
``head.op_list.2.norm`` -> ``head.norm``, ``head.op_list.3.linear`` -> ``head.classifier``.
"""

from __future__ import annotations

import os
import re
from typing import Any

import torch

from ..errors import CheckpointError
from ..models._pretrained import read_state_dict
from ..models.efficientvit import EFFICIENTVIT_SIZES, EfficientViT
from ._common import ConvertArg, assume, check_consumed, load_converted, official_config, save_converted, strip_prefix

# official act_func names -> vitkit names (vitkit names pass through unchanged)
OFFICIAL_ACTS = {"hswish": "hardswish", "gelu": "gelu_tanh"}

_RENAMES = (
    (re.compile(r"^backbone\.input_stem\.op_list\.0\."), lambda m: "stem.in_conv."),
    (re.compile(r"^backbone\.input_stem\.op_list\.(\d+)\.main\."), lambda m: f"stem.blocks.{int(m[1]) - 1}."),
    (re.compile(r"^backbone\.stages\.(\d+)\.op_list\.(\d+)\.(context_module|local_module)\.main\."),
     lambda m: f"stages.{m[1]}.blocks.{m[2]}.{m[3]}."),
    (re.compile(r"^backbone\.stages\.(\d+)\.op_list\.(\d+)\.main\."), lambda m: f"stages.{m[1]}.blocks.{m[2]}."),
    (re.compile(r"^head\.op_list\.0\."), lambda m: "head.in_conv."),
    (re.compile(r"^head\.op_list\.2\.linear\."), lambda m: "head.fc."),
    (re.compile(r"^head\.op_list\.2\.norm\."), lambda m: "head.norm."),
    (re.compile(r"^head\.op_list\.3\.linear\."), lambda m: "head.classifier."),
)


def _indices(state: dict[str, torch.Tensor], pattern: str) -> list[int]:
    """Sorted distinct integers captured by ``pattern`` (one group) over the keys."""
    rx = re.compile(pattern)
    return sorted({int(m[1]) for k in state if (m := rx.match(k))})


def _get(state: dict[str, torch.Tensor], key: str, source: str) -> torch.Tensor:
    try:
        return state[key]
    except KeyError:
        raise CheckpointError(f"{source}: expected key {key!r} of an official EfficientViT state dict is "
                              f"missing") from None


def _normalise_keys(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Strip DataParallel's ``module.``; give a bare backbone (``input_stem.*``) its ``backbone.`` prefix."""
    state = strip_prefix(dict(state), "module.")
    if not any(k.startswith("backbone.") for k in state) and any(k.startswith("input_stem.") for k in state):
        state = {(k if k.startswith("head.") else f"backbone.{k}"): v for k, v in state.items()}
    if "backbone.input_stem.op_list.0.conv.weight" not in state:
        if "backbone.stages.0.op_list.0.conv.weight" in state:
            raise CheckpointError(f"{source}: this is an EfficientViT-L checkpoint (its stem is stages.0); only the "
                                  f"B-series (EfficientViTBackbone with an input_stem) is supported")
        raise CheckpointError(f"{source} is not an official EfficientViT state dict: it has no "
                              f"'backbone.input_stem.op_list.0.conv.weight'")
    return state


def infer_efficientvit_args(state: dict[str, torch.Tensor], source: str = "state dict",
                            **overrides: Any) -> dict[str, Any]:
    """EfficientViT constructor arguments for an official state dict (``backbone.*``/``head.*`` names);
    ``overrides`` win over what is inferred."""
    stem = _get(state, "backbone.input_stem.op_list.0.conv.weight", source)
    in_chans, widths = stem.shape[1], [stem.shape[0]]
    depths = [len(_indices(state, r"^backbone\.input_stem\.op_list\.(\d+)\.")) - 1]
    stage_ids = _indices(state, r"^backbone\.stages\.(\d+)\.")
    if stage_ids != list(range(len(stage_ids))) or len(stage_ids) < 2:
        raise CheckpointError(f"{source}: expected backbone.stages.0, .1, ... (at least the two local stages), "
                              f"found stages {stage_ids}")
    first = "backbone.stages.0.op_list.0.main."
    if f"{first}inverted_conv.conv.weight" in state:
        w = _get(state, f"{first}inverted_conv.conv.weight", source)
        ratio = w.shape[0] / w.shape[1]
        expand_ratio: float = int(ratio) if ratio.is_integer() else ratio
    else:
        expand_ratio = 1
    dim = overrides.get("dim")
    heads: list[tuple[int, int]] = []  # (width, heads) of each attention stage
    scales: tuple[int, ...] | None = None
    for i in stage_ids:
        prefix = f"backbone.stages.{i}.op_list."
        ops = _indices(state, rf"^backbone\.stages\.{i}\.op_list\.(\d+)\.")
        widths.append(_get(state, f"{prefix}0.main.point_conv.conv.weight", source).shape[0])
        attention = i >= 2
        depths.append(len(ops) - 1 if attention else len(ops))
        if attention and len(ops) > 1:
            mla = f"{prefix}1.context_module.main."
            qkv = _get(state, f"{mla}qkv.conv.weight", source)
            n_scales = len(_indices(state, rf"^{re.escape(mla)}aggreg\.(\d+)\."))
            stage_scales = tuple(_get(state, f"{mla}aggreg.{s}.0.weight", source).shape[-1] for s in range(n_scales))
            if scales is not None and stage_scales != scales:
                raise CheckpointError(f"{source}: stage {i} aggregates at scales {stage_scales}, an earlier stage at "
                                      f"{scales}; vitkit uses one set of scales")
            scales = stage_scales
            if n_scales and dim is None:
                dim = _get(state, f"{mla}aggreg.0.1.weight", source).shape[1]
            if dim is None:
                raise CheckpointError(f"{source}: without multi-scale aggregation the weights do not tell the head "
                                      f"width; pass --arg dim=...")
            total = qkv.shape[0] // 3
            if total % dim:
                raise CheckpointError(f"{source}: stage {i} has {total} qkv channels per q/k/v, not a multiple of "
                                      f"dim {dim}")
            heads.append((widths[-1], total // dim))
    args: dict[str, Any] = dict(in_chans=in_chans, widths=widths, depths=depths, expand_ratio=expand_ratio,
                                scales=list(scales) if scales is not None else [5])
    if dim is not None:
        args["dim"] = dim
        args["heads_ratio"] = _heads_ratio(heads, dim, source)
    if "head.op_list.0.conv.weight" in state:
        args["head_widths"] = [_get(state, "head.op_list.0.conv.weight", source).shape[0],
                               _get(state, "head.op_list.2.linear.weight", source).shape[0]]
        args["num_classes"] = _get(state, "head.op_list.3.linear.weight", source).shape[0]
    else:
        args["head_widths"] = None
        args["num_classes"] = 0
    args.update(overrides)
    return args


def _heads_ratio(heads: list[tuple[int, int]], dim: int, source: str) -> float:
    """The one ``heads_ratio`` for which ``int(width // dim * ratio)`` gives every stage's heads (official rule)."""
    if not heads or all(h == w // dim for w, h in heads):
        return 1.0
    width, h = heads[0]
    ratio = h / (width // dim) if width >= dim else 0.0
    if not ratio or any(int(w // dim * ratio) != n for w, n in heads):
        raise CheckpointError(f"{source}: heads per attention stage {[n for _, n in heads]} do not follow one "
                              f"heads_ratio over widths {[w for w, _ in heads]} with dim {dim}")
    return ratio


def _rename(key: str) -> str | None:
    for rx, new in _RENAMES:
        m = rx.match(key)
        if m:
            return new(m) + key[m.end():]
    return None


def convert_efficientvit_state_dict(state: dict[str, torch.Tensor], source: str = "state dict",
                                    **overrides: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(EfficientViT constructor arguments, vitkit state dict) for an official EfficientViT state dict."""
    state = _normalise_keys(state, source)
    overrides = _vitkit_act(overrides)
    args = infer_efficientvit_args(state, source, **overrides)
    out: dict[str, torch.Tensor] = {}
    for key in list(state):
        new = _rename(key)
        if new is not None:
            out[new] = state.pop(key)
    check_consumed(state, source)
    for key in [k for k in out if k.endswith(".running_mean")]:  # files saved without BN step counters
        out.setdefault(key[:-len("running_mean")] + "num_batches_tracked", torch.tensor(0))
    return args, out


def _vitkit_act(overrides: dict[str, Any]) -> dict[str, Any]:
    act = overrides.get("act")
    return {**overrides, "act": OFFICIAL_ACTS.get(act, act)} if isinstance(act, str) else dict(overrides)


def official_name(args: dict[str, Any]) -> str | None:
    """The registered name of an official B size with these widths, depths, dim and head (any label count)."""
    for name, (widths, depths, dim, head) in EFFICIENTVIT_SIZES.items():
        if (list(widths), list(depths), dim, list(head)) == (list(args["widths"]), list(args["depths"]),
                                                             args.get("dim"), list(args.get("head_widths") or [])):
            return name
    return None


def load_efficientvit(src: str | os.PathLike, **overrides: Any) -> EfficientViT:
    """Build a vitkit EfficientViT from an official checkpoint (``.pt``/``.pth`` or ``.safetensors``; a training
    checkpoint's ``state_dict`` entry is used). ``overrides`` replace inferred constructor arguments."""
    state = read_state_dict(src, unwrap=("state_dict", "model"))
    args, converted = convert_efficientvit_state_dict(state, str(src), **overrides)
    overrides = _vitkit_act(overrides)
    if "act" not in overrides:  # not in the weights: a config beside them tells, else the official default, announced
        told = official_config(src, ("act_func",)).get("act_func")
        if told is None:
            args["act"] = assume(str(src), "act", "hardswish", "the weights do not tell the activation; the official "
                                 "hswish")
        else:
            args["act"] = OFFICIAL_ACTS.get(told, told) if isinstance(told, str) else told
    model = load_converted(EfficientViT, args, overrides, lambda _: converted, str(src))
    model.model_name = official_name(args) or "efficientvit"
    return model


def convert_efficientvit(src: str | os.PathLike, dst: str | os.PathLike, **overrides: Any) -> EfficientViT:
    """Convert an official EfficientViT checkpoint file into a vitkit checkpoint folder ``dst``; returns the model."""
    return save_converted(load_efficientvit(src, **overrides), src, dst)


ARGS: tuple[ConvertArg, ...] = (
    ConvertArg("act", "activation: hardswish or gelu_tanh (the official hswish / gelu are accepted); act_func in a "
               "config.json beside the weights is read", "hardswish", matters=True),
    ConvertArg("dim", "in-group width of the attention's multi-scale aggregation; needed only when the checkpoint "
               "has none", None, "weights", matters=True, required=True),
    ConvertArg("num_classes", "classes of the head (another count keeps the rest of the head and starts a new "
               "classifier)", None, "weights"),
    ConvertArg("in_chans", "input channels", None, "weights"),
    ConvertArg("widths", "stem and stage widths", None, "weights"),
    ConvertArg("depths", "stem and stage depths", None, "weights"),
    ConvertArg("expand_ratio", "MBConv expansion (1: DSConv local blocks)", None, "weights"),
    ConvertArg("scales", "kernel sizes of the multi-scale aggregation", None, "weights"),
    ConvertArg("heads_ratio", "attention heads per dim-wide group of channels", None, "weights"),
    ConvertArg("head_widths", "widths of the classification head (None: a backbone-only file)", None, "weights"),
    ConvertArg("img_size", "input size recorded as metadata (the model takes any size)", 224),
    ConvertArg("stem_stride", "stride of the stem (the official code's is 2)", 2),
    ConvertArg("attn_eps", "eps of the linear attention's normaliser (the official code's)", 1e-15),
    ConvertArg("drop_rate", "dropout before the classifier, for fine-tuning", 0.0),
    ConvertArg("drop_path_rate", "stochastic depth, for fine-tuning", 0.0),
)
