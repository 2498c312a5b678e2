"""How sharp attention is: per layer and head, the statistics of its rows (one distribution over the keys per query).

The claim it serves (EfficientViT, Cai et al. 2023): ReLU linear attention cannot produce the sharp, peaked
distributions softmax attention can, so it captures global context but little local detail. Every
:class:`~vitkit.layers.attention.AttentionMapSource` records probabilities (B, heads, N_query, N_key) while
captured: softmax layers their softmax, ReLU linear layers the map they imply,
``A_ij = relu(q_i)·relu(k_j) / Σ_j relu(q_i)·relu(k_j)`` (:func:`vitkit.layers.linear_attention.relu_attention_map`).
Statistics, each the mean over images and query rows of one head:

* ``entropy``: row entropy in nats; ``entropy_norm``: divided by log N_key, so 0 is one-hot and 1 is uniform
  whatever the token count (None for a single key, where every row is one-hot);
* ``top1_mass``, ``top5_mass``, ``top10pct_mass``: the weight of the k largest entries of a row (k = 1, 5 and
  ceil(10% of N_key), each at most N_key; ``k_top5``/``k_top10pct`` say which k); a uniform row has k / N;
* ``max_weight``: the largest single weight of the head over every row and image.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import InputShapeError
from ..layers.attention import AttentionMapSource

ROW_SUM_TOLERANCE = 1e-3  # rows of probabilities; logits or unnormalised scores are refused


def top_k_size(n_keys: int, k: int | float) -> int:
    """An int k is that many keys, a float in (0, 1) that fraction of them (rounded up); at most ``n_keys``."""
    size = math.ceil(k * n_keys) if isinstance(k, float) else k
    return max(1, min(int(size), n_keys))


def check_attention(attn: torch.Tensor, where: str = "attention map") -> torch.Tensor:
    """(B, heads, N_query, N_key) probabilities as fp32 (checked: non-negative rows summing to 1)."""
    if not isinstance(attn, torch.Tensor) or attn.dim() != 4 or min(attn.shape) < 1:
        shape = tuple(attn.shape) if isinstance(attn, torch.Tensor) else type(attn).__name__
        raise InputShapeError(f"{where}: expected (B, heads, N_query, N_key) probabilities, got {shape}")
    attn = attn.detach().float()
    if not torch.isfinite(attn).all() or attn.min() < 0:
        raise InputShapeError(f"{where}: attention weights must be finite and >= 0 (probabilities, not logits)")
    off = (attn.sum(dim=-1) - 1).abs().max().item()
    if off > ROW_SUM_TOLERANCE:
        raise InputShapeError(f"{where}: rows must sum to 1 (probabilities over the keys); one is off by {off:.3g}")
    return attn


def row_entropy(attn: torch.Tensor) -> torch.Tensor:
    """(..., N_key) probabilities -> (...) entropy in nats (0·log 0 = 0)."""
    return -torch.special.xlogy(attn, attn).sum(dim=-1)


def top_k_mass(attn: torch.Tensor, k: int) -> torch.Tensor:
    """(..., N_key) probabilities -> (...) the summed weight of each row's k largest entries."""
    return attn.topk(min(k, attn.shape[-1]), dim=-1).values.sum(dim=-1)


def head_statistics(attn: torch.Tensor) -> list[dict[str, Any]]:
    """One dict per head of a (B, heads, N_query, N_key) map: the module docstring's statistics."""
    meter = SharpnessMeter()
    meter.update("map", attn)
    return [{k: v for k, v in r.items() if k != "layer"} for r in meter.results()]


@dataclass
class _Sums:
    """Running sums of one layer's heads (fp64), so the statistics of many batches are exact means."""

    n_keys: int
    rows: int = 0
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    max_weight: torch.Tensor | None = None


class SharpnessMeter:
    """Accumulates the statistics per (layer, head) over batches; :meth:`results` gives the means.

    A layer's maps must keep their head count and key count across updates (a different image size is a
    different measurement: use another meter).
    """

    def __init__(self) -> None:
        self._layers: dict[str, _Sums] = {}

    def update(self, layer: str, attn: torch.Tensor) -> None:
        attn = check_attention(attn, f"layer {layer}")
        n = attn.shape[-1]
        sums = self._layers.setdefault(layer, _Sums(n_keys=n))
        if sums.n_keys != n or (sums.max_weight is not None and sums.max_weight.shape[0] != attn.shape[1]):
            raise InputShapeError(f"layer {layer}: maps of {attn.shape[1]} heads over {n} keys after maps of "
                                  f"{0 if sums.max_weight is None else sums.max_weight.shape[0]} heads over "
                                  f"{sums.n_keys} keys; measure each input size with its own meter")
        per_row = {"entropy": row_entropy(attn), "top1_mass": top_k_mass(attn, 1),
                   "top5_mass": top_k_mass(attn, top_k_size(n, 5)),
                   "top10pct_mass": top_k_mass(attn, top_k_size(n, 0.1))}
        for name, values in per_row.items():  # (B, heads, N_query) -> per-head sums
            total = values.double().sum(dim=(0, 2))
            sums.sums[name] = sums.sums[name] + total if name in sums.sums else total
        peak = attn.amax(dim=(0, 2, 3))
        sums.max_weight = peak if sums.max_weight is None else torch.maximum(sums.max_weight, peak)
        sums.rows += attn.shape[0] * attn.shape[2]

    def results(self) -> list[dict[str, Any]]:
        """One record per layer (in first-update order) and head: ``layer``, ``head``, ``n_keys``, ``rows``
        (query rows averaged over) and the statistics."""
        out = []
        for layer, s in self._layers.items():
            log_n = math.log(s.n_keys)
            for h in range(s.max_weight.shape[0]):
                mean = {name: float(total[h] / s.rows) for name, total in s.sums.items()}
                out.append({"layer": layer, "head": h, "n_keys": s.n_keys, "rows": s.rows,
                            "entropy": mean["entropy"],
                            "entropy_norm": mean["entropy"] / log_n if s.n_keys > 1 else None,
                            "top1_mass": mean["top1_mass"], "top5_mass": mean["top5_mass"],
                            "top10pct_mass": mean["top10pct_mass"], "k_top5": top_k_size(s.n_keys, 5),
                            "k_top10pct": top_k_size(s.n_keys, 0.1), "max_weight": float(s.max_weight[h])})
        return out


@contextmanager
def capture_named_attention(model: nn.Module) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Like :func:`~vitkit.layers.attention.capture_attention`, but the maps are kept per module name
    (``stages.3.blocks.1.context_module``), so statistics can say which layer they describe.

    Example::

        with capture_named_attention(model) as maps:
            model(images)
        # maps["blocks.0.attn"]: the (B, heads, N, N) maps that module recorded, one per call
    """
    sources = {name: m for name, m in model.named_modules() if isinstance(m, AttentionMapSource)}
    maps: dict[str, list[torch.Tensor]] = {name: [] for name in sources}
    for name, m in sources.items():
        m.attn_sink = maps[name]
    try:
        yield maps
    finally:
        for m in sources.values():
            m.attn_sink = None
