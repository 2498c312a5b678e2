"""``vitkit serve``: the JSON API through FastAPI's test client (no network, no browser)."""

from __future__ import annotations

import io
import json
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

import vitkit

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from _tiny import save_tiny_classifier_run
from vitkit.tools.serve import create_app  # noqa: E402


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run folder as training leaves it: checkpoints/best, summary.json, config.yaml."""
    run = tmp_path_factory.mktemp("run")
    save_tiny_classifier_run(run)
    (run / "summary.json").write_text(json.dumps({"epochs_done": 3, "final": {"top1": 0.8512, "epoch": 3},
                                                  "best": {"top1": 0.86}, "train_wall_clock_s": 12.0}))
    (run / "config.yaml").write_text("data:\n  name: fashion_mnist\n")
    return run


@pytest.fixture(scope="module")
def client(run_dir):
    return TestClient(create_app(run_dir, max_upload_bytes=200_000, explain_method=None))


def _png(seed: int = 0, size=(28, 28), mode="L") -> bytes:
    rng = np.random.default_rng(seed)
    shape = size if mode == "L" else (*size, 3)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(buf, format="PNG")
    return buf.getvalue()


def _bomb_png(width: int = 60_000, height: int = 60_000) -> bytes:
    """A valid PNG header declaring width × height pixels (3.6 G), with a tiny body."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_health_model_card_and_page(client):
    assert client.get("/health").json() == {"status": "ok"}
    card = client.get("/model").json()
    assert card["name"] == "vit_fmnist_tiny" and card["task"] == "classify"
    assert card["parameters"] > 0 and card["input_size"] == [1, 28, 28] and len(card["class_names"]) == 10
    assert card["training"]["final"]["top1"] == 0.8512 and card["training_data"] == "fashion_mnist"
    page = client.get("/")
    assert page.status_code == 200 and "<title>vitkit serve</title>" in page.text
    schema = client.get("/openapi.json").json()
    assert {"/predict", "/model", "/health"} <= set(schema["paths"])
    # no route takes a path parameter: nothing a request says reaches the file system
    assert all("{" not in route for route in schema["paths"])


def test_predict_happy_path_matches_the_model(client, run_dir):
    data = _png(1)
    r = client.post("/predict", files={"file": ("shirt.png", data, "image/png")})
    assert r.status_code == 200, r.text
    out = r.json()
    assert len(out["top"]) == 5 and out["time_ms"] > 0
    probs = [t["probability"] for t in out["top"]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    # the same answer as `vitkit predict` on the same file
    (run_dir / "shirt.png").write_bytes(data)
    ref = vitkit.tools.predict_images(vitkit.tools.load_model(run_dir), [run_dir / "shirt.png"], topk=5)[0]
    assert [t["label"] for t in out["top"]] == [name for name, _ in ref["top"]]
    assert np.allclose(probs, [p for _, p in ref["top"]], atol=1e-6)
    # an RGB upload of another size is converted and resized like the training data
    r = client.post("/predict?topk=3", files={"file": ("big.png", _png(2, (64, 48), "RGB"), "image/png")})
    assert r.status_code == 200 and len(r.json()["top"]) == 3


def test_too_large_uploads_get_413(client):
    big = b"\0" * 400_000
    r = client.post("/predict", files={"file": ("big.png", big, "image/png")})
    assert r.status_code == 413 and "larger than" in r.json()["detail"]

    def chunks():  # a well-formed multipart body without Content-Length: counted while it arrives
        yield (b'--x\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
               b"Content-Type: image/png\r\n\r\n")
        for _ in range(40):
            yield b"\0" * 10_000
        yield b"\r\n--x--\r\n"

    r = client.post("/predict", content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"})
    assert r.status_code == 413


def test_413_says_the_limit_in_human_units():
    import asyncio

    from vitkit.tools.serve.app import DEFAULT_MAX_UPLOAD, BodyLimit

    def detail(limit: int) -> str:
        sent = []

        async def send(message):
            sent.append(message)

        asyncio.run(BodyLimit(None, limit)._reject(send))
        assert sent[0]["status"] == 413
        return json.loads(sent[1]["body"])["detail"]

    assert detail(DEFAULT_MAX_UPLOAD) == "upload larger than 8 MiB (8,388,608 bytes)"  # --max-upload-mb 8
    assert detail(200_000) == "upload larger than 195 KiB (200,000 bytes)"
    assert detail(512) == "upload larger than 512 bytes"


def test_bad_images_get_one_line_400(client):
    r = client.post("/predict", files={"file": ("x.png", b"not an image at all", "image/png")})
    assert r.status_code == 400 and "\n" not in r.json()["detail"]
    r = client.post("/predict", files={"file": ("bomb.png", _bomb_png(), "image/png")})
    assert r.status_code == 400 and "pixels" in r.json()["detail"]
    r = client.post("/predict", files={"file": ("empty.png", b"", "image/png")})
    assert r.status_code == 400
    r = client.post("/predict")  # no file field
    assert r.status_code == 400 and "\n" not in r.json()["detail"]


def test_wrong_method_and_bad_parameters(client):
    assert client.get("/predict").status_code == 405
    assert client.delete("/model").status_code == 405
    r = client.post("/predict?topk=0", files={"file": ("a.png", _png(), "image/png")})
    assert r.status_code == 400 and "\n" not in r.json()["detail"]


def test_concurrent_requests_are_served_and_agree(client):
    data = _png(3)

    def call(_):
        r = client.post("/predict", files={"file": ("a.png", data, "image/png")})
        return r.status_code, [t["label"] for t in r.json()["top"]], r.json()["top"][0]["probability"]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(call, range(24)))
    assert {code for code, _, _ in results} == {200}
    assert len({(tuple(labels), round(p, 6)) for _, labels, p in results}) == 1


def test_full_queue_answers_503(run_dir):
    app = create_app(run_dir, explain_method=None, max_pending=1)
    service = app.state.service
    service._slots.acquire()  # one request is waiting already
    try:
        r = TestClient(app).post("/predict", files={"file": ("a.png", _png(), "image/png")})
        assert r.status_code == 503
    finally:
        service._slots.release()


def test_serve_refuses_a_folder_without_a_model(tmp_path):
    from vitkit.errors import CheckpointError

    with pytest.raises(CheckpointError, match="neither a vitkit checkpoint"):
        create_app(tmp_path)


def test_attention_overlay_and_models_without_one(run_dir, tmp_path):
    r = TestClient(create_app(run_dir)).post("/predict", files={"file": ("a.png", _png(4), "image/png")})
    assert r.status_code == 200
    ex = r.json()["explain"]
    assert ex["method"] == "rollout" and ex["overlay"].startswith("data:image/png;base64,")
    import base64

    overlay = Image.open(io.BytesIO(base64.b64decode(ex["overlay"].split(",", 1)[1])))
    assert overlay.size[0] > 0 and overlay.mode in ("RGB", "RGBA")
    # a windowed model is served all the same; the page says why it has no overlay
    swin = vitkit.create_model("swin_fmnist_tiny", embed_dim=8, depths=[2, 1], num_heads=[2, 2])
    swin.save_pretrained(tmp_path / "swin")
    r = TestClient(create_app(tmp_path / "swin")).post("/predict", files={"file": ("a.png", _png(4), "image/png")})
    assert r.status_code == 200 and len(r.json()["top"]) == 5
    assert "windows" in r.json()["explain"]["unsupported"]


def test_clip_run_takes_zero_shot_class_names(tmp_path, run_dir):
    from vitkit.data.captions import train_tokenizer

    tok = train_tokenizer(["a shirt on the left", "a bag on the right", "a coat"], vocab_size=80)
    sep = tok.token_to_id("[SEP]")
    torch.manual_seed(0)
    clip = vitkit.create_model("clip_fmnist_tiny", vision_width=24, vision_layers=1, vision_heads=2, text_width=16,
                               text_layers=1, text_heads=2, vocab_size=80, eos_token_id=sep, tokenizer=tok.to_str())
    clip.pretrained_cfg = {**clip.pretrained_cfg, "task": "clip"}
    clip.save_pretrained(tmp_path / "clip")
    client = TestClient(create_app(tmp_path / "clip"))
    assert client.get("/model").json()["task"] == "clip"
    r = client.post("/predict?topk=2", files={"file": ("a.png", _png(5), "image/png")},
                    data={"classes": "shirt, bag, coat"})
    assert r.status_code == 200, r.text
    top = r.json()["top"]
    assert len(top) == 2 and {t["label"] for t in top} <= {"shirt", "bag", "coat"}
    assert "unsupported" in r.json()["explain"]  # no image-wide attention map for the CLIP page either
    r = client.post("/predict", files={"file": ("a.png", _png(5), "image/png")}, data={"classes": "shirt"})
    assert r.status_code == 400 and "two class names" in r.json()["detail"]
    # a classifier takes no class names
    r = TestClient(create_app(run_dir, explain_method=None)).post(
        "/predict", files={"file": ("a.png", _png(5), "image/png")}, data={"classes": "a, b"})
    assert r.status_code == 400 and "zero-shot" in r.json()["detail"]
