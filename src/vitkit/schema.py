"""One schema for every foreign and user configuration: types, ranges, memory and bounded JSON (issue #28).

Three kinds of settings reach a constructor: a foreign ``config.json`` read by a converter, ``model.args`` of a
recipe (or ``--arg`` of ``vitkit convert``), and ``task.args``. All three are checked the same way, before
anything is allocated, and every problem of a call is reported in one line naming the file or key:

* **by type**, from an annotation (``int``, ``float``, ``bool``, ``str``, ``Literal[...]``, ``X | None``,
  ``tuple``/``list``/``Sequence`` of those, ``dict``): a bool is not a number, a string is not a bool, an int is
  accepted where a float is expected, and a float must be finite;
* **by range**, from a table keyed by the argument's name (:data:`MODEL_ARG_RANGES`, :data:`TASK_ARG_RANGES`) or
  by a converter's ``ConfigSchema`` (``vitkit.convert._schema``): sizes positive and capped, rates in [0, 1), ...;
* **by memory**: weights over half of this machine's memory (:func:`machine_memory`) are refused with the
  estimate (``vitkit.models.check_model_arguments`` builds on the meta device to count them).

This module is the bottom layer (no vitkit imports but errors): models, tasks, convert and the server use it.
JSON files are read with a bounded nesting depth and size (:func:`read_json`).
"""

from __future__ import annotations

import json
import math
import numbers
import os
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple, Union

from .errors import CheckpointError

MAX_JSON_DEPTH = 32  # Hugging Face configs nest 3 levels deep (CLIP: text_config.id2label)
MAX_JSON_BYTES = 64 << 20  # a sharded index of a very large model is a few MB
INT64 = 1 << 63

# Caps that keep a constructor's Python loops and torch's int32/int64 arithmetic bounded; the memory check refuses
# far smaller models than these caps allow.
MAX_WIDTH = 1 << 20  # a channel or hidden width, an MLP width
MAX_VOCAB = 1 << 24
MAX_SIDE = 1 << 16  # an image side, a patch or window size, a grid
MAX_LAYERS = 1000  # blocks of one stack (the largest published ViTs have 48)
MAX_HEADS = 4096


# ---------------------------------------------------------------------------------------------------- ranges
class Range(NamedTuple):
    """A range for one number (or a string choice); ``text`` says it without the type: ``>= 1``, ``in [0, 1)``."""

    test: Callable[[Any], bool]
    text: str


def at_least(lo: float, hi: float | None = None) -> Range:
    text = f">= {lo}" if hi is None else f">= {lo} and <= {hi}"
    return Range(lambda x: x >= lo and (hi is None or x <= hi), text)


def positive(hi: float | None = None) -> Range:
    return Range(lambda x: x > 0 and (hi is None or x <= hi), "> 0" if hi is None else f"> 0 and <= {hi}")


def interval(lo: float, hi: float, closed_lo: bool = True, closed_hi: bool = False) -> Range:
    def test(x: float) -> bool:
        return (x >= lo if closed_lo else x > lo) and (x <= hi if closed_hi else x < hi)

    return Range(test, f"in {'[' if closed_lo else '('}{lo}, {hi}{']' if closed_hi else ')'}")


def one_of(*choices: str) -> Range:
    return Range(lambda x: x in choices, "one of " + ", ".join(repr(c) for c in choices))


RATE = interval(0, 1)  # dropout, drop path, masking: [0, 1)
KEEP_RATIO = interval(0, 1, closed_lo=False, closed_hi=True)  # (0, 1]
PROBABILITY = interval(0, 1, closed_hi=True)
WIDTH = at_least(1, MAX_WIDTH)
SIDE = at_least(1, MAX_SIDE)
LAYERS = at_least(0, MAX_LAYERS)
HEADS = at_least(1, MAX_HEADS)
CHANNELS = at_least(1, 4096)
VOCAB = at_least(1, MAX_VOCAB)
TOKEN_ID = at_least(0, MAX_VOCAB)
EPS = interval(0, 1, closed_lo=False)
RATIO = positive(1024)  # an MLP or expansion ratio
SEED = at_least(0, INT64 - 1)
COUNT = at_least(0, 1_000_000)

# model.args (and ``vitkit convert --arg``), by argument name, for every registered family: what the annotation
# cannot say. An entry applies to each number of a tuple-valued argument (``depths``, ``patch_nums``, ...).
MODEL_ARG_RANGES: dict[str, Range] = {
    **dict.fromkeys(["embed_dim", "vision_width", "text_width", "decoder_embed_dim", "dim", "token_dim", "stem_width",
                     "proj_dim", "proj_hidden_dim", "diff_width", "ch", "z_channels", "c_vae", "widths", "head_widths",
                     "mlp_dim", "vision_mlp_dim", "text_mlp_dim", "decoder_mlp_dim", "representation_size"], WIDTH),
    **dict.fromkeys(["img_size", "patch_size", "patch_stride", "window_size", "group_size", "stem_stride",
                     "quant_conv_ks", "patch_nums", "scales", "grid_size", "image_size", "context_length",
                     "max_text_len", "max_image_length"], SIDE),
    **dict.fromkeys(["depth", "vision_layers", "text_layers", "decoder_depth", "diff_depth", "num_res_blocks",
                     "proj_layers", "depths", "stem_layers"], LAYERS),
    **dict.fromkeys(["num_heads", "vision_heads", "text_heads", "decoder_num_heads"], HEADS),
    **dict.fromkeys(["in_chans", "in_channels"], CHANNELS),
    **dict.fromkeys(["vocab_size"], VOCAB),
    **dict.fromkeys(["eos_token_id", "pad_token_id"], TOKEN_ID),
    **dict.fromkeys(["type_vocab_size", "modality_types"], at_least(1, 1024)),
    "num_classes": at_least(0, MAX_VOCAB),  # 0 builds no classifier head
    **dict.fromkeys(["drop_rate", "attn_drop_rate", "drop_path_rate", "pos_drop_rate", "cond_drop_rate", "dropout",
                     "mask_ratio"], RATE),
    **dict.fromkeys(["keep_ratio_choices", "window_keep_ratios"], KEEP_RATIO),
    **dict.fromkeys(["mlp_ratio", "decoder_mlp_ratio", "expand_ratio", "heads_ratio", "performer_kernel_ratio"], RATIO),
    "norm_eps": EPS,
    **dict.fromkeys(["qk_scale", "diff_target_scale", "diff_clip_x0"], positive()),
    "beta": at_least(0),
    "ch_mult": at_least(1, 64),
    "t2t_kernels": at_least(0, 64),  # (kernel, stride, padding) per stage
    "sparse_stages": at_least(0, 64),
    **dict.fromkeys(["share_quant_resi", "default_qresi_counts"], at_least(0, 64)),
    "diff_timesteps": at_least(2, 100_000),
    "diff_sampling_steps": at_least(1, 100_000),
    "diffusion_batch_mul": at_least(1, 64),
    "logit_scale_init": interval(-100, 100, closed_hi=True),
}

# task.args, by field name, for every registered task (each task's own __post_init__ checks the rest).
TASK_ARG_RANGES: dict[str, Range] = {
    "cfg": at_least(0),
    "top_k": at_least(0, MAX_VOCAB),
    "top_p": RATE,
    **dict.fromkeys(["temperature", "knn_temperature", "beta"], positive()),
    "label_smoothing": RATE,
    **dict.fromkeys(["samples_per_class", "grid_images"], at_least(0, 1024)),
    **dict.fromkeys(["eval_seed", "sample_seed", "seed"], SEED),
    "steps": at_least(1, 10_000),
    "diffusion_steps": at_least(-1, 100_000),
    **dict.fromkeys(["diffusion_weight", "itm_weight", "mlm_weight", "wpa_weight"], at_least(0)),
    **dict.fromkeys(["knn_k", "probe_max_train", "iteration", "k"], at_least(1, 1_000_000)),
    **dict.fromkeys(["probe_epochs", "retrieval_images"], COUNT),
    "retrieval_candidates": at_least(2, 1_000_000),
    "vocab_size": VOCAB,
    **dict.fromkeys(["context_length", "max_text_len"], SIDE),
    "mlm_prob": KEEP_RATIO,
    **dict.fromkeys(["swap_prob", "dead_threshold"], RATE),
    **dict.fromkeys(["hard_negative_prob", "continuous_prob"], PROBABILITY),
}


# ---------------------------------------------------------------------------------------------------- types
def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _origin(annotation: Any) -> Any:
    return typing.get_origin(annotation)


def _is_union(annotation: Any) -> bool:
    return _origin(annotation) in (Union, types.UnionType)


def fits(value: Any, annotation: Any) -> bool:
    """Whether ``value`` (as YAML, JSON or Python gives it) has the type ``annotation`` asks for."""
    if annotation is Any or annotation is object or isinstance(annotation, (str, typing.ForwardRef)):
        return True  # unannotated or unresolvable: the constructor decides
    if annotation is None or annotation is type(None):
        return value is None
    origin, args = _origin(annotation), typing.get_args(annotation)
    if _is_union(annotation):
        return any(fits(value, a) for a in args)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return _is_int(value) and -INT64 <= value < INT64
    if annotation is float:
        return _is_number(value) and math.isfinite(value)
    if annotation is str:
        return isinstance(value, str)
    if origin in (tuple, list, Sequence) or annotation in (tuple, list):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            return len(value) == len(args) and all(fits(v, a) for v, a in zip(value, args))
        item = args[0] if args else Any
        return all(fits(v, item) for v in value)
    if origin in (dict, Mapping) or annotation in (dict, Mapping):
        if not isinstance(value, Mapping):
            return False
        key, item = (typing.get_args(annotation) or (Any, Any))[:2]
        return all(fits(k, key) and fits(v, item) for k, v in value.items())
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


def describe(annotation: Any, rng: Range | None = None) -> str:
    """What ``annotation`` (with ``rng`` on its numbers) asks for, in words: ``an integer >= 1``."""
    suffix = f" {rng.text}" if rng is not None else ""
    if annotation is None or annotation is type(None):
        return "null"
    origin, args = _origin(annotation), typing.get_args(annotation)
    if _is_union(annotation):
        parts = [describe(a, rng) for a in args if a is not type(None)]
        text = " or ".join(dict.fromkeys(parts))
        return f"{text}, or null" if type(None) in args else text
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if annotation is bool:
        return "true or false"
    if annotation is int:
        return "an integer" + suffix
    if annotation is float:
        return "a finite number" + suffix
    if annotation is str:
        return "a string" + (f" ({rng.text})" if rng is not None else "")
    if origin in (tuple, list, Sequence) or annotation in (tuple, list):
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            items = list(dict.fromkeys(describe(a, rng) for a in args))
            return f"a list of {len(args)} items, each {items[0]}" if len(items) == 1 else \
                f"a list of {len(args)} items ({', '.join(items)})"
        return f"a list, each item {describe(args[0] if args else Any, rng)}"
    if origin in (dict, Mapping) or annotation in (dict, Mapping):
        return "a mapping (key: value)"
    if annotation is Any:
        return "any value"
    return f"a {getattr(annotation, '__name__', annotation)}"


def _numbers(value: Any) -> list[Any]:
    """The numbers and strings of a (nested) value, for a range check."""
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in _numbers(v)]
    return [] if value is None or isinstance(value, (bool, Mapping)) else [value]


def show(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def value_problem(key: str, value: Any, annotation: Any, rng: Range | None = None) -> str | None:
    """``None`` when ``value`` fits ``annotation`` and ``rng``, else ``key=value (must be ...)``."""
    if not fits(value, annotation):
        return f"{key}={show(value)} (must be {describe(annotation, rng)})"
    if rng is not None:
        try:
            ok = all(rng.test(x) for x in _numbers(value))
        except TypeError:  # e.g. a string where the range is numeric (an unannotated argument)
            ok = False
        if not ok:
            each = " for each item" if isinstance(value, (list, tuple)) else ""
            return f"{key}={show(value)} (must be {rng.text}{each})"
    return None


def type_hints(obj: Any) -> dict[str, Any]:
    """Resolved annotations of a function or dataclass; unresolvable ones count as ``Any``."""
    try:
        return typing.get_type_hints(obj)
    except Exception:  # noqa: BLE001 - a name only imported for type checkers: fall back to no annotations
        return {}


def argument_problems(hints: Mapping[str, Any], values: Mapping[str, Any], ranges: Mapping[str, Range],
                      prefix: str = "") -> list[str]:
    """``key=value (must be ...)`` for every value that does not fit its annotation or range."""
    problems = []
    for key, value in values.items():
        problem = value_problem(f"{prefix}{key}", value, hints.get(key, Any), ranges.get(key))
        if problem:
            problems.append(problem)
    return problems


# ---------------------------------------------------------------------------------------------------- memory
def machine_memory() -> int:
    """Bytes this process may use: the machine's RAM, or its cgroup's limit when lower."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        total = 8 << 30
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < total:
            total = int(text)
        break
    return total


def memory_problem(nbytes: int) -> str | None:
    """None when weights of ``nbytes`` fit in half of this machine's memory, else ``a model of ~N GB ...``."""
    total = machine_memory()
    if nbytes <= total // 2:
        return None
    return f"a model of ~{nbytes / 1e9:.3g} GB does not fit in half of this machine's {total / 1e9:.3g} GB"


def one_line(text: str) -> str:
    """A multi-line message (torch's ``load_state_dict`` report) as one line: its first two lines and a count."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) <= 1:
        return text.strip()
    more = f" (and {len(lines) - 2} more)" if len(lines) > 2 else ""
    return f"{lines[0]} {lines[1]}{more}"


def first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


# ---------------------------------------------------------------------------------------------------- task.args
def task_argument_problems(args_cls: type, values: Mapping[str, Any], prefix: str = "task.args.") -> list[str]:
    """Type (the ``Args`` dataclass's annotations) and range (:data:`TASK_ARG_RANGES`) problems of task settings."""
    return argument_problems(type_hints(args_cls), values, TASK_ARG_RANGES, prefix)


# ---------------------------------------------------------------------------------------------------- JSON files
def read_json(path: Path, max_depth: int = MAX_JSON_DEPTH, max_bytes: int = MAX_JSON_BYTES) -> dict[str, Any]:
    """A JSON object from ``path``, or a CheckpointError naming the file: not found, too large, nested deeper than
    ``max_depth``, not JSON (also integers of thousands of digits), or not an object."""
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path} is a folder, not a JSON file") from None
    if len(data) > max_bytes:
        raise CheckpointError(f"{path} is larger than {max_bytes >> 20} MiB; it is not a configuration file")
    depth = json_depth(data)
    if depth > max_depth:
        raise CheckpointError(f"{path} nests {depth} levels deep (at most {max_depth}); it is not a configuration file")
    try:
        obj = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path} is not UTF-8 text: {e}") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, or an integer longer than Python converts
        raise CheckpointError(f"{path} is not valid JSON: {first_line(e)}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got a {type(obj).__name__}")
    return obj


def json_depth(data: bytes) -> int:
    """The deepest nesting of ``[`` / ``{`` in JSON text, brackets inside strings not counted (no parsing)."""
    import numpy as np

    raw = np.frombuffer(data, dtype=np.uint8)
    if not raw.size:
        return 0
    quote, backslash = raw == ord('"'), raw == ord("\\")
    # a quote is escaped when an odd run of backslashes precedes it
    escaped = np.zeros(raw.size, dtype=bool)
    if backslash.any():
        run = np.zeros(raw.size, dtype=np.int64)
        idx = np.flatnonzero(backslash)
        # length of the backslash run ending at each position (vectorised run lengths)
        starts = np.ones(idx.size, dtype=bool)
        starts[1:] = idx[1:] != idx[:-1] + 1
        group = np.cumsum(starts) - 1
        first = idx[starts][group]
        run[idx] = idx - first + 1
        escaped[1:] = (run[:-1] % 2) == 1
    real_quote = quote & ~escaped
    inside = (np.cumsum(real_quote) - real_quote) % 2 == 1  # after an odd number of quotes: inside a string
    step = np.zeros(raw.size, dtype=np.int64)
    step[(raw == ord("[")) | (raw == ord("{"))] = 1
    step[(raw == ord("]")) | (raw == ord("}"))] = -1
    step[inside | real_quote] = 0
    return int(np.cumsum(step).max(initial=0))


