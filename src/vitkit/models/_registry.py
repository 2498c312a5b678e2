"""The one model registry: model classes by name, and named configurations (entry points).

* Classes: every :class:`~vitkit.models.VitkitModel` subclass registers itself here when it is defined, so a
  ``config.json`` naming ``"model_class": "VisionTransformer"`` can be rebuilt (:func:`get_model_class`).
* Entry points: families register named configurations with :func:`register_model` (a function returning a
  model) or :func:`register_config` (a class plus default arguments, for families with many sizes);
  :func:`create_model` builds them and :func:`list_models` lists them.

Import order inside the package: ``_pretrained`` (checkpoint I/O, knows no classes) < ``_registry`` <
``_base`` (the base classes, which register into this module) < the family files.
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import CheckpointError, ConfigError, VitkitError
from ._pretrained import CONFIG_NAME, WEIGHTS_NAME, load_pretrained, load_weights, merge_pretrained_cfg, read_config
from ._pretrained import read_state_dict as _read_state_dict

_MODEL_CLASSES: dict[str, type[nn.Module]] = {}
_ENTRYPOINTS: dict[str, Callable[..., nn.Module]] = {}
_FAMILY: dict[str, str] = {}
_DEFAULTS: dict[str, dict[str, Any]] = {}
_CLASSES: dict[str, type] = {}


# ---------------------------------------------------------------------- classes
def register_class(cls: type[nn.Module]) -> type[nn.Module]:
    """Make ``cls`` rebuildable from a ``config.json`` (``VitkitModel`` subclasses call this themselves)."""
    _MODEL_CLASSES[cls.__name__] = cls
    return cls


def get_model_class(name: str) -> type[nn.Module]:
    try:
        return _MODEL_CLASSES[name]
    except KeyError:
        raise KeyError(f"unknown model class {name!r}; known: {sorted(_MODEL_CLASSES)}") from None


# ---------------------------------------------------------------------- named configurations
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
            channels = getattr(model, "in_chans", None)
            for key in ("mean", "std"):  # stats of another channel count (in_chans overridden)
                stats = cfg.get(key)
                if channels and stats is not None and len(stats) != channels:
                    # a gray image read as RGB repeats its one value; an RGB statistic averages to gray
                    if len(stats) == 1:
                        cfg[key] = tuple(stats) * channels
                    elif channels == 1:
                        cfg[key] = (round(sum(stats) / len(stats), 4),)
                    else:
                        cfg[key] = model.pretrained_cfg.get(key)
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
        raise ConfigError(f"unknown model {name!r}")
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


def model_argument_names(name: str) -> set[str] | None:
    """The keyword arguments ``create_model(name, **kw)`` accepts, without building the model.

    None when the constructor also takes ``**kwargs`` (then only building it can tell).
    """
    if name not in _ENTRYPOINTS:
        raise ConfigError(f"unknown model {name!r}")
    target = _CLASSES.get(name)
    params = inspect.signature(target.__init__ if target is not None else _ENTRYPOINTS[name]).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return {k for k, p in params.items() if k != "self" and p.kind is not inspect.Parameter.VAR_POSITIONAL}


def model_family(name: str) -> str:
    """The module (family file) a registered model comes from, e.g. ``'vit'``."""
    return _FAMILY[name]


def registered_class(name: str) -> type | None:
    """The class a registered configuration builds (None for function entry points), without building it."""
    if name not in _ENTRYPOINTS:
        raise ConfigError(f"unknown model {name!r}")
    return _CLASSES.get(name)


# ---------------------------------------------------------------------- building
def create_model(name: str, pretrained: str | os.PathLike | None = None, **overrides: Any) -> nn.Module:
    """Build a registered model; with ``pretrained`` (a vitkit folder or weights file) load its weights.

    ``overrides`` change constructor arguments (``num_classes=10``, ``img_size=384``, ``drop_path_rate=0.1``);
    the weights are adapted to them where that is meaningful (resampled position tables, a new head). A folder
    of a model that holds a backbone (an MAE or contrastive pretraining checkpoint) gives its backbone only;
    see :func:`~vitkit.models.load_pretrained`.
    """
    if name not in _ENTRYPOINTS:
        close = difflib.get_close_matches(name, _ENTRYPOINTS, n=5)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see vitkit.list_models()"
        raise ConfigError(f"unknown model {name!r}{hint}")
    model = _construct(name, _ENTRYPOINTS[name], overrides)
    model.model_name = name
    if pretrained is not None:
        load_pretrained(model, pretrained)
    return model


def _construct(name: str, build: Callable[..., nn.Module], args: dict[str, Any]) -> nn.Module:
    """``build(**args)``, with the constructor's complaints about its arguments as one ConfigError naming them.

    Constructors raise ValueError (or TypeError for an argument they do not take) for bad arguments; errors of
    vitkit's own types pass through unchanged.
    """
    try:
        if torch.get_default_device().type == "meta":  # a check that builds without memory (see meta_build)
            with _MetaBuild():
                return build(**args)
        return build(**args)
    except VitkitError:
        raise
    except TypeError as e:
        if "argument" not in str(e):
            raise
        raise ConfigError(f"{name}: {_first_line(e)}") from None
    except (ValueError, OverflowError) as e:  # OverflowError: absurd sizes such as img_size=1e30
        raise ConfigError(f"{name}: {_first_line(e)}") from None
    except (RuntimeError, MemoryError) as e:
        if not isinstance(e, MemoryError) and "allocate" not in str(e):
            raise
        raise ConfigError(f"{name}: these arguments need more memory than this machine has (sizes: "
                          f"{ {k: v for k, v in args.items() if 'size' in k or 'dim' in k} })") from None


# ---------------------------------------------------------------------- building without memory
_META_HOST_STEPS = 1 << 16  # a linspace/logspace this short is computed on the CPU during a meta build


class _MetaBuild(TorchFunctionMode):
    """Inside ``torch.device("meta")``: ``torch.linspace`` / ``torch.logspace`` of at most ``_META_HOST_STEPS``
    values are computed on the CPU, everything else stays on the meta device.

    Constructors read such schedules back as numbers (``torch.linspace(0, drop_path_rate, depth).tolist()``), which
    a meta tensor cannot give; these small vectors are the only values a constructor needs, so every registered
    model builds on meta (``tests/test_config_schema.py`` checks each).
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in (torch.linspace, torch.logspace) and kwargs.get("device") is None:
            steps = args[2] if len(args) > 2 else kwargs.get("steps")
            small = isinstance(steps, int) and 0 <= steps <= _META_HOST_STEPS
            kwargs["device"] = "cpu" if small else "meta"
        return func(*args, **kwargs)


def meta_build(build: Callable[..., nn.Module], args: dict[str, Any]) -> nn.Module:
    """``build(**args)`` on the meta device: no memory, no initialisation, the constructor's checks all run.

    ``create_model`` does the same by itself inside ``with torch.device("meta")``. Errors are the constructor's own.
    """
    with torch.device("meta"), _MetaBuild():
        return build(**args)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (also of a model built on the meta device)."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def from_pretrained(path: str | os.PathLike, **overrides: Any) -> nn.Module:
    """Rebuild a model from a ``save_pretrained`` folder; ``overrides`` change constructor arguments.

    Changing ``img_size`` resamples the position tables; changing ``num_classes`` drops the head. ``path`` may be a
    hub id, ``hf-hub:ORG/NAME[@REVISION]``, resolved from the local Hugging Face cache (see :mod:`._hub`).
    """
    from ._hub import local_checkpoint

    path = local_checkpoint(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a checkpoint folder (expected {CONFIG_NAME} + {WEIGHTS_NAME})")
    cfg = read_config(path)
    try:
        cls = get_model_class(cfg["model_class"])
        args = cfg["model_args"]
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{path / CONFIG_NAME}: {e}") from None
    if not isinstance(args, dict):
        raise CheckpointError(f"{path / CONFIG_NAME}: model_args must be a JSON object, got {type(args).__name__}")
    args = dict(args)
    saved_keys = set(args)
    args.update(overrides)
    try:
        model = _construct(cls.__name__, cls, args)
    except ConfigError as e:
        if saved_keys - set(overrides):
            raise CheckpointError(f"{path / CONFIG_NAME}: model_args do not fit {cls.__name__}: {e}") from None
        raise
    model.model_name = cfg.get("model_name")
    merge_pretrained_cfg(model, cfg.get("pretrained_cfg") or {}, same_model=True)
    load_weights(model, _read_state_dict(path / WEIGHTS_NAME), source=str(path / WEIGHTS_NAME))
    return model
