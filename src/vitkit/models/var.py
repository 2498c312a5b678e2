"""VAR (Tian et al., NeurIPS 2024, "Visual Autoregressive Modeling: Scalable Image Generation via Next-Scale
Prediction"): a class-conditional GPT that predicts a whole token map per step, coarse to fine.

The token sequence is the concatenation of the K token maps of a :class:`~vitkit.models.vqvae.MultiScaleVQVAE`
(1×1, 2×2, ..., 16×16: L = Σ pn² tokens). Training is teacher-forced in one pass:

    tokens = [class_emb(label) + pos_start] ++ word_embed(x_BLCv_wo_first_l)   # x: f̂ so far, at the next size
    tokens += lvl_embed(level) + pos_1LC
    tokens -> AdaLN blocks (block-causal mask: a token sees every token of its own and coarser scales)
    logits = head(AdaLNBeforeHead(tokens, cond)),  cond = class_emb(label)

Sampling (:meth:`VAR.autoregressive_infer_cfg`) runs one scale per step with a KV cache and classifier-free
guidance whose weight grows linearly with the scale.

Layout (the official code at FoundationVision/VAR, ``models/var.py``, ``basic_var.py``, ``helpers.py``; weights
load through ``vitkit convert var``; parameter names are the official ones):

* The VQ-VAE is not part of this module (not in its state, not moved by ``.to``), as the official ``vae_proxy``:
  the constructor takes its ``vocab_size``, ``c_vae`` and ``patch_nums``; sampling needs the VQ-VAE itself
  (``attach_vae(vae)`` or ``vae=``).
* AdaLN: SiLU -> Linear(C, 6C), chunks in the order gamma1, gamma2, scale1, scale2, shift1, shift2;
  ``shared_aln`` shares one such Linear across blocks plus a per-block learned offset ``ada_gss``.
* Attention: no qkv bias but the bias (q_bias, 0, v_bias); with ``attn_l2_norm`` q and k are L2-normalised and q
  is scaled per head by exp(min(scale_mul, ln 100)) with softmax scale 1, else the scale is 0.25/√head_dim.
* The block-causal mask and the per-token level are buffers computed from ``patch_nums`` (not saved).
* Deliberate difference: the official ``forward`` drops class labels (``cond_drop_rate``) in eval mode too; here
  only in training mode, so evaluation is deterministic.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data.constants import FMNIST_CLASSES
from ..errors import InputShapeError
from ..layers.attention import AttentionMapSource
from ..layers.drop import DropPath
from ..layers.mlp import Mlp
from ..layers.sampling import KVCache, gumbel_softmax_with_rng, sample_top_k_top_p
from ..layers.weight_init import trunc_normal_linears_
from ._base import VitkitModel
from ._registry import register_config
from .vqvae import OFFICIAL_PATCH_NUMS, VQVAE_FMNIST_TINY, MultiScaleVQVAE

MAX_SCALE_MUL = math.log(100.0)  # clamp of the learned per-head logit scale (log space)
# parameter-name fragments the official trainer keeps out of weight decay
NO_WEIGHT_DECAY_KEYS = ("pos_start", "pos_1LC", "lvl_embed", "scale_mul", "ada_gss")


class VARSelfAttention(AttentionMapSource, nn.Module):
    """Multi-head self-attention with VAR's biases and optional L2-normalised queries/keys (see the module doc)."""

    def __init__(self, embed_dim: int, num_heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 attn_l2_norm: bool = True) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} must be divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.attn_l2_norm = attn_l2_norm
        if attn_l2_norm:
            self.scale = 1.0
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.mat_qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(embed_dim))
        self.v_bias = nn.Parameter(torch.zeros(embed_dim))
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.attn_drop = attn_drop

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None = None, cache: KVCache | None = None
                ) -> torch.Tensor:
        B, L, C = x.shape
        bias = torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))
        qkv = F.linear(x, self.mat_qkv.weight, bias).view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, heads, L, head_dim) each
        if self.attn_l2_norm:
            q = F.normalize(q, dim=-1).mul(self.scale_mul_1H11.clamp_max(MAX_SCALE_MUL).exp())
            k = F.normalize(k, dim=-1)
        if cache is not None:
            k, v = cache.extend(k, v)
        out = self._attend(q, k, v, self.scale, attn_bias, self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, L, C)))


class AdaLNSelfAttn(nn.Module):
    """Transformer block whose LayerNorms (no affine) are scaled, shifted and gated by the class condition."""

    def __init__(self, embed_dim: int, cond_dim: int, num_heads: int, mlp_ratio: float = 4.0, drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0, norm_eps: float = 1e-6, shared_aln: bool = False,
                 attn_l2_norm: bool = True) -> None:
        super().__init__()
        self.embed_dim, self.shared_aln = embed_dim, shared_aln
        self.attn = VARSelfAttention(embed_dim, num_heads, attn_drop, drop, attn_l2_norm)
        self.ffn = Mlp(embed_dim, round(embed_dim * mlp_ratio), act="gelu_tanh", drop=drop)
        self.ffn.drop1 = nn.Identity()  # the official FFN drops only its output
        self.ln_wo_grad = nn.LayerNorm(embed_dim, eps=norm_eps, elementwise_affine=False)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        if shared_aln:  # a learned offset to the model's shared modulation
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, embed_dim) / embed_dim**0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 6 * embed_dim))

    def forward(self, x: torch.Tensor, cond: torch.Tensor, attn_bias: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """``cond`` is the class embedding (B, D), or with ``shared_aln`` the shared modulation (B, 1, 6, C)."""
        if self.shared_aln:
            mods = (self.ada_gss + cond).unbind(2)
        else:
            mods = self.ada_lin(cond).view(-1, 1, 6, self.embed_dim).unbind(2)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = mods
        x = x + self.drop_path(self.attn(self.ln_wo_grad(x).mul(scale1.add(1)).add_(shift1), attn_bias, cache)
                               .mul_(gamma1))
        x = x + self.drop_path(self.ffn(self.ln_wo_grad(x).mul(scale2.add(1)).add_(shift2)).mul(gamma2))
        return x


class AdaLNBeforeHead(nn.Module):
    """LayerNorm (no affine) scaled and shifted by the class condition, before the logits."""

    def __init__(self, embed_dim: int, cond_dim: int, norm_eps: float = 1e-6) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.ln_wo_grad = nn.LayerNorm(embed_dim, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * embed_dim))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond).view(-1, 1, 2, self.embed_dim).unbind(2)
        return self.ln_wo_grad(x).mul(scale.add(1)).add_(shift)


class _SharedAdaLin(nn.Linear):
    """The shared AdaLN modulation: (B, D) -> (B, 1, 6, C)."""

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        return super().forward(cond).view(-1, 1, 6, self.out_features // 6)


def level_layout(patch_nums: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(level of each token (1, L) int64, block-causal additive mask (1, 1, L, L): 0 where level(key) <=
    level(query), -inf elsewhere)."""
    levels = torch.cat([torch.full((pn * pn,), i) for i, pn in enumerate(patch_nums)]).view(1, -1, 1)
    mask = torch.where(levels >= levels.transpose(1, 2), 0.0, -torch.inf)
    return levels.transpose(1, 2)[:, 0].contiguous(), mask.reshape(1, 1, mask.shape[1], mask.shape[2]).contiguous()


# ---------------------------------------------------------------------- the model
class VAR(VitkitModel):
    """Next-scale prediction transformer: ``forward(label_B, x_BLCv_wo_first_l) -> logits (B, L, vocab_size)``."""

    default_task = "var"  # the task a checkpoint without a recorded one (converted) is used with

    head_prefixes = ()  # the head predicts VQ codes: its size is fixed by the tokenizer, never swapped

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
    ) -> None:
        super().__init__()
        patch_nums = tuple(patch_nums)
        sizes = dict(vocab_size=vocab_size, c_vae=c_vae, num_classes=num_classes, depth=depth, embed_dim=embed_dim,
                     num_heads=num_heads)
        bad = [f"{k}={v!r}" for k, v in sizes.items() if not isinstance(v, int) or isinstance(v, bool) or v < 1]
        if not patch_nums or any(not isinstance(p, int) or isinstance(p, bool) or p < 1 for p in patch_nums):
            bad.append(f"patch_nums={list(patch_nums)}")
        if not mlp_ratio > 0:
            bad.append(f"mlp_ratio={mlp_ratio!r}")
        rates = dict(drop_rate=drop_rate, attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate,
                     cond_drop_rate=cond_drop_rate)
        bad += [f"{k}={v!r} (must be in [0, 1))" for k, v in rates.items() if not 0 <= v < 1]
        if bad:
            raise ValueError("invalid VAR argument(s): " + ", ".join(bad))
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} must be divisible by num_heads {num_heads}")
        self.vocab_size, self.c_vae, self.patch_nums = vocab_size, c_vae, patch_nums
        self.num_classes, self.depth, self.embed_dim, self.num_heads = num_classes, depth, embed_dim, num_heads
        self.cond_drop_rate = cond_drop_rate
        self.L = sum(pn * pn for pn in patch_nums)
        self.first_l = patch_nums[0] ** 2
        self.begin_ends = []
        start = 0
        for pn in patch_nums:
            self.begin_ends.append((start, start + pn * pn))
            start += pn * pn

        init_std = math.sqrt(1 / embed_dim / 3)
        self.word_embed = nn.Linear(c_vae, embed_dim)
        self.class_emb = nn.Embedding(num_classes + 1, embed_dim)  # the last row is the "null" class (CFG)
        self.pos_start = nn.Parameter(torch.empty(1, self.first_l, embed_dim))
        self.pos_1LC = nn.Parameter(torch.empty(1, self.L, embed_dim))
        self.lvl_embed = nn.Embedding(len(patch_nums), embed_dim)
        for table in (self.class_emb.weight, self.pos_start, self.pos_1LC, self.lvl_embed.weight):
            nn.init.trunc_normal_(table, std=init_std)

        self.shared_ada_lin = (nn.Sequential(nn.SiLU(), _SharedAdaLin(embed_dim, 6 * embed_dim)) if shared_aln
                               else nn.Identity())
        dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.ModuleList([
            AdaLNSelfAttn(embed_dim, embed_dim, num_heads, mlp_ratio, drop_rate, attn_drop_rate, dpr[i], norm_eps,
                          shared_aln, attn_l2_norm)
            for i in range(depth)
        ])
        lvl_1L, mask = level_layout(patch_nums)
        self.register_buffer("lvl_1L", lvl_1L, persistent=False)
        self.register_buffer("attn_bias_for_masking", mask, persistent=False)
        self.head_nm = AdaLNBeforeHead(embed_dim, embed_dim, norm_eps)
        self.head = nn.Linear(embed_dim, vocab_size)
        self.init_weights()
        self.vae_proxy: tuple[MultiScaleVQVAE, ...] = ()
        self.pretrained_cfg = {}

    def init_weights(self, init_adaln: float = 0.5, init_adaln_gamma: float = 1e-5, init_head: float = 0.02,
                     init_std: float = -1) -> None:
        """The official initialisation (``VAR.init_weights`` as ``build_vae_var`` calls it; the constructor runs
        it): truncated normal std √(1/3C), output projections / √(2·depth), AdaLN gates ×1e-5 so every block starts
        near the identity, head ×0.02."""
        if init_std < 0:
            init_std = (1 / self.embed_dim / 3) ** 0.5
        trunc_normal_linears_(self, init_std, embeddings=True)
        if init_head >= 0:
            self.head.weight.data.mul_(init_head)
            self.head.bias.data.zero_()
        self.head_nm.ada_lin[-1].weight.data.mul_(init_adaln)
        self.head_nm.ada_lin[-1].bias.data.zero_()
        C = self.embed_dim
        for block in self.blocks:
            block.attn.proj.weight.data.div_(math.sqrt(2 * self.depth))
            block.ffn.fc2.weight.data.div_(math.sqrt(2 * self.depth))
            if hasattr(block, "ada_lin"):
                block.ada_lin[-1].weight.data[2 * C:].mul_(init_adaln)
                block.ada_lin[-1].weight.data[:2 * C].mul_(init_adaln_gamma)
                block.ada_lin[-1].bias.data.zero_()
            else:
                block.ada_gss.data[:, :, 2:].mul_(init_adaln)
                block.ada_gss.data[:, :, :2].mul_(init_adaln_gamma)

    # ------------------------------------------------------------------ the VQ-VAE used for sampling
    def attach_vae(self, vae: MultiScaleVQVAE) -> VAR:
        """Use ``vae`` to turn sampled tokens into images; it stays outside this module's state."""
        self._check_vae(vae)
        self.vae_proxy = (vae,)
        return self

    def _check_vae(self, vae: MultiScaleVQVAE) -> None:
        theirs = (vae.vocab_size, vae.c_vae, tuple(vae.patch_nums))
        ours = (self.vocab_size, self.c_vae, self.patch_nums)
        if theirs != ours:
            raise ValueError(f"the VQ-VAE (vocab_size, z_channels, patch_nums) = {theirs} does not fit this VAR "
                             f"(vocab_size, c_vae, patch_nums) = {ours}")

    # ------------------------------------------------------------------ pieces shared by training and sampling
    def level_positions(self) -> torch.Tensor:
        """lvl_embed(level) + pos_1LC: (1, L, C), what every token gets added."""
        return self.lvl_embed(self.lvl_1L) + self.pos_1LC

    def start_tokens(self, cond: torch.Tensor) -> torch.Tensor:
        """The first scale's tokens (B, pn₀², C) from the class embedding ``cond`` (B, C), positions added."""
        B = cond.shape[0]
        sos = cond.unsqueeze(1).expand(B, self.first_l, -1) + self.pos_start.expand(B, self.first_l, -1)
        return sos + self.level_positions()[:, :self.first_l]

    def scale_tokens(self, si: int, x_BlCv: torch.Tensor) -> torch.Tensor:
        """Tokens of scale ``si`` >= 1 from its input f̂ (B, pn², c_vae), positions added."""
        begin, end = self.begin_ends[si]
        return self.word_embed(x_BlCv.float()) + self.level_positions()[:, begin:end]

    def get_logits(self, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_nm(h.float(), cond).float()).float()

    def forward_step(self, tokens: torch.Tensor, cond: torch.Tensor, caches: list[KVCache]) -> torch.Tensor:
        """One scale of sampling: its tokens (B, pn², C) attend to themselves and to the earlier scales held in
        ``caches`` (one per block, extended in place); returns its logits (B, pn², vocab_size)."""
        return self.get_logits(self.cached_hidden(tokens, self.shared_ada_lin(cond), caches), cond)

    def cached_hidden(self, tokens: torch.Tensor, cond_or_gss: torch.Tensor, caches: list[KVCache]) -> torch.Tensor:
        """:meth:`forward_step` up to the last block: the hidden states (B, pn², C) of one scale's tokens, given
        ``shared_ada_lin(cond)``."""
        for block, cache in zip(self.blocks, caches):
            tokens = block(tokens, cond_or_gss, None, cache)
        return tokens

    # ------------------------------------------------------------------ training
    def forward(self, label_B: torch.Tensor, x_BLCv_wo_first_l: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits (B, L, vocab_size): ``label_B`` (B,) class ids (``num_classes`` = the null class),
        ``x_BLCv_wo_first_l`` (B, L − pn₀², c_vae) from ``MultiScaleVQVAE.idx_to_var_input``."""
        return self.get_logits(*self.forward_hidden(label_B, x_BLCv_wo_first_l))

    def forward_hidden(self, label_B: torch.Tensor, x_BLCv_wo_first_l: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher-forced pass up to the last block: (hidden states (B, L, C), class embedding (B, C)), so that
        ``get_logits(*forward_hidden(...))`` is ``forward(...)`` (HART reads the hidden states too)."""
        name = type(self).__name__
        x = x_BLCv_wo_first_l
        expected = (self.L - self.first_l, self.c_vae)
        if not isinstance(x, torch.Tensor) or x.ndim != 3 or tuple(x.shape[1:]) != expected:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise InputShapeError(f"{name} expects x_BLCv_wo_first_l of shape (B, {expected[0]}, {expected[1]}) "
                                  f"(patch_nums {list(self.patch_nums)}), got {shape}")
        B = x.shape[0]
        if not isinstance(label_B, torch.Tensor) or label_B.shape != (B,) or label_B.is_floating_point():
            shape = tuple(label_B.shape) if isinstance(label_B, torch.Tensor) else type(label_B).__name__
            raise InputShapeError(f"{name} expects label_B as {B} integer class ids, got {shape}")
        if self.training and self.cond_drop_rate > 0:
            drop = torch.rand(B, device=label_B.device) < self.cond_drop_rate
            label_B = torch.where(drop, self.num_classes, label_B)
        cond = self.class_emb(label_B)
        sos = cond.unsqueeze(1).expand(B, self.first_l, -1) + self.pos_start.expand(B, self.first_l, -1)
        tokens = torch.cat((sos, self.word_embed(x.float())), dim=1)
        tokens = tokens + (self.lvl_embed(self.lvl_1L.expand(B, -1)) + self.pos_1LC)
        cond_or_gss = self.shared_ada_lin(cond)
        for block in self.blocks:
            tokens = block(tokens, cond_or_gss, self.attn_bias_for_masking)
        return tokens, cond

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def autoregressive_infer_cfg(
        self,
        B: int,
        label_B: int | torch.Tensor | None,
        g_seed: int | None = None,
        cfg: float = 1.5,
        top_k: int = 0,
        top_p: float = 0.0,
        more_smooth: bool = False,
        vae: MultiScaleVQVAE | None = None,
        return_idx: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Sample B images in [0, 1] (B, C, H, W), one scale per step, with classifier-free guidance.

        ``label_B``: None = random classes, an int = that class for all (negative = unconditional), or (B,) ids.
        The guided logits at scale k are (1 + t)·cond − t·uncond with t = cfg·k/(K−1). ``top_k``/``top_p``
        restrict sampling (top_k=1 is greedy); ``g_seed`` makes it reproducible; ``more_smooth`` feeds
        Gumbel-softmax mixtures of codes instead of sampled codes (visualisation only, as in the official code).
        ``vae`` defaults to the one given to :meth:`attach_vae`. ``return_idx`` also returns the sampled
        indices (B, pn²) per scale.
        """
        vae = self.sampling_vae(vae)
        device = self.pos_1LC.device
        rng = None if g_seed is None else torch.Generator(device=device).manual_seed(g_seed)
        label_B = self.sampling_labels(B, label_B, rng, device)
        f_hat, sampled, _ = self.sample_scales(vae, label_B, cfg, top_k, top_p, rng, more_smooth)
        img = vae.fhat_to_img(f_hat).add_(1).mul_(0.5)
        return (img, sampled) if return_idx else img

    def sampling_vae(self, vae: MultiScaleVQVAE | None) -> MultiScaleVQVAE:
        """``vae``, or the one given to :meth:`attach_vae`, checked to fit."""
        if vae is None:
            if not self.vae_proxy:
                raise ValueError("sampling needs the VQ-VAE: pass vae= or call attach_vae(vae) first")
            vae = self.vae_proxy[0]
        self._check_vae(vae)
        return vae

    def sampling_labels(self, B: int, labels: int | torch.Tensor | None, rng: torch.Generator | None,
                        device: torch.device) -> torch.Tensor:
        """(B,) class ids: None = uniformly random classes, an int = that class (negative = the null class)."""
        if labels is None:
            uniform = torch.full((1, self.num_classes), 1.0 / self.num_classes, device=device)
            return torch.multinomial(uniform, num_samples=B, replacement=True, generator=rng).reshape(B)
        if isinstance(labels, int):
            return torch.full((B,), self.num_classes if labels < 0 else labels, device=device, dtype=torch.long)
        labels = torch.as_tensor(labels, device=device, dtype=torch.long)
        if labels.shape != (B,):
            raise InputShapeError(f"{type(self).__name__} sampling expects {B} labels, got shape "
                                  f"{tuple(labels.shape)}")
        return labels

    @torch.no_grad()
    def sample_scales(self, vae: MultiScaleVQVAE, label_B: torch.Tensor, cfg: float, top_k: int, top_p: float,
                      rng: torch.Generator | None, more_smooth: bool = False
                      ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """The next-scale loop of :meth:`autoregressive_infer_cfg` for class ids ``label_B`` (B,): (f̂ (B, c_vae,
        h, w), the sampled indices (B, pn²) per scale, the last scale's hidden states (2B, pn_K², C), conditional
        rows first)."""
        B = label_B.shape[0]
        quant = vae.quantize
        cond = self.class_emb(torch.cat((label_B, torch.full_like(label_B, self.num_classes)), dim=0))
        cond_or_gss = self.shared_ada_lin(cond)
        tokens = self.start_tokens(cond)
        caches = [KVCache() for _ in self.blocks]
        f_hat = cond.new_zeros(B, self.c_vae, self.patch_nums[-1], self.patch_nums[-1])
        last = len(self.patch_nums) - 1
        sampled = []
        for si, pn in enumerate(self.patch_nums):
            ratio = si / last
            tokens = self.cached_hidden(tokens, cond_or_gss, caches)
            logits = self.get_logits(tokens, cond)
            t = cfg * ratio
            logits = (1 + t) * logits[:B] - t * logits[B:]
            idx = sample_top_k_top_p(logits, top_k=top_k, top_p=top_p, rng=rng, num_samples=1)[:, :, 0]
            sampled.append(idx)
            if more_smooth:
                tau = max(0.27 * (1 - ratio * 0.95), 0.005)
                soft = gumbel_softmax_with_rng(logits.mul(1 + ratio), tau=tau, hard=False, dim=-1, rng=rng)
                h = soft @ quant.embedding.weight.unsqueeze(0)
            else:
                h = quant.embedding(idx)
            h = h.transpose(1, 2).reshape(B, self.c_vae, pn, pn)
            f_hat, next_map = quant.next_autoregressive_input(si, f_hat, h)
            if si != last:
                tokens = self.scale_tokens(si + 1, next_map.view(B, self.c_vae, -1).transpose(1, 2)).repeat(2, 1, 1)
        return f_hat, sampled, tokens

    # ------------------------------------------------------------------ optimiser metadata
    def no_weight_decay(self) -> set[str]:
        return {n for n, _ in self.named_parameters() if any(key in n for key in NO_WEIGHT_DECAY_KEYS)}


# ---------------------------------------------------------------------- registered configurations
# The official sizes (build_vae_var): width = 64·depth, heads = depth, drop path 0.1·depth/24, class dropout 0.1,
# L2-normalised attention, ImageNet's 1000 classes, on the vqvae_var tokenizer.
for _depth in (16, 20, 24, 30):
    register_config(f"var_d{_depth}", VAR, vocab_size=4096, c_vae=32, patch_nums=OFFICIAL_PATCH_NUMS,
                    num_classes=1000, depth=_depth, embed_dim=64 * _depth, num_heads=_depth,
                    drop_path_rate=0.1 * _depth / 24, cond_drop_rate=0.1, attn_l2_norm=True)
# Fashion-MNIST, on vqvae_fmnist_tiny (7×7 latent, scales 1, 2, 3, 4, 5, 7: L = 104): 4 blocks of width 128.
VAR_FMNIST_TINY: dict[str, Any] = dict(
    vocab_size=VQVAE_FMNIST_TINY["vocab_size"], c_vae=VQVAE_FMNIST_TINY["z_channels"],
    patch_nums=VQVAE_FMNIST_TINY["patch_nums"], num_classes=10, depth=4, embed_dim=128, num_heads=4,
    cond_drop_rate=0.1,
)
register_config("var_fmnist_tiny", VAR, {"class_names": FMNIST_CLASSES}, **VAR_FMNIST_TINY)
