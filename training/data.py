"""Datasets as whole uint8 tensors, plus tensor-op augmentation (the airbench data path).

Sources, in the order they are tried:
  * CIFAR-10: a JPEG class-folder archive (``cifar10-jpeg.tar.gz``) or folder, or torchvision's
    ``CIFAR10`` (``--download`` fetches it when the machine has internet).
  * Cats vs dogs: Kaggle's flat layout (``train/cat.N.jpg``), the full Kaggle download (a folder
    holding ``train/``), or ordinary class folders (``cats/``, ``dogs/``).

Archives are extracted once into the cache directory (``$IMGCLF_CACHE``, default
``~/.cache/imgclf``), never into the repository. Decoded tensors are cached there too, keyed by
the source's content hash, so a second run starts in a second.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tarfile
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from service.config import host_cores
from service.pipeline import decode_batch
from service.registry import sha256_file

REPO_ROOT = Path(__file__).resolve().parent.parent
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
CATSDOGS_CLASSES = ("cat", "dog")
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def cache_dir() -> Path:
    path = Path(os.environ.get("IMGCLF_CACHE", Path.home() / ".cache" / "imgclf"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def shared_datasets_dir() -> Path:
    """Where this project's machines keep the dataset archives (``../shared/datasets``)."""
    return Path(os.environ.get("IMGCLF_DATASETS", REPO_ROOT.parent / "shared" / "datasets"))


def plain_members(tar: tarfile.TarFile) -> list[tarfile.TarInfo]:
    """The archive's files and folders, refusing what the "data" extraction filter refuses:
    absolute paths, paths that climb out, links and device files."""
    members = tar.getmembers()
    for member in members:
        parts = Path(member.name).parts
        if member.name.startswith("/") or ".." in parts or not (member.isfile() or member.isdir()):
            raise ValueError(f"{tar.name}: refusing archive member {member.name!r}")
    return members


def extract_archive(archive: Path) -> Path:
    """Extract a .tar.gz once into the cache; return the extraction folder."""
    digest = sha256_file(archive)
    target = cache_dir() / f"{archive.name.split('.')[0]}-{digest[:12]}"
    if (target / ".complete").exists():
        return target
    staging = Path(tempfile.mkdtemp(dir=cache_dir(), prefix=".extract-"))
    staging.chmod(0o755)
    try:
        with tarfile.open(archive) as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(staging, filter="data")  # "data" refuses absolute paths and links out
            else:  # Pythons before 3.10.12 / 3.11.4 (a GPU host's): the same refusals, by hand
                tar.extractall(staging, members=plain_members(tar))
        (staging / ".complete").write_text(digest)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)  # atomic: a half-extracted folder is never mistaken for a whole one
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


@dataclass
class ImageSet:
    """A split held as one tensor: images (N, 3, H, W) uint8, labels (N,) int64."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> "ImageSet":
        return ImageSet(self.images[index], self.labels[index], self.classes)

    def to(self, device: torch.device) -> "ImageSet":
        """The same split on ``device`` (training moves each split there once, airbench-style)."""
        return ImageSet(self.images.to(device), self.labels.to(device), self.classes)


@dataclass
class Dataset:
    name: str
    train: ImageSet
    val: ImageSet
    test: ImageSet
    fingerprint: str  # sha256 over the decoded pixels and labels of train, val and test, in order
    source: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    split: str  # how train/val/test were made, for the model card
    indices: dict[str, torch.Tensor]  # each split's positions in the decoded source (disjointness)


def fingerprint(*sets: ImageSet) -> str:
    digest = hashlib.sha256()
    for part in sets:
        digest.update(part.images.contiguous().numpy().tobytes())
        digest.update(part.labels.numpy().astype("<i8").tobytes())
    return digest.hexdigest()


class DatasetDecodeError(ValueError):
    """A training dataset holds a file that cannot be decoded (named in the message): training
    refuses the dataset rather than silently drop the image."""


def decode_files(paths: Sequence[Path], size: Sequence[int], workers: int | None = None,
                 chunk: int = 256) -> torch.Tensor:
    """Decode image files into (N, 3, H, W) uint8 through the one image pipeline
    (:func:`service.pipeline.decode_batch`: the pixels the service computes for the same file),
    one chunk of ``chunk`` files per call on a thread pool (Pillow releases the GIL). A file that
    cannot be decoded raises :class:`DatasetDecodeError` with its name."""
    out = np.empty((len(paths), 3, *size), dtype=np.uint8)

    def decode_chunk(start: int) -> None:
        part = paths[start:start + chunk]
        decoded = decode_batch(part, size, out=out[start:start + len(part)])
        if decoded.errors:
            index, error = decoded.errors[0]
            raise DatasetDecodeError(f"{part[index]}: {error}") from error

    with ThreadPoolExecutor(workers or host_cores()) as pool:
        list(pool.map(decode_chunk, range(0, len(paths), chunk)))
    return torch.from_numpy(out)


def read_class_folders(root: Path, classes: Sequence[str], size: Sequence[int]) -> ImageSet:
    """``root/<class>/*.jpg`` with class names matched case-insensitively, plural 's' allowed."""
    paths, labels = [], []
    wanted = {name.lower(): i for i, name in enumerate(classes)}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        key = folder.name.lower()
        label = wanted.get(key, wanted.get(key[:-1]) if key.endswith("s") else None)
        if label is None:
            continue
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        paths += files
        labels += [label] * len(files)
    if not paths:
        raise FileNotFoundError(f"no class folders named {list(classes)} with images under {root}")
    return ImageSet(decode_files(paths, size), torch.tensor(labels), tuple(classes))


def _cached(key: str, build) -> dict[str, torch.Tensor]:
    path = cache_dir() / f"{key}.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    tensors = build()
    tmp = path.with_suffix(".tmp")
    torch.save(tensors, tmp)
    tmp.rename(path)
    return tensors


def seeded_permutation(n: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def seeded_sample(data: "ImageSet", limit: int) -> "ImageSet":
    """The first ``limit`` images of a seed-0 shuffle of ``data`` (all of it when ``limit`` is 0 or
    larger): ``--limit-eval``'s sample, since the official test split is stored class by class."""
    return data.subset(seeded_permutation(len(data), 0)[:limit]) if 0 < limit < len(data) else data


def _locate_cifar10(root: Path | None) -> tuple[Path, str] | None:
    """Return (folder holding train/ and test/, cache key), or None to use torchvision."""
    path = root or shared_datasets_dir() / "cifar10-jpeg.tar.gz"
    if not path.exists():
        return None
    if path.is_file():
        path = extract_archive(path)  # folder name carries the archive's hash
        key = path.name
    else:
        key = "dir-" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    folder = path / "cifar10-jpeg" if (path / "cifar10-jpeg").is_dir() else path
    return (folder, key) if (folder / "train").is_dir() else None


def load_cifar10(root: Path | None = None, download: bool = False, val_size: int = 10_000,
                 seed: int = 0) -> Dataset:
    """CIFAR-10 with a seeded train/val split (40k/10k by default) and the official test split."""
    located = None if download else _locate_cifar10(root)
    if located is not None:
        folder, key = located
        source = f"JPEG class folders at {folder}"

        def build() -> dict[str, torch.Tensor]:
            train = read_class_folders(folder / "train", CIFAR10_CLASSES, (32, 32))
            test = read_class_folders(folder / "test", CIFAR10_CLASSES, (32, 32))
            return {"train_x": train.images, "train_y": train.labels,
                    "test_x": test.images, "test_y": test.labels}

        key = f"cifar10-{key}"
    else:
        import torchvision  # only this path needs it

        tv_root = (root or cache_dir() / "torchvision")
        source = f"torchvision.datasets.CIFAR10 at {tv_root}"

        def build() -> dict[str, torch.Tensor]:
            out = {}
            for split, train in (("train", True), ("test", False)):
                ds = torchvision.datasets.CIFAR10(str(tv_root), train=train, download=download)
                out[f"{split}_x"] = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
                out[f"{split}_y"] = torch.tensor(ds.targets)
            return out

        key = "cifar10-torchvision"
    t = _cached(key, build)
    full = ImageSet(t["train_x"], t["train_y"], CIFAR10_CLASSES)
    test = ImageSet(t["test_x"], t["test_y"], CIFAR10_CLASSES)
    perm = seeded_permutation(len(full), seed)
    train, val = full.subset(perm[val_size:]), full.subset(perm[:val_size])
    return Dataset("cifar10", train, val, test, fingerprint(train, val, test), source,
                   CIFAR10_MEAN, CIFAR10_STD,
                   f"official train split shuffled with seed {seed}: {len(train)} train / "
                   f"{len(val)} validation; official {len(test)}-image test split for the final number",
                   {"train": perm[val_size:], "val": perm[:val_size],
                    "test": len(full) + torch.arange(len(test))})


# --- cats vs dogs --------------------------------------------------------------------------------

KAGGLE_NAME = re.compile(r"^(cat|dog)\.(\d+)\.(jpe?g|png)$", re.IGNORECASE)


def scan_catsdogs(root: Path) -> tuple[list[Path], list[int]]:
    """Find labeled cat/dog images in any of the three supported layouts."""
    if (root / "train").is_dir() and not any(KAGGLE_NAME.match(p.name) for p in root.iterdir()):
        root = root / "train"  # the Kaggle download (or our archive): labeled files live in train/
    files = sorted(p for p in root.iterdir() if p.is_file() and KAGGLE_NAME.match(p.name))
    if files:
        labels = [CATSDOGS_CLASSES.index(KAGGLE_NAME.match(p.name).group(1).lower()) for p in files]
        return files, labels
    paths, labels = [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        name = folder.name.lower().rstrip("s")
        if name in CATSDOGS_CLASSES:
            found = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            paths += found
            labels += [CATSDOGS_CLASSES.index(name)] * len(found)
    if not paths:
        raise FileNotFoundError(
            f"no cat/dog images under {root}: expected Kaggle names (cat.0.jpg), a train/ folder "
            "holding them, or class folders cats/ and dogs/")
    return paths, labels


def locate_catsdogs(root: Path | None) -> Path:
    path = root or shared_datasets_dir() / "catsdogs.tar.gz"
    if not path.exists():
        raise FileNotFoundError(f"cats-vs-dogs data not found at {path}; pass --data-root")
    if path.is_file():
        path = extract_archive(path)
    return path / "catsdogs" if (path / "catsdogs").is_dir() else path


def load_catsdogs(root: Path | None = None, size: int = 96, val_fraction: float = 0.1,
                  test_fraction: float = 0.1, seed: int = 0) -> Dataset:
    """Labeled cats/dogs split by a seeded shuffle into train / validation / held-out test."""
    folder = locate_catsdogs(root)
    paths, labels = scan_catsdogs(folder)
    key_src = hashlib.sha256("\n".join(f"{p.relative_to(folder)}:{p.stat().st_size}" for p in paths)
                             .encode()).hexdigest()[:16]

    def build() -> dict[str, torch.Tensor]:
        return {"x": decode_files(paths, (size, size)), "y": torch.tensor(labels)}

    t = _cached(f"catsdogs-{key_src}-{size}", build)
    full = ImageSet(t["x"], t["y"], CATSDOGS_CLASSES)
    perm = seeded_permutation(len(full), seed)
    n_val, n_test = int(len(full) * val_fraction), int(len(full) * test_fraction)
    index = {"test": perm[:n_test], "val": perm[n_test:n_test + n_val], "train": perm[n_test + n_val:]}
    train, val, test = (full.subset(index[name]) for name in ("train", "val", "test"))
    return Dataset("catsdogs", train, val, test, fingerprint(train, val, test), f"{len(paths)} images at {folder}",
                   CIFAR10_MEAN, CIFAR10_STD,
                   f"{len(full)} labeled images shuffled with seed {seed}: {len(train)} train / "
                   f"{len(val)} validation / {len(test)} held-out test (never seen in training)", index)


# --- batches and augmentation as tensor ops ------------------------------------------------------


def random_crop(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Per-image random translation by up to ``pad`` pixels (reflect padding), fully batched."""
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (n,), device=x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), device=x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    x = padded.gather(2, rows.expand(n, c, h, padded.shape[3]))
    return x.gather(3, cols.expand(n, c, h, w))


def cutout(x: torch.Tensor, size: int) -> torch.Tensor:
    """Zero one random ``size`` x ``size`` square per image (DeVries & Taylor, 2017), batched."""
    n, _, h, w = x.shape
    cy = torch.randint(0, h, (n, 1, 1), device=x.device)
    cx = torch.randint(0, w, (n, 1, 1), device=x.device)
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    hole = ((rows - cy).abs() <= size // 2) & ((cols - cx).abs() <= size // 2)
    return x.masked_fill(hole[:, None], 0.0)


def random_flip(x: torch.Tensor) -> torch.Tensor:
    mask = torch.rand(x.shape[0], device=x.device) < 0.5
    return torch.where(mask[:, None, None, None], x.flip(3), x)


def batches(data: ImageSet, batch_size: int, mean: Sequence[float], std: Sequence[float],
            shuffle: bool = False, augment: bool = False, crop_pad: int = 4,
            cutout_size: int = 0, drop_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield normalised float batches (channels-last) from a split, on the split's own device:
    move the split once with :meth:`ImageSet.to`; nothing is copied between devices here."""
    device = data.images.device
    mean_t = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, 3, 1, 1)
    order = torch.randperm(len(data), device=device) if shuffle else torch.arange(len(data), device=device)
    end = len(data) - len(data) % batch_size if drop_last and len(data) >= batch_size else len(data)
    for start in range(0, end, batch_size):
        index = order[start:start + batch_size]
        x = (data.images[index].float() / 255.0 - mean_t) / std_t
        if augment:
            x = random_flip(random_crop(x, crop_pad))
            if cutout_size:
                x = cutout(x, cutout_size)
        yield x.contiguous(memory_format=torch.channels_last), data.labels[index]
