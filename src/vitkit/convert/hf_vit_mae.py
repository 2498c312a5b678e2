"""Hugging Face ``transformers`` ``ViTMAEForPreTraining`` -> vitkit :class:`~vitkit.models.mae.MaskedAutoencoderViT`.

Everything comes from ``config.json`` (widths, depths, heads, MLP sizes, activation, eps, qkv bias, mask
ratio, ``norm_pix_loss``) and the weights; ``overrides`` set the rest (``dynamic_img_size``, ``drop_path_rate``
go to the encoder, MAE arguments to the model). As for ViT, HF's separate query/key/value Linears are
concatenated into vitkit's fused ``qkv``.

HF stores its two fixed sin-cos position tables as (frozen) weights; vitkit recomputes them. The converter
checks that the stored tables are MAE's 2D sin-cos (column half first, the layout of the official MAE
weights; the row-first layout is recognised too) and fails if they are not, e.g. all zeros.

Three key layouts are read: the Hub's (``vit.encoder.layer.N.attention.attention.query``, decoder
``decoder.decoder_layers.N...``), the one transformers 5 writes (decoder ``decoder.decoder_encoder.layer.N``)
and transformers 5's in-memory names (``vit.layers.N.attention.q_proj``), as ``torch.save(state_dict())`` has.
"""

from __future__ import annotations

import inspect
import os
import re
from typing import Any

import torch

from ..data.constants import IMAGENET_MEAN, IMAGENET_STD
from ..errors import CheckpointError
from ..layers import SINCOS_ORDERS, sincos_2d
from ..models import list_models, model_defaults
from ..models.mae import MaskedAutoencoderViT
from ..schema import CHANNELS, HEADS, LAYERS, RATE, SIDE
from ._common import ConvertArg, check_consumed, load_hf_model, save_converted, take
from ._schema import EPS_KEY, SIZE_KEY, ConfigSchema, Key, grid_tokens, transformer_bytes
from .hf_vit import hf_config_activation

# Layer stacks: (pattern of a layer prefix, vitkit prefix)
_STACKS = [
    (re.compile(r"^vit\.encoder\.layer\.(\d+)\."), "encoder.blocks.{}."),
    (re.compile(r"^vit\.layers\.(\d+)\."), "encoder.blocks.{}."),
    (re.compile(r"^decoder\.decoder_layers\.(\d+)\."), "decoder_blocks.{}."),
    (re.compile(r"^decoder\.decoder_encoder\.layer\.(\d+)\."), "decoder_blocks.{}."),
]
# Inside a layer: HF module path (either generation) -> canonical name (q, k, v are fused afterwards)
_LAYER_PARTS = {
    "attention.attention.query.": "q.", "attention.q_proj.": "q.",
    "attention.attention.key.": "k.", "attention.k_proj.": "k.",
    "attention.attention.value.": "v.", "attention.v_proj.": "v.",
    "attention.output.dense.": "attn.proj.", "attention.o_proj.": "attn.proj.",
    "intermediate.dense.": "mlp.fc1.", "mlp.fc1.": "mlp.fc1.",
    "output.dense.": "mlp.fc2.", "mlp.fc2.": "mlp.fc2.",
    "layernorm_before.": "norm1.", "layernorm_after.": "norm2.",
}
_DIRECT = {
    "vit.embeddings.cls_token": "encoder.cls_token",
    "vit.embeddings.patch_embeddings.projection.weight": "encoder.patch_embed.proj.weight",
    "vit.embeddings.patch_embeddings.projection.bias": "encoder.patch_embed.proj.bias",
    "vit.layernorm.weight": "encoder.norm.weight",
    "vit.layernorm.bias": "encoder.norm.bias",
    "decoder.mask_token": "mask_token",
    "decoder.decoder_embed.weight": "decoder_embed.weight",
    "decoder.decoder_embed.bias": "decoder_embed.bias",
    "decoder.decoder_norm.weight": "decoder_norm.weight",
    "decoder.decoder_norm.bias": "decoder_norm.bias",
    "decoder.decoder_pred.weight": "decoder_pred.weight",
    "decoder.decoder_pred.bias": "decoder_pred.bias",
}
_POS_TABLES = ("vit.embeddings.position_embeddings", "decoder.decoder_pos_embed")


def convert_hf_vit_mae_state_dict(state: dict[str, torch.Tensor], source: str = "state dict"
                                  ) -> dict[str, torch.Tensor]:
    """Rename (and fuse) HF ViTMAE weights into vitkit's MAE layout. The position tables are not included."""
    state = dict(state)
    out: dict[str, torch.Tensor] = {}
    for hf, ours in _DIRECT.items():
        out[ours] = take(state, hf, source)
    pending: dict[str, torch.Tensor] = {}
    for key in list(state):
        for pattern, prefix in _STACKS:
            m = pattern.match(key)
            if not m:
                continue
            rest = key[m.end():]
            part = next((p for p in _LAYER_PARTS if rest.startswith(p)), None)
            if part is not None:
                pending[prefix.format(m.group(1)) + _LAYER_PARTS[part] + rest[len(part):]] = state.pop(key)
            break
    for key in [k for k in pending if re.search(r"\.q\.(weight|bias)$", k)]:
        base, kind = key.rsplit(".q.", 1)
        parts = [pending.pop(f"{base}.{n}.{kind}", None) for n in "qkv"]
        if any(p is None for p in parts):
            raise CheckpointError(f"{source}: {base} lacks one of its query/key/value {kind}s")
        out[f"{base}.attn.qkv.{kind}"] = torch.cat(parts, dim=0)
    left = sorted(k for k in pending if re.search(r"\.[kv]\.(weight|bias)$", k))
    if left:
        raise CheckpointError(f"{source}: key/value weights without a query: {', '.join(left[:6])}")
    out.update(pending)
    check_consumed(state, source, ignore=_POS_TABLES)
    return out


def _sincos_order(table: torch.Tensor, grid: tuple[int, int], source: str, name: str) -> str:
    """Which sin-cos channel order a stored (1, 1 + h*w, D) table has; fails if it is no sin-cos table."""
    table = table.reshape(-1, table.shape[-1]).float()
    if table.shape[0] != 1 + grid[0] * grid[1] or table[0].abs().max() > 1e-6:
        raise CheckpointError(f"{source}: {name} has shape {tuple(table.shape)}, expected a zero CLS row + "
                              f"{grid[0]}x{grid[1]} sin-cos rows")
    errors = {}
    for order in ("wh", "hw"):
        errors[order] = (sincos_2d(grid, table.shape[-1], order=order) - table[1:]).abs().max().item()
        if errors[order] <= 1e-4:
            return order
    raise CheckpointError(f"{source}: {name} is not MAE's fixed 2D sin-cos table (max diff {min(errors.values()):.3g} "
                          f"for orders {SINCOS_ORDERS}); vitkit recomputes the positions, so it cannot hold a "
                          f"trained or zero table")


def _encoder_name(args: dict[str, Any]) -> str:
    """A registered ViT with this encoder's size (only for a readable config.json; the args fix everything)."""
    keys = ("embed_dim", "depth", "num_heads", "patch_size")
    for name in list_models("vit_*_patch*"):
        d = model_defaults(name)
        if all(d.get(k) == args[k] for k in keys) and d.get("stem", "patch") == "patch":
            return name
    return "vit_base_patch16_224"


def _hf_vit_mae_bytes(config: dict[str, Any]) -> tuple[int, list[str]]:
    """fp32 weights of the MAE an HF ``ViTMAEConfig`` describes: encoder, decoder, both position tables."""
    hidden, dec = config.get("hidden_size", 768), config.get("decoder_hidden_size", 512)
    patch, chans = config.get("patch_size", 16), config.get("num_channels", 3)
    tokens = grid_tokens(config.get("image_size", 224), patch)
    nbytes = transformer_bytes(hidden, config.get("num_hidden_layers", 12), config.get("intermediate_size", 4 * hidden),
                               tokens)
    nbytes += transformer_bytes(dec, config.get("decoder_num_hidden_layers", 8),
                                config.get("decoder_intermediate_size", 2048), tokens)
    nbytes += 4 * (chans * patch * patch * (hidden + dec) + hidden * dec)
    return nbytes, ["hidden_size", "num_hidden_layers", "intermediate_size", "image_size", "patch_size",
                    "decoder_hidden_size", "decoder_num_hidden_layers", "decoder_intermediate_size"]


# Every config.json entry hf_vit_mae_args reads: types, ranges, and the model's size against the machine's memory.
HF_VIT_MAE_SCHEMA = ConfigSchema({
    "hidden_act": Key(str), "hidden_size": SIZE_KEY, "num_hidden_layers": Key(int, LAYERS),
    "num_attention_heads": Key(int, HEADS), "intermediate_size": SIZE_KEY, "image_size": Key(int, SIDE),
    "patch_size": Key(int, SIDE), "num_channels": Key(int, CHANNELS), "qkv_bias": Key(bool),
    "layer_norm_eps": EPS_KEY, "decoder_hidden_size": SIZE_KEY, "decoder_num_hidden_layers": Key(int, LAYERS),
    "decoder_num_attention_heads": Key(int, HEADS), "decoder_intermediate_size": SIZE_KEY,
    "mask_ratio": Key(float, RATE), "norm_pix_loss": Key(bool),
}, estimate=_hf_vit_mae_bytes, model_type="vit_mae")


def hf_vit_mae_args(config: dict[str, Any], state: dict[str, torch.Tensor], source: str = "config.json"
                    ) -> dict[str, Any]:
    """MaskedAutoencoderViT constructor arguments equivalent to an HF ``ViTMAEConfig`` (+ what the weights hold)."""
    act = hf_config_activation(config, "vit_mae", source)
    if not any(k.startswith("decoder.") for k in state):
        raise CheckpointError(f"{source}: no decoder weights (a ViTMAEModel?); hf-vit-mae converts "
                              f"ViTMAEForPreTraining checkpoints")
    img, patch = config.get("image_size", 224), config.get("patch_size", 16)
    grid = (img // patch, img // patch)
    orders = {_sincos_order(state[k], grid, source, k) for k in _POS_TABLES if k in state}
    if len(orders) > 1:
        raise CheckpointError(f"{source}: encoder and decoder sin-cos tables use different channel orders")
    hidden = config.get("hidden_size", 768)
    encoder_args = dict(
        img_size=img, patch_size=patch, in_chans=config.get("num_channels", 3), embed_dim=hidden,
        depth=config.get("num_hidden_layers", 12), num_heads=config.get("num_attention_heads", 12),
        mlp_dim=config.get("intermediate_size", 4 * hidden), qkv_bias=config.get("qkv_bias", True),
        norm_eps=config.get("layer_norm_eps", 1e-12), act=act, pos_embed="sincos_2d",
        pos_sincos_order=orders.pop() if orders else "wh", pos_interp_antialias=False,
    )
    return dict(
        encoder=_encoder_name(encoder_args), encoder_args=encoder_args,
        decoder_embed_dim=config.get("decoder_hidden_size", 512),
        decoder_depth=config.get("decoder_num_hidden_layers", 8),
        decoder_num_heads=config.get("decoder_num_attention_heads", 16),
        decoder_mlp_dim=config.get("decoder_intermediate_size", 2048),
        decoder_qkv_bias=config.get("qkv_bias", True),
        mask_ratio=config.get("mask_ratio", 0.75), norm_pix_loss=config.get("norm_pix_loss", False),
    )


def load_hf_vit_mae(src: str | os.PathLike, **overrides: Any) -> MaskedAutoencoderViT:
    """Build a vitkit MAE from a local HF ``ViTMAEForPreTraining`` folder.

    ``overrides``: MaskedAutoencoderViT arguments (``mask_ratio=0.6``) or, for anything else, encoder
    arguments (``drop_path_rate=0.1``, ``dynamic_img_size=True``).
    """
    own = set(inspect.signature(MaskedAutoencoderViT.__init__).parameters)

    def args_with_overrides(config: dict[str, Any], state: dict[str, torch.Tensor], source: str) -> dict[str, Any]:
        args = hf_vit_mae_args(config, state, source)
        for key, value in overrides.items():
            if key in own and key != "encoder_args":
                args[key] = value
            else:
                args["encoder_args"] = {**args["encoder_args"], **(value if key == "encoder_args" else {key: value})}
        return args

    def rgb_defaults(args: dict[str, Any]) -> dict[str, Any] | None:
        """The normalisation of HF's ViTMAE image processor (and of the official MAE) for RGB images, unless the
        folder's ``preprocessor_config.json`` states its own."""
        return dict(mean=IMAGENET_MEAN, std=IMAGENET_STD) if args["encoder_args"].get("in_chans", 3) == 3 else None

    return load_hf_model(MaskedAutoencoderViT, src, {}, args_with_overrides,
                         lambda state, _, source: convert_hf_vit_mae_state_dict(state, source), "hf_vit_mae",
                         cfg_defaults=rgb_defaults, schema=HF_VIT_MAE_SCHEMA)


def convert_hf_vit_mae(src: str | os.PathLike, dst: str | os.PathLike, **overrides: Any) -> MaskedAutoencoderViT:
    """Convert an HF ViTMAEForPreTraining folder into a vitkit checkpoint folder ``dst``; returns the model."""
    return save_converted(load_hf_vit_mae(src, **overrides), src, dst)


# Every key HF's ViTMAEConfig holds is read from config.json (HF's own default where it is absent, as transformers
# reads it): nothing is assumed. MaskedAutoencoderViT's own keys go to the model, every other key to its encoder.
ARGS: tuple[ConvertArg, ...] = (
    ConvertArg("mask_ratio", "share of patches masked (mask_ratio)", 0.75, "config"),
    ConvertArg("norm_pix_loss", "normalise each target patch (norm_pix_loss)", False, "config"),
    ConvertArg("decoder_embed_dim", "decoder width (decoder_hidden_size)", 512, "config"),
    ConvertArg("decoder_depth", "decoder blocks (decoder_num_hidden_layers)", 8, "config"),
    ConvertArg("decoder_num_heads", "decoder attention heads (decoder_num_attention_heads)", 16, "config"),
    ConvertArg("decoder_mlp_dim", "decoder MLP width (decoder_intermediate_size)", 2048, "config"),
    ConvertArg("decoder_qkv_bias", "decoder q/k/v bias (qkv_bias)", True, "config"),
    ConvertArg("encoder_args", "encoder (VisionTransformer) arguments, as a mapping: num_heads, embed_dim, depth, "
               "mlp_dim, act, norm_eps, qkv_bias, img_size, patch_size, in_chans come from config.json", None,
               "config"),
    ConvertArg("pos_sincos_order", "encoder: channel order of the sin-cos positions (read off the stored tables; "
               "wh, as HF and the official MAE)", "wh", "weights"),
    ConvertArg("dynamic_img_size", "encoder: accept other image sizes (positions recomputed)", False),
    ConvertArg("drop_path_rate", "encoder: stochastic depth, for fine-tuning", 0.0),
    ConvertArg("attn_drop_rate", "encoder: attention dropout, for fine-tuning", 0.0),
)
