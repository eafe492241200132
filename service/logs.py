"""The service's own log lines: one JSON object per line (``IMGCLF_LOG_FORMAT=json``, default) or
plain text, each tagged with the id of the request it belongs to when there is one."""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time

# Set by the Gatekeeper middleware for the duration of a request (asyncio tasks and the threads
# started with asyncio.to_thread inherit it).
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if rid := request_id.get():
            line["request_id"] = rid
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return f"{text} [request {rid}]" if (rid := request_id.get()) else text


def configure_logging(fmt: str, level: str) -> None:
    """Route every ``imgclf.*`` logger to stdout in the chosen format (idempotent): in a container,
    JSON lines on stdout are what log collectors read."""
    root = logging.getLogger("imgclf")
    root.setLevel(level)
    root.propagate = False
    for handler in root.handlers[:]:
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root.addHandler(handler)
    if fmt == "json":
        # BentoML's lines from this worker (its access log, its errors) as JSON lines too; only the
        # few start and stop lines of the `bentoml serve` parent process keep BentoML's text.
        for name in ("bentoml", "uvicorn.error", "circus", None):
            for bentoml_handler in logging.getLogger(name).handlers:
                if type(bentoml_handler) is logging.StreamHandler:  # BentoML's console handler
                    bentoml_handler.setFormatter(JsonFormatter())
