"""Image-caption data: a general (folder + CSV/JSONL) dataset and captioned Fashion-MNIST, plus a tokenizer.

Captioned Fashion-MNIST (generated, seeded; the test split is made from test images only):

* a 28×56 canvas (two 28×28 halves) holds one item (in the left or the right half) or two (one per half);
* each item is drawn **large** (28×28, as in the data set) or **small** (resized to 18×18, centred in its half),
  and **light** or **dark** (its pixels scaled by a factor in [0.85, 1] or [0.35, 0.5]); the caption words come
  from what was drawn, so every attribute can be read from the pixels (a dark item's brightest pixel is at most
  half of the white level, a light item's at least 0.85 of it);
* captions come from templates naming the classes, their positions and attributes, e.g. "a small dark sneaker to
  the left of a light bag", "a trouser on the right";
* :func:`swapped_caption` gives the hard negative of a two-item caption: the same words with the two items'
  positions exchanged ("a bag to the left of a sneaker"), which only a model that reads positions can reject.

Batches are dicts ``{"images": uint8 (B, 1, 28, 56), "captions": [str], "labels": (B, 2) class per half (-1 =
empty)}``; tasks tokenize the captions themselves (:func:`train_tokenizer` builds a WordPiece tokenizer with the
``tokenizers`` library).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import DataError
from .constants import FMNIST_CLASSES

CAPTION_WORDS = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
SMALL = 18
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
# The longest field (caption or file name) a captions file may hold, in characters: 1 MiB, far above any caption
# (a tokenizer keeps the first few dozen tokens) and 8 times Python's csv default (131,072), which a long caption
# hit with a bare "_csv.Error: field larger than field limit". A longer field is a DataError naming file and row.
MAX_FIELD_CHARS = 1 << 20
_BAD_ROWS_SHOWN = 5  # bad rows quoted in one message; the count covers all of them


@dataclass(frozen=True)
class Item:
    cls: int
    side: str  # "left" | "right"
    small: bool
    dark: bool

    def phrase(self, with_size: bool, with_tone: bool) -> str:
        words = (["small" if self.small else "large"] if with_size else []) + \
                (["dark" if self.dark else "light"] if with_tone else []) + [CAPTION_WORDS[self.cls]]
        return ("an " if words[0][0] in "aeiou" else "a ") + " ".join(words)


def _caption(items: list[Item], rng: np.random.Generator) -> str:
    size, tone = bool(rng.integers(2)), bool(rng.integers(2))
    if len(items) == 1:
        it = items[0]
        return f"{it.phrase(size, tone)} on the {it.side}"
    left, right = sorted(items, key=lambda i: i.side != "left")
    if rng.integers(2):
        return f"{left.phrase(size, tone)} to the left of {right.phrase(size, tone)}"
    return f"{right.phrase(size, tone)} to the right of {left.phrase(size, tone)}"


def swapped_caption(caption: str) -> str | None:
    """The hard negative of a two-item caption (the items' positions exchanged), or None for one item."""
    for rel in (" to the left of ", " to the right of "):
        if rel in caption:
            a, b = caption.split(rel)
            return f"{b}{rel}{a}" if a != b else None
    return None


def _draw(item: np.ndarray, small: bool, dark: bool, rng: np.random.Generator) -> np.ndarray:
    from PIL import Image

    img = item.astype(np.float32)
    if small:
        resized = np.asarray(Image.fromarray(item).resize((SMALL, SMALL), Image.BILINEAR), np.float32)
        img = np.zeros((28, 28), np.float32)
        o = (28 - SMALL) // 2
        img[o:o + SMALL, o:o + SMALL] = resized
    peak = max(float(img.max()), 1.0)
    factor = rng.uniform(0.35, 0.5) if dark else rng.uniform(0.85, 1.0)
    return np.clip(img * (255.0 * factor / peak), 0, 255).astype(np.uint8)


def compose_captioned(images: np.ndarray, labels: np.ndarray, num: int, seed: int = 0, two_items: float = 0.6
                      ) -> tuple[np.ndarray, list[str], np.ndarray, list[list[Item]]]:
    """(canvases (N, 28, 56) uint8, captions, (N, 2) class per half with -1 for empty, items per canvas)."""
    rng = np.random.default_rng(seed)
    canvases = np.zeros((num, 28, 56), np.uint8)
    halves = np.full((num, 2), -1, np.int64)
    captions, all_items = [], []
    for n in range(num):
        sides = ["left", "right"] if rng.random() < two_items else [("left", "right")[int(rng.integers(2))]]
        items = []
        for side in sides:
            idx = int(rng.integers(len(images)))
            item = Item(int(labels[idx]), side, bool(rng.integers(2)), bool(rng.integers(2)))
            col = 0 if side == "left" else 28
            canvases[n, :, col:col + 28] = _draw(images[idx], item.small, item.dark, rng)
            halves[n, 0 if side == "left" else 1] = item.cls
            items.append(item)
        captions.append(_caption(items, rng))
        all_items.append(items)
    return canvases, captions, halves, all_items


class CaptionDataset(Dataset):
    """Images with one caption each; ``__getitems__`` gives a dict batch (images stacked, captions a list)."""

    def __init__(self, images: torch.Tensor, captions: Sequence[str], labels: torch.Tensor | None = None,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None, name: str = "",
                 classes: Sequence[str] = ()) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or len(captions) != images.shape[0]:
            raise DataError(f"{name or 'captions'}: need uint8 (N, C, H, W) images and N captions, got "
                            f"{tuple(images.shape)} {images.dtype} and {len(captions)} captions")
        self.images, self.captions, self.labels = images, list(captions), labels
        self.name, self.classes = name or "captions", list(classes)
        self.num_channels = int(images.shape[1])
        self.image_size = (int(images.shape[2]), int(images.shape[3]))
        if mean is None or std is None:
            x = images.float() / 255
            mean = x.mean(dim=(0, 2, 3)).tolist()
            std = x.std(dim=(0, 2, 3)).clamp(min=1e-3).tolist()
        self.mean, self.std = tuple(mean), tuple(std)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.__getitems__([index])

    def __getitems__(self, indices: Sequence[int]) -> dict[str, Any]:
        idx = torch.as_tensor(list(indices), dtype=torch.int64)
        batch: dict[str, Any] = {"images": self.images[idx], "captions": [self.captions[int(i)] for i in idx]}
        if self.labels is not None:
            batch["labels"] = self.labels[idx]
        return batch

    def __repr__(self) -> str:
        return f"{self.name}(n={len(self)}, size={self.image_size}, channels={self.num_channels})"


def caption_collate(batch: Any) -> dict[str, Any]:
    """DataLoader collate: a dict batch from ``__getitems__`` passes through; single samples are merged."""
    if isinstance(batch, dict):
        return batch
    images = torch.cat([b["images"] for b in batch])
    out: dict[str, Any] = {"images": images, "captions": [c for b in batch for c in b["captions"]]}
    if "labels" in batch[0]:
        out["labels"] = torch.cat([b["labels"] for b in batch])
    return out


def load_fmnist_captions(split: str = "train", data_dir: str | None = None, download: bool = False,
                         num: int | None = None, seed: int = 0, two_items: float = 0.6) -> CaptionDataset:
    """Captioned Fashion-MNIST for ``split`` (train: 30,000 canvases from training images; test: 5,000 from test
    images; val: 5,000 more from training images with another seed)."""
    from .fashion_mnist import load_fashion_mnist

    offsets = {"train": 0, "test": 1, "val": 2}
    if split not in offsets:
        raise DataError(f"fmnist_captions: split must be one of {sorted(offsets)}, got {split!r}")
    source = load_fashion_mnist("test" if split == "test" else "train", data_dir, download)
    n = num or {"train": 30_000, "test": 5_000, "val": 5_000}[split]
    canvases, captions, halves, _ = compose_captioned(source.images[:, 0].numpy(), source.labels.numpy(), n,
                                                      seed + offsets[split], two_items)
    return CaptionDataset(torch.from_numpy(canvases)[:, None], captions, torch.from_numpy(halves),
                          name=f"fmnist_captions/{split}", classes=FMNIST_CLASSES)


def load_caption_folder(root: str | Path, captions_file: str | Path, num_channels: int = 3,
                        image_size: int | tuple[int, int] | None = None, max_bad_images: int = 0) -> CaptionDataset:
    """Images of ``root`` with captions from a CSV (columns ``file,caption``) or JSONL (``{"file", "caption"}``).

    A caption must be a non-empty string: a row whose caption is empty, or in JSONL not a string (null, a number,
    NaN, a list, an object), whose file is not a string, is missing, outside ``root``, a name the file system
    cannot take (a NUL byte, too long) or undecodable (or a decompression bomb), or whose caption or file holds a
    lone surrogate (a JSONL ``\\ud800`` escape) is a bad row. Bad rows are left out, counted against
    ``max_bad_images`` and named in ONE warning line (``<file>: N of M rows skipped (max_bad_images=K): <the first
    ones>``); more bad rows than ``max_bad_images``, or no good row left, is a DataError naming the first ones. A
    field longer than ``MAX_FIELD_CHARS`` (1 MiB) is a DataError naming the row. All kept images are decoded now
    (``image_size`` resizes + centre-crops).
    """
    import warnings

    from .image_io import BadImageError, decode_image

    root, path = Path(root), Path(captions_file)
    rows = _read_rows(path)
    images, texts, bad = [], [], []
    resolved_root = root.resolve()
    for line, (file, caption) in rows:
        where = f"{path}:{line}"
        if not isinstance(caption, str):
            bad.append(f"{where}: the caption is {_json_kind(caption)}, not text")
            continue
        if not isinstance(file, str) or not file.strip():
            bad.append(f"{where}: the file is {_json_kind(file) if not isinstance(file, str) else 'empty'}, "
                       f"not a file name")
            continue
        if not caption.strip():
            bad.append(f"{where}: empty caption")
            continue
        unusable = _unusable_text(caption, "caption") or _unusable_text(file, "file name")
        if unusable:
            bad.append(f"{where}: {unusable}")
            continue
        try:  # a name the file system cannot take (too long, a NUL byte) is a bad row, like a missing file
            target = (root / file).resolve()
            inside = resolved_root in target.parents
            found = inside and target.is_file()
        except (OSError, ValueError) as e:
            reason = getattr(e, "strerror", None) or str(e)
            bad.append(f"{where}: the file name {_shown(file)} cannot be used ({reason})")
            continue
        if not inside:
            bad.append(f"{where}: {_shown(file)} is outside {root}")
        elif not found:
            bad.append(f"{where}: {_shown(file)} not found in {root}")
        else:
            try:
                images.append(decode_image(target, num_channels, image_size))
                texts.append(caption.strip())
                continue
            except BadImageError as e:
                bad.append(f"{where}: {e}")
    shown = "; ".join(" ".join(b.split()) for b in bad[:_BAD_ROWS_SHOWN]) + \
        (f"; and {len(bad) - _BAD_ROWS_SHOWN} more" if len(bad) > _BAD_ROWS_SHOWN else "")
    if len(bad) > max_bad_images:
        raise DataError(f"{path}: {len(bad)} bad rows of {len(rows)} (max_bad_images={max_bad_images}): {shown}")
    if not images:
        raise DataError(f"{path}: no usable (image, caption) rows" + (f"; all {len(bad)} skipped: {shown}"
                                                                       if bad else ""))
    if bad:
        warnings.warn(f"{path}: {len(bad)} of {len(rows)} rows skipped (max_bad_images={max_bad_images}): {shown}",
                      stacklevel=2)
    shapes = {tuple(i.shape) for i in images}
    if len(shapes) > 1:
        raise DataError(f"{path}: images of different sizes {sorted(shapes)[:3]}; pass image_size")
    return CaptionDataset(torch.stack(images), texts, name=f"captions:{path.name}")


def _unusable_text(text: str, what: str) -> str | None:
    """Why ``text`` cannot be used (a lone surrogate: a JSONL ``"\\ud800"`` escape, which neither the file system
    nor the tokenizer takes), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"the {what} is not valid text (character {e.start + 1} is a lone surrogate)"
    return None


def _shown(name: str, limit: int = 80) -> str:
    """A file name for a message: quoted, and cut to ``limit`` characters."""
    return repr(name) if len(name) <= limit else repr(name[:limit]) + f"… ({len(name):,} characters)"


def _json_kind(value: Any) -> str:
    """How a JSON value that should have been a string reads in a message."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value).replace("nan", "NaN").replace("inf", "Infinity")
    if isinstance(value, (int, float)):
        return f"the number {value}"
    return {list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


def _too_long(path: Path, line: int) -> DataError:
    return DataError(f"{path}:{line}: a field is longer than {MAX_FIELD_CHARS:,} characters "
                     f"(MAX_FIELD_CHARS, the limit for a caption or file name)")


def _read_rows(path: Path) -> list[tuple[int, tuple[Any, Any]]]:
    """(line, (file, caption)) of every row; values are as read (a JSONL caption may be null, a number, a list:
    the caller counts those as bad rows). A malformed file is one DataError naming the file and line."""
    import io

    if not path.is_file():
        raise DataError(f"{path}: captions file not found")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark (spreadsheet exports) is allowed
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not a UTF-8 CSV/JSONL captions file (byte 0x{data[e.start]:02x} cannot be "
                        f"decoded: {e.reason})") from None
    rows: list[tuple[int, tuple[Any, Any]]] = []
    if path.suffix == ".jsonl":
        for line, row in enumerate(text.split("\n"), 1):  # not splitlines: JSON text may hold U+2028
            if not row.strip():
                continue
            if len(row) > MAX_FIELD_CHARS:
                raise _too_long(path, line)
            try:
                obj = json.loads(row)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line}: not a JSON object ({e.msg} at column {e.colno})") from None
            except (ValueError, RecursionError) as e:  # an integer of > 4,300 digits; arrays nested too deep
                reason = "nested too deeply" if isinstance(e, RecursionError) else str(e).split(";")[0]
                raise DataError(f"{path}:{line}: not a usable JSON object ({reason})") from None
            if not isinstance(obj, dict) or not {"file", "caption"} <= set(obj):
                raise DataError(f"{path}:{line}: each line must be an object with 'file' and 'caption'")
            rows.append((line, (obj["file"], obj["caption"])))
        return rows
    limit = csv.field_size_limit()
    csv.field_size_limit(MAX_FIELD_CHARS)  # Python's default (131,072) is below a long caption
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        if reader.fieldnames is None or not {"file", "caption"} <= set(reader.fieldnames):
            raise DataError(f"{path}: the CSV header must name the columns 'file' and 'caption'")
        for line, row in enumerate(reader, 2):
            rows.append((line, (row["file"] or "", row["caption"] or "")))
    except csv.Error as e:
        line = len(rows) + 2  # the row being read (the header is line 1)
        if "field larger than field limit" in str(e):
            raise _too_long(path, line) from None
        raise DataError(f"{path}:{line}: not a valid CSV row ({e})") from None
    finally:
        csv.field_size_limit(limit)
    return rows


def train_tokenizer(texts: Sequence[str], vocab_size: int = 1000, lowercase: bool = True):
    """A deterministic WordPiece tokenizer (``tokenizers`` library) for ``texts``: BERT's normaliser,
    pre-tokenizer and special tokens, a ``[CLS] $A [SEP]`` template, and a vocabulary of the special tokens, every
    character seen (alone and as a ``##`` continuation, so no seen character is ever ``[UNK]``), then whole words,
    most frequent first (ties by spelling), up to ``vocab_size``.

    Not ``tokenizers``' WordPiece trainer: two trainings on the same texts gave different vocabularies, and every
    ``torchrun`` process and every resumed run must build the same one. ``tokenizer.to_str()`` / ``save(path)``
    give the JSON a checkpoint carries.
    """
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    pre = pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for text, n in Counter(texts).items():
        for word, _ in pre.pre_tokenize_str(normalizer.normalize_str(text)):
            counts[word] += n
    chars = sorted({c for word in counts for c in word})
    vocab = [*SPECIAL_TOKENS, *chars, *(f"##{c}" for c in chars)]
    if len(vocab) > vocab_size:
        raise DataError(f"tokenizer: vocab_size={vocab_size} is too small for the texts' {len(chars)} characters; "
                        f"it needs at least {len(vocab)}")
    words = sorted((w for w in counts if len(w) > 1), key=lambda w: (-counts[w], w))
    vocab += words[:vocab_size - len(vocab)]
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre
    tok.decoder = decoders.WordPiece()
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return tok
