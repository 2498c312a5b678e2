"""Optimizer, learning-rate schedule and weight EMA.

* AdamW (the fused kernel where torch has one for the device) or SGD, with **no weight decay** on norms,
  biases (every tensor with ndim <= 1) and on what the model lists in ``no_weight_decay()`` (CLS token,
  position tables).
* Layer-wise LR decay: parameter group scale ``layer_decay ** (num_layers - 1 - layer_id)`` using the
  model's ``lr_layer_id``, so the head learns at full rate and the patch embedding slowest.
* Linear warmup then cosine decay, evaluated **per step** (LambdaLR).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from .config import OptimConfig, ScheduleConfig


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float | None = None) -> list[dict[str, Any]]:
    """Split parameters into (decay, no-decay) x layer groups, each carrying its ``lr_scale``."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    num_layers = getattr(model, "num_lr_layers", 1)
    groups: dict[tuple[bool, int], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name in skip or name.endswith(".bias")
        layer = model.lr_layer_id(name) if layer_decay is not None and hasattr(model, "lr_layer_id") else 0
        scale = layer_decay ** (num_layers - 1 - layer) if layer_decay is not None else 1.0
        key = (no_decay, layer)
        if key not in groups:
            groups[key] = {"params": [], "names": [], "weight_decay": 0.0 if no_decay else weight_decay,
                           "lr_scale": scale}
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay, cfg.layer_decay)
    for g in groups:
        g["lr"] = cfg.lr * g["lr_scale"]
    if cfg.name == "adamw":
        try:  # one fused kernel instead of a Python loop over tensors: ~4x faster steps on CPU (ViT-B)
            return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                                     fused=True)
        except (RuntimeError, ValueError):  # older torch: fused needs CUDA tensors
            return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True)


def warmup_cosine(total_steps: int, warmup_steps: int, base_lr: float, min_lr: float, warmup_lr: float):
    """A multiplier of ``base_lr``: linear from warmup_lr to base_lr, then cosine down to min_lr."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            lr = warmup_lr + (base_lr - warmup_lr) * step / max(1, warmup_steps)
        else:
            progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
            lr = min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * progress))
        return lr / base_lr

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, base_lr: float, steps_per_epoch: int,
                    epochs: int) -> LambdaLR:
    total = steps_per_epoch * epochs
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    return LambdaLR(optimizer, warmup_cosine(total, warmup, base_lr, min(cfg.min_lr, base_lr),
                                             min(cfg.warmup_lr, base_lr)))


def build_ema(model: nn.Module, decay: float) -> AveragedModel:
    """Exponential moving average of weights (and buffers); evaluated instead of the raw weights."""
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
