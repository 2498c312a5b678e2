"""Contrastive pretraining model (SimCLR, Chen et al. 2020): a vitkit ViT encoder plus a projection MLP.

The loss (NT-Xent / InfoNCE) lives in :mod:`vitkit.tasks.contrastive`; this file is only the network:

* ``encoder``: any registered ViT configuration built with ``num_classes=0``, so its parameters are named
  exactly as in a classifier (``encoder.blocks.0.attn.qkv.weight`` ...). A checkpoint of this model therefore
  hands its encoder to ``create_model("vit_fmnist_tiny", pretrained=<folder>, num_classes=10)`` for
  fine-tuning or linear evaluation (``backbone_prefix``; the projector is dropped there).
* ``projector``: ``proj_layers`` Linear layers (hidden width ``proj_hidden_dim``, ReLU between, output
  ``proj_dim``) as in SimCLR; the contrastive loss is computed on its L2-normalised output, and it is thrown
  away after pretraining (the features before it transfer better, SimCLR section 4.2).

BatchNorm in the projector (``proj_bn``) is off by default: its statistics would be per process (vitkit does
not synchronise them under ``torchrun``, where SimCLR and MoCo v3 use synchronised BN), which breaks the
engine's promise that N processes train the same model as one; DINO's ViT heads do without it. Switch it on
for SimCLR's head in one process.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data.constants import FMNIST_MEAN, FMNIST_STD
from ..layers.weight_init import trunc_normal_linears_
from ._base import EncoderWrapper
from ._registry import create_model, register_config


class ContrastiveViT(EncoderWrapper):
    """ViT encoder + projection MLP; ``forward`` gives L2-normalised projections, ``encode`` pooled features.

    It also speaks the classifier interface (``forward_features``, ``forward_head(pre_logits=True)``,
    ``forward_intermediates``, ``attention_maps``), the projector playing the part of the head, so feature
    probes and inspection tools treat it like any vitkit model.
    """

    default_task = "contrastive"  # the task a checkpoint without a recorded one (converted) is used with

    head_prefixes = ()  # the projector is part of the model: a checkpoint must fit it exactly

    def __init__(
        self,
        encoder: str = "vit_fmnist_tiny",
        encoder_args: dict[str, Any] | None = None,
        proj_hidden_dim: int = 2048,
        proj_dim: int = 128,
        proj_layers: int = 2,
        proj_bn: bool = False,
    ) -> None:
        super().__init__()
        encoder_args = dict(encoder_args or {})
        if encoder_args.pop("num_classes", 0) != 0:
            raise ValueError("ContrastiveViT builds its encoder without a classifier; drop num_classes from "
                             "encoder_args")
        if proj_layers < 1 or proj_dim < 1 or proj_hidden_dim < 1:
            raise ValueError(f"projector needs proj_layers, proj_dim and proj_hidden_dim >= 1, got {proj_layers}, "
                             f"{proj_dim}, {proj_hidden_dim}")
        self.encoder = create_model(encoder, num_classes=0, **encoder_args)
        if not hasattr(self.encoder, "forward_features") or not hasattr(self.encoder, "forward_head"):
            raise ValueError(f"encoder {encoder!r} is not a token classifier (needs forward_features/forward_head)")
        self.num_features = self.encoder.num_features
        self.proj_dim = proj_dim

        layers: list[nn.Module] = []
        width = self.num_features
        for _ in range(proj_layers - 1):
            layers += [nn.Linear(width, proj_hidden_dim, bias=not proj_bn)]
            layers += [nn.BatchNorm1d(proj_hidden_dim)] if proj_bn else []
            layers += [nn.ReLU(inplace=True)]
            width = proj_hidden_dim
        layers.append(nn.Linear(width, proj_dim))
        self.projector = nn.Sequential(*layers)
        trunc_normal_linears_(self.projector)
        cfg = dict(self.encoder.pretrained_cfg)
        cfg.pop("class_names", None)
        self.pretrained_cfg = cfg

    # ------------------------------------------------------------------ forward
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> the encoder's normalised tokens."""
        return self.encoder.forward_features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens -> pooled features (``pre_logits=True``) or L2-normalised projections (float32)."""
        pooled = self.encoder.forward_head(x, pre_logits=True)
        if pre_logits:
            return pooled
        return F.normalize(self.projector(pooled).float(), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, proj_dim) unit vectors: what the contrastive loss compares."""
        return self.forward_head(self.forward_features(x))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, num_features) pooled encoder features: what transfers and what probes read."""
        return self.forward_head(self.forward_features(x), pre_logits=True)

    def forward_intermediates(self, x: torch.Tensor, **kwargs: Any):
        """The encoder's per-block feature maps (see ``TokenClassifier.forward_intermediates``)."""
        return self.encoder.forward_intermediates(x, **kwargs)


# ---------------------------------------------------------------------- registered configurations
# vit_fmnist_tiny (96 wide, 6 blocks) with a 384-wide projector to 128-d, SimCLR's output size.
register_config("simclr_vit_fmnist_tiny", ContrastiveViT, {"mean": FMNIST_MEAN, "std": FMNIST_STD},
                encoder="vit_fmnist_tiny", proj_hidden_dim=384, proj_dim=128)
