"""Image decoding and preprocessing: the one pixel pipeline used by training, export and serving.

Every step is driven by the model card's ``input`` section, so training and serving cannot drift:
decode -> apply EXIF orientation -> convert to 8-bit RGB -> resize the shorter side to the card's
size (bilinear, antialiased) -> centre crop -> scale to [0, 1] -> normalise with the card's mean/std.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageOps

# Formats we decode. Anything else Pillow might open (EPS, ICO, PSD, ...) is rejected: a smaller
# attack surface for user uploads. Animated GIF/WebP are scored on their first frame.
ACCEPTED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "TIFF", "BMP")

# Pillow's own guard is a warning at 89 Mpx and an error at 2x that. We set our own limit and make
# both cases an error, so a decompression bomb is refused before its pixels are allocated.
DEFAULT_MAX_PIXELS = 40_000_000


class ImageError(ValueError):
    """An upload that is not a usable image. ``error`` is a stable machine-readable code."""

    def __init__(self, error: str, detail: str) -> None:
        super().__init__(f"{error}: {detail}")
        self.error = error
        self.detail = detail


@dataclass(frozen=True)
class InputSpec:
    """The ``input`` section of a model card."""

    size: tuple[int, int]  # (height, width)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_card(cls, card: dict[str, Any]) -> "InputSpec":
        spec = card["input"]
        return cls(size=tuple(spec["size"]), mean=tuple(spec["mean"]), std=tuple(spec["std"]))

    def to_card(self) -> dict[str, Any]:
        return {
            "size": list(self.size),
            "channels": "RGB",
            "layout": "NCHW",
            "dtype": "float32",
            "resize": "shorter side to size (bilinear, antialiased), then centre crop",
            "scale": "pixel / 255",
            "mean": list(self.mean),
            "std": list(self.std),
        }


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


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode upload bytes into an upright 8-bit RGB image, or raise :class:`ImageError`."""
    if not data:
        raise ImageError("empty_file", "the uploaded file has no bytes")
    sniffed = sniff_format(data)
    if sniffed == "PNG":
        check_png_chunks(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
            width, height = image.size
            if width * height > max_pixels:
                raise ImageError(
                    "image_too_large",
                    f"{width}x{height} is {width * height} pixels; the limit is {max_pixels}",
                )
            image.load()  # full decode here: truncated data and bad CRCs surface now
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError("image_too_large", str(exc)) from None
    except Image.UnidentifiedImageError:
        if sniffed:
            raise ImageError("corrupt_image", f"the data starts like {sniffed} but cannot be decoded") from None
        raise ImageError(
            "not_an_image",
            f"could not identify an image; accepted formats: {', '.join(ACCEPTED_FORMATS)}",
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # Pillow's corrupt-data errors
        raise ImageError("corrupt_image", f"{type(exc).__name__}: {exc}") from None
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """Apply EXIF orientation and convert any mode (L, LA, P, RGBA, CMYK, I;16, F, ...) to RGB."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit/32-bit grey: rescale to 8 bits rather than letting convert() clip at 255.
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Composite transparency onto white, the way a viewer shows it, instead of dropping alpha.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def resize_and_crop(image: Image.Image, size: Sequence[int]) -> Image.Image:
    """Resize the shorter side to fit ``size`` (h, w), keeping aspect, then centre-crop."""
    target_h, target_w = size
    width, height = image.size
    if (width, height) != (target_w, target_h):
        scale = max(target_w / width, target_h / height)
        new_w, new_h = max(target_w, round(width * scale)), max(target_h, round(height * scale))
        image = image.resize((new_w, new_h), Image.Resampling.BILINEAR, reducing_gap=None)
        left, top = (new_w - target_w) // 2, (new_h - target_h) // 2
        image = image.crop((left, top, left + target_w, top + target_h))
    return image


def image_to_uint8(image: Image.Image, size: Sequence[int]) -> np.ndarray:
    """RGB image -> (3, H, W) uint8 array at the model's input size."""
    return np.asarray(resize_and_crop(image, size), dtype=np.uint8).transpose(2, 0, 1)


def decode_or_error(data: bytes, size: Sequence[int],
                    max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray | ImageError:
    """:func:`decode_image` + :func:`image_to_uint8`, with a bad file returned instead of raised, so
    a batch of uploads or files carries on past it."""
    try:
        return image_to_uint8(decode_image(data, max_pixels), size)
    except ImageError as exc:
        return exc


def normalize(batch_uint8: np.ndarray, spec: InputSpec) -> np.ndarray:
    """(N, 3, H, W) uint8 -> float32 normalised with the card's mean/std."""
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(spec.std, dtype=np.float32).reshape(1, 3, 1, 1)
    return (batch_uint8.astype(np.float32) / 255.0 - mean) / std


SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def plain_jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) of a complete 3-component JPEG without EXIF data, else None.

    These are the files the batched libjpeg-turbo path below decodes exactly like Pillow (same
    library, same settings); anything else (EXIF orientation, CMYK, grayscale, truncated) goes
    through :func:`decode_image`.
    """
    if not (data.startswith(b"\xff\xd8") and data.endswith(b"\xff\xd9")):
        return None
    pos = 2
    while pos + 10 < len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xE1 and data[pos + 4:pos + 8] == b"Exif":
            return None
        if marker in SOF_MARKERS:
            height, width = struct.unpack(">HH", data[pos + 5:pos + 9])
            return (height, width) if data[pos + 9] == 3 else None
        pos += 2 + struct.unpack(">H", data[pos + 2:pos + 4])[0]
    return None


def decode_jpegs_at_size(blobs: Sequence[bytes], size: Sequence[int]) -> list[np.ndarray | None]:
    """Batch-decode the plain JPEGs already at ``size`` with ``torchvision.io.decode_jpeg`` (one C++
    call, ~4x faster than Pillow per small file); None marks a file for :func:`decode_image`."""
    picked = [i for i, blob in enumerate(blobs) if plain_jpeg_size(blob) == tuple(size)]
    out: list[np.ndarray | None] = [None] * len(blobs)
    if not picked:
        return out
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        decoded = decode_jpeg([torch.frombuffer(bytearray(blobs[i]), dtype=torch.uint8) for i in picked],
                              mode=ImageReadMode.RGB)
    except RuntimeError:  # a corrupt file in the batch: let Pillow sort them out one by one
        return out
    for i, image in zip(picked, decoded):
        out[i] = image.numpy()
    return out


def load_file(path: str, size: Sequence[int], max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read one image file into a (3, H, W) uint8 array, as the service would see it."""
    with open(path, "rb") as handle:
        return image_to_uint8(decode_image(handle.read(), max_pixels), size)
