"""The service's non-200 answers: :class:`Rejected` is a ``{"error", "detail"}`` JSON answer with its
status and headers, raised anywhere in a request's handling and written by the endpoint; every
503 ``overloaded`` answer is made by :func:`overloaded`."""

from __future__ import annotations

from typing import Any

from service.batching import Overloaded
from service.preprocess import ImageError


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


def overloaded(refused: Overloaded) -> Rejected:
    """503 ``overloaded`` with its ``Retry-After``: the one way the service says it is too busy."""
    return Rejected(503, "overloaded", refused.detail, {"Retry-After": str(refused.retry_after_s)})


def image_rejection(error: ImageError) -> Rejected:
    """An upload that could not be decoded, as the HTTP answer (413 for a too-large image)."""
    return Rejected(413 if error.error == "image_too_large" else 400, error.error, error.detail)
