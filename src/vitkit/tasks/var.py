"""Tasks ``var`` and ``hart``: next-scale generators on the codes of a frozen MULTI-scale tokenizer (trained with task
``vq``).

``var`` and ``hart`` train next-scale generators (:class:`~vitkit.models.var.VAR`, :class:`~vitkit.models.hart.HART`)
on a frozen MULTI-scale tokenizer (``vqvae_fmnist_tiny`` trained with ``vq``; the ar task's single-scale one does not
fit): teacher-forced cross-entropy over the tokens of every scale, and for hart plus ``diffusion_weight`` × the
denoising loss of the continuous residual f − f̂. The primary metric is the evaluation token NLL (nats, exact for the
whole multi-scale code, so bits per image too), with the accuracy per scale and hart's diffusion loss. Pictures:
``var_samples.png`` / ``hart_samples.png``, guided class-conditional samples.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..models.hart import HART, hybrid_tokens
from ..models.var import VAR
from ..models.vqvae import MultiScaleVQVAE
from .base import Batch, batch_images, build_configured_model, register_task
from .generative import GeneratorTask, batch_labels, device_of, unwrap_model


@dataclass
class VARArgs:
    tokenizer: str = ""  # a trained multi-scale vq run folder (vqvae_fmnist_tiny) or checkpoint folder; required
    label_smoothing: float = 0.0  # of the training loss only (the logged nll is always plain)
    samples_per_class: int = 8  # <task>_samples.png: one row per class (0 = no picture)
    cfg: float = 1.5  # classifier-free guidance, VAR's schedule: cfg·k/(K−1) at scale k (full cfg at the last)
    top_k: int = 0
    top_p: float = 0.0
    sample_seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.label_smoothing < 1 or self.samples_per_class < 0 or self.top_k < 0 \
                or not 0 <= self.top_p < 1:
            raise ValueError("need 0 <= label_smoothing < 1, samples_per_class >= 0, top_k >= 0 and 0 <= top_p < 1")


@dataclass
class HARTArgs(VARArgs):
    diffusion_weight: float = 1.0  # loss = CE + diffusion_weight × residual diffusion loss
    diffusion_steps: int = -1  # sampling: -1 = the model's diff_sampling_steps, 0 = no residual (discrete image)
    temperature: float = 1.0  # of the diffusion sampler
    eval_seed: int = 0  # the evaluation's diffusion timesteps and noise: every evaluation uses the same ones

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.diffusion_weight < 0 or self.diffusion_steps < -1 or self.temperature <= 0:
            raise ValueError("need diffusion_weight >= 0, diffusion_steps >= -1 and temperature > 0")


def _normalise(images01: torch.Tensor, cfg: Mapping[str, Any]) -> torch.Tensor:
    """[0, 1] pixels (what VAR / HART sampling returns) -> normalised as ``cfg`` says (what the ar task returns)."""
    mean = torch.tensor(cfg["mean"], dtype=torch.float32, device=images01.device).view(1, -1, 1, 1)
    std = torch.tensor(cfg["std"], dtype=torch.float32, device=images01.device).view(1, -1, 1, 1)
    return (images01.float() - mean) / std


@register_task
class VARTask(GeneratorTask):
    """Next-scale prediction (VAR) on a frozen multi-scale tokenizer: teacher-forced cross-entropy over the tokens of
    every scale at once. The evaluation NLL is exact for the whole multi-scale code (a scale's tokens are independent
    given the coarser ones), so bits per image are reported too, and the next-token accuracy per scale."""

    name = "var"
    primary_metric = "nll"
    mode = "min"
    Args = VARArgs
    multi_scale = True
    one_step_per = "scale"
    model_type: ClassVar[type[VAR]] = VAR

    @torch.no_grad()
    def tokenize(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Images -> (teacher-forcing input (B, L − pn₀², c_vae), target tokens (B, L), residual or None), in fp32
        whatever the autocast (the residual is HART's)."""
        tok = self.tokenizer(images.device)
        with torch.autocast(device_type=images.device.type, enabled=False):
            idx = tok.img_to_idx(images.float())
            return tok.idx_to_var_input(idx), torch.cat(idx, dim=1), None

    @staticmethod
    def _labels(batch: Batch, model: nn.Module, n: int, device: torch.device) -> torch.Tensor:
        """The batch's class ids; the null class (unconditional) for image-only batches."""
        labels = batch_labels(batch)
        if labels is None:
            return torch.full((n,), unwrap_model(model).num_classes, dtype=torch.long, device=device)
        return labels.to(device=device, dtype=torch.long)

    # ------------------------------------------------------------------ model
    def build_model(self, model_cfg: Any) -> nn.Module:
        tok = self.tokenizer(self.ctx.device)
        args = dict(model_cfg.args)
        args.setdefault("vocab_size", tok.vocab_size)
        args.setdefault("c_vae", tok.c_vae)
        args.setdefault("patch_nums", list(tok.patch_nums))
        classes = getattr(self.ctx.train_set, "classes", None)
        if classes:
            args.setdefault("num_classes", len(classes))
        model = build_configured_model(model_cfg, **args)
        if not isinstance(model, self.model_type):
            raise ConfigError(f"task {self.name} trains a {self.model_type.__name__} (e.g. {self.name}_fmnist_tiny), "
                              f"got {model_cfg.name!r}")
        try:
            model._check_vae(tok)
        except ValueError as e:
            raise ConfigError(f"{e}; drop vocab_size / c_vae / patch_nums from model.args to take the "
                              f"tokenizer's") from None
        if classes and model.num_classes != len(classes):
            raise ConfigError(f"model.args.num_classes={model.num_classes} but the training data has {len(classes)} "
                              f"classes; drop num_classes to take it from the data")
        cfg = {**model.pretrained_cfg, "tokenizer": self._tokenizer_path}
        cfg.update({k: tok.pretrained_cfg[k] for k in ("input_size", "mean", "std") if k in tok.pretrained_cfg})
        if classes:
            cfg["class_names"] = list(classes)
        model.pretrained_cfg = cfg
        return model

    # ------------------------------------------------------------------ training
    def _forward(self, model: nn.Module, labels: torch.Tensor, x: torch.Tensor, gt: torch.Tensor,
                 residual: torch.Tensor | None, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits (B, L, V), diffusion loss or None): VAR has no diffusion."""
        return model(labels, x), None

    def _ce(self, logits: torch.Tensor, gt: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
        B, L, V = logits.shape
        return F.cross_entropy(logits.float().reshape(B * L, V), gt.reshape(-1), reduction="none",
                               label_smoothing=smoothing).view(B, L)

    def training_step(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        images = batch_images(batch)
        x, gt, residual = self.tokenize(images)
        n = gt.shape[0]
        logits, diff = self._forward(model, self._labels(batch, model, n, gt.device), x, gt, residual)
        nll = self._ce(logits, gt).mean()
        loss = self._ce(logits, gt, self.args.label_smoothing).mean() if self.args.label_smoothing else nll
        stats = {"nll": nll.item() * n, "count": n}
        if diff is not None:
            loss = loss + self.args.diffusion_weight * diff
            stats["diffusion"] = diff.item() * n
        stats["loss"] = loss.item() * n
        return loss, stats

    # ------------------------------------------------------------------ evaluation
    def _eval_generator(self, model: nn.Module) -> torch.Generator | None:
        return None

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[Batch]) -> dict[str, Any]:
        inner = unwrap_model(model)
        generator = self._eval_generator(model)
        nll = torch.zeros((), dtype=torch.float64)
        diffusion = torch.zeros((), dtype=torch.float64)
        correct = torch.zeros(inner.L, dtype=torch.float64)  # per token position, split into scales below
        count = torch.zeros((), dtype=torch.float64)
        for batch in batches:
            x, gt, residual = self.tokenize(batch_images(batch))
            B = gt.shape[0]
            logits, diff = self._forward(model, self._labels(batch, model, B, gt.device), x, gt, residual, generator)
            nll += self._ce(logits, gt).sum().double().cpu()
            correct += (logits.argmax(-1) == gt).double().sum(0).cpu()
            if diff is not None:
                diffusion += diff.double().cpu() * B
            count += B
        nll, diffusion, correct, count = (self.ctx.all_reduce_sum(t) for t in (nll, diffusion, correct, count))
        images = max(1.0, count.item())
        per_token = nll.item() / images / inner.L
        metrics: dict[str, Any] = {"nll": per_token, "bits_per_token": per_token / math.log(2),
                                   "bits_per_image": nll.item() / images / math.log(2),
                                   "token_acc": correct.sum().item() / images / inner.L, "count": int(count.item())}
        for begin, end in inner.begin_ends:  # next-scale accuracy per scale: how well each map is predicted
            pn = math.isqrt(end - begin)
            metrics[f"acc_{pn}x{pn}"] = correct[begin:end].sum().item() / images / (end - begin)
        if generator is not None:
            metrics["diffusion"] = diffusion.item() / images
        return metrics

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample_images(self, model: nn.Module, labels: torch.Tensor) -> torch.Tensor:
        """Guided next-scale samples with the task's settings, decoded by the tokenizer (normalised)."""
        inner = unwrap_model(model)
        device = device_of(inner)
        labels = labels.to(device=device, dtype=torch.long)
        labels = torch.where(labels < 0, self.null_class(inner), labels)
        was_training = inner.training
        inner.eval()
        try:
            images = self._sample01(inner, labels, self.tokenizer(device))
        finally:
            inner.train(was_training)
        return _normalise(images, inner.pretrained_cfg)

    def _sample01(self, model: VAR, labels: torch.Tensor, tok: MultiScaleVQVAE) -> torch.Tensor:
        a = self.args
        return model.autoregressive_infer_cfg(labels.shape[0], labels, g_seed=a.sample_seed, cfg=a.cfg, top_k=a.top_k,
                                              top_p=a.top_p, vae=tok)

    def _samples_title(self, model: nn.Module, metrics: dict[str, Any]) -> str:
        scales = "+".join(f"{p}²" for p in model.patch_nums)
        return (f"{self.name}, {scales} tokens, cfg {self.args.cfg:g}: eval NLL {metrics['nll']:.3f} nats "
                f"({metrics['bits_per_token']:.3f} bits) per token")

    def format_report(self, metrics: dict[str, Any]) -> str:
        scales = "  ".join(f"{k[4:]} {100 * v:.1f}%" for k, v in metrics.items() if k.startswith("acc_"))
        line = (f"token NLL {metrics['nll']:.4f} nats = {metrics['bits_per_token']:.4f} bits per token, "
                f"{metrics['bits_per_image']:.1f} bits per image (all scales), token accuracy "
                f"{100 * metrics['token_acc']:.1f}% ({metrics['count']} images)\naccuracy per scale: {scales}")
        if "diffusion" in metrics:
            line += f"\nresidual diffusion loss {metrics['diffusion']:.4f}"
        return line


@register_task
class HARTTask(VARTask):
    """HART: VAR's loss plus ``diffusion_weight`` × the denoising loss of the continuous residual r = f − f̂ (from
    :func:`~vitkit.models.hart.hybrid_tokens`), conditioned on the last scale's hidden states. The primary metric
    is the NLL of the discrete tokens, as var's (comparable to it); the evaluation diffusion loss uses timesteps
    and noise drawn from ``eval_seed``. One process only: the combined loss is not HART's ``forward``, so DDP
    would not see it."""

    name = "hart"
    Args = HARTArgs
    model_type = HART

    def build_model(self, model_cfg: Any) -> nn.Module:
        if self.ctx.world_size > 1:
            raise ConfigError("task hart trains in one process: its loss is not HART.forward, which DDP wraps")
        return super().build_model(model_cfg)

    @torch.no_grad()
    def tokenize(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        tok = self.tokenizer(images.device)
        with torch.autocast(device_type=images.device.type, enabled=False):
            idx, residual = hybrid_tokens(tok, images.float())
            return tok.idx_to_var_input(idx), torch.cat(idx, dim=1), residual

    def _forward(self, model: nn.Module, labels: torch.Tensor, x: torch.Tensor, gt: torch.Tensor,
                 residual: torch.Tensor | None, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One transformer pass for both losses: :meth:`HART.training_loss`'s computation, keeping the logits (the
        logged NLL, per-scale accuracy and label smoothing need them; the test checks both agree)."""
        m: HART = unwrap_model(model)
        hidden, cond = m.forward_hidden(labels, x)
        logits = m.get_logits(hidden, cond)
        if not m.residual_diffusion:
            return logits, logits.new_zeros(())
        z = m.diffusion_condition(hidden[:, -m.last_l:], gt[:, -m.last_l:])
        target = residual.flatten(2).transpose(1, 2).reshape(-1, m.c_vae).float()
        mul = m.diffusion_batch_mul
        return logits, m.diffloss(target.repeat(mul, 1), z.reshape(-1, m.embed_dim).repeat(mul, 1),
                                  generator=generator)

    def _eval_generator(self, model: nn.Module) -> torch.Generator | None:
        device = device_of(model)
        return torch.Generator(device=device).manual_seed(self.args.eval_seed + self.ctx.rank)

    def _sample01(self, model: VAR, labels: torch.Tensor, tok: MultiScaleVQVAE) -> torch.Tensor:
        a = self.args
        generator = torch.Generator(device=labels.device).manual_seed(a.sample_seed)
        return model.sample(labels.shape[0], labels, cfg=a.cfg, top_k=a.top_k, top_p=a.top_p, generator=generator,
                            diffusion_steps=None if a.diffusion_steps < 0 else a.diffusion_steps, vae=tok,
                            temperature=a.temperature)

    def _steps_setting(self, model: nn.Module, steps: int) -> dict[str, int]:
        """The diffusion steps of the residual (0: the discrete image)."""
        return {"diffusion_steps": steps}

    def _samples_title(self, model: nn.Module, metrics: dict[str, Any]) -> str:
        return super()._samples_title(model, metrics) + f", diffusion loss {metrics['diffusion']:.3f}"
