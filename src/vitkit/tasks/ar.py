"""Task ``ar``: a generator over the codes of a frozen single-scale tokenizer (trained with task ``vq``), in the
model's ``order``: raster, random-order or masked (MaskGIT).

``ar`` trains a :class:`~vitkit.models.ar.TokenGenerator` on the codes of a frozen tokenizer (``task.args.tokenizer``:
a vq run folder or checkpoint; batches are tokenized under no_grad, in fp32). The primary metric is the evaluation
token NLL in nats (lower is better), with random orders / masks drawn from ``eval_seed`` so that evaluations are
comparable; bits per token are reported too. For the raster and random orders the NLL is that of the whole code
map (bits per image = L × bits per token); for the masked order it is MaskGIT's loss — the NLL of masked tokens
given the others under cosine-schedule masks — and not comparable to the other two. Picture: ``ar_samples.png``,
class-conditional samples (one row per class, classifier-free guidance ``cfg``) decoded by the tokenizer.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..models.ar import TokenGenerator
from .base import Batch, batch_images, build_configured_model, register_task
from .generative import GeneratorTask, batch_labels, device_of, unwrap_model


@dataclass
class ARArgs:
    tokenizer: str = ""  # a trained vq run folder (its best checkpoint) or checkpoint folder; required
    label_smoothing: float = 0.0  # of the training loss only (the logged nll is always plain)
    eval_seed: int = 0  # evaluation orders / masks: every evaluation uses the same ones
    samples_per_class: int = 8  # ar_samples.png: one row per class (0 = no picture)
    cfg: float = 1.5  # classifier-free guidance of the samples: (1 + cfg)·cond − cfg·uncond
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.0
    steps: int = 8  # masked order: MaskGIT sampling steps
    sample_seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.label_smoothing < 1 or self.samples_per_class < 0 or self.temperature <= 0 \
                or self.top_k < 0 or not 0 <= self.top_p < 1 or self.steps < 1:
            raise ValueError("need 0 <= label_smoothing < 1, samples_per_class >= 0, temperature > 0, top_k >= 0, "
                             "0 <= top_p < 1 and steps >= 1")


@register_task
class ARTask(GeneratorTask):
    name = "ar"
    primary_metric = "nll"
    mode = "min"
    Args = ARArgs

    @torch.no_grad()
    def tokenize(self, images: torch.Tensor) -> torch.Tensor:
        """Images (normalised as the tokenizer expects) -> codes (B, L), in fp32 whatever the autocast."""
        tok = self.tokenizer(images.device)
        with torch.autocast(device_type=images.device.type, enabled=False):
            return tok.img_to_idx(images.float())[-1]

    # ------------------------------------------------------------------ model
    def build_model(self, model_cfg: Any) -> nn.Module:
        tok = self.tokenizer(self.ctx.device)
        args = dict(model_cfg.args)
        args.setdefault("vocab_size", tok.vocab_size)
        args.setdefault("grid_size", tok.patch_nums[0])
        args.setdefault("image_size", list(tok.pretrained_cfg.get("input_size") or ()) or None)
        classes = getattr(self.ctx.train_set, "classes", None)
        if classes:
            args.setdefault("num_classes", len(classes))
        model = build_configured_model(model_cfg, **args)
        if not isinstance(model, TokenGenerator):
            raise ConfigError(f"task ar trains a TokenGenerator (e.g. ar_fmnist_tiny), got {model_cfg.name!r}")
        if (model.vocab_size, model.grid_size) != (tok.vocab_size, tok.patch_nums[0]):
            raise ConfigError(f"the generator's (vocab_size, grid_size) = ({model.vocab_size}, {model.grid_size}) "
                              f"does not fit the tokenizer's ({tok.vocab_size}, {tok.patch_nums[0]}); drop them "
                              f"from model.args to take the tokenizer's")
        tok_size, own_size = tok.pretrained_cfg.get("input_size"), model.pretrained_cfg.get("input_size")
        if tok_size is not None and own_size is not None and tuple(tok_size) != tuple(own_size):
            raise ConfigError(f"model.args.image_size={list(own_size)} but the tokenizer decodes {list(tok_size)} "
                              f"images; drop image_size to take the tokenizer's")
        if classes and model.num_classes != len(classes):
            raise ConfigError(f"model.args.num_classes={model.num_classes} but the training data has {len(classes)} "
                              f"classes; drop num_classes to take it from the data")
        cfg = {**model.pretrained_cfg, "tokenizer": self._tokenizer_path}
        cfg.update({k: tok.pretrained_cfg[k] for k in ("mean", "std") if k in tok.pretrained_cfg})
        if classes:
            cfg["class_names"] = list(classes)
        model.pretrained_cfg = cfg
        return model

    # ------------------------------------------------------------------ training
    def training_step(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        codes = self.tokenize(batch_images(batch))
        out = model(codes, batch_labels(batch))
        loss = out.loss
        if self.args.label_smoothing:
            B, L, V = out.logits.shape
            ce = F.cross_entropy(out.logits.float().reshape(B * L, V), out.targets.reshape(-1), reduction="none",
                                 label_smoothing=self.args.label_smoothing).view(B, L)
            loss = (ce * out.mask).sum() / out.mask.sum().clamp_min(1)
        n = codes.shape[0]
        return loss, {"loss": loss.item() * n, "nll": out.loss.item() * n, "count": n}

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[Batch]) -> dict[str, Any]:
        generator = torch.Generator().manual_seed(self.args.eval_seed + self.ctx.rank)
        nll = torch.zeros((), dtype=torch.float64)
        correct = torch.zeros((), dtype=torch.float64)
        tokens = torch.zeros((), dtype=torch.float64)
        count = torch.zeros((), dtype=torch.float64)
        for batch in batches:
            codes = self.tokenize(batch_images(batch))
            out = model(codes, batch_labels(batch), generator=generator)
            B, L, V = out.logits.shape
            ce = F.cross_entropy(out.logits.float().reshape(B * L, V), out.targets.reshape(-1),
                                 reduction="none").view(B, L)
            nll += (ce * out.mask).sum().double().cpu()
            correct += ((out.logits.argmax(-1) == out.targets).float() * out.mask).sum().double().cpu()
            tokens += out.mask.sum().double().cpu()
            count += B
        nll, correct, tokens, count = (self.ctx.all_reduce_sum(t) for t in (nll, correct, tokens, count))
        per_token = nll.item() / max(1.0, tokens.item())
        metrics: dict[str, Any] = {"nll": per_token, "bits_per_token": per_token / math.log(2),
                                   "token_acc": correct.item() / max(1.0, tokens.item()), "count": int(count.item())}
        if getattr(unwrap_model(model), "order", "masked") != "masked":
            metrics["bits_per_image"] = nll.item() / max(1.0, count.item()) / math.log(2)
        return metrics

    @torch.no_grad()
    def sample_images(self, model: nn.Module, labels: torch.Tensor) -> torch.Tensor:
        """Class-conditional samples with the task's sampling settings, decoded by the tokenizer (normalised)."""
        device = device_of(model)
        labels = torch.where(labels < 0, self.null_class(model), labels)  # -1: unconditional (the null class)
        steps = self.args.steps if model.order == "masked" else None  # the others take one step per token
        codes = model.sample(labels.shape[0], labels.to(device), steps=steps,
                             temperature=self.args.temperature, top_k=self.args.top_k, top_p=self.args.top_p,
                             cfg=self.args.cfg, generator=self.args.sample_seed)
        return self.tokenizer(device).idx_to_img([codes.flatten(1)], last_one=True)

    def _steps_setting(self, model: nn.Module, steps: int) -> dict[str, int]:
        """The masked order's MaskGIT steps; the raster and random orders take one step per token."""
        if unwrap_model(model).order == "masked":
            return {"steps": steps}
        return super()._steps_setting(model, steps)

    def _samples_title(self, model: nn.Module, metrics: dict[str, Any]) -> str:
        steps = f", {self.args.steps} steps" if model.order == "masked" else ""
        return (f"{model.order} order{steps}, cfg {self.args.cfg:g}, T {self.args.temperature:g}: "
                f"eval NLL {metrics['nll']:.3f} nats ({metrics['bits_per_token']:.3f} bits) per token")

    def format_report(self, metrics: dict[str, Any]) -> str:
        line = (f"token NLL {metrics['nll']:.4f} nats = {metrics['bits_per_token']:.4f} bits per token, next-token "
                f"accuracy {100 * metrics['token_acc']:.1f}% ({metrics['count']} images)")
        if "bits_per_image" in metrics:
            line += f"\n{metrics['bits_per_image']:.1f} bits per image (the whole code map)"
        return line

    @torch.no_grad()
    def predict(self, model: nn.Module, images: torch.Tensor, **kw: Any) -> list[dict[str, Any]]:
        """Per image: bits per token of its codes unconditionally (the null class), and for the raster and random
        orders the class under which its codes are likeliest (the generator as a Bayes classifier)."""
        codes = self.tokenize(images)
        B, L = codes.shape

        def bits(labels: torch.Tensor | None) -> torch.Tensor:
            out = model(codes, labels, generator=torch.Generator().manual_seed(self.args.eval_seed))
            ce = F.cross_entropy(out.logits.float().reshape(B * L, -1), out.targets.reshape(-1),
                                 reduction="none").view(B, L)
            return (ce * out.mask).sum(1) / out.mask.sum(1).clamp_min(1) / math.log(2)

        results = [{"bits_per_token": round(float(b), 4)} for b in bits(None)]
        if model.num_classes and model.order != "masked":
            per_class = torch.stack([bits(torch.full((B,), c, device=codes.device))
                                     for c in range(model.num_classes)], dim=1)
            names = model.pretrained_cfg.get("class_names") or [str(i) for i in range(model.num_classes)]
            for r, c in zip(results, per_class.argmin(1).tolist()):
                r["likeliest_class"] = names[c]
        return results
