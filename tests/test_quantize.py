"""training.quantize: an INT8 registry entry from an exported one, measured, served, refused when it
loses too much."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from service.card import read_card
from service.registry import load_cards, load_model, sha256_file


@pytest.fixture(scope="module")
def exported(tmp_path_factory, cifar_folder: Path) -> Path:
    from training.export import export
    from training.train import parse_args, train

    run = tmp_path_factory.mktemp("run")
    train(parse_args(["--model", "fastnet_tiny", "--epochs", "2", "--limit-train", "4096", "--batch-size", "256",
                      "--lr", "0.2", "--no-plot", "--quiet", "--no-tensorboard", "--out", str(run)]))
    return export(run, "cifar10", tmp_path_factory.mktemp("registry"), tolerance=1e-4, parity_count=32,
                  calibrate=True)


def test_int8_entry_is_quantised_measured_and_served(exported: Path, tmp_path: Path) -> None:
    from training.quantize import quantize_entry

    source = read_card(exported)
    target = quantize_entry(exported, "cifar10-int8", exported.parent, calibration_images=256)
    card = read_card(target)
    assert list(card.artifacts) == ["onnx"]  # ONNX only
    artifact = target / card.artifact("onnx").file
    assert card.version == sha256_file(artifact)[:12] != source.version
    q = card.extra["quantization"]
    assert q["source_version"] == source.version and q["calibration_images"] == 256
    assert q["test"]["fp32"] == pytest.approx(source.metrics["test_accuracy"], abs=1e-9)
    assert card.metrics["test_accuracy"] == q["test"]["int8"] >= q["test"]["fp32"] - 0.01
    # the source card's keys in their places (the float graphs' parity dropped), quantization last
    written = list(json.loads((target / "card.json").read_text()))
    assert written == [k for k in source.to_dict() if k != "parity"] + ["quantization"]
    assert card.calibration == source.calibration and card.name == "cifar10-int8"
    assert q["test"]["agreement"] >= 0.9
    # really integer: QDQ nodes around the convolutions and int8 weight initialisers
    graph = onnx.load(str(artifact)).graph
    ops = {node.op_type for node in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    assert any(init.data_type == onnx.TensorProto.INT8 for init in graph.initializer)
    assert artifact.stat().st_size < 0.5 * (exported / "model.onnx").stat().st_size
    # what makes it fast: ONNX Runtime's CPU provider fuses the QDQ convolutions into QLinearConv
    # (with int8 activations it did not, and the graph ran no faster than float)
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(artifact), options, providers=["CPUExecutionProvider"])
    optimized = {node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node}
    assert "QLinearConv" in optimized
    # the registry serves it with ONNX Runtime; the torchscript backend leaves it out
    model = load_model(target, "onnx", "cpu")
    images = np.random.default_rng(0).integers(0, 256, (5, 3, 32, 32), dtype=np.uint8)
    probabilities = model.predict(images)
    assert probabilities.shape == (5, 10) and np.allclose(probabilities.sum(1), 1, atol=1e-4)
    assert sorted(load_cards(exported.parent, None, "onnx").cards) == ["cifar10", "cifar10-int8"]
    assert sorted(load_cards(exported.parent, None, "torchscript").cards) == ["cifar10"]


def test_int8_that_loses_too_much_writes_nothing(exported: Path) -> None:
    from training.quantize import quantize_entry

    with pytest.raises(SystemExit, match="nothing written"):
        quantize_entry(exported, "lossy", exported.parent, calibration_images=64, max_drop=-1.0)
    assert not (exported.parent / "lossy").exists()
    assert not list(exported.parent.glob(".lossy-*"))  # no staging folder left behind
