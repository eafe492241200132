"""benchmarks/gpu_run.py cannot rot: its --smoke mode runs every stage on the CPU with tiny budgets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.card import read_card

from conftest import REPO

SCRIPT = REPO / "benchmarks" / "gpu_run.py"


def run(out: Path, *args: str, timeout: float = 420, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), str(out), "--smoke", *args], cwd=REPO, text=True,
                          env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          timeout=timeout)


@pytest.mark.slow
def test_smoke_run_trains_exports_scores_serves_and_reports(tmp_path: Path, cifar_folder: Path,
                                                            catsdogs_folder: Path) -> None:
    out = tmp_path / "gpu-run"
    done = run(out)
    report = json.loads((out / "report.json").read_text())
    stages = report["stages"]
    assert list(stages) == ["env", "cifar10", "catsdogs", "score", "serve"], done.stdout[-3000:]
    failed = {name: stage.get("error") for name, stage in stages.items() if stage["status"] != "ok"}
    assert not failed and done.returncode == 0, (failed, done.stdout[-3000:])
    # the registry it exported serves: both cards, with the run's command and seed
    for name in ("cifar10", "catsdogs"):
        card = read_card(out / "registry" / name)
        assert card.training["seed"] == 0 and "--preset" in card.training["command"]
    # checkpoints only of what ships; the other runs leave their metrics
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["catsdogs-imagenet", "cifar10-ship"]
    assert (out / "checkpoints" / "cifar10-ship" / "best.pt").exists()
    assert not list((out / "runs").rglob("best.pt")) and (out / "runs" / "cifar10-fast-s0" / "metrics.json").exists()
    assert report["achieved"]["fast_preset_mean_test_accuracy"] is not None
    assert report["achieved"]["score_cifar10_images_per_s"] and report["achieved"]["serve_classify_requests_per_s"]
    assert "| cifar10 | ok |" in (out / "report.md").read_text()
    assert report["out_bytes"] < 64 * 1024 * 1024


@pytest.mark.slow
def test_a_failing_stage_is_recorded_and_the_next_still_runs(tmp_path: Path) -> None:
    out = tmp_path / "gpu-run"
    (tmp_path / "no-datasets").mkdir()
    done = run(out, "--stages", "cifar10,catsdogs", "--backbone", str(tmp_path / "missing.pt"), timeout=180,
               env={"IMGCLF_DATASETS": str(tmp_path / "no-datasets"), "IMGCLF_CACHE": str(tmp_path / "cache")})
    assert done.returncode == 1
    report = json.loads((out / "report.json").read_text())
    assert report["stages"]["env"]["status"] == "ok"
    assert report["stages"]["cifar10"]["status"] == "failed"  # no dataset to train on
    assert report["stages"]["catsdogs"]["status"] == "failed"  # ran all the same, and says why
    assert "cats-vs-dogs data not found" in report["stages"]["catsdogs"]["error"]
    assert "| catsdogs | failed |" in (out / "report.md").read_text()


def test_unknown_stage_is_refused(tmp_path: Path) -> None:
    done = run(tmp_path / "x", "--stages", "cifar10,train", timeout=60)
    assert done.returncode == 2 and "unknown stages ['train']" in done.stdout
