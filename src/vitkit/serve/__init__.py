"""Serving a trained model: a web page and a JSON API (``vitkit serve``); needs the ``serve`` extra."""

from .app import DEFAULT_MAX_UPLOAD, ModelService, create_app, serve

__all__ = ["DEFAULT_MAX_UPLOAD", "ModelService", "create_app", "serve"]
