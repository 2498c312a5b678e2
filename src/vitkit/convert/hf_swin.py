"""Hugging Face ``transformers`` Swin (``SwinModel`` / ``SwinForImageClassification``) -> vitkit Swin.

What the weights tell is read from them: width and patch size (the patch projection), stages and blocks per
stage (the key names), heads and window size (each bias table is ((2M - 1)², heads)), MLP ratio, qkv bias,
absolute positions, class count. ``config.json`` gives what weights cannot: image size (only used with
absolute positions), LayerNorm eps and the activation. q/k/v Linears are fused into one ``qkv`` (rows [q; k; v]);
the relative position index is recomputed, never read. Both the Hub layout (``attention.self.query``, ...) and
the transformers-5 in-memory layout (``attention.q_proj``, ...) are accepted.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

import torch

from ..errors import CheckpointError
from ..models.swin import SwinTransformer
from ._common import ConvertArg, check_consumed, load_hf_model, save_converted, strip_prefix, take
from ._schema import EPS_KEY, IMAGE_SIZE_KEY, ConfigSchema, Key
from .hf_vit import convert_hf_layer, hf_config_activation

_BLOCK = r"^encoder\.layers\.(\d+)\.blocks\.(\d+)\."
_V5_TO_HUB = [
    (_BLOCK + r"attention\.q_proj\.", r"encoder.layers.\1.blocks.\2.attention.self.query."),
    (_BLOCK + r"attention\.k_proj\.", r"encoder.layers.\1.blocks.\2.attention.self.key."),
    (_BLOCK + r"attention\.v_proj\.", r"encoder.layers.\1.blocks.\2.attention.self.value."),
    (_BLOCK + r"attention\.o_proj\.", r"encoder.layers.\1.blocks.\2.attention.output.dense."),
    (_BLOCK + r"attention\.relative_position_bias\.", r"encoder.layers.\1.blocks.\2.attention.self."),
    (_BLOCK + r"mlp\.fc1\.", r"encoder.layers.\1.blocks.\2.intermediate.dense."),
    (_BLOCK + r"mlp\.fc2\.", r"encoder.layers.\1.blocks.\2.output.dense."),
]
# buffers and pretraining-only tensors that play no part in classification
_IGNORED = re.compile(r"(relative_position_index$|^embeddings\.mask_token$)")


def normalize_hf_swin_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip the task prefix ``swin.``, map transformers-5 names to the Hub layout, drop index buffers."""
    out = {}
    for key, value in strip_prefix(state, "swin.").items():
        for pattern, repl in _V5_TO_HUB:
            key, n = re.subn(pattern, repl, key)
            if n:
                break
        if not _IGNORED.search(key):
            out[key] = value
    return out


def _stage_depths(state: dict[str, torch.Tensor], source: str) -> list[int]:
    blocks: dict[int, set[int]] = {}
    for key in state:
        m = re.match(_BLOCK, key)
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    if not blocks:
        raise CheckpointError(f"{source}: no encoder.layers.<i>.blocks.<j> weights (not a Swin checkpoint?)")
    depths = []
    for i in range(len(blocks)):
        if i not in blocks or blocks[i] != set(range(len(blocks[i]))):
            raise CheckpointError(f"{source}: stages/blocks are not numbered 0..n-1 (found {sorted(blocks)})")
        depths.append(len(blocks[i]))
    return depths


# Every config.json entry hf_swin_args reads (the sizes come from the weights; the attention masks the image size
# implies are counted by the build on the meta device before the model is allocated).
HF_SWIN_SCHEMA = ConfigSchema({"hidden_act": Key(str), "image_size": IMAGE_SIZE_KEY, "layer_norm_eps": EPS_KEY},
                              model_type="swin")


def hf_swin_args(config: dict[str, Any], state: dict[str, torch.Tensor], source: str = "config.json") -> dict:
    """SwinTransformer constructor arguments for an HF Swin state dict (normalised keys) and its config."""
    act = hf_config_activation(config, "swin", source)
    proj = state.get("embeddings.patch_embeddings.projection.weight")
    if proj is None or proj.ndim != 4 or proj.shape[-1] != proj.shape[-2]:
        raise CheckpointError(f"{source}: embeddings.patch_embeddings.projection.weight is missing or not a square "
                              f"(C_out, C_in, p, p) kernel")
    depths = _stage_depths(state, source)
    heads, windows = [], set()
    for i in range(len(depths)):
        key = f"encoder.layers.{i}.blocks.0.attention.self.relative_position_bias_table"
        if key not in state:
            raise CheckpointError(f"{source}: expected key {key!r} is missing")
        rows, h = state[key].shape
        m = (math.isqrt(rows) + 1) // 2
        if (2 * m - 1) ** 2 != rows:
            raise CheckpointError(f"{source}: {key} has {rows} rows, not (2M - 1)² for any window M")
        heads.append(h)
        windows.add(m)
    if len(windows) != 1:
        raise CheckpointError(f"{source}: stages use different window sizes {sorted(windows)}; vitkit's Swin uses "
                              f"one window size for every stage")
    dim = proj.shape[0]
    hidden = state.get("encoder.layers.0.blocks.0.intermediate.dense.weight")
    if hidden is None:
        raise CheckpointError(f"{source}: expected key 'encoder.layers.0.blocks.0.intermediate.dense.weight' "
                              f"is missing")
    pos = state.get("embeddings.position_embeddings")
    img_size = config.get("image_size", 224)
    if pos is not None:
        grid = -(-img_size // proj.shape[-1]) if isinstance(img_size, int) else None
        if grid is None or pos.shape[1] != grid * grid:
            raise CheckpointError(f"{source}: position_embeddings hold {pos.shape[1]} positions, but image_size "
                                  f"{img_size} with patch {proj.shape[-1]} makes a different grid")
    return dict(
        img_size=img_size, patch_size=proj.shape[-1], in_chans=proj.shape[1],
        num_classes=state["classifier.weight"].shape[0] if "classifier.weight" in state else 0,
        embed_dim=dim, depths=depths, num_heads=heads, window_size=windows.pop(),
        mlp_ratio=hidden.shape[0] / dim,
        qkv_bias="encoder.layers.0.blocks.0.attention.self.query.bias" in state, ape=pos is not None,
        norm_eps=config.get("layer_norm_eps", 1e-5), act=act, drop_path_rate=0.0,
    )


def convert_hf_swin_state_dict(state: dict[str, torch.Tensor], depths: list[int],
                               source: str = "state dict") -> dict[str, torch.Tensor]:
    """Rename (and fuse) HF Swin weights into vitkit's layout (Hub or transformers-5 key names)."""
    state = normalize_hf_swin_keys(state)
    out = {
        "patch_embed.weight": take(state, "embeddings.patch_embeddings.projection.weight", source),
        "patch_embed.bias": take(state, "embeddings.patch_embeddings.projection.bias", source),
        "patch_norm.weight": take(state, "embeddings.norm.weight", source),
        "patch_norm.bias": take(state, "embeddings.norm.bias", source),
        "norm.weight": take(state, "layernorm.weight", source),
        "norm.bias": take(state, "layernorm.bias", source),
    }
    if "embeddings.position_embeddings" in state:  # (1, h*w, C) -> (1, h, w, C)
        pos = state.pop("embeddings.position_embeddings")
        side = math.isqrt(pos.shape[1])
        out["absolute_pos_embed"] = pos.reshape(1, side, side, pos.shape[-1])
    for i, depth in enumerate(depths):
        for j in range(depth):
            hf, ours = f"encoder.layers.{i}.blocks.{j}.", f"stages.{i}.blocks.{j}."
            out[f"{ours}attn.relative_position_bias_table"] = take(
                state, f"{hf}attention.self.relative_position_bias_table", source)
            out.update(convert_hf_layer(state, hf, ours, source, f"stage {i} block {j}", "attention.self."))
        if i < len(depths) - 1:
            hf, ours = f"encoder.layers.{i}.downsample.", f"stages.{i}.downsample."
            for name in ("reduction.weight", "norm.weight", "norm.bias"):
                out[ours + name] = take(state, hf + name, source)
    for kind in ("weight", "bias"):
        if "classifier.weight" in state or "classifier.bias" in state:
            out[f"head.{kind}"] = take(state, f"classifier.{kind}", source)
    check_consumed(state, source)
    return out


def load_hf_swin(src: str | os.PathLike, **overrides: Any) -> SwinTransformer:
    """Build a vitkit Swin from a local HF Swin folder (config.json + model.safetensors or pytorch_model.bin).

    ``overrides`` change constructor arguments the weights do not fix (``img_size``, ``drop_path_rate``, ...).
    """
    return load_hf_model(SwinTransformer, src, overrides, hf_swin_args,
                         lambda state, args, source: convert_hf_swin_state_dict(state, args["depths"], source),
                         "hf_swin", normalize=normalize_hf_swin_keys, schema=HF_SWIN_SCHEMA)


def convert_hf_swin(src: str | os.PathLike, dst: str | os.PathLike, **overrides: Any) -> SwinTransformer:
    """Convert an HF Swin folder into a vitkit checkpoint folder ``dst``; returns the model."""
    return save_converted(load_hf_swin(src, **overrides), src, dst)


# What HF's SwinConfig holds that the weights do not is read from config.json (HF's own default where it is absent,
# as transformers reads it): nothing is assumed.
ARGS: tuple[ConvertArg, ...] = (
    ConvertArg("act", "activation (hidden_act)", "gelu", "config"),
    ConvertArg("norm_eps", "LayerNorm eps (layer_norm_eps)", 1e-5, "config"),
    ConvertArg("img_size", "image size (image_size; sets the absolute position grid when there is one)", 224,
               "config"),
    ConvertArg("num_heads", "attention heads per stage (columns of each relative position table)", None, "weights"),
    ConvertArg("window_size", "window side (rows of the relative position tables: (2M - 1)²)", None, "weights"),
    ConvertArg("embed_dim", "width of the first stage (patch projection)", None, "weights"),
    ConvertArg("depths", "blocks per stage", None, "weights"),
    ConvertArg("mlp_ratio", "MLP width / stage width", None, "weights"),
    ConvertArg("qkv_bias", "q/k/v bias", None, "weights"),
    ConvertArg("ape", "absolute positions (position_embeddings present)", None, "weights"),
    ConvertArg("patch_size", "patch size", None, "weights"),
    ConvertArg("in_chans", "input channels", None, "weights"),
    ConvertArg("num_classes", "classes (classifier rows; 0 without a classifier)", None, "weights"),
    ConvertArg("drop_rate", "dropout before the head, for fine-tuning", 0.0),
    ConvertArg("attn_drop_rate", "attention dropout, for fine-tuning", 0.0),
    ConvertArg("drop_path_rate", "stochastic depth, for fine-tuning (HF's config value is not carried over)", 0.0),
)
