"""Tests of vitkit.data: loaders on tiny files written here, safety checks, transforms and batching."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import shutil
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Subset

import vitkit.data as D
from vitkit.data import base, cifar, digits, image_folder
from vitkit.data import fashion_mnist as fm
from vitkit.data import transforms as T
from vitkit.errors import ConfigError, DataError

SYSTEM_FMNIST = Path("/usr/share/datasets/fashion-mnist")
HAS_SYSTEM_FMNIST = (SYSTEM_FMNIST / "train-images-idx3-ubyte.gz").is_file()


# ---------------------------------------------------------------------------------------------- helpers
def idx_bytes(arr: np.ndarray) -> bytes:
    header = struct.pack(">BBBB", 0, 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def write_fake_fmnist(folder: Path, n_train: int = 12, n_test: int = 5) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = np.arange(n, dtype=np.uint8) % 10
        (folder / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images)))
        (folder / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels)))


@pytest.fixture
def data_no_system_dirs(monkeypatch, tmp_path):
    """Hide Debian's copy and point the cache at an empty folder, so searches see only the test's files."""
    monkeypatch.setattr(fm, "SYSTEM_DIR", tmp_path / "no-system")
    monkeypatch.setenv("VITKIT_DATA", str(tmp_path / "cache"))
    return tmp_path


def save(img: Image.Image, path: Path, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)
    return path


def cifar_batch(n: int, label_key: bytes, n_classes: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    data = np.empty((n, 3072), dtype=np.uint8)
    data[:, :1024], data[:, 1024:2048], data[:, 2048:] = 10, 20, 30  # R, G, B planes
    data[:, 0] = rng.integers(0, 256, n)
    return {
        b"batch_label": b"fake",
        label_key: [int(v) for v in rng.integers(0, n_classes, n)],
        b"data": data,
        b"filenames": [b"x.png"] * n,
    }


def write_tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


def cifar10_members(test_payload: bytes | None = None) -> dict[str, bytes]:
    inner = "cifar-10-batches-py"
    members = {
        f"{inner}/data_batch_{i}": pickle.dumps(cifar_batch(2, b"labels", 10, i), protocol=2 if i % 2 else 5)
        for i in range(1, 6)
    }
    members[f"{inner}/test_batch"] = test_payload or pickle.dumps(cifar_batch(3, b"labels", 10, 9), protocol=2)
    names = [f"class{i}".encode() for i in range(10)]
    members[f"{inner}/batches.meta"] = pickle.dumps({b"label_names": names, b"num_vis": 3072}, protocol=2)
    return members


class RunsShell:
    """Unpickling this would run a shell command: the loader must refuse it without calling anything."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ----------------------------------------------------------------------------------------- idx / FMNIST
def test_read_idx_gz_and_raw(tmp_path):
    arr = np.arange(5 * 4 * 3, dtype=np.uint8).reshape(5, 4, 3)
    (tmp_path / "a.gz").write_bytes(gzip.compress(idx_bytes(arr)))
    (tmp_path / "a").write_bytes(idx_bytes(arr))
    np.testing.assert_array_equal(fm.read_idx(tmp_path / "a.gz", expected_ndim=3), arr)
    np.testing.assert_array_equal(fm.read_idx(tmp_path / "a"), arr)
    with pytest.raises(DataError, match="dimensions"):
        fm.read_idx(tmp_path / "a.gz", expected_ndim=1)


def test_read_idx_rejects_bad_files(tmp_path):
    arr = np.zeros((6, 28, 28), dtype=np.uint8)
    good = gzip.compress(idx_bytes(arr))
    cut = tmp_path / "cut-images-idx3-ubyte.gz"
    cut.write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match="cut-images-idx3-ubyte.gz"):
        fm.read_idx(cut)
    short = tmp_path / "short.gz"
    short.write_bytes(gzip.compress(idx_bytes(arr)[:-10]))
    with pytest.raises(DataError, match=r"short\.gz.*truncated"):
        fm.read_idx(short)
    magic = tmp_path / "magic.gz"
    magic.write_bytes(gzip.compress(b"\x12\x34" + idx_bytes(arr)[2:]))
    with pytest.raises(DataError, match="magic.gz.*magic"):
        fm.read_idx(magic)


def test_fashion_mnist_from_fake_dir(data_no_system_dirs):
    folder = data_no_system_dirs / "fm"
    write_fake_fmnist(folder)
    ds = D.build_dataset("fashion_mnist", "train", data_dir=str(folder))
    assert len(ds) == 12 and ds.images.shape == (12, 1, 28, 28) and ds.images.dtype == torch.uint8
    assert ds.classes[0] == "T-shirt/top" and ds.mean == fm.MEAN
    test = D.build_dataset("fashion_mnist", "test", data_dir=str(folder), image_size=32, num_channels=3)
    assert test.images.shape == (5, 3, 32, 32) and len(test.mean) == 3
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(4, np.uint8))))
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz has 4 labels"):
        fm.load_fashion_mnist("test", folder)


def test_fashion_mnist_not_found(data_no_system_dirs):
    with pytest.raises(DataError, match="not found in.*no-system.*download=True"):
        fm.load_fashion_mnist("train", data_no_system_dirs / "empty")


@pytest.mark.skipif(not HAS_SYSTEM_FMNIST, reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist():
    train, test = fm.load_fashion_mnist("train"), fm.load_fashion_mnist("test")
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert train.labels.min() == 0 and train.labels.max() == 9
    assert torch.equal(train.labels.bincount(), torch.full((10,), 6000))
    sample_mean, sample_std = D.compute_mean_std(train, max_samples=5000)
    assert abs(sample_mean[0] - fm.MEAN[0]) < 0.01 and abs(sample_std[0] - fm.STD[0]) < 0.01


def test_download_checksum_mismatch(data_no_system_dirs, monkeypatch):
    calls = []

    def fake_fetch(url: str, dest: Path) -> None:
        calls.append(url)
        Path(dest).write_bytes(gzip.compress(b"not the real file"))

    monkeypatch.setattr(fm, "_fetch", fake_fetch)
    dest = data_no_system_dirs / "dl"
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz: SHA-256 mismatch"):
        fm.load_fashion_mnist("train", dest, download=True)
    assert calls == [fm.MIRROR + "train-images-idx3-ubyte.gz"]
    assert list(dest.iterdir()) == []  # the temp file is gone and nothing was kept


@pytest.mark.skipif(not HAS_SYSTEM_FMNIST, reason="Debian package dataset-fashion-mnist not installed")
def test_download_accepts_genuine_and_recompressed(data_no_system_dirs, monkeypatch):
    def fake_fetch(url: str, dest: Path) -> None:
        shutil.copyfile(SYSTEM_FMNIST / url.rsplit("/", 1)[1], dest)

    monkeypatch.setattr(fm, "_fetch", fake_fetch)
    dest = data_no_system_dirs / "dl"
    assert fm.main(["--download", str(dest)]) == 0
    assert sorted(p.name for p in dest.iterdir()) == sorted(fm.FILES)
    assert len(fm.load_fashion_mnist("test", dest)) == 10000
    # The mirror's .gz carries the file name in its header: other bytes, same content, still accepted.
    name = "t10k-labels-idx1-ubyte.gz"
    content = gzip.decompress((SYSTEM_FMNIST / name).read_bytes())
    mirror_like = data_no_system_dirs / "mirror.gz"
    with gzip.GzipFile(filename=name[:-3], mode="wb", fileobj=open(mirror_like, "wb"), mtime=1) as f:
        f.write(content)
    fm.verify_file(mirror_like, name)
    mirror_like.write_bytes(gzip.compress(content[:-1] + b"\x09"))
    with pytest.raises(DataError, match="SHA-256 mismatch"):
        fm.verify_file(mirror_like, name)


# ----------------------------------------------------------------------------------------- ImageFolder
def make_folder(root: Path) -> Path:
    save(Image.new("RGB", (20, 10), (255, 0, 0)), root / "cat" / "red.jpg", quality=95)
    save(Image.new("L", (16, 16), 128), root / "cat" / "gray.png")
    rgba = Image.new("RGBA", (16, 16), (0, 0, 0, 0))  # fully transparent black → white
    save(rgba, root / "cat" / "clear.png")
    pal = Image.new("P", (16, 16), 0)
    pal.putpalette([0, 0, 255] + [0, 0, 0] * 255)
    save(pal, root / "dog" / "palette.png")
    save(Image.new("RGB", (16, 16), (0, 255, 0)), root / "dog" / "green.webp", lossless=True)
    save(Image.new("RGB", (16, 16), (0, 0, 0)), root / "dog" / "nested" / "black.bmp")
    save(Image.new("CMYK", (16, 16), (0, 0, 0, 0)), root / "dog" / "cmyk.jpg", quality=95)
    save(Image.fromarray(np.full((16, 16), 65535, dtype=np.uint16)), root / "dog" / "deep.png")
    (root / "dog" / "notes.txt").write_text("not an image")
    return root


def test_image_folder_modes_and_sizes(tmp_path):
    root = make_folder(tmp_path / "imgs")
    ds = image_folder.ImageFolder(root, image_size=8, num_channels=3)
    assert ds.classes == ["cat", "dog"] and len(ds) == 8 and ds.bad_images == []
    by_name = {Path(p).name: i for i, (p, _) in enumerate(ds.samples)}
    for i in range(len(ds)):
        img, label = ds[i]
        assert img.shape == (3, 8, 8) and img.dtype == torch.uint8 and label in (0, 1)
    assert ds[by_name["clear.png"]][0].min() == 255  # transparent composited onto white
    assert ds[by_name["palette.png"]][0][:, 0, 0].tolist() == [0, 0, 255]
    assert ds[by_name["green.webp"]][0][:, 0, 0].tolist() == [0, 255, 0]
    assert ds[by_name["cmyk.jpg"]][0].float().mean() > 250  # CMYK (0,0,0,0) is white paper
    assert ds[by_name["deep.png"]][0].min() == 255  # 16-bit white is scaled, not clipped or wrapped
    red = ds[by_name["red.jpg"]][0].float()
    assert red[0].mean() > 240 and red[1:].mean() < 15
    gray = image_folder.ImageFolder(root, image_size=(4, 6), num_channels=1)
    assert gray[by_name["gray.png"]][0].shape == (1, 4, 6)
    assert abs(int(gray[by_name["gray.png"]][0][0, 0, 0]) - 128) <= 1
    mean, std = D.compute_mean_std(ds, max_samples=100)
    assert len(mean) == 3 and all(0 <= m <= 1 for m in mean) and len(std) == 3
    assert ds.mean == mean  # lazily computed with the same sample


def test_resize_center_crop_keeps_center():
    arr = np.zeros((10, 30), dtype=np.uint8)
    arr[:, 10:20] = 255  # white middle third
    out = image_folder.resize_center_crop(Image.fromarray(arr), (5, 5))
    assert out.size == (5, 5) and np.asarray(out).min() > 200  # the crop is the white center


def test_image_folder_bad_images(tmp_path):
    root = make_folder(tmp_path / "imgs")
    (root / "cat" / "garbage.png").write_bytes(b"\x00garbage, not a picture" * 10)
    png = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(png, "PNG")
    (root / "dog" / "truncated.png").write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    with pytest.raises(DataError, match=r"(?s)2 unreadable image files.*max_bad_images=1") as err:
        image_folder.ImageFolder(root, 8, max_bad_images=1)
    assert "garbage.png" in str(err.value) and "truncated.png" in str(err.value)
    with pytest.warns(D.BadImageWarning, match=r"(?s)left out 2 .*garbage\.png.*truncated\.png"):
        ds = image_folder.ImageFolder(root, 8, max_bad_images=2)
    assert len(ds) == 8 and [Path(p).name for p, _ in ds.bad_images] == ["garbage.png", "truncated.png"]
    assert all(reason for _, reason in ds.bad_images)
    # A file that breaks after the check is an error naming it, never a silent skip.
    victim = ds.samples[0][0]
    Path(victim).write_bytes(b"broken later")
    with pytest.raises(DataError, match=Path(victim).name):
        ds[0]


def test_truncated_jpeg_found_by_decode_check(tmp_path):
    jpg = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(jpg, "JPEG")
    save(Image.new("RGB", (8, 8)), tmp_path / "a" / "ok.png")
    (tmp_path / "a" / "cut.jpg").write_bytes(jpg.getvalue()[:800])
    ds = image_folder.ImageFolder(tmp_path, 8)  # "verify" reads headers only: the cut shows at load time
    with pytest.raises(DataError, match=r"cut\.jpg: cannot load image"):
        ds[0]
    with pytest.raises(DataError, match=r"(?s)1 unreadable.*cut\.jpg"):
        image_folder.ImageFolder(tmp_path, 8, check="decode")


def test_image_folder_structure_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        image_folder.ImageFolder(tmp_path / "missing", 8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class subfolders"):
        image_folder.ImageFolder(tmp_path / "empty", 8)
    (tmp_path / "noimg" / "a").mkdir(parents=True)
    (tmp_path / "noimg" / "a" / "x.txt").write_text("x")
    with pytest.raises(DataError, match="no image files"):
        image_folder.ImageFolder(tmp_path / "noimg", 8)


def test_build_dataset_image_folder_splits(tmp_path):
    make_folder(tmp_path / "split" / "train")
    make_folder(tmp_path / "split" / "val")
    ds = D.build_dataset("image_folder", "val", root=str(tmp_path / "split"), image_size=8, num_channels=1)
    assert isinstance(ds, D.ImageFolder) and ds.num_channels == 1 and len(ds) == 8
    # "test" is found as val/ when there is no test/ (train/ + val/ is the usual layout); never the reverse
    test = D.build_dataset("image_folder", "test", root=str(tmp_path / "split"), image_size=8)
    assert test.samples == ds.samples
    make_folder(tmp_path / "only" / "train")
    make_folder(tmp_path / "only" / "test")
    with pytest.raises(DataError, match="split folder not found"):
        D.build_dataset("image_folder", "val", root=str(tmp_path / "only"), image_size=8)


# ------------------------------------------------------------------------------------------------ CIFAR
def test_cifar10_archive_and_folder(tmp_path):
    archive = write_tar(tmp_path / "cifar-10-python.tar.gz", cifar10_members())
    train = D.build_dataset("cifar10", "train", data_dir=str(tmp_path))
    assert train.images.shape == (10, 3, 32, 32) and train.classes[3] == "class3"
    assert train.images[:, 1].eq(20).all() and train.images[:, 2].eq(30).all()  # planes are R, G, B
    assert train.mean == cifar.STATS["cifar10"][0]
    test = cifar.load_cifar("cifar10", "test", archive, num_channels=1, image_size=16)
    assert test.images.shape == (3, 1, 16, 16)
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path / "x", filter="data")
    extracted = cifar.load_cifar("cifar10", "train", tmp_path / "x" / "cifar-10-batches-py")
    assert torch.equal(extracted.images, train.images) and torch.equal(extracted.labels, train.labels)


def test_cifar100_fine_and_coarse(tmp_path):
    batch = cifar_batch(4, b"fine_labels", 100, 0)
    batch[b"coarse_labels"] = [1, 2, 3, 4]
    meta = {
        b"fine_label_names": [f"f{i}".encode() for i in range(100)],
        b"coarse_label_names": [f"c{i}".encode() for i in range(20)],
    }
    write_tar(
        tmp_path / "cifar-100-python.tar.gz",
        {f"cifar-100-python/{k}": pickle.dumps(v, protocol=2) for k, v in
         {"train": batch, "test": batch, "meta": meta}.items()},
    )
    fine = D.build_dataset("cifar100", "train", data_dir=str(tmp_path))
    assert len(fine.classes) == 100 and fine.labels.tolist() == batch[b"fine_labels"]
    coarse = D.build_dataset("cifar100", "test", data_dir=str(tmp_path), label_type="coarse")
    assert len(coarse.classes) == 20 and coarse.labels.tolist() == [1, 2, 3, 4]


def test_cifar_rejects_malicious_pickle_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(RunsShell(marker), protocol=2)
    write_tar(tmp_path / "cifar-10-python.tar.gz", cifar10_members(test_payload=payload))
    with pytest.raises(DataError, match=r"test_batch: refused to load global (posix|os)\.system"):
        cifar.load_cifar("cifar10", "test", tmp_path)
    assert not marker.exists()
    with pytest.raises(DataError, match=r"_codecs.encode with encoding 'zlib'"):
        cifar.safe_load_pickle(b"c_codecs\nencode\n(Vx\nVzlib\ntR.", "zlib.pkl")
    with pytest.raises(DataError, match=r"refused to load global builtins\.eval"):
        cifar.safe_load_pickle(b"cbuiltins\neval\n(S'1+1'\ntR.", "evil.pkl")


def test_cifar_reads_numpy1_pickles():
    arr = np.arange(6, dtype=np.uint8).reshape(2, 3)
    old_style = pickle.dumps({b"data": arr}, protocol=2)
    assert b"cnumpy._core.multiarray\n" in old_style  # as numpy >= 2 writes it; numpy 1 wrote numpy.core
    old_style = old_style.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    np.testing.assert_array_equal(cifar.safe_load_pickle(old_style, "old.pkl")[b"data"], arr)


def test_cifar_validates_shapes(tmp_path):
    bad = cifar_batch(3, b"labels", 10, 0)
    bad[b"data"] = np.zeros((3, 100), dtype=np.uint8)
    write_tar(tmp_path / "cifar-10-python.tar.gz", cifar10_members(test_payload=pickle.dumps(bad)))
    with pytest.raises(DataError, match=r"test_batch: b'data' must be an N×3072 uint8 array, got \(3, 100\)"):
        cifar.load_cifar("cifar10", "test", tmp_path)
    with pytest.raises(DataError, match="neither cifar-100-python.tar.gz"):
        cifar.load_cifar("cifar100", "test", tmp_path)


# ----------------------------------------------------------------------------------------------- digits
def test_digits_builtin():
    train, test = D.build_dataset("digits", "train"), D.build_dataset("digits", "test")
    assert len(train) + len(test) == 1797 and len(test) == 359
    assert train.images.shape[1:] == (1, 8, 8) and train.images.max() == 255
    assert torch.equal(train.labels.bincount(minlength=10) > 100, torch.ones(10, dtype=torch.bool))
    big = digits.load_digits("test", image_size=16, num_channels=3)
    assert big.images.shape == (359, 3, 16, 16) and len(big.mean) == 3 and big.mean[0] == big.mean[2]
    assert abs(train.mean[0] - big.mean[0]) < 0.02


def test_digits_asset_matches_sklearn(tmp_path):
    pytest.importorskip("sklearn")
    digits.write_digits_asset(tmp_path / "d.npz")
    new, packaged = digits.load_digits_arrays(tmp_path / "d.npz"), digits.load_digits_arrays()
    for a, b in zip(new, packaged):
        np.testing.assert_array_equal(a, b)


# -------------------------------------------------------------------------------- in-memory + loading
def test_in_memory_validation_and_subset():
    with pytest.raises(DataError, match=r"uint8 N×C×H×W tensor, got \(4, 8, 8\)"):
        D.InMemoryImageDataset(torch.zeros(4, 8, 8, dtype=torch.uint8), [0] * 4, ["a"])
    with pytest.raises(DataError, match="labels range 0..3 does not fit 2 classes"):
        D.InMemoryImageDataset(torch.zeros(4, 1, 2, 2, dtype=torch.uint8), [0, 1, 2, 3], ["a", "b"])
    labels = torch.arange(100) % 4
    ds = D.InMemoryImageDataset(torch.zeros(100, 1, 2, 2, dtype=torch.uint8), labels, list("abcd"))
    small, mid = ds.subset(0.1, seed=1), ds.subset(0.3, seed=1)
    assert torch.equal(small.labels.bincount(), torch.full((4,), 2))  # round(0.1 * 25) per class
    assert len(mid) == 32 and torch.equal(ds.subset(0.1, seed=1).labels, small.labels)
    i10, i30 = D.stratified_indices(labels, 0.1, 1), D.stratified_indices(labels, 0.3, 1)
    assert set(i10.tolist()) <= set(i30.tolist())  # nested: 10 % ⊂ 30 %
    assert not torch.equal(i10, D.stratified_indices(labels, 0.1, 2))
    with pytest.raises(DataError, match="fraction"):
        ds.subset(0.0)


def test_getitems_batches_through_dataloader(monkeypatch):
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 3, 3).contiguous()
    ds = D.InMemoryImageDataset(images, torch.arange(10) % 2, ["even", "odd"])
    calls = []
    original = D.InMemoryImageDataset.__getitems__
    monkeypatch.setattr(D.InMemoryImageDataset, "__getitems__", lambda s, i: calls.append(i) or original(s, i))
    batches = list(DataLoader(ds, batch_size=4, collate_fn=D.batch_collate, num_workers=0))
    assert len(calls) == 3 and [b.images.shape[0] for b in batches] == [4, 4, 2]
    assert isinstance(batches[0], D.ImageBatch) and batches[0].labels.tolist() == [0, 1, 0, 1]
    assert torch.cat([b.images[:, 0, 0, 0] for b in batches]).tolist() == list(range(10))
    sub = list(DataLoader(Subset(ds, [9, 3]), batch_size=2, collate_fn=D.batch_collate))  # Subset forwards it
    assert sub[0].images[:, 0, 0, 0].tolist() == [9, 3]
    per_sample = D.batch_collate([ds[0], ds[1]])  # the plain per-sample path
    assert per_sample.images.shape == (2, 1, 3, 3) and per_sample.labels.dtype == torch.int64
    with pytest.raises(DataError, match="different shapes"):
        D.batch_collate([(torch.zeros(1, 2, 2), 0), (torch.zeros(1, 3, 3), 1)])


def test_image_folder_through_dataloader(tmp_path):
    ds = image_folder.ImageFolder(make_folder(tmp_path / "imgs"), image_size=8, num_channels=1)
    (batch,) = list(DataLoader(ds, batch_size=8, collate_fn=D.batch_collate))
    assert batch.images.shape == (8, 1, 8, 8) and batch.labels.tolist() == [0, 0, 0, 1, 1, 1, 1, 1]


def test_make_loader_seeded_shuffle():
    ds = D.build_dataset("digits", "test")
    orders = [torch.cat([b.labels for b in D.make_loader(ds, 64, shuffle=True, seed=5)]) for _ in range(2)]
    assert torch.equal(orders[0], orders[1]) and not torch.equal(orders[0], ds.labels)
    assert len(orders[0]) == len(ds)


def test_build_dataset_unknown_name():
    with pytest.raises(DataError, match="unknown dataset 'mnist'; valid names: fashion_mnist, .*cifar10"):
        D.build_dataset("mnist", "train")
    with pytest.raises(DataError, match=r"'digits' does not take \['root'\]"):
        D.build_dataset("digits", "train", root="x")
    with pytest.raises(DataError, match="unknown split 'dev'"):
        D.build_dataset("digits", "dev")


# ------------------------------------------------------------------------------------------- transforms
def test_eval_transform_normalises():
    x = torch.full((2, 1, 8, 8), 255, dtype=torch.uint8)
    t = T.build_transforms(None, False, (0.5,), (0.25,), 8)
    y = t(x)
    assert y.dtype == torch.float32 and y.shape == (2, 1, 8, 8) and torch.allclose(y, torch.full_like(y, 2.0))
    assert torch.allclose(t(x.float() / 255), y)  # float [0, 1] input gives the same
    assert T.build_transforms(None, False, (0.5,), (0.25,), 16)(x).shape == (2, 1, 16, 16)
    with pytest.raises(DataError, match=r"expects a \(B, 1, H, W\) batch, got shape \(2, 3, 8, 8\)"):
        t(torch.zeros(2, 3, 8, 8))


@pytest.mark.parametrize("policy", ["randaugment", "trivialaugment"])
@pytest.mark.parametrize("channels", [1, 3])
def test_train_transform_deterministic_under_seed(policy, channels):
    cfg = T.AugmentConfig(crop="pad_crop", hflip=True, auto_augment=policy, random_erasing=0.5,
                          auto_augment_groups=2)
    t = T.build_transforms(cfg, True, (0.5,) * channels, (0.5,) * channels, 12)
    x = torch.randint(0, 256, (16, channels, 12, 12), dtype=torch.uint8)
    outs = []
    for _ in range(2):
        torch.manual_seed(3)
        outs.append(t(x))
    assert outs[0].shape == (16, channels, 12, 12) and outs[0].dtype == torch.float32
    assert torch.equal(outs[0], outs[1])
    assert not torch.allclose(outs[0], t.normalize(x.float() / 255))


def test_every_auto_augment_op_works_on_one_channel():
    from kornia.augmentation.auto import RandAugment
    from kornia.augmentation.auto.rand_augment.rand_augment import default_policy

    x = torch.rand(4, 1, 10, 10)
    names = []
    for sub in default_policy:  # includes "color", which needs 3 channels in kornia
        aug = T.PolicyAugment(RandAugment(n=1, m=9, policy=[sub]))
        y = aug(x)
        assert y.shape == x.shape and float(y.min()) >= 0 and float(y.max()) <= 1
        names.append(sub[0][0])
    assert "color" in names


def test_augment_config_errors():
    with pytest.raises(ConfigError, match="unknown augment keys"):
        T.AugmentConfig.from_dict({"hflp": True})
    with pytest.raises(ConfigError, match="crop"):
        T.AugmentConfig(crop="zoom")
    assert T.AugmentConfig.from_dict({"crop_scale": [0.5, 1.0]}).crop_scale == (0.5, 1.0)
    assert T.build_mixup({}, 10) is None


@pytest.mark.parametrize("mixup,cutmix", [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_mixup_cutmix_soft_targets(mixup, cutmix):
    torch.manual_seed(0)
    mix = T.build_mixup({"mixup_alpha": mixup, "cutmix_alpha": cutmix, "label_smoothing": 0.1}, 6)
    x, y = torch.rand(6, 3, 8, 8), torch.arange(6)  # reversed partners always have another class
    for _ in range(5):
        xm, targets = mix(x, y)
        assert xm.shape == x.shape and targets.shape == (6, 6)
        assert torch.allclose(targets.sum(1), torch.ones(6)) and targets.min() >= 0
        lam = (targets[torch.arange(6), y] - 0.1 / 6) / 0.9
        if cutmix and not mixup:  # the own-class weight equals the share of pixels kept from the own image
            assert torch.allclose(lam, (xm == x).all(1).float().mean((1, 2)), atol=1e-5)
        if mixup and not cutmix:
            assert torch.allclose(xm, lam.view(-1, 1, 1, 1) * x + (1 - lam.view(-1, 1, 1, 1)) * x.flip(0),
                                  atol=1e-5)


def test_mixup_off_gives_smoothed_one_hot():
    mix = T.MixupCutmix(4, mixup_alpha=1.0, cutmix_alpha=0.0, prob=0.0, label_smoothing=0.2)
    x = torch.rand(2, 1, 4, 4)
    xm, targets = mix(x, torch.tensor([1, 3]))
    assert torch.equal(xm, x)
    assert torch.allclose(targets[0], torch.tensor([0.05, 0.85, 0.05, 0.05]))
    with pytest.raises(DataError, match="float"):
        mix(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.tensor([0, 1]))


def test_dataset_attributes_and_sizes():
    for ds in (D.build_dataset("digits", "test", num_channels=3), D.build_dataset("digits", "test", image_size=12)):
        assert ds.num_channels == ds.images.shape[1] and ds.image_size == tuple(ds.images.shape[2:])
        assert len(ds.mean) == len(ds.std) == ds.num_channels and len(ds.classes) == 10
    assert base.as_size(7) == (7, 7) and base.as_size((3, 4)) == (3, 4)
    with pytest.raises(DataError, match="image_size"):
        base.as_size((0, 4))
