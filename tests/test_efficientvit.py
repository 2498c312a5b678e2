"""EfficientViT: parity with the official implementation's reference vectors, the converter on other layouts,
LiteMLA's two paths and attention maps, the registered sizes and the Fashion-MNIST config."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import vitkit
from vitkit.convert.efficientvit import (
    convert_efficientvit,
    convert_efficientvit_state_dict,
    infer_efficientvit_args,
    load_efficientvit,
)
from vitkit.data.constants import FMNIST_CLASSES
from vitkit.errors import CheckpointError, ConfigError, InputShapeError
from vitkit.layers.lite_mla import LiteMLA
from vitkit.models import load_weights
from vitkit.models.efficientvit import EfficientViT

# Data-only reference vectors made with the official code (see shared/reference/README.md). A missing folder
# is a failure, not a skip: parity is the point of this file.
REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "efficientvit"
WEIGHTS = REFERENCE / "efficientvit_cls_weights.safetensors"
TAGS = ("64x64", "96x96")
TOL = 1e-5


def _reference() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    for name in ("efficientvit_cls_weights.safetensors", "efficientvit_cls_io.safetensors"):
        assert (REFERENCE / name).is_file(), f"reference file not found: expected {REFERENCE / name}"
    return load_file(str(WEIGHTS)), load_file(str(REFERENCE / "efficientvit_cls_io.safetensors"))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The reference's reduction order: its convolutions equal ours bit for bit single-threaded, while with 2
    threads oneDNN splits some 24×24 reductions differently and the attention stages amplify that ~1 ulp to
    1.4e-5 (values reach 9, where one float32 ulp is 1e-6). One thread for the whole file also lets every test
    reuse oneDNN's compiled kernels instead of compiling them again per thread count."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def reference_model() -> tuple[EfficientViT, dict[str, torch.Tensor]]:
    _, io = _reference()
    return load_efficientvit(WEIGHTS).eval(), io


# ---------------------------------------------------------------------- parity with the official code
@pytest.mark.parametrize("tag", TAGS)
def test_reference_parity_every_stage_and_logits(reference_model, tag):
    model, io = reference_model
    x = io[f"input_{tag}"]
    with torch.no_grad():
        last, maps = model.forward_intermediates(x)
        logits = model(x)
    assert len(maps) == 5
    for i, fmap in enumerate(maps):
        ref = io[f"stage{i}_{tag}"]
        assert fmap.shape == ref.shape, f"stage{i}"
        assert _max_diff(fmap, ref) <= TOL, f"stage{i} at {tag}: max diff {_max_diff(fmap, ref):.2e}"
    assert torch.equal(last, maps[-1])
    assert _max_diff(logits, io[f"logits_{tag}"]) <= TOL


def test_converter_reads_the_reference_configuration():
    weights, _ = _reference()
    spec = json.loads((REFERENCE / "efficientvit_cls.json").read_text())
    backbone, head = spec["backbone_args"], spec["head_args"]
    args = infer_efficientvit_args(weights)
    assert args["widths"] == backbone["width_list"] and args["depths"] == backbone["depth_list"]
    assert args["in_chans"] == backbone["in_channels"] and args["dim"] == backbone["dim"]
    assert args["expand_ratio"] == backbone["expand_ratio"] and args["heads_ratio"] == 1.0
    assert args["head_widths"] == head["width_list"] and args["num_classes"] == head["n_classes"]
    assert args["scales"] == [5]


def test_the_reference_uses_both_attention_paths(reference_model):
    """At 64×64 the last stage's 2×2 map is <= dim (quadratic); at 96×96 every stage is linear."""
    model, io = reference_model
    blocks = [m for m in model.modules() if isinstance(m, LiteMLA)]
    seen: list[tuple[int, int]] = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: seen.append(tuple(out.shape[-2:]))) for m in blocks]
    try:
        with torch.no_grad():
            model(io["input_64x64"])
    finally:
        for h in hooks:
            h.remove()
    assert seen == [(4, 4), (2, 2)] and blocks[0].dim == 8  # 16 tokens: linear; 4 tokens: quadratic


# ---------------------------------------------------------------------- LiteMLA
def test_quadratic_and_linear_paths_agree():
    torch.manual_seed(0)
    mla = LiteMLA(32, dim=8, scales=(3, 5)).eval()
    x = torch.randn(2, 32, 5, 7)  # non-square, 35 tokens
    outs = {}
    for path in ("linear", "quadratic"):
        mla.force_path = path
        with torch.no_grad():
            outs[path] = mla(x)
    assert _max_diff(outs["linear"], outs["quadratic"]) <= TOL


def test_forcing_the_quadratic_path_keeps_reference_parity(reference_model):
    model, io = reference_model
    blocks = [m for m in model.modules() if isinstance(m, LiteMLA)]
    try:
        for m in blocks:
            m.force_path = "quadratic"
        with torch.no_grad():
            logits = model(io["input_96x96"])
    finally:
        for m in blocks:
            m.force_path = None
    assert _max_diff(logits, io["logits_96x96"]) <= TOL


def test_lite_mla_layout_and_heads():
    mla = LiteMLA(64, dim=8, scales=(5,))
    assert mla.heads == 8 and mla.qkv.conv.weight.shape == (192, 64, 1, 1)
    assert mla.aggreg[0][1].weight.shape == (192, 8, 1, 1) and mla.proj.conv.weight.shape == (64, 128, 1, 1)
    assert LiteMLA(64, dim=8, heads_ratio=0.5).heads == 4
    with pytest.raises(ValueError, match="no heads"):
        LiteMLA(4, dim=8)
    with pytest.raises(ValueError, match="odd"):
        LiteMLA(16, dim=8, scales=(4,))


def test_lite_mla_attends_in_fp32_under_autocast(monkeypatch):
    from vitkit.layers import lite_mla

    seen = []

    def spy(q, k, v, eps):
        seen.append((q.dtype, torch.is_autocast_enabled("cpu")))
        return lite_mla.relu_quadratic_attention(q, k, v, eps)[0]

    monkeypatch.setattr(lite_mla, "relu_linear_attention", spy)
    mla = LiteMLA(64, dim=8).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = mla(torch.randn(1, 64, 6, 6))
    assert seen == [(torch.float32, False)]
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


# ---------------------------------------------------------------------- attention maps
def test_attention_maps_rows_sum_to_one_and_do_not_change_the_output(reference_model):
    model, io = reference_model
    x = io["input_96x96"]
    with torch.no_grad():
        expected = model(x)
    with vitkit.layers.capture_attention(model) as maps, torch.no_grad():
        logits = model(x)
    assert [tuple(m.shape) for m in maps] == [(2, 16, 36, 36), (2, 32, 9, 9)]  # (B, 2·heads, N, N)
    for m in maps:
        torch.testing.assert_close(m.sum(-1), torch.ones_like(m.sum(-1)))
    assert _max_diff(logits, expected) <= TOL
    assert len(model.attention_maps(x)) == 2


def test_a_query_with_no_attention_gets_a_uniform_row():
    mla = LiteMLA(8, dim=8, scales=()).eval()
    with torch.no_grad():
        mla.qkv.conv.weight.zero_()
        mla.qkv.conv.weight[8:].normal_()  # q = 0 everywhere: every query has no attention
    with vitkit.layers.capture_attention(mla) as maps, torch.no_grad():
        out = mla.attend(mla.qkv(torch.randn(1, 8, 3, 3)).reshape(1, 1, 24, 9))
    assert torch.equal(out, torch.zeros_like(out))
    torch.testing.assert_close(maps[0], torch.full((1, 1, 9, 9), 1 / 9))


# ---------------------------------------------------------------------- converter
_TO_OFFICIAL = (
    (r"^stem\.in_conv\.", lambda m: "backbone.input_stem.op_list.0."),
    (r"^stem\.blocks\.(\d+)\.", lambda m: f"backbone.input_stem.op_list.{int(m[1]) + 1}.main."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.(context_module|local_module)\.",
     lambda m: f"backbone.stages.{m[1]}.op_list.{m[2]}.{m[3]}.main."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.", lambda m: f"backbone.stages.{m[1]}.op_list.{m[2]}.main."),
    (r"^head\.in_conv\.", lambda m: "head.op_list.0."),
    (r"^head\.fc\.", lambda m: "head.op_list.2.linear."),
    (r"^head\.norm\.", lambda m: "head.op_list.2.norm."),
    (r"^head\.classifier\.", lambda m: "head.op_list.3.linear."),
)


def _to_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """vitkit names -> the official ones (the inverse of the converter's renames, written independently)."""
    out = {}
    for key, value in state.items():
        for pattern, new in _TO_OFFICIAL:
            m = re.match(pattern, key)
            if m:
                out[new(m) + key[m.end():]] = value
                break
        else:
            raise AssertionError(f"no official name for {key}")
    return out


def test_inverse_renames_reproduce_the_official_names():
    weights, _ = _reference()
    _, ours = convert_efficientvit_state_dict(weights)
    assert set(_to_official(ours)) == set(weights)


def _random_model(**kw) -> EfficientViT:
    torch.manual_seed(0)
    model = EfficientViT(**kw)
    with torch.no_grad():  # non-trivial BN statistics, so a mis-assigned buffer shows in the output
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.normal_(0, 0.1)
            elif name.endswith("running_var"):
                buf.uniform_(0.5, 1.5)
    return model.eval()


# Layouts the reference does not cover: each must be read back from the weights alone.
OTHER_LAYOUTS = {
    "gray_6_stages_two_scales": dict(in_chans=1, widths=[8, 16, 24, 32, 40, 48], depths=[0, 1, 2, 1, 0, 2], dim=4,
                                     expand_ratio=6, scales=[3, 5], heads_ratio=2.0, head_widths=[32, 40],
                                     num_classes=7),
    "dsconv_local_blocks": dict(widths=[8, 16, 24, 32], depths=[2, 1, 1, 2], dim=8, expand_ratio=1,
                                head_widths=[16, 24], num_classes=3),
    "backbone_only": dict(widths=[8, 8, 16, 16, 32], depths=[1, 1, 1, 1, 1], dim=8, head_widths=None,
                          num_classes=0),
}


@pytest.mark.parametrize("name", list(OTHER_LAYOUTS))
def test_converter_infers_other_layouts(name):
    kw = OTHER_LAYOUTS[name]
    model = _random_model(**kw)
    official = _to_official(model.state_dict())
    args, state = convert_efficientvit_state_dict(official)
    for key, value in kw.items():
        assert args[key] == value, key
    converted = EfficientViT(**args)
    load_weights(converted, state)  # same class, same arguments and the same tensors: the same function
    own = model.state_dict()
    assert all(torch.equal(v, own[k]) for k, v in converted.state_dict().items())


def test_converter_needs_dim_without_aggregation():
    model = _random_model(widths=[8, 16, 16, 32], depths=[1, 1, 1, 1], dim=8, scales=[], head_widths=[16, 16],
                          num_classes=2)
    official = _to_official(model.state_dict())
    with pytest.raises(CheckpointError, match="--arg dim"):
        convert_efficientvit_state_dict(official)
    args, _ = convert_efficientvit_state_dict(official, dim=8)
    assert args["dim"] == 8 and args["scales"] == []


def test_load_pt_with_wrapper_prefix_and_official_act_name(tmp_path):
    weights, io = _reference()
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in weights.items()}, "epoch": 3}, path)
    model = load_efficientvit(path, act="hswish", img_size=96).eval()
    assert model.model_args["act"] == "hardswish" and model.pretrained_cfg["input_size"] == (3, 96, 96)
    with torch.no_grad():
        assert _max_diff(model(io["input_96x96"]), io["logits_96x96"]) <= 1e-4
    bare = {k[len("backbone."):]: v for k, v in weights.items() if k.startswith("backbone.")}
    save_file(bare, str(tmp_path / "backbone.safetensors"))
    backbone = load_efficientvit(tmp_path / "backbone.safetensors")
    assert backbone.num_classes == 0 and backbone.model_args["head_widths"] is None


def test_converter_errors_name_file_and_key(tmp_path):
    weights, _ = _reference()
    broken = dict(weights)
    broken.pop("backbone.stages.2.op_list.1.context_module.main.proj.conv.weight")
    save_file(broken, str(tmp_path / "broken.safetensors"))
    with pytest.raises(CheckpointError, match=r"broken\.safetensors.*stages\.2\.blocks\.1\.context_module\.proj"):
        load_efficientvit(tmp_path / "broken.safetensors")
    save_file({**weights, "backbone.extra.weight": torch.zeros(1)}, str(tmp_path / "extra.safetensors"))
    with pytest.raises(CheckpointError, match=r"extra\.safetensors.*backbone\.extra\.weight"):
        load_efficientvit(tmp_path / "extra.safetensors")
    save_file({"blocks.0.weight": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="not an official EfficientViT"):
        load_efficientvit(tmp_path / "other.safetensors")
    with pytest.raises(ConfigError, match="does not take"):
        load_efficientvit(WEIGHTS, window_size=7)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_efficientvit(tmp_path / "missing.pt")


def test_other_label_set_drops_only_the_classifier():
    with pytest.warns(UserWarning, match="dropped"):
        model = load_efficientvit(WEIGHTS, num_classes=4)
    weights, _ = _reference()
    assert torch.equal(model.head.fc.weight, weights["head.op_list.2.linear.weight"])
    assert model.head.classifier.weight.shape == (4, 112)


def test_convert_and_round_trip(tmp_path):
    _, io = _reference()
    model = convert_efficientvit(WEIGHTS, tmp_path / "ckpt").eval()
    assert model.model_name == "efficientvit"  # not one of the official sizes
    loaded = vitkit.from_pretrained(tmp_path / "ckpt").eval()
    assert type(loaded) is EfficientViT and loaded.model_args == model.model_args
    x = io["input_64x64"]
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_cli_convert(tmp_path):
    from vitkit.cli import main as cli_main
    from vitkit.convert import CONVERTERS

    if "efficientvit" not in CONVERTERS:
        pytest.skip("the 'efficientvit' converter is not registered in vitkit.convert.CONVERTERS yet")
    assert cli_main(["convert", "efficientvit", str(WEIGHTS), str(tmp_path / "out"), "--arg", "img_size=64"]) == 0
    assert tuple(vitkit.from_pretrained(tmp_path / "out").pretrained_cfg["input_size"]) == (3, 64, 64)


# ---------------------------------------------------------------------- registered sizes
# Parameters at 1000 classes: timm's model cards for the same official weights (efficientvit_b0..b3.r224_in1k:
# 3.4M, 9.1M, 24.3M, 48.6M); the official README (applications/efficientvit_cls) rounds B1-B3 to 9.1M, 24M, 49M.
PUBLISHED_PARAMS_M = {"efficientvit_b0": 3.4, "efficientvit_b1": 9.1, "efficientvit_b2": 24.3, "efficientvit_b3": 48.6}


@pytest.mark.parametrize("name", list(PUBLISHED_PARAMS_M))
def test_official_sizes_match_published_parameter_counts(name):
    with torch.device("meta"):
        model = vitkit.create_model(name)
    n = sum(p.numel() for p in model.parameters())
    assert round(n / 1e6, 1) == PUBLISHED_PARAMS_M[name]
    assert model.pretrained_cfg["input_size"] == (3, 224, 224) and model.num_classes == 1000


def test_official_b0_layout_matches_an_official_state_dict_shape():
    """B0 through the converter: the official names of a B0 state dict rebuild efficientvit_b0."""
    with torch.device("meta"):
        b0 = vitkit.create_model("efficientvit_b0")
    official = {k: torch.empty(v.shape) for k, v in _to_official(b0.state_dict()).items()}
    args, _ = convert_efficientvit_state_dict(official)
    assert (args["widths"], args["depths"], args["dim"], args["head_widths"]) == (
        [8, 16, 32, 64, 128], [1, 2, 2, 2, 2], 16, [1024, 1280])


# ---------------------------------------------------------------------- Fashion-MNIST config and interface
def test_fmnist_tiny_forward_backward():
    torch.manual_seed(0)
    model = vitkit.create_model("efficientvit_fmnist_tiny")
    n = sum(p.numel() for p in model.parameters())
    assert 140_000 <= n <= 460_000
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (1, 28, 28) and cfg["class_names"] == FMNIST_CLASSES and cfg["mean"] == (0.2860,)
    x = torch.randn(2, 1, 28, 28)
    model.train()
    last, maps = model.forward_intermediates(x)
    assert [m.shape[-1] for m in maps] == [28, 14, 7, 4, 2]
    logits = model.forward_head(last)
    assert logits.shape == (2, 10)
    torch.nn.functional.cross_entropy(logits, torch.arange(2)).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert not missing


def test_interface_intermediates_head_and_training_switches():
    model = _random_model(widths=[8, 8, 16, 16, 16], depths=[1, 1, 1, 1, 1], dim=8, head_widths=[16, 24],
                          num_classes=5, img_size=64)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits = model(x)
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
        two = model.forward_intermediates(x, indices=[1, -1], output_fmt="NHWC", intermediates_only=True)
    assert logits.shape == (2, 5) and pooled.shape == (2, model.num_features) == (2, 24)
    assert [tuple(t.shape) for t in two] == [(2, 16, 16, 8), (2, 2, 2, 16)]
    with pytest.raises(ValueError, match="stages"):
        model.forward_intermediates(x, indices=[5])
    with pytest.raises(InputShapeError, match="3 input channel"):
        model(torch.randn(1, 1, 64, 64))
    model.reset_classifier(3, class_names=["a", "b", "c"])
    assert model(x).shape == (2, 3) and model.model_args["num_classes"] == 3
    assert model.head.fc.weight.shape == (24, 16)  # the rest of the head is kept
    ids = {n: model.lr_layer_id(n) for n, _ in model.named_parameters()}
    assert ids["stem.in_conv.conv.weight"] == 0 and ids["head.classifier.weight"] == model.num_lr_layers - 1
    assert ids["stages.3.blocks.1.context_module.qkv.conv.weight"] == model.num_lr_layers - 2
    model.train()
    torch.manual_seed(0)
    plain = model(x)
    model.set_grad_checkpointing(True)
    torch.manual_seed(0)
    torch.testing.assert_close(model(x), plain)
    with pytest.raises(ValueError, match="local stages"):
        EfficientViT(widths=[8, 16], depths=[1, 1])
    with pytest.raises(ValueError, match="stem_stride"):
        EfficientViT(stem_stride=4)


def test_bf16_weights_run():
    model = _random_model(widths=[8, 8, 16, 16, 16], depths=[1, 1, 1, 1, 1], dim=8, head_widths=[16, 16],
                          num_classes=2).to(torch.bfloat16)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        out = model(torch.randn(1, 3, 48, 48))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
