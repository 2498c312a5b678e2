"""``vitkit serve --backend torch|onnxruntime|openvino|auto --precision fp32|bf16|int8``: the runtime behind
/predict, its checks (one line, before the model loads) and the model card.

One int8 build in the file (OpenVINO through NNCF: seconds, where torch's inductor compile takes tens).
"""

from __future__ import annotations

import io
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import vitkit
from _tiny import save_tiny_clip, save_tiny_var
from vitkit.cli import main as cli_main
from vitkit.engine.config import config_to_yaml, load_config
from vitkit.errors import ConfigError, MissingExtraError

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from vitkit.tools.serve import app as serve_app  # noqa: E402
from vitkit.tools.serve import check_serving, create_app  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A classifier run: its best checkpoint with the recipe beside it (int8 calibrates on its training data)."""
    run = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    model = vitkit.create_model("vit_fmnist_tiny", embed_dim=24, depth=2, num_heads=2)
    folder = run / "checkpoints" / "best"
    model.save_pretrained(folder)
    cfg = load_config(None, ["model.name=vit_fmnist_tiny", "data.name=fashion_mnist"])
    (folder / "train_config.yaml").write_text(config_to_yaml(cfg))
    return run


@pytest.fixture(scope="module")
def torch_client(run_dir):
    return TestClient(create_app(run_dir, explain_method=None, threads=1))


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    save_tiny_clip(folder)
    return folder


@pytest.fixture(scope="module")
def var_dir(tmp_path_factory):
    """A generator checkpoint as training leaves it: the recipe beside the weights names the task and tokenizer."""
    root = tmp_path_factory.mktemp("gen")
    save_tiny_var(root)
    return root / "var"


def _png(seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (28, 28), dtype=np.uint8), "L").save(buf, "PNG")
    return buf.getvalue()


def _probabilities(client: TestClient, data: bytes) -> tuple[str, dict[str, float]]:
    """Top-1 label and every class's probability (topk=10: all of them)."""
    r = client.post("/predict?topk=10", files={"file": ("a.png", data, "image/png")})
    assert r.status_code == 200, r.text
    top = r.json()["top"]
    return top[0]["label"], {t["label"]: t["probability"] for t in top}


def _no_model_load(monkeypatch) -> None:
    """Any model load fails the test: the checks must refuse before it."""
    def load(*_a, **_k):
        raise AssertionError("the model was loaded before the check refused")

    monkeypatch.setattr(serve_app, "load_model", load)


# ------------------------------------------------------------------------------------------ answers per backend
def test_torch_backend_serves_the_prepared_model_like_the_eager_one(torch_client, run_dir):
    service = torch_client.app.state.service
    card = torch_client.get("/model").json()
    assert card["backend"] == "torch" and card["precision"] == "fp32" and "auto" not in card
    assert service.predictor is not service.model  # the runtime (prepare_for_inference), not the eager model
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert (service.predictor(x) - service.model(x)).abs().max() < 1e-5


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_exported_backends_answer_like_torch_fp32(torch_client, run_dir, backend):
    pytest.importorskip(backend)
    client = TestClient(create_app(run_dir, backend=backend, threads=1))
    card = client.get("/model").json()
    assert card["backend"] == backend and card["precision"] == "fp32"
    runtime, calls = client.app.state.service.predictor.runtime, []
    client.app.state.service.predictor.runtime = lambda x: calls.append(x.shape) or runtime(x)
    for seed in (0, 1, 2):
        data = _png(seed)
        label, probs = _probabilities(client, data)
        ref_label, ref = _probabilities(torch_client, data)
        assert label == ref_label and probs.keys() == ref.keys()
        assert max(abs(probs[k] - ref[k]) for k in ref) < 1e-4
    assert calls == [(1, 1, 28, 28)] * 3  # the logits came from the runtime
    # the overlay still comes from the eager model
    r = client.post("/predict", files={"file": ("a.png", _png(), "image/png")})
    assert r.json()["explain"]["overlay"].startswith("data:image/png;base64,")


def test_auto_serves_the_fastest_backend_it_built(run_dir, torch_client):
    lines: list[str] = []
    client = TestClient(create_app(run_dir, explain_method=None, backend="auto", threads=1, log=lines.append))
    card = client.get("/model").json()
    timings = card["auto"]["median_ms"]
    installed = {b for b in ("onnxruntime", "openvino") if _installed(b)}
    assert set(timings) == {f"{b} fp32" for b in {"torch", *installed}}
    assert card["auto"]["picked"] == f"{card['backend']} fp32" and card["precision"] == "fp32"
    assert timings[card["auto"]["picked"]] == min(timings.values()) and all(ms > 0 for ms in timings.values())
    timed = [line for line in lines if "ms per image" in line]
    assert len(timed) == len(timings) and sum("<- serving" in line for line in timed) == 1
    assert card["auto"]["picked"] in next(line for line in timed if "<- serving" in line)
    assert _probabilities(client, _png(3))[0] == _probabilities(torch_client, _png(3))[0]


def test_int8_on_openvino_calibrates_on_the_runs_training_images(run_dir, torch_client, monkeypatch):
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    asked = []
    real = serve_app.calibration_images

    def spy(run, count, **kw):
        asked.append(count)
        return real(run, count, **kw)

    monkeypatch.setattr(serve_app, "calibration_images", spy)
    client = TestClient(create_app(run_dir, explain_method=None, backend="openvino", precision="int8",
                                   calibration_images=24, threads=1))
    assert asked == [24]
    card = client.get("/model").json()
    assert card["backend"] == "openvino" and card["precision"] == "int8"
    _, probs = _probabilities(client, _png(4))
    _, ref = _probabilities(torch_client, _png(4))
    assert abs(sum(probs.values()) - 1) < 1e-4
    diff = max(abs(probs[k] - ref[k]) for k in ref)
    assert 0 < diff < 0.05  # quantized (not the fp32 graph), and close to it


# ------------------------------------------------------------------------------------------ refusals
def test_bad_backend_or_precision_is_one_line_before_the_model_loads(run_dir, monkeypatch, capsys):
    _no_model_load(monkeypatch)
    for kw, match in (({"backend": "onnxruntime", "precision": "bf16"}, "runs fp32, not 'bf16'"),
                      ({"backend": "tensorrt"}, "--backend must be one of"),
                      ({"precision": "fp16"}, "--precision must be one of"),
                      ({"backend": "openvino", "calibration_images": 0}, "--calibration-images must be"),
                      ({"threads": 0}, "--threads must be")):
        with pytest.raises(ConfigError, match=match) as e:
            create_app(run_dir, **kw)
        assert "\n" not in str(e.value)
    assert check_serving("onnxruntime", "auto") == "fp32"  # auto: what the backend runs
    assert cli_main(["serve", str(run_dir), "--backend", "onnxruntime", "--precision", "bf16"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vitkit serve: error:") and "runs fp32, not 'bf16'" in err and "\n" not in err


def test_zero_shot_and_generator_runs_are_served_by_torch_only(clip_dir, var_dir, capsys):
    for folder in (clip_dir, var_dir):
        with pytest.raises(ConfigError, match="serve --backend torch") as e:
            create_app(folder, backend="openvino", threads=1)
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="serve --precision fp32"):
        create_app(clip_dir, precision="bf16", threads=1)
    assert cli_main(["serve", str(var_dir), "--backend", "openvino"]) == 2
    err = capsys.readouterr().err.strip()
    assert "serve --backend torch" in err and "\n" not in err
    # on torch, auto precision: the eager model, fp32, as before
    service = create_app(clip_dir, precision="auto", threads=1).state.service
    assert service.predictor is service.model and (service.backend, service.precision) == ("torch", "fp32")


@pytest.mark.parametrize("backend, module, extra", [("openvino", "openvino", "openvino"),
                                                    ("onnxruntime", "onnxruntime", "export"),
                                                    ("openvino", "nncf", "openvino")])
def test_a_missing_extra_is_one_line_naming_it(run_dir, monkeypatch, capsys, backend, module, extra):
    _no_model_load(monkeypatch)
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now fails as if it were not installed
    precision = "int8" if module == "nncf" else "fp32"
    with pytest.raises(MissingExtraError, match=rf"pip install 'vitkit\[{extra}\]'") as e:
        create_app(run_dir, backend=backend, precision=precision)
    assert "\n" not in str(e.value)
    assert cli_main(["serve", str(run_dir), "--backend", backend, "--precision", precision]) == 2
    err = capsys.readouterr().err.strip()
    assert f"vitkit[{extra}]" in err and "\n" not in err and "FastAPI" not in err


def test_auto_skips_a_backend_that_is_not_installed(monkeypatch):
    installed = _installed("openvino")
    monkeypatch.setitem(sys.modules, "openvino", None)
    assert check_serving("auto", "fp32") == "fp32"  # openvino is simply not a candidate
    if installed:
        monkeypatch.delitem(sys.modules, "openvino")
        monkeypatch.setitem(sys.modules, "nncf", None)  # installed but incomplete for int8: refused, named
        with pytest.raises(MissingExtraError, match=r"vitkit\[openvino\]"):
            check_serving("auto", "int8")


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None
