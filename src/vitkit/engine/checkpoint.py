"""Training checkpoints that survive crashes and resume exactly.

A checkpoint is a folder: the model as a vitkit checkpoint (``config.json`` + ``model.safetensors``, so
``vitkit predict`` and ``from_pretrained`` read it directly), ``ema.safetensors`` when EMA is on, and
``train_state.pt`` with optimizer, scheduler, counters, metric history and RNG states. ``train_state.pt``
holds only tensors and plain Python containers and is read with ``torch.load(weights_only=True)``.

Atomicity: the folder is written under a temporary name, fsynced, then swapped in with renames; a crash
at any point leaves either the old or the new checkpoint complete (``resolve`` finds it).
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from ..errors import CheckpointError
from ..models._pretrained import read_state_dict
from ..utils import _fsync_dir

TRAIN_STATE = "train_state.pt"
EMA_WEIGHTS = "ema.safetensors"


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(folder)


def write_checkpoint(folder: str | os.PathLike, model, train_state: dict[str, Any] | None = None,
                     ema_state: dict[str, torch.Tensor] | None = None,
                     extra_files: dict[str, str] | None = None) -> Path:
    """Atomically (re)place ``folder`` with a new checkpoint."""
    final = Path(folder)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    model.save_pretrained(tmp)
    if ema_state is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in ema_state.items()}, str(tmp / EMA_WEIGHTS))
    if train_state is not None:
        torch.save(train_state, tmp / TRAIN_STATE)
    for name, text in (extra_files or {}).items():
        (tmp / name).write_text(text, encoding="utf-8")
    _fsync_tree(tmp)
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    _fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)
    return final


def resolve(folder: str | os.PathLike) -> Path:
    """The complete checkpoint at ``folder``; after a crash between the two renames, the previous one."""
    final = Path(folder)
    if (final / "model.safetensors").is_file():
        return final
    old = final.with_name(f".{final.name}.old")
    if (old / "model.safetensors").is_file():
        return old
    raise CheckpointError(f"no checkpoint in {final}")


def read_train_state(folder: Path) -> dict[str, Any]:
    path = folder / TRAIN_STATE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: {folder} holds model weights only and cannot be resumed")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for bad files
        raise CheckpointError(f"cannot read training state {path}: {e}") from None


def read_ema_state(folder: Path) -> dict[str, torch.Tensor] | None:
    path = folder / EMA_WEIGHTS
    return read_state_dict(path) if path.is_file() else None
