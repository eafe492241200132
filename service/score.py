"""Score every image in a folder: in-process (default) or through a running server (``--url``).

    python -m service.score FOLDER --model cifar10 --out predictions.csv   (.csv, .jsonl, .parquet)
    python -m service.score test1/ --model catsdogs --kaggle --out submission.csv

One row per file: relative path, label, probability of the label, one ``p_<class>`` column per class
and the model version. Labeled folders (class subfolders, or Kaggle names like ``cat.12.jpg``) also
get ``<out>.metrics.json`` (accuracy, per-class precision/recall), ``<out>.confusion.txt`` and
``<out>.confusion.png``, named from the whole output name (``p.csv.metrics.json``), so ``p.csv`` and
``p.parquet`` keep their own. Files that cannot be scored go to ``<out>.errors.csv`` with the reason
and make the exit code 1; they never stop the run. The output folder is created before scoring
starts. Outputs are replaced atomically, also on Ctrl-C (what was scored so far is kept, and
``--resume`` skips it next time). A run that cannot start (unknown model, a server that does not
answer, an output that cannot be written, ``--kaggle`` ids that repeat) ends with one ``error:``
line and exit code 2.

In-process scoring decodes in ``--workers`` processes (default ``auto``: cores - 1), each taking a
whole batch, while the model runs on the previous one; ``--workers 0`` decodes in this process.
Only what the backend and device need is imported: ONNX on a host without a CUDA driver never
imports torch.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from service.config import Settings
from service.decode_pool import DecodePool, decode_files, resolve_workers
from service.preprocess import DEFAULT_MAX_PIXELS, ImageError, decode_or_error
from service.registry import LoadedModel, RegistryError, load_model, read_card, verify_artifact

KAGGLE_NAME = re.compile(r"^([A-Za-z]+)\.\d+\.[A-Za-z]+$")


class ScoreError(RuntimeError):
    """A run that cannot start or go on; the command prints it as one ``error:`` line."""


# --- finding files and their labels --------------------------------------------------------------

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
            path = here / entry.name
            try:
                if entry.is_symlink():
                    target = Path(os.path.realpath(path))
                    if not target.is_relative_to(root):
                        continue
                    if entry.is_dir():  # entered unless it loops back to this folder or above
                        if target != real and target not in real.parents:
                            stack.append((path, target))
                    elif entry.is_file():
                        found.append(path)
                elif entry.is_dir(follow_symlinks=False):
                    stack.append((path, real / entry.name))
                elif entry.is_file(follow_symlinks=False):
                    found.append(path)
            except OSError:
                continue
    return sorted(found)


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


# --- what a scorer yields ------------------------------------------------------------------------

@dataclass
class ScoredBatch:
    """One batch: every file's relative path, the probabilities of the files at ``good`` (in
    order, one row each) and ``(index, error, detail)`` for the files that could not be scored."""

    paths: list[str]
    probabilities: np.ndarray
    good: list[int]
    errors: list[tuple[int, str, str]] = field(default_factory=list)


def relative_names(paths: Sequence[Path], root: Path) -> list[str]:
    """``str(p.relative_to(root))`` for paths found under ``root`` by :func:`walk_files`, by slicing."""
    prefix = str(root)
    cut = len(prefix) if prefix.endswith(os.sep) else len(prefix) + 1
    return [str(p)[cut:] for p in paths]


# --- in-process scoring --------------------------------------------------------------------------

def cuda_present() -> bool:
    """Whether the CUDA driver sees a GPU, asked of the driver itself (``cuInit`` and
    ``cuDeviceGetCount`` through ctypes): milliseconds, where importing torch to ask takes seconds."""
    import ctypes

    name = "nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1"
    try:
        driver = ctypes.CDLL(name)
    except OSError:
        return False
    count = ctypes.c_int(0)
    return driver.cuInit(0) == 0 and driver.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0


def resolve_device(device: str) -> str:
    """``auto`` becomes ``cpu`` on a host without a GPU, without importing any framework; the
    registry settles ``auto`` on a GPU host (and ``cuda``/``cpu`` as asked)."""
    return "cpu" if device == "auto" and not cuda_present() else device


def model_folder(models_dir: Path, model: str) -> Path:
    folder = models_dir / model
    if not (folder / "card.json").is_file():
        known = sorted(p.parent.name for p in models_dir.glob("*/card.json")) if models_dir.is_dir() else []
        raise ScoreError(f"model {model!r} not found in {models_dir}"
                         + (f" (available: {', '.join(known)})" if known else " (no models there)"))
    return folder


class PinnedCudaRunner:
    """TorchScript on CUDA: uint8 batches go to the GPU from pinned memory with non-blocking copies
    and are normalised there (4x fewer bytes over PCIe than float32, no CPU arithmetic).

    The arithmetic is the CPU path's, op for op ((x / 255 - mean) / std in float32, dividing by a
    tensor: PyTorch turns division by a Python scalar into a multiplication by its reciprocal), then
    half precision and channels-last, as the registry's backend does.
    """

    def __init__(self, module: Any, mean: Sequence[float], std: Sequence[float], batch_size: int,
                 size: Sequence[int]) -> None:
        import torch

        self.torch, self.module = torch, module
        self.scale = torch.full((1,), 255.0, dtype=torch.float32, device="cuda")
        self.mean = torch.tensor(mean, dtype=torch.float32, device="cuda").view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device="cuda").view(1, 3, 1, 1)
        self.pinned = torch.empty((batch_size, 3, *size), dtype=torch.uint8).pin_memory()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        staging = self.pinned[:len(batch)]
        staging.numpy()[...] = batch
        return self.run_cuda(staging.to("cuda", non_blocking=True))  # .cpu() at the end waits: staging is free

    def run_cuda(self, x: Any) -> np.ndarray:
        """(N, 3, H, W) uint8 CUDA tensor -> (N, classes) float32 probabilities."""
        torch = self.torch
        with torch.inference_mode():
            x = ((x.float() / self.scale - self.mean) / self.std).half()
            x = x.contiguous(memory_format=torch.channels_last)
            return self.module(x).float().cpu().numpy()


class GpuJpegDecoder:
    """``--decode gpu``: the plain JPEGs already at the model's size that the workers handed over
    undecoded are decoded by nvJPEG (``torchvision.io.decode_jpeg(..., device="cuda")``), one call
    per batch, and joined on the GPU with the files the workers decoded.

    nvJPEG's pixels are not libjpeg-turbo's (its IDCT and upsampling round differently), so the
    probabilities differ slightly from ``--decode cpu``'s: it is opt-in, never picked on its own.
    """

    def __init__(self, size: Sequence[int], max_pixels: int) -> None:
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg

        self.torch, self.decode_jpeg, self.rgb = torch, decode_jpeg, ImageReadMode.RGB
        self.size, self.max_pixels = tuple(size), max_pixels

    def assemble(self, batch: Any) -> tuple[Any, list[int], list[tuple[int, str, str]]]:
        """A :class:`~service.decode_pool.DecodedBatch` -> (uint8 CUDA tensor in file order, the
        files' indices, errors)."""
        torch = self.torch
        good, errors = list(batch.good), list(batch.errors)
        parts = [torch.from_numpy(batch.pixels).to("cuda")] if good else []
        blobs = [data for _, data in batch.jpegs]
        try:
            decoded = self.decode_jpeg([torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs],
                                       mode=self.rgb, device="cuda")
            good += [i for i, _ in batch.jpegs]
            parts.append(torch.stack(decoded))
        except RuntimeError:  # a corrupt file in the batch: the CPU decoder sorts them out one by one
            fallback = decode_files(batch.jpegs, self.size, self.max_pixels)
            good += fallback.good
            errors += fallback.errors
            if fallback.good:
                parts.append(torch.from_numpy(fallback.pixels).to("cuda"))
        order = sorted(range(len(good)), key=good.__getitem__)
        images = torch.cat(parts)[torch.tensor(order, device="cuda")] if parts else None
        return images, [good[k] for k in order], sorted(errors)


class LocalScorer:
    """Decode batches in worker processes (:class:`~service.decode_pool.DecodePool`) while the model
    runs on the previous one. ``2 × workers`` batches (at least 2) are in flight, so every worker
    has its next batch queued while the model waits for the oldest one."""

    def __init__(self, models_dir: Path, model: str, backend: str, device: str, batch_size: int,
                 workers: int, max_pixels: int = DEFAULT_MAX_PIXELS, decode: str = "cpu") -> None:
        self.folder = model_folder(models_dir, model)
        self.card = read_card(self.folder)
        self.backend, self.device, self.decode = backend, device, decode
        self.batch_size, self.max_pixels = batch_size, max_pixels
        self.ahead = max(2, 2 * workers)
        # workers first: they fork from a process with no model and no threads yet
        self.pool = DecodePool(workers, self.card["input"]["size"], max_pixels, gpu_jpegs=decode == "gpu",
                               batch_size=batch_size)
        self.model: LoadedModel | None = None
        self.run: Callable[[np.ndarray], np.ndarray] = self._not_loaded
        self.gpu: GpuJpegDecoder | None = None

    @staticmethod
    def _not_loaded(batch: np.ndarray) -> np.ndarray:
        raise RuntimeError("LocalScorer.load() first")

    def load(self) -> None:
        """Load the model (and pick its batch runner); :meth:`score` does it once the first batches
        are decoding, so the two overlap."""
        if self.model is not None:
            return
        try:
            self.model = load_model(self.folder, self.backend, resolve_device(self.device))
        except BaseException:
            self.pool.close(cancel=True)
            raise
        self.run = self.model.predict
        if self.backend == "torchscript" and self.model.backend.device == "cuda":
            spec = self.model.spec
            self.run = PinnedCudaRunner(self.model.backend.module, spec.mean, spec.std, self.batch_size, spec.size)
        if self.decode == "gpu":
            if self.model.backend.device != "cuda":
                self.pool.close(cancel=True)
                raise ScoreError(f"--decode gpu needs the model on a CUDA GPU; it runs on {self.model.backend.device}")
            self.gpu = GpuJpegDecoder(self.model.spec.size, self.max_pixels)

    def _run_cuda(self, images: Any) -> np.ndarray:
        if isinstance(self.run, PinnedCudaRunner):
            return self.run.run_cuda(images)
        return self.run(images.cpu().numpy())  # ONNX Runtime takes host arrays

    def score(self, paths: Sequence[Path], root: Path) -> Iterator[ScoredBatch]:
        """Submit the first batches, load the model, then yield scored batches in order."""
        names = relative_names(paths, root)
        files = [str(p) for p in paths]
        starts = range(0, len(files), self.batch_size)
        pending = deque(self.pool.submit(files[i:i + self.batch_size]) for i in starts[:self.ahead])
        try:
            self.load()
        except BaseException:
            for future in pending:
                future.cancel()
            raise
        return self._batches(files, names, starts, pending)

    def _batches(self, files: list[str], names: list[str], starts: range, pending: deque) -> Iterator[ScoredBatch]:
        try:
            for n, i in enumerate(starts):
                decoded = pending.popleft().result()
                if n + self.ahead < len(starts):
                    j = starts[n + self.ahead]
                    pending.append(self.pool.submit(files[j:j + self.batch_size]))
                if self.gpu is not None and decoded.jpegs:
                    images, good, errors = self.gpu.assemble(decoded)
                    probabilities = self._run_cuda(images) if good else np.empty((0, 0), np.float32)
                    yield ScoredBatch(names[i:i + self.batch_size], probabilities, good, errors)
                    continue
                probabilities = self.run(decoded.pixels) if decoded.good else np.empty((0, 0), np.float32)
                yield ScoredBatch(names[i:i + self.batch_size], probabilities, decoded.good, decoded.errors)
        finally:
            for future in pending:
                future.cancel()

    def close(self, cancel: bool = False) -> None:
        self.pool.close(cancel)


def _batch_from_results(names: list[str], results: Iterable[tuple[np.ndarray | None, str, str]]) -> ScoredBatch:
    """Per-file (probabilities or None, error, detail) -> :class:`ScoredBatch`."""
    good, rows, errors = [], [], []
    for i, (probabilities, error, detail) in enumerate(results):
        if probabilities is None:
            errors.append((i, error, detail))
        else:
            good.append(i)
            rows.append(probabilities)
    return ScoredBatch(names, np.array(rows, dtype=np.float32) if rows else np.empty((0, 0), np.float32),
                       good, errors)


# --- through a running server --------------------------------------------------------------------

class RemoteScorer:
    """POST batches of files to ``/classify_batch`` with bounded concurrency and retries."""

    def __init__(self, url: str, model: str, batch_size: int, concurrency: int, retries: int = 5) -> None:
        import httpx

        self.url = url.rstrip("/")
        self.model = model
        self.batch_size = batch_size
        self.concurrency = concurrency
        self.retries = retries
        try:
            response = httpx.get(f"{self.url}/models/{model}", timeout=30)
        except httpx.HTTPError as exc:
            raise ScoreError(f"{self.url} does not answer ({type(exc).__name__}: {exc})") from None
        if response.status_code != 200:
            raise ScoreError(f"{self.url} does not serve model {model!r} "
                             f"(HTTP {response.status_code}: {' '.join(response.text.split())[:200]})")
        self.card = response.json()

    async def _post(self, client: Any, chunk: Sequence[Path], names: list[str]) -> ScoredBatch:
        import asyncio

        import httpx

        files = [("images", (p.name, p.read_bytes())) for p in chunk]
        for attempt in range(self.retries + 1):
            try:
                response = await client.post(f"{self.url}/classify_batch", files=files,
                                             data={"model": self.model, "top_k": "1"})
                if response.status_code != 503:
                    break
            except httpx.TransportError as exc:
                if attempt == self.retries:
                    raise ScoreError(f"{self.url} stopped answering ({type(exc).__name__}: {exc})") from None
            await asyncio.sleep(min(8.0, 0.25 * 2 ** attempt))
        if response.status_code != 200:
            raise ScoreError(f"{self.url}/classify_batch answered HTTP {response.status_code}: "
                             f"{' '.join(response.text.split())[:200]}")
        classes = self.card["classes"]
        return _batch_from_results(names, (
            (None, r["error"], str(r["detail"])) if "error" in r
            else (np.array([r["probabilities"][c] for c in classes], np.float32), "", "")
            for r in response.json()["results"]))

    def score(self, paths: Sequence[Path], root: Path) -> Iterator[ScoredBatch]:
        import asyncio

        import httpx

        names = relative_names(paths, root)
        starts = range(0, len(paths), self.batch_size)
        queue: asyncio.Queue = asyncio.Queue()

        async def run() -> None:
            limit = asyncio.Semaphore(self.concurrency)
            async with httpx.AsyncClient(timeout=120) as client:
                async def one(i: int) -> ScoredBatch:
                    async with limit:
                        return await self._post(client, paths[i:i + self.batch_size], names[i:i + self.batch_size])
                for done in asyncio.as_completed([one(i) for i in starts]):
                    try:
                        await queue.put(await done)
                    except Exception as exc:  # handed to the caller, which would otherwise wait forever
                        await queue.put(exc if isinstance(exc, ScoreError) else ScoreError(f"{type(exc).__name__}: {exc}"))
                        return

        loop = asyncio.new_event_loop()
        task = loop.create_task(run())
        try:
            for _ in starts:
                item = loop.run_until_complete(queue.get())
                if isinstance(item, ScoreError):
                    raise item
                yield item
            loop.run_until_complete(task)
        finally:
            task.cancel()
            try:
                loop.run_until_complete(task)
            except (asyncio.CancelledError, Exception):
                pass
            loop.close()

    def close(self, cancel: bool = False) -> None:
        pass


# --- on Ray Data ---------------------------------------------------------------------------------

def _ray_decode(batch: dict[str, np.ndarray], size: Sequence[int], max_pixels: int) -> dict[str, np.ndarray]:
    """Ray Data task: bytes -> (3, H, W) uint8 with the service's decoder; failures become rows."""
    n = len(batch["path"])
    pixels = np.zeros((n, 3, *size), dtype=np.uint8)
    errors, details = [""] * n, [""] * n
    for i, data in enumerate(batch["bytes"]):
        result = decode_or_error(bytes(data), size, max_pixels)
        if isinstance(result, ImageError):
            errors[i], details[i] = result.error, result.detail
        else:
            pixels[i] = result
    return {"path": batch["path"], "pixels": pixels, "error": np.array(errors, dtype=object),
            "detail": np.array(details, dtype=object)}


class _RayPredict:
    """Ray Data actor: loads the model once, then scores batches (on a GPU when Ray gives it one)."""

    def __init__(self, model_dir: str, backend: str, device: str) -> None:
        self.model = load_model(Path(model_dir), backend, device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = batch["error"] == ""
        probabilities = np.zeros((len(ok), len(self.model.classes)), dtype=np.float32)
        if ok.any():
            probabilities[ok] = self.model.predict(batch["pixels"][ok])
        return {"path": batch["path"], "probabilities": probabilities, "error": batch["error"],
                "detail": batch["detail"]}


class RayScorer:
    """The same scoring on Ray Data: ``read_binary_files`` -> decode tasks -> model actor pool.

    ``ray.init()`` joins the cluster named by ``RAY_ADDRESS`` when set, else starts a local Ray.
    Files are read as bytes and decoded by the service's own decoder (not ``read_images``), so
    preprocessing is identical to the API's and a bad file becomes an error row, not a failed job.
    """

    def __init__(self, models_dir: Path, model: str, backend: str, device: str, batch_size: int,
                 actors: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        import ray

        self.model_dir = model_folder(models_dir, model)
        self.card = read_card(self.model_dir)
        verify_artifact(self.model_dir, self.card, backend)  # fail here, not inside every actor
        if not ray.is_initialized():
            ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
        self.backend, self.device = backend, device
        self.batch_size, self.actors, self.max_pixels = batch_size, actors, max_pixels

    def score(self, paths: Sequence[Path], root: Path) -> Iterator[ScoredBatch]:
        import ray

        gpus = ray.cluster_resources().get("GPU", 0)
        ds = ray.data.read_binary_files([str(p) for p in paths], include_paths=True)
        # decoding runs as stateless tasks on any free CPU; the model lives in a pool of actors
        ds = ds.map_batches(_ray_decode, fn_kwargs={"size": self.card["input"]["size"], "max_pixels": self.max_pixels},
                            batch_size=self.batch_size, batch_format="numpy")
        ds = ds.map_batches(_RayPredict, fn_constructor_kwargs={
                                "model_dir": str(self.model_dir), "backend": self.backend,
                                "device": "cuda" if gpus else "cpu"},
                            batch_size=self.batch_size, concurrency=self.actors,
                            num_gpus=1 if gpus else 0, batch_format="numpy")
        for batch in ds.iter_batches(batch_size=self.batch_size, batch_format="numpy"):
            names = [str(Path(p).relative_to(root)) for p in batch["path"]]
            yield _batch_from_results(names, (
                (None, str(error), str(detail)) if error else (probabilities, "", "")
                for probabilities, error, detail in zip(batch["probabilities"], batch["error"], batch["detail"])))

    def close(self, cancel: bool = False) -> None:
        pass


# --- outputs -------------------------------------------------------------------------------------

def side_file(out: Path, suffix: str) -> Path:
    """``p.csv`` -> ``p.csv<suffix>``: side files named from the whole output name, so outputs that
    differ only in format do not overwrite each other's."""
    return out.with_name(out.name + suffix)


def prepare_output(out: Path) -> None:
    """Create the output's folder and check that it can be written, before any scoring."""
    folder = out.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ScoreError(f"cannot create the output folder {folder} ({type(exc).__name__}: {exc.strerror or exc})") from None
    if out.is_dir():
        raise ScoreError(f"--out {out} is a folder; give a file name ending in .csv, .jsonl or .parquet")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ScoreError(f"cannot write to the output folder {folder} (permission denied)")


def read_existing(out: Path) -> list[dict[str, Any]]:
    if not out.exists():
        return []
    if out.suffix == ".jsonl":
        return [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    if out.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(out).to_pylist()
    import csv

    with open(out, newline="") as handle:
        return list(csv.DictReader(handle))


def write_atomic(out: Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    tmp = out.with_name(f".{out.name}.tmp")
    if out.suffix == ".jsonl":
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif out.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), tmp)
    else:
        import csv

        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
    os.replace(tmp, out)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def evaluate(rows: list[dict[str, Any]], classes: list[str]) -> dict[str, Any] | None:
    labeled = [r for r in rows if r.get("true_label")]
    if not labeled:
        return None
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


def kaggle_id(relative: str) -> int | str:
    stem = Path(relative).stem
    return int(stem) if stem.isdigit() else stem


def check_kaggle_ids(names: Sequence[str]) -> None:
    """Refuse a layout whose files would share an id (``cat/0.jpg`` and ``dog/0.jpg`` are both id 0):
    a submission with repeated ids is wrong, and inventing ids would be wrong too."""
    seen: dict[int | str, str] = {}
    clashes: list[tuple[str, str, int | str]] = []
    for name in names:
        key = kaggle_id(name)
        if key in seen:
            clashes.append((seen[key], name, key))
        else:
            seen[key] = name
    if clashes:
        first, second, key = clashes[0]
        raise ScoreError(f"--kaggle needs one file per id, but {first} and {second} are both id {key!r} "
                         f"({len(clashes)} files repeat an id); score a flat folder such as Kaggle's test1/, "
                         "or drop --kaggle")


def kaggle_rows(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The seed competition's submission: ``id,label`` with label = probability of dog."""
    out = [{"id": kaggle_id(r["path"]), "label": r["p_dog"]} for r in rows]
    return sorted(out, key=lambda r: (isinstance(r["id"], str), r["id"]))


def batch_rows(batch: ScoredBatch, classes: list[str], version: str, labels: LabelFinder) -> list[dict[str, Any]]:
    """Output rows of a batch's scored files (one numpy call per batch, not per row)."""
    columns = [f"p_{c}" for c in classes]
    best = batch.probabilities.argmax(1).tolist() if batch.good else []
    values = batch.probabilities.tolist()
    rows = []
    for i, b, p in zip(batch.good, best, values):
        path = batch.paths[i]
        rows.append({"path": path, "label": classes[b], "probability": p[b], **dict(zip(columns, p)),
                     "true_label": labels(path) or "", "model_version": version})
    return rows


# --- the command ---------------------------------------------------------------------------------

def make_parser(settings: Settings) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--model", default=settings.default_model)
    parser.add_argument("--out", type=Path, required=True, help=".csv, .jsonl or .parquet (its folder is created)")
    parser.add_argument("--kaggle", action="store_true", help="write id,label (probability of dog)")
    parser.add_argument("--resume", action="store_true", help="skip files already in --out")
    parser.add_argument("--url", help="score through a running server instead of in-process")
    parser.add_argument("--engine", choices=["local", "ray"], default="local",
                        help="ray: Ray Data (a local Ray, or the cluster in RAY_ADDRESS)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", default="auto",
                        help="decode processes: auto (cores - 1, at least 1), or N; 0 decodes in this process")
    parser.add_argument("--decode", choices=["cpu", "gpu"], default="cpu",
                        help="gpu: nvJPEG for plain JPEGs at the model's size (CUDA; probabilities differ "
                             "slightly from cpu's libjpeg-turbo pixels)")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight with --url")
    parser.add_argument("--actors", type=int, default=1, help="model replicas with --engine ray")
    parser.add_argument("--backend", default=settings.backend, choices=["onnx", "torchscript"])
    parser.add_argument("--device", default=settings.device, choices=["auto", "cpu", "cuda"])
    parser.add_argument("--models-dir", type=Path, default=settings.models_dir)
    return parser


def main(argv: list[str] | None = None) -> int:
    settings = Settings.from_env()
    parser = make_parser(settings)
    args = parser.parse_args(argv)
    if not args.folder.is_dir():
        parser.error(f"{args.folder} is not a folder")
    if args.out.suffix not in (".csv", ".jsonl", ".parquet"):
        parser.error("--out must end in .csv, .jsonl or .parquet")
    if args.kaggle and args.resume:
        parser.error("--kaggle and --resume do not combine; resume a full-output run, then use --kaggle")
    try:
        args.workers = resolve_workers(args.workers)
    except ValueError:
        parser.error(f"--workers must be auto or a number >= 0, not {args.workers!r}")
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    try:
        return run(args, settings)
    except (ScoreError, RegistryError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def make_scorer(args: argparse.Namespace, settings: Settings) -> Any:
    if args.url:
        return RemoteScorer(args.url, args.model, min(args.batch_size, settings.max_files), args.concurrency)
    if args.engine == "ray":
        return RayScorer(args.models_dir, args.model, args.backend, args.device, args.batch_size,
                         args.actors, settings.max_pixels)
    return LocalScorer(args.models_dir, args.model, args.backend, args.device, args.batch_size,
                       args.workers, settings.max_pixels, args.decode)


def run(args: argparse.Namespace, settings: Settings) -> int:
    prepare_output(args.out)
    if not args.url:
        card = read_card(model_folder(args.models_dir, args.model))  # an unknown model fails here
        if args.kaggle and "dog" not in card["classes"]:
            raise ScoreError(f"--kaggle needs a model with a 'dog' class; {args.model} has {card['classes']}")
    root = args.folder.resolve()
    previous = read_existing(args.out) if args.resume else []
    done = {r["path"] for r in previous}
    found = walk_files(root)
    names = relative_names(found, root)
    todo = [p for p, name in zip(found, names) if name not in done]
    if args.kaggle:
        check_kaggle_ids(names)

    scorer = make_scorer(args, settings)
    card = scorer.card
    classes: list[str] = card["classes"]
    if args.kaggle and "dog" not in classes:
        scorer.close(cancel=True)
        raise ScoreError(f"--kaggle needs a model with a 'dog' class; {args.model} has {classes}")
    columns = ["path", "label", "probability", *[f"p_{c}" for c in classes], "true_label", "model_version"]
    labels = LabelFinder(classes)
    rows, errors = list(previous), []
    interrupted, failure = False, None
    try:
        batches = scorer.score(todo, root)  # local: the first batches decode while the model loads
    except BaseException:
        scorer.close(cancel=True)
        raise
    started = time.perf_counter()  # the rate reported is from model ready to the last batch
    from tqdm import tqdm

    bar = tqdm(total=len(todo), unit="img", desc=f"scoring {args.folder}", file=sys.stderr, smoothing=0.1,
               mininterval=1.0)
    try:
        for batch in batches:
            rows.extend(batch_rows(batch, classes, card["version"], labels))
            errors.extend({"path": batch.paths[i], "error": error, "detail": detail}
                          for i, error, detail in batch.errors)
            bar.update(len(batch.paths))
    except KeyboardInterrupt:
        interrupted = True
    except ScoreError as exc:
        failure = exc
    except Exception as exc:  # a decode worker that died (BrokenProcessPool), a full disk, ...
        failure = ScoreError(f"{type(exc).__name__}: {exc}")
    finally:
        bar.close()
        scorer.close(cancel=interrupted or failure is not None)
    seconds = time.perf_counter() - started
    rows.sort(key=lambda r: r["path"])
    if args.kaggle:
        write_atomic(args.out, kaggle_rows(rows), ["id", "label"])
    else:
        write_atomic(args.out, rows, columns)
    errors_path = side_file(args.out, ".errors.csv")
    if errors:
        errors.sort(key=lambda r: r["path"])
        write_atomic(errors_path, errors, ["path", "error", "detail"])
    elif errors_path.exists() and not args.resume:
        errors_path.unlink()
    metrics = evaluate(rows, classes)
    if metrics:
        metrics.update(model=args.model, model_version=card["version"])
        write_text_atomic(side_file(args.out, ".metrics.json"), json.dumps(metrics, indent=2))
        write_confusion(metrics, args.out, f"{args.model} v{card['version']} on {args.folder.name}")
    scored = len(rows) - len(previous)
    summary = (f"scored {scored} images in {seconds:.1f}s ({scored / max(seconds, 1e-9):.0f} images/s), "
               f"{len(errors)} failed -> {args.out}")
    if metrics:
        summary += f"; accuracy {metrics['accuracy']:.4f} on {metrics['images']} labeled images"
    print(summary, file=sys.stderr)
    if errors:
        print(f"failures listed in {errors_path}", file=sys.stderr)
    if failure is not None:
        print(f"error: {failure}; the scored rows were kept: rerun with --resume to finish", file=sys.stderr)
        return 1
    if interrupted:
        print("interrupted: scored rows were kept; rerun with --resume to finish", file=sys.stderr)
        return 130
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
