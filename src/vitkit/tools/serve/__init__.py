"""Serving a trained model: a web page and a JSON API (``vitkit serve``); needs the ``serve`` extra.

The app is imported on first use, so ``vitkit --help`` and the argument parser work without FastAPI."""

from __future__ import annotations

from typing import Any

from ...schema import machine_memory
from .limits import MAX_UPLOAD_MB, ServeLimits, number_flag

__all__ = ["DEFAULT_MAX_UPLOAD", "ModelService", "ServeLimits", "create_app", "serve", "add_serve_args",
           "run_serve_args"]

_DEFAULTS = ServeLimits.__dataclass_fields__
_UPLOAD_MB = number_flag("--max-upload-mb", float, 0.001, MAX_UPLOAD_MB, unit=" MiB")


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


def run_serve_args(args: Any) -> int:
    from ...errors import ConfigError

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
          None if args.explain == "none" else args.explain, limits=limits)
    return 0
