"""ONNX export: onnxruntime computes what PyTorch computes, for every classifier family, and failures are clean.

Each model is exported once (a module-level cache) and the tests reuse the file; tiny configurations keep the
whole file to a few seconds of export time.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import vitkit  # noqa: E402
from _tiny import is_classifier, tiny  # noqa: E402
from vitkit.errors import ConfigError, VitkitError  # noqa: E402
from vitkit.models import create_model, model_family  # noqa: E402
from vitkit.tools.export import (  # noqa: E402
    INPUT_NAME,
    OUTPUT_NAME,
    ExportError,
    ParityError,
    add_export_args,
    export_onnx,
    read_onnx_metadata,
    run_export_args,
)

ATOL = 1e-4


def _representatives() -> dict[str, str]:
    """One classifier per registered family: its ``*_fmnist_tiny`` model where there is one."""
    by_family: dict[str, list[str]] = {}
    for name in vitkit.list_models():
        if is_classifier(name):
            by_family.setdefault(model_family(name), []).append(name)
    return {fam: next((n for n in names if n.endswith("_fmnist_tiny")), names[0]) for fam, names in by_family.items()}


# case id -> (registered name, extra constructor arguments, dynamic image size expected)
CASES: dict[str, tuple[str, dict[str, Any], bool]] = {f"family-{fam}": (name, {}, False)
                                                       for fam, name in sorted(_representatives().items())}
CASES.update({
    "vit-p2": ("vit_fmnist_p2_tiny", {}, False),
    "vit-hybrid": ("vit_fmnist_hybrid_tiny", {}, False),
    "vit-overlap-gap-sincos": ("vit_fmnist_tiny", dict(patch_stride=2, pool="gap", class_token=False,
                                                       pos_embed="sincos_2d"), False),
    "vit-dynamic-learned": ("vit_fmnist_tiny", dict(dynamic_img_size=True), True),
    "vit-dynamic-relative": ("vit_fmnist_tiny", dict(dynamic_img_size=True, pos_embed="relative"), True),
    "t2t-transformer-dynamic": ("t2t_vit_t_fmnist_tiny", dict(dynamic_img_size=True), True),
})

_EXPORTS: dict[str, tuple[torch.nn.Module, Path, dict[str, Any]]] = {}


def _build(name: str, extra: dict[str, Any]) -> torch.nn.Module:
    over, _ = tiny(name)
    if "encoder_args" in over:  # wrappers: the switches belong to the encoder
        over["encoder_args"] = {**over["encoder_args"], **extra}
    else:
        over.update(extra)
    torch.manual_seed(0)
    return create_model(name, **over).eval()


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx")


def exported(case: str, folder: Path) -> tuple[torch.nn.Module, Path, dict[str, Any]]:
    """(model, file, report) of a case, exported on first use."""
    if case not in _EXPORTS:
        name, extra, _ = CASES[case]
        model = _build(name, extra)
        path = folder / f"{case}.onnx"
        _EXPORTS[case] = (model, path, export_onnx(model, path, atol=ATOL))
    return _EXPORTS[case]


def _ort_vs_torch(model: torch.nn.Module, path: Path, shape: tuple[int, ...], seed: int = 123) -> float:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    out = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
    with torch.inference_mode():
        ref = model(x).numpy()
    assert out.shape == ref.shape
    return float(abs(out - ref).max())


def test_cases_cover_every_registered_classifier_family() -> None:
    families = {model_family(n) for n in vitkit.list_models() if is_classifier(n)}
    covered = {model_family(name) for name, _, _ in CASES.values()}
    assert families <= covered
    assert {"vit", "swin", "t2t_vit", "simclr"} <= families


@pytest.mark.parametrize("case", list(CASES))
def test_onnxruntime_matches_pytorch_with_dynamic_batch(case: str, export_dir: Path) -> None:
    model, path, report = exported(case, export_dir)
    assert report["opset"] == 18 and report["input"]["name"] == INPUT_NAME and report["output"]["name"] == OUTPUT_NAME
    assert report["max_abs_diff"] is not None and report["max_abs_diff"] <= ATOL
    assert report["input"]["shape"][0] == "batch" and report["output"]["shape"][0] == "batch"
    assert report["file_bytes"] == path.stat().st_size > 0
    c, h, w = model.pretrained_cfg["input_size"]
    for batch in (1, 3):  # one file, several batch sizes
        assert _ort_vs_torch(model, path, (batch, c, h, w)) <= ATOL


@pytest.mark.parametrize("case", [k for k, v in CASES.items() if v[2]])
def test_dynamic_image_size(case: str, export_dir: Path) -> None:
    model, path, report = exported(case, export_dir)
    assert report["dynamic_size"] and report["input"]["shape"][2:] == ["height", "width"]
    assert len(report["checks"]) == 2 and report["checks"][1]["shape"][2:] != report["checks"][0]["shape"][2:]
    c, h, w = model.pretrained_cfg["input_size"]
    r = model.patch_embed.reduction if hasattr(model, "patch_embed") else model.reduction
    for size in ((h + 2 * r[0], w + r[1]), (h + 3 * r[0], w + 3 * r[1])):  # sizes the export itself did not check
        assert _ort_vs_torch(model, path, (2, c, *size)) <= ATOL


def test_sizes_stay_static_unless_the_model_accepts_others(export_dir: Path) -> None:
    model, path, report = exported("family-swin", export_dir)
    assert not report["dynamic_size"] and report["input"]["shape"][2:] == list(model.pretrained_cfg["input_size"][1:])
    c, h, w = model.pretrained_cfg["input_size"]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with pytest.raises(Exception, match="(?i)dimension|shape"):  # refused, not silently computed
        session.run(None, {INPUT_NAME: torch.randn(1, c, 2 * h, 2 * w).numpy()})


def test_static_size_on_request(tmp_path: Path) -> None:
    model = _build("vit_fmnist_tiny", dict(dynamic_img_size=True))
    report = export_onnx(model, tmp_path / "static.onnx", dynamic_size=False, dynamic_batch=False)
    c, h, w = model.pretrained_cfg["input_size"]
    assert report["input"]["shape"] == [2, c, h, w] and report["dynamic_axes"] == {}
    assert [r["shape"] for r in report["checks"]] == [[2, c, h, w]]


def test_metadata_lets_a_consumer_preprocess_without_vitkit(export_dir: Path) -> None:
    model, path, report = exported("family-vit", export_dir)
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    decoded = {k: json.loads(v) for k, v in props.items()}  # every value is JSON
    cfg = model.pretrained_cfg
    assert decoded["input_size"] == list(cfg["input_size"])
    assert decoded["mean"] == pytest.approx(list(cfg["mean"])) and decoded["std"] == pytest.approx(list(cfg["std"]))
    assert decoded["interpolation"] == cfg["interpolation"]
    assert decoded["model_name"] == "vit_fmnist_tiny" and decoded["vitkit_version"] == vitkit.__version__
    assert decoded["class_names"] == cfg.get("class_names")
    assert decoded["input_name"] == INPUT_NAME and decoded["dynamic_axes"][INPUT_NAME] == {"0": "batch"}
    assert read_onnx_metadata(path) == decoded == report["metadata"]


def test_non_classifier_is_refused_in_one_line(tmp_path: Path) -> None:
    mae = create_model("mae_vit_fmnist_tiny", **tiny("mae_vit_fmnist_tiny")[0])
    with pytest.raises(ExportError, match="not a classifier") as info:
        export_onnx(mae, tmp_path / "mae.onnx")
    assert "\n" not in str(info.value) and not (tmp_path / "mae.onnx").exists()


def test_unsupported_operator_is_named_and_leaves_no_file(tmp_path: Path) -> None:
    # real case: antialiased resizing of a dynamic-size ViT's position table needs opset 18's Resize
    model = _build("vit_fmnist_tiny", dict(dynamic_img_size=True))
    out = tmp_path / "m.onnx"
    with pytest.raises(ExportError, match=r"aten::_upsample_bicubic2d_aa.*opset >= 18") as info:
        export_onnx(model, out, opset=17)
    assert isinstance(info.value, VitkitError) and "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_exporter_failure_keeps_an_existing_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "m.onnx"
    out.write_bytes(b"previous export")

    def failing_export(model, args, f, **kwargs):
        Path(f).write_bytes(b"half a graph")  # a partial write, then the exporter gives up
        raise torch.onnx.errors.UnsupportedOperatorError("aten::fancy_op", kwargs["opset_version"], 19)

    monkeypatch.setattr(torch.onnx, "export", failing_export)
    with pytest.raises(ExportError, match=r"operator aten::fancy_op .*opset 18.*--opset 19"):
        export_onnx(_build("vit_fmnist_p2_tiny", {}), out)
    assert out.read_bytes() == b"previous export" and sorted(os.listdir(tmp_path)) == ["m.onnx"]


def test_parity_failure_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(ParityError, match=r"max \|Δ\| = .*> atol 1e-12"):
        export_onnx(_build("vit_fmnist_p2_tiny", {}), tmp_path / "m.onnx", atol=1e-12)
    assert list(tmp_path.iterdir()) == []


def test_bad_requests(tmp_path: Path) -> None:
    fixed = _build("vit_fmnist_p2_tiny", {})
    with pytest.raises(ConfigError, match="dynamic_img_size"):
        export_onnx(fixed, tmp_path / "m.onnx", dynamic_size=True)
    with pytest.raises(ConfigError, match="opset"):
        export_onnx(fixed, tmp_path / "m.onnx", opset=9)
    assert list(tmp_path.iterdir()) == []


def test_cli_exports_a_saved_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    model = create_model("vit_fmnist_tiny", depth=2)  # the registered config: FMNIST stats and class names
    model.save_pretrained(tmp_path / "ckpt")
    parser = argparse.ArgumentParser()
    add_export_args(parser)
    out = tmp_path / "out" / "model.onnx"
    assert run_export_args(parser.parse_args(["onnx", str(tmp_path / "ckpt"), str(out)])) == 0
    text = capsys.readouterr().out
    assert "opset 18" in text and "max |Δ|" in text and "10 class names" in text
    meta = read_onnx_metadata(out)
    assert meta["class_names"] == list(model.pretrained_cfg["class_names"]) and len(meta["class_names"]) == 10
    assert meta["input_size"] == [1, 28, 28] and meta["model_name"] == "vit_fmnist_tiny"
    assert _ort_vs_torch(model.eval(), out, (4, 1, 28, 28)) <= ATOL

    static = tmp_path / "static.onnx"
    args = parser.parse_args(["onnx", str(tmp_path / "ckpt"), str(static), "--static-size", "--no-check",
                              "--opset", "17"])
    assert run_export_args(args) == 0
    assert "not checked" in capsys.readouterr().out
    dims = [d.dim_param or d.dim_value for d in onnx.load(str(static)).graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 1, 28, 28]
    with pytest.raises(SystemExit):
        parser.parse_args(["tflite", str(tmp_path / "ckpt"), str(static)])
