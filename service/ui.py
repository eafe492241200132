"""The ``/ui`` page: a static HTML/CSS/JS page for trying the classifier in a browser.

The files live in ``service/ui/`` (no build step, no external resources) and call the API beside
them with relative URLs (``../classify``, ``../models``, ``../explain``). ``GET /ui`` redirects to
``/ui/``, which serves ``index.html``. The page is not part of the API's OpenAPI document.
"""

from __future__ import annotations

from pathlib import Path

from starlette.routing import BaseRoute, Mount
from starlette.staticfiles import StaticFiles

UI_DIR = Path(__file__).resolve().parent / "ui"


def ui_routes(directory: Path = UI_DIR) -> list[BaseRoute]:
    """The routes to add to the API's Starlette app: the page and its assets under ``/ui``."""
    return [Mount("/ui", app=StaticFiles(directory=directory, html=True), name="ui")]
