"""Image classification: cross-entropy with label smoothing and Mixup/CutMix; top-1/top-5/per-class eval."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data.transforms import AugmentConfig, build_mixup
from ..models import create_model


class ClassificationTask:
    name = "classify"
    primary_metric = "top1"

    def __init__(self, augment: AugmentConfig, num_classes: int) -> None:
        self.num_classes = num_classes
        self.label_smoothing = augment.label_smoothing
        self.mixup = build_mixup(augment, num_classes)

    def build_model(self, model_cfg: Any, train_set: Any) -> nn.Module:
        args = dict(model_cfg.args)
        args.setdefault("num_classes", len(train_set.classes))
        model = create_model(model_cfg.name, pretrained=model_cfg.pretrained, **args)
        cfg = dict(model.pretrained_cfg)
        cfg.update(mean=tuple(train_set.mean), std=tuple(train_set.std))
        if model.num_classes == len(train_set.classes):
            cfg["class_names"] = list(train_set.classes)
        model.pretrained_cfg = cfg
        return model

    def training_step(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor
                      ) -> tuple[torch.Tensor, dict[str, float]]:
        if self.mixup is not None:
            images, targets = self.mixup(images, labels)
            logits = model(images)
            loss = torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
            return loss, {"loss": loss.item() * len(labels), "count": len(labels)}
        logits = model(images)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
        correct = (logits.argmax(-1) == labels).sum().item()
        return loss, {"loss": loss.item() * len(labels), "correct": correct, "count": len(labels)}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                 reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> dict[str, Any]:
        n = self.num_classes
        confusion = torch.zeros(n, n, dtype=torch.long)
        top5 = torch.zeros((), dtype=torch.long)
        loss_sum = torch.zeros((), dtype=torch.float64)
        for images, labels in batches:
            logits = model(images).float()
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
            pred = logits.argmax(-1)
            confusion += torch.bincount(labels * n + pred, minlength=n * n).reshape(n, n)
            k = min(5, n)
            top5 += (logits.topk(k, dim=-1).indices == labels[:, None]).any(-1).sum()
        confusion, top5, loss_sum = reduce(confusion), reduce(top5), reduce(loss_sum)
        total = confusion.sum().item()
        per_class = (confusion.diag().double() / confusion.sum(1).clamp(min=1).double()).tolist()
        return {
            "top1": confusion.diag().sum().item() / max(1, total),
            "top5": top5.item() / max(1, total),
            "loss": loss_sum.item() / max(1, total),
            "per_class": per_class,
            "count": total,
            "confusion": confusion.tolist(),
        }

    def write_artifacts(self, metrics: dict[str, Any], folder: Path, class_names: list[str] | None) -> None:
        from ..viz.plots import plot_confusion

        plot_confusion(torch.tensor(metrics["confusion"]), class_names, folder / "confusion.png")


def format_eval_report(metrics: dict[str, Any], class_names: list[str] | None) -> str:
    """A readable top-1 / top-5 / per-class summary."""
    names = class_names or [str(i) for i in range(len(metrics["per_class"]))]
    width = max(len(n) for n in names)
    lines = [f"top-1 {100 * metrics['top1']:.2f}%   top-5 {100 * metrics['top5']:.2f}%   "
             f"loss {metrics['loss']:.4f}   ({metrics['count']} images)", "per-class accuracy:"]
    lines += [f"  {name:<{width}}  {100 * acc:6.2f}%" for name, acc in zip(names, metrics["per_class"])]
    return "\n".join(lines)


TASKS = {"classify": ClassificationTask}
