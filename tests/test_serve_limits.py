"""``vitkit serve`` under load and hostile clients: admission (503 + Retry-After), a free event loop while the model
is saturated, deadlines (504), the decode memory budget, body and header timeouts, field caps and flag checks.

Inference is held with a ``threading.Event`` in a monkeypatched ``task.predict``, so saturation is exact and
nothing here depends on the speed of the machine; a real uvicorn server (127.0.0.1, a free port) is started only
for the connection-level timeouts."""

from __future__ import annotations

import asyncio
import io
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

import numpy as np
import pytest
from PIL import Image

from _tiny import save_tiny_classifier_run, save_tiny_clip

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from vitkit.tools.serve import create_app  # noqa: E402


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    save_tiny_classifier_run(run)
    return run


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip") / "clip"
    save_tiny_clip(folder)
    return folder


def _png(size=(28, 28), mode="L", seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    shape = size[::-1] if mode == "L" else (*size[::-1], 3)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(buf, format="PNG")
    return buf.getvalue()


def _upload(data: bytes | None = None) -> dict:
    return {"file": ("a.png", data or _png(), "image/png")}


class _Held:
    """``task.predict`` that waits for :meth:`release` (counting the calls that entered)."""

    def __init__(self, service, monkeypatch) -> None:
        self.entered = threading.Event()
        self.go = threading.Event()
        self.calls = 0
        real = service.task.predict

        def held(*args, **kwargs):
            self.calls += 1
            self.entered.set()
            assert self.go.wait(60), "the test never released the model"
            return real(*args, **kwargs)

        monkeypatch.setattr(service.task, "predict", held)

    def release(self) -> None:
        self.go.set()


def test_overflow_gets_503_with_retry_after_at_once(run_dir, monkeypatch):
    app = create_app(run_dir, explain_method=None, max_pending=1)
    held = _Held(app.state.service, monkeypatch)
    with TestClient(app) as client, ThreadPoolExecutor(2) as pool:
        first = pool.submit(client.post, "/predict", files=_upload())
        try:
            assert held.entered.wait(20), "the first request never reached the model"
            start = time.perf_counter()
            second = pool.submit(client.post, "/predict", files=_upload())
            r = second.result(timeout=10)
            assert r.status_code == 503, r.text
            assert time.perf_counter() - start < 5  # refused at once, not after the first one finished
            assert int(r.headers["retry-after"]) >= 1
            assert "\n" not in r.json()["detail"] and "retry" in r.json()["detail"]
            assert client.post("/sample", params={"class": "0"}).status_code == 503  # the same admission
        finally:
            held.release()
        assert first.result(timeout=30).status_code == 200
        assert client.post("/predict", files=_upload()).status_code == 200  # the slot is free again


def test_health_answers_while_the_model_is_saturated(run_dir, monkeypatch):
    # more waiting requests than a thread pool (AnyIO's 40) would hold: the routes must not need a thread
    app = create_app(run_dir, explain_method=None)
    held = _Held(app.state.service, monkeypatch)
    waiting = 48
    with TestClient(app) as client, ThreadPoolExecutor(waiting + 2) as pool:
        calls = [pool.submit(client.post, "/predict", files=_upload()) for _ in range(waiting)]
        try:
            assert held.entered.wait(20)
            time.sleep(0.5)  # let the others arrive and queue
            for route in ("/health", "/model", "/"):
                start = time.perf_counter()
                try:
                    r = pool.submit(client.get, route).result(timeout=5)
                except FutureTimeout:
                    pytest.fail(f"GET {route} did not answer while the model was busy")
                assert r.status_code == 200 and time.perf_counter() - start < 2, route
        finally:
            held.release()
        assert [c.result(timeout=60).status_code for c in calls] == [200] * waiting
    assert held.calls == waiting


def test_deadline_gives_504_and_waiting_past_it_503(run_dir, monkeypatch):
    from vitkit.tools.serve.limits import ServeLimits

    app = create_app(run_dir, explain_method=None, limits=ServeLimits(request_timeout=0.5))
    held = _Held(app.state.service, monkeypatch)
    with TestClient(app) as client, ThreadPoolExecutor(2) as pool:
        try:
            running = pool.submit(client.post, "/predict", files=_upload())
            assert held.entered.wait(20)
            queued = pool.submit(client.post, "/predict", files=_upload())
            r = running.result(timeout=10)
            assert r.status_code == 504 and "longer than 0.5 s" in r.json()["detail"], r.text
            r = queued.result(timeout=10)
            assert r.status_code == 503 and "waited 0.5 s" in r.json()["detail"], r.text
            assert int(r.headers["retry-after"]) >= 1
        finally:
            held.release()
        for _ in range(100):  # the abandoned forward finishes, and gives the model back
            if app.state.service._model_slot.used == 0:
                break
            time.sleep(0.05)
        assert client.post("/predict", files=_upload()).status_code == 200


def test_decodes_in_flight_are_bounded_by_the_memory_budget(run_dir, monkeypatch):
    import vitkit.tools.serve.app as serve_app
    from vitkit.schema import machine_memory as physical_memory
    from vitkit.tools.serve.limits import ServeLimits, decode_bytes

    real = serve_app.decode_pil
    state = {"now": 0, "peak": 0}
    lock = threading.Lock()

    def slow_decode(*args, **kwargs):
        with lock:
            state["now"] += 1
            state["peak"] = max(state["peak"], state["now"])
        time.sleep(0.3)
        try:
            return real(*args, **kwargs)
        finally:
            with lock:
                state["now"] -= 1

    monkeypatch.setattr(serve_app, "decode_pil", slow_decode)
    image = _png((512, 512), "RGB")
    one = decode_bytes((512, 512), "RGB")  # 512 x 512 x 5 bytes
    peaks = []
    for budget in (int(1.5 * one), 10 * one):
        state["peak"] = 0
        app = create_app(run_dir, explain_method=None,
                         limits=ServeLimits(decode_workers=4, decode_memory_bytes=budget))
        with TestClient(app) as client, ThreadPoolExecutor(6) as pool:
            codes = list(pool.map(lambda _: client.post("/predict", files=_upload(image)).status_code, range(6)))
        assert codes == [200] * 6
        peaks.append(state["peak"])
    assert peaks[0] == 1  # the budget holds one such image: decodes ran one at a time
    assert 2 <= peaks[1] <= 4  # a larger budget lets the 4 decode threads work together
    # the default budget is a share of the machine's memory, not a per-image limit
    assert ServeLimits().decode_budget == max(64 * 1024**2, physical_memory() // 8)
    assert decode_bytes((6300, 6300), "RGB") > decode_bytes((6300, 6300), "L")


def test_zero_shot_class_names_are_capped(clip_dir, run_dir):
    client = TestClient(create_app(clip_dir))
    ok = client.post("/predict?topk=2", files=_upload(), data={"classes": "shirt, bag, coat"})
    assert ok.status_code == 200, ok.text
    cases = {
        ", ".join(f"class {i}" for i in range(300)): "at most 256",
        "shirt, " + "x" * 101: "at most 100 characters",
        "a," * 20_000: "characters; at most",
    }
    for classes, expected in cases.items():
        start = time.perf_counter()
        r = client.post("/predict", files=_upload(), data={"classes": classes})
        assert r.status_code == 400 and expected in r.json()["detail"], (expected, r.text[:300])
        assert "\n" not in r.json()["detail"] and time.perf_counter() - start < 5
    # the caps come first, also for a model that takes no class names
    r = TestClient(create_app(run_dir, explain_method=None)).post(
        "/predict", files=_upload(), data={"classes": ", ".join(map(str, range(300)))})
    assert r.status_code == 400 and "at most 256" in r.json()["detail"]


def test_seed_must_fit_in_63_bits(run_dir):
    client = TestClient(create_app(run_dir, explain_method=None))
    for seed in (2**70, 2**63, -1):
        r = client.post("/sample", params={"class": "0", "seed": str(seed)})
        assert r.status_code == 400 and "seed must be an integer in [0, 2**63)" in r.json()["detail"], r.text
    r = client.post("/sample", params={"class": "0", "seed": str(2**63 - 1)})  # accepted; then: not a generator
    assert r.status_code == 400 and "generator" in r.json()["detail"]


def test_slow_body_gets_408():
    from vitkit.tools.serve.app import BodyLimit

    async def reader(scope, receive, send):  # an app that reads its whole body, as FastAPI's form parser does
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def run() -> list[dict]:
        sent, chunks = [], iter([b"x" * 10])

        async def receive():
            chunk = next(chunks, None)
            if chunk is None:
                await asyncio.sleep(30)  # the client stalls
            return {"type": "http.request", "body": chunk, "more_body": True}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/predict", "headers": []}
        await asyncio.wait_for(BodyLimit(reader, 10**6, body_timeout=0.3)(scope, receive, send), 10)
        return sent

    start = time.perf_counter()
    sent = asyncio.run(run())
    assert sent[0]["status"] == 408 and time.perf_counter() - start < 5
    assert "did not arrive within 0.3 s" in json.loads(sent[1]["body"])["detail"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_uvicorn_closes_slow_connections_and_is_configured(run_dir, monkeypatch):
    import uvicorn

    from vitkit.tools.serve import serve
    from vitkit.tools.serve.limits import ServeLimits

    captured = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: captured.update(app=app, **kw))
    serve(run_dir, limits=ServeLimits(header_timeout=0.5, body_timeout=0.5))
    kw = dict(captured)
    app = kw.pop("app")
    assert kw["host"] == "127.0.0.1" and kw["limit_concurrency"] == 1024 and kw["timeout_keep_alive"] == 5
    assert kw["h11_max_incomplete_event_size"] == 16 * 1024
    port = _free_port()
    kw.update(port=port, log_level="warning")
    server = uvicorn.Server(uvicorn.Config(app, **kw))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 30
        while not server.started and time.time() < deadline:
            time.sleep(0.05)
        assert server.started

        def exchange(data: bytes) -> tuple[bytes, float]:
            start = time.perf_counter()
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(data)
                answer = b""
                while chunk := s.recv(65536):
                    answer += chunk
            return answer, time.perf_counter() - start

        answer, seconds = exchange(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # headers never finished
        assert answer == b"" and seconds < 5
        answer, seconds = exchange(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
                                   b"boundary=x\r\nContent-Length: 1000\r\n\r\n--x\r\n")  # a body that stalls
        assert answer.startswith(b"HTTP/1.1 408") and seconds < 5, answer[:200]
        answer, _ = exchange(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b'{"status":"ok"}')
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.mark.parametrize("flag, value", [("--max-upload-mb", "nan"), ("--max-upload-mb", "inf"),
                                         ("--max-upload-mb", "-1"), ("--max-upload-mb", "0"),
                                         ("--max-pending", "0"), ("--request-timeout", "nan"),
                                         ("--request-timeout", "-5"), ("--port", "70000"),
                                         ("--max-connections", "1.5"), ("--decode-memory-mb", "inf")])
def test_bad_flags_are_one_line_before_any_work(flag, value, tmp_path, capsys):
    from vitkit.cli import main

    try:
        code = main(["serve", str(tmp_path / "no_such_run"), flag, value])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert flag in err and f"got {value!r}" in err and "no_such_run" not in err, err


def test_decode_memory_beyond_the_machine_and_bad_limits_are_refused(tmp_path, capsys):
    from vitkit.cli import main
    from vitkit.errors import ConfigError
    from vitkit.tools.serve.limits import ServeLimits

    assert main(["serve", str(tmp_path / "no_such_run"), "--decode-memory-mb", str(2**29)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--decode-memory-mb" in err and "machine's memory" in err, err
    with pytest.raises(ConfigError, match=r"max_pending=0 must be an integer in \[1, 100000\]; "
                                          r"request_timeout=nan must be a finite number"):
        ServeLimits(max_pending=0, request_timeout=float("nan"))
    with pytest.raises(ConfigError, match="max_upload_bytes"):
        create_app(tmp_path, max_upload_bytes=0)
