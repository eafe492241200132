"""What every scorer yields, a :class:`ScoredBatch`, and the output rows made from it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from service.card import ModelCard
from service.ood import OOD_FIELDS, in_distribution, split
from service.pipeline import Predictions
from service.score.sources import LabelFinder


@dataclass
class ScoredBatch:
    """One batch: every file's name relative to the scored folder, and the batch's
    :class:`~service.pipeline.Predictions` (their indices index ``names``)."""

    names: list[str]
    predictions: Predictions


def output_columns(card: ModelCard) -> list[str]:
    """The output's columns; ``ood_score`` and ``in_distribution`` for a model with an OOD score."""
    return ["path", "label", "probability", *[f"p_{c}" for c in card.classes],
            *(OOD_FIELDS if card.ood else ()), "true_label", "model_version"]


def batch_rows(batch: ScoredBatch, card: ModelCard, labels: LabelFinder) -> list[dict[str, Any]]:
    """Output rows of a batch's scored files (one numpy call per batch, not per row)."""
    scored = batch.predictions
    classes, version = card.classes, card.version
    columns = [f"p_{c}" for c in classes]
    probabilities, scores = split(card, scored.probabilities) if scored.good else (scored.probabilities, None)
    best = probabilities.argmax(1).tolist() if scored.good else []
    values = probabilities.tolist()
    ood: list[dict[str, Any]] = [{}] * len(values)
    if scores is not None:
        ood = [{"ood_score": s, "in_distribution": d}
               for s, d in zip(scores.tolist(), in_distribution(card, scores).tolist())]
    rows = []
    for i, b, p, o in zip(scored.good, best, values, ood):
        path = batch.names[i]
        rows.append({"path": path, "label": classes[b], "probability": p[b], **dict(zip(columns, p)), **o,
                     "true_label": labels(path) or "", "model_version": version})
    return rows


def error_rows(batch: ScoredBatch) -> list[dict[str, str]]:
    """``path, error, detail`` of a batch's files that could not be scored."""
    return [{"path": batch.names[i], "error": error.error, "detail": error.detail}
            for i, error in batch.predictions.errors]
