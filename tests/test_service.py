"""The real BentoML server on a free port: answers, batching, every kind of bad input."""

from __future__ import annotations

import concurrent.futures as cf
import io
import json
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import REPO, SHIPPED_MODELS, Server

CIFAR_CARD = json.loads((SHIPPED_MODELS / "cifar10" / "card.json").read_text())


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def post(server: Server, files, data=None, path: str = "/classify") -> httpx.Response:
    return httpx.post(server.url + path, files=files, data=data or {}, timeout=60)


@pytest.fixture(scope="module")
def cifar_samples(cifar_folder: Path) -> list[tuple[str, bytes]]:
    """Five real test JPEGs per class: (true label, file bytes)."""
    return [(name, path.read_bytes()) for name in CIFAR_CARD["classes"]
            for path in sorted((cifar_folder / "test" / name).glob("*.jpg"))[:5]]


def test_classify_real_cifar_images(server: Server, cifar_samples) -> None:
    correct = 0
    for label, data in cifar_samples:
        response = post(server, {"image": ("x.jpg", data, "image/jpeg")})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model"] == "cifar10" and body["version"] == CIFAR_CARD["version"]
        assert list(body["probabilities"]) == CIFAR_CARD["classes"]
        assert sum(body["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
        assert body["label"] == max(body["probabilities"], key=body["probabilities"].get)
        assert [t["label"] for t in body["top_k"]][0] == body["label"] and len(body["top_k"]) == 5
        correct += body["label"] == label
    assert correct / len(cifar_samples) >= CIFAR_CARD["metrics"]["test_accuracy"] - 0.15


def test_top_k_is_clamped_and_sorted(server: Server, cifar_samples) -> None:
    body = post(server, {"image": ("x.jpg", cifar_samples[0][1])}, {"top_k": "50"}).json()
    probabilities = [t["probability"] for t in body["top_k"]]
    assert len(probabilities) == 10 and probabilities == sorted(probabilities, reverse=True)


def test_classify_batch_keeps_order_and_reports_bad_files(server: Server, cifar_samples) -> None:
    picks = cifar_samples[::7]
    files = [("images", (f"{i}.jpg", data, "image/jpeg")) for i, (_, data) in enumerate(picks)]
    files.insert(2, ("images", ("bad.txt", b"not an image", "text/plain")))
    response = post(server, files, {"top_k": "3"}, path="/classify_batch")
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == len(picks) + 1
    assert results[2]["error"] == "not_an_image"
    singles = [post(server, {"image": ("x.jpg", data)}).json() for _, data in picks]
    for got, single in zip(results[:2] + results[3:], singles):
        assert got["label"] == single["label"] and len(got["top_k"]) == 3
        assert got["probabilities"]["cat"] == pytest.approx(single["probabilities"]["cat"], abs=1e-5)


@pytest.mark.parametrize("layout", ["server", "engine_service_server"])
def test_concurrent_requests_run_as_batches(request: pytest.FixtureRequest, layout: str, cifar_samples) -> None:
    server = request.getfixturevalue(layout)

    def batch_histogram() -> dict[str, float]:
        text = httpx.get(server.url + "/metrics").text
        return {m[0]: float(m[1]) for m in re.findall(
            r'imgclf_model_batch_size_bucket\{le="([^"]+)",model="cifar10"\} ([0-9.e+]+)', text)}

    before = batch_histogram()
    with cf.ThreadPoolExecutor(32) as pool:  # 200 requests: also past BentoML's 100-call pool recycling
        codes = list(pool.map(lambda d: post(server, {"image": ("x.jpg", d[1])}).status_code,
                              cifar_samples * 4))
    assert codes == [200] * len(codes)
    after = batch_histogram()
    batches = after["+Inf"] - before.get("+Inf", 0)
    single = after["1.0"] - before.get("1.0", 0)
    assert batches < len(codes)  # 200 requests were served by fewer model calls
    assert batches - single >= 1  # and at least one batch held several images


def test_both_engine_layouts_give_the_same_answer(server: Server, engine_service_server: Server,
                                                 cifar_samples) -> None:
    for _, data in cifar_samples[::10]:
        here = post(server, {"image": ("x.jpg", data)}).json()
        there = post(engine_service_server, {"image": ("x.jpg", data)}).json()
        assert here["label"] == there["label"]
        assert here["probabilities"] == pytest.approx(there["probabilities"], abs=1e-6)


def test_in_process_engine_survives_a_failing_batch() -> None:
    import asyncio

    from service.registry import load_model
    from service.service import InProcessEngine

    engine = InProcessEngine({"cifar10": load_model(SHIPPED_MODELS / "cifar10", "onnx", "cpu")},
                             max_batch_size=8, batching=True)
    good = {"model": "cifar10", "pixels": np.zeros((3, 32, 32), np.uint8)}

    async def scenario() -> list:
        with pytest.raises(KeyError):
            await engine.predict([{"model": "not-loaded", "pixels": good["pixels"]}])
        return await asyncio.gather(*(engine.predict([good]) for _ in range(20)))

    rows = asyncio.run(scenario())
    assert len(rows) == 20 and all(r[0].shape == (10,) for r in rows)


def test_models_endpoint_lists_cards(server: Server) -> None:
    body = httpx.get(server.url + "/models/").json()
    assert body["default"] == "cifar10" and body["models"]["cifar10"]["version"] == CIFAR_CARD["version"]
    assert httpx.get(server.url + "/models/cifar10").json()["classes"] == CIFAR_CARD["classes"]
    missing = httpx.get(server.url + "/models/nope")
    assert missing.status_code == 404 and "cifar10" in missing.json()["detail"]["valid"]


def test_metrics_and_health(server: Server) -> None:
    assert httpx.get(server.url + "/livez").status_code == 200
    assert httpx.get(server.url + "/readyz").status_code == 200
    text = httpx.get(server.url + "/metrics").text
    assert "bentoml_service_request_duration_seconds_bucket" in text
    assert "imgclf_images_total" in text


# --- bad input: every case a 4xx JSON {"error", "detail"}, and the server keeps serving ---------

def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def bomb_png(side: int = 30000) -> bytes:
    """A few hundred bytes claiming 30000x30000 pixels (900 Mpx)."""
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 4096)) + _png_chunk(b"IEND", b""))


def bad_crc_png() -> bytes:
    data = bytearray(encode(Image.new("RGB", (32, 32), (200, 30, 30))))
    data[29:33] = b"\x00\x00\x00\x00"  # the IHDR chunk's CRC
    return bytes(data)


def bad_idat_crc_png() -> bytes:
    data = bytearray(encode(Image.effect_noise((64, 64), 50).convert("RGB")))
    at = data.find(b"IDAT")
    crc = at + 4 + struct.unpack(">I", data[at - 4:at])[0]
    data[crc:crc + 4] = bytes(4)  # Pillow itself would decode this file without complaint
    return bytes(data)


def truncated_jpeg() -> bytes:
    data = encode(Image.effect_noise((256, 256), 60).convert("RGB"), "JPEG", quality=90)
    return data[: len(data) // 2]


BAD_INPUTS = {
    "no_file": ({}, {"model": "cifar10"}, 400, "no_file"),
    "empty_file": ({"image": ("e.jpg", b"", "image/jpeg")}, {}, 400, "empty_file"),
    "not_an_image": ({"image": ("a.jpg", b"%PDF-1.4 definitely not a jpeg", "image/jpeg")}, {}, 400, "not_an_image"),
    "truncated_jpeg": ({"image": ("t.jpg", truncated_jpeg(), "image/jpeg")}, {}, 400, "corrupt_image"),
    "png_bad_crc": ({"image": ("c.png", bad_crc_png(), "image/png")}, {}, 400, "corrupt_image"),
    "png_bad_idat_crc": ({"image": ("c.png", bad_idat_crc_png(), "image/png")}, {}, 400, "corrupt_image"),
    "decompression_bomb": ({"image": ("b.png", bomb_png(), "image/png")}, {}, 413, "image_too_large"),
    "body_too_large": ({"image": ("big.jpg", b"\xff" * (3 * 1024 * 1024), "image/jpeg")}, {}, 413, "body_too_large"),
    "unknown_model": ({"image": ("x.png", encode(Image.new("RGB", (8, 8))))}, {"model": "imagenet"}, 404, "unknown_model"),
    "top_k_zero": ({"image": ("x.png", encode(Image.new("RGB", (8, 8))))}, {"top_k": "0"}, 400, "invalid_top_k"),
    "top_k_not_int": ({"image": ("x.png", encode(Image.new("RGB", (8, 8))))}, {"top_k": "many"}, 400, "invalid_request"),
    "url_instead_of_file": ({}, {"image": "http://127.0.0.1:9/x.jpg"}, 400, "no_file"),
    "svg_text": ({"image": ("x.svg", b"<svg xmlns='http://www.w3.org/2000/svg'/>", "image/svg+xml")}, {}, 400, "not_an_image"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gets_clear_4xx(server: Server, case: str) -> None:
    files, data, status, error = BAD_INPUTS[case]
    response = post(server, files, data)
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == error and body["detail"]
    assert "Traceback" not in response.text
    assert httpx.get(server.url + "/livez").status_code == 200


@pytest.fixture(scope="module")
def reference_image(cifar_folder: Path) -> Image.Image:
    """A real photo, upscaled so orientation and resizing matter."""
    with Image.open(sorted((cifar_folder / "test" / "horse").glob("*.jpg"))[3]) as image:
        return image.convert("RGB").resize((96, 64), Image.Resampling.BICUBIC)


def _probabilities(server: Server, data: bytes) -> np.ndarray:
    response = post(server, {"image": ("x", data)})
    assert response.status_code == 200, response.text
    return np.array(list(response.json()["probabilities"].values()))


def _exif_rotated(image: Image.Image) -> bytes:
    """Pixels stored rotated, with EXIF orientation 6 (rotate 90 CW to display) to undo it."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(image.transpose(Image.Transpose.ROTATE_90), "PNG", exif=exif)


CONVERSIONS = {
    # name: (how the upload is made, how the equivalent plain RGB image is made)
    "gif": (lambda im: encode(im.quantize(256), "GIF"), lambda im: im.quantize(256).convert("RGB")),
    "webp": (lambda im: encode(im, "WEBP", lossless=True), lambda im: im),
    "tiff": (lambda im: encode(im, "TIFF"), lambda im: im),
    "bmp": (lambda im: encode(im, "BMP"), lambda im: im),
    "grayscale": (lambda im: encode(im.convert("L")), lambda im: im.convert("L").convert("RGB")),
    "rgba_opaque": (lambda im: encode(im.convert("RGBA")), lambda im: im),
    "cmyk_jpeg": (lambda im: encode(im.convert("CMYK"), "TIFF"), lambda im: im.convert("CMYK").convert("RGB")),
    "gray_16bit": (lambda im: encode(Image.fromarray((np.asarray(im.convert("L"), np.uint16) * 257))),
                   lambda im: im.convert("L").convert("RGB")),
    "exif_rotated": (_exif_rotated, lambda im: im),
}


@pytest.mark.parametrize("case", sorted(CONVERSIONS))
def test_formats_and_modes_are_converted_correctly(server: Server, reference_image, case: str) -> None:
    make_upload, make_reference = CONVERSIONS[case]
    got = _probabilities(server, make_upload(reference_image))
    want = _probabilities(server, encode(make_reference(reference_image)))
    assert np.abs(got - want).max() < 1e-4, (got, want)


def test_transparent_pixels_are_composited_on_white(server: Server) -> None:
    clear = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    white = Image.new("RGB", (32, 32), (255, 255, 255))
    assert np.abs(_probabilities(server, encode(clear)) - _probabilities(server, encode(white))).max() < 1e-5


def test_corrupted_artifact_stops_startup_before_port_opens(tmp_path: Path) -> None:
    import shutil

    shutil.copytree(SHIPPED_MODELS / "cifar10", tmp_path / "cifar10")
    (tmp_path / "cifar10" / "model.onnx").write_bytes(b"tampered")
    result = subprocess.run([sys.executable, "-m", "service.serve", "--port", "1"], cwd=REPO,
                            env={**__import__("os").environ, "IMGCLF_MODELS_DIR": str(tmp_path)},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "sha256" in lines[0] and "does not match" in lines[0]


def test_python_client_example_from_readme(server: Server, cifar_folder: Path) -> None:
    import bentoml

    photo = sorted((cifar_folder / "test" / "ship").glob("*.jpg"))[0]
    with bentoml.SyncHTTPClient(server.url) as client:
        result = client.classify(image=photo, model="cifar10", top_k=3)
        batch = client.classify_batch(images=[photo, photo], model="cifar10", top_k=1)
    assert len(result["top_k"]) == 3 and sum(result["probabilities"].values()) == pytest.approx(1, abs=1e-4)
    assert [r["label"] for r in batch["results"]] == [result["label"]] * 2


def test_curl_lines_from_readme(server: Server, cifar_folder: Path) -> None:
    readme = (REPO / "README.md").read_text()
    photo = sorted((cifar_folder / "test" / "cat").glob("*.jpg"))[0]
    lines = [line.split("#")[0].strip() for line in readme.splitlines() if line.startswith("curl ")]
    assert len(lines) >= 4
    for line in lines:
        command = (line.replace("localhost:3000", server.url).replace("@cat.jpg", f"@{photo}")
                   .replace("@a.jpg", f"@{photo}").replace("@b.png", f"@{photo}"))
        if "catsdogs" in command and "catsdogs" not in httpx.get(server.url + "/models/").json()["models"]:
            continue
        result = subprocess.run(command + " -s -w '\\n%{http_code}'", shell=True, capture_output=True, text=True)
        body, code = result.stdout.rsplit("\n", 1)
        assert code == "200", (command, body)
        json.loads(body)


def test_request_ids_are_returned(server: Server) -> None:
    image = {"image": ("x.png", encode(Image.new("RGB", (8, 8))))}
    generated = httpx.post(server.url + "/classify", files=image).headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    echoed = httpx.post(server.url + "/classify", files=image, headers={"X-Request-ID": "abc-123"})
    assert echoed.headers["x-request-id"] == "abc-123"


def test_startup_logs_name_engine_backend_and_device(server: Server, engine_service_server: Server) -> None:
    ready = [r["message"] for r in server.log_records() if r["message"].startswith("model ready")]
    assert any("model=cifar10" in m and "backend=onnx device=cpu engine=inprocess" in m for m in ready), ready
    ready = [r["message"] for r in engine_service_server.log_records() if r["message"].startswith("model ready")]
    assert any("model=cifar10" in m and "engine=service" in m for m in ready), ready


def test_debug_logs_carry_the_request_id(engine_service_server: Server) -> None:
    httpx.post(engine_service_server.url + "/classify", files={"image": ("x.txt", b"plain text")},
               headers={"X-Request-ID": "trace-me-42"})
    mine = [r for r in engine_service_server.log_records() if r.get("request_id") == "trace-me-42"]
    assert mine and "not_an_image" in mine[0]["message"] and mine[0]["level"] == "DEBUG"


def test_no_per_request_log_lines_by_default(server: Server) -> None:
    """Runs after the bad-input cases above: at the default level nothing is logged per request."""
    assert [r for r in server.log_records() if "request_id" in r] == []


def test_load_generator_runs_against_the_server(server: Server, tmp_path: Path) -> None:
    """benchmarks/serve_bench.py works (its figures live in docs/BENCHMARKS.md, not here)."""
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "serve_bench.py"), "--url", server.url,
                    "--concurrency", "4", "--seconds", "1", "--files", "4", "--ceiling-images", "256",
                    "--json", str(out)], check=True, capture_output=True, timeout=300)
    runs = json.loads(out.read_text())["runs"]
    assert [r["path"] for r in runs] == ["/classify", "/classify_batch"]
    assert all(r["requests"] > 0 and r["failures"] == 0 for r in runs)
    batch = runs[1]
    assert batch["images_per_s"] == pytest.approx(4 * batch["requests_per_s"], rel=0.01)
