"""The HTTP edge: a plain Starlette app that BentoML mounts (``@bentoml.asgi_app``, :mod:`service.service`).

* ``POST /classify``, ``POST /classify_batch``: the body is parsed as it streams with the service's
  limits (:mod:`service.form`); the images go to the worker's :class:`~service.batching.Batcher`,
  which decodes and runs them in batches (:mod:`service.runners`); a request whose client hangs up
  while it waits is dropped before it runs. Every refusal is a 4xx/503 ``{"error", "detail"}``
  answer (:mod:`service.errors`; :mod:`service.schemas` lists them all).
* ``POST /explain``: the same upload, parsing, decoding and 4xx answers as ``/classify``, answered
  with a Grad-CAM PNG (:class:`~service.explain.Explainer`, one at a time per worker, in a thread).
* ``GET /models``, ``/models/{name}``: the served cards; ``/openapi.json`` and ``/docs``.
* ``GET /metrics``: every process's Prometheus metrics (the service's ``imgclf_*`` and whatever
  BentoML records), from the multiprocess directory BentoML gives its processes. BentoML's own
  request metrics and its ``/metrics`` route are off unless ``IMGCLF_BENTOML_METRICS=1`` (then its
  route answers first, with the same directory).

BentoML serves the rest (``/livez``, ``/readyz``) and runs the workers. The app holds
no state: each request asks ``current_api`` (given by the service: the worker's service instance's
:class:`Api`, made in its ``__init__``) for what it needs, and answers 503 ``starting`` before
there is one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import prometheus_client
from prometheus_client.multiprocess import MultiProcessCollector
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from service.batching import Batcher, Overloaded
from service.card import ModelCard
from service.config import Settings
from service.errors import ClientGone, Rejected, image_rejection, overloaded
from service.explain import Explainer, NotExplainable
from service.form import Form, class_index, form_model, form_options, one_file, pick_files, read_form
from service.logs import request_id
from service.ood import answer_fields
from service.pipeline import inline_pixels
from service.preprocess import ImageError
from service.ui import ui_routes

logger = logging.getLogger("imgclf.service")


@dataclass
class Api:
    """What the handlers need, made once per worker at start-up by the service."""

    settings: Settings
    cards: dict[str, ModelCard]
    default_model: str
    batcher: Batcher
    on_reject: Callable[[str], None]  # (error)
    on_answer: Callable[[str, int, float], None]  # (endpoint, status, seconds from request to answer)
    openapi: bytes
    explainer: Explainer | None = None  # None: /explain answers 501 not_explainable
    on_ood: Callable[[str, int], None] | None = None  # (model, answers out of distribution): /metrics

    def check(self, model: str, top_k: int) -> ModelCard:
        if model not in self.cards:
            raise Rejected(404, "unknown_model", {"model": model, "valid": sorted(self.cards)})
        if top_k < 1:
            raise Rejected(400, "invalid_top_k", f"top_k must be at least 1, got {top_k}")
        return self.cards[model]


CurrentApi = Callable[[], "Api | None"]  # the worker's Api; None while the worker is starting


# --- answers --------------------------------------------------------------------------------------

def prediction(card: ModelCard, row: np.ndarray, top_k: int) -> dict[str, Any]:
    """One image's answer from its model output row: the probabilities, and for a model with an
    OOD score ``ood_score`` and ``in_distribution`` (:mod:`service.ood`; absent otherwise)."""
    classes = card.classes
    probabilities = row[:len(classes)]
    values = probabilities.tolist()
    order = np.argsort(-probabilities, kind="stable")[: min(top_k, len(classes))].tolist()
    return {
        "model": card.name,
        "version": card.version,
        "label": classes[order[0]],
        "probabilities": dict(zip(classes, values)),
        "top_k": [{"label": classes[i], "probability": values[i]} for i in order],
        **answer_fields(card, row),
    }


def count_ood(api: Api, card: ModelCard, answers: list[dict[str, Any]]) -> None:
    """Count ``card``'s answers judged out of distribution (``/metrics``, per model)."""
    if api.on_ood is None or card.ood is None:
        return
    flagged = sum(1 for a in answers if a.get("in_distribution") is False)
    if flagged:
        api.on_ood(card.name, flagged)


def json_bytes(payload: Any) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()


async def send_json(send: Send, status: int, body: bytes, rid: str,
                    extra: dict[str, str] | None = None, content_type: bytes = b"application/json") -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode()),
               (b"x-request-id", rid.encode("latin-1"))]
    headers += [(k.lower().encode(), v.encode()) for k, v in (extra or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def client_request_id(headers: dict[bytes, bytes]) -> str:
    given = headers.get(b"x-request-id", b"")[:64].decode("latin-1")
    return given if given.isprintable() and given.strip() else uuid.uuid4().hex


WATCH_AFTER_S = 0.05  # watch for a hang-up only when the expected wait is at least this long


async def until_answered(futures: list[asyncio.Future[Any]], receive: Receive, watch_s: float) -> list[Any]:
    """Wait for the batcher's answers; if the client hangs up first, cancel them (the batcher then
    skips those jobs) and raise :class:`ClientGone`. Watching costs a task and a framework receive
    per request (~8 % of a worker's CPU in a profile), so it is done only when the expected wait is
    at least ``WATCH_AFTER_S``: a request about to run costs less to run than to watch."""
    if len(futures) == 1 and watch_s < WATCH_AFTER_S:
        return [await futures[0]]
    answers = asyncio.gather(*futures)
    if watch_s < WATCH_AFTER_S:
        return await answers
    watch = asyncio.ensure_future(receive())
    try:
        done, _ = await asyncio.wait((answers, watch), return_when=asyncio.FIRST_COMPLETED)
        if answers not in done and watch.result()["type"] == "http.disconnect":
            answers.cancel()
            raise ClientGone()
        return await answers
    finally:
        watch.cancel()


# --- the endpoints --------------------------------------------------------------------------------

class Endpoint:
    """An ASGI endpoint (``POST`` only) answering JSON; the subclass says what to do with the form."""

    path = ""

    def __init__(self, current_api: CurrentApi) -> None:
        self.current_api = current_api

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        headers = dict(scope["headers"])
        rid = client_request_id(headers)
        token = request_id.set(rid)
        api = self.current_api()
        try:
            if api is None:
                raise Rejected(503, "starting", "the service is starting", {"Retry-After": "1"})
            if scope["method"] != "POST":
                raise Rejected(405, "method_not_allowed", f"{self.path} takes POST", {"Allow": "POST"})
            if (refused := api.batcher.refusal(1)) is not None:  # overloaded: refuse before reading
                raise overloaded(refused)
            form = await read_form(receive, headers, api.settings, api.batcher)
            body = await self.answer(api, form, receive)
            if isinstance(body, bytes):  # /explain: a PNG
                await send_json(send, 200, body, rid, content_type=b"image/png")
            else:
                await send_json(send, 200, json_bytes(body), rid)
            api.on_answer(self.path, 200, time.perf_counter() - started)
        except Rejected as exc:
            if api is not None:
                api.on_reject(exc.error)
                api.on_answer(self.path, exc.status, time.perf_counter() - started)
            logger.debug("answered %d %s: %s", exc.status, exc.error, exc.detail)
            await send_json(send, exc.status, json_bytes({"error": exc.error, "detail": exc.detail}), rid,
                            exc.headers)
        except ClientGone:
            logger.debug("client went away; request dropped")
        except Exception:
            logger.exception("request failed")
            await send_json(send, 500, json_bytes({"error": "internal_error", "detail": f"request {rid} failed"}),
                            rid)
            if api is not None:
                api.on_answer(self.path, 500, time.perf_counter() - started)
        finally:
            request_id.reset(token)

    async def answer(self, api: Api, form: Form, receive: Receive) -> Any:
        raise NotImplementedError

    @staticmethod
    async def infer(api: Api, card: ModelCard, blobs: list[bytes], receive: Receive) -> list[Any]:
        try:
            # small plain JPEGs are decoded here, on the loop, so the batch thread need not wait for
            # the GIL to decode them (service.pipeline.INLINE_MAX_PIXELS)
            pixels = [inline_pixels(blob, card.input.size, api.settings.max_pixels) for blob in blobs]
            futures = api.batcher.submit(card.name, blobs, card.input.size, pixels)
            return await until_answered(futures, receive, api.batcher.expected_wait_s(0))
        except Overloaded as exc:
            raise overloaded(exc) from None


class Classify(Endpoint):
    path = "/classify"

    async def answer(self, api: Api, form: Form, receive: Receive) -> Any:
        data = one_file(form, self.path)
        model, top_k = form_options(form, api.default_model)
        card = api.check(model, top_k)
        (row,) = await self.infer(api, card, [data], receive)
        if isinstance(row, ImageError):
            raise image_rejection(row)
        answer = prediction(card, row, top_k)
        count_ood(api, card, [answer])
        return answer


class Explain(Endpoint):
    """``POST /explain``: the upload of ``/classify``, answered with a Grad-CAM PNG."""

    path = "/explain"

    async def answer(self, api: Api, form: Form, receive: Receive) -> Any:
        data = one_file(form, self.path)
        model = form_model(form, api.default_model)
        card = api.check(model, 1)
        index = class_index(card, form.fields.get("class"))
        if api.explainer is None:
            raise Rejected(501, "not_explainable", "explanations are not available in this server")
        try:
            png = await api.explainer(model, data, index)
        except Overloaded as exc:
            raise overloaded(exc) from None
        except NotExplainable as exc:
            raise Rejected(501, "not_explainable", f"model {model!r} cannot be explained: {exc}") from None
        if isinstance(png, ImageError):
            raise image_rejection(png)
        return png


class ClassifyBatch(Endpoint):
    path = "/classify_batch"

    async def answer(self, api: Api, form: Form, receive: Receive) -> Any:
        files = pick_files(form, "images", "image")
        model, top_k = form_options(form, api.default_model)
        card = api.check(model, top_k)
        rows = await self.infer(api, card, files, receive)
        results = [{"error": row.error, "detail": row.detail} if isinstance(row, ImageError)
                   else prediction(card, row, top_k) for row in rows]
        count_ood(api, card, results)
        return {"model": model, "version": card.version, "results": results}


SWAGGER_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>imgclf API</title>
<link rel="stylesheet" href="/static_content/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="/static_content/swagger-ui-bundle.js"></script>
<script>SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui"});</script>
</body></html>"""


def endpoints(api_app: Starlette) -> dict[str, Endpoint]:
    """The API app's inference endpoints by path (``/classify``, ``/classify_batch``, ``/explain``)."""
    return {route.path: route.endpoint for route in api_app.routes
            if isinstance(route, Route) and isinstance(route.endpoint, Endpoint)}


class ServiceFirst:
    """ASGI middleware for the BentoML service (public ``add_asgi_middleware``). BentoML places it
    inside its own error, request-metrics, tracing, access-log and timeout middleware (all of which
    still see every request) and before the rest of its app:

    * ``/classify``, ``/classify_batch`` and ``/explain`` go straight to this service's endpoints,
      past BentoML's request context, exception middleware, router and mount and this app's router
      (~0.06 ms of CPU a request on the 2-core build machine, docs/SERVING.md). The endpoints answer
      their own JSON errors (500 included) and count themselves (``imgclf_requests_total``,
      ``imgclf_request_duration_seconds``); they need nothing from BentoML's request context.
    * a path holding a line feed goes to the API app: BentoML mounts the app at ``/`` with a
      subclass of Starlette's ``Mount``, whose pattern (``.*``) does not match a line feed, so
      ``GET /models/a%0Ab`` got the framework's plain-text 404 rather than this service's JSON
      ``unknown_model`` (found by schemathesis).
    * everything else: BentoML's app (``/livez``, ``/readyz``, the mounted API app).
    """

    def __init__(self, app: ASGIApp, api_app: Starlette) -> None:
        self.app = app
        self.api_app = api_app
        self.endpoints = endpoints(api_app)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            endpoint = self.endpoints.get(scope["path"])
            if endpoint is not None:
                await endpoint(scope, receive, send)
                return
            if "\n" in scope["path"]:
                await self.api_app(scope, receive, send)
                return
        await self.app(scope, receive, send)


def metrics_text() -> bytes:
    """Prometheus's text format of the metrics of every process of this server: the multiprocess
    directory (``PROMETHEUS_MULTIPROC_DIR``, set by ``bentoml serve``), else this process's."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return prometheus_client.generate_latest()
    registry = prometheus_client.CollectorRegistry()
    MultiProcessCollector(registry)
    return prometheus_client.generate_latest(registry)


def build_app(current_api: CurrentApi) -> Starlette:
    """The API's routes; ``current_api`` gives each request the worker's :class:`Api`."""

    def ready() -> Api:
        api = current_api()
        if api is None:
            raise Rejected(503, "starting", "the service is starting")
        return api

    def error(exc: Rejected) -> JSONResponse:
        return JSONResponse({"error": exc.error, "detail": exc.detail}, status_code=exc.status, headers=exc.headers)

    async def list_models(request: Request) -> Response:
        try:
            api = ready()
        except Rejected as exc:
            return error(exc)
        return JSONResponse({"default": api.default_model,
                             "models": {name: card.to_dict() for name, card in api.cards.items()}})

    async def one_model(request: Request) -> Response:
        name = request.path_params["name"]
        try:
            api = ready()
            api.check(name, 1)
        except Rejected as exc:
            return error(exc)
        return JSONResponse(api.cards[name].to_dict())

    async def openapi(request: Request) -> Response:
        try:
            return Response(ready().openapi, media_type="application/json")
        except Rejected as exc:
            return error(exc)

    async def docs(request: Request) -> Response:
        return HTMLResponse(SWAGGER_PAGE)

    async def metrics(request: Request) -> Response:
        return Response(metrics_text(), media_type=prometheus_client.CONTENT_TYPE_LATEST)

    async def no_route(request: Request, exc: HTTPException) -> Response:
        # Starlette's own 404/405 are plain text; every answer of this app is JSON. (BentoML mounts
        # this app passively: a path that none of its routes takes is BentoML's, a plain-text 404.)
        path = request.scope["path"]
        if exc.status_code == 405:
            allow = (exc.headers or {}).get("Allow", "")
            return error(Rejected(405, "method_not_allowed", f"{path} takes {allow}", {"Allow": allow}))
        return error(Rejected(exc.status_code, "not_found", f"no route for {path}"))

    return Starlette(exception_handlers={404: no_route, 405: no_route}, routes=[
        Route("/classify", Classify(current_api)),  # ASGI endpoints: they answer 405 themselves, in JSON
        Route("/classify_batch", ClassifyBatch(current_api)),
        Route("/explain", Explain(current_api)),
        Route("/models", list_models, methods=["GET"]),
        Route("/models/", list_models, methods=["GET"]),
        Route("/models/{name}", one_model, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        Route("/docs", docs, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        *ui_routes(),  # the /ui page (service/ui.py)
    ])
