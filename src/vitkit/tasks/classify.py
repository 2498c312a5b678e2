"""Image classification: cross-entropy with label smoothing and Mixup/CutMix; top-1/top-5/per-class eval."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, DataError
from .base import Batch, Task, TaskContext, build_configured_model, register_task


def _images_labels(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, dict):
        return batch["images"], batch["labels"]
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise DataError("the classify task needs labelled batches (images, labels); this dataset yields "
                    f"{type(batch).__name__}")


def _placeholder_names(names: list[str]) -> bool:
    """Names that say nothing about the classes (HF's LABEL_0, plain indices): no reason to compare them."""
    return all(n in (f"LABEL_{i}", str(i), f"class_{i}") for i, n in enumerate(names))


@register_task
class ClassificationTask(Task):
    capabilities = frozenset({"logits"})
    name = "classify"
    primary_metric = "top1"
    mode = "max"

    def __init__(self, args: Any = None, ctx: TaskContext | None = None) -> None:
        super().__init__(args, ctx)
        from ..data.transforms import build_mixup

        self.label_smoothing = self.ctx.augment.label_smoothing if self.ctx.augment is not None else 0.0
        self.num_classes = len(self.ctx.train_set.classes) if self.ctx.train_set is not None else None
        self.mixup = (build_mixup(self.ctx.augment, self.num_classes)
                      if self.ctx.augment is not None and self.num_classes else None)

    def build_model(self, model_cfg: Any) -> nn.Module:
        train_set = self.ctx.train_set
        model = build_configured_model(model_cfg, num_classes=len(train_set.classes))
        classes = len(train_set.classes)
        if getattr(model, "num_classes", classes) != classes:
            raise ConfigError(f"model.args.num_classes={model.num_classes} but the training data has {classes} "
                              f"classes; drop num_classes to take it from the data")
        cfg = dict(model.pretrained_cfg)
        cfg.update(mean=tuple(train_set.mean), std=tuple(train_set.std))
        if model.num_classes == len(train_set.classes):
            cfg["class_names"] = list(train_set.classes)
        model.pretrained_cfg = cfg
        return model

    def check_eval_data(self, model: nn.Module, dataset: Any, where: str, ignore_class_names: bool = False) -> None:
        """The model must predict the set's classes: a digits model scored on Fashion-MNIST would count "0" as
        "T-shirt/top". ``ignore_class_names`` scores a model with other names by class index anyway."""
        classes = [str(c) for c in getattr(dataset, "classes", None) or []]
        if not classes:
            raise DataError(f"{where} has no class labels; the {self.name} task scores labelled data")
        num_classes = getattr(model, "num_classes", None)
        if num_classes != len(classes):
            raise DataError(f"the model predicts {num_classes} classes, {where} has {len(classes)}")
        names = [str(n) for n in model.pretrained_cfg.get("class_names") or []]
        if names and not ignore_class_names and not _placeholder_names(names) and names != classes:
            diff = [f"{i}: {a!r} vs {b!r}" for i, (a, b) in enumerate(zip(names, classes)) if a != b]
            raise DataError(f"the model was trained on other classes than {where} ({len(diff)} of {len(names)} "
                            f"names differ, e.g. {'; '.join(diff[:3])}); pass --ignore-class-names to score it by "
                            f"class index anyway")
        if not names:
            model.pretrained_cfg = {**model.pretrained_cfg, "class_names": classes}

    def training_step(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        images, labels = _images_labels(batch)
        n = len(labels)
        if self.mixup is not None:
            images, targets = self.mixup(images, labels)
            logits = model(images)
            loss = torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
            return loss, {"loss": loss.item() * n, "count": n}
        logits = model(images)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
        correct = (logits.argmax(-1) == labels).sum().item()
        return loss, {"loss": loss.item() * n, "acc": correct, "count": n}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[Batch]) -> dict[str, Any]:
        n = getattr(model, "num_classes", None) or self.num_classes
        confusion = torch.zeros(n, n, dtype=torch.long)
        top5 = torch.zeros((), dtype=torch.long)
        loss_sum = torch.zeros((), dtype=torch.float64)
        for batch in batches:
            images, labels = _images_labels(batch)
            logits = model(images).float()
            if logits.shape[-1] != n:
                raise DataError(f"the model predicts {logits.shape[-1]} classes, expected {n}")
            if len(labels) and int(labels.max()) >= n:
                raise DataError(f"label {int(labels.max())} is out of range for a {n}-class model")
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").double().cpu()
            pred = logits.argmax(-1)
            confusion += torch.bincount((labels * n + pred).cpu(), minlength=n * n).reshape(n, n)
            k = min(5, n)
            top5 += (logits.topk(k, dim=-1).indices == labels[:, None]).any(-1).sum().cpu()
        reduce = self.ctx.all_reduce_sum
        confusion, top5, loss_sum = reduce(confusion), reduce(top5), reduce(loss_sum)
        total = confusion.sum().item()
        per_class = (confusion.diag().double() / confusion.sum(1).clamp(min=1).double()).tolist()
        names = getattr(model, "pretrained_cfg", {}).get("class_names")
        return {
            "top1": confusion.diag().sum().item() / max(1, total),
            "top5": top5.item() / max(1, total),
            "loss": loss_sum.item() / max(1, total),
            "count": total,
            "per_class": per_class,
            "confusion": confusion.tolist(),
            "class_names": names if names and len(names) == n else [str(i) for i in range(n)],
        }

    def write_artifacts(self, model: nn.Module, metrics: dict[str, Any], folder: Path) -> list[str]:
        from ..viz.plots import plot_confusion

        plot_confusion(torch.tensor(metrics["confusion"]), metrics["class_names"], Path(folder) / "confusion.png")
        return ["confusion.png"]

    def summary_fields(self, metrics: dict[str, Any]) -> dict[str, Any]:
        return {"per_class_top1": dict(zip(metrics["class_names"], metrics["per_class"]))}

    def format_report(self, metrics: dict[str, Any]) -> str:
        """A readable top-1 / top-5 / per-class summary."""
        names = metrics["class_names"]
        width = max(len(n) for n in names)
        lines = [f"top-1 {100 * metrics['top1']:.2f}%   top-5 {100 * metrics['top5']:.2f}%   "
                 f"loss {metrics['loss']:.4f}   ({metrics['count']} images)", "per-class accuracy:"]
        lines += [f"  {name:<{width}}  {100 * acc:6.2f}%" for name, acc in zip(names, metrics["per_class"])]
        return "\n".join(lines)

    @torch.no_grad()
    def predict(self, model: nn.Module, images: torch.Tensor, topk: int = 5, **kw: Any) -> list[dict[str, Any]]:
        """Top-k classes with probabilities per image."""
        probs = model(images).float().softmax(-1)
        names = model.pretrained_cfg.get("class_names") or [str(i) for i in range(probs.shape[-1])]
        top = probs.topk(min(topk, probs.shape[-1]), dim=-1)
        return [{"top": [(names[i], float(v)) for v, i in zip(vals.tolist(), idx.tolist())]}
                for vals, idx in zip(top.values, top.indices)]
