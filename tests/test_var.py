"""VAR and its multi-scale VQ-VAE: parity with the official code's reference vectors, the converters, KV-cached
sampling, the training pieces and the registered configurations."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import vitkit
from vitkit import CheckpointError, ConfigError, InputShapeError
from vitkit.convert.var import (
    convert_var,
    convert_var_state_dict,
    convert_var_vqvae,
    convert_vqvae_state_dict,
    infer_var_args,
    infer_vqvae_args,
)
from vitkit.layers.sampling import KVCache, sample_top_k_top_p
from vitkit.models import create_model, load_weights, model_defaults
from vitkit.models.var import VAR, level_layout
from vitkit.models.vqvae import MultiScaleVQVAE

# Data-only reference vectors made with the official code (see shared/reference/README.md, section var/). A missing
# file is a failure, not a skip: parity is the point of this file.
REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "var"
REF_PATCH_NUMS = (1, 2, 3, 4, 6, 8)  # not in the VQVAE weights (only their count is): given as --arg would be
TOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The reference ran with one thread; reductions may order differently with more."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _ref_file(name: str) -> dict[str, torch.Tensor]:
    path = REFERENCE / name
    assert path.is_file(), f"reference file not found: {path}"
    return load_file(str(path))


@pytest.fixture(scope="module")
def io() -> dict[str, torch.Tensor]:
    return _ref_file("var_io.safetensors")


@pytest.fixture(scope="module")
def vae() -> MultiScaleVQVAE:
    args, state = convert_vqvae_state_dict(_ref_file("var_vqvae_weights.safetensors"), patch_nums=REF_PATCH_NUMS)
    model = MultiScaleVQVAE(**args).eval()
    load_weights(model, state)
    return model


@pytest.fixture(scope="module")
def var() -> VAR:
    # cond_drop_rate / drop_path_rate only act in training; the reference model was built with 0
    args, state = convert_var_state_dict(_ref_file("var_var_weights.safetensors"), cond_drop_rate=0.0)
    model = VAR(**args).eval()
    load_weights(model, state)
    return model


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def _ref_idx(io: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    return [io[f"idx_s{i}"] for i in range(len(REF_PATCH_NUMS))]


# ---------------------------------------------------------------------- parity with the official code
def test_vqvae_reference_parity(vae, io):
    img = io["img"]
    with torch.no_grad():
        f = vae.encode(img)
        idx = vae.img_to_idx(img)
        f_hats = vae.f_to_idx_or_fhat(io["f"], to_fhat=True)
        recs = vae.idx_to_img(_ref_idx(io), same_shape=True, last_one=False)
        rec = vae.idx_to_img(_ref_idx(io), same_shape=True, last_one=True)
        rec_via_fhat = vae.img_to_reconstructed_img(img, last_one=True)
        x = vae.idx_to_var_input(_ref_idx(io))
    assert _max_diff(f, io["f"]) <= TOL
    for i in range(len(REF_PATCH_NUMS)):
        assert torch.equal(idx[i], io[f"idx_s{i}"]), f"indices differ at scale {i}"
        assert _max_diff(f_hats[i], io[f"fhat_s{i}"]) <= TOL, f"fhat_s{i}"
        assert _max_diff(recs[i], io[f"rec_img_s{i}"]) <= TOL, f"rec_img_s{i}"
    assert torch.equal(torch.cat(idx, dim=1), io["gt_BL"])
    assert _max_diff(rec, io["rec_img"]) <= TOL
    assert _max_diff(rec_via_fhat, io["rec_img_via_fhat"]) <= TOL
    assert torch.equal(rec, rec_via_fhat)  # as in the official code: both paths add the same terms in order
    assert _max_diff(x, io["x_BLCv_wo_first_l"]) <= TOL


def test_var_reference_parity(var, io):
    with torch.no_grad():
        logits = var(io["label_B"], io["x_BLCv_wo_first_l"])
    loss = F.cross_entropy(logits.reshape(-1, var.vocab_size), io["gt_BL"].reshape(-1))
    assert _max_diff(logits, io["logits_BLV"]) <= TOL
    assert abs(loss.item() - io["loss_mean"].item()) <= TOL
    assert torch.equal(var.attn_bias_for_masking, io["attn_bias_for_masking"])
    assert torch.equal(var.lvl_1L, io["lvl_1L"])


def test_phi_is_chosen_by_the_nearest_tick(vae):
    assert [vae.quantize.phi_index(si, 6) for si in range(6)] == [0, 0, 1, 2, 3, 3]
    # the official 10 scales: si = 2 sits exactly between two ticks; float64 rounding picks the second
    assert [vae.quantize.phi_index(si, 10) for si in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]


def test_quantiser_details_matter(vae, io):
    """The reference notices the details: nearest-neighbour upsampling instead of bicubic changes f̂."""
    with torch.no_grad():
        h = vae.quantize.idx_to_embeddings(_ref_idx(io))[1]
        bicubic = F.interpolate(h, size=(8, 8), mode="bicubic")
        nearest = F.interpolate(h, size=(8, 8), mode="nearest")
    assert _max_diff(bicubic, nearest) > 1e-2


# ---------------------------------------------------------------------- converters
def test_converters_infer_the_architecture():
    vq = infer_vqvae_args(_ref_file("var_vqvae_weights.safetensors"), patch_nums=REF_PATCH_NUMS)
    assert vq["ch_mult"] == (1, 2) and vq["num_res_blocks"] == 2 and vq["ch"] == 32
    assert (vq["vocab_size"], vq["z_channels"], vq["in_channels"]) == (64, 8, 3)
    assert vq["using_sa"] and vq["using_mid_sa"] and vq["quant_conv_ks"] == 3 and vq["share_quant_resi"] == 4
    weights = _ref_file("var_var_weights.safetensors")
    args = infer_var_args(weights)
    assert args["patch_nums"] == REF_PATCH_NUMS  # from the lvl_1L buffer
    assert args["num_heads"] == 2  # from scale_mul_1H11 (attn_l2_norm)
    assert (args["depth"], args["embed_dim"], args["num_classes"], args["vocab_size"], args["c_vae"]) == (2, 64, 10,
                                                                                                         64, 8)
    assert args["attn_l2_norm"] and not args["shared_aln"] and args["mlp_ratio"] == 4.0
    no_l2 = {k: v for k, v in weights.items() if "scale_mul" not in k}
    assert infer_var_args(no_l2)["num_heads"] == 2  # the official rule heads = depth
    assert infer_var_args(no_l2, num_heads=4)["num_heads"] == 4


def test_convert_files_to_vitkit_folders(tmp_path, io):
    """Official .pth (torch.save of the state dict) and .safetensors files -> folders -> from_pretrained."""
    vae_pth = tmp_path / "vae.pth"
    torch.save(_ref_file("var_vqvae_weights.safetensors"), vae_pth)
    vae = convert_var_vqvae(vae_pth, tmp_path / "vae", patch_nums=list(REF_PATCH_NUMS))
    var = convert_var(REFERENCE / "var_var_weights.safetensors", tmp_path / "var", cond_drop_rate=0.0)
    assert var.cond_drop_rate == 0.0 and vae.model_args["ch_mult"] == [1, 2]
    vae = vitkit.from_pretrained(tmp_path / "vae").eval()
    var = vitkit.from_pretrained(tmp_path / "var").eval()
    assert isinstance(vae, MultiScaleVQVAE) and isinstance(var, VAR)
    with torch.no_grad():
        idx = vae.img_to_idx(io["img"])
        logits = var(io["label_B"], vae.idx_to_var_input(idx))
    assert torch.equal(torch.cat(idx, 1), io["gt_BL"])
    assert _max_diff(logits, io["logits_BLV"]) <= TOL


def test_converter_errors_name_the_file_and_key(tmp_path):
    weights = _ref_file("var_vqvae_weights.safetensors")
    with pytest.raises(CheckpointError, match="6 scales.*--arg patch_nums"):
        infer_vqvae_args(weights)  # the reference has 6 scales, not the official 10
    broken = tmp_path / "broken.pth"
    torch.save({k: v for k, v in weights.items() if k != "quant_conv.weight"}, broken)
    with pytest.raises(CheckpointError, match=r"broken\.pth.*'quant_conv\.weight'"):
        convert_var_vqvae(broken, tmp_path / "out", patch_nums=list(REF_PATCH_NUMS))
    var_weights = _ref_file("var_var_weights.safetensors")
    not_var = tmp_path / "vit.safetensors"
    save_file({"cls_token": torch.zeros(1, 1, 8)}, str(not_var))
    with pytest.raises(CheckpointError, match=r"vit\.safetensors.*'class_emb\.weight'"):
        convert_var(not_var, tmp_path / "out")
    bad = dict(var_weights)
    bad["blocks.0.attn.zero_k_bias"] = torch.ones(64)
    with pytest.raises(CheckpointError, match="zero_k_bias"):
        convert_var_state_dict(bad)
    with pytest.raises(CheckpointError, match="buffer 'lvl_1L' differs from the one patch_nums"):
        convert_var_state_dict(var_weights, patch_nums=[1, 2, 3, 4, 5, 8])
    with pytest.raises(ConfigError, match="--arg no_such_arg"):
        convert_var(REFERENCE / "var_var_weights.safetensors", tmp_path / "out", no_such_arg=1)


# ---------------------------------------------------------------------- sampling
def test_kv_cache_gives_the_full_forward_logits(var, io):
    x, label = io["x_BLCv_wo_first_l"], io["label_B"]
    with torch.no_grad():
        full = var(label, x)
        caches = [KVCache() for _ in var.blocks]
        cond = var.class_emb(label)
        tokens = var.start_tokens(cond)
        for si in range(len(var.patch_nums)):
            begin, end = var.begin_ends[si]
            if si > 0:
                tokens = var.scale_tokens(si, x[:, begin - var.first_l:end - var.first_l])
            step = var.forward_step(tokens, cond, caches)
            assert _max_diff(step, full[:, begin:end]) <= TOL, f"scale {si}"
    assert caches[0].k.shape == (2, var.num_heads, var.L, var.embed_dim // var.num_heads)


def test_greedy_sampling_follows_the_teacher_forced_argmax(var, vae):
    """cfg=0 and top_k=1: every scale's sampled tokens are the argmax of the teacher-forced logits given the
    tokens sampled before (the block-causal mask makes the one-pass forward see exactly that prefix)."""
    label = torch.tensor([3, 10])
    img, idx = var.autoregressive_infer_cfg(2, label, g_seed=0, cfg=0.0, top_k=1, vae=vae, return_idx=True)
    assert img.shape == (2, 3, 16, 16) and img.min() >= 0 and img.max() <= 1
    assert [t.shape[1] for t in idx] == [pn * pn for pn in var.patch_nums]
    with torch.no_grad():
        logits = var(label, vae.idx_to_var_input(idx))
    assert torch.equal(idx[0], logits[:, :1].argmax(-1))
    assert torch.equal(torch.cat(idx, 1), logits.argmax(-1))
    with torch.no_grad():  # and the image is the tokenizer's decoding of those tokens, mapped to [0, 1]
        decoded = vae.idx_to_img(idx, last_one=True).add(1).mul(0.5)
    assert _max_diff(img, decoded) <= TOL


def test_sampling_is_reproducible_and_uses_guidance(var, vae):
    var.attach_vae(vae)
    try:
        a = var.autoregressive_infer_cfg(2, 3, g_seed=7, cfg=1.5, top_k=10, top_p=0.9, return_idx=True)[1]
        b = var.autoregressive_infer_cfg(2, 3, g_seed=7, cfg=1.5, top_k=10, top_p=0.9, return_idx=True)[1]
        c = var.autoregressive_infer_cfg(2, 3, g_seed=8, cfg=1.5, top_k=10, top_p=0.9, return_idx=True)[1]
        greedy_cfg = var.autoregressive_infer_cfg(2, 3, cfg=4.0, top_k=1, return_idx=True)[1]
        greedy = var.autoregressive_infer_cfg(2, 3, cfg=0.0, top_k=1, return_idx=True)[1]
        smooth = var.autoregressive_infer_cfg(2, None, g_seed=1, more_smooth=True)
        uncond = var.autoregressive_infer_cfg(1, -1, g_seed=1)
    finally:
        var.vae_proxy = ()
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    assert torch.equal(greedy_cfg[0], greedy[0])  # the guidance weight is cfg·si/(K−1): 0 at the first scale
    assert not all(torch.equal(x, y) for x, y in zip(greedy_cfg, greedy))
    assert smooth.shape == (2, 3, 16, 16) and uncond.shape == (1, 3, 16, 16)
    with pytest.raises(ValueError, match="attach_vae"):
        var.autoregressive_infer_cfg(1, 0)


def test_top_k_and_top_p_restrict_the_candidates():
    logits = torch.tensor([[[0.0, 3.0, 2.0, -1.0, 2.9]]]).expand(1, 400, 5)
    gen = torch.Generator().manual_seed(0)
    assert set(sample_top_k_top_p(logits, top_k=2, rng=gen).unique().tolist()) == {1, 4}
    assert set(sample_top_k_top_p(logits, top_p=0.01, rng=gen).unique().tolist()) == {1}
    assert sample_top_k_top_p(logits, top_k=1, num_samples=3, rng=gen).shape == (1, 400, 3)


def test_attention_maps_respect_the_block_causal_mask(var, io):
    maps = var.attention_maps(io["label_B"], x_BLCv_wo_first_l=io["x_BLCv_wo_first_l"])
    assert len(maps) == var.depth and maps[0].shape == (2, var.num_heads, var.L, var.L)
    future = var.attn_bias_for_masking[0, 0] != 0
    assert all(float(m[..., future].abs().max()) == 0.0 for m in maps)
    torch.testing.assert_close(maps[0].sum(-1), torch.ones(2, var.num_heads, var.L))


def test_var_rejects_bad_inputs_and_mismatched_vae(var, vae):
    with pytest.raises(InputShapeError, match=r"\(B, 129, 8\)"):
        var(torch.tensor([1]), torch.zeros(1, 128, 8))
    with pytest.raises(InputShapeError, match="label_B"):
        var(torch.tensor([1.0]), torch.zeros(1, 129, 8))
    other = MultiScaleVQVAE(vocab_size=32, z_channels=8, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                            patch_nums=REF_PATCH_NUMS)
    with pytest.raises(ValueError, match="does not fit"):
        var.attach_vae(other)
    with pytest.raises(InputShapeError, match="16x16"):
        vae.img_to_idx(torch.zeros(1, 3, 32, 32))
    with pytest.raises(InputShapeError, match="3 input channel"):
        vae.img_to_idx(torch.zeros(1, 1, 16, 16))


def test_level_layout():
    lvl, mask = level_layout((1, 2))
    assert lvl.tolist() == [[0, 1, 1, 1, 1]]
    assert (mask[0, 0] == 0).tolist() == [[True, False, False, False, False]] + [[True] * 5] * 4


# ---------------------------------------------------------------------- training pieces
def test_vqvae_training_step_straight_through_and_loss(vae, io):
    f = io["f"].clone().requires_grad_(True)
    quant = vae.quantize
    quant.eval()
    f_hat, vq_loss = quant(f)
    with torch.no_grad():
        f_hats = quant.f_to_idx_or_fhat(io["f"], to_fhat=True)
    assert _max_diff(f_hat, io["fhat_s5"]) <= TOL  # the value of f̂ ...
    weights = torch.randn_like(f_hat)
    (f_hat * weights).sum().backward(retain_graph=True)
    torch.testing.assert_close(f.grad, weights)  # ... the gradient of the identity (straight-through)
    beta = quant.beta
    expected = sum((beta + 1) * F.mse_loss(fh, io["f"]) for fh in f_hats) / len(f_hats)
    assert abs(vq_loss.item() - expected.item()) <= 1e-6
    # the codebook and φ's learn from ‖f̂ − sg(f)‖², the encoder from β·‖sg(f̂) − f‖²
    f.grad = None
    quant.embedding.weight.grad = None
    vq_loss.backward()
    assert quant.embedding.weight.grad.abs().sum() > 0 and quant.phi[0].weight.grad.abs().sum() > 0
    commitment = sum(beta * 2 * (io["f"] - fh) / f.numel() for fh in f_hats) / len(f_hats)
    torch.testing.assert_close(f.grad, commitment)
    for p in quant.parameters():
        p.grad = None


def test_vqvae_codebook_statistics_update_in_training(io):
    torch.manual_seed(0)
    model = create_model("vqvae_fmnist_tiny").train()
    x = torch.rand(4, 1, 28, 28) * 2 - 1
    out = model(x)
    hits = model.quantize.ema_vocab_hit_SV
    assert hits[0].sum().item() == 4  # the first update copies the counts: one token per image at scale 0
    assert torch.allclose(hits[1].sum(), torch.tensor(0.1 * 4 * 4))  # then EMA 0.9 / 0.1 (counted per scale)
    assert len(model.quantize.usages(4 * 49)) == 6
    assert torch.allclose(out.loss, F.mse_loss(out.rec, x) + out.vq_loss)
    model.eval()
    before = hits.clone()
    model(x)
    assert torch.equal(model.quantize.ema_vocab_hit_SV, before)


# ---------------------------------------------------------------------- registered configurations
def test_registry_names_and_official_sizes():
    names = set(vitkit.list_models("var_*")) | set(vitkit.list_models("vqvae_*"))
    assert names == {"var_d16", "var_d20", "var_d24", "var_d30", "var_fmnist_tiny", "vqvae_var", "vqvae_fmnist_tiny"}
    for depth in (16, 20, 24, 30):
        d = model_defaults(f"var_d{depth}")
        assert (d["embed_dim"], d["num_heads"], d["vocab_size"], d["c_vae"]) == (64 * depth, depth, 4096, 32)
        assert d["patch_nums"] == (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
        assert math.isclose(d["drop_path_rate"], 0.1 * depth / 24)
    with torch.device("meta"):
        assert sum(p.numel() for p in create_model("var_d16").parameters()) == 310_283_520
        assert sum(p.numel() for p in create_model("vqvae_var").parameters()) == 108_948_355


def _tiny_pair() -> tuple[MultiScaleVQVAE, VAR]:
    torch.manual_seed(0)
    return create_model("vqvae_fmnist_tiny"), create_model("var_fmnist_tiny")


def test_fmnist_tiny_models_train_end_to_end():
    vae, var = _tiny_pair()
    assert sum(p.numel() for p in vae.parameters()) == 811_345
    assert sum(p.numel() for p in var.parameters()) == 1_270_672
    x = torch.rand(2, 1, 28, 28) * 2 - 1
    vae.train()
    vae(x).loss.backward()
    missing = [n for n, p in vae.named_parameters() if p.grad is None]
    assert not missing, f"VQ-VAE parameters without gradient: {missing}"
    with torch.no_grad():
        idx = vae.eval().img_to_idx(x)
        x_BLCv = vae.idx_to_var_input(idx)
    assert x_BLCv.shape == (2, 103, 16)
    var.train()
    logits = var(torch.tensor([1, 10]), x_BLCv)
    assert logits.shape == (2, 104, 256)
    F.cross_entropy(logits.reshape(-1, 256), torch.cat(idx, 1).reshape(-1)).backward()
    missing = [n for n, p in var.named_parameters() if p.grad is None]
    assert not missing, f"VAR parameters without gradient: {missing}"
    assert {"pos_start", "pos_1LC", "lvl_embed.weight", "blocks.0.attn.scale_mul_1H11"} <= var.no_weight_decay()
    img = var.eval().autoregressive_infer_cfg(2, torch.tensor([3, 4]), g_seed=0, vae=vae.eval())
    assert img.shape == (2, 1, 28, 28)


def test_save_load_round_trip(tmp_path):
    vae, var = _tiny_pair()
    vae.eval()
    var.eval()
    x = torch.rand(2, 1, 28, 28) * 2 - 1
    with torch.no_grad():
        idx = vae.img_to_idx(x)
        x_BLCv = vae.idx_to_var_input(idx)
        rec = vae(x).rec
        logits = var(torch.tensor([0, 9]), x_BLCv)
    vae.save_pretrained(tmp_path / "vae")
    var.save_pretrained(tmp_path / "var")
    loaded_vae = vitkit.from_pretrained(tmp_path / "vae").eval()
    loaded_var = create_model("var_fmnist_tiny", pretrained=tmp_path / "var").eval()
    assert loaded_vae.model_name == "vqvae_fmnist_tiny"
    assert loaded_var.pretrained_cfg["class_names"][0] == "T-shirt/top"
    with torch.no_grad():
        assert torch.equal(loaded_vae(x).rec, rec)
        assert all(torch.equal(a, b) for a, b in zip(loaded_vae.img_to_idx(x), idx))
        assert torch.equal(loaded_var(torch.tensor([0, 9]), x_BLCv), logits)
    assert "attn_bias_for_masking" not in load_file(str(tmp_path / "var" / "model.safetensors"))


def test_shared_aln_and_plain_attention_variants_run():
    """Switches the reference does not cover (implemented from the official source, not verified numerically)."""
    torch.manual_seed(0)
    model = VAR(vocab_size=16, c_vae=4, patch_nums=(1, 2, 3), num_classes=3, depth=2, embed_dim=16, num_heads=2,
                shared_aln=True, attn_l2_norm=False)
    assert "shared_ada_lin.1.weight" in model.state_dict() and "blocks.0.ada_gss" in model.state_dict()
    assert model.blocks[0].attn.scale == 0.25 / math.sqrt(8)
    logits = model(torch.tensor([0, 3]), torch.randn(2, 13, 4))
    logits.sum().backward()
    assert logits.shape == (2, 14, 16)
    vae = MultiScaleVQVAE(vocab_size=16, z_channels=4, ch=32, ch_mult=(1,), num_res_blocks=1,
                          patch_nums=(1, 2, 3), share_quant_resi=0, using_znorm=True)
    assert len(vae.quantize.phi) == 3
    with torch.no_grad():
        grown = vae.idx_to_fhat(vae.img_to_idx(torch.rand(1, 3, 3, 3)), same_shape=False)
    assert [tuple(f.shape[-2:]) for f in grown] == [(1, 1), (2, 2), (3, 3)]


def test_fresh_models_start_from_the_official_initialisation():
    torch.manual_seed(0)
    var = VAR(vocab_size=16, c_vae=4, patch_nums=(1, 2), num_classes=3, depth=2, embed_dim=32, num_heads=2)
    gates = var.blocks[0].ada_lin[-1].weight[:64]  # gamma1, gamma2: tiny, so blocks start near the identity
    assert gates.abs().max() < 1e-5 and var.blocks[0].ada_lin[-1].bias.abs().max() == 0
    assert math.isclose(var.head.weight.std().item(), 0.02 * (1 / 96) ** 0.5, rel_tol=0.3)  # std √(1/3C) × 0.02
    vae = MultiScaleVQVAE(vocab_size=16, z_channels=4, ch=32, ch_mult=(1,), num_res_blocks=1, patch_nums=(1, 2))
    vae.quantize.init_codebook(-1.0)
    assert vae.quantize.embedding.weight.abs().max() <= 1 / 16
