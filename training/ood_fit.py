"""Fitting an entry's out-of-distribution score at export, and the card's ``ood`` section.

    scorer, section = fit_ood(serving, plain, card.tta_level, data, "catsdogs", card.input.size, card.input)
    graph = WithOOD(serving, plain, level, scorer)      # what install_entry exports

The method is the one docs/OOD.md chose by measurement: the minimum over classes of the
Mahalanobis distance of the L2-normalised penultimate features to the class means, under the
shared within-class covariance approximated by probabilistic PCA (the top 128 principal components
plus an isotropic residual; every component when the features have fewer than 256 dimensions).
Protocol: statistics fitted on the entry's whole **training** split; the threshold at 95 % true
positive rate on the **validation** split; the test split's TPR at it, and AUROC and FPR at it on
each proxy set (:mod:`training.ood_sets`) against the **test** split. The maximum softmax
probability and energy scores are measured beside it on the same images, for the record.

The features are those of the graph that ships: the serving graph with ``scorer=None`` exported
to ONNX and run with ONNX Runtime (several times faster than eager PyTorch for these networks on a
CPU), so the statistics describe exactly what the service will score.
"""

from __future__ import annotations

import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from service.card import OOD_OUTPUTS
from service.preprocess import normalize
from training import ood
from training.data import Dataset
from training.ood_graph import WithOOD, last_linear
from training.ood_sets import ProxySet, ProxySizes, proxy_sets

TPR = 0.95
COMPONENTS = 128  # PPCA components when the features have at least FULL_BELOW dimensions
FULL_BELOW = 256
SHRINKAGE = 1e-3
METHOD = "mahalanobis"
OPSET = 17


def score_text(components: int | None, dim: int) -> str:
    covariance = (f"approximated by its top {components} principal components plus an isotropic residual "
                  f"(probabilistic PCA)" if components else f"in all {dim} dimensions")
    return ("min over classes of the Mahalanobis distance of the L2-normalised penultimate features (the input "
            "of the final Linear, averaged over the test-time augmentation views with their weights) to the "
            f"class means, under the shared within-class covariance {covariance}; higher = further from the "
            "training data")


class FeatureRunner:
    """The serving graph with its features as second output, on ONNX Runtime: uint8 images ->
    (probabilities, features), in batches."""

    def __init__(self, serving: nn.Module, plain: nn.Module, level: int, size: Sequence[int], folder: Path,
                 threads: int = 2) -> None:
        import onnxruntime as ort

        graph = WithOOD(serving, plain, level).eval()
        example = torch.rand(2, 3, *size)
        path = folder / "features.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(graph, (example,), str(path), input_names=["input"],
                              output_names=["probabilities", "features"], opset_version=OPSET, dynamo=False,
                              dynamic_axes={"input": {0: "batch"}, "probabilities": {0: "batch"},
                                            "features": {0: "batch"}})
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        views = {0: 1, 1: 2, 2: 6}[level]
        self.batch = max(1, min(256, (16 << 20) // (4 * 3 * size[0] * size[1] * views)))

    def __call__(self, images: torch.Tensor, spec: Any) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [self.session.run(None, {"input": normalize(images[i:i + self.batch].numpy(), spec)})
                 for i in range(0, len(images), self.batch)]
        return (torch.from_numpy(np.concatenate([p[0] for p in parts])),
                torch.from_numpy(np.concatenate([p[1] for p in parts])))


def head_logits(plain: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """The (averaged) logits of averaged features: the head is linear."""
    head = last_linear(plain)
    with torch.no_grad():
        return head(features)


def set_figures(scores: dict[str, torch.Tensor], threshold: float, name: str) -> dict[str, float]:
    return {"auroc": round(ood.auroc(scores["test"], scores[name]), 6),
            "fpr": round(ood.fpr_at(scores[name], threshold), 6)}


def logit_figures(scores: dict[str, torch.Tensor], names: Sequence[str]) -> dict[str, Any]:
    threshold = ood.threshold_at_tpr(scores["val"], TPR)
    return {"threshold": threshold, "test_tpr": round(ood.tpr_at(scores["test"], threshold), 6),
            "sets": {name: set_figures(scores, threshold, name) for name in names}}


def describe_fit(scorer: ood.MahalanobisScorer, components: int | None,
                 outputs: dict[str, tuple[torch.Tensor, torch.Tensor]], sets: dict[str, ProxySet],
                 plain: nn.Module | None) -> dict[str, Any]:
    """The card's ``ood`` section for ``scorer`` given the graph's ``outputs`` ({split or set:
    (probabilities, features)}): threshold at 95 % TPR on ``val``, figures against ``test``.
    ``plain``: the network, whose linear head gives the logits for the energy score's record
    (None: the maximum softmax probability only)."""
    features = {name: out[1] for name, out in outputs.items()}
    dim = int(features["train"].shape[1])
    with torch.no_grad():
        scores = {name: scorer(f) for name, f in features.items()}
    threshold = ood.threshold_at_tpr(scores["val"], TPR)
    names = list(sets)
    measured = {name: {"images": len(sets[name].images), **set_figures(scores, threshold, name),
                       "about": sets[name].about, **({"in_distribution_semantically": True} if sets[name].control
                                                     else {})} for name in names}
    for_the_record = {"msp": logit_figures({k: ood.msp(p) for k, (p, _) in outputs.items()}, names)}
    if plain is not None:
        logits = {name: head_logits(plain, f) for name, f in features.items()}
        for_the_record["energy"] = logit_figures({k: ood.energy(v) for k, v in logits.items()}, names)
    return {
        "method": METHOD,
        "score": score_text(components, dim),
        "references": ["Lee et al., NeurIPS 2018", "Mueller & Hein, Mahalanobis++, 2025", "Tipping & Bishop, 1999"],
        "parameters": {"feature_dim": dim, "components": components or dim, "normalize": "l2",
                       "residual": "isotropic" if components else "none", "shrinkage": SHRINKAGE,
                       "stored_bytes": scorer.stored_bytes()},
        "fitted_on": {"split": "train", "images": len(features["train"])},
        "threshold": threshold,
        "tpr": TPR,
        "threshold_from": {"split": "validation", "images": len(features["val"]),
                           "tpr": round(ood.tpr_at(scores["val"], threshold), 6)},
        "in_distribution": {"split": "test", "images": len(features["test"]),
                            "tpr_at_threshold": round(ood.tpr_at(scores["test"], threshold), 6)},
        "measured": measured,
        "for_the_record": {"about": "the same protocol (threshold at 95 % TPR on validation, AUROC and FPR against "
                                    "the test split) for scores of the probabilities/logits alone: maximum "
                                    "softmax probability 1 - max p of the served probabilities (Hendrycks & "
                                    "Gimpel, 2017) and energy -logsumexp(logits) (Liu et al., 2020)",
                           **for_the_record},
        "proxies": "These sets are proxies built from the project's own data, not real unknowns: a good figure "
                   "on them is necessary, not sufficient (docs/OOD.md).",
        "outputs": {"onnx": list(OOD_OUTPUTS),
                    "torchscript": "forward returns (probabilities, ood_score)"},
        "measured_by": "training.ood_fit at export, on this entry's float32 graph",
    }


Outputs = dict[str, tuple[torch.Tensor, torch.Tensor]]  # split or set -> (probabilities, features)


def collect_outputs(run: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], data: Dataset,
                    sets: dict[str, ProxySet], log: Callable[[str], None] = print) -> Outputs:
    """``run`` (uint8 images -> (probabilities, features)) on the three splits and every proxy set
    (a union set is its parts' outputs, not run again)."""
    outputs: Outputs = {}
    for name, images in [("train", data.train.images), ("val", data.val.images), ("test", data.test.images),
                         *((k, s.images) for k, s in sets.items())]:
        parts = sets[name].parts if name in sets else ()
        if parts:
            outputs[name] = (torch.cat([outputs[p][0] for p in parts]), torch.cat([outputs[p][1] for p in parts]))
            continue
        started = time.perf_counter()
        outputs[name] = run(images)
        log(f"ood: {name}: {len(images)} images, {time.perf_counter() - started:.0f} s")
    return outputs


def fit_ood(serving: nn.Module, plain: nn.Module, level: int, data: Dataset, dataset: str, size: Sequence[int],
            spec: Any, scale: float = 1.0, seed: int = 0,
            log: Any = print) -> tuple[ood.MahalanobisScorer, dict[str, Any]]:
    """The fitted scorer and the card's ``ood`` section (see the module doc). ``serving``: the
    entry's serving graph (probabilities); ``plain``: the network inside it; ``scale`` multiplies
    the proxy sets' sizes (1: the shipped figures)."""
    started = time.perf_counter()
    sets = proxy_sets(dataset, size, data, ProxySizes.for_dataset(dataset, scale), seed)
    with tempfile.TemporaryDirectory() as folder:
        runner = FeatureRunner(serving, plain, level, size, Path(folder))
        outputs = collect_outputs(lambda images: runner(images, spec), data, sets, log)
    dim = int(outputs["train"][1].shape[1])
    components = COMPONENTS if dim >= FULL_BELOW else None
    scorer = ood.fit_mahalanobis(outputs["train"][1], data.train.labels, int(data.train.labels.max()) + 1,
                                 components=components, residual=True, normalize=True, shrinkage=SHRINKAGE).eval()
    section = describe_fit(scorer, components, outputs, sets, plain)
    section["seconds"] = round(time.perf_counter() - started, 1)
    threshold, measured = section["threshold"], section["measured"]
    log(f"ood: threshold {threshold:.4f} (val TPR {section['threshold_from']['tpr']:.4f}, test TPR "
        f"{section['in_distribution']['tpr_at_threshold']:.4f}); " +
        "; ".join(f"{k} AUROC {v['auroc']:.4f} FPR {v['fpr']:.4f}" for k, v in measured.items()))
    return scorer, section
