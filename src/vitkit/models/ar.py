"""Token-based image generation on a VQ tokenizer: one decoder-only transformer over the code map of a
single-scale VQ-VAE, generating in three ways: one token at a time in raster order or in a random order, or several
tokens at a time (masked prediction, MaskGIT).

The code map of an image is L = grid_size² codes (``t_i``, raster index i). A class token (``num_classes`` + 1
rows, the last one the null class) conditions every order; in training the label is replaced by the null class
with probability ``cond_drop_rate``, so that sampling can use classifier-free guidance,
``logits = (1 + cfg)·cond − cfg·uncond`` (VAR's convention: cfg = 0 is the plain conditional model).

* ``raster`` (VQGAN / LlamaGen): slots [class, t_0, ..., t_{L-2}] under causal attention; slot j predicts t_j.
  Token t_i enters as tok_embed(t_i) + pos[i]. Sampling: L steps, one slot each, with a KV cache.
* ``random`` (σ-GPT, Pannatier et al. 2024; RandAR, Pang et al. 2025): a random permutation π per sample; slots
  [class, t_π0, ..., t_π(L-2)] under causal attention; slot j predicts t_πj. A token enters with its own position
  (pos[π(j-1)]) and every slot also with the position it must predict (``target_pos[π_j]``): in a random order
  nothing else tells the model which token is asked for next. Sampling: a random order per sample (or a given
  one), L steps with a KV cache.
* ``masked`` (MaskGIT, Chang et al. 2022): slots [class, x_0, ..., x_{L-1}], x_i = [MASK] where masked, full
  bidirectional attention. Training masks ⌈cos(π/2·u)·L⌉ random positions per sample (u ~ U(0, 1)) and the loss
  counts the masked positions only. Sampling: T steps from an all-[MASK] map; each step samples a code at every
  masked position, keeps the most confident ones and re-masks the others so that :func:`masked_counts` of them
  stay masked (cosine schedule); confidence = log p(sampled code) + Gumbel noise whose temperature falls linearly
  to 0 (MaskGIT's choice temperature).

``forward(codes, labels)`` is a training step returning :class:`GeneratorOutput` (loss, logits, targets, mask,
perm); :meth:`TokenGenerator.sample` returns code maps (B, grid, grid). The tokenizer is not part of this module
(as VAR's VQ-VAE is not part of VAR): ``tasks.generation`` tokenizes and decodes, and the registered generators fit
:class:`~vitkit.models.vqvae.SingleScaleVQVAE` (``vq_fmnist_tiny``). The KV cache, guidance and the samplers are
:mod:`vitkit.layers.sampling`'s.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..data.constants import FMNIST_CLASSES
from ..errors import InputShapeError
from ..layers.sampling import (
    CachedBlock,
    KVCache,
    cfg_combine,
    gumbel_noise,
    masked_counts,
    sample_logits,
    uniform_noise,
)
from ..layers.weight_init import trunc_normal_linears_
from ._base import VitkitModel
from ._registry import register_config
from .vqvae import VQ_FMNIST_TINY

ORDERS = ("raster", "random", "masked")


# ---------------------------------------------------------------------- pieces
class GeneratorOutput(NamedTuple):
    loss: torch.Tensor  # scalar: mean cross-entropy over the counted targets (mask == 1)
    logits: torch.Tensor  # (B, L, vocab_size): slot j's prediction (raster/random: of t_perm[j]; masked: of t_j)
    targets: torch.Tensor  # (B, L) int64: the code each logit row predicts
    mask: torch.Tensor  # (B, L) float: 1 where the loss counts (all for raster/random, masked positions for masked)
    perm: torch.Tensor  # (B, L) int64: the raster position each slot predicts (identity for raster and masked)


# ---------------------------------------------------------------------- the model
class TokenGenerator(VitkitModel):
    """Class-conditional transformer over VQ code maps, in ``order`` raster / random / masked (see the module doc).

    ``forward(codes (B, L) or (B, g, g), labels (B,))`` -> :class:`GeneratorOutput`; ``sample(num, labels)`` ->
    code maps (num, g, g). ``image_size`` (C, H, W) records the images the tokenizer decodes the code maps to
    (metadata: the model never sees pixels).
    """

    default_task = "ar"  # the task a checkpoint without a recorded one (converted) is used with

    head_prefixes = ()  # the head predicts VQ codes: its size is fixed by the tokenizer, never swapped

    def __init__(
        self,
        vocab_size: int = 256,
        grid_size: int = 7,
        num_classes: int = 10,
        order: str = "raster",
        embed_dim: int = 128,
        depth: int = 6,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        cond_drop_rate: float = 0.1,
        image_size: tuple[int, int, int] | None = None,
    ) -> None:
        super().__init__()
        sizes = dict(vocab_size=vocab_size, grid_size=grid_size, depth=depth, embed_dim=embed_dim,
                     num_heads=num_heads)
        bad = [f"{k}={v!r}" for k, v in sizes.items() if not isinstance(v, int) or isinstance(v, bool) or v < 1]
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 0:
            bad.append(f"num_classes={num_classes!r} (>= 0; 0 = unconditional)")
        if order not in ORDERS:
            bad.append(f"order={order!r} (one of {', '.join(ORDERS)})")
        if not (isinstance(mlp_ratio, (int, float)) and mlp_ratio > 0):
            bad.append(f"mlp_ratio={mlp_ratio!r}")
        rates = dict(drop_rate=drop_rate, attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate,
                     cond_drop_rate=cond_drop_rate)
        bad += [f"{k}={v!r} (must be in [0, 1))" for k, v in rates.items()
                if not (isinstance(v, (int, float)) and 0 <= v < 1)]
        if image_size is not None and (len(image_size) != 3 or any(
                not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in image_size)):
            bad.append(f"image_size={image_size!r} (C, H, W)")
        if bad:
            raise ValueError("invalid TokenGenerator argument(s): " + ", ".join(bad))
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} must be divisible by num_heads {num_heads}")
        self.vocab_size, self.grid_size, self.num_classes, self.order = vocab_size, grid_size, num_classes, order
        self.embed_dim, self.depth, self.cond_drop_rate = embed_dim, depth, cond_drop_rate
        self.num_tokens = L = grid_size * grid_size
        self.mask_id = vocab_size  # the [MASK] input of the masked order (one extra embedding row)
        self.tok_embed = nn.Embedding(vocab_size + (order == "masked"), embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, L, embed_dim))
        if order == "random":
            self.target_pos = nn.Parameter(torch.zeros(1, L, embed_dim))
        self.class_emb = nn.Embedding(num_classes + 1, embed_dim)  # the last row is the null class (CFG)
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList([CachedBlock(embed_dim, num_heads, mlp_ratio, proj_drop=drop_rate,
                                                 attn_drop=attn_drop_rate, drop_path=dpr[i]) for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, vocab_size)
        if order != "masked":  # slot j sees slots 0..j
            self.register_buffer("causal_mask", torch.ones(L, L, dtype=torch.bool).tril(), persistent=False)
        self._init_weights()
        # the images the tokenizer decodes the code maps to (what `vitkit eval` / `predict` load)
        self.pretrained_cfg = {"input_size": tuple(image_size)} if image_size is not None else {}

    def _init_weights(self) -> None:
        """GPT-2's: N(0, 0.02) (truncated) everywhere, zero biases, residual projections / √(2·depth)."""
        trunc_normal_linears_(self, 0.02, embeddings=True)
        for table in (self.pos_embed, getattr(self, "target_pos", None)):
            if table is not None:
                nn.init.trunc_normal_(table, std=0.02)
        for block in self.blocks:
            block.attn.proj.weight.data.div_(math.sqrt(2 * self.depth))
            block.mlp.fc2.weight.data.div_(math.sqrt(2 * self.depth))

    def no_weight_decay(self) -> set[str]:
        return {n for n in ("pos_embed", "target_pos") if hasattr(self, n)}

    # ------------------------------------------------------------------ checks
    def _check_codes(self, codes: torch.Tensor) -> torch.Tensor:
        L, g = self.num_tokens, self.grid_size
        ok = isinstance(codes, torch.Tensor) and not codes.is_floating_point() and codes.ndim in (2, 3)
        if ok:
            ok = tuple(codes.shape[1:]) == ((L,) if codes.ndim == 2 else (g, g))
        if not ok:
            shape = tuple(codes.shape) if isinstance(codes, torch.Tensor) else type(codes).__name__
            raise InputShapeError(f"TokenGenerator expects integer codes (B, {L}) or (B, {g}, {g}), got {shape}")
        codes = codes.reshape(codes.shape[0], L).long()
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.vocab_size):
            raise InputShapeError(f"codes must be in [0, {self.vocab_size}), got "
                                  f"{int(codes.min())}..{int(codes.max())}")
        return codes

    def _check_labels(self, labels: torch.Tensor | None, B: int, device: torch.device) -> torch.Tensor:
        if labels is None:
            return torch.full((B,), self.num_classes, dtype=torch.long, device=device)
        if not isinstance(labels, torch.Tensor) or labels.shape != (B,) or labels.is_floating_point():
            shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise InputShapeError(f"labels must be {B} integer class ids, got {shape}")
        if B and (int(labels.min()) < 0 or int(labels.max()) > self.num_classes):
            raise InputShapeError(f"labels must be in [0, {self.num_classes}] ({self.num_classes} = the null class)")
        return labels.long()

    def _check_perm(self, perm: torch.Tensor, B: int) -> torch.Tensor:
        L = self.num_tokens
        if not isinstance(perm, torch.Tensor) or perm.shape != (B, L) or perm.is_floating_point() or not torch.equal(
                perm.sort(dim=1).values, torch.arange(L, device=perm.device).expand(B, L)):
            raise InputShapeError(f"perm must be (B={B}, {L}) rows that are permutations of 0..{L - 1}")
        return perm.long()

    # ------------------------------------------------------------------ orders and masks
    def random_perm(self, B: int, generator: torch.Generator | None = None,
                    device: torch.device | None = None) -> torch.Tensor:
        """(B, L) generation orders: a uniformly random permutation per sample."""
        return uniform_noise((B, self.num_tokens), generator, device or self.pos_embed.device).argsort(dim=1)

    def random_mask(self, B: int, generator: torch.Generator | None = None,
                    device: torch.device | None = None) -> torch.Tensor:
        """(B, L) bool MaskGIT training masks: per sample ⌈cos(π/2·u)·L⌉ random positions, u ~ U(0, 1)."""
        device = device or self.pos_embed.device
        L = self.num_tokens
        ratio = torch.cos(math.pi / 2 * uniform_noise((B,), generator, device))
        count = torch.ceil(ratio * L).clamp_(1, L).long()
        rank = uniform_noise((B, L), generator, device).argsort(dim=1).argsort(dim=1)
        return rank < count[:, None]

    # ------------------------------------------------------------------ the network
    def _ar_inputs(self, codes: torch.Tensor, labels: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
        """Slots [class, t_π0, ..., t_π(L-2)] (B, L, D), positions (and target positions) added."""
        pos = self.pos_embed[0][perm]  # (B, L, D): the position of the token at each place of the order
        x = self.tok_embed(codes.gather(1, perm[:, :-1])) + pos[:, :-1]
        x = torch.cat((self.class_emb(labels)[:, None], x), dim=1)
        if self.order == "random":
            x = x + self.target_pos[0][perm]
        return x

    def _masked_inputs(self, codes: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Slots [class, x_0, ..., x_{L-1}] (B, 1 + L, D) with x_i = [MASK] where ``mask``."""
        x = self.tok_embed(torch.where(mask, self.mask_id, codes)) + self.pos_embed
        return torch.cat((self.class_emb(labels)[:, None], x), dim=1)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        """Blocks, norm and head over all slots: logits (B, L, V) (the masked order drops the class slot)."""
        x = self.pos_drop(x)
        bias = self.causal_mask if self.order != "masked" else None
        for block in self.blocks:
            x = block(x, bias)
        if self.order == "masked":
            x = x[:, 1:]
        return self.head(self.norm(x))

    def logits_for(self, codes: torch.Tensor, labels: torch.Tensor | None = None, perm: torch.Tensor | None = None,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
        """Full-sequence logits (B, L, V) with this exact order / mask (no label dropout, whatever the mode)."""
        codes = self._check_codes(codes)
        B = codes.shape[0]
        labels = self._check_labels(labels, B, codes.device)
        if self.order == "masked":
            if mask is None or mask.shape != (B, self.num_tokens) or mask.dtype != torch.bool:
                raise InputShapeError(f"the masked order needs a bool mask (B={B}, {self.num_tokens})")
            return self._run(self._masked_inputs(codes, labels, mask))
        if perm is None:
            if self.order == "random":
                raise InputShapeError("the random order needs perm (B, L)")
            perm = torch.arange(self.num_tokens, device=codes.device).expand(B, -1)
        return self._run(self._ar_inputs(codes, labels, self._check_perm(perm, B)))

    # ------------------------------------------------------------------ training
    def forward(self, codes: torch.Tensor, labels: torch.Tensor | None = None, perm: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, generator: torch.Generator | None = None) -> GeneratorOutput:
        """A training step on code maps: ``labels`` None = unconditional (the null class). The random order draws a
        permutation per sample unless ``perm`` is given; the masked order a mask unless ``mask`` (bool (B, L),
        True = masked) is given; both from ``generator`` if given (fixed evaluation). In training mode a label is
        replaced by the null class with probability ``cond_drop_rate``."""
        codes = self._check_codes(codes)
        B, L, device = codes.shape[0], self.num_tokens, codes.device
        labels = self._check_labels(labels, B, device)
        if self.training and self.cond_drop_rate > 0:
            drop = uniform_noise((B,), generator, device) < self.cond_drop_rate
            labels = torch.where(drop, self.num_classes, labels)
        identity = torch.arange(L, device=device).expand(B, L)
        if self.order == "masked":
            if perm is not None:
                raise ValueError("perm is for the random order; the masked order takes mask")
            if mask is None:
                mask = self.random_mask(B, generator, device)
            logits = self.logits_for(codes, labels, mask=mask)
            targets, weight, perm = codes, mask.float(), identity
        else:
            if mask is not None:
                raise ValueError(f"mask is for the masked order, not {self.order!r}")
            if perm is not None and self.order == "raster":
                raise ValueError("the raster order takes no perm (it is the identity)")
            if perm is None:
                perm = self.random_perm(B, generator, device) if self.order == "random" else identity
            logits = self.logits_for(codes, labels, perm=perm)
            targets, weight = codes.gather(1, perm), torch.ones(B, L, device=device)
        nll = F.cross_entropy(logits.float().reshape(B * L, -1), targets.reshape(-1), reduction="none").view(B, L)
        loss = (nll * weight).sum() / weight.sum().clamp_min(1.0)
        return GeneratorOutput(loss, logits, targets, weight, perm)

    # ------------------------------------------------------------------ one slot at a time (KV cache)
    def _first_slot(self, labels: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
        x = self.class_emb(labels)[:, None]
        return x + self.target_pos[0][first][:, None] if self.order == "random" else x

    def _next_slot(self, tokens: torch.Tensor, pos: torch.Tensor, next_pos: torch.Tensor) -> torch.Tensor:
        """The slot after code ``tokens`` (B,) at raster positions ``pos`` (B,), predicting position ``next_pos``."""
        x = (self.tok_embed(tokens) + self.pos_embed[0][pos])[:, None]
        return x + self.target_pos[0][next_pos][:, None] if self.order == "random" else x

    def _step(self, x: torch.Tensor, caches: list[KVCache]) -> torch.Tensor:
        """New slots (B, n, D) attend to themselves and to the cached ones; returns their logits (B, n, V)."""
        for block, cache in zip(self.blocks, caches):
            x = block(x, None, cache)
        return self.head(self.norm(x))

    @torch.no_grad()
    def incremental_logits(self, codes: torch.Tensor, labels: torch.Tensor | None = None,
                           perm: torch.Tensor | None = None) -> torch.Tensor:
        """The logits (B, L, V) of ``logits_for``, computed the way sampling does: one slot per step with a KV
        cache, teacher-forced with ``codes`` (raster and random orders)."""
        if self.order == "masked":
            raise ValueError("the masked order has no KV cache (every step sees every position)")
        codes = self._check_codes(codes)
        B, L = codes.shape
        labels = self._check_labels(labels, B, codes.device)
        perm = torch.arange(L, device=codes.device).expand(B, L) if perm is None else self._check_perm(perm, B)
        caches = [KVCache() for _ in self.blocks]
        x, out = self._first_slot(labels, perm[:, 0]), []
        for j in range(L):
            out.append(self._step(x, caches))
            if j + 1 < L:
                x = self._next_slot(codes.gather(1, perm[:, j:j + 1])[:, 0], perm[:, j], perm[:, j + 1])
        return torch.cat(out, dim=1)

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def guided_logits(self, codes: torch.Tensor, labels: torch.Tensor, cfg: float, perm: torch.Tensor | None = None,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
        """Full-sequence logits with classifier-free guidance: conditional and null-class passes in one doubled
        batch, combined by :func:`cfg_combine` (what sampling does at every step)."""
        codes = self._check_codes(codes)
        B = codes.shape[0]
        labels = self._check_labels(labels, B, codes.device)
        both = self.logits_for(codes.repeat(2, 1), torch.cat((labels, torch.full_like(labels, self.num_classes))),
                               None if perm is None else perm.repeat(2, 1), None if mask is None else mask.repeat(2, 1))
        return cfg_combine(both[:B], both[B:], cfg)

    def _sample_labels(self, num: int, labels: int | torch.Tensor | None, generator: torch.Generator | None,
                       device: torch.device) -> torch.Tensor:
        if labels is None:
            if self.num_classes == 0:
                return torch.full((num,), 0, dtype=torch.long, device=device)
            return (uniform_noise((num,), generator, device) * self.num_classes).long().clamp_(max=self.num_classes - 1)
        if isinstance(labels, int):
            return torch.full((num,), self.num_classes if labels < 0 else labels, dtype=torch.long, device=device)
        return self._check_labels(labels.to(device), num, device)

    @torch.no_grad()
    def sample(
        self,
        num: int,
        labels: int | torch.Tensor | None = None,
        *,
        steps: int | None = None,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 0.0,
        cfg: float = 0.0,
        generator: torch.Generator | int | None = None,
        perm: torch.Tensor | None = None,
        choice_temperature: float = 4.5,
        return_steps: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Sample ``num`` code maps (num, grid, grid) in the model's order (in eval mode; the mode is restored).

        ``labels``: None = random classes, an int = that class for all (negative = the null class, i.e.
        unconditional), or (num,) ids. ``cfg``: guidance weight (0 = none, and no second pass). ``temperature``,
        ``top_k``, ``top_p`` shape each code's distribution (top_k=1 is greedy). ``generator`` (or an int seed)
        makes it reproducible. Raster/random: L steps with a KV cache (``perm``: the random order's generation
        order, else random per sample). Masked: ``steps`` T (default 8) with ``choice_temperature`` (MaskGIT's
        4.5); ``return_steps`` also returns the (num, L) maps after each step, −1 where still masked.
        """
        if not isinstance(num, int) or num < 1:
            raise ValueError(f"num must be a positive integer, got {num!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        device = self.pos_embed.device
        if isinstance(generator, int):
            generator = torch.Generator(device=device).manual_seed(generator)
        was_training = self.training
        self.eval()
        try:
            labels = self._sample_labels(num, labels, generator, device)
            if self.order == "masked":
                if perm is not None:
                    raise ValueError("perm is for the random order")
                codes, history = self._sample_masked(labels, steps or 8, temperature, top_k, top_p, cfg, generator,
                                                     choice_temperature)
            else:
                if steps not in (None, self.num_tokens):
                    raise ValueError(f"the {self.order} order generates one token per step ({self.num_tokens} steps)")
                if return_steps:
                    raise ValueError("return_steps is for the masked order")
                codes, history = self._sample_ar(labels, temperature, top_k, top_p, cfg, generator, perm), []
        finally:
            self.train(was_training)
        codes = codes.view(num, self.grid_size, self.grid_size)
        return (codes, history) if return_steps else codes

    def _sample_ar(self, labels: torch.Tensor, temperature: float, top_k: int, top_p: float, cfg: float,
                   generator: torch.Generator | None, perm: torch.Tensor | None) -> torch.Tensor:
        B, L, device = labels.shape[0], self.num_tokens, labels.device
        if self.order == "raster":
            if perm is not None:
                raise ValueError("the raster order takes no perm")
            perm = torch.arange(L, device=device).expand(B, L)
        else:
            perm = self.random_perm(B, generator, device) if perm is None else self._check_perm(perm.to(device), B)
        guided = cfg != 0
        twice = (lambda t: torch.cat((t, t))) if guided else (lambda t: t)
        perm2 = twice(perm)
        lab2 = torch.cat((labels, torch.full_like(labels, self.num_classes))) if guided else labels
        caches = [KVCache() for _ in self.blocks]
        x = self._first_slot(lab2, perm2[:, 0])
        out = torch.empty(B, L, dtype=torch.long, device=device)
        for j in range(L):
            logits = self._step(x, caches)[:, -1:].float()
            if guided:
                logits = cfg_combine(logits[:B], logits[B:], cfg)
            tok = sample_logits(logits, temperature, top_k, top_p, generator)[:, 0]
            out.scatter_(1, perm[:, j:j + 1], tok[:, None])
            if j + 1 < L:
                x = self._next_slot(twice(tok), perm2[:, j], perm2[:, j + 1])
        return out

    def _sample_masked(self, labels: torch.Tensor, steps: int, temperature: float, top_k: int, top_p: float,
                       cfg: float, generator: torch.Generator | None, choice_temperature: float
                       ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        B, L, device = labels.shape[0], self.num_tokens, labels.device
        counts = masked_counts(L, steps)
        codes = torch.zeros(B, L, dtype=torch.long, device=device)
        unknown = torch.ones(B, L, dtype=torch.bool, device=device)
        history = []
        for t, keep_masked in enumerate(counts):
            if cfg != 0:
                logits = self.guided_logits(codes, labels, cfg, mask=unknown).float()
            else:
                logits = self.logits_for(codes, labels, mask=unknown).float()
            sampled = sample_logits(logits, temperature, top_k, top_p, generator)
            logp = (logits / temperature).log_softmax(-1).gather(-1, sampled[..., None])[..., 0]
            sampled = torch.where(unknown, sampled, codes)
            confidence = torch.where(unknown, logp, torch.inf)
            noise_t = choice_temperature * (1 - (t + 1) / steps)
            if noise_t > 0:  # Gumbel noise (−log Exp(1)), annealed: early steps explore, the last ones do not
                confidence = confidence + noise_t * gumbel_noise((B, L), generator, device)
            remask = torch.zeros(B, L, dtype=torch.bool, device=device)
            if keep_masked:
                remask.scatter_(1, confidence.topk(keep_masked, dim=1, largest=False).indices, True)
            codes, unknown = sampled, remask
            history.append(torch.where(remask, -1, sampled))
        return codes, history


# ---------------------------------------------------------------------- registered configurations
# Generators over vq_fmnist_tiny's 7×7 map: 6 blocks of width 128 (1.26M parameters), ten classes + null, 10% label
# dropout for guidance. ar_fmnist_tiny is the raster order; the others differ only in ``order``.
AR_FMNIST_TINY: dict[str, Any] = dict(
    vocab_size=VQ_FMNIST_TINY["vocab_size"], grid_size=VQ_FMNIST_TINY["patch_nums"][0], num_classes=10,
    embed_dim=128, depth=6, num_heads=4, cond_drop_rate=0.1, image_size=(1, 28, 28),
)
_FMNIST_CFG = {"class_names": FMNIST_CLASSES, "mean": (0.5,), "std": (0.5,)}
register_config("ar_fmnist_tiny", TokenGenerator, _FMNIST_CFG, order="raster", **AR_FMNIST_TINY)
register_config("ar_fmnist_tiny_random", TokenGenerator, _FMNIST_CFG, order="random", **AR_FMNIST_TINY)
register_config("ar_fmnist_tiny_masked", TokenGenerator, _FMNIST_CFG, order="masked", **AR_FMNIST_TINY)
