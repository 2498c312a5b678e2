"""Sparse window attention with equal-size groups (FlatFormer-style), for a variable set of kept tokens.

Batch format (packed, as FlatFormer does):

* ``x``: (N_total, C), the kept tokens of every image of the batch, concatenated in any order;
* ``coords``: (N_total, 3) integer, ``(batch index, row, col)`` of each token on its image's token grid.

Images may keep different numbers of tokens (none at all is fine); a (batch, row, col) must not appear twice.
Packed tokens waste nothing on padding and make "which tokens does this image keep" a plain index; use
:func:`pack_padded` / :func:`unpack_padded` to convert from / to a padded (B, N_max, C) tensor with a valid mask.

How attention is computed (:func:`build_groups`, then :class:`SparseWindowAttention`):

1. Every token gets the key (batch, window row, window col, row inside the window, col inside the window) for
   windows of ``window_size`` M; ``sort_axis="col"`` swaps the roles of rows and columns (column-major windows
   and column-major order inside them), ``shift=True`` moves the window grid by M // 2 along both axes. The shift
   is *not* cyclic (Swin rolls the map and masks the wrapped windows): the border windows are simply smaller,
   which changes nothing here because groups cross window borders anyway.
2. Tokens are sorted by that key, and each image's sorted run is cut into groups of exactly ``group_size`` G.
   The last group of an image is filled up by repeating that group's own tokens; the repeats are masked out of
   the keys (so they change no output and receive no gradient) and their query outputs are dropped.
3. Attention runs inside every group as ONE batched ``F.scaled_dot_product_attention`` call over
   (num_groups, heads, G, head_dim) (through :meth:`AttentionMapSource._attend`, so :func:`capture_attention`
   works: it records (num_groups, heads, G, G) maps, one row of groups per :class:`GroupLayout`).
4. Outputs return to the input order with one gather (the inverse of the sort).

With every token of an image kept, image sides multiples of M, G = M², unshifted, the groups are exactly the
(non-shifted) windows and the result equals plain window attention. In general a group is a run of G
neighbours in window order: it may span two windows and, at 50% kept tokens, covers about two windows' area.

``grouping="window"`` is the baseline equal-size grouping replaces (FlatFormer's "equal-window" grouping): every
non-empty window is one group, padded to M² with masked repeats of its own tokens, so a window with few kept
tokens costs as much as a full one. It needs G = M² and gives the same output as plain window attention on the
kept tokens.

Relative position bias: not used. Equal-size groups do not align with windows, so the offsets between the tokens
of a group are not bounded by the window (FlatFormer drops the bias for the same reason). A Swin block's weights
load into :class:`SparseWindowBlock` after :func:`swin_to_sparse_state_dict` removes the bias table and index:
the remaining names (``norm1``, ``attn.qkv``, ``attn.proj``, ``norm2``, ``mlp.fc1``, ``mlp.fc2``) are the same.

Sorting costs O(N log N) per layout and the layout depends only on the coordinates and (M, G, axis, shift):
a stage whose blocks alternate (row, col) x (shift, no shift) needs at most four layouts, so build them once with
:func:`build_groups` and pass ``layout=`` to every block instead of ``coords=``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .attention import AttentionMapSource
from .block import add_residual_branches

SORT_AXES = ("row", "col")
GROUPINGS = ("equal", "window")


@dataclass(frozen=True)
class GroupLayout:
    """Where every token goes: built by :func:`build_groups`, used by :class:`SparseWindowAttention`.

    ``gather_index`` (num_groups * G,): the input token in each group slot, repeats included;
    ``scatter_index`` (N_total,): for each input token, its slot in the flattened (num_groups * G) output;
    ``key_mask`` (num_groups, 1, 1, G) bool, True where a key is real, or None when no group needed filling;
    ``group_batch`` (num_groups,): the image of each group; ``order`` (N_total,): the input tokens in sorted order;
    ``token_batch`` (N_total,): the image of each input token; ``num_images``: B.
    """

    gather_index: torch.Tensor
    scatter_index: torch.Tensor
    key_mask: torch.Tensor | None
    group_batch: torch.Tensor
    order: torch.Tensor
    token_batch: torch.Tensor
    num_images: int
    group_size: int
    window_size: int
    sort_axis: str
    shift: bool
    grouping: str = "equal"

    @property
    def num_groups(self) -> int:
        return self.group_batch.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.scatter_index.shape[0]

    def groups(self) -> torch.Tensor:
        """(num_groups, G) input-token indices, repeats included."""
        return self.gather_index.view(-1, self.group_size)


def sort_key(coords: torch.Tensor, window_size: int, sort_axis: str = "row", shift: bool = False) -> torch.Tensor:
    """One int64 per token ordering by (batch, window, position inside the window); see the module docstring."""
    if sort_axis not in SORT_AXES:
        raise ValueError(f"sort_axis must be one of {SORT_AXES}, got {sort_axis!r}")
    m = int(window_size)
    s = m // 2 if shift else 0
    b, r, c = coords.long().unbind(-1)
    if coords.shape[0] == 0:
        return b
    if sort_axis == "col":
        r, c = c, r
    r, c = r + s, c + s
    n_w1 = int(r.max()) // m + 1
    n_w2 = int(c.max()) // m + 1
    window = (r // m) * n_w2 + c // m
    inner = (r % m) * m + c % m
    return (b * (n_w1 * n_w2) + window) * (m * m) + inner


def check_grouping(grouping: str, group_size: int, window_size: int) -> None:
    if grouping not in GROUPINGS:
        raise ValueError(f"grouping must be one of {GROUPINGS}, got {grouping!r}")
    if grouping == "window" and group_size != window_size**2:
        raise ValueError(f"grouping='window' pads every window to M² tokens: group_size must be {window_size**2} "
                         f"for window {window_size}, got {group_size}")


def build_groups(coords: torch.Tensor, group_size: int, window_size: int, sort_axis: str = "row",
                 shift: bool = False, num_images: int | None = None, grouping: str = "equal") -> GroupLayout:
    """Sort the tokens by window order and cut every image's tokens into groups of exactly ``group_size``
    (``grouping="window"``: one group per non-empty window instead, padded to ``group_size`` = M²).

    ``coords``: (N_total, 3) integer (batch, row, col), non-negative, unique. ``num_images`` defaults to the
    largest batch index + 1 (images without tokens are allowed, they get no group).
    """
    check_grouping(grouping, group_size, window_size)
    if coords.ndim != 2 or coords.shape[1] != 3:
        raise ValueError(f"coords must be (N_total, 3) = (batch, row, col), got {tuple(coords.shape)}")
    if coords.dtype.is_floating_point or coords.dtype == torch.bool:
        raise TypeError(f"coords must be an integer tensor, got {coords.dtype}")
    if group_size < 1 or window_size < 1:
        raise ValueError(f"group_size and window_size must be >= 1, got {group_size}, {window_size}")
    coords = coords.long()
    device, g = coords.device, int(group_size)
    n_tok = coords.shape[0]
    if n_tok and bool((coords < 0).any()):
        raise ValueError("coords must be non-negative")
    key = sort_key(coords, window_size, sort_axis, shift)
    key_sorted, order = torch.sort(key, stable=True)
    if n_tok > 1 and bool((key_sorted[1:] == key_sorted[:-1]).any()):
        raise ValueError("a (batch, row, col) position appears more than once in coords")
    batch = coords[:, 0]
    n_img = num_images if num_images is not None else (int(batch.max()) + 1 if n_tok else 0)
    # A segment is cut into groups of G: an image (equal-size groups) or a window of an image (padded windows).
    # Segments are numbered in sorted order, so each one is a contiguous run of the sorted tokens.
    if grouping == "equal":
        segment, seg_batch = batch, torch.arange(n_img, device=device)
    else:
        windows, segment = torch.unique(key // (window_size * window_size), return_inverse=True)
        seg_batch = torch.zeros(windows.shape[0], dtype=torch.long, device=device).scatter_(0, segment, batch)
    counts = torch.bincount(segment, minlength=seg_batch.shape[0])  # tokens per segment
    starts = counts.cumsum(0) - counts  # first sorted position of each segment
    n_groups = (counts + g - 1) // g
    group_starts = n_groups.cumsum(0) - n_groups  # first group of each segment
    group_seg = torch.repeat_interleave(torch.arange(seg_batch.shape[0], device=device), n_groups)
    local = torch.arange(group_seg.shape[0], device=device) - group_starts[group_seg]  # group index in segment
    slot = torch.arange(g, device=device)
    pos = local[:, None] * g + slot  # position inside the segment's sorted run, (num_groups, G)
    count = counts[group_seg][:, None]
    valid = pos < count
    real = (count - local[:, None] * g).clamp(max=g)  # real tokens in this group (>= 1)
    pos = torch.where(valid, pos, local[:, None] * g + slot % real)  # fill with the group's own tokens
    gather_index = order[(starts[group_seg][:, None] + pos).reshape(-1)]
    sorted_seg = segment[order]
    flat = group_starts[sorted_seg] * g + torch.arange(n_tok, device=device) - starts[sorted_seg]
    scatter_index = torch.empty_like(flat)
    scatter_index[order] = flat
    key_mask = None if bool(valid.all()) else valid[:, None, None, :]
    return GroupLayout(gather_index, scatter_index, key_mask, seg_batch[group_seg], order, batch, n_img, g,
                       int(window_size), sort_axis, bool(shift), grouping)


class SparseWindowAttention(AttentionMapSource, nn.Module):
    """Multi-head attention inside equal-size groups of window-sorted tokens (packed input, see module docstring).

    Parameters are those of :class:`~vitkit.layers.attention.Attention` (fused ``qkv`` + ``proj``), so weights of
    a global or window attention layer load unchanged. ``forward(x, coords)`` builds the layout on the fly;
    ``forward(x, layout=...)`` reuses one from :func:`build_groups` (it must use this module's G and M).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        group_size: int,
        window_size: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        qk_scale: float | None = None,
        proj_bias: bool = True,
        sort_axis: str = "row",
        shift: bool = False,
        grouping: str = "equal",
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"embed dim {dim} must be divisible by num_heads {num_heads}")
        if sort_axis not in SORT_AXES:
            raise ValueError(f"sort_axis must be one of {SORT_AXES}, got {sort_axis!r}")
        check_grouping(grouping, group_size, window_size)
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale if qk_scale is not None else self.head_dim**-0.5
        self.group_size = int(group_size)
        self.window_size = int(window_size)
        self.sort_axis = sort_axis
        self.shift = bool(shift)
        self.grouping = grouping
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def layout(self, coords: torch.Tensor, num_images: int | None = None) -> GroupLayout:
        return build_groups(coords, self.group_size, self.window_size, self.sort_axis, self.shift, num_images,
                            self.grouping)

    def _check_layout(self, layout: GroupLayout, n_tokens: int) -> None:
        if layout.group_size != self.group_size or layout.num_tokens != n_tokens:
            raise ValueError(f"layout is for G={layout.group_size} and {layout.num_tokens} tokens; this layer has "
                             f"G={self.group_size} and got {n_tokens} tokens")
        if layout.grouping != self.grouping:
            raise ValueError(f"layout groups by {layout.grouping!r}; this layer by {self.grouping!r}")

    def forward(self, x: torch.Tensor, coords: torch.Tensor | None = None, layout: GroupLayout | None = None
                ) -> torch.Tensor:
        """(N_total, C) -> (N_total, C), in the order of ``x``."""
        return self.proj_drop(self.proj(self.mix(x, coords, layout)))

    def mix(self, x: torch.Tensor, coords: torch.Tensor | None = None, layout: GroupLayout | None = None
            ) -> torch.Tensor:
        """Attention up to (not including) the output projection."""
        if x.ndim != 2:
            raise ValueError(f"x must be packed tokens (N_total, C), got {tuple(x.shape)}; see pack_padded")
        if layout is None:
            if coords is None:
                raise ValueError("pass coords (N_total, 3) or a layout from build_groups")
            if coords.shape[0] != x.shape[0]:
                raise ValueError(f"coords has {coords.shape[0]} rows for {x.shape[0]} tokens")
            layout = self.layout(coords)
        self._check_layout(layout, x.shape[0])
        n, c = x.shape
        if n == 0:
            return x.new_zeros(0, c)
        g, h = self.group_size, self.num_heads
        grouped = x.index_select(0, layout.gather_index)  # (num_groups * G, C)
        qkv = self.qkv(grouped).reshape(-1, g, 3, h, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (num_groups, heads, G, head_dim), strided views like Attention.mix
        out = self._attend(q, k, v, self.scale, layout.key_mask, self.attn_drop if self.training else 0.0)
        out = out.transpose(1, 2).reshape(-1, c)  # (num_groups * G, C)
        return out.index_select(0, layout.scatter_index)


class SparseWindowBlock(nn.Module):
    """Pre-norm block: x + attn(norm1(x)), x + mlp(norm2(x)) on packed tokens, with grouped sparse attention.

    Parameter names match :class:`~vitkit.layers.block.Block` and a Swin block (minus its relative position bias:
    see :func:`swin_to_sparse_state_dict`). ``sort_axis`` and ``shift`` are per block, so a stage alternates them
    (e.g. :func:`alternating_schedule`).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        group_size: int = 49,
        window_size: int = 7,
        sort_axis: str = "row",
        shift: bool = False,
        grouping: str = "equal",
        mlp_ratio: float = 4.0,
        mlp_dim: int | None = None,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        init_values: float | None = None,
        norm_eps: float = 1e-5,
        act: str = "gelu",
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = SparseWindowAttention(dim, num_heads, group_size, window_size, qkv_bias=qkv_bias,
                                          attn_drop=attn_drop, proj_drop=proj_drop, qk_scale=qk_scale,
                                          sort_axis=sort_axis, shift=shift, grouping=grouping)
        add_residual_branches(self, dim, mlp_ratio, mlp_dim, proj_drop, drop_path, init_values, norm_eps, act)

    @property
    def sort_axis(self) -> str:
        return self.attn.sort_axis

    @property
    def shift(self) -> bool:
        return self.attn.shift

    def layout(self, coords: torch.Tensor, num_images: int | None = None) -> GroupLayout:
        return self.attn.layout(coords, num_images)

    def forward(self, x: torch.Tensor, coords: torch.Tensor | None = None, layout: GroupLayout | None = None
                ) -> torch.Tensor:
        """(N_total, C) packed tokens -> same. Stochastic depth drops a residual branch for whole *images* (all
        tokens of an image together, from the layout's batch index), as DropPath does on a padded batch."""
        if layout is None:
            if coords is None:
                raise ValueError("pass coords (N_total, 3) or a layout from build_groups")
            layout = self.attn.layout(coords)
        y = self.ls1(self.attn(self.norm1(x), layout=layout))
        x = x + _drop_path_packed(y, layout, self.drop_path1)
        y = self.ls2(self.mlp(self.norm2(x)))
        return x + _drop_path_packed(y, layout, self.drop_path2)


def _drop_path_packed(y: torch.Tensor, layout: GroupLayout, module: nn.Module) -> torch.Tensor:
    """DropPath over packed tokens: one keep/drop draw per image, shared by its tokens."""
    p = getattr(module, "drop_prob", 0.0)
    if not p or not module.training:
        return y
    keep = y.new_empty(layout.num_images).bernoulli_(1.0 - p).div_(1.0 - p)
    return y * keep[layout.token_batch][:, None]


def alternating_schedule(depth: int) -> list[tuple[str, bool]]:
    """(sort_axis, shift) per block: row, col, row + shift, col + shift, repeated (FlatFormer alternates the
    sorting axis every block and shifts the windows every other pair)."""
    pattern = [("row", False), ("col", False), ("row", True), ("col", True)]
    return [pattern[i % 4] for i in range(depth)]


def swin_to_sparse_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Swin block's state dict without its relative position bias (table and index), ready for
    ``SparseWindowBlock.load_state_dict(..., strict=True)``; ``attn.*`` Swin names are kept as they are."""
    return {k: v for k, v in state.items() if "relative_position" not in k}


# ---------------------------------------------------------------------------- packing helpers
def grid_coords(height: int, width: int, batch: int = 1, device: torch.device | str | None = None) -> torch.Tensor:
    """Coordinates of every token of ``batch`` full height x width grids, row-major: (batch * H * W, 3)."""
    b, r, c = torch.meshgrid(torch.arange(batch, device=device), torch.arange(height, device=device),
                             torch.arange(width, device=device), indexing="ij")
    return torch.stack([b, r, c], -1).reshape(-1, 3)


def pack_padded(x: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded batch -> packed: ``x`` (B, N_max, C), ``positions`` (B, N_max, 2) (row, col), ``valid`` (B, N_max)
    bool. Returns (x_packed (N_total, C), coords (N_total, 3)), images in batch order."""
    b_idx, n_idx = valid.nonzero(as_tuple=True)
    coords = torch.cat([b_idx[:, None], positions[b_idx, n_idx].long()], dim=1)
    return x[b_idx, n_idx], coords


def unpack_padded(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_padded` for the features: (N_total, C) -> (B, N_max, C), zeros where not valid."""
    out = x.new_zeros(*valid.shape, x.shape[-1])
    out[valid] = x
    return out
