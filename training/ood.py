"""Out-of-distribution (OOD) scores, their fitting and their evaluation: pure functions over tensors.

Every score follows one convention: **higher = further from the training data**, so an image is
accepted as in-distribution when ``score <= threshold``.

Scores (see ``docs/OOD.md`` for which one the project uses and why):

* :func:`msp` -- maximum softmax probability (Hendrycks & Gimpel, "A Baseline for Detecting
  Misclassified and Out-of-Distribution Examples in Neural Networks", ICLR 2017), as ``1 - max p``.
* :func:`energy` -- the free energy ``-T logsumexp(logits / T)`` (Liu, Wang, Owens & Li,
  "Energy-based Out-of-distribution Detection", NeurIPS 2020).
* :func:`max_logit` -- ``-max logit`` (Hendrycks et al., "Scaling Out-of-Distribution Detection for
  Real-World Settings", ICML 2022).
* :class:`MahalanobisScorer` -- the minimum over classes of the Mahalanobis distance of the
  penultimate features to the class means under one shared (within-class) covariance (Lee, Lee,
  Lee & Shin, "A Simple Unified Framework for Detecting Out-of-Distribution Samples and Adversarial
  Attacks", NeurIPS 2018). To fit a storage budget the covariance may be reduced to its top ``k``
  principal components, either alone or plus an isotropic residual -- the probabilistic-PCA
  covariance ``V diag(l) V^T + s^2 (I - V V^T)`` (Tipping & Bishop, 1999) -- and the features may
  be L2-normalised first (Mueller & Hein, "Mahalanobis++", 2025).
* :class:`KNNScorer` -- the distance of the L2-normalised features to their ``k``-th nearest
  neighbour in a (sub-sampled) bank of normalised training features (Sun, Ming, Zhu & Li,
  "Out-of-Distribution Detection with Deep Nearest Neighbors", ICML 2022).

The two scorers are small ``nn.Module`` s whose buffers hold the fitted statistics and whose
``forward(features) -> score`` exports to ONNX (opset 17, dynamic batch) and traces to TorchScript,
so they can be appended to a served graph that then returns ``(probabilities, ood_score)``.

Evaluation: :func:`threshold_at_tpr`, :func:`tpr_at`, :func:`fpr_at`, :func:`auroc`. The synthetic
OOD images and corruptions the measurements use are in :mod:`training.ood_images`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# --- scores from the classifier's outputs ---------------------------------------------------------


def msp(probabilities: torch.Tensor) -> torch.Tensor:
    """``1 - max_c p_c`` per row (Hendrycks & Gimpel, 2017): higher = less confident = more OOD."""
    return 1.0 - probabilities.max(dim=1).values


def energy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """The free energy ``-T logsumexp(logits / T)`` per row (Liu et al., 2020): higher = more OOD."""
    return -temperature * torch.logsumexp(logits / temperature, dim=1)


def max_logit(logits: torch.Tensor) -> torch.Tensor:
    """``-max_c logit_c`` per row (Hendrycks et al., 2022): higher = more OOD."""
    return -logits.max(dim=1).values


def l2_normalize(features: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Each row divided by its Euclidean norm (written out, so ONNX export needs no special op)."""
    return features / torch.sqrt((features * features).sum(dim=1, keepdim=True) + eps)


# --- feature-space scorers --------------------------------------------------------------------------


class MahalanobisScorer(nn.Module):
    """``min_c (f - m_c)^T P (f - m_c)`` for features ``f`` (optionally L2-normalised first), class
    means ``m_c`` and a shared precision ``P`` given by its eigenbasis: ``P = V diag(1/l) V^T +
    residual_precision (I - V V^T)``. With ``V`` the full basis this is Lee et al.'s (2018) exact
    score; with the top ``k`` components and ``residual_precision`` 0 it is the distance inside the
    principal subspace; with ``residual_precision = 1 / s^2`` it is the distance under the
    probabilistic-PCA covariance (storage ``D * k`` floats instead of ``D * D``).

    Buffers: ``means`` (C, D), ``basis`` (D, k) orthonormal columns, ``inv_sqrt_eig`` (k,),
    ``residual_precision`` (scalar), ``normalize`` (scalar 0/1)."""

    def __init__(self, means: torch.Tensor, basis: torch.Tensor, inv_sqrt_eig: torch.Tensor,
                 residual_precision: float = 0.0, normalize: bool = False) -> None:
        super().__init__()
        self.register_buffer("means", means.float().contiguous())
        self.register_buffer("basis", basis.float().contiguous())
        self.register_buffer("inv_sqrt_eig", inv_sqrt_eig.float().contiguous())
        self.register_buffer("residual_precision", torch.tensor(float(residual_precision)))
        self.normalize = bool(normalize)
        self.has_residual = float(residual_precision) > 0.0

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = l2_normalize(features) if self.normalize else features
        diff = x.unsqueeze(1) - self.means.unsqueeze(0)  # (N, C, D)
        projected = diff @ self.basis  # (N, C, k)
        inside = ((projected * self.inv_sqrt_eig) ** 2).sum(dim=2)
        if self.has_residual:  # the part of diff outside the basis, formed explicitly (no cancellation)
            rest = diff - projected @ self.basis.T
            inside = inside + self.residual_precision * (rest * rest).sum(dim=2)
        distances = inside
        return distances.min(dim=1).values

    def stored_bytes(self) -> int:
        """Bytes of the statistics a graph must carry (float32 buffers)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())


class KNNScorer(nn.Module):
    """``1 - cos(f, b_(k))``: one minus the cosine similarity of the L2-normalised features to their
    ``k``-th most similar bank entry (Sun et al., 2022; monotone in the Euclidean distance of the
    normalised vectors, ``sqrt(2 - 2 cos)``). Buffer: ``bank`` (M, D), rows L2-normalised."""

    def __init__(self, bank: torch.Tensor, k: int = 1) -> None:
        super().__init__()
        if not 1 <= k <= len(bank):
            raise ValueError(f"k must be in 1..{len(bank)}, not {k}")
        self.register_buffer("bank", l2_normalize(bank.float()).contiguous())
        self.k = int(k)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        similarity = l2_normalize(features) @ self.bank.T  # (N, M)
        kth = torch.topk(similarity, self.k, dim=1).values[:, self.k - 1]
        return 1.0 - kth

    def stored_bytes(self) -> int:
        return self.bank.numel() * self.bank.element_size()


def class_means(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, D) mean feature of each class (float64). Every class must have at least one example."""
    counts = torch.bincount(labels, minlength=num_classes)
    if (counts == 0).any():
        raise ValueError(f"classes without examples: {torch.nonzero(counts == 0).flatten().tolist()}")
    sums = torch.zeros(num_classes, features.shape[1], dtype=torch.float64)
    sums.index_add_(0, labels, features.double())
    return sums / counts[:, None].double()


def fit_mahalanobis(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                    components: int | None = None, residual: bool = True, normalize: bool = False,
                    shrinkage: float = 1e-3) -> MahalanobisScorer:
    """Fit :class:`MahalanobisScorer` on training features (N, D) and labels (N,).

    The shared covariance is the within-class covariance (Lee et al., 2018), its eigenvalues
    shrunk by ``shrinkage`` times their mean (so a sample smaller than ``D`` still gives a finite
    precision). ``components`` None (or >= D) keeps every direction; otherwise the top ``k``, and
    ``residual`` adds the isotropic remainder with variance ``s^2`` = the mean shrunk eigenvalue
    left out (probabilistic PCA)."""
    x = l2_normalize(features.double()) if normalize else features.double()
    means = class_means(x, labels, num_classes)
    centred = x - means[labels]
    covariance = centred.T @ centred / len(x)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending
    eigenvalues, eigenvectors = eigenvalues.flip(0).clamp_min(0.0), eigenvectors.flip(1)
    eigenvalues = eigenvalues + shrinkage * eigenvalues.mean()
    k = x.shape[1] if components is None else min(int(components), x.shape[1])
    residual_precision = 0.0
    if residual and k < x.shape[1]:
        residual_precision = float(1.0 / eigenvalues[k:].mean())
    return MahalanobisScorer(means, eigenvectors[:, :k], eigenvalues[:k].rsqrt(), residual_precision, normalize)


def fit_knn(features: torch.Tensor, bank_size: int, k: int = 1, seed: int = 0) -> KNNScorer:
    """:class:`KNNScorer` over a seeded random subsample of ``bank_size`` training features (all of
    them when there are fewer)."""
    generator = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(features), generator=generator)[:bank_size]
    return KNNScorer(features[index], k)


# --- evaluation ---------------------------------------------------------------------------------------


def threshold_at_tpr(in_scores: torch.Tensor, tpr: float = 0.95) -> float:
    """The smallest threshold ``t`` that accepts (``score <= t``) at least ``tpr`` of the
    in-distribution scores: the ``ceil(tpr * n)``-th smallest score."""
    if not 0.0 < tpr <= 1.0 or len(in_scores) == 0:
        raise ValueError("need tpr in (0, 1] and at least one score")
    ordered = torch.sort(in_scores.double().flatten()).values
    rank = max(1, math.ceil(tpr * len(ordered) - 1e-9))
    return float(ordered[rank - 1])


def tpr_at(in_scores: torch.Tensor, threshold: float) -> float:
    """Fraction of in-distribution scores accepted (``<= threshold``)."""
    return float((in_scores.double() <= threshold).double().mean())


def fpr_at(out_scores: torch.Tensor, threshold: float) -> float:
    """Fraction of out-of-distribution scores wrongly accepted as in-distribution (``<= threshold``)."""
    return float((out_scores.double() <= threshold).double().mean())


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """1-based ranks of ``values`` with ties given their average rank (float64)."""
    unique, inverse, counts = torch.unique(values, sorted=True, return_inverse=True, return_counts=True)
    before = torch.cumsum(counts, 0) - counts
    return (before.double() + (counts.double() + 1.0) / 2.0)[inverse]


def auroc(in_scores: torch.Tensor, out_scores: torch.Tensor) -> float:
    """Area under the ROC curve for telling OOD (positive, higher score) from in-distribution:
    ``P(out > in) + P(out == in) / 2`` (the Mann-Whitney U statistic over ``n_in * n_out``)."""
    n_in, n_out = len(in_scores), len(out_scores)
    if n_in == 0 or n_out == 0:
        raise ValueError("need at least one score on each side")
    ranks = average_ranks(torch.cat([in_scores.double().flatten(), out_scores.double().flatten()]))
    u = ranks[n_in:].sum() - n_out * (n_out + 1) / 2.0
    return float(u / (n_in * n_out))
