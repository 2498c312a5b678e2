"""Multi-label classification: which of K classes are present (scenes of several items).

Loss: binary cross-entropy on each class's logit. Metrics: mAP (mean over classes of the average precision of
that class's ranking of the evaluation images, the primary metric), exact match (every class decided right at
probability 0.5), micro-F1 at 0.5, and the loss. The model is any classifier: K logits, one per class.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, DataError
from .base import Batch, NoArgs, TaskContext, register_task
from .classify import ClassificationTask, _images_labels


def average_precision(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-class average precision (N, K) -> (K,), NaN for a class without positives.

    AP = mean over the positives of the precision at their rank (no interpolation, as scikit-learn's
    ``average_precision_score``); tied scores are ranked by index, which matters only for exact ties.
    """
    order = scores.argsort(dim=0, descending=True, stable=True)
    hits = targets.gather(0, order).double()
    ranks = torch.arange(1, hits.shape[0] + 1, dtype=torch.float64)[:, None]
    precision = hits.cumsum(0) / ranks
    positives = hits.sum(0)
    return torch.where(positives > 0, (precision * hits).sum(0) / positives.clamp(min=1), torch.nan)


@register_task
class MultiLabelTask(ClassificationTask):
    name = "multilabel"
    primary_metric = "mAP"
    mode = "max"
    Args = NoArgs  # classify's distillation settings do not apply

    def __init__(self, args: Any = None, ctx: TaskContext | None = None) -> None:
        super().__init__(args, ctx)
        if self.mixup is not None:
            raise ConfigError("the multilabel task does not take mixup/cutmix (augment.mixup_alpha, cutmix_alpha): "
                              "mixing two scenes' multi-hot targets has no meaning for presence")
        if self.label_smoothing:
            raise ConfigError("the multilabel task does not take augment.label_smoothing; set it to 0")

    @staticmethod
    def _targets(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        images, targets = _images_labels(batch)
        if targets.ndim != 2:
            raise DataError("the multilabel task needs multi-hot (B, K) targets, e.g. data.name=fmnist_scenes; "
                            f"this dataset gives {tuple(targets.shape)} labels")
        return images, targets.float()

    def training_step(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        images, targets = self._targets(batch)
        logits = model(images).float()
        loss = F.binary_cross_entropy_with_logits(logits, targets)
        exact = ((logits > 0) == (targets > 0.5)).all(-1).sum().item()
        n = len(targets)
        return loss, {"loss": loss.item() * n, "exact": exact, "count": n}

    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        """All processes' rows (sharded evaluation gives unequal counts: pad, gather, drop the padding)."""
        if self.ctx.world_size == 1:
            return t
        sizes = torch.zeros(self.ctx.world_size, dtype=torch.long, device=t.device)
        sizes[self.ctx.rank] = t.shape[0]
        sizes = self.ctx.all_reduce_sum(sizes)
        padded = torch.zeros(int(sizes.max()), *t.shape[1:], dtype=t.dtype, device=t.device)
        padded[:t.shape[0]] = t
        rows = self.ctx.all_gather(padded).reshape(self.ctx.world_size, -1, *t.shape[1:])
        return torch.cat([rows[r, :int(n)] for r, n in enumerate(sizes.tolist())])

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[Batch]) -> dict[str, Any]:
        scores, targets = [], []
        for batch in batches:
            images, t = self._targets(batch)
            scores.append(model(images).float().cpu())
            targets.append(t.cpu())
        if not scores:
            raise DataError("the evaluation set is empty")
        logits, t = self._gather(torch.cat(scores)), self._gather(torch.cat(targets))
        ap = average_precision(logits, t)
        pred = logits > 0
        truth = t > 0.5
        tp = (pred & truth).sum().item()
        f1 = 2 * tp / max(1, pred.sum().item() + truth.sum().item())
        names = getattr(model, "pretrained_cfg", {}).get("class_names") or [str(i) for i in range(t.shape[1])]
        return {
            "mAP": float(ap.nanmean()),
            "exact_match": (pred == truth).all(-1).double().mean().item(),
            "f1": f1,
            "loss": F.binary_cross_entropy_with_logits(logits, t).item(),
            "count": len(t),
            "per_class_ap": [None if v != v else float(v) for v in ap.tolist()],
            "class_names": list(names),
        }

    def write_artifacts(self, model: nn.Module, metrics: dict[str, Any], folder) -> list[str]:
        return []

    def summary_fields(self, metrics: dict[str, Any]) -> dict[str, Any]:
        return {"per_class_ap": dict(zip(metrics["class_names"], metrics["per_class_ap"]))}

    def format_report(self, metrics: dict[str, Any]) -> str:
        names = metrics["class_names"]
        width = max(len(n) for n in names)
        lines = [f"mAP {100 * metrics['mAP']:.2f}%   exact match {100 * metrics['exact_match']:.2f}%   "
                 f"micro-F1 {100 * metrics['f1']:.2f}%   loss {metrics['loss']:.4f}   ({metrics['count']} images)",
                 "per-class AP:"]
        lines += [f"  {n:<{width}}  " + ("   n/a" if ap is None else f"{100 * ap:6.2f}%")
                  for n, ap in zip(names, metrics["per_class_ap"])]
        return "\n".join(lines)

    @torch.no_grad()
    def predict(self, model: nn.Module, images: torch.Tensor, topk: int = 5, **kw: Any) -> list[dict[str, Any]]:
        """Per image: every class with its presence probability (sigmoid), highest first, and those >= 0.5."""
        probs = model(images).float().sigmoid()
        names = model.pretrained_cfg.get("class_names") or [str(i) for i in range(probs.shape[-1])]
        top = probs.topk(min(topk, probs.shape[-1]), dim=-1)
        return [{"top": [(names[i], float(v)) for v, i in zip(vals.tolist(), idx.tolist())],
                 "present": [names[i] for i in (p >= 0.5).nonzero().flatten().tolist()]}
                for vals, idx, p in zip(top.values, top.indices, probs)]
