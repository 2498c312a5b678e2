"""Masked Autoencoders (He et al., 2022): pretrain a ViT by reconstructing the pixels of masked patches.

image -> patch tokens + fixed 2D sin-cos positions -> keep a random subset (25% by default), per sample, by
sorting uniform noise -> ViT encoder on the visible tokens (+ CLS) only -> Linear to the decoder width ->
mask tokens where patches were dropped, unshuffled into place, + the decoder's sin-cos positions -> a small
transformer decoder -> Linear to the p*p*C pixels of each patch -> mean squared error on the masked patches.

* The encoder is an ordinary :class:`~vitkit.models.vit.VisionTransformer` built from any registered ViT name
  (``encoder``, ``encoder_args``) without a head, so after pretraining it is exactly the classifier's backbone.
  Tokens are dropped at the one place a :class:`~vitkit.models.TokenClassifier` allows it: between
  ``embed_tokens`` (positions already added) and ``run_blocks``. Encoders with per-block or relative positions
  are refused, and so are stems whose tokens see more than their own pixel patch (hybrids, overlapping patches).
* Positions are fixed ``sincos_2d`` with MAE's channel order (``pos_sincos_order='wh'``, column half first);
  the CLS position is zero. That is also the layout of HF ``ViTMAEForPreTraining`` checkpoints.
* ``norm_pix_loss``: the target of each patch is its pixels normalised by the patch's own mean and (unbiased)
  variance, eps 1e-6, the paper's better-representation variant.
* Fine-tuning: ``vitkit.create_model("vit_fmnist_tiny", pretrained=<MAE folder>, num_classes=10)`` loads the
  encoder only (``backbone_prefix``); a learned position table starts from the sin-cos values.

Everything random is in :meth:`MaskedAutoencoderViT.random_masking`; pass ``noise`` (B, L) to fix the masks.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.utils.checkpoint
from torch import nn

from ..data.constants import FMNIST_MEAN, FMNIST_STD, IMAGENET_MEAN, IMAGENET_STD
from ..layers import Block, PatchEmbed, SinCosPosEmbed2D
from ._base import EncoderWrapper
from ._registry import create_model, register_config, registered_class
from .vit import VisionTransformer

NORM_PIX_EPS = 1e-6


class MAEOutput(NamedTuple):
    loss: torch.Tensor  # scalar: mean squared error over the masked patches
    pred: torch.Tensor  # (B, L, p*p*C) predicted pixels (normalised per patch if norm_pix_loss) for every patch
    mask: torch.Tensor  # (B, L) float, 1 = masked (predicted), 0 = visible to the encoder


class MaskedAutoencoderViT(EncoderWrapper):
    """MAE pretraining model: ``model(images) -> MAEOutput(loss, pred, mask)``; ``encode(images)`` -> features."""

    default_task = "mae"  # the task a checkpoint without a recorded one (converted) is used with

    head_prefixes = ()  # no classifier head

    def __init__(
        self,
        encoder: str = "vit_fmnist_tiny",
        encoder_args: dict[str, Any] | None = None,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        decoder_mlp_ratio: float = 4.0,
        decoder_mlp_dim: int | None = None,
        decoder_qkv_bias: bool = True,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = False,
    ) -> None:
        super().__init__()
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        cls = registered_class(encoder)
        if cls is None or not issubclass(cls, VisionTransformer):
            raise ValueError(f"MAE needs a ViT encoder; {encoder!r} is a {getattr(cls, '__name__', 'model')}")
        enc_args = {"pos_embed": "sincos_2d", "pos_sincos_order": "wh", **(encoder_args or {}), "num_classes": 0}
        self.encoder = create_model(encoder, **enc_args)
        self._check_encoder(encoder)
        enc = self.encoder
        self.patch_size: tuple[int, int] = enc.patch_embed.patch_size
        self.in_chans = enc.in_chans
        self.num_prefix_tokens = enc.num_prefix_tokens
        self.num_features = enc.num_features

        self.decoder_embed = nn.Linear(enc.embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = SinCosPosEmbed2D(enc.grid, decoder_embed_dim, enc.num_prefix_tokens,
                                                  order=enc.pos_sincos_order)
        act, eps = enc.model_args.get("act", "gelu"), enc.norm.eps
        self.decoder_blocks = nn.ModuleList([
            Block(decoder_embed_dim, decoder_num_heads, decoder_mlp_ratio, decoder_mlp_dim, decoder_qkv_bias,
                  norm_eps=eps, act=act)
            for _ in range(decoder_depth)
        ])
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=eps)
        self.decoder_pred = nn.Linear(decoder_embed_dim, self.patch_size[0] * self.patch_size[1] * self.in_chans)
        self.grad_checkpointing = False
        self._init_weights()
        cfg = dict(enc.pretrained_cfg)
        cfg.pop("class_names", None)
        self.pretrained_cfg = cfg

    def _check_encoder(self, name: str) -> None:
        enc = self.encoder
        pe = enc.patch_embed
        if not isinstance(pe, PatchEmbed) or pe.stride != pe.patch_size:
            raise ValueError(f"MAE needs non-overlapping pixel patches (stem='patch', patch_stride=patch_size): "
                             f"a masked token must not see its visible neighbours' pixels ({name!r})")
        enc.check_token_dropping()

    def _init_weights(self) -> None:
        """The official MAE initialisation, for the encoder too: xavier-uniform Linears (the patch projection
        as a Linear on flattened patches), zero biases, N(0, 0.02) CLS and mask tokens."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.encoder.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.encoder.patch_embed.proj.bias)
        if self.encoder.cls_token is not None:
            nn.init.normal_(self.encoder.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    # ------------------------------------------------------------------ pixels <-> patches
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, L, ph*pw*C), patches row-major, pixels within a patch (row, col, channel)."""
        b, c, height, width = imgs.shape
        ph, pw = self.patch_size
        if c != self.in_chans or height % ph or width % pw:
            raise ValueError(f"patchify expects (B, {self.in_chans}, H, W) with H, W divisible by {ph}x{pw}, got "
                             f"{tuple(imgs.shape)}")
        h, w = height // ph, width // pw
        x = imgs.reshape(b, c, h, ph, w, pw).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(b, h * w, ph * pw * c)

    def unpatchify(self, patches: torch.Tensor, img_size: tuple[int, int] | None = None) -> torch.Tensor:
        """(B, L, ph*pw*C) -> (B, C, H, W); ``img_size`` defaults to the encoder's."""
        height, width = img_size if img_size is not None else self.encoder.img_size
        ph, pw = self.patch_size
        h, w = height // ph, width // pw
        b, n, _ = patches.shape
        if n != h * w:
            raise ValueError(f"{n} patches do not tile a {height}x{width} image with {ph}x{pw} patches")
        x = patches.reshape(b, h, w, ph, pw, self.in_chans).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, self.in_chans, height, width)

    @staticmethod
    def _patch_stats(target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-patch mean and std (unbiased variance + eps, as MAE and HF) for norm_pix_loss."""
        return target.mean(dim=-1, keepdim=True), (target.var(dim=-1, keepdim=True) + NORM_PIX_EPS).sqrt()

    # ------------------------------------------------------------------ masking
    def random_masking(self, tokens: torch.Tensor, noise: torch.Tensor | None = None,
                       generator: torch.Generator | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keep ``int(L * (1 - mask_ratio))`` tokens per sample: those with the smallest ``noise``.

        ``tokens``: (B, L, D) patch tokens (no prefix). Returns the kept tokens (B, keep, D), in noise order,
        the mask (B, L) with 1 = dropped, and ``ids_restore`` (B, L), the inverse permutation that puts
        [kept, dropped] back into patch order. ``noise`` (B, L) defaults to ``torch.rand`` (with ``generator``).
        """
        B, L, D = tokens.shape
        keep = int(L * (1 - self.mask_ratio))
        if noise is None:
            noise = torch.rand(B, L, device=tokens.device, generator=generator)
        elif noise.shape != (B, L):
            raise ValueError(f"noise must have shape (batch, patches) = {(B, L)}, got {tuple(noise.shape)}")
        ids_shuffle = torch.argsort(noise.to(tokens.device), dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        kept = torch.gather(tokens, 1, ids_shuffle[:, :keep, None].expand(-1, -1, D))
        mask = torch.ones(B, L, device=tokens.device)
        mask[:, :keep] = 0
        return kept, torch.gather(mask, 1, ids_restore), ids_restore

    # ------------------------------------------------------------------ encoder, decoder, loss
    def forward_encoder(self, imgs: torch.Tensor, noise: torch.Tensor | None = None,
                        generator: torch.Generator | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int]]:
        """Encode the visible patches: (normed latent (B, prefix + keep, D), mask, ids_restore, grid)."""
        tokens, grid = self.encoder.embed_tokens(imgs)
        p = self.num_prefix_tokens
        kept, mask, ids_restore = self.random_masking(tokens[:, p:], noise, generator)
        latent, _ = self.encoder.run_blocks(torch.cat([tokens[:, :p], kept], dim=1), grid)
        return self.encoder.norm(latent), mask, ids_restore, grid

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor, grid: tuple[int, int]
                        ) -> torch.Tensor:
        """Latent of the visible tokens -> (B, L, ph*pw*C) pixel predictions for every patch."""
        x = self.decoder_embed(latent)
        p = self.num_prefix_tokens
        B, L, D = x.shape[0], ids_restore.shape[1], x.shape[2]
        visible = x[:, p:]
        masked = self.mask_token.to(x.dtype).expand(B, L - visible.shape[1], -1)
        patches = torch.gather(torch.cat([visible, masked], dim=1), 1, ids_restore[..., None].expand(-1, -1, D))
        x = self.decoder_pos_embed(torch.cat([x[:, :p], patches], dim=1), grid)
        for blk in self.decoder_blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, p:]

    def patch_losses(self, imgs: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """(B, L) mean squared error of every patch against its (optionally normalised) pixels, in fp32."""
        target = self.patchify(imgs).float()
        if self.norm_pix_loss:
            mean, std = self._patch_stats(target)
            target = (target - mean) / std
        return (pred.float() - target).pow(2).mean(dim=-1)

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error per patch, averaged over the masked patches (in fp32 under autocast)."""
        return (self.patch_losses(imgs, pred) * mask).sum() / mask.sum().clamp_min(1)

    def forward(self, imgs: torch.Tensor, noise: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> MAEOutput:
        latent, mask, ids_restore, grid = self.forward_encoder(imgs, noise, generator)
        pred = self.forward_decoder(latent, ids_restore, grid)
        return MAEOutput(self.forward_loss(imgs, pred, mask), pred, mask)

    # ------------------------------------------------------------------ using the result
    def reconstruct(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The picture MAE papers show: visible patches from ``imgs``, masked ones from ``pred``.

        With ``norm_pix_loss`` the prediction is per-patch normalised; it is mapped back with the statistics of
        the true patch (as the MAE demo does), so only the structure inside a masked patch is predicted.
        """
        target = self.patchify(imgs)
        pred = pred.to(target.dtype)
        if self.norm_pix_loss:
            mean, std = self._patch_stats(target)
            pred = pred * std + mean
        patches = torch.where(mask.bool()[..., None], pred, target)
        return self.unpatchify(patches, (imgs.shape[-2], imgs.shape[-1]))

    def encode(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, D) features of the encoder on all tokens, no masking: CLS after the final norm, or the mean of
        the normed patch tokens (``pool='gap'``), as the encoder pools. For k-NN and linear probes."""
        return self.encoder.forward_head(self.encoder.forward_features(imgs), pre_logits=True)

    # ------------------------------------------------------------------ training metadata
    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"mask_token"}


# ---------------------------------------------------------------------- registered configurations
# The paper's models: ViT-B/16, L/16 and H/14 encoders at 224 and one decoder, 512 wide, 8 blocks, 16 heads.
_IMAGENET_CFG = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}
_PAPER_DECODER: dict[str, Any] = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16,
                                      decoder_mlp_ratio=4.0)
for _name, _encoder in (("mae_vit_base_patch16", "vit_base_patch16_224"),
                        ("mae_vit_large_patch16", "vit_large_patch16_224"),
                        ("mae_vit_huge_patch14", "vit_huge_patch14_224")):
    register_config(_name, MaskedAutoencoderViT, _IMAGENET_CFG, encoder=_encoder, **_PAPER_DECODER)

# Fashion-MNIST: the vit_fmnist_tiny encoder (28x28x1, patch 4: 49 patches, 12 visible at ratio 0.75) and a
# decoder narrower and shallower than it, as in the paper (there 512 wide vs 768-1280, 8 vs 12-32 blocks).
register_config("mae_vit_fmnist_tiny", MaskedAutoencoderViT, {"mean": FMNIST_MEAN, "std": FMNIST_STD},
                encoder="vit_fmnist_tiny", decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=2,
                decoder_mlp_ratio=2.0)
