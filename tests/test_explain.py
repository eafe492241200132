"""Grad-CAM on the shipped cats-vs-dogs model: real photos, where the heat lies, the PNG, errors."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from service.card import InputSpec, ModelCard, read_card
from service.explain import ExplainError, central_share, gradcam, gradcam_png, load_explainable
from service.preprocess import normalize

REPO = Path(__file__).resolve().parent.parent
CATSDOGS = REPO / "models" / "catsdogs"
PHOTOS = 50


@pytest.fixture(scope="module")
def card() -> ModelCard:
    return read_card(CATSDOGS)


@pytest.fixture(scope="module")
def net(card: ModelCard) -> torch.nn.Module:
    return load_explainable(CATSDOGS / card.artifact("torchscript").file)


@pytest.fixture(scope="module")
def photos(card: ModelCard, catsdogs_folder: Path):
    """A seeded sample of held-out test photos of the card's own split (the report's Grad-CAM sample)."""
    from training.data import seeded_permutation
    from training.report import card_dataset

    test = card_dataset(card).test
    return test.subset(seeded_permutation(len(test), 0)[:PHOTOS])


def test_cam_method_shares_the_serving_graphs_network(net: torch.nn.Module, card: ModelCard) -> None:
    """The registry's TorchScript file carries Grad-CAM's ``cam`` method beside ``forward``: its
    logits (the plain network's: averaged over the mirror image where the card's graph averages
    the two views) give the served probabilities (divided by the card's calibration temperature),
    and its feature map is the last stage's (6 x 6 at 192 px)."""
    x = torch.randn(4, 3, *card.input.size)
    temperature = card.temperature
    flip = card.tta_level == 1
    with torch.no_grad():
        logits, features = net.cam(x)
        if flip:
            logits = (logits + net.cam(x.flip(3))[0]) / 2
        served = net(x)  # (probabilities, ood_score) for a card with an ood section
        probabilities = served[0] if card.ood else served
        assert torch.allclose((logits / temperature).softmax(1), probabilities, atol=1e-5)
    assert features.shape[0] == 4 and features.dim() == 4 and features.shape[-1] < card.input.size[1]


def test_a_changed_or_missing_graph_is_refused(tmp_path: Path, card: ModelCard) -> None:
    import shutil

    folder = tmp_path / "catsdogs"
    shutil.copytree(CATSDOGS, folder)
    graph = folder / card.artifact("torchscript").file
    with open(graph, "ab") as handle:
        handle.write(b"x")
    with pytest.raises(ExplainError, match="not_explainable.*sha256"):
        load_explainable(folder)
    graph.unlink()
    with pytest.raises(ExplainError, match="missing"):
        load_explainable(folder)


def test_heat_lies_on_the_animal_not_the_border(net, card, photos) -> None:
    """Share of the heat inside the central box (half of each side: a quarter of the area, so a
    uniform map scores 0.25) over 50 real test photos. Measured: docs/INSIGHT.md."""
    spec = card.input
    shares = [central_share(gradcam(net, image.numpy(), spec)[0]) for image in photos.images]
    assert np.mean(shares) > 0.35
    assert np.mean(np.array(shares) > 0.25) >= 0.8  # most photos: more heat in the centre than uniform


def test_png_is_the_image_with_heat_for_the_asked_class(net, card, photos) -> None:
    spec = card.input
    image = photos.images[0].numpy()
    top = gradcam(net, image, spec)
    other = gradcam(net, image, spec, class_index=1 - top[1])
    with torch.no_grad():  # by default the served graph's top class is explained
        served = net(torch.from_numpy(normalize(image[None], spec)))[0]
    assert top[1] == int(served.argmax()) and other[1] == 1 - top[1]
    assert not np.allclose(top[0], other[0])  # evidence for the other class lies elsewhere
    assert top[0].shape == card.input.size and 0 <= top[0].min() and top[0].max() <= 1
    png = gradcam_png(net, image, spec)
    with Image.open(io.BytesIO(png)) as decoded:
        assert decoded.format == "PNG" and decoded.size == (384, 384) and decoded.mode == "RGB"
    # from the registry entry's path too (its card lists the Grad-CAM graph)
    assert gradcam_png(CATSDOGS / card.artifact("torchscript").file, image, spec) == png


class BrightSpot(torch.nn.Module):
    """A network whose one feature map is the image's brightness above mid-grey (so it is zero on
    a black image) and whose class 0 logit is that map's mean: Grad-CAM for class 0 must put the
    heat exactly where something bright is."""

    def __init__(self) -> None:
        super().__init__()
        conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        with torch.no_grad():
            conv.weight.fill_(1 / 27)  # the 3x3 neighbourhood's mean over the three channels ...
            conv.bias.fill_(-0.5)  # ... above mid-grey (the image is normalised to [-2, 2])
        self.features = torch.nn.Sequential(conv, torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1))
        self.classifier = torch.nn.Linear(4, 3)
        with torch.no_grad():
            self.classifier.weight.copy_(torch.tensor([[1.0] * 4, [-1.0] * 4, [0.0] * 4]))
            self.classifier.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


def test_heat_lies_on_a_planted_object_and_small_images_are_drawn_larger(tmp_path: Path) -> None:
    """Traced as export does (training.cam), a network that sees one bright square on black: the
    heat of its class lies on the square (wherever it is planted), and a CIFAR-sized input is
    drawn at 224 px."""
    from training.cam import trace_explainable

    model = BrightSpot().eval()
    trace_explainable(model, model, torch.zeros(2, 3, 32, 32)).save(str(tmp_path / "model.pt"))
    graph = load_explainable(torch.jit.load(str(tmp_path / "model.pt")))
    spec = InputSpec((32, 32), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    for top, left in ((4, 4), (20, 14)):
        image = np.zeros((3, 32, 32), np.uint8)
        image[:, top:top + 8, left:left + 8] = 255
        heat, explained, _ = gradcam(graph, image, spec, class_index=0)
        inside = heat[top - 1:top + 9, left - 1:left + 9].sum()  # the square and its 1-pixel rim
        assert explained == 0 and heat.max() == 1.0 and inside / heat.sum() > 0.95, (top, left)
        peak = np.unravel_index(heat.argmax(), heat.shape)
        assert top <= peak[0] < top + 8 and left <= peak[1] < left + 8
    with Image.open(io.BytesIO(gradcam_png(graph, image, spec, class_index=0))) as decoded:
        assert decoded.size == (224, 224)


def test_errors_name_what_is_wrong(net, card: ModelCard) -> None:
    spec = card.input
    image = np.zeros((3, *card.input.size), np.uint8)
    with pytest.raises(ExplainError) as bad_class:
        gradcam_png(net, image, spec, class_index=2)
    assert bad_class.value.error == "bad_class" and "0..1" in bad_class.value.detail
    for wrong in (np.zeros((*card.input.size, 3), np.uint8), np.zeros(image.shape, np.float32)):
        with pytest.raises(ExplainError, match="bad_image"):
            gradcam_png(net, wrong, spec)
    from training.nets import build_model  # a TorchScript graph traced without the cam method

    plain = torch.jit.trace(build_model("resnet20", 2).eval(), torch.zeros(1, 3, 96, 96))
    with pytest.raises(ExplainError, match="not_explainable"):
        gradcam_png(plain, image, spec)


def test_central_share() -> None:
    assert central_share(np.ones((8, 8))) == pytest.approx(0.25)
    centre = np.zeros((8, 8))
    centre[3:5, 3:5] = 1
    assert central_share(centre) == 1.0
    assert central_share(np.zeros((8, 8))) == 0.0


def test_concurrent_and_inference_mode_callers_get_their_own_heat(tmp_path: Path) -> None:
    """The HTTP layer may call from worker threads, or under torch.inference_mode()."""
    from concurrent.futures import ThreadPoolExecutor

    from training.cam import trace_explainable
    from training.nets import build_model

    torch.manual_seed(0)
    model = build_model("resnet20", 10).eval()
    trace_explainable(model, model, torch.zeros(2, 3, 32, 32)).save(str(tmp_path / "model.pt"))
    net = torch.jit.load(str(tmp_path / "model.pt"))
    spec = InputSpec((32, 32), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    images = np.random.default_rng(1).integers(0, 256, (6, 3, 32, 32), dtype=np.uint8)
    alone = [gradcam(net, image, spec, class_index=2)[0] for image in images]
    with ThreadPoolExecutor(3) as pool:
        together = list(pool.map(lambda image: gradcam(net, image, spec, class_index=2)[0], images))
    assert all(np.allclose(a, b, atol=1e-6) for a, b in zip(alone, together))
    with torch.inference_mode():
        assert np.allclose(gradcam(net, images[0], spec, class_index=2)[0], alone[0], atol=1e-6)


def test_the_service_side_imports_no_training_code() -> None:
    """service/explain.py runs the exported graph: nothing from training/ is imported."""
    import subprocess
    import sys

    code = ("import sys, service.explain as e; e.load_explainable('models/catsdogs'); "
            "print(sorted(m for m in sys.modules if m.startswith('training')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
