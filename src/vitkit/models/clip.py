"""CLIP (Radford et al., 2021): an image tower and a causal text tower trained to agree on a shared embedding.

* ``visual``: a vitkit :class:`~vitkit.models.vit.VisionTransformer` set up as CLIP's image tower
  (:class:`CLIPVisionTransformer`): patch projection without bias, CLS token, learned 1D positions, a LayerNorm
  *before* the blocks (``norm_pre``, CLIP's "ln_pre"), the final LayerNorm read on the CLS token, and a
  bias-free projection to ``embed_dim`` as its head. ``clip.visual`` is therefore a complete image encoder:
  ``clip.visual(images)`` gives the image embeddings.
* ``text``: :class:`~vitkit.layers.text.TextTransformer` (token + learned positions, causal pre-norm blocks,
  final LayerNorm); the sequence is read at its end-of-text token (:func:`eot_index`) and projected by
  ``text_projection`` (no bias).
* ``logit_scale``: the log of the softmax temperature's inverse, initialised to ln(1/0.07) and clamped at
  ln(100) whenever it is used (CLIP clamps it during training so that the logits cannot blow up).

The layout and the numerics follow Hugging Face ``CLIPModel`` (``vitkit.convert.hf_clip`` converts its
checkpoints; tested to 1e-5 in fp32). :func:`clip_loss` is the symmetric InfoNCE loss, with negatives gathered
from every process under ``torchrun``.

A model may carry its tokenizer (``tokenizer``: the ``tokenizers`` JSON object, a constructor argument, so it is
written into ``config.json`` with the other arguments and rebuilt by ``from_pretrained``): the token ids only mean
something with the tokenizer that made them. :meth:`CLIP.set_tokenizer` checks that the tokenizer ends every text
with a token the pooling rule reads (``eos_token_id``, see :func:`eot_index`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..data.constants import FMNIST_MEAN, FMNIST_STD
from ..layers.text import TextTransformer
from ._base import TokenizerMixin, VitkitModel, check_model_args
from ._registry import register_config
from .vit import VisionTransformer

# OpenAI CLIP's normalisation (its image preprocessing; the HF processors carry the same numbers).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
LOGIT_SCALE_INIT = math.log(1 / 0.07)
LOGIT_SCALE_MAX = math.log(100)
# The eos_token_id of CLIP configs written before transformers PR #24773: it means "pool at the highest id".
LEGACY_EOS_TOKEN_ID = 2


def eot_index(input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """(B, N) ids -> (B,) position each sequence is read at: HF transformers 5's ``CLIPTextModel`` rule, exactly.

    * ``eos_token_id == 2`` (configs written before transformers PR #24773, e.g. the OpenAI checkpoints on
      the Hub): the position of the highest token id (the first one, if it occurs twice); OpenAI's tokenizer
      gives its end-of-text token the last id (49407), so this finds it.
    * otherwise: the first position holding ``eos_token_id`` (padding may use the same id); a sequence
      without it is read at position 0, as HF does.
    """
    if eos_token_id == LEGACY_EOS_TOKEN_ID:
        return input_ids.argmax(dim=-1)
    return (input_ids == eos_token_id).int().argmax(dim=-1)


def logit_scale_multiplier(logit_scale: torch.Tensor | float) -> torch.Tensor:
    """exp(min(logit_scale, ln 100)): what the cosine similarities are multiplied by."""
    return torch.as_tensor(logit_scale).clamp(max=LOGIT_SCALE_MAX).exp()


def clip_loss(image_feats: torch.Tensor, text_feats: torch.Tensor, logit_scale: torch.Tensor | float,
              all_gather: Callable[[torch.Tensor], torch.Tensor] | None = None, rank: int = 0,
              world_size: int = 1) -> torch.Tensor:
    """Symmetric InfoNCE of the local pairs ``(image_feats[i], text_feats[i])``, averaged over the local pairs.

    ``logit_scale`` is the model's log-space parameter (clamped at ln 100 here). Features are L2-normalised
    here (in float32, also under autocast). With ``all_gather`` (a function that concatenates a tensor's first
    dimension over processes in rank order and keeps the gradient, like ``TaskContext.all_gather``), every
    process's features are negatives: local image ``i`` is scored against all gathered texts and local text
    ``i`` against all gathered images, its positive sitting at column ``rank * B + i``. The mean of the
    processes' losses is then the loss of the global batch, and (with DDP averaging the gradients) so are the
    gradients. It gathers the normalised image features first, then the normalised text features.
    """
    if image_feats.shape != text_feats.shape or image_feats.ndim != 2:
        raise ValueError(f"image and text features must both be (B, D), got {tuple(image_feats.shape)} and "
                         f"{tuple(text_feats.shape)}")
    if all_gather is None and world_size != 1:
        raise ValueError(f"world_size={world_size} needs an all_gather function")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    n = image_feats.shape[0]
    with torch.autocast(image_feats.device.type, enabled=False):
        images = F.normalize(image_feats.float(), dim=-1)
        texts = F.normalize(text_feats.float(), dim=-1)
        all_images = all_gather(images) if all_gather is not None else images
        all_texts = all_gather(texts) if all_gather is not None else texts
        if all_images.shape[0] != world_size * n or all_texts.shape[0] != world_size * n:
            raise ValueError(f"all_gather returned {all_images.shape[0]} image and {all_texts.shape[0]} text rows; "
                             f"expected world_size * B = {world_size} * {n}")
        scale = logit_scale_multiplier(logit_scale).to(images.device, torch.float32)
        labels = rank * n + torch.arange(n, device=images.device)
        loss_images = F.cross_entropy(scale * images @ all_texts.T, labels)
        loss_texts = F.cross_entropy(scale * texts @ all_images.T, labels)
    return (loss_images + loss_texts) / 2


def _tower_eps(name: str, eps: float | None, shared: float) -> float:
    """One tower's LayerNorm eps: its own when given (finite, > 0), else the shared ``norm_eps``."""
    if eps is None:
        return shared
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < math.inf:
        raise ValueError(f"{name}={eps!r} must be a finite number > 0")
    return float(eps)


class CLIPOutput(NamedTuple):
    """``(logits_per_image, logits_per_text)``; ``loss`` is :func:`clip_loss` of this batch (one process)."""

    logits_per_image: torch.Tensor  # (B_images, B_texts): scaled cosine similarities
    logits_per_text: torch.Tensor  # its transpose

    @property
    def loss(self) -> torch.Tensor:
        """Symmetric cross-entropy with the matching pairs on the diagonal (image i goes with text i)."""
        logits = self.logits_per_image.float()
        labels = torch.arange(logits.shape[0], device=logits.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


class CLIPEmbeddings(NamedTuple):
    """``forward(..., embeddings=True)``: the projections before normalisation and the log-temperature, what
    :func:`clip_loss` takes (a loss that gathers features over processes needs them, not the local logits)."""

    image_embeds: torch.Tensor  # (B, embed_dim)
    text_embeds: torch.Tensor  # (B, embed_dim)
    logit_scale: torch.Tensor  # the parameter itself (clip_loss clamps it), so the temperature gets its gradient


class CLIPVisionTransformer(VisionTransformer):
    """A ViT as CLIP's image tower; the CLIP-specific parts are switches of this subclass, not of ViT.

    ``pre_norm``: ViT's LayerNorm on the embedded tokens (after positions, before the first block; CLIP's
    "ln_pre"). ``patch_bias=False``: CLIP's patch projection has no bias. The head is the bias-free projection to
    ``proj_dim`` (``num_classes`` reports its width), applied to the CLS token after the final LayerNorm.
    Every other argument is a :class:`VisionTransformer` argument.
    """

    def __init__(self, proj_dim: int = 512, pre_norm: bool = True, patch_bias: bool = False, **kwargs: Any) -> None:
        if "num_classes" in kwargs or kwargs.get("stem", "patch") != "patch":
            raise ValueError("CLIPVisionTransformer takes proj_dim (no num_classes) and a patch stem only")
        super().__init__(num_classes=0, pre_norm=pre_norm, **kwargs)
        proj = self.patch_embed.proj
        if not patch_bias:
            proj.register_parameter("bias", None)
        elif proj.bias is None:  # ViT's pre_norm drops the bias; a CLIP tower may still ask for one
            proj.bias = nn.Parameter(torch.zeros(proj.out_channels))
        self.num_classes = proj_dim
        self.head = nn.Linear(self.num_features, proj_dim, bias=False)
        nn.init.normal_(self.head.weight, std=self.num_features**-0.5)


class CLIP(TokenizerMixin, VitkitModel):
    """Image tower + text tower + learned temperature; ``forward`` gives both directions' logits.

    ``act`` and ``norm_eps`` are shared by both towers unless ``vision_act`` / ``text_act`` / ``vision_norm_eps`` /
    ``text_norm_eps`` set one tower's own (None: the shared value), as Hugging Face's ``CLIPConfig`` and OpenCLIP's
    per-tower ``norm_kwargs`` allow.
    """

    default_task = "clip"  # the task a checkpoint without a recorded one (converted) is used with

    head_prefixes = ()  # both projections are part of the model: a checkpoint must fit exactly

    def __init__(
        self,
        embed_dim: int = 512,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 32,
        in_chans: int = 3,
        vision_width: int = 768,
        vision_layers: int = 12,
        vision_heads: int = 12,
        vision_mlp_dim: int | None = None,
        vocab_size: int = 49408,
        context_length: int = 77,
        text_width: int = 512,
        text_layers: int = 12,
        text_heads: int = 8,
        text_mlp_dim: int | None = None,
        mlp_ratio: float = 4.0,
        eos_token_id: int = 49407,
        act: str = "quick_gelu",
        norm_eps: float = 1e-5,
        vision_act: str | None = None,
        text_act: str | None = None,
        vision_norm_eps: float | None = None,
        text_norm_eps: float | None = None,
        logit_scale_init: float = LOGIT_SCALE_INIT,
        dynamic_img_size: bool = False,
        pos_interp_antialias: bool = True,
        drop_path_rate: float = 0.0,
        tokenizer: dict[str, Any] | str | None = None,
    ) -> None:
        super().__init__()
        check_model_args(0, dict(embed_dim=embed_dim, img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                 vision_width=vision_width, vision_layers=vision_layers, vision_heads=vision_heads,
                                 vocab_size=vocab_size, context_length=context_length, text_width=text_width,
                                 text_layers=text_layers, text_heads=text_heads, mlp_ratio=mlp_ratio),
                         dict(drop_path_rate=drop_path_rate))
        if not (isinstance(eos_token_id, int) and 0 <= eos_token_id < vocab_size):
            raise ValueError(f"eos_token_id={eos_token_id!r} must be a token id below vocab_size={vocab_size}")
        if text_width % text_heads:
            raise ValueError(f"text_width {text_width} must be divisible by text_heads {text_heads}")
        vision_act, text_act = vision_act or act, text_act or act
        vision_norm_eps, text_norm_eps = (_tower_eps(name, eps, norm_eps) for name, eps in
                                          (("vision_norm_eps", vision_norm_eps), ("text_norm_eps", text_norm_eps)))
        self.embed_dim = embed_dim
        self.in_chans = in_chans
        self.vocab_size = vocab_size
        self.context_length = context_length
        self.eos_token_id = eos_token_id
        self.visual = CLIPVisionTransformer(
            proj_dim=embed_dim, img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=vision_width,
            depth=vision_layers, num_heads=vision_heads, mlp_ratio=mlp_ratio, mlp_dim=vision_mlp_dim,
            norm_eps=vision_norm_eps, act=vision_act, dynamic_img_size=dynamic_img_size,
            pos_interp_antialias=pos_interp_antialias, drop_path_rate=drop_path_rate)
        self.img_size = self.visual.img_size
        self.text = TextTransformer(vocab_size, context_length, text_width, text_layers, text_heads, mlp_ratio,
                                    text_mlp_dim, causal=True, norm_eps=text_norm_eps, act=text_act,
                                    drop_path_rate=drop_path_rate)
        self.text_projection = nn.Linear(text_width, embed_dim, bias=False)
        nn.init.normal_(self.text_projection.weight, std=text_width**-0.5)
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale_init)))
        self.pretrained_cfg = {"input_size": (in_chans, *self.img_size), "mean": OPENAI_CLIP_MEAN[:in_chans],
                               "std": OPENAI_CLIP_STD[:in_chans], "interpolation": "bicubic"}
        self._init_tokenizer(tokenizer)

    # ------------------------------------------------------------------ tokenizer
    def _check_tokenizer(self, tok: Any) -> None:
        """Refuse a tokenizer whose texts do not end where :func:`eot_index` reads them (the text tower would pool
        another token)."""
        from tokenizers import Tokenizer

        probe = Tokenizer.from_str(tok.to_str())
        probe.no_padding()
        probe.no_truncation()
        for text in ("a", "a photo of a bag"):
            ids = torch.tensor([probe.encode(text).ids])
            at = int(eot_index(ids, self.eos_token_id)[0])
            if at != ids.shape[1] - 1:
                raise ValueError(f"the tokenizer does not end texts with the end-of-text token the model pools at "
                                 f"(eos_token_id={self.eos_token_id}): {text!r} -> {ids[0].tolist()} is read at "
                                 f"position {at}; build the model with the id of the tokenizer's last token")

    # ------------------------------------------------------------------ encoders
    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """(B, C, H, W) normalised images -> (B, embed_dim) image embeddings (unit length if ``normalize``)."""
        feats = self.visual(images)
        return F.normalize(feats, dim=-1) if normalize else feats

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    normalize: bool = False) -> torch.Tensor:
        """(B, N) token ids (+ padding mask, 1 = token) -> (B, embed_dim) text embeddings, read at the
        end-of-text token (:func:`eot_index`)."""
        tokens = self.text(input_ids, attention_mask)
        pooled = tokens[torch.arange(tokens.shape[0], device=tokens.device),
                        eot_index(input_ids, self.eos_token_id).to(tokens.device)]
        feats = self.text_projection(pooled)
        return F.normalize(feats, dim=-1) if normalize else feats

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                embeddings: bool = False) -> CLIPOutput | CLIPEmbeddings:
        """Scaled cosine similarities of every image with every text: ``(logits_per_image, logits_per_text)``.

        ``embeddings=True`` returns :class:`CLIPEmbeddings` instead, for losses that gather features over
        processes: a DDP-wrapped model is synchronised through ``forward`` only, not through ``encode_*``.
        """
        if embeddings:
            return CLIPEmbeddings(self.encode_image(images), self.encode_text(input_ids, attention_mask),
                                  self.logit_scale)
        image_feats = self.encode_image(images, normalize=True)
        text_feats = self.encode_text(input_ids, attention_mask, normalize=True)
        logits_per_image = logit_scale_multiplier(self.logit_scale) * image_feats @ text_feats.T
        return CLIPOutput(logits_per_image, logits_per_image.T)

    # ------------------------------------------------------------------ training metadata
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations of both towers in backward (less memory, about a third more compute)."""
        self.visual.set_grad_checkpointing(enable)
        self.text.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        """Tokens, position tables and the temperature (token embeddings are decayed, as in OpenCLIP)."""
        names = {f"visual.{n}" for n in self.visual.no_weight_decay()} | {"text.embed.pos_embed.weight",
                                                                          "logit_scale"}
        return names & dict(self.named_parameters()).keys()  # the image tower may name tokens it lacks


# ---------------------------------------------------------------------- registered configurations
# OpenAI sizes (CLIP paper table 20 = the HF configs): image 224, text context 77, BPE vocabulary 49408 whose
# last id (49407) is <|endoftext|>, QuickGELU, LayerNorm eps 1e-5.
_OPENAI_CFG = {"mean": OPENAI_CLIP_MEAN, "std": OPENAI_CLIP_STD, "interpolation": "bicubic"}
_OPENAI_TEXT: dict[str, Any] = dict(vocab_size=49408, context_length=77, text_layers=12, eos_token_id=49407,
                                    act="quick_gelu", norm_eps=1e-5, img_size=224)
register_config("clip_vit_b32", CLIP, _OPENAI_CFG, **_OPENAI_TEXT, embed_dim=512, patch_size=32, vision_width=768,
                vision_layers=12, vision_heads=12, text_width=512, text_heads=8)
register_config("clip_vit_b16", CLIP, _OPENAI_CFG, **_OPENAI_TEXT, embed_dim=512, patch_size=16, vision_width=768,
                vision_layers=12, vision_heads=12, text_width=512, text_heads=8)
register_config("clip_vit_l14", CLIP, _OPENAI_CFG, **_OPENAI_TEXT, embed_dim=768, patch_size=14,
                vision_width=1024, vision_layers=24, vision_heads=16, text_width=768, text_heads=12)

# Fashion-MNIST: one 28x28 grayscale image per caption (patch 4: 49 patch tokens; the image tower is
# vit_fmnist_tiny's 96 wide x 6 blocks), captions of up to 32 tokens from a 1000-token vocabulary whose last id
# (999) is the end-of-text token, as in OpenAI's tokenizer (so both pooling rules find it). GELU: trained from
# scratch, there is no reason for QuickGELU.
register_config("clip_fmnist_tiny", CLIP, {"mean": FMNIST_MEAN, "std": FMNIST_STD}, embed_dim=64, img_size=28,
                patch_size=4, in_chans=1, vision_width=96, vision_layers=6, vision_heads=3, vocab_size=1000,
                context_length=32, text_width=64, text_layers=4, text_heads=2, mlp_ratio=2.0, eos_token_id=999,
                act="gelu", norm_eps=1e-5)
