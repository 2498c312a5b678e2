"""Evaluate a checkpoint on a dataset, and predict classes for image files."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from ..data import batch_collate, build_dataset, build_transforms
from ..data.image_folder import load_image
from ..data.transforms import AugmentConfig
from ..errors import CheckpointError, DataError
from ..models import from_pretrained
from ..tasks import ClassificationTask


def resolve_model_dir(path: str | Path) -> Path:
    """A run folder means its best checkpoint; a checkpoint folder is used as it is."""
    path = Path(path)
    for candidate in (path, path / "checkpoints" / "best", path / "checkpoints" / "last"):
        if (candidate / "config.json").is_file() and (candidate / "model.safetensors").is_file():
            return candidate
    raise CheckpointError(f"{path} is neither a vitkit checkpoint folder (config.json + model.safetensors) nor a "
                          f"training run folder with checkpoints/best")


def load_model(path: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    model = from_pretrained(resolve_model_dir(path)).to(device).eval()
    return model


def _input_spec(model) -> tuple[int, tuple[int, int]]:
    channels, h, w = model.pretrained_cfg["input_size"]
    return int(channels), (int(h), int(w))


def evaluate_checkpoint(path: str | Path, data: str = "fashion_mnist", split: str = "test",
                        data_dir: str | None = None, batch_size: int = 512, bf16: bool = False,
                        download: bool = False, **data_kw: Any) -> tuple[dict[str, Any], list[str] | None]:
    """Top-1, top-5 and per-class accuracy of a checkpoint; normalisation comes from the checkpoint."""
    model = load_model(path)
    channels, size = _input_spec(model)
    dataset = build_dataset(data, split, data_dir=data_dir, image_size=size, num_channels=channels,
                            download=download, **data_kw)
    names = model.pretrained_cfg.get("class_names")
    if model.num_classes != len(dataset.classes):
        raise DataError(f"the model predicts {model.num_classes} classes, the {data} {split} set has "
                        f"{len(dataset.classes)}")
    tf = build_transforms(None, False, model.pretrained_cfg["mean"], model.pretrained_cfg["std"], size)
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=batch_collate)
    task = ClassificationTask(AugmentConfig(), model.num_classes)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()
    with autocast:
        metrics = task.evaluate(model, ((tf(x), y) for x, y in loader))
    return metrics, names or list(dataset.classes)


@torch.no_grad()
def predict_images(model: torch.nn.Module, paths: list[str | Path], topk: int = 5) -> list[dict[str, Any]]:
    """Top-k classes with probabilities for each image file; unreadable files raise a DataError naming them."""
    channels, size = _input_spec(model)
    missing = [str(p) for p in paths if not Path(p).is_file()]
    if missing:
        raise DataError(f"image file(s) not found: {', '.join(missing)}")
    images = torch.stack([load_image(str(p), channels, size) for p in paths])
    tf = build_transforms(None, False, model.pretrained_cfg["mean"], model.pretrained_cfg["std"], size)
    probs = model(tf(images)).float().softmax(-1)
    names = model.pretrained_cfg.get("class_names") or [str(i) for i in range(probs.shape[-1])]
    k = min(topk, probs.shape[-1])
    top = probs.topk(k, dim=-1)
    return [{"path": str(p), "top": [(names[i], float(v)) for v, i in zip(vals.tolist(), idx.tolist())]}
            for p, vals, idx in zip(paths, top.values, top.indices)]
