"""CIFAR-10 / CIFAR-100 from the official "python version" archives, without running pickled code.

The batches are Python pickles. ``pickle.load`` would call any global a file names, so a tampered
archive could run arbitrary code; :class:`SafeUnpickler` only resolves the few numpy names that
rebuild a plain array and refuses everything else before calling it.
"""

from __future__ import annotations

import _codecs
import io
import pickle
import tarfile
from pathlib import Path
from typing import Any, Literal

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

Variant = Literal["cifar10", "cifar100"]

# Per-channel mean/std of the training pixels in [0, 1] as published for these datasets (population std
# over all 50000 × 32 × 32 pixels per channel; not recomputed here because CIFAR is not on this machine).
STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
LAYOUT = {
    # archive name, folder inside it, train members, test members, meta member, meta key, label key
    "cifar10": (
        "cifar-10-python.tar.gz", "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "batches.meta", b"label_names", b"labels",
    ),
    "cifar100": (
        "cifar-100-python.tar.gz", "cifar-100-python",
        ["train"], ["test"], "meta", b"fine_label_names", b"fine_labels",
    ),
}


def _latin1_encode(text: str, encoding: str | bytes = "utf-8", errors: str = "strict") -> bytes:
    """Python 3 writes bytes in protocol-2 pickles as ``_codecs.encode(text, "latin1")``; allow only that."""
    if isinstance(encoding, bytes):
        encoding = encoding.decode("ascii", "replace")
    if not isinstance(text, str) or encoding.lower().replace("-", "").replace("_", "") != "latin1":
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} is not allowed")
    return _codecs.encode(text, "latin1", errors)


def _allowed_globals() -> dict[tuple[str, str], Any]:
    # numpy < 2 pickles arrays via ``numpy.core.multiarray._reconstruct`` (the real CIFAR files, written by
    # Python 2) and numpy >= 2 via ``numpy._core.multiarray._reconstruct``, or with protocol 5 via
    # ``numpy._core.numeric._frombuffer``. Both spellings map to the live numpy 2 objects, so the deprecated
    # ``numpy.core`` alias is never imported.
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]

    return {
        ("numpy.core.multiarray", "_reconstruct"): multiarray._reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): multiarray._reconstruct,
        ("numpy.core.numeric", "_frombuffer"): numeric._frombuffer,
        ("numpy._core.numeric", "_frombuffer"): numeric._frombuffer,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }


class SafeUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the numpy names a plain array needs; any other global is refused."""

    def __init__(self, file: io.BufferedIOBase, source: str) -> None:
        super().__init__(file, encoding="bytes")  # Python 2 ``str`` keys stay bytes, as in the real files
        self.source = source
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise DataError(
                f"{self.source}: refused to load global {module}.{name} from the pickle; only numpy arrays are "
                "allowed, because unpickling other globals can run arbitrary code (is the file tampered with?)"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise DataError(f"{self.source}: refused persistent id {pid!r} in the pickle")


def safe_load_pickle(data: bytes, source: str) -> Any:
    """Unpickle ``data`` with :class:`SafeUnpickler`; any failure is a DataError naming ``source``."""
    try:
        return SafeUnpickler(io.BytesIO(data), source).load()
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{source}: not a valid CIFAR pickle ({type(e).__name__}: {e})") from e


class _Source:
    """Reads members from either the .tar.gz archive or an extracted folder, by their name in the folder."""

    def __init__(self, path: Path, inner: str) -> None:
        self.path, self.inner = path, inner
        self._tar: tarfile.TarFile | None = None
        if path.is_file():
            try:
                self._tar = tarfile.open(path, "r:*")  # noqa: SIM115 - closed by __exit__
            except (tarfile.TarError, OSError, EOFError) as e:
                raise DataError(f"{path}: cannot open archive ({type(e).__name__}: {e})") from e

    def label(self, member: str) -> str:
        return f"{self.path}:{self.inner}/{member}" if self._tar else str(self.path / member)

    def read(self, member: str) -> bytes:
        try:
            if self._tar is None:
                return (self.path / member).read_bytes()
            f = self._tar.extractfile(f"{self.inner}/{member}")
            if f is None:
                raise DataError(f"{self.label(member)}: not a regular file in the archive")
            return f.read()
        except KeyError:
            raise DataError(f"{self.label(member)}: missing from the archive") from None
        except FileNotFoundError:
            raise DataError(f"{self.label(member)}: file not found") from None
        except (tarfile.TarError, OSError, EOFError) as e:
            raise DataError(f"{self.label(member)}: cannot read ({type(e).__name__}: {e})") from e

    def __enter__(self) -> _Source:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._tar is not None:
            self._tar.close()


def find_source(variant: Variant, data_dir: str | Path | None = None) -> tuple[Path, str]:
    """Locate the archive or extracted folder; ``data_dir`` may be either or a folder holding either."""
    archive, inner = LAYOUT[variant][:2]
    bases = [Path(data_dir)] if data_dir is not None else [data_root(), data_root() / variant]
    tried = []
    for base in bases:
        for cand in (base / inner, base / archive, base):
            tried.append(str(cand))
            if cand.is_file() and cand.name.endswith((".tar.gz", ".tgz", ".tar")):
                return cand, inner
            if cand.is_dir() and (cand / LAYOUT[variant][4]).is_file():
                return cand, inner
    raise DataError(
        f"{variant}: neither {archive} nor an extracted {inner}/ folder found (looked at: {', '.join(tried)}); "
        f"download the python version from https://www.cs.toronto.edu/~kriz/cifar.html"
    )


def _as_dict(obj: Any, source: str) -> dict[bytes, Any]:
    if not isinstance(obj, dict):
        raise DataError(f"{source}: expected a dict in the pickle, got {type(obj).__name__}")
    return {k.encode() if isinstance(k, str) else k: v for k, v in obj.items()}


def _names(raw: Any, source: str, key: bytes) -> list[str]:
    if not isinstance(raw, (list, tuple)) or not raw:
        raise DataError(f"{source}: key {key!r} must be a non-empty list of class names")
    return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in raw]


def load_cifar_arrays(
    variant: Variant, split: str, data_dir: str | Path | None = None, label_type: str = "fine"
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(images N×3×32×32 uint8, labels N int64, class names) of ``split``, with shapes validated."""
    if variant not in LAYOUT:
        raise DataError(f"unknown CIFAR variant {variant!r}; valid: {', '.join(LAYOUT)}")
    check_split(split)
    _, _, train_members, test_members, meta_member, names_key, label_key = LAYOUT[variant]
    if variant == "cifar100":
        if label_type not in ("fine", "coarse"):
            raise DataError(f"cifar100 label_type must be 'fine' or 'coarse', got {label_type!r}")
        names_key, label_key = f"{label_type}_label_names".encode(), f"{label_type}_labels".encode()
    path, inner = find_source(variant, data_dir)
    with _Source(path, inner) as src:
        meta_name = src.label(meta_member)
        meta = _as_dict(safe_load_pickle(src.read(meta_member), meta_name), meta_name)
        if names_key not in meta:
            raise DataError(f"{meta_name}: key {names_key!r} missing (keys: {sorted(meta)})")
        classes = _names(meta[names_key], meta_name, names_key)
        images, labels = [], []
        for member in train_members if split == "train" else test_members:
            name = src.label(member)
            batch = _as_dict(safe_load_pickle(src.read(member), name), name)
            for key in (b"data", label_key):
                if key not in batch:
                    raise DataError(f"{name}: key {key!r} missing (keys: {sorted(batch)})")
            data = batch[b"data"]
            if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
                shape = getattr(data, "shape", type(data).__name__)
                raise DataError(
                    f"{name}: b'data' must be an N×3072 uint8 array, got {shape} {getattr(data, 'dtype', '')}"
                )
            lab = np.asarray(batch[label_key])
            if lab.ndim != 1 or lab.shape[0] != data.shape[0] or not np.issubdtype(lab.dtype, np.integer):
                raise DataError(
                    f"{name}: {label_key!r} must hold {data.shape[0]} integer labels, got shape {lab.shape} "
                    f"{lab.dtype}"
                )
            if lab.size and (lab.min() < 0 or lab.max() >= len(classes)):
                raise DataError(f"{name}: labels {lab.min()}..{lab.max()} out of range for {len(classes)} classes")
            images.append(data.reshape(-1, 3, 32, 32))  # rows are 1024 red, 1024 green, 1024 blue bytes
            labels.append(lab.astype(np.int64))
    return np.concatenate(images), np.concatenate(labels), classes


def load_cifar(
    variant: Variant,
    split: str = "train",
    data_dir: str | Path | None = None,
    image_size: int | tuple[int, int] | None = None,
    num_channels: int | None = None,
    label_type: str = "fine",
) -> InMemoryImageDataset:
    """CIFAR-10/100 ``split`` as a 3×32×32 uint8 in-memory dataset (CIFAR-100: fine labels by default)."""
    images, labels, classes = load_cifar_arrays(variant, split, data_dir, label_type)
    x = torch.from_numpy(np.ascontiguousarray(images))
    mean, std = STATS[variant]
    size = as_size(image_size)
    if size is not None and size != (32, 32):
        x = resize_images(x, size)
    stats: tuple[Any, Any] = (mean, std)
    if num_channels not in (None, 3):
        x = adapt_channels(x, num_channels)
        stats = (None, None)  # gray stats differ; computed from the data on first use
    return InMemoryImageDataset(x, torch.from_numpy(labels), classes, *stats, name=f"{variant}/{split}")
