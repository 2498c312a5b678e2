"""Helpers shared by the converters of foreign checkpoints."""

from __future__ import annotations

import inspect
import os
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import AssumedValueWarning, CheckpointError, ConfigError, VitkitError
from ..models._checks import check_fits_memory, class_argument_problems
from ..models._pretrained import load_weights, read_state_dict
from ..models._registry import meta_build
from ..schema import first_line, one_line, read_json
from ._schema import ConfigSchema, check_image_stats

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ConvertArg:
    """One ``--arg KEY=VALUE`` of a converter, listed by ``vitkit convert KIND --help``.

    ``source`` says where the value normally comes from: ``"weights"`` (read off tensor shapes or key names;
    ``--arg`` overrides), ``"config"`` (read from a config file that ships with the checkpoint) or ``"arg"``
    (nothing tells it). ``default`` is used when the source is silent; ``matters`` marks keys that change the
    outputs, whose assumed default is announced with :func:`assume` (never taken silently). ``required`` keys
    have no default: the converter refuses to guess them."""

    name: str
    help: str
    default: Any = None
    source: str = "arg"
    matters: bool = False
    required: bool = False

    def describe(self) -> str:
        where = {"weights": "inferred from the weights", "config": "read from the checkpoint's config",
                 "arg": "not in the checkpoint"}[self.source]
        if self.required:
            default = "required when the checkpoint does not tell"
        else:
            default = f"default {self.default!r}" + (", announced when assumed" if self.matters else "")
        return f"{self.name}: {self.help} ({where}; {default})"


def assume(source: str, key: str, value: Any, why: str = "the checkpoint does not tell") -> Any:
    """Return ``value`` after one warning line that it was assumed for ``key`` (and how to choose another)."""
    warnings.warn(f"{source}: assumed {key}={value!r} ({why}); pass --arg {key}=... to choose",
                  AssumedValueWarning, stacklevel=2)
    return value


def require_arg(source: str, key: str, overrides: dict[str, Any], why: str) -> Any:
    """``overrides[key]``, or a ConfigError saying why the converter will not guess it."""
    if key not in overrides:
        raise ConfigError(f"{source}: {why}; pass --arg {key}=...")
    return overrides[key]


def official_config(src: str | os.PathLike, keys: tuple[str, ...]) -> dict[str, Any]:
    """What a ``config.json`` beside an official weights file ``src`` says of ``keys`` (official constructor
    argument names), at its top level or in a ``*_args`` section; {} without one. Official releases ship bare
    weights; a config written beside them (the arguments the model was built with) spares the converter a guess."""
    path = Path(src).parent / "config.json"
    if not path.is_file():
        return {}
    config = read_json(path)
    sections = [config, *(v for k, v in config.items() if k.endswith("args") and isinstance(v, dict))]
    return {key: next(s[key] for s in sections if key in s) for key in keys if any(key in s for s in sections)}


HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
HF_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


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
    ``--arg``: an override the class does not take, or of the wrong type or range, is a ConfigError; arguments that
    cannot build the model (e.g. heads that do not divide the width), or build one larger than half of this
    machine's memory, a CheckpointError naming the source. The model is built on the meta device first, so nothing
    is allocated for a configuration that is refused."""
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(overrides) - accepted)
    if unknown:
        raise ConfigError(f"--arg {', '.join(unknown)}: {cls.__name__} does not take it; it takes "
                          f"{', '.join(sorted(accepted))}")
    problems = class_argument_problems(cls, overrides, "--arg ")
    if problems:
        raise ConfigError(f"{cls.__name__}: " + "; ".join(problems))
    problems = class_argument_problems(cls, {k: v for k, v in args.items() if k not in overrides})
    if problems:
        raise CheckpointError(f"{source}: its configuration cannot build a {cls.__name__}: " + "; ".join(problems))
    given = f" (with --arg {overrides})" if overrides else ""
    merged = {**args, **overrides}
    what = f"{source}: its configuration cannot build a {cls.__name__}{given}"
    try:
        meta = meta_build(cls, merged)  # every check of the constructor, without memory; then the weights' size
    except VitkitError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever the constructor raises is one line naming the source
        text = str(e) if isinstance(e, (TypeError, ValueError, OverflowError)) else first_line(e)
        raise CheckpointError(f"{what}: {one_line(text)}") from None
    check_fits_memory(meta, f"{source}: the {cls.__name__} it describes{given}", CheckpointError)
    try:
        return cls(**merged)
    except VitkitError:
        raise
    except (TypeError, ValueError, OverflowError) as e:
        raise CheckpointError(f"{what}: {one_line(str(e))}") from None


def read_hf_folder(src: str | os.PathLike, schema: ConfigSchema | None = None
                   ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config.json, state dict) of a Hugging Face model folder: single-file or sharded weights. ``schema`` checks
    the config (types, ranges, the model's size against the machine's memory) before any weight is read."""
    src = Path(src)
    if not src.is_dir():
        raise CheckpointError(f"{src} is not a folder; a Hugging Face checkpoint is a folder with config.json "
                              f"and {' or '.join(HF_WEIGHT_FILES)}")
    config = read_json(src / "config.json")
    if schema is not None:
        schema.check(config, str(src / "config.json"))
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


def preprocessor_stats(src: Path, cfg: dict[str, Any], channels: int | None = None) -> dict[str, Any]:
    """``cfg`` with the normalisation of an HF folder's ``preprocessor_config.json`` (when it has one): lists of
    finite numbers, one per channel (``channels``, when known) or one for all, every std > 0."""
    cfg = dict(cfg)
    processor = Path(src) / "preprocessor_config.json"
    if processor.is_file():
        proc = read_json(processor)
        check_image_stats(proc, channels, str(processor))
        for ours, theirs in (("mean", "image_mean"), ("std", "image_std")):
            if theirs in proc:
                cfg[ours] = tuple(proc[theirs])
    return cfg


def apply_hf_metadata(model, config: dict[str, Any], src: Path, num_classes: int, default_name: str) -> None:
    """Class names (``id2label``), normalisation (``preprocessor_config.json``) and name of an HF folder."""
    cfg = dict(model.pretrained_cfg)
    id2label = config.get("id2label")  # keys "0".."n-1", values strings: checked with the config's schema
    if isinstance(id2label, dict) and id2label and len(id2label) == num_classes:
        cfg["class_names"] = [id2label[str(i)] if str(i) in id2label else id2label[i] for i in range(len(id2label))]
    channels = getattr(model, "in_chans", None)
    model.pretrained_cfg = preprocessor_stats(src, cfg, channels if isinstance(channels, int) else None)
    model.model_name = config.get("_name_or_path") or default_name


# ---------------------------------------------------------------------- the shared tail of the converters
def load_converted(cls: type, args: dict[str, Any], overrides: dict[str, Any],
                   convert: Callable[[dict[str, Any]], StateDict], source: str,
                   config_source: str | None = None):
    """Build ``cls(**args, **overrides)`` (:func:`build_converted`, errors naming ``config_source`` or ``source``)
    and load the weights ``convert(final arguments)`` returns (``load_weights``: a CheckpointError listing the
    missing, unexpected and mis-shaped keys). Returns the model."""
    model = build_converted(cls, args, overrides, config_source or source)
    try:
        load_weights(model, convert({**args, **overrides}), source=source)
    except CheckpointError as e:  # torch lists every mis-shaped tensor on its own line: keep the first, count the rest
        raise CheckpointError(one_line(str(e))) from None
    return model


def load_hf_model(cls: type, src: str | os.PathLike, overrides: dict[str, Any],
                  hf_args: Callable[[dict[str, Any], StateDict, str], dict[str, Any]],
                  convert: Callable[[StateDict, dict[str, Any], str], StateDict], default_name: str,
                  normalize: Callable[[StateDict], StateDict] | None = None,
                  cfg_defaults: Callable[[dict[str, Any]], dict[str, Any] | None] | None = None,
                  schema: ConfigSchema | None = None):
    """Every ``load_hf_*``: read the HF folder ``src`` (:func:`read_hf_folder`), ``normalize`` its keys, take the
    constructor arguments ``hf_args(config, state, config_path)``, build ``cls`` with ``overrides`` and load
    ``convert(state, final arguments, src)`` (:func:`load_converted`: errors list missing/unexpected keys), then
    set ``pretrained_cfg`` (``cfg_defaults(final arguments)``, then the folder's class names and normalisation,
    :func:`apply_hf_metadata`) and the model name. ``schema`` checks ``config.json`` before the weights are read
    (:class:`~vitkit.convert.ConfigSchema`). Returns the model."""
    src = Path(src)
    config, state = read_hf_folder(src, schema)
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
