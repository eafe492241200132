"""The out-of-distribution score in the service: how a model's outputs carry it, and how an answer says it.

A registry entry whose card has an ``ood`` section (:class:`service.card.OODSpec`) has graphs with
two outputs, ``probabilities`` (N, classes) and ``ood_score`` (N,): higher = further from the
training data (docs/OOD.md). The backends (:mod:`service.backends`) return both as **one** float32
array, the score as one more column after the probabilities, so every stage between the model and
the answer (batching, runners, the engine service, :class:`service.pipeline.Predictions`) passes
a single array per batch, as before. An entry without the section returns (N, classes) as before,
and its answers carry neither field (exactly today's answers).

Every answer of an entry with the section carries ``ood_score`` (float) and ``in_distribution``
(``ood_score <= card.ood.threshold``), decided here and nowhere else.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from service.card import ModelCard

OOD_FIELDS = ("ood_score", "in_distribution")


def pack(probabilities: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """(N, classes) probabilities and (N,) scores -> one (N, classes + 1) float32 array."""
    out = np.empty((len(probabilities), probabilities.shape[1] + 1), np.float32)
    out[:, :-1] = probabilities
    out[:, -1] = scores.reshape(-1)
    return out


def width(card: ModelCard) -> int:
    """Columns of the model's output rows: its classes, plus the score when it has one."""
    return len(card.classes) + (1 if card.ood else 0)


def split(card: ModelCard, outputs: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """A batch's model outputs -> (probabilities (N, classes), OOD scores (N,) or None)."""
    if card.ood is None:
        return outputs, None
    return outputs[:, :-1], outputs[:, -1]


def in_distribution(card: ModelCard, scores: Any) -> Any:
    """Per row, whether the score is within the card's threshold (one numpy comparison a batch; a
    bool for one float score)."""
    if card.ood is None:
        raise ValueError(f"model {card.name!r} has no out-of-distribution score")
    return scores <= card.ood.threshold


def answer_fields(card: ModelCard, row: np.ndarray) -> dict[str, Any]:
    """One answer's fields from one output row: ``{}`` for a model without a score."""
    if card.ood is None:
        return {}
    score = float(row[-1])
    return {"ood_score": score, "in_distribution": in_distribution(card, score)}
