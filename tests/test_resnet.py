"""ResNet: parity with timm's ResNet through the ``timm-resnet`` converter (basic and bottleneck blocks, several
layouts, one input channel), refused checkpoints, checkpoint round trips, per-stage maps and the Fashion-MNIST
config's compute against vit_fmnist_tiny's."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch.utils.flop_counter import FlopCounterMode

import vitkit
from _peers import import_peer
from vitkit.cli import main
from vitkit.convert import convert
from vitkit.convert.timm_resnet import convert_timm_resnet_state_dict, load_timm_resnet
from vitkit.errors import AssumedValueWarning, CheckpointError, ConfigError, InputShapeError
from vitkit.models import ResNet, model_defaults

TOL = 1e-5
# (timm block, layers, channels, in_chans, num_classes, input H x W): two basic and two bottleneck layouts, one
# single-channel, one headless, one 4-layer, one non-square input
CASES = {
    "basic-2-layers-gray": ("BasicBlock", [1, 2], (8, 16), 1, 7, (32, 32)),
    "basic-4-layers": ("BasicBlock", [1, 1, 1, 1], (8, 8, 16, 16), 3, 5, (32, 32)),
    "bottleneck-3-layers": ("Bottleneck", [2, 1, 1], (4, 8, 16), 3, 6, (24, 20)),
    "bottleneck-4-layers-headless": ("Bottleneck", [1, 1, 2, 1], (4, 8, 8, 16), 2, 0, (32, 32)),
}


@pytest.fixture(scope="module")
def timm_resnet():
    timm = import_peer("timm")
    from timm.models import resnet as timm_resnet_module

    def build(case: str) -> torch.nn.Module:
        block, layers, channels, in_chans, num_classes, _ = CASES[case]
        torch.manual_seed(0)
        model = timm_resnet_module.ResNet(block=getattr(timm_resnet_module, block), layers=layers, channels=channels,
                                          in_chans=in_chans, num_classes=num_classes)
        _perturb(model)
        return model.eval()

    assert timm.__version__
    return build


def _perturb(model: torch.nn.Module) -> None:
    """Random norms and running statistics (timm zeroes each branch's last BN: parity would not see the branch)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


def _timm_folder(tmp_path: Path, model: torch.nn.Module, case: str, state: dict | None = None) -> Path:
    """What timm's push_to_hf_hub writes: model.safetensors and a config.json telling pooling, size and stats."""
    *_, in_chans, num_classes, size = CASES[case]
    folder = tmp_path / case
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in (state or model.state_dict()).items()}, str(folder / "model.safetensors"))
    config = {"architecture": "resnet18", "num_classes": num_classes, "global_pool": "avg",
              "pretrained_cfg": {"input_size": [in_chans, *size], "mean": [0.4] * in_chans, "std": [0.2] * in_chans,
                                 "interpolation": "bicubic"}}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _timm_stages(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """timm's stem (after act1, its feature 0) and every layer's output (timm's own forward_intermediates and
    forward_features need all four layers)."""
    x = model.act1(model.bn1(model.conv1(x)))
    maps = [x]
    x = model.maxpool(x)
    i = 1
    while hasattr(model, f"layer{i}"):
        x = getattr(model, f"layer{i}")(x)
        maps.append(x)
        i += 1
    return maps


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ---------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("case", list(CASES))
def test_parity_with_timm(case, timm_resnet, tmp_path):
    reference = timm_resnet(case)
    folder = _timm_folder(tmp_path, reference, case)
    with warnings.catch_warnings():
        warnings.simplefilter("error", AssumedValueWarning)  # the config tells everything the weights do not
        model = load_timm_resnet(folder).eval()
    block, layers, channels, in_chans, num_classes, size = CASES[case]
    assert isinstance(model, ResNet) and model.model_args["block"] == ("basic" if block == "BasicBlock" else
                                                                       "bottleneck")
    assert model.model_args["layers"] == layers and model.model_args["widths"] == list(channels)
    assert model.pretrained_cfg["mean"] == (0.4,) * in_chans and model.pretrained_cfg["interpolation"] == "bicubic"
    x = torch.randn(2, in_chans, *size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected_maps = _timm_stages(reference, x)
        _, maps = model.forward_intermediates(x)
        assert [m.shape for m in maps] == [m.shape for m in expected_maps]
        for ours, theirs in zip(maps, expected_maps):
            assert _diff(ours, theirs) <= TOL
        feats = model.forward_features(x)
        assert _diff(feats, expected_maps[-1]) <= TOL
        assert _diff(model.forward_head(feats, pre_logits=True), reference.forward_head(expected_maps[-1], True)) <= TOL
        logits = model(x)
        assert logits.shape == (2, num_classes or model.num_features)
        assert _diff(logits, reference.forward_head(expected_maps[-1])) <= TOL
        if len(layers) == 4:  # timm's whole forward passes, and its own intermediates
            assert _diff(logits, reference(x)) <= TOL
            for ours, theirs in zip(maps, reference.forward_intermediates(x, intermediates_only=True)):
                assert _diff(ours, theirs) <= TOL


def test_state_dict_conversion_announces_what_only_a_config_tells(timm_resnet):
    reference = timm_resnet("bottleneck-3-layers")
    state = {f"module.{k}": v for k, v in reference.state_dict().items() if not k.endswith("num_batches_tracked")}
    with pytest.warns(AssumedValueWarning) as record:
        args, converted = convert_timm_resnet_state_dict(state)
    said = " | ".join(str(w.message) for w in record)
    assert "assumed global_pool='avg'" in said and "assumed img_size=224" in said
    model = ResNet(**args).eval()
    model.load_state_dict(converted)  # strict: every key, num_batches_tracked filled in
    x = torch.randn(1, 3, 24, 20)
    with torch.no_grad():
        assert _diff(model(x), reference.forward_head(_timm_stages(reference, x)[-1])) <= TOL


def test_cli_convert_then_auto_open(timm_resnet, tmp_path):
    reference = timm_resnet("basic-2-layers-gray")
    folder = _timm_folder(tmp_path, reference, "basic-2-layers-gray")
    auto = vitkit.from_pretrained(folder).eval()  # a timm folder naming a resnet architecture: this converter
    assert main(["convert", "timm-resnet", str(folder), str(tmp_path / "out"), "--arg", "drop_rate=0.1"]) == 0
    converted = vitkit.from_pretrained(tmp_path / "out").eval()
    assert isinstance(auto, ResNet) and converted.model_args["drop_rate"] == 0.1
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        expected = reference.forward_head(_timm_stages(reference, x)[-1])
        assert _diff(auto(x), expected) <= TOL and torch.equal(converted(x), auto(x))


# ---------------------------------------------------------------------------------------------- refused input
def _grouped(state: dict) -> dict:
    state["layer1.0.conv2.weight"] = state["layer1.0.conv2.weight"][:, :4].contiguous()
    return state


BAD = {
    "missing key": (lambda s: {k: v for k, v in s.items() if k != "layer2.0.bn1.running_var"},
                    "layer2.0.bn1.running_var"),
    "squeeze-excitation": (lambda s: {**s, "layer1.0.se.fc1.weight": torch.zeros(2, 8, 1, 1)}, "layer1.0.se.fc1"),
    "deep stem": (lambda s: {**{k: v for k, v in s.items() if k != "conv1.weight"},
                             "conv1.0.weight": torch.zeros(32, 1, 3, 3)}, "conv1.0.weight"),
    "grouped conv": (_grouped, "layer1.0.conv2.weight"),
    "stray key": (lambda s: {**s, "head.fc.weight": torch.zeros(7, 16)}, "head.fc.weight"),
}


@pytest.mark.parametrize("bad", list(BAD))
def test_a_bad_checkpoint_is_one_clear_error(bad, timm_resnet, tmp_path, capsys):
    reference = timm_resnet("basic-2-layers-gray")
    mutate, named = BAD[bad]
    folder = _timm_folder(tmp_path, reference, "basic-2-layers-gray", mutate(dict(reference.state_dict())))
    with pytest.raises(CheckpointError) as info:
        load_timm_resnet(folder)
    assert named in str(info.value) and "\n" not in str(info.value)
    assert main(["convert", "timm-resnet", str(folder), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and named in err and not (tmp_path / "out").exists()


def test_config_settings_the_weights_cannot_show_are_refused(timm_resnet, tmp_path):
    folder = _timm_folder(tmp_path, timm_resnet("basic-2-layers-gray"), "basic-2-layers-gray")
    config = json.loads((folder / "config.json").read_text())
    for change, named in (({"model_args": {"output_stride": 16}}, "output_stride"),
                          ({"global_pool": "max"}, "global_pool"), ({"architecture": "resnetblur50"}, "anti-alias")):
        (folder / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(ConfigError, match=named):
            convert("timm-resnet", str(folder), str(tmp_path / "out"))


# ---------------------------------------------------------------------------------------------- the vitkit model
def _with_stats(model: ResNet) -> ResNet:
    _perturb(model)
    return model.eval()


def test_save_pretrained_and_create_model_round_trip(tmp_path):
    torch.manual_seed(0)
    model = _with_stats(vitkit.create_model("resnet_fmnist_tiny"))
    model.save_pretrained(tmp_path / "ckpt")
    x = torch.randn(3, 1, 28, 28)
    via_registry = vitkit.create_model("resnet_fmnist_tiny", pretrained=tmp_path / "ckpt").eval()
    loaded = vitkit.from_pretrained(tmp_path / "ckpt").eval()
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(via_registry(x), expected) and torch.equal(loaded(x), expected)
    assert loaded.pretrained_cfg["class_names"] == model.pretrained_cfg["class_names"]
    with pytest.warns(UserWarning, match="classifier head .* dropped"):
        other = vitkit.create_model("resnet_fmnist_tiny", pretrained=tmp_path / "ckpt", num_classes=3).eval()
    with torch.no_grad():
        assert torch.equal(other.forward_features(x), model.forward_features(x)) and other(x).shape == (3, 3)


@pytest.mark.parametrize("name, size", [("resnet_fmnist_tiny", (28, 28)), ("resnet50", (64, 48))])
def test_forward_intermediates_shapes(name, size):
    defaults = model_defaults(name)
    over = {} if name == "resnet_fmnist_tiny" else dict(widths=[4, 4, 8, 8], stem_width=8, layers=[1, 1, 1, 1])
    model = vitkit.create_model(name, **over).eval()
    widths, expansion = over.get("widths", defaults["widths"]), 4 if defaults["block"] == "bottleneck" else 1
    small = defaults.get("stem") == "small"
    h, w = size
    stem = 1 if small else 2
    expected = [(over.get("stem_width", widths[0]), -(-h // stem), -(-w // stem))]
    stride = 1 if small else 4
    for i, width in enumerate(widths):
        stride *= 1 if i == 0 else 2
        expected.append((width * expansion, -(-h // stride), -(-w // stride)))
    x = torch.randn(2, defaults.get("in_chans", 3), h, w)
    with torch.no_grad():
        last, maps = model.forward_intermediates(x)
        assert [tuple(m.shape[1:]) for m in maps] == expected and torch.equal(last, model.forward_features(x))
        nhwc = model.forward_intermediates(x, indices=[0, -1], output_fmt="NHWC", intermediates_only=True)
        assert [tuple(m.shape[1:]) for m in nhwc] == [(*expected[i][1:], expected[i][0]) for i in (0, -1)]
        only_stem = model.forward_intermediates(x, indices=[0], intermediates_only=True)
        assert torch.equal(only_stem[0], maps[0])
    with pytest.raises(ValueError, match="valid indices"):
        model.forward_intermediates(x, indices=[len(widths) + 1])


def test_fmnist_tiny_flops_match_vit_fmnist_tiny():
    """resnet_fmnist_tiny is the ViT's compute-matched CNN baseline: forward FLOPs within ±25%."""
    flops = {}
    for name in ("resnet_fmnist_tiny", "vit_fmnist_tiny"):
        model = vitkit.create_model(name).eval()
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.randn(1, *model.pretrained_cfg["input_size"]))
        flops[name] = counter.get_total_flops()
    ratio = flops["resnet_fmnist_tiny"] / flops["vit_fmnist_tiny"]
    assert 0.75 <= ratio <= 1.25, flops


def test_no_attention_maps_and_clear_input_errors():
    model = vitkit.create_model("resnet_fmnist_tiny").eval()
    with pytest.raises(ConfigError, match="no attention layers"):
        model.attention_maps(torch.randn(1, 1, 28, 28))
    with pytest.raises(InputShapeError, match="1 input channel"):
        model(torch.randn(1, 3, 28, 28))
    for bad, named in ((dict(layers=[]), "layers"), (dict(widths=[8, 16]), "widths"), (dict(block="wide"), "block"),
                       (dict(stem="deep"), "stem"), (dict(global_pool="max"), "global_pool")):
        with pytest.raises(ValueError, match=named):
            vitkit.create_model("resnet_fmnist_tiny", **bad)


def test_layer_decay_ids_run_from_stem_to_head():
    model = vitkit.create_model("resnet18", layers=[1, 2], widths=[4, 8], num_classes=3)
    ids = {name: model.lr_layer_id(name) for name, _ in model.named_parameters()}
    assert ids["conv1.weight"] == 0 and ids["fc.weight"] == model.num_lr_layers - 1 == 4
    assert [ids[f"{b}.conv1.weight"] for b in ("layer1.0", "layer2.0", "layer2.1")] == [1, 2, 3]
