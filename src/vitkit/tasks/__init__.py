"""Objectives the engine can train: a task builds its model, turns a batch into a loss and evaluates."""

from .base import Task
from .classify import TASKS, ClassificationTask, format_eval_report

__all__ = ["Task", "TASKS", "ClassificationTask", "format_eval_report"]
