"""The limits of ``vitkit serve``: admission, deadlines, the decode memory budget and the request-field caps.

No FastAPI here, so the command line checks its flags (and ``vitkit --help`` works) without the ``serve`` extra.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import math
import os
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, fields

from ...errors import ConfigError
from ...schema import machine_memory

MAX_UPLOAD_MB = 1024  # --max-upload-mb: (0, 1024] MiB
MAX_SEED = 2**63  # seeds are in [0, 2**63): torch's generators take 64-bit seeds, JSON clients 63-bit integers
DECODE_MEMORY_FRACTION = 1 / 8  # default decode budget: this share of the machine's (or cgroup's) memory

# Peak memory growth of one decode (``decode_pil`` of a 6300x6300 PNG to a model's size), in bytes per declared
# pixel, by the mode the header declares, measured on this project's CI machine: L 1.1, RGB 4.2, RGBA 8.2,
# I;16 9.0. The estimate rounds up; modes not listed (I, F, 16-bit, unknown) take the largest.
_DECODE_BYTES_PER_PIXEL = {"1": 2, "L": 2, "RGB": 5, "YCbCr": 5, "LAB": 5, "HSV": 5, "RGBX": 5,
                           "P": 9, "LA": 9, "PA": 9, "RGBA": 9, "RGBa": 9, "La": 9, "CMYK": 9}
_DEFAULT_BYTES_PER_PIXEL = 10


def decode_bytes(size: tuple[int, int], mode: str) -> int:
    """Estimated peak memory of decoding an image of ``size`` (w, h) declared in ``mode``."""
    return int(size[0]) * int(size[1]) * _DECODE_BYTES_PER_PIXEL.get(mode, _DEFAULT_BYTES_PER_PIXEL)


def default_decode_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


@dataclass(frozen=True)
class ServeLimits:
    """Every bound of the server; each field is range-checked (:class:`ConfigError` naming it).

    Admission: at most ``max_pending`` ``/predict`` and ``/sample`` requests are in the server at once (waiting
    for or using the model, decoding, or still sending their upload); the next one gets 503 with ``Retry-After``
    at once, before its body is read. One forward runs at a time, in a worker thread, so the event loop, and with
    it ``/health``, ``/model`` and the page, stays free.

    Deadlines: a request is answered within ``request_timeout`` seconds of its upload's arrival: 503 (with
    ``Retry-After``) when it waited that long for a decode slot or the model, 504 when its decode or forward
    ran past it. A body must arrive within ``body_timeout`` seconds (else 408), a request's headers within
    ``header_timeout`` seconds of the connection's opening or of the previous answer (else the connection is
    closed); ``keep_alive_timeout``, ``max_connections`` (beyond it uvicorn answers a plain 503) and
    ``max_header_bytes`` go to uvicorn.

    Memory: at most ``decode_workers`` images are decoded at once, and only while their estimated decode
    memory (:func:`decode_bytes`: declared pixels x bytes per pixel of the declared mode) fits in
    ``decode_memory_bytes`` together (default: :data:`DECODE_MEMORY_FRACTION` of
    :func:`vitkit.schema.machine_memory`); an
    image larger than the whole budget is decoded alone. The per-image limits (40 MP, 50:1) stay those of
    :mod:`vitkit.data.image_io`.

    Fields: at most ``max_classes`` zero-shot class names of at most ``max_class_chars`` characters each.
    """

    max_pending: int = 64
    request_timeout: float = 30.0
    body_timeout: float = 30.0
    header_timeout: float = 10.0
    keep_alive_timeout: float = 5.0
    max_connections: int = 1024
    max_header_bytes: int = 16 * 1024
    decode_workers: int | None = None  # None: min(4, CPU count)
    decode_memory_bytes: int | None = None  # None: DECODE_MEMORY_FRACTION of the machine's memory
    max_classes: int = 256
    max_class_chars: int = 100

    def __post_init__(self) -> None:
        ram = machine_memory()
        ranges: dict[str, tuple[type, float, float, bool]] = {  # kind, low, high, low excluded
            "max_pending": (int, 1, 100_000, False),
            "request_timeout": (float, 0, 3600, True),
            "body_timeout": (float, 0, 3600, True),
            "header_timeout": (float, 0, 3600, True),
            "keep_alive_timeout": (float, 0, 3600, True),
            "max_connections": (int, 1, 1_000_000, False),
            "max_header_bytes": (int, 1024, 1024**2, False),
            "decode_workers": (int, 1, 256, False),
            "decode_memory_bytes": (int, 1024**2, ram, False),
            "max_classes": (int, 2, 100_000, False),
            "max_class_chars": (int, 1, 10_000, False),
        }
        bad = []
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.name in ("decode_workers", "decode_memory_bytes"):
                continue
            kind, low, high, open_low = ranges[f.name]
            ok = isinstance(value, int if kind is int else (int, float)) and not isinstance(value, bool)
            if ok:
                ok = math.isfinite(value) and (value > low if open_low else value >= low) and value <= high
            if not ok:
                bound = f"({low:g}, {high:g}]" if open_low else f"[{low:g}, {high:g}]"
                what = "an integer" if kind is int else "a finite number"
                bad.append(f"{f.name}={value!r} must be {what} in {bound}")
        if bad:
            raise ConfigError("invalid serve limits: " + "; ".join(bad))

    @property
    def decode_threads(self) -> int:
        return int(self.decode_workers) if self.decode_workers is not None else default_decode_workers()

    @property
    def decode_budget(self) -> int:
        if self.decode_memory_bytes is not None:
            return int(self.decode_memory_bytes)
        return max(64 * 1024**2, int(machine_memory() * DECODE_MEMORY_FRACTION))

    @property
    def max_classes_field(self) -> int:
        """Characters of the whole ``classes`` field: every name at its longest, with ", " between."""
        return self.max_classes * (self.max_class_chars + 2)


class Budget:
    """A first-come-first-served weighted semaphore that coroutines (of any event loop) wait on with a
    timeout, and that threads release: the decode memory budget, the decode slots and the model slot.

    A request asks for ``weight`` units (clamped to the capacity, so a request larger than the whole budget
    runs alone); it is granted when nobody waits before it and the units are free.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = int(capacity)
        self.used = 0
        self._lock = threading.Lock()
        self._waiters: deque[tuple[int, concurrent.futures.Future]] = deque()

    def _fit(self, weight: int) -> int:
        return max(0, min(int(weight), self.capacity))

    async def acquire(self, weight: int, timeout: float) -> int | None:
        """Wait up to ``timeout`` seconds; returns the units taken (give them to :meth:`release`), or None."""
        weight = self._fit(weight)
        with self._lock:
            if not self._waiters and self.used + weight <= self.capacity:
                self.used += weight
                return weight
            ticket: concurrent.futures.Future = concurrent.futures.Future()
            self._waiters.append((weight, ticket))
        try:
            await asyncio.wait_for(asyncio.wrap_future(ticket), max(0.0, timeout))
            return weight
        except (TimeoutError, asyncio.TimeoutError, asyncio.CancelledError) as e:
            with self._lock:
                granted = ticket.done() and not ticket.cancelled()
                if not granted:
                    ticket.cancel()
                    with contextlib.suppress(ValueError):  # release() may have dropped it already
                        self._waiters.remove((weight, ticket))
            if granted:  # granted just as the wait ended: give the units back
                self.release(weight)
            if isinstance(e, asyncio.CancelledError):
                raise
            return None

    def release(self, weight: int) -> None:
        with self._lock:
            self.used -= weight
            while self._waiters:
                want, ticket = self._waiters[0]
                if self.used + want > self.capacity:
                    break
                self._waiters.popleft()
                if ticket.set_running_or_notify_cancel():  # False: its wait ended already
                    self.used += want
                    ticket.set_result(True)

    @property
    def waiting(self) -> int:
        return len(self._waiters)


# ------------------------------------------------------------------------------------------ command-line flags
def number_flag(flag: str, kind: Callable[[str], float], low: float, high: float, *, open_low: bool = False,
                unit: str = "") -> Callable[[str], float]:
    """An argparse ``type``: the value as ``kind``, finite and in range, or one usage line naming the flag."""

    def parse(text: str) -> float:
        bound = f"({low:g}, {high:g}]" if open_low else f"[{low:g}, {high:g}]"
        what = "an integer" if kind is int else "a finite number"
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or (value <= low if open_low else value < low) or value > high:
            # argparse puts "argument FLAG: " in front
            raise argparse.ArgumentTypeError(f"must be {what} in {bound}{unit}, got {text!r}")
        return value

    parse.__name__ = flag  # argparse names the type in some messages
    return parse
