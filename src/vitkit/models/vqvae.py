"""The VQ tokenizers of the generators: the multi-scale residual VQ-VAE of VAR (Tian et al., NeurIPS 2024, "Visual
Autoregressive Modeling"), which turns an image into K token maps of growing size (1×1, 2×2, ..., h×w) for
next-scale prediction, and its one-scale case :class:`SingleScaleVQVAE`, a plain VQ-VAE (one h×w code map) for
the token generators of :mod:`vitkit.models.ar`.

image -> Encoder (:mod:`vitkit.layers.conv_codec`) -> quant_conv -> f (B, C, h, w)
f -> K residual quantisation steps -> f̂ ≈ f -> post_quant_conv -> Decoder -> image

One quantisation step at scale k (``MultiScaleQuantizer``): area-downsample the residual ``f - f̂`` to pn_k × pn_k
(the last scale uses it as it is), take the nearest code of every position, upsample the code map bicubically back
to h × w (except the last), refine it with φ_k(z) = (1 - r)·z + r·conv3×3(z), add it to f̂. With K scales and
``share_quant_resi`` = 4, four φ convolutions are shared: scale k uses the one whose tick is nearest to k/(K-1).

Layout (the official code at FoundationVision/VAR, ``models/vqvae.py``, ``quant.py``, ``basic_vae.py``; its
weights load through ``vitkit convert var-vqvae``):

* Encoder/decoder module names are the official ones (``encoder.down.0.block.1.conv2`` ...). The official VQVAE
  hard-codes ``ch_mult=(1, 1, 2, 2, 4)``, ``num_res_blocks=2``, 3 input channels; here they are arguments.
* The φ convolutions are one list ``quantize.phi.{k}`` whatever the sharing mode; the official names
  (``quant_resi.qresi_ls.k``, ``quant_resi.qresi``, ``quant_resi.k``) are renamed by the converter.
* ``forward(img)`` is the training step: the official ``VectorQuantizer2.forward`` (straight-through f̂, the
  β-weighted commitment + codebook loss averaged over scales, codebook-hit EMA) plus a plain MSE reconstruction
  term in ``loss``. The EMA is updated whenever the model trains (the official only does so under
  ``torch.distributed``, which its training always uses).
* Images are expected in [-1, 1] (``pretrained_cfg`` mean = std = 0.5); decoded images are clamped to [-1, 1].
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputShapeError
from ..layers.conv_codec import NORM_GROUPS, Decoder, Encoder
from ..layers.patch_embed import check_image_batch
from ._base import VitkitModel
from ._registry import register_config

OFFICIAL_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


# ---------------------------------------------------------------------- multi-scale residual quantiser
class Phi(nn.Conv2d):
    """φ(h) = (1 - r)·h + r·conv3×3(h): a light refinement of each upsampled code map."""

    def __init__(self, channels: int, resi_ratio: float) -> None:
        super().__init__(channels, channels, kernel_size=3, stride=1, padding=1)
        self.resi_ratio = abs(resi_ratio)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h.mul(1 - self.resi_ratio) + super().forward(h).mul_(self.resi_ratio)


def phi_ticks(count: int) -> np.ndarray:
    """Positions in [0, 1] of ``count`` shared φ layers (the official formula, float64, ties resolved alike)."""
    if count == 4:
        return np.linspace(1 / 3 / count, 1 - 1 / 3 / count, count)
    return np.linspace(1 / 2 / count, 1 - 1 / 2 / count, count)


class MultiScaleQuantizer(nn.Module):
    """Residual quantisation of a feature map into ``len(patch_nums)`` token maps (official ``VectorQuantizer2``).

    ``share_quant_resi``: 0 = one φ per scale (``default_qresi_counts`` or K of them), 1 = one φ for all scales,
    n >= 2 = n φ's shared by nearest tick. ``quant_resi`` ≈ 0 replaces every φ by the identity.
    """

    def __init__(self, vocab_size: int, c_vae: int, patch_nums: tuple[int, ...], using_znorm: bool = False,
                 beta: float = 0.25, quant_resi: float = 0.5, share_quant_resi: int = 4,
                 default_qresi_counts: int = 0) -> None:
        super().__init__()
        if len(patch_nums) < 1:
            raise ValueError("patch_nums must hold at least one scale (one scale is a plain VQ-VAE)")
        if share_quant_resi < 0:
            raise ValueError(f"share_quant_resi={share_quant_resi} must be >= 0")
        self.vocab_size, self.c_vae, self.patch_nums = vocab_size, c_vae, tuple(patch_nums)
        self.using_znorm, self.beta = using_znorm, beta
        count = {0: default_qresi_counts or len(patch_nums), 1: 1}.get(share_quant_resi, share_quant_resi)
        self.phi = nn.ModuleList([Phi(c_vae, quant_resi) if abs(quant_resi) > 1e-6 else nn.Identity()
                                  for _ in range(count)])
        self.ticks = phi_ticks(count)
        self.embedding = nn.Embedding(vocab_size, c_vae)
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(patch_nums), vocab_size))
        self.record_hit = 0  # how many EMA updates so far (not saved, as in the official code)

    @torch.no_grad()
    def init_codebook(self, eini: float) -> None:
        """The official ``eini`` option for training from scratch: > 0 = truncated normal with std ``eini``,
        < 0 = uniform in ±|eini|/vocab_size, 0 = keep ``nn.Embedding``'s N(0, 1)."""
        if eini > 0:
            nn.init.trunc_normal_(self.embedding.weight, std=eini)
        elif eini < 0:
            self.embedding.weight.uniform_(-abs(eini) / self.vocab_size, abs(eini) / self.vocab_size)

    def phi_index(self, si: int, num_scales: int) -> int:
        """Which φ scale ``si`` of ``num_scales`` uses: the nearest tick to si / (K - 1)."""
        if len(self.phi) == 1 or num_scales == 1:
            return 0
        return int(np.argmin(np.abs(self.ticks - si / (num_scales - 1))))

    def apply_phi(self, h: torch.Tensor, si: int, num_scales: int) -> torch.Tensor:
        return self.phi[self.phi_index(si, num_scales)](h)

    # ------------------------------------------------------------------ one scale
    def nearest_codes(self, z_NC: torch.Tensor) -> torch.Tensor:
        """(N, C) -> (N,) code indices: argmin ‖z‖² + ‖e‖² − 2 z·e, or argmax cosine with ``using_znorm``."""
        codes = self.embedding.weight.detach()
        if self.using_znorm:
            return torch.argmax(F.normalize(z_NC, dim=-1) @ F.normalize(codes.T, dim=0), dim=1)
        dist = z_NC.square().sum(dim=1, keepdim=True) + codes.square().sum(dim=1)
        dist.addmm_(z_NC, codes.T, alpha=-2, beta=1)
        return torch.argmin(dist, dim=1)

    def _residual_step(self, f_rest: torch.Tensor, si: int, pn: int, num_scales: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantise the residual at scale ``si``: (code indices (B, pn²), φ(upsampled codes) (B, C, H, W))."""
        B, C, H, W = f_rest.shape
        last = si == num_scales - 1
        z = f_rest if last else F.interpolate(f_rest, size=(pn, pn), mode="area")
        idx_N = self.nearest_codes(z.permute(0, 2, 3, 1).reshape(-1, C))
        h = self.embedding(idx_N.view(B, pn, pn)).permute(0, 3, 1, 2)
        if not last:
            h = F.interpolate(h, size=(H, W), mode="bicubic")
        return idx_N.view(B, pn * pn), self.apply_phi(h.contiguous(), si, num_scales)

    def _check_latent(self, f: torch.Tensor, patch_nums: tuple[int, ...]) -> None:
        if f.ndim != 4 or f.shape[1] != self.c_vae or tuple(f.shape[-2:]) != (patch_nums[-1], patch_nums[-1]):
            raise InputShapeError(f"the quantiser expects features (B, {self.c_vae}, {patch_nums[-1]}, "
                                  f"{patch_nums[-1]}) (the last patch_num is the latent size), got {tuple(f.shape)}")

    # ------------------------------------------------------------------ training
    def forward(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(straight-through f̂, vq loss) for a feature map f; gradients reach the encoder through f̂ and the
        codebook and φ's through ``‖f̂ − sg(f)‖²``. In training mode the per-scale code-hit EMA is updated."""
        f = f.float()
        self._check_latent(f, self.patch_nums)
        f_no_grad = f.detach()
        f_rest = f_no_grad.clone()
        f_hat = torch.zeros_like(f_rest)
        num_scales = len(self.patch_nums)
        vq_loss = f.new_zeros(())
        with torch.autocast(device_type=f.device.type, enabled=False):
            for si, pn in enumerate(self.patch_nums):
                idx, h = self._residual_step(f_rest, si, pn, num_scales)
                f_hat = f_hat + h
                f_rest = f_rest - h.detach()
                if self.training:
                    self._record_hits(si, idx.flatten().bincount(minlength=self.vocab_size).float())
                vq_loss = vq_loss + (F.mse_loss(f_hat.detach(), f).mul_(self.beta) + F.mse_loss(f_hat, f_no_grad))
            vq_loss = vq_loss * (1.0 / num_scales)
            f_hat = (f_hat.detach() - f_no_grad) + f  # straight-through: the value of f̂, the gradient of f
        return f_hat, vq_loss

    @torch.no_grad()
    def _record_hits(self, si: int, hits: torch.Tensor) -> None:
        ema = self.ema_vocab_hit_SV[si]
        if self.record_hit == 0:
            ema.copy_(hits)
        elif self.record_hit < 100:
            ema.mul_(0.9).add_(hits.mul(0.1))
        else:
            ema.mul_(0.99).add_(hits.mul(0.01))
        self.record_hit += 1  # counted per scale, as the official code does

    def usages(self, tokens_per_step: int, world_size: int = 1) -> list[float]:
        """Percent of codes per scale whose hit EMA is at least 8% of a uniform share of ``tokens_per_step``
        (B·h·w of one training batch, times ``world_size`` data-parallel processes), as the official reports."""
        margin = world_size * tokens_per_step / self.vocab_size * 0.08
        return [(row >= margin).float().mean().item() * 100 for row in self.ema_vocab_hit_SV]

    # ------------------------------------------------------------------ inference
    def f_to_idx_or_fhat(self, f: torch.Tensor, to_fhat: bool, patch_nums: tuple[int, ...] | None = None
                         ) -> list[torch.Tensor]:
        """Per scale: the code indices (B, pn²), or with ``to_fhat`` the cumulative f̂ (B, C, h, w) after it."""
        patch_nums = tuple(patch_nums or self.patch_nums)
        self._check_latent(f, patch_nums)
        f_rest = f.detach().clone()
        f_hat = torch.zeros_like(f_rest)
        out = []
        for si, pn in enumerate(patch_nums):
            idx, h = self._residual_step(f_rest, si, pn, len(patch_nums))
            f_hat = f_hat + h
            f_rest = f_rest - h
            out.append(f_hat if to_fhat else idx)
        return out

    def idx_to_embeddings(self, idx_list: list[torch.Tensor]) -> list[torch.Tensor]:
        """Code maps (B, C, pn, pn) of per-scale indices (B, pn²)."""
        maps = []
        for idx in idx_list:
            pn = round(idx.shape[1] ** 0.5)
            maps.append(self.embedding(idx).transpose(1, 2).reshape(idx.shape[0], self.c_vae, pn, pn))
        return maps

    def embed_to_fhat(self, ms_h: list[torch.Tensor], same_shape: bool = True, last_one: bool = False
                      ) -> list[torch.Tensor] | torch.Tensor:
        """Cumulative f̂ from per-scale code maps (B, C, pn, pn).

        ``same_shape`` (what training and inference use): every map is upsampled to the last size before φ.
        Otherwise (experimental in the official code) f̂ itself grows scale by scale and φ acts at each size.
        """
        num_scales = len(self.patch_nums)  # φ follows the configured scales, even for a prefix of them
        out: list[torch.Tensor] = []
        if same_shape:
            size = self.patch_nums[-1]
            f_hat = ms_h[0].new_zeros(ms_h[0].shape[0], self.c_vae, size, size, dtype=torch.float32)
            for si, h in enumerate(ms_h):
                if si < num_scales - 1:
                    h = F.interpolate(h, size=(size, size), mode="bicubic")
                f_hat = f_hat + self.apply_phi(h, si, num_scales)
                out.append(f_hat)
        else:
            pn0 = self.patch_nums[0]
            f_hat = ms_h[0].new_zeros(ms_h[0].shape[0], self.c_vae, pn0, pn0, dtype=torch.float32)
            for si, (pn, h) in enumerate(zip(self.patch_nums, ms_h)):
                f_hat = F.interpolate(f_hat, size=(pn, pn), mode="bicubic")
                f_hat = f_hat + self.apply_phi(h, si, num_scales)
                out.append(f_hat)
        return out[-1] if last_one else out

    def idx_to_var_input(self, idx_list: list[torch.Tensor]) -> torch.Tensor | None:
        """VAR's teacher-forcing input (B, L − pn₀², C): after each of the first K−1 scales, f̂ area-downsampled to
        the next scale's size and flattened (official ``idxBl_to_var_input``)."""
        B, C, size = idx_list[0].shape[0], self.c_vae, self.patch_nums[-1]
        num_scales = len(self.patch_nums)
        f_hat = idx_list[0].new_zeros(B, C, size, size, dtype=torch.float32)
        next_scales = []
        for si in range(num_scales - 1):
            pn, pn_next = self.patch_nums[si], self.patch_nums[si + 1]
            h = self.embedding(idx_list[si]).transpose(1, 2).reshape(B, C, pn, pn)
            f_hat = f_hat + self.apply_phi(F.interpolate(h, size=(size, size), mode="bicubic"), si, num_scales)
            next_map = F.interpolate(f_hat, size=(pn_next, pn_next), mode="area")
            next_scales.append(next_map.view(B, C, -1).transpose(1, 2))
        return torch.cat(next_scales, dim=1) if next_scales else None

    def next_autoregressive_input(self, si: int, f_hat: torch.Tensor, h: torch.Tensor
                                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """One step of VAR sampling: add scale ``si``'s code map ``h`` (B, C, pn, pn) to f̂; return (f̂, f̂ at the
        next scale's size) — the next scale's input (f̂ itself after the last scale)."""
        num_scales, size = len(self.patch_nums), self.patch_nums[-1]
        if si != num_scales - 1:
            f_hat = f_hat + self.apply_phi(F.interpolate(h, size=(size, size), mode="bicubic"), si, num_scales)
            pn_next = self.patch_nums[si + 1]
            return f_hat, F.interpolate(f_hat, size=(pn_next, pn_next), mode="area")
        f_hat = f_hat + self.apply_phi(h, si, num_scales)
        return f_hat, f_hat


# ---------------------------------------------------------------------- the model
class VQVAEOutput(NamedTuple):
    loss: torch.Tensor  # scalar: MSE(reconstruction, image) + vq_loss
    rec: torch.Tensor  # (B, C, H, W) decoded straight-through f̂ (not clamped)
    vq_loss: torch.Tensor  # scalar: mean over scales of β·‖sg(f̂) − f‖² + ‖f̂ − sg(f)‖² (official VectorQuantizer2)


class MultiScaleVQVAE(VitkitModel):
    """VAR's tokenizer: ``img_to_idx(images) -> [(B, pn²) per scale]``, ``idx_to_img(indices) -> images``.

    Images are (B, in_channels, pn_K·2^(levels−1), same) in [-1, 1]. ``forward(images)`` is a training step
    returning :class:`VQVAEOutput`.
    """

    default_task = "vq"  # the task a checkpoint without a recorded one (converted) is used with

    head_prefixes = ()  # no classifier: the codebook size is part of the architecture

    def __init__(
        self,
        vocab_size: int = 4096,
        z_channels: int = 32,
        ch: int = 160,
        ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        in_channels: int = 3,
        dropout: float = 0.0,
        using_sa: bool = True,
        using_mid_sa: bool = True,
        beta: float = 0.25,
        using_znorm: bool = False,
        quant_conv_ks: int = 3,
        quant_resi: float = 0.5,
        share_quant_resi: int = 4,
        default_qresi_counts: int = 0,
        patch_nums: tuple[int, ...] = OFFICIAL_PATCH_NUMS,
    ) -> None:
        super().__init__()
        ch_mult, patch_nums = tuple(ch_mult), tuple(patch_nums)
        sizes = dict(vocab_size=vocab_size, z_channels=z_channels, ch=ch, in_channels=in_channels,
                     quant_conv_ks=quant_conv_ks, num_res_blocks=num_res_blocks)
        bad = [f"{k}={v!r}" for k, v in sizes.items() if not isinstance(v, int) or isinstance(v, bool) or v < 1]
        if not ch_mult or any(not isinstance(m, int) or m < 1 for m in ch_mult):
            bad.append(f"ch_mult={list(ch_mult)}")
        if not patch_nums or any(not isinstance(p, int) or p < 1 for p in patch_nums):
            bad.append(f"patch_nums={list(patch_nums)}")
        if bad:
            raise ValueError("invalid MultiScaleVQVAE argument(s) (positive integers expected): " + ", ".join(bad))
        if ch % NORM_GROUPS:
            raise ValueError(f"ch={ch} must be a multiple of {NORM_GROUPS} (GroupNorm with {NORM_GROUPS} groups)")
        if quant_conv_ks % 2 == 0:
            raise ValueError(f"quant_conv_ks={quant_conv_ks} must be odd (the convolution keeps the size)")
        self.vocab_size, self.c_vae, self.in_channels, self.patch_nums = vocab_size, z_channels, in_channels, patch_nums
        self.downsample = 2 ** (len(ch_mult) - 1)
        self.img_size = patch_nums[-1] * self.downsample
        coder = dict(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, z_channels=z_channels, dropout=dropout,
                     using_sa=using_sa, using_mid_sa=using_mid_sa)
        self.encoder = Encoder(in_channels=in_channels, **coder)
        self.decoder = Decoder(out_channels=in_channels, **coder)
        self.quantize = MultiScaleQuantizer(vocab_size, z_channels, patch_nums, using_znorm, beta, quant_resi,
                                            share_quant_resi, default_qresi_counts)
        self.quant_conv = nn.Conv2d(z_channels, z_channels, quant_conv_ks, padding=quant_conv_ks // 2)
        self.post_quant_conv = nn.Conv2d(z_channels, z_channels, quant_conv_ks, padding=quant_conv_ks // 2)
        self.pretrained_cfg = {"input_size": (in_channels, self.img_size, self.img_size),
                               "mean": (0.5,) * in_channels, "std": (0.5,) * in_channels, "interpolation": "bicubic"}

    # ------------------------------------------------------------------ pieces
    def encode(self, img: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] -> continuous features f (B, z_channels, H / down, W / down)."""
        check_image_batch(img, self.in_channels, (self.downsample, self.downsample), None, type(self).__name__)
        return self.quant_conv(self.encoder(img))

    def decode(self, f_hat: torch.Tensor) -> torch.Tensor:
        """Features (B, z_channels, h, w) -> images, not clamped."""
        return self.decoder(self.post_quant_conv(f_hat))

    def fhat_to_img(self, f_hat: torch.Tensor) -> torch.Tensor:
        return self.decode(f_hat).clamp_(-1, 1)

    def _check_size(self, img: torch.Tensor, patch_nums: tuple[int, ...] | None) -> None:
        size = (patch_nums or self.patch_nums)[-1] * self.downsample
        if img.ndim == 4 and tuple(img.shape[-2:]) != (size, size):
            raise InputShapeError(f"{type(self).__name__} quantises {size}x{size} images (last patch_num "
                                  f"{(patch_nums or self.patch_nums)[-1]} × {self.downsample}), got "
                                  f"{img.shape[-2]}x{img.shape[-1]}")

    # ------------------------------------------------------------------ training
    def forward(self, img: torch.Tensor) -> VQVAEOutput:
        self._check_size(img, None)
        f_hat, vq_loss = self.quantize(self.encode(img))
        rec = self.decode(f_hat.to(img.dtype))
        return VQVAEOutput(F.mse_loss(rec, img) + vq_loss, rec, vq_loss)

    # ------------------------------------------------------------------ tokenizer API (official names in brackets)
    def img_to_idx(self, img: torch.Tensor, patch_nums: tuple[int, ...] | None = None) -> list[torch.Tensor]:
        """Token indices (B, pn²) per scale, coarse to fine [``img_to_idxBl``]."""
        self._check_size(img, patch_nums)
        return self.quantize.f_to_idx_or_fhat(self.encode(img), to_fhat=False, patch_nums=patch_nums)

    def f_to_idx_or_fhat(self, f: torch.Tensor, to_fhat: bool, patch_nums: tuple[int, ...] | None = None
                         ) -> list[torch.Tensor]:
        """Per scale: indices (B, pn²), or cumulative f̂ with ``to_fhat`` [``quantize.f_to_idxBl_or_fhat``]."""
        return self.quantize.f_to_idx_or_fhat(f, to_fhat, patch_nums)

    def idx_to_fhat(self, idx_list: list[torch.Tensor], same_shape: bool = True, last_one: bool = False
                    ) -> list[torch.Tensor] | torch.Tensor:
        """Cumulative f̂ after each scale (or the final one) from per-scale indices [``quantize.embed_to_fhat``]."""
        return self.quantize.embed_to_fhat(self.quantize.idx_to_embeddings(idx_list), same_shape, last_one)

    def idx_to_img(self, idx_list: list[torch.Tensor], same_shape: bool = True, last_one: bool = False
                   ) -> list[torch.Tensor] | torch.Tensor:
        """Images in [-1, 1] decoded after each scale, or only the final one with ``last_one`` [``idxBl_to_img``]."""
        f_hats = self.idx_to_fhat(idx_list, same_shape, last_one)
        return self.fhat_to_img(f_hats) if last_one else [self.fhat_to_img(f) for f in f_hats]

    def img_to_reconstructed_img(self, img: torch.Tensor, patch_nums: tuple[int, ...] | None = None,
                                 last_one: bool = False) -> list[torch.Tensor] | torch.Tensor:
        """Encode, quantise and decode: images after each scale, or only the final one with ``last_one``."""
        self._check_size(img, patch_nums)
        f_hats = self.quantize.f_to_idx_or_fhat(self.encode(img), to_fhat=True, patch_nums=patch_nums)
        return self.fhat_to_img(f_hats[-1]) if last_one else [self.fhat_to_img(f) for f in f_hats]

    def idx_to_var_input(self, idx_list: list[torch.Tensor]) -> torch.Tensor | None:
        """VAR's teacher-forcing input (B, L − pn₀², z_channels) [``quantize.idxBl_to_var_input``]."""
        return self.quantize.idx_to_var_input(idx_list)

    def no_weight_decay(self) -> set[str]:
        return set()


class SingleScaleVQVAE(MultiScaleVQVAE):
    """A plain VQ-VAE (van den Oord et al., 2017) with VAR's encoder and decoder: one quantisation scale, the full
    h×w latent map, so an image is h·w codes — the tokenizer of raster, random-order and masked generation.

    It is :class:`MultiScaleVQVAE` with ``patch_nums=(h,)`` and a single φ (the identity with the default
    ``quant_resi=0``: f̂ is the nearest codes themselves, the classic VQ-VAE), with the same parameter names and
    the same API (``img_to_idx(img)[-1]`` is the (B, h·w) code map, ``idx_to_img([codes], last_one=True)``
    decodes). It only fixes those defaults and checks that there is exactly one scale.
    """

    def __init__(
        self,
        vocab_size: int = 4096,
        z_channels: int = 32,
        ch: int = 160,
        ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        in_channels: int = 3,
        dropout: float = 0.0,
        using_sa: bool = True,
        using_mid_sa: bool = True,
        beta: float = 0.25,
        using_znorm: bool = False,
        quant_conv_ks: int = 3,
        quant_resi: float = 0.0,
        patch_nums: tuple[int, ...] = (16,),
    ) -> None:
        patch_nums = tuple(patch_nums)
        if len(patch_nums) != 1:
            raise ValueError(f"patch_nums={list(patch_nums)}: a single-scale VQ-VAE takes exactly one latent size "
                             f"(use MultiScaleVQVAE for several scales)")
        super().__init__(vocab_size=vocab_size, z_channels=z_channels, ch=ch, ch_mult=ch_mult,
                         num_res_blocks=num_res_blocks, in_channels=in_channels, dropout=dropout, using_sa=using_sa,
                         using_mid_sa=using_mid_sa, beta=beta, using_znorm=using_znorm, quant_conv_ks=quant_conv_ks,
                         quant_resi=quant_resi, share_quant_resi=1, patch_nums=patch_nums)

    @property
    def grid_size(self) -> int:
        return self.patch_nums[0]


# ---------------------------------------------------------------------- registered configurations
# The official tokenizer (vae_ch160v4096z32.pth: 256×256 RGB, 16×16×32 latent, 4096 codes, 10 scales).
register_config("vqvae_var", MultiScaleVQVAE, {"mean": (0.5,) * 3, "std": (0.5,) * 3})
# Fashion-MNIST (28×28 gray): three levels (28 -> 14 -> 7), so the latent is 7×7 and the six scales
# 1, 2, 3, 4, 5, 7 give L = 104 tokens; all four shared φ's are used (scales -> φ 0, 0, 1, 2, 3, 3).
VQVAE_FMNIST_TINY: dict[str, Any] = dict(
    vocab_size=256, z_channels=16, ch=32, ch_mult=(1, 1, 2), num_res_blocks=1, in_channels=1,
    patch_nums=(1, 2, 3, 4, 5, 7),
)
register_config("vqvae_fmnist_tiny", MultiScaleVQVAE, {"mean": (0.5,), "std": (0.5,)}, **VQVAE_FMNIST_TINY)
# Fashion-MNIST (28×28 gray): the encoder/decoder of vqvae_fmnist_tiny (three levels, 28 -> 14 -> 7) with one
# quantisation scale, so an image is a 7×7 map of 49 codes out of 256 (plain VQ: f̂ = the nearest codes); the
# tokenizer of the ar_fmnist_tiny* generators.
VQ_FMNIST_TINY: dict[str, Any] = dict(VQVAE_FMNIST_TINY, patch_nums=(7,))
register_config("vq_fmnist_tiny", SingleScaleVQVAE, {"mean": (0.5,), "std": (0.5,)}, **VQ_FMNIST_TINY)
