"""``vitkit serve``: one trained model behind a web page and a small JSON API (FastAPI + uvicorn).

Routes: ``GET /`` (the page), ``GET /health``, ``GET /model`` (model card), ``POST /predict`` (an uploaded image
-> top-k classes, probabilities and an attention overlay), and FastAPI's own ``/docs`` (OpenAPI).

Safety rules, each tested:

* only the model named on the command line is served; no request parameter reaches the file system;
* the server binds 127.0.0.1 unless told otherwise;
* a body larger than ``max_upload_bytes`` gets 413 before it is read into memory (the Content-Length header is
  checked first, and a chunked body is counted while it arrives);
* an image that cannot be decoded, or whose declared size is a decompression bomb, gets 400 with one line
  (the checks of :mod:`vitkit.data.image_io`, done before any pixel is decoded);
* inference is serialised by one lock (one forward at a time, so memory does not grow with the number of
  clients), and at most ``max_pending`` requests wait for it; beyond that the answer is 503, not a queue
  that grows without bound.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import torch
from fastapi import FastAPI, File, Form, HTTPException, Query, UploadFile
from fastapi.responses import HTMLResponse

from ..._version import __version__
from ...data.image_io import BadImageError, decode_pil
from ...errors import ConfigError, VitkitError
from ...utils import format_bytes
from ..evaluate import load_model, resolve_model_dir, task_for_model

STATIC = Path(__file__).parent / "static"
DEFAULT_MAX_UPLOAD = 8 * 1024 * 1024


class BodyLimit:
    """ASGI middleware: 413 for request bodies over ``limit`` bytes, checked before the body is buffered."""

    def __init__(self, app, limit: int, upload_limit: int | None = None) -> None:
        self.app, self.limit, self.upload_limit = app, limit, upload_limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await self._reject(send)
        seen = 0
        exceeded = started = False

        async def counting_receive():
            nonlocal seen, exceeded
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    exceeded = True
                    raise _TooLarge
            return message

        async def replacing_send(message):
            # the app may turn the receive error into its own answer (FastAPI: 400 "error parsing the body"):
            # whatever it answers after the limit was passed is replaced by the 413
            nonlocal started
            if exceeded:
                if message["type"] == "http.response.start" and not started:
                    started = True
                    await self._reject(send)
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, replacing_send)
        except _TooLarge:
            if not started:
                await self._reject(send)

    async def _reject(self, send) -> None:
        # the limit the user set (``limit`` adds room for the multipart envelope), in human units and exactly
        size = format_bytes(self.upload_limit or self.limit)
        body = json.dumps({"detail": f"upload larger than {size}"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


class ModelService:
    """The served model, its task and card; :meth:`predict` is thread-safe and runs one forward at a time."""

    def __init__(self, run: str | Path, explain_method: str | None = "rollout", max_pending: int = 64) -> None:
        self.run = Path(run)
        self.model = load_model(run)
        self.folder = resolve_model_dir(run)
        self.task = task_for_model(self.model, self.folder)
        self.task.setup(self.model)
        channels, h, w = self.model.pretrained_cfg.get("input_size", (1, 1, 1))  # generators take no image
        self.channels, self.size = int(channels), (int(h), int(w))
        self.generator = self.task.can("sample")
        self.explain_method = None if self.generator else explain_method
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_pending)
        self.card = self._card()

    def _card(self) -> dict[str, Any]:
        model = self.model
        cfg = model.pretrained_cfg
        card: dict[str, Any] = {
            "name": model.model_name or type(model).__name__, "class": type(model).__name__,
            "parameters": sum(p.numel() for p in model.parameters()), "task": self.task.name,
            "input_size": list(cfg.get("input_size", [])), "class_names": list(cfg.get("class_names") or []),
            "vitkit_version": __version__, "explain": self.explain_method, "generator": self.generator,
            "capabilities": sorted(self.task.capabilities),
        }
        for where in (self.run, self.run.parent, self.folder.parent.parent):  # run folder, or checkpoint's run
            summary = where / "summary.json"
            if summary.is_file():
                try:
                    s = json.loads(summary.read_text())
                except (OSError, ValueError):
                    break
                card["training"] = {k: s.get(k) for k in ("epochs_done", "final", "best", "train_wall_clock_s")}
                break
        for where in (self.run, self.folder.parent.parent):
            config = where / "config.yaml"
            if config.is_file():
                from omegaconf import OmegaConf

                data = OmegaConf.load(config).get("data", {})
                card["training_data"] = data.get("name") if hasattr(data, "get") else None
                break
        return card

    def predict(self, data: bytes, topk: int = 5, explain: bool = True, classes: list[str] | None = None
                ) -> dict[str, Any]:
        """Top-k of one uploaded image; ``classes`` are zero-shot classes (tasks that can do zero-shot)."""
        if classes is not None and not self.task.can("zero_shot"):
            raise ConfigError(f"class names are for zero-shot models; this one is a {self.task.name} model")
        if classes is not None and len(classes) < 2:
            raise ConfigError("zero-shot needs at least two class names, separated by commas")
        if not self._slots.acquire(blocking=False):
            raise Busy("too many requests are waiting; try again")
        try:
            start = time.perf_counter()
            image = decode_pil(io.BytesIO(data), self.channels, self.size, name="upload")
            x = torch.from_numpy(_to_chw(image))[None]
            with self._lock:
                batch = self.task.prepare_batch(x, train=False)
                with torch.inference_mode():
                    extra = {"class_names": classes} if classes is not None else {}
                    result = self.task.predict(self.model, batch, topk=topk, **extra)[0]
                overlay = self._overlay(batch, image) if explain and self.explain_method else None
            out: dict[str, Any] = {"top": [{"label": name, "probability": p} for name, p in result.get("top", [])]}
            out.update({k: v for k, v in result.items() if k != "top"})
            if overlay is not None:
                out["explain"] = overlay
            out["time_ms"] = round(1000 * (time.perf_counter() - start), 2)
            return out
        finally:
            self._slots.release()

    def sample(self, class_name: str, n: int, seed: int) -> dict[str, Any]:
        """A PNG grid of ``n`` samples of one class from a generator run, as a data URL."""
        if not self.generator:
            raise ConfigError(f"sampling is for generator runs; this one is a {self.task.name} model")
        if not self._slots.acquire(blocking=False):
            raise Busy("too many requests are waiting; try again")
        import tempfile

        from ..predict import sample_run

        try:
            with self._lock, tempfile.TemporaryDirectory() as tmp:
                path, seconds = sample_run(self.run, class_name, n=n, seed=seed, out=Path(tmp) / "grid.png")
                data = path.read_bytes()
            return {"class": class_name, "n": n, "seed": seed, "ms_per_image": round(1000 * seconds, 2),
                    "grid": "data:image/png;base64," + base64.b64encode(data).decode()}
        finally:
            self._slots.release()

    def _overlay(self, batch: torch.Tensor, image) -> dict[str, Any]:
        """The attention overlay as a PNG data URL, or why this model has none."""
        from ...viz.attention import render_overlay
        from ..explain import explain

        try:
            heat = explain(self.model, batch, self.explain_method)[0]
        except ConfigError as e:
            return {"method": self.explain_method, "unsupported": str(e)}
        buf = io.BytesIO()
        render_overlay(image, heat.float().numpy()).save(buf, format="PNG")
        return {"method": self.explain_method,
                "overlay": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()}


class Busy(VitkitError):
    pass


def _to_chw(image) -> Any:
    import numpy as np

    arr = np.asarray(image, dtype=np.uint8)
    return (arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)).copy()


def create_app(run: str | Path, max_upload_bytes: int = DEFAULT_MAX_UPLOAD, explain_method: str | None = "rollout",
               max_pending: int = 64):
    """The FastAPI app serving the model of ``run`` (a run folder or checkpoint folder, loaded once, now)."""

    service = ModelService(run, explain_method, max_pending)
    app = FastAPI(title="vitkit serve", version=__version__,
                  description=f"Serves {service.card['name']} ({service.card['task']}). POST an image to /predict.")
    page = (STATIC / "index.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> str:
        return page

    @app.get("/health")
    def health() -> dict[str, str]:
        """Liveness: the model is loaded."""
        return {"status": "ok"}

    @app.get("/model")
    def model_card() -> dict[str, Any]:
        """Name, parameter count, task, input size, classes, training data and accuracy (``summary.json``)."""
        return service.card

    @app.post("/predict")
    def predict(file: Annotated[UploadFile, File(description="an image (PNG, JPEG, WebP, ...)")],
                topk: Annotated[int, Query(ge=1, le=1000)] = 5, explain: bool = True,
                classes: Annotated[str | None, Form(description="zero-shot models: class names, comma-separated")]
                = None) -> dict[str, Any]:
        """Top-k classes with probabilities, and the attention overlay (a PNG data URL) when the model has one."""
        data = file.file.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise HTTPException(413, f"upload larger than {format_bytes(max_upload_bytes)}")
        if not data:
            raise HTTPException(400, "empty upload: send an image file in the 'file' field")
        names = [c.strip() for c in classes.split(",") if c.strip()] if classes is not None else None
        try:
            return service.predict(data, topk, explain, names)
        except (BadImageError, ConfigError) as e:
            raise HTTPException(400, str(e)) from None
        except Busy as e:
            raise HTTPException(503, str(e)) from None

    @app.post("/sample")
    def sample(class_name: Annotated[str, Query(alias="class", max_length=64)],
               n: Annotated[int, Query(ge=1, le=64)] = 16, seed: int = 0) -> dict[str, Any]:
        """Generator runs: a PNG grid (data URL) of ``n`` class-conditional samples (``class``: a name, an index,
        or ``none``)."""
        try:
            return service.sample(class_name, n, seed)
        except ConfigError as e:
            raise HTTPException(400, str(e)) from None
        except Busy as e:
            raise HTTPException(503, str(e)) from None

    app.state.service = service
    # room for the multipart envelope; the message names the user's limit
    app.add_middleware(BodyLimit, limit=max_upload_bytes + 64 * 1024, upload_limit=max_upload_bytes)
    return app


def serve(run: str | Path, host: str = "127.0.0.1", port: int = 8000, max_upload_bytes: int = DEFAULT_MAX_UPLOAD,
          explain_method: str | None = "rollout") -> None:
    """Load the model and serve it until interrupted."""
    import uvicorn

    uvicorn.run(create_app(run, max_upload_bytes, explain_method), host=host, port=port, log_level="info")
