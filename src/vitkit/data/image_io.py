"""The one place vitkit opens and decodes image files or bytes, with limits checked before any decoding.

A small file can declare a huge image: a 2 KB TIFF that claims 3×50,397,952 pixels made ``vitkit predict``
use 5.6 GB and 24 s, because the image was decoded and converted at full size before it was resized.
Here every image goes through the same steps:

1. :func:`open_image` identifies the file (only the formats in ``ImageLimits.formats``) and reads its
   header, then refuses it *before any pixel is decoded* when the declared size is empty, has more
   than ``max_pixels`` pixels, or a longer side more than ``max_aspect_ratio`` times the shorter one.
2. :func:`decode_pil` / :func:`decode_image` decode large JPEGs at a reduced scale (``draft``), resize
   and center-crop while the image still has its stored mode and orientation (no full-size converted
   or rotated copy is ever made), then apply the EXIF orientation and convert to "L"/"RGB" on the small
   result. Palette, bilevel and 16-bit images, which cannot be resampled as they are, are converted first.

Every failure is a :class:`BadImageError` (a :class:`~vitkit.errors.DataError`) with one line naming the
file and the reason; Pillow's many exception types (OSError, SyntaxError, ValueError, struct.error,
DecompressionBombError, MemoryError, ...) never reach the caller.

Limits, in order of precedence: the ``limits`` argument; :func:`set_image_limits` (this process, and
DataLoader workers forked after it); the environment variables ``VITKIT_MAX_IMAGE_PIXELS`` and
``VITKIT_MAX_IMAGE_ASPECT`` (read on every call, so they also reach spawned workers); the defaults.

Only the first frame of a multi-frame file (animated GIF/WebP/PNG, multi-page TIFF, MPO) is ever
decoded, and its declared size is what is checked (Pillow folds a GIF frame that extends beyond the
logical screen into the declared size). Other frames are never seeked to: seeking a GIF decodes.
"""

from __future__ import annotations

import importlib
import io
import math
import os
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import IO, TYPE_CHECKING, Any, TypeVar, Union

import numpy as np
from PIL import Image, ImageFile

from vitkit.data.base import as_size
from vitkit.errors import ConfigError, DataError

if TYPE_CHECKING:
    import torch

# 40 MP: above what phones (12-24 MP, 48-50 MP only in "high-res" modes) and most cameras write, below half
# of Pillow's own warning threshold (89.5 MP; it refuses only at 179 MP). Decoded, 40 MP is 120 MB in RGB and
# 160 MB in RGBA or 16-bit, so one decode stays well under 1 GB even with its temporary copies, per process
# (DataLoader workers decode in parallel). Genuine larger files: raise it (see set_image_limits).
DEFAULT_MAX_PIXELS = 40_000_000
# 50:1 leaves room for banners (8:1) and stitched panoramas (10-30:1); a 1×10,000,000 "image" is not a photo.
DEFAULT_MAX_ASPECT_RATIO = 50.0
# Formats vitkit decodes. Fewer formats is less parser surface for hostile files, and ICO/ICNS/EPS are left
# out on purpose: they open nested images (or run Ghostscript) past the checks made here. MPO (phone JPEGs
# with a second picture) comes through the JPEG opener.
DEFAULT_FORMATS = ("BMP", "GIF", "JPEG", "PNG", "PPM", "TIFF", "WEBP")
# What vitkit writes images as (sample grids), by the destination's extension: formats every Pillow build writes
# for "L" and "RGB" pixels. Checked before the work that makes the image (image_write_format).
WRITE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
ENV_MAX_PIXELS = "VITKIT_MAX_IMAGE_PIXELS"
ENV_MAX_ASPECT = "VITKIT_MAX_IMAGE_ASPECT"

# Large JPEGs are decoded at 1/2, 1/4 or 1/8 scale while that leaves at least this many times the crop's size:
# libjpeg's scaled DCT is a good filter, and at 2 (as Pillow's thumbnail) the result is the full decode's
# within rounding (a 4000x3000 photo to 28x28: 0.03 levels on average).
_DRAFT_GAP = 2.0
# Modes that are resized before they are converted to "L"/"RGB": resizing commutes with those conversions
# (RGBA is resized premultiplied, so compositing onto white afterwards is the same). Palette and bilevel
# images cannot be resampled, and 16-bit/float scaling depends on the whole image: those convert first.
_RESIZE_FIRST_MODES = frozenset({"L", "LA", "RGB", "RGBA", "RGBX"})
_TRANSPOSE = {  # EXIF orientation → the transpose that shows the image upright (as ImageOps.exif_transpose)
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

ImageSource = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, IO[bytes]]
T = TypeVar("T")


class BadImageError(DataError):
    """An image file or byte string was refused or could not be decoded.

    ``str(error)`` is one line, ``"<source>: cannot load image: <reason>"``; ``source`` and ``reason`` are
    also attributes. The message alone is enough to rebuild it (DataLoader workers re-raise that way).
    """

    def __init__(self, message: str, *, source: str = "", reason: str = "") -> None:
        super().__init__(message)
        self.source = source
        self.reason = reason or message

    @classmethod
    def of(cls, source: str, reason: str) -> BadImageError:
        reason = " ".join(reason.split())  # one line, whatever Pillow put in its message
        return cls(f"{source}: cannot load image: {reason}", source=source, reason=reason)


@dataclass(frozen=True)
class ImageLimits:
    """What an image file may declare before vitkit decodes it.

    Args:
        max_pixels: width × height of the (first) frame; None for no limit of vitkit's own.
        max_aspect_ratio: longer side / shorter side; None for no limit.
        formats: Pillow format names that are opened at all (see ``DEFAULT_FORMATS``).
    """

    max_pixels: int | None = DEFAULT_MAX_PIXELS
    max_aspect_ratio: float | None = DEFAULT_MAX_ASPECT_RATIO
    formats: tuple[str, ...] = field(default=DEFAULT_FORMATS)

    def __post_init__(self) -> None:
        mp, ar = self.max_pixels, self.max_aspect_ratio
        if mp is not None and (isinstance(mp, bool) or not isinstance(mp, int) or mp < 1):
            raise ConfigError(f"max_pixels must be a positive integer or None, got {mp!r}")
        if ar is not None and (isinstance(ar, bool) or not isinstance(ar, (int, float)) or not ar >= 1
                               or math.isinf(ar)):
            raise ConfigError(f"max_aspect_ratio must be a finite number >= 1 or None, got {ar!r}")
        if isinstance(self.formats, str) or not self.formats:
            raise ConfigError(f"formats must be a non-empty tuple of Pillow format names, got {self.formats!r}")
        object.__setattr__(self, "formats", tuple(str(f).upper() for f in self.formats))


_override: ImageLimits | None = None


def _env_number(name: str, kind: Callable[[str], Any], default: Any) -> Any:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        value = None
    if value is None or not value >= 1 or (isinstance(value, float) and math.isinf(value)):
        raise ConfigError(f"environment variable {name}={raw!r}: expected a number >= 1")
    return value


def _int_like(raw: str) -> int:
    """``40000000``, ``40_000_000`` or ``4e7``."""
    try:
        return int(raw)
    except ValueError:
        value = float(raw)
        if not value.is_integer():
            raise ValueError(raw) from None
        return int(value)


def get_image_limits() -> ImageLimits:
    """The limits in force: :func:`set_image_limits`'s, else the environment variables', else the defaults."""
    if _override is not None:
        return _override
    return ImageLimits(
        max_pixels=_env_number(ENV_MAX_PIXELS, _int_like, DEFAULT_MAX_PIXELS),
        max_aspect_ratio=_env_number(ENV_MAX_ASPECT, float, DEFAULT_MAX_ASPECT_RATIO),
    )


def set_image_limits(limits: ImageLimits | None = None, **changes: Any) -> ImageLimits | None:
    """Set this process's limits; returns the previous setting (None: environment/defaults), to restore it.

    ``set_image_limits(max_pixels=100_000_000)`` changes one field of the limits in force;
    ``set_image_limits(ImageLimits(...))`` sets all of them; ``set_image_limits(None)`` goes back to the
    environment variables and defaults. Datasets keep the limits they were built with.
    """
    global _override
    previous = _override
    if changes:
        _override = replace(limits or get_image_limits(), **changes)
    else:
        _override = limits
    return previous


# ----------------------------------------------------------------------------------------- opening
def _source_name(src: Any, name: str | None) -> str:
    if name:
        return name
    if isinstance(src, (str, os.PathLike)):
        return os.fspath(src)  # type: ignore[return-value]
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"<{len(src)} bytes>"
    return str(getattr(src, "name", None) or f"<{type(src).__name__}>")


def _binary_file(src: Any, label: str) -> tuple[IO[bytes], str, bool]:
    """(file object, file name for Pillow, whether we opened it and must close it)."""
    if isinstance(src, (str, os.PathLike)):
        path = os.fspath(src)
        try:
            return open(path, "rb"), str(path), True  # noqa: SIM115 - closed by the image, like Image.open
        except OSError as e:
            raise BadImageError.of(label, f"{type(e).__name__}: {e.strerror or e}") from e
    if isinstance(src, (bytes, bytearray, memoryview)):
        return io.BytesIO(bytes(src)), "", True
    if not hasattr(src, "read"):
        raise DataError(f"cannot read an image from a {type(src).__name__} (give a path, bytes or a binary file)")
    try:
        src.seek(0)
        return src, "", False
    except (AttributeError, OSError, io.UnsupportedOperation):
        return io.BytesIO(src.read()), "", True


_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")


def _amount(pixels: int) -> str:
    """``151.2 MP``, ``40 MP`` or ``256 pixels``."""
    if pixels < 100_000:
        return f"{pixels:,} pixels"
    return f"{pixels / 1e6:,.1f}".removesuffix(".0") + " MP"


def _pixels_reason(declared: str, pixels: int, limits: ImageLimits) -> str:
    limit = limits.max_pixels
    if limit is None or pixels <= limit:  # only Pillow's own limit was passed: ours was raised above it
        return (f"it declares {declared}, more than Pillow's own limit of {_amount(2 * (Image.MAX_IMAGE_PIXELS or 0))}"
                f"; raise PIL.Image.MAX_IMAGE_PIXELS too if the file is genuine")
    return (f"it declares {declared}, more than the limit of {_amount(limit)}; if the file is genuine, raise the "
            f"limit with {ENV_MAX_PIXELS}=<pixels> or vitkit.data.image_io.set_image_limits(max_pixels=...)")


def check_declared_size(size: tuple[int, int], limits: ImageLimits, source: str = "image") -> None:
    """Raise :class:`BadImageError` if an image of ``size`` (w, h) is empty or beyond ``limits``."""
    w, h = size
    if w < 1 or h < 1:
        raise BadImageError.of(source, f"it declares an empty image ({w}x{h} pixels)")
    if limits.max_pixels is not None and w * h > limits.max_pixels:
        declared = f"{w}x{h} pixels" + (f" ({_amount(w * h)})" if w * h >= 100_000 else "")
        raise BadImageError.of(source, _pixels_reason(declared, w * h, limits))
    ar = limits.max_aspect_ratio
    if ar is not None and max(w, h) > ar * min(w, h):
        raise BadImageError.of(
            source,
            f"it declares {w}x{h} pixels, an aspect ratio of {max(w, h) / min(w, h):,.0f}:1, more than the limit "
            f"of {ar:g}:1; if the file is genuine, raise the limit with {ENV_MAX_ASPECT}=<ratio> or "
            f"vitkit.data.image_io.set_image_limits(max_aspect_ratio=...)",
        )


def _webp_size(head: bytes) -> tuple[int, int] | None:
    """Canvas size from a WebP header. Pillow's WebP opener allocates the canvas, so check it before."""
    if len(head) < 30 or head[:4] != b"RIFF" or head[8:12] != b"WEBP":
        return None
    chunk = head[12:16]
    if chunk == b"VP8X":
        return 1 + int.from_bytes(head[24:27], "little"), 1 + int.from_bytes(head[27:30], "little")
    if chunk == b"VP8L" and head[20] == 0x2F:
        bits = int.from_bytes(head[21:25], "little")
        return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    if chunk == b"VP8 " and head[23:26] == b"\x9d\x01\x2a":
        return int.from_bytes(head[26:28], "little") & 0x3FFF, int.from_bytes(head[28:30], "little") & 0x3FFF
    return None


def _load_plugin(fmt: str) -> None:
    """Import the Pillow plugin that registers ``fmt`` (Image.init() would import all ~40 of them)."""
    module = {"BMP": "Bmp", "GIF": "Gif", "JPEG": "Jpeg", "PNG": "Png", "PPM": "Ppm", "TIFF": "Tiff", "WEBP": "WebP"}
    try:
        importlib.import_module(f"PIL.{module[fmt]}ImagePlugin")
    except (KeyError, ImportError):
        Image.init()


def _identify(fp: IO[bytes], filename: str, label: str, limits: ImageLimits) -> ImageFile.ImageFile:
    """What ``Image.open(fp, formats=limits.formats)`` does, minus its decompression-bomb check.

    Pillow's check (a warning above 89.5 MP, an error above 179 MP, with its own message) would run before
    ours and mask it; setting ``Image.MAX_IMAGE_PIXELS`` aside instead would change it for the whole process
    and every thread. The plugins' own checks (GIF frames, WebP, MPO) stay: their errors are translated.
    """
    head = fp.read(32)
    tried: list[str] = []
    for fmt in limits.formats:
        if fmt not in Image.OPEN:
            _load_plugin(fmt)
        entry = Image.OPEN.get(fmt)
        if entry is None:  # not built into this Pillow (e.g. WebP without libwebp)
            continue
        factory, accept = entry
        accepted = accept(head[:16]) if accept else True
        if not accepted or isinstance(accepted, str):
            continue
        if fmt == "WEBP" and (size := _webp_size(head)) is not None:
            check_declared_size(size, limits, label)
        fp.seek(0)
        try:
            return factory(fp, filename)
        except (SyntaxError, IndexError, TypeError, struct.error) as e:  # Image.open tries the next format
            tried.append(f"{fmt}: {e}")
        except Image.DecompressionBombError as e:
            found = _BOMB_PIXELS.search(str(e))
            pixels = int(found.group(1)) if found else 0
            declared = f"{pixels:,} pixels ({_amount(pixels)})" if found else "more pixels than Pillow allows"
            raise BadImageError.of(label, _pixels_reason(declared, pixels, limits)) from e
    detail = f" ({'; '.join(tried)})" if tried else ""
    raise BadImageError.of(
        label, f"not a recognised image file{detail}; vitkit reads {', '.join(limits.formats)} files"
    )


def open_image(src: ImageSource, limits: ImageLimits | None = None, *, name: str | None = None) -> Image.Image:
    """Open ``src`` (a path, bytes or a binary file) lazily and check what it declares; nothing is decoded.

    Returns Pillow's image object; use it as a context manager (``with open_image(p) as im:``) so that a
    file opened here is closed. ``name`` is how errors refer to ``src`` (default: the path, or "<N bytes>").
    Raises :class:`BadImageError` for unreadable headers and for images beyond ``limits``
    (default: :func:`get_image_limits`).
    """
    limits = limits or get_image_limits()
    label = _source_name(src, name)
    fp, filename, exclusive = _binary_file(src, label)
    try:
        im = _identify(fp, filename, label, limits)
        check_declared_size(im.size, limits, label)
    except BadImageError:
        if exclusive:
            fp.close()
        raise
    except Exception as e:  # Pillow raises many types while parsing a header
        if exclusive:
            fp.close()
        raise BadImageError.of(label, f"unreadable header ({type(e).__name__}: {e})") from e
    im._exclusive_fp = exclusive  # the image closes the file we opened, as with Image.open
    return im


# ----------------------------------------------------------------------------------- mode and size
def _on_white(im: Image.Image) -> Image.Image:
    """Composite an image with transparency onto white.

    Plain ``convert("RGB")`` would expose whatever colour the transparent pixels happen to store
    (often black), while logos, icons and product shots with alpha are meant to be seen on white.
    """
    rgba = im.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _high_depth_to_8bit(im: Image.Image) -> Image.Image:
    """16-bit / int / float gray images: Pillow's ``convert("L")`` clips instead of scaling, so scale here."""
    arr = np.asarray(im)
    out = arr.astype(np.float32)  # float32 (not float64): a 40 MP image needs 160 MB here, not 320 MB
    if im.mode == "F":
        if float(arr.max(initial=0.0)) <= 1.0:
            out *= 255.0
    elif im.mode.startswith("I;16") or float(arr.max(initial=0)) > 255:
        out /= 257.0  # 0..65535 → 0..255
    np.rint(out, out=out)
    np.clip(out, 0, 255, out=out)
    return Image.fromarray(out.astype(np.uint8), mode="L")


def to_mode(im: Image.Image, num_channels: int) -> Image.Image:
    """Convert any Pillow mode to "L" (1 channel) or "RGB" (3 channels).

    Transparency (RGBA, LA, PA, palette with a transparent colour) is composited onto white;
    CMYK/YCbCr/LAB/HSV use Pillow's own conversions; 16-bit gray is scaled, not clipped.
    """
    target = {1: "L", 3: "RGB"}.get(num_channels)
    if target is None:
        raise DataError(f"num_channels must be 1 or 3, got {num_channels}")
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        im = _high_depth_to_8bit(im)
    has_alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info)
    if has_alpha:
        im = _on_white(im)
    elif im.mode not in ("1", "L", "P", "RGB"):
        im = im.convert("RGB")  # CMYK, YCbCr, LAB, HSV: not every pair has a direct conversion to "L"
    return im if im.mode == target else im.convert(target)


def resize_center_crop(im: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Shorter-side resize then center crop to ``size`` (h, w), done as one bicubic resize of the crop box.

    Cropping the central box with the target aspect ratio first and resizing it is the same result as
    resize-then-crop, but resamples fewer pixels. Pillow's bicubic filter antialiases when shrinking.
    """
    th, tw = size
    w, h = im.size
    if (w, h) == (tw, th):
        return im
    return im.resize((tw, th), Image.Resampling.BICUBIC, box=center_crop_box((w, h), (th, tw)))


def center_crop_box(image_wh: tuple[int, int], size: tuple[int, int]) -> tuple[float, float, float, float]:
    """The (left, top, right, bottom) box of ``image_wh`` = (w, h) with the aspect ratio of ``size`` = (h, w),
    centred and as large as fits.

    The side that limits the box is chosen by comparing integers (``th * w`` against ``tw * h``) and kept whole,
    so it is exactly ``0 .. w`` or ``0 .. h``; only the other side is a fraction, and it is clamped into the
    image. Computed through a float scale (``tw / (tw / w)``), the whole side came out a hair above ``w`` for
    1.8% of ordinary sizes (196x219 to 32x32, 264x221 to 28x28), its offset a hair below zero, and Pillow
    refused the box ("box offset can't be negative").
    """
    w, h = image_wh
    th, tw = size
    if th * w >= tw * h:  # the crop is as tall as the image (its width: h * tw / th <= w)
        crop_w = min(float(w), h * tw / th)
        left = max(0.0, (w - crop_w) / 2)
        return left, 0.0, min(float(w), left + crop_w), float(h)
    crop_h = min(float(h), w * th / tw)  # as wide as the image
    top = max(0.0, (h - crop_h) / 2)
    return 0.0, top, float(w), min(float(h), top + crop_h)


def image_write_format(path: str | os.PathLike[str], what: str = "output") -> str:
    """The Pillow format an image written to ``path`` gets, from its extension (``WRITE_FORMATS``); a ConfigError
    naming ``what`` for any other extension or a path that is a folder, so a caller can check before its work."""
    ext = os.path.splitext(os.fspath(path))[1].lower()
    if ext not in WRITE_FORMATS:
        raise ConfigError(f"{what} {os.fspath(path)!r}: the file name must end in one of "
                          f"{', '.join(WRITE_FORMATS)} (got {ext or 'no extension'})")
    if os.path.isdir(path):
        raise ConfigError(f"{what} {os.fspath(path)!r} is a folder; give the image file to write")
    return WRITE_FORMATS[ext]


def _stored_size(size: tuple[int, int], orientation: int | None) -> tuple[int, int]:
    """Target (h, w) in the file's stored orientation: EXIF orientations 5-8 swap width and height.

    A center crop and resize commutes with the flips and quarter turns of EXIF orientation, so resizing the
    stored image and then turning the small result gives the same pixels as turning the whole image first.
    """
    return (size[1], size[0]) if orientation in (5, 6, 7, 8) else size


def _orientation(im: Image.Image) -> int | None:
    try:
        value = im.getexif().get(0x0112)
    except Exception:  # a broken EXIF block does not make the pixels unusable: keep the stored orientation
        return None
    return value if isinstance(value, int) and value in _TRANSPOSE else None


def _decode(src: ImageSource, num_channels: int, size: int | tuple[int, int] | None, limits: ImageLimits | None,
            name: str | None, finish: Callable[[Image.Image, Image.Image], T]) -> T:
    if num_channels not in (1, 3):
        raise DataError(f"num_channels must be 1 or 3, got {num_channels}")
    size = as_size(size)
    label = _source_name(src, name)
    with open_image(src, limits, name=label) as opened:
        try:
            im: Image.Image = opened
            jpeg = opened.format in ("JPEG", "MPO")
            orientation = _orientation(opened) if jpeg else None  # JPEG's EXIF is parsed with the header
            if size is not None and jpeg:
                th, tw = _stored_size(size, orientation)
                request = (math.ceil(tw * _DRAFT_GAP), math.ceil(th * _DRAFT_GAP))
                if min(opened.size[0] // request[0], opened.size[1] // request[1]) >= 2:
                    # libjpeg decodes at 1/2, 1/4 or 1/8 scale: a fraction of the time and memory
                    opened.draft("L" if num_channels == 1 and opened.mode == "RGB" else opened.mode, request)
            opened.load()
            if not jpeg:
                orientation = _orientation(opened)  # PNG may keep its EXIF after the pixel data
            if size is not None:
                if im.mode not in _RESIZE_FIRST_MODES:
                    im = to_mode(im, num_channels)
                im = resize_center_crop(im, _stored_size(size, orientation))  # before any full-size copy
            if orientation is not None:
                im = im.transpose(_TRANSPOSE[orientation])
            im = to_mode(im, num_channels)
            return finish(im, opened)
        except DataError:
            raise
        except Exception as e:  # Pillow's decoders raise OSError, ValueError, SyntaxError, MemoryError, ...
            raise BadImageError.of(label, f"decoding failed ({type(e).__name__}: {e})") from e


def _detach(im: Image.Image, opened: Image.Image) -> Image.Image:
    return im.copy() if im is opened else im  # the opened image is closed on return


def _to_tensor(im: Image.Image, opened: Image.Image) -> torch.Tensor:
    import torch

    t = torch.from_numpy(np.array(im, dtype=np.uint8))
    return t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1).contiguous()


def decode_pil(src: ImageSource, num_channels: int, size: int | tuple[int, int] | None = None,
               limits: ImageLimits | None = None, *, name: str | None = None) -> Image.Image:
    """Decode ``src`` to an "L" (1 channel) or "RGB" (3 channels) Pillow image, shorter-side resized and
    center-cropped to ``size`` (h, w) if given, EXIF orientation applied. Raises :class:`BadImageError`."""
    return _decode(src, num_channels, size, limits, name, _detach)


def decode_image(src: ImageSource, num_channels: int, size: int | tuple[int, int] | None = None,
                 limits: ImageLimits | None = None, *, name: str | None = None) -> torch.Tensor:
    """:func:`decode_pil` as a uint8 C×H×W tensor."""
    return _decode(src, num_channels, size, limits, name, _to_tensor)


def check_image_source(src: ImageSource, mode: str = "header", *, num_channels: int | None = None,
                       size: tuple[int, int] | None = None, limits: ImageLimits | None = None,
                       name: str | None = None) -> None:
    """Raise :class:`BadImageError` unless ``src`` passes ``mode``'s check.

    "header": the declared size against ``limits`` and Pillow's ``verify()`` (PNG chunk checksums), without
    decoding. "decode": also decodes; with ``num_channels`` it runs exactly what training does
    (:func:`decode_image` to ``size``), so it finds truncated JPEG/WebP data before the first step.
    """
    if mode not in ("header", "decode"):
        raise DataError(f"check must be 'header' or 'decode', got {mode!r}")
    if mode == "decode" and num_channels is not None:
        decode_image(src, num_channels, size, limits, name=name)
        return
    label = _source_name(src, name)
    with open_image(src, limits, name=label) as im:
        try:
            if mode == "decode":
                im.load()
            else:
                im.verify()
        except Exception as e:
            raise BadImageError.of(label, f"{'decoding' if mode == 'decode' else 'check'} failed "
                                          f"({type(e).__name__}: {e})") from e


__all__ = [
    "DEFAULT_FORMATS",
    "DEFAULT_MAX_ASPECT_RATIO",
    "DEFAULT_MAX_PIXELS",
    "ENV_MAX_ASPECT",
    "ENV_MAX_PIXELS",
    "WRITE_FORMATS",
    "BadImageError",
    "ImageLimits",
    "center_crop_box",
    "check_declared_size",
    "check_image_source",
    "decode_image",
    "decode_pil",
    "get_image_limits",
    "image_write_format",
    "open_image",
    "resize_center_crop",
    "set_image_limits",
    "to_mode",
]
