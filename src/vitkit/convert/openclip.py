"""OpenCLIP ``open_clip.model.CLIP`` (ViT image tower + causal text transformer) -> vitkit
:class:`~vitkit.models.clip.CLIP`, with its tokenizer.

The source is a state dict (``.safetensors``, or ``.pth`` / ``.bin`` read with ``weights_only``; a training
checkpoint's ``state_dict``, DDP's ``module.`` prefix and ``CustomTextCLIP``'s ``text.*`` layout are unwrapped) or an
OpenCLIP hub folder (``open_clip_model.safetensors`` or ``open_clip_pytorch_model.bin`` + ``open_clip_config.json``).
The model config is the dict OpenCLIP keeps per model name (``open_clip.get_model_config(name)``: ``embed_dim``,
``vision_cfg``, ``text_cfg``, ``quick_gelu``), given as ``--arg config=PATH`` or found beside the weights
(``open_clip_config.json``, whose ``model_cfg`` + ``preprocess_cfg`` the hub folders ship, or an OpenCLIP
``config.json``).

The weights tell the widths, depths, patch, position grid, MLP widths, text context, vocabulary and embedding width
(checked against the config, with OpenCLIP's defaults for the keys it omits). Only the config tells: ``quick_gelu``
(both towers), the heads (vision: ``width // head_width``), each tower's LayerNorm eps (``norm_kwargs``; vitkit's
``text_norm_eps`` where the towers differ), the text pooling (``pool_type`` ``argmax``, the highest id, is vitkit's
``eos_token_id=2`` rule; ``eos`` reads the first ``eos_id``) and the normalisation (``preprocess_cfg``). Without a
config each of these is announced (:func:`~vitkit.convert._common.assume`) or required. Towers vitkit's CLIP does not
have (timm or ResNet image towers, attentional pooling, LayerScale, custom blocks, a bidirectional or Hugging Face
text tower, a projection bias, SigLIP's ``logit_bias``) are refused with one line naming the config key.

**Tokenizer.** OpenCLIP's default ``SimpleTokenizer`` (the CLIP BPE, ``--arg bpe=PATH`` or the open_clip package's
file) is rebuilt by :mod:`vitkit.layers.clip_bpe` and written as ``tokenizer.json`` (read back by
:func:`~vitkit.convert.hf_clip.load_tokenizer`); a config naming a Hugging Face tokenizer copies its ``tokenizer.json``.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, ConfigError
from ..layers.clip_bpe import BPE_FILE, CLIP_BPE_VOCAB, clip_bpe_tokenizer, default_bpe_path
from ..layers.text import TOKENIZER_FILE
from ..models._pretrained import read_state_dict
from ..models.clip import CLIP, LEGACY_EOS_TOKEN_ID, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from ..schema import EPS, RATIO, SIDE, TOKEN_ID, VOCAB, read_json
from ._common import ConvertArg, assume, check_consumed, load_converted, require_arg, save_converted, take
from ._schema import HEADS_KEY, IMAGE_SIZE_KEY, LAYERS_KEY, NAME_KEY, SIZE_KEY, ConfigSchema, Key, check_image_stats

# open_clip.factory's preferred order of the weights in a folder (the hub folders hold the first or the third)
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin",
                "open_clip_pytorch_model.pth", "model.safetensors", "pytorch_model.bin", "pytorch_model.pth",
                "model.pth")
CONFIG_FILES = ("open_clip_config.json", "config.json")
# --arg keys of this converter that are not CLIP constructor arguments
_OWN_KEYS = ("config", "bpe", "quick_gelu", "mean", "std")

# OpenCLIP's defaults (CLIPVisionCfg / CLIPTextCfg) for the keys a model config leaves out
_VISION_DEFAULTS = {"layers": 12, "width": 768, "head_width": 64, "mlp_ratio": 4.0, "patch_size": 16,
                    "image_size": 224}
_TEXT_DEFAULTS = {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12,
                  "mlp_ratio": 4.0}
_BLOCK_FLAGS = ("qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc")
_TOWER_KEYS = {"layers": LAYERS_KEY, "width": SIZE_KEY, "mlp_ratio": Key(float, RATIO), "pool_type": NAME_KEY}
OPEN_CLIP_SCHEMA = ConfigSchema(
    {"embed_dim": SIZE_KEY, "quick_gelu": Key(bool)},
    nested={"vision_cfg": ConfigSchema({**_TOWER_KEYS, "image_size": IMAGE_SIZE_KEY, "patch_size": Key(int, SIDE),
                                        "head_width": SIZE_KEY}),
            "text_cfg": ConfigSchema({**_TOWER_KEYS, "context_length": Key(int, SIDE), "vocab_size": Key(int, VOCAB),
                                      "heads": HEADS_KEY, "eos_id": Key(int, TOKEN_ID)})})


# ---------------------------------------------------------------------------------------------------- files
def locate(src: str | os.PathLike, config: str | os.PathLike | None = None) -> tuple[Path, Path | None]:
    """(weights file, config file or None): ``src`` is a weights file or a folder holding one of
    :data:`WEIGHT_FILES`; the config is ``config`` or the first of :data:`CONFIG_FILES` beside the weights that is an
    OpenCLIP config (a Hugging Face ``config.json`` next to the weights is not)."""
    src = Path(src)
    if src.is_dir():
        found = [src / name for name in WEIGHT_FILES if (src / name).is_file()]
        if not found:
            raise CheckpointError(f"{src} holds no OpenCLIP weights: expected one of {', '.join(WEIGHT_FILES)}")
        weights, folder = found[0], src
    elif src.is_file():
        weights, folder = src, src.parent
    else:
        raise CheckpointError(f"{src} does not exist; give an OpenCLIP weights file or hub folder")
    if config is not None:
        path = Path(str(config))
        if not path.is_file():
            raise ConfigError(f"--arg config={config}: no such file")
        return weights, path
    for name in CONFIG_FILES:
        path = folder / name
        if path.is_file() and (name == CONFIG_FILES[0] or _is_open_clip_config(read_json(path))):
            return weights, path
    return weights, None


def _is_open_clip_config(data: Any) -> bool:
    return isinstance(data, dict) and ("model_cfg" in data or "vision_cfg" in data)


def read_open_clip_config(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model config, preprocess config) of a model config JSON or a hub folder's ``open_clip_config.json``."""
    data = read_json(path)
    if not _is_open_clip_config(data):
        raise CheckpointError(f"{path}: not an OpenCLIP model config (no 'model_cfg' or 'vision_cfg')")
    model_cfg = data.get("model_cfg", data)
    preprocess = data.get("preprocess_cfg", model_cfg.get("preprocess_cfg") if isinstance(model_cfg, dict) else None)
    for key, value in (("model_cfg", model_cfg), ("preprocess_cfg", preprocess or {})):
        if not isinstance(value, dict):
            raise CheckpointError(f"{path}: {key} must be a JSON object, got {type(value).__name__}")
    for key in ("vision_cfg", "text_cfg"):
        if not isinstance(model_cfg.get(key), dict):
            raise CheckpointError(f"{path}: {key} must be a JSON object")
    OPEN_CLIP_SCHEMA.check(model_cfg, str(path))
    return model_cfg, dict(preprocess or {})


def normalize_state(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """OpenCLIP's ``CLIP`` key layout: DDP's ``module.`` and ``CustomTextCLIP``'s ``text.`` prefixes removed; a
    state dict of another layout (Hugging Face, a timm or ResNet image tower) is refused, naming it."""
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    if any(k.startswith("vision_model.") for k in state):
        raise CheckpointError(f"{source}: a Hugging Face CLIPModel state dict (vision_model.*); convert it with "
                              f"`vitkit convert hf-clip`")
    for prefix, what in (("visual.trunk.", "a timm image tower"), ("visual.layer1.", "a ResNet image tower"),
                         ("visual.attn_pool", "attentional pooling"), ("text.transformer.embeddings.",
                                                                         "a Hugging Face text tower")):
        if any(k.startswith(prefix) for k in state):
            raise CheckpointError(f"{source}: {what} ({prefix}*) is not supported; vitkit converts OpenCLIP's ViT "
                                  f"CLIP")
    if "logit_bias" in state:
        raise CheckpointError(f"{source}: logit_bias (a SigLIP-style sigmoid loss) is not supported; vitkit's CLIP "
                              f"has a softmax temperature only")
    return {(k[len("text."):] if k.startswith("text.") else k): v for k, v in state.items()}


# ---------------------------------------------------------------------------------------------------- arguments
def _refuse(source: str, key: str, value: Any, why: str) -> CheckpointError:
    return CheckpointError(f"{source}: {key}={value!r} is not supported ({why})")


def _tower_act(cfg: dict[str, Any], quick_gelu: bool, key: str, source: str) -> str:
    """vitkit's activation name for one tower: QuickGELU or GELU (exact, or tanh with ``act_kwargs``)."""
    kwargs = cfg.get("act_kwargs") or {}
    if quick_gelu:
        if kwargs:
            raise _refuse(source, f"{key}.act_kwargs", kwargs, "QuickGELU takes none")
        return "quick_gelu"
    if kwargs and kwargs != {"approximate": "tanh"}:
        raise _refuse(source, f"{key}.act_kwargs", kwargs, "GELU with approximate='tanh' is the only variant")
    return "gelu_tanh" if kwargs else "gelu"


def _tower_eps(cfg: dict[str, Any], key: str, source: str) -> float:
    kwargs = cfg.get("norm_kwargs") or {}
    if not isinstance(kwargs, dict) or set(kwargs) - {"eps"}:
        raise _refuse(source, f"{key}.norm_kwargs", kwargs, "LayerNorm's eps is the only one")
    eps = kwargs.get("eps", 1e-5)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not EPS.test(eps):
        raise CheckpointError(f"{source}: {key}.norm_kwargs.eps={eps!r} (must be a number {EPS.text})")
    return float(eps)


def check_supported(model_cfg: dict[str, Any], source: str) -> None:
    """Refuse, naming the key, a config whose towers vitkit's CLIP cannot reproduce."""
    vision, text = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    if isinstance(vision.get("layers"), (list, tuple)):
        raise _refuse(source, "vision_cfg.layers", vision["layers"], "a list builds a ResNet image tower")
    refused = [
        ("init_logit_bias", model_cfg.get("init_logit_bias"), "a SigLIP-style logit bias"),
        ("multimodal_cfg", model_cfg.get("multimodal_cfg"), "a CoCa text decoder"),
        ("vision_cfg.timm_model_name", vision.get("timm_model_name"), "a timm image tower"),
        ("vision_cfg.attentional_pool", vision.get("attentional_pool"), "attentional pooling"),
        ("vision_cfg.no_ln_pre", vision.get("no_ln_pre"), "CLIP's image tower has a LayerNorm before its blocks"),
        ("text_cfg.hf_model_name", text.get("hf_model_name"), "a Hugging Face text tower"),
        ("text_cfg.embed_cls", text.get("embed_cls"), "a learned text CLS token"),
        ("text_cfg.no_causal_mask", text.get("no_causal_mask"), "vitkit's CLIP text tower is causal"),
        ("text_cfg.proj_bias", text.get("proj_bias"), "the text projection has no bias"),
    ]
    for key, tower in (("vision_cfg", vision), ("text_cfg", text)):
        refused.append((f"{key}.ls_init_value", tower.get("ls_init_value"), "LayerScale"))
        refused.extend((f"{key}.{flag}", tower.get(flag), "a custom attention block") for flag in _BLOCK_FLAGS)
        if tower.get("block_type") not in (None, "default"):
            refused.append((f"{key}.block_type", tower["block_type"], "a custom attention block"))
    for key, value, why in refused:
        if value is not None and value is not False:
            raise _refuse(source, key, value, why)
    checks = [("vision_cfg.pool_type", vision.get("pool_type", "tok"), ("tok",), "the image is read at its CLS token"),
              ("vision_cfg.pos_embed_type", vision.get("pos_embed_type", "learnable"), ("learnable", "sin_cos_2d"),
               "a position table"),
              ("text_cfg.pool_type", text.get("pool_type", "argmax"), ("argmax", "eos"),
               "the text is read at its end-of-text token"),
              ("text_cfg.proj_type", text.get("proj_type", "linear"), ("linear",), "a linear text projection")]
    for key, value, allowed, why in checks:
        if value not in allowed:
            raise _refuse(source, key, value, f"vitkit supports {' or '.join(map(repr, allowed))}: {why}")


def _layers(state: dict[str, torch.Tensor], prefix: str, source: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in state if (m := pattern.match(k))}
    if not found:
        raise CheckpointError(f"{source}: no {prefix}* weights; is this an OpenCLIP CLIP state dict?")
    if found != set(range(max(found) + 1)):
        raise CheckpointError(f"{source}: {prefix}* are not numbered 0..{max(found)} "
                              f"(missing {sorted(set(range(max(found) + 1)) - found)})")
    return len(found)


def _shape(state: dict[str, torch.Tensor], key: str, source: str, ndim: int) -> tuple[int, ...]:
    if key not in state:
        raise CheckpointError(f"{source}: expected key {key!r} is missing; is this an OpenCLIP CLIP state dict?")
    shape = tuple(state[key].shape)
    if len(shape) != ndim:
        raise CheckpointError(f"{source}: {key} has shape {shape}, expected {ndim} dimensions")
    return shape


def weight_sizes(state: dict[str, torch.Tensor], source: str) -> dict[str, Any]:
    """Everything the weights tell about the model (widths, depths, patch, grid, context, vocabulary, ...)."""
    vision_width, chans, patch, patch_w = _shape(state, "visual.conv1.weight", source, 4)
    if patch != patch_w:
        raise CheckpointError(f"{source}: non-square patches {patch}x{patch_w} are not OpenCLIP's")
    positions = _shape(state, "visual.positional_embedding", source, 2)[0]
    vocab, text_width = _shape(state, "token_embedding.weight", source, 2)
    embed_dim = _shape(state, "visual.proj", source, 2)[1]
    text_embed = _shape(state, "text_projection", source, 2)[1]
    if text_embed != embed_dim:
        raise CheckpointError(f"{source}: visual.proj gives {embed_dim} features, text_projection {text_embed}; "
                              f"they must agree")
    return dict(embed_dim=embed_dim, in_chans=chans, patch_size=patch, vision_width=vision_width,
                grid_tokens=positions - 1, vision_layers=_layers(state, "visual.transformer.resblocks.", source),
                vision_mlp_dim=_shape(state, "visual.transformer.resblocks.0.mlp.c_fc.weight", source, 2)[0],
                vocab_size=vocab, context_length=_shape(state, "positional_embedding", source, 2)[0],
                text_width=text_width, text_layers=_layers(state, "transformer.resblocks.", source),
                text_mlp_dim=_shape(state, "transformer.resblocks.0.mlp.c_fc.weight", source, 2)[0])


def _check_sizes(model_cfg: dict[str, Any], sizes: dict[str, Any], source: str) -> tuple[int, int]:
    """Compare the config (with OpenCLIP's defaults) with the weights; return the image size (height, width)."""
    vision = {**_VISION_DEFAULTS, **model_cfg["vision_cfg"]}
    text = {**_TEXT_DEFAULTS, **model_cfg["text_cfg"]}
    side = vision["image_size"]
    height, width = (side, side) if isinstance(side, int) else tuple(side)
    grid = (height // vision["patch_size"]) * (width // vision["patch_size"])
    stated = [("embed_dim", model_cfg.get("embed_dim"), sizes["embed_dim"]),
              ("vision_cfg.width", vision["width"], sizes["vision_width"]),
              ("vision_cfg.layers", vision["layers"], sizes["vision_layers"]),
              ("vision_cfg.patch_size", vision["patch_size"], sizes["patch_size"]),
              ("vision_cfg.image_size", f"{side}: {grid} patches", f"{sizes['grid_tokens']} patches"),
              ("vision_cfg.mlp_ratio", f"an MLP width of {int(vision['width'] * vision['mlp_ratio'])}",
               f"{sizes['vision_mlp_dim']}"),
              ("text_cfg.width", text["width"], sizes["text_width"]),
              ("text_cfg.layers", text["layers"], sizes["text_layers"]),
              ("text_cfg.context_length", text["context_length"], sizes["context_length"]),
              ("text_cfg.vocab_size", text["vocab_size"], sizes["vocab_size"]),
              ("text_cfg.mlp_ratio", f"an MLP width of {int(text['width'] * text['mlp_ratio'])}",
               f"{sizes['text_mlp_dim']}")]
    for key, says, holds in stated:
        if key == "vision_cfg.image_size":
            differs = grid != sizes["grid_tokens"]
        elif key.endswith("mlp_ratio"):
            differs = not says.endswith(f" {holds}")
        else:
            differs = says != holds
        if differs:
            raise CheckpointError(f"{source}: {key} gives {says}, the weights hold {holds}")
    return height, width


def open_clip_args(model_cfg: dict[str, Any] | None, state: dict[str, torch.Tensor], overrides: dict[str, Any],
                   source: str, config_source: str | None = None) -> dict[str, Any]:
    """:class:`CLIP` constructor arguments of an OpenCLIP state dict + its model config (None: announce or require
    what only a config tells). ``overrides`` are the ``--arg`` values: a key given there is not announced."""
    sizes = weight_sizes(state, source)
    where = config_source or source
    args = {k: sizes[k] for k in ("embed_dim", "in_chans", "patch_size", "vision_width", "vision_layers",
                                  "vision_mlp_dim", "vocab_size", "context_length", "text_width", "text_layers",
                                  "text_mlp_dim")}
    if model_cfg is not None:
        check_supported(model_cfg, where)
        height, width = _check_sizes(model_cfg, sizes, where)
        vision, text = model_cfg["vision_cfg"], model_cfg["text_cfg"]
        head_width = vision.get("head_width", _VISION_DEFAULTS["head_width"])
        if sizes["vision_width"] % head_width:
            raise CheckpointError(f"{where}: vision_cfg.head_width={head_width} does not divide the width "
                                  f"{sizes['vision_width']}")
        quick_gelu = overrides.get("quick_gelu", model_cfg.get("quick_gelu", False))
        pool = text.get("pool_type", "argmax")
        eos = LEGACY_EOS_TOKEN_ID if pool == "argmax" else text.get("eos_id", 2)
        if pool == "eos" and eos == LEGACY_EOS_TOKEN_ID:
            raise _refuse(where, "text_cfg.eos_id", eos, "with pool_type 'eos'; vitkit reads eos_token_id=2 as "
                                                         "'the highest id', OpenCLIP's 'argmax'")
        args.update(img_size=height if height == width else (height, width),
                    vision_heads=sizes["vision_width"] // head_width,
                    text_heads=text.get("heads", _TEXT_DEFAULTS["heads"]), eos_token_id=eos)
        acts = [_tower_act(cfg, bool(quick_gelu), key, where) for cfg, key in ((vision, "vision_cfg"),
                                                                              (text, "text_cfg"))]
        epss = [_tower_eps(cfg, key, where) for cfg, key in ((vision, "vision_cfg"), (text, "text_cfg"))]
    else:
        args.update(_assumed_without_config(sizes, overrides, source))
        act = "quick_gelu" if args.pop("quick_gelu") else "gelu"
        acts, epss = [act, act], [args.pop("norm_eps")] * 2
    args.update(act=acts[0], norm_eps=epss[0])
    if acts[1] != acts[0]:
        args["text_act"] = acts[1]
    if epss[1] != epss[0]:
        args["text_norm_eps"] = epss[1]
    return args


def _assumed_without_config(sizes: dict[str, Any], overrides: dict[str, Any], source: str) -> dict[str, Any]:
    """What only an OpenCLIP config tells, for weights without one: ``--arg`` values, else OpenCLIP's defaults
    announced (or required where there is none)."""
    why = "no OpenCLIP config beside the weights; pass --arg config=PATH or"
    out: dict[str, Any] = {}
    if "quick_gelu" in overrides or "act" in overrides:
        out["quick_gelu"] = overrides.get("quick_gelu", False)
    else:
        out["quick_gelu"] = assume(source, "quick_gelu", False, "no OpenCLIP config: OpenCLIP's default; weights "
                                                                "trained by OpenAI need true")
    grid = sizes["grid_tokens"]
    side = round(grid ** 0.5)
    if "img_size" not in overrides:
        if side * side != grid:
            require_arg(source, "img_size", overrides, f"{why} the image size ({grid} patches is not a square grid)")
        out["img_size"] = side * sizes["patch_size"]
    for key, width in (("vision_heads", sizes["vision_width"]), ("text_heads", sizes["text_width"])):
        if key in overrides:
            continue
        if width % 64:
            require_arg(source, key, overrides, f"{why} the heads (the width {width} is not a multiple of OpenCLIP's "
                                                f"head width 64)")
        out[key] = assume(source, key, width // 64, "no OpenCLIP config: OpenCLIP's head width 64")
    if "norm_eps" in overrides:
        out["norm_eps"] = overrides["norm_eps"]
    else:
        out["norm_eps"] = assume(source, "norm_eps", 1e-5, "no OpenCLIP config: LayerNorm's default")
    if "eos_token_id" not in overrides:
        out["eos_token_id"] = assume(source, "eos_token_id", LEGACY_EOS_TOKEN_ID,
                                     "no OpenCLIP config: OpenCLIP's pool_type 'argmax', the text read at its "
                                     "highest token id")
    return out


def image_stats(preprocess: dict[str, Any], own: dict[str, Any], channels: int, source: str) -> dict[str, Any]:
    """``pretrained_cfg`` entries from ``preprocess_cfg`` (mean, std, interpolation) or ``--arg mean/std``; OpenAI's
    mean/std (OpenCLIP's default) announced when neither tells."""
    cfg: dict[str, Any] = {}
    for key, default in (("mean", OPENAI_CLIP_MEAN), ("std", OPENAI_CLIP_STD)):
        if key in own:
            value, where = own[key], f"--arg {key}"
        elif key in preprocess:
            value, where = preprocess[key], f"{source} (preprocess_cfg)"
        else:
            value, where = assume(source, key, default[:channels], "no preprocess_cfg: OpenCLIP's default, "
                                                                   "OpenAI's"), source
        value = [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else value
        check_image_stats({f"image_{key}": value}, channels, where)
        cfg[key] = tuple(float(v) for v in value)
    if isinstance(preprocess.get("interpolation"), str):
        cfg["interpolation"] = preprocess["interpolation"]
    return cfg


# ---------------------------------------------------------------------------------------------------- weights
def _convert_blocks(state: dict[str, torch.Tensor], out: dict[str, torch.Tensor], theirs: str, ours: str, depth: int,
                    source: str) -> None:
    """OpenCLIP ``ResidualAttentionBlock`` i -> vitkit ``Block`` i (``in_proj`` is already [q; k; v] by rows)."""
    names = (("ln_1", "norm1"), ("attn.out_proj", "attn.proj"), ("ln_2", "norm2"), ("mlp.c_fc", "mlp.fc1"),
             ("mlp.c_proj", "mlp.fc2"))
    for i in range(depth):
        src, dst = f"{theirs}{i}.", f"{ours}{i}."
        out[f"{dst}attn.qkv.weight"] = take(state, f"{src}attn.in_proj_weight", source)
        out[f"{dst}attn.qkv.bias"] = take(state, f"{src}attn.in_proj_bias", source)
        for kind in ("weight", "bias"):
            for a, b in names:
                out[f"{dst}{b}.{kind}"] = take(state, f"{src}{a}.{kind}", source)


def convert_open_clip_state_dict(state: dict[str, torch.Tensor], vision_layers: int, text_layers: int,
                                 source: str = "state dict") -> dict[str, torch.Tensor]:
    """Rename OpenCLIP ``CLIP`` weights (after :func:`normalize_state`) into vitkit's :class:`CLIP` layout."""
    state = dict(state)
    out = {
        "visual.cls_token": take(state, "visual.class_embedding", source).reshape(1, 1, -1),
        "visual.patch_embed.proj.weight": take(state, "visual.conv1.weight", source),
        "visual.pos_embed.weight": take(state, "visual.positional_embedding", source)[None],
        "visual.head.weight": take(state, "visual.proj", source).t().contiguous(),
        "text.embed.token_embed.weight": take(state, "token_embedding.weight", source),
        "text.embed.pos_embed.weight": take(state, "positional_embedding", source),
        "text_projection.weight": take(state, "text_projection", source).t().contiguous(),
        "logit_scale": take(state, "logit_scale", source).reshape(()),
    }
    for kind in ("weight", "bias"):
        out[f"visual.norm_pre.{kind}"] = take(state, f"visual.ln_pre.{kind}", source)
        out[f"visual.norm.{kind}"] = take(state, f"visual.ln_post.{kind}", source)
        out[f"text.norm.{kind}"] = take(state, f"ln_final.{kind}", source)
    _convert_blocks(state, out, "visual.transformer.resblocks.", "visual.blocks.", vision_layers, source)
    _convert_blocks(state, out, "transformer.resblocks.", "text.blocks.", text_layers, source)
    check_consumed(state, source, ignore=("attn_mask",))
    return out


# ---------------------------------------------------------------------------------------------------- tokenizer
def _plan_tokenizer(model_cfg: dict[str, Any] | None, vocab: int, context: int, bpe: Any, folder: Path,
                    source: str) -> Any:
    """The tokenizer to write beside the converted weights: a ``tokenizers.Tokenizer``, the path of a
    ``tokenizer.json`` to copy, or None after one warning line saying why there is none."""
    text = (model_cfg or {}).get("text_cfg", {})
    if text.get("hf_tokenizer_name"):
        if (folder / TOKENIZER_FILE).is_file():
            return folder / TOKENIZER_FILE
        why = f"the text tower uses the Hugging Face tokenizer {text['hf_tokenizer_name']!r}; put its " \
              f"{TOKENIZER_FILE} beside the weights"
    elif vocab != CLIP_BPE_VOCAB:
        why = f"the text tower has {vocab} tokens, OpenCLIP's BPE tokenizer {CLIP_BPE_VOCAB}"
    elif set(kwargs := dict(text.get("tokenizer_kwargs") or {})) - {"clean"} or \
            kwargs.get("clean", "lower") not in ("lower", "whitespace"):
        why = f"text_cfg.tokenizer_kwargs={kwargs!r} (only clean='lower' or 'whitespace' is reproduced)"
    else:
        path = Path(str(bpe)) if bpe is not None else default_bpe_path()
        if path is not None:
            return clip_bpe_tokenizer(path, context, lowercase=kwargs.get("clean", "lower") == "lower")
        why = f"OpenCLIP's {BPE_FILE} was not found; install open_clip_torch or pass --arg bpe=PATH"
    warnings.warn(f"{source}: no {TOKENIZER_FILE} written: {why}", stacklevel=3)
    return None


# ---------------------------------------------------------------------------------------------------- entry points
def _load(src: str | os.PathLike, overrides: dict[str, Any]) -> tuple[CLIP, dict[str, Any] | None, Path]:
    """(model, its OpenCLIP model config or None, weights file)."""
    overrides = dict(overrides)
    own = {k: overrides.pop(k) for k in _OWN_KEYS if k in overrides}
    if "quick_gelu" in own and not isinstance(own["quick_gelu"], bool):
        raise ConfigError(f"--arg quick_gelu={own['quick_gelu']!r} must be true or false")
    weights, config_path = locate(src, own.get("config"))
    model_cfg, preprocess = read_open_clip_config(config_path) if config_path is not None else (None, {})
    source = str(weights)
    state = normalize_state(read_state_dict(weights), source)
    args = open_clip_args(model_cfg, state, {**overrides, **own}, source,
                          str(config_path) if config_path is not None else None)
    stats = image_stats(preprocess, own, args["in_chans"], str(config_path or weights))
    model = load_converted(CLIP, args, overrides, lambda merged: convert_open_clip_state_dict(
        state, merged["vision_layers"], merged["text_layers"], source), source,
        str(config_path) if config_path is not None else source)
    model.pretrained_cfg = {**model.pretrained_cfg, **stats}
    model.model_name = "open_clip"
    return model, model_cfg, weights


def load_open_clip(src: str | os.PathLike, **overrides: Any) -> CLIP:
    """Build a vitkit CLIP from an OpenCLIP weights file or hub folder (+ its model config, see the module).

    ``overrides`` are CLIP constructor arguments (``vision_heads=8``, ``dynamic_img_size=True``, ...) and this
    converter's own keys (:data:`ARGS`: ``config``, ``bpe``, ``quick_gelu``, ``mean``, ``std``).
    """
    return _load(src, overrides)[0]


def convert_open_clip(src: str | os.PathLike, dst: str | os.PathLike, **overrides: Any) -> CLIP:
    """Convert OpenCLIP weights (a file or hub folder, + its model config) into a vitkit checkpoint folder ``dst``
    with the tokenizer (``tokenizer.json``)."""
    model, model_cfg, weights = _load(src, overrides)
    tokenizer = _plan_tokenizer(model_cfg, model.vocab_size, model.context_length, overrides.get("bpe"),
                                weights.parent, str(weights))
    copy = (TOKENIZER_FILE,) if isinstance(tokenizer, Path) else ()
    save_converted(model, weights.parent, dst, copy)
    if tokenizer is not None and not isinstance(tokenizer, Path):
        tokenizer.save(str(Path(dst) / TOKENIZER_FILE))
    return model


ARGS: tuple[ConvertArg, ...] = (
    ConvertArg("config", "the OpenCLIP model config JSON (open_clip.get_model_config(name), or a hub folder's "
               "open_clip_config.json)", "open_clip_config.json or config.json beside the weights"),
    ConvertArg("bpe", f"OpenCLIP's BPE vocabulary {BPE_FILE}, to write the tokenizer", "the open_clip package's"),
    ConvertArg("quick_gelu", "QuickGELU in both towers (OpenAI-trained weights), else GELU", False, source="config",
               matters=True),
    ConvertArg("vision_heads", "attention heads of the image tower (width // vision_cfg.head_width)",
               "width // 64", source="config", matters=True),
    ConvertArg("text_heads", "attention heads of the text tower (text_cfg.heads)", "width // 64", source="config",
               matters=True),
    ConvertArg("norm_eps", "LayerNorm eps of the image tower, and of the text tower unless text_norm_eps differs "
               "(vision_cfg.norm_kwargs.eps)", 1e-5, source="config", matters=True),
    ConvertArg("text_norm_eps", "LayerNorm eps of the text tower where it differs (text_cfg.norm_kwargs.eps)",
               source="config"),
    ConvertArg("eos_token_id", "where the text is read: 2 = its highest id (text_cfg.pool_type 'argmax'), else the "
               "first position of this id ('eos' with text_cfg.eos_id)", LEGACY_EOS_TOKEN_ID, source="config",
               matters=True),
    ConvertArg("mean", "image normalisation mean (preprocess_cfg.mean)", OPENAI_CLIP_MEAN, source="config",
               matters=True),
    ConvertArg("std", "image normalisation std (preprocess_cfg.std)", OPENAI_CLIP_STD, source="config",
               matters=True),
    ConvertArg("img_size", "image size (vision_cfg.image_size); a square grid is read off the position table",
               source="weights", required=True),
    ConvertArg("dynamic_img_size", "accept other image sizes (positions interpolated)", False),
    ConvertArg("drop_path_rate", "stochastic depth for fine-tuning", 0.0),
)
