"""Reading and decoding image files for batch scoring, in worker processes that each decode whole
batches (so decoding grows with a host's cores instead of sharing one interpreter's GIL).

* :func:`decode_batch` turns a list of files into one ``(n, 3, H, W)`` uint8 array at the model's
  size plus the per-file errors; it is the whole decoding contract and runs the same inline or in a
  worker.
* :class:`DecodePool` runs it in ``workers`` processes (``0``: in the calling process, the
  single-process reference path). Workers ignore SIGINT: Ctrl-C is the parent's to handle.
  Where workers are forked, they write the pixels into shared memory (slots mapped before the
  fork) and send back only the batch's bookkeeping, so the collecting process does not receive
  and unpickle every image through a pipe (3-10 us an image on 2 cores, up to a sixth of a
  worker's decoding: the ceiling on how decoding scales with processes).
* Plain JPEGs (complete, 3 components, no EXIF/XMP/ICC segments; every CIFAR and cats-vs-dogs
  file) take :func:`plain_jpeg_pixels`: Pillow's libjpeg decoder without the Python header parse,
  then the service's resize; the same bytes as :func:`service.preprocess.decode_or_error`
  (tested). Everything else goes through
  :func:`~service.preprocess.decode_or_error`, so bounds, conversions and error codes are the
  service's own.

Nothing here imports torch: on CPU hosts decoding costs no framework start-up.
"""

from __future__ import annotations

import gc
import mmap
import multiprocessing
import os
import signal
import struct
import threading
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
                 gpu_jpegs: bool = False, out: np.ndarray | None = None) -> DecodedBatch:
    """Read and decode ``paths`` into one array at ``size`` (h, w); failures are listed, not raised.
    With ``gpu_jpegs``, plain JPEGs already at ``size`` are returned undecoded in ``jpegs``. Files
    are read one at a time, as they are decoded (a worker holds one file's bytes, not a batch's).
    ``out``: where to write the pixels (at least ``len(paths)`` images; default a new array)."""
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

    batch = decode_files(read(), size, max_pixels, capacity=len(paths), out=out)
    batch.errors = sorted(unreadable + batch.errors)
    batch.jpegs = jpegs
    return batch


def decode_files(items: Iterable[tuple[int, bytes]], size: Sequence[int], max_pixels: int = DEFAULT_MAX_PIXELS,
                 capacity: int | None = None, out: np.ndarray | None = None) -> DecodedBatch:
    """(index, bytes) pairs -> a :class:`DecodedBatch` indexed by those indices (also the GPU
    decoder's fallback for a batch nvJPEG refuses). ``capacity``: the most images to expect;
    ``out``: an array of at least that many images to write them into."""
    if capacity is None:
        items = list(items)
        capacity = len(items)
    if out is None:
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


# A forked worker's view of its pool's shared-memory slots (mapped by the parent before the fork).
_SLOTS: list[mmap.mmap] = []
SHARED_BYTES_CAP = 1 << 30  # shared-memory slots per pool; batches that do not fit travel by pipe


def _worker_init(slots: list[mmap.mmap]) -> None:
    global _SLOTS
    _SLOTS = slots
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group
    Image.preinit()  # the JPEG/PNG/... plugins, once per worker rather than in the first batch


def slot_view(slot: mmap.mmap, images: int, size: Sequence[int]) -> np.ndarray:
    """The first ``images`` (3, h, w) uint8 images of a shared-memory slot, as a writable view."""
    count = images * 3 * size[0] * size[1]
    return np.frombuffer(slot, np.uint8, count=count).reshape(images, 3, *size)


def _decode_into_slot(slot: int, paths: Sequence[str], size: Sequence[int], max_pixels: int,
                      gpu_jpegs: bool) -> DecodedBatch:
    """In a worker: :func:`decode_batch` with the pixels written into shared-memory slot ``slot``;
    the batch sent back carries no pixels (the parent reads ``len(good)`` images from the slot)."""
    batch = decode_batch(paths, size, max_pixels, gpu_jpegs, out=slot_view(_SLOTS[slot], len(paths), size))
    batch.pixels = np.empty((0, 3, *size), np.uint8)
    return batch


class _SlotFuture:
    """A batch decoded into a shared-memory slot: :meth:`result` copies its pixels out and frees
    the slot (a slot is reused only once its batch is done, never while a worker may write it)."""

    def __init__(self, future: "Future[DecodedBatch]", pool: "DecodePool", slot: int) -> None:
        self.future, self.pool, self.slot = future, pool, slot

    def result(self) -> DecodedBatch:
        try:
            batch = self.future.result()
            batch.pixels = slot_view(self.pool.slots[self.slot], len(batch.good), self.pool.size).copy()
            return batch
        finally:
            self.pool.release(self.slot)

    def cancel(self) -> bool:
        if self.future.cancel():
            self.pool.release(self.slot)
            return True
        return False


class DecodePool:
    """``submit(paths)`` -> a future of :class:`DecodedBatch`, decoded by one of ``workers`` processes.

    Workers are forked (where the OS can) as soon as the pool is made, so make it before loading a
    model or starting threads: forking is then cheap and safe, and the workers' start overlaps with
    the model's.

    ``batch_size`` (the largest batch to be submitted; 0: unknown) sizes the shared-memory slots:
    ``2 × workers + 2`` of them (one per batch in flight, as :class:`~service.score.LocalScorer`
    keeps them, and two spare), within :data:`SHARED_BYTES_CAP`. A batch that finds no free slot,
    or is larger, comes back through the executor's pipe instead: the same result, more CPU in
    this process.
    """

    def __init__(self, workers: int, size: Sequence[int], max_pixels: int = DEFAULT_MAX_PIXELS,
                 gpu_jpegs: bool = False, batch_size: int = 0) -> None:
        self.workers = workers
        self.size = tuple(size)
        self.max_pixels = max_pixels
        self.gpu_jpegs = gpu_jpegs
        self.executor: ProcessPoolExecutor | None = None
        self.slots: list[mmap.mmap] = []
        self.slot_images = batch_size
        self._free: list[int] = []
        self._lock = threading.Lock()
        if workers > 0:
            methods = multiprocessing.get_all_start_methods()
            fork = "fork" in methods
            context = multiprocessing.get_context("fork" if fork else "spawn")
            slot_bytes = batch_size * 3 * self.size[0] * self.size[1]
            if fork and slot_bytes:  # anonymous shared maps are inherited by forked workers only
                count = min(2 * workers + 2, SHARED_BYTES_CAP // slot_bytes)
                self.slots = [mmap.mmap(-1, slot_bytes) for _ in range(count)]
                self._free = list(range(count))
            # A forked worker must never run the destructors of what it inherits (an ONNX Runtime
            # session's, say, waits on its thread pool, whose threads exist only in this process:
            # a worker that garbage-collected one hung). So: collect here, where those threads
            # live, and freeze the rest for the fork (Python's gc docs, "gc.freeze"): the workers'
            # collections never look at inherited objects.
            gc.collect()
            gc.freeze()
            try:
                self.executor = ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init,
                                                    initargs=(self.slots,))
                self.executor.submit(int)  # start the workers now, not at the first batch (forks them)
            finally:
                gc.unfreeze()

    def release(self, slot: int) -> None:
        with self._lock:
            self._free.append(slot)

    def _take_slot(self, images: int) -> int | None:
        if images > self.slot_images:
            return None
        with self._lock:
            return self._free.pop() if self._free else None

    def submit(self, paths: Sequence[str]) -> "Future[DecodedBatch] | _Inline | _SlotFuture":
        if self.executor is None:
            return _Inline(list(paths), self.size, self.max_pixels, self.gpu_jpegs)
        slot = self._take_slot(len(paths))
        if slot is None:
            return self.executor.submit(decode_batch, list(paths), self.size, self.max_pixels, self.gpu_jpegs)
        future = self.executor.submit(_decode_into_slot, slot, list(paths), self.size, self.max_pixels,
                                      self.gpu_jpegs)
        return _SlotFuture(future, self, slot)

    def close(self, cancel: bool = False) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=not cancel, cancel_futures=cancel)
            self.executor = None
        # the maps are unmapped when the last reference goes (a batch still held by a caller keeps
        # its own copy of the pixels)
        self.slots, self._free = [], []

    def __enter__(self) -> "DecodePool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(cancel=exc[0] is not None)
