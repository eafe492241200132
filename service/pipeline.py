"""The one image pipeline: items (upload bytes or file paths) -> one uint8 batch -> probabilities.

    batch = decode_batch([b"...jpeg...", "cat.png"], size=(32, 32))   # never raises for a bad item
    scored = predict(model.predict, batch)                              # one model call per batch
    scored.rows()  # per item, in order: a (classes,) probability row or an ImageError

Every caller turns images into a batch here: both serving runners (:mod:`service.runners`), the
folder scorers (:mod:`service.score`) and training's dataset decoding (:mod:`training.data`).
Each item is decoded by :func:`service.preprocess.decode_to_array` (bounds, orientation, mode
conversion, resize and crop: the model card's input contract), except plain JPEGs, which take
the fast path :func:`plain_jpeg_pixels` (the same pixels, tested; half the CPU). A file that
cannot be read or decoded becomes an :class:`~service.preprocess.ImageError` in
:attr:`DecodedBatch.errors`, never an exception, so one bad item never fails its batch.

Decodes that run at once in one process share a :class:`~service.preprocess.DecodeBudget` when
the caller passes one (the service makes one per worker at start-up); there is no process-wide
state here.
"""

from __future__ import annotations

import contextlib
import os
import struct
from dataclasses import dataclass, field
from typing import Callable, Sequence, Union

import numpy as np
import simplejpeg
from PIL import Image

from service.preprocess import (DECODE_BYTES_PER_PIXEL, DECODE_FIXED_BYTES, DEFAULT_MAX_PIXELS, DRAFT_MARGIN,
                                DecodeBudget, ImageError, check_dimensions, decode_to_array, image_to_uint8,
                                resized_size)

Item = Union[bytes, str, "os.PathLike[str]", np.ndarray]  # an ndarray: pixels already decoded at the size

# A plain JPEG of at most this many pixels (64 x 64; a CIFAR upload is 32 x 32) is cheap enough to
# decode where it arrives, on the API worker's event loop (8-20 us), by :func:`inline_pixels`. Decoded
# in the batch thread instead, its few microseconds of Python each need the GIL, which the event loop
# holds most of the time under load: the batch thread waited 1-4 ms a batch of 16 for it while the
# second core idled (docs/SERVING.md). Larger images still decode in the batch thread, so the loop
# never spends more than that on one upload.
INLINE_MAX_PIXELS = 64 * 64


@dataclass
class Predictions:
    """A batch's answers: ``probabilities`` row k belongs to item ``good[k]``; ``errors`` holds
    ``(item index, ImageError)`` for the items that could not be decoded, in index order. For a
    model whose card has an ``ood`` section each row ends with the OOD score column after the
    class probabilities (:func:`service.ood.split` parts them; :mod:`service.ood`)."""

    probabilities: np.ndarray
    good: list[int]
    errors: list[tuple[int, ImageError]] = field(default_factory=list)

    @classmethod
    def from_rows(cls, rows: Sequence["np.ndarray | ImageError"]) -> "Predictions":
        """Per-item answers (a probability row or an ImageError) -> :class:`Predictions`."""
        good = [i for i, row in enumerate(rows) if not isinstance(row, ImageError)]
        errors = [(i, row) for i, row in enumerate(rows) if isinstance(row, ImageError)]
        probabilities = np.array([rows[i] for i in good], np.float32) if good else np.empty((0, 0), np.float32)
        return cls(probabilities, good, errors)

    def rows(self) -> list["np.ndarray | ImageError"]:
        """Per item, in item order: its probability row, or its ImageError."""
        out: list[np.ndarray | ImageError] = [None] * (len(self.good) + len(self.errors))  # type: ignore[list-item]
        for row, i in zip(self.probabilities, self.good):
            out[i] = row
        for i, error in self.errors:
            out[i] = error
        return out


@dataclass
class DecodedBatch:
    """Items decoded into one array: ``pixels`` row k is item ``good[k]`` ((3, H, W) uint8 at the
    model's size); ``errors`` holds ``(item index, ImageError)`` for the others. With
    ``gpu_jpegs``, ``jpegs`` holds ``(item index, bytes)`` of the plain JPEGs already at the
    model's size, left undecoded for a GPU JPEG decoder (neither in ``good`` nor in ``errors``)."""

    pixels: np.ndarray
    good: list[int]
    errors: list[tuple[int, ImageError]] = field(default_factory=list)
    jpegs: list[tuple[int, bytes]] = field(default_factory=list)

    def scored(self, probabilities: np.ndarray) -> Predictions:
        """These items' :class:`Predictions`, given the probabilities of :attr:`pixels`."""
        return Predictions(probabilities, list(self.good), list(self.errors))


def predict(model: Callable[[np.ndarray], np.ndarray], batch: DecodedBatch) -> Predictions:
    """Run ``model`` ((N, 3, H, W) uint8 -> (N, classes) probabilities, plus the OOD score column
    for a model with one) once on the batch's images."""
    if not batch.good:
        return batch.scored(np.empty((0, 0), np.float32))
    return batch.scored(model(batch.pixels))


# --- decoding -------------------------------------------------------------------------------------

def read_item(item: Item) -> bytes:
    """An item's bytes: bytes as given; a path read unbuffered (ImageError ``unreadable_file``)."""
    if isinstance(item, (bytes, bytearray, memoryview)):
        return bytes(item)
    try:
        with open(item, "rb", buffering=0) as handle:  # unbuffered: ~2 us less a file
            return handle.readall()
    except OSError as exc:
        raise ImageError("unreadable_file", f"{type(exc).__name__}: {exc}") from None


def decode_batch(items: Sequence[Item], size: Sequence[int], max_pixels: int = DEFAULT_MAX_PIXELS,
                 budget: DecodeBudget | None = None, gpu_jpegs: bool = False,
                 out: np.ndarray | None = None) -> DecodedBatch:
    """Decode ``items`` into one array at ``size`` (h, w); a bad item is listed, not raised.

    Paths are read one at a time, as they are decoded (a process holds one file's bytes, not a
    batch's). An ndarray item is an image already decoded at ``size`` (:func:`inline_pixels`).
    ``budget``: shared with the caller's other decoding threads (see module doc).
    ``gpu_jpegs``: leave plain JPEGs already at ``size`` undecoded (:attr:`DecodedBatch.jpegs`).
    ``out``: where to write the pixels (room for ``len(items)`` images; default a new array)."""
    if out is None:
        out = np.empty((len(items), 3, *size), dtype=np.uint8)
    good: list[int] = []
    errors: list[tuple[int, ImageError]] = []
    jpegs: list[tuple[int, bytes]] = []
    for i, item in enumerate(items):
        if isinstance(item, np.ndarray):
            out[len(good)] = item
            good.append(i)
            continue
        try:
            data = read_item(item)
            if gpu_jpegs and plain_jpeg_header(data) == (size[1], size[0]):
                jpegs.append((i, data))
                continue
            out[len(good)] = decode_one(data, size, max_pixels, budget)
        except ImageError as exc:
            errors.append((i, exc))
            continue
        good.append(i)
    return DecodedBatch(out[:len(good)], good, errors, jpegs)


def decode_one(data: bytes, size: Sequence[int], max_pixels: int = DEFAULT_MAX_PIXELS,
               budget: DecodeBudget | None = None) -> np.ndarray:
    """One item's bytes -> (3, H, W) uint8: the plain-JPEG fast path, else the general decoder."""
    found = plain_jpeg_header(data)
    if found is not None:
        width, height = found
        cost = width * height * DECODE_BYTES_PER_PIXEL + DECODE_FIXED_BYTES
        with budget.reserve(cost) if budget is not None else contextlib.nullcontext():
            pixels = plain_jpeg_pixels(data, size, max_pixels, found)
        if pixels is not None:
            return pixels
    return decode_to_array(data, size, max_pixels, budget)


def inline_pixels(data: bytes, size: Sequence[int], max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray | None:
    """(3, H, W) uint8 for a plain JPEG of at most :data:`INLINE_MAX_PIXELS` pixels, decoded now by
    the fast path; None for every other upload (and for one the fast path leaves to the general
    decoder), which :func:`decode_batch` decodes later with its batch, errors included."""
    found = plain_jpeg_header(data)
    if found is None or found[0] * found[1] > INLINE_MAX_PIXELS:
        return None
    return plain_jpeg_pixels(data, size, max_pixels, found)


def decode_or_error(data: bytes, size: Sequence[int], max_pixels: int = DEFAULT_MAX_PIXELS,
                    budget: DecodeBudget | None = None) -> np.ndarray | ImageError:
    """:func:`decode_one`, with a bad image returned instead of raised (what a batch holds for it)."""
    try:
        return decode_one(data, size, max_pixels, budget)
    except ImageError as exc:
        return exc


# --- the plain-JPEG fast path -----------------------------------------------------------------------

# JPEG markers a "plain" file may carry before its scan: JFIF (APP0), Adobe (APP14), comments, tables,
# restart interval, and baseline/extended/progressive Huffman frames. Any other segment (APP1 EXIF or
# XMP, which can rotate the image; APP2 ICC/MPF; arithmetic coding; ...) sends the file to the
# general decoder.
PLAIN_SEGMENTS = {0xE0, 0xEE, 0xFE, 0xDB, 0xC4, 0xDD}
PLAIN_FRAMES = {0xC0, 0xC1, 0xC2}


def plain_jpeg_header(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a complete 3-component JPEG made only of :data:`PLAIN_SEGMENTS` and one of
    :data:`PLAIN_FRAMES` before its scan, else None. The project's one JPEG header parser."""
    if not (data.startswith(b"\xff\xd8") and data.endswith(b"\xff\xd9")):
        return None
    size, pos = None, 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xDA:  # start of scan: the header is complete
            return size
        if marker in PLAIN_FRAMES and pos + 10 <= len(data):
            if size is not None or data[pos + 9] != 3:
                return None
            height, width = struct.unpack(">HH", data[pos + 5:pos + 9])
            size = (width, height)
        elif marker not in PLAIN_SEGMENTS:
            return None
        pos += 2 + struct.unpack(">H", data[pos + 2:pos + 4])[0]
    return None


def plain_jpeg_pixels(data: bytes, size: Sequence[int], max_pixels: int = DEFAULT_MAX_PIXELS,
                      header: tuple[int, int] | None = None) -> np.ndarray | None:
    """(3, H, W) uint8 for a plain JPEG (:func:`plain_jpeg_header`, or ``header`` already parsed);
    None sends the file to the general path, :func:`~service.preprocess.decode_to_array`.

    The file goes straight to libjpeg-turbo through simplejpeg (the decoder Pillow uses, with the
    same defaults: accurate integer DCT, fancy upsampling; no Python image object: 8 against 33 us
    a CIFAR file, and 2,000 of them decoded identically to Pillow's), then, when its size is not the
    model's, through the service's own resize and crop. For these files the general path's
    orientation and mode conversion are no-ops, so no pixel changes (tested against it). Files large
    enough for the general path's reduced-scale (draft) decode are left to it.
    """
    found = header or plain_jpeg_header(data)
    if found is None:
        return None
    width, height = found
    try:
        check_dimensions(width, height, max_pixels)  # the service's header bounds, one source of truth
    except ImageError:
        return None  # the general path refuses it with the same error
    if (width, height) != (size[1], size[0]):
        new_w, new_h = resized_size(width, height, size)
        if min(width // (new_w * DRAFT_MARGIN), height // (new_h * DRAFT_MARGIN)) >= 2:
            return None  # the general path decodes this one at a reduced DCT scale
    try:
        pixels = simplejpeg.decode_jpeg(data, colorspace="RGB")  # (h, w, 3) uint8
    except ValueError:  # let the general path name the error
        return None
    if pixels.shape[:2] != (size[0], size[1]):
        return image_to_uint8(Image.fromarray(pixels), size)
    return pixels.transpose(2, 0, 1)
