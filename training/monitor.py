"""What a training run shows while and after it trains: TensorBoard events (the course's live
dashboard) and ``curves.png``.

:class:`RunLog` writes, per step, the training loss, accuracy and learning rate (held on the
device during the epoch and written at its end, so no host synchronisation is added); per epoch
those, images/s and validation loss/accuracy; at each validation the first-layer filters and a few
validation images with their predictions. :func:`plot_curves` draws train vs validation loss and
accuracy with the test accuracy.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from training.data import ImageSet, batches
from training.precision import Precision


def pyplot(purpose: str) -> Any:
    """matplotlib.pyplot on the Agg backend, or None (with a warning naming ``purpose``) where
    matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        print(f"warning: {purpose} ({exc}); pip install matplotlib", file=sys.stderr)
        return None
    return plt


def plot_curves(history: list[dict[str, Any]], test_acc: float, title: str, path: Path) -> None:
    plt = pyplot(f"no {path.name}")  # without it, metrics.json still holds every figure the plot would show
    if plt is None:
        return
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


def open_tensorboard(folder: Path, asked: bool) -> Any:
    """A SummaryWriter into ``folder``, or None where the tensorboard package is missing (an error
    when ``asked`` for by name: ``--tensorboard DIR``)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:  # e.g. a GPU host with PyTorch but without the tensorboard package
        if asked:
            raise SystemExit(f"error: --tensorboard needs the tensorboard package ({exc})") from None
        print(f"warning: no TensorBoard logs ({exc}); pip install tensorboard", file=sys.stderr)
        return None
    return SummaryWriter(str(folder))


@dataclass
class EpochSteps:
    """One epoch's per-step scalars, kept on the device until the epoch ends."""

    losses: list[torch.Tensor] = field(default_factory=list)
    correct: list[torch.Tensor] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)

    def add(self, loss: torch.Tensor, hits: torch.Tensor, size: int, lr: float) -> None:
        self.losses.append(loss)
        self.correct.append(hits)
        self.sizes.append(size)
        self.lrs.append(lr)


class RunLog:
    """A run's TensorBoard events (``writer`` None: none are written, and every method is a no-op)."""

    def __init__(self, writer: Any) -> None:
        self.writer = writer
        self.step = 0  # across phases
        self.plt = pyplot("no prediction figures in TensorBoard") if writer is not None else None

    @property
    def enabled(self) -> bool:
        return self.writer is not None

    def epoch(self, row: dict[str, Any], steps: EpochSteps) -> None:
        """The epoch's steps (one transfer from the device) and its row of metrics."""
        if self.writer is None:
            return
        self.log_steps(steps)
        writer, epoch = self.writer, row["epoch"]
        writer.add_scalar("epoch/train_loss", row["train_loss"], epoch)
        writer.add_scalar("epoch/train_accuracy", row["train_acc"], epoch)
        writer.add_scalar("epoch/learning_rate", row["lr"], epoch)
        writer.add_scalar("epoch/images_per_s", row["images_per_s"], epoch)
        writer.add_scalar("step/images_per_s", row["images_per_s"], self.step)  # the epoch's mean, at its last step
        if row["val_acc"] is not None:
            writer.add_scalar("epoch/val_loss", row["val_loss"], epoch)
            writer.add_scalar("epoch/val_accuracy", row["val_acc"], epoch)

    def log_steps(self, steps: EpochSteps) -> None:
        if not steps.losses:
            return
        loss_values = torch.stack(steps.losses).float().cpu().tolist()
        correct_values = torch.stack(steps.correct).cpu().tolist()
        for k, (loss, hits, size, lr) in enumerate(zip(loss_values, correct_values, steps.sizes, steps.lrs)):
            step = self.step + 1 + k
            self.writer.add_scalar("step/train_loss", loss, step)
            self.writer.add_scalar("step/train_accuracy", hits / size, step)
            self.writer.add_scalar("step/learning_rate", lr, step)
        self.step += len(steps.losses)

    def images(self, model: nn.Module, evaluator: nn.Module, val_set: ImageSet, mean: Sequence[float],
               std: Sequence[float], classes: Iterable[str], epoch: int, precision: Precision, count: int = 8) -> None:
        """The first-layer filters and ``count`` validation images with the predicted class and its
        probability (green when right); without matplotlib, the filters only."""
        if self.writer is None:
            return
        classes = list(classes)
        filters = first_layer_filters(model)
        if filters is not None:
            self.writer.add_images("filters/first_layer", filters, epoch)
        plt = self.plt
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
        self.writer.add_figure("validation/predictions", fig, epoch)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self, test_acc: float, test_loss: float, epoch: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar("test/accuracy", test_acc, epoch)
            self.writer.add_scalar("test/loss", test_loss, epoch)
            self.writer.close()
