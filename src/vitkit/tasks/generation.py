"""Token-based image generation in two stages: train a VQ tokenizer (``vq``), then a generator over its codes
(``ar``: raster, random-order or masked, the model's ``order``).

``vq`` trains a :class:`~vitkit.models.vqvae.MultiScaleVQVAE` (single-scale ``vq_fmnist_tiny`` or multi-scale) on
images in [-1, 1] (its own mean = std = 0.5, not the dataset's: the decoder clamps to [-1, 1]): loss = pixel MSE
+ VQ loss (commitment + codebook, straight-through). Evaluation encodes, quantises and decodes the evaluation
images and reports PSNR (the primary metric, higher is better; from the mean squared error of [0, 1] pixels), that
MSE, and how much of the codebook the evaluation images use (fraction of codes used, perplexity of their
histogram). Pictures: ``vq_reconstruction.png`` (originals, reconstructions, random codes decoded) and
``vq_codebook.png`` (code frequencies, sorted).

``ar`` trains a :class:`~vitkit.models.ar.TokenGenerator` on the codes of a frozen tokenizer (``task.args.tokenizer``:
a vq run folder or checkpoint; batches are tokenized under no_grad, in fp32). The primary metric is the evaluation
token NLL in nats (lower is better), with random orders / masks drawn from ``eval_seed`` so that evaluations are
comparable; bits per token are reported too. For the raster and random orders the NLL is that of the whole code
map (bits per image = L × bits per token); for the masked order it is MaskGIT's loss — the NLL of masked tokens
given the others under cosine-schedule masks — and not comparable to the other two. Picture: ``ar_samples.png``,
class-conditional samples (one row per class, classifier-free guidance ``cfg``) decoded by the tokenizer.

``var`` and ``hart`` train next-scale generators (:class:`~vitkit.models.var.VAR`, :class:`~vitkit.models.hart.HART`)
on a frozen MULTI-scale tokenizer (``vqvae_fmnist_tiny`` trained with ``vq``; the ar task's single-scale one does not
fit): teacher-forced cross-entropy over the tokens of every scale, and for hart plus ``diffusion_weight`` × the
denoising loss of the continuous residual f − f̂. The primary metric is the evaluation token NLL (nats, exact for the
whole multi-scale code, so bits per image too), with the accuracy per scale and hart's diffusion loss. Pictures:
``var_samples.png`` / ``hart_samples.png``, guided class-conditional samples.

:func:`vitkit.engine.evaluate.sample_run` (``vitkit sample``) samples one class from any of the three generators'
runs into a PNG grid.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..models import create_model, from_pretrained
from ..models.ar import TokenGenerator
from ..models.hart import HART, hybrid_tokens, hybrid_vqvae_loss
from ..models.var import VAR
from ..models.vqvae import MultiScaleVQVAE
from .base import Batch, Task, TaskContext, batch_images, checkpoint_folder, register_task


def _unwrap(model: nn.Module) -> nn.Module:
    """The model itself under DDP (``.module``) or torch.compile (``._orig_mod``)."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _labels_of(batch: Batch) -> torch.Tensor | None:
    """The class ids of a labelled batch; None for image-only batches (the generator is then unconditional)."""
    if isinstance(batch, Mapping):
        return batch.get("labels")
    if isinstance(batch, (tuple, list)) and len(batch) >= 2 and isinstance(batch[1], torch.Tensor):
        return batch[1]
    return None


def to_unit(images: torch.Tensor, cfg: Mapping[str, Any]) -> torch.Tensor:
    """Normalised images -> [0, 1] pixels (PSNR and MSE are measured there, whatever the normalisation)."""
    mean = torch.tensor(cfg["mean"], dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(cfg["std"], dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    return (images.float() * std + mean).clamp(0, 1)


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# ---------------------------------------------------------------------------- the tokenizer
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
        model = create_model(model_cfg.name, pretrained=pretrained, **dict(model_cfg.args))
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
        vq = _unwrap(model)
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
            vq = _unwrap(loop.model)
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
                       .to(_device_of(model)) for pn in model.patch_nums]
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


def _plot_code_frequencies(hist: torch.Tensor, metrics: dict[str, Any], path: Path) -> None:
    from ..viz.plots import _save, plt

    freq = (hist / hist.sum().clamp_min(1)).sort(descending=True).values.numpy()
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.bar(range(len(freq)), freq, width=1.0)
    ax.set(xlabel="code (sorted by frequency)", ylabel="share of evaluation tokens", yscale="log")
    ax.set_title(f"{100 * metrics['codebook_usage']:.0f}% of {len(freq)} codes used, perplexity "
                 f"{metrics['codebook_perplexity']:.1f}", fontsize=9)
    _save(fig, path)


# ---------------------------------------------------------------------------- the generator
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


class _TokenizerTask(Task):
    """What the generator tasks share: a frozen tokenizer from ``args.tokenizer`` (loaded once, never trained) and
    the class-conditional sample grid ``<name>_samples.png``. ``multi_scale`` says which tokenizers fit: the ar
    task's generators read one code map, VAR and HART read several scales."""

    multi_scale: ClassVar[bool] = False

    def __init__(self, args: Any = None, ctx: TaskContext | None = None) -> None:
        super().__init__(args, ctx)
        self._tokenizer: MultiScaleVQVAE | None = None

    def tokenizer(self, device: torch.device | None = None) -> MultiScaleVQVAE:
        """The frozen tokenizer of ``args.tokenizer`` (loaded once, moved to ``device``)."""
        if self._tokenizer is None:
            if not self.args.tokenizer:
                raise ConfigError(f"task {self.name} needs task.args.tokenizer: a trained vq run folder or checkpoint")
            path = checkpoint_folder(self.args.tokenizer)
            if not (path / "config.json").is_file():
                raise ConfigError(f"task.args.tokenizer={self.args.tokenizer!r} is not a vq run or checkpoint folder")
            tok = from_pretrained(path)
            scales = list(getattr(tok, "patch_nums", []))
            if not isinstance(tok, MultiScaleVQVAE) or (len(scales) > 1) != self.multi_scale:
                need = ("a multi-scale VQ tokenizer (e.g. vqvae_fmnist_tiny trained with task vq: --set "
                        "model.name=vqvae_fmnist_tiny)" if self.multi_scale
                        else "a single-scale VQ tokenizer (e.g. vq_fmnist_tiny trained with task vq)")
                raise ConfigError(f"{path} holds a {type(tok).__name__} with patch_nums {scales}; the {self.name} "
                                  f"task needs {need}")
            self._tokenizer = tok.eval().requires_grad_(False)
            self._tokenizer_path = str(path)
        if device is not None and _device_of(self._tokenizer) != device:
            self._tokenizer.to(device)
        return self._tokenizer

    def sample_images(self, model: nn.Module, labels: torch.Tensor) -> torch.Tensor:
        """Class-conditional samples (labels < 0: unconditional) decoded by the tokenizer, normalised as the
        model's ``pretrained_cfg`` says (what :meth:`write_artifacts` and ``vitkit sample`` draw)."""
        raise NotImplementedError

    def _samples_title(self, model: nn.Module, metrics: dict[str, Any]) -> str:
        raise NotImplementedError

    def write_artifacts(self, model: nn.Module, metrics: dict[str, Any], folder: Path) -> list[str]:
        """``<name>_samples.png``: ``samples_per_class`` samples per class, one row per class."""
        k = self.args.samples_per_class
        if not k:
            return []
        from ..viz.plots import plot_image_rows

        names = model.pretrained_cfg.get("class_names") or [str(i) for i in range(model.num_classes)]
        classes = max(1, model.num_classes)
        labels = torch.arange(classes).repeat_interleave(k) if model.num_classes else torch.full((k,), -1)
        images = self.sample_images(model, labels).float().cpu().view(classes, k, *model.pretrained_cfg
                                                                       ["input_size"])
        rows = {str(names[c]) if model.num_classes else "unconditional": images[c] for c in range(classes)}
        cfg = model.pretrained_cfg
        name = f"{self.name}_samples.png"
        plot_image_rows(rows, cfg["mean"], cfg["std"], Path(folder) / name, title=self._samples_title(model, metrics))
        return [name]


@register_task
class ARTask(_TokenizerTask):
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
        pretrained = checkpoint_folder(model_cfg.pretrained) if model_cfg.pretrained else None
        model = create_model(model_cfg.name, pretrained=pretrained, **args)
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
        out = model(codes, _labels_of(batch))
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
            out = model(codes, _labels_of(batch), generator=generator)
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
        if getattr(_unwrap(model), "order", "masked") != "masked":
            metrics["bits_per_image"] = nll.item() / max(1.0, count.item()) / math.log(2)
        return metrics

    @torch.no_grad()
    def sample_images(self, model: nn.Module, labels: torch.Tensor) -> torch.Tensor:
        """Class-conditional samples with the task's sampling settings, decoded by the tokenizer (normalised)."""
        device = _device_of(model)
        steps = self.args.steps if model.order == "masked" else None  # the others take one step per token
        codes = model.sample(labels.shape[0], labels.to(device), steps=steps,
                             temperature=self.args.temperature, top_k=self.args.top_k, top_p=self.args.top_p,
                             cfg=self.args.cfg, generator=self.args.sample_seed)
        return self.tokenizer(device).idx_to_img([codes.flatten(1)], last_one=True)

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


# ---------------------------------------------------------------------------- next-scale generators (VAR, HART)
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
class VARTask(_TokenizerTask):
    """Next-scale prediction (VAR) on a frozen multi-scale tokenizer: teacher-forced cross-entropy over the tokens of
    every scale at once. The evaluation NLL is exact for the whole multi-scale code (a scale's tokens are independent
    given the coarser ones), so bits per image are reported too, and the next-token accuracy per scale."""

    name = "var"
    primary_metric = "nll"
    mode = "min"
    Args = VARArgs
    multi_scale = True
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
        labels = _labels_of(batch)
        if labels is None:
            return torch.full((n,), _unwrap(model).num_classes, dtype=torch.long, device=device)
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
        pretrained = checkpoint_folder(model_cfg.pretrained) if model_cfg.pretrained else None
        model = create_model(model_cfg.name, pretrained=pretrained, **args)
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
        inner = _unwrap(model)
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
        inner = _unwrap(model)
        device = _device_of(inner)
        labels = labels.to(device=device, dtype=torch.long)
        labels = torch.where(labels < 0, inner.num_classes, labels)
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
        m: HART = _unwrap(model)
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
        device = _device_of(model)
        return torch.Generator(device=device).manual_seed(self.args.eval_seed + self.ctx.rank)

    def _sample01(self, model: VAR, labels: torch.Tensor, tok: MultiScaleVQVAE) -> torch.Tensor:
        a = self.args
        generator = torch.Generator(device=labels.device).manual_seed(a.sample_seed)
        return model.sample(labels.shape[0], labels, cfg=a.cfg, top_k=a.top_k, top_p=a.top_p, generator=generator,
                            diffusion_steps=None if a.diffusion_steps < 0 else a.diffusion_steps, vae=tok,
                            temperature=a.temperature)

    def _samples_title(self, model: nn.Module, metrics: dict[str, Any]) -> str:
        return super()._samples_title(model, metrics) + f", diffusion loss {metrics['diffusion']:.3f}"


# ---------------------------------------------------------------------------- vitkit sample
GENERATOR_TASKS = ("ar", "var", "hart")


def class_index(class_name: str, names: list[str]) -> int:
    """A class name (case-insensitive) or index -> its index; ``none`` = the null class (unconditional, -1)."""
    text = str(class_name).strip()
    if text.lower() in ("none", "null", "uncond", "unconditional"):
        return -1
    lowered = [str(n).lower() for n in names]
    if text.lower() in lowered:
        return lowered.index(text.lower())
    if text.lstrip("-").isdigit() and 0 <= int(text) < len(names):
        return int(text)
    raise ConfigError(f"unknown class {class_name!r}; the generator's classes: "
                      f"{', '.join(f'{i}={n}' for i, n in enumerate(names))} (or 'none': unconditional)")


def save_image_grid(images01: torch.Tensor, path: str | Path, nrow: int = 8, pad: int = 2) -> Path:
    """A PNG of the images (N, C, H, W) in [0, 1], ``nrow`` per row, ``pad`` black pixels between them: the pixels
    themselves, no axes (a plot would resample them)."""
    from PIL import Image

    n, c, h, w = images01.shape
    rows = math.ceil(n / nrow)
    cols = min(n, nrow)
    grid = torch.zeros(c, rows * (h + pad) + pad, cols * (w + pad) + pad)
    for i, img in enumerate(images01.float().cpu().clamp(0, 1)):
        r, k = divmod(i, nrow)
        grid[:, pad + r * (h + pad):pad + r * (h + pad) + h, pad + k * (w + pad):pad + k * (w + pad) + w] = img
    pixels = (grid * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels[..., 0] if c == 1 else pixels, mode="L" if c == 1 else "RGB").save(path)
    return path


# ---------------------------------------------------------------------------- sample quality
def gaussian(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (unbiased) covariance of (N, D) features, in float64."""
    f = features.double()
    return f.mean(0), torch.cov(f.T)


def frechet_distance(mu1: torch.Tensor, cov1: torch.Tensor, mu2: torch.Tensor, cov2: torch.Tensor) -> float:
    """‖μ1 − μ2‖² + tr(Σ1 + Σ2 − 2 (Σ1^½ Σ2 Σ1^½)^½), the trace of the root from the eigenvalues of the
    symmetric Σ1^½ Σ2 Σ1^½ (same value as tr((Σ1 Σ2)^½), without a non-symmetric matrix root)."""
    w, v = torch.linalg.eigh(cov1)
    root1 = (v * w.clamp_min(0).sqrt()) @ v.T
    middle = root1 @ cov2 @ root1
    trace_root = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    return float((mu1 - mu2).square().sum() + cov1.trace() + cov2.trace() - 2 * trace_root)
