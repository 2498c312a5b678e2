"""Helpers shared by the converters of foreign checkpoints."""

from __future__ import annotations

import inspect
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, ConfigError, VitkitError
from ..models._pretrained import load_weights, read_state_dict

StateDict = dict[str, torch.Tensor]
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
HF_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``, or a CheckpointError naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got a {type(obj).__name__}")
    return obj


def config_value(config: dict[str, Any], key: str, source: str, kind: type = int) -> Any:
    """A required ``config.json`` entry of the right type (bool is not an int here), or an error naming it."""
    if key not in config:
        raise CheckpointError(f"{source}: key {key!r} is missing")
    value = config[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise CheckpointError(f"{source}: {key}={value!r} must be a {kind.__name__}")
    return value


def build_converted(cls: type, args: dict[str, Any], overrides: dict[str, Any], source: str):
    """``cls(**args, **overrides)`` where ``args`` come from the foreign checkpoint and ``overrides`` from
    ``--arg``: an override the class does not take is a ConfigError, arguments that cannot build the model a
    CheckpointError naming the source (e.g. heads that do not divide the width)."""
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(overrides) - accepted)
    if unknown:
        raise ConfigError(f"--arg {', '.join(unknown)}: {cls.__name__} does not take it; it takes "
                          f"{', '.join(sorted(accepted))}")
    try:
        return cls(**{**args, **overrides})
    except VitkitError:
        raise
    except (TypeError, ValueError, OverflowError) as e:
        given = f" (with --arg {overrides})" if overrides else ""
        raise CheckpointError(f"{source}: its configuration cannot build a {cls.__name__}{given}: {e}") from None


def read_hf_folder(src: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config.json, state dict) of a Hugging Face model folder: single-file or sharded weights."""
    src = Path(src)
    if not src.is_dir():
        raise CheckpointError(f"{src} is not a folder; a Hugging Face checkpoint is a folder with config.json "
                              f"and {' or '.join(HF_WEIGHT_FILES)}")
    config = read_json(src / "config.json")
    for name in HF_WEIGHT_FILES:
        if (src / name).is_file():
            return config, read_state_dict(src / name)
    for name in HF_INDEX_FILES:
        if (src / name).is_file():
            index = read_json(src / name)
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(f"{src / name}: 'weight_map' must be an object of tensor name -> shard file")
            state: dict[str, torch.Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                if Path(shard).name != shard:
                    raise CheckpointError(f"{src / name}: shard {shard!r} is not a file name in {src}")
                state.update(read_state_dict(src / shard))
            return config, state
    raise CheckpointError(f"{src} holds no weights: expected one of {HF_WEIGHT_FILES + HF_INDEX_FILES}")


def take(state: dict[str, torch.Tensor], key: str, source: str) -> torch.Tensor:
    """Pop ``key`` or fail with an error naming it and the file."""
    try:
        return state.pop(key)
    except KeyError:
        raise CheckpointError(f"{source}: expected key {key!r} is missing") from None


def strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Remove ``prefix`` from keys that have it (HF task models nest the backbone under e.g. ``vit.``)."""
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()}


def check_consumed(state: dict[str, torch.Tensor], source: str, ignore: tuple[str, ...] = ()) -> None:
    left = sorted(k for k in state if not k.startswith(ignore))
    if left:
        raise CheckpointError(f"{source}: keys the converter does not understand ({len(left)}): "
                              f"{', '.join(left[:12])}")


def preprocessor_stats(src: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` with the normalisation of an HF folder's ``preprocessor_config.json`` (when it has one)."""
    cfg = dict(cfg)
    processor = Path(src) / "preprocessor_config.json"
    if processor.is_file():
        proc = read_json(processor)
        for ours, theirs in (("mean", "image_mean"), ("std", "image_std")):
            if theirs in proc:
                cfg[ours] = tuple(proc[theirs])
    return cfg


def apply_hf_metadata(model, config: dict[str, Any], src: Path, num_classes: int, default_name: str) -> None:
    """Class names (``id2label``), normalisation (``preprocessor_config.json``) and name of an HF folder."""
    cfg = dict(model.pretrained_cfg)
    id2label = config.get("id2label")
    if id2label and len(id2label) == num_classes:
        cfg["class_names"] = [id2label[str(i)] if str(i) in id2label else id2label[i] for i in range(len(id2label))]
    model.pretrained_cfg = preprocessor_stats(src, cfg)
    model.model_name = config.get("_name_or_path") or default_name


# ---------------------------------------------------------------------- the shared tail of the converters
def load_converted(cls: type, args: dict[str, Any], overrides: dict[str, Any],
                   convert: Callable[[dict[str, Any]], StateDict], source: str,
                   config_source: str | None = None):
    """Build ``cls(**args, **overrides)`` (:func:`build_converted`, errors naming ``config_source`` or ``source``)
    and load the weights ``convert(final arguments)`` returns (``load_weights``: a CheckpointError listing the
    missing, unexpected and mis-shaped keys). Returns the model."""
    model = build_converted(cls, args, overrides, config_source or source)
    load_weights(model, convert({**args, **overrides}), source=source)
    return model


def load_hf_model(cls: type, src: str | os.PathLike, overrides: dict[str, Any],
                  hf_args: Callable[[dict[str, Any], StateDict, str], dict[str, Any]],
                  convert: Callable[[StateDict, dict[str, Any], str], StateDict], default_name: str,
                  normalize: Callable[[StateDict], StateDict] | None = None,
                  cfg_defaults: Callable[[dict[str, Any]], dict[str, Any] | None] | None = None):
    """Every ``load_hf_*``: read the HF folder ``src`` (:func:`read_hf_folder`), ``normalize`` its keys, take the
    constructor arguments ``hf_args(config, state, config_path)``, build ``cls`` with ``overrides`` and load
    ``convert(state, final arguments, src)`` (:func:`load_converted`: errors list missing/unexpected keys), then
    set ``pretrained_cfg`` (``cfg_defaults(final arguments)``, then the folder's class names and normalisation,
    :func:`apply_hf_metadata`) and the model name. Returns the model."""
    src = Path(src)
    config, state = read_hf_folder(src)
    if normalize is not None:
        state = normalize(state)
    args = hf_args(config, state, str(src / "config.json"))
    final = {**args, **overrides}
    model = load_converted(cls, args, overrides, lambda merged: convert(state, merged, str(src)), str(src),
                           str(src / "config.json"))
    defaults = cfg_defaults(final) if cfg_defaults is not None else None
    if defaults:
        model.pretrained_cfg = {**model.pretrained_cfg, **defaults}
    apply_hf_metadata(model, config, src, final.get("num_classes", 0), default_name)
    return model


def save_converted(model, src: str | os.PathLike, dst: str | os.PathLike, extra_files: tuple[str, ...] = ()):
    """The end of every ``convert_*``: write ``model`` as a vitkit checkpoint folder ``dst`` and copy the
    ``extra_files`` (tokenizer files) that the source folder ``src`` holds next to it. Returns the model."""
    model.save_pretrained(dst)
    for name in extra_files:
        if (Path(src) / name).is_file():
            shutil.copyfile(Path(src) / name, Path(dst) / name)
    return model
