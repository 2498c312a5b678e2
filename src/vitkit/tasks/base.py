"""The contract between the training engine and an objective.

The engine owns the loop (data order, optimisation, checkpoints, logging, processes); a task owns what is
specific to an objective: which model it builds, how a batch becomes a loss, and how to evaluate. New
objectives (MAE, contrastive, CLIP, generation) plug in by implementing this protocol.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn


class Task(Protocol):
    name: str
    # the evaluation metric that selects the "best" checkpoint (higher is better)
    primary_metric: str

    def build_model(self, model_cfg: Any, train_set: Any) -> nn.Module: ...

    def training_step(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor
                      ) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss to back-propagate and batch statistics (sums, see ``stat_counts``)."""
        ...

    def evaluate(self, model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                 reduce: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, Any]:
        """Metrics over the evaluation set; ``reduce`` sums a tensor over processes."""
        ...

    def write_artifacts(self, metrics: dict[str, Any], folder: Path, class_names: list[str] | None) -> None: ...
