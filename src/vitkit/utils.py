"""Small helpers shared by every layer of the package (no vitkit imports here)."""

from __future__ import annotations

import functools
import json
import os
import secrets
import threading
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path in the target's folder; on success fsync it and rename it over ``path``.

    A crash in the middle leaves the old file untouched, never a half-written one. The file gets the usual
    mode of a new file (``0666`` less the umask, e.g. ``0644``), not ``tempfile``'s private ``0600``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_unique(path.parent, f".{path.name}.", ".tmp")
    try:
        yield Path(tmp)
        os.chmod(tmp, file_mode())  # writers that replace the file (safetensors' save_file) leave it 0600
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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
