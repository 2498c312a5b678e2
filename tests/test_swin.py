"""Swin Transformer: parity with Hugging Face ``SwinForImageClassification`` (tiny random configs, fp32),
window attention against a written-out reference, padding rules and the sparse-stage switch."""

from __future__ import annotations

import pytest
import torch

import vitkit
from vitkit.cli import main as cli_main
from vitkit.errors import CheckpointError, InputShapeError
from vitkit.layers.sparse_window import swin_to_sparse_state_dict
from vitkit.layers.window_attention import SwinBlock, shifted_window_mask, window_partition, window_reverse
from vitkit.models.swin import SwinTransformer

transformers = pytest.importorskip("transformers")
from transformers import SwinConfig, SwinForImageClassification, SwinModel  # noqa: E402

from vitkit.convert import convert_hf_swin, load_hf_swin  # noqa: E402

# (config, input sizes): each covers a rule of the references
CONFIGS = {
    # 16x16 map, 4x4 windows shifted by 2; 8x8 shifted; last stage 4x4 = one window, not shifted
    "three_stages": (dict(image_size=32, patch_size=2, embed_dim=16, depths=[2, 2, 2], num_heads=[2, 2, 4],
                          window_size=4), [(32, 32)]),
    # window 4 does not divide 14x14 (padded to 16), 7x7 (padded to 8) merges to 4x4 (odd side padded)
    "window_not_dividing": (dict(image_size=28, patch_size=2, embed_dim=12, depths=[2, 2, 2], num_heads=[3, 3, 3],
                                 window_size=4, mlp_ratio=3.0, qkv_bias=False), [(28, 28)]),
    # images that are not a multiple of the patch (padded to it), non-square, window 3, absolute positions off
    "image_padding": (dict(image_size=30, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4],
                           window_size=3, hidden_act="gelu_new"), [(30, 30), (30, 38), (21, 45)]),
    # absolute position embeddings (need the built size)
    "absolute_positions": (dict(image_size=24, patch_size=3, embed_dim=16, depths=[2, 1], num_heads=[2, 2],
                                window_size=2, use_absolute_embeddings=True, layer_norm_eps=1e-6), [(24, 24)]),
}


def _hf_model(cls, num_labels=5, **kw):
    torch.manual_seed(0)
    cfg = SwinConfig(num_channels=3, num_labels=num_labels, id2label={i: f"c{i}" for i in range(num_labels)}, **kw)
    model = cls(cfg).eval()
    with torch.no_grad():  # non-trivial weights: HF's init has zero biases, zero bias tables and unit norms
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


def _max_diff(a, b) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_classification_and_hidden_state_parity(tmp_path, name):
    kw, sizes = CONFIGS[name]
    hf = _hf_model(SwinForImageClassification, **kw)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_hf_swin(tmp_path / "hf").eval()
    assert ours.num_stages == len(kw["depths"]) and ours.window_size == kw["window_size"]
    for size in sizes:
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            ref = hf(x, output_hidden_states=True)
            before = hf.swin(x, output_hidden_states=True, output_hidden_states_before_downsampling=True)
            assert _max_diff(ref.logits, ours(x)) <= 1e-5
            final, maps = ours.forward_intermediates(x)
            assert _max_diff(before.last_hidden_state, final) <= 1e-5
            assert _max_diff(ref.reshaped_hidden_states[0], ours.embed(x).permute(0, 3, 1, 2)) <= 1e-5
            # every stage: before merging (dense-task features) and after (HF's default hidden states)
            assert len(maps) == len(kw["depths"]) == len(before.reshaped_hidden_states) - 1
            for i, (fmap, stage) in enumerate(zip(maps, ours.stages)):
                assert _max_diff(before.reshaped_hidden_states[i + 1], fmap) <= 1e-5, f"stage {i}"
                after = fmap.permute(0, 2, 3, 1)
                after = stage.downsample(after) if stage.downsample is not None else after
                assert _max_diff(ref.reshaped_hidden_states[i + 1], after.permute(0, 3, 1, 2)) <= 1e-5
                assert _max_diff(ref.hidden_states[i + 1], after.flatten(1, 2)) <= 1e-5
    assert ours.pretrained_cfg["class_names"] == [f"c{i}" for i in range(5)]


def test_base_model_and_cli_round_trip(tmp_path):
    hf = _hf_model(SwinModel, **CONFIGS["three_stages"][0])
    hf.save_pretrained(tmp_path / "hf")
    assert cli_main(["convert", "hf-swin", str(tmp_path / "hf"), str(tmp_path / "ours")]) == 0
    ours = vitkit.from_pretrained(tmp_path / "ours").eval()
    assert ours.num_classes == 0
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = hf(x)
        feats = ours.forward_features(x)
        assert _max_diff(ref.last_hidden_state, feats) <= 1e-5
        assert _max_diff(ref.pooler_output, ours.forward_head(feats, pre_logits=True)) <= 1e-5


def test_transformers5_state_dict_names_convert(tmp_path):
    """A state dict with transformers-5 in-memory names (q_proj, mlp.fc1, ...) converts like the Hub layout."""
    from safetensors.torch import save_file

    hf = _hf_model(SwinForImageClassification, **CONFIGS["three_stages"][0])
    hf.save_pretrained(tmp_path / "hf")
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, tmp_path / "hf" / "model.safetensors")
    ours = load_hf_swin(tmp_path / "hf").eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert _max_diff(hf(x).logits, ours(x)) <= 1e-5


def test_converter_errors_name_the_problem(tmp_path):
    from safetensors.torch import load_file, save_file

    hf = _hf_model(SwinForImageClassification, **CONFIGS["three_stages"][0])
    hf.save_pretrained(tmp_path / "hf")
    state = load_file(tmp_path / "hf" / "model.safetensors")
    key = "swin.encoder.layers.1.blocks.0.attention.self.relative_position_bias_table"
    save_file({**state, key: torch.zeros(10, 2)}, tmp_path / "hf" / "model.safetensors")
    with pytest.raises(CheckpointError, match="10 rows"):
        load_hf_swin(tmp_path / "hf")
    save_file({k: v for k, v in state.items() if "layers.1.downsample.norm.bias" not in k},
              tmp_path / "hf" / "model.safetensors")
    with pytest.raises(CheckpointError, match="downsample.norm.bias"):
        load_hf_swin(tmp_path / "hf")
    save_file({**state, "swin.extra.weight": torch.zeros(1)}, tmp_path / "hf" / "model.safetensors")
    with pytest.raises(CheckpointError, match="swin.extra.weight|extra.weight"):
        load_hf_swin(tmp_path / "hf")
    save_file(state, tmp_path / "hf" / "model.safetensors")
    convert_hf_swin(tmp_path / "hf", tmp_path / "ok", drop_path_rate=0.1)
    assert vitkit.from_pretrained(tmp_path / "ok").model_args["drop_path_rate"] == 0.1


# ---------------------------------------------------------------------------- window attention itself
def _reference_block_attention(block: SwinBlock, x: torch.Tensor) -> torch.Tensor:
    """Swin's attention branch written out token by token: each query attends to the keys of its (shifted,
    padded) window, through the rolled map, with the bias of their offset and -100 across regions."""
    B, H, W, C = x.shape
    m, s = block.window_size, block.shift_size
    Hp, Wp = -(-H // m) * m, -(-W // m) * m
    xp = torch.zeros(B, Hp, Wp, C, dtype=x.dtype)
    xp[:, :H, :W] = x
    xp = torch.roll(xp, (-s, -s), (1, 2))
    attn = block.attn
    qkv = attn.qkv(xp).reshape(B, Hp, Wp, 3, attn.num_heads, attn.head_dim)
    mask = shifted_window_mask(Hp, Wp, m, s) if s else None
    out = torch.zeros(B, Hp, Wp, attn.num_heads, attn.head_dim, dtype=x.dtype)
    table = attn.relative_position_bias_table
    for wr in range(Hp // m):
        for wc in range(Wp // m):
            rows = [(wr * m + i, wc * m + j) for i in range(m) for j in range(m)]
            q = torch.stack([qkv[:, r, c, 0] for r, c in rows], 2)  # (B, heads, N, d)
            k = torch.stack([qkv[:, r, c, 1] for r, c in rows], 2)
            v = torch.stack([qkv[:, r, c, 2] for r, c in rows], 2)
            logits = (q * attn.scale) @ k.transpose(-1, -2)
            for a, (ra, ca) in enumerate(rows):
                for b, (rb, cb) in enumerate(rows):
                    logits[:, :, a, b] += table[(ra - rb + m - 1) * (2 * m - 1) + (ca - cb + m - 1)]
            if mask is not None:
                logits = logits + mask[wr * (Wp // m) + wc]
            res = logits.softmax(-1) @ v
            for a, (r, c) in enumerate(rows):
                out[:, r, c] = res[:, :, a]
    out = attn.proj(out.reshape(B, Hp, Wp, C))
    return torch.roll(out, (s, s), (1, 2))[:, :H, :W]


@pytest.mark.parametrize("shift", [0, 2])
@pytest.mark.parametrize("size", [(8, 8), (6, 10)])
def test_window_attention_matches_written_out_reference(shift, size):
    torch.manual_seed(3)
    block = SwinBlock(12, 3, window_size=4, shift_size=shift).double().eval()
    x = torch.randn(2, *size, 12, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(block.attend(x), _reference_block_attention(block, x))


def test_partition_round_trip_and_mask_regions():
    x = torch.randn(2, 8, 12, 5)
    assert torch.equal(window_reverse(window_partition(x, 4), 4, 8, 12), x)
    mask = shifted_window_mask(8, 8, 4, 2)
    assert mask.shape == (4, 16, 16)
    assert (mask[0] == 0).all()  # the top-left window holds one region only
    assert (mask[3] != 0).any() and set(mask.unique().tolist()) == {0.0, -100.0}


def test_small_maps_are_one_unshifted_window():
    torch.manual_seed(0)
    block = SwinBlock(8, 2, window_size=7, shift_size=3).eval()
    x = torch.randn(1, 5, 6, 8)
    with torch.no_grad():  # a 5x6 map, window 7: one window of 5 (central offsets of the 13x13 table), no shift
        out = block.attend(x)
        ref = SwinBlock(8, 2, window_size=5, shift_size=0).eval()
        ref.load_state_dict({**block.state_dict(), "attn.relative_position_bias_table":
                             block.attn.relative_position_bias_table.reshape(13, 13, 2)[2:11, 2:11].reshape(81, 2)})
        torch.testing.assert_close(out, ref.attend(x))


# ---------------------------------------------------------------------------- model behaviour
def _tiny(**kw) -> SwinTransformer:
    torch.manual_seed(0)
    args = dict(img_size=32, patch_size=2, in_chans=1, num_classes=4, embed_dim=16, depths=(2, 2), num_heads=(2, 4),
                window_size=4, drop_path_rate=0.0)
    return SwinTransformer(**{**args, **kw}).eval()


def test_any_image_size_is_padded_and_ape_needs_its_size():
    model = _tiny()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 29, 41)).shape == (2, 4)
    with pytest.raises(InputShapeError, match="2 input channel|1 input channel"):
        model(torch.randn(2, 2, 32, 32))
    ape = _tiny(ape=True)
    with pytest.raises(InputShapeError, match="built for 32x32"):
        ape(torch.randn(1, 1, 40, 40))
    with pytest.raises(ValueError, match="divisible by its heads"):
        _tiny(num_heads=(3, 4))
    with pytest.raises(ValueError, match="sparse_stages"):
        _tiny(sparse_stages=(2,))


def test_sparse_stage_with_every_token_equals_window_attention():
    """One block per stage, unshifted, G = M², no bias: the sparse stage is the dense stage exactly."""
    dense = _tiny(depths=(1, 1))
    sparse = _tiny(depths=(1, 1), sparse_stages=(0, 1))
    with torch.no_grad():
        for n, p in dense.named_parameters():
            if "relative_position_bias_table" in n:
                p.zero_()
    sparse.load_state_dict(swin_to_sparse_state_dict(dense.state_dict()), strict=True)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), dense(x), atol=1e-5, rtol=0)


def test_sparse_stage_computes_kept_tokens_only():
    model = _tiny(sparse_stages=(0,))
    gen = torch.Generator().manual_seed(1)
    keep = torch.rand(2, 16, 16, generator=gen) < 0.5
    keep[1] = False
    keep[1, :3, :5] = True  # the second image keeps far fewer tokens
    x = torch.randn(2, 1, 32, 32, generator=gen)
    with torch.no_grad():
        emb = model.embed(x)
        out = model.stages[0].run_blocks(emb, keep)
        assert torch.equal(out[~keep], emb[~keep])  # pruned tokens pass through unchanged
        assert not torch.allclose(out[keep], emb[keep])
        # the pixels of pruned patches do not change kept outputs
        pruned_pixels = (~keep).repeat_interleave(2, 1).repeat_interleave(2, 2)[:, None]
        x2 = torch.where(pruned_pixels, torch.randn_like(x), x)
        out2 = model.stages[0].run_blocks(model.embed(x2), keep)
        torch.testing.assert_close(out2[keep], out[keep])
        assert model(x, keep=keep).shape == (2, 4)
    model.train()
    model(x, keep=keep).sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "stages.0.blocks" in n)
    with pytest.raises(InputShapeError, match="bool mask"):
        model(x, keep=keep[:, :8])
    with pytest.raises(ValueError, match="sparse_stages"):
        _tiny()(x, keep=keep)


def test_token_keep_ratio_keeps_the_patches_with_content():
    """token_keep_ratio < 1: the model masks its own input, keeping the patches that differ most from the image's
    background (its median pixel), and trains on those tokens; both groupings run; bad settings are refused."""
    model = _tiny(sparse_stages=(0, 1), token_keep_ratio=0.1)
    x = torch.zeros(2, 1, 32, 32)
    x[0, :, 4:8, 10:14] = 1.0  # an item covering 2×2 patches (patch 2) of a 16×16 grid
    x[1, :, 20:30, 0:6] = 0.5
    keep = model.content_keep(x)
    assert keep.shape == (2, 16, 16) and keep.sum(dim=(1, 2)).tolist() == [26, 26]  # round(0.1 · 256)
    assert keep[0, 2:4, 5:7].all() and keep[1, 10:15, 0:3].all()  # every patch with content is kept
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x, keep=keep))
    model.train()
    model(x).sum().backward()
    assert model.stages[0].blocks[0].attn.qkv.weight.grad is not None
    padded = _tiny(sparse_stages=(0, 1), token_keep_ratio=0.5, sparse_grouping="window")
    assert padded.stages[0].blocks[0].attn.grouping == "window" and padded(x).shape == (2, 4)
    with pytest.raises(ValueError, match="needs sparse_stages"):
        _tiny(token_keep_ratio=0.5)
    with pytest.raises(ValueError, match="token_keep_ratio must be in"):
        _tiny(sparse_stages=(0,), token_keep_ratio=0.0)
    with pytest.raises(ValueError, match="group_size must be"):
        _tiny(sparse_stages=(0,), sparse_grouping="window", group_size=8)


def test_grad_checkpointing_gives_the_same_gradients():
    x = torch.randn(2, 1, 32, 32)
    grads = []
    for ckpt in (False, True):
        model = _tiny(sparse_stages=(1,)).train()
        model.set_grad_checkpointing(ckpt)
        model(x).square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


def test_registry_sizes_and_optimizer_metadata():
    for name, params in (("swin_tiny_patch4_window7_224", 28.29), ("swin_small_patch4_window7_224", 49.61),
                         ("swin_base_patch4_window7_224", 87.77), ("swin_base_patch4_window12_384", 87.90)):
        with torch.device("meta"):
            model = vitkit.create_model(name)
        assert abs(sum(p.numel() for p in model.parameters()) / 1e6 - params) < 0.01, name
    model = _tiny()
    assert "stages.0.blocks.1.attn.relative_position_bias_table" in model.no_weight_decay()
    ids = {n: model.lr_layer_id(n) for n, _ in model.named_parameters()}
    assert ids["patch_embed.weight"] == 0 and ids["head.weight"] == model.num_lr_layers - 1 == 5
    assert ids["stages.1.blocks.0.norm1.weight"] == 3 and ids["stages.0.downsample.reduction.weight"] == 2
