"""Sparse window attention with equal-size groups (layers/sparse_window.py) and the ReLU linear attention
reference (layers/linear_attention.py).

References are written out here: plain non-shifted window attention (partition into M x M windows, softmax
attention per window with the module's own qkv/proj weights) and per-group attention without any padding.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vitkit.layers.attention import capture_attention
from vitkit.layers.linear_attention import ReLULinearAttention, relu_linear_attention
from vitkit.layers.sparse_window import (
    SparseWindowAttention,
    SparseWindowBlock,
    _drop_path_packed,
    alternating_schedule,
    build_groups,
    grid_coords,
    pack_padded,
    sort_key,
    swin_to_sparse_state_dict,
    unpack_padded,
)

DIM, HEADS, M = 32, 4, 7


def _attn(group_size: int = M * M, **kw) -> SparseWindowAttention:
    torch.manual_seed(0)
    return SparseWindowAttention(DIM, HEADS, group_size, M, **kw).double()


def _softmax_attention(x: torch.Tensor, qkv: torch.nn.Linear, proj: torch.nn.Linear, heads: int) -> torch.Tensor:
    """(B, N, C) -> (B, N, C), explicit softmax."""
    B, N, C = x.shape
    q, k, v = qkv(x).reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
    attn = (q @ k.transpose(-2, -1) * (C // heads) ** -0.5).softmax(-1)
    return proj((attn @ v).transpose(1, 2).reshape(B, N, C))


def _window_reference(x: torch.Tensor, module: SparseWindowAttention, m: int) -> torch.Tensor:
    """Plain (non-shifted) window attention on (B, H, W, C), H and W multiples of m."""
    B, H, W, C = x.shape
    win = x.reshape(B, H // m, m, W // m, m, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, m * m, C)
    out = _softmax_attention(win, module.qkv, module.proj, module.num_heads)
    return out.reshape(B, H // m, W // m, m, m, C).permute(0, 1, 3, 2, 4, 5).reshape(B, H, W, C)


def _group_reference(x: torch.Tensor, coords: torch.Tensor, module: SparseWindowAttention) -> torch.Tensor:
    """Same grouping, each group attended alone with only its real tokens (no padding, no mask)."""
    layout = module.layout(coords)
    out = torch.zeros_like(x)
    n_img = int(coords[:, 0].max()) + 1
    sorted_tokens = layout.order
    sorted_batch = coords[sorted_tokens, 0]
    for b in range(n_img):
        run = sorted_tokens[sorted_batch == b]
        for start in range(0, run.numel(), module.group_size):
            idx = run[start:start + module.group_size]
            out = out.index_put((idx,), _softmax_attention(x[idx][None], module.qkv, module.proj,
                                                           module.num_heads)[0])
    return out


def _random_keep(height: int, width: int, keep: float, batch_index: int, gen: torch.Generator) -> torch.Tensor:
    coords = grid_coords(height, width)
    n_keep = round(keep * height * width)
    kept = coords[torch.randperm(height * width, generator=gen)[:n_keep]]
    kept[:, 0] = batch_index
    return kept


def test_full_grid_equals_window_attention():
    """(a) every token kept, G = M², unshifted, row-major: exactly plain window attention."""
    module = _attn()
    torch.manual_seed(1)
    B, H, W = 2, 14, 21
    x = torch.randn(B, H, W, DIM, dtype=torch.float64)
    ref = _window_reference(x, module, M)
    with torch.no_grad():
        out = module(x.reshape(-1, DIM), grid_coords(H, W, B))
    assert module.layout(grid_coords(H, W, B)).key_mask is None
    torch.testing.assert_close(out.reshape(B, H, W, DIM), ref, atol=1e-5, rtol=0)
    # fp32, SDPA kernel, against the same reference in fp64
    with torch.no_grad():
        out32 = module.float()(x.float().reshape(-1, DIM), grid_coords(H, W, B))
    torch.testing.assert_close(out32.reshape(B, H, W, DIM).double(), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("shift", [False, True])
def test_window_grouping_is_window_attention_on_the_kept_tokens(shift):
    """grouping="window" (the padded baseline): each non-empty window is one group padded to M², so the result is
    attention among each window's kept tokens (non-cyclic shifted windows with shift); it costs a whole group
    per window however few tokens it keeps, more groups than equal-size grouping at the same kept tokens."""
    module = _attn(grouping="window", shift=shift)
    gen = torch.Generator().manual_seed(3)
    H = W = 14
    coords = torch.cat([_random_keep(H, W, 0.3, 0, gen), _random_keep(H, W, 0.6, 1, gen)])
    x = torch.randn(coords.shape[0], DIM, dtype=torch.float64, generator=gen)
    with torch.no_grad():
        out = module(x, coords)
    s = M // 2 if shift else 0
    window = coords[:, 0] * 100 + ((coords[:, 1] + s) // M) * 10 + (coords[:, 2] + s) // M
    ref = torch.zeros_like(x)
    with torch.no_grad():
        for w in window.unique():
            idx = (window == w).nonzero().flatten()
            ref[idx] = _softmax_attention(x[idx][None], module.qkv, module.proj, HEADS)[0]
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
    layout = module.layout(coords)
    assert layout.num_groups == window.unique().numel() and layout.grouping == "window"
    assert layout.num_groups > build_groups(coords, M * M, M, shift=shift).num_groups
    with pytest.raises(ValueError, match="groups by 'equal'"):
        module(x, layout=build_groups(coords, M * M, M, shift=shift))
    with pytest.raises(ValueError, match="group_size must be 49"):
        SparseWindowAttention(DIM, HEADS, 32, M, grouping="window")
    with pytest.raises(ValueError, match="grouping must be one of"):
        build_groups(coords, M * M, M, grouping="windows")


def test_full_grid_column_major_equals_window_attention():
    """Column-major sorting visits the same windows (in another order): the same result."""
    module = _attn(sort_axis="col")
    x = torch.randn(1, 14, 14, DIM, dtype=torch.float64)
    with torch.no_grad():
        out = module(x.reshape(-1, DIM), grid_coords(14, 14))
    torch.testing.assert_close(out.reshape(1, 14, 14, DIM), _window_reference(x, module, M), atol=1e-5, rtol=0)


@pytest.mark.parametrize("sort_axis,shift", [("row", False), ("col", True)])
def test_independent_of_input_order(sort_axis, shift):
    """(b) permuting the packed tokens (and coords) permutes the outputs the same way."""
    module = _attn(group_size=16, sort_axis=sort_axis, shift=shift)
    gen = torch.Generator().manual_seed(2)
    coords = torch.cat([_random_keep(14, 14, 0.5, 0, gen), _random_keep(10, 12, 0.4, 1, gen)])
    x = torch.randn(coords.shape[0], DIM, dtype=torch.float64, generator=gen)
    perm = torch.randperm(coords.shape[0], generator=gen)
    with torch.no_grad():
        out = module(x, coords)
        out_perm = module(x[perm], coords[perm])
    torch.testing.assert_close(out_perm, out[perm], atol=1e-12, rtol=0)


def test_gradients_match_unpadded_groups():
    """(c) gradients reach inputs and weights; the filled-in repeats change neither outputs nor gradients."""
    module = _attn(group_size=16)
    gen = torch.Generator().manual_seed(3)
    coords = torch.cat([_random_keep(14, 14, 0.5, 0, gen), _random_keep(14, 14, 0.3, 1, gen)])  # 98, 59 tokens
    assert (torch.bincount(coords[:, 0]) % 16 != 0).all()
    assert module.layout(coords).key_mask is not None
    x = torch.randn(coords.shape[0], DIM, dtype=torch.float64, generator=gen)
    weight = torch.randn(coords.shape[0], DIM, dtype=torch.float64, generator=gen)

    def grads(fn):
        module.zero_grad()
        xi = x.clone().requires_grad_(True)
        out = fn(xi)
        (out * weight).sum().backward()
        return out.detach(), xi.grad, {n: p.grad.clone() for n, p in module.named_parameters()}

    out, gx, gw = grads(lambda xi: module(xi, coords))
    ref, rx, rw = grads(lambda xi: _group_reference(xi, coords, module))
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(gx, rx, atol=1e-10, rtol=0)
    assert gx.abs().sum(1).gt(0).all(), "every kept token gets a gradient"
    for name in gw:
        assert gw[name].abs().sum() > 0, name
        torch.testing.assert_close(gw[name], rw[name], atol=1e-10, rtol=0)


def test_counts_dividing_group_size_need_no_mask():
    """(c) without any filling (counts multiples of G) the layout has no mask and matches the reference too."""
    module = _attn(group_size=14)
    gen = torch.Generator().manual_seed(4)
    coords = torch.cat([_random_keep(14, 14, 0.5, 0, gen), _random_keep(14, 14, 1.0, 1, gen)])  # 98, 196
    assert module.layout(coords).key_mask is None
    x = torch.randn(coords.shape[0], DIM, dtype=torch.float64, generator=gen, requires_grad=True)
    out = module(x, coords)
    out.sum().backward()
    assert x.grad is not None and module.qkv.weight.grad is not None
    torch.testing.assert_close(out.detach(), _group_reference(x.detach(), coords, module), atol=1e-10, rtol=0)


@pytest.mark.parametrize("sort_axis,shift", [("row", False), ("col", False), ("row", True), ("col", True)])
def test_mixed_kept_counts_equal_images_alone(sort_axis, shift):
    """(d) 50%, 30% and 100% of a 14 x 14 grid in one batch (counts 98, 59, 196; G = 32 divides none): each
    image's outputs equal running it alone."""
    module = _attn(group_size=32, sort_axis=sort_axis, shift=shift)
    gen = torch.Generator().manual_seed(5)
    parts = [_random_keep(14, 14, keep, b, gen) for b, keep in enumerate((0.5, 0.3, 1.0))]
    assert [p.shape[0] % 32 != 0 for p in parts] == [True, True, True]
    coords = torch.cat(parts)
    x = torch.randn(coords.shape[0], DIM, dtype=torch.float64, generator=gen)
    with torch.no_grad():
        out = module(x, coords)
        start = 0
        for p in parts:
            alone = p.clone()
            alone[:, 0] = 0
            sl = slice(start, start + p.shape[0])
            torch.testing.assert_close(out[sl], module(x[sl], alone), atol=1e-5, rtol=0)
            start += p.shape[0]
    torch.testing.assert_close(out, _group_reference(x, coords, module), atol=1e-10, rtol=0)
    # fp32 through the SDPA kernel with its key mask: same result
    module32 = _attn(group_size=32, sort_axis=sort_axis, shift=shift).float()
    with torch.no_grad():
        torch.testing.assert_close(module32(x.float(), coords).double(), out, atol=1e-5, rtol=0)


@pytest.mark.parametrize("sort_axis,shift", [("row", False), ("col", False), ("row", True), ("col", True)])
def test_layouts_are_valid_permutations(sort_axis, shift):
    """(e) every token in exactly one real slot, groups inside one image, keys sorted, repeats from the same group."""
    gen = torch.Generator().manual_seed(6)
    coords = torch.cat([_random_keep(14, 14, 0.5, 0, gen), _random_keep(9, 17, 0.7, 2, gen),
                        _random_keep(14, 14, 0.05, 3, gen)])  # image 1 keeps nothing
    coords = coords[torch.randperm(coords.shape[0], generator=gen)]
    g = 13
    layout = build_groups(coords, g, M, sort_axis, shift)
    n = coords.shape[0]
    groups = layout.groups()
    mask = layout.key_mask[:, 0, 0] if layout.key_mask is not None else torch.ones_like(groups, dtype=torch.bool)
    real = groups[mask]
    assert torch.equal(real.sort().values, torch.arange(n))  # each token exactly once among real slots
    assert torch.equal(layout.gather_index[layout.scatter_index], torch.arange(n))  # scatter inverts gather
    assert torch.equal(layout.order.sort().values, torch.arange(n))
    assert (coords[groups, 0] == layout.group_batch[:, None]).all()  # groups within one image
    for b, count in enumerate(torch.bincount(coords[:, 0], minlength=4).tolist()):
        assert int((layout.group_batch == b).sum()) == -(-count // g)
    for grp, msk in zip(groups, mask):  # repeats come from the group's own real tokens
        assert set(grp[~msk].tolist()) <= set(grp[msk].tolist())
    key = sort_key(coords, M, sort_axis, shift)
    assert (key[layout.order].diff() > 0).all()
    ordered = groups[mask]  # row-major over (group, slot) of real slots = sorted order
    assert torch.equal(ordered, layout.order)


def test_sort_order_semantics():
    """Row-major: windows left to right, then rows inside a window; col-major the transpose; shift offsets
    the window grid by M // 2."""
    coords = grid_coords(4, 4)
    m = 2
    row = coords[sort_key(coords, m, "row").argsort()][:, 1:].tolist()
    assert row[:8] == [[0, 0], [0, 1], [1, 0], [1, 1], [0, 2], [0, 3], [1, 2], [1, 3]]
    col = coords[sort_key(coords, m, "col").argsort()][:, 1:].tolist()
    assert col[:8] == [[0, 0], [1, 0], [0, 1], [1, 1], [2, 0], [3, 0], [2, 1], [3, 1]]
    shifted = coords[sort_key(coords, m, "row", shift=True).argsort()][:, 1:].tolist()
    # shifted windows start at -1: the first holds only (0,0), the next cols 1-2 of row 0, then col 3 of row 0
    assert shifted[:6] == [[0, 0], [0, 1], [0, 2], [0, 3], [1, 0], [2, 0]]


def test_bad_inputs():
    with pytest.raises(ValueError, match="more than once"):
        build_groups(torch.tensor([[0, 1, 1], [0, 1, 1]]), 4, M)
    with pytest.raises(ValueError, match="N_total, 3"):
        build_groups(torch.zeros(5, 2, dtype=torch.long), 4, M)
    with pytest.raises(TypeError):
        build_groups(torch.zeros(5, 3), 4, M)
    with pytest.raises(ValueError, match="sort_axis"):
        build_groups(grid_coords(2, 2), 4, M, sort_axis="diag")
    module = _attn(group_size=4)
    with pytest.raises(ValueError, match="layout"):
        module(torch.randn(3, DIM, dtype=torch.float64), layout=build_groups(grid_coords(2, 2), 4, M))
    with pytest.raises(ValueError, match="packed"):
        module(torch.randn(1, 4, DIM, dtype=torch.float64), grid_coords(2, 2))


def test_capture_attention_and_shared_layout():
    module = _attn(group_size=16)
    gen = torch.Generator().manual_seed(7)
    coords = _random_keep(14, 14, 0.3, 0, gen)  # 59 tokens: 4 groups, the last with 11 real keys
    x = torch.randn(coords.shape[0], DIM, dtype=torch.float64, generator=gen)
    layout = module.layout(coords)
    with torch.no_grad(), capture_attention(module) as maps:
        out = module(x, layout=layout)
    assert len(maps) == 1 and maps[0].shape == (4, HEADS, 16, 16)
    torch.testing.assert_close(maps[0].sum(-1), torch.ones(4, HEADS, 16, dtype=torch.float64))
    assert (maps[0][-1, :, :, 11:] == 0).all()  # repeats are never attended to
    with torch.no_grad():
        torch.testing.assert_close(module(x, coords), out)


def test_block_names_swin_weights_and_gradients():
    torch.manual_seed(8)
    block = SparseWindowBlock(DIM, HEADS, group_size=16, window_size=M, sort_axis="col", shift=True,
                              drop_path=0.1).double()
    names = {n for n, _ in block.named_parameters()}
    for expected in ("norm1.weight", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "norm2.bias",
                     "mlp.fc1.weight", "mlp.fc2.weight"):
        assert expected in names
    swin_state = {k: torch.randn_like(v) for k, v in block.state_dict().items()}
    swin_state["attn.relative_position_bias_table"] = torch.zeros((2 * M - 1) ** 2, HEADS)
    swin_state["attn.relative_position_index"] = torch.zeros(M * M, M * M, dtype=torch.long)
    block.load_state_dict(swin_to_sparse_state_dict(swin_state), strict=True)
    assert torch.equal(block.attn.qkv.weight, swin_state["attn.qkv.weight"])
    gen = torch.Generator().manual_seed(9)
    coords = torch.cat([_random_keep(14, 14, 0.5, 0, gen), _random_keep(14, 14, 0.2, 1, gen)])
    x = torch.randn(coords.shape[0], DIM, dtype=torch.float64, generator=gen, requires_grad=True)
    block.train()
    block(x, coords).square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in block.parameters())
    # stochastic depth draws once per image: every token of an image is dropped (0) or kept and rescaled (2)
    layout = block.layout(coords)
    block.drop_path1.drop_prob = 0.5
    torch.manual_seed(12)
    seen = set()
    for _ in range(20):
        kept = _drop_path_packed(torch.ones(coords.shape[0], DIM, dtype=torch.float64), layout, block.drop_path1)
        for b in range(2):
            values = kept[coords[:, 0] == b].unique().tolist()
            assert len(values) == 1 and values[0] in (0.0, 2.0)
            seen.add(values[0])
    assert seen == {0.0, 2.0}
    block.eval()
    with torch.no_grad():  # eval block = residual reference built from the same modules
        y = x + block.attn(block.norm1(x), coords)
        ref = y + block.mlp(block.norm2(y))
        torch.testing.assert_close(block(x, coords), ref)
    assert alternating_schedule(5) == [("row", False), ("col", False), ("row", True), ("col", True), ("row", False)]


def test_pack_unpack_padded():
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(2, 6, DIM, generator=gen)
    pos = torch.stack([torch.arange(6) // 3, torch.arange(6) % 3], -1).expand(2, 6, 2)
    valid = torch.tensor([[1, 1, 0, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    packed, coords = pack_padded(x, pos, valid)
    assert packed.shape == (9, DIM) and coords[:, 0].tolist() == [0, 0, 0] + [1] * 6
    assert coords[2].tolist() == [0, 1, 0]
    back = unpack_padded(packed, valid)
    torch.testing.assert_close(back[valid], x[valid])
    assert (back[~valid] == 0).all()


def test_empty_input():
    module = _attn(group_size=8)
    out = module(torch.zeros(0, DIM, dtype=torch.float64), torch.zeros(0, 3, dtype=torch.long))
    assert out.shape == (0, DIM)


# ---------------------------------------------------------------------------- ReLU linear attention
def test_relu_linear_attention_matches_quadratic_form():
    """q (kᵀ v) / q (kᵀ 1) equals the explicit N x N form (ReLU(q)·ReLU(k) normalised over keys)."""
    torch.manual_seed(11)
    layer = ReLULinearAttention(DIM, HEADS).double()
    x = torch.randn(2, 50, DIM, dtype=torch.float64)
    B, N, C = x.shape
    q, k, v = layer.qkv(x).reshape(B, N, 3, HEADS, C // HEADS).permute(2, 0, 3, 1, 4)
    scores = F.relu(q) @ F.relu(k).transpose(-2, -1)
    ref = (scores / scores.sum(-1, keepdim=True).clamp_min(1e-300)) @ v  # an all-zero ReLU(q) gives 0
    ref = layer.proj(ref.transpose(1, 2).reshape(B, N, C))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), ref)
    # bf16 input: computed in fp32 internally, returned in bf16
    qb, kb, vb = (F.relu(t).bfloat16() for t in (q, k, v))
    out = relu_linear_attention(qb, kb, vb)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
