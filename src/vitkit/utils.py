"""Small helpers shared by every layer of the package (no vitkit imports here but :mod:`vitkit.errors`)."""

from __future__ import annotations

import functools
import json
import os
import secrets
import stat
import threading
from collections.abc import Callable
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from .errors import ConfigError, MissingExtraError


class OutputPathError(ConfigError):
    """A destination vitkit will not write: a device, FIFO, socket or folder, a missing or unwritable parent
    folder, or a file name with the wrong extension. The message names the path the user gave."""


_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"))


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def path_kind(path: str | os.PathLike) -> str:
    """What ``path`` is, in words ("a FIFO", "a character device", ... or "a regular file"), for error messages."""
    mode = os.stat(path).st_mode
    return "a regular file" if stat.S_ISREG(mode) else _kind(mode)


def check_output_path(path: str | os.PathLike, *, suffixes: tuple[str, ...] | None = None,
                      create_parent: bool = False, what: str = "output") -> Path:
    """Check a destination before any work and return the file that will really be replaced.

    Refused, each with one :class:`OutputPathError` line naming ``path`` as given: an empty name or one ending in
    a separator; a name whose extension is not one of ``suffixes`` (case-insensitive); a destination that exists
    and is not a regular file (a device such as ``/dev/null`` or ``/dev/full``, a FIFO, a socket, a folder):
    vitkit replaces files by renaming a finished temporary copy over them, which would swap a device node or a
    pipe for a plain file; a parent folder that is missing (unless ``create_parent``: then the nearest existing
    folder above it must be a writable folder, and the write creates the missing ones), not a folder, or not
    writable.

    Symbolic links are written through: a link to a regular file keeps pointing at it and the file it names is
    replaced (its folder must be writable); a link to anything else, a dangling link whose target folder is
    missing, and a loop are refused like the target itself.
    """
    given = os.fspath(path)
    if isinstance(given, bytes):
        given = os.fsdecode(given)
    if not given or given.endswith(("/", os.sep)) or Path(given).name in ("", ".", ".."):
        raise OutputPathError(f"{given or repr(given)}: the {what} must name a file, not a folder")
    if suffixes and not given.lower().endswith(tuple(s.lower() for s in suffixes)):
        raise OutputPathError(f"{given}: the {what} must end in {' or '.join(suffixes)}")
    target = Path(given)
    link = target.is_symlink()
    if link:
        target = Path(os.path.realpath(given))
        if target.is_symlink():
            raise OutputPathError(f"{given}: the {what} is a symbolic link that does not resolve (a loop)")
    _refuse_special(target, given, what, link)
    parent = target.parent
    if not parent.exists():
        if not create_parent or link:
            raise OutputPathError(f"{given}: the folder {parent} does not exist; create it first")
        parent = parent.parent
        while not parent.exists() and parent != parent.parent:  # the nearest existing folder will hold the new ones
            parent = parent.parent
    if not parent.is_dir():
        raise OutputPathError(f"{given}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"{given}: the folder {parent} is not writable")
    return target


def _refuse_special(target: Path, given: str, what: str = "output", link: bool = False) -> None:
    """Refuse ``target`` when it exists and is not a regular file; the message names ``given``."""
    try:
        mode = os.stat(target).st_mode
    except (FileNotFoundError, NotADirectoryError):  # not there (a file above it is refused as the folder)
        return
    except OSError as e:
        raise OutputPathError(f"{given}: cannot check the {what} ({e.strerror or e})") from None
    if not stat.S_ISREG(mode):
        via = f" (the symbolic link points at {target})" if link else ""
        raise OutputPathError(f"{given}: the {what} exists and is {_kind(mode)}{via}; vitkit writes only regular "
                              f"files, choose another path")


@contextmanager
def atomic_path(path: str | os.PathLike, *, create_parent: bool = True):
    """Yield a temporary path in the target's folder; on success fsync it and rename it over ``path``.

    A crash in the middle leaves the old file untouched, never a half-written one. The file gets the usual
    mode of a new file (``0666`` less the umask, e.g. ``0644``), not ``tempfile``'s private ``0600``.

    The destination is checked first (:func:`check_output_path`): one that exists and is not a regular file
    (a device, FIFO, socket or folder) is refused before anything is written, and checked again just before the
    rename. A symbolic link is written through: the file it names is replaced and the link is kept. A missing
    parent folder is created when ``create_parent`` (the default, for the files of a run or checkpoint folder),
    else refused. Errors name ``path``, never the temporary file.
    """
    given = os.fspath(path)
    target = check_output_path(path, create_parent=create_parent)
    if create_parent:
        target.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        tmp = _create_unique(target.parent, f".{target.name}.", ".tmp")
        yield Path(tmp)
        os.chmod(tmp, file_mode())  # writers that replace the file (safetensors' save_file) leave it 0600
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        # nothing became a device, a pipe or a folder in the meantime
        _refuse_special(target, given, link=Path(given).is_symlink())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except OutputPathError:
        _discard(tmp)
        raise
    except OSError as e:
        _discard(tmp)
        if e.filename is None or (tmp is not None and tmp in (e.filename, e.filename2)):
            # the temporary file is an implementation detail: name the destination the user gave
            raise type(e)(e.errno, e.strerror or str(e), given) from None
        raise
    except BaseException:
        _discard(tmp)
        raise


def _discard(tmp: str | None) -> None:
    if tmp is not None and os.path.exists(tmp):
        with suppress(OSError):
            os.unlink(tmp)


_UMASK_LOCK = threading.Lock()


def file_mode() -> int:
    """The mode ``open()`` gives a new file: ``0o666`` less the process umask (``0o644`` under umask 022)."""
    try:  # Linux: read the umask without changing it (changing it races with other threads)
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


def _create_unique(folder: Path, prefix: str, suffix: str) -> str:
    """Create an empty file with a fresh random name in ``folder``; the kernel applies the umask to 0666."""
    for _ in range(100):
        name = os.path.join(folder, f"{prefix}{secrets.token_hex(6)}{suffix}")
        try:
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return name
    raise FileExistsError(f"cannot create a temporary file in {folder}")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, writer: Callable[[Path], Any]) -> None:
    """Run ``writer(tmp_path)`` and atomically move the result to ``path``."""
    with atomic_path(path) as tmp:
        writer(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def to_2tuple(x: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """Accept ``224`` or ``(224, 192)`` and return ``(h, w)``."""
    if isinstance(x, (tuple, list)):
        if len(x) != 2:
            raise ValueError(f"expected an int or a pair (h, w), got {x!r}")
        return int(x[0]), int(x[1])
    return int(x), int(x)


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags from /proc/cpuinfo (empty where there is none, e.g. macOS or Windows)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_bf16_supported() -> bool:
    """True when bf16 GEMMs run natively (AVX512-BF16 or AMX-BF16), i.e. when bf16 is actually faster.

    ``torch.backends.cpu.get_cpu_capability()`` only says "AVX512", and oneDNN reports bf16 as supported on any
    AVX512-BW CPU, where it is emulated and slower than fp32, so the CPU flags decide.
    """
    import torch

    if not torch.backends.mkldnn.is_available():
        return False
    flags = cpu_flags()
    if flags:
        return bool({"amx_bf16", "avx512_bf16"} & flags)
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def amx_supported() -> bool:
    """AMX tiles present (bf16 and int8 matrix units of Sapphire Rapids and later)."""
    return "amx_tile" in cpu_flags()


def format_bytes(n: int) -> str:
    """A size in binary units and exactly, e.g. ``8 MiB (8,388,608 bytes)``; small sizes in bytes only."""
    unit, scale = next((u, s) for u, s in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10), ("bytes", 1))
                       if n >= s or s == 1)
    return f"{n / scale:.3g} {unit} ({n:,} bytes)" if scale > 1 else f"{n:,} bytes"


def require_extra(module: str, extra: str, feature: str):
    """Import the optional dependency ``module``, or raise one line naming the extra that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtraError(f"{feature} needs {module}: pip install 'vitkit[{extra}]' ({e})") from None


def make_torchvision_importable() -> None:
    """Let ``import torchvision`` succeed where its C++ operators cannot load, before importing timm, open_clip or
    transformers' vision models (which import torchvision's Python transforms, never its operators).

    The torchvision wheels on PyPI are CUDA builds: beside the CPU build of torch their ``_C.so`` cannot load
    (``libc10_cuda.so`` is missing), and torchvision 0.28 then fails at import, registering fake kernels for
    ``torchvision::nms`` / ``qnms``, which do not exist. Here the two schemas are declared without kernels (calling
    them fails with torch's "no kernel" error). Nothing is done where the operators load, torchvision is absent, or
    it is already imported.
    """
    import importlib.util
    import sys

    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None or "torchvision" in sys.modules:
        return
    try:
        torch.ops.load_library(str(Path(spec.origin).parent / "_C.so"))  # what torchvision.extension does
        return
    except OSError:
        pass
    for op in ("nms", "qnms"):
        if not hasattr(torch.ops.torchvision, op):
            torch.library.define(f"torchvision::{op}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
