"""Objectives the engine can train. A task builds its model, turns a batch into a loss and statistics,
evaluates, declares its primary metric and direction, and draws its own pictures (see :mod:`.base`).

Importing a task module registers it; ``build_task(name, args, ctx)`` makes one from a recipe's
``task: {name: ..., args: {...}}``.
"""

from . import ar, classify, clip, contrastive, mae, multilabel, var, vilt, vq  # noqa: F401  (importing a task module registers it)
from .base import (
    TASKS,
    NoArgs,
    StepLoop,
    Task,
    TaskContext,
    batch_images,
    build_task,
    parse_task_args,
    register_task,
    replace_images,
    scalar_metrics,
    to_device,
)
from .classify import ClassificationTask
from .generative import SEED_LIMIT, check_sampling_values, class_index, save_image_grid, to_unit

DEFAULT_TASK = ClassificationTask.name  # a recipe without a task, or a checkpoint that records none, classifies

__all__ = [
    "TASKS", "NoArgs", "StepLoop", "Task", "TaskContext", "batch_images", "build_task", "parse_task_args",
    "register_task", "replace_images", "scalar_metrics", "to_device", "ClassificationTask", "DEFAULT_TASK",
    "class_index", "save_image_grid", "to_unit", "SEED_LIMIT", "check_sampling_values",
]
