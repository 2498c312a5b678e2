"""T2T-ViT: parity with the official implementation's reference vectors, the converter, and the model's switches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import vitkit
from vitkit import CheckpointError, InputShapeError
from vitkit.cli import main as cli_main
from vitkit.convert.t2t import convert_t2t, convert_t2t_state_dict, default_num_heads, infer_t2t_args, load_t2t
from vitkit.layers import capture_attention
from vitkit.layers.t2t import sinusoid_table
from vitkit.models import load_weights
from vitkit.models.t2t_vit import T2TViT

# Data-only reference vectors made with the official code (see shared/reference/README.md). A missing folder
# is a failure, not a skip: parity is the point of this file.
REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "t2t_vit"
TOKENS_TYPES = ("performer", "transformer")
TOL = 1e-5


def _reference(tokens_type: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    assert REFERENCE.is_dir(), f"reference vectors not found at {REFERENCE}"
    weights = load_file(str(REFERENCE / f"t2t_vit_{tokens_type}_weights.safetensors"))
    io = load_file(str(REFERENCE / f"t2t_vit_{tokens_type}_io.safetensors"))
    return weights, io


def _converted(tokens_type: str) -> tuple[T2TViT, dict[str, torch.Tensor]]:
    weights, io = _reference(tokens_type)
    args, state = convert_t2t_state_dict(weights, num_heads=2)
    model = T2TViT(**args).eval()
    load_weights(model, state)
    return model, io


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _tiny(**kw) -> T2TViT:
    args = dict(img_size=32, num_classes=4, token_dim=8, embed_dim=16, depth=2, num_heads=2)
    args.update(kw)
    torch.manual_seed(0)
    return T2TViT(**args)


# ---------------------------------------------------------------------- parity with the official code
@pytest.mark.parametrize("tokens_type", TOKENS_TYPES)
def test_reference_parity(tokens_type):
    model, io = _converted(tokens_type)
    assert model.tokens_type == tokens_type and model.img_size == (64, 64)
    x = io["input"]
    with torch.no_grad():
        tokens, grid = model.tokens_to_token(x)
        features = model.forward_head(model.forward_features(x), pre_logits=True)
        logits = model(x)
    assert grid == (4, 4)
    assert _max_diff(tokens, io["t2t_tokens"]) <= TOL
    assert _max_diff(features, io["features"]) <= TOL
    assert _max_diff(logits, io["logits"]) <= TOL


def test_token_transformer_scale_is_the_input_width():
    """The official quirk: scale = (C·k²)^-0.5 (147 and 288 here), not token_dim^-0.5."""
    model, io = _converted("transformer")
    attn1, attn2 = (blk.attn for blk in model.tokens_to_token.token_blocks)
    assert attn1.scale == 147**-0.5 and attn2.scale == 288**-0.5
    attn1.scale = attn2.scale = 32**-0.5
    with torch.no_grad():
        tokens, _ = model.tokens_to_token(io["input"])
    assert _max_diff(tokens, io["t2t_tokens"]) > 1e-3


def test_converted_position_table_is_the_official_sinusoid():
    weights, _ = _reference("performer")
    assert torch.equal(sinusoid_table(17, 64)[None], weights["pos_embed"])


def test_cli_converts_a_training_checkpoint(tmp_path, capsys):
    weights, io = _reference("performer")
    src = tmp_path / "t2t_ckpt.pth.tar"
    torch.save({"state_dict_ema": weights, "epoch": 3}, src)
    assert cli_main(["convert", "t2t", str(src), str(tmp_path / "out")]) == 0
    assert "T2TViT" in capsys.readouterr().out
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    # heads are not in the weights: a 64-wide model gets the default rule's single head ...
    assert cfg["model_args"]["num_heads"] == default_num_heads(64) == 1
    assert cfg["model_args"]["qk_scale"] is None  # not an official size
    # ... and the reference model (2 heads) is recovered by overriding it
    model = vitkit.from_pretrained(tmp_path / "out", num_heads=2).eval()
    with torch.no_grad():
        assert _max_diff(model(io["input"]), io["logits"]) <= TOL


def test_load_t2t_prefers_state_dict_unless_use_ema(tmp_path):
    weights, io = _reference("transformer")
    broken = dict(weights)
    broken["head.bias"] = broken["head.bias"] + 1.0
    src = tmp_path / "both.pth"
    torch.save({"state_dict": broken, "state_dict_ema": {f"module.{k}": v for k, v in weights.items()}}, src)
    with torch.no_grad():
        plain = load_t2t(src, num_heads=2).eval()(io["input"])
        ema = load_t2t(src, use_ema=True, num_heads=2).eval()(io["input"])
    assert _max_diff(plain, io["logits"] + 1.0) <= TOL
    assert _max_diff(ema, io["logits"]) <= TOL


def test_official_sizes_get_official_heads_and_pretrained_qk_scale():
    """t2t_vit_7-shaped weights: 4 heads and qk_scale = 256^-0.5, as the official pretrained factory builds."""
    e = torch.empty
    state = {"tokens_to_token.attention1.kqv.weight": e(192, 147), "tokens_to_token.attention1.norm1.weight": e(147),
             "tokens_to_token.attention1.w": e(32, 64), "cls_token": e(1, 1, 256), "pos_embed": e(1, 197, 256),
             "tokens_to_token.project.weight": e(256, 576), "head.weight": e(1000, 256)}
    state.update({f"blocks.{i}.mlp.fc1.weight": e(512, 256) for i in range(7)})
    args = infer_t2t_args(state)
    assert args["num_heads"] == 4 and args["qk_scale"] == 256**-0.5
    assert (args["img_size"], args["depth"], args["token_dim"], args["num_classes"]) == (224, 7, 64, 1000)
    assert "performer_kernel_ratio" not in args
    assert infer_t2t_args(state, qk_scale=None, num_heads=8)["qk_scale"] is None


def test_not_a_t2t_state_dict_is_a_clear_error(tmp_path):
    vit_state = vitkit.create_model("vit_fmnist_tiny").state_dict()
    with pytest.raises(CheckpointError, match="not an official T2T-ViT state dict"):
        convert_t2t_state_dict(vit_state)
    weights, _ = _reference("performer")
    missing = {k: v for k, v in weights.items() if k != "tokens_to_token.attention2.kqv.bias"}
    with pytest.raises(CheckpointError, match="attention2.kqv.bias"):
        convert_t2t_state_dict(missing, num_heads=2)
    shuffled = dict(weights, pos_embed=weights["pos_embed"].flip(1))
    with pytest.raises(CheckpointError, match="sinusoid"):
        convert_t2t_state_dict(shuffled, num_heads=2)
    extra = dict(weights, **{"tokens_to_token.soft_split9.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="does not understand"):
        convert_t2t_state_dict(extra, num_heads=2)
    save_file(vit_state, str(tmp_path / "vit.safetensors"))
    assert cli_main(["convert", "t2t", str(tmp_path / "vit.safetensors"), str(tmp_path / "out")]) == 2


# ---------------------------------------------------------------------- resolution change
def test_resolution_change_recomputes_the_sinusoid(tmp_path):
    _, io = _reference("performer")
    convert_t2t(REFERENCE / "t2t_vit_performer_weights.safetensors", tmp_path / "ckpt", num_heads=2)
    dynamic = vitkit.from_pretrained(tmp_path / "ckpt", dynamic_img_size=True).eval()
    resized = vitkit.from_pretrained(tmp_path / "ckpt", img_size=96).eval()
    assert resized.grid == (6, 6) and torch.equal(resized.pos_embed, sinusoid_table(37, 64)[None])
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert torch.equal(dynamic(x), resized(x))
        assert _max_diff(dynamic(io["input"]), io["logits"]) <= TOL  # the built size still matches
        fmaps = dynamic.forward_intermediates(torch.randn(1, 3, 64, 96), intermediates_only=True)
    assert [f.shape for f in fmaps] == [(1, 64, 4, 6)] * 2  # non-square: the real (h, w) is tracked
    static = vitkit.from_pretrained(tmp_path / "ckpt").eval()
    with pytest.raises(InputShapeError, match="dynamic_img_size"):
        static(x)


# ---------------------------------------------------------------------- the model
def test_performer_random_features_are_fixed_and_saved(tmp_path):
    model = _tiny(tokens_type="performer").train()
    ws = {n: p for n, p in model.named_parameters() if n.endswith("attn.w")}
    assert sorted(ws) == ["tokens_to_token.token_blocks.0.attn.w", "tokens_to_token.token_blocks.1.attn.w"]
    assert all(not p.requires_grad and p.shape == (4, 8) for p in ws.values())
    before = {n: p.detach().clone() for n, p in ws.items()}
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.5)
    model(torch.randn(2, 3, 32, 32)).square().mean().backward()
    opt.step()
    assert all(torch.equal(p, before[n]) and p.grad is None for n, p in ws.items())
    model.save_pretrained(tmp_path / "ckpt")
    saved = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    assert all(torch.equal(saved[n], before[n]) for n in ws) and "pos_embed" not in saved
    loaded = vitkit.from_pretrained(tmp_path / "ckpt")
    assert torch.equal(loaded.tokens_to_token.token_blocks[0].attn.w, before[sorted(ws)[0]])


def test_attention_maps_per_token_type():
    x = torch.randn(1, 3, 32, 32)
    maps = _tiny(tokens_type="transformer").eval().attention_maps(x)
    assert [tuple(m.shape) for m in maps] == [(1, 1, 64, 64), (1, 1, 16, 16), (1, 2, 5, 5), (1, 2, 5, 5)]
    assert [tuple(m.shape) for m in _tiny(tokens_type="performer").eval().attention_maps(x)] == [(1, 2, 5, 5)] * 2
    model = _tiny(tokens_type="transformer").eval()
    with torch.no_grad():
        fast = model(x)
    with torch.no_grad(), capture_attention(model):
        explicit = model(x)
    torch.testing.assert_close(fast, explicit, atol=1e-5, rtol=1e-5)


def test_switches_and_interface():
    x = torch.randn(2, 3, 32, 48)
    model = _tiny(img_size=(32, 48), pool="gap", class_token=False)
    assert model.grid == (2, 3) and model(x).shape == (2, 4)
    assert model.forward_features(x).shape == (2, 6, 16)
    with pytest.raises(ValueError, match="class_token"):
        _tiny(pool="cls", class_token=False)
    with pytest.raises(ValueError, match="tokens_type"):
        _tiny(tokens_type="convolution")
    with pytest.raises(ValueError, match="divisible by the total T2T stride"):
        _tiny(img_size=40)
    model = _tiny().eval()
    with pytest.raises(InputShapeError, match="channel"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(InputShapeError, match="not divisible"):
        model(torch.randn(1, 3, 36, 36))
    assert model.no_weight_decay() == {"cls_token"}
    assert model.lr_layer_id("tokens_to_token.project.weight") == 0
    assert model.lr_layer_id("blocks.1.attn.qkv.weight") == 2
    assert model.lr_layer_id("head.weight") == model.num_lr_layers - 1 == 3
    model.reset_classifier(7, class_names=list("abcdefg"))
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 7) and model.model_args["num_classes"] == 7


def test_grad_checkpointing_is_exact():
    model = _tiny(tokens_type="transformer").train()
    x = torch.randn(2, 3, 32, 32)
    ref = model(x)
    model.set_grad_checkpointing()
    out = model(x)
    out.sum().backward()
    assert torch.equal(ref, out)


def test_fmnist_configs_match_the_vit_token_count_and_size():
    vit = vitkit.create_model("vit_fmnist_tiny")
    n_vit = sum(p.numel() for p in vit.parameters())
    for name in ("t2t_vit_fmnist_tiny", "t2t_vit_t_fmnist_tiny"):
        model = vitkit.create_model(name).eval()
        n = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert abs(n - n_vit) / n_vit < 0.05, (name, n, n_vit)
        assert model.grid == vit.grid == (7, 7)
        cfg = model.pretrained_cfg
        assert cfg["input_size"] == (1, 28, 28) and cfg["mean"] == (0.2860,) and len(cfg["class_names"]) == 10
        with torch.no_grad():
            assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_cli_passes_constructor_arguments_the_weights_cannot_tell(tmp_path):
    weights, io = _reference("transformer")
    src = tmp_path / "t2t.pth"
    torch.save(weights, src)
    assert cli_main(["convert", "t2t", str(src), str(tmp_path / "out"), "--arg", "num_heads=2"]) == 0
    model = vitkit.from_pretrained(tmp_path / "out").eval()
    assert model.model_args["num_heads"] == 2
    with torch.no_grad():
        assert _max_diff(model(io["input"]), io["logits"]) <= TOL
    assert cli_main(["convert", "t2t", str(src), str(tmp_path / "bad"), "--arg", "num_heads"]) == 2
