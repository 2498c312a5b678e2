"""OpenCLIP's tokenizer, the CLIP BPE (``SimpleTokenizer``), rebuilt for the ``tokenizers`` library.

OpenCLIP tokenizes with its own Python BPE over ``bpe_simple_vocab_16e6.txt.gz`` (shipped inside the open_clip
package); vitkit's text models take a ``tokenizers.Tokenizer`` (see :mod:`vitkit.layers.text`).
:func:`clip_bpe_tokenizer` builds one from the same merges that gives the same ids: ``<start_of_text>`` (49406) +
tokens + ``<end_of_text>`` (49407), truncated keeping the end of text, padded with 0. OpenCLIP cleans texts with
``ftfy.fix_text`` and ``html.unescape``; of those repairs the tokenizer does the curly quotes, Latin ligatures and
common HTML entities, not mojibake, width folding or control characters.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from ..utils import require_extra

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
CLIP_BPE_VOCAB = 49408  # 256 bytes + 256 bytes ending a word + 48894 merges + 2 special tokens
START_OF_TEXT, END_OF_TEXT = "<start_of_text>", "<end_of_text>"
# ftfy's repairs that the tokenizer reproduces (OpenCLIP runs ftfy.fix_text, then html.unescape twice)
_HTML_ENTITIES = (("&amp;", "&"), ("&amp;", "&"), ("&amp;", "&"), ("&lt;", "<"), ("&gt;", ">"), ("&quot;", '"'),
                  ("&#39;", "'"), ("&#x27;", "'"), ("&apos;", "'"), ("&nbsp;", "\u00a0"))
_LIGATURES = {"Ĳ": "IJ", "ĳ": "ij", "ŉ": "ʼn", "Ǳ": "DZ", "ǲ": "Dz", "ǳ": "dz", "Ǆ": "DŽ", "ǅ": "Dž", "ǆ": "dž",
              "Ǉ": "LJ", "ǈ": "Lj", "ǉ": "lj", "Ǌ": "NJ", "ǋ": "Nj", "ǌ": "nj", "ﬀ": "ff", "ﬁ": "fi", "ﬂ": "fl",
              "ﬃ": "ffi", "ﬄ": "ffl", "ﬅ": "ſt", "ﬆ": "st"}
# OpenCLIP's word pattern, without its special tokens (the tokenizer matches those as added tokens)
_WORDS = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def default_bpe_path() -> Path | None:
    """The CLIP BPE file inside the installed open_clip package (found without importing it), or None."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / BPE_FILE
    return path if path.is_file() else None


def clip_bpe_tokenizer(bpe_path: str | os.PathLike, context_length: int = 77, lowercase: bool = True) -> Any:
    """OpenCLIP's ``SimpleTokenizer`` (the CLIP BPE of ``bpe_path``) as a ``tokenizers.Tokenizer``: the same ids,
    ``<start_of_text> ... <end_of_text>``, truncated to ``context_length`` keeping the end of text and padded to
    it with 0, as ``open_clip.tokenize`` returns them. ``lowercase=False`` is OpenCLIP's ``clean='whitespace'``."""
    tk = require_extra("tokenizers", "hf", "the OpenCLIP tokenizer")
    try:
        with gzip.open(bpe_path) as f:
            lines = f.read().decode("utf-8").split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{bpe_path} is not a readable gzipped BPE merges file ({e})") from None
    merges = [tuple(line.split()) for line in lines[1:CLIP_BPE_VOCAB - 2 - 512 + 1]]  # OpenCLIP's slice
    if len(merges) != CLIP_BPE_VOCAB - 514 or any(len(m) != 2 for m in merges):
        raise CheckpointError(f"{bpe_path}: expected {CLIP_BPE_VOCAB - 514} merges of two symbols (the CLIP BPE)")
    byte_chars = list(_bytes_to_unicode().values())
    vocab = [*byte_chars, *(c + "</w>" for c in byte_chars), *("".join(m) for m in merges), START_OF_TEXT,
             END_OF_TEXT]
    tok = tk.Tokenizer(tk.models.BPE(vocab={t: i for i, t in enumerate(vocab)}, merges=merges,
                                     continuing_subword_prefix="", end_of_word_suffix="</w>", fuse_unk=False))
    tok.normalizer = tk.normalizers.Sequence([
        *(tk.normalizers.Replace(a, b) for a, b in _HTML_ENTITIES),
        *(tk.normalizers.Replace(a, b) for a, b in _LIGATURES.items()),
        tk.normalizers.Replace(tk.Regex("[\u02bc\u2018-\u201b]"), "'"),
        tk.normalizers.Replace(tk.Regex("[\u201c-\u201f]"), '"'),
        tk.normalizers.NFC(), tk.normalizers.Replace(tk.Regex(r"\s+"), " "), tk.normalizers.Strip(),
        *([tk.normalizers.Lowercase()] if lowercase else [])])
    tok.pre_tokenizer = tk.pre_tokenizers.Sequence([
        tk.pre_tokenizers.Split(tk.Regex(_WORDS), behavior="removed", invert=True),
        tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = tk.decoders.ByteLevel()
    tok.add_special_tokens([START_OF_TEXT, END_OF_TEXT])
    sot, eot = len(vocab) - 2, len(vocab) - 1
    tok.post_processor = tk.processors.TemplateProcessing(
        single=f"{START_OF_TEXT} $A {END_OF_TEXT}", special_tokens=[(START_OF_TEXT, sot), (END_OF_TEXT, eot)])
    tok.enable_truncation(max_length=context_length)
    tok.enable_padding(pad_id=0, pad_token=vocab[0], length=context_length)
    return tok


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's / CLIP's reversible map of the 256 byte values to printable characters (in OpenCLIP's order)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = list(bs)
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return dict(zip(bs, map(chr, cs)))
