"""Hugging Face ``transformers`` ViLT (``ViltModel``, ``ViltForImageAndTextRetrieval``, ``ViltForMaskedLM``)
-> vitkit :class:`~vitkit.models.vilt.ViLT`.

Read from the weights: width, patch size and channels (the patch projection), depth (layer numbering), MLP
width, qkv bias, vocabulary, text length, segment and modality type counts (the embedding tables), which heads
exist (``rank_output``, ``mlm_score``) and whether the MLM decoder is tied to the word embeddings (no decoder
weight, as in Hub files, or one equal to the word table, as in an in-memory ``state_dict()``). ``config.json``
gives what weights cannot: heads, image size (checked against the position table), LayerNorm eps, activation,
pad token, dropouts and ``max_image_length`` (> 0 turns patch sampling on). q/k/v Linears are fused into one
``qkv`` (rows [q; k; v]). Tokenizer files are copied next to the converted checkpoint.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

import torch

from ..errors import CheckpointError
from ..models.vilt import ViLT
from ..schema import HEADS, MAX_SIDE, TOKEN_ID, at_least
from ._common import ConvertArg, check_consumed, config_value, load_hf_model, save_converted, take
from ._schema import EPS_KEY, IMAGE_SIZE_KEY, RATE_KEY, ConfigSchema, Key
from .hf_vit import convert_hf_vit_layers, hf_config_activation

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.")


def normalize_hf_vilt_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip the task prefix ``vilt.`` (task models nest the backbone there; ``ViltModel`` does not)."""
    return {(k[len("vilt."):] if k.startswith("vilt.") else k): v for k, v in state.items()}


def _shape(state: dict[str, torch.Tensor], key: str, source: str, ndim: int) -> torch.Size:
    if key not in state:
        raise CheckpointError(f"{source}: expected key {key!r} is missing (not a ViLT checkpoint?)")
    if state[key].ndim != ndim:
        raise CheckpointError(f"{source}: {key} has shape {tuple(state[key].shape)}, expected {ndim} dimensions")
    return state[key].shape


def _depth(state: dict[str, torch.Tensor], source: str) -> int:
    layers = {int(m.group(1)) for k in state if (m := _LAYER.match(k))}
    if not layers or layers != set(range(len(layers))):
        raise CheckpointError(f"{source}: encoder layers are missing or not numbered 0..n-1 (found {sorted(layers)})")
    return len(layers)


def _tied_decoder(state: dict[str, torch.Tensor]) -> bool:
    """True when the MLM decoder uses the word table (absent, as HF writes files, or the same values)."""
    dec = state.get("mlm_score.decoder.weight")
    word = state.get("embeddings.text_embeddings.word_embeddings.weight")
    return dec is None or (word is not None and dec.shape == word.shape and torch.equal(dec, word))


# Every config.json entry hf_vilt_args reads (the sizes come from the weights).
HF_VILT_SCHEMA = ConfigSchema({
    "hidden_act": Key(str), "image_size": IMAGE_SIZE_KEY, "max_image_length": Key(int, at_least(-1, MAX_SIDE)),
    "num_attention_heads": Key(int, HEADS, required=True), "pad_token_id": Key(int | None, TOKEN_ID),
    "layer_norm_eps": EPS_KEY, "hidden_dropout_prob": RATE_KEY, "attention_probs_dropout_prob": RATE_KEY,
}, model_type="vilt")


def hf_vilt_args(config: dict[str, Any], state: dict[str, torch.Tensor], source: str = "config.json") -> dict:
    """ViLT constructor arguments for an HF ViLT state dict (normalised keys) and its ``config.json``."""
    act = hf_config_activation(config, "vilt", source)
    proj = _shape(state, "embeddings.patch_embeddings.projection.weight", source, 4)
    if proj[-1] != proj[-2]:
        raise CheckpointError(f"{source}: the patch projection kernel {tuple(proj[-2:])} is not square")
    dim, in_chans, patch = proj[0], proj[1], proj[-1]
    word = _shape(state, "embeddings.text_embeddings.word_embeddings.weight", source, 2)
    text_pos = _shape(state, "embeddings.text_embeddings.position_embeddings.weight", source, 2)
    segments = _shape(state, "embeddings.text_embeddings.token_type_embeddings.weight", source, 2)
    modalities = _shape(state, "embeddings.token_type_embeddings.weight", source, 2)
    mlp = _shape(state, "encoder.layer.0.intermediate.dense.weight", source, 2)
    pos = _shape(state, "embeddings.position_embeddings", source, 3)
    img_size = config.get("image_size", 384)
    if isinstance(img_size, (list, tuple)):
        if len(img_size) != 2 or img_size[0] != img_size[1]:
            raise CheckpointError(f"{source}: image_size {img_size} is not square; HF ViLT needs a square table")
        img_size = img_size[0]
    if not isinstance(img_size, int) or isinstance(img_size, bool) or pos[1] != (img_size // patch) ** 2 + 1:
        side = math.isqrt(pos[1] - 1)
        raise CheckpointError(f"{source}: the position table holds {pos[1]} rows, which does not fit image_size "
                              f"{img_size!r} with patch {patch} (a {side}x{side} grid + [CLS] would be image_size "
                              f"{side * patch})")
    max_len = config.get("max_image_length", -1)
    return dict(
        img_size=img_size, patch_size=patch, in_chans=in_chans, embed_dim=dim, depth=_depth(state, source),
        num_heads=config_value(config, "num_attention_heads", source), mlp_dim=mlp[0],
        qkv_bias="encoder.layer.0.attention.attention.query.bias" in state,
        vocab_size=word[0], max_text_len=text_pos[0], type_vocab_size=segments[0], modality_types=modalities[0],
        pad_token_id=config.get("pad_token_id"), norm_eps=config.get("layer_norm_eps", 1e-12),
        act=act, patch_sampling=isinstance(max_len, int) and max_len > 0,
        max_image_length=max_len if isinstance(max_len, int) and max_len > 0 else 200,
        rank_head="rank_output.weight" in state, mlm_head="mlm_score.transform.dense.weight" in state,
        tie_mlm_decoder=_tied_decoder(state), drop_rate=config.get("hidden_dropout_prob", 0.0),
        attn_drop_rate=config.get("attention_probs_dropout_prob", 0.0),
    )


def convert_hf_vilt_state_dict(state: dict[str, torch.Tensor], depth: int,
                               source: str = "state dict") -> dict[str, torch.Tensor]:
    """Rename (and fuse) HF ViLT weights into vitkit's layout."""
    state = normalize_hf_vilt_keys(state)
    te = "embeddings.text_embeddings."
    out = {
        "text_embed.word_embeddings.weight": take(state, te + "word_embeddings.weight", source),
        "text_embed.position_embeddings.weight": take(state, te + "position_embeddings.weight", source),
        "text_embed.token_type_embeddings.weight": take(state, te + "token_type_embeddings.weight", source),
        "text_embed.norm.weight": take(state, te + "LayerNorm.weight", source),
        "text_embed.norm.bias": take(state, te + "LayerNorm.bias", source),
        "cls_token": take(state, "embeddings.cls_token", source),
        "pos_embed": take(state, "embeddings.position_embeddings", source),
        "patch_embed.proj.weight": take(state, "embeddings.patch_embeddings.projection.weight", source),
        "patch_embed.proj.bias": take(state, "embeddings.patch_embeddings.projection.bias", source),
        "modality_embed.weight": take(state, "embeddings.token_type_embeddings.weight", source),
        "norm.weight": take(state, "layernorm.weight", source),
        "norm.bias": take(state, "layernorm.bias", source),
        "pooler.weight": take(state, "pooler.dense.weight", source),
        "pooler.bias": take(state, "pooler.dense.bias", source),
    }
    out.update(convert_hf_vit_layers(state, depth, source))
    if "rank_output.weight" in state or "rank_output.bias" in state:
        out["rank_output.weight"] = take(state, "rank_output.weight", source)
        out["rank_output.bias"] = take(state, "rank_output.bias", source)
    if any(k.startswith("mlm_score.") for k in state):
        tied = _tied_decoder({**state, te + "word_embeddings.weight": out["text_embed.word_embeddings.weight"]})
        for theirs, mine in (("transform.dense", "dense"), ("transform.LayerNorm", "norm")):
            for kind in ("weight", "bias"):
                out[f"mlm_head.{mine}.{kind}"] = take(state, f"mlm_score.{theirs}.{kind}", source)
        # HF keeps the vocabulary bias on the decoder; transformers 4 also exposed it as mlm_score.bias
        bias = state.pop("mlm_score.decoder.bias", None)
        alias = state.pop("mlm_score.bias", None)
        if bias is None and alias is None:
            raise CheckpointError(f"{source}: expected key 'mlm_score.decoder.bias' is missing")
        out["mlm_head.bias"] = bias if bias is not None else alias
        decoder = state.pop("mlm_score.decoder.weight", None)
        if not tied:
            out["mlm_head.decoder.weight"] = decoder
    # buffers that older exports wrote; ViLT recomputes them
    check_consumed(state, source, ignore=("embeddings.text_embeddings.position_ids",
                                          "embeddings.text_embeddings.token_type_ids"))
    return out


def load_hf_vilt(src: str | os.PathLike, **overrides: Any) -> ViLT:
    """Build a vitkit ViLT from a local HF ViLT folder (config.json + model.safetensors or pytorch_model.bin).

    ``overrides`` change constructor arguments the weights do not fix (``patch_sampling``, ``drop_path_rate``, ...).
    """
    return load_hf_model(ViLT, src, overrides, hf_vilt_args,
                         lambda state, args, source: convert_hf_vilt_state_dict(state, args["depth"], source),
                         "hf_vilt", normalize=normalize_hf_vilt_keys, schema=HF_VILT_SCHEMA)


def convert_hf_vilt(src: str | os.PathLike, dst: str | os.PathLike, **overrides: Any) -> ViLT:
    """Convert an HF ViLT folder into a vitkit checkpoint folder ``dst`` (tokenizer files copied); returns the
    model."""
    return save_converted(load_hf_vilt(src, **overrides), src, dst, TOKENIZER_FILES)


__all__ = ["convert_hf_vilt", "convert_hf_vilt_state_dict", "load_hf_vilt", "hf_vilt_args",
           "normalize_hf_vilt_keys"]


# What HF's ViltConfig holds that the weights do not is read from config.json (HF's own default where it is absent,
# as transformers reads it): nothing is assumed.
ARGS: tuple[ConvertArg, ...] = (
    ConvertArg("num_heads", "attention heads (num_attention_heads)", None, "config", required=True),
    ConvertArg("act", "activation (hidden_act)", "gelu", "config"),
    ConvertArg("norm_eps", "LayerNorm eps (layer_norm_eps)", 1e-12, "config"),
    ConvertArg("img_size", "image size (image_size, checked against the position table)", 384, "config"),
    ConvertArg("pad_token_id", "padding token of the text embedding (pad_token_id)", None, "config"),
    ConvertArg("patch_sampling", "sample max_image_length patches per image (max_image_length > 0)", False,
               "config"),
    ConvertArg("max_image_length", "patches kept when sampling (max_image_length)", 200, "config"),
    ConvertArg("drop_rate", "dropout (hidden_dropout_prob)", 0.0, "config"),
    ConvertArg("attn_drop_rate", "attention dropout (attention_probs_dropout_prob)", 0.0, "config"),
    ConvertArg("embed_dim", "width (patch projection)", None, "weights"),
    ConvertArg("depth", "layers", None, "weights"),
    ConvertArg("mlp_dim", "MLP width", None, "weights"),
    ConvertArg("qkv_bias", "q/k/v bias", None, "weights"),
    ConvertArg("patch_size", "patch size", None, "weights"),
    ConvertArg("in_chans", "input channels", None, "weights"),
    ConvertArg("vocab_size", "text vocabulary (word embeddings)", None, "weights"),
    ConvertArg("max_text_len", "text positions", None, "weights"),
    ConvertArg("type_vocab_size", "text segment types", None, "weights"),
    ConvertArg("modality_types", "modality types (image / text)", None, "weights"),
    ConvertArg("rank_head", "image-text matching head (rank_output present)", None, "weights"),
    ConvertArg("mlm_head", "masked-language-model head (mlm_score present)", None, "weights"),
    ConvertArg("tie_mlm_decoder", "MLM decoder tied to the word embeddings", None, "weights"),
    ConvertArg("drop_path_rate", "stochastic depth, for fine-tuning", 0.0),
)
