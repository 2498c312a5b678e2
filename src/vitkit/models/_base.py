"""What every vitkit model shares: recorded constructor arguments, ``save_pretrained`` and attention maps.

A subclass's constructor arguments are captured automatically (after ``__init__`` returns), so
``save_pretrained`` can write a ``config.json`` that rebuilds exactly the same architecture. Keep
constructor arguments JSON-friendly: numbers, strings, booleans, lists, None.
"""

from __future__ import annotations

import functools
import inspect
import os
from typing import Any

import torch
from torch import nn

from ..layers.attention import capture_attention

_MODEL_CLASSES: dict[str, type[VitkitModel]] = {}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)


def get_model_class(name: str) -> type[VitkitModel]:
    try:
        return _MODEL_CLASSES[name]
    except KeyError:
        raise KeyError(f"unknown model class {name!r}; known: {sorted(_MODEL_CLASSES)}") from None


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"model constructor argument {value!r} is not JSON-serialisable; pass names, not objects")


class VitkitModel(nn.Module):
    """Base class of all vitkit models."""

    model_args: dict[str, Any]
    model_name: str | None = None
    # Parameter-name prefixes of the task head; a checkpoint whose head does not fit is loaded without it.
    head_prefixes: tuple[str, ...] = ("head.",)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _MODEL_CLASSES[cls.__name__] = cls
        init = cls.__dict__.get("__init__")
        if init is None:
            return
        signature = inspect.signature(init)

        @functools.wraps(init)
        def recording_init(self, *args: Any, **kw: Any) -> None:
            init(self, *args, **kw)
            bound = signature.bind(self, *args, **kw)
            bound.apply_defaults()
            recorded = {}
            for name, value in list(bound.arguments.items())[1:]:
                param = signature.parameters[name]
                if param.kind is inspect.Parameter.VAR_KEYWORD:
                    recorded.update(value)
                elif param.kind is not inspect.Parameter.VAR_POSITIONAL:
                    recorded[name] = value
            # The outermost class runs last, so its (complete) argument set wins.
            self.model_args = _jsonable(recorded)

        cls.__init__ = recording_init  # type: ignore[method-assign]

    # ----------------------------------------------------------------- metadata
    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        """Data-side metadata: input size, normalisation stats, class names (timm's ``default_cfg``)."""
        cfg = self.__dict__.setdefault("_pretrained_cfg", {})
        return cfg

    @pretrained_cfg.setter
    def pretrained_cfg(self, value: dict[str, Any]) -> None:
        self.__dict__["_pretrained_cfg"] = dict(value)

    default_cfg = pretrained_cfg

    def config(self) -> dict[str, Any]:
        """What ``config.json`` holds: enough to rebuild the model and to preprocess its inputs."""
        from .. import __version__

        return {
            "vitkit_version": __version__,
            "model_class": type(self).__name__,
            "model_name": self.model_name,
            "model_args": self.model_args,
            "pretrained_cfg": _jsonable(self.pretrained_cfg),
        }

    # ----------------------------------------------------------------- I/O
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``config.json`` and ``model.safetensors`` (both atomically) into ``directory``."""
        from ._pretrained import save_pretrained

        save_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides: Any) -> VitkitModel:
        from ._pretrained import from_pretrained

        model = from_pretrained(path, **overrides)
        if not isinstance(model, cls):
            raise TypeError(f"{path} holds a {type(model).__name__}, not a {cls.__name__}")
        return model

    # ----------------------------------------------------------------- introspection
    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor, **forward_kwargs: Any) -> list[torch.Tensor]:
        """Run one forward pass and return every attention layer's probabilities, in execution order.

        Each map is (B, heads, N_query, N_key). For ViT, N includes the CLS token at index 0.
        """
        with capture_attention(self) as maps:
            self(x, **forward_kwargs)
        return maps

    def no_weight_decay(self) -> set[str]:
        """Parameter names that must not be weight-decayed besides norms and biases (tokens, tables)."""
        return set()

    def lr_layer_id(self, name: str) -> int:
        """Depth index of a parameter for layer-wise LR decay; 0 = input side, ``num_lr_layers - 1`` = head."""
        return 0

    @property
    def num_lr_layers(self) -> int:
        return 1
