"""Hugging Face ``transformers`` ``CLIPModel`` -> vitkit :class:`~vitkit.models.clip.CLIP` (and its tokenizer).

What the weights tell is read from them: widths, patch size, image size (square: HF CLIP's position table is
a square grid + CLS), channels, vocabulary, text context, projection width, MLP widths and layer counts
(checked against ``config.json`` when it states them). What only the config tells is read from it: attention
heads, activation (``hidden_act``: ``quick_gelu`` for the OpenAI weights, ``gelu`` for most others),
LayerNorm eps (both per tower: vitkit's ``text_act`` / ``text_norm_eps`` where the text tower's differ) and
``eos_token_id``, which picks the end-of-text pooling rule (see
:func:`vitkit.models.clip.eot_index`; ``2`` marks a legacy config whose rule is "the highest id").

HF keeps separate q/k/v Linears; vitkit fuses them into one ``qkv`` Linear ([q; k; v] by rows). transformers 5
names CLIP's modules in memory as on the Hub, so both kinds of files have the same keys. HF's
``interpolate_pos_encoding`` is bicubic without antialiasing, so converted models set
``pos_interp_antialias=False``. A ``tokenizer.json`` in the HF folder is copied next to the converted weights
and read back by :func:`load_tokenizer` (the ``tokenizers`` library; vitkit writes no tokenizer itself).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from ..layers.text import TOKENIZER_FILE, read_tokenizer_file
from ..models._pretrained import read_config
from ..models.clip import CLIP
from ..schema import HEADS, LAYERS, TOKEN_ID, interval
from ._common import ConvertArg, check_consumed, config_value, load_hf_model, save_converted, take
from ._schema import EPS_KEY, ConfigSchema, Key
from .hf_vit import HF_ACTIVATIONS

_VISION, _TEXT = "vision_model.", "text_model."
# Older transformers saved these buffers; they are arange(n) and carry nothing.
_IGNORED = (f"{_VISION}embeddings.position_ids", f"{_TEXT}embeddings.position_ids")


_TOWER = {"hidden_act": Key(str), "layer_norm_eps": EPS_KEY, "num_attention_heads": Key(int, HEADS, required=True),
          "num_hidden_layers": Key(int, LAYERS)}
# Every config.json entry hf_clip_args reads (the sizes come from the weights).
HF_CLIP_SCHEMA = ConfigSchema(
    {"logit_scale_init_value": Key(float, interval(-100, 100, closed_hi=True))},
    nested={"text_config": ConfigSchema({**_TOWER, "eos_token_id": Key(int | list[int], TOKEN_ID)}),
            "vision_config": ConfigSchema(_TOWER)},
    model_type="clip")


def _tower_config(config: dict[str, Any], key: str, source: str) -> dict[str, Any]:
    tower = config.get(key, {})
    if not isinstance(tower, dict):
        raise CheckpointError(f"{source}: {key} must be a JSON object, got {type(tower).__name__}")
    return tower


def _tower_act(tower: dict[str, Any], key: str, source: str) -> str:
    """The vitkit activation of one tower's ``hidden_act`` (HF's default: quick_gelu)."""
    act = tower.get("hidden_act", "quick_gelu")
    if act not in HF_ACTIVATIONS:
        raise CheckpointError(f"{source}: {key}.hidden_act {act!r} is not supported ({sorted(HF_ACTIVATIONS)})")
    return HF_ACTIVATIONS[act]


def _count_layers(state: dict[str, torch.Tensor], prefix: str, tower: dict[str, Any], source: str) -> int:
    """Number of encoder layers the weights hold, checked against the config's ``num_hidden_layers``."""
    pattern = re.compile(re.escape(prefix) + r"encoder\.layers\.(\d+)\.")
    found = {int(m.group(1)) for k in state if (m := pattern.match(k))}
    if not found:
        raise CheckpointError(f"{source}: no {prefix}encoder.layers.* weights")
    depth = max(found) + 1
    if len(found) != depth:
        raise CheckpointError(f"{source}: {prefix}encoder.layers are not numbered 0..{depth - 1} "
                              f"(missing {sorted(set(range(depth)) - found)})")
    stated = tower.get("num_hidden_layers", depth)
    if stated != depth:
        raise CheckpointError(f"{source}: config.json says {prefix.rstrip('.')} has {stated} layers, "
                              f"the weights hold {depth}")
    return depth


def _shape(state: dict[str, torch.Tensor], key: str, source: str, ndim: int) -> tuple[int, ...]:
    if key not in state:
        raise CheckpointError(f"{source}: expected key {key!r} is missing")
    shape = tuple(state[key].shape)
    if len(shape) != ndim:
        raise CheckpointError(f"{source}: {key} has shape {shape}, expected {ndim} dimensions")
    return shape


def hf_clip_args(config: dict[str, Any], state: dict[str, torch.Tensor], source: str = "config.json") -> dict:
    """:class:`CLIP` constructor arguments equivalent to an HF ``CLIPConfig`` + the weights it describes."""
    if config.get("model_type", "clip") != "clip":
        raise CheckpointError(f"{source}: model_type is {config.get('model_type')!r}, expected 'clip'")
    text_cfg = _tower_config(config, "text_config", source)
    vision_cfg = _tower_config(config, "vision_config", source)
    vision_act, text_act = (_tower_act(tower, key, source) for tower, key in
                            ((vision_cfg, "vision_config"), (text_cfg, "text_config")))
    vision_eps, text_eps = (tower.get("layer_norm_eps", 1e-5) for tower in (vision_cfg, text_cfg))
    # the shared act/norm_eps are the vision tower's; the text tower gets its own only where it differs
    towers = {"act": vision_act, "norm_eps": vision_eps}
    if text_act != vision_act:
        towers["text_act"] = text_act
    if text_eps != vision_eps:
        towers["text_norm_eps"] = text_eps
    eos = text_cfg.get("eos_token_id", 49407)
    if isinstance(eos, list) and len(eos) == 1:
        eos = eos[0]
    if not isinstance(eos, int) or isinstance(eos, bool):
        raise CheckpointError(f"{source}: text_config.eos_token_id={eos!r} must be one token id")

    width, chans, patch, patch_w = _shape(state, f"{_VISION}embeddings.patch_embedding.weight", source, 4)
    if patch != patch_w:
        raise CheckpointError(f"{source}: non-square patches {patch}x{patch_w} are not HF CLIP's")
    positions, _ = _shape(state, f"{_VISION}embeddings.position_embedding.weight", source, 2)
    side = round((positions - 1) ** 0.5)
    if side * side != positions - 1:
        raise CheckpointError(f"{source}: {positions} vision positions are not CLS + a square grid")
    vocab, text_width = _shape(state, f"{_TEXT}embeddings.token_embedding.weight", source, 2)
    context, _ = _shape(state, f"{_TEXT}embeddings.position_embedding.weight", source, 2)
    embed_dim, _ = _shape(state, "visual_projection.weight", source, 2)
    text_embed_dim, _ = _shape(state, "text_projection.weight", source, 2)
    if text_embed_dim != embed_dim:
        raise CheckpointError(f"{source}: visual_projection gives {embed_dim} features, text_projection "
                              f"{text_embed_dim}; they must agree")
    return dict(
        embed_dim=embed_dim, img_size=side * patch, patch_size=patch, in_chans=chans, vision_width=width,
        vision_layers=_count_layers(state, _VISION, vision_cfg, source),
        vision_heads=config_value(vision_cfg, "num_attention_heads", f"{source} (vision_config)"),
        vision_mlp_dim=_shape(state, f"{_VISION}encoder.layers.0.mlp.fc1.weight", source, 2)[0],
        vocab_size=vocab, context_length=context, text_width=text_width,
        text_layers=_count_layers(state, _TEXT, text_cfg, source),
        text_heads=config_value(text_cfg, "num_attention_heads", f"{source} (text_config)"),
        text_mlp_dim=_shape(state, f"{_TEXT}encoder.layers.0.mlp.fc1.weight", source, 2)[0],
        eos_token_id=eos, **towers,
        logit_scale_init=float(config.get("logit_scale_init_value", 2.6592)), pos_interp_antialias=False,
    )


def _convert_layers(state: dict[str, torch.Tensor], out: dict[str, torch.Tensor], hf: str, ours: str, depth: int,
                    source: str) -> None:
    """HF ``CLIPEncoderLayer`` i -> vitkit ``Block`` i (q/k/v fused)."""
    for i in range(depth):
        src, dst = f"{hf}encoder.layers.{i}.", f"{ours}blocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.qkv.{kind}"] = torch.cat(
                [take(state, f"{src}self_attn.{n}_proj.{kind}", source) for n in "qkv"], dim=0)
            for theirs, mine in (("self_attn.out_proj", "attn.proj"), ("layer_norm1", "norm1"),
                                 ("layer_norm2", "norm2"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
                out[f"{dst}{mine}.{kind}"] = take(state, f"{src}{theirs}.{kind}", source)


def convert_hf_clip_state_dict(state: dict[str, torch.Tensor], vision_layers: int, text_layers: int,
                               source: str = "state dict") -> dict[str, torch.Tensor]:
    """Rename (and fuse) HF ``CLIPModel`` weights into vitkit's :class:`CLIP` layout."""
    state = dict(state)
    v, t = _VISION, _TEXT
    out = {
        "visual.cls_token": take(state, f"{v}embeddings.class_embedding", source).reshape(1, 1, -1),
        "visual.patch_embed.proj.weight": take(state, f"{v}embeddings.patch_embedding.weight", source),
        "visual.pos_embed.weight": take(state, f"{v}embeddings.position_embedding.weight", source)[None],
        "visual.head.weight": take(state, "visual_projection.weight", source),
        "text.embed.token_embed.weight": take(state, f"{t}embeddings.token_embedding.weight", source),
        "text.embed.pos_embed.weight": take(state, f"{t}embeddings.position_embedding.weight", source),
        "text_projection.weight": take(state, "text_projection.weight", source),
        "logit_scale": take(state, "logit_scale", source).reshape(()),
    }
    for kind in ("weight", "bias"):
        out[f"visual.norm_pre.{kind}"] = take(state, f"{v}pre_layrnorm.{kind}", source)
        out[f"visual.norm.{kind}"] = take(state, f"{v}post_layernorm.{kind}", source)
        out[f"text.norm.{kind}"] = take(state, f"{t}final_layer_norm.{kind}", source)
    _convert_layers(state, out, v, "visual.", vision_layers, source)
    _convert_layers(state, out, t, "text.", text_layers, source)
    check_consumed(state, source, ignore=_IGNORED)
    return out


def load_hf_clip(src: str | os.PathLike, **overrides: Any) -> CLIP:
    """Build a vitkit CLIP from a local HF ``CLIPModel`` folder (config.json + model.safetensors or .bin).

    ``overrides`` change constructor arguments the weights do not fix (``dynamic_img_size=True``, ...).
    """
    return load_hf_model(CLIP, src, overrides, hf_clip_args, lambda state, args, source: convert_hf_clip_state_dict(
        state, args["vision_layers"], args["text_layers"], source), "hf_clip", schema=HF_CLIP_SCHEMA)


def convert_hf_clip(src: str | os.PathLike, dst: str | os.PathLike, **overrides: Any) -> CLIP:
    """Convert an HF CLIP folder into a vitkit checkpoint folder ``dst`` (+ its ``tokenizer.json``)."""
    return save_converted(load_hf_clip(src, **overrides), src, dst, (TOKENIZER_FILE,))


def load_tokenizer(folder: str | os.PathLike, truncate: bool = True):
    """The ``tokenizers.Tokenizer`` stored as ``tokenizer.json`` in ``folder`` (converted or HF).

    With ``truncate`` and a vitkit ``config.json`` beside it, sequences are cut to the model's
    ``context_length`` (the tokenizer keeps its special tokens, so the end-of-text token survives) unless the
    tokenizer already truncates.
    """

    folder = Path(folder)
    path = folder / TOKENIZER_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder} has no {TOKENIZER_FILE} (convert_hf_clip copies it from the HF folder "
                              f"when that has one)")
    tokenizer = read_tokenizer_file(path)
    if truncate and tokenizer.truncation is None and (folder / "config.json").is_file():
        context = read_config(folder).get("model_args", {}).get("context_length")
        if isinstance(context, int) and context > 0:
            tokenizer.enable_truncation(max_length=context)
    return tokenizer


ARGS: tuple[ConvertArg, ...] = (
    ConvertArg("vision_heads", "attention heads of the image tower (vision_config.num_attention_heads)",
               source="config", required=True),
    ConvertArg("text_heads", "attention heads of the text tower (text_config.num_attention_heads)",
               source="config", required=True),
    ConvertArg("act", "activation of the image tower, and of the text tower unless text_act differs "
               "(vision_config.hidden_act)", "quick_gelu", source="config"),
    ConvertArg("text_act", "activation of the text tower where it differs (text_config.hidden_act)",
               source="config"),
    ConvertArg("norm_eps", "LayerNorm eps of the image tower, and of the text tower unless text_norm_eps differs "
               "(vision_config.layer_norm_eps)", 1e-5, source="config"),
    ConvertArg("text_norm_eps", "LayerNorm eps of the text tower where it differs (text_config.layer_norm_eps)",
               source="config"),
    ConvertArg("eos_token_id", "the end-of-text token the text is read at; 2 = the highest id (legacy configs) "
               "(text_config.eos_token_id)", 49407, source="config"),
    ConvertArg("logit_scale_init", "the temperature's initial value; the weights hold the trained one "
               "(logit_scale_init_value)", 2.6592, source="config"),
    ConvertArg("dynamic_img_size", "accept other image sizes (positions interpolated)", False),
    ConvertArg("pos_interp_antialias", "antialias the interpolated positions (HF does not)", False),
    ConvertArg("drop_path_rate", "stochastic depth for fine-tuning", 0.0),
)
