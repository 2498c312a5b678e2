"""Official T2T-ViT checkpoints (github.com/yitu-opensource/T2T-ViT) -> vitkit :class:`T2TViT`.

The architecture is read off the weights: token type (``kqv`` = performer, ``attn.qkv`` = transformer),
token_dim, embed_dim, depth, mlp_ratio, qkv bias, number of classes, input channels and image size (from the
length of the stored sinusoid ``pos_embed``; the official soft-split schedule 7/4/2, 3/2/1, 3/2/1 is assumed).
Two things are not in the weights. A ``config.json`` beside the weights that states them (the official
constructor arguments, at its top level or in a ``*_args`` section) is read; else they follow documented rules
unless passed explicitly, and a value so assumed is announced (``AssumedValueWarning``):

* ``num_heads``: the official table by embed_dim (256: 4, 384: 6, 448: 7, 512: 8, 768: 12), i.e. 64-wide heads
  (but ``t2t_vit_14_resnext`` has 32 heads at 384); other widths get embed_dim // 64 heads when that divides,
  else 1. Always announced: no width tells it for sure.
* ``qk_scale``: the official *pretrained* factories build their models with qk_scale = embed_dim^-0.5, so when
  (embed_dim, depth, mlp_ratio) is one of the official T2T-ViT sizes the converted model gets that scale
  (announced: a model trained from scratch with the official code has None); any other size gets None
  (head_dim^-0.5, the official constructor's default).

Key changes: the performer's fused ``kqv`` rows (k, q, v) are reordered to vitkit's (q, k, v) ``qkv``; token
blocks ``tokens_to_token.attention{1,2}`` become ``tokens_to_token.token_blocks.{0,1}``; the performer MLP
``mlp.{0,2}`` becomes ``mlp.fc{1,2}``. ``pos_embed`` is dropped after checking it is the sinusoid vitkit
recomputes. The random-feature matrices ``w`` are kept (they are part of the trained function).
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch

from ..errors import CheckpointError
from ..layers.t2t import sinusoid_table
from ..models._pretrained import read_state_dict
from ..models.t2t_vit import OFFICIAL_KERNELS, T2T_SIZES, T2TViT
from ._common import (
    ConvertArg,
    assume,
    check_consumed,
    load_converted,
    official_config,
    save_converted,
    strip_prefix,
    take,
)

OFFICIAL_HEADS = {256: 4, 384: 6, 448: 7, 512: 8, 768: 12}
_NORMS = ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias")
# official Token_performer name -> vitkit TokenBlock name (kqv is handled apart: its rows are reordered)
_PERFORMER_KEYS = {**{n: n for n in _NORMS}, "w": "attn.w", "proj.weight": "attn.proj.weight",
                   "proj.bias": "attn.proj.bias", "mlp.0.weight": "mlp.fc1.weight", "mlp.0.bias": "mlp.fc1.bias",
                   "mlp.2.weight": "mlp.fc2.weight", "mlp.2.bias": "mlp.fc2.bias"}
# official Token_transformer names are already vitkit's
_TRANSFORMER_KEYS = (*_NORMS, "attn.qkv.weight", "attn.proj.weight", "attn.proj.bias",
                     "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")


def default_num_heads(embed_dim: int) -> int:
    """Heads for a width the weights cannot tell: the official table, else 64-wide heads, else one head."""
    if embed_dim in OFFICIAL_HEADS:
        return OFFICIAL_HEADS[embed_dim]
    return embed_dim // 64 if embed_dim >= 64 and embed_dim % 64 == 0 else 1


def _official_name(embed_dim: int, depth: int, mlp_ratio: float, tokens_type: str) -> str | None:
    for size, (dim, d, _, mlp) in T2T_SIZES.items():
        if (dim, d, mlp) == (embed_dim, depth, mlp_ratio):
            return f"t2t_vit_t_{size}" if tokens_type == "transformer" else f"t2t_vit_{size}"
    return None


def infer_t2t_args(state: dict[str, torch.Tensor], source: str = "state dict", shipped: dict[str, Any] | None = None,
                   **overrides: Any) -> dict[str, Any]:
    """T2TViT constructor arguments for an official state dict; ``overrides`` win over what is inferred.
    ``shipped`` (``num_heads``, ``qk_scale`` from a config beside the weights) wins over the announced rules."""
    if "tokens_to_token.attention1.kqv.weight" in state:
        tokens_type = "performer"
        token_dim = state["tokens_to_token.attention1.kqv.weight"].shape[0] // 3
    elif "tokens_to_token.attention1.attn.qkv.weight" in state:
        tokens_type = "transformer"
        token_dim = state["tokens_to_token.attention1.attn.qkv.weight"].shape[0] // 3
    elif "tokens_to_token.soft_split0.weight" in state:
        raise CheckpointError(f"{source}: T2T-ViT with tokens_type='convolution' is not supported "
                              f"(only 'performer' and 'transformer')")
    else:
        raise CheckpointError(f"{source} is not an official T2T-ViT state dict: it has no "
                              f"'tokens_to_token.attention1.kqv.weight' (performer) or "
                              f"'tokens_to_token.attention1.attn.qkv.weight' (transformer)")
    for key in ("cls_token", "pos_embed", "tokens_to_token.project.weight", "blocks.0.mlp.fc1.weight"):
        if key not in state:
            raise CheckpointError(f"{source}: expected key {key!r} of an official T2T-ViT state dict is missing")
    embed_dim = state["cls_token"].shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    mlp_ratio = state["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim
    kernels = tuple(tuple(k) for k in overrides.get("t2t_kernels", OFFICIAL_KERNELS))
    in_dim = state["tokens_to_token.attention1.norm1.weight"].shape[0]
    k0 = kernels[0][0] ** 2
    if in_dim % k0:
        raise CheckpointError(f"{source}: first token block takes {in_dim} features, not a multiple of the "
                              f"{kernels[0][0]}x{kernels[0][0]} soft split; pass t2t_kernels=")
    n_tokens = state["pos_embed"].shape[1] - 1
    side = math.isqrt(n_tokens)
    if side * side != n_tokens:
        raise CheckpointError(f"{source}: pos_embed holds {n_tokens} patch positions, not a square grid")
    stride = math.prod(k[1] for k in kernels)
    args: dict[str, Any] = dict(
        img_size=side * stride, in_chans=in_dim // k0, tokens_type=tokens_type, token_dim=token_dim,
        t2t_kernels=kernels, embed_dim=embed_dim, depth=depth, mlp_ratio=mlp_ratio,
        qkv_bias="blocks.0.attn.qkv.bias" in state,
        num_classes=state["head.weight"].shape[0] if "head.weight" in state else 0,
    )
    if tokens_type == "performer":
        m = state["tokens_to_token.attention1.w"].shape[0] if "tokens_to_token.attention1.w" in state else None
        if m is not None and int(token_dim * 0.5) != m:
            args["performer_kernel_ratio"] = m / token_dim
    official = _official_name(embed_dim, depth, mlp_ratio, tokens_type)
    told = {**(shipped or {}), **overrides}
    if "num_heads" not in told:
        why = (f"the official table for width {embed_dim}" if embed_dim in OFFICIAL_HEADS else
               "64-wide heads" if embed_dim >= 64 and embed_dim % 64 == 0 else "one head")
        args["num_heads"] = assume(source, "num_heads", default_num_heads(embed_dim), f"the weights do not tell the "
                                   f"attention heads; {why}")
    if "qk_scale" not in told:
        args["qk_scale"] = assume(source, "qk_scale", embed_dim**-0.5, f"the official pretrained {official} weights' "
                                  f"embed_dim^-0.5") if official else None
    args.update(told)
    return args


def convert_t2t_state_dict(state: dict[str, torch.Tensor], source: str = "state dict",
                           shipped: dict[str, Any] | None = None, **overrides: Any
                           ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(T2TViT constructor arguments, vitkit state dict) for an official T2T-ViT state dict (``shipped``: see
    :func:`infer_t2t_args`)."""
    state = strip_prefix(dict(state), "module.")  # DataParallel / DDP checkpoints
    args = infer_t2t_args(state, source, shipped, **overrides)
    pos = take(state, "pos_embed", source)
    expected = sinusoid_table(pos.shape[1], pos.shape[-1])[None]
    if pos.shape != expected.shape or not torch.allclose(pos.float(), expected, atol=1e-5):
        raise CheckpointError(f"{source}: pos_embed is not the fixed sinusoid T2T-ViT uses; vitkit recomputes "
                              f"that table and cannot load a different one")
    out: dict[str, torch.Tensor] = {"cls_token": take(state, "cls_token", source)}
    n_token_blocks = len(args["t2t_kernels"]) - 1
    for i in range(n_token_blocks):
        theirs, ours = f"tokens_to_token.attention{i + 1}.", f"tokens_to_token.token_blocks.{i}."
        if args["tokens_type"] == "performer":
            for kind in ("weight", "bias"):
                k, q, v = take(state, f"{theirs}kqv.{kind}", source).chunk(3, dim=0)
                out[f"{ours}attn.qkv.{kind}"] = torch.cat([q, k, v], dim=0)
            names = _PERFORMER_KEYS
        else:
            names = {n: n for n in _TRANSFORMER_KEYS}
        for their_name, our_name in names.items():
            out[ours + our_name] = take(state, theirs + their_name, source)
    for kind in ("weight", "bias"):
        out[f"tokens_to_token.project.{kind}"] = take(state, f"tokens_to_token.project.{kind}", source)
        out[f"norm.{kind}"] = take(state, f"norm.{kind}", source)
        if f"head.{kind}" in state:
            out[f"head.{kind}"] = state.pop(f"head.{kind}")
    for key in [k for k in state if k.startswith("blocks.")]:  # same names as timm's Block
        out[key] = state.pop(key)
    check_consumed(state, source)
    return args, out


def load_t2t(src: str | os.PathLike, use_ema: bool = False, **overrides: Any) -> T2TViT:
    """Build a vitkit T2TViT from an official checkpoint (``.pth``/``.pth.tar``/``.safetensors``).

    Training checkpoints nest the weights; ``state_dict`` is preferred (as the official loader does), or
    ``state_dict_ema`` first with ``use_ema=True``. ``overrides`` (``num_heads=``, ``qk_scale=``, ...) replace
    inferred constructor arguments; ``num_heads`` / ``qk_scale`` in a ``config.json`` beside ``src`` are read.
    """
    unwrap = ("state_dict_ema", "state_dict", "model") if use_ema else ("state_dict", "state_dict_ema", "model")
    state = read_state_dict(src, unwrap=unwrap)
    shipped = official_config(src, ("num_heads", "qk_scale"))
    args, converted = convert_t2t_state_dict(state, str(src), shipped, **overrides)
    model = load_converted(T2TViT, args, overrides, lambda _: converted, str(src))
    official = _official_name(args["embed_dim"], args["depth"], args["mlp_ratio"], args["tokens_type"])
    model.model_name = official or "t2t_vit"
    return model


def convert_t2t(src: str | os.PathLike, dst: str | os.PathLike, **overrides: Any) -> T2TViT:
    """Convert an official T2T-ViT checkpoint file into a vitkit checkpoint folder ``dst``; returns the model."""
    return save_converted(load_t2t(src, **overrides), src, dst)


ARGS: tuple[ConvertArg, ...] = (
    ConvertArg("num_heads", "attention heads of the main blocks (num_heads in a config.json beside the weights is "
               "read; else the official table by width, 64-wide heads, or one)", None, matters=True),
    ConvertArg("qk_scale", "attention scale (None: head_dim^-0.5); official sizes get the pretrained factories' "
               "embed_dim^-0.5, announced", None, matters=True),
    ConvertArg("use_ema", "read a training checkpoint's state_dict_ema rather than its state_dict", False),
    ConvertArg("tokens_type", "token module: performer (kqv keys) or transformer (attn.qkv keys)", None, "weights"),
    ConvertArg("token_dim", "width of the token modules", None, "weights"),
    ConvertArg("embed_dim", "width of the main blocks", None, "weights"),
    ConvertArg("depth", "main blocks", None, "weights"),
    ConvertArg("mlp_ratio", "MLP width / embed_dim", None, "weights"),
    ConvertArg("qkv_bias", "qkv bias of the main blocks", None, "weights"),
    ConvertArg("num_classes", "classes of the head (another count starts a new head)", None, "weights"),
    ConvertArg("in_chans", "input channels (from the first token block and the soft split)", None, "weights"),
    ConvertArg("img_size", "image size (from the stored sinusoid's length); another size recomputes the sinusoid",
               None, "weights"),
    ConvertArg("performer_kernel_ratio", "performer random features / token_dim (from the stored w)", 0.5,
               "weights"),
    ConvertArg("t2t_kernels", "(kernel, stride, padding) of each soft split: the official code's fixed schedule",
               [list(k) for k in OFFICIAL_KERNELS]),
    ConvertArg("dynamic_img_size", "accept other image sizes (the sinusoid is recomputed)", False),
    ConvertArg("drop_rate", "dropout, for fine-tuning", 0.0),
    ConvertArg("attn_drop_rate", "attention dropout, for fine-tuning", 0.0),
    ConvertArg("drop_path_rate", "stochastic depth, for fine-tuning", 0.0),
)
