"""Decoding batches of image files in worker processes, so that decoding grows with a host's cores
instead of sharing one interpreter's GIL.

:class:`DecodePool` runs :func:`service.pipeline.decode_batch` (the one image pipeline: the
decoding contract, the plain-JPEG fast path, per-file :class:`~service.preprocess.ImageError`)
in ``workers`` processes; ``0`` decodes in the calling process, the single-process reference
path. Workers ignore SIGINT: Ctrl-C is the parent's to handle.

The workers write the pixels into shared-memory slots (``multiprocessing.shared_memory``, made by
the pool before it starts the workers) and send back only the batch's bookkeeping, so the
collecting process does not receive and unpickle every image through a pipe (3-10 us an image on
2 cores, up to a sixth of a worker's decoding: the ceiling on how decoding scales with
processes). Each task names its slot; the worker attaches to it for that task only, so a worker
keeps no state between tasks. The pool unlinks its slots when it is closed (also on Ctrl-C, or
when a worker died), and when it is garbage-collected unclosed.

Nothing here imports torch: on CPU hosts decoding costs no framework start-up.
"""

from __future__ import annotations

import gc
import mmap
import multiprocessing
import os
import signal
import threading
import traceback
import weakref
from concurrent.futures import Future, ProcessPoolExecutor
from multiprocessing.shared_memory import SharedMemory
from typing import Sequence

import numpy as np
from PIL import Image

from service.config import host_cores
from service.pipeline import DecodedBatch, decode_batch
from service.preprocess import DEFAULT_MAX_PIXELS

SHARED_BYTES_CAP = 1 << 30  # shared-memory slots per pool; batches that do not fit travel by pipe
SHM_DIR = "/dev/shm"  # where POSIX shared memory is (Linux); elsewhere batches travel by pipe


def resolve_workers(value: str | int) -> int:
    """``auto`` -> cores - 1 (one core is left to the model and the writer), at least 1; else N >= 0."""
    if value == "auto":
        return max(1, host_cores() - 1)
    workers = int(value)
    if workers < 0:
        raise ValueError(f"workers must be 'auto' or >= 0, not {value}")
    return workers


class _Inline:
    """The ``workers=0`` path: decodes in the calling process when the result is asked for."""

    def __init__(self, paths: Sequence[str], size: Sequence[int], max_pixels: int, gpu_jpegs: bool) -> None:
        self.paths, self.size, self.max_pixels, self.gpu_jpegs = paths, size, max_pixels, gpu_jpegs

    def result(self) -> DecodedBatch:
        return decode_batch(self.paths, self.size, self.max_pixels, gpu_jpegs=self.gpu_jpegs)

    def cancel(self) -> bool:
        return True


def _worker_init() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group
    Image.preinit()  # the JPEG/PNG/... plugins, once per worker rather than in the first batch


def slot_view(buffer: "memoryview | mmap.mmap", images: int, size: Sequence[int]) -> np.ndarray:
    """The first ``images`` (3, h, w) uint8 images of a shared-memory slot, as a writable view."""
    count = images * 3 * size[0] * size[1]
    return np.frombuffer(buffer, np.uint8, count=count).reshape(images, 3, *size)


def map_slot(name: str, images: int, size: Sequence[int]) -> mmap.mmap:
    """The first ``images`` images of the slot named ``name``, mapped for one task. Its pages are
    populated by the one ``mmap`` call (``MAP_POPULATE``: a third of the cost of faulting them in
    image by image, measured); and, unlike attaching a ``SharedMemory``, it registers nothing with
    Python's resource tracker, so only the pool that made the slot answers for it."""
    fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR)
    try:
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        return mmap.mmap(fd, images * 3 * size[0] * size[1], flags=flags)
    finally:
        os.close(fd)


def _decode_into_slot(slot: str, paths: Sequence[str], size: Sequence[int], max_pixels: int,
                      gpu_jpegs: bool) -> DecodedBatch:
    """In a worker: :func:`~service.pipeline.decode_batch` with the pixels written into the
    shared-memory slot named ``slot``; the batch sent back carries no pixels (the parent reads
    ``len(good)`` images from the slot)."""
    shared = map_slot(slot, len(paths), size)
    try:
        batch = decode_batch(paths, size, max_pixels, gpu_jpegs=gpu_jpegs,
                             out=slot_view(shared, len(paths), size))
        batch.pixels = np.empty((0, 3, *size), np.uint8)
        for _, error in batch.errors:  # their tracebacks hold decode_batch's frame, whose locals view the slot
            traceback.clear_frames(error.__traceback__)
        return batch
    finally:
        try:
            shared.close()
        except BufferError:  # an unexpected exception's frames still view the slot: unmapped when collected
            pass


def _unlink(slots: list[SharedMemory]) -> None:
    """Close and remove the pool's slots (a worker still writing keeps its own mapping)."""
    for shared in slots:
        try:
            shared.close()
        except BufferError:  # a view still alive in some frame: the name is removed all the same
            pass
        try:
            shared.unlink()
        except FileNotFoundError:
            pass
    slots.clear()


class _SlotFuture:
    """A batch decoded into a shared-memory slot: :meth:`result` copies its pixels out and frees
    the slot (a slot is reused only once its batch is done, never while a worker may write it)."""

    def __init__(self, future: "Future[DecodedBatch]", pool: "DecodePool", slot: int) -> None:
        self.future, self.pool, self.slot = future, pool, slot

    def result(self) -> DecodedBatch:
        try:
            batch = self.future.result()
            view = slot_view(self.pool.slots[self.slot].buf, len(batch.good), self.pool.size)
            batch.pixels = view.copy()
            del view
            return batch
        finally:
            self.pool.release(self.slot)

    def cancel(self) -> bool:
        if self.future.cancel():
            self.pool.release(self.slot)
            return True
        return False


class DecodePool:
    """``submit(paths)`` -> a future of :class:`~service.pipeline.DecodedBatch`, decoded by one of
    ``workers`` processes.

    Workers are forked (where the OS can) as soon as the pool is made, so make it before loading a
    model or starting threads: forking is then cheap and safe, and the workers' start overlaps with
    the model's.

    ``batch_size`` (the largest batch to be submitted; 0: unknown) sizes the shared-memory slots:
    ``2 × workers + 2`` of them (one per batch in flight, as :class:`service.score.LocalScorer`
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
        self.slots: list[SharedMemory] = []
        self.slot_images = batch_size
        self._free: list[int] = []
        self._lock = threading.Lock()
        self._unlink = weakref.finalize(self, _unlink, self.slots)  # also when never closed
        if workers > 0:
            self._start(batch_size)

    def _start(self, batch_size: int) -> None:
        slot_bytes = batch_size * 3 * self.size[0] * self.size[1]
        if slot_bytes and os.path.isdir(SHM_DIR):
            count = min(2 * self.workers + 2, SHARED_BYTES_CAP // slot_bytes)
            self.slots.extend(SharedMemory(create=True, size=slot_bytes) for _ in range(count))
            self._free = list(range(count))
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        # A forked worker must never run the destructors of what it inherits (an ONNX Runtime
        # session's, say, waits on its thread pool, whose threads exist only in this process:
        # a worker that garbage-collected one hung). So: collect here, where those threads
        # live, and freeze the rest for the fork (Python's gc docs, "gc.freeze"): the workers'
        # collections never look at inherited objects.
        gc.collect()
        gc.freeze()
        try:
            self.executor = ProcessPoolExecutor(self.workers, mp_context=context, initializer=_worker_init)
            self.executor.submit(int)  # start the workers now, not at the first batch (forks them)
        except BaseException:
            self._unlink()
            raise
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
            return self.executor.submit(decode_batch, list(paths), self.size, self.max_pixels,
                                        gpu_jpegs=self.gpu_jpegs)
        future = self.executor.submit(_decode_into_slot, self.slots[slot].name, list(paths), self.size,
                                      self.max_pixels, self.gpu_jpegs)
        return _SlotFuture(future, self, slot)

    def close(self, cancel: bool = False) -> None:
        """Stop the workers and remove the shared-memory slots (a batch already collected keeps its
        own pixels). ``cancel``: drop the batches not started; the ones running (one a worker at
        the most) are waited for either way, so that no worker is writing a slot as it goes (the
        interpreter's exit would wait for them too)."""
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=cancel)
            self.executor = None
        self._free = []
        self._unlink()

    def __enter__(self) -> "DecodePool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(cancel=exc[0] is not None)
