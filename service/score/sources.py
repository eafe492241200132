"""What a run scores: the files under a folder, their names relative to it, the labels their
folders or names carry, and the model's registry folder."""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Sequence

from service.score.errors import ScoreError

KAGGLE_NAME = re.compile(r"^([A-Za-z]+)\.\d+\.[A-Za-z]+$")


def walk_files(root: Path) -> list[Path]:
    """Every regular file under ``root`` (sorted), following no link that leads outside it.

    Only symbolic links are resolved (a plain file or folder found inside root is inside root), so
    a folder of plain files costs one ``scandir`` per folder and no per-file system call.
    """
    root = root.resolve()
    found: list[Path] = []
    stack = [(root, root)]  # (path as walked, its real location)
    while stack:
        here, real = stack.pop()
        try:
            entries = list(os.scandir(here))
        except OSError:  # unreadable folder: skipped, as os.walk does
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                _visit(entry, here / entry.name, root, real, found, stack)
            except OSError:
                continue
    return sorted(found)


def _visit(entry: os.DirEntry, path: Path, root: Path, real: Path, found: list[Path],
           stack: list[tuple[Path, Path]]) -> None:
    """One entry of :func:`walk_files`: a file to keep, a folder to enter, or neither."""
    if entry.is_symlink():
        target = Path(os.path.realpath(path))
        if not target.is_relative_to(root):
            return
        if entry.is_dir():  # entered unless it loops back to this folder or above
            if target != real and target not in real.parents:
                stack.append((path, target))
        elif entry.is_file():
            found.append(path)
    elif entry.is_dir(follow_symlinks=False):
        stack.append((path, real / entry.name))
    elif entry.is_file(follow_symlinks=False):
        found.append(path)


def relative_names(paths: Sequence[Path], root: Path) -> list[str]:
    """``str(p.relative_to(root))`` for paths found under ``root`` by :func:`walk_files`, by slicing."""
    prefix = str(root)
    cut = len(prefix) if prefix.endswith(os.sep) else len(prefix) + 1
    return [str(p)[cut:] for p in paths]


def true_label(relative: Path, classes: Sequence[str]) -> str | None:
    """Label from a class folder (``dogs/x.jpg``) or a Kaggle name (``dog.12.jpg``), else None."""
    return LabelFinder(classes)(str(relative))


class LabelFinder:
    """:func:`true_label` for many paths: folder answers are cached, so a row costs a dict lookup."""

    def __init__(self, classes: Sequence[str]) -> None:
        self.lookup = {c.lower(): c for c in classes}
        self.folder = lru_cache(maxsize=None)(self._folder)

    def _folder(self, folder: str) -> str | None:
        for part in Path(folder).parts:
            key = part.lower()
            if key in self.lookup or (key.endswith("s") and key[:-1] in self.lookup):
                return self.lookup.get(key) or self.lookup[key[:-1]]
        return None

    def __call__(self, relative: str) -> str | None:
        folder, _, name = relative.rpartition(os.sep)
        found = self.folder(folder) if folder else None
        if found:
            return found
        match = KAGGLE_NAME.match(name)
        return self.lookup.get(match.group(1).lower()) if match else None


def model_folder(models_dir: Path, model: str) -> Path:
    """``models_dir/model``, or :class:`ScoreError` naming the models that are there."""
    folder = models_dir / model
    if not (folder / "card.json").is_file():
        known = sorted(p.parent.name for p in models_dir.glob("*/card.json")) if models_dir.is_dir() else []
        raise ScoreError(f"model {model!r} not found in {models_dir}"
                         + (f" (available: {', '.join(known)})" if known else " (no models there)"))
    return folder
