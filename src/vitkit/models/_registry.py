"""The model registry: ``create_model(name, pretrained=PATH, **overrides)`` and ``list_models(pattern)``.

Families register named configurations with :func:`register_model` (a function returning a model) or
:func:`register_config` (a class plus default arguments, for families with many sizes).
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
import os
from collections.abc import Callable
from typing import Any

from torch import nn

_ENTRYPOINTS: dict[str, Callable[..., nn.Module]] = {}
_FAMILY: dict[str, str] = {}
_DEFAULTS: dict[str, dict[str, Any]] = {}
_CLASSES: dict[str, type] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: register ``fn(**overrides) -> model`` under its function name."""
    name = fn.__name__
    if name in _ENTRYPOINTS:
        raise ValueError(f"model {name!r} is registered twice")
    _ENTRYPOINTS[name] = fn
    _FAMILY[name] = fn.__module__.rsplit(".", 1)[-1]
    return fn


def register_config(name: str, cls: type, pretrained_cfg: dict[str, Any] | None = None, **defaults: Any) -> None:
    """Register ``name`` as ``cls(**{**defaults, **overrides})`` with data metadata ``pretrained_cfg``."""

    def entrypoint(**overrides: Any) -> nn.Module:
        model = cls(**{**defaults, **overrides})
        if pretrained_cfg:
            cfg = {**model.pretrained_cfg, **pretrained_cfg}
            names = cfg.get("class_names")
            if names is not None and len(names) != getattr(model, "num_classes", len(names)):
                cfg.pop("class_names")  # the head was overridden to another label set
            model.pretrained_cfg = cfg
        return model

    entrypoint.__name__ = name
    entrypoint.__module__ = cls.__module__
    entrypoint.__doc__ = f"{cls.__name__} with {defaults}"
    register_model(entrypoint)
    _DEFAULTS[name] = dict(defaults)
    _CLASSES[name] = cls


def model_defaults(name: str) -> dict[str, Any]:
    """The constructor arguments a registered configuration sets (empty for function entry points)."""
    if name not in _ENTRYPOINTS:
        raise ValueError(f"unknown model {name!r}")
    return dict(_DEFAULTS.get(name, {}))


def list_models(pattern: str = "*", family: str | None = None) -> list[str]:
    """Registered model names matching a shell-style ``pattern`` (e.g. ``'vit_*_patch16_*'``)."""
    names = fnmatch.filter(sorted(_ENTRYPOINTS), pattern)
    if family is not None:
        names = [n for n in names if _FAMILY[n] == family]
    return names


def resolve_model_args(name: str, **overrides: Any) -> dict[str, Any] | None:
    """Every constructor argument ``create_model(name, **overrides)`` would use, without building the model.

    Two configurations that spell the same model differently (an explicit default vs. none) resolve to the
    same dict. None for function entry points, whose arguments are not known up front.
    """
    cls = _CLASSES.get(name)
    if cls is None:
        return None
    params = inspect.signature(cls.__init__).parameters
    args = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
    return {**args, **_DEFAULTS[name], **overrides}


def model_family(name: str) -> str:
    """The module (family file) a registered model comes from, e.g. ``'vit'``."""
    return _FAMILY[name]


def create_model(name: str, pretrained: str | os.PathLike | None = None, **overrides: Any) -> nn.Module:
    """Build a registered model; with ``pretrained`` (a vitkit folder or weights file) load its weights.

    ``overrides`` change constructor arguments (``num_classes=10``, ``img_size=384``, ``drop_path_rate=0.1``);
    the weights are adapted to them where that is meaningful (resampled position tables, a new head).
    """
    if name not in _ENTRYPOINTS:
        close = difflib.get_close_matches(name, _ENTRYPOINTS, n=5)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see vitkit.list_models()"
        raise ValueError(f"unknown model {name!r}{hint}")
    model = _ENTRYPOINTS[name](**overrides)
    model.model_name = name
    if pretrained is not None:
        from ._pretrained import load_pretrained

        load_pretrained(model, pretrained)
    return model
