"""Packaging: pins agree, the Dockerfile lints, its install and entry point work outside Docker,
and ``bentoml build`` makes a Bento holding the service and the models."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from conftest import REPO, SHIPPED_MODELS, free_port

BIN = Path(sys.executable).parent


def pins(path: Path) -> dict[str, str]:
    found = {}
    for line in path.read_text().splitlines():
        if m := re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;#]+)", line):
            found[m.group(1).lower().replace("_", "-")] = m.group(2)
    return found


def test_serving_pins_agree_with_the_lock() -> None:
    lock, serve = pins(REPO / "requirements.lock"), pins(REPO / "requirements-serve.txt")
    assert serve and all(lock.get(name) == version for name, version in serve.items()), (serve, lock)
    assert lock["torch"] == "2.14.1" and lock["torchvision"] == "0.29.1"


def test_dockerfile_lints_clean() -> None:
    result = subprocess.run([str(BIN / "hadolint"), "Dockerfile"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def dockerfile() -> str:
    return (REPO / "Dockerfile").read_text()


def test_dockerfile_install_command_is_satisfied_offline() -> None:
    """The Dockerfile's own pip line (same files, same flags), resolved with no index at all:
    every requirement and constraint must be met by the pinned environment (nothing is fetched)."""
    line = next(l for l in dockerfile().splitlines() if l.startswith("RUN pip install"))
    args = line.split("pip install", 1)[1].split()
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", *args],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Would install" not in result.stdout  # the lock already pins everything it needs


def test_entrypoint_serves_and_drains_on_sigterm(cifar_folder: Path) -> None:
    """The container's ENTRYPOINT script with the Dockerfile's ENV, run here; SIGTERM mid-request."""
    entry = re.search(r'ENTRYPOINT \["([^"]+)"\]', dockerfile()).group(1)
    script = REPO / entry.removeprefix("/app/")
    env_block = re.findall(r"(IMGCLF_[A-Z_]+)=(\S+)", dockerfile())
    env = {**os.environ, **dict(env_block), "IMGCLF_MODELS_DIR": str(SHIPPED_MODELS),
           "PATH": f"{BIN}:{os.environ['PATH']}", "IMGCLF_HOST": "127.0.0.1"}
    port = free_port()
    env["IMGCLF_PORT"] = str(port)
    proc = subprocess.Popen([str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        else:
            pytest.fail("entrypoint did not become ready")
        photos = sorted((cifar_folder / "test" / "frog").glob("*.jpg"))[:64]
        files = [("images", (p.name, p.read_bytes())) for p in photos]
        result: dict = {}

        def slow_request() -> None:
            result["response"] = httpx.post(url + "/classify_batch", files=files, timeout=60)

        worker = threading.Thread(target=slow_request)
        worker.start()
        time.sleep(0.3)  # the request is in flight when the signal arrives
        os.killpg(proc.pid, signal.SIGTERM)
        worker.join(60)
        assert result["response"].status_code == 200
        assert len(result["response"].json()["results"]) == 64
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_bentoml_build_includes_service_and_models(tmp_path: Path) -> None:
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml")}
    result = subprocess.run([str(BIN / "bentoml"), "build", ".", "--output", "tag"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    bentos = list((tmp_path / "bentoml" / "bentos" / "image-classifier").glob("*/src"))
    assert len(bentos) == 1
    src = bentos[0]
    assert (src / "service" / "service.py").exists() and not (src / "training").exists()
    for card in SHIPPED_MODELS.glob("*/card.json"):
        name = card.parent.name
        assert (src / "models" / name / "card.json").read_bytes() == card.read_bytes()
        assert (src / "models" / name / "model.onnx").stat().st_size == (card.parent / "model.onnx").stat().st_size
    assert "bentoml==" in (src.parent / "env" / "python" / "requirements.txt").read_text()
    shutil.rmtree(tmp_path / "bentoml")
