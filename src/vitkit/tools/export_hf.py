"""``vitkit export hf RUN DIR``: write a vitkit model as a Hugging Face ``transformers`` folder and check it.

:func:`export_hf` takes a model, a checkpoint folder or a training run folder (its best checkpoint, else its
last, as ``vitkit eval``) and writes ``DIR`` with ``config.json`` (class names as ``id2label`` / ``label2id``),
``model.safetensors``, ``preprocessor_config.json`` (size, mean, std, resample: ``AutoImageProcessor``), the
tokenizer files of a text model, and ``vitkit_export.json`` (where it came from; it marks the folder as an export
that a later export may replace). What maps to what, and which models and switches are refused (one line naming
the switch): :mod:`vitkit.convert.hf_export`.

The folder appears whole or not at all: it is written beside ``DIR`` under a temporary name, loaded with
``transformers`` and compared with the vitkit model on the same inputs (``check``; refused above ``atol``), then
renamed into place. ``DIR`` may be missing (its missing parents are created), empty, or an earlier export holding
only its own files; any other existing file or folder there is refused before any work.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import nn

from .._version import __version__
from ..convert.hf_export import HFExport, hf_export, model_label
from ..errors import ConfigError
from ..utils import OutputPathError, atomic_write, atomic_write_text, file_mode, path_kind

MARKER = "vitkit_export.json"
WEIGHTS = "model.safetensors"
DEFAULT_ATOL = 1e-4


# ---------------------------------------------------------------------------------------------------- destination
def check_destination(out_dir: str | os.PathLike) -> tuple[Path, bool]:
    """(the folder that will be replaced, whether it holds an earlier export); an OutputPathError naming
    ``out_dir`` for anything vitkit must not replace. A symbolic link to a folder is written through."""
    given = os.fsdecode(os.fspath(out_dir))
    if not given or Path(given).name in ("", ".", ".."):
        raise OutputPathError(f"{given or repr(given)}: name the export folder (e.g. exports/my_model)")
    target = Path(os.path.realpath(given)) if Path(given).is_symlink() else Path(given)
    if target.exists() and not target.is_dir():
        raise OutputPathError(f"{given}: exists and is {path_kind(target)}; the export is a folder, choose another "
                              f"path")
    if target.is_dir():
        entries = {p.name for p in target.iterdir()}
        if not entries:
            return target, False
        if MARKER not in entries:
            shown = ", ".join(sorted(entries)[:5]) + (", …" if len(entries) > 5 else "")
            raise OutputPathError(f"{given}: the folder is not empty ({shown}) and is not an earlier vitkit export "
                                  f"(no {MARKER}); choose a new or empty folder")
        try:
            own = set(json.loads((target / MARKER).read_text(encoding="utf-8")).get("files", []))
        except (OSError, ValueError, AttributeError):
            own = set()
        foreign = sorted(entries - own - {MARKER})
        if foreign:
            raise OutputPathError(f"{given}: the earlier export there now also holds {', '.join(foreign[:5])}, which "
                                  f"replacing it would delete; move them away or choose another folder")
        return target, True
    parent = target.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"{given}: {parent} is not a writable folder")
    return target, False


def _new_sibling(target: Path, kind: str) -> Path:
    """A fresh name beside ``target`` (``.NAME.KIND-XXXX``), not yet used."""
    while True:
        path = target.parent / f".{target.name}.{kind}-{secrets.token_hex(4)}"
        if not path.exists():
            return path


def _write_folder(folder: Path, export: HFExport, source: str) -> list[str]:
    """Every file of ``export`` (+ the marker) into ``folder``, each written atomically; returns their names."""
    texts = {"config.json": json.dumps(export.config, indent=2, ensure_ascii=False) + "\n",
             "preprocessor_config.json": json.dumps(export.preprocessor, indent=2) + "\n", **export.files}
    for name, text in texts.items():
        atomic_write_text(folder / name, text)
    atomic_write(folder / WEIGHTS, lambda p: save_file(export.state, str(p), metadata={"format": "pt"}))
    names = sorted([*texts, WEIGHTS])
    marker = {"vitkit_version": __version__, "source": source, "architecture": export.architecture,
              "files": names, "notes": export.notes}
    atomic_write_text(folder / MARKER, json.dumps(marker, indent=2, ensure_ascii=False) + "\n")
    return names


def _swap_in(tmp: Path, target: Path) -> None:
    """Rename the finished ``tmp`` folder to ``target``; an earlier export there is moved aside, then deleted."""
    old = None
    if target.exists():
        old = _new_sibling(target, "old")
        target.rename(old)
    try:
        tmp.rename(target)
    except OSError:
        if old is not None:
            old.rename(target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------- export
def _load(model_or_path: nn.Module | str | os.PathLike) -> tuple[nn.Module, str]:
    if isinstance(model_or_path, nn.Module):
        return model_or_path, model_label(model_or_path)
    from .evaluate import load_model, resolve_model_dir

    return load_model(model_or_path), str(resolve_model_dir(model_or_path))


def export_hf(model_or_path: nn.Module | str | os.PathLike, out_dir: str | os.PathLike, check: bool = True,
              atol: float = DEFAULT_ATOL) -> dict[str, Any]:
    """Write ``model_or_path`` (a model, a checkpoint folder or a run folder) as a Hugging Face folder ``out_dir``
    and return a report (architecture, files, notes, the check's max abs differences).

    ``check`` loads the written folder with ``transformers`` and compares its outputs with the vitkit model's on
    random inputs (logits, features, MAE's masks and reconstructions with a fixed noise, CLIP's embeddings and
    logits, tokenizer ids); above ``atol`` nothing is written. The destination is checked first (see the module
    docstring), the model is refused before anything is written when transformers cannot express it.
    """
    if not atol > 0:
        raise ConfigError(f"atol must be > 0, got {atol!r}")
    start = time.perf_counter()
    target, replaces = check_destination(out_dir)
    model, source = _load(model_or_path)
    export = hf_export(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_sibling(target, "tmp")
    tmp.mkdir()
    try:
        os.chmod(tmp, file_mode() | (file_mode() & 0o444) >> 2)  # a folder's usual mode (0755 under umask 022)
        names = _write_folder(tmp, export, source)
        checks = export.check(tmp, atol) if check and export.check is not None else []
        target, replaces = check_destination(out_dir)  # nothing else appeared there meanwhile
        _swap_in(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {
        "path": str(out_dir), "format": "hf", "architecture": export.architecture, "model_name": model_label(model),
        "source": source, "files": names, "notes": list(export.notes), "checks": checks,
        "max_abs_diff": max((c["max_abs_diff"] for c in checks), default=None), "atol": atol,
        "replaced_earlier_export": replaces, "seconds": time.perf_counter() - start,
    }


# ---------------------------------------------------------------------------------------------------- CLI
def format_report(report: dict[str, Any]) -> str:
    """A few lines for the terminal."""
    lines = [f"exported {report['model_name']} -> {report['path']} as transformers {report['architecture']} "
             f"({', '.join(report['files'])})" + (" (replaced the earlier export)" if report["replaced_earlier_export"]
                                                   else "")]
    if report["checks"]:
        each = ", ".join(f"{c['output']}: {c['max_abs_diff']:.1e}" for c in report["checks"])
        lines.append(f"transformers vs vitkit: max |Δ| {report['max_abs_diff']:.1e} <= atol {report['atol']:g} "
                     f"({each})")
    else:
        lines.append("not checked against transformers (--no-check)")
    lines += [f"note: {n}" for n in report["notes"]]
    return "\n".join(lines)


def run_export_hf_args(args: argparse.Namespace) -> int:
    """``vitkit export hf RUN DIR`` (the arguments of :func:`vitkit.tools.export.add_export_args`)."""
    report = export_hf(args.run, args.output, check=not args.no_check, atol=args.atol)
    print(format_report(report))
    return 0
