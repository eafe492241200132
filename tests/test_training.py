"""Data loading, network shapes, training and export (with its parity gate) on real data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from service.card import ModelCard, read_card
from service.preprocess import normalize
from training import data as D
from training.nets import ARCHITECTURES, build_model


def test_extract_archive_is_idempotent_and_outside_repo(cifar_folder: Path) -> None:
    assert (cifar_folder.parent / ".complete").exists()
    assert D.REPO_ROOT not in cifar_folder.parents
    assert D.extract_archive(D.shared_datasets_dir() / "cifar10-jpeg.tar.gz") == cifar_folder.parent


def test_plain_members_refuse_what_the_data_filter_refuses(tmp_path: Path) -> None:
    """The extraction path for Pythons without tarfile's "data" filter keeps its refusals."""
    import io
    import tarfile

    def archive(name: str, *, link: bool = False) -> tarfile.TarFile:
        path = tmp_path / f"{len(list(tmp_path.iterdir()))}.tar"
        with tarfile.open(path, "w") as tar:
            ok = tarfile.TarInfo("data/a.jpg")
            ok.size = 3
            tar.addfile(ok, io.BytesIO(b"abc"))
            bad = tarfile.TarInfo(name)
            if link:
                bad.type, bad.linkname = tarfile.SYMTYPE, "/etc/passwd"
                tar.addfile(bad)
            else:
                bad.size = 1
                tar.addfile(bad, io.BytesIO(b"x"))
        return tarfile.open(path)

    with archive("data/b.jpg") as tar:
        assert [m.name for m in D.plain_members(tar)] == ["data/a.jpg", "data/b.jpg"]
    for name, link in (("../evil", False), ("/abs", False), ("data/link", True)):
        with archive(name, link=link) as tar, pytest.raises(ValueError, match="refusing"):
            D.plain_members(tar)


def test_read_class_folders_labels_match_folders(cifar_folder: Path) -> None:
    classes = ("cat", "dog")
    subset = cifar_folder / "test"
    data = D.read_class_folders(subset, classes, (32, 32))
    assert data.images.shape == (2000, 3, 32, 32) and data.images.dtype == torch.uint8
    assert data.labels.bincount().tolist() == [1000, 1000]


def test_a_file_that_does_not_decode_stops_the_dataset_with_its_name(tmp_path: Path) -> None:
    """Training never drops an image silently: a corrupt file in a class folder is an error naming it."""
    from PIL import Image

    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (40, 36), (200, 10, 30)).save(tmp_path / name / "good.png")
    good = D.read_class_folders(tmp_path, ("cat", "dog"), (32, 32))
    assert good.images.shape == (2, 3, 32, 32) and good.labels.tolist() == [0, 1]
    assert good.images[0, 0].unique().tolist() == [200]  # the pixels themselves, resized and cropped
    (tmp_path / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(D.DatasetDecodeError, match="broken.jpg"):
        D.read_class_folders(tmp_path, ("cat", "dog"), (32, 32))


def test_decode_files_matches_the_pipeline_in_any_chunking(cifar_folder: Path) -> None:
    """The dataset decoder is the service's pipeline, chunked over threads: any chunk size gives the
    pixels the pipeline gives for the same files, in order."""
    from service.pipeline import decode_batch

    paths = sorted((cifar_folder / "test" / "cat").iterdir())[:37]
    reference = decode_batch(paths, (32, 32))
    assert not reference.errors
    for chunk in (1, 5, 256):
        assert np.array_equal(D.decode_files(paths, (32, 32), workers=2, chunk=chunk).numpy(), reference.pixels)


def assert_disjoint_cover(indices: dict[str, torch.Tensor], n: int) -> None:
    sets = {name: set(index.tolist()) for name, index in indices.items()}
    assert sum(len(s) for s in sets.values()) == sum(len(i) for i in indices.values())  # no repeats inside a split
    names = sorted(sets)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not sets[a] & sets[b], (a, b)
    assert set().union(*sets.values()) == set(range(n))


def test_cifar10_split_is_seeded_and_disjoint(cifar_folder: Path) -> None:
    a = D.load_cifar10(seed=0)
    b = D.load_cifar10(seed=0)
    assert (len(a.train), len(a.val), len(a.test)) == (40_000, 10_000, 10_000)
    assert torch.equal(a.val.labels, b.val.labels) and a.fingerprint == b.fingerprint
    assert_disjoint_cover(a.indices, 60_000)
    assert a.train.labels.bincount().min() > 3800  # all ten classes, roughly balanced
    c = D.load_cifar10(seed=1)
    assert not torch.equal(a.val.images[:50], c.val.images[:50])
    assert c.fingerprint != a.fingerprint  # the fingerprint names the split, not only the files
    assert_disjoint_cover(c.indices, 60_000)


def test_random_crop_and_flip_are_translations() -> None:
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    assert torch.equal(D.random_crop(x, 0), x)
    cropped = D.random_crop(x, 2)
    assert cropped.shape == x.shape
    # every output row is a contiguous 8-pixel window of the reflect-padded input row
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="reflect")
    for n in range(2):
        windows = {tuple(padded[n, 0, r, c:c + 8].tolist()) for r in range(12) for c in range(5)}
        assert tuple(cropped[n, 0, 3].tolist()) in windows
    flipped = D.random_flip(x)
    for n in range(2):
        assert torch.equal(flipped[n], x[n]) or torch.equal(flipped[n], x[n].flip(2))


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_every_architecture_maps_images_to_class_logits(name: str) -> None:
    model = build_model(name, 10).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
        if name in ("lenet5", "resnet20", "plain_cnn"):
            assert model(torch.randn(1, 3, 96, 96)).shape == (1, 10)


def lenet_logits(seed: int) -> torch.Tensor:
    """LeNet-5 (2 classes) built after ``torch.manual_seed(seed)``, on four fixed 224 px images."""
    torch.manual_seed(seed)
    model = build_model("lenet5", 2).eval()
    x = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(1234))
    with torch.no_grad():
        return model(x)


def test_lenet_fixed_from_seed() -> None:
    """The same seed builds the same network (bit for bit); another seed a different one."""
    model = build_model("lenet5", 2)
    assert sum(p.numel() for p in model.parameters()) < 100_000
    first, again, other = lenet_logits(0), lenet_logits(0), lenet_logits(1)
    assert first.shape == (4, 2)
    assert torch.equal(first, again)
    assert (first - other).abs().max() > 1e-2  # a different initialisation, not rounding noise
    assert not torch.allclose(first.sum(1), torch.ones(4))  # logits, not probabilities


def test_unknown_architecture_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="choose from"):
        build_model("resnet1000", 10)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, cifar_folder: Path) -> Path:
    from training.train import parse_args, train

    out = tmp_path_factory.mktemp("run")
    train(parse_args(["--model", "plain_cnn", "--epochs", "2", "--limit-train", "4096",
                      "--batch-size", "128", "--out", str(out)]))
    return out


def test_training_writes_checkpoint_metrics_and_curves(tiny_run: Path) -> None:
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert len(metrics["history"]) == 2
    assert metrics["test_images"] == 10_000
    assert metrics["test_accuracy"] > 0.2  # well above chance after two short epochs
    assert (tiny_run / "curves.png").stat().st_size > 10_000
    assert set(torch.load(tiny_run / "best.pt", weights_only=True)) >= {"arch", "state_dict", "classes", "input"}


def test_export_writes_card_and_graphs_match_the_checkpoint(tiny_run: Path, tmp_path: Path) -> None:
    from training.export import EXPORTED_CARD_ORDER, export
    from training.data import sha256_file

    target = export(tiny_run, "cifar10", tmp_path, tolerance=1e-4, parity_count=128)
    card = read_card(target)
    assert card.classes[3] == "cat" and card.input.size == (32, 32)
    for fmt, entry in card.artifacts.items():
        assert sha256_file(target / entry.file) == entry.sha256
    assert card.training["data_fingerprint"] == D.load_cifar10().fingerprint
    # the file's shape, key for key, as the service and the UI read it
    written = json.loads((target / "card.json").read_text())
    assert tuple(written) == EXPORTED_CARD_ORDER and written["split_spec"]["dataset"] == "cifar10"
    assert list(written["input"]) == ["size", "channels", "layout", "dtype", "resize", "scale", "mean", "std"]
    assert ModelCard.from_dict(written).to_dict() == written
    # independently of export's own gate: the written ONNX graph computes the checkpoint's softmax
    ckpt = torch.load(tiny_run / "best.pt", weights_only=True)
    model = build_model(ckpt["arch"], 10).eval()
    model.load_state_dict(ckpt["state_dict"])
    data = D.load_cifar10()
    x = normalize(data.test.images[::500].numpy(), card.input)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).softmax(1).numpy()
    session = ort.InferenceSession(str(target / "model.onnx"), providers=["CPUExecutionProvider"])
    assert np.abs(session.run(None, {"input": x})[0] - expected).max() < 1e-4
    # the ONNX graph has a dynamic batch axis
    for n in (1, 7):
        out = session.run(None, {"input": np.random.rand(n, 3, 32, 32).astype(np.float32)})[0]
        assert out.shape == (n, 10) and np.allclose(out.sum(1), 1, atol=1e-5)


def test_calibrate_entry_folds_a_temperature_into_an_existing_entry(tiny_run: Path, tmp_path: Path) -> None:
    """What the shipped models went through: an uncalibrated registry entry, its run gone, gets
    softmax(logits / T) from its own weights; the served probabilities move, the argmax does not."""
    from training.calibration import expected_calibration_error
    from training.export import calibrate_entry, export
    from training.splits import card_dataset

    target = export(tiny_run, "cifar10", tmp_path, tolerance=1e-4, parity_count=64)  # plain softmax
    before = read_card(target)
    assert before.calibration is None and "calibration" not in json.loads((target / "card.json").read_text())
    test = card_dataset(before).test
    inputs = normalize(test.images[:512].numpy(), before.input)

    def served(card: ModelCard) -> np.ndarray:
        session = ort.InferenceSession(str(target / card.artifact("onnx").file))
        return session.run(None, {"input": inputs})[0]

    old = served(before)
    calibrate_entry(target, parity_count=64)
    after = read_card(target)
    cal = after.calibration
    assert cal["recalibrated_from_version"] == before.version != after.version
    assert cal["temperature"] != 1.0 and cal["test_ece_after"] <= cal["test_ece_before"]
    assert after.metrics == before.metrics and after.training == before.training
    # the card keeps its keys in place; calibration and its record come after them
    keys = list(json.loads((target / "card.json").read_text()))
    assert keys == list(before.to_dict()) + ["calibration", "calibrated", "calibrate_command"]
    new = served(after)
    logits = np.log(old) / cal["temperature"]
    expected = np.exp(logits - logits.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    assert np.abs(new - expected).max() < 1e-4  # exactly temperature scaling of what was served
    assert (new.argmax(1) == old.argmax(1)).all()
    labels = test.labels[:512].numpy()
    assert expected_calibration_error(new, labels) != pytest.approx(expected_calibration_error(old, labels))
    scripted = torch.jit.load(str(target / after.artifact("torchscript").file))
    assert np.abs(scripted(torch.from_numpy(inputs)).detach().numpy() - new).max() < 1e-4
    assert scripted.cam(torch.from_numpy(inputs[:2]))[1].dim() == 4  # Grad-CAM's method kept
    with pytest.raises(SystemExit, match="already calibrated"):
        calibrate_entry(target)


def test_export_rebuilds_the_runs_own_split(tmp_path: Path, cifar_folder: Path) -> None:
    """A run trained with --seed 1 is exported against the seed-1 split (recorded in best.pt)."""
    from training.export import export
    from training.train import parse_args, train

    run = tmp_path / "seed1"
    train(parse_args(["--model", "fastnet_tiny", "--epochs", "1", "--limit-train", "512", "--limit-eval", "200",
                      "--batch-size", "128", "--seed", "1", "--tta", "2", "--no-plot", "--quiet", "--out", str(run)]))
    assert torch.load(run / "best.pt", weights_only=True)["data"]["seed"] == 1
    card = read_card(export(run, "c", tmp_path / "reg", tolerance=1e-4, parity_count=32))
    assert card.training["data_fingerprint"] == D.load_cifar10(seed=1).fingerprint != D.load_cifar10().fingerprint
    assert card.tta_level == 2  # the graph evaluates what training evaluated


def test_export_refuses_when_parity_fails(tiny_run: Path, tmp_path: Path) -> None:
    from training.export import export

    with pytest.raises(SystemExit, match="parity check failed"):
        export(tiny_run, "cifar10", tmp_path, tolerance=-1.0, parity_count=16)
    assert not (tmp_path / "cifar10").exists()  # nothing half-written lands in the registry


def test_flip_tta_export_is_mirror_invariant_and_remeasured(tiny_run: Path, tmp_path: Path) -> None:
    from training.export import export

    metrics = json.loads((tiny_run / "metrics.json").read_text())
    target = export(tiny_run, "cifar10", tmp_path, tolerance=1e-4, parity_count=64, tta_mode="flip")
    card = read_card(target)
    tta = card.test_time_augmentation
    # the trained graph's test accuracy, measured again in fp32 (the run may have measured in bf16)
    assert tta["test_accuracy_without"] == pytest.approx(metrics["test_accuracy"], abs=0.01)
    assert card.metrics["test_accuracy"] != metrics["test_accuracy"]  # re-measured on 10,000 images
    session = ort.InferenceSession(str(target / "model.onnx"), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random((4, 3, 32, 32), dtype=np.float32)
    plain = session.run(None, {"input": x})[0]
    mirrored = session.run(None, {"input": np.ascontiguousarray(x[..., ::-1])})[0]
    assert np.allclose(plain, mirrored, atol=1e-5)  # the graph averages an image with its mirror


def test_lenet_at_224_exports_to_onnx_exactly(tmp_path: Path) -> None:
    """LeNet's adaptive pool (53 -> 5 at 224x224) has no ONNX operator; export swaps in matrices."""
    from training.staging import export_onnx, onnx_exportable

    model = build_model("lenet5", 2).eval()
    x = torch.randn(3, 3, 224, 224)
    export_onnx(onnx_exportable(model, x[:2]), x[:2], tmp_path / "lenet.onnx")
    session = ort.InferenceSession(str(tmp_path / "lenet.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = model(x).numpy()
    assert np.allclose(session.run(None, {"input": x.numpy()})[0], expected, atol=1e-5)


def test_training_without_the_tensorboard_package_warns_and_goes_on(tmp_path: Path, cifar_folder: Path) -> None:
    """A GPU host may have PyTorch without tensorboard, tqdm or matplotlib: training warns and goes on
    (no logs, no bar, no curves.png), unless --tensorboard was asked for by name."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['tensorboard'] = None\n"  # as if the package were not installed
            "sys.modules['tqdm'] = sys.modules['matplotlib'] = None\n"  # nor these (PyTorch-only host)
            "from training.train import parse_args, train\n"
            "train(parse_args(sys.argv[1:]))\n")
    args = ["--model", "fastnet_tiny", "--epochs", "1", "--limit-train", "256", "--limit-eval", "100",
            "--batch-size", "128", "--quiet"]
    repo = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", code, *args, "--out", str(tmp_path / "a")], cwd=repo,
                          capture_output=True, text=True)
    assert done.returncode == 0 and "warning: no TensorBoard logs" in done.stderr, done.stderr[-2000:]
    assert (tmp_path / "a" / "metrics.json").exists() and not (tmp_path / "a" / "tensorboard").exists()
    assert "warning: no curves.png" in done.stderr and not (tmp_path / "a" / "curves.png").exists()
    asked = subprocess.run([sys.executable, "-c", code, *args, "--tensorboard", str(tmp_path / "tb"),
                            "--out", str(tmp_path / "b")], cwd=repo, capture_output=True, text=True)
    assert asked.returncode != 0 and "--tensorboard needs the tensorboard package" in asked.stderr
    # tensorboard without matplotlib: the events are written, the prediction figure is left out
    no_plots = code.replace("sys.modules['tensorboard'] = None\n", "")
    done = subprocess.run([sys.executable, "-c", no_plots, *args, "--out", str(tmp_path / "c")], cwd=repo,
                          capture_output=True, text=True)
    assert done.returncode == 0 and "warning: no prediction figures" in done.stderr, done.stderr[-2000:]
    assert list((tmp_path / "c" / "tensorboard").glob("events.out.tfevents.*"))
