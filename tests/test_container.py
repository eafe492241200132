"""The CPU container image, built by ``make container`` and run by podman, checked from outside:
non-root and read-only, healthy, the same answers as the models outside the container, 4xx for
hostile uploads, counted in /metrics, JSON logs on stdout, a drained stop, and a tampered registry
mounted read-only refused at start.

Skips, saying why, where podman or runc is absent, or where the Debian base image is absent and
cannot be made (debootstrap, as root). ``IMGCLF_CONTAINER_BUILT=1`` (``make container-test``) uses
the image as built; otherwise the first test builds it with ``make container`` (podman's layer
cache makes that quick after the first time). Every port is published on 127.0.0.1 only.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from conftest import REPO, SHIPPED_MODELS, Server, free_port
from test_packaging import post_with_expect_continue

RUNC = os.environ.get("RUNC", "/usr/sbin/runc")
PODMAN = ["podman", "--runtime", RUNC]
# What this sandbox needs (podman's defaults ask for more than it allows); the Makefile's flags.
LIMITS = ["--ulimit", "nofile=20000:20000", "--ulimit", "nproc=4096:4096"]
IMAGE = os.environ.get("CONTAINER_IMAGE", "localhost/image-classifier:cpu")
BASE = os.environ.get("CONTAINER_BASE", "localhost/debian:bookworm")
PORT_INSIDE = "8123"  # not the image's default 3000: the port comes from IMGCLF_PORT
STOP_TIMEOUT_S = 30


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([*PODMAN, *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return result


def why_not() -> str | None:
    """Why the container cannot be built and run here (None: it can)."""
    if shutil.which("podman") is None:
        return "podman is not installed (make setup installs it with apt-get where it can)"
    if not os.access(RUNC, os.X_OK):
        return f"runc is not at {RUNC} (set RUNC)"
    if subprocess.run([*PODMAN, "image", "exists", BASE], capture_output=True).returncode != 0:
        if shutil.which("debootstrap") is None:
            return f"the base image {BASE} is absent and debootstrap is not installed to make it"
        if os.geteuid() != 0:
            return f"the base image {BASE} is absent and debootstrap needs root to make it"
    return None


pytestmark = pytest.mark.skipif(why_not() is not None, reason=str(why_not()))


@pytest.fixture(scope="module")
def image() -> str:
    if os.environ.get("IMGCLF_CONTAINER_BUILT") != "1":
        built = subprocess.run(["make", "container"], cwd=REPO, capture_output=True, text=True, timeout=1200)
        assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    podman("image", "exists", IMAGE)
    return IMAGE


class Container:
    """One detached container of ``image``, published on a free loopback port."""

    def __init__(self, image: str, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.name = f"imgclf-test-{self.port}"
        env_args = [f"--env={k}={v}" for k, v in {"IMGCLF_PORT": PORT_INSIDE, **(env or {})}.items()]
        # --health-interval=disable: no systemd timer (none here); `podman healthcheck run` runs it.
        podman("run", "--detach", "--name", self.name, *LIMITS, "--read-only", "--tmpfs", "/tmp:rw,size=512m",
               "--health-interval=disable", f"--publish=127.0.0.1:{self.port}:{PORT_INSIDE}", *env_args, *args,
               image)

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.state() != "running":
                raise AssertionError(f"container {self.state()}:\n{self.logs()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"not ready after {timeout}s:\n{self.logs()}")

    def state(self) -> str:
        return podman("inspect", "--format", "{{.State.Status}}", self.name).stdout.strip()

    def inspect(self) -> dict:
        return json.loads(podman("inspect", self.name).stdout)[0]

    def logs(self) -> str:
        result = podman("logs", self.name, check=False)
        return result.stdout + result.stderr

    def exec(self, *command: str) -> subprocess.CompletedProcess:
        return podman("exec", self.name, *command, check=False)

    def remove(self) -> None:
        podman("rm", "--force", "--time", "0", self.name, check=False)


@pytest.fixture(scope="module")
def container(image: str) -> Iterator[Container]:
    """The CPU image with its baked-in registry, read-only root, a tmpfs at /tmp. The queue-wait
    cap is raised from 2 s: on a loaded 2-core machine the drain test's batches can wait longer,
    and a 503 `overloaded` there would be load shedding, not what that test is about."""
    box = Container(image, env={"IMGCLF_MAX_LATENCY_MS": "60000"})
    try:
        box.wait_ready()
        yield box
    finally:
        box.remove()


def post_image(url: str, path: Path, model: str | None = None) -> httpx.Response:
    data = {"model": model} if model else None
    return httpx.post(url + "/classify", files={"image": (path.name, path.read_bytes(), "image/jpeg")},
                      data=data, timeout=60)


def test_runs_as_non_root_on_a_read_only_root(container: Container) -> None:
    info = container.inspect()
    assert info["Config"]["User"] == "10001" and info["HostConfig"]["ReadonlyRootfs"] is True
    assert container.exec("id", "-u").stdout.strip() == "10001"
    refused = container.exec("touch", "/app/models/written")
    assert refused.returncode != 0 and "Read-only file system" in refused.stderr, refused.stderr
    assert container.exec("touch", "/tmp/written").returncode == 0  # the tmpfs


def test_health_check_goes_healthy(container: Container) -> None:
    """The image's HEALTHCHECK (on IMGCLF_PORT, here not the default port) run by podman."""
    assert container.inspect()["Config"]["Healthcheck"]["Test"][-1] == "--healthcheck"
    for _ in range(60):
        if podman("healthcheck", "run", container.name, check=False).returncode == 0:
            break
        time.sleep(1)
    status = podman("inspect", "--format", "{{.State.Health.Status}}", container.name).stdout.strip()
    assert status == "healthy", container.logs()


def test_readyz_and_livez(container: Container) -> None:
    assert httpx.get(container.url + "/readyz").status_code == 200
    assert httpx.get(container.url + "/livez").status_code == 200


def assert_same_answer(inside: httpx.Response, outside: httpx.Response) -> None:
    assert inside.status_code == outside.status_code == 200, (inside.text, outside.text)
    a, b = inside.json(), outside.json()
    assert (a["model"], a["version"], a["label"]) == (b["model"], b["version"], b["label"])
    assert a["probabilities"].keys() == b["probabilities"].keys()
    for label, p in a["probabilities"].items():
        assert abs(p - b["probabilities"][label]) <= 1e-5, (label, p, b["probabilities"][label])


def test_classify_answers_what_the_models_answer_outside(container: Container, server: Server,
                                                         cifar_folder: Path, catsdogs_folder: Path) -> None:
    """A real CIFAR-10 test image (default model) and a real cat photo (model=catsdogs): the same
    label and probabilities within 1e-5 as the same registry served outside the container."""
    frog = sorted((cifar_folder / "test" / "frog").glob("*.jpg"))[0]
    cat = catsdogs_folder / "train" / "cat.0.jpg"
    inside, outside = post_image(container.url, frog), post_image(server.url, frog)
    assert_same_answer(inside, outside)
    assert inside.json()["model"] == "cifar10"
    inside, outside = post_image(container.url, cat, "catsdogs"), post_image(server.url, cat, "catsdogs")
    assert_same_answer(inside, outside)
    assert inside.json()["label"] == "cat"


def test_hostile_uploads_get_their_4xx(container: Container) -> None:
    text = httpx.post(container.url + "/classify", files={"image": ("x.jpg", b"plain text", "image/jpeg")})
    assert text.status_code == 400 and text.json()["error"] == "not_an_image", text.text
    none = httpx.post(container.url + "/classify", files={"picture": ("x.jpg", b"plain text", "image/jpeg")})
    assert 400 <= none.status_code < 500 and none.json()["error"], none.text
    unknown = httpx.post(container.url + "/classify", files={"image": ("x.png", b"\x89PNG\r\n\x1a\n", "image/png")},
                         data={"model": "no-such-model"})
    assert 400 <= unknown.status_code < 500 and unknown.json()["error"], unknown.text


def test_explain_without_torch_answers_501(container: Container, cifar_folder: Path) -> None:
    """The CPU image carries no torch: /explain says so instead of failing."""
    frog = sorted((cifar_folder / "test" / "frog").glob("*.jpg"))[0]
    answer = httpx.post(container.url + "/explain", files={"image": (frog.name, frog.read_bytes(), "image/jpeg")})
    assert answer.status_code == 501 and answer.json()["error"] == "not_explainable", answer.text
    assert container.exec("python", "-c", "import torch").returncode != 0


def counted(url: str, name: str, labels: str) -> float:
    text = httpx.get(url + "/metrics").text
    return sum(float(m[1]) for m in re.findall(rf"^{name}(\{{[^}}]*\}}) ([0-9.e+]+)$", text, re.M) if labels in m[0])


def test_metrics_count_requests_and_images(container: Container, cifar_folder: Path) -> None:
    photos = sorted((cifar_folder / "test" / "ship").glob("*.jpg"))[:3]
    ok = ("imgclf_requests_total", 'endpoint="/classify",status="200"')
    bad = ("imgclf_requests_total", 'endpoint="/classify",status="400"')
    images = ("imgclf_images_total", 'model="cifar10"')
    before = [counted(container.url, *m) for m in (ok, bad, images)]
    for photo in photos:
        assert post_image(container.url, photo).status_code == 200
    httpx.post(container.url + "/classify", files={"image": ("x.jpg", b"plain text", "image/jpeg")})
    after = [counted(container.url, *m) for m in (ok, bad, images)]
    assert [a - b for a, b in zip(after, before)] == [3, 1, 3], (before, after)


def test_logs_are_json_lines_on_stdout(container: Container) -> None:
    """The service's lines (and BentoML's from the workers) are JSON objects on stdout."""
    result = podman("logs", container.name)
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    ready = [r["message"] for r in records if r["message"].startswith("model ready")]
    assert any("model=cifar10 " in m and "backend=onnx device=cpu" in m for m in ready), result.stdout[-3000:]
    assert "Service image-classifier initialized" in {r["message"] for r in records}, result.stdout[-3000:]


def test_mounted_registry_read_only(image: str, tmp_path: Path, cifar_folder: Path) -> None:
    """Another registry (here: only the INT8 model) mounted read-only over /app/models is what serves."""
    registry = tmp_path / "models"
    shutil.copytree(SHIPPED_MODELS / "cifar10-int8", registry / "cifar10-int8")
    box = Container(image, f"--volume={registry}:/app/models:ro")
    try:
        box.wait_ready()
        frog = sorted((cifar_folder / "test" / "frog").glob("*.jpg"))[0]
        answer = post_image(box.url, frog)
        assert answer.status_code == 200 and answer.json()["model"] == "cifar10-int8", answer.text
    finally:
        box.remove()


def test_tampered_model_refuses_to_start(image: str, tmp_path: Path) -> None:
    """One changed byte in a mounted model.onnx: exit 2 and one line that says why, before serving."""
    registry = tmp_path / "models"
    shutil.copytree(SHIPPED_MODELS, registry, ignore=shutil.ignore_patterns("*.png", "*.pt"))
    onnx = registry / "cifar10" / "model.onnx"
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx.write_bytes(bytes(data))
    run = podman("run", "--rm", *LIMITS, "--read-only", "--tmpfs", "/tmp", "--no-healthcheck",
                 f"--volume={registry}:/app/models:ro",
                 image, timeout=120, check=False)
    lines = [line for line in (run.stdout + run.stderr).splitlines() if line.strip()]
    assert run.returncode == 2, run.stdout + run.stderr
    assert len(lines) == 1 and lines[0].startswith("imgclf: cannot start: "), lines
    assert "cifar10" in lines[0] and "sha256" in lines[0], lines[0]


def test_stop_drains_in_flight_requests(container: Container, cifar_folder: Path) -> None:
    """`podman stop` while four 32-image batch requests are in flight: all four are answered in full, and
    the container exits by itself (status 0) within the stop timeout rather than being killed.
    Last in this module: it stops the shared container."""
    photos = sorted((cifar_folder / "test" / "frog").glob("*.jpg"))[:32]
    files = [("images", (p.name, p.read_bytes(), "image/jpeg")) for p in photos]
    stopper: list[subprocess.Popen] = []

    def stop() -> None:  # once every request has been provably started (its 100 Continue)
        stopper.append(subprocess.Popen([*PODMAN, "stop", "--time", str(STOP_TIMEOUT_S), container.name],
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))

    started = threading.Barrier(4, action=stop, timeout=60)
    answers: list[tuple[int, bytes] | BaseException] = []

    def one() -> None:
        try:
            answers.append(post_with_expect_continue(container.port, "/classify_batch", files,
                                                     on_continue=started.wait))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            answers.append(exc)

    threads = [threading.Thread(target=one) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert stopper, answers
    stopped = stopper[0].communicate(timeout=STOP_TIMEOUT_S + 60)[0]
    assert stopper[0].returncode == 0, stopped
    for answer in answers:
        assert not isinstance(answer, BaseException), answer
        status, body = answer
        assert status == 200, body[:500]
        assert len(json.loads(body)["results"]) == 32
    assert len(answers) == 4
    state = container.inspect()["State"]
    assert state["Status"] == "exited" and state["ExitCode"] == 0, (state, container.logs()[-3000:])
