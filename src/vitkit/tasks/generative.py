"""What the token-based generation tasks share.

Image generation goes in two stages: train a VQ tokenizer (task ``vq``, :mod:`.vq`), then a generator over its frozen
codes (``ar`` in :mod:`.ar`; ``var`` and ``hart`` in :mod:`.var`). This module holds:

* the batch helpers of those tasks (:func:`unwrap_model`, :func:`batch_labels`, :func:`to_unit`);
* :class:`GeneratorTask`, the base of the generator tasks: the frozen tokenizer, loaded once; the class-conditional
  sample grid ``<name>_samples.png``; and what the tools ask of a generator (capability ``"sample"``:
  :meth:`~GeneratorTask.configure_sampling`, :meth:`~GeneratorTask.sample_images`,
  :meth:`~GeneratorTask.output_names`, :meth:`~GeneratorTask.null_class`), so that no tool names a generator task;
* what ``vitkit sample`` needs around the samples (:func:`class_index`, :func:`save_image_grid`);
* the Fréchet distance of sample features (:func:`gaussian`, :func:`frechet_distance`), for
  ``benchmarks/bench_generation.py``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import ConfigError
from ..models import from_pretrained
from ..models.vqvae import MultiScaleVQVAE
from .base import Batch, Task, TaskContext, checkpoint_folder


# ---------------------------------------------------------------------------- batches and pixels
def unwrap_model(model: nn.Module) -> nn.Module:
    """The model itself under DDP (``.module``) or torch.compile (``._orig_mod``)."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def batch_labels(batch: Batch) -> torch.Tensor | None:
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


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# ---------------------------------------------------------------------------- sampling settings
SEED_LIMIT = 2**63  # sampling seeds are 0 <= seed < 2**63: what torch.Generator.manual_seed takes without overflow


def check_sampling_values(cfg: Any = None, seed: Any = 0) -> None:
    """``cfg`` (classifier-free guidance) a finite number >= 0 or None, ``seed`` an integer 0 <= seed < 2**63;
    a ConfigError naming the bad one (torch's "Overflow when unpacking long" or a NaN guidance otherwise)."""
    if cfg is not None and (isinstance(cfg, bool) or not isinstance(cfg, (int, float)) or not 0 <= cfg < math.inf):
        raise ConfigError(f"cfg (classifier-free guidance) must be a finite number >= 0, got {cfg!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise ConfigError(f"seed must be an integer with 0 <= seed < 2**63, got {seed!r}")


# ---------------------------------------------------------------------------- the generator tasks' base
class GeneratorTask(Task):
    """What the generator tasks share: a frozen tokenizer from ``args.tokenizer`` (loaded once, never trained) and
    the class-conditional sample grid ``<name>_samples.png``. ``multi_scale`` says which tokenizers fit: the ar
    task's generators read one code map, VAR and HART read several scales.

    Subclasses' ``Args`` have ``tokenizer``, ``samples_per_class``, ``cfg``, ``top_k`` and ``sample_seed``."""

    multi_scale: ClassVar[bool] = False
    capabilities = frozenset({"sample"})
    # what one sampling step makes when ``steps`` cannot be set (:meth:`_steps_setting`): "token" or "scale"
    one_step_per: ClassVar[str] = "token"

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
        if device is not None and device_of(self._tokenizer) != device:
            self._tokenizer.to(device)
        return self._tokenizer

    def _use_saved_tokenizer(self, model: nn.Module) -> None:
        """Take the tokenizer path saved in the checkpoint when ``args.tokenizer`` does not resolve (a run used
        from another working directory)."""
        saved = unwrap_model(model).pretrained_cfg.get("tokenizer")
        if saved and not (checkpoint_folder(self.args.tokenizer or ".") / "config.json").is_file():
            self.args = dataclasses.replace(self.args, tokenizer=str(saved))
            self._tokenizer = None

    # ------------------------------------------------------------------ sampling (capability "sample")
    def configure_sampling(self, model: nn.Module, steps: int | None = None, cfg: float | None = None,
                           top_k: int | None = None, seed: int = 0, **settings: Any) -> None:
        """Override the run's sampling settings before :meth:`sample_images`.

        ``seed`` is the sampling seed; ``cfg`` / ``top_k`` replace the run's when given; ``steps`` sets what
        :meth:`_steps_setting` says (MaskGIT steps of a masked-order ar generator, HART's diffusion steps) and is
        a ConfigError for the others; ``settings`` are further task arguments (``temperature``, ``top_p``), a bad
        one a ConfigError. The tokenizer is the run's (``args.tokenizer``, else the path saved in the checkpoint)."""
        check_sampling_values(cfg=cfg, seed=seed)
        self._use_saved_tokenizer(model)
        overrides: dict[str, Any] = {"sample_seed": seed, **settings}
        if cfg is not None:
            overrides["cfg"] = cfg
        if top_k is not None:
            overrides["top_k"] = top_k
        if steps is not None:
            overrides.update(self._steps_setting(model, steps))
        before = self.args.tokenizer
        try:
            self.args = dataclasses.replace(self.args, **overrides)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"sampling settings of the {self.name} generator: {e}") from None
        if self.args.tokenizer != before:
            self._tokenizer = None

    def _steps_setting(self, model: nn.Module, steps: int) -> dict[str, int]:
        """The task argument that ``steps`` sets; this generator's steps are fixed (one per token or scale)."""
        raise ConfigError("--steps is for a masked-order ar generator (MaskGIT steps) or hart (diffusion steps); "
                          f"this {self.name} generator takes one step per {self.one_step_per}")

    def sample_images(self, model: nn.Module, labels: torch.Tensor) -> torch.Tensor:
        """Class-conditional samples (labels < 0: unconditional) decoded by the tokenizer, normalised as the
        model's ``pretrained_cfg`` says (what :meth:`write_artifacts` and ``vitkit sample`` draw)."""
        raise NotImplementedError

    def null_class(self, model: nn.Module) -> int:
        """The class id of unconditional samples: the last row of every generator's class table."""
        return int(unwrap_model(model).num_classes)

    def output_names(self, model: nn.Module) -> list[str]:
        """The classes the generator is conditioned on: the run's class names, else those of the data its tokenizer
        was trained on, else their indices."""
        model = unwrap_model(model)
        names = model.pretrained_cfg.get("class_names")
        if not names:
            self._use_saved_tokenizer(model)
            names = self.tokenizer().pretrained_cfg.get("source_classes") or [str(i) for i in range(model.num_classes)]
        return [str(n) for n in list(names)[:model.num_classes]]

    # ------------------------------------------------------------------ pictures
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


# ---------------------------------------------------------------------------- vitkit sample
def class_index(class_name: str, names: list[str]) -> int:
    """A class name (case-insensitive) or index -> its index; ``none`` = the null class (unconditional, -1)."""
    text = str(class_name).strip()
    if text.lower() in ("none", "null", "uncond", "unconditional"):
        return -1
    lowered = [str(n).lower() for n in names]
    if text.lower() in lowered:
        return lowered.index(text.lower())
    # an index: decimal digits only ("²" is a digit to str.isdigit but not to int; "--5" strips to one)
    if re.fullmatch(r"-?\d{1,18}", text) and 0 <= int(text) < len(names):
        return int(text)
    raise ConfigError(f"unknown class {class_name!r}; the generator's classes: "
                      f"{', '.join(f'{i}={n}' for i, n in enumerate(names))} (or 'none': unconditional)")


def save_image_grid(images01: torch.Tensor, path: str | Path, nrow: int = 8, pad: int = 2) -> Path:
    """A PNG of the images (N, C, H, W) in [0, 1], ``nrow`` per row, ``pad`` black pixels between them: the pixels
    themselves, no axes (a plot would resample them). ``path`` may also end in .jpg/.jpeg/.webp
    (:data:`~vitkit.data.image_io.WRITE_FORMATS`); another extension is a ConfigError."""
    from PIL import Image

    from ..data.image_io import image_write_format
    from ..utils import atomic_write, check_output_path

    fmt = image_write_format(path)
    check_output_path(path, create_parent=True, what="image grid")  # no FIFO or device replaced by a file
    n, c, h, w = images01.shape
    rows = math.ceil(n / nrow)
    cols = min(n, nrow)
    grid = torch.zeros(c, rows * (h + pad) + pad, cols * (w + pad) + pad)
    for i, img in enumerate(images01.float().cpu().clamp(0, 1)):
        r, k = divmod(i, nrow)
        grid[:, pad + r * (h + pad):pad + r * (h + pad) + h, pad + k * (w + pad):pad + k * (w + pad) + w] = img
    pixels = (grid * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    image = Image.fromarray(pixels[..., 0] if c == 1 else pixels, mode="L" if c == 1 else "RGB")
    atomic_write(path, lambda tmp: image.save(tmp, format=fmt))
    return Path(path)


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
