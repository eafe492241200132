"""CPU-sized proxy for the CIFAR-10 recipes: the same budget for every variant, side by side.

    python benchmarks/recipe_proxy.py --json docs/benchmarks/recipe_proxy.json

Each variant trains on the first ``--train-images`` images of the seed-0 training split for
``--epochs`` epochs and is measured on 2,000 validation and 2,000 test images (seeded samples),
one after another in one process, so the variants share the machine's conditions. The variants
walk step by step from the recipe this project used before (``old``: Nesterov SGD at batch 256 and
lr 0.1, label smoothing 0.1, warm-up then linear decay) to a known-good public ResNet recipe
(``default``: batch 128 at lr 0.1, cosine schedule, no label smoothing, as in the widely used
kuangliu/pytorch-cifar trainer; training.train's defaults since this change), then the fast preset
(``fast``) on the same budget. Results go to stdout as a table and to ``--json``; docs/TRAINING.md records them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training.train import parse_args, train  # noqa: E402

# (name, what changes, flags). Flags not named keep the defaults of training/train.py.
OLD = ["--model", "resnet20", "--lr", "0.1", "--label-smoothing", "0.1", "--schedule", "onecycle", "--warmup", "0.15"]
VARIANTS: list[tuple[str, str, list[str]]] = [
    ("old", "batch 256, lr 0.1, label smoothing 0.1, warm-up 15% then linear decay (the defaults before)",
     [*OLD, "--batch-size", "256"]),
    ("old-lr0.2", "old, the rate scaled to the batch (0.1 per 128 images: 0.2 at 256)",
     [*OLD, "--batch-size", "256", "--lr", "0.2"]),
    ("batch128", "old at batch 128: the same rate per image as old-lr0.2, twice the steps",
     [*OLD, "--batch-size", "128"]),
    ("batch128-nols", "... and no label smoothing",
     [*OLD, "--batch-size", "128", "--label-smoothing", "0"]),
    ("default", "... and a cosine schedule without warm-up: the known-good public recipe, now the default",
     ["--model", "resnet20"]),
    ("step", "the default with the course's StepLR",
     ["--model", "resnet20", "--schedule", "step"]),
    ("fast", "the fast preset (FastNet, whitening, lookahead, TTA) at batch 256 and the preset's rate per image",
     ["--preset", "fast", "--batch-size", "256"]),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-images", type=int, default=10_000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/recipe-proxy"))
    args = parser.parse_args()
    # rows of an earlier run of other variants are kept (so --only can add or redo some)
    rows = json.loads(args.json.read_text())["rows"] if args.json and args.json.exists() else []
    for name, change, flags in VARIANTS:
        if args.only and name not in args.only:
            continue
        started = time.perf_counter()
        metrics = train(parse_args([*flags, "--epochs", str(args.epochs), "--limit-train", str(args.train_images),
                                    "--limit-eval", "2000", "--device", "cpu", "--quiet", "--no-plot",
                                    "--out", str(args.workdir / name)]))
        rows = [row for row in rows if row["variant"] != name]
        rows.append({"variant": name, "change": change, "flags": flags,
                     "val_curve": [h["val_acc"] for h in metrics["history"]],
                     "val_accuracy": metrics["val_accuracy"], "test_accuracy": metrics["test_accuracy"],
                     "train_seconds": metrics["train_seconds"], "wall_seconds": round(time.perf_counter() - started, 1)})
        print(f"{name:14s} val {metrics['val_accuracy']:.4f} test {metrics['test_accuracy']:.4f} "
              f"train {metrics['train_seconds']:.0f}s", flush=True)
        rows.sort(key=lambda row: [v[0] for v in VARIANTS].index(row["variant"]))
        if args.json:
            args.json.write_text(json.dumps({"train_images": args.train_images, "epochs": args.epochs,
                                             "eval_images": 2000, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
