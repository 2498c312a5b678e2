"""ViLT (Kim et al., 2021): one transformer over text tokens and image patches, no convolutional backbone.

text ids -> BERT-style embeddings (word + position + segment, LayerNorm, dropout)      ┐
image -> conv patches + [CLS] + position table interpolated to each image's valid grid ├-> + modality embedding
                                                                                       ┘   -> concat -> blocks
-> LayerNorm -> text features | image features; pooler = tanh(Linear(first token)) -> heads.

Layer facts checked against Hugging Face ``ViltModel`` (and reproduced by ``tests/test_vilt.py`` to 1e-5):

* The encoder layer is the pre-norm ViT block (``x + attn(LN(x))``, ``x + mlp(LN(x))``), so vitkit's
  :class:`~vitkit.layers.Block` is used as is. Every LayerNorm has eps 1e-12 (the HF / BERT value; the official
  timm-based code used 1e-6, a difference far below float32 noise at ViLT's scale).
* Image positions: a learned (1, 1 + h*w, D) table made for ``img_size``; for every image its patch part is
  resampled **bilinearly with align_corners=True** to the grid of that image's *valid* region (``pixel_mask``:
  images of different sizes padded bottom/right into one batch) and zero-padded to the batch grid.
* The modality embedding (type 0 for text, 1 for image, 2 for NLVR2's second image) is added after the
  per-modality embeddings; the text's own LayerNorm comes before it.
* Pooler: dense + tanh on the first token of the joint sequence (the text [CLS]). Heads: ``rank_output``
  Linear(D, 1) (``ViltForImageAndTextRetrieval``; the official retrieval fine-tuning head) and the MLM head
  (``ViltForMaskedLM``: dense -> act -> LayerNorm -> decoder). HF always ties the decoder to the word
  embeddings (``tie_word_embeddings`` is forced on); ``tie_mlm_decoder=False`` gives the official code's separate
  decoder. A tied decoder is computed from the word table, so the table is stored once in checkpoints.

Random patch sampling (``patch_sampling``): the paper trains on at most ``max_image_length`` (200) patches per
image, drawn at random among its valid patches. HF does the same whenever ``max_image_length > 0``, in
evaluation too, and even with -1 it shuffles the patch order. vitkit keeps the patches in grid order and
samples only in training mode (or when ``forward(..., patch_sampling=True)`` asks for it); the draw uses the
global RNG or a ``generator``, so it is reproducible with a seed. Without sampling every patch of the batch grid
is kept and padded patches are masked out of attention: the outputs at valid positions equal HF's.

A model may carry its tokenizer (``tokenizer``: the ``tokenizers`` JSON object, a constructor argument as in
:class:`~vitkit.models.clip.CLIP`, so ``config.json`` holds it and ``from_pretrained`` rebuilds it): token ids only
mean something with the tokenizer that made them. :meth:`ViLT.set_tokenizer` refuses one with more tokens than the
embedding table.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from ..data.constants import FMNIST_MEAN, FMNIST_STD, INCEPTION_MEAN, INCEPTION_STD
from ..errors import CheckpointError, InputShapeError
from ..layers import Block, PatchEmbed, check_image_batch, get_act_layer
from ..layers.ot import optimal_transport_dist, transport_plan
from ..layers.pos_embed import infer_grid
from ..utils import to_2tuple
from ._base import TokenizerMixin, VitkitModel, check_model_args
from ._registry import register_config


class ViltTextEmbeddings(nn.Module):
    """BERT input embeddings: word + segment (token type) + absolute position, then LayerNorm and dropout.

    Kept inside the ViLT family on purpose: the layout follows HF ``TextEmbeddings`` one to one, so converted
    checkpoints map name for name.
    """

    def __init__(self, vocab_size: int, dim: int, max_len: int, type_vocab_size: int = 2,
                 pad_token_id: int | None = None, norm_eps: float = 1e-12, drop: float = 0.0) -> None:
        super().__init__()
        self.max_len = max_len
        self.word_embeddings = nn.Embedding(vocab_size, dim, padding_idx=pad_token_id)
        self.position_embeddings = nn.Embedding(max_len, dim)
        self.token_type_embeddings = nn.Embedding(type_vocab_size, dim)
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.drop = nn.Dropout(drop)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        n = input_ids.shape[1]
        if n > self.max_len:
            raise InputShapeError(f"ViLT takes at most {self.max_len} text tokens (its position table), got {n}; "
                                  f"truncate the text")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        x = x + self.position_embeddings.weight[:n]
        return self.drop(self.norm(x))


class ViltMLMHead(nn.Module):
    """Masked-language-model head: dense -> activation -> LayerNorm -> vocabulary logits.

    Tied (``decoder is None``): the logits use the word-embedding table passed to :meth:`forward`, plus the head's
    own bias, so no second copy of the table exists (safetensors refuses tensors that share memory).
    """

    def __init__(self, dim: int, vocab_size: int, act: str = "gelu", norm_eps: float = 1e-12,
                 tied: bool = True) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.act = get_act_layer(act)
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.decoder = None if tied else nn.Linear(dim, vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, x: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.act(self.dense(x)))
        weight = word_embeddings if self.decoder is None else self.decoder.weight
        return F.linear(x, weight, self.bias)


class ViLT(TokenizerMixin, VitkitModel):
    """Vision-and-Language Transformer; see the module docstring for the layout and the HF correspondences.

    ``forward`` returns a dict: ``text_feats`` (B, T, D), ``image_feats`` (B, 1 + L, D) (image [CLS] first),
    ``pooled`` (B, D), ``text_masks`` (B, T) and ``image_masks`` (B, 1 + L) (bool, True = real token),
    ``patch_index`` (B, L, 2) (row, column of every image token after the image [CLS]), ``itm_score`` (B,) and
    ``mlm_logits`` (B, T, vocab) for the heads the model has, and ``hidden_states`` on request.
    """

    default_task = "vilt"  # the task a checkpoint without a recorded one (converted) is used with

    head_prefixes = ("rank_output.", "mlm_head.")

    def __init__(
        self,
        img_size: int | tuple[int, int] = 384,
        patch_size: int = 32,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        mlp_dim: int | None = None,
        qkv_bias: bool = True,
        vocab_size: int = 30522,
        max_text_len: int = 40,
        type_vocab_size: int = 2,
        modality_types: int = 2,
        pad_token_id: int | None = None,
        norm_eps: float = 1e-12,
        act: str = "gelu",
        patch_sampling: bool = False,
        max_image_length: int = 200,
        rank_head: bool = True,
        mlm_head: bool = True,
        tie_mlm_decoder: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        tokenizer: dict[str, Any] | str | None = None,
    ) -> None:
        super().__init__()
        check_model_args(0, dict(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                                 depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, vocab_size=vocab_size,
                                 max_text_len=max_text_len, type_vocab_size=type_vocab_size,
                                 modality_types=modality_types, max_image_length=max_image_length),
                         dict(drop_rate=drop_rate, attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate))
        if pad_token_id is not None and not 0 <= pad_token_id < vocab_size:
            raise ValueError(f"pad_token_id={pad_token_id} is outside the vocabulary of {vocab_size} tokens")
        self.img_size = to_2tuple(img_size)
        self.in_chans = in_chans
        self.embed_dim = self.num_features = embed_dim
        self.vocab_size = vocab_size
        self.max_text_len = max_text_len
        self.patch_sampling = patch_sampling
        self.max_image_length = max_image_length
        self.num_classes = 0

        self.text_embed = ViltTextEmbeddings(vocab_size, embed_dim, max_text_len, type_vocab_size, pad_token_id,
                                             norm_eps, drop_rate)
        self.patch_embed = PatchEmbed(self.img_size, patch_size, None, in_chans, embed_dim)
        self.pos_grid: tuple[int, int] = self.patch_embed.grid
        if min(self.pos_grid) < 1:
            raise ValueError(f"img_size {self.img_size} is smaller than one patch of {patch_size}")
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.pos_grid[0] * self.pos_grid[1], embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        self.modality_embed = nn.Embedding(modality_types, embed_dim)

        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # plain floats: builds on meta too
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, mlp_dim, qkv_bias, proj_drop=drop_rate, attn_drop=attn_drop_rate,
                  drop_path=dpr[i], norm_eps=norm_eps, act=act)
            for i in range(depth)
        ])
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.pooler = nn.Linear(embed_dim, embed_dim)
        self.rank_output = nn.Linear(embed_dim, 1) if rank_head else None
        self.mlm_head = ViltMLMHead(embed_dim, vocab_size, act, norm_eps, tie_mlm_decoder) if mlm_head else None
        self.grad_checkpointing = False
        self._init_weights()
        self.pretrained_cfg = {"input_size": (in_chans, *self.img_size), "mean": (0.5,) * in_chans,
                               "std": (0.5,) * in_chans, "interpolation": "bicubic", "max_text_len": max_text_len}
        self._init_tokenizer(tokenizer)

    def _init_weights(self) -> None:
        """BERT/ViT initialisation: N(0, 0.02) for Linears, embeddings and tables, zero biases, zero pad row."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
                if m.padding_idx is not None:
                    nn.init.zeros_(m.weight[m.padding_idx])
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    # ------------------------------------------------------------------ embeddings
    def _positions(self, rows: torch.Tensor, cols: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(B, h*w, D) patch positions: the table resampled to each image's valid (rows, cols), zero outside."""
        th, tw = self.pos_grid
        spatial = self.pos_embed[:, 1:].transpose(1, 2).reshape(1, self.embed_dim, th, tw)
        cache: dict[tuple[int, int], torch.Tensor] = {}
        per_image = []
        for r, c in zip(rows.tolist(), cols.tolist()):
            if (r, c) not in cache:
                if r == 0 or c == 0:
                    table = spatial.new_zeros(1, self.embed_dim, *grid)
                else:
                    table = spatial if (r, c) == (th, tw) else F.interpolate(
                        spatial, size=(r, c), mode="bilinear", align_corners=True)
                    table = F.pad(table, (0, grid[1] - c, 0, grid[0] - r))
                cache[(r, c)] = table
            per_image.append(cache[(r, c)])
        return torch.cat(per_image).flatten(2).transpose(1, 2)

    def _patch_mask(self, pixel_mask: torch.Tensor | None, batch: int, grid: tuple[int, int],
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Valid patches (B, h, w) and the valid rows and columns per image.

        A patch is valid when its top-left pixel is (nearest-neighbour downsampling, as HF and the official code);
        the valid region must be a top-left rectangle, which is what padding images bottom/right gives.
        """
        if pixel_mask is None:
            mask = torch.ones(batch, *grid, dtype=torch.bool, device=device)
            full = torch.full((batch,), grid[0], device=device), torch.full((batch,), grid[1], device=device)
            return mask, full[0], full[1]
        if pixel_mask.ndim != 3 or pixel_mask.shape[0] != batch:
            raise InputShapeError(f"pixel_mask must be (B, H, W) with B = {batch}, got {tuple(pixel_mask.shape)}")
        mask = F.interpolate(pixel_mask[:, None].float(), size=grid).long()[:, 0].bool()
        rows, cols = mask[:, :, 0].sum(1), mask[:, 0, :].sum(1)
        rect = (torch.arange(grid[0], device=device)[None, :, None] < rows[:, None, None]) & (
            torch.arange(grid[1], device=device)[None, None, :] < cols[:, None, None])
        if not torch.equal(rect, mask):
            raise InputShapeError("pixel_mask must mark a top-left rectangle per image (images padded at the bottom "
                                  "and right, as ViltProcessor does)")
        return mask, rows, cols

    def embed_image(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None,
                    sample: bool = False, generator: torch.Generator | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, C, H, W) -> tokens (B, 1 + L, D) with [CLS] first and positions added, mask (B, 1 + L) and
        patch_index (B, L, 2). ``sample`` keeps at most ``max_image_length`` valid patches per image, drawn at
        random (padded with masked patches up to the batch's L); otherwise every patch is kept in grid order."""
        check_image_batch(pixel_values, self.in_chans, self.patch_embed.reduction, None, type(self).__name__)
        weight = self.patch_embed.proj.weight
        x, grid = self.patch_embed(pixel_values.to(weight.dtype))
        B, G, D = x.shape
        mask, rows, cols = self._patch_mask(pixel_mask, B, grid, x.device)
        mask = mask.flatten(1)
        pos = self._positions(rows, cols, grid).to(x.dtype)
        index = torch.arange(G, device=x.device).expand(B, G)
        if sample:
            keep = min(int(mask.sum(1).max()), self.max_image_length)
            noise = torch.rand(B, G, generator=generator, device=generator.device if generator else "cpu")
            # valid patches sort first, in random order; the first `keep` are taken, then put back in grid order
            key = mask.float() + 0.5 * noise.to(x.device)
            index = key.argsort(dim=1, descending=True)[:, :keep].sort(dim=1).values
            x = x.gather(1, index[..., None].expand(-1, -1, D))
            pos = pos.gather(1, index[..., None].expand(-1, -1, D))
            mask = mask.gather(1, index)
        x = x + pos
        cls = (self.cls_token + self.pos_embed[:, :1]).to(x.dtype).expand(B, -1, -1)
        x = self.pos_drop(torch.cat([cls, x], dim=1))
        mask = torch.cat([mask.new_ones(B, 1), mask], dim=1)
        patch_index = torch.stack([index // grid[1], index % grid[1]], dim=-1)
        return x, mask, patch_index

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_mask: torch.Tensor | None = None,
        *,
        image_token_type_idx: int = 1,
        patch_sampling: bool | None = None,
        generator: torch.Generator | None = None,
        output_hidden_states: bool = False,
        heads: bool = True,
    ) -> dict[str, Any]:
        """Text ids (B, T) + images (B, C, H, W) -> the dict described in the class docstring.

        ``attention_mask`` (B, T) marks real text tokens (1) and padding (0); ``pixel_mask`` (B, H, W) real
        pixels. ``patch_sampling`` overrides the default (sample in training mode when the model was built with
        ``patch_sampling=True``). ``heads=False`` skips the heads (features only). ``hidden_states`` (with
        ``output_hidden_states``) are the embeddings and every block's output, before the final LayerNorm (HF's).
        """
        if not torch.is_tensor(input_ids) or input_ids.ndim != 2 or input_ids.is_floating_point():
            raise InputShapeError(f"input_ids must be an integer tensor (B, T), got "
                                  f"{getattr(input_ids, 'dtype', type(input_ids).__name__)} "
                                  f"{tuple(getattr(input_ids, 'shape', ()))}")
        if pixel_values is None:
            raise InputShapeError("ViLT needs pixel_values (B, C, H, W) next to the text")
        if pixel_values.shape[0] != input_ids.shape[0]:
            raise InputShapeError(f"text batch {input_ids.shape[0]} and image batch {pixel_values.shape[0]} differ")
        if not 0 <= image_token_type_idx < self.modality_embed.num_embeddings:
            raise ValueError(f"image_token_type_idx={image_token_type_idx} needs modality_types > "
                             f"{image_token_type_idx} (it is {self.modality_embed.num_embeddings})")
        sample = (self.patch_sampling and self.training) if patch_sampling is None else patch_sampling
        text = self.text_embed(input_ids, token_type_ids)
        image, image_masks, patch_index = self.embed_image(pixel_values, pixel_mask, sample, generator)
        text = text + self.modality_embed.weight[0].to(text.dtype)
        image = image + self.modality_embed.weight[image_token_type_idx].to(image.dtype)
        text_masks = (torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None
                      else attention_mask.to(torch.bool))
        if text_masks.shape != input_ids.shape:
            raise InputShapeError(f"attention_mask {tuple(text_masks.shape)} does not match input_ids "
                                  f"{tuple(input_ids.shape)}")
        x = torch.cat([text, image], dim=1)
        bias = torch.cat([text_masks, image_masks], dim=1)[:, None, None, :]
        hidden = [x] if output_hidden_states else None
        for blk in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(blk, x, bias, use_reentrant=False)
            else:
                x = blk(x, bias)
            if hidden is not None:
                hidden.append(x)
        x = self.norm(x)
        n_text = text.shape[1]
        out: dict[str, Any] = {
            "text_feats": x[:, :n_text], "image_feats": x[:, n_text:], "pooled": torch.tanh(self.pooler(x[:, 0])),
            "text_masks": text_masks, "image_masks": image_masks, "patch_index": patch_index,
        }
        if heads and self.rank_output is not None:
            out["itm_score"] = self.rank_output(out["pooled"])[:, 0]
        if heads and self.mlm_head is not None:
            out["mlm_logits"] = self.mlm_score(out["text_feats"])
        if hidden is not None:
            out["hidden_states"] = hidden
        return out

    def mlm_score(self, text_feats: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits for text features from :meth:`forward` (B, T, D) -> (B, T, vocab)."""
        if self.mlm_head is None:
            raise ValueError("this ViLT has no MLM head (built with mlm_head=False)")
        return self.mlm_head(text_feats, self.text_embed.word_embeddings.weight)

    def itm_score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                  token_type_ids: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                  pixel_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        """Image-text matching / retrieval score per pair (B,): ``rank_output`` on the pooled feature (HF
        ``ViltForImageAndTextRetrieval`` logits[:, 0])."""
        if self.rank_output is None:
            raise ValueError("this ViLT has no ranking head (built with rank_head=False)")
        out = self(input_ids, attention_mask, token_type_ids, pixel_values, pixel_mask, heads=False, **kwargs)
        return self.rank_output(out["pooled"])[:, 0]

    def mlm_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   token_type_ids: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                   pixel_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        """Masked-language-model logits (B, T, vocab) (HF ``ViltForMaskedLM`` logits)."""
        out = self(input_ids, attention_mask, token_type_ids, pixel_values, pixel_mask, heads=False, **kwargs)
        return self.mlm_score(out["text_feats"])

    # ------------------------------------------------------------------ checkpoints and optimiser metadata
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """A position table made for another ``img_size`` is resampled the way ViLT resamples it at run time."""
        key = prefix + "pos_embed"
        if key in state_dict and state_dict[key].shape != self.pos_embed.shape:
            src = state_dict[key]
            if src.ndim != 3 or src.shape[-1] != self.embed_dim or src.shape[1] < 2:
                raise CheckpointError(f"{key}: checkpoint table has shape {tuple(src.shape)}, model expects "
                                      f"{tuple(self.pos_embed.shape)}")
            old = infer_grid(src.shape[1] - 1, self.pos_grid)
            spatial = src[:, 1:].transpose(1, 2).reshape(1, self.embed_dim, *old).float()
            spatial = F.interpolate(spatial, size=self.pos_grid, mode="bilinear", align_corners=True)
            state_dict[key] = torch.cat([src[:, :1], spatial.flatten(2).transpose(1, 2).to(src.dtype)], dim=1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in backward: less memory, about a third more compute."""
        self.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "pos_embed"}

    @property
    def num_lr_layers(self) -> int:
        return len(self.blocks) + 2

    def lr_layer_id(self, name: str) -> int:
        if name.startswith(("text_embed.", "patch_embed.", "cls_token", "pos_embed", "modality_embed.")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return len(self.blocks) + 1


def _wpa_pads(out: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(text, image) padding masks of the WPA computation: padding, the text [CLS] and [SEP] (the last real
    token) and the image [CLS] take no part."""
    txt_mask, img_mask = out["text_masks"].clone(), out["image_masks"].clone()
    last = txt_mask.sum(1) - 1
    txt_mask[torch.arange(txt_mask.shape[0], device=txt_mask.device), last.clamp(min=0)] = False
    txt_mask[:, 0] = False
    img_mask[:, 0] = False
    return ~txt_mask, ~img_mask


def wpa_distance(out: dict[str, Any], beta: float = 0.5, iteration: int = 50, k: int = 1) -> torch.Tensor:
    """ViLT's word-patch alignment distance per pair (B,) from :meth:`ViLT.forward` outputs.

    As the official ``compute_itm_wpa``: the text [CLS] and [SEP] (the last real token) and the image [CLS] take
    no part; features are compared in float32 under the cosine cost with IPOT (:mod:`vitkit.layers.ot`).
    The ITM-WPA loss is ``0.1 * (mean distance of matching pairs - mean of non-matching pairs)``.
    """
    return optimal_transport_dist(out["text_feats"].float(), out["image_feats"].float(), *_wpa_pads(out),
                                  beta, iteration, k)


def wpa_plan(out: dict[str, Any], beta: float = 0.5, iteration: int = 50, k: int = 1) -> torch.Tensor:
    """The transport plan behind :func:`wpa_distance`, as (B, text tokens, image tokens) with the [CLS] image
    token first (zero rows and columns where a token takes no part): where each word sends its mass."""
    _, T = transport_plan(out["text_feats"].float(), out["image_feats"].float(), *_wpa_pads(out), beta, iteration,
                          k)
    return T.transpose(1, 2)


# ---------------------------------------------------------------------- registered configurations
# The paper's ViLT-B/32: ViT-B/32 widths, BERT's uncased vocabulary, 40 text tokens, a 12x12 table for 384 images
# (images are resized to a shorter side of 384 and a longer side of at most 640, so tables are resampled).
register_config("vilt_b32", ViLT, {"mean": INCEPTION_MEAN, "std": INCEPTION_STD},
                img_size=384, patch_size=32, embed_dim=768, depth=12, num_heads=12, vocab_size=30522,
                max_text_len=40, pad_token_id=0)
# Fashion-MNIST pairs: two 28x28 items side by side (28x56, 1 channel), patch 4 -> a 7x14 grid of 98 patches,
# captions of at most 16 word-level tokens from a small vocabulary (class names, relation words, [PAD]=0,
# [CLS], [SEP], [MASK], [UNK]; 128 entries leave room; override vocab_size for another tokenizer).
register_config("vilt_fmnist_tiny", ViLT, {"mean": FMNIST_MEAN, "std": FMNIST_STD},
                img_size=(28, 56), patch_size=4, in_chans=1, embed_dim=96, depth=4, num_heads=3, mlp_ratio=2.0,
                vocab_size=128, max_text_len=16, pad_token_id=0, max_image_length=64)
