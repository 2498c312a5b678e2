"""``model.args`` checked before anything is built: accepted names, types and ranges (:mod:`vitkit.schema`),
then a build on the meta device and the weights against the machine's memory. A failure of any step is one
ConfigError line, never a skipped check."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from ..errors import ConfigError
from ..schema import MODEL_ARG_RANGES, argument_problems, first_line, memory_problem, type_hints


def check_fits_memory(model: Any, what: str, error: type[Exception] = ConfigError) -> None:
    """Refuse ``model`` (built on the meta device) when its weights need more than half of the machine's memory."""
    from ._registry import weight_bytes

    problem = memory_problem(weight_bytes(model))
    if problem:
        raise error(f"{what}: {problem}")


def class_argument_problems(cls_or_fn: Any, values: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Type and range problems of constructor arguments ``values`` for a class (its ``__init__``) or function."""
    target = cls_or_fn.__init__ if isinstance(cls_or_fn, type) else cls_or_fn
    return argument_problems(type_hints(target), values, MODEL_ARG_RANGES, prefix)


def model_argument_problems(name: str, args: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Type and range problems of ``create_model(name, **args)``; a wrapper's ``encoder_args`` are checked against
    its encoder (``encoder_args.depth=0.5 (must be ...)``)."""
    from ._registry import model_argument_names, model_defaults, registered_class

    cls = registered_class(name)
    if cls is None:  # a function entry point: its own checks
        return []
    problems = class_argument_problems(cls, args, prefix)
    if problems or not isinstance(args.get("encoder_args"), Mapping):
        return problems
    encoder = args.get("encoder", model_defaults(name).get("encoder"))
    if isinstance(encoder, str) and encoder in _registered():
        accepted = model_argument_names(encoder)
        unknown = sorted(set(args["encoder_args"]) - accepted) if accepted is not None else []
        if unknown:
            return [f"{prefix}encoder_args: {encoder} does not take {', '.join(unknown)}"]
        return model_argument_problems(encoder, args["encoder_args"], f"{prefix}encoder_args.")
    return problems


def _registered() -> set[str]:
    from ._registry import list_models

    return set(list_models())


_CHECKED: dict[str, None] = {}  # model arguments already built on meta (load_config runs for every command)


def check_model_arguments(name: str, args: Mapping[str, Any], where: str = "model.args") -> None:
    """``create_model(name, **args)`` would build, and fit this machine: the arguments it takes, their types (from
    the constructor's annotations) and ranges (:data:`MODEL_ARG_RANGES`), then a build on the meta device (every
    check of the constructor, no memory) and its weights against half of the machine's memory.

    A failure of any step is one ConfigError line, never a skipped check.
    """
    import torch

    from ._registry import create_model, model_argument_names

    args = dict(args)
    accepted = model_argument_names(name)
    unknown = sorted(set(args) - accepted) if accepted is not None else []
    if unknown:
        raise ConfigError(f"{where}: {name} does not take {', '.join(unknown)}; it takes {', '.join(sorted(accepted))}")
    problems = model_argument_problems(name, args)
    if problems:
        raise ConfigError(f"{where}: {name}: " + "; ".join(problems))
    try:
        key = json.dumps([name, args], sort_keys=True)
    except (TypeError, ValueError):
        key = None
    if key is not None and key in _CHECKED:
        return
    try:
        with torch.device("meta"):  # create_model builds every registered family on meta (models._registry)
            model = create_model(name, **args)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    except Exception as e:  # noqa: BLE001 - whatever the constructor raises, the arguments cannot build the model
        raise ConfigError(f"{where}: {name} cannot be built with these arguments: {first_line(e)}") from None
    check_fits_memory(model, f"{where}: {name} with these arguments")
    if key is not None:
        if len(_CHECKED) > 256:
            _CHECKED.clear()
        _CHECKED[key] = None


