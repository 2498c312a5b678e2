"""timm ``swin_transformer`` (v1) -> vitkit :class:`~vitkit.models.swin.SwinTransformer` (``vitkit convert timm``).

Read off the weights: patch size, input channels, width, depths, heads per stage (the relative position tables'
columns), MLP ratio, qkv bias, the window (the tables' size) and the head. timm merges patches at the start of
a stage (``layers.{i}.downsample``, i >= 1), vitkit at the end of the previous one (``stages.{i-1}.downsample``);
the original Microsoft layout (``layers.0.downsample``, ``head.weight``) is read too.

timm fixes the windows at build time for its image size: a stage whose map is not larger than the window gets a
window clamped to the map, per side, and a table of that size. vitkit clamps at run time to the map's shorter side
and reads the centre of its one full-size table, so a clamped table is placed at the centre of a zero table of
the full window (its other offsets are never read at that size). The two agree when every stage's map is square
and not larger than the window, or has both sides larger than the window and multiples of it (timm rolls before
padding, vitkit after); other image sizes are refused with the stage that differs. Per-stage window sizes
(``swin_s3_*``), per-stage widths other than doubling, and ``head_dim`` are refused too.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import torch

from ..errors import CheckpointError, ConfigError
from ..models.swin import SwinTransformer
from ._common import assume, check_consumed
from .timm import StateDict, architecture, config_arg, config_img_size, get, indices, pick, timm_activation

_BLOCK = re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\."
                    r"(weight|bias)$")
_TABLE = re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.attn\.relative_position_bias_table$")
_MERGE = re.compile(r"^layers\.(\d+)\.downsample\.(norm\.weight|norm\.bias|reduction\.weight)$")
_BUFFERS = re.compile(r"\.(relative_position_index|attn_mask)$")


def _table_window(table: torch.Tensor, key: str, source: str) -> int:
    """The square window of a (2M - 1)² x heads relative position table."""
    side = math.isqrt(table.shape[0])
    if table.ndim != 2 or side * side != table.shape[0] or side % 2 == 0:
        raise CheckpointError(f"{source}: {key} {tuple(table.shape)} is not the table of a square window "
                              f"((2M - 1)² rows); vitkit's Swin has square windows")
    return (side + 1) // 2


def timm_swin(state: StateDict, config: dict[str, Any] | None, options: dict[str, Any], source: str
              ) -> tuple[type, dict[str, Any], Callable[[dict[str, Any]], StateDict]]:
    """(SwinTransformer, constructor arguments, convert(final arguments)) of a timm Swin state dict."""
    proj = get(state, "patch_embed.proj.weight", source)
    if proj.ndim != 4 or proj.shape[-1] != proj.shape[-2]:
        raise CheckpointError(f"{source}: patch_embed.proj.weight {tuple(proj.shape)} is not a square patch kernel")
    width, in_chans, patch = proj.shape[0], proj.shape[1], proj.shape[-1]
    stages = indices(state, r"^layers\.(\d+)\.blocks\.")
    if not stages or stages != list(range(len(stages))):
        raise CheckpointError(f"{source}: expected layers.0, layers.1, ... with blocks, found stages {stages}")
    depths, heads, windows, ratios = [], [], [], set()
    for i in stages:
        blocks = indices(state, rf"^layers\.{i}\.blocks\.(\d+)\.")
        depths.append(len(blocks))
        tables = [get(state, f"layers.{i}.blocks.{j}.attn.relative_position_bias_table", source) for j in blocks]
        if len({tuple(t.shape) for t in tables}) != 1:
            raise CheckpointError(f"{source}: the blocks of layers.{i} have tables of different sizes")
        heads.append(tables[0].shape[1])
        windows.append(_table_window(tables[0], f"layers.{i}.blocks.0.attn.relative_position_bias_table", source))
        qkv = get(state, f"layers.{i}.blocks.0.attn.qkv.weight", source)
        dim = qkv.shape[1]
        if dim != width * 2**i or qkv.shape[0] != 3 * dim:
            raise CheckpointError(f"{source}: layers.{i} is {dim} wide with {qkv.shape[0]} qkv features; vitkit's Swin "
                                  f"doubles the width ({width} * 2^{i}) and has head_dim = width / heads")
        ratios.add(get(state, f"layers.{i}.blocks.0.mlp.fc1.weight", source).shape[0] / dim)
    if len(ratios) != 1:
        raise CheckpointError(f"{source}: the stages have different MLP ratios {sorted(ratios)}; vitkit uses one")
    arch = architecture(config)
    global_pool = pick(options, "global_pool", config_arg(config, "global_pool"), "avg", source,
                       "timm's Swin default")
    if global_pool != "avg":
        raise ConfigError(f"{source}: global_pool {global_pool!r} is not supported (vitkit's Swin averages: 'avg')")
    img_size = pick(options, "img_size", config_img_size(config), 224, source, "no timm config.json tells it")
    window = options.get("window_size", _config_window(config, arch, source))
    if window is None:
        window = max(windows)
        if all(max(m) <= window for m in _stage_maps(img_size, patch, len(stages))):  # no table shows the window
            window = assume(source, "window_size", window, "every stage's table may be clamped to its map")
    act = pick(options, "act", timm_activation(config_arg(config, "act_layer"), source)
               if isinstance(config_arg(config, "act_layer"), str) else ("gelu" if config else None), "gelu", source,
               "timm's Swin default, nn.GELU")
    head = next((state[k] for k in ("head.fc.weight", "head.weight") if k in state), None)
    args: dict[str, Any] = dict(
        img_size=img_size, patch_size=patch, in_chans=in_chans, embed_dim=width, depths=depths, num_heads=heads,
        window_size=window, mlp_ratio=ratios.pop(), qkv_bias="layers.0.blocks.0.attn.qkv.bias" in state, act=act,
        num_classes=head.shape[0] if head is not None else 0, drop_path_rate=0.0,
    )
    return SwinTransformer, args, lambda final: convert_timm_swin_state_dict(state, final, windows, source)


def _config_window(config: dict[str, Any] | None, arch: str | None, source: str) -> int | None:
    """The window a timm config gives (``model_args.window_size`` or ``window<N>`` in the name)."""
    window = config_arg(config, "window_size")
    if isinstance(window, list) and len(window) == 2 and window[0] == window[1]:
        window = window[0]
    if window is not None and (isinstance(window, bool) or not isinstance(window, int)):
        raise ConfigError(f"{source}: window_size {window!r}: vitkit's Swin has one square window for all stages")
    match = re.search(r"window(\d+)", arch or "")
    return window if window is not None else (int(match[1]) if match else None)


def _stage_maps(img_size: Any, patch: int, stages: int) -> list[tuple[int, int]]:
    """Each stage's map (h, w): the patch grid, halved (rounded up) at each merging."""
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    maps = [(h // patch, w // patch)]
    for _ in range(stages - 1):
        maps.append((-(-maps[-1][0] // 2), -(-maps[-1][1] // 2)))
    return maps


def check_timm_windows(args: dict[str, Any], windows: list[int], source: str) -> None:
    """Refuse an image size at which timm's windows (clamped per side, rolled before padding) and vitkit's differ,
    and tables that do not fit the window and the stage's map."""
    window, patch, img_size = args["window_size"], args["patch_size"], args["img_size"]
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    if h % patch or w % patch:
        raise CheckpointError(f"{source}: img_size {img_size} is not a multiple of the patch size {patch} (timm "
                              f"crops, vitkit pads)")
    for i, ((mh, mw), table) in enumerate(zip(_stage_maps(img_size, patch, len(windows)), windows)):
        expected = min(mh, mw, window) if max(mh, mw) <= window else window
        where = f"stage {i} (a {mh}x{mw} map, window {window})"
        if table != expected:
            raise CheckpointError(f"{source}: layers.{i}'s table is for a {table}x{table} window, {where} needs "
                                  f"{expected}x{expected} (per-stage windows, or another img_size? pass --arg "
                                  f"img_size=... / window_size=...)")
        if max(mh, mw) <= window and mh != mw:
            raise CheckpointError(f"{source}: {where}: timm clamps the window per side to {mh}x{mw}, vitkit's Swin "
                                  f"has square windows")
        if max(mh, mw) > window and (min(mh, mw) <= window or (args["depths"][i] > 1 and (mh % window or
                                                                                          mw % window))):
            raise CheckpointError(f"{source}: {where}: timm and vitkit place shifted windows differently here (the "
                                  f"map must be square and within the window, or multiples of it on both sides)")


def convert_timm_swin_state_dict(state: StateDict, args: dict[str, Any], windows: list[int],
                                 source: str = "state dict") -> StateDict:
    """timm Swin weights in vitkit's layout (clamped tables centred in full-window tables); ``args`` are the final
    constructor arguments, ``windows`` the tables' windows per stage."""
    check_timm_windows(args, windows, source)
    state = {k: v for k, v in state.items() if not _BUFFERS.search(k)}
    full = 2 * args["window_size"] - 1
    merge_offset = 0 if "layers.0.downsample.reduction.weight" in state else 1  # Microsoft's layout: at the end
    out: StateDict = {}
    for key in list(state):
        if m := _BLOCK.match(key):
            out[f"stages.{m[1]}.blocks.{m[2]}.{m[3]}.{m[4]}"] = state.pop(key)
        elif m := _TABLE.match(key):
            table = state.pop(key)
            side = 2 * windows[int(m[1])] - 1
            if side != full:
                big = torch.zeros(full, full, table.shape[1], dtype=table.dtype)
                start = (full - side) // 2
                big[start:start + side, start:start + side] = table.reshape(side, side, -1)
                table = big.reshape(full * full, -1)
            out[f"stages.{m[1]}.blocks.{m[2]}.attn.relative_position_bias_table"] = table
        elif m := _MERGE.match(key):
            stage = int(m[1]) - merge_offset
            if not 0 <= stage < len(windows) - 1:
                raise CheckpointError(f"{source}: {key}: no stage of vitkit's Swin merges there")
            out[f"stages.{stage}.downsample.{m[2]}"] = state.pop(key)
    renames = {"patch_embed.proj.": "patch_embed.", "patch_embed.norm.": "patch_norm.", "norm.": "norm.",
               "head.fc.": "head.", "head.": "head."}
    for key in list(state):
        for theirs, ours in renames.items():
            if key.startswith(theirs) and key[len(theirs):] in ("weight", "bias"):
                out[ours + key[len(theirs):]] = state.pop(key)
                break
    check_consumed(state, source)
    return out
