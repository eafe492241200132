"""Only corrupt data is a 400: a bug in the project's own image code surfaces as itself.

The decoders' errors on malformed files are caught around Pillow's parsing alone
(``service.preprocess.pillow_errors``); the project's conversion code (mode conversion, resize and
crop) runs outside it. Here that code is given a real bug (a function of ours replaced by one that
divides by zero): the decoder raises it instead of answering ``corrupt_image``, and the HTTP app
(in process, with a real model, batcher and runner) answers 500 ``internal_error`` naming the
request id, and logs the traceback under that id.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging

import httpx
import pytest
from PIL import Image

from conftest import SHIPPED_MODELS, encode
from service import preprocess
from service.app import Api, build_app
from service.batching import Batcher
from service.config import Settings
from service.logs import JsonFormatter
from service.pipeline import decode_batch, decode_or_error
from service.registry import load_cards, load_registry
from service.runners import LocalRunner


def buggy_resize(image: Image.Image, size) -> Image.Image:
    return image.resize((size[1] // 0, size[0]))  # the bug: ZeroDivisionError in our own code


@pytest.fixture
def bug(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(preprocess, "resize_and_crop", buggy_resize)


PNG = encode(Image.new("RGB", (40, 30), (10, 120, 200)))


def test_a_bug_in_our_conversion_is_not_a_corrupt_image(bug: None) -> None:
    with pytest.raises(ZeroDivisionError):
        decode_or_error(PNG, (32, 32))
    with pytest.raises(ZeroDivisionError):
        decode_batch([PNG], (32, 32))


def test_corrupt_data_is_still_a_400_code(bug: None) -> None:
    truncated = encode(Image.new("RGB", (64, 64), (1, 2, 3)), "JPEG")[:200]
    error = decode_or_error(truncated, (32, 32))
    assert isinstance(error, preprocess.ImageError) and error.error == "corrupt_image"


def test_the_app_answers_500_with_the_request_id_and_logs_it(bug: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMGCLF_MODELS_DIR", str(SHIPPED_MODELS))
    monkeypatch.setenv("IMGCLF_MODELS", "cifar10")
    settings = Settings.from_env()
    cards, default = load_cards(settings.models_dir, settings.models, settings.backend)
    runner = LocalRunner(load_registry(settings.models_dir, "onnx", "cpu", ["cifar10"], threads=1), settings.max_pixels)

    async def post() -> list[httpx.Response]:
        api = Api(settings, cards, default, Batcher(runner, 8, 1000, 100), on_reject=lambda error: None,
                  on_answer=lambda endpoint, status, seconds: None, openapi=b"{}")
        transport = httpx.ASGITransport(app=build_app(lambda: api), raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://api.test") as client:
            return [await client.post("/classify", files={"image": ("x.png", PNG)}, headers={"x-request-id": rid})
                    for rid in ("bug-1", "bug-2")]

    lines = io.StringIO()
    handler = logging.StreamHandler(lines)
    handler.setFormatter(JsonFormatter())  # the service's log format: it adds the request id
    logger = logging.getLogger("imgclf.service")
    logger.addHandler(handler)
    try:
        answers = asyncio.run(post())
    finally:
        logger.removeHandler(handler)
    for rid, answer in zip(("bug-1", "bug-2"), answers):  # the worker lives on after the first
        assert answer.status_code == 500, answer.text
        assert answer.json() == {"error": "internal_error", "detail": f"request {rid} failed"}
        assert answer.headers["x-request-id"] == rid
    records = [json.loads(line) for line in lines.getvalue().splitlines()]
    assert [(r["level"], r["message"], r["request_id"]) for r in records] == \
        [("ERROR", "request failed", "bug-1"), ("ERROR", "request failed", "bug-2")]
    assert all("ZeroDivisionError" in r["exception"] and "buggy_resize" in r["exception"] for r in records)
