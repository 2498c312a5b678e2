"""Text towers: token + position embedding and a stack of pre-norm blocks, causal (CLIP) or bidirectional.

The blocks are the shared :class:`~vitkit.layers.block.Block`; text only adds how tokens enter (``TextEmbed``)
and which keys each token may attend to (:func:`text_attention_mask`). ``TextEmbed`` is the reusable part
for image-text models whose text side is built differently (ViLT adds its own token-type embedding on top).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn

from ..errors import CheckpointError, InputShapeError
from .block import Block
from .weight_init import trunc_normal_linears_


def tokenizer_json(tokenizer: Any) -> dict[str, Any]:
    """A ``tokenizers.Tokenizer``, its JSON string or its parsed JSON object -> the JSON object."""
    if isinstance(tokenizer, dict):
        return tokenizer
    if isinstance(tokenizer, str):
        return json.loads(tokenizer)
    if callable(getattr(tokenizer, "to_str", None)):
        return json.loads(tokenizer.to_str())
    raise TypeError(f"tokenizer must be a tokenizers.Tokenizer or its JSON, got {type(tokenizer).__name__}")


TOKENIZER_FILE = "tokenizer.json"  # where a tokenizer lies beside a checkpoint (Hugging Face's name)


def read_tokenizer_file(path: str | Path) -> Any:
    """A ``tokenizers.Tokenizer`` from a ``tokenizer.json`` file; an unreadable one is a CheckpointError naming it."""
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - the Rust side raises a bare Exception for unreadable files
        raise CheckpointError(f"{path} is not a readable tokenizers file: {e}") from None


def check_token_batch(input_ids: torch.Tensor, context_length: int, what: str = "text encoder") -> None:
    """Validate a (B, N) batch of token ids; raise a readable error instead of an IndexError deep in torch."""
    if not isinstance(input_ids, torch.Tensor):
        raise InputShapeError(f"{what} expects a torch.Tensor of token ids (B, N), got {type(input_ids).__name__}")
    if input_ids.ndim != 2:
        raise InputShapeError(f"{what} expects token ids of shape (B, N), got {tuple(input_ids.shape)}")
    if input_ids.is_floating_point() or input_ids.dtype == torch.bool:
        raise InputShapeError(f"{what} expects integer token ids, got {input_ids.dtype}")
    if input_ids.shape[1] > context_length:
        raise InputShapeError(f"{what} has a context of {context_length} tokens, got sequences of "
                              f"{input_ids.shape[1]}; truncate them (the tokenizer's max_length)")


def text_attention_mask(attention_mask: torch.Tensor | None, seq_len: int, causal: bool,
                        device: torch.device | None = None) -> torch.Tensor | None:
    """Boolean attention mask (True = may attend), broadcastable to (B, heads, N, N); None when unrestricted.

    ``attention_mask`` is the tokenizer's (B, N) padding mask (1 = real token, 0 = padding): padded keys are
    hidden from every query. ``causal`` hides later keys. Each token always sees itself, so the query row of a
    padded token is never fully masked (that would give NaN, which then leaks through the values of masked
    keys); the outputs of real tokens are unaffected, since they never see padded keys.
    """
    if attention_mask is None and not causal:
        return None
    if attention_mask is not None:
        device = attention_mask.device
    idx = torch.arange(seq_len, device=device)
    allowed = (idx[None, :] <= idx[:, None]) if causal else torch.ones(seq_len, seq_len, dtype=torch.bool,
                                                                       device=device)
    allowed = allowed[None, None]  # (1, 1, N, N)
    if attention_mask is not None:
        if tuple(attention_mask.shape[-1:]) != (seq_len,) or attention_mask.ndim != 2:
            raise InputShapeError(f"attention_mask must be (B, {seq_len}) like the token ids, "
                                  f"got {tuple(attention_mask.shape)}")
        keys = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, N)
        allowed = (allowed & keys) | torch.eye(seq_len, dtype=torch.bool, device=device)
    return allowed


class TextEmbed(nn.Module):
    """Token embedding + learned absolute positions (``token_embed``, ``pos_embed``: two ``nn.Embedding``)."""

    def __init__(self, vocab_size: int, context_length: int, dim: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.context_length = context_length
        self.token_embed = nn.Embedding(vocab_size, dim)
        self.pos_embed = nn.Embedding(context_length, dim)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed.weight, std=0.01)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(B, N) ids -> (B, N, D); positions 0..N-1 unless ``position_ids`` says otherwise."""
        check_token_batch(input_ids, self.context_length)
        if position_ids is None:
            return self.token_embed(input_ids) + self.pos_embed.weight[:input_ids.shape[1]]
        return self.token_embed(input_ids) + self.pos_embed(position_ids)


class TextTransformer(nn.Module):
    """``TextEmbed`` -> pre-norm blocks (causal or bidirectional, padding masked) -> final LayerNorm.

    Returns every token's normalised output; pooling (CLIP's end-of-text token, BERT's first token) is the
    model's business.
    """

    grad_checkpointing = False

    def __init__(
        self,
        vocab_size: int = 49408,
        context_length: int = 77,
        width: int = 512,
        depth: int = 12,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        mlp_dim: int | None = None,
        causal: bool = True,
        norm_eps: float = 1e-5,
        act: str = "gelu",
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.causal = causal
        self.width = width
        self.embed = TextEmbed(vocab_size, context_length, width)
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList([
            Block(width, num_heads, mlp_ratio, mlp_dim, qkv_bias=True, drop_path=dpr[i], norm_eps=norm_eps, act=act)
            for i in range(depth)
        ])
        self.norm = nn.LayerNorm(width, eps=norm_eps)
        trunc_normal_linears_(self.blocks)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, N) token ids (+ (B, N) padding mask, 1 = token) -> (B, N, width) normalised tokens."""
        x = self.embed(input_ids)
        mask = text_attention_mask(attention_mask, x.shape[1], self.causal, x.device)
        for blk in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(blk, x, mask, use_reentrant=False)
            else:
                x = blk(x, mask)
        return self.norm(x)
