"""Reading and decoding image files for batch scoring, in worker processes that each decode whole
batches (so decoding grows with a host's cores instead of sharing one interpreter's GIL).

* :func:`decode_batch` turns a list of files into one ``(n, 3, H, W)`` uint8 array at the model's
  size plus the per-file errors; it is the whole decoding contract and runs the same inline or in a
  worker.
* :class:`DecodePool` runs it in ``workers`` processes (``0``: in the calling process, the
  single-process reference path). Workers ignore SIGINT: Ctrl-C is the parent's to handle.
* Plain JPEGs (complete, 3 components, no EXIF/XMP/ICC segments; every CIFAR and cats-vs-dogs
  file) take :func:`plain_jpeg_pixels`: Pillow's libjpeg decoder without the Python header parse,
  then the service's resize; the same bytes as :func:`service.preprocess.decode_or_error`
  (tested). Everything else goes through
  :func:`~service.preprocess.decode_or_error`, so bounds, conversions and error codes are the
  service's own.

Nothing here imports torch: on CPU hosts decoding costs no framework start-up.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import struct
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

from service.preprocess import (DEFAULT_MAX_PIXELS, DRAFT_MARGIN, ImageError, check_dimensions, decode_or_error,
                                image_to_uint8, resized_size)


@dataclass
class DecodedBatch:
    """One batch of files: the decoded images of the files at ``good`` (in order), and
    ``(index, error, detail)`` for each file that could not be decoded."""

    pixels: np.ndarray
    good: list[int]
    errors: list[tuple[int, str, str]] = field(default_factory=list)
    # with ``gpu_jpegs``: (index, file bytes) of the plain JPEGs already at the model's size, left
    # for the GPU's JPEG decoder (not in ``good``)
    jpegs: list[tuple[int, bytes]] = field(default_factory=list)


# JPEG markers a "plain" file may carry before its scan: JFIF (APP0), Adobe (APP14), comments, tables,
# restart interval, and baseline/extended/progressive Huffman frames. Any other segment (APP1 EXIF or
# XMP, which can rotate the image; APP2 ICC/MPF; arithmetic coding; ...) sends the file to the
# general decoder.
PLAIN_SEGMENTS = {0xE0, 0xEE, 0xFE, 0xDB, 0xC4, 0xDD}
PLAIN_FRAMES = {0xC0, 0xC1, 0xC2}


def plain_jpeg_header(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a complete 3-component JPEG made only of :data:`PLAIN_SEGMENTS` and one of
    :data:`PLAIN_FRAMES` before its scan, else None."""
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


def plain_jpeg_pixels(data: bytes, size: Sequence[int], max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray | None:
    """(3, H, W) uint8 for a plain JPEG (:func:`plain_jpeg_header`); None sends the file to the
    general path, :func:`~service.preprocess.decode_or_error`.

    The file goes straight to Pillow's libjpeg decoder (``Image.frombytes(..., "jpeg")``, the decoder
    and arguments ``Image.open`` would use, without parsing the header again in Python: 28 against
    48 us per CIFAR file), then through the service's own resize and crop. For these files the
    general path's orientation and mode conversion are no-ops, so no pixel changes (tested against
    it). Files large enough for the general path's reduced-scale (draft) decode are left to it.
    """
    found = plain_jpeg_header(data)
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
            return None  # decode_or_error would decode this one at a reduced DCT scale
    try:
        image = Image.frombytes("RGB", (width, height), data, "jpeg", "RGB", "")
    except (OSError, ValueError):  # let the general path name the error
        return None
    return image_to_uint8(image, size)


def decode_batch(paths: Sequence[str], size: Sequence[int], max_pixels: int = DEFAULT_MAX_PIXELS,
                 gpu_jpegs: bool = False) -> DecodedBatch:
    """Read and decode ``paths`` into one array at ``size`` (h, w); failures are listed, not raised.
    With ``gpu_jpegs``, plain JPEGs already at ``size`` are returned undecoded in ``jpegs``. Files
    are read one at a time, as they are decoded (a worker holds one file's bytes, not a batch's)."""
    unreadable: list[tuple[int, str, str]] = []
    jpegs: list[tuple[int, bytes]] = []

    def read() -> Iterator[tuple[int, bytes]]:
        for i, path in enumerate(paths):
            try:
                with open(path, "rb", buffering=0) as handle:  # unbuffered: ~2 us less a file
                    data = handle.read()
            except OSError as exc:
                unreadable.append((i, "unreadable_file", f"{type(exc).__name__}: {exc}"))
                continue
            if gpu_jpegs and plain_jpeg_header(data) == (size[1], size[0]):
                jpegs.append((i, data))
            else:
                yield i, data

    batch = decode_files(read(), size, max_pixels, capacity=len(paths))
    batch.errors = sorted(unreadable + batch.errors)
    batch.jpegs = jpegs
    return batch


def decode_files(items: Iterable[tuple[int, bytes]], size: Sequence[int], max_pixels: int = DEFAULT_MAX_PIXELS,
                 capacity: int | None = None) -> DecodedBatch:
    """(index, bytes) pairs -> a :class:`DecodedBatch` indexed by those indices (also the GPU
    decoder's fallback for a batch nvJPEG refuses). ``capacity``: the most images to expect."""
    if capacity is None:
        items = list(items)
        capacity = len(items)
    out = np.empty((capacity, 3, *size), dtype=np.uint8)
    good: list[int] = []
    errors: list[tuple[int, str, str]] = []
    for i, data in items:
        pixels = plain_jpeg_pixels(data, size, max_pixels)
        if pixels is None:
            result = decode_or_error(data, size, max_pixels)
            if isinstance(result, ImageError):
                errors.append((i, result.error, result.detail))
                continue
            pixels = result
        out[len(good)] = pixels
        good.append(i)
    return DecodedBatch(out[:len(good)], good, errors)


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS reports one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def resolve_workers(value: str | int) -> int:
    """``auto`` -> cores - 1 (one core is left to the model and the writer), at least 1; else N >= 0."""
    if value == "auto":
        return max(1, available_cores() - 1)
    workers = int(value)
    if workers < 0:
        raise ValueError(f"workers must be 'auto' or >= 0, not {value}")
    return workers


class _Inline:
    """The ``workers=0`` path: decodes in the calling process when the result is asked for."""

    def __init__(self, paths: Sequence[str], size: Sequence[int], max_pixels: int, gpu_jpegs: bool) -> None:
        self.args = (paths, size, max_pixels, gpu_jpegs)

    def result(self) -> DecodedBatch:
        return decode_batch(*self.args)

    def cancel(self) -> bool:
        return True


def _worker_init() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group
    Image.preinit()  # the JPEG/PNG/... plugins, once per worker rather than in the first batch


class DecodePool:
    """``submit(paths)`` -> a future of :class:`DecodedBatch`, decoded by one of ``workers`` processes.

    Workers are forked (where the OS can) as soon as the pool is made, so make it before loading a
    model or starting threads: forking is then cheap and safe, and the workers' start overlaps with
    the model's.
    """

    def __init__(self, workers: int, size: Sequence[int], max_pixels: int = DEFAULT_MAX_PIXELS,
                 gpu_jpegs: bool = False) -> None:
        self.workers = workers
        self.size = tuple(size)
        self.max_pixels = max_pixels
        self.gpu_jpegs = gpu_jpegs
        self.executor: ProcessPoolExecutor | None = None
        if workers > 0:
            methods = multiprocessing.get_all_start_methods()
            context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
            self.executor = ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init)
            self.executor.submit(int)  # start the workers now, not at the first batch

    def submit(self, paths: Sequence[str]) -> "Future[DecodedBatch] | _Inline":
        if self.executor is None:
            return _Inline(list(paths), self.size, self.max_pixels, self.gpu_jpegs)
        return self.executor.submit(decode_batch, list(paths), self.size, self.max_pixels, self.gpu_jpegs)

    def close(self, cancel: bool = False) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=not cancel, cancel_futures=cancel)
            self.executor = None

    def __enter__(self) -> "DecodePool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(cancel=exc[0] is not None)
