"""Where a worker's batch becomes probabilities: the two runners a :class:`~service.batching.Batcher`
calls, one call per batch.

* :class:`LocalRunner` (``layout=inprocess``, CPU hosts): decode and model in one thread hop per
  batch, inside the API worker;
* :class:`RemoteRunner` (``layout=service``, GPU hosts): decode in the API worker, then one call per
  batch (per model) to the engine service that owns the GPU. The engine therefore sees
  ``workers x batches/s`` calls, never one call per request, and no stage that sees every request
  is a single process.

Both decode through :func:`service.pipeline.decode_batch`, the pipeline every other caller uses,
with the worker's one :class:`~service.preprocess.DecodeBudget`.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Awaitable, Callable, Sequence

import numpy as np

from service.batching import AsyncRunner, Job, Outcome
from service.pipeline import DecodedBatch, decode_batch, predict
from service.preprocess import DecodeBudget
from service.registry import LoadedModel

Observe = Callable[[str, int], None]  # (model, images in the call): the batch-size metrics


def by_model(jobs: Sequence[Job]) -> dict[str, list[int]]:
    """The jobs' positions, per model (a batch may mix models)."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, job in enumerate(jobs):
        groups[job.model].append(i)
    return groups


def decode_groups(jobs: Sequence[Job], max_pixels: int,
                  budget: DecodeBudget | None) -> dict[str, tuple[list[int], DecodedBatch]]:
    """Each model's jobs decoded into one batch at that model's input size (a job decoded on arrival
    brings its pixels)."""
    return {model: (index, decode_batch([jobs[i].data if jobs[i].pixels is None else jobs[i].pixels for i in index],
                                        jobs[index[0]].size, max_pixels, budget))
            for model, index in by_model(jobs).items()}


def scatter(rows: list[Any], index: list[int], answers: list[Any]) -> None:
    for i, answer in zip(index, answers):
        rows[i] = answer


def warm_up(models: dict[str, LoadedModel]) -> None:
    """Run each model once at start-up, so the first request does not pay for the runtime's lazy
    initialisation (and the queue's time estimate does not start from it)."""
    for model in models.values():
        for n in (1, 8):
            model.predict(np.zeros((n, 3, *model.card.input.size), np.uint8))


def run_model(model: LoadedModel, pixels: np.ndarray, observe: Observe | None = None) -> np.ndarray:
    """One model call: (N, 3, H, W) uint8 -> (N, classes) probabilities, counted by ``observe``."""
    probabilities = model.predict(pixels)
    if observe is not None:
        observe(model.name, len(pixels))
    return probabilities


class LocalRunner:
    """Decode and run a batch in the API worker, in the runner's thread (one per batch in flight)."""

    def __init__(self, models: dict[str, LoadedModel], max_pixels: int, budget: DecodeBudget | None = None,
                 observe: Observe | None = None, threads: int = 1) -> None:
        self.models = models
        self.max_pixels = max_pixels
        self.budget = budget
        self.observe = observe
        self.executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="imgclf-batch")
        warm_up(models)

    def run(self, jobs: Sequence[Job]) -> list[Any]:
        rows: list[Any] = [None] * len(jobs)
        for model, (index, batch) in decode_groups(jobs, self.max_pixels, self.budget).items():
            scored = predict(lambda pixels: run_model(self.models[model], pixels, self.observe), batch)
            scatter(rows, index, scored.rows())
        return rows

    def start(self, jobs: Sequence[Job], done: Callable[[Outcome], None]) -> None:
        """The batch goes to the thread now; when it ends, ``done`` is queued straight on the event
        loop (``asyncio.to_thread`` passes through an asyncio future and the awaiting task first)."""
        loop = asyncio.get_running_loop()

        def finished(future: Future[list[Any]]) -> None:  # in the runner's thread
            loop.call_soon_threadsafe(done, future.exception() or future.result())

        self.executor.submit(contextvars.copy_context().run, self.run, jobs).add_done_callback(finished)


class RemoteRunner(AsyncRunner):
    """Decode in the API worker, then one engine call per model in the batch."""

    def __init__(self, call: Callable[[str, np.ndarray], Awaitable[np.ndarray]], max_pixels: int,
                 budget: DecodeBudget | None = None) -> None:
        self.call = call
        self.max_pixels = max_pixels
        self.budget = budget

    async def run(self, jobs: Sequence[Job]) -> list[Any]:
        rows: list[Any] = [None] * len(jobs)
        groups = await asyncio.to_thread(decode_groups, jobs, self.max_pixels, self.budget)
        for model, (index, batch) in groups.items():
            probabilities = await self.call(model, batch.pixels) if batch.good else np.empty((0, 0), np.float32)
            scatter(rows, index, batch.scored(probabilities).rows())
        return rows
