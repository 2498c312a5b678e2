"""int8 through PT2E and the runtimes a classifier is served on (torch, onnxruntime, OpenVINO).

One int8 compile in the whole file (inductor takes tens of seconds on 2 cores); the other runtimes build in
about a second each on a two-block ViT.
"""

from __future__ import annotations

import pytest
import torch

import vitkit
from vitkit.engine.config import config_to_yaml, load_config
from vitkit.errors import ConfigError
from vitkit.tools.inference import prepare_for_inference
from vitkit.tools.runtimes import (
    RuntimeModule,
    build_runtime,
    calibration_images,
    check_backend,
    export_for_runtimes,
    fastest_runtime,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return vitkit.create_model("vit_fmnist_tiny", embed_dim=32, depth=2, num_heads=2).eval()


@pytest.fixture(scope="module")
def onnx_file(model, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    return export_for_runtimes(model, tmp_path_factory.mktemp("onnx"))


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def test_int8_needs_calibration_images_of_the_right_shape(model):
    with pytest.raises(ValueError, match="calibration"):
        prepare_for_inference(model, "int8")
    pytest.importorskip("torchao")
    with pytest.raises(ValueError, match="at least 8"):
        prepare_for_inference(model, "int8", calibration=_images(3))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        prepare_for_inference(model, "int8", calibration=torch.randn(16, 28, 28))


def test_int8_pt2e_runs_compiled_and_stays_close_to_fp32(model):
    pytest.importorskip("torchao")
    im = prepare_for_inference(model, "int8", calibration=_images(64))
    assert im.info["precision"] == "int8" and im.info["quantized_ops"] > 0 and not im.info["cls_shortcut"]
    x = _images(16, seed=1)
    with torch.inference_mode():
        ref, out = model(x), im(x)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert im.compile_seconds is not None  # the quantized graph runs compiled (int8 oneDNN kernels)
    rel = (out - ref).norm() / ref.norm()
    assert rel < 0.15, f"int8 logits {rel:.3f} (relative L2) away from fp32"
    assert (out - ref).abs().max() > 0  # it is quantized, not the fp32 graph


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_exported_runtimes_match_torch_fp32(model, onnx_file, backend):
    pytest.importorskip(backend)
    rt = build_runtime(model, backend, "fp32", threads=1, onnx_path=onnx_file)
    for n in (1, 5):  # OpenVINO compiles one static shape per batch size
        x = _images(n, seed=n)
        with torch.inference_mode():
            assert (rt(x) - model(x)).abs().max() < 1e-4
    assert rt.name == f"{backend} fp32"


def test_openvino_bf16_and_int8(model, onnx_file):
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    x = _images(8, seed=3)
    with torch.inference_mode():
        ref = model(x)
    bf16 = build_runtime(model, "openvino", "bf16", threads=1, onnx_path=onnx_file)
    assert ((bf16(x) - ref).norm() / ref.norm()) < 0.05
    int8 = build_runtime(model, "openvino", "int8", threads=1, onnx_path=onnx_file, calibration=_images(32))
    out = int8(x)
    assert out.shape == ref.shape and ((out - ref).norm() / ref.norm()) < 0.2 and (out - ref).abs().max() > 0


def test_backend_and_precision_checks_are_one_line():
    with pytest.raises(ConfigError, match="backend must be one of"):
        check_backend("tensorrt", "fp32")
    with pytest.raises(ConfigError, match="runs fp32, not 'bf16'"):
        check_backend("onnxruntime", "bf16")
    with pytest.raises(ConfigError, match="calibration"):
        build_runtime(torch.nn.Linear(2, 2), "openvino", "int8")


def test_runtime_module_looks_like_the_model(model, onnx_file):
    pytest.importorskip("onnxruntime")
    rt = build_runtime(model, "onnxruntime", "fp32", threads=1, onnx_path=onnx_file)
    wrapped = RuntimeModule(rt, model)
    assert wrapped.pretrained_cfg == model.pretrained_cfg
    x = _images(2)
    with torch.inference_mode():
        assert torch.allclose(wrapped(x), model(x), atol=1e-4)


def test_fastest_runtime_times_every_installed_backend(model):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("openvino")
    best, seconds = fastest_runtime(model, "fp32", _images(1), threads=1)
    assert set(seconds) == {"torch fp32", "onnxruntime fp32", "openvino fp32"}
    assert seconds[best.name] == min(seconds.values())


def test_calibration_images_come_from_the_runs_training_data(model, tmp_path):
    folder = tmp_path / "run" / "checkpoints" / "best"
    model.save_pretrained(folder)
    cfg = load_config(None, ["model.name=vit_fmnist_tiny", "data.name=fashion_mnist"])
    (folder / "train_config.yaml").write_text(config_to_yaml(cfg))
    images = calibration_images(tmp_path / "run", count=20, seed=1)
    assert images.shape == (20, 1, 28, 28) and images.dtype == torch.float32
    assert abs(float(images.mean())) < 1.0 and 0.3 < float(images.std()) < 3  # normalised, not raw pixels
    assert torch.equal(images, calibration_images(tmp_path / "run", count=20, seed=1))  # seeded

    converted = tmp_path / "converted"
    model.save_pretrained(converted)
    with pytest.raises(ConfigError, match="no train_config.yaml"):
        calibration_images(converted)
