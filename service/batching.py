"""The batching queue: one per API worker, on its event loop.

Requests put their uploads (raw bytes) on the worker's :class:`Batcher`. While a batch runs, the
next requests queue, and the next batch takes everything queued (up to ``max_batch_size``), so
batches grow with load and a lone request never waits for company. A batch is decoded and run
with **one** call of the worker's runner (:mod:`service.runners`).

The queue is bounded: a request that would wait longer than ``max_latency_ms`` (estimated from the
images ahead of it, the batches they will form and a fitted batch cost, :class:`BatchCost`), that
finds ``max_queue`` images waiting, or whose uploads would take the bytes held past
``max_queue_bytes`` (bodies still being received count too: :meth:`Batcher.hold_reading`), is
refused at once with :class:`Overloaded` (the API answers 503 + ``Retry-After``); a request still
queued when its wait passes the cap, or whose client has gone, is dropped before it runs.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence, Union

from service.preprocess import ImageError


class Overloaded(Exception):
    """The queue cannot take this request within its latency cap."""

    def __init__(self, detail: str, retry_after_s: int) -> None:
        super().__init__(detail)
        self.detail = detail
        self.retry_after_s = retry_after_s


@dataclass
class Job:
    """One uploaded image for one model; ``pixels``: the image already decoded at ``size`` when the
    caller decoded it on arrival (:func:`service.pipeline.inline_pixels`), else None."""

    model: str
    data: bytes
    size: tuple[int, int]
    future: asyncio.Future[Any]
    pixels: Any = None
    queued_at: float = field(default_factory=time.monotonic)


Outcome = Union[list[Any], BaseException]  # per job, in order, its row or its ImageError; or what failed the batch


class Runner(Protocol):
    """Decodes and runs one batch of jobs."""

    def start(self, jobs: Sequence[Job], done: Callable[[Outcome], None]) -> None:
        """Begin the batch; call ``done`` once, on the event loop, with its :data:`Outcome`."""


class AsyncRunner:
    """A :class:`Runner` written as a coroutine (``run``), run as a task on the event loop."""

    async def run(self, jobs: Sequence[Job]) -> list[Any]:
        raise NotImplementedError

    def start(self, jobs: Sequence[Job], done: Callable[[Outcome], None]) -> None:
        def finished(task: asyncio.Task[list[Any]]) -> None:
            done(asyncio.CancelledError() if task.cancelled() else task.exception() or task.result())

        asyncio.ensure_future(self.run(jobs)).add_done_callback(finished)


class BatchCost:
    """Run time of a batch as a function of its size, ``t(n) = overhead + per_image * n``, fitted by
    exponentially weighted least squares over the recent batches (weight ``decay`` per batch).

    Both terms matter: a batch's fixed cost (a thread hop, an engine call, a GPU launch) dominates
    small batches, its per-image cost (decoding) large ones. Dividing a batch's time by its size
    (the estimate used before) takes a lone request's round trip for the cost of every image: after
    a few slow lone requests at start-up, 16 queued images looked 16 round trips away (2.4 s) though
    they run as one batch, and requests were refused with 503. Until batches of different sizes
    have been seen, the two terms cannot be told apart, and the prediction is the lower of the two
    readings (``min(t, t * n / mean size)``): a refusal needs evidence; the hard cap at dequeue time
    (:meth:`Batcher._take`) still bounds every wait."""

    def __init__(self, decay: float = 0.9) -> None:
        self.decay = decay
        self.weight = self.size = self.size2 = self.time = self.size_time = 0.0  # weighted sums
        self._terms: tuple[float, float] | None = None  # the fit, redone once per observed batch

    def observe(self, size: int, seconds: float) -> None:
        d = self.decay
        self.weight = d * self.weight + 1
        self.size = d * self.size + size
        self.size2 = d * self.size2 + size * size
        self.time = d * self.time + seconds
        self.size_time = d * self.size_time + size * seconds
        self._terms = self._fit()

    def terms(self) -> tuple[float, float] | None:
        """(overhead, per_image) in seconds, both >= 0; None when the sizes seen so far do not
        separate them (or nothing has been seen)."""
        return self._terms

    def _fit(self) -> tuple[float, float] | None:
        mean_n, mean_t = self.size / self.weight, self.time / self.weight
        var_n = self.size2 / self.weight - mean_n * mean_n
        if var_n <= 1e-6 * max(1.0, mean_n * mean_n):
            return None
        per_image = (self.size_time / self.weight - mean_n * mean_t) / var_n
        overhead = mean_t - per_image * mean_n
        if per_image < 0:  # bigger batches were not slower: all overhead
            return mean_t, 0.0
        if overhead < 0:  # fit through the origin
            return 0.0, self.size_time / self.size2
        return overhead, per_image

    def seconds(self, size: int) -> float:
        """Predicted run time of a batch of ``size`` images (0 before any batch has run)."""
        if size <= 0 or not self.weight:
            return 0.0
        if self._terms is None:
            mean_n, mean_t = self.size / self.weight, self.time / self.weight
            return min(mean_t, mean_t * size / mean_n)
        return self._terms[0] + self._terms[1] * size


class Batcher:
    """A bounded, latency-capped batching queue on the worker's event loop (see module doc)."""

    def __init__(self, runner: Runner, max_batch_size: int, max_latency_ms: int, max_queue: int,
                 batching: bool = True, in_flight: int = 1, max_queue_bytes: int = 0) -> None:
        self.runner = runner
        self.max_batch_size = max_batch_size if batching else 1
        self.max_wait_s = max_latency_ms / 1000
        self.max_queue = max_queue
        self.max_queue_bytes = max_queue_bytes  # 0: no cap
        self.in_flight_limit = in_flight
        self.queue: deque[Job] = deque()
        self.in_flight = 0  # images in batches being run
        self.running = 0  # batches being run
        self.waiting_bytes = 0  # upload bytes queued or in batches being run
        self.reading_bytes = 0  # request bytes received by this worker's endpoints, not yet queued
        self.cost = BatchCost()  # fitted run time of a batch by its size
        self.batches = 0  # batches run (one runner call each)
        self.dropped = 0  # jobs dropped before running: client gone or waited past the cap

    def expected_wait_s(self, extra: int) -> float:
        """Time until ``extra`` more images would be answered: the queued images and theirs run as
        batches of up to ``max_batch_size`` (the next batch takes everything queued), after the
        running batches when no batch slot is free; the batches' predicted run times
        (:class:`BatchCost`) are shared by the batch slots."""
        queued = len(self.queue) + extra
        full, rest = divmod(queued, self.max_batch_size)
        work = full * self.cost.seconds(self.max_batch_size) + self.cost.seconds(rest)
        if self.running >= self.in_flight_limit:
            work += self.running * self.cost.seconds(math.ceil(self.in_flight / self.running))
        return work / self.in_flight_limit

    def retry_after_s(self) -> int:
        """The ``Retry-After`` of a refusal: the queue's expected drain time, at least 1 s."""
        return max(1, math.ceil(self.expected_wait_s(0)))

    def refusal(self, images: int, nbytes: int = 0) -> Overloaded | None:
        """Why ``images`` more images (``nbytes`` of uploads) cannot be queued now (None: they can).
        Cheap: the endpoint asks (with ``nbytes`` 0) before reading a request's body, so refusing
        under overload costs next to nothing."""
        waiting = len(self.queue) + self.in_flight
        if waiting + images > self.max_queue:
            return Overloaded(f"{waiting} images are queued in this worker (IMGCLF_MAX_QUEUE={self.max_queue})",
                              self.retry_after_s())
        if self.max_queue_bytes and waiting and self.waiting_bytes + nbytes > self.max_queue_bytes:
            return Overloaded(f"{self.waiting_bytes} bytes of uploads are queued in this worker "
                              f"(IMGCLF_MAX_QUEUE_BYTES={self.max_queue_bytes})",
                              self.retry_after_s())
        wait = self.expected_wait_s(images)
        if wait > self.max_wait_s and waiting:
            return Overloaded(f"expected queue wait {wait * 1000:.0f} ms exceeds IMGCLF_MAX_LATENCY_MS="
                              f"{self.max_wait_s * 1000:.0f}", max(1, math.ceil(wait)))
        return None

    def hold_reading(self, nbytes: int, own: int) -> Overloaded | None:
        """Count ``nbytes`` more of a request body being received (``own``: that request's bytes so
        far, these included; :meth:`release_reading` gives them back). Bodies being received count
        against ``max_queue_bytes`` with the queued uploads, so the upload bytes a worker holds stay
        under the cap plus one body however many clients upload at once; past it the request is
        refused (the caller answers 503), unless it is the only one holding bytes."""
        self.reading_bytes += nbytes
        held = self.waiting_bytes + self.reading_bytes
        if self.max_queue_bytes and held > self.max_queue_bytes and held > own:
            return Overloaded(f"{held} bytes of uploads are held in this worker, being received or queued "
                              f"(IMGCLF_MAX_QUEUE_BYTES={self.max_queue_bytes})",
                              self.retry_after_s())
        return None

    def release_reading(self, nbytes: int) -> None:
        self.reading_bytes -= nbytes

    def submit(self, model: str, blobs: Sequence[bytes], size: tuple[int, int],
               pixels: Sequence[Any] | None = None) -> list[asyncio.Future[Any]]:
        """Queue one job per blob (``pixels``: per blob, its image already decoded, or None); raises
        :class:`Overloaded` when the queue cannot take them."""
        if (refused := self.refusal(len(blobs), sum(len(blob) for blob in blobs))) is not None:
            raise refused
        loop = asyncio.get_running_loop()
        futures = []
        for blob, decoded in zip(blobs, pixels or [None] * len(blobs)):
            future = loop.create_future()
            self.queue.append(Job(model, blob, size, future, decoded))
            self.waiting_bytes += len(blob)
            futures.append(future)
        self._start(loop)
        return futures

    def _take(self) -> list[Job]:
        """The next batch: live jobs only (a cancelled future: its client has gone)."""
        batch: list[Job] = []
        now = time.monotonic()
        while self.queue and len(batch) < self.max_batch_size:
            job = self.queue.popleft()
            if job.future.done():
                self.dropped += 1
                self.waiting_bytes -= len(job.data)
                continue
            if now - job.queued_at > self.max_wait_s:
                self.dropped += 1
                self.waiting_bytes -= len(job.data)
                job.future.set_exception(Overloaded(
                    f"waited {(now - job.queued_at) * 1000:.0f} ms in the queue (IMGCLF_MAX_LATENCY_MS)",
                    self.retry_after_s()))
                continue
            batch.append(job)
        return batch

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        while self.running < self.in_flight_limit and self.queue:
            batch = self._take()
            if not batch:
                return
            self.running += 1
            self.in_flight += len(batch)
            # The runner calls back when the batch is done, and the callback starts the next batch
            # in the same event-loop iteration; awaiting it in a task took two more iterations
            # (the batch thread idled ~3 ms between batches; docs/SERVING.md).
            finish = functools.partial(self._finish, batch, time.perf_counter())
            try:
                self.runner.start(batch, finish)
            except Exception as exc:  # the runner could not start: the batch fails with it
                finish(exc)

    def _finish(self, batch: list[Job], began: float, outcome: Outcome) -> None:
        rows = [outcome] * len(batch) if isinstance(outcome, BaseException) else outcome
        self.cost.observe(len(batch), time.perf_counter() - began)
        self.batches += 1
        self.running -= 1
        self.in_flight -= len(batch)
        self.waiting_bytes -= sum(len(job.data) for job in batch)
        for job, row in zip(batch, rows):
            if job.future.done():  # cancelled meanwhile: its client has gone
                continue
            if isinstance(row, BaseException) and not isinstance(row, ImageError):
                job.future.set_exception(row)
            else:
                job.future.set_result(row)
        self._start(asyncio.get_running_loop())
