"""The /ui page, end to end in a real headless Chromium.

The browser test starts the real server (fixture ``server``), opens ``/ui`` in Debian's Chromium
driven by ``playwright-core`` (``tests/ui_driver.mjs``; no browser download), classifies a real
CIFAR-10 image with the cifar10 model and a text file (file picker, both at once) and a real cat
photo with the catsdogs model (drag-and-drop), and checks what the page drew against what the API
answers for the same files. It skips, saying why, where no browser can be had (``make browser`` installs one).

Screenshot: the page after the uploads is saved in the test's tmp folder, and also to the
path in ``IMGCLF_UI_SCREENSHOT`` when set (docs/ui.png was made with
``IMGCLF_UI_SCREENSHOT=docs/ui.png .venv/bin/python -m pytest tests/test_ui.py``).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
from PIL import Image

from conftest import REPO, Server
from service.app import build_app
from service import schemas
from service.schemas import CLASSIFY_ERRORS

CHROMIUM = Path(os.environ.get("IMGCLF_CHROMIUM", "/usr/bin/chromium"))
DRIVER = REPO / "tests" / "ui_driver.mjs"
UI_DIR = REPO / "service" / "ui"


# --- the page's files (no browser) ------------------------------------------------------------------

def fetch_all(paths: list[str]) -> list[httpx.Response]:
    """GET these paths from the app (in process, no server: the page needs no model)."""
    async def fetch() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=build_app(lambda: None))
        async with httpx.AsyncClient(transport=transport, base_url="http://ui.test", follow_redirects=True) as client:
            return [await client.get(path) for path in paths]
    return asyncio.run(fetch())


def test_page_and_assets_are_served_without_external_resources() -> None:
    page, app_js, style_css, missing = fetch_all(["/ui", "/ui/app.js", "/ui/style.css", "/ui/missing.js"])
    assert page.status_code == 200 and page.url.path == "/ui/"
    assert "text/html" in page.headers["content-type"]
    references = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert {"style.css", "app.js"} <= set(references)
    assert not [ref for ref in references if re.match(r"(https?:)?//", ref)], "the page must load nothing from outside"
    for asset, response in (("app.js", app_js), ("style.css", style_css)):
        assert response.status_code == 200 and response.text == (UI_DIR / asset).read_text()
        assert not re.search(r"https?://", response.text), f"{asset} refers to an outside URL"
    assert missing.status_code == 404


def test_every_api_error_code_has_a_plain_sentence() -> None:
    script = (UI_DIR / "app.js").read_text()
    block = script[script.index("const MESSAGES = {"): script.index("};", script.index("const MESSAGES = {"))]
    sentences = dict(re.findall(r'^\s+(\w+): "([^"]+)"', block, flags=re.M))
    tables = [CLASSIFY_ERRORS, getattr(schemas, "EXPLAIN_ERRORS", {})]  # /explain's, where it is served
    codes = {code for table in tables for _, names in table.values() for code in names}
    assert codes - set(sentences) == set(), "error codes the page would only show as a status number"
    for code, sentence in sentences.items():
        assert "_" not in sentence and sentence.endswith("."), (code, sentence)


# --- the page in a browser --------------------------------------------------------------------------

@pytest.fixture(scope="session")
def node() -> str:
    """The Node.js that drives Chromium; skips (before the server starts) where there is no browser."""
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (`make browser` installs Debian's chromium; "
                    "IMGCLF_CHROMIUM names another)")
    node = shutil.which("node")
    if node is None:
        pytest.skip("Node.js is absent: the browser test drives Chromium with playwright-core (`make browser`)")
    if not (REPO / "node_modules" / "playwright-core" / "package.json").exists():
        pytest.skip("playwright-core is not installed in node_modules (`make browser` runs npm ci)")
    return node


def api_classify(server: Server, path: Path, model: str) -> dict:
    with path.open("rb") as handle:
        response = httpx.post(f"{server.url}/classify", files={"image": (path.name, handle)},
                              data={"model": model, "top_k": "5"}, timeout=60)
    response.raise_for_status()
    return response.json()


def first_correct(server: Server, paths: list[Path], model: str, truth: str) -> tuple[Path, dict]:
    """The first of these images that the API labels ``truth`` (so the page's label is checkable
    against the ground truth too)."""
    for path in paths:
        answer = api_classify(server, path, model)
        if answer["label"] == truth:
            return path, answer
    raise AssertionError(f"none of {len(paths)} {truth} images is labeled {truth} by {model}")


def explain_status(server: Server, path: Path, model: str) -> int:
    with path.open("rb") as handle:
        return httpx.post(f"{server.url}/explain", files={"image": (path.name, handle)},
                          data={"model": model}, timeout=120).status_code


def check_prediction(shown: dict, answer: dict, card: dict, card_text: str) -> None:
    assert not shown["failed"] and shown["error"] is None
    assert shown["label"] == answer["label"]
    assert shown["model"] == card["name"] and card["version"] in shown["meta"]
    assert f"test accuracy {100 * card['metrics']['test_accuracy']:.1f}%" in shown["meta"]
    assert shown["preview_loaded"], "the preview of the upload did not render"
    bars = shown["bars"]
    assert [bar["label"] for bar in bars] == [row["label"] for row in answer["top_k"]]
    assert len(bars) == min(5, len(card["classes"]))
    for bar, row in zip(bars, answer["top_k"]):
        assert bar["value"] == f"{100 * row['probability']:.1f}%"
        assert abs(bar["share"] - row["probability"]) < 0.01, (bar, row)  # the drawn width
    shares = [bar["share"] for bar in bars]
    assert shares == sorted(shares, reverse=True)
    # the selector's card line, as it read when this model was picked
    assert f"{100 * card['metrics']['test_accuracy']:.1f}%" in card_text and card["version"] in card_text


def test_page_classifies_uploads_in_chromium(node: str, server: Server, cifar_folder: Path,
                                            catsdogs_folder: Path, tmp_path: Path) -> None:
    models = httpx.get(f"{server.url}/models").json()["models"]
    cifar, cifar_answer = first_correct(server, sorted((cifar_folder / "test" / "ship").glob("*.jpg"))[:10],
                                        "cifar10", "ship")
    cat, cat_answer = first_correct(server, [catsdogs_folder / "train" / f"cat.{i}.jpg" for i in range(10)],
                                    "catsdogs", "cat")
    text = tmp_path / "notes.txt"
    text.write_text("these are notes, not a photo\n")
    flat = tmp_path / "flat.png"  # one colour: no class at all
    Image.new("RGB", (200, 200), (40, 160, 90)).save(flat)
    screenshot = tmp_path / "ui.png"
    plan = {"url": server.url, "chromium": str(CHROMIUM), "screenshot": str(screenshot), "steps": [
        {"model": "cifar10", "files": [str(cifar), str(text)]},  # the file picker, two files at once
        {"model": "catsdogs", "files": [str(cat)], "drop": True},  # drag-and-drop
        {"model": "catsdogs", "files": [str(flat)]},
    ]}
    run = subprocess.run([node, str(DRIVER), json.dumps(plan)], cwd=REPO, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    seen = json.loads(run.stdout)
    if target := os.environ.get("IMGCLF_UI_SCREENSHOT"):
        shutil.copyfile(screenshot, REPO / target)

    assert seen["status"] == 200 and seen["final_url"].endswith("/ui/")
    assert seen["console_errors"] == []
    assert seen["models"] == sorted(models)
    assert [row["name"] for row in seen["results"]] == [flat.name, cat.name, text.name, cifar.name]  # newest first
    shown_flat, shown_cat, shown_text, shown_ship = seen["results"]
    assert [shown_ship["model"], shown_text["model"], shown_cat["model"]] == ["cifar10", "cifar10", "catsdogs"]
    check_prediction(shown_ship, cifar_answer, models["cifar10"], seen["cards"][0])
    check_prediction(shown_cat, cat_answer, models["catsdogs"], seen["cards"][1])

    # /explain is feature-detected: the overlay is shown where the endpoint answers, hidden where not
    status = explain_status(server, cat, "catsdogs")
    if status in (404, 405):
        assert not shown_ship["gradcam_shown"] and not shown_cat["gradcam_shown"]
    else:
        assert status == 200 and shown_cat["gradcam_shown"] and shown_cat["gradcam_width"] > 0

    # an answer outside the model's distribution is marked; the others are not
    for shown, answer in ((shown_cat, cat_answer), (shown_ship, cifar_answer)):
        assert (shown["ood"] is None) == (answer.get("in_distribution") is not False), (shown, answer)
    if models["catsdogs"].get("ood"):
        assert shown_flat["ood"].startswith("This does not look like any of: cat, dog."), shown_flat
    assert shown_text["failed"] and shown_text["bars"] == [] and shown_text["label"] == ""
    assert shown_text["error"] == ("This file is not an image the service can read. "
                                   "Send a JPEG, PNG, GIF, WebP, TIFF or BMP file.")
    assert shown_text["error_code"].startswith("not_an_image")
    assert screenshot.stat().st_size > 10_000
