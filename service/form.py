"""The request body: a streaming multipart parser (python-multipart) with the service's limits,
and the fields each endpoint reads from the form (files, ``model``, ``top_k``, ``class``).

The body is read in memory as it streams, counted against ``IMGCLF_MAX_BODY_BYTES`` before and
while parsing (a declared length over the limit is refused unread; a chunked or lying client is cut
off at the limit), within ``IMGCLF_BODY_TIMEOUT_S`` (else 408), and, with the worker's batcher,
against its upload-byte cap while it is received. No temporary files, no framework error strings:
every malformed request is a :class:`~service.errors.Rejected` 4xx.
"""

from __future__ import annotations

import asyncio
from typing import Callable

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.types import Receive

from service.batching import Batcher
from service.card import ModelCard
from service.config import Settings
from service.errors import ClientGone, Rejected, overloaded

MAX_TEXT_FIELD = 1024  # bytes in a text field (model, top_k)
MAX_PART_HEADER = 4096  # bytes in one part header line (a 10,000-character filename is refused)


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
    read (503 ``overloaded`` past it, :meth:`~service.batching.Batcher.hold_reading`)."""
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
                        raise overloaded(refused)
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


def form_model(form: Form, default: str) -> str:
    return form.fields.get("model") or default


def form_options(form: Form, default: str) -> tuple[str, int]:
    """(``model``, ``top_k``) of a classify request (``top_k`` 5 when absent)."""
    model = form_model(form, default)
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


def class_index(card: ModelCard, raw: str | None) -> int | None:
    """The ``class`` field: a class name of the card or its index; None (absent or empty): the top class."""
    if raw is None or raw.strip() == "":
        return None
    classes = card.classes
    if raw in classes:
        return classes.index(raw)
    if raw.strip().isdigit() and int(raw) < len(classes):
        return int(raw)
    raise Rejected(400, "invalid_class", f"class {raw[:40]!r} is neither a class of {card.name} nor an "
                                         f"index 0..{len(classes) - 1}; classes: {', '.join(classes)}")
