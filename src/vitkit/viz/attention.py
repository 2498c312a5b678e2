"""Attention pictures: attention rollout (tensor maths on recorded attention maps) and heat-map overlays.

Which model and which tokens to explain, and the ``vitkit explain`` command, are in :mod:`vitkit.tools.explain`
(they load checkpoints and know the model classes, which this low layer must not import).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import ConfigError, InputShapeError
from .plots import _save

HEAD_FUSIONS = ("mean", "max", "min")


# ---------------------------------------------------------------------------- rollout
def attention_rollout(maps: Sequence[torch.Tensor], num_prefix_tokens: int, head_fusion: str = "mean",
                      discard_ratio: float = 0.0) -> torch.Tensor:
    """Joint attention (B, N, N) of the last layer's tokens on the input tokens; every row sums to 1.

    ``maps``: per layer (B, heads, N, N) probabilities, in execution order. Heads are fused (``mean``, ``max`` or
    ``min``); ``discard_ratio`` zeroes that fraction of the smallest fused weights per image to cut noise,
    never the attention *to* the ``num_prefix_tokens`` prefix (CLS) tokens, which carry much of the mass.
    Then the identity is added (the residual path) and rows renormalised, and the layers are multiplied
    first layer first: ``Ã_L ⋯ Ã_1``.
    """
    if head_fusion not in HEAD_FUSIONS:
        raise ConfigError(f"head_fusion must be one of {HEAD_FUSIONS}, got {head_fusion!r}")
    if isinstance(discard_ratio, bool) or not isinstance(discard_ratio, (int, float)) or not 0 <= discard_ratio < 1:
        raise ConfigError(f"discard_ratio must be a number in [0, 1), got {discard_ratio!r}")
    shape = _check_maps(maps, num_prefix_tokens)
    batch, n = shape[0], shape[-1]
    eye = torch.eye(n, dtype=torch.float32, device=maps[0].device)
    joint = eye.expand(batch, n, n)
    for attn in maps:
        a = _fuse_heads(attn.float(), head_fusion)
        if discard_ratio > 0:
            a = _discard_smallest(a, num_prefix_tokens, discard_ratio)
        a = a + eye
        a = a / a.sum(dim=-1, keepdim=True)
        joint = a @ joint
    return joint


def _check_maps(maps: Sequence[torch.Tensor], num_prefix_tokens: int) -> torch.Size:
    """All maps (B, heads, N, N) with the same B and N: layers of other token counts cannot be chained."""
    if not maps:
        raise InputShapeError("no attention maps given (the model recorded none)")
    first = maps[0].shape
    bad = [i for i, m in enumerate(maps)
           if m.dim() != 4 or m.shape[-1] != m.shape[-2] or m.shape[0] != first[0] or m.shape[-1] != first[-1]]
    if bad:
        shapes = ", ".join(str(tuple(maps[i].shape)) for i in bad[:3])
        raise InputShapeError(f"attention maps must all be (B, heads, N, N) with the same B and N as the first "
                              f"{tuple(first)}; layer(s) {bad} are {shapes}")
    if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int) or \
            not 0 <= num_prefix_tokens < first[-1]:
        raise ConfigError(f"num_prefix_tokens must be an integer in [0, {first[-1]}), got {num_prefix_tokens!r}")
    return first


def _fuse_heads(attn: torch.Tensor, how: str) -> torch.Tensor:
    if how == "mean":
        return attn.mean(dim=1)
    return attn.amax(dim=1) if how == "max" else attn.amin(dim=1)


def _discard_smallest(a: torch.Tensor, num_prefix_tokens: int, ratio: float) -> torch.Tensor:
    """Zero the ``ratio`` smallest weights to patch-token keys, per image (the prefix-token columns stay)."""
    patch = a[:, :, num_prefix_tokens:].reshape(a.shape[0], -1)
    k = int(patch.shape[1] * ratio)
    if k == 0:
        return a
    patch = patch.scatter(1, patch.topk(k, dim=1, largest=False).indices, 0.0)
    a = a.clone()
    a[:, :, num_prefix_tokens:] = patch.reshape(a.shape[0], a.shape[1], -1)
    return a


# ---------------------------------------------------------------------------- pictures
def _rgb_float(image: Image.Image | np.ndarray) -> np.ndarray:
    """(H, W, 3) float in [0, 1]; gray is repeated into 3 channels so the heat map shows in colour over it."""
    if isinstance(image, Image.Image):
        image = np.asarray(image if image.mode in ("L", "RGB") else image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[-1] in (1, 3, 4):
        arr = arr[..., 0] if arr.shape[-1] == 1 else arr[..., :3]
    if arr.ndim not in (2, 3):
        raise InputShapeError(f"image must be (H, W) or (H, W, C) with C in 1, 3, 4; got shape {arr.shape}")
    out = arr.astype(np.float32) / (255.0 if arr.dtype == np.uint8 else 1.0)
    out = np.clip(out, 0.0, 1.0)
    return np.repeat(out[..., None], 3, axis=-1) if out.ndim == 2 else out


def render_overlay(image: Image.Image | np.ndarray, heat: torch.Tensor | np.ndarray, alpha: float = 0.5,
                   cmap: str = "jet") -> Image.Image:
    """``heat`` (h, w, values in [0, 1], clipped) upsampled bilinearly to the image and blended over it.

    ``image``: a PIL image or a (H, W) / (H, W, C) array, uint8 (0-255) or float (0-1). Returns an RGB image:
    ``(1 - alpha) * image + alpha * cmap(heat)``.
    """
    import matplotlib

    if not 0 <= alpha <= 1:
        raise ConfigError(f"alpha must be in [0, 1], got {alpha!r}")
    try:
        colormap = matplotlib.colormaps[cmap]
    except KeyError:
        raise ConfigError(f"unknown matplotlib colormap {cmap!r}") from None
    base = _rgb_float(image)
    h = torch.as_tensor(np.asarray(heat, dtype=np.float32) if not isinstance(heat, torch.Tensor) else heat)
    if h.dim() != 2:
        raise InputShapeError(f"heat must be a (h, w) map, got shape {tuple(h.shape)}")
    up = F.interpolate(h.detach().float().cpu()[None, None], size=base.shape[:2], mode="bilinear",
                       align_corners=False)[0, 0].clamp(0, 1).numpy()
    blended = (1 - alpha) * base + alpha * colormap(up)[..., :3]
    return Image.fromarray(np.rint(blended * 255).astype(np.uint8), mode="RGB")


def display_size(size: tuple[int, int], at_least: int = 224) -> tuple[int, int]:
    """The input size times the smallest integer that makes the shorter side >= ``at_least`` (same crop)."""
    factor = max(1, math.ceil(at_least / min(size)))
    return size[0] * factor, size[1] * factor


def panel_figure(picture: np.ndarray, panels: list[tuple[str, torch.Tensor]], title: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    shown = [("input", None), *panels]
    cols = min(len(shown), 6)
    rows = math.ceil(len(shown) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.9 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (label, heat) in zip(axes.flat, shown):
        if heat is None:
            ax.imshow(picture, cmap="gray" if picture.ndim == 2 else None, vmin=0, vmax=255)
        else:
            ax.imshow(render_overlay(picture, heat))
        ax.set_title(label, fontsize=8)
    fig.suptitle(title, fontsize=9)
    _save(fig, path)
