"""Scoring on Ray Data (``--engine ray``): ``read_binary_files`` -> decode tasks running
:func:`service.pipeline.decode_batch` -> a pool of model actors. Ray is imported only here, and
only when a :class:`RayScorer` is made."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from service.card import ModelCard, read_card
from service.ood import width
from service.pipeline import DecodedBatch, Predictions, decode_batch, predict
from service.preprocess import DEFAULT_MAX_PIXELS, ImageError
from service.registry import load_model, verify_artifact
from service.score.rows import ScoredBatch
from service.score.sources import model_folder


def _ray_decode(batch: dict[str, np.ndarray], size: Sequence[int], max_pixels: int) -> dict[str, np.ndarray]:
    """Ray Data task: file bytes -> one row per file, its (3, H, W) uint8 pixels (zeros for a file
    that could not be decoded) and its error and detail (empty for a decoded file)."""
    n = len(batch["path"])
    decoded = decode_batch([bytes(data) for data in batch["bytes"]], size, max_pixels)
    pixels = np.zeros((n, 3, *size), dtype=np.uint8)
    pixels[decoded.good] = decoded.pixels
    errors, details = np.full(n, "", dtype=object), np.full(n, "", dtype=object)
    for i, error in decoded.errors:
        errors[i], details[i] = error.error, error.detail
    return {"path": batch["path"], "pixels": pixels, "error": errors, "detail": details}


class _RayPredict:
    """Ray Data actor: loads the model once, then scores batches (on a GPU when Ray gives it one)."""

    def __init__(self, model_dir: str, backend: str, device: str) -> None:
        self.model = load_model(Path(model_dir), backend, device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        good = [i for i, error in enumerate(batch["error"]) if not error]
        scored = predict(self.model.predict, DecodedBatch(batch["pixels"][good], good))
        probabilities = np.zeros((len(batch["error"]), width(self.model.card)), dtype=np.float32)
        probabilities[scored.good] = scored.probabilities
        return {"path": batch["path"], "probabilities": probabilities, "error": batch["error"],
                "detail": batch["detail"]}


def batch_predictions(batch: dict[str, np.ndarray]) -> Predictions:
    """A scored Ray batch's rows -> :class:`~service.pipeline.Predictions`."""
    return Predictions.from_rows([
        ImageError(str(error), str(detail)) if error else probabilities
        for probabilities, error, detail in zip(batch["probabilities"], batch["error"], batch["detail"])])


class RayScorer:
    """The same scoring on Ray Data: ``read_binary_files`` -> decode tasks -> model actor pool.

    ``ray.init()`` joins the cluster named by ``RAY_ADDRESS`` when set, else starts a local Ray.
    Files are read as bytes and decoded by the service's own pipeline (not ``read_images``), so
    preprocessing is identical to the API's and a bad file becomes an error row, not a failed job.
    ``card``: the model's card when the caller has read it already.
    """

    def __init__(self, models_dir: Path, model: str, backend: str, device: str, batch_size: int,
                 actors: int, max_pixels: int = DEFAULT_MAX_PIXELS, card: ModelCard | None = None) -> None:
        import ray

        self.model_dir = model_folder(models_dir, model)
        self.card = card or read_card(self.model_dir)
        verify_artifact(self.model_dir, self.card, backend)  # fail here, not inside every actor
        if not ray.is_initialized():
            ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
        self.backend, self.device = backend, device
        self.batch_size, self.actors, self.max_pixels = batch_size, actors, max_pixels

    def score(self, paths: Sequence[Path], names: Sequence[str]) -> Iterator[ScoredBatch]:
        """The batches as Ray hands them back (``names``: one per path)."""
        import ray

        name_of = {str(p): name for p, name in zip(paths, names)}
        gpus = ray.cluster_resources().get("GPU", 0)
        ds = ray.data.read_binary_files(list(name_of), include_paths=True)
        # decoding runs as stateless tasks on any free CPU; the model lives in a pool of actors
        ds = ds.map_batches(_ray_decode, fn_kwargs={"size": self.card.input.size, "max_pixels": self.max_pixels},
                            batch_size=self.batch_size, batch_format="numpy")
        ds = ds.map_batches(_RayPredict, fn_constructor_kwargs={
                                "model_dir": str(self.model_dir), "backend": self.backend,
                                "device": "cuda" if gpus else "cpu"},
                            batch_size=self.batch_size, concurrency=self.actors,
                            num_gpus=1 if gpus else 0, batch_format="numpy")
        for batch in ds.iter_batches(batch_size=self.batch_size, batch_format="numpy"):
            yield ScoredBatch([name_of[str(p)] for p in batch["path"]], batch_predictions(batch))

    def close(self, cancel: bool = False) -> None:
        pass
