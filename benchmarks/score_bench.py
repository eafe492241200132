"""Folder scoring throughput, three ways, same machine, same model, one run:

  1. seed   — the course's loop: open one file with PIL, transform, ``model(img.unsqueeze(0))``
              (the shipped TorchScript model, eager, one image at a time);
  2. tool   — ``service.score``'s in-process scorer end to end (decode threads + batched ONNX Runtime);
  3. ceiling — the same ONNX model alone on pre-decoded uint8 tensors, batched.

    .venv/bin/python benchmarks/score_bench.py [FOLDER] [--model cifar10] [--seed-limit 2000]

FOLDER defaults to the extracted ``cifar10-jpeg/test`` (10,000 files).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from service.preprocess import normalize  # noqa: E402
from service.registry import load_model  # noqa: E402
from service.score import LocalScorer, walk_files  # noqa: E402


def seed_loop(paths: list[Path], model_dir: Path) -> float:
    import torch
    from PIL import Image
    from torchvision import transforms

    card = json.loads((model_dir / "card.json").read_text())
    module = torch.jit.load(str(model_dir / "model.torchscript.pt")).eval()
    transform = transforms.Compose([
        transforms.Resize(card["input"]["size"]), transforms.ToTensor(),
        transforms.Normalize(card["input"]["mean"], card["input"]["std"])])
    predictions = []
    start = time.perf_counter()
    with torch.no_grad():
        for path in paths:
            image = transform(Image.open(path).convert("RGB"))
            predictions.append(module(image.unsqueeze(0)).argmax(1).item())
    return len(paths) / (time.perf_counter() - start)


def tool(paths: list[Path], root: Path, models_dir: Path, name: str, batch: int) -> float:
    scorer = LocalScorer(models_dir, name, "onnx", "cpu", batch, max(1, (os.cpu_count() or 2) - 1))
    start = time.perf_counter()
    count = sum(len(rows) for rows in scorer.score(paths, root))
    return count / (time.perf_counter() - start)


def ceiling(model_dir: Path, count: int, batch: int) -> float:
    """Images/s of the model alone: batched ONNX Runtime on ``count`` pre-decoded uint8 images."""
    model = load_model(model_dir, "onnx", "cpu")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (count, 3, *model.spec.size), dtype=np.uint8)
    model.predict(x[:batch])
    start = time.perf_counter()
    for i in range(0, len(x), batch):
        model.backend(normalize(x[i:i + batch], model.spec))
    return len(x) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, nargs="?")
    parser.add_argument("--model", default="cifar10")
    parser.add_argument("--models-dir", type=Path, default=REPO / "models")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seed-limit", type=int, default=2000, help="files for the slow seed loop")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.folder is None:
        from training.data import extract_archive, shared_datasets_dir

        args.folder = extract_archive(shared_datasets_dir() / "cifar10-jpeg.tar.gz") / "cifar10-jpeg" / "test"
    root = args.folder.resolve()
    paths = walk_files(root)
    model_dir = args.models_dir / args.model
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "folder": str(args.folder),
              "files": len(paths), "model": args.model}
    result["ceiling_images_per_s"] = round(ceiling(model_dir, len(paths), args.batch_size), 1)
    result["tool_images_per_s"] = round(tool(paths, root, args.models_dir, args.model, args.batch_size), 1)
    result["seed_images_per_s"] = round(seed_loop(paths[:args.seed_limit], model_dir), 1)
    result["tool_vs_ceiling"] = round(result["tool_images_per_s"] / result["ceiling_images_per_s"], 3)
    result["tool_vs_seed"] = round(result["tool_images_per_s"] / result["seed_images_per_s"], 2)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
