"""Task ``vq``: train the VQ tokenizer of token-based generation (the generators of :mod:`.ar` and :mod:`.var` read
its frozen codes).

``vq`` trains a :class:`~vitkit.models.vqvae.MultiScaleVQVAE` (single-scale ``vq_fmnist_tiny`` or multi-scale) on
images in [-1, 1] (its own mean = std = 0.5, not the dataset's: the decoder clamps to [-1, 1]): loss = pixel MSE
+ VQ loss (commitment + codebook, straight-through). Evaluation encodes, quantises and decodes the evaluation
images and reports PSNR (the primary metric, higher is better; from the mean squared error of [0, 1] pixels), that
MSE, and how much of the codebook the evaluation images use (fraction of codes used, perplexity of their
histogram). Pictures: ``vq_reconstruction.png`` (originals, reconstructions, random codes decoded) and
``vq_codebook.png`` (code frequencies, sorted).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..models.hart import hybrid_vqvae_loss
from ..models.vqvae import MultiScaleVQVAE
from .base import Batch, Task, batch_images, build_configured_model, checkpoint_folder, register_task
from .generative import device_of, to_unit, unwrap_model


@torch.no_grad()
def restart_dead_codes(vq: MultiScaleVQVAE, features: torch.Tensor, tokens_per_step: int, threshold: float
                       ) -> int:
    """Move every dead code onto a random encoder feature vector of ``features`` (B, C, h, w); returns how many.

    A code is dead when its hit EMA (the quantiser's ``ema_vocab_hit_SV``) is below ``threshold`` × the hits of a
    uniformly used code at every scale. Without this a VQ-VAE trained from scratch uses a few dozen of its codes
    (the encoder's first outputs are near a handful of them; the others never get a gradient). A restarted code's
    EMA is set to the "used" margin of ``usages`` (8% of a uniform share) so it has time to be picked up."""
    quant = vq.quantize
    share = tokens_per_step / quant.vocab_size
    dead = (quant.ema_vocab_hit_SV.max(dim=0).values < threshold * share).nonzero()[:, 0]
    if quant.record_hit == 0 or dead.numel() == 0:
        return 0
    pool = features.detach().float().permute(0, 2, 3, 1).reshape(-1, features.shape[1])
    pick = torch.randint(0, pool.shape[0], (dead.numel(),), device=pool.device)
    quant.embedding.weight.data[dead] = pool[pick].to(quant.embedding.weight.dtype)
    quant.ema_vocab_hit_SV[:, dead] = 0.08 * share
    return int(dead.numel())


def _plot_code_frequencies(hist: torch.Tensor, metrics: dict[str, Any], path: Path) -> None:
    from ..viz.plots import _save, plt

    freq = (hist / hist.sum().clamp_min(1)).sort(descending=True).values.numpy()
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.bar(range(len(freq)), freq, width=1.0)
    ax.set(xlabel="code (sorted by frequency)", ylabel="share of evaluation tokens", yscale="log")
    ax.set_title(f"{100 * metrics['codebook_usage']:.0f}% of {len(freq)} codes used, perplexity "
                 f"{metrics['codebook_perplexity']:.1f}", fontsize=9)
    _save(fig, path)


@dataclass
class VQArgs:
    codebook_init: float = 0.0  # a fresh codebook: > 0 trunc-normal std, < 0 uniform ±|v|/vocab, 0 = N(0, 1)
    restart_dead_codes: bool = True  # after each step, dead codes jump onto the batch's encoder features
    dead_threshold: float = 0.03  # dead: hit EMA below this share of a uniformly used code's
    grid_images: int = 8  # evaluation images in vq_reconstruction.png
    seed: int = 0  # the random codes decoded in the picture
    # HART's hybrid tokenizer: the share of steps whose decoder sees the continuous f instead of f̂ (0: VAR's)
    continuous_prob: float = 0.0

    def __post_init__(self) -> None:
        if self.grid_images < 0 or not 0 <= self.dead_threshold < 1:
            raise ValueError("grid_images must be >= 0 and 0 <= dead_threshold < 1")
        if not 0 <= self.continuous_prob <= 1:
            raise ValueError(f"continuous_prob={self.continuous_prob!r} must be in [0, 1]")


class _TorchCoin:
    """``random()`` from torch's global generator, which checkpoints save and resume restores (exact resume)."""

    @staticmethod
    def random() -> float:
        return float(torch.rand(()))


@register_task
class VQTask(Task):
    name = "vq"
    primary_metric = "psnr"
    mode = "max"
    Args = VQArgs

    def build_model(self, model_cfg: Any) -> nn.Module:
        pretrained = checkpoint_folder(model_cfg.pretrained) if model_cfg.pretrained else None
        model = build_configured_model(model_cfg)
        if not isinstance(model, MultiScaleVQVAE):
            raise ConfigError(f"task vq trains a VQ tokenizer (e.g. vq_fmnist_tiny), got {model_cfg.name!r}")
        if self.args.continuous_prob and self.ctx.world_size > 1:
            raise ConfigError("task vq with continuous_prob > 0 trains in one process: the hybrid step calls the "
                              "encoder and decoder directly, which DDP does not see")
        if pretrained is None and self.args.codebook_init:
            model.quantize.init_codebook(self.args.codebook_init)
        source = self.ctx.train_set
        if source is not None and getattr(source, "classes", None):
            model.pretrained_cfg = {**model.pretrained_cfg, "source_classes": list(source.classes)}
        return model

    @staticmethod
    def _tokens_per_step(vq: MultiScaleVQVAE, batch_size: int) -> int:
        return batch_size * sum(pn * pn for pn in vq.patch_nums) // len(vq.patch_nums)  # per scale, as the EMA

    def training_step(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        images = batch_images(batch)
        vq = unwrap_model(model)
        if self.args.continuous_prob:  # HART: decode the continuous f on this share of steps, f̂ on the others
            out = hybrid_vqvae_loss(vq, images, discrete_prob=1 - self.args.continuous_prob, generator=_TorchCoin())
        else:
            out = model(images)
        n = images.shape[0]
        usage = sum(vq.quantize.usages(self._tokens_per_step(vq, n), self.ctx.world_size)) / len(vq.patch_nums)
        rec = F.mse_loss(out.rec.float(), images.float()).item()
        return out.loss, {"loss": out.loss.item() * n, "rec_mse": rec * n, "vq_loss": out.vq_loss.item() * n,
                          "count": n, "step_codebook_usage": usage / 100}

    def optimizer_step(self, loop: Any, micro_batches: list[Batch]) -> dict[str, float]:
        """The usual step, then dead codes restarted from the last micro-batch's encoder features (the encoder
        runs once more, without gradient, only while some code is dead)."""
        stats = super().optimizer_step(loop, micro_batches)
        restarted = 0
        if self.args.restart_dead_codes:
            vq = unwrap_model(loop.model)
            images = batch_images(micro_batches[-1])
            tokens = self._tokens_per_step(vq, images.shape[0]) * self.ctx.world_size
            share = tokens / vq.vocab_size
            if bool((vq.quantize.ema_vocab_hit_SV.max(dim=0).values < self.args.dead_threshold * share).any()):
                with torch.no_grad(), torch.autocast(device_type=images.device.type, enabled=False):
                    features = vq.encode(images.float())
                restarted = restart_dead_codes(vq, features, tokens, self.args.dead_threshold)
            if self.ctx.world_size > 1:  # every process takes rank 0's codebook and EMA (restarts differ per batch)
                keep = 1.0 if self.ctx.rank == 0 else 0.0
                for t in (vq.quantize.embedding.weight.data, vq.quantize.ema_vocab_hit_SV):
                    t.copy_(self.ctx.all_reduce_sum(t * keep))
        stats["step_codes_restarted"] = float(restarted)
        return stats

    @torch.no_grad()
    def _reconstruct(self, model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(decoded images, per-scale codes): exactly the round trip a generator's samples go through, in fp32
        whatever the autocast (as the ar task tokenizes)."""
        with torch.autocast(device_type=images.device.type, enabled=False):
            idx = model.quantize.f_to_idx_or_fhat(model.encode(images.float()), to_fhat=False)
            return model.idx_to_img(idx, last_one=True), idx

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[Batch]) -> dict[str, Any]:
        cfg = model.pretrained_cfg
        se = torch.zeros((), dtype=torch.float64)
        se_continuous = torch.zeros((), dtype=torch.float64)
        pixels = torch.zeros((), dtype=torch.float64)
        count = torch.zeros((), dtype=torch.float64)
        hist = torch.zeros(model.vocab_size, dtype=torch.float64)
        grid = None
        for batch in batches:
            images = batch_images(batch)
            rec, idx = self._reconstruct(model, images)
            se += (to_unit(rec, cfg) - to_unit(images, cfg)).square().sum().double().cpu()
            with torch.autocast(device_type=images.device.type, enabled=False):  # f itself: HART's upper bound
                rec_f = model.decode(model.encode(images.float()))
            se_continuous += (to_unit(rec_f, cfg) - to_unit(images, cfg)).square().sum().double().cpu()
            pixels += images.numel()
            count += images.shape[0]
            hist += torch.cat([i.flatten() for i in idx]).bincount(minlength=model.vocab_size).double().cpu()
            if grid is None and self.args.grid_images:
                k = self.args.grid_images
                grid = {"images": images[:k].float().cpu(), "rec": rec[:k].float().cpu()}
        se, se_continuous, pixels, count, hist = (self.ctx.all_reduce_sum(t)
                                                  for t in (se, se_continuous, pixels, count, hist))
        mse = se.item() / max(1.0, pixels.item())
        mse_continuous = se_continuous.item() / max(1.0, pixels.item())
        p = hist / hist.sum().clamp_min(1)
        entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
        metrics: dict[str, Any] = {
            "psnr": 10 * math.log10(1 / max(mse, 1e-12)), "rec_mse": mse, "count": int(count.item()),
            "psnr_continuous": 10 * math.log10(1 / max(mse_continuous, 1e-12)),
            "codebook_usage": (hist > 0).double().mean().item(), "codebook_perplexity": math.exp(entropy),
            "_code_hist": hist,
        }
        if grid is not None:
            metrics["_grid"] = grid
        return metrics

    def write_artifacts(self, model: nn.Module, metrics: dict[str, Any], folder: Path) -> list[str]:
        from ..viz.plots import plot_image_rows

        written = []
        cfg, V = model.pretrained_cfg, model.vocab_size
        grid, hist = metrics.get("_grid"), metrics.get("_code_hist")
        if grid is not None and hist is not None:
            n = grid["images"].shape[0]
            g = torch.Generator().manual_seed(self.args.seed)
            probs = hist.float() / hist.sum().clamp_min(1)
            with torch.no_grad():  # codes drawn independently from their evaluation frequencies: no structure
                idx = [torch.multinomial(probs, n * pn * pn, replacement=True, generator=g).view(n, pn * pn)
                       .to(device_of(model)) for pn in model.patch_nums]
                noise = model.idx_to_img(idx, last_one=True).float().cpu()
            scales = "+".join(f"{p}×{p}" for p in model.patch_nums)
            plot_image_rows({"original": grid["images"], "reconstruction": grid["rec"], "random codes": noise},
                            cfg["mean"], cfg["std"], Path(folder) / "vq_reconstruction.png",
                            title=f"VQ ({scales} codes, {V} in the codebook): PSNR {metrics['psnr']:.2f} dB, "
                                  f"codebook usage {100 * metrics['codebook_usage']:.0f}%")
            written.append("vq_reconstruction.png")
        if hist is not None:
            _plot_code_frequencies(hist, metrics, Path(folder) / "vq_codebook.png")
            written.append("vq_codebook.png")
        return written

    def format_report(self, metrics: dict[str, Any]) -> str:
        return (f"reconstruction PSNR {metrics['psnr']:.2f} dB (MSE {metrics['rec_mse']:.5f} on [0, 1] pixels, "
                f"{metrics['count']} images); decoding the continuous f (HART's bound) "
                f"{metrics['psnr_continuous']:.2f} dB\ncodebook: {100 * metrics['codebook_usage']:.1f}% of the codes "
                f"used, "
                f"perplexity {metrics['codebook_perplexity']:.1f}")

    @torch.no_grad()
    def predict(self, model: nn.Module, images: torch.Tensor, **kw: Any) -> list[dict[str, Any]]:
        """Per image: reconstruction MSE and PSNR, and how many distinct codes it uses."""
        rec, idx = self._reconstruct(model, images)
        cfg = model.pretrained_cfg
        mse = (to_unit(rec, cfg) - to_unit(images, cfg)).square().flatten(1).mean(1)
        codes = torch.cat([i for i in idx], dim=1)
        return [{"rec_mse": round(float(m), 6), "psnr": round(10 * math.log10(1 / max(float(m), 1e-12)), 3),
                 "distinct_codes": int(c.unique().numel())} for m, c in zip(mse, codes)]
