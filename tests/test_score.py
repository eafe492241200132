"""Batch scoring of folders: outputs, labels and metrics, errors, resume, symlinks, remote mode."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import pytest

from service import score
from conftest import REPO, SHIPPED_MODELS, Server


@pytest.fixture()
def labeled_folder(tmp_path: Path, cifar_folder: Path) -> Path:
    """20 real test images in class folders (plural names), a text file and a broken JPEG."""
    root = tmp_path / "photos"
    for name in ("cat", "ship"):
        (root / f"{name}s").mkdir(parents=True)
        for src in sorted((cifar_folder / "test" / name).glob("*.jpg"))[:10]:
            shutil.copy(src, root / f"{name}s" / src.name)
    (root / "notes.txt").write_text("not an image")
    (root / "ships" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return root


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_scores_labeled_folder_with_metrics_and_errors(labeled_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "pred.csv"
    code = score.main([str(labeled_folder), "--model", "cifar10", "--out", str(out),
                       "--models-dir", str(SHIPPED_MODELS)])
    assert code == 1  # two files failed
    rows = read_csv(out)
    assert len(rows) == 20 and rows[0]["path"] == "cats/0000.jpg"
    assert {r["true_label"] for r in rows} == {"cat", "ship"}
    card = json.loads((SHIPPED_MODELS / "cifar10" / "card.json").read_text())
    with open(out, newline="") as handle:
        header = next(csv.reader(handle))
    assert header[-4:] == ["ood_score", "in_distribution", "true_label", "model_version"]
    for r in rows:
        probabilities = [float(r[f"p_{c}"]) for c in card["classes"]]
        assert sum(probabilities) == pytest.approx(1, abs=1e-4)
        assert float(r["probability"]) == max(probabilities) and r["model_version"] == card["version"]
        assert r["in_distribution"] == str(float(r["ood_score"]) <= card["ood"]["threshold"])
    errors = {r["path"]: r["error"] for r in read_csv(tmp_path / "pred.csv.errors.csv")}
    assert errors == {"notes.txt": "not_an_image", "ships/broken.jpg": "corrupt_image"}
    metrics = json.loads((tmp_path / "pred.csv.metrics.json").read_text())
    accuracy = sum(r["label"] == r["true_label"] for r in rows) / 20
    assert metrics["accuracy"] == pytest.approx(accuracy) and accuracy >= 0.6
    assert metrics["per_class"]["cat"]["support"] == 10
    assert "rows: true label" in (tmp_path / "pred.csv.confusion.txt").read_text()
    assert (tmp_path / "pred.csv.confusion.png").stat().st_size > 5000


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_other_formats_and_resume(labeled_folder: Path, tmp_path: Path, suffix: str) -> None:
    out = tmp_path / f"pred{suffix}"
    (labeled_folder / "notes.txt").unlink()
    (labeled_folder / "ships" / "broken.jpg").unlink()
    moved = tmp_path / "later"
    shutil.move(labeled_folder / "ships", moved)
    assert score.main([str(labeled_folder), "--out", str(out), "--models-dir", str(SHIPPED_MODELS)]) == 0
    first = score.read_existing(out)
    assert len(first) == 10
    assert all(type(r["ood_score"]) is float and type(r["in_distribution"]) is bool for r in first)
    shutil.move(moved, labeled_folder / "ships")
    assert score.main([str(labeled_folder), "--out", str(out), "--resume", "--models-dir", str(SHIPPED_MODELS)]) == 0
    rows = score.read_existing(out)
    assert len(rows) == 20 and len({r["path"] for r in rows}) == 20
    assert [r for r in rows if r["path"] == first[0]["path"]][0]["p_cat"] == pytest.approx(first[0]["p_cat"])


def test_symlink_leading_outside_is_not_followed(tmp_path: Path, cifar_folder: Path) -> None:
    root = tmp_path / "inside"
    root.mkdir()
    shutil.copy(next((cifar_folder / "test" / "dog").glob("*.jpg")), root / "a.jpg")
    os.symlink(cifar_folder / "test" / "cat", root / "outside_dir")
    os.symlink(next((cifar_folder / "test" / "cat").glob("*.jpg")), root / "outside.jpg")
    (root / "sub").mkdir()
    os.symlink(root / "a.jpg", root / "sub" / "inside_link.jpg")
    os.symlink(root, root / "sub" / "loop")
    assert [p.relative_to(root.resolve()).as_posix() for p in score.walk_files(root)] == [
        "a.jpg", "sub/inside_link.jpg"]


def test_pixel_limit_comes_from_the_service_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    (tmp_path / "in").mkdir()
    Image.new("RGB", (300, 300), "red").save(tmp_path / "in" / "big.png")
    Image.new("RGB", (32, 32), "red").save(tmp_path / "in" / "small.png")
    monkeypatch.setenv("IMGCLF_MAX_PIXELS", "10000")
    out = tmp_path / "pred.csv"
    assert score.main([str(tmp_path / "in"), "--out", str(out), "--models-dir", str(SHIPPED_MODELS)]) == 1
    assert [r["path"] for r in read_csv(out)] == ["small.png"]
    assert [(r["path"], r["error"]) for r in read_csv(tmp_path / "pred.csv.errors.csv")] == [("big.png", "image_too_large")]


def test_kaggle_label_parsing() -> None:
    classes = ["cat", "dog"]
    assert score.true_label(Path("train/dog.12.jpg"), classes) == "dog"
    assert score.true_label(Path("Cats/x.jpg"), classes) == "cat"
    assert score.true_label(Path("test1/12.jpg"), classes) is None


def test_remote_scoring_matches_local(server: Server, labeled_folder: Path, tmp_path: Path) -> None:
    local, remote = tmp_path / "local.csv", tmp_path / "remote.csv"
    score.main([str(labeled_folder), "--out", str(local), "--models-dir", str(SHIPPED_MODELS)])
    code = score.main([str(labeled_folder), "--out", str(remote), "--url", server.url, "--batch-size", "8"])
    assert code == 1
    a, b = read_csv(local), read_csv(remote)
    assert [r["path"] for r in a] == [r["path"] for r in b]
    for x, y in zip(a, b):
        assert x["label"] == y["label"] and float(x["p_cat"]) == pytest.approx(float(y["p_cat"]), abs=1e-5)
        assert float(x["ood_score"]) == pytest.approx(float(y["ood_score"]), rel=1e-5)
        assert x["in_distribution"] == y["in_distribution"] in ("True", "False")
    errors = read_csv(tmp_path / "remote.csv.errors.csv")
    assert sorted(r["error"] for r in errors) == ["corrupt_image", "not_an_image"]


def test_ray_engine_matches_local(labeled_folder: Path, tmp_path: Path) -> None:
    pytest.importorskip("ray")
    local, distributed = tmp_path / "local.csv", tmp_path / "ray.csv"
    score.main([str(labeled_folder), "--out", str(local), "--models-dir", str(SHIPPED_MODELS)])
    code = score.main([str(labeled_folder), "--out", str(distributed), "--engine", "ray", "--batch-size", "8",
                       "--workers", "2", "--models-dir", str(SHIPPED_MODELS)])
    assert code == 1
    a, b = read_csv(local), read_csv(distributed)
    assert [r["path"] for r in a] == [r["path"] for r in b]
    for x, y in zip(a, b):
        assert x["label"] == y["label"] and float(x["p_ship"]) == pytest.approx(float(y["p_ship"]), abs=1e-5)
        assert float(x["ood_score"]) == pytest.approx(float(y["ood_score"]), rel=1e-5)
    assert {r["error"] for r in read_csv(tmp_path / "ray.csv.errors.csv")} == {"corrupt_image", "not_an_image"}


def test_ctrl_c_leaves_a_whole_file_and_resume_finishes(tmp_path: Path, cifar_folder: Path) -> None:
    import re
    import signal
    import subprocess
    import sys

    folder = cifar_folder / "train" / "cat"  # 5,000 files
    out = tmp_path / "cats.csv"
    command = [sys.executable, "-m", "service.score", str(folder), "--out", str(out),
               "--models-dir", str(SHIPPED_MODELS), "--batch-size", "64"]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, cwd=REPO)
    seen = ""
    while not re.search(r"\| *[1-9]\d*/5000", seen):  # the progress bar counts scored files
        char = proc.stderr.read(1)
        assert char, seen
        seen += char
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode in (0, 130), err
    assert "leaked" not in err and "resource_tracker" not in err, err  # the decode slots were removed
    rows = read_csv(out)  # parses: never half-written
    assert 0 < len(rows) <= 5000 and not list(tmp_path.glob(".*.tmp"))
    if proc.returncode == 130:
        assert "--resume" in err and len(rows) < 5000
    assert score.main([str(folder), "--out", str(out), "--resume", "--models-dir", str(SHIPPED_MODELS)]) == 0
    final = read_csv(out)
    assert len(final) == 5000 and len({r["path"] for r in final}) == 5000

