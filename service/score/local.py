"""In-process scoring: files decoded in worker processes (:class:`~service.decode_pool.DecodePool`,
which runs :func:`service.pipeline.decode_batch`) while the model runs on the previous batch."""

from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from service.card import ModelCard, read_card
from service.decode_pool import DecodePool
from service.pipeline import DecodedBatch, Predictions, predict
from service.preprocess import DEFAULT_MAX_PIXELS
from service.registry import LoadedModel, load_model
from service.score.cuda import GpuJpegDecoder, PinnedCudaRunner, resolve_device
from service.score.errors import ScoreError
from service.score.rows import ScoredBatch
from service.score.sources import model_folder


class LocalScorer:
    """Decode batches in worker processes while the model runs on the previous one. ``2 × workers``
    batches (at least 2) are in flight, so every worker has its next batch queued while the model
    waits for the oldest one. ``card``: the model's card when the caller has read it already."""

    def __init__(self, models_dir: Path, model: str, backend: str, device: str, batch_size: int,
                 workers: int, max_pixels: int = DEFAULT_MAX_PIXELS, decode: str = "cpu",
                 card: ModelCard | None = None) -> None:
        self.folder = model_folder(models_dir, model)
        self.card = card or read_card(self.folder)
        self.backend, self.device, self.decode = backend, device, decode
        self.batch_size, self.max_pixels = batch_size, max_pixels
        self.ahead = max(2, 2 * workers)
        # workers first: they fork from a process with no model and no threads yet
        self.pool = DecodePool(workers, self.card.input.size, max_pixels, gpu_jpegs=decode == "gpu",
                               batch_size=batch_size)
        self.model: LoadedModel | None = None
        self.run: Callable[[np.ndarray], np.ndarray] = self._not_loaded
        self.gpu: GpuJpegDecoder | None = None

    @staticmethod
    def _not_loaded(batch: np.ndarray) -> np.ndarray:
        raise RuntimeError("LocalScorer.load() first")

    def load(self) -> None:
        """Load the model (and pick its batch runner); :meth:`score` does it once the first batches
        are decoding, so the two overlap."""
        if self.model is not None:
            return
        try:
            self.model = load_model(self.folder, self.backend, resolve_device(self.device))
        except BaseException:
            self.pool.close(cancel=True)
            raise
        self.run = self.model.predict
        spec, device = self.model.card.input, self.model.backend.device
        if self.backend == "torchscript" and device == "cuda":
            self.run = PinnedCudaRunner(self.model.backend, spec.mean, spec.std, self.batch_size, spec.size)
        if self.decode == "gpu":
            if device != "cuda":
                self.pool.close(cancel=True)
                raise ScoreError(f"--decode gpu needs the model on a CUDA GPU; it runs on {device}")
            self.gpu = GpuJpegDecoder(spec.size, self.max_pixels)

    def score(self, paths: Sequence[Path], names: Sequence[str]) -> Iterator[ScoredBatch]:
        """Submit the first batches, load the model, then yield the scored batches in order
        (``names``: the files' names relative to the scored folder, one per path)."""
        files, names = [str(p) for p in paths], list(names)
        starts = range(0, len(files), self.batch_size)
        pending = deque(self.pool.submit(files[i:i + self.batch_size]) for i in starts[:self.ahead])
        try:
            self.load()
        except BaseException:
            for future in pending:
                future.cancel()
            raise
        return self._batches(files, names, starts, pending)

    def _batches(self, files: list[str], names: list[str], starts: range, pending: deque) -> Iterator[ScoredBatch]:
        try:
            for n, i in enumerate(starts):
                decoded = pending.popleft().result()
                if n + self.ahead < len(starts):
                    j = starts[n + self.ahead]
                    pending.append(self.pool.submit(files[j:j + self.batch_size]))
                yield ScoredBatch(names[i:i + self.batch_size], self._predict(decoded))
        finally:
            for future in pending:
                future.cancel()

    def _predict(self, decoded: DecodedBatch) -> Predictions:
        """The model's answers for a decoded batch (its handed-over JPEGs decoded on the GPU first)."""
        if self.gpu is None or not decoded.jpegs:
            return predict(self.run, decoded)
        images, good, errors = self.gpu.assemble(decoded)
        probabilities = self._run_cuda(images) if good else np.empty((0, 0), np.float32)
        return Predictions(probabilities, good, errors)

    def _run_cuda(self, images: Any) -> np.ndarray:
        if isinstance(self.run, PinnedCudaRunner):
            return self.run.run_cuda(images)
        return self.run(images.cpu().numpy())  # ONNX Runtime takes host arrays

    def close(self, cancel: bool = False) -> None:
        self.pool.close(cancel)
