"""Temperature scaling: the measures, the fit, the exported graphs and the shipped models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from service.card import read_card
from service.preprocess import normalize
from training.calibration import (calibration_summary, expected_calibration_error, fit_temperature,
                                  logits_from_probabilities, nll, reliability, softmax)

REPO = Path(__file__).resolve().parent.parent


def sampled(temperature: float, n: int = 20_000, classes: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels drawn from softmax(logits / temperature): calibrated at that temperature."""
    generator = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(n, classes, generator=generator, dtype=torch.float64)
    labels = torch.multinomial(torch.softmax(logits / temperature, 1), 1, generator=generator).flatten()
    return logits, labels


@pytest.mark.parametrize("true_t", [0.5, 1.0, 2.5])
def test_fit_temperature_recovers_the_generating_temperature(true_t: float) -> None:
    logits, labels = sampled(true_t)
    fitted = fit_temperature(logits, labels)
    assert fitted == pytest.approx(true_t, rel=0.05)
    assert nll(logits, labels, fitted) <= nll(logits, labels, 1.0) + 1e-9


def test_ece_of_known_cases() -> None:
    logits, labels = sampled(1.0)
    assert expected_calibration_error(softmax(logits), labels) < 0.015  # calibrated by construction
    # always 100% sure, right half the time: ECE 0.5
    probs = torch.tensor([[1.0, 0.0]] * 10)
    assert expected_calibration_error(probs, torch.tensor([0, 1] * 5)) == pytest.approx(0.5)
    rel = reliability(probs, torch.tensor([0, 1] * 5))
    assert rel.counts.sum() == 10 and rel.counts[-1] == 10 and len(rel.counts) == 15


def test_log_probabilities_temperature_scale_exactly_like_logits() -> None:
    logits, _ = sampled(1.0, n=100)
    for t in (0.5, 1.7):
        assert torch.allclose(softmax(logits_from_probabilities(softmax(logits)), t), softmax(logits, t), atol=1e-10)


def test_summary_improves_a_miscalibrated_model() -> None:
    logits, labels = sampled(2.0)  # the model's logits are twice as sharp as the truth: overconfident
    summary = calibration_summary(logits[:10_000], labels[:10_000], logits[10_000:], labels[10_000:])
    assert summary["temperature"] == pytest.approx(2.0, rel=0.08)
    assert summary["test_ece_after"] < summary["test_ece_before"]
    assert summary["test_nll_after"] < summary["test_nll_before"]


@pytest.fixture(scope="module")
def calibrated_export(tmp_path_factory, cifar_folder: Path) -> tuple[Path, Path]:
    """A tiny run, exported by the command line (which calibrates by default)."""
    from training.export import main as export_main
    from training.train import parse_args, train

    run = tmp_path_factory.mktemp("calrun")
    # label smoothing makes the network under-confident, as the shipped models are: a case that
    # temperature scaling must improve on the test split, not only on the split it was fitted on
    train(parse_args(["--model", "plain_cnn", "--epochs", "1", "--limit-train", "2048", "--batch-size", "128",
                      "--label-smoothing", "0.1", "--no-plot", "--no-tensorboard", "--quiet", "--out", str(run)]))
    registry = tmp_path_factory.mktemp("calreg")
    export_main([str(run), "--name", "tiny", "--models-dir", str(registry), "--parity-images", "64"])
    return run, registry / "tiny"


def test_card_records_calibration_and_ece_does_not_rise(calibrated_export: tuple[Path, Path]) -> None:
    _, target = calibrated_export
    card = read_card(target)
    cal = card.calibration
    assert card.temperature == cal["temperature"]
    assert set(cal) >= {"temperature", "test_ece_before", "test_ece_after", "test_nll_before", "test_nll_after",
                        "ece_bins", "method"}
    assert cal["ece_bins"] == 15 and cal["temperature"] > 0 and cal["temperature"] != 1.0
    assert cal["fitted_on_images"] == 10_000 and cal["measured_on_images"] == 10_000
    assert cal["test_ece_after"] <= cal["test_ece_before"]
    assert cal["test_nll_after"] <= cal["test_nll_before"]
    assert "softmax(logits /" in card.extra["output"]


def test_exported_graphs_output_the_checkpoints_tempered_softmax(calibrated_export: tuple[Path, Path]) -> None:
    from training import data as D
    from training.nets import build_model

    run, target = calibrated_export
    card = read_card(target)
    ckpt = torch.load(run / "best.pt", weights_only=True)
    model = build_model(ckpt["arch"], 10).eval()
    model.load_state_dict(ckpt["state_dict"])
    x = normalize(D.load_cifar10().test.images[::400].numpy(), card.input)
    with torch.no_grad():
        logits = model(torch.from_numpy(x))
    t = card.temperature
    expected = torch.softmax(logits / t, 1).numpy()
    session = ort.InferenceSession(str(target / "model.onnx"), providers=["CPUExecutionProvider"])
    assert np.abs(session.run(None, {"input": x})[0] - expected).max() < 1e-4
    scripted = torch.jit.load(str(target / "model.torchscript.pt"))
    with torch.no_grad():
        probabilities, scores = scripted(torch.from_numpy(x))  # the command line fits the OOD score too
        assert np.abs(probabilities.numpy() - expected).max() < 1e-4
    # and it is not the plain softmax
    assert np.abs(torch.softmax(logits, 1).numpy() - expected).max() > 1e-3
    # the OOD score, fitted at export on the run's own split, its threshold at 95 % TPR on validation
    assert [o.name for o in session.get_outputs()] == ["probabilities", "ood_score"]
    assert card.ood is not None and card.ood.section["fitted_on"] == {"split": "train", "images": 40_000}
    assert card.ood.section["threshold_from"]["tpr"] == pytest.approx(0.95, abs=1e-3)
    assert list(card.ood.section["measured"]) == ["synthetic", "pixel_shuffled", "patch_shuffled_8px",
                                                 "control_catsdogs_photos"]
    assert np.abs(session.run(None, {"input": x})[1] - scores.numpy()).max() <= 1e-4 * scores.abs().max().item()


def test_export_api_default_keeps_the_plain_softmax(calibrated_export: tuple[Path, Path], tmp_path: Path) -> None:
    from training.export import export

    run, _ = calibrated_export
    target = export(run, "plain", tmp_path, 1e-4, 16)
    assert read_card(target).calibration is None
    assert "calibration" not in json.loads((target / "card.json").read_text())


@pytest.mark.parametrize("name", ["cifar10", "catsdogs"])
def test_shipped_models_serve_their_cards_calibration(name: str, cifar_folder: Path, catsdogs_folder: Path) -> None:
    """The shipped graphs output what their cards say: on the test split the served probabilities
    have the card's ECE after calibration, undoing the card's T (softmax(T x log p)) gives back its
    ECE before, and a temperature fitted again on the served validation output is ~1."""
    from training.calibration import expected_calibration_error, softmax
    from training.report import onnx_log_probabilities
    from training.splits import card_dataset

    folder = REPO / "models" / name
    card = read_card(folder)
    cal = card.calibration
    assert cal["test_ece_after"] < cal["test_ece_before"] and cal["test_nll_after"] < cal["test_nll_before"]
    spec = card.input
    data = card_dataset(card)
    onnx = folder / card.artifact("onnx").file
    val_logp, test_logp = onnx_log_probabilities(onnx, data.val, spec), onnx_log_probabilities(onnx, data.test, spec)
    labels = data.test.labels
    assert expected_calibration_error(softmax(test_logp), labels) == pytest.approx(cal["test_ece_after"], abs=1e-3)
    assert expected_calibration_error(softmax(test_logp, 1 / cal["temperature"]), labels) == \
        pytest.approx(cal["test_ece_before"], abs=1e-3)
    again = calibration_summary(val_logp, data.val.labels, test_logp, labels)
    assert again["temperature"] == pytest.approx(1.0, abs=0.02)