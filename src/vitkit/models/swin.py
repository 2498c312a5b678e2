"""Swin Transformer (Liu et al., 2021): a hierarchical ViT whose attention stays inside (shifted) windows.

image -> 4×4 patches (Conv2d) -> LayerNorm -> [stage: blocks alternating regular / shifted M×M windows ->
patch merging (2×2 -> one token of twice the width)] × 4 -> LayerNorm -> global average pool -> head.

Attention inside M×M windows costs O(N·M²) instead of O(N²), so the cost is linear in the number of tokens
(Liu et al., 2021, Sec. 3.2); the shifted windows of every other block let information cross window borders,
and merging builds the pyramid of feature maps (strides 4, 8, 16, 32) that dense tasks need.

Layout choices (the references': Microsoft's code and Hugging Face ``SwinModel``, whose weights load through
``vitkit convert hf-swin``):

* patch merging closes a stage (``stages.i.downsample``), the last stage has none;
* images whose sides are not multiples of the patch size are zero-padded at the bottom/right, and so are maps
  whose sides are not multiples of the window (inside each block) or odd (before merging), as both references
  do; any image size is accepted (a model built with ``ape=True`` needs the size it was built for);
* ``norm_eps`` is the eps of the blocks' and the final LayerNorms; those after the patch embedding and in patch
  merging keep PyTorch's default 1e-5, as in both references;
* a stage whose map is not larger than the window runs one unshifted window over the whole map (the window
  shrinks to the map at run time, reading the central offsets of the bias table).

``shift_windows=False`` is the paper's shifted-window ablation (Liu et al., 2021, Sec. 4.4): every block uses the
same window grid, so no information crosses a window border before the next merging.

Window pruning (SparseViT): ``window_keep_ratios`` (per stage, changeable at run time with
:meth:`SwinTransformer.set_keep_ratios`) runs each stage's blocks on its most important windows only (L2 norm of
the window's activations), the others pass through; ``keep_ratio_choices`` trains with a ratio drawn per stage
and step (sparsity-aware adaptation). The latency-constrained search is :mod:`vitkit.tools.search`.

Sparse token sets: ``sparse_stages`` swaps the window blocks of those stages for
:class:`~vitkit.layers.sparse_window.SparseWindowBlock` (equal-size groups of ``group_size`` tokens, sort axis and
half-window shift alternating as in FlatFormer). ``forward(x, keep=mask)`` then runs those stages on the kept
tokens only; the others pass through them unchanged (``keep`` is (B, h, w) bool on the patch grid, and a merged
token is kept when any of its four children is). Sparse blocks have no relative position bias, so a dense
Swin's stage loads into a sparse one without its tables
(:func:`~vitkit.layers.sparse_window.swin_to_sparse_state_dict`). ``sparse_grouping="window"`` pads every window
to M² instead of cutting equal-size groups (the baseline FlatFormer's grouping replaces), and
``token_keep_ratio`` < 1 makes the mask itself when none is given: each image keeps that share of its patches
with the most content (:meth:`SwinTransformer.content_keep`), so the model trains and predicts on sparse inputs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from ..data.constants import FMNIST_CLASSES, FMNIST_MEAN, FMNIST_STD, IMAGENET_MEAN, IMAGENET_STD
from ..errors import InputShapeError
from ..layers.patch_embed import check_image_batch
from ..layers.sparse_window import SparseWindowBlock, alternating_schedule
from ..layers.weight_init import trunc_normal_linears_
from ..layers.window_attention import PatchMerging, SwinBlock, window_partition, window_reverse
from ..utils import to_2tuple
from ._base import VitkitModel, check_model_args, select_blocks
from ._registry import register_config


class SwinStage(nn.Module):
    """``depth`` blocks at one resolution, then (except in the last stage) patch merging.

    Dense stages alternate unshifted and M/2-shifted windows; sparse stages alternate the sort axis and shift
    of their groups (:func:`~vitkit.layers.sparse_window.alternating_schedule`).
    """

    def __init__(self, dim: int, depth: int, num_heads: int, window_size: int, mlp_ratio: float, qkv_bias: bool,
                 qk_scale: float | None, drop: float, attn_drop: float, drop_path: list[float], norm_eps: float,
                 act: str, downsample: bool, sparse: bool = False, group_size: int | None = None,
                 shift_windows: bool = True, grouping: str = "equal") -> None:
        super().__init__()
        self.sparse = sparse
        common = dict(mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale, proj_drop=drop,
                      attn_drop=attn_drop, norm_eps=norm_eps, act=act)
        if sparse:
            self.blocks = nn.ModuleList([
                SparseWindowBlock(dim, num_heads, group_size or window_size**2, window_size, sort_axis=axis,
                                  shift=shift, grouping=grouping, drop_path=drop_path[i], **common)
                for i, (axis, shift) in enumerate(alternating_schedule(depth))])
        else:
            self.blocks = nn.ModuleList([
                SwinBlock(dim, num_heads, window_size, window_size // 2 if shift_windows and i % 2 else 0,
                          drop_path=drop_path[i], **common)
                for i in range(depth)])
        self.downsample = PatchMerging(dim) if downsample else None
        self.grad_checkpointing = False
        self.window_size = window_size
        self.window_keep_ratio = 1.0  # SparseViT window pruning (see run_pruned); a run-time setting

    def _call(self, block: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False, **kwargs)
        return block(*args, **kwargs)

    def run_blocks(self, x: torch.Tensor, keep: torch.Tensor | None = None, keep_ratio: float | None = None
                   ) -> torch.Tensor:
        """(B, H, W, C) -> same, before merging. A sparse stage computes the ``keep`` tokens only (all if None)."""
        ratio = self.window_keep_ratio if keep_ratio is None else keep_ratio
        if not self.sparse and ratio < 1.0:
            return self.run_pruned(x, ratio)[0]
        if not self.sparse:
            for blk in self.blocks:
                x = self._call(blk, x)
            return x
        B, H, W, _ = x.shape
        if keep is None:
            keep = torch.ones(B, H, W, dtype=torch.bool, device=x.device)
        b, r, c = keep.nonzero(as_tuple=True)
        coords = torch.stack([b, r, c], dim=1)
        tokens = x[b, r, c]
        layouts: dict[tuple[str, bool], Any] = {}  # at most four (axis, shift) layouts per stage, built once
        for blk in self.blocks:
            key = (blk.sort_axis, blk.shift)
            if key not in layouts:
                layouts[key] = blk.layout(coords, B)
            tokens = self._call(blk, tokens, layout=layouts[key])
        return x.index_put((b, r, c), tokens)

    def run_pruned(self, x: torch.Tensor, keep_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
        """SparseViT window pruning: run the blocks on the ``keep_ratio`` most important M×M windows only.

        Importance is the L2 norm of a window's input activations; each image keeps its top
        ``max(1, round(keep_ratio · windows))``. Kept windows are gathered into a batch of M×M maps, every block
        runs on them (one map = one window, so shifted blocks run unshifted inside a pruned stage: the shift would
        need neighbours that may be pruned), and the results are scattered back; pruned windows pass through
        unchanged. A map whose sides are not multiples of M is zero-padded before the blocks (the dense path pads
        after each block's norm1), so pruning at ratio < 1 is exact only for whole windows. Returns the map and the
        kept window indices (B, k), row-major over the window grid.
        """
        B, H, W, C = x.shape
        m = min(self.window_size, H, W)
        pad_b, pad_r = (-H) % m, (-W) % m
        xp = F.pad(x, (0, 0, 0, pad_r, 0, pad_b)) if pad_b or pad_r else x
        Hp, Wp = H + pad_b, W + pad_r
        windows = window_partition(xp, m).reshape(B, -1, m * m, C)
        k = max(1, round(keep_ratio * windows.shape[1]))
        kept_idx = windows.float().square().sum(dim=(2, 3)).topk(k, dim=1).indices  # (B, k)
        gather = kept_idx[:, :, None, None].expand(-1, -1, m * m, C)
        kept = windows.gather(1, gather).reshape(B * k, m, m, C)
        for blk in self.blocks:
            kept = self._call(blk, kept)
        windows = windows.scatter(1, gather, kept.reshape(B, k, m * m, C))
        out = window_reverse(windows.reshape(-1, m * m, C), m, Hp, Wp)
        return (out[:, :H, :W] if pad_b or pad_r else out), kept_idx

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        x = self.run_blocks(x, keep)
        return self.downsample(x) if self.downsample is not None else x


class SwinTransformer(VitkitModel):
    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 96,
        depths: tuple[int, ...] = (2, 2, 6, 2),
        num_heads: tuple[int, ...] = (3, 6, 12, 24),
        window_size: int = 7,
        shift_windows: bool = True,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        ape: bool = False,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        norm_eps: float = 1e-5,
        act: str = "gelu",
        sparse_stages: tuple[int, ...] = (),
        group_size: int | None = None,
        window_keep_ratios: tuple[float, ...] | None = None,
        keep_ratio_choices: tuple[float, ...] | None = None,
        sparse_grouping: str = "equal",
        token_keep_ratio: float = 1.0,
    ) -> None:
        super().__init__()
        check_model_args(num_classes, dict(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                           embed_dim=embed_dim, window_size=window_size, mlp_ratio=mlp_ratio),
                         dict(drop_rate=drop_rate, attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate))
        depths, num_heads = list(depths), list(num_heads)
        if not depths or len(depths) != len(num_heads) or min(depths) < 1 or min(num_heads) < 1:
            raise ValueError(f"depths {depths} and num_heads {num_heads} must be lists of positive ints, one per "
                             f"stage")
        dims = [embed_dim * 2**i for i in range(len(depths))]
        bad = [f"stage {i}: width {d} vs {h} heads" for i, (d, h) in enumerate(zip(dims, num_heads)) if d % h]
        if bad:
            raise ValueError("every stage's width must be divisible by its heads: " + ", ".join(bad))
        sparse_stages = sorted(set(sparse_stages))
        if any(isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < len(depths) for s in sparse_stages):
            raise ValueError(f"sparse_stages {sparse_stages} must index the {len(depths)} stages")
        if group_size is not None and group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        if not 0 < token_keep_ratio <= 1:
            raise ValueError(f"token_keep_ratio must be in (0, 1], got {token_keep_ratio}")
        if token_keep_ratio < 1 and not sparse_stages:
            raise ValueError("token_keep_ratio < 1 computes only the kept tokens, which needs sparse_stages=[...]")
        for what, ratios in (("window_keep_ratios", window_keep_ratios), ("keep_ratio_choices", keep_ratio_choices)):
            if ratios is not None and (not ratios or any(not 0 < float(r) <= 1 for r in ratios)):
                raise ValueError(f"{what} must hold keep ratios in (0, 1], got {ratios}")
        if window_keep_ratios is not None and len(window_keep_ratios) != len(depths):
            raise ValueError(f"window_keep_ratios needs one ratio per stage ({len(depths)}), got {window_keep_ratios}")
        self.keep_ratio_choices = tuple(float(r) for r in keep_ratio_choices) if keep_ratio_choices else None
        self.img_size = to_2tuple(img_size)
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.window_size = window_size
        self.num_stages = len(depths)
        self.num_features = dims[-1]
        self.sparse_stages = tuple(sparse_stages)
        self.token_keep_ratio = float(token_keep_ratio)
        self.grid = tuple(-(-s // patch_size) for s in self.img_size)
        self.grad_checkpointing = False

        self.patch_embed = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.patch_norm = nn.LayerNorm(embed_dim, eps=1e-5)  # both references fix 1e-5 here and in merging
        self.absolute_pos_embed = nn.Parameter(torch.zeros(1, *self.grid, embed_dim)) if ape else None
        self.pos_drop = nn.Dropout(drop_rate)
        n = sum(depths)
        dpr = [drop_path_rate * i / max(n - 1, 1) for i in range(n)]  # (plain floats: models are built on meta too)
        self.stages = nn.ModuleList([
            SwinStage(dims[i], depths[i], num_heads[i], window_size, mlp_ratio, qkv_bias, qk_scale, drop_rate,
                      attn_drop_rate, dpr[sum(depths[:i]):sum(depths[:i + 1])], norm_eps, act,
                      downsample=i < len(depths) - 1, sparse=i in sparse_stages, group_size=group_size,
                      shift_windows=shift_windows, grouping=sparse_grouping)
            for i in range(len(depths))])
        if window_keep_ratios is not None:
            self.set_keep_ratios(window_keep_ratios)
        self.norm = nn.LayerNorm(self.num_features, eps=norm_eps)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if in_chans == 3 else ((0.5,) * in_chans, (0.5,) * in_chans)
        self.pretrained_cfg = {"input_size": (in_chans, *self.img_size), "mean": mean, "std": std,
                               "interpolation": "bicubic"}

    def _init_weights(self) -> None:
        """Truncated-normal (std 0.02) Linears, bias tables and absolute positions; zero biases (as the paper)."""
        if self.absolute_pos_embed is not None:
            nn.init.trunc_normal_(self.absolute_pos_embed, std=0.02)
        trunc_normal_linears_(self)

    # ------------------------------------------------------------------ forward
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images -> (B, h, w, embed_dim) normalised patch embeddings (plus absolute positions)."""
        check_image_batch(x, self.in_chans, (1, 1), None, type(self).__name__)
        H, W = x.shape[-2:]
        weight = self.patch_embed.weight
        x = x.to(weight.dtype) if x.dtype != weight.dtype else x
        p = self.patch_size
        if H % p or W % p:  # the references pad the image at the bottom/right to whole patches
            x = F.pad(x, (0, (-W) % p, 0, (-H) % p))
        x = self.patch_norm(self.patch_embed(x).permute(0, 2, 3, 1))
        if self.absolute_pos_embed is not None:
            if x.shape[1:3] != self.absolute_pos_embed.shape[1:3]:
                raise InputShapeError(f"{type(self).__name__} with absolute positions (ape=True) was built for "
                                      f"{self.img_size[0]}x{self.img_size[1]} images, got {H}x{W}")
            x = x + self.absolute_pos_embed.to(x.dtype)
        return self.pos_drop(x)

    def content_keep(self, images: torch.Tensor) -> torch.Tensor:
        """(B, h, w) bool: each image's ``token_keep_ratio`` share of patches (at least one) with the most content.

        A patch's score is the energy of its pixels around the image's median pixel: on a scene's empty canvas
        (mostly one background value) the background scores 0 and the items are kept, the role an empty voxel
        plays for FlatFormer. It reads the input only, so the mask is the same in training and inference."""
        B = images.shape[0]
        p = self.patch_size
        x = images.float()
        x = (x - x.flatten(1).median(dim=1).values.view(B, 1, 1, 1)).square().sum(1, keepdim=True)
        H, W = x.shape[-2:]
        x = F.pad(x, (0, (-W) % p, 0, (-H) % p))
        score = F.avg_pool2d(x, p)[:, 0]  # (B, h, w)
        h, w = score.shape[1:]
        k = max(1, round(self.token_keep_ratio * h * w))
        idx = score.flatten(1).topk(k, dim=1).indices
        return torch.zeros(B, h * w, dtype=torch.bool, device=images.device).scatter_(1, idx, True).view(B, h, w)

    def _stage_keeps(self, keep: torch.Tensor | None, x: torch.Tensor) -> list[torch.Tensor | None]:
        """One keep mask per stage from a patch-grid mask: a merged token is kept if any of its children is."""
        if keep is None:
            return [None] * self.num_stages
        if not self.sparse_stages:
            raise ValueError(f"keep= needs sparse stages: build {type(self).__name__} with sparse_stages=[...]")
        B, h, w, _ = x.shape
        if keep.dtype != torch.bool or tuple(keep.shape) != (B, h, w):
            raise InputShapeError(f"keep must be a bool mask of shape (B, h, w) = {(B, h, w)} on the patch grid, "
                                  f"got {keep.dtype} {tuple(keep.shape)}")
        keeps, k = [], keep
        for _ in range(self.num_stages):
            keeps.append(k)
            k = F.max_pool2d(k[:, None].float(), 2, ceil_mode=True)[:, 0].bool()
        return keeps

    # ------------------------------------------------------------------ SparseViT window pruning
    @property
    def keep_ratios(self) -> tuple[float, ...]:
        """The window keep ratio of every stage (1.0 = dense)."""
        return tuple(stage.window_keep_ratio for stage in self.stages)

    def set_keep_ratios(self, ratios: tuple[float, ...] | list[float]) -> None:
        """Per-stage window keep ratios (SparseViT), changeable at any time without rebuilding the model."""
        if len(ratios) != self.num_stages or any(not 0 < float(r) <= 1 for r in ratios):
            raise ValueError(f"need {self.num_stages} keep ratios in (0, 1], got {list(ratios)}")
        if any(float(r) < 1 for r, s in zip(ratios, self.stages) if s.sparse):
            raise ValueError("window pruning applies to window-attention stages, not to sparse_stages")
        for stage, r in zip(self.stages, ratios):
            stage.window_keep_ratio = float(r)

    def _step_ratios(self) -> list[float | None]:
        """Sparsity-aware adaptation: while training with ``keep_ratio_choices``, every forward draws each
        dense stage's ratio from the choices (torch's RNG, so seeded runs repeat), so one set of weights learns to
        serve every ratio; otherwise the stages' own ratios."""
        if not (self.training and self.keep_ratio_choices):
            return [None] * self.num_stages
        draws = torch.randint(len(self.keep_ratio_choices), (self.num_stages,)).tolist()
        return [None if s.sparse else self.keep_ratio_choices[d] for s, d in zip(self.stages, draws)]

    def _run_stages(self, x: torch.Tensor, keep: torch.Tensor | None, take: set[int] | frozenset[int] = frozenset(),
                    stop_after: int | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        keeps = self._stage_keeps(keep, x)
        ratios = self._step_ratios()
        collected = []
        for i, stage in enumerate(self.stages):
            x = stage.run_blocks(x, keeps[i], ratios[i])
            if i in take:
                collected.append(x)
            if stop_after is not None and i >= stop_after:
                break
            if stage.downsample is not None:
                x = stage.downsample(x)
        return x, collected

    def _auto_keep(self, images: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor | None:
        return self.content_keep(images) if keep is None and self.token_keep_ratio < 1 else keep

    def forward_features(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, H, W) images -> (B, h·w, C) normalised tokens of the last stage (HF's ``last_hidden_state``)."""
        x, _ = self._run_stages(self.embed(x), self._auto_keep(x, keep))
        return self.norm(x.flatten(1, 2))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens (B, N, C) or a map (B, h, w, C) -> average-pooled features or logits."""
        x = self.head_drop(x.flatten(1, -2).mean(dim=1))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, keep))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | tuple[int, ...] | None = None,
        norm: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        keep: torch.Tensor | None = None,
    ):
        """Per-*stage* feature maps (strides 4, 8, 16, 32 for patch 4), taken before merging, for dense tasks.

        ``indices`` selects stages as ``TokenClassifier.forward_intermediates`` selects blocks. ``norm`` applies
        the final norm to the last stage's map (the only one it was trained for). Returns the list, or
        ``(final normalised tokens, list)`` unless ``intermediates_only``.
        """
        take = select_blocks(indices, self.num_stages, f"{type(self).__name__} (stages)")
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        x, collected = self._run_stages(self.embed(x), self._auto_keep(x, keep), set(take),
                                        max(take) if intermediates_only else None)
        outputs = []
        for i, fmap in zip(take, collected):
            if norm and i == self.num_stages - 1:
                fmap = self.norm(fmap)
            outputs.append(fmap.permute(0, 3, 1, 2) if output_fmt == "NCHW" else fmap)
        return outputs if intermediates_only else (self.norm(x.flatten(1, 2)), outputs)

    # ------------------------------------------------------------------ heads, training switches
    def reset_classifier(self, num_classes: int, class_names: list[str] | None = None) -> None:
        """Replace the head (e.g. for fine-tuning on another label set)."""
        self.head = self.new_head(num_classes, class_names)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in backward: less memory, about a third more compute."""
        self.grad_checkpointing = enable
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        names = {n for n, _ in self.named_parameters() if "relative_position_bias_table" in n}
        return names | ({"absolute_pos_embed"} if self.absolute_pos_embed is not None else set())

    @property
    def num_lr_layers(self) -> int:
        return sum(len(s.blocks) for s in self.stages) + 2

    def lr_layer_id(self, name: str) -> int:
        """0: patch embedding; block j (counted over all stages): j + 1; a stage's merging: its last block's id;
        final norm and head: the top."""
        if name.startswith(("patch_embed.", "patch_norm.", "absolute_pos_embed")):
            return 0
        if name.startswith("stages."):
            parts = name.split(".")
            stage = int(parts[1])
            before = sum(len(s.blocks) for s in self.stages[:stage])
            if parts[2] == "blocks":
                return before + int(parts[3]) + 1
            return before + len(self.stages[stage].blocks)
        return self.num_lr_layers - 1


# ---------------------------------------------------------------------- registered configurations
# name: (embed_dim, depths, num_heads, window, img_size), from the paper (Table 1) and the official configs.
SWIN_SIZES = {
    "swin_tiny_patch4_window7_224": (96, (2, 2, 6, 2), (3, 6, 12, 24), 7, 224),
    "swin_small_patch4_window7_224": (96, (2, 2, 18, 2), (3, 6, 12, 24), 7, 224),
    "swin_base_patch4_window7_224": (128, (2, 2, 18, 2), (4, 8, 16, 32), 7, 224),
    "swin_base_patch4_window12_384": (128, (2, 2, 18, 2), (4, 8, 16, 32), 12, 384),
}
_DROP_PATH = {"tiny": 0.2, "small": 0.3, "base": 0.5}  # the paper's ImageNet-1k stochastic depth
for _name, (_dim, _depths, _heads, _window, _size) in SWIN_SIZES.items():
    register_config(_name, SwinTransformer, {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}, img_size=_size,
                    patch_size=4, embed_dim=_dim, depths=_depths, num_heads=_heads, window_size=_window,
                    drop_path_rate=_DROP_PATH[_name.split("_")[1]])

# Fashion-MNIST (28×28, 1 channel): patch 2 and window 7 keep Swin-T's structure at this size: a 14×14 first map
# of 2×2 windows (so shifted windows matter), merged to 7×7 (one window: the last stage attends globally, as
# Swin-T's 7×7 last stage does at 224), then 4×4 (7 padded to 8 before merging). No padding of the image and no
# padded window on the first two stages. swin_fmnist_tiny (0.40M) is sized near vit_fmnist_tiny (0.46M).
_FMNIST_CFG = {"mean": FMNIST_MEAN, "std": FMNIST_STD, "class_names": FMNIST_CLASSES}
register_config("swin_fmnist_tiny", SwinTransformer, _FMNIST_CFG, img_size=28, in_chans=1, num_classes=10,
                patch_size=2, window_size=7, embed_dim=32, depths=(2, 2, 2), num_heads=(2, 4, 8), mlp_ratio=2.0,
                drop_path_rate=0.1)

# Fashion-MNIST scenes (112×112 canvas, 1 channel, multi-label; see data/scenes.py): patch 4 and window 7 as Swin-T,
# so the maps are 28×28 (16 windows: what SparseViT prunes), 14×14 (4 windows), 7×7 (one window).
register_config("swin_scenes_tiny", SwinTransformer, _FMNIST_CFG, img_size=112, in_chans=1, num_classes=10,
                patch_size=4, window_size=7, embed_dim=32, depths=(2, 2, 2), num_heads=(2, 4, 8), mlp_ratio=2.0,
                drop_path_rate=0.1)
