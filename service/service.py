"""The BentoML service: ``POST /classify``, ``POST /classify_batch``, ``GET /models``.

* ``ImageClassifier`` (the entry point): parses uploads, validates and decodes images in threads,
  answers bad input with a 4xx ``{"error", "detail"}`` body, shapes the responses.
* The models run where ``IMGCLF_ENGINE`` says (``auto``: ``service`` when CUDA is usable, else
  ``inprocess``):
  - ``service``, the pattern BentoML recommends for GPU serving: ``InferenceEngine``, a separate
    one-worker service that owns the GPU, with an adaptive-batching API (``batchable=True``) that
    stacks the images of concurrent requests from every API worker into one batch per model;
  - ``inprocess``, for CPU hosts: :class:`InProcessEngine` batches concurrent requests inside the
    API process. On a CPU the second hop (HTTP, pickling, BentoML's middleware twice) costs more
    CPU per request than a small model does (docs/BENCHMARKS.md).

Settings come from environment variables (``service/config.py``, listed in README).
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any, List

import aiohttp
import bentoml
import numpy as np
from _bentoml_impl.serde import MultipartSerde  # patched below: no URL downloads (pinned bentoml)
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.config import Settings
from service.preprocess import ImageError, decode_or_error
from service.logs import configure_logging, request_id
from service.registry import LoadedModel, cuda_usable, load_cards, load_registry

settings = Settings.from_env()
configure_logging(settings.log_format, settings.log_level)
logger = logging.getLogger("imgclf.service")
ENGINE = settings.engine if settings.engine != "auto" else (
    "service" if settings.device != "cpu" and cuda_usable() else "inprocess")

BATCH_SIZE = bentoml.metrics.Histogram(
    name="imgclf_model_batch_size",
    documentation="Images per batch run by the model (adaptive batching at work)",
    labelnames=["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
)
IMAGES = bentoml.metrics.Counter(
    name="imgclf_images_total", documentation="Images classified", labelnames=["model"])
REJECTED = bentoml.metrics.Counter(
    name="imgclf_rejected_total", documentation="Requests answered with a 4xx", labelnames=["error"])


def error_response(status: int, error: str, detail: Any) -> JSONResponse:
    REJECTED.labels(error=error).inc()
    logger.debug("answered %d %s: %s", status, error, detail)
    return JSONResponse({"error": error, "detail": detail}, status_code=status)


@bentoml.service(
    name="inference-engine",
    workers=1,
    traffic={"timeout": settings.timeout_s},
    logging={"access": {"enabled": False}},
    # BentoML's client to this service closes its whole connection pool every max_requests calls
    # (default 100) or max_age seconds, failing the calls in flight on it ("Server disconnected")
    # under concurrency. Keep the pool; _infer below also retries such a call.
    runner_connection={"max_requests": 1_000_000_000, "max_age": 1e9},
)
class InferenceEngine:
    def __init__(self) -> None:
        self.models = load_models()

    @bentoml.api(batchable=settings.batching, max_batch_size=settings.max_batch_size,
                 max_latency_ms=settings.max_latency_ms)
    def predict(self, requests: list[dict[str, Any]]) -> list[np.ndarray]:
        """Each request is ``{"model": name, "pixels": (3, H, W) uint8}``; returns probabilities."""
        return run_batch(self.models, requests)


def load_models() -> dict[str, LoadedModel]:
    models = load_registry(settings.models_dir, settings.backend, settings.device,
                           list(settings.models) or None, settings.engine_threads)
    for name, model in models.items():
        logger.info("model ready: model=%s version=%s backend=%s device=%s engine=%s", name,
                    model.version, model.backend_name, model.backend.device, ENGINE)
    return models


def run_batch(models: dict[str, LoadedModel], requests: list[dict[str, Any]]) -> list[np.ndarray]:
    """Probabilities for each ``{"model": name, "pixels": (3, H, W) uint8}``: one model call per
    model named in the batch."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, request in enumerate(requests):
        groups[request["model"]].append(i)
    out: list[np.ndarray] = [np.empty(0)] * len(requests)
    for name, index in groups.items():
        batch = np.stack([requests[i]["pixels"] for i in index])
        probabilities = models[name].predict(batch)
        BATCH_SIZE.labels(model=name).observe(len(index))
        IMAGES.labels(model=name).inc(len(index))
        for row, i in zip(probabilities, index):
            out[i] = row
    return out


class InProcessEngine:
    """Adaptive batching inside the API process. Requests queue while a batch runs; the next batch
    takes everything queued (up to ``max_batch_size``), so batches grow with load and a lone
    request never waits for company. Unbatched (``IMGCLF_BATCHING=0``): each call runs alone."""

    def __init__(self, models: dict[str, LoadedModel], max_batch_size: int, batching: bool) -> None:
        self.models = models
        self.max_batch_size = max_batch_size
        self.batching = batching
        self.queue: asyncio.Queue[tuple[dict[str, Any], asyncio.Future[np.ndarray]]] | None = None
        self.worker: asyncio.Task[None] | None = None

    async def predict(self, items: list[dict[str, Any]]) -> list[np.ndarray]:
        if not self.batching:
            return await asyncio.to_thread(run_batch, self.models, items)
        loop = asyncio.get_running_loop()
        if self.queue is None:  # made on the serving event loop, at the first request
            self.queue = asyncio.Queue()
            self.worker = loop.create_task(self._run(self.queue))
        futures = [loop.create_future() for _ in items]
        for item, future in zip(items, futures):
            self.queue.put_nowait((item, future))
        return list(await asyncio.gather(*futures))

    async def _run(self, queue: asyncio.Queue[tuple[dict[str, Any], asyncio.Future[np.ndarray]]]) -> None:
        while True:
            batch = [await queue.get()]
            while len(batch) < self.max_batch_size and not queue.empty():
                batch.append(queue.get_nowait())
            try:
                rows = await asyncio.to_thread(run_batch, self.models, [item for item, _ in batch])
            except Exception as exc:  # each waiting request fails with it; the engine lives on
                rows = [exc] * len(batch)
            for (_, future), row in zip(batch, rows):
                if future.done():  # its request was cancelled (client gone)
                    continue
                if isinstance(row, Exception):
                    future.set_exception(row)
                else:
                    future.set_result(row)


class Gatekeeper:
    """ASGI middleware in front of every route.

    * refuses request bodies over ``max_bytes`` with a JSON 413 (checked on the declared length and
      again while streaming, so a lying or chunked client cannot get past it);
    * tags each request with an id (the client's ``X-Request-ID`` when sent) in the response header;
    * gives BentoML's own request-validation errors our stable ``invalid_request`` error code.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def too_large(self) -> JSONResponse:
        return error_response(413, "body_too_large",
                              f"request body exceeds {self.max_bytes} bytes (IMGCLF_MAX_BODY_BYTES)")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        rid = headers.get(b"x-request-id", b"").decode("latin-1")[:64] or uuid.uuid4().hex
        token = request_id.set(rid)
        try:
            await self.handle(scope, receive, send, headers, rid)
        finally:
            request_id.reset(token)

    async def handle(self, scope: Scope, receive: Receive, send: Send, headers: dict[bytes, bytes],
                     rid: str) -> None:
        try:
            declared = int(headers.get(b"content-length", b"0"))
        except ValueError:
            declared = 0
        if declared > self.max_bytes:
            return await self.too_large()(scope, receive, send)
        received = 0
        held: Message | None = None  # a 400 response start, until we have seen its body
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge()
            return message

        async def tagging_send(message: Message) -> None:
            nonlocal held, started
            if message["type"] == "http.response.start":
                started = True
                message.setdefault("headers", []).append((b"x-request-id", rid.encode("latin-1")))
                if message["status"] == 400:
                    held = message
                    return
            elif held is not None and message["type"] == "http.response.body":
                start, held = held, None
                body = message.get("body", b"")
                rewritten = _normalize_400(body)
                if rewritten is not None:
                    body = rewritten
                    start["headers"] = [(k, str(len(body)).encode() if k == b"content-length" else v)
                                        for k, v in start["headers"]]
                await send(start)
                message = {**message, "body": body}
            await send(message)

        try:
            await self.app(scope, counting_receive, tagging_send)
        except _BodyTooLarge:
            if not started:
                await self.too_large()(scope, receive, send)
        except Exception:
            logger.exception("request failed")
            raise


NOT_A_FILE = "must be a file upload"


def _normalize_400(body: bytes) -> bytes | None:
    """Give BentoML's own 400 bodies our ``{"error": code, "detail": ...}`` shape (None: leave it)."""
    try:
        payload = json.loads(body)
    except ValueError:
        return None
    if isinstance(payload, list) and len(payload) == 1 and isinstance(payload[0], dict):
        message = str(payload[0].get("error"))  # BentoML wraps its BadInput bodies in a list
        error, detail = ("no_file" if NOT_A_FILE in message else "invalid_request"), message
    elif isinstance(payload, dict) and "validation error" in str(payload.get("error")):
        error, detail = _validation_error(payload.get("detail"))
    else:
        return None
    REJECTED.labels(error=error).inc()
    return json.dumps({"error": error, "detail": detail}).encode()


async def _files_only(obj: Any) -> Any:
    """Replaces BentoML's MultipartSerde.ensure_file, which downloads a text value given in a file
    field as a URL: this service never fetches URLs on a client's behalf."""
    from starlette.datastructures import UploadFile

    if isinstance(obj, UploadFile):
        return obj
    raise bentoml.exceptions.BadInput(f"image fields {NOT_A_FILE} (multipart file); URLs are not fetched")


MultipartSerde.ensure_file = staticmethod(_files_only)


def _validation_error(detail: Any) -> tuple[str, Any]:
    """BentoML's pydantic errors -> (our error code, detail); a missing file field is ``no_file``."""
    problems = detail if isinstance(detail, list) else []
    for problem in problems:
        if problem.get("type") == "missing" and problem.get("loc") in (["image"], ["images"]):
            field = problem["loc"][0]
            return "no_file", f"send the image as a multipart file field named '{field}'"
    return "invalid_request", [{k: p.get(k) for k in ("loc", "msg")} for p in problems] or detail


class _BodyTooLarge(Exception):
    pass


def _models_app(cards: dict[str, dict[str, Any]]) -> Starlette:
    async def list_models(request: Request) -> JSONResponse:
        return JSONResponse({"default": settings.default_model, "models": cards})

    async def one_model(request: Request) -> JSONResponse:
        name = request.path_params["name"]
        if name not in cards:
            return error_response(404, "unknown_model", {"model": name, "valid": sorted(cards)})
        return JSONResponse(cards[name])

    return Starlette(routes=[Route("/", list_models, methods=["GET"]),
                             Route("/{name}", one_model, methods=["GET"])])


CARDS = load_cards(settings.models_dir, settings.models, settings.backend, settings.default_model)


@bentoml.service(
    name="image-classifier",
    workers=settings.api_workers,
    traffic={"timeout": settings.timeout_s},
    logging={"access": {"enabled": settings.access_log}},
)
class ImageClassifier:
    if ENGINE == "service":
        engine = bentoml.depends(InferenceEngine)

    def __init__(self) -> None:
        self.cards = CARDS
        self.in_process = None
        if ENGINE == "inprocess":
            self.in_process = InProcessEngine(load_models(), settings.max_batch_size, settings.batching)
        else:
            logger.info("models run in the inference-engine service (engine=service)")

    async def _infer(self, items: list[dict[str, Any]]) -> list[np.ndarray]:
        """Run the models; inference is idempotent, so a dropped engine connection is retried."""
        if self.in_process is not None:
            return await self.in_process.predict(items)
        for attempt in range(3):
            try:
                return await self.engine.to_async.predict(items)
            except aiohttp.ClientConnectionError:
                if attempt == 2:
                    raise
                logger.warning("engine connection dropped; retrying (%d)", attempt + 1)
        raise AssertionError("unreachable")

    def _check(self, model: str, top_k: int) -> JSONResponse | None:
        if model not in self.cards:
            return error_response(404, "unknown_model", {"model": model, "valid": sorted(self.cards)})
        if top_k < 1:
            return error_response(400, "invalid_top_k", f"top_k must be at least 1, got {top_k}")
        return None

    def _result(self, card: dict[str, Any], probabilities: np.ndarray, top_k: int) -> dict[str, Any]:
        classes = card["classes"]
        order = np.argsort(-probabilities, kind="stable")[: min(top_k, len(classes))]
        return {
            "model": card["name"],
            "version": card["version"],
            "label": classes[int(order[0])],
            "probabilities": {c: float(p) for c, p in zip(classes, probabilities)},
            "top_k": [{"label": classes[int(i)], "probability": float(probabilities[i])} for i in order],
        }

    def _decode(self, path: Path, card: dict[str, Any]) -> np.ndarray | ImageError:
        """Read and decode one upload (in a thread); a bad image is returned, not raised."""
        return decode_or_error(path.read_bytes(), card["input"]["size"], settings.max_pixels)

    @bentoml.api(route="/classify")
    async def classify(self, image: Path, model: str = settings.default_model,
                       top_k: int = 5) -> dict[str, Any]:
        """Classify one image (multipart field ``image``): softmax over every class, plus the top k."""
        if (bad := self._check(model, top_k)) is not None:
            return bad
        card = self.cards[model]
        pixels = await asyncio.to_thread(self._decode, image, card)
        if isinstance(pixels, ImageError):
            return error_response(400 if pixels.error != "image_too_large" else 413, pixels.error, pixels.detail)
        probabilities = await self._infer([{"model": model, "pixels": pixels}])
        return self._result(card, probabilities[0], top_k)

    @bentoml.api(route="/classify_batch")
    async def classify_batch(self, images: List[Path], model: str = settings.default_model,
                             top_k: int = 5) -> dict[str, Any]:
        """Classify several images (repeated multipart field ``images``); results keep their order.

        A file that cannot be decoded gets ``{"error", "detail"}`` in its slot; the others are scored.
        """
        if (bad := self._check(model, top_k)) is not None:
            return bad
        if not images:
            return error_response(400, "no_images", "send one or more files in the field 'images'")
        if len(images) > settings.max_files:
            return error_response(413, "too_many_files",
                                  f"{len(images)} files; the limit is {settings.max_files} (IMGCLF_MAX_FILES)")
        card = self.cards[model]

        decoded = await asyncio.gather(*(asyncio.to_thread(self._decode, p, card) for p in images))
        good = [d for d in decoded if isinstance(d, np.ndarray)]
        probabilities = iter(await self._infer([{"model": model, "pixels": d} for d in good]) if good else [])
        results = [self._result(card, next(probabilities), top_k) if isinstance(d, np.ndarray)
                   else {"error": d.error, "detail": d.detail} for d in decoded]
        return {"model": model, "version": card["version"], "results": results}


ImageClassifier.add_asgi_middleware(Gatekeeper, max_bytes=settings.max_body_bytes)
ImageClassifier.mount_asgi_app(_models_app(CARDS), path="/models", name="models")

# BentoML derives each response's media type by rebuilding the output's JSON schema on every call
# (~17 % of the engine's CPU in a profile under load); every API here answers JSON, so say so once.
for _api in (*InferenceEngine.apis.values(), *ImageClassifier.apis.values()):
    _api.output_spec.media_type = "application/json"
