"""``vitkit serve``: one trained model behind a web page and a small JSON API (FastAPI + uvicorn).

Routes: ``GET /`` (the page), ``GET /health``, ``GET /model`` (model card), ``POST /predict`` (an uploaded image
-> top-k classes, probabilities and an attention overlay), ``POST /sample`` (generator runs), and FastAPI's own
``/docs`` (OpenAPI).

A classifier's logits come from a :mod:`~vitkit.tools.runtimes` runtime (``backend``: torch's prepared model,
onnxruntime or OpenVINO, or ``auto``: the fastest of those installed, timed once at start on one image), at
``precision``; the attention overlay is always computed by the eager model. A task whose ``predict`` needs more
than ``model(images)`` (zero-shot, generators, reconstruction) is served by the eager model, fp32, torch only.

Safety rules, each tested (``tests/test_serve.py``, ``tests/test_serve_limits.py``); the numbers are the
defaults of :class:`~vitkit.tools.serve.limits.ServeLimits`:

* only the model named on the command line is served; no request parameter reaches the file system;
* the server binds 127.0.0.1 unless told otherwise;
* a body larger than ``max_upload_bytes`` gets 413 before it is read into memory (the Content-Length header is
  checked first, and a chunked body is counted while it arrives); a body that has not arrived after 30 s gets
  408, and a connection whose request headers have not arrived after 10 s is closed;
* an image that cannot be decoded, or whose declared size is a decompression bomb, gets 400 with one line
  (the checks of :mod:`vitkit.data.image_io`, done before any pixel is decoded);
* admission: at most 64 ``/predict`` + ``/sample`` requests are in the server at once; the next gets 503 with
  ``Retry-After`` at once, before its upload is read. Decoding and the forward run in worker threads (one
  forward at a time), so the event loop stays free: ``/health`` answers while the model is saturated;
* a request is answered within 30 s of its upload's arrival: 503 (with ``Retry-After``) when it waited that
  long, 504 when its decode or forward ran past it;
* memory: at most min(4, CPUs) images decode at once, and only while their estimated decode memory fits in
  1/8 of the machine's memory together, whatever the number of clients;
* every field is capped and range-checked, with a one-line 400: at most 256 zero-shot class names of at most
  100 characters, ``seed`` in [0, 2**63).
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import functools
import io
import json
import math
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import torch
from fastapi import FastAPI, File, Form, HTTPException, Query, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse

from ..._version import __version__
from ...data.image_io import BadImageError, decode_pil, open_image
from ...errors import ConfigError, VitkitError
from ...tasks import class_index
from ...utils import format_bytes
from ..evaluate import load_model, resolve_model_dir, task_for_model
from ..runtimes import RuntimeModule, build_runtime, calibration_images, fastest_runtime
from . import DEFAULT_CALIBRATION_IMAGES, check_serving
from .limits import MAX_SEED, MAX_UPLOAD_MB, Budget, ServeLimits, decode_bytes

STATIC = Path(__file__).parent / "static"
DEFAULT_MAX_UPLOAD = 8 * 1024 * 1024
GUARDED = ("/predict", "/sample")  # the routes that use the model: admitted, bounded, in worker threads


async def _send_json(send, status: int, detail: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """ASGI middleware: 413 for request bodies over ``limit`` bytes, checked before the body is buffered; with
    ``body_timeout``, 408 for a body that has not arrived that many seconds after the request started."""

    def __init__(self, app, limit: int, upload_limit: int | None = None, body_timeout: float | None = None) -> None:
        self.app, self.limit, self.upload_limit, self.body_timeout = app, limit, upload_limit, body_timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await self._reject(send)
        loop = asyncio.get_running_loop()
        deadline = None if self.body_timeout is None else loop.time() + self.body_timeout
        seen = 0
        failed: int | None = None  # 413 or 408, once the body broke a limit
        started = body_done = False

        async def guarded_receive():
            nonlocal seen, failed, body_done
            if body_done or deadline is None:
                message = await receive()  # after the body (a disconnect), nothing is timed
            else:
                try:
                    message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
                except TimeoutError:
                    failed = 408
                    raise _BodyFailed from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if seen > self.limit:
                    failed = 413
                    raise _BodyFailed
            return message

        async def replacing_send(message):
            # the app may turn the receive error into its own answer (FastAPI: 400 "error parsing the body"):
            # whatever it answers after a limit was passed is replaced by the 413 / 408
            nonlocal started
            if failed is not None:
                if message["type"] == "http.response.start" and not started:
                    started = True
                    await self._fail(send, failed)
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, guarded_receive, replacing_send)
        except _BodyFailed:
            if not started:
                await self._fail(send, failed or 413)

    async def _fail(self, send, status: int) -> None:
        if status == 408:
            await _send_json(send, 408, f"the request body did not arrive within {self.body_timeout:g} s",
                             [(b"connection", b"close")])
        else:
            await self._reject(send)

    async def _reject(self, send) -> None:
        # the limit the user set (``limit`` adds room for the multipart envelope), in human units and exactly
        await _send_json(send, 413, f"upload larger than {format_bytes(self.upload_limit or self.limit)}")


class _BodyFailed(Exception):
    pass


class Admission:
    """ASGI middleware: at most ``service.limits.max_pending`` requests to the model routes at once; the next
    gets 503 with ``Retry-After`` immediately, before its body is read."""

    def __init__(self, app, service: ModelService) -> None:
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] not in GUARDED:
            return await self.app(scope, receive, send)
        if not self.service.admit():
            busy = self.service.busy(f"the server is full ({self.service.limits.max_pending} requests in progress)")
            return await _send_json(send, 503, str(busy), [(b"retry-after", str(busy.retry_after).encode())])
        try:
            await self.app(scope, receive, send)
        finally:
            self.service.leave()


class Busy(VitkitError):
    """The server cannot take the request now: 503 with ``Retry-After``."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Timeout(VitkitError):
    """The request ran past its deadline: 504."""


class ModelService:
    """The served model, its task, card and limits.

    :meth:`predict` and :meth:`sample` are the blocking Python API (thread-safe, one forward at a time);
    :meth:`predict_async` and :meth:`sample_async` are what the server awaits: they wait for a decode slot,
    the decode memory budget and the model with the request's deadline, and run the work in worker threads.
    """

    def __init__(self, run: str | Path, explain_method: str | None = "rollout", max_pending: int | None = None,
                 limits: ServeLimits | None = None, *, backend: str = "torch", precision: str = "fp32",
                 calibration_images: int = DEFAULT_CALIBRATION_IMAGES, threads: int | None = None,
                 log: Callable[[str], None] | None = print) -> None:
        resolved = check_serving(backend, precision, calibration_images, threads)  # before the model loads
        limits = limits or ServeLimits()
        if max_pending is not None:
            limits = replace(limits, max_pending=max_pending)
        self.limits = limits
        self.run = Path(run)
        self.model = load_model(run)  # eager: the attention overlay, and what non-classifier tasks run
        self.folder = resolve_model_dir(run)
        self.task = task_for_model(self.model, self.folder)
        self.task.setup(self.model)
        channels, h, w = self.model.pretrained_cfg.get("input_size", (1, 1, 1))  # generators take no image
        self.channels, self.size = int(channels), (int(h), int(w))
        self.generator = self.task.can("sample")
        # the classes /sample takes, known now: an unknown one is refused before it waits for (and reloads) the run
        self.class_names = self.task.output_names(self.model) if self.generator else []
        self.explain_method = None if self.generator else explain_method
        self.timings_ms: dict[str, float] | None = None  # --backend auto: median ms per call of each candidate
        self.predictor = self._predictor(backend, precision, resolved, calibration_images, threads, log)
        self._lock = threading.Lock()  # one forward at a time, also for callers of the blocking API
        self._slots = threading.BoundedSemaphore(limits.max_pending)  # admission
        self._admitted = 0
        self._count_lock = threading.Lock()
        self._seconds = 0.1  # running mean of a forward's wall time, for Retry-After
        self._decode_pool = concurrent.futures.ThreadPoolExecutor(limits.decode_threads, "vitkit-decode")
        self._model_pool = concurrent.futures.ThreadPoolExecutor(1, "vitkit-model")
        self._decode_slots = Budget(limits.decode_threads)
        self._decode_memory = Budget(limits.decode_budget)
        self._model_slot = Budget(1)
        self.card = self._card()

    # ------------------------------------------------------------------------------------ the runtime
    def _predicts_logits(self) -> bool:
        """Whether the task's predict only needs ``model(images)`` (all a runtime answers): the task says so."""
        return not self.generator and self.task.can("logits")

    def _predictor(self, backend: str, requested: str, precision: str, calibration: int, threads: int | None,
                   log: Callable[[str], None] | None) -> torch.nn.Module:
        """What ``task.predict`` runs: the runtime of ``backend`` (built, warmed up; ``auto``: the fastest)
        dressed as the model, or the eager model for a task whose predict needs more than logits."""
        if threads is not None:
            torch.set_num_threads(threads)
        if not self._predicts_logits():
            what = "a generator" if self.generator else f"a {self.task.name} model"
            if backend != "torch":
                raise ConfigError(f"{self.run}: {what} is served by its eager PyTorch model (only a classifier's "
                                  f"logits run on onnxruntime or OpenVINO): serve --backend torch")
            if requested not in ("fp32", "auto"):
                raise ConfigError(f"{self.run}: {what} is served by its eager PyTorch model in fp32 (bf16 and int8 "
                                  f"are for a classifier's logits): serve --precision fp32")
            self.backend, self.precision = "torch", "fp32"
            return self.model
        example = torch.randn(1, self.channels, *self.size, generator=torch.Generator().manual_seed(0))
        data = calibration_images(self.run, calibration, model=self.model) if precision == "int8" else None
        if backend == "auto":
            runtime, seconds = fastest_runtime(self.model, precision, example, threads=threads, calibration=data,
                                               log=log)
            self.timings_ms = {name: round(1000 * s, 4) for name, s in seconds.items()}
            width = max(map(len, self.timings_ms))
            for name, ms in self.timings_ms.items():
                if log:
                    log(f"serve --backend auto: {name:<{width}} {ms:9.3f} ms per image"
                        + ("   <- serving" if name == runtime.name else ""))
        else:
            runtime = build_runtime(self.model, backend, precision, threads=threads, calibration=data)
            with torch.inference_mode():
                runtime(example)  # compile for the request shape now, not on the first request
        self.backend, self.precision, self.runtime_name = runtime.backend, runtime.precision, runtime.name
        return RuntimeModule(runtime, self.model).eval()

    def close(self) -> None:
        self._decode_pool.shutdown(wait=False, cancel_futures=True)
        self._model_pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------------------------ admission
    def admit(self) -> bool:
        if not self._slots.acquire(blocking=False):
            return False
        with self._count_lock:
            self._admitted += 1
        return True

    def leave(self) -> None:
        with self._count_lock:
            self._admitted -= 1
        self._slots.release()

    def busy(self, why: str) -> Busy:
        """A 503 whose ``Retry-After`` is the time the requests in progress need, from the mean forward time."""
        seconds = min(60, max(1, math.ceil(self._seconds * max(1, self._admitted))))
        return Busy(f"{why}; retry in {seconds} s", seconds)

    # ------------------------------------------------------------------------------------ request fields
    def check_classes(self, classes: str | list[str] | None) -> list[str] | None:
        """Zero-shot class names, from the comma-separated form field or a list; capped, then checked against
        the task. Raises :class:`ConfigError` (400) naming the limit."""
        if classes is None:
            return None
        lim = self.limits
        if isinstance(classes, str):
            if len(classes) > lim.max_classes_field:
                raise ConfigError(f"classes: the field holds {len(classes):,} characters; at most "
                                  f"{lim.max_classes_field:,} ({lim.max_classes} names of at most "
                                  f"{lim.max_class_chars} characters)")
            classes = [c.strip() for c in classes.split(",") if c.strip()]
        if len(classes) > lim.max_classes:
            raise ConfigError(f"classes: {len(classes):,} class names; at most {lim.max_classes}")
        long = next((c for c in classes if not isinstance(c, str) or len(c) > lim.max_class_chars), None)
        if long is not None:
            shown = repr(long[:40] + "…") if isinstance(long, str) else type(long).__name__
            raise ConfigError(f"classes: a class name is at most {lim.max_class_chars} characters; {shown} has "
                              f"{len(long) if isinstance(long, str) else '?'}")
        if not self.task.can("zero_shot"):
            raise ConfigError(f"class names are for zero-shot models; this one is a {self.task.name} model")
        if len(classes) < 2:
            raise ConfigError("zero-shot needs at least two class names, separated by commas")
        return list(classes)

    @staticmethod
    def check_seed(seed: int) -> int:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < MAX_SEED:
            raise ConfigError(f"seed must be an integer in [0, 2**63), got {seed}")
        return seed

    def check_sample(self, class_name: str, seed: int) -> None:
        """What /sample checks before any work: the seed, a generator run, a class it knows (name, index or
        ``none``): a ConfigError (400) naming the classes, without waiting for the model or reloading the run."""
        self.check_seed(seed)
        if not self.generator:
            raise ConfigError(f"sampling is for generator runs; this one is a {self.task.name} model")
        class_index(class_name, self.class_names)

    # ------------------------------------------------------------------------------------ the work (threads)
    def _peek(self, fp) -> tuple[tuple[int, int], str]:
        """The declared size and mode, and the image_io limits: the header only, nothing decoded."""
        with open_image(fp, name="upload") as im:
            return im.size, im.mode

    def _decode(self, fp):
        return decode_pil(fp, self.channels, self.size, name="upload")

    def _infer(self, image, topk: int, explain: bool, classes: list[str] | None) -> dict[str, Any]:
        x = torch.from_numpy(_to_chw(image))[None]
        with self._lock:
            start = time.perf_counter()
            batch = self.task.prepare_batch(x, train=False)
            with torch.inference_mode():
                extra = {"class_names": classes} if classes is not None else {}
                result = self.task.predict(self.predictor, batch, topk=topk, **extra)[0]
            overlay = self._overlay(batch, image) if explain and self.explain_method else None
            self._seconds = 0.8 * self._seconds + 0.2 * (time.perf_counter() - start)
        out: dict[str, Any] = {"top": [{"label": name, "probability": p} for name, p in result.get("top", [])]}
        out.update({k: v for k, v in result.items() if k != "top"})
        if overlay is not None:
            out["explain"] = overlay
        return out

    def _sample(self, class_name: str, n: int, seed: int) -> dict[str, Any]:
        import tempfile

        from ..predict import sample_run

        with self._lock, tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            path, seconds = sample_run(self.run, class_name, n=n, seed=seed, out=Path(tmp) / "grid.png")
            data = path.read_bytes()
            self._seconds = 0.8 * self._seconds + 0.2 * (time.perf_counter() - start)
        return {"class": class_name, "n": n, "seed": seed, "ms_per_image": round(1000 * seconds, 2),
                "grid": "data:image/png;base64," + base64.b64encode(data).decode()}

    # ------------------------------------------------------------------------------------ blocking API
    def predict(self, data: bytes, topk: int = 5, explain: bool = True, classes: list[str] | None = None
                ) -> dict[str, Any]:
        """Top-k of one uploaded image; ``classes`` are zero-shot classes (tasks that can do zero-shot)."""
        classes = self.check_classes(classes)
        if not self.admit():
            raise self.busy("too many requests are waiting")
        try:
            start = time.perf_counter()
            out = self._infer(self._decode(io.BytesIO(data)), topk, explain, classes)
            out["time_ms"] = round(1000 * (time.perf_counter() - start), 2)
            return out
        finally:
            self.leave()

    def sample(self, class_name: str, n: int, seed: int) -> dict[str, Any]:
        """A PNG grid of ``n`` samples of one class from a generator run, as a data URL."""
        self.check_sample(class_name, seed)
        if not self.admit():
            raise self.busy("too many requests are waiting")
        try:
            return self._sample(class_name, n, seed)
        finally:
            self.leave()

    # ------------------------------------------------------------------------------------ what the server awaits
    async def _wait(self, budget: Budget, weight: int, deadline: float, what: str) -> int:
        taken = await budget.acquire(weight, deadline - asyncio.get_running_loop().time())
        if taken is None:
            raise self.busy(f"waited {self.limits.request_timeout:g} s for {what}")
        return taken

    async def _in_thread(self, pool, fn, *args, deadline: float, release=()) -> Any:
        """``fn(*args)`` in ``pool``; the budgets in ``release`` are given back when the thread is done (not
        when the request gives up: the memory and the model are in use until then)."""
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(pool, functools.partial(fn, *args))

        def done(f) -> None:
            for budget, weight in release:
                budget.release(weight)
            if not f.cancelled():
                f.exception()  # retrieved, also when nobody awaits it any more

        future.add_done_callback(done)
        try:
            return await asyncio.wait_for(asyncio.shield(future), max(0.0, deadline - loop.time()))
        except TimeoutError:
            raise Timeout(f"the request took longer than {self.limits.request_timeout:g} s "
                          f"(--request-timeout)") from None

    async def predict_async(self, fp, topk: int = 5, explain: bool = True, classes: list[str] | None = None
                            ) -> dict[str, Any]:
        """:meth:`predict` of an upload (a binary file), bounded by the deadline, the decode slots, the decode
        memory budget and the model slot."""
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        deadline = loop.time() + self.limits.request_timeout
        slot = await self._wait(self._decode_slots, 1, deadline, "a decode slot")
        try:
            size, mode = await self._in_thread(self._decode_pool, self._peek, fp, deadline=deadline)
            memory = await self._wait(self._decode_memory, decode_bytes(size, mode), deadline, "decode memory")
        except BaseException:
            self._decode_slots.release(slot)
            raise
        image = await self._in_thread(self._decode_pool, self._decode, fp, deadline=deadline,
                                      release=((self._decode_slots, slot), (self._decode_memory, memory)))
        model = await self._wait(self._model_slot, 1, deadline, "the model")
        out = await self._in_thread(self._model_pool, self._infer, image, topk, explain, classes,
                                    deadline=deadline, release=((self._model_slot, model),))
        out["time_ms"] = round(1000 * (time.perf_counter() - start), 2)
        return out

    async def sample_async(self, class_name: str, n: int, seed: int) -> dict[str, Any]:
        self.check_sample(class_name, seed)
        deadline = asyncio.get_running_loop().time() + self.limits.request_timeout
        model = await self._wait(self._model_slot, 1, deadline, "the model")
        return await self._in_thread(self._model_pool, self._sample, class_name, n, seed, deadline=deadline,
                                     release=((self._model_slot, model),))

    # ------------------------------------------------------------------------------------ card and overlay
    def _card(self) -> dict[str, Any]:
        model = self.model
        cfg = model.pretrained_cfg
        card: dict[str, Any] = {
            "name": model.model_name or type(model).__name__, "class": type(model).__name__,
            "parameters": sum(p.numel() for p in model.parameters()), "task": self.task.name,
            "input_size": list(cfg.get("input_size", [])), "class_names": list(cfg.get("class_names") or []),
            "vitkit_version": __version__, "explain": self.explain_method, "generator": self.generator,
            "capabilities": sorted(self.task.capabilities), "backend": self.backend, "precision": self.precision,
        }
        if self.timings_ms is not None:
            card["auto"] = {"median_ms": self.timings_ms, "picked": self.runtime_name}
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


def _to_chw(image) -> Any:
    import numpy as np

    arr = np.asarray(image, dtype=np.uint8)
    return (arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)).copy()


def _http_error(e: Exception) -> HTTPException:
    """One line for every refusal: 400 bad input, 503 busy (with Retry-After), 504 past the deadline."""
    if isinstance(e, Busy):
        return HTTPException(503, str(e), headers={"Retry-After": str(e.retry_after)})
    if isinstance(e, Timeout):
        return HTTPException(504, str(e))
    return HTTPException(400, str(e))


def create_app(run: str | Path, max_upload_bytes: int = DEFAULT_MAX_UPLOAD, explain_method: str | None = "rollout",
               max_pending: int | None = None, *, limits: ServeLimits | None = None, backend: str = "torch",
               precision: str = "fp32", calibration_images: int = DEFAULT_CALIBRATION_IMAGES,
               threads: int | None = None, log: Callable[[str], None] | None = print):
    """The FastAPI app serving the model of ``run`` (a run folder or checkpoint folder, loaded once, now).

    ``limits`` (:class:`~vitkit.tools.serve.limits.ServeLimits`) bounds admission, deadlines, decode memory and
    the request fields; ``max_pending`` overrides its ``max_pending``. ``backend``, ``precision``,
    ``calibration_images`` (int8) and ``threads`` choose what runs a classifier's forward (see the module
    docstring); ``log`` gets the ``auto`` timings, one line per backend."""
    if (isinstance(max_upload_bytes, bool) or not isinstance(max_upload_bytes, int)
            or not 1 <= max_upload_bytes <= MAX_UPLOAD_MB * 1024**2):
        raise ConfigError(f"max_upload_bytes must be an integer in [1, {MAX_UPLOAD_MB} MiB], got {max_upload_bytes!r}")
    service = ModelService(run, explain_method, max_pending, limits, backend=backend, precision=precision,
                           calibration_images=calibration_images, threads=threads, log=log)
    limits = service.limits

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        service.close()

    app = FastAPI(title="vitkit serve", version=__version__, lifespan=lifespan,
                  description=f"Serves {service.card['name']} ({service.card['task']}, {service.backend} "
                              f"{service.precision}). POST an image to /predict.")
    page = (STATIC / "index.html").read_text(encoding="utf-8")

    @app.exception_handler(RequestValidationError)
    async def one_line_400(_request, exc: RequestValidationError):
        """A missing or out-of-range field is a 400 with one line naming it (FastAPI's default: a 422 list)."""
        problems = []
        for err in exc.errors()[:5]:
            where = ".".join(str(x) for x in err.get("loc", ()) if x not in ("query", "body", "path"))
            problems.append(f"{where or 'request'}: {err.get('msg', 'invalid')}")
        return JSONResponse({"detail": "; ".join(problems) or "invalid request"}, status_code=400)

    # every route is a coroutine: nothing waits for a worker thread except the model's own work
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> str:
        return page

    @app.get("/health")
    async def health() -> dict[str, str]:
        """Liveness: the model is loaded (answered by the event loop, also while the model is saturated)."""
        return {"status": "ok"}

    @app.get("/model")
    async def model_card() -> dict[str, Any]:
        """Name, parameter count, task, input size, classes, training data and accuracy (``summary.json``)."""
        return service.card

    @app.post("/predict")
    async def predict(file: Annotated[UploadFile, File(description="an image (PNG, JPEG, WebP, ...)")],
                      topk: Annotated[int, Query(ge=1, le=1000)] = 5, explain: bool = True,
                      classes: Annotated[str | None, Form(description="zero-shot models: class names, comma-"
                                                                      "separated (capped: 256 names of 100 characters "
                                                                      "by default)")] = None) -> dict[str, Any]:
        """Top-k classes with probabilities, and the attention overlay (a PNG data URL) when the model has one."""
        try:
            names = service.check_classes(classes)
        except ConfigError as e:
            raise _http_error(e) from None
        size = file.size
        if size is None:
            file.file.seek(0, io.SEEK_END)
            size = file.file.tell()
        if size > max_upload_bytes:
            raise HTTPException(413, f"upload larger than {format_bytes(max_upload_bytes)}")
        if not size:
            raise HTTPException(400, "empty upload: send an image file in the 'file' field")
        try:
            return await service.predict_async(file.file, topk, explain, names)
        except (BadImageError, ConfigError, Busy, Timeout) as e:
            raise _http_error(e) from None

    @app.post("/sample")
    async def sample(class_name: Annotated[str, Query(alias="class", max_length=64)],
                     n: Annotated[int, Query(ge=1, le=64)] = 16,
                     seed: Annotated[int, Query(description="an integer in [0, 2**63)")] = 0) -> dict[str, Any]:
        """Generator runs: a PNG grid (data URL) of ``n`` class-conditional samples (``class``: a name, an index,
        or ``none``)."""
        try:
            return await service.sample_async(class_name, n, seed)
        except (ConfigError, Busy, Timeout) as e:
            raise _http_error(e) from None

    app.state.service = service
    # room for the multipart envelope; the message names the user's limit. Added last = outermost: a request
    # beyond the admission limit is refused before anything else looks at it.
    app.add_middleware(BodyLimit, limit=max_upload_bytes + 64 * 1024, upload_limit=max_upload_bytes,
                       body_timeout=limits.body_timeout)
    app.add_middleware(Admission, service=service)
    return app


def _uvicorn_protocol(header_timeout: float):
    """uvicorn's h11 protocol, closing a connection whose request headers have not all arrived ``header_timeout``
    seconds after it opened or after its previous answer (uvicorn itself waits for ever: slowloris)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutH11(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(header_timeout, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _idle(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def handle_events(self) -> None:
            super().handle_events()
            if not self._idle():
                self._disarm()  # a request's headers are in: the body and request deadlines take over

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self._idle() and not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if self._idle() and not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeoutH11


def serve(run: str | Path, host: str = "127.0.0.1", port: int = 8000, max_upload_bytes: int = DEFAULT_MAX_UPLOAD,
          explain_method: str | None = "rollout", limits: ServeLimits | None = None, *, backend: str = "torch",
          precision: str = "fp32", calibration_images: int = DEFAULT_CALIBRATION_IMAGES, threads: int | None = None
          ) -> None:
    """Load the model, build its runtime and serve it until interrupted."""
    import uvicorn

    limits = limits or ServeLimits()
    app = create_app(run, max_upload_bytes, explain_method, limits=limits, backend=backend, precision=precision,
                     calibration_images=calibration_images, threads=threads)
    uvicorn.run(app, host=host, port=port,
                log_level="info", http=_uvicorn_protocol(limits.header_timeout),
                limit_concurrency=limits.max_connections, timeout_keep_alive=limits.keep_alive_timeout,
                h11_max_incomplete_event_size=limits.max_header_bytes)
