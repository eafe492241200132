"""The out-of-distribution score end to end: the card's ``ood`` section, the graphs' two outputs,
the fields of every answer path (``/classify``, ``/classify_batch``, folder scoring), ``/metrics``,
and the shipped models flagging synthetic images. Pure functions first (``make test-fast``), then
the shipped models on real images and the real server (slow)."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from conftest import CIFAR_ARCHIVE, SHIPPED_MODELS, Server, encode, need
from service.app import prediction
from service.card import ModelCard, RegistryError, read_card
from service.ood import answer_fields, in_distribution, pack, split, width
from service.pipeline import Predictions
from service.schemas import openapi_document
from service.score.remote import answer_predictions
from service.score.rows import ScoredBatch, batch_rows, output_columns

LIGHT_REGISTRY = Path("/work/shared/peers/registry")  # a registry of another team: no ood section
OOD_MODELS = [name for name in ("catsdogs", "cifar10", "cifar10-int8")
              if (SHIPPED_MODELS / name / "card.json").exists() and read_card(SHIPPED_MODELS / name).ood]


def shipped(name: str) -> ModelCard:
    return read_card(SHIPPED_MODELS / name)


def without_ood(card: ModelCard) -> ModelCard:
    return dataclasses.replace(card, ood=None, order=tuple(k for k in card.order if k != "ood"))


# --- the card -------------------------------------------------------------------------------------


def test_every_shipped_model_has_an_ood_section() -> None:
    assert OOD_MODELS == ["catsdogs", "cifar10", "cifar10-int8"]


@pytest.mark.parametrize("name", OOD_MODELS)
def test_ood_section_round_trips_exactly(name: str) -> None:
    text = (SHIPPED_MODELS / name / "card.json").read_text()
    data = json.loads(text)
    card = ModelCard.from_dict(data)
    assert card.ood is not None and card.ood.threshold == data["ood"]["threshold"] > 0
    assert card.to_dict() == data and json.dumps(card.to_dict(), indent=2) + "\n" == text
    section = data["ood"]
    assert section["method"] == card.ood.method == "mahalanobis"
    assert section["outputs"]["onnx"] == ["probabilities", "ood_score"]
    assert section["threshold_from"]["split"] == "validation" and section["tpr"] == 0.95
    assert 0.94 <= section["threshold_from"]["tpr"] <= 0.96
    assert section["fitted_on"] == {"split": "train", "images": 8000 if name == "catsdogs" else 40000}
    for figures in section["measured"].values():
        assert 0 <= figures["auroc"] <= 1 and 0 <= figures["fpr"] <= 1 and figures["images"] > 0
    assert "proxies" in section  # the sets are proxies, and the card says so


def test_the_issue_bar_on_catsdogs_is_met_and_recorded() -> None:
    measured = shipped("catsdogs").ood.section["measured"]["cifar10_non_animals"]
    assert measured["auroc"] >= 0.95 and measured["fpr"] <= 0.20


@pytest.mark.parametrize("bad,match", [({"threshold": 1.0}, "ood.method"), ({"method": "m"}, "ood.threshold"),
                                       ({"method": "m", "threshold": float("nan")}, "ood.threshold"),
                                       ({"method": "m", "threshold": True}, "ood.threshold"),
                                       ({"method": "m", "threshold": 1, "outputs": {"onnx": ["x"]}}, "outputs"),
                                       ("yes", "ood must be an object")])
def test_a_bad_ood_section_is_refused(bad: object, match: str) -> None:
    data = shipped("catsdogs").to_dict()
    with pytest.raises(RegistryError, match=match):
        ModelCard.from_dict({**data, "ood": bad})


# --- outputs and answers ----------------------------------------------------------------------------


def test_pack_split_and_the_threshold() -> None:
    card = shipped("catsdogs")
    threshold = card.ood.threshold
    probabilities = np.array([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]], np.float32)
    scores = np.array([threshold / 2, threshold, threshold * 2], np.float32)
    outputs = pack(probabilities, scores)
    assert outputs.shape == (3, width(card)) == (3, 3) and outputs.dtype == np.float32
    p, s = split(card, outputs)
    assert np.array_equal(p, probabilities) and np.array_equal(s, scores)
    assert in_distribution(card, s).tolist() == [True, float(np.float32(threshold)) <= threshold, False]
    light = without_ood(card)
    assert split(light, probabilities)[1] is None and width(light) == 2 and answer_fields(light, probabilities[0]) == {}


def test_answers_carry_typed_fields_exactly_when_the_card_has_ood() -> None:
    card = shipped("catsdogs")
    row = pack(np.array([[0.25, 0.75]], np.float32), np.array([card.ood.threshold * 3], np.float32))[0]
    answer = prediction(card, row, 5)
    assert answer["label"] == "dog" and answer["probabilities"] == {"cat": 0.25, "dog": 0.75}
    assert type(answer["ood_score"]) is float and answer["ood_score"] == pytest.approx(card.ood.threshold * 3)
    assert answer["in_distribution"] is False
    assert [t["label"] for t in answer["top_k"]] == ["dog", "cat"]
    plain = prediction(without_ood(card), row[:2], 5)  # today's answer, key for key
    assert list(plain) == ["model", "version", "label", "probabilities", "top_k"]
    assert {k: v for k, v in answer.items() if k not in ("ood_score", "in_distribution")} == plain


def test_scoring_rows_gain_the_two_columns() -> None:
    card = shipped("catsdogs")
    outputs = pack(np.array([[0.9, 0.1], [0.3, 0.7]], np.float32),
                   np.array([card.ood.threshold / 2, card.ood.threshold * 2], np.float32))
    batch = ScoredBatch(["a/cat.1.jpg", "b.jpg", "c.txt"], Predictions(outputs, [0, 1], []))
    rows = batch_rows(batch, card, lambda path: None)
    assert [r["in_distribution"] for r in rows] == [True, False]
    assert all(type(r["ood_score"]) is float for r in rows) and rows[1]["p_dog"] == pytest.approx(0.7)
    assert output_columns(card) == ["path", "label", "probability", "p_cat", "p_dog", "ood_score",
                                    "in_distribution", "true_label", "model_version"]
    assert "ood_score" not in output_columns(without_ood(card))
    light_rows = batch_rows(ScoredBatch(["x.jpg"], Predictions(outputs[:1, :2], [0], [])), without_ood(card),
                            lambda path: None)
    assert "ood_score" not in light_rows[0] and light_rows[0]["label"] == "cat"


def test_remote_answers_become_the_same_rows() -> None:
    card = shipped("catsdogs")
    results = [{"probabilities": {"cat": 0.2, "dog": 0.8}, "ood_score": 12.5, "in_distribution": True},
               {"error": "not_an_image", "detail": "x"}]
    scored = answer_predictions(results, card)
    assert scored.probabilities.tolist() == [[pytest.approx(0.2), pytest.approx(0.8), 12.5]]
    assert scored.good == [0] and scored.errors[0][0] == 1


def test_openapi_describes_both_fields() -> None:
    prediction_schema = openapi_document(["catsdogs"], "catsdogs")["components"]["schemas"]["Prediction"]
    fields = prediction_schema["properties"]
    assert {"type": "number"} in fields["ood_score"]["anyOf"] and {"type": "boolean"} in fields["in_distribution"]["anyOf"]
    assert "threshold" in fields["in_distribution"]["description"]
    assert "ood_score" not in prediction_schema.get("required", [])


# --- the graph, on a small network (both formats, parity) ------------------------------------------------


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.classifier = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def test_graph_returns_unchanged_probabilities_and_a_score_in_both_formats(tmp_path: Path) -> None:
    import onnxruntime as ort

    from training.graph import TestTimeAugment, WithSoftmax
    from training.ood import fit_mahalanobis
    from training.ood_graph import WithOOD, scorer_from_state
    from training.staging import install_entry

    torch.manual_seed(0)
    plain = Small().eval()
    serving = WithSoftmax(TestTimeAugment(plain, 1), 0.7).eval()
    x = torch.randn(64, 3, 16, 16)
    with torch.no_grad():
        features = WithOOD(serving, plain, 1)(x)[1]
        assert features.shape == (64, 16)
        labels = plain.classifier(features).argmax(1) % 3
        labels[:3] = torch.arange(3)  # every class has an example
    scorer = fit_mahalanobis(features, labels, 3, components=None, normalize=True).eval()
    graph = WithOOD(serving, plain, 1, scorer).eval()
    with torch.no_grad():
        probabilities, score = graph(x)
        assert torch.equal(probabilities, serving(x)) and score.shape == (64,)
        assert torch.allclose(score, scorer(features))
    inputs = x.numpy()
    old, _ = install_entry(tmp_path, "m", serving, plain, inputs, 1e-5, lambda a, p: card_for(a, p))
    previous = old / "model.onnx"
    kept = tmp_path / "previous.onnx"
    kept.write_bytes(previous.read_bytes())
    target, card = install_entry(tmp_path, "m", graph, plain, inputs, 1e-5, lambda a, p: card_for(a, p),
                                 previous_onnx=kept)
    parity = card.extra["parity"]
    assert parity["max_abs_diff_vs_previous_onnx"] <= 1e-6
    assert max(parity["ood_score_max_rel_diff_onnx"], parity["ood_score_max_rel_diff_torchscript"]) <= 1e-4
    session = ort.InferenceSession(str(target / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["probabilities", "ood_score"]
    scripted = torch.jit.load(str(target / "model.torchscript.pt"))
    ts_probabilities, ts_score = scripted(x)
    assert torch.allclose(ts_probabilities, probabilities, atol=1e-6)
    rebuilt = scorer_from_state(scripted.state_dict(), normalize=True)
    assert torch.allclose(rebuilt(features), scorer(features), rtol=1e-5)
    logits, stage = scripted.cam(x[:2])  # Grad-CAM's method is still there
    assert logits.shape == (2, 3) and stage.dim() == 4


def card_for(artifacts: dict, parity: dict) -> ModelCard:
    return ModelCard.from_dict({"name": "m", "version": artifacts["onnx"].sha256[:12], "classes": ["a", "b", "c"],
                                "input": {"size": [16, 16], "mean": [0, 0, 0], "std": [1, 1, 1]},
                                "artifacts": {k: v.to_dict() for k, v in artifacts.items()}, "parity": parity})


# --- the shipped models on real and synthetic images (slow: datasets) ------------------------------------


@pytest.fixture(scope="module")
def cifar_test() -> torch.Tensor:
    from training.data import load_cifar10

    need(CIFAR_ARCHIVE)
    return load_cifar10().test.images[:300]


@pytest.mark.slow
@pytest.mark.parametrize("name", OOD_MODELS)
def test_shipped_models_flag_synthetic_images_and_accept_their_own(name: str, cifar_test: torch.Tensor) -> None:
    from service.registry import load_model
    from training.ood_images import flat_colours, uniform_noise
    from training.ood_sets import resize

    card = shipped(name)
    size = card.input.size
    synthetic = torch.cat([uniform_noise(8, size, 1), flat_colours(4, size, 2)]) if name == "catsdogs" \
        else uniform_noise(8, size, 1)  # cifar10 accepts some flat colours (docs/OOD.md); noise never
    for backend in [b for b in ("onnx", "torchscript") if b in card.artifacts]:
        model = load_model(SHIPPED_MODELS / name, backend, "cpu")
        probabilities, scores = split(card, model.predict(synthetic.numpy()))
        assert not in_distribution(card, scores).any(), (name, backend, scores)
        assert np.allclose(probabilities.sum(1), 1, atol=1e-5)
    if name != "catsdogs":  # its own test images: about 95 % accepted (the threshold's TPR)
        _, scores = split(card, load_model(SHIPPED_MODELS / name, "onnx", "cpu").predict(cifar_test.numpy()))
        assert in_distribution(card, scores).mean() >= 0.9
    else:  # the CIFAR-10 airplanes, upscaled: the issue's proxy, flagged
        from training.data import load_cifar10

        test = load_cifar10().test
        planes = resize(test.images[test.labels == 0][:20], size)
        _, scores = split(card, load_model(SHIPPED_MODELS / name, "onnx", "cpu").predict(planes.numpy()))
        assert in_distribution(card, scores).mean() <= 0.1


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in OOD_MODELS if n != "cifar10-int8"])
def test_shipped_graphs_agree_on_the_score_and_match_the_rebuilt_network(name: str, cifar_test: torch.Tensor) -> None:
    from service.registry import load_model
    from training.cam import rebuild_from_registry
    from training.graph import serving_graph
    from training.ood_graph import WithOOD, scorer_from_state
    from training.ood_sets import resize
    from service.preprocess import normalize

    card = shipped(name)
    images = resize(cifar_test[:16], card.input.size).numpy()
    onnx_p, onnx_s = split(card, load_model(SHIPPED_MODELS / name, "onnx", "cpu").predict(images))
    ts_p, ts_s = split(card, load_model(SHIPPED_MODELS / name, "torchscript", "cpu").predict(images))
    assert np.abs(onnx_p - ts_p).max() <= 1e-4
    assert np.abs(onnx_s - ts_s).max() <= 1e-4 * np.abs(ts_s).max()
    plain, _ = rebuild_from_registry(SHIPPED_MODELS / name)
    state = torch.jit.load(str(SHIPPED_MODELS / name / card.artifact("torchscript").file)).state_dict()
    scorer = scorer_from_state(state, card.ood.section["parameters"]["normalize"] == "l2")
    assert scorer.stored_bytes() == card.ood.section["parameters"]["stored_bytes"]
    eager = WithOOD(serving_graph(plain, card), plain, card.tta_level, scorer).eval()
    with torch.no_grad():
        eager_p, eager_s = eager(torch.from_numpy(normalize(images, card.input)))
    assert np.abs(eager_p.numpy() - onnx_p).max() <= 1e-4
    assert np.abs(eager_s.numpy() - onnx_s).max() <= 1e-4 * np.abs(onnx_s).max()


# --- the server (slow) ---------------------------------------------------------------------------------


def flat_png(colour: tuple[int, int, int] = (40, 160, 90)) -> bytes:
    return encode(Image.new("RGB", (200, 200), colour))


def ood_count(server: Server, model: str) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    found = re.search(rf'^imgclf_out_of_distribution_total\{{[^}}]*model="{re.escape(model)}"[^}}]*\}} (\S+)$', text,
                      re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def test_classify_and_batch_answer_the_score_and_metrics_count_it(server: Server, catsdogs_folder: Path) -> None:
    cat = (catsdogs_folder / "train" / "cat.1.jpg").read_bytes()
    before = ood_count(server, "catsdogs")
    answer = httpx.post(f"{server.url}/classify", files={"image": ("flat.png", flat_png())},
                        data={"model": "catsdogs"}).json()
    assert type(answer["ood_score"]) is float and answer["in_distribution"] is False
    assert answer["ood_score"] > shipped("catsdogs").ood.threshold
    batch = httpx.post(f"{server.url}/classify_batch", data={"model": "catsdogs"},
                       files=[("images", ("cat.jpg", cat)), ("images", ("flat.png", flat_png((200, 10, 10)))),
                              ("images", ("x.txt", b"not an image"))]).json()
    good, flat, bad = batch["results"]
    assert type(good["ood_score"]) is float and good["in_distribution"] is (good["ood_score"] <= shipped("catsdogs").ood.threshold)
    assert flat["in_distribution"] is False and bad == {"error": "not_an_image", "detail": bad["detail"]}
    assert ood_count(server, "catsdogs") == before + 2
    for model in ("cifar10", "cifar10-int8"):
        answer = httpx.post(f"{server.url}/classify", files={"image": ("c.jpg", cat)}, data={"model": model}).json()
        assert type(answer["ood_score"]) is float and type(answer["in_distribution"]) is bool


@pytest.fixture(scope="module")
def light_server(tmp_path_factory: pytest.TempPathFactory) -> Server:
    if not (LIGHT_REGISTRY / "cifar10" / "card.json").exists():
        pytest.skip(f"{LIGHT_REGISTRY} is absent")
    srv = Server({"IMGCLF_MODELS_DIR": str(LIGHT_REGISTRY)})
    yield srv
    srv.stop()


def test_a_model_without_an_ood_section_answers_as_before(light_server: Server) -> None:
    card = read_card(LIGHT_REGISTRY / "cifar10")
    assert card.ood is None
    answer = httpx.post(f"{light_server.url}/classify", files={"image": ("flat.png", flat_png())}).json()
    assert list(answer) == ["model", "version", "label", "probabilities", "top_k"]
    batch = httpx.post(f"{light_server.url}/classify_batch", files=[("images", ("f.png", flat_png()))]).json()
    assert "ood_score" not in batch["results"][0] and "in_distribution" not in batch["results"][0]
    assert ood_count(light_server, "cifar10") == 0
