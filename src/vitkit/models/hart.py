"""HART (Tang et al., 2024, "HART: Efficient Visual Generation with Hybrid Autoregressive Transformer"): VAR's
next-scale transformer plus a small residual diffusion head, over hybrid tokens.

Hybrid tokens (:func:`hybrid_tokens`): the tokenizer's continuous latent f is split losslessly into VAR's
discrete multi-scale tokens, whose cumulative sum is f̂, and a continuous residual r = f − f̂ (same shape as f):

    f = f̂(idx_1, ..., idx_K) + r

The transformer (a :class:`~vitkit.models.var.VAR`, same parameters and names) predicts the discrete tokens
scale by scale exactly as VAR does. At the last scale, each token's last hidden state h, plus a learned embedding
of that position's token, conditions a small MLP diffusion model (:mod:`vitkit.layers.diffusion`) of the
residual at that position:

    z = LayerNorm(h + token_embed(idx_K))      r ~ p(r | z)      (``decoder_norm``, ``diffloss`` as officially)

Training (:meth:`HART.training_loss`): cross-entropy on all L tokens, as VAR, and the denoising loss of r given z
(each last-scale token repeated ``diffusion_batch_mul`` times with its own timestep/noise, as MAR/HART).
Sampling (:meth:`HART.sample`): VAR's KV-cached, classifier-free-guided next-scale loop, then a few diffusion steps
per last-scale token (guided with the last scale's CFG weight), then decode f̂ + r.

Tokenizer side: the tokenizer is VAR's :class:`~vitkit.models.vqvae.MultiScaleVQVAE`, composed, not changed.
HART trains its tokenizer so the decoder works on both f̂ and f (alternating, :func:`hybrid_vqvae_loss`); a
VQ-VAE trained on f̂ alone still splits losslessly but its decoder was never shown f.

Relation to the official code (mit-han-lab/hart, text-to-image only, CUDA kernels for fused LayerNorm/RoPE, Qwen
text encoder). This is a class-conditional, CPU-only re-implementation; there are no reference vectors, and:

* The residual is f − f̂ with VAR's f̂ (φ applied at every scale). The official hybrid quantiser skips φ at the
  last scale, so its residual is f − f̂_{K−1} − e(idx_K); the split is lossless either way.
* The diffusion condition adds a learned ``diff_token_embed(idx_K)``; the official adds
  ``word_embed(codebook[idx_K])``, which needs the tokenizer's codebook inside the transformer. A learned table can
  represent that one and keeps training tokenizer-free, as VAR's is.
* Training conditions the diffusion on the ground-truth last-scale tokens; the official samples them from the
  predicted logits (and subtracts the sampled code from the target). It also trains the last scale MAR-style with
  random masking and can sample it in several MaskGIT iterations; here the last scale is one step, as VAR (the
  official default of ``num_maskgit_iters=1`` at sampling time).
* The diffusion head has a fixed variance and v-prediction by default (see :mod:`vitkit.layers.diffusion`);
  ``diff_prediction="eps", diff_target_scale=0.6, diff_clip_x0=1.0`` is the official setting.
* No fused kernels: attention is VAR's (``torch`` scaled-dot-product), LayerNorm is ``nn.LayerNorm``.
"""

from __future__ import annotations

import random
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data.constants import FMNIST_CLASSES
from ..errors import InputShapeError
from ..layers.diffusion import PREDICTIONS, SAMPLERS, SCHEDULES, DiffusionHead
from ._registry import register_config
from .var import VAR, VAR_FMNIST_TINY
from .vqvae import OFFICIAL_PATCH_NUMS, MultiScaleVQVAE, VQVAEOutput


# ---------------------------------------------------------------------- tokenizer side (composes MultiScaleVQVAE)
@torch.no_grad()
def hybrid_tokens(vae: MultiScaleVQVAE, img: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Images -> (per-scale token indices [(B, pn²)], residual r = f − f̂ (B, z_channels, h, w)).

    f̂ is rebuilt from the indices (``idx_to_fhat``), i.e. exactly what decoding sampled tokens produces, so
    ``vae.idx_to_fhat(idx, last_one=True) + r`` equals the encoder's f up to float rounding.
    """
    f = vae.encode(img).float()
    idx = vae.f_to_idx_or_fhat(f, to_fhat=False)
    return idx, f - vae.idx_to_fhat(idx, last_one=True)


@torch.no_grad()
def hart_training_inputs(vae: MultiScaleVQVAE, img: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What :meth:`HART.training_loss` takes for a batch of images: (x_BLCv_wo_first_l (B, L − pn₀², C),
    gt_idx (B, L), residual (B, C, h, w))."""
    idx, residual = hybrid_tokens(vae, img)
    return vae.idx_to_var_input(idx), torch.cat(idx, dim=1), residual


def hybrid_vqvae_loss(vae: MultiScaleVQVAE, img: torch.Tensor, discrete_prob: float = 0.5,
                      generator: random.Random | None = None) -> VQVAEOutput:
    """HART's alternating tokenizer training step: with probability ``discrete_prob`` the decoder sees the
    straight-through f̂ (VAR's training step), otherwise the continuous f itself; the VQ loss is always added.

    One coin per batch, as the official ``skip_continuous_prob`` (drawn from ``generator`` or ``random``).
    Returns :class:`~vitkit.models.vqvae.VQVAEOutput` (loss = MSE(rec, img) + vq_loss).
    """
    if not 0 <= discrete_prob <= 1:
        raise ValueError(f"discrete_prob={discrete_prob!r} must be in [0, 1]")
    f = vae.encode(img)
    f_hat, vq_loss = vae.quantize(f)
    discrete = (generator or random).random() < discrete_prob
    rec = vae.decode((f_hat if discrete else f.float()).to(img.dtype))
    return VQVAEOutput(F.mse_loss(rec, img) + vq_loss, rec, vq_loss)


# ---------------------------------------------------------------------- the model
class HART(VAR):
    """VAR + residual diffusion: ``forward(label_B, x_BLCv_wo_first_l) -> logits`` (exactly VAR's),
    ``training_loss(...) -> (CE, diffusion loss)``, ``sample(B, ...) -> images``.

    ``residual_diffusion=False`` builds no diffusion head: the model is then VAR (same state, same logits and
    samples). The ``diff_*`` arguments configure the head (:class:`~vitkit.layers.diffusion.DiffusionHead`).
    """

    default_task = "hart"  # the task a checkpoint without a recorded one (converted) is used with

    def __init__(
        self,
        vocab_size: int = 4096,
        c_vae: int = 32,
        patch_nums: tuple[int, ...] = OFFICIAL_PATCH_NUMS,
        num_classes: int = 1000,
        depth: int = 16,
        embed_dim: int = 1024,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-6,
        shared_aln: bool = False,
        cond_drop_rate: float = 0.1,
        attn_l2_norm: bool = True,
        residual_diffusion: bool = True,
        diff_width: int = 1024,
        diff_depth: int = 6,
        diff_timesteps: int = 1000,
        diff_schedule: str = "cosine",
        diff_prediction: str = "v",
        diff_sampling_steps: int = 8,
        diff_sampler: str = "ddpm",
        diff_target_scale: float = 1.0,
        diff_clip_x0: float | None = None,
        diffusion_batch_mul: int = 4,
    ) -> None:
        super().__init__(vocab_size, c_vae, patch_nums, num_classes, depth, embed_dim, num_heads, mlp_ratio,
                         drop_rate, attn_drop_rate, drop_path_rate, norm_eps, shared_aln, cond_drop_rate,
                         attn_l2_norm)
        bad = []
        if not isinstance(diffusion_batch_mul, int) or isinstance(diffusion_batch_mul, bool) or diffusion_batch_mul < 1:
            bad.append(f"diffusion_batch_mul={diffusion_batch_mul!r} (a positive integer)")
        for name, value, choices in (("diff_schedule", diff_schedule, SCHEDULES),
                                     ("diff_prediction", diff_prediction, PREDICTIONS),
                                     ("diff_sampler", diff_sampler, SAMPLERS)):
            if value not in choices:
                bad.append(f"{name}={value!r} (one of {choices})")
        if bad:
            raise ValueError("invalid HART argument(s): " + ", ".join(bad))
        self.residual_diffusion = bool(residual_diffusion)
        self.diffusion_batch_mul = diffusion_batch_mul
        self.last_l = self.patch_nums[-1] ** 2
        if self.residual_diffusion:
            self.decoder_norm = nn.LayerNorm(embed_dim, eps=norm_eps)
            self.diff_token_embed = nn.Embedding(vocab_size, embed_dim)
            nn.init.trunc_normal_(self.diff_token_embed.weight, std=(1 / embed_dim / 3) ** 0.5)
            self.diffloss = DiffusionHead(c_vae, embed_dim, diff_width, diff_depth, diff_timesteps, diff_schedule,
                                          diff_prediction, diff_sampling_steps, diff_sampler, diff_target_scale,
                                          diff_clip_x0)

    def init_weights(self, init_adaln: float = 0.5, init_adaln_gamma: float = 1e-5, init_head: float = 0.02,
                     init_std: float = -1) -> None:
        """VAR's initialisation for the transformer (the constructor runs it before the head exists), then the
        diffusion head's own (zero output, identity blocks) and fresh norms."""
        super().init_weights(init_adaln, init_adaln_gamma, init_head, init_std)
        if getattr(self, "diffloss", None) is not None:
            self.diffloss.net.initialize_weights()
            self.decoder_norm.reset_parameters()

    # ------------------------------------------------------------------ shared pieces
    def diffusion_condition(self, hidden_last: torch.Tensor, idx_last: torch.Tensor) -> torch.Tensor:
        """z (B, pn_K², C) for the residual diffusion: LayerNorm(last hidden states + token embedding)."""
        return self.decoder_norm(hidden_last.float() + self.diff_token_embed(idx_last))

    def _residual_tokens(self, residual: torch.Tensor, B: int) -> torch.Tensor:
        """The residual as last-scale tokens (B, pn_K², c_vae), from a map (B, c_vae, pn_K, pn_K) or tokens."""
        pn = self.patch_nums[-1]
        if residual.ndim == 4 and tuple(residual.shape) == (B, self.c_vae, pn, pn):
            return residual.flatten(2).transpose(1, 2)
        if residual.ndim == 3 and tuple(residual.shape) == (B, pn * pn, self.c_vae):
            return residual
        raise InputShapeError(f"HART expects the residual as (B, {self.c_vae}, {pn}, {pn}) or (B, {pn * pn}, "
                              f"{self.c_vae}) with B = {B}, got {tuple(residual.shape)}")

    # ------------------------------------------------------------------ training
    def training_loss(self, label_B: torch.Tensor, x_BLCv_wo_first_l: torch.Tensor,
                      gt_idx: torch.Tensor | list[torch.Tensor], residual: torch.Tensor,
                      label_smoothing: float = 0.0, generator: torch.Generator | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean cross-entropy over all L tokens, mean residual-diffusion loss) for one teacher-forced batch.

        ``gt_idx``: the token indices (B, L) or per scale [(B, pn²)]; ``residual``: r = f − f̂ as a map
        (B, c_vae, h, w) or last-scale tokens (B, h·w, c_vae) (see :func:`hart_training_inputs`). The diffusion
        loss is 0 (a tensor) without a diffusion head. ``generator`` draws the diffusion timesteps and noise.
        """
        hidden, cond = self.forward_hidden(label_B, x_BLCv_wo_first_l)
        B = hidden.shape[0]
        gt = torch.cat(list(gt_idx), dim=1) if isinstance(gt_idx, (list, tuple)) else gt_idx
        if not isinstance(gt, torch.Tensor) or tuple(gt.shape) != (B, self.L) or gt.is_floating_point():
            shape = tuple(gt.shape) if isinstance(gt, torch.Tensor) else type(gt).__name__
            raise InputShapeError(f"HART expects gt_idx as (B, {self.L}) integer token ids, got {shape}")
        logits = self.get_logits(hidden, cond)
        ce = F.cross_entropy(logits.reshape(-1, self.vocab_size), gt.reshape(-1), label_smoothing=label_smoothing)
        target = self._residual_tokens(residual, B)
        if not self.residual_diffusion:
            return ce, logits.new_zeros(())
        z = self.diffusion_condition(hidden[:, -self.last_l:], gt[:, -self.last_l:])
        mul = self.diffusion_batch_mul
        diff = self.diffloss(target.reshape(-1, self.c_vae).float().repeat(mul, 1),
                             z.reshape(-1, self.embed_dim).repeat(mul, 1), generator=generator)
        return ce, diff

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(
        self,
        B: int,
        labels: int | torch.Tensor | None = None,
        cfg: float = 1.5,
        top_k: int = 0,
        diffusion_steps: int | None = None,
        generator: torch.Generator | None = None,
        vae: MultiScaleVQVAE | None = None,
        top_p: float = 0.0,
        temperature: float = 1.0,
        sampler: str | None = None,
        eta: float = 0.0,
        return_parts: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """Sample B images in [0, 1] (B, C, H, W): VAR's guided next-scale loop, then the residual by diffusion.

        ``labels``/``cfg``/``top_k``/``top_p`` as :meth:`VAR.autoregressive_infer_cfg` (the guidance weight at
        scale k is cfg·k/(K−1), so the diffusion, at the last scale, is guided with ``cfg``). ``diffusion_steps``
        (default the configured ``diff_sampling_steps``; 0 = no residual, the discrete image), ``temperature``,
        ``sampler`` and ``eta`` go to the diffusion sampler. One ``generator`` drives labels, tokens and noise,
        so a seeded generator reproduces the samples. ``vae`` defaults to the attached one. ``return_parts``
        also returns the sampled indices [(B, pn²)] and the residual (B, c_vae, h, w).
        """
        vae = self.sampling_vae(vae)
        label_B = self.sampling_labels(B, labels, generator, self.pos_1LC.device)
        f_hat, sampled, hidden = self.sample_scales(vae, label_B, cfg, top_k, top_p, generator)
        residual = torch.zeros_like(f_hat)
        if self.residual_diffusion and diffusion_steps != 0:
            steps = self.diffloss.sampling_steps if diffusion_steps is None else diffusion_steps
            idx_last = sampled[-1].repeat(2, 1)  # the same sampled tokens condition both halves, as officially
            z = self.diffusion_condition(hidden, idx_last).reshape(2, B * self.last_l, self.embed_dim)
            r = self.diffloss.sample(z[0], steps=steps, temperature=temperature, cfg=cfg, uncond=z[1],
                                     generator=generator, sampler=sampler, eta=eta)
            residual = r.view(B, self.last_l, self.c_vae).transpose(1, 2).reshape_as(f_hat)
        img = vae.fhat_to_img(f_hat + residual).add_(1).mul_(0.5)
        return (img, sampled, residual) if return_parts else img


# ---------------------------------------------------------------------- registered configurations
# Fashion-MNIST, on vqvae_fmnist_tiny (7×7×16 latent, scales 1, 2, 3, 4, 5, 7): var_fmnist_tiny's transformer
# (4 blocks of width 128) plus a 3-block, width-128 residual diffusion head sampled in 8 steps.
HART_FMNIST_TINY: dict[str, Any] = dict(
    VAR_FMNIST_TINY, diff_width=128, diff_depth=3, diff_sampling_steps=8, diffusion_batch_mul=4,
)
register_config("hart_fmnist_tiny", HART, {"class_names": FMNIST_CLASSES}, **HART_FMNIST_TINY)
