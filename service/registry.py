"""The on-disk model registry: ``models/<name>/card.json`` plus the artifacts it lists.

Loading verifies every artifact's sha256 against its card before anything is served, and picks
the backend and device: ONNX Runtime (CUDA provider when onnxruntime-gpu finds a GPU, else CPU) by
default, TorchScript (CUDA when available) as the alternative. Nothing here imports ``training``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from service.preprocess import InputSpec, normalize

BACKENDS = ("onnx", "torchscript")
logger = logging.getLogger("imgclf.registry")


class RegistryError(RuntimeError):
    """The registry cannot be served as it is (missing file, hash mismatch, bad card)."""


class Backend(Protocol):
    device: str

    def __call__(self, batch: np.ndarray) -> np.ndarray: ...


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


class OnnxBackend:
    def __init__(self, path: Path, device: str, threads: int = 0) -> None:
        import onnxruntime as ort

        available = ort.get_available_providers()
        providers: list[Any] = ["CPUExecutionProvider"]
        if device in ("auto", "cuda") and "CUDAExecutionProvider" in available and cuda_usable():
            # cuDNN's heuristic choice of convolution algorithm: the default exhaustive search
            # benchmarks every convolution again for each new input shape, and adaptive batching
            # makes many (a stall of up to seconds on the first batch of each size)
            providers.insert(0, ("CUDAExecutionProvider", {"cudnn_conv_algo_search": "HEURISTIC"}))
        elif device == "cuda":
            raise RegistryError("IMGCLF_DEVICE=cuda but ONNX Runtime has no usable CUDA provider")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Idle ONNX Runtime threads spin for a while by default, burning the CPU that parsing and
        # decoding need between batches; let them sleep.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        options.log_severity_level = 3  # ORT warns about unused CUDA libraries on CPU hosts
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.input_name = self.session.get_inputs()[0].name
        self.device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        self.run_options = run_options(self.device)
        self.keep_arena = ort.RunOptions()  # the arena keeps what the run took

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        options = self.run_options if batch.nbytes > ARENA_KEEP_INPUT_BYTES else self.keep_arena
        return self.session.run(None, {self.input_name: batch}, options)[0]


# A CPU run whose input is larger than this hands ONNX Runtime's arena back after it; a smaller one
# keeps it for the next. Shrinking after every run cost 13 ms a batch of 32 on the shipped
# cifar10 (15 % of the float graph's time, 42 % of the INT8 graph's: the memory comes back as
# fresh pages every run); kept, a batch of 128 CIFAR images (1.6 MB of input) holds 140-160 MB.
# A catsdogs batch of more than 4 photos (442 KB each at 192 px) shrinks: 128 of them take 1.5 GB.
ARENA_KEEP_INPUT_BYTES = 2 << 20


def run_options(device: str) -> Any:
    """ONNX Runtime run options: on the CPU provider, shrink the memory arena after the run, so
    the memory a big batch took goes back to the system (measured on catsdogs, a batch of 128:
    +33 MB retained instead of +346 MB; docs/SERVING.md)."""
    import onnxruntime as ort

    options = ort.RunOptions()
    if device == "cpu":
        options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return options


class TorchScriptBackend:
    def __init__(self, path: Path, device: str, threads: int = 0) -> None:
        import torch

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.device = device
        with warnings.catch_warnings():  # TorchScript is deprecated upstream; ONNX is our default
            warnings.simplefilter("ignore", FutureWarning)
            self.module = torch.jit.load(str(path), map_location=device).eval()
        if device == "cuda":  # half-precision activations and NHWC kernels on the GPU
            self.module = self.module.half().to(memory_format=torch.channels_last)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            x = torch.from_numpy(batch).to(self.device, non_blocking=True)
            if self.device == "cuda":
                x = x.half().contiguous(memory_format=torch.channels_last)
            return self.module(x).float().cpu().numpy()


def gpu_backend_usable(backend: str) -> bool:
    """Whether ``backend`` (onnx | torchscript) can run on a CUDA GPU here: a usable GPU, and for
    ONNX Runtime its CUDA provider (a CPU-only onnxruntime on a GPU host runs on the CPU)."""
    if not cuda_usable():
        return False
    if backend == "onnx":
        import onnxruntime as ort

        return "CUDAExecutionProvider" in ort.get_available_providers()
    return True


def cuda_usable() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # no torch: trust the provider list
        return True


@dataclass
class LoadedModel:
    name: str
    card: dict[str, Any]
    spec: InputSpec
    backend: Backend
    backend_name: str
    classes: list[str] = field(default_factory=list)

    @property
    def version(self) -> str:
        return self.card["version"]

    def predict(self, images_uint8: np.ndarray) -> np.ndarray:
        """(N, 3, H, W) uint8 at the card's size -> (N, classes) float32 probabilities."""
        return self.backend(normalize(images_uint8, self.spec))


def read_card(folder: Path) -> dict[str, Any]:
    try:
        card = json.loads((folder / "card.json").read_text())
    except FileNotFoundError:
        raise RegistryError(f"{folder}: no card.json") from None
    except json.JSONDecodeError as exc:
        raise RegistryError(f"{folder}/card.json is not valid JSON: {exc}") from None
    for key in ("name", "version", "classes", "input", "artifacts"):
        if key not in card:
            raise RegistryError(f"{folder}/card.json lacks {key!r}")
    return card


def verify_artifact(folder: Path, card: dict[str, Any], fmt: str) -> Path:
    entry = card["artifacts"].get(fmt)
    if entry is None:
        raise RegistryError(f"model {card['name']!r} has no {fmt} artifact in its card")
    path = folder / entry["file"]
    if not path.is_file():
        raise RegistryError(f"model {card['name']!r}: artifact {path} is missing")
    if _already_verified(path, entry["sha256"]):
        return path
    actual = sha256_file(path)
    if actual != entry["sha256"]:
        raise RegistryError(f"model {card['name']!r}: {path.name} sha256 {actual[:12]}... does not match "
                            f"the card's {entry['sha256'][:12]}... (corrupted or replaced artifact)")
    return path


def load_model(folder: Path, backend: str = "onnx", device: str = "auto", threads: int = 0) -> LoadedModel:
    card = read_card(folder)
    if backend not in BACKENDS:
        raise RegistryError(f"unknown backend {backend!r}; choose from {BACKENDS}")
    path = verify_artifact(folder, card, backend)
    runner: Backend = (OnnxBackend if backend == "onnx" else TorchScriptBackend)(path, device, threads)
    return LoadedModel(card["name"], card, InputSpec.from_card(card), runner, backend, list(card["classes"]))


def model_folders(models_dir: Path, names: list[str] | tuple[str, ...] | None = None) -> list[Path]:
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


def servable_entries(models_dir: Path, names: list[str] | tuple[str, ...] | None,
                     backend: str) -> list[tuple[Path, dict[str, Any]]]:
    """(folder, card) of each entry to serve with ``backend``. An entry with no artifact for that
    backend (an INT8 entry is ONNX only) is left out with a warning when the whole registry is
    served, and is an error when it is asked for by name (``IMGCLF_MODELS``)."""
    entries = []
    for folder in model_folders(models_dir, names):
        card = read_card(folder)
        if backend not in card["artifacts"] and not names:
            logger.warning("model %s has no %s artifact; not served with IMGCLF_BACKEND=%s", card["name"],
                           backend, backend)
            continue
        entries.append((folder, card))
    if not entries:
        raise RegistryError(f"no model in {models_dir} has a {backend} artifact")
    return entries


def load_cards(models_dir: Path, names: tuple[str, ...] | None, backend: str,
               default_model: str | None = None) -> dict[str, dict[str, Any]]:
    """Cards of the models to serve, every served artifact's hash checked (once per start, see
    :func:`record_verified`), without loading any runtime (a mismatch raises :class:`RegistryError`).
    ``default_model``, when given, must be among them."""
    cards, checked = {}, {}
    for folder, card in servable_entries(models_dir, names, backend):
        path = verify_artifact(folder, card, backend)
        checked[path] = card["artifacts"][backend]["sha256"]
        cards[card["name"]] = card
    if default_model is not None and default_model not in cards:
        raise RegistryError(f"default model {default_model!r} is not among {sorted(cards)} "
                            "(set IMGCLF_DEFAULT_MODEL)")
    record_verified(checked)
    return cards


def load_registry(models_dir: Path, backend: str = "onnx", device: str = "auto",
                  names: list[str] | None = None, threads: int = 0) -> dict[str, LoadedModel]:
    """Load every model under ``models_dir`` (or just ``names``); any bad artifact is fatal."""
    models = {}
    for folder, _ in servable_entries(models_dir, names, backend):
        model = load_model(folder, backend, device, threads)
        models[model.name] = model
    return models
