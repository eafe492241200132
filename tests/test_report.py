"""The report's figures (for a run and for a registry model) and training's TensorBoard events."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from service.card import read_card
from training.report import FIGURES, MAX_BYTES, write_report

REPO = Path(__file__).resolve().parent.parent
SCALAR_TAGS = {"step/train_loss", "step/train_accuracy", "step/learning_rate", "step/images_per_s",
               "epoch/train_loss", "epoch/train_accuracy", "epoch/learning_rate", "epoch/images_per_s",
               "epoch/val_loss", "epoch/val_accuracy", "test/accuracy"}


@pytest.fixture(scope="module")
def report_run(tmp_path_factory, cifar_folder: Path) -> Path:
    from training.train import parse_args, train

    out = tmp_path_factory.mktemp("reportrun")
    train(parse_args(["--model", "resnet20", "--epochs", "2", "--limit-train", "1024", "--limit-eval", "500",
                      "--batch-size", "128", "--schedule", "onecycle", "--quiet", "--out", str(out)]))
    return out


def check_figures(folder: Path) -> None:
    for name in FIGURES:
        path = folder / name
        assert 0 < path.stat().st_size < MAX_BYTES + 50_000, name  # small enough for the repository
        with Image.open(path) as image:
            assert image.format == "PNG" and min(image.size) >= 200, name


def test_tensorboard_events_hold_the_scalars_and_images(report_run: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((report_run / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    accumulator = EventAccumulator(str(report_run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    tags = accumulator.Tags()
    assert SCALAR_TAGS <= set(tags["scalars"])
    assert {"filters/first_layer", "validation/predictions"} <= set(tags["images"])
    steps = accumulator.Scalars("step/train_loss")
    assert [s.step for s in steps] == list(range(1, 2 * (1024 // 128) + 1))  # every step of both epochs
    metrics = json.loads((report_run / "metrics.json").read_text())
    epoch_loss = [s.value for s in accumulator.Scalars("epoch/train_loss")]
    assert epoch_loss == pytest.approx([h["train_loss"] for h in metrics["history"]], rel=1e-5)
    assert accumulator.Scalars("test/accuracy")[0].value == pytest.approx(metrics["test_accuracy"])
    lrs = [s.value for s in accumulator.Scalars("step/learning_rate")]
    assert max(lrs) > lrs[0] and lrs[-1] < max(lrs)  # the one-cycle schedule, step by step


def test_no_tensorboard_writes_no_events(tmp_path: Path, cifar_folder: Path) -> None:
    from training.train import parse_args, train

    train(parse_args(["--model", "plain_cnn", "--epochs", "1", "--limit-train", "256", "--limit-eval", "100",
                      "--batch-size", "128", "--quiet", "--no-plot", "--no-tensorboard", "--out", str(tmp_path)]))
    assert not (tmp_path / "tensorboard").exists()
    other = tmp_path / "tb-elsewhere"
    train(parse_args(["--model", "plain_cnn", "--epochs", "1", "--limit-train", "256", "--limit-eval", "100",
                      "--batch-size", "128", "--quiet", "--no-plot", "--tensorboard", str(other),
                      "--out", str(tmp_path / "run2")]))
    assert list(other.glob("events.out.tfevents.*")) and not (tmp_path / "run2" / "tensorboard").exists()


def test_report_for_a_run_draws_every_figure(report_run: Path) -> None:
    report = write_report(report_run)
    check_figures(report_run)
    written = json.loads((report_run / "report.json").read_text())
    metrics = json.loads((report_run / "metrics.json").read_text())
    assert written["test_images"] == 500 == sum(map(sum, written["confusion_matrix"]))
    # the report re-evaluates the checkpoint in fp32 on the CPU: the run's own test accuracy
    assert written["test_accuracy_measured"] == pytest.approx(metrics["test_accuracy"], abs=0.004)
    assert report["calibration"]["ece_bins"] == 15


def test_report_for_a_shipped_model_runs_its_onnx_graph(tmp_path: Path, catsdogs_folder: Path) -> None:
    """A registry folder (copied, so the repository's figures stay as committed)."""
    folder = tmp_path / "catsdogs"
    shutil.copytree(REPO / "models" / "catsdogs", folder)
    report = write_report(folder)
    check_figures(folder)
    assert not (folder / "report.json").exists()  # a registry folder gets figures only
    card = read_card(folder)
    assert report["test_images"] == card.metrics["test_images"] == 1000
    assert report["test_accuracy_measured"] == pytest.approx(card.metrics["test_accuracy"], abs=0.002)
    assert report["calibration"]["card_calibration"] == card.calibration
    cal = report["calibration"]
    assert cal["test_ece_after"] <= cal["test_ece_before"]


def test_report_refuses_a_folder_without_a_model(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="neither a training run"):
        write_report(tmp_path)


def test_first_layer_filters_and_stages_for_the_zoo() -> None:
    from training.cam import feature_stages
    from training.nets import ARCHITECTURES, build_model
    from training.monitor import first_conv
    from training.report import stage_outputs

    for name in sorted(set(ARCHITECTURES) - {"tv_resnet18", "vgg16", "resnet34"}):
        net = build_model(name, 10).eval()
        assert first_conv(net).in_channels == 3
        outputs = stage_outputs(net, torch.randn(1, 3, 32, 32))
        assert len(outputs) == len(feature_stages(net)) >= 2, name
        sizes = [out.shape[-1] for _, out in outputs]
        assert sizes == sorted(sizes, reverse=True) and sizes[-1] < 32, name  # resolution falls stage by stage


def test_compare_commands_write_their_tables_and_figure(tmp_path: Path, cifar_folder: Path) -> None:
    """Both course comparisons at a tiny budget: one figure, a table row per optimizer / network."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("benchmarks_compare", REPO / "benchmarks" / "compare.py")
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)
    OPTIMIZERS, compare_main = compare.OPTIMIZERS, compare.main

    tiny = ["--limit-train", "256", "--epochs", "1", "--limit-eval", "100", "--batch-size", "128"]
    compare_main(["optimizers", "--out", str(tmp_path / "opt"), *tiny])
    with Image.open(tmp_path / "opt" / "compare-optimizers.png") as image:
        assert image.format == "PNG"
    rows = json.loads((tmp_path / "opt" / "compare-optimizers.json").read_text())["rows"]
    assert [r["optimizer"] for r in rows] == list(OPTIMIZERS)
    seeds = {json.loads((tmp_path / "opt" / n / "metrics.json").read_text())["data_fingerprint"] for n in OPTIMIZERS}
    assert len(seeds) == 1  # the same split for all three
    compare_main(["architectures", "--out", str(tmp_path / "arch"), *tiny, "--models", "plain_cnn", "lenet5",
                  "--inference-images", "250"])
    rows = json.loads((tmp_path / "arch" / "compare-architectures.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["plain_cnn", "lenet5"]
    assert all(r["inference_images_per_s"] > 0 and r["parameters"] > 0 for r in rows)
    assert "| lenet5 |" in (tmp_path / "arch" / "compare-architectures.md").read_text()
