"""One image's decoding and preprocessing: bytes -> (3, H, W) uint8 at the model's input size.

:mod:`service.pipeline` runs this for every item of a batch (training, export, scoring and serving
all decode through it).

Every step is driven by the model card's ``input`` section, so training and serving cannot drift:
decode -> apply EXIF orientation -> convert to 8-bit RGB -> resize the shorter side to the card's
size (bilinear, antialiased) -> centre crop -> scale to [0, 1] -> normalise with the card's mean/std.

Bounded work per image (docs/RELIABILITY.md): the header is read before any pixel is decoded and an
image over ``max_pixels`` is refused (``image_too_large``); past a 4:1 aspect ratio the resize reads only the
source region that the centre crop keeps (``Image.resize(box=...)``), so the resized image is never
larger than 4 times the model's input (a 40,000x1 PNG costs what its 40,000 pixels do, not the
1.1 GB of its resized 3,840,000x96 version), and a side over ``MAX_SIDE`` is refused; conversions never hold more than two full-size copies; a JPEG far larger than the model
input is decoded at a reduced DCT scale (``Image.draft``) that keeps at least ``DRAFT_MARGIN`` times
the resized size. Peak memory per image is therefore at most ``max_decode_bytes(max_pixels)``, and
the decodes that share a :class:`DecodeBudget` (the service's threads in one worker) hold at most
its ``total`` together.
"""

from __future__ import annotations

import io
import struct
import threading
import warnings
import zlib
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np
from PIL import Image, ImageOps

if TYPE_CHECKING:
    from service.card import InputSpec

# Formats we decode. Anything else Pillow might open (EPS, ICO, PSD, ...) is rejected: a smaller
# attack surface for user uploads. Animated GIF/WebP are scored on their first frame.
ACCEPTED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "TIFF", "BMP")

# Pillow's own guard is a warning at 89 Mpx and an error at 2x that. We set our own limit and make
# both cases an error, so a decompression bomb is refused before its pixels are allocated.
DEFAULT_MAX_PIXELS = 40_000_000

# The longest side accepted (the JPEG and GIF format maximum). Pillow keeps a pointer per image row,
# so a 1-pixel-wide image costs ~24 bytes a row over its pixels across the decode: capping the side
# keeps that inside DECODE_FIXED_BYTES. A 1,000,000x1 or 1x1,000,000 PNG is refused from its header.
MAX_SIDE = 65_535

# A JPEG at least 2 * DRAFT_MARGIN times the resized size (before the crop) on both sides is decoded
# at 1/2, 1/4 or 1/8 scale by libjpeg's DCT scaling, keeping at least DRAFT_MARGIN times that size
# for the antialiased resize. No training image of the shipped models is that large (CIFAR-10 is
# 32x32; the largest cats-vs-dogs photo has a 200-pixel shorter side), so they are unaffected.
DRAFT_MARGIN = 4

# Measured peak bytes per header pixel over every accepted mode (RGB/RGBA/CMYK/palette/16-bit/float,
# EXIF-rotated or not), plus a fixed allowance for decoder buffers and conversion strips; asserted
# by tests/test_preprocess.py::test_peak_memory_per_image_is_within_the_bound. Pillow's WebP
# decoder holds two extra canvases (17 bytes per pixel), so WebP gets a proportionally smaller
# pixel limit and the bound in bytes is the same for every format.
DECODE_BYTES_PER_PIXEL = 10
FORMAT_BYTES_PER_PIXEL = {"WEBP": 17}
DECODE_FIXED_BYTES = 16 * 1024 * 1024


def max_decode_bytes(max_pixels: int = DEFAULT_MAX_PIXELS) -> int:
    """Upper bound of the memory one image's decode and preprocessing may allocate (bytes)."""
    return DECODE_BYTES_PER_PIXEL * max_pixels + DECODE_FIXED_BYTES


def decode_cost(image: Image.Image) -> int:
    """Bytes the decode of this lazily opened image may take (after any ``draft``)."""
    width, height = image.size
    return width * height * FORMAT_BYTES_PER_PIXEL.get(image.format or "", DECODE_BYTES_PER_PIXEL) \
        + DECODE_FIXED_BYTES


class DecodeBudget:
    """A process-wide cap on the bytes that decodes in flight may hold: a decode reserves its
    :func:`decode_cost` first and waits while the others hold too much. One image larger than the
    whole budget still runs, alone. Threads (the service's ``asyncio.to_thread``, the scorer's
    pool) therefore never hold more than ``total`` bytes of decodes together."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.used = 0
        self._cond = threading.Condition()

    @contextmanager
    def reserve(self, cost: int) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: self.used == 0 or self.used + cost <= self.total)
            self.used += cost
        try:
            yield
        finally:
            with self._cond:
                self.used -= cost
                self._cond.notify_all()


# 1 GiB: two images at the default pixel limit, or many ordinary photos, at once (the service's
# budget per worker process).
DEFAULT_DECODE_BUDGET_BYTES = 1 << 30


class ImageError(ValueError):
    """An upload that is not a usable image. ``error`` is a stable machine-readable code."""

    def __init__(self, error: str, detail: str) -> None:
        super().__init__(f"{error}: {detail}")
        self.error = error
        self.detail = detail

    def __reduce__(self) -> tuple:  # decode workers send these back to the scorer
        return type(self), (self.error, self.detail)


# File signatures of the accepted formats: bytes that start like one of these but fail to decode
# are a corrupt image, not "not an image".
SIGNATURES = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG", b"GIF87a": "GIF", b"GIF89a": "GIF",
              b"II*\x00": "TIFF", b"MM\x00*": "TIFF", b"BM": "BMP"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def sniff_format(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((fmt for magic, fmt in SIGNATURES.items() if data.startswith(magic)), None)


def check_png_chunks(data: bytes) -> None:
    """Verify every PNG chunk's CRC (Pillow checks only some, and never IDAT's)."""
    pos = len(PNG_SIGNATURE)
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        end = pos + 8 + length
        if end + 4 > len(data):
            raise ImageError("corrupt_image", f"PNG chunk {kind!r} is truncated")
        (crc,) = struct.unpack(">I", data[end:end + 4])
        if zlib.crc32(data[pos + 4:end]) != crc:
            raise ImageError("corrupt_image", f"PNG chunk {kind.decode('latin-1')!r} has a wrong CRC")
        if kind == b"IEND":
            return
        pos = end + 4
    raise ImageError("corrupt_image", "PNG data ends before its IEND chunk")


def open_checked(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open upload bytes lazily (header only, no pixel decoded yet) and refuse what is over the limit.

    Raises :class:`ImageError`: ``empty_file``, ``not_an_image``, ``corrupt_image`` (also for a
    side of zero pixels) or ``image_too_large`` (more than ``max_pixels``, WebP more than 10/17 of
    it, or a side over ``MAX_SIDE``).
    """
    if not data:
        raise ImageError("empty_file", "the uploaded file has no bytes")
    sniffed = sniff_format(data)
    if sniffed == "PNG":
        check_png_chunks(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError("image_too_large", str(exc)) from None
    except Image.UnidentifiedImageError:
        if sniffed:
            raise ImageError("corrupt_image", f"the data starts like {sniffed} but cannot be decoded") from None
        raise ImageError(
            "not_an_image",
            f"could not identify an image; accepted formats: {', '.join(ACCEPTED_FORMATS)}",
        ) from None
    except CORRUPT_DATA_ERRORS as exc:  # corrupt headers
        raise ImageError("corrupt_image", f"{type(exc).__name__}: {exc}") from None
    check_dimensions(*image.size, max_pixels * DECODE_BYTES_PER_PIXEL
                     // FORMAT_BYTES_PER_PIXEL.get(image.format or "", DECODE_BYTES_PER_PIXEL))
    return image


def check_dimensions(width: int, height: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """Refuse an image of more than ``max_pixels`` pixels, with a side over ``MAX_SIDE`` or an empty
    side, from its header."""
    if width < 1 or height < 1:
        raise ImageError("corrupt_image", f"the header says {width}x{height} pixels")
    if max(width, height) > MAX_SIDE:
        raise ImageError("image_too_large", f"{width}x{height} has a side over {MAX_SIDE} pixels")
    if width * height > max_pixels:
        raise ImageError(
            "image_too_large",
            f"{width}x{height} is {width * height} pixels; the limit is {max_pixels}",
        )


def resized_size(width: int, height: int, size: Sequence[int]) -> tuple[int, int]:
    """(width, height) after scaling the shorter side to ``size`` (h, w), before the centre crop."""
    target_h, target_w = size
    scale = max(target_w / width, target_h / height)
    return max(target_w, round(width * scale)), max(target_h, round(height * scale))


ORIENTATION_TAG = 0x0112


def draft_request(image: Image.Image, size: Sequence[int]) -> tuple[int, int] | None:
    """The smallest (width, height) a JPEG may be decoded at for ``size``: ``DRAFT_MARGIN`` times its
    resized size, in stored (pre-EXIF-rotation) orientation; None for other formats."""
    if image.format != "JPEG":
        return None
    target_h, target_w = size
    if image.getexif().get(ORIENTATION_TAG, 1) in (5, 6, 7, 8):  # stored sideways: swap the target
        target_h, target_w = target_w, target_h
    new_w, new_h = resized_size(*image.size, (target_h, target_w))
    return new_w * DRAFT_MARGIN, new_h * DRAFT_MARGIN


# What Pillow raises on corrupt data while it parses a file (Image.open, draft, load, the EXIF
# block): its format plugins (Python) and decoders (C) raise OSError (truncated or bad data,
# decoder errors), SyntaxError (a plugin's "not a PNG/GIF/... file"), ValueError, EOFError,
# struct.error (a header shorter than it says) and, found by the fuzzer, TypeError (a TIFF whose
# strip offset is a rational: ImageFile.load seeks to it; tests/test_fuzz.py). Only those calls are
# wrapped (:func:`pillow_errors`); the project's own conversion code runs outside, so a bug there
# (any exception) surfaces as itself, logged with its traceback and answered 500, never as
# ``corrupt_image`` (tests/test_preprocess.py, tests/test_service_errors.py). The fuzzers
# (benchmarks/fuzz_decode.py, tests/test_fuzz.py) check that no malformed file raises anything else.
CORRUPT_DATA_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, TypeError)


@contextmanager
def pillow_errors() -> Iterator[None]:
    """Around Pillow's parsing of a file: its exceptions on hostile data become :class:`ImageError`
    codes. Wrap nothing else in it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError("image_too_large", str(exc)) from None
    except CORRUPT_DATA_ERRORS as exc:
        raise ImageError("corrupt_image", f"{type(exc).__name__}: {exc}") from None


def open_for(data: bytes, size: Sequence[int] | None, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """:func:`open_checked`, then ask a large JPEG for a reduced decode fitting ``size``."""
    image = open_checked(data, max_pixels)
    if size is not None:
        with pillow_errors():  # the EXIF block is parsed here, and it may be corrupt
            if (request := draft_request(image, size)) is not None:
                image.draft(None, request)
    return image


def load_rgb(image: Image.Image) -> Image.Image:
    """Decode a lazily opened image's pixels (ImageError for corrupt data), apply its EXIF
    orientation, and convert them (:func:`to_rgb`)."""
    with pillow_errors():
        image.load()  # full decode here: truncated data and bad CRCs surface now
        # the EXIF block is parsed here, and it may be corrupt; in place: no second full-size copy
        ImageOps.exif_transpose(image, in_place=True)
    return to_rgb(image)


def decode_to_array(data: bytes, size: Sequence[int], max_pixels: int = DEFAULT_MAX_PIXELS,
                    budget: DecodeBudget | None = None) -> np.ndarray:
    """Upload bytes -> (3, H, W) uint8 at the model's input size, or raise :class:`ImageError`;
    within ``budget`` (shared with the caller's other decoding threads) when one is given."""
    image = open_for(data, size, max_pixels)
    with budget.reserve(decode_cost(image)) if budget is not None else nullcontext():
        return image_to_uint8(load_rgb(image), size)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert a decoded image of any mode (L, LA, P, RGBA, CMYK, I;16, F, ...) to RGB.

    Each conversion makes one copy, so no more than two full-size images are alive at any step
    (the caller's and the converted one).
    """
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        image = high_depth_to_l(image)
    if image.mode == "PA" or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "RGBa", "LA", "La"):
        # Composite transparency onto white, the way a viewer shows it, instead of dropping alpha:
        # Pillow pastes these modes onto RGB directly, blending by their own alpha band.
        white = Image.new("RGB", image.size, (255, 255, 255))
        white.paste(image, (0, 0), image)
        return white
    return image if image.mode == "RGB" else image.convert("RGB")


HIGH_DEPTH_STRIP_PIXELS = 1 << 18


def high_depth_to_l(image: Image.Image) -> Image.Image:
    """16-bit or 32-bit grey -> 8-bit grey, rescaled (``round(v / peak * 255)``) instead of clipped
    at 255 as ``convert`` does. ``peak`` is 65535 for 16-bit data or any value over 255 (NaN: 0),
    else 255. Converted in strips of about a megapixel, so the only full-size copy is the output."""
    width, height = image.size
    if image.mode.startswith("I;16"):
        peak = 65535
    else:
        extrema = image.getextrema()
        peak = 65535 if extrema and max(extrema) > 255 else 255
    out = np.empty((height, width), dtype=np.uint8)
    rows = max(1, HIGH_DEPTH_STRIP_PIXELS // max(width, 1))
    for top in range(0, height, rows):
        strip = np.asarray(image.crop((0, top, width, min(height, top + rows))), dtype=np.float64)
        scaled = np.nan_to_num(strip / peak * 255.0 + 0.5, nan=0.0, posinf=255.0, neginf=0.0)
        out[top:top + rows] = np.clip(scaled, 0, 255).astype(np.uint8)
    return Image.fromarray(out, "L")


# Resize-then-crop is kept (bit-exact with the shipped models' training) while the resized image is
# at most this many times the model's input area; past it the one-step box resize takes over.
EXACT_RESIZE_AREA = 4


def resize_and_crop(image: Image.Image, size: Sequence[int]) -> Image.Image:
    """Resize the shorter side to fit ``size`` (h, w), keeping aspect, then centre-crop.

    Up to an aspect ratio of ``EXACT_RESIZE_AREA``:1 (every photo) the whole image is resized and
    then cropped. Beyond it (e.g. 40000x1) the resized image would be huge, so the resize reads only
    the source region the crop keeps (``box``), with the same scale and filter support (output
    values within 1 of the two-step result), straight to (w, h): bounded work at any aspect ratio.
    """
    target_h, target_w = size
    width, height = image.size
    if (width, height) == (target_w, target_h):
        return image
    new_w, new_h = resized_size(width, height, size)
    left, top = (new_w - target_w) // 2, (new_h - target_h) // 2
    if new_w * new_h <= EXACT_RESIZE_AREA * target_w * target_h:
        image = image.resize((new_w, new_h), Image.Resampling.BILINEAR, reducing_gap=None)
        return image.crop((left, top, left + target_w, top + target_h))
    sx, sy = width / new_w, height / new_h
    box = (left * sx, top * sy, (left + target_w) * sx, (top + target_h) * sy)
    return image.resize((target_w, target_h), Image.Resampling.BILINEAR, box=box, reducing_gap=None)


def image_to_uint8(image: Image.Image, size: Sequence[int]) -> np.ndarray:
    """RGB image -> (3, H, W) uint8 array at the model's input size."""
    return np.asarray(resize_and_crop(image, size), dtype=np.uint8).transpose(2, 0, 1)


def normalize(batch_uint8: np.ndarray, spec: InputSpec) -> np.ndarray:
    """(N, 3, H, W) uint8 -> float32 normalised with the card's mean/std."""
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(spec.std, dtype=np.float32).reshape(1, 3, 1, 1)
    return (batch_uint8.astype(np.float32) / 255.0 - mean) / std
