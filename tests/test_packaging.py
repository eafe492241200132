"""Packaging: pins agree, the Dockerfile lints, its install and entry point work outside Docker,
and ``bentoml build`` makes a Bento holding the service and the models."""

from __future__ import annotations

import os
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from importlib import metadata
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


def test_serving_pins_agree_with_the_lock_and_the_environment() -> None:
    """requirements-serve.txt pins what requirements.lock pins, and this environment (made from
    the lock by `make setup`) has exactly those versions installed."""
    lock, serve = pins(REPO / "requirements.lock"), pins(REPO / "requirements-serve.txt")
    assert serve and all(lock.get(name) == version for name, version in serve.items()), (serve, lock)
    for name in ("torch", "torchvision", *serve):
        assert metadata.version(name) == lock[name], name


def test_cpu_image_requirements_are_the_gpu_ones_without_cuda() -> None:
    """requirements-serve-cpu.txt (the Dockerfile's `cpu` target): the serving pins with the CPU
    onnxruntime at onnxruntime-gpu's version, and neither torch nor any CUDA package."""
    lock, serve = pins(REPO / "requirements.lock"), pins(REPO / "requirements-serve.txt")
    cpu = pins(REPO / "requirements-serve-cpu.txt")
    assert cpu.pop("onnxruntime") == lock["onnxruntime-gpu"]
    assert cpu == {name: v for name, v in serve.items() if name not in ("onnxruntime-gpu", "torch")}
    assert not [name for name in cpu if "torch" in name or "nvidia" in name or "cuda" in name]


def test_dockerfile_targets_and_context() -> None:
    """Two targets, GPU the default (the last stage) on the CUDA base, CPU on a plain Debian base,
    each base a build argument; the build context (.dockerignore) is the serving code, the models
    and the requirements, without training code, tests, datasets or report images."""
    text = dockerfile()
    stages = re.findall(r"^FROM \$\{(\w+)\} AS (\w+)$", text, re.M)
    assert stages == [("CPU_BASE", "cpu"), ("GPU_BASE", "gpu")], stages
    assert re.search(r"^ARG GPU_BASE=nvidia/cuda:\S+-runtime-\S+$", text, re.M)
    assert re.search(r"^ARG CPU_BASE=debian:\S+-slim$", text, re.M)
    cpu, gpu = text.split("AS gpu")
    assert "requirements-serve-cpu.txt" in cpu and "requirements-serve.txt " not in cpu
    assert "pip install -r requirements-serve.txt -c requirements.lock" in gpu
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    assert ignore[ignore.index("*") + 1:][:2] == ["!service/", "!models/"]
    assert not [line for line in ignore if line.startswith("!") and
                line.strip("!/") in ("training", "tests", "runs", "benchmarks", "docs")]


def test_wheelhouse_is_never_committed() -> None:
    assert (REPO / "wheelhouse" / ".gitignore").read_text().splitlines()[1:4] == ["*", "!.gitignore", "!README.md"]


def test_locked_environment_is_consistent() -> None:
    """Every installed package's own requirements are met (e.g. torchvision's torch range by the
    locked torch): `pip check` fails when the lock pins an incompatible pair."""
    result = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_lints_clean() -> None:
    result = subprocess.run([str(BIN / "hadolint"), "Dockerfile"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def dockerfile() -> str:
    return (REPO / "Dockerfile").read_text()


def test_dockerfile_install_command_is_satisfied_offline() -> None:
    """The GPU image's pip line (same files, same flags), resolved with no index at all: every
    requirement and constraint must be met by the pinned environment (nothing is fetched)."""
    gpu = dockerfile().split("AS gpu", 1)[1]
    line = re.search(r"pip install (-r requirements-serve\.txt[^\\\n]*)", gpu).group(1)
    args = line.split()
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", *args],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Would install" not in result.stdout  # the lock already pins everything it needs


def read_until(sock: socket.socket, marker: bytes, buffer: bytes = b"") -> tuple[bytes, bytes]:
    """Bytes up to and including ``marker``, and what was read past it."""
    while marker not in buffer:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed before {marker!r}: {buffer[:300]!r}")
        buffer += chunk
    head, rest = buffer.split(marker, 1)
    return head + marker, rest


def post_with_expect_continue(port: int, path: str, files: list, on_continue) -> tuple[int, bytes]:
    """POST a multipart body over a raw HTTP/1.1 connection with ``Expect: 100-continue``: send the
    headers, wait for the server's ``100 Continue``, call ``on_continue()``, then send the body.
    Returns the final status and body (Content-Length or chunked)."""
    request = httpx.Request("POST", f"http://127.0.0.1:{port}{path}", files=files)
    body = request.read()
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {request.headers['content-type']}\r\n"
            f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(head)
        interim, rest = read_until(sock, b"\r\n\r\n")
        assert interim.startswith(b"HTTP/1.1 100"), interim  # not a final answer before the body
        on_continue()
        sock.sendall(body)
        response, rest = read_until(sock, b"\r\n\r\n", rest)
        while chunk := sock.recv(65536):
            rest += chunk
    status = int(response.split(b" ", 2)[1])
    headers = response.lower()
    if b"transfer-encoding: chunked" in headers:
        payload = b""
        while True:
            size_line, rest = rest.split(b"\r\n", 1)
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            payload, rest = payload + rest[:size], rest[size + 2:]
        return status, payload
    return status, rest


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
        # the image's HEALTHCHECK command: healthy on IMGCLF_PORT, unhealthy on a port nobody serves
        health = subprocess.run([str(script), "--healthcheck"], env=env, capture_output=True, timeout=30)
        assert health.returncode == 0, health.stderr
        sick = subprocess.run([str(script), "--healthcheck"], env={**env, "IMGCLF_PORT": str(free_port())},
                              capture_output=True, timeout=30)
        assert sick.returncode != 0
        photos = sorted((cifar_folder / "test" / "frog").glob("*.jpg"))[:64]
        files = [("images", (p.name, p.read_bytes(), "image/jpeg")) for p in photos]
        # SIGTERM goes out only once the server has provably started the request: its "100 Continue"
        # answer to `Expect: 100-continue` is sent when the app first reads the body. The body
        # follows the signal, so the whole request is served during the drain.
        status, body = post_with_expect_continue(port, "/classify_batch", files,
                                                 on_continue=lambda: os.killpg(proc.pid, signal.SIGTERM))
        assert status == 200, body[:500]
        assert len(json.loads(body)["results"]) == 64
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
