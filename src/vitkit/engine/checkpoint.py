"""Training checkpoints that survive crashes and resume exactly.

A checkpoint is a folder: the model as a vitkit checkpoint (``config.json`` + ``model.safetensors``, so
``vitkit predict`` and ``from_pretrained`` read it directly), ``ema.safetensors`` when EMA is on, and
``train_state.pt`` with optimizer, scheduler, counters, metric history and RNG states. ``train_state.pt``
holds only tensors and plain Python containers and is read with ``torch.load(weights_only=True)``.

Atomicity. A checkpoint ``last`` is written as ``.last.tmp-<pid>-<random>``: every file fsynced, then a
marker ``.complete`` (the names and sizes of the files) written last and fsynced. Then the swap:

1. a stale ``.last.old`` is moved aside (renamed to ``.last.del-*``, then deleted), but only while ``last``
   is complete: ``.old`` is never removed when it may be the only complete copy;
2. ``last`` -> ``.last.old`` (only if ``last`` exists);
3. ``.last.tmp-*`` -> ``last``;
4. ``.last.old`` is moved aside and deleted.

Folders are deleted by renaming them to ``.<name>.del-*`` first, so a crash in the middle of a deletion
never leaves a half-deleted ``last`` or ``.old`` behind. A crash at any point, and a second crash while the
next checkpoint is being written, leaves a complete checkpoint that :func:`resolve` finds: ``last``, else
``.last.old``, else the newest complete ``.last.tmp-*``. :func:`remove_stale` (at the start of a run) deletes
the leftovers, never the only complete copy.
"""

from __future__ import annotations

import json
import os
import random
import re
import secrets
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from ..errors import CheckpointError
from ..models import read_state_dict
from ..utils import _fsync_dir, file_mode

TRAIN_STATE = "train_state.pt"
EMA_WEIGHTS = "ema.safetensors"
WEIGHTS = "model.safetensors"
COMPLETE = ".complete"  # written last into a finished temporary folder: {"files": {name: size}}


def rng_state() -> dict[str, Any]:
    """This process's random streams; with CUDA in use, the current GPU's too (dropout and augmentations
    that run on the GPU draw from it)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---------------------------------------------------------------------------------------- folder names
def _old(final: Path) -> Path:
    return final.with_name(f".{final.name}.old")


def _temporaries(final: Path) -> list[Path]:
    """The ``.<name>.tmp-*`` folders next to ``final``, newest marker first (incomplete ones last)."""
    if not final.parent.is_dir():
        return []
    found = [p for p in final.parent.glob(f".{_glob_escape(final.name)}.tmp-*") if p.is_dir()]

    def age(p: Path) -> int:
        try:
            return (p / COMPLETE).stat().st_mtime_ns
        except OSError:
            return -1

    return sorted(found, key=age, reverse=True)


def _glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def is_complete(folder: Path, require_marker: bool = False) -> bool:
    """Whether ``folder`` holds a whole checkpoint.

    With a ``.complete`` marker every file it lists must be there with its size. Without one (checkpoints
    written before the marker existed) ``model.safetensors`` must be there, unless ``require_marker``:
    a temporary folder without a marker may be half written.
    """
    marker = folder / COMPLETE
    if marker.is_file():
        try:
            files = json.loads(marker.read_text(encoding="utf-8"))["files"]
            return WEIGHTS in files and all(
                (folder / name).is_file() and (folder / name).stat().st_size == size for name, size in files.items())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return False
    return not require_marker and (folder / WEIGHTS).is_file()


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _write_marker(folder: Path) -> None:
    """fsync every file of ``folder`` (subfolders too: a sharded checkpoint's ``sharded/``), then write and
    fsync the marker that makes it count as complete."""
    files, mode = {}, file_mode()
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path != folder / COMPLETE:
            os.chmod(path, mode)  # safetensors writes 0600; every file gets the usual umask-derived mode
            _fsync_file(path)
            files[path.relative_to(folder).as_posix()] = path.stat().st_size
        elif path.is_dir():
            _fsync_dir(path)
    marker = folder / COMPLETE
    with open(marker, "w", encoding="utf-8") as f:
        json.dump({"files": files}, f)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(folder)


def _discard(folder: Path, final: Path) -> None:
    """Delete ``folder``: renamed to ``.<name>.del-*`` first, so that no half-deleted copy keeps its name."""
    trash = final.with_name(f".{final.name}.del-{os.getpid()}-{secrets.token_hex(4)}")
    folder.rename(trash)
    _fsync_dir(final.parent)
    if trash.is_dir():
        shutil.rmtree(trash, ignore_errors=True)
    else:
        trash.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------- write / find
def new_temporary(folder: str | os.PathLike) -> Path:
    """A new, empty ``.<name>.tmp-*`` folder next to ``folder``, for a checkpoint that several processes write
    (each its shards) before :func:`write_checkpoint` (``tmp=``) completes and swaps it in."""
    final = Path(folder)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    tmp.mkdir()
    return tmp


def write_checkpoint(folder: str | os.PathLike, model, train_state: dict[str, Any] | None = None,
                     ema_state: dict[str, torch.Tensor] | None = None,
                     extra_files: dict[str, str] | None = None, tmp: Path | None = None) -> Path:
    """Atomically (re)place ``folder`` with a new checkpoint (see the module's docstring); ``tmp``: the
    :func:`new_temporary` folder that already holds other files of it."""
    final = Path(folder)
    tmp = tmp if tmp is not None else new_temporary(final)
    old = _old(final)
    try:
        model.save_pretrained(tmp)
        if ema_state is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in ema_state.items()}, str(tmp / EMA_WEIGHTS))
        if train_state is not None:
            torch.save(train_state, tmp / TRAIN_STATE)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        _write_marker(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # never complete: resolve would ignore it anyway
        raise
    if final.exists():
        if is_complete(final):
            if old.exists():  # left by a crash after the last swap; ``final`` is complete, so it can go
                _discard(old, final)
            final.rename(old)
            _fsync_dir(final.parent)
        else:  # not a checkpoint at all; keep ``old``, which may be the only complete copy
            _discard(final, final)
    tmp.rename(final)
    _fsync_dir(final.parent)
    if old.exists():
        _discard(old, final)
    return final


def resolve(folder: str | os.PathLike) -> Path:
    """The complete checkpoint at ``folder``: the folder itself, else (after a crash in the middle of a swap)
    ``.<name>.old``, else the newest complete ``.<name>.tmp-*``."""
    final = Path(folder)
    if is_complete(final):
        return final
    old = _old(final)
    if is_complete(old):
        return old
    for tmp in _temporaries(final):
        if is_complete(tmp, require_marker=True):
            return tmp
    raise CheckpointError(f"no checkpoint in {final}")


_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?:old|tmp-.+|del-.+)$")


def remove_stale(checkpoints: str | os.PathLike) -> list[Path]:
    """Delete what crashed writes left in a ``checkpoints`` folder; returns what was deleted.

    Half-deleted (``.del-*``) and incomplete temporary folders always go; ``.old`` and complete temporary
    folders go only when a newer or other complete copy of the same checkpoint remains, so this never
    deletes the only complete copy. Call it when no other process writes checkpoints into the folder.
    """
    root = Path(checkpoints)
    if not root.is_dir():
        return []
    names = {m["name"] for p in root.iterdir() if (m := _LEFTOVER.match(p.name)) and p.is_dir()}
    removed = []
    for name in sorted(names):
        final = root / name
        keep = resolve(final) if _has_checkpoint(final) else None
        for path in [_old(final), *_temporaries(final)]:
            if path.is_dir() and path != keep:
                _discard(path, final)
                removed.append(path)
        for path in root.glob(f".{_glob_escape(name)}.del-*"):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _has_checkpoint(final: Path) -> bool:
    try:
        resolve(final)
    except CheckpointError:
        return False
    return True


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
