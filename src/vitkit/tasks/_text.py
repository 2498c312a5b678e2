"""Tokenizer helpers shared by the text tasks (clip, vilt): where a checkpoint's tokenizer lies, a check that
texts are valid Unicode (:func:`check_utf8`), and a warning for words the tokenizer cannot represent (they would
all read as one unknown token; texts made only of them read alike and score alike)."""

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


def check_utf8(texts: Sequence[str], what: str) -> None:
    """Refuse, naming ``what``, a text that cannot be encoded as UTF-8: Python keeps the undecodable bytes of a
    command-line argument as lone surrogates (``"\\udcff"``), which the ``tokenizers`` library rejects with a
    TypeError about its input types."""
    for text in texts:
        try:
            str(text).encode("utf-8")
        except UnicodeEncodeError as e:
            raise ConfigError(f"{what}: {str(text)!r} is not valid UTF-8 text (character {e.start + 1} is an "
                              f"undecodable byte or a lone surrogate); give the text in UTF-8") from None


def unknown_words(tokenizer: Any, texts: Sequence[str]) -> list[str]:
    """The words of ``texts`` that ``tokenizer`` maps (wholly or partly) to its unknown token, in order, once."""
    return _scan(tokenizer, texts)[0]


def alike_texts(tokenizer: Any, texts: Sequence[str]) -> list[list[str]]:
    """Groups of different ``texts`` that ``tokenizer`` encodes to the same tokens (names made only of unknown
    words, such as two emoji, or of characters its normaliser drops): a model cannot tell them apart, so zero-shot
    classes named so get equal scores."""
    return _scan(tokenizer, texts)[1]


def _scan(tokenizer: Any, texts: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    from ..layers.text import tokenizer_json

    check_utf8(texts, "texts")
    unk_token = (tokenizer_json(tokenizer).get("model") or {}).get("unk_token")
    unk = tokenizer.token_to_id(str(unk_token)) if unk_token is not None else None
    found: dict[str, None] = {}
    by_ids: dict[tuple[int, ...], dict[str, None]] = {}
    for text, enc in zip(texts, tokenizer.encode_batch([str(t) for t in texts])):
        by_ids.setdefault(tuple(enc.ids), {})[str(text)] = None
        if unk is None:
            continue
        for word in sorted({w for i, w in zip(enc.ids, enc.word_ids) if i == unk and w is not None}):
            spans = [o for o, w in zip(enc.offsets, enc.word_ids) if w == word]
            found[str(text)[spans[0][0]:spans[-1][1]]] = None
    return list(found), [list(group) for group in by_ids.values() if len(group) > 1]


def _listed(items: Sequence[str], limit: int = 10, sep: str = ", ") -> str:
    return sep.join(repr(w) for w in items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit
                                                       else "")


def warn_unknown_words(tokenizer: Any, texts: Sequence[str], what: str) -> list[str]:
    """Warn once, in one line, naming them, when ``texts`` hold words outside the tokenizer's vocabulary (a class
    name or caption made of them scores like any other unknown word, which is rarely what the user meant), and
    when different texts encode to the same tokens (:func:`alike_texts`: two emoji class names get equal scores,
    whatever the image). Returns the unknown words."""
    words, alike = _scan(tokenizer, texts)
    parts = []
    if words:
        parts.append(f"{len(words)} word(s) outside the tokenizer's vocabulary, read as its unknown token: "
                     f"{_listed(words)}")
    if alike:
        groups = "; ".join(_listed(group, sep=" = ") for group in alike[:5])
        parts.append(f"{sum(len(g) for g in alike)} of the {len(texts)} encode to the same tokens as another, so "
                     f"the model cannot tell them apart (equal scores): {groups}")
    if parts:
        warnings.warn(f"{what}: {'; '.join(parts)}", stacklevel=3)
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
