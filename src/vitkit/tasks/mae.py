"""Masked-autoencoder pretraining (He et al., 2022): reconstruct the pixels of the masked patches.

The loop trains on images only (an image-only view of the dataset: labels never reach the loss). Evaluation
reports the reconstruction loss on the evaluation images under a fixed mask (so epochs are comparable) and,
when the source dataset has labels, k-NN and linear-probe top-1 of the frozen encoder (:mod:`.probe`). The
primary metric is the evaluation loss (lower is better). Each evaluation draws a grid of original / masked /
reconstructed images (``mae_reconstruction.png``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.base import ImagesOnly, images_only
from ..errors import ConfigError
from .base import Batch, Task, batch_images, build_configured_model, register_task


@dataclass
class MAEArgs:
    probes: bool = True  # k-NN and linear probe on frozen encoder features, when the dataset has labels
    knn_k: int = 20
    knn_temperature: float = 0.07
    probe_epochs: int = 100
    probe_max_train: int | None = None  # a stratified subset of the training set for the probes (time bound)
    eval_seed: int = 0  # the evaluation masks come from this seed: every evaluation masks the same patches
    grid_images: int = 8

    def __post_init__(self) -> None:
        if self.knn_k < 1 or self.knn_temperature <= 0 or self.probe_epochs < 0 or self.grid_images < 0:
            raise ValueError("knn_k >= 1, knn_temperature > 0, probe_epochs >= 0 and grid_images >= 0 are required")


def _eval_noise(batch_size: int, num_patches: int, generator: torch.Generator, device: torch.device
                ) -> torch.Tensor:
    return torch.rand(batch_size, num_patches, generator=generator).to(device)


@register_task
class MAETask(Task):
    name = "mae"
    primary_metric = "loss"
    mode = "min"
    Args = MAEArgs
    eval_needs_train_set = True  # `vitkit eval` builds the training split for the probes

    def train_dataset(self, dataset: Any) -> Any:
        return images_only(dataset)

    def build_model(self, model_cfg: Any) -> nn.Module:
        model = build_configured_model(model_cfg)
        if not hasattr(model, "patchify"):
            raise ConfigError(f"task mae needs a masked-autoencoder model (e.g. mae_vit_fmnist_tiny), got "
                              f"{model_cfg.name!r}")
        source = self.ctx.train_set
        if source is not None:
            cfg = dict(model.pretrained_cfg)
            cfg.update(mean=tuple(source.mean), std=tuple(source.std))
            if getattr(source, "classes", None):
                cfg["source_classes"] = list(source.classes)
            model.pretrained_cfg = cfg
        return model

    def training_step(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        images = batch_images(batch)
        out = model(images)
        n = images.shape[0]
        masked = out.mask.sum().item()
        return out.loss, {"loss": out.loss.item() * n, "count": n, "mask_ratio": masked / out.mask.shape[1]}

    def _num_patches(self, model: nn.Module, images: torch.Tensor) -> int:
        return int(model.patchify(images[:1]).shape[1])

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[Batch]) -> dict[str, Any]:
        generator = torch.Generator().manual_seed(self.args.eval_seed + self.ctx.rank)
        loss_sum = torch.zeros((), dtype=torch.float64)
        count = torch.zeros((), dtype=torch.float64)
        grid = None
        for batch in batches:
            images = batch_images(batch)
            noise = _eval_noise(images.shape[0], self._num_patches(model, images), generator, images.device)
            out = model(images, noise=noise)
            loss_sum += out.loss.double().cpu() * images.shape[0]
            count += images.shape[0]
            if grid is None and self.args.grid_images:
                k = self.args.grid_images
                grid = {"images": images[:k].float().cpu(), "pred": out.pred[:k].float().cpu(),
                        "mask": out.mask[:k].float().cpu()}
        loss_sum, count = self.ctx.all_reduce_sum(loss_sum), self.ctx.all_reduce_sum(count)
        metrics: dict[str, Any] = {"loss": loss_sum.item() / max(1.0, count.item()), "count": int(count.item())}
        if self.args.probes and _has_labels(self.ctx.train_set) and _has_labels(self.ctx.eval_set):
            from .probe import evaluate_probes

            metrics.update(evaluate_probes(model, self.ctx, lambda b: self.prepare_batch(b, train=False),
                                           k=self.args.knn_k, temperature=self.args.knn_temperature,
                                           probe_epochs=self.args.probe_epochs, max_train=self.args.probe_max_train))
        if grid is not None:
            metrics["_grid"] = grid
        return metrics

    def write_artifacts(self, model: nn.Module, metrics: dict[str, Any], folder: Path) -> list[str]:
        grid = metrics.get("_grid")
        if grid is None:
            return []
        from ..viz.plots import plot_image_rows

        images, pred, mask = (grid[k].to(_device_of(model)) for k in ("images", "pred", "mask"))
        with torch.no_grad():
            recon = model.reconstruct(images, pred, mask).float().cpu()
            masked = model.unpatchify(model.patchify(images) * (1 - mask.unsqueeze(-1))).float().cpu()
        cfg = model.pretrained_cfg
        plot_image_rows({"original": images.cpu(), "masked": masked, "reconstruction": recon}, cfg["mean"], cfg["std"],
                        Path(folder) / "mae_reconstruction.png",
                        title=f"MAE, mask ratio {getattr(model, 'mask_ratio', '?')}, eval loss {metrics['loss']:.4f}")
        return ["mae_reconstruction.png"]

    def format_report(self, metrics: dict[str, Any]) -> str:
        parts = [f"reconstruction loss {metrics['loss']:.4f} (masked patches, fixed eval masks; {metrics['count']} "
                 f"images)"]
        if "knn_top1" in metrics:
            parts.append(f"frozen encoder: k-NN top-1 {100 * metrics['knn_top1']:.2f}%   linear probe top-1 "
                         f"{100 * metrics['linear_top1']:.2f}%")
        return "\n".join(parts)

    @torch.no_grad()
    def predict(self, model: nn.Module, images: torch.Tensor, **kw: Any) -> list[dict[str, Any]]:
        """Per image: the reconstruction error of its masked patches under a seeded mask."""
        generator = torch.Generator().manual_seed(self.args.eval_seed)
        noise = _eval_noise(images.shape[0], self._num_patches(model, images), generator, images.device)
        out = model(images, noise=noise)
        per_image = (model.patch_losses(images, out.pred) * out.mask).sum(1) / out.mask.sum(1)
        return [{"reconstruction_loss": round(float(v), 6)} for v in per_image]


def _has_labels(dataset: Any) -> bool:
    """vitkit's labelled datasets name their classes; an image-only view has no labels to offer."""
    return dataset is not None and not isinstance(dataset, ImagesOnly) and bool(getattr(dataset, "classes", None))


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
