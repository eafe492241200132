"""Shared fixtures: the real datasets (skipped where absent) and the real server on a free port."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest
from PIL import Image

from service.card import read_card

REPO = Path(__file__).resolve().parent.parent
DATASETS = Path(os.environ.get("IMGCLF_DATASETS", REPO.parent / "shared" / "datasets"))
CIFAR_ARCHIVE = DATASETS / "cifar10-jpeg.tar.gz"
CATSDOGS_ARCHIVE = DATASETS / "catsdogs.tar.gz"
SHIPPED_MODELS = REPO / "models"
CIFAR_CARD = read_card(SHIPPED_MODELS / "cifar10")

# Tests share one cache of extracted archives and decoded tensors, outside the repository.
os.environ.setdefault("IMGCLF_CACHE", str(Path.home() / ".cache" / "imgclf"))


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    """An image's file bytes in ``fmt`` (Pillow's encoder)."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"dataset archive {path} is absent (see ../shared/datasets/README.md)")
    return path


@pytest.fixture(scope="session")
def cifar_folder() -> Path:
    from training.data import extract_archive

    return extract_archive(need(CIFAR_ARCHIVE)) / "cifar10-jpeg"


@pytest.fixture(scope="session")
def catsdogs_folder() -> Path:
    from training.data import extract_archive

    return extract_archive(need(CATSDOGS_ARCHIVE)) / "catsdogs"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerExited(RuntimeError):
    """The server process ended before it answered /readyz."""


class Server:
    def __init__(self, env: dict[str, str], timeout: float = 120, python: str = sys.executable,
                 attempts: int = 3) -> None:
        # A free port can be taken by another process between free_port() and the server's bind
        # (seen once in CI: "Could not bind"); a server that exits before it is ready is started
        # again on a new port, up to ``attempts`` times, and the last failure is raised.
        for attempt in range(attempts):
            try:
                return self._start(env, timeout, python)
            except ServerExited:
                if attempt == attempts - 1:
                    raise
                shutil.rmtree(self.home, ignore_errors=True)

    def _start(self, env: dict[str, str], timeout: float, python: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"imgclf-server-{self.port}.log", "w+")
        # Each server its own BENTOML_HOME: `bentoml serve` wipes $BENTOML_HOME/prometheus_multiproc_dir
        # at start, which would reset the metrics of a server already running beside it.
        self.home = home = tempfile.mkdtemp(prefix=f"imgclf-bentoml-{self.port}-")
        self.proc = subprocess.Popen(
            [python, "-m", "service.serve", "--port", str(self.port), "--host", "127.0.0.1"],
            cwd=REPO, env={**os.environ, "BENTOML_HOME": home, **env}, stdout=self.log,
            stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerExited(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout}s:\n{self.output()}")

    def output(self, tail: int = 5000) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-tail:]

    def log_size(self) -> int:
        """Where the server's log ends now (pass it to :meth:`output_since`)."""
        self.log.flush()
        return os.path.getsize(self.log.name)

    def output_since(self, offset: int) -> str:
        with open(self.log.name, errors="replace") as handle:
            handle.seek(offset)
            return handle.read()

    def log_records(self) -> list[dict]:
        """The service's own JSON log lines (BentoML's lines are plain text)."""
        lines = (line for line in self.output(tail=10**7).splitlines() if line.startswith('{"time"'))
        return [json.loads(line) for line in lines]

    def stop(self) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()
        shutil.rmtree(self.home, ignore_errors=True)
        return self.proc.returncode


@pytest.fixture(scope="session")
def server() -> Iterator[Server]:
    """The real BentoML server with the models shipped in models/ (on this CPU machine the models
    run in the API process: IMGCLF_ENGINE=auto)."""
    srv = Server({"IMGCLF_MODELS_DIR": str(SHIPPED_MODELS),
                  "IMGCLF_MAX_BODY_BYTES": str(2 * 1024 * 1024)})
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def engine_service_server() -> Iterator[Server]:
    """The same, with the models in a separate engine service (the GPU-host layout: two API workers
    feeding one engine process), debug logs and BentoML's own request metrics."""
    srv = Server({"IMGCLF_MODELS_DIR": str(SHIPPED_MODELS), "IMGCLF_ENGINE": "service",
                  "IMGCLF_API_WORKERS": "2", "IMGCLF_LOG_LEVEL": "DEBUG", "IMGCLF_BENTOML_METRICS": "1",
                  "IMGCLF_MAX_BODY_BYTES": str(2 * 1024 * 1024)})
    yield srv
    srv.stop()


# --- test tiers (reliability; see docs/RELIABILITY.md) ------------------------------------------
# `make test-fast` runs `pytest -m "not slow"`: pure functions only, under a minute. A test is slow
# when it starts a server, reads a dataset or trains (directly or through another fixture), or
# lives in a file that serves or packages for real. `make test` runs both tiers.
SLOW_FIXTURES = {"server", "engine_service_server", "lone_model_server", "cifar_folder", "catsdogs_folder",
                 "tiny_run"}
SLOW_FILES = {"test_service.py", "test_packaging.py", "test_container.py"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if fixtures & SLOW_FIXTURES or any(name.endswith("_server") for name in fixtures) \
                or item.path.name in SLOW_FILES:
            item.add_marker(pytest.mark.slow)
