"""Masked autoencoder: masking, pixels <-> patches, checkpoints, encoder transfer, and parity with HF ViTMAE."""

from __future__ import annotations

import warnings

import pytest
import torch

import vitkit
from vitkit.cli import main as cli_main
from vitkit.data.constants import FMNIST_MEAN, FMNIST_STD
from vitkit.errors import CheckpointError
from vitkit.layers import sincos_2d
from vitkit.models import MAEOutput, MaskedAutoencoderViT, load_pretrained


def _tiny_mae(**kw) -> MaskedAutoencoderViT:
    torch.manual_seed(0)
    args = dict(encoder_args={"depth": 2}, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
    args.update(kw)
    return vitkit.create_model("mae_vit_fmnist_tiny", **args).eval()


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


X = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------- masking
@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.75, 0.9])
def test_masking_keeps_exactly_int_L_times_one_minus_ratio(ratio):
    model = _tiny_mae(mask_ratio=ratio)
    out = model(X)
    keep = int(49 * (1 - ratio))
    assert isinstance(out, MAEOutput) and out.pred.shape == (4, 49, 16) and out.mask.shape == (4, 49)
    assert torch.equal(out.mask.sum(1), torch.full((4,), 49.0 - keep))
    assert set(out.mask.unique().tolist()) <= {0.0, 1.0}
    assert torch.isfinite(out.loss)


def test_masks_differ_per_sample_and_are_reproducible():
    model = _tiny_mae()
    x = torch.randn(8, 1, 28, 28)
    a = model(x, generator=torch.Generator().manual_seed(3))
    b = model(x, generator=torch.Generator().manual_seed(3))
    c = model(x, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.mask, b.mask) and torch.equal(a.pred, b.pred) and torch.equal(a.loss, b.loss)
    assert not torch.equal(a.mask, c.mask)
    assert len({tuple(m.tolist()) for m in a.mask}) == 8  # every sample has its own mask
    noise = torch.rand(8, 49)
    assert torch.equal(model(x, noise=noise).mask, model(x, noise=noise).mask)
    with pytest.raises(ValueError, match="noise must have shape"):
        model(x, noise=torch.rand(8, 48))


def test_random_masking_keeps_the_lowest_noise_and_restores_order():
    model = _tiny_mae()
    tokens = torch.arange(2 * 49, dtype=torch.float32).reshape(2, 49, 1).expand(-1, -1, 3)
    noise = torch.rand(2, 49)
    kept, mask, ids_restore = model.random_masking(tokens, noise)
    order = noise.argsort(1)
    assert torch.equal(kept[..., 0], torch.gather(tokens[..., 0], 1, order[:, :12]))
    assert torch.equal(mask, (noise > noise.sort(1).values[:, 11:12]).float())  # 1 = not among the 12 smallest
    # [kept, dropped] gathered with ids_restore is the original order
    shuffled = torch.gather(tokens[..., 0], 1, order)
    assert torch.equal(torch.gather(shuffled, 1, ids_restore), tokens[..., 0])


# ---------------------------------------------------------------------- pixels and patches
@pytest.mark.parametrize("chans,size,patch", [(1, (28, 28), 4), (3, (32, 48), 8)])
def test_patchify_unpatchify_round_trip(chans, size, patch):
    model = MaskedAutoencoderViT("vit_tiny_patch16_224", {"img_size": size, "patch_size": patch, "in_chans": chans,
                                                          "embed_dim": 24, "depth": 1, "num_heads": 2},
                                 decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    x = torch.randn(2, chans, *size)
    patches = model.patchify(x)
    assert patches.shape == (2, (size[0] // patch) * (size[1] // patch), patch * patch * chans)
    # patch 0 holds the top-left patch, pixels (row, col, channel)
    assert torch.equal(patches[0, 0], x[0, :, :patch, :patch].permute(1, 2, 0).reshape(-1))
    assert torch.equal(model.unpatchify(patches, size), x)
    out = model(x)
    assert out.pred.shape == patches.shape and torch.isfinite(out.loss)


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_reconstruct_pastes_visible_patches_and_predictions(norm_pix_loss):
    model = _tiny_mae(norm_pix_loss=norm_pix_loss)
    out = model(X)
    image = model.reconstruct(X, out.pred, out.mask)
    assert image.shape == X.shape
    patches, target = model.patchify(image), model.patchify(X)
    visible = out.mask == 0
    assert torch.equal(patches[visible], target[visible])
    pred = out.pred
    if norm_pix_loss:
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        pred = pred * (var + 1e-6).sqrt() + mean
    assert _max_diff(patches[~visible], pred[~visible]) <= 1e-5


def test_norm_pix_loss_target():
    model = _tiny_mae(norm_pix_loss=True)
    out = model(X)
    target = model.patchify(X)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    expected = (((out.pred - target) ** 2).mean(-1) * out.mask).sum() / out.mask.sum()
    assert abs(out.loss.item() - expected.item()) <= 1e-6


def test_encode_pools_all_tokens_without_masking():
    model = _tiny_mae()
    feats = model.encode(X)
    assert feats.shape == (4, 96) and model.num_features == 96
    assert torch.equal(feats, model.encoder.forward_features(X)[:, 0])
    gap = _tiny_mae(encoder_args={"depth": 2, "pool": "gap", "class_token": False})
    assert gap.encode(X).shape == (4, 96)
    assert gap(X).pred.shape == (4, 49, 16)  # no prefix token anywhere


def test_bf16_autocast_step_gives_fp32_loss():
    model = _tiny_mae().train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(X)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
    assert model.mask_token.grad is not None and model.encoder.patch_embed.proj.weight.grad is not None


def test_optimizer_metadata():
    model = _tiny_mae()
    assert {"encoder.cls_token", "mask_token"} <= model.no_weight_decay()
    assert model.num_lr_layers == 2 + 2  # encoder depth 2 + stem + top
    assert model.lr_layer_id("encoder.patch_embed.proj.weight") == 0
    assert model.lr_layer_id("encoder.blocks.1.attn.qkv.weight") == 2
    assert model.lr_layer_id("encoder.norm.weight") == 3
    assert model.lr_layer_id("decoder_blocks.0.mlp.fc1.weight") == model.lr_layer_id("mask_token") == 3


# ---------------------------------------------------------------------- encoders that cannot drop tokens
@pytest.mark.parametrize("enc,match", [
    ({"pos_embed": "relative"}, "relative position bias"),
    ({"pos_embed": "learned_1d", "pos_placement": "every_layer"}, "before every block"),
    ({"patch_size": 8, "patch_stride": 4}, "non-overlapping"),
])
def test_encoders_that_cannot_mask_are_refused(enc, match):
    with pytest.raises(ValueError, match=match):
        MaskedAutoencoderViT("vit_fmnist_tiny", enc, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)


def test_encoders_of_other_kinds_are_refused():
    with pytest.raises(ValueError, match="MAE needs non-overlapping"):
        MaskedAutoencoderViT("vit_fmnist_hybrid_tiny", {}, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    with pytest.raises(ValueError, match="MAE needs a ViT encoder; 't2t_vit_fmnist_tiny' is a T2TViT"):
        MaskedAutoencoderViT("t2t_vit_fmnist_tiny")


def test_token_drop_place_of_token_classifiers():
    """embed_tokens + run_blocks is forward_features; a subset of tokens runs where positions allow it."""
    for name in ("vit_fmnist_tiny", "t2t_vit_fmnist_tiny"):
        model = vitkit.create_model(name, depth=2).eval()
        tokens, grid = model.embed_tokens(X)
        assert grid == (7, 7) and tokens.shape == (4, 50, 96) and model.supports_token_dropping
        out, _ = model.run_blocks(tokens, grid)
        assert torch.equal(model.norm(out), model.forward_features(X))
        assert model.run_blocks(tokens[:, :10], grid)[0].shape == (4, 10, 96)
    rel = vitkit.create_model("vit_fmnist_tiny", depth=2, pos_embed="relative")
    tokens, grid = rel.embed_tokens(X)
    assert not rel.supports_token_dropping
    with pytest.raises(ValueError, match="cannot drop tokens"):
        rel.run_blocks(tokens[:, :10], grid)


# ---------------------------------------------------------------------- checkpoints and encoder transfer
def test_save_load_round_trip(tmp_path):
    model = _tiny_mae(norm_pix_loss=True, mask_ratio=0.6)
    model.save_pretrained(tmp_path / "mae")
    loaded = vitkit.from_pretrained(tmp_path / "mae").eval()
    again = vitkit.create_model("mae_vit_fmnist_tiny", pretrained=tmp_path / "mae", encoder_args={"depth": 2},
                                decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, mask_ratio=0.6,
                                norm_pix_loss=True).eval()
    assert isinstance(loaded, MaskedAutoencoderViT) and loaded.norm_pix_loss and loaded.mask_ratio == 0.6
    assert loaded.pretrained_cfg["mean"] == list(FMNIST_MEAN) and loaded.pretrained_cfg["std"] == list(FMNIST_STD)
    noise = torch.rand(4, 49)
    expected = model(X, noise=noise)
    for other in (loaded, again):
        out = other(X, noise=noise)
        assert torch.equal(out.pred, expected.pred) and torch.equal(out.loss, expected.loss)


def _transfer(path, name="vit_fmnist_tiny", **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = vitkit.create_model(name, pretrained=path, **kw)
    return model, [str(w.message) for w in caught]


def test_mae_encoder_fine_tunes_as_classifier(tmp_path):
    mae = _tiny_mae()
    mae.save_pretrained(tmp_path / "mae")
    clf, messages = _transfer(tmp_path / "mae", num_classes=10, depth=2)
    assert len(messages) == 1, messages
    msg = messages[0]
    assert "loaded the encoder of MaskedAutoencoderViT into VisionTransformer" in msg
    assert "dropped" in msg and "decoder_blocks.*" in msg and "mask_token" in msg
    assert "sincos_2d" in msg and "head is freshly initialised" in msg
    # same encoder: the learned table starts as the sin-cos positions, so the features are identical
    clf.eval()
    assert _max_diff(clf.forward_features(X), mae.encoder.forward_features(X)) <= 1e-6
    table = clf.pos_embed.weight[0]
    assert torch.equal(table[0], torch.zeros(96)) and torch.equal(table[1:], sincos_2d((7, 7), 96, order="wh"))
    assert clf.pos_embed.weight.requires_grad and clf(X).shape == (4, 10)
    assert clf.pretrained_cfg["mean"] == list(FMNIST_MEAN)
    # the same through load_pretrained, and into a classifier that keeps fixed positions
    other = vitkit.create_model("vit_fmnist_tiny", depth=2, pos_embed="sincos_2d", pos_sincos_order="wh").eval()
    with pytest.warns(UserWarning, match="loaded the encoder"):
        load_pretrained(other, tmp_path / "mae")
    assert _max_diff(other.forward_features(X), mae.encoder.forward_features(X)) <= 1e-6


def test_encoder_transfer_refuses_what_does_not_fit(tmp_path):
    _tiny_mae().save_pretrained(tmp_path / "mae")
    with pytest.raises(CheckpointError, match="does not fit VisionTransformer"):
        _transfer(tmp_path / "mae", depth=3)  # another depth
    with pytest.raises(CheckpointError, match="does not fit VisionTransformer"):
        _transfer(tmp_path / "mae", name="vit_fmnist_small", depth=2)  # another width
    with pytest.raises(CheckpointError, match="does not fit T2TViT"):
        _transfer(tmp_path / "mae", name="t2t_vit_fmnist_tiny", depth=2)
    with pytest.raises(CheckpointError, match="pos_sincos_order='wh'"):
        _transfer(tmp_path / "mae", depth=2, pos_embed="sincos_2d")  # row-first positions would be scrambled


def test_backbone_entry_in_config(tmp_path):
    model = _tiny_mae()
    cfg = model.config()
    assert cfg["backbone"]["prefix"] == "encoder." and cfg["backbone"]["model_class"] == "VisionTransformer"
    assert cfg["backbone"]["model_args"]["pos_embed"] == "sincos_2d"
    assert "backbone" not in vitkit.create_model("vit_fmnist_tiny").config()


# ---------------------------------------------------------------------- Hugging Face parity
def _sincos_like_hub(hf) -> None:
    """Hub checkpoints hold MAE's fixed sin-cos tables; a freshly built transformers 5 model holds zeros."""
    from transformers.models.vit_mae.modeling_vit_mae import build_2d_sinusoidal_position_embedding

    cfg = hf.config
    side = cfg.image_size // cfg.patch_size
    for param in (hf.vit.embeddings.position_embeddings, hf.decoder.decoder_pos_embed):
        table = build_2d_sinusoidal_position_embedding(side, side, param.shape[-1], cls_token=True)
        half = table.shape[-1] // 2
        with torch.no_grad():
            param.copy_(torch.cat([table[:, half:], table[:, :half]], dim=-1)[None])  # MAE's (w, h) channel order


def _hf_mae(**kw):
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    torch.manual_seed(0)
    args = dict(image_size=32, patch_size=4, hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
                intermediate_size=96, decoder_hidden_size=48, decoder_num_hidden_layers=2,
                decoder_num_attention_heads=3, decoder_intermediate_size=80)
    args.update(kw)
    model = ViTMAEForPreTraining(ViTMAEConfig(**args)).eval()
    with torch.no_grad():  # non-trivial weights: HF's init has zero biases and unit norms
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)
    _sincos_like_hub(model)
    return model


PARITY_CASES = {
    "default": {},
    "mask_ratio_0.6": {"mask_ratio": 0.6},
    "norm_pix_loss": {"norm_pix_loss": True},
    "one_channel": {"num_channels": 1, "qkv_bias": False},
    "narrow_decoder": {"decoder_hidden_size": 16, "decoder_num_attention_heads": 2, "decoder_intermediate_size": 24,
                       "decoder_num_hidden_layers": 1},
}


@pytest.mark.parametrize("case", list(PARITY_CASES))
def test_parity_with_hf_vit_mae(tmp_path, case):
    pytest.importorskip("transformers")
    from vitkit.convert import load_hf_vit_mae

    hf = _hf_mae(**PARITY_CASES[case])
    hf.save_pretrained(tmp_path / "hf")
    ours = load_hf_vit_mae(tmp_path / "hf").eval()
    cfg = hf.config
    assert ours.mask_ratio == cfg.mask_ratio and ours.norm_pix_loss == cfg.norm_pix_loss
    x = torch.randn(3, cfg.num_channels, 32, 32)
    noise = torch.rand(3, 64)
    with torch.no_grad():
        ref = hf(pixel_values=x, noise=noise)
        out = ours(x, noise=noise)
    assert _max_diff(ref.mask, out.mask) == 0
    assert _max_diff(ref.logits, out.pred) <= 1e-5
    assert abs(ref.loss.item() - out.loss.item()) <= 1e-5


def test_hf_vit_mae_cli_and_transformers5_names(tmp_path, capsys):
    pytest.importorskip("transformers")
    hf = _hf_mae(num_channels=1)
    # transformers 5's in-memory key names, as torch.save(model.state_dict()) writes them
    (tmp_path / "hf").mkdir()
    hf.config.save_pretrained(tmp_path / "hf")
    torch.save(hf.state_dict(), tmp_path / "hf" / "pytorch_model.bin")
    assert cli_main(["convert", "hf-vit-mae", str(tmp_path / "hf"), str(tmp_path / "out"),
                     "--arg", "drop_path_rate=0.1"]) == 0
    assert "wrote" in capsys.readouterr().out
    ours = vitkit.from_pretrained(tmp_path / "out").eval()
    assert ours.encoder.model_args["drop_path_rate"] == 0.1
    x, noise = torch.randn(2, 1, 32, 32), torch.rand(2, 64)
    with torch.no_grad():
        ref = hf(pixel_values=x, noise=noise)
        out = ours(x, noise=noise)
    assert _max_diff(ref.logits, out.pred) <= 1e-5 and abs(ref.loss.item() - out.loss.item()) <= 1e-5
    # its encoder fine-tunes like any MAE checkpoint
    clf, messages = _transfer(tmp_path / "out", name="vit_tiny_patch16_224", img_size=32, patch_size=4, in_chans=1,
                              embed_dim=48, depth=2, num_heads=3, mlp_dim=96, norm_eps=1e-12, num_classes=3)
    assert len(messages) == 1 and clf(x).shape == (2, 3)


def test_hf_vit_mae_converter_errors(tmp_path):
    pytest.importorskip("transformers")
    from vitkit.convert import load_hf_vit_mae

    hf = _hf_mae()
    with torch.no_grad():
        hf.decoder.decoder_pos_embed.zero_()
    hf.save_pretrained(tmp_path / "zero")
    with pytest.raises(CheckpointError, match="not MAE's fixed 2D sin-cos"):
        load_hf_vit_mae(tmp_path / "zero")
    hf.vit.save_pretrained(tmp_path / "encoder_only")
    with pytest.raises(CheckpointError, match="no decoder weights"):
        load_hf_vit_mae(tmp_path / "encoder_only")
