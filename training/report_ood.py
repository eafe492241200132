"""The report's out-of-distribution figure: ``report-ood.png``, the histogram of a registry model's
``ood_score`` on its held-out test images (in distribution) and on the proxy OOD sets
(:mod:`training.ood_sets`, a seeded sample of ``scale`` times the sizes export measures on), with
the card's threshold. Drawn for a registry entry whose card has an ``ood`` section (its ONNX
graph returns the score); :mod:`training.report` calls it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from service.card import ModelCard
from training.data import Dataset
from training.evaluation import onnx_image_outputs
from training.ood_sets import ProxySizes, proxy_sets

FIGURE = "report-ood.png"


def plot_ood(card: ModelCard, onnx_path: Path, data: Dataset, test_scores: np.ndarray, path: Path,
             save: Callable[[Any, Path], Path], pyplot: Callable[[], Any], scale: float = 0.25) -> dict[str, Any]:
    """Draw the histogram (log-scaled score axis) and return the numbers behind it."""
    assert card.ood is not None
    dataset = card.dataset
    sets = proxy_sets(dataset, card.input.size, data, ProxySizes.for_dataset(dataset, scale))
    scores = {name: onnx_image_outputs(onnx_path, s.images.numpy(), card.input, 250)[1]
              for name, s in sets.items() if not s.parts}
    threshold = card.ood.threshold
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 6))
    everything = np.concatenate([test_scores, *scores.values()])
    low, high = max(float(everything.min()), 1e-6), float(everything.max())
    bins = np.geomspace(low, high * 1.01, 60)
    def share(values: np.ndarray) -> np.ndarray:  # each set's bars sum to 1, whatever its size
        return np.full(len(values), 1.0 / len(values))

    ax.hist(test_scores, bins=bins, weights=share(test_scores), alpha=0.45, color="#2f6fdb",
            label=f"test split, in distribution ({len(test_scores)})")
    colours = iter(["#b3261e", "#e07b00", "#7a3fb0", "#2a9d8f", "#6b705c"])
    for name, values in scores.items():
        control = sets[name].control
        ax.hist(values, bins=bins, weights=share(values), histtype="step", linewidth=1.6,
                linestyle="--" if control else "-", color="#555555" if control else next(colours),
                label=f"{name} ({len(values)}){' - control, in distribution by class' if control else ''}")
    ax.axvline(threshold, color="black", linewidth=1.2)
    ax.text(threshold, ax.get_ylim()[1] * 0.95, f"  threshold {threshold:.3g}\n  (95 % TPR, validation)",
            va="top", fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("ood_score (log scale; higher = further from the training data)")
    ax.set_ylabel("share of the set's images per bin")
    ax.set_title(f"{card.name} v{card.version}: out-of-distribution score on the test split and the proxy OOD sets\n"
                 f"(seeded samples, {scale:g} x the sizes export measured on; an image is flagged above the threshold)",
                 fontsize=9)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, frameon=False)
    fig.tight_layout()
    save(fig, path)
    return {"threshold": threshold, "test_images": len(test_scores),
            "test_accepted": float((test_scores <= threshold).mean()),
            "sets": {name: {"images": len(v), "accepted": float((v <= threshold).mean())} for name, v in scores.items()},
            "figure": str(path)}
