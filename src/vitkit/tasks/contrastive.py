"""Contrastive pretraining (SimCLR): two augmented views of each image, NT-Xent over the global batch.

Each image gives two views; their embeddings (the model's L2-normalised projections) should be closer to
each other than to the other ``2N - 2`` embeddings of the batch (InfoNCE with temperature ``T``; Chen et al.
2020, "NT-Xent"). Negatives come from **every process**: the embeddings are gathered with gradients
(``ctx.all_gather``) and each process averages the loss over its own anchors, so with DDP's gradient
averaging ``torchrun`` computes exactly the single-process loss of the global batch (tested).

The loop never sees a label (``train_dataset`` is an image-only view). Evaluation measures what the encoder
is for: k-NN and linear-probe top-1 of its frozen features on the labelled sets (:mod:`.probe`); ``knn_top1``
picks the best checkpoint. It also reports the contrastive loss and accuracy on the evaluation set, with
views drawn from a fixed seed (the same views at every evaluation, so the numbers compare checkpoints) and
negatives from the same evaluation batch of the same process: their level depends on ``eval_batch_size`` and
the process count, their trend does not.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data import images_only
from ..errors import ConfigError
from .base import (
    Batch,
    Task,
    TaskContext,
    batch_images,
    build_configured_model,
    register_task,
    replace_images,
)
from .probe import evaluate_probes


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float,
            all_gather: Callable[[torch.Tensor], torch.Tensor] = lambda t: t, rank: int = 0
            ) -> tuple[torch.Tensor, int]:
    """NT-Xent of the local pairs ``(z1[i], z2[i])`` against every embedding of every process.

    Returns the loss averaged over the ``2N`` local anchors and how many of them rank their positive first.
    ``all_gather`` concatenates the processes' ``[z1; z2]`` in rank order (with gradients), so anchor ``j`` of
    process ``rank`` sits in column ``rank * 2N + j``. Computed in float32 even under autocast: bf16 logits of
    unit vectors over a temperature of 0.1-0.2 lose the differences the loss is about.
    """
    n = z1.shape[0]
    with torch.autocast(z1.device.type, enabled=False):
        local = F.normalize(torch.cat([z1, z2]).float(), dim=-1)
        keys = all_gather(local)
        logits = local @ keys.T / temperature
        rows = torch.arange(2 * n, device=local.device)
        self_col = rank * 2 * n + rows
        pos_col = rank * 2 * n + (rows + n) % (2 * n)
        is_self = torch.zeros_like(logits, dtype=torch.bool)
        is_self[rows, self_col] = True
        logits = logits.masked_fill(is_self, float("-inf"))
        loss = F.cross_entropy(logits, pos_col)
        correct = int((logits.argmax(1) == pos_col).sum())
    return loss, correct


@dataclass
class ContrastiveArgs:
    """``task.args`` of the contrastive task."""

    temperature: float = 0.2  # NT-Xent temperature
    views: Any = field(default_factory=dict)  # vitkit.data.transforms.ViewConfig fields (a ViewConfig once parsed)
    knn_k: int = 20
    knn_temperature: float = 0.07
    probe_epochs: int = 100  # L-BFGS iterations of the linear probe; 0 = k-NN only
    probe_max_train: int | None = None  # fit the probes on a stratified subset this large (None: all)
    eval_seed: int = 0  # seed of the evaluation views (and of the probe subset)

    def __post_init__(self) -> None:
        from ..data.transforms import ViewConfig

        checks = {
            "temperature": self.temperature > 0,
            "knn_k": self.knn_k >= 1,
            "knn_temperature": self.knn_temperature > 0,
            "probe_epochs": self.probe_epochs >= 0,
            "probe_max_train": self.probe_max_train is None or self.probe_max_train >= 1,
        }
        for key, ok in checks.items():
            if not ok:
                raise ConfigError(f"task contrastive: task.args.{key}={getattr(self, key)!r} is out of range")
        if not isinstance(self.views, ViewConfig):
            try:
                self.views = ViewConfig.from_dict(self.views)
            except ConfigError as e:
                raise ConfigError(f"task contrastive, task.args: {e}") from None


@register_task
class ContrastiveTask(Task):
    name = "contrastive"
    primary_metric = "knn_top1"
    mode = "max"
    Args = ContrastiveArgs
    eval_needs_train_set = True  # the probes fit on the labelled training set (``vitkit eval`` loads it)

    def __init__(self, args: Any = None, ctx: TaskContext | None = None) -> None:
        super().__init__(args, ctx)
        from ..data.transforms import AugmentConfig

        if self.ctx.augment is not None and self.ctx.augment != AugmentConfig():
            raise ConfigError("the contrastive task draws its augmentation from task.args.views; the recipe's "
                              "augment section would be ignored, remove it")
        self.views: nn.Module | None = None

    # ------------------------------------------------------------------ data and model
    def train_dataset(self, dataset: Any) -> Any:
        return images_only(dataset)

    def build_model(self, model_cfg: Any) -> nn.Module:
        model = build_configured_model(model_cfg)
        if not callable(getattr(model, "encode", None)):
            raise ConfigError(f"task contrastive needs a model with an encoder and a projector (e.g. "
                              f"simclr_vit_fmnist_tiny); {model_cfg.name!r} is a {type(model).__name__}")
        train_set = self.ctx.train_set
        if train_set is not None:
            model.pretrained_cfg = {**model.pretrained_cfg, "mean": tuple(train_set.mean),
                                    "std": tuple(train_set.std)}
        return model

    def setup(self, model: nn.Module) -> None:
        """The evaluation transform (scale + normalise) and the two-view training augmentation."""
        from ..data.transforms import build_contrastive_views, build_transforms

        cfg = model.pretrained_cfg
        size = tuple(cfg["input_size"])[1:]
        self.train_transform = None
        self.eval_transform = build_transforms(None, False, cfg["mean"], cfg["std"], size).to(self.ctx.device)
        self.views = build_contrastive_views(self.args.views, cfg["mean"], cfg["std"], size).to(self.ctx.device)

    def prepare_batch(self, batch: Batch, train: bool) -> Batch:
        """Training: uint8 images -> ``(view1, view2)``; evaluation: normalised images with their labels."""
        if train:
            return self.views(batch_images(batch))
        return replace_images(batch, self.eval_transform(batch_images(batch)))

    # ------------------------------------------------------------------ training
    def training_step(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """NT-Xent of both views against the global batch; ``acc`` = share of anchors whose positive ranks
        first among the ``2N - 1`` other embeddings."""
        view1, view2 = batch
        n = view1.shape[0]
        z = model(torch.cat([view1, view2]))
        loss, correct = nt_xent(z[:n], z[n:], self.args.temperature, self.ctx.all_gather, self.ctx.rank)
        return loss, {"loss": loss.item() * n, "acc": correct / 2, "count": n}

    # ------------------------------------------------------------------ evaluation
    def _fork_rng(self):
        device = self.ctx.device
        if device.type == "cuda":
            return torch.random.fork_rng(devices=[device.index or torch.cuda.current_device()])
        return torch.random.fork_rng(devices=[])

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[Batch]) -> dict[str, Any]:
        """k-NN / linear-probe top-1 of the frozen encoder, and the contrastive loss on seeded eval views."""
        a = self.args
        metrics: dict[str, Any] = evaluate_probes(model, self.ctx, lambda b: self.prepare_batch(b, train=False),
                                                  a.knn_k, a.knn_temperature, a.probe_epochs, a.probe_max_train,
                                                  seed=a.eval_seed)
        norm = self.eval_transform.normalize
        sums = torch.zeros(3, dtype=torch.float64)  # loss sum, correct anchors, images
        with self._fork_rng():  # fixed views, and the training RNG stream stays untouched
            torch.manual_seed(a.eval_seed + 1 + self.ctx.rank)
            for batch in batches:
                images = (batch_images(batch) * norm.std + norm.mean).clamp_(0, 1)  # back to [0, 1]
                n = images.shape[0]
                if n < 2:
                    continue  # a lone image has no negatives
                with torch.autocast(images.device.type, enabled=False):  # the views as in training: fp32
                    view1, view2 = self.views(images)
                z = model(torch.cat([view1, view2]))
                loss, correct = nt_xent(z[:n], z[n:], a.temperature)
                sums += torch.tensor([loss.item() * n, correct / 2, n], dtype=torch.float64)
        loss_sum, correct, count = self.ctx.all_reduce_sum(sums.to(self.ctx.device)).cpu().tolist()
        metrics.update(loss=loss_sum / max(1.0, count), acc=correct / max(1.0, count), count=int(count))
        return metrics

    def format_report(self, metrics: dict[str, Any]) -> str:
        lines = [f"k-NN top-1 {100 * metrics['knn_top1']:.2f}% (k={self.args.knn_k})"]
        if "linear_top1" in metrics:
            lines.append(f"linear probe top-1 {100 * metrics['linear_top1']:.2f}% "
                         f"(train {100 * metrics['linear_train_top1']:.2f}%)")
        lines.append(f"contrastive loss {metrics['loss']:.4f}, positive ranked first {100 * metrics['acc']:.2f}% "
                     f"({metrics['count']} images)")
        return "\n".join(lines)
