"""Reading and writing vitkit checkpoints (``config.json`` + ``model.safetensors``).

Weights are only ever read from safetensors, or from PyTorch files with ``torch.load(weights_only=True)``,
so a checkpoint cannot execute code. Loading adapts what can be adapted (position tables for another
resolution, a classifier for another number of classes) and fails with a readable
:class:`~vitkit.errors.CheckpointError` for everything else.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import CheckpointError
from ..utils import atomic_write, atomic_write_json

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".tar", ".ckpt")


def save_pretrained(model: nn.Module, directory: str | os.PathLike) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    atomic_write_json(directory / CONFIG_NAME, model.config())


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / CONFIG_NAME
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found: a vitkit checkpoint folder holds {CONFIG_NAME} and "
                              f"{WEIGHTS_NAME} (see save_pretrained)") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return cfg


def read_state_dict(path: str | os.PathLike,
                    unwrap: tuple[str, ...] = ("state_dict", "model")) -> dict[str, torch.Tensor]:
    """Read a weights file: safetensors, or a PyTorch pickle loaded with ``weights_only=True``.

    Training checkpoints often nest the weights (``{"state_dict": {...}, "epoch": ...}``): the first key
    of ``unwrap`` found is descended into.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"checkpoint file {path} is corrupt or truncated (safetensors: {e})") from None
    if path.suffix in TORCH_SUFFIXES or path.name.endswith(".pth.tar"):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch raises many types for bad pickles
            raise CheckpointError(f"cannot read {path} with torch.load(weights_only=True): {e}") from None
        for key in unwrap:
            if isinstance(obj, dict) and isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise CheckpointError(f"{path} does not hold a state dict of tensors")
        return obj
    raise CheckpointError(f"{path}: unknown checkpoint format {path.suffix!r}; expected .safetensors or a "
                          f"PyTorch file ({', '.join(TORCH_SUFFIXES)})")


def _head_keys(model: nn.Module, keys) -> list[str]:
    prefixes = getattr(model, "head_prefixes", ("head.",))
    return [k for k in keys if k.startswith(tuple(prefixes))]


def _shorten(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", … ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str = "state dict") -> None:
    """Load ``state_dict`` into ``model`` after checking that it fits.

    * position tables made for another grid are resampled (by the position-embedding modules);
    * a classifier head of another shape is dropped with a warning (the model's head stays as initialised);
    * any other missing, unexpected or mis-shaped key is a :class:`CheckpointError` that lists them.
    """
    state_dict = dict(state_dict)
    own = model.state_dict()
    head_own = set(_head_keys(model, own))
    head_ckpt = _head_keys(model, state_dict)
    head_mismatch = [k for k in head_ckpt if k in own and own[k].shape != state_dict[k].shape]
    head_absent = head_own - set(state_dict)
    if head_mismatch or (head_ckpt and set(head_ckpt) - head_own):
        shapes = {k: tuple(state_dict[k].shape) for k in head_ckpt}
        warnings.warn(f"{source}: classifier head {shapes} does not fit the model's; it is dropped and the "
                      f"model's head keeps its fresh initialisation", stacklevel=3)
        for k in head_ckpt:
            state_dict.pop(k)
        head_absent = head_own
    elif head_absent:
        warnings.warn(f"{source}: no classifier head in the checkpoint; the model's head is freshly initialised",
                      stacklevel=3)
    missing = sorted(set(own) - set(state_dict) - head_absent)
    unexpected = sorted(set(state_dict) - set(own))
    if missing or unexpected:
        parts = [f"{source} does not fit {type(model).__name__}"]
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_shorten(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_shorten(unexpected)}")
        parts.append("is it a checkpoint of another architecture or configuration?")
        raise CheckpointError("; ".join(parts))
    try:
        model.load_state_dict(state_dict, strict=False)
    except RuntimeError as e:
        raise CheckpointError(f"{source} does not fit {type(model).__name__}: {e}") from None
    except CheckpointError as e:
        raise CheckpointError(f"{source}: {e}") from None


def resolve_weights(path: str | os.PathLike) -> tuple[Path, dict[str, Any] | None]:
    """A checkpoint folder gives (weights file, config); a file gives (file, None)."""
    path = Path(path)
    if path.is_dir():
        weights = path / WEIGHTS_NAME
        if not weights.is_file():
            raise CheckpointError(f"{path} has no {WEIGHTS_NAME}")
        cfg = read_config(path) if (path / CONFIG_NAME).is_file() else None
        return weights, cfg
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    return path, None


def load_pretrained(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a vitkit folder or weights file into an already built model (used by ``create_model``)."""
    weights, cfg = resolve_weights(path)
    load_weights(model, read_state_dict(weights), source=str(weights))
    if cfg and hasattr(model, "pretrained_cfg"):
        _merge_pretrained_cfg(model, cfg.get("pretrained_cfg") or {})
    return model


def _merge_pretrained_cfg(model: nn.Module, saved: dict[str, Any]) -> None:
    """Keep the checkpoint's normalisation; keep class names only if the head still has that many classes."""
    cfg = dict(model.pretrained_cfg)
    for key in ("mean", "std", "interpolation"):
        if key in saved:
            cfg[key] = saved[key]
    names = saved.get("class_names")
    if names and len(names) == getattr(model, "num_classes", -1):
        cfg["class_names"] = names
    model.pretrained_cfg = cfg


def from_pretrained(path: str | os.PathLike, **overrides: Any) -> nn.Module:
    """Rebuild a model from a ``save_pretrained`` folder; ``overrides`` change constructor arguments.

    Changing ``img_size`` resamples the position tables; changing ``num_classes`` drops the head.
    """
    from ._base import get_model_class

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a checkpoint folder (expected {CONFIG_NAME} + {WEIGHTS_NAME})")
    cfg = read_config(path)
    try:
        cls = get_model_class(cfg["model_class"])
        args = dict(cfg["model_args"])
    except KeyError as e:
        raise CheckpointError(f"{path / CONFIG_NAME}: {e}") from None
    args.update(overrides)
    try:
        model = cls(**args)
    except TypeError as e:
        raise CheckpointError(f"{path / CONFIG_NAME}: model_args do not fit {cls.__name__}: {e}") from None
    model.model_name = cfg.get("model_name")
    _merge_pretrained_cfg(model, cfg.get("pretrained_cfg") or {})
    load_weights(model, read_state_dict(path / WEIGHTS_NAME), source=str(path / WEIGHTS_NAME))
    return model
