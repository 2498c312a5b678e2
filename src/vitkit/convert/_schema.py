"""The ``config.json`` schema of the converters: each key a converter reads, its type and range, checked before
the weights are loaded (the generic checks are :mod:`vitkit.schema`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Union

from ..errors import CheckpointError
from ..schema import (
    EPS,
    HEADS,
    LAYERS,
    RATE,
    SIDE,
    WIDTH,
    Range,
    _is_number,
    memory_problem,
    positive,
    show,
    value_problem,
)


# ---------------------------------------------------------------------------------------------------- config.json
@dataclass(frozen=True)
class Key:
    """One ``config.json`` entry a converter reads: its type, its range and whether it must be there."""

    annotation: Any
    range: Range | None = None
    required: bool = False


SIZE_KEY = Key(int, WIDTH)
LAYERS_KEY = Key(int, LAYERS)
HEADS_KEY = Key(int, HEADS)
EPS_KEY = Key(float, EPS)
RATE_KEY = Key(float, RATE)
IMAGE_SIZE_KEY = Key(Union[int, tuple[int, int]], SIDE)  # noqa: UP007 - a runtime annotation
NAME_KEY = Key(str)


def _id2label_problem(value: Any) -> str | None:
    """``id2label`` must map "0".."n-1" (integers written as strings) to strings."""
    expected = 'an object mapping "0", "1", ... (every integer from 0 to its size - 1) to class names (strings)'
    if not isinstance(value, Mapping):
        return f"id2label={show(value)} (must be {expected})"
    ids = []
    for key, name in value.items():
        canonical = isinstance(key, str) and key.isascii() and key.isdigit() and key == str(int(key))
        ids.append(int(key) if canonical else None)
        if not isinstance(name, str):
            return f"id2label[{key!r}]={show(name)} (must be a string, the class name)"
    if None in ids or sorted(ids) != list(range(len(ids))):
        bad = [k for k, i in zip(value, ids) if i is None or not 0 <= i < len(ids)]
        detail = f"key {bad[0]!r}" if bad else "repeated keys"
        return f"id2label has {detail} (must be {expected})"
    return None


class ConfigSchema:
    """The ``config.json`` entries a converter reads (:class:`Key` by name, nested objects by name), the
    ``model_type`` it converts (checked first: another model's config is that one error, not a list of its keys)
    and an estimate of the model's weight bytes from them (``estimate(config) -> (bytes, [keys it used])``)."""

    def __init__(self, keys: Mapping[str, Key], nested: Mapping[str, ConfigSchema] | None = None,
                 estimate: Callable[[Mapping[str, Any]], tuple[int, list[str]]] | None = None,
                 model_type: str | None = None) -> None:
        self.keys = {"_name_or_path": NAME_KEY, "model_type": NAME_KEY, **keys}
        self.nested = dict(nested or {})
        self.estimate = estimate
        self.model_type = model_type

    def problems(self, config: Mapping[str, Any], prefix: str = "") -> list[str]:
        out = []
        for key, spec in self.keys.items():
            if key not in config:
                if spec.required:
                    out.append(f"key {prefix + key!r} is missing")
                continue
            problem = value_problem(prefix + key, config[key], spec.annotation, spec.range)
            if problem:
                out.append(problem)
        if "id2label" in config:
            problem = _id2label_problem(config["id2label"])
            if problem:
                out.append(prefix + problem)
        for key, schema in self.nested.items():
            if key not in config:
                continue
            if not isinstance(config[key], Mapping):
                out.append(f"{prefix}{key}={show(config[key])} (must be a JSON object)")
            else:
                out.extend(schema.problems(config[key], f"{prefix}{key}."))
        return out

    def check(self, config: Mapping[str, Any], source: str) -> None:
        """Raise one CheckpointError naming ``source`` and every bad entry; then the memory estimate."""
        kind = config.get("model_type", self.model_type)
        if self.model_type is not None and kind != self.model_type:
            raise CheckpointError(f"{source}: model_type is {show(kind)}, expected {self.model_type!r}")
        problems = self.problems(config)
        if problems:
            note = self._memory_note(config)
            raise CheckpointError(f"{source}: " + "; ".join(problems) + (f" ({note})" if note else ""))
        if self.estimate is not None:
            nbytes, used = self.estimate(config)
            problem = memory_problem(nbytes)
            if problem:
                sizes = ", ".join(f"{k}={config[k]}" for k in used if k in config)
                raise CheckpointError(f"{source}: {sizes or 'its sizes'}: {problem}")

    def _memory_note(self, config: Mapping[str, Any]) -> str | None:
        """For a config already refused: whether its sizes, read as numbers (``1e9`` as 10**9), would also make a
        model too large for this machine; the user then learns both."""
        if self.estimate is None:
            return None
        sizes = dict(config)
        for key, spec in self.keys.items():
            value = config.get(key)
            if spec.annotation is int and _is_number(value) and math.isfinite(value) and value > 0:
                sizes[key] = int(value)
        try:
            nbytes, _ = self.estimate(sizes)
        except Exception:  # noqa: BLE001 - other entries are not numbers either: no estimate to add
            return None
        return memory_problem(nbytes) if isinstance(nbytes, int) else None


def check_image_stats(processor: Mapping[str, Any], channels: int | None, source: str) -> None:
    """``image_mean`` / ``image_std`` of a ``preprocessor_config.json``: lists of finite numbers, one per channel
    (or one for all), every std > 0."""
    problems = []
    for key in ("image_mean", "image_std"):
        if key not in processor:
            continue
        value = processor[key]
        rng = positive() if key == "image_std" else None
        lengths = sorted({1, channels}) if channels else None
        problem = value_problem(key, value, list[float], rng)
        if problem is None and lengths and len(value) not in lengths:
            problem = (f"{key}={show(value)} (must hold {' or '.join(map(str, lengths))} numbers: one for all "
                       f"channels or one per channel of the model)")
        if problem is None and not value:
            problem = f"{key}=[] (must hold one number per channel)"
        if problem:
            problems.append(problem)
    if problems:
        raise CheckpointError(f"{source}: " + "; ".join(problems))


# ---------------------------------------------------------------------------------------------------- estimates
def transformer_bytes(width: int, layers: int, mlp: int, tokens: int = 0, bytes_per_value: int = 4) -> int:
    """Weights of ``layers`` pre-norm transformer blocks of ``width`` with an MLP of ``mlp`` (q, k, v, output: 4
    width², MLP 2 width·mlp, biases and norms) plus a ``tokens`` × width position table."""
    block = 4 * width * width + 2 * width * mlp + 9 * width + mlp
    return bytes_per_value * (layers * block + tokens * width)


def grid_tokens(image_size: Any, patch: int) -> int:
    side = image_size if isinstance(image_size, (list, tuple)) else (image_size, image_size)
    return (int(side[0]) // max(patch, 1)) * (int(side[1]) // max(patch, 1)) + 1
