"""Open any checkpoint vitkit understands, telling its format from the files it holds.

``load_checkpoint(spec, **overrides)`` takes a vitkit folder, a training run folder (its best checkpoint), a
Hugging Face ``transformers`` folder (by ``config.json``'s ``model_type``), a timm folder (``config.json`` with
``architecture``) or an OpenCLIP folder (``open_clip_config.json``), or a hub id ``hf-hub:ORG/NAME`` of any of
these, and builds the model with ``overrides`` applied as constructor arguments (``num_classes`` drops a head that
no longer fits, ``img_size`` resamples the position tables). This is what ``vitkit.from_pretrained`` and a recipe's
``model.pretrained`` without ``model.name`` use, so a checkpoint of any configuration can be fine-tuned.
"""

from __future__ import annotations

import importlib
import os
import re
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import CheckpointError
from ..models._hub import local_checkpoint
from ..models._pretrained import CONFIG_NAME, WEIGHTS_NAME, checkpoint_folder
from ..models._registry import from_pretrained as vitkit_from_pretrained
from ..schema import read_json

# transformers ``model_type`` -> (module, loader) of the converter that reads such a folder
HF_LOADERS = {
    "vit": ("hf_vit", "load_hf_vit"),
    "vit_mae": ("hf_vit_mae", "load_hf_vit_mae"),
    "swin": ("hf_swin", "load_hf_swin"),
    "clip": ("hf_clip", "load_hf_clip"),
    "vilt": ("hf_vilt", "load_hf_vilt"),
}
# other formats, told apart by a file they hold -> (module, loader)
FILE_LOADERS = {
    "open_clip_config.json": ("openclip", "load_open_clip"),
}
TIMM_LOADER = ("timm", "load_timm")
# timm architectures read by their own converter, by name: the plain ResNets (resnet18, resnet50, ...)
TIMM_ARCH_LOADERS = {re.compile(r"^resnet\d"): ("timm_resnet", "load_timm_resnet")}


def _loader(module: str, name: str):
    return getattr(importlib.import_module(f"{__package__}.{module}"), name)


def checkpoint_format(folder: Path) -> tuple[str, tuple[str, str] | None]:
    """(a short description, the (module, loader) to read it with; None for a vitkit folder)."""
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a checkpoint folder")
    for marker, loader in FILE_LOADERS.items():
        if (folder / marker).is_file():
            return f"{marker} folder", loader
    if not (folder / CONFIG_NAME).is_file():
        raise CheckpointError(f"{folder} has no {CONFIG_NAME}: not a vitkit, Hugging Face, timm or OpenCLIP folder")
    config = read_json(folder / CONFIG_NAME)
    if not isinstance(config, dict):
        raise CheckpointError(f"{folder / CONFIG_NAME} must hold a JSON object")
    if "model_class" in config and (folder / WEIGHTS_NAME).is_file():
        return "vitkit folder", None
    model_type = config.get("model_type")
    if isinstance(model_type, str):
        if model_type not in HF_LOADERS:
            raise CheckpointError(f"{folder / CONFIG_NAME}: model_type {model_type!r} has no vitkit converter; "
                                  f"vitkit reads {', '.join(sorted(HF_LOADERS))}")
        return f"Hugging Face {model_type} folder", HF_LOADERS[model_type]
    if isinstance(config.get("architecture"), str):
        arch = config["architecture"]
        return f"timm {arch} folder", next((ld for rx, ld in TIMM_ARCH_LOADERS.items() if rx.match(arch)), TIMM_LOADER)
    raise CheckpointError(f"{folder / CONFIG_NAME} is neither a vitkit config (model_class), a Hugging Face config "
                          f"(model_type) nor a timm config (architecture)")


def load_checkpoint(spec: str | os.PathLike, **overrides: Any) -> nn.Module:
    """Build the model a checkpoint folder or hub id describes, converting foreign formats on the fly."""
    folder = checkpoint_folder(local_checkpoint(spec))
    _, loader = checkpoint_format(Path(folder))
    if loader is None:
        return vitkit_from_pretrained(folder, **overrides)
    return _loader(*loader)(folder, **overrides)
