"""Train a classifier; keep the best-validation checkpoint; report test accuracy once, at the end.

    python -m training.train --dataset cifar10 --model resnet20 --epochs 6 --out runs/cifar10-resnet20

Writes into ``--out``: ``best.pt`` (weights + everything export needs), ``metrics.json`` (per-epoch
train/val loss and accuracy, test accuracy of the best checkpoint, timings, data fingerprint,
command) and ``curves.png`` (train vs val loss and accuracy, test accuracy on the plot).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from service.preprocess import InputSpec
from training.data import Dataset, ImageSet, batches, load_catsdogs, load_cifar10
from training.nets import (ARCHITECTURES, IMAGENET_MEAN, IMAGENET_STD, PretrainedWeightsUnavailable,
                           build_model, imagenet_backbone)


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            name = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name} CPU, {torch.get_num_threads()} threads"


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageSet, mean, std, device: torch.device,
             batch_size: int = 500) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` on ``data``."""
    model.eval()
    loss_sum, correct = 0.0, 0
    for x, y in batches(data, batch_size, mean, std, device):
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(x).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
    return loss_sum / len(data), correct / len(data)


def make_optimizer(name: str, params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}")


def warmup_then_linear_decay(total_steps: int, warmup_fraction: float = 0.15):
    warmup = max(1, int(total_steps * warmup_fraction))
    return lambda step: step / warmup if step < warmup else max(0.0, (total_steps - step) / (total_steps - warmup))


def load_dataset(args: argparse.Namespace) -> Dataset:
    root = Path(args.data_root) if args.data_root else None
    if args.dataset == "cifar10":
        data = load_cifar10(root, download=args.download, seed=args.seed)
    else:
        data = load_catsdogs(root, size=args.image_size, seed=args.seed)
    if args.pretrained == "imagenet":  # the backbone expects ImageNet statistics
        data.mean, data.std = IMAGENET_MEAN, IMAGENET_STD
    return data


def init_from_checkpoint(model: nn.Module, path: str) -> list[str]:
    """Copy every weight whose name and shape match (the backbone); return the names left fresh."""
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    own = model.state_dict()
    fresh = [k for k, v in own.items() if k not in state or state[k].shape != v.shape]
    model.load_state_dict({k: v for k, v in state.items() if k in own and own[k].shape == v.shape},
                          strict=False)
    return fresh


def plot_curves(history: list[dict[str, float]], test_acc: float, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2))
    for split, style in (("train", "-o"), ("val", "-s")):
        ax_loss.plot(epochs, [h[f"{split}_loss"] for h in history], style, label=split)
        ax_acc.plot(epochs, [100 * h[f"{split}_acc"] for h in history], style, label=split)
    ax_acc.axhline(100 * test_acc, color="tab:red", linestyle="--",
                   label=f"test {100 * test_acc:.2f}% (best-val checkpoint)")
    ax_acc.set_title(f"accuracy (test {100 * test_acc:.2f}%)")
    head = [h["epoch"] for h in history if h.get("phase") == "head"]
    if head:  # transfer learning: shade the head-only epochs
        for ax in (ax_loss, ax_acc):
            ax.axvspan(min(head) - 0.5, max(head) + 0.5, color="grey", alpha=0.12, label="head only")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)")
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def train(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    device = pick_device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_dataset(args)
    train_set = data.train if not args.limit_train else data.train.subset(torch.arange(args.limit_train))
    classes = data.train.classes
    fresh = None
    if args.pretrained == "imagenet":
        try:
            model = imagenet_backbone(args.model, len(classes))
        except PretrainedWeightsUnavailable as exc:
            raise SystemExit(f"error: {exc}") from None
        fresh = ["fc.weight", "fc.bias"]
    else:
        model = build_model(args.model, len(classes))
        if args.init_from:
            fresh = init_from_checkpoint(model, args.init_from)
    model = model.to(device, memory_format=torch.channels_last)

    head_params = [p for n, p in model.named_parameters() if fresh is not None and n in fresh]
    steps_per_epoch = math.ceil(len(train_set) / args.batch_size)
    history: list[dict[str, float]] = []
    best_acc, best_epoch = -1.0, 0
    spec = InputSpec(tuple(train_set.images.shape[2:]), data.mean, data.std)
    started = time.perf_counter()

    # Transfer learning trains the new head alone for --head-epochs, then everything.
    phases = [("head", args.head_epochs, head_params), ("all", args.epochs, list(model.parameters()))]
    epoch = 0
    for phase, n_epochs, params in phases:
        if n_epochs == 0 or not params:
            continue
        for p in model.parameters():
            p.requires_grad_(phase == "all")
        for p in params:
            p.requires_grad_(True)
        lr = args.lr * (args.head_lr_scale if phase == "head" else 1.0)
        optimizer = make_optimizer(args.optimizer, params, lr, args.weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, warmup_then_linear_decay(n_epochs * steps_per_epoch))
        for _ in range(n_epochs):
            epoch += 1
            model.train(phase == "all")  # head-only: the frozen backbone keeps its BN statistics
            loss_sum, correct, seen = 0.0, 0, 0
            bar = tqdm(batches(train_set, args.batch_size, data.mean, data.std, device, shuffle=True,
                               augment=True, crop_pad=max(4, spec.size[0] // 8)),
                       total=steps_per_epoch, desc=f"epoch {epoch} ({phase})", unit="batch",
                       leave=False, file=sys.stderr)
            tick = time.perf_counter()
            for x, y in bar:
                with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                    logits = model(x).float()
                loss = F.cross_entropy(logits, y, label_smoothing=args.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                loss_sum += loss.item() * len(y)
                correct += (logits.argmax(1) == y).sum().item()
                seen += len(y)
                bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}",
                                img_s=f"{seen / (time.perf_counter() - tick):.0f}")
            val_loss, val_acc = evaluate(model, data.val, data.mean, data.std, device)
            row = {"epoch": epoch, "phase": phase, "train_loss": loss_sum / seen,
                   "train_acc": correct / seen, "val_loss": val_loss, "val_acc": val_acc,
                   "seconds": time.perf_counter() - tick}
            history.append(row)
            print(f"epoch {epoch:3d} {phase:4s} train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}"
                  f" | val loss {val_loss:.4f} acc {val_acc:.4f} | {row['seconds']:.0f}s", flush=True)
            if val_acc > best_acc:
                best_acc, best_epoch = val_acc, epoch
                torch.save({"arch": args.model, "state_dict": {k: v.detach().cpu() for k, v in
                                                                model.state_dict().items()},
                            "classes": list(classes), "input": spec.to_card(), "dataset": data.name},
                           out / "best.pt")
    train_seconds = time.perf_counter() - started

    model.load_state_dict(torch.load(out / "best.pt", weights_only=True)["state_dict"])
    test_loss, test_acc = evaluate(model, data.test, data.mean, data.std, device)
    metrics = {
        "dataset": data.name, "model": args.model, "classes": list(classes),
        "parameters": sum(p.numel() for p in model.parameters()),
        "input_size": list(spec.size),
        "best_epoch": best_epoch, "val_accuracy": best_acc,
        "test_accuracy": test_acc, "test_loss": test_loss, "test_images": len(data.test),
        "test_measured_as": f"top-1 accuracy of the best-validation checkpoint on the {len(data.test)}-image "
                            f"test split, preprocessed as the model card says ({data.split})",
        "train_seconds": round(train_seconds, 1), "hardware": hardware(device),
        "torch": torch.__version__, "data_fingerprint": data.fingerprint, "data_source": data.source,
        "split": data.split, "seed": args.seed,
        "command": "python -m training.train " + " ".join(shlex.quote(a) for a in args.argv),
        "init_from": args.init_from or (f"torchvision {args.pretrained} weights" if args.pretrained else None),
        "history": history,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    plot_curves(history, test_acc, f"{data.name} / {args.model} ({args.optimizer}, {epoch} epochs, "
                                   f"{hardware(device)})", out / "curves.png")
    print(f"test accuracy {test_acc:.4f} (best val {best_acc:.4f} at epoch {best_epoch}); "
          f"trained in {train_seconds:.0f}s; wrote {out}/best.pt, metrics.json, curves.png")
    return metrics


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--dataset", choices=["cifar10", "catsdogs"], default="cifar10")
    parser.add_argument("--model", choices=sorted(ARCHITECTURES), default="resnet20")
    parser.add_argument("--data-root", help="archive or folder (default: ../shared/datasets archive)")
    parser.add_argument("--download", action="store_true", help="CIFAR-10 via torchvision download")
    parser.add_argument("--image-size", type=int, default=96, help="catsdogs training resolution")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--optimizer", choices=["sgd", "adam", "rmsprop"], default="sgd")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--init-from", help="checkpoint whose matching weights start the model (transfer)")
    parser.add_argument("--pretrained", choices=["imagenet"], help="start from torchvision ImageNet weights "
                        "(with --model tv_resnet18; downloaded or read from the torch hub cache)")
    parser.add_argument("--head-epochs", type=int, default=0, help="with --init-from: head-only epochs first")
    parser.add_argument("--head-lr-scale", type=float, default=1.0)
    parser.add_argument("--limit-train", type=int, default=0, help="use only the first N training images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    return args


if __name__ == "__main__":
    train(parse_args())
