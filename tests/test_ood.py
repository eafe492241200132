"""training.ood (scores, fitting, metrics, exportability) and training.ood_images (synthetic OOD images), in seconds."""

from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from training import ood, ood_images


def clusters(n_per_class: int = 300, dim: int = 16, classes: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian clusters with an anisotropic shared covariance, class means far apart: the same
    clusters for every ``seed``, which draws only the points."""
    means = torch.randn(classes, dim, generator=torch.Generator().manual_seed(1234)) * 6
    scales = torch.linspace(0.2, 3.0, dim)
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    features = means[labels] + torch.randn(len(labels), dim, generator=torch.Generator().manual_seed(seed)) * scales
    return features, labels


def test_scores_point_the_same_way() -> None:
    confident = torch.tensor([[10.0, 0.0, 0.0]])
    unsure = torch.tensor([[0.1, 0.0, 0.0]])
    assert ood.msp(torch.softmax(confident, 1)) < ood.msp(torch.softmax(unsure, 1))
    assert ood.energy(confident) < ood.energy(unsure)
    assert ood.max_logit(confident) < ood.max_logit(unsure)
    assert torch.allclose(ood.energy(torch.zeros(1, 4), 2.0), torch.tensor([-2.0 * math.log(4)]))


@pytest.mark.parametrize("components,residual,normalize", [(None, True, False), (4, False, False),
                                                           (4, True, False), (8, True, True)])
def test_mahalanobis_ranks_far_points_above_near_ones(components, residual, normalize) -> None:
    features, labels = clusters()
    scorer = ood.fit_mahalanobis(features, labels, 3, components=components, residual=residual, normalize=normalize)
    near, _ = clusters(seed=1)
    g = torch.Generator().manual_seed(2)
    away = torch.linalg.svd(ood.class_means(features, labels, 3).float().T, full_matrices=True).U[:, -1]
    far = torch.randn(300, 16, generator=g) * 2 + 25 * away  # orthogonal to every class mean, far out
    with torch.no_grad():
        s_near, s_far = scorer(near), scorer(far)
    assert ood.auroc(s_near, s_far) > 0.99
    # exactly at a class mean the distance is (close to) zero, and it grows along a direction
    mean = ood.class_means(features, labels, 3)[0].float()
    line = torch.stack([mean + t * torch.ones(16) for t in (0.0, 1.0, 3.0, 10.0)])
    if not normalize:
        scores = scorer(line)
        assert scores[0] < 1e-3 and bool((scores.diff() > 0).all())


def test_full_mahalanobis_matches_the_textbook_formula() -> None:
    features, labels = clusters()
    scorer = ood.fit_mahalanobis(features, labels, 3, components=None, shrinkage=0.0)
    means = ood.class_means(features, labels, 3)
    centred = features.double() - means[labels]
    precision = torch.linalg.inv(centred.T @ centred / len(features))
    query = torch.randn(20, 16, generator=torch.Generator().manual_seed(3)) * 5
    diff = query.double()[:, None, :] - means[None]
    expected = torch.einsum("ncd,de,nce->nc", diff, precision, diff).min(dim=1).values
    assert torch.allclose(scorer(query).double(), expected, rtol=1e-4, atol=1e-3)


def test_ppca_residual_catches_what_the_subspace_misses() -> None:
    features, labels = clusters()
    top_only = ood.fit_mahalanobis(features, labels, 3, components=4, residual=False)
    ppca = ood.fit_mahalanobis(features, labels, 3, components=4, residual=True)
    mean = ood.class_means(features, labels, 3)[0].float()
    orthogonal = torch.linalg.svd(top_only.basis, full_matrices=True).U[:, -1]  # outside the top-4 basis
    outside = mean + 50 * orthogonal
    assert top_only(outside[None]) < 1.0  # invisible inside the top-4 subspace
    assert ppca(outside[None]) > 100.0
    assert ppca.stored_bytes() < ood.fit_mahalanobis(features, labels, 3).stored_bytes()


def test_knn_scores_distance_to_the_kth_neighbour() -> None:
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    scorer = ood.KNNScorer(bank, k=1)
    assert torch.allclose(scorer(torch.tensor([[2.0, 0.0], [1.0, 1.0]])),
                          torch.tensor([0.0, 1 - math.cos(math.pi / 4)]), atol=1e-6)
    assert torch.allclose(ood.KNNScorer(bank, k=2)(torch.tensor([[2.0, 0.0]])), torch.tensor([1.0]), atol=1e-6)
    with pytest.raises(ValueError):
        ood.KNNScorer(bank, k=4)
    features, _ = clusters()
    assert len(ood.fit_knn(features, 50, k=1, seed=0).bank) == 50
    assert torch.equal(ood.fit_knn(features, 50, seed=0).bank, ood.fit_knn(features, 50, seed=0).bank)


def test_threshold_gives_the_tpr_on_its_own_data() -> None:
    scores = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    threshold = ood.threshold_at_tpr(scores, 0.95)
    assert ood.tpr_at(scores, threshold) == pytest.approx(0.95)
    assert ood.threshold_at_tpr(torch.arange(1.0, 21.0), 0.95) == 19.0  # 19 of 20 accepted
    assert ood.threshold_at_tpr(torch.arange(1.0, 11.0), 0.95) == 10.0  # 9.5 rounds up to all 10
    assert ood.fpr_at(torch.tensor([0.0, 5.0, 19.0, 20.0]), 19.0) == 0.75


def test_auroc_matches_hand_computed_examples_with_ties() -> None:
    assert ood.auroc(torch.tensor([0.0, 1.0]), torch.tensor([2.0, 3.0])) == 1.0
    assert ood.auroc(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0])) == 0.0
    # pairs (out > in): 3>1, 3>2, 2>1, 2 == 2 (half), 1 vs 1 (half), 1 < 2 ->  (3 + 1 + 0.5 + 0.5 + ...) / 6
    in_scores, out_scores = torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0, 3.0])
    wins = sum((o > i) + 0.5 * (o == i) for o in out_scores.tolist() for i in in_scores.tolist())
    assert wins == 4.0
    assert ood.auroc(in_scores, out_scores) == pytest.approx(4.0 / 6.0)
    assert ood.auroc(torch.ones(5), torch.ones(7)) == 0.5


def test_auroc_agrees_with_a_brute_force_count() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 20, (200,), generator=g).double()
    b = torch.randint(5, 25, (150,), generator=g).double()
    brute = ((b[:, None] > a[None]).double() + 0.5 * (b[:, None] == a[None]).double()).mean()
    assert ood.auroc(a, b) == pytest.approx(float(brute))


def export_and_run(module: torch.nn.Module, example: torch.Tensor, query: torch.Tensor, path: Path) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (example,), str(path), opset_version=17, input_names=["features"],
                          output_names=["ood_score"], dynamic_axes={"features": {0: "batch"}, "ood_score": {0: "batch"}},
                          dynamo=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"features": query.numpy()})[0]


@pytest.mark.parametrize("kind", ["full", "ppca", "ppca_l2", "knn"])
def test_scorers_export_to_onnx_and_torchscript_with_a_dynamic_batch(kind: str, tmp_path: Path) -> None:
    features, labels = clusters()
    scorer = {"full": lambda: ood.fit_mahalanobis(features, labels, 3),
              "ppca": lambda: ood.fit_mahalanobis(features, labels, 3, components=4),
              "ppca_l2": lambda: ood.fit_mahalanobis(features, labels, 3, components=4, normalize=True),
              "knn": lambda: ood.fit_knn(features, 100, k=3)}[kind]()
    query = clusters(50, seed=5)[0] + torch.randn(150, 16) * 3  # a batch size other than the example's
    with torch.no_grad():
        expected = scorer(query).numpy()
        got = export_and_run(scorer, features[:2], query, tmp_path / "scorer.onnx")
        traced = torch.jit.trace(scorer, features[:2])
        assert np.allclose(traced(query).numpy(), expected, rtol=1e-5, atol=1e-5)
    assert got.shape == (150,)
    assert np.abs(got - expected).max() <= 1e-4 * max(1.0, np.abs(expected).max())


@pytest.mark.parametrize("make", [ood_images.uniform_noise, ood_images.smooth_noise, ood_images.flat_colours,
                                  ood_images.gradients])
def test_generators_are_seeded_uint8_images(make) -> None:
    a, b, c = make(6, (24, 40), seed=1), make(6, (24, 40), seed=1), make(6, (24, 40), seed=2)
    assert a.shape == (6, 3, 24, 40) and a.dtype == torch.uint8
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len({tuple(img.flatten()[:64].tolist()) for img in a}) == 6  # the images differ


def test_flat_colours_are_flat_and_gradients_vary() -> None:
    flat = ood_images.flat_colours(4, (8, 8), seed=0)
    assert bool((flat == flat[:, :, :1, :1]).all())
    grad = ood_images.gradients(4, (16, 16), seed=0).float()
    assert bool((grad.amax(dim=(2, 3)) - grad.amin(dim=(2, 3)) > 0).any(dim=1).all())


def test_pixel_shuffle_keeps_the_pixels_and_moves_them() -> None:
    images = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    shuffled = ood_images.pixel_shuffle(images, seed=0)
    assert shuffled.shape == images.shape and shuffled.dtype == torch.uint8
    assert torch.equal(shuffled, ood_images.pixel_shuffle(images, seed=0))
    assert not torch.equal(shuffled, images)
    # the same multiset of RGB triples per image (pixels moved whole, channels together)
    for before, after in zip(images, shuffled):
        key = lambda img: sorted(map(tuple, img.reshape(3, -1).T.tolist()))  # noqa: E731
        assert key(before) == key(after)


def test_patch_shuffle_moves_whole_tiles() -> None:
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.int64).reshape(2, 3, 8, 8)
    shuffled = ood_images.patch_shuffle(images, 4, seed=3)
    tiles = lambda img: sorted(img[:, y:y + 4, x:x + 4].flatten().tolist() for y in (0, 4) for x in (0, 4))  # noqa: E731
    assert all(tiles(a) == tiles(b) for a, b in zip(images, shuffled))
    with pytest.raises(ValueError):
        ood_images.patch_shuffle(images, 3)


@pytest.mark.parametrize("level", [0, 1, 2])
def test_the_benchmarks_features_graph_computes_the_served_logits(level: int) -> None:
    """benchmarks/ood_bench.py's features are the TTA-averaged input of the head: the served
    logits follow from them, and the logits are TestTimeAugment's."""
    import importlib.util

    from training.fastnet import fastnet_tiny
    from training.graph import TestTimeAugment

    spec = importlib.util.spec_from_file_location("ood_bench", Path(__file__).resolve().parent.parent
                                                  / "benchmarks" / "ood_bench.py")
    bench = sys.modules.get("ood_bench") or importlib.util.module_from_spec(spec)
    sys.modules["ood_bench"] = bench  # its dataclasses look their module up there
    spec.loader.exec_module(bench)
    torch.manual_seed(0)
    net = fastnet_tiny(10).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        logits, features = bench.FeaturesGraph(net, level)(x)
        served = TestTimeAugment(net, level)(x) if level else net(x)
    assert torch.allclose(logits, served, atol=1e-5)
    assert torch.allclose(net.fc(features) * net.scale, served, atol=1e-5)
    assert features.shape == (3, 32)
