"""Parity with timm: tiny random ViT / DeiT / Swin / EfficientViT-B models, converted with ``vitkit convert timm``
and compared in fp32 eval mode (max abs diff <= 1e-5)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import vitkit
from _peers import import_peer
from vitkit.convert import convert, convert_timm_state_dict, load_timm
from vitkit.errors import AssumedValueWarning, CheckpointError, ConfigError

timm = import_peer("timm")
from timm.models._hub import save_config_for_hf  # noqa: E402


def _timm_model(arch: str, **kwargs) -> torch.nn.Module:
    """A timm model with perturbed weights and BN statistics (its init has zero biases, unit norms, zero tokens)."""
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, **kwargs).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.add_(torch.randn_like(b) * 0.1)
            elif name.endswith("running_var"):
                b.mul_(torch.rand_like(b) + 0.5)
    return model


def _save(model: torch.nn.Module, folder: Path, config: bool = True, pth: bool = False) -> Path:
    """The model's state dict (safetensors, or a .pth) and, with ``config``, timm's config.json beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    path = folder / ("weights.pth" if pth else "model.safetensors")
    torch.save(state, path) if pth else save_file(state, path)
    if config:
        save_config_for_hf(model, str(folder / "config.json"))
    return path


def _assert_parity(ref: torch.nn.Module, ours: torch.nn.Module, size: tuple[int, int], chans: int = 3) -> None:
    x = torch.randn(2, chans, *size)
    with torch.no_grad():
        expected, got = ref(x), ours.eval()(x)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-5


@contextmanager
def _no_assumptions() -> Iterator[None]:
    """Fail on any AssumedValueWarning: the config.json must tell everything the weights do not."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", AssumedValueWarning)
        yield


VIT_CASES = {
    "cls": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)),
    "registers": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=4,
                                               reg_tokens=2, no_embed_class=True)),
    "gap_gray": ("vit_tiny_patch16_224", dict(img_size=16, patch_size=4, embed_dim=16, depth=1, num_heads=2,
                                              class_token=False, global_pool="avg", in_chans=1)),
    "gap_with_cls": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, embed_dim=24, depth=1, num_heads=3,
                                                  global_pool="avg", fc_norm=False)),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", dict(img_size=32, patch_size=8, embed_dim=32, depth=1,
                                                               num_heads=2)),
    "clip_nonsquare": ("vit_base_patch32_clip_quickgelu_224", dict(img_size=(16, 32), patch_size=8, embed_dim=32,
                                                                  depth=1, num_heads=2, qkv_bias=False,
                                                                  init_values=0.1)),
}


@pytest.mark.parametrize("case", list(VIT_CASES))
def test_vit_parity_with_config(tmp_path, case):
    arch, kwargs = VIT_CASES[case]
    ref = _timm_model(arch, num_classes=5, **kwargs)
    _save(ref, tmp_path / "timm")
    with _no_assumptions():  # the config.json tells everything the weights do not
        convert("timm", str(tmp_path / "timm"), str(tmp_path / "ours"))
    ours = vitkit.from_pretrained(tmp_path / "ours")
    size = kwargs["img_size"] if isinstance(kwargs["img_size"], tuple) else (kwargs["img_size"],) * 2
    _assert_parity(ref, ours, size, kwargs.get("in_chans", 3))
    cfg = ours.pretrained_cfg
    assert ours.num_classes == 5 and tuple(cfg["input_size"]) == (kwargs.get("in_chans", 3), *size)
    assert list(cfg["mean"]) == pytest.approx(ref.pretrained_cfg["mean"][:kwargs.get("in_chans", 3)])
    assert type(ours).__name__ == ("DistilledVisionTransformer" if "distilled" in arch else "VisionTransformer")


def test_vit_pth_without_config_needs_heads_and_announces_assumptions(tmp_path):
    ref = _timm_model("vit_tiny_patch16_224", num_classes=3, img_size=32, patch_size=8, embed_dim=32, depth=1,
                      num_heads=4, reg_tokens=1)
    path = _save(ref, tmp_path, config=False, pth=True)
    with pytest.raises(ConfigError, match="num_heads") as err:
        load_timm(path)
    assert "\n" not in str(err.value)
    with pytest.warns(AssumedValueWarning, match="act='gelu'"):
        ours = load_timm(path, num_heads=4)
    _assert_parity(ref, ours, (32, 32))


def test_vit_ambiguous_pooling_is_announced_and_config_decides(tmp_path):
    arch, kwargs = VIT_CASES["gap_with_cls"]
    ref = _timm_model(arch, num_classes=5, **kwargs)
    _save(ref, tmp_path / "bare", config=False)
    with pytest.warns(AssumedValueWarning, match="global_pool='token'"):
        guessed = load_timm(tmp_path / "bare", num_heads=3)
    assert guessed.pool == "cls"  # what the weights suggest, announced; the config says otherwise
    ours = load_timm(tmp_path / "bare", num_heads=3, global_pool="avg")
    _assert_parity(ref, ours, (32, 32))


def test_vit_unknown_keys_are_named(tmp_path):
    ref = _timm_model("vit_tiny_patch16_224", num_classes=5, img_size=16, patch_size=8, embed_dim=16, depth=1,
                      num_heads=2, qk_norm=True)
    _save(ref, tmp_path)
    with pytest.raises(CheckpointError, match=r"blocks\.0\.attn\.q_norm\.weight"):
        load_timm(tmp_path)
    state = {k: v for k, v in ref.state_dict().items() if "_norm." not in k}
    cls, args, converted = convert_timm_state_dict(state, None, "state", num_heads=2, act="gelu", norm_eps=1e-6,
                                                   global_pool="token")
    assert cls.__name__ == "VisionTransformer" and args["num_heads"] == 2 and args["img_size"] == 16
    assert "pos_embed.weight" in converted and "pos_embed" not in converted


SWIN_CASES = {  # (kwargs, image size): maps larger than and multiples of the window, or square and within it
    "two_stages": (dict(img_size=32, patch_size=2, embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4),
                   (32, 32)),
    "gray_clamped_no_qkv_bias": (dict(img_size=32, patch_size=4, embed_dim=8, depths=(2, 1, 1), num_heads=(1, 2, 4),
                                      window_size=4, in_chans=1, qkv_bias=False, mlp_ratio=2.0), (32, 32)),
    "nonsquare": (dict(img_size=(32, 48), patch_size=2, embed_dim=8, depths=(2, 2), num_heads=(2, 2),
                       window_size=4), (32, 48)),
}


@pytest.mark.parametrize("case", list(SWIN_CASES))
def test_swin_parity(tmp_path, case):
    kwargs, size = SWIN_CASES[case]
    ref = _timm_model("swin_tiny_patch4_window7_224", num_classes=5, **kwargs)
    _save(ref, tmp_path / "timm")
    with _no_assumptions():
        model = convert("timm", str(tmp_path / "timm"), str(tmp_path / "ours"))
    assert type(model).__name__ == "SwinTransformer" and model.window_size == 4
    ours = vitkit.from_pretrained(tmp_path / "ours")
    _assert_parity(ref, ours, size, kwargs.get("in_chans", 3))
    assert tuple(ours.pretrained_cfg["input_size"]) == (kwargs.get("in_chans", 3), *size)


def test_swin_without_config_and_refused_geometry(tmp_path):
    kwargs, size = SWIN_CASES["two_stages"]
    ref = _timm_model("swin_tiny_patch4_window7_224", num_classes=5, **kwargs)
    _save(ref, tmp_path, config=False)
    with pytest.warns(AssumedValueWarning, match="act='gelu'"):
        ours = load_timm(tmp_path / "model.safetensors", img_size=32)
    _assert_parity(ref, ours, size)
    # at 40 px the second stage's 10x10 map is not a multiple of the window 4: timm rolls, then pads
    with pytest.raises(CheckpointError, match="shifted windows"):
        load_timm(tmp_path / "model.safetensors", img_size=40)


EFFICIENTVIT_CASES = {
    "b0_like": dict(widths=(8, 16, 24, 32, 48), depths=(1, 1, 1, 1, 1), head_dim=8, head_widths=(32, 48)),
    "gray_more_heads": dict(widths=(8, 16, 16, 32, 32), depths=(1, 2, 1, 2, 1), head_dim=4, head_widths=(24, 32),
                            in_chans=1),
    "dsconv_headless": dict(widths=(8, 8, 16, 16, 24), depths=(0, 1, 1, 1, 1), head_dim=8, head_widths=(16, 24),
                            expand_ratio=1, num_classes=0),
}


@pytest.mark.parametrize("case", list(EFFICIENTVIT_CASES))
def test_efficientvit_parity(tmp_path, case):
    kwargs = {"num_classes": 5, **EFFICIENTVIT_CASES[case]}
    ref = _timm_model("efficientvit_b0", **kwargs)
    _save(ref, tmp_path / "timm")
    with _no_assumptions():
        convert("timm", str(tmp_path / "timm"), str(tmp_path / "ours"))
    ours = vitkit.from_pretrained(tmp_path / "ours")
    assert ours.num_classes == kwargs["num_classes"]
    _assert_parity(ref, ours, (64, 64), kwargs.get("in_chans", 3))


def test_efficientvit_without_config_announces_and_refuses_other_activations(tmp_path):
    ref = _timm_model("efficientvit_b0", num_classes=5, **EFFICIENTVIT_CASES["b0_like"])
    path = _save(ref, tmp_path, config=False, pth=True)
    with pytest.warns(AssumedValueWarning, match="act='hardswish'"):
        ours = load_timm(path)
    _assert_parity(ref, ours, (32, 32))
    with pytest.raises(ConfigError, match="hardswish"):
        load_timm(path, act="gelu")
    state = dict(ref.state_dict(), **{"stages.3.blocks.1.extra.weight": torch.zeros(1)})
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "extra.safetensors")
    with pytest.raises(CheckpointError, match=r"stages\.3\.blocks\.1\.extra\.weight"):
        load_timm(tmp_path / "extra.safetensors")


def test_cli_convert_and_family_errors(tmp_path):
    from vitkit.cli import main as cli_main

    arch, kwargs = VIT_CASES["cls"]
    ref = _timm_model(arch, num_classes=5, **kwargs)
    _save(ref, tmp_path / "timm", config=False)
    assert cli_main(["convert", "timm", str(tmp_path / "timm"), str(tmp_path / "out"), "--arg", "num_heads=2",
                     "--arg", "mean=[0.5,0.5,0.5]", "--arg", "std=[0.5,0.5,0.5]"]) == 0
    _assert_parity(ref, vitkit.from_pretrained(tmp_path / "out"), (32, 32))
    with pytest.raises(ConfigError, match="family"):
        load_timm(tmp_path / "timm", family="resnet")
    save_file({"conv1.weight": torch.zeros(2, 3, 3, 3)}, tmp_path / "resnet.safetensors")
    with pytest.raises(CheckpointError, match="family"):
        load_timm(tmp_path / "resnet.safetensors")


def test_vit_hub_config_without_model_args(tmp_path):
    """An older timm hub config.json (no model_args): the architecture name gives the heads, pretrained_cfg the
    image size and normalisation, label_names the class names."""
    import json

    ref = _timm_model("vit_small_patch16_224", num_classes=3, img_size=32, depth=1)
    _save(ref, tmp_path, config=False)
    config = {"architecture": "vit_small_patch16_224.augreg_in21k_ft_in1k", "num_classes": 3,
              "label_names": ["cat", "dog", "fish"],
              "pretrained_cfg": {"input_size": [3, 32, 32], "mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6]}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with _no_assumptions():
        ours = load_timm(tmp_path)
    assert ours.model_args["num_heads"] == 6 and ours.pretrained_cfg["class_names"] == ["cat", "dog", "fish"]
    assert tuple(ours.pretrained_cfg["mean"]) == (0.1, 0.2, 0.3)
    _assert_parity(ref, ours, (32, 32))
    (tmp_path / "config.json").write_text(json.dumps({**config, "pretrained_cfg": {"std": [0.0, 1.0, 1.0]}}))
    with pytest.raises(CheckpointError, match="std"):
        load_timm(tmp_path)
