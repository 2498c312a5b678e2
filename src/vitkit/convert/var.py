"""Official VAR checkpoints (github.com/FoundationVision/VAR) -> vitkit :class:`MultiScaleVQVAE` and :class:`VAR`.

Two converters, because the official release has two files (``vae_ch160v4096z32.pth``, ``var_d16.pth``):

``vitkit convert var-vqvae SRC DST`` — read off the weights: ``vocab_size`` and ``z_channels`` (codebook),
``ch`` and ``in_channels`` (``encoder.conv_in``), ``ch_mult`` (each level's width / ch), ``num_res_blocks``,
``using_sa`` / ``using_mid_sa`` (which attention blocks exist), ``quant_conv_ks``, the φ sharing mode and count
(``quant_resi.qresi_ls.k`` = partially shared, ``quant_resi.qresi`` = shared, ``quant_resi.k`` = one per scale; no
φ weights = ``quant_resi=0``) and the number of scales (rows of ``quantize.ema_vocab_hit_SV``). Not in the weights,
so ``--arg``, a ``config.json`` beside the weights (official names ``v_patch_nums``, ``quant_resi``,
``using_znorm``, at its top level or in a ``*_args`` section), or the official default, announced with an
``AssumedValueWarning`` where it changes the codes: ``patch_nums`` (default the official 1..16 schedule when the
checkpoint has 10 scales, else required), ``quant_resi`` (0.5), ``using_znorm`` (False: Euclidean code lookup, not
cosine); training-only, so not announced: ``beta`` (0.25), ``dropout`` (0). A ``patch_nums`` of another length
resets the code-hit statistics, as the official ``load_state_dict`` does.

``vitkit convert var SRC DST`` — read off the weights: ``vocab_size`` (head), ``c_vae`` (word_embed),
``embed_dim``, ``num_classes`` (class_emb rows − 1), ``depth``, ``mlp_ratio``, ``attn_l2_norm`` and then
``num_heads`` (the shape of ``scale_mul_1H11``), ``shared_aln``, and ``patch_nums`` (from the ``lvl_1L`` buffer;
without it, the official schedule when the lengths fit, announced). ``num_heads`` without ``attn_l2_norm`` cannot
be read: ``--arg num_heads=``, a ``config.json`` beside the weights (which may also give ``patch_nums`` when there
is no ``lvl_1L``), or the official rule heads = depth, announced. Training-only settings follow ``build_vae_var``:
``drop_path_rate`` = 0.1·depth/24, ``cond_drop_rate`` = 0.1 (``--arg`` to change). The buffers
``attn_bias_for_masking``, ``lvl_1L`` and ``zero_k_bias`` are checked against what vitkit computes and dropped.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

import torch

from ..errors import CheckpointError
from ..layers.conv_codec import NORM_GROUPS
from ..models._pretrained import read_state_dict
from ..models.var import VAR, level_layout
from ..models.vqvae import OFFICIAL_PATCH_NUMS, MultiScaleVQVAE
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

_PHI_PATTERNS = (  # official φ container -> (share_quant_resi mode, key regex)
    ("partial", re.compile(r"^quantize\.quant_resi\.qresi_ls\.(\d+)\.(weight|bias)$")),
    ("shared", re.compile(r"^quantize\.quant_resi\.qresi\.(weight|bias)$")),
    ("per_scale", re.compile(r"^quantize\.quant_resi\.(\d+)\.(weight|bias)$")),
)


def _need(state: dict[str, torch.Tensor], key: str, source: str, what: str) -> torch.Tensor:
    if key not in state:
        raise CheckpointError(f"{source}: expected key {key!r} of an official {what} state dict is missing")
    return state[key]


def _indices(state: dict[str, torch.Tensor], prefix: str) -> list[int]:
    """Sorted distinct integers that follow ``prefix`` in the keys (``encoder.down.`` -> [0, 1, ...])."""
    found = {int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return sorted(found)


# ---------------------------------------------------------------------- VQ-VAE
def _phi_layout(state: dict[str, torch.Tensor], source: str) -> tuple[str | None, dict[int, str]]:
    """(sharing mode, {φ index: official key prefix}) of the φ convolutions in ``state``."""
    for mode, pattern in _PHI_PATTERNS:
        found: dict[int, str] = {}
        for key in state:
            m = pattern.match(key)
            if m:
                index = 0 if mode == "shared" else int(m.group(1))
                found[index] = key.rsplit(".", 1)[0]
        if found:
            if sorted(found) != list(range(len(found))):
                raise CheckpointError(f"{source}: φ layers {sorted(found)} are not numbered 0..{len(found) - 1}")
            return mode, found
    return None, {}


def infer_vqvae_args(state: dict[str, torch.Tensor], source: str = "state dict", shipped: dict[str, Any] | None = None,
                     **overrides: Any) -> dict[str, Any]:
    """MultiScaleVQVAE constructor arguments for an official VQVAE state dict; ``overrides`` win, then the weights,
    then ``shipped`` (what a config beside the weights tells), then the official defaults, announced."""
    what = "VAR VQVAE"
    codebook = _need(state, "quantize.embedding.weight", source, what)
    conv_in = _need(state, "encoder.conv_in.weight", source, what)
    ch = conv_in.shape[0]
    levels = _indices(state, "encoder.down.")
    if not levels:
        raise CheckpointError(f"{source}: no 'encoder.down.<level>' keys: not an official VAR VQVAE state dict")
    ch_mult = []
    for level in levels:
        width = _need(state, f"encoder.down.{level}.block.0.conv1.weight", source, what).shape[0]
        if width % ch:
            raise CheckpointError(f"{source}: encoder level {level} is {width} wide, not a multiple of ch={ch}")
        ch_mult.append(width // ch)
    num_res_blocks = len(_indices(state, "encoder.down.0.block."))
    last = levels[-1]
    mode, phis = _phi_layout(state, source)
    args: dict[str, Any] = dict(
        vocab_size=codebook.shape[0], z_channels=codebook.shape[1], ch=ch, ch_mult=tuple(ch_mult),
        num_res_blocks=num_res_blocks, in_channels=conv_in.shape[1],
        using_sa=f"encoder.down.{last}.attn.0.qkv.weight" in state,
        using_mid_sa="encoder.mid.attn_1.qkv.weight" in state,
        quant_conv_ks=_need(state, "quant_conv.weight", source, what).shape[-1],
    )
    if mode == "partial":
        args["share_quant_resi"] = len(phis)
    elif mode == "shared":
        args["share_quant_resi"] = 1
    elif mode == "per_scale":
        args["share_quant_resi"] = 0
        args["default_qresi_counts"] = len(phis)
    else:
        args["quant_resi"] = 0.0  # every φ is the identity
    shipped = shipped or {}
    num_scales = state["quantize.ema_vocab_hit_SV"].shape[0] if "quantize.ema_vocab_hit_SV" in state else None
    if "patch_nums" in shipped and "patch_nums" not in overrides:
        args["patch_nums"] = shipped["patch_nums"]
    elif "patch_nums" not in overrides:
        if num_scales not in (None, len(OFFICIAL_PATCH_NUMS)):
            raise CheckpointError(f"{source}: the checkpoint has {num_scales} scales (quantize.ema_vocab_hit_SV), "
                                  f"not the official {len(OFFICIAL_PATCH_NUMS)}; pass --arg patch_nums=[...]")
        args["patch_nums"] = assume(source, "patch_nums", OFFICIAL_PATCH_NUMS, "the official schedule; the weights "
                                    "tell " + (f"only its {num_scales} scales" if num_scales else "nothing of it"))
    # how codes are looked up and mixed back change every code: told, or the official default announced
    if "using_znorm" not in overrides:
        args["using_znorm"] = shipped["using_znorm"] if "using_znorm" in shipped else assume(
            source, "using_znorm", False, "the weights do not tell the code lookup; the official Euclidean one")
    if mode is not None and "quant_resi" not in overrides:
        args["quant_resi"] = shipped["quant_resi"] if "quant_resi" in shipped else assume(
            source, "quant_resi", 0.5, "the weights hold the φ convolutions, not their share; the official 0.5")
    if mode == "per_scale" and len(phis) == len(overrides.get("patch_nums", args.get("patch_nums"))):
        args["default_qresi_counts"] = 0  # the official default: one φ per scale
    args.update(overrides)
    if ch % NORM_GROUPS:
        raise CheckpointError(f"{source}: ch={ch} is not a multiple of the {NORM_GROUPS} GroupNorm groups")
    return args


def convert_vqvae_state_dict(state: dict[str, torch.Tensor], source: str = "state dict",
                             shipped: dict[str, Any] | None = None, **overrides: Any
                             ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(MultiScaleVQVAE constructor arguments, vitkit state dict) for an official VQVAE state dict (``shipped``: see
    :func:`infer_vqvae_args`)."""
    state = strip_prefix(dict(state), "module.")
    args = infer_vqvae_args(state, source, shipped, **overrides)
    _, phis = _phi_layout(state, source)
    out: dict[str, torch.Tensor] = {}
    for index, prefix in phis.items():
        for kind in ("weight", "bias"):
            out[f"quantize.phi.{index}.{kind}"] = take(state, f"{prefix}.{kind}", source)
    out["quantize.embedding.weight"] = take(state, "quantize.embedding.weight", source)
    ema = state.pop("quantize.ema_vocab_hit_SV", None)
    num_scales, vocab = len(args["patch_nums"]), args["vocab_size"]
    out["quantize.ema_vocab_hit_SV"] = ema if ema is not None and ema.shape == (num_scales, vocab) else \
        torch.zeros(num_scales, vocab)  # statistics of other scales are reset, as the official loader does
    for key in [k for k in state if k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv."))]:
        out[key] = state.pop(key)  # the official names are vitkit's
    check_consumed(state, source)
    return args, out


def load_var_vqvae(src: str | os.PathLike, **overrides: Any) -> MultiScaleVQVAE:
    """Build a vitkit MultiScaleVQVAE from an official VAR VQVAE checkpoint (.pth / .safetensors); what the weights
    do not tell is read from a ``config.json`` beside them when there is one."""
    state = read_state_dict(src)
    shipped = official_config(src, ("v_patch_nums", "quant_resi", "using_znorm"))
    if "v_patch_nums" in shipped:
        shipped["patch_nums"] = shipped.pop("v_patch_nums")
    args, converted = convert_vqvae_state_dict(state, str(src), shipped, **overrides)
    model = load_converted(MultiScaleVQVAE, args, overrides, lambda _: converted, str(src))
    official = args["vocab_size"] == 4096 and args["z_channels"] == 32 and args["ch"] == 160
    model.model_name = "vqvae_var" if official else "multiscale_vqvae"
    return model


def convert_var_vqvae(src: str | os.PathLike, dst: str | os.PathLike, **overrides: Any) -> MultiScaleVQVAE:
    """Convert an official VAR VQVAE checkpoint file into a vitkit checkpoint folder ``dst``; returns the model."""
    return save_converted(load_var_vqvae(src, **overrides), src, dst)


# ---------------------------------------------------------------------- VAR transformer
def _patch_nums_from_levels(lvl_1L: torch.Tensor, source: str) -> tuple[int, ...]:
    levels = lvl_1L.flatten().tolist()
    if levels != sorted(levels) or not levels or levels[0] != 0:
        raise CheckpointError(f"{source}: lvl_1L is not a non-decreasing run of levels from 0")
    patch_nums = []
    for level in range(levels[-1] + 1):
        count = levels.count(level)
        pn = math.isqrt(count)
        if count == 0 or pn * pn != count:
            raise CheckpointError(f"{source}: lvl_1L has {count} tokens at level {level}, not a square token map")
        patch_nums.append(pn)
    return tuple(patch_nums)


def infer_var_args(state: dict[str, torch.Tensor], source: str = "state dict", shipped: dict[str, Any] | None = None,
                   **overrides: Any) -> dict[str, Any]:
    """VAR constructor arguments for an official VAR state dict; ``overrides`` win, then the weights, then
    ``shipped`` (what a config beside the weights tells), then the official rules, announced."""
    what = "VAR"
    class_emb = _need(state, "class_emb.weight", source, what)
    word_embed = _need(state, "word_embed.weight", source, what)
    embed_dim = class_emb.shape[1]
    depth = len(_indices(state, "blocks."))
    if depth == 0:
        raise CheckpointError(f"{source}: no 'blocks.<i>' keys: not an official VAR state dict")
    scale_mul = state.get("blocks.0.attn.scale_mul_1H11")
    fc1 = _need(state, "blocks.0.ffn.fc1.weight", source, what)
    args: dict[str, Any] = dict(
        vocab_size=_need(state, "head.weight", source, what).shape[0], c_vae=word_embed.shape[1],
        num_classes=class_emb.shape[0] - 1, depth=depth, embed_dim=embed_dim, mlp_ratio=fc1.shape[0] / embed_dim,
        attn_l2_norm=scale_mul is not None, shared_aln="blocks.0.ada_gss" in state,
        drop_path_rate=0.1 * depth / 24, cond_drop_rate=0.1,
    )
    shipped = shipped or {}
    if scale_mul is not None:
        args["num_heads"] = scale_mul.shape[1]
    elif "num_heads" not in overrides:  # without attn_l2_norm no tensor has a per-head shape
        args["num_heads"] = shipped["num_heads"] if "num_heads" in shipped else assume(
            source, "num_heads", depth, "without attn_l2_norm the weights do not tell the heads; the official rule "
            "heads = depth")
    if "patch_nums" not in overrides:
        if "lvl_1L" in state:
            args["patch_nums"] = _patch_nums_from_levels(state["lvl_1L"], source)
        elif "patch_nums" in shipped:
            args["patch_nums"] = shipped["patch_nums"]
        else:
            length = _need(state, "pos_1LC", source, what).shape[1]
            scales = _need(state, "lvl_embed.weight", source, what).shape[0]
            if (length, scales) != (sum(p * p for p in OFFICIAL_PATCH_NUMS), len(OFFICIAL_PATCH_NUMS)):
                raise CheckpointError(f"{source}: {length} tokens in {scales} scales is not the official schedule "
                                      f"and the checkpoint has no lvl_1L; pass --arg patch_nums=[...]")
            args["patch_nums"] = assume(source, "patch_nums", OFFICIAL_PATCH_NUMS, f"no lvl_1L buffer; the official "
                                        f"schedule has these {length} tokens in {scales} scales")
    args.update(overrides)
    return args


def convert_var_state_dict(state: dict[str, torch.Tensor], source: str = "state dict",
                           shipped: dict[str, Any] | None = None, **overrides: Any
                           ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(VAR constructor arguments, vitkit state dict) for an official VAR state dict (``shipped``: see
    :func:`infer_var_args`)."""
    state = strip_prefix(dict(state), "module.")
    args = infer_var_args(state, source, shipped, **overrides)
    lvl_1L, mask = level_layout(tuple(args["patch_nums"]))
    for key, expected in (("lvl_1L", lvl_1L), ("attn_bias_for_masking", mask)):
        theirs = state.pop(key, None)
        if theirs is not None and (theirs.shape != expected.shape or not torch.equal(theirs.to(expected.dtype),
                                                                                       expected)):
            raise CheckpointError(f"{source}: buffer {key!r} differs from the one patch_nums "
                                  f"{list(args['patch_nums'])} gives")
    for i in range(args["depth"]):
        zero = state.pop(f"blocks.{i}.attn.zero_k_bias", None)
        if zero is not None and bool(zero.any()):
            raise CheckpointError(f"{source}: 'blocks.{i}.attn.zero_k_bias' is not zero; VAR has no key bias")
    out = {key: state.pop(key) for key in list(state)}  # every other official name is vitkit's
    return args, out


def load_var(src: str | os.PathLike, **overrides: Any) -> VAR:
    """Build a vitkit VAR from an official VAR checkpoint (.pth / .safetensors); ``num_heads`` / ``patch_nums``
    the weights do not tell are read from a ``config.json`` beside them when there is one."""
    state = read_state_dict(src)
    args, converted = convert_var_state_dict(state, str(src), official_config(src, ("num_heads", "patch_nums")),
                                             **overrides)
    model = load_converted(VAR, args, overrides, lambda _: converted, str(src))
    depth = args["depth"]
    official = (args["embed_dim"], args["num_heads"], args["num_classes"]) == (64 * depth, depth, 1000)
    model.model_name = f"var_d{depth}" if official and depth in (16, 20, 24, 30) else "var"
    return model


def convert_var(src: str | os.PathLike, dst: str | os.PathLike, **overrides: Any) -> VAR:
    """Convert an official VAR transformer checkpoint file into a vitkit checkpoint folder ``dst``."""
    return save_converted(load_var(src, **overrides), src, dst)


__all__ = ["convert_var", "convert_var_state_dict", "convert_var_vqvae", "convert_vqvae_state_dict",
           "infer_var_args", "infer_vqvae_args", "load_var", "load_var_vqvae"]


# ``vitkit convert var``
ARGS: tuple[ConvertArg, ...] = (
    ConvertArg("num_heads", "attention heads: read off scale_mul_1H11 (attn_l2_norm); without it num_heads in a "
               "config.json beside the weights, else the official rule heads = depth", None, "weights", matters=True),
    ConvertArg("patch_nums", "side of each scale's token map: read off the lvl_1L buffer; without it patch_nums in a "
               "config.json beside the weights, else the official 1..16 when the lengths fit",
               list(OFFICIAL_PATCH_NUMS), "weights", matters=True),
    ConvertArg("vocab_size", "codebook size (the head)", None, "weights"),
    ConvertArg("c_vae", "code width (word_embed)", None, "weights"),
    ConvertArg("num_classes", "classes (class_emb rows - 1)", None, "weights"),
    ConvertArg("depth", "blocks", None, "weights"),
    ConvertArg("embed_dim", "width", None, "weights"),
    ConvertArg("mlp_ratio", "FFN width / embed_dim", None, "weights"),
    ConvertArg("attn_l2_norm", "L2-normalised q/k with a learned scale (scale_mul_1H11 present)", None, "weights"),
    ConvertArg("shared_aln", "one AdaLN shared by every block (ada_gss present)", None, "weights"),
    ConvertArg("norm_eps", "LayerNorm eps (the official build_vae_var's)", 1e-6),
    ConvertArg("cond_drop_rate", "class-label dropout for classifier-free guidance, in training only", 0.1),
    ConvertArg("drop_path_rate", "stochastic depth, in training only (build_vae_var: 0.1 * depth / 24)", None),
    ConvertArg("drop_rate", "dropout, in training only", 0.0),
    ConvertArg("attn_drop_rate", "attention dropout, in training only", 0.0),
)

# ``vitkit convert var-vqvae``
VQVAE_ARGS: tuple[ConvertArg, ...] = (
    ConvertArg("using_znorm", "code lookup: false = nearest by Euclidean distance, true = by cosine "
               "(using_znorm in a config.json beside the weights is read)", False, matters=True),
    ConvertArg("patch_nums", "side of each scale's token map (v_patch_nums in a config.json beside the weights is "
               "read); the official 1..16 when the checkpoint has 10 scales, else required", list(OFFICIAL_PATCH_NUMS),
               matters=True),
    ConvertArg("quant_resi", "share of the φ convolution in each code's residual (quant_resi in a config.json "
               "beside the weights is read); 0 when the checkpoint has no φ weights", 0.5, matters=True),
    ConvertArg("beta", "commitment loss weight, in training only", 0.25),
    ConvertArg("dropout", "dropout, in training only", 0.0),
    ConvertArg("vocab_size", "codebook size", None, "weights"),
    ConvertArg("z_channels", "code width", None, "weights"),
    ConvertArg("ch", "base width (encoder.conv_in)", None, "weights"),
    ConvertArg("ch_mult", "width of each level / ch", None, "weights"),
    ConvertArg("num_res_blocks", "residual blocks per level", None, "weights"),
    ConvertArg("in_channels", "image channels", None, "weights"),
    ConvertArg("using_sa", "attention in the lowest-resolution level", None, "weights"),
    ConvertArg("using_mid_sa", "attention in the middle block", None, "weights"),
    ConvertArg("quant_conv_ks", "kernel of quant_conv / post_quant_conv", None, "weights"),
    ConvertArg("share_quant_resi", "φ sharing: K partially shared, 1 shared, 0 one per scale", None, "weights"),
    ConvertArg("default_qresi_counts", "φ count when there is one per scale", None, "weights"),
)
