"""Tokenizer helpers shared by the text tasks (clip, vilt): where a checkpoint's tokenizer lies, and a warning
for words the tokenizer cannot represent (they would all read as one unknown token)."""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError


def checkpoint_tokenizer(folder: str | Path) -> Any:
    """The tokenizer of a checkpoint folder: the one its model carries in ``config.json``, else a
    ``tokenizer.json`` beside it (converted Hugging Face checkpoints); None when it has neither."""
    from tokenizers import Tokenizer

    from ..layers.text import TOKENIZER_FILE, read_tokenizer_file, tokenizer_json
    from ..models import read_config

    folder = Path(folder)
    if not folder.is_dir():
        return None
    if (folder / "config.json").is_file():
        data = (read_config(folder).get("model_args") or {}).get("tokenizer")
        if data:
            return Tokenizer.from_str(json.dumps(tokenizer_json(data)))
    path = folder / TOKENIZER_FILE
    return read_tokenizer_file(path) if path.is_file() else None


def unknown_words(tokenizer: Any, texts: Sequence[str]) -> list[str]:
    """The words of ``texts`` that ``tokenizer`` maps (wholly or partly) to its unknown token, in order, once."""
    from ..layers.text import tokenizer_json

    unk_token = (tokenizer_json(tokenizer).get("model") or {}).get("unk_token")
    unk = tokenizer.token_to_id(str(unk_token)) if unk_token is not None else None
    if unk is None:
        return []
    found: dict[str, None] = {}
    for text, enc in zip(texts, tokenizer.encode_batch([str(t) for t in texts])):
        for word in sorted({w for i, w in zip(enc.ids, enc.word_ids) if i == unk and w is not None}):
            spans = [o for o, w in zip(enc.offsets, enc.word_ids) if w == word]
            found[str(text)[spans[0][0]:spans[-1][1]]] = None
    return list(found)


def warn_unknown_words(tokenizer: Any, texts: Sequence[str], what: str) -> list[str]:
    """Warn once, naming them, when ``texts`` hold words outside the tokenizer's vocabulary: a class name or
    caption made of them scores like any other unknown word, which is rarely what the user meant."""
    words = unknown_words(tokenizer, texts)
    if words:
        shown = ", ".join(repr(w) for w in words[:10]) + (f" and {len(words) - 10} more" if len(words) > 10 else "")
        warnings.warn(f"{what}: {len(words)} word(s) outside the tokenizer's vocabulary, read as its unknown token: "
                      f"{shown}", stacklevel=3)
    return words


def check_same_tokenizer(ctx: Any, tokenizer: Any) -> None:
    """Every process built its own tokenizer from the same captions: make sure they are identical (a CRC of its
    JSON, gathered from every process)."""
    if ctx.world_size <= 1:
        return
    import zlib

    import torch

    crc = float(zlib.crc32(tokenizer.to_str().encode()))  # < 2**32: exact in float64
    every = ctx.all_gather(torch.tensor([crc], dtype=torch.float64, device=ctx.device))
    if not bool((every == crc).all()):
        raise ConfigError("the processes built different caption tokenizers (do they read the same data?)")
