"""Caption batches for image-text objectives (ViLT's ITM and MLM, Kim et al., 2021): captions tokenized with a
word index per token, BERT's whole-word masking, and image-caption pairs whose negatives are sure negatives."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class Encoded:
    """Token ids (B, T), attention mask (B, T) and word index per token (B, T; -1 = special or padding)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    word_ids: torch.Tensor


def encode_captions(tokenizer, texts: Sequence[str], max_len: int, pad_id: int = 0) -> Encoded:
    """Tokenize (truncated to ``max_len`` with [CLS]/[SEP] kept), pad to the longest, and number the words.

    A new word starts at a token separated from the previous one by whitespace in the original text (offsets),
    so ``##`` pieces and punctuation inside "t-shirt" belong to one word.
    """
    if tokenizer.truncation is None or tokenizer.truncation.get("max_length") != max_len:
        tokenizer.enable_truncation(max_length=max_len)
    if tokenizer.padding is not None:
        tokenizer.no_padding()
    encs = tokenizer.encode_batch(list(texts))
    width = max((len(e.ids) for e in encs), default=1)
    ids = torch.full((len(encs), width), pad_id, dtype=torch.long)
    att = torch.zeros((len(encs), width), dtype=torch.long)
    words = torch.full((len(encs), width), -1, dtype=torch.long)
    for b, e in enumerate(encs):
        n = len(e.ids)
        ids[b, :n] = torch.tensor(e.ids, dtype=torch.long)
        att[b, :n] = 1
        word, prev_end = -1, None
        for t, (special, (start, end)) in enumerate(zip(e.special_tokens_mask, e.offsets)):
            if special:
                prev_end = None
                continue
            if prev_end is None or start != prev_end:
                word += 1
            words[b, t] = word
            prev_end = end
    return Encoded(ids, att, words)


def whole_word_mask(input_ids: torch.Tensor, word_ids: torch.Tensor, prob: float, mask_id: int,
                    random_ids: torch.Tensor, generator: torch.Generator | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT whole-word masking: (masked ids, labels with -100 where not predicted); CPU tensors.

    Per caption ``max(1, ⌊prob · W + u⌋)`` of its ``W`` words (u ~ U(0, 1): ``prob`` of the words on average, at
    least one when it has any) are chosen uniformly; every token of a chosen word is predicted and replaced by
    [MASK] with probability 0.8, by a token of ``random_ids`` with 0.1, and kept with 0.1 (decided per token, as
    BERT's whole-word masking). Tokens with ``word_ids`` -1 ([CLS], [SEP], padding) are never chosen.
    """
    B, T = input_ids.shape
    n_words = (word_ids.max(dim=1).values + 1).clamp(min=0) if T else torch.zeros(B, dtype=torch.long)
    W = int(n_words.max()) if B else 0
    labels = torch.full_like(input_ids, -100)
    if W == 0:
        return input_ids.clone(), labels
    u = torch.rand(B, generator=generator)
    k = torch.floor(prob * n_words + u).long().clamp(min=1)
    k = torch.minimum(k, n_words)
    scores = torch.rand(B, W, generator=generator)
    scores = scores.masked_fill(torch.arange(W)[None, :] >= n_words[:, None], 2.0)  # absent words sort last
    rank = scores.argsort(dim=1).argsort(dim=1)
    chosen_words = rank < k[:, None]
    chosen = chosen_words.gather(1, word_ids.clamp(min=0)) & (word_ids >= 0)
    labels[chosen] = input_ids[chosen]
    r = torch.rand(B, T, generator=generator)
    replace = torch.randint(len(random_ids), (B, T), generator=generator)
    out = input_ids.clone()
    out = torch.where(chosen & (r < 0.8), torch.full_like(out, mask_id), out)
    out = torch.where(chosen & (r >= 0.8) & (r < 0.9), random_ids[replace], out)
    return out, labels


def may_match(caption_labels: torch.Tensor, image_labels: torch.Tensor) -> torch.Tensor:
    """(N, M) bool: caption ``i`` (the items of canvas ``i``, class per half, -1 = empty) may describe image ``j``:
    every item it names is in ``j`` at the same place. Only pairs that are False are sure negatives."""
    c, m = caption_labels[:, None, :], image_labels[None, :, :]
    return ((c < 0) | (c == m)).all(dim=-1)


def draw_itm_pairs(n: int, swap_prob: float, labels: torch.Tensor | None = None,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(matching (n,) bool, partner (n,) long): ``round(swap_prob * n)`` rows (none if n < 2) are negatives whose
    image is that of ``partner``, another row; with ``labels`` a row the caption may describe is never the partner
    (unless every other row is one). Positives have themselves as partner. CPU tensors."""
    n_neg = int(round(swap_prob * n)) if n >= 2 else 0
    neg = torch.zeros(n, dtype=torch.bool)
    neg[torch.randperm(n, generator=generator)[:n_neg]] = True
    partner = torch.arange(n)
    if n_neg:
        others = ~torch.eye(n, dtype=torch.bool)
        allowed = others
        if labels is not None:
            allowed = others & ~may_match(labels.cpu(), labels.cpu())
            allowed = torch.where(allowed.any(dim=1, keepdim=True), allowed, others)
        drawn = torch.multinomial(allowed.float(), 1, generator=generator)[:, 0]
        partner = torch.where(neg, drawn, partner)
    return ~neg, partner

