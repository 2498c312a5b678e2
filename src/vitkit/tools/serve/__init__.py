"""Serving a trained model: a web page and a JSON API (``vitkit serve``); needs the ``serve`` extra.

The app is imported on first use, so ``vitkit --help`` and the argument parser work without FastAPI. The
``--backend`` / ``--precision`` checks that need no model (:func:`check_serving`) live here too, so a bad
combination or a missing extra is refused in one line before anything loads."""

from __future__ import annotations

import importlib.util
from typing import Any

from ...errors import ConfigError
from ...schema import machine_memory
from .limits import MAX_UPLOAD_MB, ServeLimits, number_flag

__all__ = ["DEFAULT_MAX_UPLOAD", "ModelService", "ServeLimits", "create_app", "serve", "add_serve_args",
           "run_serve_args", "check_serving", "SERVE_BACKENDS", "SERVE_PRECISIONS"]

_DEFAULTS = ServeLimits.__dataclass_fields__
_UPLOAD_MB = number_flag("--max-upload-mb", float, 0.001, MAX_UPLOAD_MB, unit=" MiB")
SERVE_BACKENDS = ("torch", "onnxruntime", "openvino", "auto")
SERVE_PRECISIONS = ("fp32", "bf16", "int8", "auto")
DEFAULT_CALIBRATION_IMAGES = 300  # the usual few hundred of post-training quantization
MAX_THREADS = 4096
_CALIBRATION = number_flag("--calibration-images", int, 1, 100_000)
_THREADS = number_flag("--threads", int, 1, MAX_THREADS)
# what each backend needs installed beyond torch: (module, extra, feature). onnxruntime and OpenVINO run vitkit's
# ONNX export, which needs onnx and checks the file against onnxruntime before it is used.
_EXPORT = (("onnx", "export", "vitkit's ONNX export"), ("onnxruntime", "export", "vitkit's ONNX export check"))
_EXTRAS: dict[tuple[str, str], tuple[tuple[str, str, str], ...]] = {
    ("torch", "int8"): (("torchao", "int8", "int8 on the torch backend"),),
    ("onnxruntime", "*"): (("onnxruntime", "export", "the onnxruntime backend"), *_EXPORT),
    ("openvino", "*"): (("openvino", "openvino", "the OpenVINO backend"), *_EXPORT),
    ("openvino", "int8"): (("nncf", "openvino", "int8 OpenVINO models"),),
}


def _extras(backend: str, precision: str) -> tuple[tuple[str, str, str], ...]:
    return _EXTRAS.get((backend, "*"), ()) + _EXTRAS.get((backend, precision), ())


def auto_precision(backend: str) -> str:
    """``--precision auto``: bf16 where the CPU has native bf16 arithmetic and the backend runs bf16, else fp32
    (emulated bf16 is slower than fp32)."""
    from ...utils import native_bf16_supported
    from ..runtimes import SUPPORTED

    runs_bf16 = backend == "auto" or "bf16" in SUPPORTED.get(backend, ())
    return "bf16" if runs_bf16 and native_bf16_supported() else "fp32"


def check_serving(backend: str, precision: str, calibration_images: int = DEFAULT_CALIBRATION_IMAGES,
                  threads: int | None = None) -> str:
    """The checks that need no model, each one line: the backend and precision exist and go together, the
    numbers are in range, and what the backend needs is installed (``require_extra`` names the extra). Returns
    the precision to serve at (``auto`` resolved for a classifier; other tasks are served in fp32)."""
    from ...utils import require_extra
    from ..runtimes import BACKENDS, SUPPORTED, check_backend

    if backend not in SERVE_BACKENDS:
        raise ConfigError(f"--backend must be one of {', '.join(SERVE_BACKENDS)}, got {backend!r}")
    if precision not in SERVE_PRECISIONS:
        raise ConfigError(f"--precision must be one of {', '.join(SERVE_PRECISIONS)}, got {precision!r}")
    resolved = auto_precision(backend) if precision == "auto" else precision
    if backend != "auto":
        check_backend(backend, resolved)
    for flag, value, high in (("--calibration-images", calibration_images, 100_000), ("--threads", threads,
                                                                                       MAX_THREADS)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high):
            raise ConfigError(f"{flag} must be an integer in [1, {high}], got {value!r}")
    if backend != "auto":
        for module, extra, feature in _extras(backend, resolved):
            require_extra(module, extra, feature)
        return resolved
    # auto: torch always competes; another backend competes when installed, and then it must be complete
    for module, extra, feature in _extras("torch", resolved):
        require_extra(module, extra, feature)
    for other in BACKENDS[1:]:
        if resolved in SUPPORTED[other] and importlib.util.find_spec(other) is not None:
            for module, extra, feature in _extras(other, resolved):
                require_extra(module, extra, f"{feature} (installed, so --backend auto would time it)")
    return resolved


def __getattr__(name: str) -> Any:
    if name in ("DEFAULT_MAX_UPLOAD", "ModelService", "create_app", "serve"):
        from . import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def add_serve_args(p: Any) -> None:
    d = {name: f.default for name, f in _DEFAULTS.items()}
    p.add_argument("run", help="a training run folder or checkpoint folder: the only model this server serves")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=number_flag("--port", int, 1, 65535), default=8000)
    p.add_argument("--max-upload-mb", type=_UPLOAD_MB, default=8.0, help="larger uploads get 413 (MiB)")
    p.add_argument("--explain", default="rollout", choices=["rollout", "last", "grad", "none"],
                   help="attention overlay shown with each prediction")
    p.add_argument("--max-pending", type=number_flag("--max-pending", int, 1, 100_000), default=d["max_pending"],
                   help=f"requests to /predict and /sample in the server at once; the next gets 503 with Retry-After "
                        f"(default {d['max_pending']})")
    p.add_argument("--request-timeout", type=number_flag("--request-timeout", float, 0, 3600, open_low=True,
                                                         unit=" s"),
                   default=d["request_timeout"],
                   help=f"seconds from an upload's arrival to its answer: 503 when it waited that long, 504 when the "
                        f"forward ran past it (default {d['request_timeout']:g})")
    p.add_argument("--max-connections", type=number_flag("--max-connections", int, 1, 1_000_000),
                   default=d["max_connections"],
                   help=f"open connections beyond which uvicorn answers 503 (default {d['max_connections']})")
    p.add_argument("--decode-memory-mb", type=number_flag("--decode-memory-mb", float, 1, 2**30, unit=" MiB"),
                   default=None, help="memory the images being decoded may need together (default: 1/8 of this "
                                      "machine's memory)")
    p.add_argument("--backend", default="torch", choices=SERVE_BACKENDS,
                   help="what runs a classifier's forward: torch (vitkit's prepared model), onnxruntime or openvino "
                        "(on vitkit's ONNX export of the same weights), or auto: build every installed one at start, "
                        "time each on one image and serve the fastest. Other tasks are served by torch only")
    p.add_argument("--precision", default="fp32", choices=SERVE_PRECISIONS,
                   help="fp32 (exact to float32 rounding), bf16 (torch, openvino), int8 (torch, openvino; calibrated "
                        "on the run's training images), or auto: bf16 where the CPU has native bf16 and the backend "
                        "runs it, else fp32 (default fp32)")
    p.add_argument("--calibration-images", type=_CALIBRATION, default=DEFAULT_CALIBRATION_IMAGES,
                   help=f"int8: training images of the run that set the activation scales (default "
                        f"{DEFAULT_CALIBRATION_IMAGES})")
    p.add_argument("--threads", type=_THREADS, default=None,
                   help="CPU threads of the forward (default: torch's, the number of cores)")


def run_serve_args(args: Any) -> int:
    backend = getattr(args, "backend", "torch")
    precision = getattr(args, "precision", "fp32")
    calibration = getattr(args, "calibration_images", DEFAULT_CALIBRATION_IMAGES)
    threads = getattr(args, "threads", None)
    check_serving(backend, precision, calibration, threads)  # one line before FastAPI or the model is imported
    try:
        from .app import serve
    except ImportError as e:
        raise ConfigError(f"vitkit serve needs FastAPI and uvicorn: pip install 'vitkit[serve]' ({e})") from None
    # the same checks as the flags' types, for callers that build the namespace themselves
    for flag, value, check in (("--port", args.port, number_flag("--port", int, 1, 65535)),
                               ("--max-upload-mb", args.max_upload_mb, _UPLOAD_MB)):
        try:
            check(str(value))
        except Exception as e:
            raise ConfigError(f"{flag} {e}") from None
    memory = getattr(args, "decode_memory_mb", None)
    if memory is not None and memory * 1024**2 > machine_memory():
        raise ConfigError(f"--decode-memory-mb {memory:g} is more than this machine's memory "
                          f"({machine_memory() / 1024**2:,.0f} MiB)")
    limits = ServeLimits(  # range-checked: one ConfigError line naming every bad field
        max_pending=getattr(args, "max_pending", _DEFAULTS["max_pending"].default),
        request_timeout=float(getattr(args, "request_timeout", _DEFAULTS["request_timeout"].default)),
        max_connections=getattr(args, "max_connections", _DEFAULTS["max_connections"].default),
        decode_memory_bytes=None if memory is None else int(memory * 1024 * 1024),
    )
    serve(args.run, args.host, args.port, int(args.max_upload_mb * 1024 * 1024),
          None if args.explain == "none" else args.explain, limits=limits, backend=backend, precision=precision,
          calibration_images=calibration, threads=threads)
    return 0
