"""What the token generators share for sampling: the KV cache, restricted and tempered sampling from logits,
classifier-free guidance, Gumbel noise, MaskGIT's schedule, and seeded noise on any device.

* :class:`KVCache` holds one attention layer's keys and values of the tokens seen so far; :class:`CachedBlock`
  is the shared pre-norm :class:`~vitkit.layers.block.Block` that can use one (VAR's AdaLN blocks use the cache
  in their own attention).
* :func:`sample_top_k_top_p` (VAR's official sampler) and :func:`sample_logits` (the same with a temperature)
  draw token ids; :func:`cfg_combine` mixes conditional and unconditional logits.
* Every random draw takes an optional ``torch.Generator``, so seeded sampling is reproducible.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .block import Block


# ---------------------------------------------------------------------- the KV cache
class KVCache:
    """Keys and values (B, heads, tokens, head_dim) of the tokens seen so far, for one attention layer.

    The tokens live in a buffer that doubles when full, so appending one token per step (raster AR: 49 steps)
    costs amortised O(1) copies instead of re-concatenating the whole cache each step; ``k`` / ``v`` are views of
    the filled part."""

    def __init__(self) -> None:
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self.length = 0

    @property
    def k(self) -> torch.Tensor | None:
        return None if self._k is None else self._k[:, :, :self.length]

    @property
    def v(self) -> torch.Tensor | None:
        return None if self._v is None else self._v[:, :, :self.length]

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append these tokens' keys/values; return all of them."""
        n, end = k.shape[2], self.length + k.shape[2]
        if self._k is None or end > self._k.shape[2] or self._k.shape[:2] != k.shape[:2]:
            if self._k is not None and self._k.shape[:2] != k.shape[:2]:
                raise ValueError(f"KVCache holds batch/heads {tuple(self._k.shape[:2])}, got {tuple(k.shape[:2])}")
            capacity = max(end, 2 * (self._k.shape[2] if self._k is not None else n))
            grown_k = k.new_empty(*k.shape[:2], capacity, k.shape[3])
            grown_v = v.new_empty(*v.shape[:2], capacity, v.shape[3])
            if self.length:
                grown_k[:, :, :self.length] = self._k[:, :, :self.length]
                grown_v[:, :, :self.length] = self._v[:, :, :self.length]
            self._k, self._v = grown_k, grown_v
        self._k[:, :, self.length:end] = k
        self._v[:, :, self.length:end] = v
        self.length = end
        return self.k, self.v


class CachedBlock(Block):
    """vitkit's pre-norm :class:`Block` with an optional KV cache, for sampling one slot at a time."""

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None = None,  # type: ignore[override]
                cache: KVCache | None = None) -> torch.Tensor:
        if cache is None:
            return super().forward(x, attn_bias)
        attn = self.attn
        B, N, C = x.shape
        qkv = attn.qkv(self.norm1(x)).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        k, v = cache.extend(k, v)
        y = attn._attend(q, k, v, attn.scale, attn_bias)
        y = attn.proj_drop(attn.proj(y.transpose(1, 2).reshape(B, N, C)))
        x = x + self.drop_path1(self.ls1(y))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


# ---------------------------------------------------------------------- drawing tokens
def sample_top_k_top_p(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0,
                       rng: torch.Generator | None = None, num_samples: int = 1) -> torch.Tensor:
    """(B, l, V) logits -> (B, l, num_samples) indices, sampled from the softmax restricted to the ``top_k``
    largest logits and then to the smallest set holding ``top_p`` of the mass (0 = no restriction)."""
    B, length, V = logits.shape
    logits = logits.clone()
    if top_k > 0:
        kth = logits.topk(min(top_k, V), largest=True, sorted=False, dim=-1)[0].amin(dim=-1, keepdim=True)
        logits.masked_fill_(logits < kth, -torch.inf)
    if top_p > 0:
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=False)
        remove = sorted_logits.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
        remove[..., -1:] = False  # always keep the most likely token
        logits.masked_fill_(remove.scatter(sorted_idx.ndim - 1, sorted_idx, remove), -torch.inf)
    probs = logits.softmax(dim=-1).view(-1, V)
    return torch.multinomial(probs, num_samples=abs(num_samples), replacement=num_samples >= 0,
                             generator=rng).view(B, length, abs(num_samples))


def sample_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 0.0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, n, V) logits -> (B, n) token ids drawn from softmax(logits / ``temperature``), restricted by ``top_k``
    and ``top_p`` as :func:`sample_top_k_top_p` (top_k=1 is greedy)."""
    return sample_top_k_top_p(logits.float() / temperature, top_k=top_k, top_p=top_p, rng=generator)[..., 0]


def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, cfg: float) -> torch.Tensor:
    """Classifier-free guidance: (1 + cfg)·cond − cfg·uncond; cfg = 0 gives the conditional logits."""
    return cond if cfg == 0 else cond.mul(1 + cfg).sub_(uncond, alpha=cfg)


def masked_counts(num_tokens: int, steps: int) -> list[int]:
    """How many positions MaskGIT sampling leaves masked after each of its ``steps`` steps (it starts from all
    ``num_tokens`` masked): floor(L·cos(π/2·(t+1)/T)), kept in [1, left − 1] before the last step — every step
    decides at least one token and leaves at least one for later — and 0 after the last."""
    if not 1 <= steps <= num_tokens:
        raise ValueError(f"steps={steps}: MaskGIT sampling needs 1 <= steps <= {num_tokens} (the number of tokens)")
    counts, left = [], num_tokens
    for t in range(steps):
        n = 0 if t == steps - 1 else max(1, min(left - 1, math.floor(num_tokens * math.cos(math.pi / 2 * (t + 1)
                                                                                          / steps))))
        counts.append(n)
        left = n
    return counts


# ---------------------------------------------------------------------- seeded noise
def uniform_noise(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Uniform noise from ``generator`` (drawn on its own device, then moved) or from the global RNG."""
    if generator is None:
        return torch.rand(shape, device=device)
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def gumbel_noise(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device,
                 dtype: torch.dtype | None = None) -> torch.Tensor:
    """Standard Gumbel noise −log(Exp(1)) from ``generator`` (drawn on its own device, then moved) or the global
    RNG."""
    where = generator.device if generator is not None else device
    return -torch.empty(shape, device=where, dtype=dtype).exponential_(generator=generator).log().to(device)


def gumbel_softmax_with_rng(logits: torch.Tensor, tau: float = 1.0, hard: bool = False, dim: int = -1,
                            rng: torch.Generator | None = None) -> torch.Tensor:
    """``F.gumbel_softmax`` drawing its noise from ``rng`` (reproducible sampling)."""
    if rng is None:
        return F.gumbel_softmax(logits, tau=tau, hard=hard, dim=dim)
    gumbels = gumbel_noise(logits.shape, rng, logits.device, logits.dtype)
    y_soft = ((logits + gumbels) / tau).softmax(dim)
    if not hard:
        return y_soft
    y_hard = torch.zeros_like(logits).scatter_(dim, y_soft.argmax(dim, keepdim=True), 1.0)
    return y_hard - y_soft.detach() + y_soft
