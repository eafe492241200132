"""Score every image in a folder: in-process (default) or through a running server (``--url``).

    python -m service.score FOLDER --model cifar10 --out predictions.csv   (.csv, .jsonl, .parquet)
    python -m service.score test1/ --model catsdogs --kaggle --out submission.csv

One row per file: relative path, label, probability of the label, one ``p_<class>`` column per class
and the model version. Labeled folders (class subfolders, or Kaggle names like ``cat.12.jpg``) also
get ``<out>.metrics.json`` (accuracy, per-class precision/recall), ``<out>.confusion.txt`` and
``<out>.confusion.png``. Files that cannot be scored go to ``<out>.errors.csv`` with the reason and
make the exit code 1; they never stop the run. Outputs are replaced atomically, also on Ctrl-C
(what was scored so far is kept, and ``--resume`` skips it next time).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from service.config import Settings
from service.preprocess import DEFAULT_MAX_PIXELS, ImageError, decode_jpegs_at_size, decode_or_error
from service.registry import load_model, read_card, verify_artifact

KAGGLE_NAME = re.compile(r"^([A-Za-z]+)\.\d+\.[A-Za-z]+$")


# --- finding files and their labels --------------------------------------------------------------

def walk_files(root: Path) -> list[Path]:
    """Every regular file under ``root`` (sorted), following no link that leads outside it."""
    root = root.resolve()
    found: list[Path] = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        here = Path(folder)
        # a symlinked folder is entered only if it resolves inside root (and is not a loop back up)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and _inside(here / d, root)
                         and not (here / d).resolve() in (here.resolve(), *here.resolve().parents))
        for name in files:
            path = here / name
            if not name.startswith(".") and _inside(path, root) and path.is_file():
                found.append(path)
    return sorted(found)


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root)
        return True
    except ValueError:
        return False


def true_label(relative: Path, classes: Sequence[str]) -> str | None:
    """Label from a class folder (``dogs/x.jpg``) or a Kaggle name (``dog.12.jpg``), else None."""
    lookup = {c.lower(): c for c in classes}
    for part in relative.parts[:-1]:
        key = part.lower()
        if key in lookup or (key.endswith("s") and key[:-1] in lookup):
            return lookup.get(key) or lookup[key[:-1]]
    match = KAGGLE_NAME.match(relative.name)
    return lookup.get(match.group(1).lower()) if match else None


# --- scorers -------------------------------------------------------------------------------------

@dataclass
class Scored:
    path: str
    probabilities: np.ndarray | None = None
    error: str | None = None
    detail: str | None = None


class LocalScorer:
    """Decode whole chunks in a thread pool while the model runs on the previous batch; plain JPEGs
    at the model's size go through batched libjpeg-turbo, everything else through Pillow."""

    def __init__(self, models_dir: Path, model: str, backend: str, device: str, batch_size: int,
                 workers: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.model = load_model(models_dir / model, backend, device)
        self.card = self.model.card
        self.batch_size = batch_size
        self.max_pixels = max_pixels
        self.workers = workers
        self.pool = ThreadPoolExecutor(workers)
        import torchvision.io  # noqa: F401  (imported here, not in the first decode task: ~2 s)

    def _decode_chunk(self, paths: Sequence[Path]) -> list[np.ndarray | ImageError]:
        size = self.card["input"]["size"]
        blobs: list[bytes | ImageError] = []
        for path in paths:
            try:
                blobs.append(path.read_bytes())
            except OSError as exc:
                blobs.append(ImageError("unreadable_file", f"{type(exc).__name__}: {exc}"))
        readable = [b for b in blobs if isinstance(b, bytes)]
        fast = iter(decode_jpegs_at_size(readable, size))
        out: list[np.ndarray | ImageError] = []
        for blob in blobs:
            if isinstance(blob, ImageError):
                out.append(blob)
            else:
                pixels = next(fast)
                out.append(pixels if pixels is not None else decode_or_error(blob, size, self.max_pixels))
        return out

    def score(self, paths: Sequence[Path], root: Path) -> Iterator[list[Scored]]:
        chunks = [paths[i:i + self.batch_size] for i in range(0, len(paths), self.batch_size)]
        ahead = max(2, self.workers)  # chunks decoding while the model runs
        pending = [self.pool.submit(self._decode_chunk, chunk) for chunk in chunks[:ahead]]
        for i, chunk in enumerate(chunks):
            decoded = pending.pop(0).result()
            if i + ahead < len(chunks):
                pending.append(self.pool.submit(self._decode_chunk, chunks[i + ahead]))
            good = [j for j, d in enumerate(decoded) if isinstance(d, np.ndarray)]
            probabilities = self.model.predict(np.stack([decoded[j] for j in good])) if good else []
            rows = [Scored(str(p.relative_to(root))) for p in chunk]
            for j, prob in zip(good, probabilities):
                rows[j].probabilities = prob
            for j, d in enumerate(decoded):
                if isinstance(d, ImageError):
                    rows[j].error, rows[j].detail = d.error, d.detail
            yield rows


class RemoteScorer:
    """POST batches of files to ``/classify_batch`` with bounded concurrency and retries."""

    def __init__(self, url: str, model: str, batch_size: int, concurrency: int, retries: int = 5) -> None:
        import httpx

        self.url = url.rstrip("/")
        self.model = model
        self.batch_size = batch_size
        self.concurrency = concurrency
        self.retries = retries
        response = httpx.get(f"{self.url}/models/{model}", timeout=30)
        if response.status_code != 200:
            raise SystemExit(f"error: {self.url} does not serve model {model!r}: {response.text}")
        self.card = response.json()

    async def _post(self, client, chunk: Sequence[Path], root: Path) -> list[Scored]:
        import httpx

        files = [("images", (p.name, p.read_bytes())) for p in chunk]
        for attempt in range(self.retries + 1):
            try:
                response = await client.post(f"{self.url}/classify_batch", files=files,
                                             data={"model": self.model, "top_k": "1"})
                if response.status_code != 503:
                    break
            except httpx.TransportError:
                if attempt == self.retries:
                    raise
            await asyncio.sleep(min(8.0, 0.25 * 2 ** attempt))
        response.raise_for_status()
        classes = self.card["classes"]
        rows = []
        for path, result in zip(chunk, response.json()["results"]):
            row = Scored(str(path.relative_to(root)))
            if "error" in result:
                row.error, row.detail = result["error"], str(result["detail"])
            else:
                row.probabilities = np.array([result["probabilities"][c] for c in classes], np.float32)
            rows.append(row)
        return rows

    def score(self, paths: Sequence[Path], root: Path) -> Iterator[list[Scored]]:
        import httpx

        chunks = [paths[i:i + self.batch_size] for i in range(0, len(paths), self.batch_size)]
        queue: asyncio.Queue = asyncio.Queue()

        async def run() -> None:
            limit = asyncio.Semaphore(self.concurrency)
            async with httpx.AsyncClient(timeout=120) as client:
                async def one(chunk):
                    async with limit:
                        return await self._post(client, chunk, root)
                for done in asyncio.as_completed([one(c) for c in chunks]):
                    await queue.put(await done)

        loop = asyncio.new_event_loop()
        task = loop.create_task(run())
        for _ in chunks:
            yield loop.run_until_complete(queue.get())
        loop.run_until_complete(task)
        loop.close()


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

        if not ray.is_initialized():
            ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
        self.model_dir = models_dir / model
        self.card = read_card(self.model_dir)
        verify_artifact(self.model_dir, self.card, backend)  # fail here, not inside every actor
        self.backend, self.device = backend, device
        self.batch_size, self.actors, self.max_pixels = batch_size, actors, max_pixels

    def score(self, paths: Sequence[Path], root: Path) -> Iterator[list[Scored]]:
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
            rows = []
            for path, probabilities, error, detail in zip(batch["path"], batch["probabilities"],
                                                          batch["error"], batch["detail"]):
                row = Scored(str(Path(path).relative_to(root)))
                if error:
                    row.error, row.detail = str(error), str(detail)
                else:
                    row.probabilities = probabilities
                rows.append(row)
            yield rows


# --- outputs -------------------------------------------------------------------------------------

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


def write_confusion(metrics: dict[str, Any], out: Path, title: str) -> None:
    classes, confusion = metrics["classes"], np.array(metrics["confusion"])
    width = max(len(c) for c in classes) + 1
    lines = [f"accuracy {metrics['accuracy']:.4f} on {metrics['images']} labeled images",
             "rows: true label, columns: predicted", " " * width + "".join(f"{c[:7]:>8}" for c in classes)]
    lines += [f"{c:<{width}}" + "".join(f"{v:>8}" for v in row) for c, row in zip(classes, confusion)]
    out.with_suffix(".confusion.txt").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = 2.5 + 0.55 * len(classes)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set(xlabel="predicted", ylabel="true", title=f"{title}\naccuracy {100 * metrics['accuracy']:.2f}%")
    for (i, j), v in np.ndenumerate(confusion):
        ax.text(j, i, str(v), ha="center", va="center", fontsize=8,
                color="white" if v > confusion.max() / 2 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".confusion.png"), dpi=110)
    plt.close(fig)


def kaggle_rows(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The seed competition's submission: ``id,label`` with label = probability of dog."""
    out = []
    for r in rows:
        stem = Path(r["path"]).stem
        out.append({"id": int(stem) if stem.isdigit() else stem, "label": r["p_dog"]})
    return sorted(out, key=lambda r: (isinstance(r["id"], str), r["id"]))


# --- the command ---------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    settings = Settings.from_env()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--model", default=settings.default_model)
    parser.add_argument("--out", type=Path, required=True, help=".csv, .jsonl or .parquet")
    parser.add_argument("--kaggle", action="store_true", help="write id,label (probability of dog)")
    parser.add_argument("--resume", action="store_true", help="skip files already in --out")
    parser.add_argument("--url", help="score through a running server instead of in-process")
    parser.add_argument("--engine", choices=["local", "ray"], default="local",
                        help="ray: Ray Data (a local Ray, or the cluster in RAY_ADDRESS)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                        help="decode threads (one core is left to the model)")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight with --url")
    parser.add_argument("--actors", type=int, default=1, help="model replicas with --engine ray")
    parser.add_argument("--backend", default=settings.backend, choices=["onnx", "torchscript"])
    parser.add_argument("--device", default=settings.device)
    parser.add_argument("--models-dir", type=Path, default=settings.models_dir)
    args = parser.parse_args(argv)

    if not args.folder.is_dir():
        parser.error(f"{args.folder} is not a folder")
    if args.out.suffix not in (".csv", ".jsonl", ".parquet"):
        parser.error("--out must end in .csv, .jsonl or .parquet")
    if args.kaggle and args.resume:
        parser.error("--kaggle and --resume do not combine; resume a full-output run, then use --kaggle")
    if args.url:
        scorer: Any = RemoteScorer(args.url, args.model, min(args.batch_size, settings.max_files),
                                   args.concurrency)
    elif args.engine == "ray":
        scorer = RayScorer(args.models_dir, args.model, args.backend, args.device, args.batch_size,
                           args.actors, settings.max_pixels)
    else:
        scorer = LocalScorer(args.models_dir, args.model, args.backend, args.device, args.batch_size,
                             args.workers, settings.max_pixels)
    card = scorer.card
    classes: list[str] = card["classes"]
    if args.kaggle and "dog" not in classes:
        parser.error(f"--kaggle needs a model with a 'dog' class; {args.model} has {classes}")

    root = args.folder.resolve()
    previous = read_existing(args.out) if args.resume else []
    done = {r["path"] for r in previous}
    todo = [p for p in walk_files(root) if str(p.relative_to(root)) not in done]
    columns = ["path", "label", "probability", *[f"p_{c}" for c in classes], "true_label", "model_version"]
    rows, errors = list(previous), []
    interrupted = False
    started = time.perf_counter()
    bar = tqdm(total=len(todo), unit="img", desc=f"scoring {args.folder}", file=sys.stderr, smoothing=0.1, mininterval=1.0)
    try:
        for batch in scorer.score(todo, root):
            for s in batch:
                if s.probabilities is None:
                    errors.append({"path": s.path, "error": s.error, "detail": s.detail})
                    continue
                best = int(np.argmax(s.probabilities))
                rows.append({"path": s.path, "label": classes[best], "probability": float(s.probabilities[best]),
                             **{f"p_{c}": float(p) for c, p in zip(classes, s.probabilities)},
                             "true_label": true_label(Path(s.path), classes) or "",
                             "model_version": card["version"]})
            bar.update(len(batch))
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
    seconds = time.perf_counter() - started
    rows.sort(key=lambda r: r["path"])
    if args.kaggle:
        write_atomic(args.out, kaggle_rows(rows), ["id", "label"])
    else:
        write_atomic(args.out, rows, columns)
    errors_path = args.out.with_name(args.out.stem + ".errors.csv")
    if errors:
        write_atomic(errors_path, errors, ["path", "error", "detail"])
    elif errors_path.exists() and not args.resume:
        errors_path.unlink()
    metrics = evaluate(rows, classes)
    if metrics:
        metrics.update(model=args.model, model_version=card["version"])
        metrics_path = args.out.with_suffix(".metrics.json")
        metrics_path.with_name(f".{metrics_path.name}.tmp").write_text(json.dumps(metrics, indent=2))
        os.replace(metrics_path.with_name(f".{metrics_path.name}.tmp"), metrics_path)
        write_confusion(metrics, args.out, f"{args.model} v{card['version']} on {args.folder.name}")
    scored = len(rows) - len(previous)
    summary = (f"scored {scored} images in {seconds:.1f}s ({scored / max(seconds, 1e-9):.0f} images/s), "
               f"{len(errors)} failed -> {args.out}")
    if metrics:
        summary += f"; accuracy {metrics['accuracy']:.4f} on {metrics['images']} labeled images"
    print(summary, file=sys.stderr)
    if errors:
        print(f"failures listed in {errors_path}", file=sys.stderr)
    if interrupted:
        print("interrupted: scored rows were kept; rerun with --resume to finish", file=sys.stderr)
        return 130
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
