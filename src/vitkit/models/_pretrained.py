"""Reading and writing vitkit checkpoints (``config.json`` + ``model.safetensors``).

Weights are only ever read from safetensors, or from PyTorch files with ``torch.load(weights_only=True)``,
so a checkpoint cannot execute code. Loading adapts what can be adapted (position tables for another
resolution, a classifier for another number of classes, the backbone of a pretraining checkpoint) and fails
with a readable :class:`~vitkit.errors.CheckpointError` for everything else.

This module knows no model classes (rebuilding a model from its ``config.json`` is
:func:`vitkit.models.from_pretrained`, in the registry), so it imports nothing else from ``vitkit.models``.
"""

from __future__ import annotations

import json
import os
import pickle
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
            raise CheckpointError(torch_load_refusal(path, e)) from None
        for key in unwrap:
            if isinstance(obj, dict) and isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise CheckpointError(f"{path} does not hold a state dict of tensors")
        return obj
    raise CheckpointError(f"{path}: unknown checkpoint format {path.suffix!r}; expected .safetensors or a "
                          f"PyTorch file ({', '.join(TORCH_SUFFIXES)})")


def torch_load_refusal(path: str | os.PathLike, error: Exception) -> str:
    """One line for a PyTorch file that ``torch.load(weights_only=True)`` refused or could not read."""
    text = str(error)
    if isinstance(error, pickle.UnpicklingError) or "weights_only" in text or "Weights only load failed" in text:
        return (f"{path} was refused: loading it would need code execution (it pickles objects other than "
                f"tensors and plain containers), which vitkit never runs; if you trust the file, re-save its "
                f"state dict as safetensors")
    first = (text.strip().splitlines() or [""])[0][:200]
    return f"{path} is not a readable PyTorch file ({type(error).__name__}: {first})"


def _head_keys(model: nn.Module, keys) -> list[str]:
    prefixes = tuple(getattr(model, "head_prefixes", ("head.",)))
    return [k for k in keys if prefixes and k.startswith(prefixes)]


def _shorten(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", … ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str = "state dict",
                 warn_head: bool = True) -> str:
    """Load ``state_dict`` into ``model`` after checking that it fits; returns what happened to the head.

    * position tables made for another grid are resampled (by the position-embedding modules);
    * a classifier head of another shape is dropped with a warning (the model's head stays as initialised);
    * any other missing, unexpected or mis-shaped key is a :class:`CheckpointError` that lists them.

    ``warn_head=False`` leaves reporting the head to the caller (the backbone transfer folds it into its line).
    """
    state_dict = dict(state_dict)
    own = model.state_dict()
    head_own = set(_head_keys(model, own))
    head_ckpt = _head_keys(model, state_dict)
    head_mismatch = [k for k in head_ckpt if k in own and own[k].shape != state_dict[k].shape]
    head_absent = head_own - set(state_dict)
    head_note = "head loaded" if head_own else ""
    if head_mismatch or (head_ckpt and set(head_ckpt) - head_own):
        shapes = {k: tuple(state_dict[k].shape) for k in head_ckpt}
        head_note = f"classifier head {shapes} dropped (does not fit), the model's head keeps its fresh initialisation"
        for k in head_ckpt:
            state_dict.pop(k)
        head_absent = head_own
    elif head_absent:
        head_note = "no classifier head in the checkpoint, the model's head is freshly initialised"
    if warn_head and head_note and head_note != "head loaded":
        warnings.warn(f"{source}: {head_note}", stacklevel=3)
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
    return head_note


def resolve_weights(path: str | os.PathLike) -> tuple[Path, dict[str, Any] | None]:
    """A checkpoint folder gives (weights file, config); a file gives (file, None). ``hf-hub:ORG/NAME`` is the
    cached snapshot of that hub repository."""
    from ._hub import local_checkpoint

    path = local_checkpoint(path)
    if path.is_dir():
        weights = path / WEIGHTS_NAME
        if not weights.is_file():
            raise CheckpointError(f"{path} has no {WEIGHTS_NAME}")
        cfg = read_config(path) if (path / CONFIG_NAME).is_file() else None
        return weights, cfg
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    return path, None


def _module_summary(keys: list[str]) -> str:
    """``decoder_blocks.*, mask_token`` for a list of parameter names: the modules a reader recognises."""
    tops: dict[str, bool] = {}
    for k in keys:
        top, _, rest = k.partition(".")
        tops[top] = tops.get(top, False) or bool(rest)
    return ", ".join(f"{t}.*" if nested else t for t, nested in tops.items())


def load_backbone(model: nn.Module, state_dict: dict[str, torch.Tensor], backbone: dict[str, Any],
                  source: str, source_class: str = "model") -> nn.Module:
    """Load the backbone of a pretraining checkpoint (an MAE's encoder, a contrastive model's encoder) into
    ``model``, dropping the rest (decoder, projection head), and say so in one warning line.

    ``backbone`` is the ``"backbone"`` entry of the checkpoint's ``config.json``: ``prefix`` (``"encoder."``),
    ``model_class`` and ``model_args`` of the backbone. If ``model`` holds a backbone itself (its own
    ``backbone_prefix``), the weights go into that submodule. Before loading, the receiving model's
    ``adapt_backbone_state(state, backbone)`` (when it has one) fills what the checkpoint cannot hold, e.g. a
    learned position table initialised from the backbone's fixed sin-cos positions.
    """
    prefix = backbone["prefix"]
    kept = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    dropped = sorted(k for k in state_dict if not k.startswith(prefix))
    if not kept:
        raise CheckpointError(f"{source}: config.json names a backbone under {prefix!r}, no weight has that prefix")
    own_prefix = getattr(model, "backbone_prefix", None)
    target = model.get_submodule(own_prefix.rstrip(".")) if own_prefix else model
    notes: list[str] = []
    adapt = getattr(target, "adapt_backbone_state", None)
    if adapt is not None:
        kept, notes = adapt(kept, backbone)
    head = load_weights(target, kept, source=source, warn_head=False)
    into = f"{type(model).__name__}" + (f".{own_prefix.rstrip('.')}" if own_prefix else "")
    parts = [f"{source}: loaded the {prefix.rstrip('.')} of {source_class} into {into} ({len(kept)} tensors)"]
    if dropped:
        parts.append(f"dropped {len(dropped)} tensors ({_module_summary(dropped)})")
    parts += notes
    if head and head != "head loaded":
        parts.append(head)
    warnings.warn("; ".join(parts), stacklevel=3)
    return model


def load_pretrained(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a vitkit folder or weights file into an already built model (used by ``create_model``).

    A folder saved by a model of another class that holds a backbone (its ``config.json`` has a ``backbone``
    entry, e.g. :class:`~vitkit.models.mae.MaskedAutoencoderViT`) gives its backbone weights only, through
    :func:`load_backbone`; everything else must fit exactly (see :func:`load_weights`).
    """
    weights, cfg = resolve_weights(path)
    state = read_state_dict(weights)
    backbone = (cfg or {}).get("backbone")
    source_class = (cfg or {}).get("model_class")
    if backbone and source_class != type(model).__name__:
        load_backbone(model, state, backbone, str(weights), source_class)
    else:
        load_weights(model, state, source=str(weights))
    if cfg and hasattr(model, "pretrained_cfg"):
        merge_pretrained_cfg(model, cfg.get("pretrained_cfg") or {})
    return model


def merge_pretrained_cfg(model: nn.Module, saved: dict[str, Any], same_model: bool = False) -> None:
    """Keep the checkpoint's normalisation; keep class names only if the head still has that many classes;
    with ``same_model`` (the checkpoint's own architecture rebuilt) also the task it was trained for."""
    cfg = dict(model.pretrained_cfg)
    for key in ("mean", "std", "interpolation", *(("task",) if same_model else ())):
        if key in saved:
            cfg[key] = saved[key]
    names = saved.get("class_names")
    if names and len(names) == getattr(model, "num_classes", -1):
        cfg["class_names"] = names
    model.pretrained_cfg = cfg


def checkpoint_folder(path: str | Path) -> Path:
    """A run folder means its best checkpoint (then its last); a checkpoint folder or weights file is itself; a hub id
    (``hf-hub:ORG/NAME``) is its cached snapshot."""
    from ._hub import local_checkpoint

    path = local_checkpoint(path)
    folder = path / "checkpoints"
    # ".<name>.old" is the previous complete copy when a crash fell between the two renames of a checkpoint swap
    for candidate in (folder / "best", folder / ".best.old", folder / "last", folder / ".last.old"):
        if (candidate / "model.safetensors").is_file() and (candidate / "config.json").is_file():
            return candidate
    return path
