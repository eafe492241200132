"""Metrics of a labeled folder: accuracy, per-class precision and recall, and the confusion
matrix as text and as a PNG heat map (drawn with Pillow)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from service.score.outputs import side_file, write_text_atomic


def evaluate(rows: list[dict[str, Any]], classes: Sequence[str]) -> dict[str, Any] | None:
    labeled = [r for r in rows if r.get("true_label")]
    if not labeled:
        return None
    classes = list(classes)
    index = {c: i for i, c in enumerate(classes)}
    confusion = np.zeros((len(classes), len(classes)), dtype=int)
    for r in labeled:
        confusion[index[r["true_label"]], index[r["label"]]] += 1
    per_class = {}
    for c, i in index.items():
        predicted, actual = confusion[:, i].sum(), confusion[i].sum()
        per_class[c] = {"precision": float(confusion[i, i] / predicted) if predicted else None,
                        "recall": float(confusion[i, i] / actual) if actual else None, "support": int(actual)}
    return {"images": len(labeled), "accuracy": float(np.trace(confusion) / confusion.sum()),
            "per_class": per_class, "confusion": confusion.tolist(), "classes": classes}


def confusion_text(metrics: dict[str, Any]) -> str:
    classes, confusion = metrics["classes"], metrics["confusion"]
    width = max(len(c) for c in classes) + 1
    lines = [f"accuracy {metrics['accuracy']:.4f} on {metrics['images']} labeled images",
             "rows: true label, columns: predicted", " " * width + "".join(f"{c[:7]:>8}" for c in classes)]
    lines += [f"{c:<{width}}" + "".join(f"{v:>8}" for v in row) for c, row in zip(classes, confusion)]
    return "\n".join(lines) + "\n"


def confusion_png(metrics: dict[str, Any], path: Path, title: str) -> None:
    """The confusion matrix as a heat map with counts, drawn with Pillow (tens of milliseconds;
    matplotlib's import alone took seconds)."""
    from PIL import Image, ImageDraw, ImageFont

    classes, confusion = metrics["classes"], np.array(metrics["confusion"])
    font, small = ImageFont.load_default(size=13), ImageFont.load_default(size=11)
    cell = 46
    label_w = max(int(font.getlength(c)) for c in classes) + 16
    top, left = 56, label_w + 18
    size = (left + cell * len(classes) + 12, top + cell * len(classes) + label_w + 24)
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.text((12, 8), title, fill="black", font=font)
    draw.text((12, 28), f"accuracy {100 * metrics['accuracy']:.2f}% (rows: true, columns: predicted)",
              fill="black", font=font)
    peak = max(int(confusion.max()), 1)
    for (i, j), v in np.ndenumerate(confusion):
        shade = v / peak  # white -> a Blues-like dark blue
        colour = tuple(int(a + (b - a) * shade) for a, b in zip((247, 251, 255), (8, 48, 107)))
        x, y = left + j * cell, top + i * cell
        draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=colour, outline=(220, 220, 220))
        draw.text((x + cell / 2, y + cell / 2), str(v), fill="white" if shade > 0.5 else "black",
                  font=small, anchor="mm")
    for k, c in enumerate(classes):
        draw.text((left - 8, top + k * cell + cell / 2), c, fill="black", font=font, anchor="rm")
        column = Image.new("RGBA", (label_w, cell), (255, 255, 255, 0))
        ImageDraw.Draw(column).text((label_w - 4, cell / 2), c, fill="black", font=font, anchor="rm")
        rotated = column.rotate(90, expand=True)
        image.paste(rotated, (left + k * cell, top + cell * len(classes) + 8), rotated)
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, "PNG")
    os.replace(tmp, path)


def write_confusion(metrics: dict[str, Any], out: Path, title: str) -> None:
    write_text_atomic(side_file(out, ".confusion.txt"), confusion_text(metrics))
    confusion_png(metrics, side_file(out, ".confusion.png"), title)


def write_metrics(metrics: dict[str, Any], out: Path, title: str) -> None:
    """``<out>.metrics.json``, ``<out>.confusion.txt`` and ``<out>.confusion.png``."""
    write_text_atomic(side_file(out, ".metrics.json"), json.dumps(metrics, indent=2))
    write_confusion(metrics, out, title)
