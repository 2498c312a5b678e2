"""Weight initialisation shared by the model families."""

from __future__ import annotations

from torch import nn


def trunc_normal_linears_(module: nn.Module, std: float = 0.02, embeddings: bool = False) -> None:
    """Truncated-normal N(0, ``std``) weights and zero biases for every ``nn.Linear`` in ``module`` (and every
    ``nn.Embedding`` with ``embeddings``), in module order: the ViT/BERT/GPT-2 initialisation."""
    kinds = (nn.Linear, nn.Embedding) if embeddings else nn.Linear
    for m in module.modules():
        if isinstance(m, kinds):
            nn.init.trunc_normal_(m.weight, std=std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
