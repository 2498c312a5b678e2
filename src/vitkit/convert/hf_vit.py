"""Hugging Face ``transformers`` ViT (``ViTModel`` / ``ViTForImageClassification``) -> vitkit ViT.

HF keeps separate query/key/value Linears; vitkit fuses them into one ``qkv`` Linear laid out as
(3, heads, head_dim), which is the row-wise concatenation [q; k; v]. HF's ``interpolate_pos_encoding``
uses bicubic interpolation without antialiasing, so converted models set ``pos_interp_antialias=False``
to give the same outputs at other resolutions.
"""

from __future__ import annotations

import os
import re
from typing import Any

import torch

from ..errors import CheckpointError
from ..models.vit import VisionTransformer
from ..schema import CHANNELS, HEADS, LAYERS, SIDE, WIDTH
from ._common import (
    ConvertArg,
    check_consumed,
    config_value,
    load_hf_model,
    save_converted,
    strip_prefix,
    take,
)
from ._schema import EPS_KEY, IMAGE_SIZE_KEY, SIZE_KEY, ConfigSchema, Key, grid_tokens, transformer_bytes

HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu",
                  "quick_gelu": "quick_gelu", "silu": "silu", "swish": "silu"}


# transformers >= 5 names its in-memory modules differently from the files on the Hub (which it still
# writes in the old layout); a state dict saved with torch.save(model.state_dict()) has the new names.
_V5_TO_HUB = [
    (r"^layers\.(\d+)\.attention\.q_proj\.", r"encoder.layer.\1.attention.attention.query."),
    (r"^layers\.(\d+)\.attention\.k_proj\.", r"encoder.layer.\1.attention.attention.key."),
    (r"^layers\.(\d+)\.attention\.v_proj\.", r"encoder.layer.\1.attention.attention.value."),
    (r"^layers\.(\d+)\.attention\.o_proj\.", r"encoder.layer.\1.attention.output.dense."),
    (r"^layers\.(\d+)\.mlp\.fc1\.", r"encoder.layer.\1.intermediate.dense."),
    (r"^layers\.(\d+)\.mlp\.fc2\.", r"encoder.layer.\1.output.dense."),
    (r"^layers\.(\d+)\.", r"encoder.layer.\1."),
]


def normalize_hf_vit_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip the task prefix ``vit.`` and map transformers-5 in-memory names to the Hub layout."""
    out = {}
    for key, value in strip_prefix(state, "vit.").items():
        for pattern, repl in _V5_TO_HUB:
            new, n = re.subn(pattern, repl, key)
            if n:
                key = new
                break
        out[key] = value
    return out


def _hf_vit_bytes(config: dict[str, Any]) -> tuple[int, list[str]]:
    """fp32 weights of the ViT an HF ``ViTConfig`` describes (blocks, position table, patch projection)."""
    hidden, patch, chans = config["hidden_size"], config.get("patch_size", 16), config.get("num_channels", 3)
    tokens = grid_tokens(config.get("image_size", 224), patch)
    nbytes = transformer_bytes(hidden, config["num_hidden_layers"], config.get("intermediate_size", 4 * hidden), tokens)
    return nbytes + 4 * chans * patch * patch * hidden, [
        "hidden_size", "num_hidden_layers", "intermediate_size", "image_size", "patch_size"]


# Every config.json entry hf_vit_args reads: types, ranges, and the model's size against the machine's memory.
HF_VIT_SCHEMA = ConfigSchema({
    "hidden_act": Key(str), "pooler_act": Key(str),
    "hidden_size": Key(int, WIDTH, required=True), "num_hidden_layers": Key(int, LAYERS, required=True),
    "num_attention_heads": Key(int, HEADS, required=True), "intermediate_size": SIZE_KEY,
    "image_size": IMAGE_SIZE_KEY, "patch_size": Key(int, SIDE), "num_channels": Key(int, CHANNELS),
    "qkv_bias": Key(bool), "layer_norm_eps": EPS_KEY,
}, estimate=_hf_vit_bytes, model_type="vit")


def hf_config_activation(config: dict[str, Any], model_type: str, source: str) -> str:
    """Check ``model_type`` and return the vitkit name of ``hidden_act``, or a CheckpointError naming the file."""
    if config.get("model_type", model_type) != model_type:
        raise CheckpointError(f"{source}: model_type is {config.get('model_type')!r}, expected {model_type!r}")
    act = config.get("hidden_act", "gelu")
    if act not in HF_ACTIVATIONS:
        raise CheckpointError(f"{source}: hidden_act {act!r} is not supported ({sorted(HF_ACTIVATIONS)})")
    return HF_ACTIVATIONS[act]


def hf_vit_args(config: dict[str, Any], state: dict[str, torch.Tensor], source: str = "config.json") -> dict:
    """VisionTransformer constructor arguments equivalent to an HF ``ViTConfig`` (+ what the weights hold)."""
    act = hf_config_activation(config, "vit", source)
    hidden = config_value(config, "hidden_size", source)
    representation = None
    if "pooler.dense.weight" in state:
        if config.get("pooler_act", "tanh") != "tanh":
            raise CheckpointError(f"{source}: pooler_act {config.get('pooler_act')!r} is not supported (tanh)")
        representation = state["pooler.dense.weight"].shape[0]
    num_classes = state["classifier.weight"].shape[0] if "classifier.weight" in state else 0
    return dict(
        img_size=config.get("image_size", 224), patch_size=config.get("patch_size", 16),
        in_chans=config.get("num_channels", 3), num_classes=num_classes, embed_dim=hidden,
        depth=config_value(config, "num_hidden_layers", source),
        num_heads=config_value(config, "num_attention_heads", source),
        mlp_dim=config.get("intermediate_size", 4 * hidden), qkv_bias=config.get("qkv_bias", True),
        norm_eps=config.get("layer_norm_eps", 1e-12), act=act,
        representation_size=representation, pos_interp_antialias=False,
    )


def convert_hf_layer(state: dict[str, torch.Tensor], hf: str, ours: str, source: str, what: str,
                     attention: str = "attention.attention.") -> dict[str, torch.Tensor]:
    """Pop one HF BERT-style layer at prefix ``hf`` (``{attention}query/key/value``, ``layernorm_before/after``,
    ``attention.output.dense``, ``intermediate.dense``, ``output.dense``: ViT, ViLT, Swin) and return it as the
    weights of the vitkit block at prefix ``ours``, query/key/value fused into one ``qkv`` (rows [q; k; v]).
    ``what`` names the layer in errors."""
    out = {}
    for kind in ("weight", "bias"):
        qkv = [f"{hf}{attention}{n}.{kind}" for n in ("query", "key", "value")]
        if all(k in state for k in qkv):
            out[f"{ours}attn.qkv.{kind}"] = torch.cat([state.pop(k) for k in qkv], dim=0)
        elif kind == "weight" or any(k in state for k in qkv):
            raise CheckpointError(f"{source}: {what} lacks some query/key/value {kind}s")
        for theirs, mine in (("layernorm_before", "norm1"), ("layernorm_after", "norm2"),
                             ("attention.output.dense", "attn.proj"), ("intermediate.dense", "mlp.fc1"),
                             ("output.dense", "mlp.fc2")):
            out[f"{ours}{mine}.{kind}"] = take(state, f"{hf}{theirs}.{kind}", source)
    return out


def convert_hf_vit_layers(state: dict[str, torch.Tensor], depth: int, source: str) -> dict[str, torch.Tensor]:
    """Pop HF's ``encoder.layer.<i>`` weights (the ViT layer layout, which ViLT shares) and return them as vitkit
    ``blocks.<i>`` weights (:func:`convert_hf_layer`)."""
    out = {}
    for i in range(depth):
        out.update(convert_hf_layer(state, f"encoder.layer.{i}.", f"blocks.{i}.", source, f"layer {i}"))
    return out


def convert_hf_vit_state_dict(state: dict[str, torch.Tensor], depth: int,
                              source: str = "state dict") -> dict[str, torch.Tensor]:
    """Rename (and fuse) HF ViT weights into vitkit's layout (Hub or transformers-5 key names)."""
    state = normalize_hf_vit_keys(state)
    out = {
        "cls_token": take(state, "embeddings.cls_token", source),
        "pos_embed.weight": take(state, "embeddings.position_embeddings", source),
        "patch_embed.proj.weight": take(state, "embeddings.patch_embeddings.projection.weight", source),
        "patch_embed.proj.bias": take(state, "embeddings.patch_embeddings.projection.bias", source),
        "norm.weight": take(state, "layernorm.weight", source),
        "norm.bias": take(state, "layernorm.bias", source),
    }
    out.update(convert_hf_vit_layers(state, depth, source))
    for hf, ours in (("pooler.dense", "pre_logits.0"), ("classifier", "head")):
        present = [kind for kind in ("weight", "bias") if f"{hf}.{kind}" in state]
        if len(present) == 1:
            absent = "bias" if present == ["weight"] else "weight"
            raise CheckpointError(f"{source}: {hf}.{present[0]} is there but {hf}.{absent} is missing (a "
                                  f"truncated or hand-edited checkpoint?)")
        for kind in present:
            out[f"{ours}.{kind}"] = state.pop(f"{hf}.{kind}")
    # mask_token exists only for masked-image-modelling variants and plays no part in classification.
    check_consumed(state, source, ignore=("embeddings.mask_token",))
    return out


def load_hf_vit(src: str | os.PathLike, **overrides: Any) -> VisionTransformer:
    """Build a vitkit ViT from a local HF ViT folder (config.json + model.safetensors or pytorch_model.bin).

    ``overrides`` change constructor arguments that the weights do not fix (``dynamic_img_size=True``, ...).
    """
    return load_hf_model(VisionTransformer, src, overrides, hf_vit_args,
                         lambda state, args, source: convert_hf_vit_state_dict(state, args["depth"], source), "hf_vit",
                         normalize=normalize_hf_vit_keys, schema=HF_VIT_SCHEMA)


def convert_hf_vit(src: str | os.PathLike, dst: str | os.PathLike, **overrides: Any) -> VisionTransformer:
    """Convert an HF ViT folder into a vitkit checkpoint folder ``dst``; returns the model."""
    return save_converted(load_hf_vit(src, **overrides), src, dst)


# Every key HF's ViTConfig holds is read from config.json (HF's own default where it is absent, as transformers
# reads it): nothing is assumed. --arg overrides any of them.
ARGS: tuple[ConvertArg, ...] = (
    ConvertArg("num_heads", "attention heads (num_attention_heads)", None, "config", required=True),
    ConvertArg("embed_dim", "width (hidden_size)", None, "config", required=True),
    ConvertArg("depth", "blocks (num_hidden_layers)", None, "config", required=True),
    ConvertArg("mlp_dim", "MLP width (intermediate_size; HF's default 4 * width)", None, "config"),
    ConvertArg("act", "activation (hidden_act)", "gelu", "config"),
    ConvertArg("norm_eps", "LayerNorm eps (layer_norm_eps)", 1e-12, "config"),
    ConvertArg("qkv_bias", "q/k/v bias (qkv_bias)", True, "config"),
    ConvertArg("img_size", "image size (image_size)", 224, "config"),
    ConvertArg("patch_size", "patch size (patch_size)", 16, "config"),
    ConvertArg("in_chans", "input channels (num_channels)", 3, "config"),
    ConvertArg("num_classes", "classes (classifier rows; 0 without a classifier)", None, "weights"),
    ConvertArg("representation_size", "width of the tanh pooler (pooler.dense; None without one)", None, "weights"),
    ConvertArg("dynamic_img_size", "accept other image sizes (positions interpolated)", False),
    ConvertArg("pos_interp_antialias", "antialias the interpolated positions (HF does not)", False),
    ConvertArg("drop_rate", "dropout before the head, for fine-tuning", 0.0),
    ConvertArg("pos_drop_rate", "dropout after the position embedding, for fine-tuning", 0.0),
    ConvertArg("attn_drop_rate", "attention dropout, for fine-tuning", 0.0),
    ConvertArg("drop_path_rate", "stochastic depth, for fine-tuning", 0.0),
)
