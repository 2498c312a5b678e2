"""Fashion-MNIST from its original idx ``.gz`` files (or the uncompressed idx files).

Files are looked for, in order, in an explicit ``data_dir``, in Debian's ``dataset-fashion-mnist``
package folder, and in the cache folder (``$VITKIT_DATA/fashion-mnist`` or ``./data/fashion-mnist``).
Downloads are SHA-256 checked and written atomically, so a broken transfer never leaves a file
that a later run would trust.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import shutil
import sys
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import torch

from vitkit.data.base import (
    InMemoryImageDataset,
    adapt_channels,
    as_size,
    check_split,
    data_root,
    resize_images,
)
from vitkit.errors import DataError
from vitkit.utils import atomic_path

CLASS_NAMES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]

# Mean/std of all 60000 × 28 × 28 training pixels scaled to [0, 1] (population std), computed once with
# numpy in float64 from /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz:
# mean = 0.2860405969887955, std = 0.35302424451492254.
MEAN = (0.2860406,)
STD = (0.3530242,)

MIRROR = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")

# SHA-256 of each file, taken from Debian's dataset-fashion-mnist copies: ``gz`` of the .gz file itself,
# ``idx`` of its decompressed content. Debian recompressed the files without the original name in the
# gzip header (each is 23-24 bytes smaller than the mirror's), so the mirror's .gz bytes differ while the
# idx content is identical; a download is accepted when either hash matches.
FILES: dict[str, dict[str, str | int]] = {
    "train-images-idx3-ubyte.gz": {
        "gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
        "idx": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "size": 16 + 60000 * 28 * 28,
    },
    "train-labels-idx1-ubyte.gz": {
        "gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
        "idx": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "size": 8 + 60000,
    },
    "t10k-images-idx3-ubyte.gz": {
        "gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
        "idx": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "size": 16 + 10000 * 28 * 28,
    },
    "t10k-labels-idx1-ubyte.gz": {
        "gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
        "idx": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        "size": 8 + 10000,
    },
}
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

_IDX_DTYPES = {0x08: np.uint8}  # the only element type Fashion-MNIST (and MNIST) use


def read_idx(path: str | Path, expected_ndim: int | None = None) -> np.ndarray:
    """Parse an idx file (``.gz`` or raw) into a numpy array, checking magic number and exact size.

    The whole payload is read in one go and checked against the header, so a truncated or
    padded file is reported instead of yielding a silently short dataset.
    """
    path = Path(path)
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
        raise DataError(f"{path}: cannot read idx file ({type(e).__name__}: {e}); the file may be truncated") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path}: not an idx file (bad magic number {raw[:4].hex() or 'empty'})")
    dtype_code, ndim = raw[2], raw[3]
    if dtype_code not in _IDX_DTYPES:
        raise DataError(f"{path}: unsupported idx element type 0x{dtype_code:02x} (expected 0x08, unsigned byte)")
    if expected_ndim is not None and ndim != expected_ndim:
        raise DataError(f"{path}: idx file has {ndim} dimensions, expected {expected_ndim} (wrong file?)")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated idx header ({len(raw)} bytes)")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64))
    if len(raw) - header != expected:
        raise DataError(
            f"{path}: idx header says shape {shape} ({expected} bytes of data) but the file holds "
            f"{len(raw) - header}; the file is truncated or corrupt"
        )
    return np.frombuffer(raw, dtype=_IDX_DTYPES[dtype_code], offset=header).reshape(shape)


def _find_file(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / name.removesuffix(".gz")):
        if candidate.is_file():
            return candidate
    return None


def candidate_dirs(data_dir: str | Path | None = None) -> list[Path]:
    """Folders searched in order; an explicit folder also matches its ``fashion-mnist`` subfolder."""
    dirs = []
    if data_dir is not None:
        dirs += [Path(data_dir), Path(data_dir) / "fashion-mnist"]
    dirs += [SYSTEM_DIR, data_root() / "fashion-mnist"]
    return dirs


def find_dir(data_dir: str | Path | None = None, split: str | None = None) -> Path | None:
    """First folder that holds the files of ``split`` (all four files if ``split`` is None)."""
    names = SPLIT_FILES[split] if split else tuple(FILES)
    for folder in candidate_dirs(data_dir):
        if all(_find_file(folder, n) for n in names):
            return folder
    return None


def _fetch(url: str, dest: Path) -> None:
    """Copy ``url`` to ``dest`` (tests replace this to stay offline)."""
    with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as out:
        shutil.copyfileobj(response, out, length=1 << 20)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _sha256_gunzip(path: Path, max_size: int) -> str | None:
    """SHA-256 of the decompressed content; None if it is not gzip or exceeds ``max_size`` (no gzip bombs)."""
    h = hashlib.sha256()
    size = 0
    try:
        with gzip.open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                size += len(block)
                if size > max_size:
                    return None
                h.update(block)
    except (OSError, EOFError, zlib.error):
        return None
    return h.hexdigest()


def verify_file(path: Path, name: str) -> None:
    """Raise DataError unless ``path`` is the genuine ``name`` (by .gz or decompressed SHA-256)."""
    info = FILES[name]
    actual = _sha256_file(path)
    if actual == info["gz"]:
        return
    if _sha256_gunzip(path, int(info["size"])) == info["idx"]:
        return
    raise DataError(
        f"{name}: SHA-256 mismatch for the downloaded file (got {actual}, expected {info['gz']} "
        f"or decompressed content {info['idx']}); the download was discarded"
    )


def download_files(dest_dir: str | Path, mirror: str = MIRROR) -> Path:
    """Download the four files into ``dest_dir`` (skipping ones already there and genuine)."""
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        final = dest_dir / name
        if final.is_file():
            try:
                verify_file(final, name)
                continue
            except DataError:
                pass  # a stale or damaged copy is replaced below
        url = mirror.rstrip("/") + "/" + name
        print(f"downloading {url}", file=sys.stderr)
        with atomic_path(final) as tmp:  # the temp file is deleted if anything below raises
            try:
                _fetch(url, tmp)
            except OSError as e:
                raise DataError(f"{name}: download from {url} failed ({e})") from e
            verify_file(tmp, name)
    return dest_dir


def load_arrays(folder: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images N×28×28 uint8, labels N uint8) of one split from ``folder``, fully validated."""
    folder = Path(folder)
    paths = []
    for name in SPLIT_FILES[split]:
        path = _find_file(folder, name)
        if path is None:
            raise DataError(f"{folder / name}: file not found")
        paths.append(path)
    images = read_idx(paths[0], expected_ndim=3)
    labels = read_idx(paths[1], expected_ndim=1)
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{paths[0]} has {images.shape[0]} images but {paths[1]} has {labels.shape[0]} labels")
    if labels.size and int(labels.max()) >= len(CLASS_NAMES):
        raise DataError(f"{paths[1]}: label {int(labels.max())} out of range 0..{len(CLASS_NAMES) - 1}")
    return images, labels


def load_fashion_mnist(
    split: str = "train",
    data_dir: str | Path | None = None,
    download: bool = False,
    image_size: int | tuple[int, int] | None = None,
    num_channels: int | None = None,
) -> InMemoryImageDataset:
    """Fashion-MNIST ``split`` ("train" or "test") as a 1×28×28 uint8 in-memory dataset.

    ``image_size``/``num_channels`` other than 28/1 convert the whole set once at load time
    (memory grows accordingly; resizing per batch in the transform is the cheaper alternative).
    """
    check_split(split)
    folder = find_dir(data_dir, split)
    if folder is None:
        if not download:
            searched = ", ".join(str(d) for d in candidate_dirs(data_dir))
            raise DataError(
                f"Fashion-MNIST {split} files ({', '.join(SPLIT_FILES[split])}) not found in: {searched}. "
                "Pass download=True, run `python -m vitkit.data.fashion_mnist --download DIR`, "
                "or install the Debian package dataset-fashion-mnist"
            )
        folder = download_files(Path(data_dir) if data_dir is not None else data_root() / "fashion-mnist")
    images, labels = load_arrays(folder, split)
    x = torch.from_numpy(images.copy()).unsqueeze(1)  # copy: the parsed buffer is read-only bytes
    size = as_size(image_size)
    mean, std = MEAN, STD
    if size is not None and size != (28, 28):
        x = resize_images(x, size)
    if num_channels not in (None, 1):
        x = adapt_channels(x, num_channels)
        mean, std = MEAN * num_channels, STD * num_channels
    return InMemoryImageDataset(
        x, torch.from_numpy(labels.astype(np.int64)), CLASS_NAMES, mean, std, name=f"fashion_mnist/{split}"
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m vitkit.data.fashion_mnist --download DIR``: fetch (or find) the files, check them."""
    parser = argparse.ArgumentParser(prog="python -m vitkit.data.fashion_mnist", description=__doc__)
    parser.add_argument("--download", metavar="DIR", help="download the four .gz files into DIR")
    parser.add_argument("--mirror", default=MIRROR, help=f"base URL (default {MIRROR})")
    args = parser.parse_args(argv)
    try:
        if args.download:
            folder = download_files(args.download, args.mirror)
        else:
            folder = find_dir()
            if folder is None:
                print("Fashion-MNIST not found; use --download DIR", file=sys.stderr)
                return 1
        for split in SPLIT_FILES:
            images, _ = load_arrays(folder, split)
            print(f"{split}: {images.shape[0]} images in {folder}")
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
