"""What every scorer yields, a :class:`ScoredBatch`, and the output rows made from it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from service.pipeline import Predictions
from service.score.sources import LabelFinder


@dataclass
class ScoredBatch:
    """One batch: every file's name relative to the scored folder, and the batch's
    :class:`~service.pipeline.Predictions` (their indices index ``names``)."""

    names: list[str]
    predictions: Predictions


def output_columns(classes: Sequence[str]) -> list[str]:
    return ["path", "label", "probability", *[f"p_{c}" for c in classes], "true_label", "model_version"]


def batch_rows(batch: ScoredBatch, classes: Sequence[str], version: str, labels: LabelFinder) -> list[dict[str, Any]]:
    """Output rows of a batch's scored files (one numpy call per batch, not per row)."""
    scored = batch.predictions
    columns = [f"p_{c}" for c in classes]
    best = scored.probabilities.argmax(1).tolist() if scored.good else []
    values = scored.probabilities.tolist()
    rows = []
    for i, b, p in zip(scored.good, best, values):
        path = batch.names[i]
        rows.append({"path": path, "label": classes[b], "probability": p[b], **dict(zip(columns, p)),
                     "true_label": labels(path) or "", "model_version": version})
    return rows


def error_rows(batch: ScoredBatch) -> list[dict[str, str]]:
    """``path, error, detail`` of a batch's files that could not be scored."""
    return [{"path": batch.names[i], "error": error.error, "detail": error.detail}
            for i, error in batch.predictions.errors]
