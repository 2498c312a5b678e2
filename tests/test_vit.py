"""The ViT's design switches, resolution changes, checkpoints and bad input."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from safetensors.torch import save_file

import vitkit
from vitkit import CheckpointError, InputShapeError, VisionTransformer
from vitkit.layers import LearnedPosEmbed2D, capture_attention, sincos_2d
from vitkit.models import load_weights, read_state_dict
from vitkit.models.vit import POOL_TYPES, POS_PLACEMENTS

POS_KINDS = ("none", "learned_1d", "learned_2d", "sincos_2d", "relative")


def tiny_vit(**kw) -> VisionTransformer:
    args = dict(img_size=16, patch_size=4, in_chans=3, num_classes=4, embed_dim=16, depth=2, num_heads=2)
    args.update(kw)
    torch.manual_seed(0)
    return VisionTransformer(**args)


@pytest.mark.parametrize("pos,placement,pool", list(itertools.product(POS_KINDS, POS_PLACEMENTS, POOL_TYPES)))
def test_every_switch_combination_trains(pos, placement, pool):
    model = tiny_vit(pos_embed=pos, pos_placement=placement, pool=pool)
    x = torch.randn(2, 3, 16, 16)
    out = model(x)
    expected = (2, 4) if pool != "none" else (2, 1 + 16, 4)
    assert out.shape == expected
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    n_tables = {"input": 1, "every_layer_shared": 1, "every_layer": 2}[placement] if pos != "none" else 0
    pos_modules = [m for m in model.modules() if type(m).__name__.endswith(("PosEmbed1D", "PosEmbed2D",
                                                                             "PosEmbed2D", "Bias"))]
    if pos in ("learned_1d", "learned_2d", "relative"):
        assert len(pos_modules) == n_tables


def test_placement_changes_the_function():
    """input / every_layer_shared use the same table but add it once vs before every block."""
    x = torch.randn(2, 3, 16, 16)
    a = tiny_vit(pos_placement="input").eval()
    b = tiny_vit(pos_placement="every_layer_shared").eval()
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        assert not torch.allclose(a(x), b(x))


def test_no_class_token_with_gap_and_bad_pool():
    model = tiny_vit(class_token=False, pool="gap")
    assert model.forward_features(torch.randn(1, 3, 16, 16)).shape == (1, 16, 16)
    with pytest.raises(ValueError, match="class_token"):
        tiny_vit(class_token=False, pool="cls")
    with pytest.raises(ValueError, match="pool must be one of"):
        tiny_vit(pool="max")


def test_learned_2d_is_row_column_concatenation():
    pe = LearnedPosEmbed2D((3, 4), dim=8, num_prefix_tokens=1)
    table = pe.table((3, 4))[0, 1:].reshape(3, 4, 8)
    assert torch.equal(table[2, 1, :4], pe.row[2]) and torch.equal(table[2, 1, 4:], pe.col[1])


def test_learned_2d_resamples_each_axis_like_a_1d_signal():
    """A ramp stays a ramp (torch 2.13 returns a constant for an antialiased width-1 image: resampled as a row)."""
    import torch.nn.functional as F

    pe = LearnedPosEmbed2D((4, 4), dim=8, num_prefix_tokens=0)
    ramp = torch.arange(4.0)[:, None].expand(4, 4).contiguous()
    with torch.no_grad():
        pe.row.copy_(ramp)
    rows = pe.table((6, 4))[0].reshape(6, 4, 8)[:, 0, :4]
    ref = F.interpolate(ramp.t()[None, :, None, :], size=(1, 6), mode="bicubic", antialias=True,
                        align_corners=False)[0, :, 0, :].t()
    torch.testing.assert_close(rows, ref)
    assert (rows[1:, 0] > rows[:-1, 0]).all()


def test_sincos_is_fixed_and_not_saved():
    model = tiny_vit(pos_embed="sincos_2d")
    assert not any("pos_embed" in k for k in model.state_dict())
    assert not any("pos_embed" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(model.pos_embed.weight[0, 1:], sincos_2d((4, 4), 16))


def test_overlapping_patches_keep_the_grid():
    plain = tiny_vit(img_size=28, in_chans=1, patch_size=4)
    overlap = tiny_vit(img_size=28, in_chans=1, patch_size=8, patch_stride=4)
    assert plain.grid == overlap.grid == (7, 7)
    assert overlap.patch_embed.proj.padding == (2, 2)
    out = overlap(torch.randn(2, 1, 28, 28))
    out.sum().backward()
    assert out.shape == (2, 4)
    with pytest.raises(ValueError, match="even number"):
        tiny_vit(patch_size=5, patch_stride=4)


def test_hybrid_stem():
    model = tiny_vit(img_size=32, stem="resnet", stem_layers=(1, 1), stem_width=8, patch_size=1)
    assert model.grid == (4, 4)  # /4 stem, /2 second stage
    assert model.patch_embed.backbone.out_channels == 64
    out = model(torch.randn(2, 3, 32, 32))
    out.sum().backward()
    assert model.patch_embed.backbone.stem[0].weight.grad is not None


@pytest.mark.parametrize("pos", ["learned_1d", "learned_2d", "sincos_2d", "relative"])
def test_checkpoint_loads_at_another_resolution(pos, tmp_path):
    small = tiny_vit(pos_embed=pos).eval()
    small.save_pretrained(tmp_path / "small")
    big = vitkit.from_pretrained(tmp_path / "small", img_size=24).eval()
    assert big.grid == (6, 6)
    out = big(torch.randn(2, 3, 24, 24))
    assert out.shape == (2, 4) and torch.isfinite(out).all()
    if pos == "learned_1d":
        assert big.pos_embed.weight.shape == (1, 1 + 36, 16)
        # resampling is a smooth upsampling of the same table: corners stay close to the source's corners
        src = small.pos_embed.weight[0, 1:].reshape(4, 4, 16)
        dst = big.pos_embed.weight[0, 1:].reshape(6, 6, 16)
        assert torch.equal(big.pos_embed.weight[0, 0], small.pos_embed.weight[0, 0])
        assert (dst[0, 0] - src[0, 0]).abs().max() < (src[0, 0] - src[3, 3]).abs().max()
    if pos == "relative":
        assert big.pos_embed.table.shape == (11 * 11 + 3, 2)


def test_dynamic_img_size_matches_resampled_model():
    model = tiny_vit(dynamic_img_size=True).eval()
    x = torch.randn(2, 3, 24, 20)
    with torch.no_grad():
        dynamic = model(x)
    fixed = tiny_vit(img_size=(24, 20)).eval()
    fixed.load_state_dict(model.state_dict())  # resampled by the position module on load
    with torch.no_grad():
        torch.testing.assert_close(fixed(x), dynamic)


def test_relative_bias_dynamic_size():
    model = tiny_vit(pos_embed="relative", dynamic_img_size=True, pos_placement="every_layer")
    assert model(torch.randn(1, 3, 24, 16)).shape == (1, 4)


def test_bad_inputs_give_clear_errors():
    model = tiny_vit()
    with pytest.raises(InputShapeError, match="expects 3 input channel"):
        model(torch.randn(1, 1, 16, 16))
    with pytest.raises(InputShapeError, match="not divisible by the patch stride 4x4"):
        tiny_vit(dynamic_img_size=True)(torch.randn(1, 3, 18, 16))
    with pytest.raises(InputShapeError, match="built for 16x16 images, got 24x24"):
        model(torch.randn(1, 3, 24, 24))
    with pytest.raises(InputShapeError, match=r"4D batch"):
        model(torch.randn(3, 16, 16))
    with pytest.raises(ValueError, match="not divisible"):
        tiny_vit(img_size=18)


def test_attention_maps_match_fast_path():
    model = tiny_vit(pos_embed="relative").eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        fast = model(x)
        with capture_attention(model) as maps:
            explicit = model(x)
    torch.testing.assert_close(fast, explicit, atol=1e-5, rtol=1e-5)
    assert len(maps) == 2 and maps[0].shape == (2, 2, 17, 17)


def test_forward_intermediates():
    model = tiny_vit(depth=3).eval()
    x = torch.randn(2, 3, 16, 16)
    final, maps = model.forward_intermediates(x)
    assert len(maps) == 3 and maps[0].shape == (2, 16, 4, 4)
    torch.testing.assert_close(final, model.forward_features(x))
    nhwc = model.forward_intermediates(x, indices=[0, -1], output_fmt="NHWC", intermediates_only=True)
    assert [m.shape for m in nhwc] == [(2, 4, 4, 16)] * 2
    with_prefix = model.forward_intermediates(x, indices=1, intermediates_only=True, return_prefix_tokens=True)
    assert with_prefix[0][1].shape == (2, 1, 16)


def test_grad_checkpointing_is_exact():
    x = torch.randn(2, 3, 16, 16)
    a, b = tiny_vit(), tiny_vit()
    b.set_grad_checkpointing()
    a(x).sum().backward()
    b(x).sum().backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, msg=n)


def test_reset_classifier_and_metadata():
    model = tiny_vit()
    model.reset_classifier(7, pool="gap", class_names=list("abcdefg"))
    assert model(torch.randn(1, 3, 16, 16)).shape == (1, 7)
    assert model.pretrained_cfg["class_names"] == list("abcdefg") and model.model_args["num_classes"] == 7
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 16, 16)).shape == (1, 16)
    assert "cls_token" in model.no_weight_decay() and "pos_embed.weight" in model.no_weight_decay()
    assert model.lr_layer_id("blocks.1.mlp.fc1.weight") == 2 and model.lr_layer_id("head.weight") == 3


def test_pretrained_with_other_num_classes_drops_head(tmp_path):
    tiny_vit().save_pretrained(tmp_path / "c")
    with pytest.warns(UserWarning, match="classifier head"):
        model = vitkit.from_pretrained(tmp_path / "c", num_classes=9)
    assert model(torch.randn(1, 3, 16, 16)).shape == (1, 9)


def test_pretrained_registry_model_keeps_metadata(tmp_path):
    model = vitkit.create_model("vit_fmnist_tiny", depth=1)
    model.save_pretrained(tmp_path / "f")
    loaded = vitkit.create_model("vit_fmnist_tiny", pretrained=tmp_path / "f", depth=1)
    assert loaded.pretrained_cfg["class_names"][0] == "T-shirt/top"
    assert loaded.pretrained_cfg["mean"] == [0.286] or tuple(loaded.pretrained_cfg["mean"]) == (0.286,)


def test_wrong_architecture_lists_keys(tmp_path):
    tiny_vit(depth=2).save_pretrained(tmp_path / "d2")
    with pytest.raises(CheckpointError, match=r"unexpected keys \(\d+\): blocks\.1\."):
        vitkit.create_model("vit_fmnist_tiny", pretrained=tmp_path / "d2", img_size=16, in_chans=3, depth=1,
                            embed_dim=16, num_heads=2, patch_size=4, num_classes=4, mlp_ratio=4.0)
    with pytest.raises(CheckpointError, match=r"missing keys \(\d+\): blocks\.2\."):
        vitkit.from_pretrained(tmp_path / "d2", depth=3)
    with pytest.raises(CheckpointError, match="size mismatch|does not fit"):
        vitkit.from_pretrained(tmp_path / "d2", mlp_ratio=2.0)


def test_corrupt_and_truncated_files_are_named(tmp_path):
    model = tiny_vit()
    model.save_pretrained(tmp_path / "ok")
    weights = tmp_path / "ok" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is corrupt or truncated"):
        vitkit.from_pretrained(tmp_path / "ok")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01 not a safetensors file")
    with pytest.raises(CheckpointError, match="garbage.safetensors"):
        read_state_dict(garbage)
    (tmp_path / "ok" / "config.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        vitkit.from_pretrained(tmp_path / "ok")
    with pytest.raises(CheckpointError, match="does not exist"):
        read_state_dict(tmp_path / "missing.safetensors")


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned",))


def test_torch_files_are_loaded_without_pickle_code(tmp_path):
    good = tmp_path / "good.pth.tar"
    torch.save({"state_dict": tiny_vit().state_dict(), "epoch": 3}, good)
    state = read_state_dict(good)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_weights(tiny_vit(), state)
    evil = tmp_path / "evil.pth"
    torch.save({"w": _Evil()}, evil)
    with pytest.raises(CheckpointError, match=r"was refused: loading it would need code execution") as info:
        read_state_dict(evil)
    assert "\n" not in str(info.value)  # one line, not torch's page about weights_only


def test_save_is_atomic(tmp_path, monkeypatch):
    """A failure while writing leaves the previous checkpoint intact and no temp files behind."""
    model = tiny_vit()
    model.save_pretrained(tmp_path / "ck")
    before = (tmp_path / "ck" / "model.safetensors").read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("vitkit.models._pretrained.save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        tiny_vit(embed_dim=32).save_pretrained(tmp_path / "ck")
    assert (tmp_path / "ck" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["config.json", "model.safetensors"]


def test_plain_safetensors_file_as_pretrained(tmp_path):
    model = tiny_vit().eval()
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    other = tiny_vit(img_size=16)
    vitkit.models.load_pretrained(other, tmp_path / "w.safetensors")
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(other.eval()(x), model(x))
