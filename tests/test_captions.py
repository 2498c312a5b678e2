"""Image-caption data (data/captions.py): captioned Fashion-MNIST, caption folders, the tokenizer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vitkit.data.captions import (
    CAPTION_WORDS,
    caption_collate,
    compose_captioned,
    load_caption_folder,
    swapped_caption,
    train_tokenizer,
)
from vitkit.errors import DataError


def _source(n: int = 40):
    rng = np.random.default_rng(0)
    images = np.zeros((n, 28, 28), np.uint8)
    images[:, 4:24, 6:22] = rng.integers(100, 256, (n, 20, 16), dtype=np.uint8)
    return images, np.arange(n) % 10


def test_captions_describe_what_was_drawn():
    images, labels = _source()
    canvases, captions, halves, items = compose_captioned(images, labels, 200, seed=1)
    again = compose_captioned(images, labels, 200, seed=1)
    assert np.array_equal(canvases, again[0]) and captions == again[1]
    for canvas, caption, half, its in zip(canvases, captions, halves, items):
        for it in its:
            col = 0 if it.side == "left" else 28
            region = canvas[:, col:col + 28]
            assert half[0 if it.side == "left" else 1] == it.cls
            peak = region.max() / 255
            assert (peak <= 0.5) if it.dark else (peak >= 0.85)  # tone readable from the pixels
            rows = np.flatnonzero(region.max(1))
            assert (rows.max() - rows.min() + 1 <= 18) == it.small or not it.small  # small items fit 18 px
            assert CAPTION_WORDS[it.cls] in caption
            if ("dark" in caption or "light" in caption) and len(its) == 1:
                assert ("dark" in caption) == it.dark
        empty = [s for s in (0, 1) if half[s] == -1]
        for s in empty:
            assert canvas[:, 28 * s:28 * s + 28].max() == 0
        if len(its) == 1:
            assert caption.endswith(f"on the {its[0].side}")


def test_hard_negatives_swap_positions():
    assert swapped_caption("a small bag to the left of a dark sneaker") == "a dark sneaker to the left of a small bag"
    assert swapped_caption("a bag to the right of a coat") == "a coat to the right of a bag"
    assert swapped_caption("a bag on the left") is None
    assert swapped_caption("a bag to the left of a bag") is None


def test_caption_folder_reports_bad_rows(tmp_path):
    for name in ("a.png", "b.png"):
        Image.fromarray(np.full((8, 8), 128, np.uint8)).save(tmp_path / name)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    (tmp_path / "caps.csv").write_text("file,caption\na.png,a grey square\nb.png,another one\n"
                                       "broken.png,broken\nmissing.png,gone\n../caps.csv,escape\n")
    with pytest.raises(DataError, match="3 bad rows"):
        load_caption_folder(tmp_path, tmp_path / "caps.csv", num_channels=1)
    with pytest.warns(UserWarning, match="outside"):
        ds = load_caption_folder(tmp_path, tmp_path / "caps.csv", num_channels=1, max_bad_images=3)
    assert len(ds) == 2 and ds.captions == ["a grey square", "another one"]
    batch = caption_collate(ds.__getitems__([1, 0]))
    assert batch["images"].shape == (2, 1, 8, 8) and batch["captions"] == ["another one", "a grey square"]
    (tmp_path / "caps.jsonl").write_text(json.dumps({"file": "a.png", "caption": "x"}) + "\n")
    assert len(load_caption_folder(tmp_path, tmp_path / "caps.jsonl", num_channels=1)) == 1
    (tmp_path / "bad.csv").write_text("path,text\na.png,x\n")
    with pytest.raises(DataError, match="'file' and 'caption'"):
        load_caption_folder(tmp_path, tmp_path / "bad.csv")


def test_tokenizer_trained_with_the_tokenizers_library(tmp_path):
    images, labels = _source()
    _, captions, _, _ = compose_captioned(images, labels, 300, seed=2)
    tok = train_tokenizer(captions, vocab_size=120)
    enc = tok.encode("a small dark sneaker to the left of a bag")
    assert enc.tokens[0] == "[CLS]" and enc.tokens[-1] == "[SEP]" and "[UNK]" not in enc.tokens
    tok.save(str(tmp_path / "tokenizer.json"))
    from tokenizers import Tokenizer

    assert Tokenizer.from_file(str(tmp_path / "tokenizer.json")).encode("a bag").ids == tok.encode("a bag").ids
    assert torch.tensor(enc.ids).max() < tok.get_vocab_size()
