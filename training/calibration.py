"""Calibrated probabilities: temperature scaling (Guo et al., 2017) and the measures that judge it.

One scalar ``T`` is fitted on the validation split by minimising the negative log-likelihood of
``softmax(logits / T)`` (LBFGS on ``log T``, so ``T`` stays positive); the argmax, hence accuracy,
does not change. The expected calibration error (ECE) bins the test predictions by confidence
(15 equal-width bins) and averages |accuracy - confidence| weighted by the bin's share of images.

Everything here takes logits. For an exported graph that already ends in a softmax, use
:func:`logits_from_probabilities`: ``log p`` differs from the logits by one constant per image, so
``softmax(log p / T)`` is exactly the temperature-scaled softmax of the original logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

ECE_BINS = 15


def as_tensor(values: np.ndarray | torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    tensor = values if isinstance(values, torch.Tensor) else torch.from_numpy(np.asarray(values))
    return tensor.detach().cpu().to(dtype)


def logits_from_probabilities(probabilities: np.ndarray | torch.Tensor, floor: float = 1e-30) -> torch.Tensor:
    """``log p``: logits up to a per-image constant (exact for temperature scaling)."""
    return torch.log(as_tensor(probabilities).clamp_min(floor))


def nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``softmax(logits / temperature)``."""
    return float(F.cross_entropy(as_tensor(logits) / temperature, as_tensor(labels, torch.long)))


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 200) -> float:
    """The temperature minimising the NLL of ``softmax(logits / T)`` on (``logits``, ``labels``)."""
    logits, labels = as_tensor(logits), as_tensor(labels, torch.long)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp())


@dataclass
class Reliability:
    """Per-bin statistics of a reliability diagram."""

    edges: np.ndarray        # (bins + 1,)
    confidence: np.ndarray   # mean top-1 probability per bin (nan where empty)
    accuracy: np.ndarray     # accuracy per bin (nan where empty)
    counts: np.ndarray       # images per bin
    ece: float


def reliability(probabilities: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor,
                bins: int = ECE_BINS) -> Reliability:
    probs = as_tensor(probabilities)
    labels = as_tensor(labels, torch.long)
    confidence, predicted = probs.max(1)
    correct = (predicted == labels).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    # bin i holds (edges[i], edges[i+1]]; a confidence of exactly 0 cannot occur for a top-1 prob
    index = torch.bucketize(confidence, edges[1:-1], right=False).clamp(0, bins - 1)
    counts = torch.bincount(index, minlength=bins).double()
    conf_sum = torch.bincount(index, weights=confidence, minlength=bins)
    acc_sum = torch.bincount(index, weights=correct, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = (conf_sum / counts).numpy()
        acc = (acc_sum / counts).numpy()
    ece = float((acc_sum - conf_sum).abs().sum() / max(len(labels), 1))
    return Reliability(edges.numpy(), conf, acc, counts.numpy().astype(int), ece)


def expected_calibration_error(probabilities: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor,
                               bins: int = ECE_BINS) -> float:
    return reliability(probabilities, labels, bins).ece


def softmax(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    return torch.softmax(as_tensor(logits) / temperature, dim=1)


def calibration_summary(val_logits: torch.Tensor, val_labels: torch.Tensor, test_logits: torch.Tensor,
                        test_labels: torch.Tensor, bins: int = ECE_BINS) -> dict[str, Any]:
    """Fit ``T`` on validation; ECE and NLL on test before (T = 1) and after. The card's record."""
    temperature = fit_temperature(val_logits, val_labels)
    before, after = softmax(test_logits), softmax(test_logits, temperature)
    return {
        "method": "temperature scaling: one scalar T fitted on the validation split by NLL (LBFGS on log T); "
                  "the graphs output softmax(logits / T)",
        "temperature": temperature,
        "fitted_on_images": int(len(val_labels)),
        "measured_on_images": int(len(test_labels)),
        "ece_bins": bins,
        "test_ece_before": expected_calibration_error(before, test_labels, bins),
        "test_ece_after": expected_calibration_error(after, test_labels, bins),
        "test_nll_before": nll(test_logits, test_labels),
        "test_nll_after": nll(test_logits, test_labels, temperature),
    }
