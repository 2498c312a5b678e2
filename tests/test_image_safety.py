"""Image decoding that holds against hostile or broken files (issue #12, items 1 and 5a).

Crafted files a few hundred bytes long declare huge or absurd sizes: each must be refused before decoding,
quickly, with a DataError naming the file, by every path that decodes images (load_image as ``vitkit
predict`` uses it, check_image, ImageFolder, bytes). Those run in a child process under an address-space
cap, so that a regression fails the test instead of swapping a shared machine. Then: JPEG draft decoding,
configurable limits, ImageFolder's handling of files that break during training, and a seeded fuzz.
"""

from __future__ import annotations

import io
import json
import os
import re
import struct
import subprocess
import sys
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import vitkit.data as D
from vitkit.data import image_folder, image_io
from vitkit.data.image_io import BadImageError, ImageLimits, decode_image, decode_pil, set_image_limits
from vitkit.errors import ConfigError, DataError


@pytest.fixture(autouse=True)
def default_limits(monkeypatch):
    """Every test starts from the built-in limits, whatever the environment says, and leaves them so."""
    monkeypatch.delenv(image_io.ENV_MAX_PIXELS, raising=False)
    monkeypatch.delenv(image_io.ENV_MAX_ASPECT, raising=False)
    previous = set_image_limits(None)
    yield
    set_image_limits(previous)


# --------------------------------------------------------------------------------------- crafted files
def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _noise(w: int = 8, h: int = 8, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def png_claiming(w: int, h: int) -> bytes:
    """A valid small PNG whose IHDR says w×h (checksum fixed, so only the size is wrong)."""
    b = bytearray(_encode(_noise(), "PNG"))
    assert b[12:16] == b"IHDR"
    b[16:24] = struct.pack(">II", w, h)
    b[29:33] = struct.pack(">I", zlib.crc32(bytes(b[12:29])))
    return bytes(b)


def tiff_claiming(w: int, h: int, total: int = 1964) -> bytes:
    """An uncompressed 8-bit gray TIFF of ``total`` bytes (the issue's file had 1,964) declaring w×h."""
    tags = [(256, 4, w), (257, 4, h), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, -1), (277, 3, 1),
            (278, 4, h), (279, 4, -2)]
    data_offset = 8 + 2 + 12 * len(tags) + 4
    n_data = total - data_offset
    out = bytearray(b"II*\x00" + struct.pack("<IH", 8, len(tags)))
    for tag, kind, value in tags:
        value = {-1: data_offset, -2: n_data}.get(value, value)
        out += struct.pack("<HHI", tag, kind, 1) + struct.pack("<HH" if kind == 3 else "<I", *(
            (value, 0) if kind == 3 else (value,)))
    out += struct.pack("<I", 0) + bytes(i % 251 for i in range(n_data))
    return bytes(out)


def _jpeg_sof(b: bytes) -> int:
    i = 2
    while i + 4 <= len(b):
        marker, length = b[i + 1], struct.unpack(">H", b[i + 2 : i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):
            return i
        i += 2 + length
    raise AssertionError("no SOF marker")


def jpeg_claiming(w: int, h: int) -> bytes:
    b = bytearray(_encode(_noise(16, 16), "JPEG", quality=90))
    i = _jpeg_sof(b)
    b[i + 5 : i + 9] = struct.pack(">HH", h, w)
    return bytes(b)


def gif_screen_claiming(w: int, h: int) -> bytes:
    b = bytearray(_encode(_noise().convert("P"), "GIF"))
    b[6:10] = struct.pack("<HH", w, h)
    return bytes(b)


def gif_frame_claiming(w: int, h: int) -> bytes:
    """A 4×4 logical screen whose one frame claims w×h."""
    return (b"GIF89a" + struct.pack("<HHBBB", 4, 4, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
            + b"," + struct.pack("<HHHHB", 0, 0, w, h, 0) + b"\x02\x02\x4c\x01\x00;")


def bmp_claiming(w: int, h: int) -> bytes:
    b = bytearray(_encode(_noise(), "BMP"))
    b[18:26] = struct.pack("<ii", w, h)
    return bytes(b)


def webp_claiming(w: int, h: int) -> bytes:
    """An extended (VP8X) WebP whose canvas is w×h around a small lossless frame."""
    frame = _encode(_noise(), "WEBP", lossless=True)[12:]
    vp8x = b"VP8X" + struct.pack("<I", 10) + bytes(4) + (w - 1).to_bytes(3, "little") + (h - 1).to_bytes(3, "little")
    body = b"WEBP" + vp8x + frame
    return b"RIFF" + struct.pack("<I", len(body)) + body


CRAFTED = {  # file name: (bytes, what the refusal must say)
    "png_100000x100000.png": (png_claiming(100_000, 100_000), "100000x100000 pixels"),
    "png_1x10000000.png": (png_claiming(1, 10_000_000), "aspect ratio of 10,000,000:1"),
    "issue_3x50397952.tif": (tiff_claiming(3, 50_397_952), "3x50397952 pixels"),
    "jpeg_65000x65000.jpg": (jpeg_claiming(65_000, 65_000), "65000x65000 pixels"),
    "gif_screen_65535x65535.gif": (gif_screen_claiming(65_535, 65_535), "65535x65535 pixels"),
    "gif_frame_65535x65535.gif": (gif_frame_claiming(65_535, 65_535), "4,294,836,225 pixels"),
    "bmp_100000x100000.bmp": (bmp_claiming(100_000, 100_000), "100000x100000 pixels"),
    "webp_canvas_10000x10000.webp": (webp_claiming(10_000, 10_000), "10000x10000 pixels"),
}

# Runs in a fresh interpreter: loads every crafted file through each path, under an address-space cap of
# 1 GiB above what the imports use, and reports per path the time, the error and the peak RSS growth.
_CHILD = r"""
import json, os, resource, sys, time
from pathlib import Path
from vitkit.data.image_folder import ImageFolder, check_image, load_image
from vitkit.data.image_io import decode_image
from PIL import Image

def vm_bytes():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize"))

if os.path.exists("/proc/self/status"):
    cap = vm_bytes() + 2**30
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
root = Path(sys.argv[1])
folder_ext = (".png", ".jpg", ".bmp", ".webp")
baseline, report = rss(), {}

def attempt(fn):
    # Time fn; what it raised, or the reason it returned (check_image returns one instead of raising).
    t = time.perf_counter()
    try:
        returned = fn()
        reason = returned if isinstance(returned, str) else None
        outcome = {"error": None if reason is None else "reason", "msg": reason}
    except Exception as e:
        outcome = {"error": type(e).__name__, "msg": str(e)}
    outcome["secs"] = time.perf_counter() - t
    return outcome

for path in sorted((root / "files").iterdir()):
    before = rss()  # ru_maxrss is a running peak: growth shows only where a file beats every earlier one
    r = {"load_image": attempt(lambda: load_image(str(path), 3, (224, 224))),
         "check_image": attempt(lambda: check_image(str(path), "header")),
         "check_decode": attempt(lambda: check_image(str(path), "decode")),
         "bytes": attempt(lambda: decode_image(path.read_bytes(), 1, (28, 28), name=path.name))}
    if path.suffix in folder_ext:
        ds = root / ("ds_" + path.stem) / "cls"
        ds.mkdir(parents=True)
        (ds / path.name).write_bytes(path.read_bytes())
        Image.new("RGB", (8, 8)).save(ds / "fine.png")
        r["image_folder"] = attempt(lambda: ImageFolder(ds.parent, 28, max_bad_images=0))
    r["rss_growth_mb"] = (rss() - before) / 2**20
    report[path.name] = r
report["_peak_growth_mb"] = (rss() - baseline) / 2**20
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def crafted_report(tmp_path_factory):
    root = tmp_path_factory.mktemp("crafted")
    (root / "files").mkdir()
    for name, (data, _) in CRAFTED.items():
        (root / "files" / name).write_bytes(data)
    env = {k: v for k, v in os.environ.items() if not k.startswith("VITKIT_MAX_IMAGE")}
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(root)], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", sorted(CRAFTED))
def test_crafted_file_refused_fast_everywhere(crafted_report, name):
    result, must_say = crafted_report[name], CRAFTED[name][1]
    paths = [k for k in result if k != "rss_growth_mb"]
    assert {"load_image", "check_image", "check_decode", "bytes"} <= set(paths)
    for path in paths:
        outcome = result[path]
        assert outcome["secs"] < 1.0, (path, outcome)  # a safety bound, not a benchmark: refusals take ~1 ms
        if path in ("check_image", "check_decode"):  # returns the reason instead of raising
            assert outcome["error"] == "reason" and must_say in outcome["msg"], (path, outcome)
            continue
        assert outcome["error"] in ("BadImageError", "DataError"), (path, outcome)
        assert must_say in outcome["msg"] and name in outcome["msg"], (path, outcome)
        assert "\n" not in outcome["msg"] or path == "image_folder", (path, outcome)
    if "declares" in must_say or "pixels" in must_say:
        assert "set_image_limits" in result["load_image"]["msg"]  # says how to raise the limit
    assert result["rss_growth_mb"] < 100, result


def test_crafted_files_peak_memory_bounded(crafted_report):
    # Everything above ran in one child; the old code grew by gigabytes on the TIFF alone.
    assert crafted_report["_peak_growth_mb"] < 150, crafted_report["_peak_growth_mb"]


def test_empty_sizes_refused():
    with pytest.raises(DataError, match=r"x\.png: cannot load image: it declares an empty image \(0x5 pixels\)"):
        image_io.check_declared_size((0, 5), ImageLimits(), "x.png")
    with pytest.raises(DataError, match=r"zero\.png: cannot load image"):  # Pillow itself refuses this one
        decode_image(png_claiming(0, 5), 3, None, name="zero.png")


def test_crafted_sizes_within_limits_still_decode():
    """The same builders with honest sizes give images: the refusals above are about the sizes only."""
    assert decode_image(tiff_claiming(30, 60), 1, None).shape == (1, 60, 30)
    assert decode_image(png_claiming(8, 8), 3, (4, 4)).shape == (3, 4, 4)
    assert decode_image(bmp_claiming(8, 8), 3, (4, 4)).shape == (3, 4, 4)


# ------------------------------------------------------------------------------------- large JPEGs
def _photo_like(w: int, h: int, seed: int = 0) -> np.ndarray:
    """Smooth gradients, a few discs and mild noise: compresses like a photo, decodes deterministically."""
    rng = np.random.default_rng(seed)
    y, x = np.ogrid[0:h, 0:w]
    img = np.empty((h, w, 3), dtype=np.float32)
    img[..., 0] = 255 * x / w
    img[..., 1] = 255 * y / h
    img[..., 2] = 128 + 100 * np.sin((x + y) / (w / 7))
    for _ in range(6):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(h / 20, h / 5)
        img[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.uniform(0, 255, 3)
    img += rng.standard_normal(img.shape, dtype=np.float32) * 4
    return np.clip(img, 0, 255, out=img).astype(np.uint8)


@pytest.fixture(scope="module")
def big_jpeg() -> bytes:
    # Drawn at 1000x750 and upscaled: a 4000x3000 float canvas would need ~0.5 GB to draw.
    big = Image.fromarray(_photo_like(1000, 750)).resize((4000, 3000), Image.Resampling.BICUBIC)
    return _encode(big, "JPEG", quality=50)


def _reference(data: bytes, num_channels: int, size: tuple[int, int]) -> np.ndarray:
    """The old path: full decode, EXIF transpose, convert, then resize."""
    from PIL import ImageOps

    with Image.open(io.BytesIO(data)) as im:
        full = ImageOps.exif_transpose(im).convert("RGB" if num_channels == 3 else "L")
    return np.asarray(image_io.resize_center_crop(full, size), dtype=np.float32)


def test_large_jpeg_uses_draft_and_matches_full_decode(big_jpeg, monkeypatch):
    seen = []
    original = image_io.resize_center_crop
    monkeypatch.setattr(image_io, "resize_center_crop", lambda im, size: seen.append(im.size) or original(im, size))
    t = time.perf_counter()
    out = decode_image(big_jpeg, 3, (28, 28))
    elapsed = time.perf_counter() - t
    assert out.shape == (3, 28, 28) and out.dtype == torch.uint8
    assert seen == [(500, 375)], seen  # libjpeg decoded at 1/8 scale
    assert elapsed < 1.0, elapsed
    diff = np.abs(out.permute(1, 2, 0).numpy().astype(np.float32) - _reference(big_jpeg, 3, (28, 28)))
    assert diff.mean() < 1.0 and np.percentile(diff, 99) <= 3, (diff.mean(), np.percentile(diff, 99))
    gray = decode_image(big_jpeg, 1, (28, 28))  # drafted straight to luma
    gdiff = np.abs(gray[0].numpy().astype(np.float32) - _reference(big_jpeg, 1, (28, 28)))
    assert gray.shape == (1, 28, 28) and gdiff.mean() < 1.0, gdiff.mean()


def test_draft_and_resize_respect_exif_orientation():
    """Orientation 6 (rotate 90°) with a non-square target: draft and resize are planned in stored coordinates."""
    pixels = _photo_like(1600, 800, seed=3)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _encode(Image.fromarray(pixels), "JPEG", quality=90, exif=exif.tobytes())
    out = decode_image(data, 3, (40, 20))
    assert out.shape == (3, 40, 20)
    diff = np.abs(out.permute(1, 2, 0).numpy().astype(np.float32) - _reference(data, 3, (40, 20)))
    assert diff.mean() < 1.0, diff.mean()
    png = _encode(Image.fromarray(pixels).convert("RGBA"), "PNG", exif=exif.tobytes())  # resized before turned
    out_png = decode_image(png, 3, (40, 20))
    pdiff = np.abs(out_png.permute(1, 2, 0).numpy().astype(np.float32) - _reference(png, 3, (40, 20)))
    assert pdiff.max() <= 1, pdiff.max()


def test_resize_first_keeps_mode_semantics():
    """Alpha goes onto white and 16-bit is scaled, also when the image is resized before it is converted."""
    clear = Image.new("RGBA", (400, 300), (0, 0, 0, 0))
    assert decode_image(_encode(clear, "PNG"), 3, (10, 10)).min() == 255
    deep = Image.fromarray(np.full((300, 400), 65535, dtype=np.uint16))
    assert decode_image(_encode(deep, "PNG"), 1, (10, 10)).min() == 255
    pal = Image.new("P", (400, 300), 1)
    pal.putpalette([0, 0, 0, 0, 0, 255] + [0, 0, 0] * 254)
    assert decode_image(_encode(pal, "PNG"), 3, (10, 10))[:, 5, 5].tolist() == [0, 0, 255]
    assert decode_pil(_encode(clear, "PNG"), 3).size == (400, 300)  # no size: the whole image, as RGB


# ------------------------------------------------------------------------------------------- limits
def _png(w: int = 16, h: int = 16) -> bytes:
    return _encode(Image.new("RGB", (w, h), (1, 2, 3)), "PNG")


def test_limits_configurable_by_api():
    assert image_io.get_image_limits() == ImageLimits()
    assert ImageLimits().max_pixels == 40_000_000 and ImageLimits().max_aspect_ratio == 50
    previous = set_image_limits(max_pixels=100)
    assert previous is None and image_io.get_image_limits().max_pixels == 100
    with pytest.raises(DataError, match=r"small\.png: cannot load image: it declares 16x16 pixels.*limit"):
        decode_image(_png(), 3, (8, 8), name="small.png")
    assert decode_image(_png(), 3, (8, 8), limits=ImageLimits()).shape == (3, 8, 8)  # an explicit argument wins
    set_image_limits(ImageLimits(max_aspect_ratio=1.5))
    with pytest.raises(DataError, match=r"aspect ratio of 2:1"):
        decode_image(_png(32, 16), 3, None)
    set_image_limits(None)
    assert decode_image(_png(32, 16), 3, None).shape == (3, 16, 32)
    with pytest.raises(ConfigError, match="max_pixels"):
        ImageLimits(max_pixels=0)
    with pytest.raises(ConfigError, match="max_aspect_ratio"):
        ImageLimits(max_aspect_ratio=0.5)


def test_limits_configurable_by_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(image_io.ENV_MAX_PIXELS, "100")
    path = tmp_path / "env.png"
    path.write_bytes(_png())
    with pytest.raises(DataError, match=r"env\.png: .*16x16 pixels.*VITKIT_MAX_IMAGE_PIXELS"):
        image_folder.load_image(str(path), 3, (8, 8))
    assert "16x16" in image_folder.check_image(str(path))
    monkeypatch.setenv(image_io.ENV_MAX_PIXELS, "1e3")
    monkeypatch.setenv(image_io.ENV_MAX_ASPECT, "1.5")
    assert image_io.get_image_limits() == ImageLimits(max_pixels=1000, max_aspect_ratio=1.5)
    set_image_limits(max_pixels=10**6)  # the API wins over the environment
    assert image_io.get_image_limits().max_pixels == 10**6
    set_image_limits(None)
    monkeypatch.setenv(image_io.ENV_MAX_PIXELS, "lots")
    with pytest.raises(ConfigError, match="VITKIT_MAX_IMAGE_PIXELS='lots'"):
        image_io.get_image_limits()


def test_datasets_keep_their_limits(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(_png())
    ds = image_folder.ImageFolder(tmp_path, 8, limits=ImageLimits(max_pixels=10_000))
    set_image_limits(max_pixels=100)  # later changes do not reach a built dataset (nor its workers)
    assert ds[0][0].shape == (3, 8, 8)
    with pytest.raises(DataError, match=r"(?s)1 unreadable.*x\.png: it declares 16x16 pixels, more than the limit of "
                                        r"100 pixels"):
        image_folder.ImageFolder(tmp_path, 8)


def test_other_formats_and_sources_refused_clearly(tmp_path):
    ico = _encode(Image.new("RGB", (16, 16)), "ICO")
    with pytest.raises(DataError, match=r"icon\.ico: cannot load image: not a recognised image file.*PNG"):
        decode_image(ico, 3, None, name="icon.ico")
    with pytest.raises(DataError, match=r"<12 bytes>: cannot load image: not a recognised"):
        decode_image(b"hello, world", 3, None)
    with pytest.raises(DataError, match=r"missing\.png: cannot load image: FileNotFoundError"):
        decode_image(tmp_path / "missing.png", 3, None)
    assert decode_image(io.BytesIO(_png()), 1, (4, 4)).shape == (1, 4, 4)  # a file object


# ------------------------------------------------------------------------------ ImageFolder in training
def _folder_with_truncated_jpeg(root: Path) -> Path:
    for cls, names in (("a", ["0.png", "1_cut.jpg", "2.png"]), ("b", ["3.png"])):
        (root / cls).mkdir(parents=True)
        for i, name in enumerate(names):
            if name.endswith(".png"):
                Image.new("L", (12, 12), 40 * (i + 1) + 100 * (cls == "b")).save(root / cls / name)
    full = _encode(Image.fromarray(_photo_like(64, 64, seed=1)), "JPEG", quality=90)
    (root / "a" / "1_cut.jpg").write_bytes(full[: len(full) // 2])
    return root


def test_truncated_jpeg_header_vs_decode_check(tmp_path):
    root = _folder_with_truncated_jpeg(tmp_path / "imgs")
    assert len(image_folder.ImageFolder(root, 8, check="header")) == 4  # the header is fine
    assert len(image_folder.ImageFolder(root, 8, check="verify")) == 4  # the old name still works
    with pytest.raises(DataError, match=r"(?s)1 unreadable.*1_cut\.jpg: decoding failed"):
        image_folder.ImageFolder(root, 8, check="decode")
    with pytest.warns(D.BadImageWarning, match=r"1_cut\.jpg"):
        ds = image_folder.ImageFolder(root, 8, check="decode", max_bad_images=1)
    assert len(ds) == 3
    with pytest.raises(DataError, match="check must be 'header' or 'decode'"):
        image_folder.ImageFolder(root, 8, check="deep")
    assert D.build_dataset("image_folder", "train", root=str(root), image_size=8, check="header") is not None


def test_decode_failure_in_training_is_skipped_and_counted(tmp_path):
    root = _folder_with_truncated_jpeg(tmp_path / "imgs")
    ds = image_folder.ImageFolder(root, 8, num_channels=1, max_bad_images=1)
    cut = next(i for i, (p, _) in enumerate(ds.samples) if p.endswith("1_cut.jpg"))
    with pytest.warns(D.BadImageWarning, match=r"1_cut\.jpg: cannot load image: decoding failed.*max_bad_images=1"):
        img, label = ds[cut]
    assert torch.equal(img, ds[cut + 1][0]) and label == ds.samples[cut + 1][1]  # the next one, deterministic
    assert [Path(p).name for p, _ in ds.bad_images] == ["1_cut.jpg"] and "decoding failed" in ds.bad_images[0][1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # known now: skipped without decoding or warning again
        assert torch.equal(ds[cut][0], img)
        batches = list(DataLoader(ds, batch_size=4, collate_fn=D.batch_collate))
    assert batches[0].images.shape == (4, 1, 8, 8)
    last = image_folder.ImageFolder(root, 8, max_bad_images=1)
    last.samples = last.samples[1:2] + last.samples[:1]  # the bad file last: the replacement wraps around
    with pytest.warns(D.BadImageWarning):
        assert torch.equal(last[0][0], last[1][0])

    strict = image_folder.ImageFolder(root, 8, max_bad_images=0)
    with pytest.raises(DataError, match=r"1_cut\.jpg: cannot load image: .*1 unreadable image files.*max_bad_images=0"):
        strict[cut]


def test_decode_failure_in_dataloader_worker(tmp_path, monkeypatch):
    """Each worker counts on its own copy of the dataset (as documented), and its messages say so."""
    root = _folder_with_truncated_jpeg(tmp_path / "imgs")
    ds = image_folder.ImageFolder(root, 8, num_channels=1, max_bad_images=1)
    batches = list(D.make_loader(ds, 4, num_workers=1))
    assert [b.images.shape for b in batches] == [(4, 1, 8, 8)] and ds.bad_images == []
    # In a worker (simulated here: after a worker raises, the DataLoader takes 5 s to shut down).
    monkeypatch.setattr(image_folder, "get_worker_info", lambda: type("Info", (), {"id": 3})())
    strict = image_folder.ImageFolder(root, 8, max_bad_images=0)
    with pytest.raises(DataError, match=r"1_cut\.jpg: cannot load image.*max_bad_images=0 \(counted in DataLoader "
                                        r"worker 3; each worker counts its own\)"):
        strict[1]


def test_subset_has_its_own_bad_list(tmp_path):
    root = _folder_with_truncated_jpeg(tmp_path / "imgs")
    ds = image_folder.ImageFolder(root, 8, max_bad_images=1)
    sub = ds.subset(1.0)
    with pytest.warns(D.BadImageWarning):
        list(sub)
    assert len(sub.bad_images) == 1 and ds.bad_images == []


# -------------------------------------------------------------------------------------------------- fuzz
def _fuzz_bases() -> dict[str, bytes]:
    rgb = Image.fromarray(_photo_like(24, 20, seed=7))
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((24, 20)))
    bases = {
        "png": _encode(rgb, "PNG"),
        "png_rgba": _encode(rgba, "PNG"),
        "png_palette": _encode(rgb.convert("P"), "PNG", transparency=0),
        "jpeg": _encode(rgb, "JPEG", quality=80),
        "jpeg_progressive": _encode(rgb, "JPEG", quality=80, progressive=True),
        "gif": _encode(rgb.convert("P"), "GIF"),
        "tiff": _encode(rgb, "TIFF"),
        "tiff_deflate": _encode(rgb, "TIFF", compression="tiff_adobe_deflate"),
        "bmp": _encode(rgb, "BMP"),
        "webp": _encode(rgb, "WEBP", quality=80),
        "webp_lossless": _encode(rgba, "WEBP", lossless=True),
    }
    for name, data in bases.items():  # every base itself decodes
        assert decode_image(data, 3, (8, 8)).shape == (3, 8, 8), name
    return bases


_HUGE = (0xFFFF, 0xFFFFFFFF, 0x7FFFFFFF, 0x10000, 0xFFFE, 65000, 50_397_952, 0)
_SIDES = (0, 1, 2, 3, 50, 999, 4000, 6000, 6324, 7000, 30000, 65535, 100_000, 2**31 - 1)


def _size_field(data: bytes) -> tuple[int, str] | None:
    """Where a base file stores its width and height, and how (offset, struct format)."""
    if data[12:16] == b"IHDR":
        return 16, ">II"
    if data[:3] == b"GIF":
        return 6, "<HH"
    if data[:2] == b"BM":
        return 18, "<ii"
    if data[:2] == b"\xff\xd8":
        return _jpeg_sof(data) + 5, ">HH"  # height first
    return None


def _mutate(data: bytes, rng: np.random.Generator) -> bytes:
    b = bytearray(data)
    kind = rng.integers(5)
    field = _size_field(data)
    if kind == 4 and field is not None:  # a plausible, huge or absurd size where the file keeps its size
        offset, fmt = field
        limit = 2**16 - 1 if fmt[1] == "H" else 2**31 - 1
        w, h = (min(int(rng.choice(_SIDES)), limit) for _ in range(2))
        b[offset : offset + struct.calcsize(fmt)] = struct.pack(fmt, w, h)
        if b[12:16] == b"IHDR":
            b[29:33] = struct.pack(">I", zlib.crc32(bytes(b[12:29])))
    elif kind == 0:  # flip a few bytes anywhere
        for pos in rng.integers(0, len(b), rng.integers(1, 9)):
            b[pos] ^= int(rng.integers(1, 256))
    elif kind == 1:  # truncate
        b = b[: int(rng.integers(0, len(b)))]
    else:  # a huge or random number over a 2- or 4-byte field where headers live
        width = int(rng.choice([2, 4]))
        pos = int(rng.integers(0, min(len(b), 64 if kind == 2 else 200) - width))
        value = int(rng.choice(_HUGE)) if rng.random() < 0.7 else int(rng.integers(0, 2**31))
        b[pos : pos + width] = (value & (2 ** (8 * width) - 1)).to_bytes(width, str(rng.choice(["big", "little"])))
        if rng.random() < 0.3 and b[12:16] == b"IHDR":  # fix the PNG checksum so the size itself is tried
            b[29:33] = struct.pack(">I", zlib.crc32(bytes(b[12:29])))
    return bytes(b)


def test_fuzzed_images_give_a_tensor_or_a_data_error():
    bases, rng = _fuzz_bases(), np.random.default_rng(12)
    # 4 MP instead of 40: the same code paths, but a mutated header that claims a size under the limit makes
    # Pillow allocate and fail at 16 MB instead of 160 MB, which keeps 2,000 cases within seconds.
    counts: dict[str, int] = {}
    slowest = (0.0, "")
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns about some broken files (EXIF, MPO, truncated reads)
        for name, data in bases.items():
            for case in range(182):
                mutated = _mutate(data, rng)
                num_channels = 1 if case % 2 else 3
                size = None if case % 5 == 0 else (8, 12)
                t = time.perf_counter()
                try:
                    out = decode_image(mutated, num_channels, size)
                except BadImageError as e:
                    outcome = "refused" if e.reason.startswith("it declares") else re.split(r" \(|;", e.reason)[0]
                except Exception as e:  # anything else is the bug this test looks for
                    raise AssertionError(f"{name} case {case}: {type(e).__name__}: {e}") from e
                else:
                    assert out.dtype == torch.uint8 and out.dim() == 3 and out.shape[0] == num_channels
                    assert size is None or tuple(out.shape[1:]) == size
                    outcome = "decoded"
                counts[outcome] = counts.get(outcome, 0) + 1
                slowest = max(slowest, (time.perf_counter() - t, f"{name} case {case}"))
    total = sum(counts.values())
    summary = f"{total} cases in {time.perf_counter() - t0:.1f} s: {dict(sorted(counts.items()))}; slowest {slowest}"
    print(summary)
    assert total == 2002 and counts.get("decoded", 0) > 100 and counts.get("refused", 0) > 20, summary
    assert slowest[0] < 5.0, summary  # no hang: the slowest are headers claiming ~40 MP of missing data
