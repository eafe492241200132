"""The course's comparisons as commands: optimizers on one network, architectures on one budget.

    python benchmarks/compare.py optimizers    --out runs/compare-optimizers      # make compare-optimizers
    python benchmarks/compare.py architectures --out runs/compare-architectures   # make compare-architectures
    ... --gpu                                                                      # the GPU run's budget

``optimizers`` trains one network (``--model``) with SGD (Nesterov momentum), RMSprop and Adam(W)
from the same seed on the same images for the same number of steps, each at its customary learning
rate (:data:`OPTIMIZERS`) under the same one-cycle schedule, and draws their curves side by side
(per-step training loss from each run's TensorBoard events, validation accuracy per epoch, test
accuracy) into ``compare-optimizers.png``.

``architectures`` trains each network of the zoo (``--models``) with the default recipe of
``training/train.py`` on one budget and tabulates test accuracy, parameters, training images/s
(the last epoch's) and inference images/s (fp32, batch 250, after one warm-up batch, on the
training device).

Budgets: on a CPU (default) ``--limit-train 5000 --epochs 2 --limit-eval 2000`` and small
networks; ``--gpu`` trains on the whole training split for 10 epochs, evaluates on the whole
validation and test splits and takes every CIFAR network of the zoo. Any budget flag given wins.
Each run is a folder under ``--out``; the tables go to stdout, ``compare-*.md`` and ``compare-*.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from training.compute import pick_device  # noqa: E402
from training.train import parse_args, train  # noqa: E402

# name -> flags: each optimizer at the learning rate it is customarily used with
OPTIMIZERS: dict[str, list[str]] = {
    "sgd": ["--optimizer", "sgd", "--lr", "0.1", "--momentum", "0.9"],
    "rmsprop": ["--optimizer", "rmsprop", "--lr", "0.001", "--momentum", "0"],
    "adam": ["--optimizer", "adam", "--lr", "0.001"],
}
CPU_ZOO = ["plain_cnn", "lenet5", "resnet20", "se_resnet20", "densenet40", "fastnet_tiny"]
GPU_ZOO = ["plain_cnn", "lenet5", "alexnet", "vgg11", "vgg16", "googlenet", "resnet20", "se_resnet20", "resnet18",
           "se_resnet18", "resnet34", "densenet40", "fastnet", "fastnet_res"]
BUDGETS = {"cpu": {"limit_train": 5000, "epochs": 2, "limit_eval": 2000},
           "gpu": {"limit_train": 0, "epochs": 10, "limit_eval": 0}}


def budget_flags(args: argparse.Namespace) -> list[str]:
    budget = BUDGETS["gpu" if args.gpu else "cpu"]
    values = {key: getattr(args, key) if getattr(args, key) is not None else budget[key] for key in budget}
    return ["--limit-train", str(values["limit_train"]), "--epochs", str(values["epochs"]),
            "--limit-eval", str(values["limit_eval"]), "--seed", str(args.seed), "--batch-size", str(args.batch_size)]


def run(out: Path, flags: list[str]) -> dict[str, Any]:
    return train(parse_args([*flags, "--quiet", "--out", str(out)]))


def step_losses(run_dir: Path) -> tuple[list[int], list[float]]:
    """The per-step training loss from a run's TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    accumulator.Reload()
    events = accumulator.Scalars("step/train_loss")
    return [e.step for e in events], [e.value for e in events]


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_optimizers(runs: dict[str, tuple[Path, dict[str, Any]]], title: str, path: Path) -> None:
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()
    fig, (ax_loss, ax_val, ax_test) = plt.subplots(1, 3, figsize=(15, 4.3), width_ratios=[1.4, 1, 0.7])
    for name, (run_dir, metrics) in runs.items():
        steps, losses = step_losses(run_dir)
        ax_loss.plot(steps, losses, label=name, linewidth=1.2)
        points = [(h["epoch"], 100 * h["val_acc"]) for h in metrics["history"] if h["val_acc"] is not None]
        ax_val.plot([p[0] for p in points], [p[1] for p in points], "-o", label=name)
    names = list(runs)
    accuracies = [100 * runs[n][1]["test_accuracy"] for n in names]
    bars = ax_test.bar(names, accuracies, color=[f"C{i}" for i in range(len(names))])
    for bar, acc in zip(bars, accuracies):
        ax_test.text(bar.get_x() + bar.get_width() / 2, acc + 0.5, f"{acc:.1f}%", ha="center", fontsize=9)
    ax_loss.set(xlabel="step", ylabel="training cross-entropy (label-smoothed)", title="training loss per step")
    ax_val.set(xlabel="epoch", ylabel="accuracy (%)", title="validation accuracy per epoch")
    ax_test.set(ylabel="accuracy (%)", title="test accuracy", ylim=(0, max(accuracies) * 1.15 + 1))
    ax_val.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (ax_loss, ax_val):
        ax.grid(alpha=0.3)
        ax.legend()
    ax_test.grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    """A markdown table: columns are (key, header, format)."""
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(format(r[k], f) for k, _, f in columns) + " |" for r in rows]
    return "\n".join(lines)


def compare_optimizers(args: argparse.Namespace) -> str:
    flags = budget_flags(args)
    runs = {}
    for name, extra in OPTIMIZERS.items():
        runs[name] = (args.out / name, run(args.out / name, ["--model", args.model, *flags, *extra]))
    first = next(iter(runs.values()))[1]
    title = (f"{first['dataset']} / {args.model}: optimizers on one budget ({len(first['history'])} epochs, "
             f"{' '.join(flags)}; {first['hardware']})")
    plot_optimizers(runs, title, args.out / "compare-optimizers.png")
    rows = [{"optimizer": name, "flags": " ".join(OPTIMIZERS[name]), "test_accuracy": 100 * m["test_accuracy"],
             "best_val": 100 * m["val_accuracy"], "final_train_loss": m["history"][-1]["train_loss"],
             "train_seconds": m["train_seconds"]} for name, (_, m) in runs.items()]
    (args.out / "compare-optimizers.json").write_text(json.dumps({"title": title, "rows": rows}, indent=2))
    return title + "\n\n" + table(rows, [("optimizer", "optimizer", "s"), ("flags", "flags", "s"),
                                         ("test_accuracy", "test accuracy (%)", ".2f"),
                                         ("best_val", "best validation (%)", ".2f"),
                                         ("final_train_loss", "last epoch's training loss", ".3f"),
                                         ("train_seconds", "training s", ".1f")])


@torch.inference_mode()
def inference_rate(run_dir: Path, device: torch.device, images: int, batch_size: int = 250) -> float:
    """Images/s of the run's network (fp32, eval mode) on random inputs of its size, after a warm-up."""
    from training.nets import build_model

    ckpt = torch.load(run_dir / "best.pt", map_location="cpu", weights_only=True)
    model = build_model(ckpt["arch"], len(ckpt["classes"]))
    model.load_state_dict(ckpt["state_dict"])
    model = model.to(device).eval()
    x = torch.randn(batch_size, 3, *ckpt["input"]["size"], device=device)
    model(x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    batches = max(1, images // batch_size)
    tick = time.perf_counter()
    for _ in range(batches):
        model(x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return batches * batch_size / (time.perf_counter() - tick)


def compare_architectures(args: argparse.Namespace) -> str:
    flags = budget_flags(args)
    models = args.models or (GPU_ZOO if args.gpu else CPU_ZOO)
    device = pick_device(args.device)
    rows = []
    for name in models:
        metrics = run(args.out / name, ["--model", name, *flags, "--device", args.device])
        rows.append({"model": name, "test_accuracy": 100 * metrics["test_accuracy"],
                     "parameters": metrics["parameters"] / 1e6,
                     "train_images_per_s": metrics["history"][-1]["images_per_s"],
                     "inference_images_per_s": inference_rate(args.out / name, device, args.inference_images),
                     "train_seconds": metrics["train_seconds"]})
        print(f"{name}: {rows[-1]}", flush=True)
    title = (f"{metrics['dataset']}: the zoo on one budget ({' '.join(flags)}; default recipe of training/train.py; "
             f"{metrics['hardware']})")
    (args.out / "compare-architectures.json").write_text(json.dumps({"title": title, "rows": rows}, indent=2))
    return title + "\n\n" + table(rows, [("model", "model", "s"), ("test_accuracy", "test accuracy (%)", ".2f"),
                                         ("parameters", "parameters (M)", ".2f"),
                                         ("train_images_per_s", "training images/s", ".0f"),
                                         ("inference_images_per_s", "inference images/s", ".0f"),
                                         ("train_seconds", "training s", ".1f")])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["optimizers", "architectures"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--gpu", action="store_true", help="the GPU run's budget (whole splits, 10 epochs, whole zoo)")
    parser.add_argument("--limit-train", type=int, help="training images (0: all)")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--limit-eval", type=int, help="validation and test images (0: all)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="plain_cnn", help="optimizers: the network they train")
    parser.add_argument("--models", nargs="+", help="architectures: which networks (default: the budget's zoo)")
    parser.add_argument("--inference-images", type=int, default=2000, help="architectures: images timed per network")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    text = compare_optimizers(args) if args.what == "optimizers" else compare_architectures(args)
    (args.out / f"compare-{args.what}.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
