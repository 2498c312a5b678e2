"""``vitkit export openvino``: tiny ViTs written as OpenVINO IR folders (fp32 and NNCF int8), read back with
OpenVINO and compared with PyTorch, the metadata, the destination rules, atomicity and the missing extra."""

from __future__ import annotations

import json
import sys

import pytest
import torch

ov = pytest.importorskip("openvino")
pytest.importorskip("nncf")
pytest.importorskip("onnx")

import vitkit  # noqa: E402
from test_data import data_no_system_dirs, write_fake_fmnist  # noqa: E402, F401  (fixture)
from vitkit.cli import main as cli_main  # noqa: E402
from vitkit.engine.config import config_to_yaml, load_config  # noqa: E402
from vitkit.errors import ConfigError, MissingExtraError  # noqa: E402
from vitkit.tools import export_openvino as xov  # noqa: E402
from vitkit.tools.export import ParityError, _metadata  # noqa: E402
from vitkit.tools.export_openvino import BIN, CONFIG, MARKER, XML, export_openvino  # noqa: E402
from vitkit.tools.runtimes import calibration_images  # noqa: E402
from vitkit.utils import OutputPathError  # noqa: E402

VIT = dict(embed_dim=24, depth=1, num_heads=2)


def _vit(seed: int = 0) -> torch.nn.Module:
    """A tiny Fashion-MNIST ViT with non-trivial weights (fresh LayerNorms are ones and zeros)."""
    torch.manual_seed(seed)
    model = vitkit.create_model("vit_fmnist_tiny", **VIT)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


def _run_ov(folder, x: torch.Tensor) -> torch.Tensor:
    """The folder's IR read and compiled by OpenVINO itself (not through vitkit's runtime)."""
    compiled = ov.Core().compile_model(ov.Core().read_model(str(folder / XML)), "CPU",
                                       {"INFERENCE_PRECISION_HINT": "f32"})
    return torch.from_numpy(compiled(x.numpy())[0].copy())


def _tiny_run(root) -> tuple:
    """A checkpoint folder as training leaves it: weights, config and the train_config.yaml of its run."""
    write_fake_fmnist(root / "fm", n_train=40, n_test=10)
    model = _vit()
    ckpt = root / "run" / "checkpoints" / "best"
    model.save_pretrained(ckpt)
    cfg = load_config(None, [f"data.data_dir={root / 'fm'}", "data.download=false",
                             *(f"model.args.{k}={v}" for k, v in VIT.items())])
    (ckpt / "train_config.yaml").write_text(config_to_yaml(cfg))
    return model, root / "run"


# ---------------------------------------------------------------------------------------------------- fp32
def test_fp32_ir_loads_in_openvino_matches_pytorch_and_carries_the_metadata(tmp_path):
    model = _vit()
    report = export_openvino(model, tmp_path / "ov")
    assert sorted(p.name for p in (tmp_path / "ov").iterdir()) == sorted([XML, BIN, CONFIG, MARKER])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ov"]  # no temporary folder left
    assert report["max_abs_diff"] <= 1e-4 and len(report["checks"]) == 2

    x = torch.randn(4, 1, 28, 28)  # a batch size the check did not use: the batch axis is free
    read = ov.Core().read_model(str(tmp_path / "ov" / XML))
    assert read.inputs[0].get_any_name() == "pixel_values" and read.outputs[0].get_any_name() == "logits"
    with torch.inference_mode():
        assert (_run_ov(tmp_path / "ov", x) - model(x)).abs().max().item() <= 1e-4

    expected = {k: json.loads(v) for k, v in _metadata(model, (1, 28, 28), {"pixel_values": {0: "batch"},
                                                                           "logits": {0: "batch"}}).items()}
    marker = json.loads((tmp_path / "ov" / MARKER).read_text())
    assert marker["format"] == "openvino" and marker["precision"] == "fp32"
    assert {k: marker[k] for k in expected} == expected
    assert marker["class_names"] == list(model.pretrained_cfg["class_names"])
    assert marker["mean"] == pytest.approx(list(model.pretrained_cfg["mean"]))
    assert sorted(marker["files"]) == sorted([XML, BIN, CONFIG])
    assert json.loads((tmp_path / "ov" / CONFIG).read_text()) == json.loads(json.dumps(model.config()))
    for key in ("input_size", "std", "class_names", "interpolation"):  # also inside the IR
        assert json.loads(read.get_rt_info(["vitkit", key]).astype(str)) == expected[key]
    assert json.loads(read.get_rt_info(["vitkit", "precision"]).astype(str)) == "fp32"


def test_a_failed_check_writes_nothing_and_keeps_the_earlier_export(tmp_path, monkeypatch):
    model = _vit()
    export_openvino(model, tmp_path / "ov", check=False)
    before = {p.name: p.read_bytes() for p in (tmp_path / "ov").iterdir()}

    class Wrong(xov.OpenVinoRuntime):
        def __call__(self, x):
            return super().__call__(x) + 1e-2

    monkeypatch.setattr(xov, "OpenVinoRuntime", Wrong)
    with pytest.raises(ParityError, match=r"max \|Δ\| = 0\.01.*> atol.*not written"):
        export_openvino(_vit(seed=1), tmp_path / "ov")
    assert {p.name: p.read_bytes() for p in (tmp_path / "ov").iterdir()} == before
    with pytest.raises(ParityError):
        export_openvino(model, tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ov"]


# ---------------------------------------------------------------------------------------------------- int8
def test_int8_export_of_a_training_run_through_the_cli(tmp_path, capsys, data_no_system_dirs):  # noqa: F811
    model, run = _tiny_run(tmp_path)
    out = tmp_path / "ov8"
    assert cli_main(["export", "openvino", str(run), str(out), "--precision", "int8",
                     "--calibration-images", "24"]) == 0
    printed = capsys.readouterr().out
    assert "OpenVINO IR int8" in printed and "top-1 agreement" in printed and "fp32 graph vs PyTorch" in printed
    marker = json.loads((out / MARKER).read_text())
    assert marker["precision"] == "int8" and marker["checks"]["int8"]["images"] == 24
    assert marker["source"].endswith("best")

    read = ov.Core().read_model(str(out / XML))
    assert any(op.get_type_name() == "FakeQuantize" or (op.get_type_name() == "Constant" and
               op.get_output_element_type(0).get_type_name() in ("i8", "u8")) for op in read.get_ops())
    images = calibration_images(run, 24)  # the same seeded subset the export calibrated and checked on
    with torch.inference_mode():
        ref = model(images)
    got = _run_ov(out, images)
    agreement = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agreement == pytest.approx(marker["checks"]["int8"]["top1_agreement"]) and agreement >= 0.9
    assert 0 < (got - ref).abs().max().item() == pytest.approx(marker["checks"]["int8"]["max_abs_diff"], rel=1e-3)


def test_a_poor_int8_model_is_refused_and_nothing_written(tmp_path, monkeypatch):
    class Flipped(xov.OpenVinoRuntime):  # the int8 IR (read from its file) ranks the classes backwards
        def __call__(self, x):
            out = super().__call__(x)
            return out if isinstance(self.source, ov.Model) else -out

        def __init__(self, source, *args, **kw):
            super().__init__(source, *args, **kw)
            self.source = source

    monkeypatch.setattr(xov, "OpenVinoRuntime", Flipped)
    with pytest.raises(ParityError, match=r"top-1 class of only .* calibration images \(< 90%"):
        export_openvino(_vit(), tmp_path / "ov8", "int8", torch.randn(16, 1, 28, 28))
    assert list(tmp_path.iterdir()) == []


def test_int8_without_training_images_is_one_line(tmp_path, capsys):
    _vit().save_pretrained(tmp_path / "converted")  # a checkpoint without train_config.yaml
    assert cli_main(["export", "openvino", str(tmp_path / "converted"), str(tmp_path / "ov"),
                     "--precision", "int8"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no train_config.yaml" in err
    assert not (tmp_path / "ov").exists()


# ---------------------------------------------------------------------------------------------------- refusals
def test_destination_rules(tmp_path):
    model = _vit()
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(OutputPathError, match="not empty.*not an earlier vitkit export"):
        export_openvino(model, tmp_path / "foreign", check=False)
    (tmp_path / "hf").mkdir()  # an earlier `vitkit export hf` folder: same marker, another format
    (tmp_path / "hf" / "config.json").write_text("{}")
    (tmp_path / "hf" / MARKER).write_text(json.dumps({"files": ["config.json"]}))
    with pytest.raises(OutputPathError, match=r"another format \(hf\)"):
        export_openvino(model, tmp_path / "hf", check=False)
    first = export_openvino(model, tmp_path / "a" / "b" / "ov", check=False)  # missing parents are created
    assert not first["replaced_earlier_export"] and first["checks"] == [] and first["int8"] is None
    second = export_openvino(_vit(seed=1), tmp_path / "a" / "b" / "ov", check=False)
    assert second["replaced_earlier_export"]
    assert sorted(p.name for p in (tmp_path / "a" / "b").iterdir()) == ["ov"]
    (tmp_path / "a" / "b" / "ov" / "README.md").write_text("my notes")
    with pytest.raises(OutputPathError, match="README.md"):
        export_openvino(model, tmp_path / "a" / "b" / "ov", check=False)


def test_missing_extra_names_it_in_one_line(tmp_path, monkeypatch, capsys):
    model = _vit()
    monkeypatch.setitem(sys.modules, "nncf", None)  # import nncf -> ImportError
    with pytest.raises(MissingExtraError, match=r"pip install 'vitkit\[openvino\]'"):
        export_openvino(model, tmp_path / "ov", "int8", torch.randn(2, 1, 28, 28))
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'vitkit\[openvino\]'"):
        export_openvino(model, tmp_path / "ov")
    model.save_pretrained(tmp_path / "ckpt")
    assert cli_main(["export", "openvino", str(tmp_path / "ckpt"), str(tmp_path / "ov")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "vitkit[openvino]" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_bad_arguments_are_refused_before_any_work(tmp_path, capsys):
    model = _vit()
    with pytest.raises(ConfigError, match="fp32, int8"):
        export_openvino(model, tmp_path / "ov", "fp16")
    with pytest.raises(ConfigError, match=r"\(N, 1, 28, 28\).*\(4, 3, 28, 28\)"):
        export_openvino(model, tmp_path / "ov", "int8", torch.randn(4, 3, 28, 28))
    with pytest.raises(ConfigError, match="calibration images"):
        export_openvino(model, tmp_path / "ov", "int8")
    with pytest.raises(ConfigError, match="int8"):
        export_openvino(model, tmp_path / "ov", "fp32", torch.randn(4, 1, 28, 28))
    model.save_pretrained(tmp_path / "ckpt")
    assert cli_main(["export", "onnx", str(tmp_path / "ckpt"), str(tmp_path / "m.onnx"), "--precision", "int8"]) == 2
    assert cli_main(["export", "openvino", str(tmp_path / "ckpt"), str(tmp_path / "ov"),
                     "--calibration-images", "10"]) == 2
    err = capsys.readouterr().err
    assert "are for `vitkit export openvino`" in err and "--calibration-images is for --precision int8" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
