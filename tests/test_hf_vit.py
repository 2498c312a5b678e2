"""Parity with Hugging Face transformers' ViT: tiny random configs, converted, compared in fp32."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import ViTConfig, ViTForImageClassification, ViTModel  # noqa: E402

import vitkit  # noqa: E402
from vitkit.cli import main as cli_main  # noqa: E402
from vitkit.convert import convert_hf_vit, load_hf_vit  # noqa: E402
from vitkit.errors import CheckpointError  # noqa: E402


def _hf_model(cls, image_size=32, num_labels=7, **kw):
    torch.manual_seed(0)
    cfg = ViTConfig(image_size=image_size, patch_size=4, hidden_size=48, num_hidden_layers=3, num_attention_heads=3,
                    intermediate_size=96, num_labels=num_labels,
                    id2label={i: f"class{i}" for i in range(num_labels)}, **kw)
    model = cls(cfg).eval()
    with torch.no_grad():  # non-trivial weights: HF's init has zero biases and unit norms
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


def _max_diff(a, b) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("image_size", [32, (32, 48)], ids=["square", "non_square"])
def test_classification_parity(tmp_path, image_size):
    hf = _hf_model(ViTForImageClassification, image_size)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_hf_vit(tmp_path / "hf").eval()
    size = (image_size, image_size) if isinstance(image_size, int) else image_size
    x = torch.randn(3, 3, *size)
    with torch.no_grad():
        ref = hf(x, output_hidden_states=True)
        assert _max_diff(ref.logits, ours(x)) <= 1e-5
        # HF's hidden_states[-1] is before the final LayerNorm
        assert _max_diff(ours.norm(ref.hidden_states[-1]), ours.forward_features(x)) <= 1e-5
    assert ours.pretrained_cfg["class_names"] == [f"class{i}" for i in range(7)]


def test_base_model_parity_with_pooler(tmp_path):
    hf = _hf_model(ViTModel)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_hf_vit(tmp_path / "hf").eval()
    assert ours.num_classes == 0
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = hf(x)
        feats = ours.forward_features(x)
        assert _max_diff(ref.last_hidden_state, feats) <= 1e-5
        assert _max_diff(ref.pooler_output, ours.forward_head(feats, pre_logits=True)) <= 1e-5


@pytest.mark.parametrize("cls", [ViTForImageClassification, ViTModel])
def test_interpolated_position_parity(tmp_path, cls):
    hf = _hf_model(cls)
    hf.save_pretrained(tmp_path / "hf")
    convert_hf_vit(tmp_path / "hf", tmp_path / "ours")
    ours = vitkit.from_pretrained(tmp_path / "ours", dynamic_img_size=True).eval()
    for size in [(48, 48), (40, 56), (24, 24)]:
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            ref = hf(x, interpolate_pos_encoding=True)
            if cls is ViTModel:
                assert _max_diff(ref.last_hidden_state, ours.forward_features(x)) <= 1e-4
            else:
                assert _max_diff(ref.logits, ours(x)) <= 1e-4


def test_fine_tune_resolution_from_converted_checkpoint(tmp_path):
    """Pretrain at 32, fine-tune at 48: the table is resampled on load like HF's interpolation."""
    hf = _hf_model(ViTForImageClassification)
    hf.save_pretrained(tmp_path / "hf")
    convert_hf_vit(tmp_path / "hf", tmp_path / "ours")
    ours = vitkit.from_pretrained(tmp_path / "ours", img_size=48).eval()
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert _max_diff(hf(x, interpolate_pos_encoding=True).logits, ours(x)) <= 1e-4


def test_pytorch_bin_and_cli(tmp_path, capsys):
    hf = _hf_model(ViTForImageClassification, qkv_bias=False)
    # An old-style folder: config.json + pytorch_model.bin (read with weights_only=True), with the key names
    # of the in-memory model (transformers 5 renames modules; files on the Hub keep the old names).
    (tmp_path / "hf").mkdir()
    hf.config.save_pretrained(tmp_path / "hf")
    torch.save(hf.state_dict(), tmp_path / "hf" / "pytorch_model.bin")
    assert cli_main(["convert", "hf-vit", str(tmp_path / "hf"), str(tmp_path / "out")]) == 0
    assert "wrote" in capsys.readouterr().out
    ours = vitkit.from_pretrained(tmp_path / "out").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert _max_diff(hf(x).logits, ours(x)) <= 1e-5


def test_converter_errors_name_the_problem(tmp_path, capsys):
    hf = _hf_model(ViTForImageClassification)
    hf.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text('{"model_type": "swin"}')
    with pytest.raises(CheckpointError, match="model_type is 'swin'"):
        load_hf_vit(tmp_path / "hf")
    assert cli_main(["convert", "hf-vit", str(tmp_path / "nothing"), str(tmp_path / "out")]) == 2
    assert "is not a folder" in capsys.readouterr().err
