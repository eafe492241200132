"""The HTTP edge: a plain Starlette app that BentoML mounts (``@bentoml.asgi_app``).

* ``POST /classify``, ``POST /classify_batch``: the body is read in memory as it streams, counted
  against ``IMGCLF_MAX_BODY_BYTES`` before and while parsing (a declared length over the limit is
  refused unread; a chunked or lying client is cut off at the limit), within
  ``IMGCLF_BODY_TIMEOUT_S`` (else 408), and parsed by python-multipart's streaming parser: no
  temporary files, no framework error strings, every malformed request a 4xx
  ``{"error", "detail"}`` (:mod:`service.schemas` lists them all).
* the images go to the worker's :class:`~service.engine.Batcher`; a request whose client hangs up
  while it waits is dropped before it runs.
* ``POST /explain``: the same upload, parsing, decoding and 4xx answers as ``/classify``, answered
  with a Grad-CAM PNG (:class:`~service.engine.Explainer`, one at a time per worker, in a thread).
* ``GET /models``, ``/models/{name}``: the served cards; ``/openapi.json`` and ``/docs``.

BentoML serves the rest (``/livez``, ``/readyz``, ``/metrics``) and runs the workers. The app is
built at import (BentoML mounts it when it loads the service) and gets its :class:`Api` (settings,
cards, batcher) from the service's ``__init__`` at start-up.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from service.config import Settings
from service.engine import Batcher, Explainer, NotExplainable, Overloaded
from service.logs import request_id
from service.preprocess import ImageError
from service.ui import ui_routes

logger = logging.getLogger("imgclf.service")

MAX_TEXT_FIELD = 1024  # bytes in a text field (model, top_k)
MAX_PART_HEADER = 4096  # bytes in one part header line (a 10,000-character filename is refused)


class Rejected(Exception):
    """A request answered with a 4xx/503 ``{"error", "detail"}`` body."""

    def __init__(self, status: int, error: str, detail: Any, headers: dict[str, str] | None = None) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.detail = detail
        self.headers = headers or {}


class ClientGone(Exception):
    """The client closed the connection; nothing can be answered."""


@dataclass
class Api:
    """What the handlers need, made once per worker at start-up by the service."""

    settings: Settings
    cards: dict[str, dict[str, Any]]
    default_model: str
    batcher: Batcher
    on_reject: Callable[[str], None]
    on_answer: Callable[[str, int], None]
    openapi: bytes
    explainer: Explainer | None = None  # None: /explain answers 501 not_explainable

    def check(self, model: str, top_k: int) -> dict[str, Any]:
        if model not in self.cards:
            raise Rejected(404, "unknown_model", {"model": model, "valid": sorted(self.cards)})
        if top_k < 1:
            raise Rejected(400, "invalid_top_k", f"top_k must be at least 1, got {top_k}")
        return self.cards[model]


# --- the request body -----------------------------------------------------------------------------

class Form:
    """Multipart callbacks for python-multipart's streaming parser: files and text fields in memory,
    with per-request limits checked as the bytes arrive."""

    def __init__(self, max_files: int) -> None:
        self.max_files = max_files
        self.files: list[tuple[str, bytes]] = []  # (field name, bytes) in upload order
        self.fields: dict[str, str] = {}
        self._header_field: list[bytes] = []
        self._header_value: list[bytes] = []
        self._headers: dict[bytes, bytes] = {}
        self._name = ""
        self._is_file = False
        self._chunks: list[bytes] = []
        self._size = 0

    def callbacks(self) -> dict[str, Callable[..., None]]:
        return {"on_part_begin": self.on_part_begin, "on_header_field": self.on_header_field,
                "on_header_value": self.on_header_value, "on_header_end": self.on_header_end,
                "on_headers_finished": self.on_headers_finished, "on_part_data": self.on_part_data,
                "on_part_end": self.on_part_end}

    def on_part_begin(self) -> None:
        self._headers = {}
        self._chunks = []
        self._size = 0

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_field.append(data[start:end])

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value.append(data[start:end])

    def on_header_end(self) -> None:
        self._headers[b"".join(self._header_field).lower()] = b"".join(self._header_value)
        self._header_field, self._header_value = [], []

    def on_headers_finished(self) -> None:
        disposition, options = parse_options_header(self._headers.get(b"content-disposition"))
        if disposition != b"form-data" or b"name" not in options:
            raise Rejected(400, "invalid_multipart", "each part needs Content-Disposition: form-data; name=...")
        self._name = options[b"name"].decode("latin-1")
        self._is_file = b"filename" in options
        if self._is_file and len(self.files) >= self.max_files:
            raise Rejected(413, "too_many_files",
                           f"more than {self.max_files} files; the limit is IMGCLF_MAX_FILES={self.max_files}")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        self._size += end - start
        if not self._is_file and self._size > MAX_TEXT_FIELD:
            raise Rejected(400, "invalid_request", f"field {self._name!r} is longer than {MAX_TEXT_FIELD} bytes")
        self._chunks.append(data[start:end])

    def on_part_end(self) -> None:
        data = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        if self._is_file:
            self.files.append((self._name, data))
        else:
            try:
                self.fields[self._name] = data.decode("utf-8")
            except UnicodeDecodeError:
                raise Rejected(400, "invalid_request", f"field {self._name!r} is not UTF-8 text") from None


def multipart_boundary(headers: dict[bytes, bytes]) -> bytes:
    content_type, options = parse_options_header(headers.get(b"content-type"))
    if content_type == b"application/x-www-form-urlencoded":  # a form with no file in it
        raise Rejected(400, "no_file", "send the image as a multipart/form-data file upload; URLs are not fetched")
    if content_type != b"multipart/form-data":
        raise Rejected(415, "unsupported_media_type",
                       f"send multipart/form-data (got {content_type.decode('latin-1')[:100] or 'no Content-Type'})")
    boundary = options.get(b"boundary")
    if not boundary:
        raise Rejected(400, "invalid_multipart", "multipart/form-data without a boundary parameter")
    return boundary


async def read_form(receive: Receive, headers: dict[bytes, bytes], settings: Settings,
                    budget: Batcher | None = None) -> Form:
    """Stream the body into the multipart parser, enforcing the size limit and the body timeout;
    with ``budget``, the bytes received count against the worker's upload-byte cap while they are
    read (503 ``overloaded`` past it, :meth:`~service.engine.Batcher.hold_reading`)."""
    limit = settings.max_body_bytes
    too_large = Rejected(413, "body_too_large", f"request body exceeds {limit} bytes (IMGCLF_MAX_BODY_BYTES)")
    try:
        declared = int(headers.get(b"content-length", b"0"))
    except ValueError:
        raise Rejected(400, "invalid_request", "Content-Length is not a number") from None
    if declared > limit:
        raise too_large
    boundary = multipart_boundary(headers)
    form = Form(settings.max_files)
    try:
        parser = MultipartParser(boundary, form.callbacks(), max_header_size=MAX_PART_HEADER)
    except FormParserError as exc:
        raise Rejected(400, "invalid_multipart", str(exc)) from None
    received = held = 0
    try:
        async with asyncio.timeout(settings.body_timeout_s):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise ClientGone()
                chunk = message.get("body", b"")
                received += len(chunk)
                if received > limit:
                    raise too_large
                if budget is not None and chunk:
                    held += len(chunk)
                    if (refused := budget.hold_reading(len(chunk), held)) is not None:
                        raise Rejected(503, "overloaded", refused.detail,
                                       {"Retry-After": str(refused.retry_after_s)})
                if chunk:
                    parser.write(chunk)
                if not message.get("more_body", False):
                    break
        parser.finalize()
    except TimeoutError:
        raise Rejected(408, "body_timeout",
                       f"the request body did not arrive within {settings.body_timeout_s:g} s "
                       "(IMGCLF_BODY_TIMEOUT_S)") from None
    except FormParserError as exc:
        raise Rejected(400, "invalid_multipart", f"malformed multipart body: {exc}") from None
    finally:
        if budget is not None:
            budget.release_reading(held)
    return form


def form_model(form: Form, api: Api) -> str:
    return form.fields.get("model") or api.default_model


def form_options(form: Form, api: Api) -> tuple[str, int]:
    model = form_model(form, api)
    raw_k = form.fields.get("top_k", "5")
    try:
        top_k = int(raw_k)
    except ValueError:
        raise Rejected(400, "invalid_request", f"top_k must be an integer, got {raw_k[:40]!r}") from None
    return model, top_k


def pick_files(form: Form, field: str, other: str) -> list[bytes]:
    """The uploads in ``field``; a file elsewhere or a text value in ``field`` is a clear 400."""
    wrong = sorted({name for name, _ in form.files if name != field})
    if wrong:
        hint = f" ('{other}' is for /classify{'_batch' if other == 'images' else ''})" if other in wrong else ""
        raise Rejected(400, "no_file", f"files go in the multipart field '{field}', got a file in "
                                       f"{', '.join(repr(w[:40]) for w in wrong)}{hint}")
    files = [data for name, data in form.files if name == field]
    if not files:
        if field in form.fields:
            raise Rejected(400, "no_file", f"'{field}' must be a file upload (multipart file); URLs are not fetched")
        raise Rejected(400, "no_file", f"send the image as a multipart file field named '{field}'")
    return files


def one_file(form: Form, path: str) -> bytes:
    """The single upload in ``image`` (``/classify``, ``/explain``)."""
    files = pick_files(form, "image", "images")
    if len(files) > 1:
        raise Rejected(400, "invalid_request", f"{path} takes one file in 'image'; use /classify_batch")
    return files[0]


def image_rejection(error: ImageError) -> Rejected:
    """An upload that could not be decoded, as the HTTP answer (413 for a too-large image)."""
    return Rejected(413 if error.error == "image_too_large" else 400, error.error, error.detail)


def class_index(card: dict[str, Any], raw: str | None) -> int | None:
    """The ``class`` field: a class name of the card or its index; None (absent or empty): the top class."""
    if raw is None or raw.strip() == "":
        return None
    classes = card["classes"]
    if raw in classes:
        return classes.index(raw)
    if raw.strip().isdigit() and int(raw) < len(classes):
        return int(raw)
    raise Rejected(400, "invalid_class", f"class {raw[:40]!r} is neither a class of {card['name']} nor an "
                                         f"index 0..{len(classes) - 1}; classes: {', '.join(classes)}")


# --- answers --------------------------------------------------------------------------------------

def prediction(card: dict[str, Any], probabilities: np.ndarray, top_k: int) -> dict[str, Any]:
    classes = card["classes"]
    values = probabilities.tolist()
    order = np.argsort(-probabilities, kind="stable")[: min(top_k, len(classes))].tolist()
    return {
        "model": card["name"],
        "version": card["version"],
        "label": classes[order[0]],
        "probabilities": dict(zip(classes, values)),
        "top_k": [{"label": classes[i], "probability": values[i]} for i in order],
    }


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

    def __init__(self, holder: "ApiHolder") -> None:
        self.holder = holder

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope["headers"])
        rid = client_request_id(headers)
        token = request_id.set(rid)
        api = self.holder.api
        try:
            if api is None:
                raise Rejected(503, "starting", "the service is starting", {"Retry-After": "1"})
            if scope["method"] != "POST":
                raise Rejected(405, "method_not_allowed", f"{self.path} takes POST", {"Allow": "POST"})
            if (refused := api.batcher.refusal(1)) is not None:  # overloaded: refuse before reading
                raise Rejected(503, "overloaded", refused.detail, {"Retry-After": str(refused.retry_after_s)})
            form = await read_form(receive, headers, api.settings, api.batcher)
            body = await self.answer(api, form, receive)
            api.on_answer(self.path, 200)
            if isinstance(body, bytes):  # /explain: a PNG
                await send_json(send, 200, body, rid, content_type=b"image/png")
            else:
                await send_json(send, 200, json_bytes(body), rid)
        except Rejected as exc:
            if api is not None:
                api.on_reject(exc.error)
                api.on_answer(self.path, exc.status)
            logger.debug("answered %d %s: %s", exc.status, exc.error, exc.detail)
            await send_json(send, exc.status, json_bytes({"error": exc.error, "detail": exc.detail}), rid,
                            exc.headers)
        except ClientGone:
            logger.debug("client went away; request dropped")
        except Exception:
            logger.exception("request failed")
            await send_json(send, 500, json_bytes({"error": "internal_error", "detail": f"request {rid} failed"}),
                            rid)
        finally:
            request_id.reset(token)

    async def answer(self, api: Api, form: Form, receive: Receive) -> Any:
        raise NotImplementedError

    @staticmethod
    async def infer(api: Api, model: str, card: dict[str, Any], blobs: list[bytes], receive: Receive) -> list[Any]:
        try:
            futures = api.batcher.submit(model, blobs, tuple(card["input"]["size"]))
        except Overloaded as exc:
            raise Rejected(503, "overloaded", exc.detail, {"Retry-After": str(exc.retry_after_s)}) from None
        try:
            return await until_answered(futures, receive, api.batcher.expected_wait_s(0))
        except Overloaded as exc:
            raise Rejected(503, "overloaded", exc.detail, {"Retry-After": str(exc.retry_after_s)}) from None


class Classify(Endpoint):
    path = "/classify"

    async def answer(self, api: Api, form: Form, receive: Receive) -> Any:
        data = one_file(form, self.path)
        model, top_k = form_options(form, api)
        card = api.check(model, top_k)
        (row,) = await self.infer(api, model, card, [data], receive)
        if isinstance(row, ImageError):
            raise image_rejection(row)
        return prediction(card, row, top_k)


class Explain(Endpoint):
    """``POST /explain``: the upload of ``/classify``, answered with a Grad-CAM PNG."""

    path = "/explain"

    async def answer(self, api: Api, form: Form, receive: Receive) -> Any:
        data = one_file(form, self.path)
        model = form_model(form, api)
        card = api.check(model, 1)
        index = class_index(card, form.fields.get("class"))
        if api.explainer is None:
            raise Rejected(501, "not_explainable", "explanations are not available in this server")
        try:
            png = await api.explainer(model, data, index)
        except Overloaded as exc:
            raise Rejected(503, "overloaded", exc.detail, {"Retry-After": str(exc.retry_after_s)}) from None
        except NotExplainable as exc:
            raise Rejected(501, "not_explainable", f"model {model!r} cannot be explained: {exc}") from None
        if isinstance(png, ImageError):
            raise image_rejection(png)
        return png


class ClassifyBatch(Endpoint):
    path = "/classify_batch"

    async def answer(self, api: Api, form: Form, receive: Receive) -> Any:
        files = pick_files(form, "images", "image")
        model, top_k = form_options(form, api)
        card = api.check(model, top_k)
        rows = await self.infer(api, model, card, files, receive)
        results = [{"error": row.error, "detail": row.detail} if isinstance(row, ImageError)
                   else prediction(card, row, top_k) for row in rows]
        return {"model": model, "version": card["version"], "results": results}


class ApiHolder:
    api: Api | None = None


SWAGGER_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>imgclf API</title>
<link rel="stylesheet" href="/static_content/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="/static_content/swagger-ui-bundle.js"></script>
<script>SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui"});</script>
</body></html>"""


class LineFeedPaths:
    """ASGI middleware for the BentoML service (``add_asgi_middleware``): a request whose path holds a
    line feed goes straight to this service's app. BentoML mounts the app at ``/`` with a subclass
    of Starlette's ``Mount``, whose pattern (``.*``) does not match a line feed, so
    ``GET /models/a%0Ab`` got the framework's plain-text 404 rather than this service's JSON
    ``unknown_model`` (found by schemathesis)."""

    def __init__(self, app: ASGIApp, api_app: ASGIApp) -> None:
        self.app = app
        self.api_app = api_app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and "\n" in scope["path"]:
            await self.api_app(scope, receive, send)
        else:
            await self.app(scope, receive, send)


def build_app(holder: ApiHolder) -> Starlette:
    def ready() -> Api:
        if holder.api is None:
            raise Rejected(503, "starting", "the service is starting")
        return holder.api

    def error(exc: Rejected) -> JSONResponse:
        return JSONResponse({"error": exc.error, "detail": exc.detail}, status_code=exc.status, headers=exc.headers)

    async def list_models(request: Request) -> Response:
        try:
            api = ready()
        except Rejected as exc:
            return error(exc)
        return JSONResponse({"default": api.default_model, "models": api.cards})

    async def one_model(request: Request) -> Response:
        name = request.path_params["name"]
        try:
            api = ready()
            api.check(name, 1)
        except Rejected as exc:
            return error(exc)
        return JSONResponse(api.cards[name])

    async def openapi(request: Request) -> Response:
        try:
            return Response(ready().openapi, media_type="application/json")
        except Rejected as exc:
            return error(exc)

    async def docs(request: Request) -> Response:
        return HTMLResponse(SWAGGER_PAGE)

    async def no_route(request: Request, exc: HTTPException) -> Response:
        # Starlette's own 404/405 are plain text; every answer of this app is JSON. (BentoML mounts
        # this app passively: a path that none of its routes takes is BentoML's, a plain-text 404.)
        path = request.scope["path"]
        if exc.status_code == 405:
            allow = (exc.headers or {}).get("Allow", "")
            return error(Rejected(405, "method_not_allowed", f"{path} takes {allow}", {"Allow": allow}))
        return error(Rejected(exc.status_code, "not_found", f"no route for {path}"))

    return Starlette(exception_handlers={404: no_route, 405: no_route}, routes=[
        Route("/classify", Classify(holder)),  # ASGI endpoints: they answer 405 themselves, in JSON
        Route("/classify_batch", ClassifyBatch(holder)),
        Route("/explain", Explain(holder)),
        Route("/models", list_models, methods=["GET"]),
        Route("/models/", list_models, methods=["GET"]),
        Route("/models/{name}", one_model, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        Route("/docs", docs, methods=["GET"]),
        *ui_routes(),  # the /ui page (service/ui.py)
    ])
