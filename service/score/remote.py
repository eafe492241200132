"""Scoring through a running server: batches of files POSTed to ``/classify_batch`` with bounded
concurrency and retries; each answer becomes :class:`~service.pipeline.Predictions`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from service.card import ModelCard
from service.pipeline import Predictions
from service.preprocess import ImageError
from service.score.errors import ScoreError
from service.score.rows import ScoredBatch


def answer_predictions(results: Sequence[dict[str, Any]], card: ModelCard) -> Predictions:
    """``/classify_batch``'s per-file results (probabilities by class name, and the OOD score for a
    model with one; or error and detail), as the model's own output rows (:mod:`service.ood`)."""
    classes, ood = card.classes, card.ood is not None
    return Predictions.from_rows([
        ImageError(r["error"], str(r["detail"])) if "error" in r
        else np.array([r["probabilities"][c] for c in classes] + ([r["ood_score"]] if ood else []), np.float32)
        for r in results])


class RemoteScorer:
    """POST batches of files to ``/classify_batch`` with bounded concurrency and retries."""

    def __init__(self, url: str, model: str, batch_size: int, concurrency: int, retries: int = 5) -> None:
        import httpx

        self.url = url.rstrip("/")
        self.model = model
        self.batch_size = batch_size
        self.concurrency = concurrency
        self.retries = retries
        try:
            response = httpx.get(f"{self.url}/models/{model}", timeout=30)
        except httpx.HTTPError as exc:
            raise ScoreError(f"{self.url} does not answer ({type(exc).__name__}: {exc})") from None
        if response.status_code != 200:
            raise ScoreError(f"{self.url} does not serve model {model!r} "
                             f"(HTTP {response.status_code}: {' '.join(response.text.split())[:200]})")
        self.card = ModelCard.from_dict(response.json(), f"{self.url}/models/{model}")

    async def _post(self, client: Any, chunk: Sequence[Path], names: list[str]) -> ScoredBatch:
        import asyncio

        import httpx

        files = [("images", (p.name, p.read_bytes())) for p in chunk]
        for attempt in range(self.retries + 1):
            try:
                response = await client.post(f"{self.url}/classify_batch", files=files,
                                             data={"model": self.model, "top_k": "1"})
                if response.status_code != 503:
                    break
            except httpx.TransportError as exc:
                if attempt == self.retries:
                    raise ScoreError(f"{self.url} stopped answering ({type(exc).__name__}: {exc})") from None
            await asyncio.sleep(min(8.0, 0.25 * 2 ** attempt))
        if response.status_code != 200:
            raise ScoreError(f"{self.url}/classify_batch answered HTTP {response.status_code}: "
                             f"{' '.join(response.text.split())[:200]}")
        return ScoredBatch(names, answer_predictions(response.json()["results"], self.card))

    def score(self, paths: Sequence[Path], names: Sequence[str]) -> Iterator[ScoredBatch]:
        """The batches in the order the server answers them (``names``: one per path)."""
        import asyncio

        import httpx

        names = list(names)
        starts = range(0, len(paths), self.batch_size)
        queue: asyncio.Queue = asyncio.Queue()

        async def run() -> None:
            limit = asyncio.Semaphore(self.concurrency)
            async with httpx.AsyncClient(timeout=120) as client:
                async def one(i: int) -> ScoredBatch:
                    async with limit:
                        return await self._post(client, paths[i:i + self.batch_size], names[i:i + self.batch_size])
                for done in asyncio.as_completed([one(i) for i in starts]):
                    try:
                        await queue.put(await done)
                    except Exception as exc:  # handed to the caller, which would otherwise wait forever
                        await queue.put(exc if isinstance(exc, ScoreError) else ScoreError(f"{type(exc).__name__}: {exc}"))
                        return

        loop = asyncio.new_event_loop()
        task = loop.create_task(run())
        try:
            for _ in starts:
                item = loop.run_until_complete(queue.get())
                if isinstance(item, ScoreError):
                    raise item
                yield item
            loop.run_until_complete(task)
        finally:
            task.cancel()
            try:
                loop.run_until_complete(task)
            except (asyncio.CancelledError, Exception):
                pass
            loop.close()

    def close(self, cancel: bool = False) -> None:
        pass
