"""The on-disk model registry: ``models/<name>/card.json`` plus the artifacts it lists.

Loading verifies every artifact's sha256 against its card before anything is served, and picks
the backend and device: ONNX Runtime (CUDA provider when onnxruntime-gpu finds a GPU, else CPU) by
default, TorchScript (CUDA when available) as the alternative (:mod:`service.backends`). Nothing
here imports ``training``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

from service.backends import BACKENDS, Backend, OnnxBackend, TorchScriptBackend
from service.card import ModelCard, RegistryError, read_card
from service.preprocess import normalize

logger = logging.getLogger("imgclf.registry")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


# Artifacts already hashed by this start-up: {path: "size:mtime_ns:sha256"}. The process that checks
# the registry first (``service.serve`` or the service's deployment hook) records them here; the
# worker processes it starts inherit the variable and skip a file whose size and mtime are unchanged,
# so each artifact is hashed once per start.
VERIFIED_ENV = "IMGCLF_VERIFIED_ARTIFACTS"


def _stat_key(path: Path) -> str:
    stat = path.stat()
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def _already_verified(path: Path, sha256: str) -> bool:
    try:
        recorded = json.loads(os.environ.get(VERIFIED_ENV) or "{}").get(str(path.resolve()))
    except ValueError:
        return False
    return recorded == f"{_stat_key(path)}:{sha256}"


def record_verified(paths: dict[Path, str]) -> None:
    """Remember these (path -> sha256) as checked, for this process and the ones it starts."""
    try:
        recorded = json.loads(os.environ.get(VERIFIED_ENV) or "{}")
    except ValueError:
        recorded = {}
    recorded.update({str(p.resolve()): f"{_stat_key(p)}:{sha}" for p, sha in paths.items()})
    os.environ[VERIFIED_ENV] = json.dumps(recorded)


@dataclass
class LoadedModel:
    card: ModelCard
    backend: Backend
    backend_name: str

    @property
    def name(self) -> str:
        return self.card.name

    @property
    def version(self) -> str:
        return self.card.version

    def predict(self, images_uint8: np.ndarray) -> np.ndarray:
        """(N, 3, H, W) uint8 at the card's size -> (N, classes) float32 probabilities, followed by
        the OOD score column when the card has an ``ood`` section (:mod:`service.ood`)."""
        return self.backend(normalize(images_uint8, self.card.input))


def verify_artifact(folder: Path, card: ModelCard, fmt: str) -> Path:
    """The path of ``card``'s ``fmt`` artifact in ``folder``, its sha256 checked against the card."""
    entry = card.artifact(fmt)
    path = folder / entry.file
    if not path.is_file():
        raise RegistryError(f"model {card.name!r}: artifact {path} is missing")
    if _already_verified(path, entry.sha256):
        return path
    actual = sha256_file(path)
    if actual != entry.sha256:
        raise RegistryError(f"model {card.name!r}: {path.name} sha256 {actual[:12]}... does not match "
                            f"the card's {entry.sha256[:12]}... (corrupted or replaced artifact)")
    return path


def load_model(folder: Path, backend: str = "onnx", device: str = "auto", threads: int = 0) -> LoadedModel:
    card = read_card(folder)
    if backend not in BACKENDS:
        raise RegistryError(f"unknown backend {backend!r}; choose from {BACKENDS}")
    path = verify_artifact(folder, card, backend)
    runner: Backend = (OnnxBackend if backend == "onnx" else TorchScriptBackend)(path, device, threads,
                                                                                 ood=card.ood is not None)
    return LoadedModel(card, runner, backend)


def model_folders(models_dir: Path, names: Sequence[str] | None = None) -> list[Path]:
    """The registry entries (folders holding card.json; export's hidden staging folders skipped)."""
    if not models_dir.is_dir():
        raise RegistryError(f"model directory {models_dir} does not exist")
    folders = sorted(p for p in models_dir.iterdir() if (p / "card.json").exists() and not p.name.startswith("."))
    if names:
        missing = set(names) - {p.name for p in folders}
        if missing:
            raise RegistryError(f"models {sorted(missing)} not found in {models_dir}")
        folders = [p for p in folders if p.name in names]
    if not folders:
        raise RegistryError(f"no models (folders with card.json) in {models_dir}")
    return folders


def servable_entries(models_dir: Path, names: Sequence[str] | None,
                     backend: str) -> list[tuple[Path, ModelCard]]:
    """(folder, card) of each entry to serve with ``backend``. An entry with no artifact for that
    backend (an INT8 entry is ONNX only) is left out with a warning when the whole registry is
    served, and is an error when it is asked for by name (``IMGCLF_MODELS``)."""
    entries = []
    for folder in model_folders(models_dir, names):
        card = read_card(folder)
        if backend not in card.artifacts and not names:
            logger.warning("model %s has no %s artifact; not served with IMGCLF_BACKEND=%s", card.name,
                           backend, backend)
            continue
        entries.append((folder, card))
    if not entries:
        raise RegistryError(f"no model in {models_dir} has a {backend} artifact")
    return entries


FALLBACK_DEFAULT_MODEL = "cifar10"


class ServedCards(NamedTuple):
    cards: dict[str, ModelCard]  # by model name, in registry order
    default: str  # the model a request that names none gets


def load_cards(models_dir: Path, names: Sequence[str] | None, backend: str,
               default_model: str | None = None) -> ServedCards:
    """Cards of the models to serve, every served artifact's hash checked (once per start, see
    :func:`record_verified`), without loading any runtime, and the default model: ``default_model``
    (``IMGCLF_DEFAULT_MODEL``) when given, else the only served model, else ``cifar10``. A bad
    artifact or a default that is not served raises :class:`RegistryError`."""
    cards, checked = {}, {}
    for folder, card in servable_entries(models_dir, names, backend):
        path = verify_artifact(folder, card, backend)
        checked[path] = card.artifact(backend).sha256
        cards[card.name] = card
    default = default_model or (next(iter(cards)) if len(cards) == 1 else FALLBACK_DEFAULT_MODEL)
    if default not in cards:
        raise RegistryError(f"default model {default!r} is not among {sorted(cards)} (set IMGCLF_DEFAULT_MODEL)")
    record_verified(checked)
    return ServedCards(cards, default)


def load_registry(models_dir: Path, backend: str = "onnx", device: str = "auto",
                  names: Sequence[str] | None = None, threads: int = 0) -> dict[str, LoadedModel]:
    """Load every model under ``models_dir`` (or just ``names``); any bad artifact is fatal."""
    models = {}
    for folder, _ in servable_entries(models_dir, names, backend):
        model = load_model(folder, backend, device, threads)
        models[model.name] = model
    return models
