"""Image classification: cross-entropy with label smoothing and Mixup/CutMix; top-1/top-5/per-class eval.

With ``task.args.distill_teacher`` a distilled ViT (``deit_fmnist_tiny_distilled``) learns from a frozen trained
classifier as well as from the labels, as in DeiT (Touvron et al., 2021): its class head from the labels, its
distillation head from the teacher's predictions on the same (augmented, mixed) batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

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


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str, tau: float
                      ) -> torch.Tensor:
    """DeiT's distillation term (its ``losses.py``). ``hard``: cross-entropy against the teacher's top class;
    ``soft``: KL(teacher || student) of the temperature-``tau`` softmaxes times tau², summed and divided by batch x
    classes as DeiT does (so it is the per-sample KL over the number of classes)."""
    student_logits, teacher_logits = student_logits.float(), teacher_logits.float()
    if kind == "hard":
        return F.cross_entropy(student_logits, teacher_logits.argmax(-1))
    kl = F.kl_div(F.log_softmax(student_logits / tau, dim=-1), F.log_softmax(teacher_logits / tau, dim=-1),
                  reduction="sum", log_target=True)
    return kl * tau * tau / student_logits.numel()


def _same_numbers(a: Any, b: Any) -> bool:
    """Two normalisation statistics (tuples from a constructor or lists from config.json) are the same."""
    try:
        return len(a) == len(b) and all(math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-8) for x, y in zip(a, b))
    except TypeError:
        return False


@dataclass
class ClassifyArgs:
    """DeiT distillation from a trained classifier (off without ``distill_teacher``)."""

    distill_teacher: str | None = None  # run or checkpoint folder of a vitkit classifier trained on the same data
    distill_type: Literal["hard", "soft"] = "hard"  # hard: the teacher's top class (DeiT's best); soft: its softmax
    distill_alpha: float = 0.5  # the distillation head's share of the loss; the class head gets 1 - alpha
    distill_tau: float = 1.0  # the soft targets' temperature

    def __post_init__(self) -> None:
        if not 0 <= self.distill_alpha <= 1:
            raise ValueError(f"task.args.distill_alpha={self.distill_alpha} must be in [0, 1]")
        if not self.distill_tau > 0:
            raise ValueError(f"task.args.distill_tau={self.distill_tau} must be > 0")


@register_task
class ClassificationTask(Task):
    capabilities = frozenset({"logits"})
    name = "classify"
    primary_metric = "top1"
    mode = "max"
    Args = ClassifyArgs

    def __init__(self, args: Any = None, ctx: TaskContext | None = None) -> None:
        super().__init__(args, ctx)
        from ..data.transforms import build_mixup

        self.label_smoothing = self.ctx.augment.label_smoothing if self.ctx.augment is not None else 0.0
        self.num_classes = len(self.ctx.train_set.classes) if self.ctx.train_set is not None else None
        self.mixup = (build_mixup(self.ctx.augment, self.num_classes)
                      if self.ctx.augment is not None and self.num_classes else None)
        self.teacher: nn.Module | None = None  # the frozen distillation teacher; loaded for training runs only

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
        if getattr(self.args, "distill_teacher", None):  # build_model runs for training only: eval needs no teacher
            self.teacher = self._load_teacher(model)
        return model

    def _load_teacher(self, student: nn.Module) -> nn.Module:
        """The frozen teacher of ``distill_teacher``; one ConfigError line for a teacher whose predictions the
        student cannot learn from (other classes, input size or normalisation) or a student with one head."""
        spec = self.args.distill_teacher
        where = f"task.args.distill_teacher={spec!r}"
        if not callable(getattr(student, "set_distilled_training", None)):
            raise ConfigError(f"{where} needs a student with a distillation token and head (e.g. model.name="
                              f"deit_fmnist_tiny_distilled); {type(student).__name__} has none")
        if not str(spec).startswith("hf-hub:") and not Path(spec).exists():
            raise ConfigError(f"{where}: no such run or checkpoint folder; train the teacher first (e.g. vitkit "
                              f"train --config configs/fmnist/resnet_tiny.yaml)")
        from ..convert.auto import load_checkpoint

        teacher = load_checkpoint(spec)
        t_cfg, s_cfg = teacher.pretrained_cfg, student.pretrained_cfg
        if getattr(teacher, "num_classes", None) != student.num_classes:
            raise ConfigError(f"{where} predicts {getattr(teacher, 'num_classes', None)} classes, the student "
                              f"{student.num_classes}")
        t_size, s_size = t_cfg.get("input_size"), s_cfg.get("input_size")
        if t_size is None or tuple(t_size) != tuple(s_size):
            raise ConfigError(f"{where} takes inputs of size {t_size and tuple(t_size)}, the student {tuple(s_size)}")
        if not (_same_numbers(t_cfg.get("mean"), s_cfg["mean"]) and _same_numbers(t_cfg.get("std"), s_cfg["std"])):
            raise ConfigError(f"{where} normalises with mean {t_cfg.get('mean')} std {t_cfg.get('std')}, the "
                              f"student with mean {list(s_cfg['mean'])} std {list(s_cfg['std'])}: train both on the "
                              f"same data")
        t_names, s_names = t_cfg.get("class_names"), s_cfg.get("class_names")
        if t_names and s_names and list(t_names) != list(s_names):
            raise ConfigError(f"{where} was trained on other classes ({list(t_names)[:3]}...) than the student "
                              f"({list(s_names)[:3]}...)")
        return teacher.eval().requires_grad_(False)

    def setup(self, model: nn.Module) -> None:
        """The batch transforms; with a teacher, also the teacher on the student's device and dtype, and the
        student answering with both heads' logits while it trains."""
        super().setup(model)
        if self.teacher is not None:
            weight = next(model.parameters())
            self.teacher.to(device=weight.device, dtype=weight.dtype)
            model.set_distilled_training(True)

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
        targets = None  # Mixup/CutMix's soft targets
        if self.mixup is not None:
            images, targets = self.mixup(images, labels)
        logits = model(images)
        if self.teacher is not None:
            return self._distillation_step(logits, images, labels, targets)
        loss = self._label_loss(logits, labels, targets)
        n = len(labels)
        if targets is not None:
            return loss, {"loss": loss.item() * n, "count": n}
        correct = (logits.argmax(-1) == labels).sum().item()
        return loss, {"loss": loss.item() * n, "acc": correct, "count": n}

    def _label_loss(self, logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
        """Cross-entropy against Mixup/CutMix's soft targets, else against the labels with label smoothing."""
        if targets is not None:
            return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
        return F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)

    def _distillation_step(self, logits: Any, images: torch.Tensor, labels: torch.Tensor,
                           targets: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, float]]:
        """DeiT's loss: (1 - alpha) x the class head's label loss + alpha x the distillation head's loss against
        the teacher's predictions on the same batch. Logs both parts and the teacher's top-1 on the batch (against
        the larger share of each mixed label under Mixup/CutMix)."""
        if not (isinstance(logits, tuple) and len(logits) == 2):
            raise ConfigError("distillation needs the student's (class, distillation) logits while training; "
                              "the task's setup(model) switches them on (model.set_distilled_training)")
        cls_logits, dist_logits = logits
        with torch.no_grad():
            teacher_logits = self.teacher(images).float()
        label_loss = self._label_loss(cls_logits, labels, targets)
        dist_loss = distillation_loss(dist_logits, teacher_logits, self.args.distill_type, self.args.distill_tau)
        alpha = self.args.distill_alpha
        loss = (1 - alpha) * label_loss + alpha * dist_loss
        truth = labels if targets is None else targets.argmax(-1)
        n = len(labels)
        stats = {"loss": loss.item() * n, "loss_cls": label_loss.item() * n, "loss_distill": dist_loss.item() * n,
                 "teacher_acc": (teacher_logits.argmax(-1) == truth).sum().item(), "count": n}
        if targets is None:  # the prediction evaluation makes: the mean of both heads
            stats["acc"] = ((cls_logits + dist_logits).argmax(-1) == labels).sum().item()
        return loss, stats

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
