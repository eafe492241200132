"""The real BentoML server on a free port: answers, batching, every kind of bad input."""

from __future__ import annotations

import concurrent.futures as cf
import io
import json
import os
import re
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import CIFAR_CARD, REPO, SHIPPED_MODELS, Server, encode, free_port

def post(server: Server, files, data=None, path: str = "/classify") -> httpx.Response:
    return httpx.post(server.url + path, files=files, data=data or {}, timeout=60)


@pytest.fixture(scope="module")
def cifar_samples(cifar_folder: Path) -> list[tuple[str, bytes]]:
    """Five real test JPEGs per class: (true label, file bytes)."""
    return [(name, path.read_bytes()) for name in list(CIFAR_CARD.classes)
            for path in sorted((cifar_folder / "test" / name).glob("*.jpg"))[:5]]


def test_classify_real_cifar_images(server: Server, cifar_samples) -> None:
    correct = 0
    for label, data in cifar_samples:
        response = post(server, {"image": ("x.jpg", data, "image/jpeg")})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model"] == "cifar10" and body["version"] == CIFAR_CARD.version
        assert list(body["probabilities"]) == list(CIFAR_CARD.classes)
        assert sum(body["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
        assert body["label"] == max(body["probabilities"], key=body["probabilities"].get)
        assert [t["label"] for t in body["top_k"]][0] == body["label"] and len(body["top_k"]) == 5
        correct += body["label"] == label
    assert correct / len(cifar_samples) >= CIFAR_CARD.metrics["test_accuracy"] - 0.15


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


def metric_values(server: Server, name: str) -> dict[str, float]:
    """{label set: value} of one metric family, from /metrics (every worker and service summed)."""
    text = httpx.get(server.url + "/metrics").text
    return {m[0]: float(m[1]) for m in re.findall(rf"^{name}(\{{[^}}]*\}})? ([0-9.e+]+)$", text, re.M)}


def metric(server: Server, name: str, labels: str = "") -> float:
    return sum(v for k, v in metric_values(server, name).items() if labels in k)


@pytest.mark.parametrize("layout", ["server", "engine_service_server"])
def test_concurrent_requests_run_as_batches(request: pytest.FixtureRequest, layout: str, cifar_samples) -> None:
    server = request.getfixturevalue(layout)
    calls = "imgclf_model_batch_size_count"
    before = (metric(server, calls, 'model="cifar10"'), metric(server, "imgclf_images_total", 'model="cifar10"'))
    with cf.ThreadPoolExecutor(32) as pool:  # 200 requests: also past BentoML's 100-call pool recycling
        answers = list(pool.map(lambda d: post(server, {"image": ("x.jpg", d[1])}), cifar_samples * 4))
    codes = [a.status_code for a in answers]
    assert codes == [200] * len(codes), [a.text for a in answers if a.status_code != 200][:5]
    model_calls = metric(server, calls, 'model="cifar10"') - before[0]
    images = metric(server, "imgclf_images_total", 'model="cifar10"') - before[1]
    assert images == len(codes)  # every image went through a model call exactly once
    assert 1 <= model_calls < len(codes)  # 200 requests were served by fewer model calls


def test_engine_service_gets_one_call_per_batch_not_per_request(engine_service_server: Server,
                                                                 cifar_samples) -> None:
    """The scaling rule: two API workers batch locally, and the process that owns the models
    receives one call per batch, never one per request."""
    server = engine_service_server
    calls_before = metric(server, "imgclf_engine_calls_total")
    ok_before = metric(server, "imgclf_requests_total", 'status="200"')
    with cf.ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda d: post(server, {"image": ("x.jpg", d[1])}), cifar_samples * 4))
    codes = [a.status_code for a in answers]
    assert codes == [200] * len(codes), [a.text for a in answers if a.status_code != 200][:5]
    requests = metric(server, "imgclf_requests_total", 'status="200"') - ok_before
    calls = metric(server, "imgclf_engine_calls_total") - calls_before
    assert requests == len(codes)
    assert 1 <= calls < requests
    # each call carried a whole batch: the engine's batch-size histogram saw every image
    sizes = metric_values(server, "imgclf_model_batch_size_sum")
    assert sum(sizes.values()) >= requests


def test_both_engine_layouts_give_the_same_answer(server: Server, engine_service_server: Server,
                                                 cifar_samples) -> None:
    for _, data in cifar_samples[::10]:
        here = post(server, {"image": ("x.jpg", data)}).json()
        there = post(engine_service_server, {"image": ("x.jpg", data)}).json()
        assert here["label"] == there["label"]
        assert here["probabilities"] == pytest.approx(there["probabilities"], abs=1e-6)


def test_served_answers_equal_the_offline_pipeline_whether_decoded_on_arrival_or_in_the_batch(
        server: Server, cifar_samples) -> None:
    """A 32x32 JPEG is decoded by the API worker on arrival (service.pipeline.inline_pixels), a
    larger one in the batch thread; both answers equal the offline pipeline's on the same bytes."""
    from service.ood import split
    from service.pipeline import INLINE_MAX_PIXELS, decode_batch
    from service.registry import load_model

    model = load_model(SHIPPED_MODELS / "cifar10", "onnx", "cpu", threads=1)
    uploads = [data for _, data in cifar_samples[::7]]
    large = io.BytesIO()
    Image.open(io.BytesIO(uploads[0])).resize((96, 96)).save(large, "JPEG")
    assert 96 * 96 > INLINE_MAX_PIXELS
    for data in uploads + [large.getvalue()]:
        served = post(server, {"image": ("x.jpg", data)}).json()["probabilities"]
        offline, _ = split(model.card, model.predict(decode_batch([data], (32, 32)).pixels))
        assert [served[c] for c in model.card.classes] == pytest.approx(offline[0].tolist(), abs=1e-6)


def test_models_endpoint_lists_cards(server: Server) -> None:
    for path in ("/models", "/models/"):
        response = httpx.get(server.url + path)
        assert response.status_code == 200, (path, response.status_code)  # no redirect, no empty body
        body = response.json()
        assert body["default"] == "cifar10" and body["models"]["cifar10"]["version"] == CIFAR_CARD.version
    assert httpx.get(server.url + "/models/cifar10").json()["classes"] == list(CIFAR_CARD.classes)
    missing = httpx.get(server.url + "/models/nope")
    assert missing.status_code == 404 and "cifar10" in missing.json()["detail"]["valid"]


def test_metrics_count_what_was_served(server: Server, cifar_samples) -> None:
    assert httpx.get(server.url + "/livez").status_code == 200
    assert httpx.get(server.url + "/readyz").status_code == 200
    before = {"images": metric(server, "imgclf_images_total", 'model="cifar10"'),
              "ok": metric(server, "imgclf_requests_total", 'endpoint="/classify",status="200"'),
              "rejected": metric(server, "imgclf_rejected_total", 'error="not_an_image"'),
              "timed": metric(server, "imgclf_request_duration_seconds_count", 'endpoint="/classify"')}
    for _, data in cifar_samples[:3]:
        assert post(server, {"image": ("x.jpg", data)}).status_code == 200
    assert post(server, {"image": ("x.txt", b"plain text")}).status_code == 400
    assert metric(server, "imgclf_images_total", 'model="cifar10"') - before["images"] == 3
    assert metric(server, "imgclf_requests_total", 'endpoint="/classify",status="200"') - before["ok"] == 3
    assert metric(server, "imgclf_rejected_total", 'error="not_an_image"') - before["rejected"] == 1
    assert metric(server, "imgclf_request_duration_seconds_count", 'endpoint="/classify"') - before["timed"] == 4
    response = httpx.get(server.url + "/metrics")  # the service's own route: BentoML's metrics are off
    assert response.headers["content-type"].startswith("text/plain; version=")
    assert "bentoml_service_request" not in response.text


def test_bentoml_metrics_switch_brings_back_its_request_metrics(engine_service_server: Server) -> None:
    """IMGCLF_BENTOML_METRICS=1 (this server): BentoML's per-request metrics count the requests the
    service's endpoints answer, beside the service's own, on BentoML's /metrics route."""
    server = engine_service_server
    sample = encode(Image.new("RGB", (32, 32), "white"), "JPEG")
    before = metric(server, "bentoml_service_request_duration_seconds_count", 'endpoint="/classify"')
    ours = metric(server, "imgclf_requests_total", 'endpoint="/classify",status="200"')
    for _ in range(3):
        assert post(server, {"image": ("x.jpg", sample)}).status_code == 200
    # two API workers: each request is counted by whichever answered it, and /metrics sums them
    assert metric(server, "bentoml_service_request_duration_seconds_count", 'endpoint="/classify"') - before == 3
    assert metric(server, "imgclf_requests_total", 'endpoint="/classify",status="200"') - ours == 3


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
    # issue 11: these were 500s
    "file_in_field_file": ({"file": ("x.png", encode(Image.new("RGB", (8, 8))))}, {}, 400, "no_file"),
    "images_sent_to_classify": ({"images": ("x.png", encode(Image.new("RGB", (8, 8))))}, {}, 400, "no_file"),
    "long_filename": ({"image": ("a" * 10_000 + ".png", encode(Image.new("RGB", (8, 8))))}, {}, 400,
                      "invalid_multipart"),
    "two_files_to_classify": ([("image", ("a.png", encode(Image.new("RGB", (8, 8))))),
                               ("image", ("b.png", encode(Image.new("RGB", (8, 8)))))], {}, 400, "invalid_request"),
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


def wide_png(width: int, height: int) -> bytes:
    """A real, small PNG file of width x height grey pixels (zeros compress to almost nothing)."""
    return encode(Image.new("L", (width, height), 128), optimize=False)


@pytest.mark.parametrize("model", ["cifar10", "catsdogs"])
def test_extreme_aspect_images_are_bounded_over_http(server: Server, model: str) -> None:
    """A 40,000x1 PNG is served (its resize reads only what the crop keeps); a side over 65,535 px
    (1,000,000x1, 1x1,000,000) is refused from the header with 413; the server still answers."""
    response = post(server, {"image": ("w.png", wide_png(40_000, 1), "image/png")}, {"model": model})
    assert response.status_code == 200, response.text
    assert response.json()["model"] == model
    for size in ((1_000_000, 1), (1, 1_000_000)):
        response = post(server, {"image": ("w.png", wide_png(*size), "image/png")}, {"model": model})
        assert response.status_code == 413, (size, response.text)
        assert response.json()["error"] == "image_too_large" and "65535" in response.json()["detail"]
    assert httpx.get(server.url + "/livez").status_code == 200
    small = post(server, {"image": ("x.png", encode(Image.new("RGB", (40, 30), (9, 90, 200))))}, {"model": model})
    assert small.status_code == 200, small.text


def raw_request(server: Server, head: bytes, body_chunks: Iterator[bytes] = iter(()), close_early: bool = False) -> bytes:
    """Send a hand-made HTTP/1.1 request over a socket; the raw answer (b"" if closed early)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(head)
        try:
            for chunk in body_chunks:
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before the whole body was sent
        if close_early:
            return b""
        answer = b""
        try:
            while data := sock.recv(65536):
                answer += data
        except ConnectionResetError:
            pass
        return answer


def multipart(field: str, data: bytes, boundary: str = "b0undary", filename: str = "x.jpg") -> bytes:
    return (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()


def chunked(data: bytes, size: int = 256 * 1024) -> Iterator[bytes]:
    for at in range(0, len(data), size):
        piece = data[at:at + size]
        yield f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    yield b"0\r\n\r\n"


def head(path: str, content_type: str = "multipart/form-data; boundary=b0undary", extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n{extra}"
            "Connection: close\r\n\r\n").encode()


def status_and_json(answer: bytes) -> tuple[int, dict]:
    head_part, _, body = answer.partition(b"\r\n\r\n")
    status = int(head_part.split(b" ", 2)[1])
    if b"transfer-encoding: chunked" in head_part.lower():
        body = b"".join(re.findall(rb"[0-9a-f]+\r\n(.*?)\r\n", body, re.S))
    return status, json.loads(body)


def test_chunked_upload_over_the_limit_gets_413(server: Server) -> None:
    """No Content-Length: the limit (2 MiB on this server) is counted as the chunks stream in."""
    body = multipart("image", b"\xff" * (2 * 1024 * 1024 + 300_000))
    answer = raw_request(server, head("/classify", extra="Transfer-Encoding: chunked\r\n"), chunked(body))
    status, payload = status_and_json(answer)
    assert status == 413 and payload["error"] == "body_too_large"


def test_chunked_upload_under_the_limit_is_served(server: Server, cifar_samples) -> None:
    body = multipart("image", cifar_samples[0][1])
    status, payload = status_and_json(raw_request(
        server, head("/classify", extra="Transfer-Encoding: chunked\r\n"), chunked(body, 100)))
    assert status == 200 and payload["model"] == "cifar10"


@pytest.mark.parametrize("path,field", [("/classify_batch", "image"), ("/classify", "images")])
def test_file_in_the_other_endpoints_field_gets_400(server: Server, path: str, field: str) -> None:
    response = post(server, {field: ("x.png", encode(Image.new("RGB", (8, 8))))}, path=path)
    assert response.status_code == 400 and response.json()["error"] == "no_file", response.text


@pytest.mark.parametrize("content_type,status,error", [
    ("multipart/form-data", 400, "invalid_multipart"),  # no boundary
    ("application/json", 415, "unsupported_media_type"),
])
def test_body_that_is_not_usable_multipart_gets_4xx(server: Server, content_type: str, status: int, error: str) -> None:
    response = httpx.post(server.url + "/classify", content=b'{"image": "x"}',
                          headers={"Content-Type": content_type}, timeout=60)
    assert response.status_code == status and response.json()["error"] == error, response.text


def hostile_round(server: Server, cifar_samples) -> None:
    """Every bad input above, over-limit and chunked uploads, and clients that hang up mid-body
    or while their request waits for the model."""
    for case in sorted(BAD_INPUTS):
        files, data, _, _ = BAD_INPUTS[case]
        assert post(server, files, data).status_code < 500, case
    test_chunked_upload_over_the_limit_gets_413(server)
    photo = multipart("image", cifar_samples[0][1])
    length = f"Content-Length: {len(photo)}\r\n"
    raw_request(server, head("/classify", extra=length), iter([photo[:40]]), close_early=True)  # mid-body
    for _ in range(20):  # complete requests whose client leaves before the answer
        raw_request(server, head("/classify", extra=length), iter([photo]), close_early=True)
    batch = multipart("images", cifar_samples[1][1])
    raw_request(server, head("/classify_batch", extra=f"Content-Length: {len(batch)}\r\n"), iter([batch]),
                close_early=True)


def test_no_error_lines_for_rejections_or_disconnects(server: Server, cifar_samples) -> None:
    """Nothing at ERROR (no traceback) for hostile input or hung-up clients, and at the default
    level no line per request at all."""
    start = server.log_size()
    hostile_round(server, cifar_samples)
    assert httpx.get(server.url + "/livez").status_code == 200
    assert post(server, {"image": ("x.jpg", cifar_samples[0][1])}).status_code == 200
    time.sleep(1)  # let the workers flush what they wrote
    written = server.output_since(start)
    assert "Traceback" not in written and "ERROR" not in written, written[-3000:]
    assert [line for line in written.splitlines() if line.strip()] == [], written[-3000:]


def test_debug_logs_name_each_rejection_and_no_error_lines(engine_service_server: Server, cifar_samples) -> None:
    start = engine_service_server.log_size()
    hostile_round(engine_service_server, cifar_samples)
    time.sleep(1)
    written = engine_service_server.output_since(start)
    assert "Traceback" not in written and '"level": "ERROR"' not in written and "[ERROR]" not in written, written[-3000:]
    debug = [json.loads(line) for line in written.splitlines() if line.startswith('{"time"')]
    assert any("no_file" in r["message"] for r in debug) and any("body_too_large" in r["message"] for r in debug)


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


def cmyk_jpeg(image: Image.Image) -> bytes:
    """A real CMYK JPEG (Adobe-style, as print workflows write them)."""
    data = encode(image.convert("CMYK"), "JPEG", quality=95)
    with Image.open(io.BytesIO(data)) as check:
        assert check.format == "JPEG" and check.mode == "CMYK"
    return data


CONVERSIONS = {
    # name: (how the upload is made, how the equivalent plain RGB image is made)
    "gif": (lambda im: encode(im.quantize(256), "GIF"), lambda im: im.quantize(256).convert("RGB")),
    "webp": (lambda im: encode(im, "WEBP", lossless=True), lambda im: im),
    "tiff": (lambda im: encode(im, "TIFF"), lambda im: im),
    "bmp": (lambda im: encode(im, "BMP"), lambda im: im),
    "grayscale": (lambda im: encode(im.convert("L")), lambda im: im.convert("L").convert("RGB")),
    "rgba_opaque": (lambda im: encode(im.convert("RGBA")), lambda im: im),
    "cmyk_jpeg": (lambda im: cmyk_jpeg(im), lambda im: Image.open(io.BytesIO(cmyk_jpeg(im))).convert("RGB")),
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
    readme = (REPO / "README.md").read_text()
    example = readme.split("Python client:")[1].split("```python")[1].split("```")[0]
    photo = sorted((cifar_folder / "test" / "ship").glob("*.jpg"))[0]
    code = example.replace("http://localhost:3000", server.url).replace('"cat.jpg"', repr(str(photo)))
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 (our own README)
    result = namespace["result"]
    assert len(result["top_k"]) == 3 and sum(result["probabilities"].values()) == pytest.approx(1, abs=1e-4)


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


def test_load_generator_runs_against_the_server(server: Server, tmp_path: Path) -> None:
    """benchmarks/serve_bench.py drives the server without errors, and the server counted the
    requests it reports (its figures live in docs/BENCHMARKS.md, not here)."""
    ok = 'status="200"'
    before = {p: metric(server, "imgclf_requests_total", f'endpoint="{p}",{ok}') for p in ("/classify", "/classify_batch")}
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "serve_bench.py"), "--url", server.url,
                    "--concurrency", "4", "--duration", "1", "--batch-files", "4", "--load-procs", "2",
                    "--json", str(out)], check=True, capture_output=True, timeout=300)
    runs = {r["path"]: r for r in json.loads(out.read_text())["runs"]}
    for path in ("/classify", "/classify_batch"):
        assert runs[path]["requests"] > 0 and runs[path]["failures"] == 0, runs[path]
        served = metric(server, "imgclf_requests_total", f'endpoint="{path}",{ok}') - before[path]
        assert served >= runs[path]["requests"]  # the server saw at least what the client counted
    assert runs["/classify_batch"]["images"] == 4 * runs["/classify_batch"]["requests"]


# --- POST /explain ---------------------------------------------------------------------------------

CATSDOGS_CARD = json.loads((SHIPPED_MODELS / "catsdogs" / "card.json").read_text())


@pytest.fixture(scope="module")
def cat_photo(catsdogs_folder: Path) -> bytes:
    """The file bytes of the first cat of the catsdogs model's held-out test split."""
    from training.data import load_catsdogs, scan_catsdogs

    paths, labels = scan_catsdogs(catsdogs_folder)
    split = load_catsdogs(catsdogs_folder, size=CATSDOGS_CARD["input"]["size"][0],
                          seed=CATSDOGS_CARD["training"]["seed"])
    first_cat = next(int(i) for i in split.indices["test"] if labels[int(i)] == CATSDOGS_CARD["classes"].index("cat"))
    return paths[first_cat].read_bytes()


def explain(server: Server, data: bytes, fields: dict | None = None) -> httpx.Response:
    return post(server, {"image": ("x.jpg", data, "image/jpeg")}, fields, path="/explain")


def png_size(response: httpx.Response) -> tuple[int, int]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(response.content)) as image:
        assert image.format == "PNG" and image.mode == "RGB"
        return image.size


def test_explain_returns_a_png_at_the_cards_size_scaled_to_224(server: Server, cat_photo: bytes) -> None:
    """The PNG is the model's input (the card's size, what the model saw) scaled up by a whole
    factor to at least 224 px: 192x192 -> 384x384 for catsdogs, 32x32 -> 224x224 for cifar10; the
    top class, the same class by name and by index, and another class all answer."""
    with Image.open(io.BytesIO(cat_photo)) as photo:
        assert photo.size != (384, 384)  # the answer's size is not the upload's
    top = explain(server, cat_photo, {"model": "catsdogs"})
    assert png_size(top) == (384, 384)
    by_name = explain(server, cat_photo, {"model": "catsdogs", "class": "cat"})
    by_index = explain(server, cat_photo, {"model": "catsdogs", "class": "0"})
    assert by_name.content == by_index.content
    dog = explain(server, cat_photo, {"model": "catsdogs", "class": "dog"})
    assert png_size(dog) == (384, 384) and dog.content != by_name.content
    label = post(server, {"image": ("x.jpg", cat_photo)}, {"model": "catsdogs"}).json()["label"]
    assert top.content == (by_name if label == "cat" else dog).content  # default: the top class
    assert png_size(explain(server, cat_photo, {"model": "cifar10"})) == (224, 224)


@pytest.mark.parametrize("case", ["not_an_image", "empty_file", "truncated_jpeg", "decompression_bomb",
                                  "no_file", "unknown_model", "two_files_to_classify", "file_in_field_file"])
def test_explain_rejects_bad_input_as_classify_does(server: Server, case: str) -> None:
    files, data, status, error = BAD_INPUTS[case]
    there = post(server, files, data)
    here = post(server, files, data, path="/explain")
    assert (here.status_code, here.json()["error"]) == (there.status_code, there.json()["error"]) == (status, error)
    assert here.headers["content-type"] == "application/json"


@pytest.mark.parametrize("wrong", ["cow", "2", "-1", "1.0"])
def test_explain_unknown_class_gets_400(server: Server, wrong: str) -> None:
    image = encode(Image.new("RGB", (40, 30), (200, 120, 30)))
    response = post(server, {"image": ("x.png", image)}, {"model": "catsdogs", "class": wrong}, path="/explain")
    assert response.status_code == 400 and response.json()["error"] == "invalid_class", response.text
    assert "cat, dog" in response.json()["detail"]


# --- start-up, configuration, documentation ---------------------------------------------------------

QUEUE_BYTES = 1_000_000  # lone_model_server's IMGCLF_MAX_QUEUE_BYTES


@pytest.fixture(scope="module")
def lone_model_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A registry with one model (catsdogs), no IMGCLF_DEFAULT_MODEL, one worker, a short body
    timeout, a small queue (8 images, 1 MB of uploads); started the way a ``pip --target`` install runs: an interpreter with no
    ``bentoml`` script beside it, the packages on PYTHONPATH."""
    import site
    import sysconfig

    bare = tmp_path_factory.mktemp("bare-python")
    base = Path(os.path.realpath(sys.executable))
    (bare / "python").symlink_to(base)
    packages = os.pathsep.join([sysconfig.get_paths()["purelib"], *site.getsitepackages()])
    srv = Server({"IMGCLF_MODELS_DIR": str(SHIPPED_MODELS), "IMGCLF_MODELS": "catsdogs",
                  "IMGCLF_DEFAULT_MODEL": "", "IMGCLF_API_WORKERS": "1", "IMGCLF_BODY_TIMEOUT_S": "2",
                  "IMGCLF_MAX_QUEUE": "8", "IMGCLF_MAX_QUEUE_BYTES": str(QUEUE_BYTES),
                  "PYTHONPATH": packages, "PATH": "/usr/bin:/bin"},
                 python=str(bare / "python"))
    yield srv
    srv.stop()


def test_server_starts_without_a_bentoml_script_and_one_model_is_the_default(lone_model_server: Server) -> None:
    assert not (Path(lone_model_server.proc.args[0]).parent / "bentoml").exists()
    assert httpx.get(lone_model_server.url + "/models").json()["default"] == "catsdogs"
    response = post(lone_model_server, {"image": ("x.png", encode(Image.new("RGB", (40, 30), (90, 60, 30))))})
    assert response.status_code == 200 and response.json()["model"] == "catsdogs", response.text


def test_slow_body_gets_408(lone_model_server: Server) -> None:
    photo = multipart("image", encode(Image.new("RGB", (8, 8))))

    def trickle() -> Iterator[bytes]:
        yield photo[:20]
        time.sleep(4)  # past IMGCLF_BODY_TIMEOUT_S=2
        yield photo[20:]

    answer = raw_request(lone_model_server, head("/classify", extra=f"Content-Length: {len(photo)}\r\n"), trickle())
    status, payload = status_and_json(answer)
    assert status == 408 and payload["error"] == "body_timeout"


def test_request_larger_than_the_queue_gets_503_with_retry_after(lone_model_server: Server) -> None:
    files = [("images", (f"{i}.png", encode(Image.new("RGB", (8, 8))))) for i in range(9)]  # IMGCLF_MAX_QUEUE=8
    response = post(lone_model_server, files, path="/classify_batch")
    assert response.status_code == 503 and response.json()["error"] == "overloaded", response.text
    assert int(response.headers["retry-after"]) >= 1


def test_bodies_being_received_count_against_the_upload_byte_cap(lone_model_server: Server) -> None:
    """While one client is still sending 800 KB, a second 300 KB upload would take the bytes the
    worker holds past IMGCLF_MAX_QUEUE_BYTES (1 MB): 503 overloaded with Retry-After. Once the first
    has gone (its body timed out), the same upload is served. Before, bodies being received counted
    against nothing: 1,000 clients uploading 8 MiB each could make a worker hold 8 GiB."""
    photo = encode(Image.fromarray(np.random.default_rng(0).integers(0, 256, (330, 330, 3), np.uint8)))
    assert 250_000 < len(photo) < 400_000
    big = multipart("image", b"\0" * 900_000)
    with socket.create_connection(("127.0.0.1", lone_model_server.port), timeout=30) as slow:
        slow.sendall(head("/classify", extra=f"Content-Length: {len(big)}\r\n") + big[:800_000])
        time.sleep(0.5)  # received by the worker, the body not complete (it times out after 2 s)
        refused = post(lone_model_server, {"image": ("x.png", photo)})
        answer = b""
        while data := slow.recv(65536):
            answer += data
    assert refused.status_code == 503 and refused.json()["error"] == "overloaded", refused.text
    assert "IMGCLF_MAX_QUEUE_BYTES" in refused.json()["detail"] and int(refused.headers["retry-after"]) >= 1
    assert status_and_json(answer)[0] == 408
    served = post(lone_model_server, {"image": ("x.png", photo)})
    assert served.status_code == 200, served.text


def test_bentoml_serve_with_a_bad_registry_prints_one_line(tmp_path: Path) -> None:
    import shutil

    shutil.copytree(SHIPPED_MODELS / "cifar10", tmp_path / "cifar10")
    (tmp_path / "cifar10" / "model.onnx").write_bytes(b"tampered")
    result = subprocess.run([sys.executable, "-m", "bentoml", "serve", "service.service:ImageClassifier",
                             "--port", str(free_port()), "--host", "127.0.0.1"], cwd=REPO,
                            env={**os.environ, "IMGCLF_MODELS_DIR": str(tmp_path)},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "does not match" in lines[0] and "Traceback" not in result.stderr, result.stderr


def test_make_serve_honours_imgclf_port_and_reports_a_busy_port(server: Server) -> None:
    """IMGCLF_PORT reaches `make serve` (the Makefile does not override it): pointed at the port the
    test server holds, start-up stops with one line naming that port."""
    env = {k: v for k, v in os.environ.items() if k not in ("PORT", "MAKEFLAGS")}
    result = subprocess.run(["make", "-s", "serve"], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**env, "IMGCLF_PORT": str(server.port), "IMGCLF_MODELS_DIR": str(SHIPPED_MODELS)})
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if line.startswith("imgclf:")]
    assert len(ours) == 1 and f"port {server.port}" in ours[0] and "already in use" in ours[0], result.stderr
    assert "Traceback" not in result.stderr


def test_docs_page_and_openapi_document(server: Server) -> None:
    page = httpx.get(server.url + "/docs")
    assert page.status_code == 200 and "swagger" in page.text.lower()
    for asset in re.findall(r'(?:src|href)="(/[^"]+)"', page.text):
        assert httpx.get(server.url + asset).status_code == 200, asset
    spec = httpx.get(server.url + "/openapi.json").json()
    assert set(spec["paths"]) == {"/classify", "/classify_batch", "/explain", "/models", "/models/{name}"}


@pytest.mark.parametrize("method, path, status, error", [
    ("GET", "/ui/missing.js", 404, "not_found"),
    ("POST", "/models", 405, "method_not_allowed"),
    ("PUT", "/models/cifar10", 405, "method_not_allowed"),
    # a line feed in the path: BentoML's mount cannot route it (service.app.ServiceFirst; found by
    # schemathesis, it was a plain-text 404)
    ("GET", "/models/a%0Ab", 404, "unknown_model"),
    ("POST", "/x%0Ay", 404, "not_found"),
])
def test_paths_and_methods_the_api_does_not_take_get_json_answers(server: Server, method: str, path: str,
                                                             status: int, error: str) -> None:
    response = httpx.request(method, server.url + path, timeout=30)
    assert response.status_code == status and response.headers["content-type"] == "application/json", response.text
    assert response.json()["error"] == error
    if status == 405:
        assert set(response.headers["allow"].split(", ")) == {"GET", "HEAD"}


def test_bentoml_routes_stay_bentomls_beside_the_line_feed_middleware(server: Server) -> None:
    assert httpx.get(server.url + "/livez").status_code == 200
    assert "imgclf_requests_total" in httpx.get(server.url + "/metrics").text
    assert httpx.get(server.url + "/nothing").status_code == 404  # no route of ours: BentoML's answer
