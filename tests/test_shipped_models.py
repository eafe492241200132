"""The models shipped in models/: intact, accurate on real held-out images, backends agree."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from service.card import read_card
from service.ood import split
from service.pipeline import decode_batch
from service.registry import RegistryError, load_model, load_registry, sha256_file

from conftest import SHIPPED_MODELS

CARDS = sorted(SHIPPED_MODELS.glob("*/card.json"))


def test_registry_ships_a_cifar10_model_within_budget() -> None:
    assert (SHIPPED_MODELS / "cifar10" / "card.json").exists()
    total = sum(p.stat().st_size for p in SHIPPED_MODELS.rglob("*") if p.is_file())
    assert total < 64 * 1024 * 1024  # issue 18's budget for models/ (both formats of both models)


@pytest.mark.parametrize("card_path", CARDS, ids=lambda p: p.parent.name)
def test_card_hashes_match_artifacts(card_path: Path) -> None:
    card = read_card(card_path.parent)
    assert card.version == card.artifact("onnx").sha256[:12]
    for entry in card.artifacts.values():
        assert sha256_file(card_path.parent / entry.file) == entry.sha256


def _cifar_test_sample(cifar_folder: Path, per_class: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    card = read_card(SHIPPED_MODELS / "cifar10")
    paths, labels = [], []
    for label, name in enumerate(card.classes):
        found = sorted((cifar_folder / "test" / name).glob("*.jpg"))[:per_class]
        paths += found
        labels += [label] * len(found)
    batch = decode_batch(paths, card.input.size)  # the service's pipeline, as an upload would be decoded
    assert not batch.errors and batch.good == list(range(len(paths)))
    return batch.pixels, np.array(labels), list(card.classes)


def test_cifar10_accuracy_on_real_test_images_matches_card(cifar_folder: Path) -> None:
    model = load_model(SHIPPED_MODELS / "cifar10", "onnx", "cpu")
    images, labels, _ = _cifar_test_sample(cifar_folder, 100)
    probabilities, _ = split(model.card, model.predict(images))
    accuracy = float((probabilities.argmax(1) == labels).mean())
    assert np.allclose(probabilities.sum(1), 1.0, atol=1e-5)
    # 1,000 of the 10,000 test images: within 4 points of the card's full-test figure
    assert accuracy >= model.card.metrics["test_accuracy"] - 0.04, accuracy


@pytest.mark.parametrize("card_path", [c for c in CARDS if "torchscript" in read_card(c.parent).artifacts],
                         ids=lambda p: p.parent.name)
def test_onnx_and_torchscript_backends_agree(card_path: Path) -> None:
    onnx = load_model(card_path.parent, "onnx", "cpu")
    ts = load_model(card_path.parent, "torchscript", "cpu")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (8, 3, *onnx.card.input.size), dtype=np.uint8)
    tolerance = max(1e-4, onnx.card.extra["parity"]["tolerance"])
    (onnx_p, onnx_s), (ts_p, ts_s) = split(onnx.card, onnx.predict(images)), split(ts.card, ts.predict(images))
    assert np.abs(onnx_p - ts_p).max() <= tolerance
    if onnx.card.ood:  # the OOD score (hundreds to thousands): relative, as export checks it
        assert np.abs(onnx_s - ts_s).max() <= 1e-4 * np.abs(ts_s).max()


def test_corrupted_artifact_is_refused(tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "cifar10"
    shutil.copytree(SHIPPED_MODELS / "cifar10", copy)
    with open(copy / "model.onnx", "r+b") as handle:
        handle.seek(100)
        handle.write(b"\x00corrupt")
    with pytest.raises(RegistryError, match="does not match"):
        load_registry(tmp_path)
    (copy / "model.onnx").unlink()
    with pytest.raises(RegistryError, match="missing"):
        load_registry(tmp_path)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif(not _cuda(), reason="no CUDA GPU on this machine (CI never has one)")
@pytest.mark.parametrize("backend", ["onnx", "torchscript"])
def test_gpu_backends_match_cpu(backend: str) -> None:
    cpu = load_model(SHIPPED_MODELS / "cifar10", "onnx", "cpu")
    gpu = load_model(SHIPPED_MODELS / "cifar10", backend, "cuda")
    assert gpu.backend.device == "cuda"
    images = np.random.default_rng(1).integers(0, 256, (64, 3, 32, 32), dtype=np.uint8)
    # the TorchScript GPU path runs in fp16: agreement to 1e-2 on probabilities, same top-1 mostly
    got, want = split(gpu.card, gpu.predict(images))[0], split(cpu.card, cpu.predict(images))[0]
    assert np.abs(got - want).max() < 1e-2 and (got.argmax(1) == want.argmax(1)).mean() > 0.95


def test_cuda_request_without_gpu_fails_clearly() -> None:
    if _cuda():
        pytest.skip("this machine has a GPU")
    with pytest.raises(RegistryError, match="CUDA"):
        load_model(SHIPPED_MODELS / "cifar10", "onnx", "cuda")
