"""Serving a trained model: a web page and a JSON API (``vitkit serve``); needs the ``serve`` extra.

The app is imported on first use, so ``vitkit --help`` and the argument parser work without FastAPI."""

from __future__ import annotations

from typing import Any

__all__ = ["DEFAULT_MAX_UPLOAD", "ModelService", "create_app", "serve", "add_serve_args", "run_serve_args"]


def __getattr__(name: str) -> Any:
    if name in ("DEFAULT_MAX_UPLOAD", "ModelService", "create_app", "serve"):
        from . import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def add_serve_args(p: Any) -> None:
    p.add_argument("run", help="a training run folder or checkpoint folder: the only model this server serves")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-upload-mb", type=float, default=8.0, help="larger uploads get 413 (MiB)")
    p.add_argument("--explain", default="rollout", choices=["rollout", "last", "grad", "none"],
                   help="attention overlay shown with each prediction")


def run_serve_args(args: Any) -> int:
    from ...errors import ConfigError

    try:
        from .app import serve
    except ImportError as e:
        raise ConfigError(f"vitkit serve needs FastAPI and uvicorn: pip install 'vitkit[serve]' ({e})") from None
    if not 0 < args.port < 65536 or not args.max_upload_mb > 0:
        raise ConfigError("--port must be in 1..65535 and --max-upload-mb > 0")
    serve(args.run, args.host, args.port, int(args.max_upload_mb * 1024 * 1024),
          None if args.explain == "none" else args.explain)
    return 0
