"""Pictures of what a trained network sees and gets wrong, for a training run or a registry model.

    python -m training.report runs/cifar10-resnet20        # a run: best.pt + metrics.json
    python -m training.report models/catsdogs              # a model: card.json + its graphs

Writes next to the run or model (``--out`` elsewhere), each a PNG:

* ``report-curves.png``: train/validation loss and accuracy per epoch with the test accuracy marked
  (a registry model keeps only its final numbers, so that is what it draws);
* ``report-confusion.png``: the test confusion matrix, counts and row-normalised;
* ``report-confident.png``: the most confidently right and most confidently wrong test images, with
  their top-3 probabilities;
* ``report-filters.png``: the first layer's filters;
* ``report-feature-maps.png``: one test image's feature maps after each stage;
* ``report-reliability.png``: reliability diagrams with the ECE (15 bins), as the model outputs its
  probabilities and after a temperature fitted on the validation split (:mod:`training.calibration`);
* ``report-ood.png`` (a registry model whose graph returns an OOD score): the histogram of
  ``ood_score`` on the test split and on the proxy OOD sets, with the card's threshold
  (:mod:`training.report_ood`);
* ``report-gradcam.png``: Grad-CAM heat (:mod:`service.explain`, on :class:`training.cam.Explainable`) for the top class over a seeded
  sample of test images, and the share of the heat inside the central box (half of each side) over 50;

and ``report.json`` with the numbers behind them (not into a registry folder, which keeps its card,
graphs and figures only: the command prints the numbers). A run is evaluated with its checkpoint in
PyTorch (its own test-time augmentation, its own ``--limit-eval`` sample); a registry model with its
ONNX graph on the CPU (what the service runs) over the split its card names, and its TorchScript
file's weights for the filters, feature maps and Grad-CAM.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from service.explain import central_share, colormap, gradcam
from service.card import InputSpec, read_card
from service.preprocess import normalize
from training.cam import Explainable, feature_stages, rebuild_from_registry
from training.calibration import (ECE_BINS, calibration_summary, logits_from_probabilities,
                                  reliability, softmax)
from training.data import ImageSet, seeded_permutation, seeded_sample
from training.evaluation import onnx_image_outputs
from training.export import load_checkpoint, split_logits
from training.graph import with_tta
from training.monitor import first_conv
from training.monitor import plot_curves as training_curves
from training.report_ood import FIGURE as OOD_FIGURE
from training.report_ood import plot_ood
from training.splits import card_dataset, checkpoint_dataset

FIGURES = ("report-curves.png", "report-confusion.png", "report-confident.png", "report-filters.png",
           "report-feature-maps.png", "report-reliability.png", "report-gradcam.png")
DPI = 90
MAX_BYTES = 250_000  # figures live in the repository beside the models


@dataclass
class Subject:
    """What the figures are drawn from, whichever kind of folder it came from."""

    title: str
    classes: list[str]
    spec: InputSpec
    net: nn.Module                 # eager PyTorch network (logits), for filters and feature maps
    val: ImageSet
    test: ImageSet
    val_logits: torch.Tensor       # what the model outputs, as logits (log-probabilities for a graph)
    test_logits: torch.Tensor
    history: list[dict[str, Any]]  # per-epoch rows (empty for a registry model)
    test_accuracy: float           # as recorded by training / the card
    val_accuracy: float | None
    served_calibration: dict[str, Any] | None  # the card's calibration record, if the graph has one
    test_ood_scores: np.ndarray | None = None  # the graph's ood_score on the test images, if it has one


# --- loading ------------------------------------------------------------------------------------


def onnx_log_probabilities(path: Path, data: ImageSet, spec: InputSpec, batch_size: int = 500) -> torch.Tensor:
    probabilities = onnx_image_outputs(path, data.images.numpy(), spec, batch_size)[0]
    return logits_from_probabilities(probabilities).float()


def load_model_dir(folder: Path, limit: int = 0) -> Subject:
    card = read_card(folder)
    spec = card.input
    data = card_dataset(card)
    val, test = seeded_sample(data.val, limit), seeded_sample(data.test, limit)
    onnx_path = folder / card.artifact("onnx").file
    net = rebuild_from_registry(folder)[0]
    test_out = onnx_image_outputs(onnx_path, test.images.numpy(), spec, 250)
    return Subject(f"{card.name} ({card.architecture}, registry v{card.version})", list(card.classes),
                   spec, net, val, test, onnx_log_probabilities(onnx_path, val, spec),
                   logits_from_probabilities(test_out[0]).float(), [], card.metrics["test_accuracy"],
                   card.metrics.get("val_accuracy"), card.calibration, test_out[1] if card.ood else None)


def load_run_dir(folder: Path, limit: int = 0) -> Subject:
    net, ckpt, metrics = load_checkpoint(folder)
    spec = InputSpec.from_dict(ckpt["input"])
    data = checkpoint_dataset(ckpt, metrics, spec)
    # the run's own evaluation images: --limit-eval sampled both splits alike
    limit = limit or (metrics["test_images"] if metrics["test_images"] < len(data.test) else 0)
    val, test = seeded_sample(data.val, limit), seeded_sample(data.test, limit)
    level = int(ckpt.get("tta", 0))
    evaluated = with_tta(net, level).eval()
    return Subject(f"{metrics['dataset']} / {metrics['model']} (run {folder.name})", list(ckpt["classes"]), spec,
                   net, val, test, split_logits(evaluated, val.images, spec), split_logits(evaluated, test.images, spec),
                   metrics.get("history", []), metrics["test_accuracy"], metrics.get("val_accuracy"), None)


def load_subject(folder: Path, limit: int = 0) -> Subject:
    if (folder / "best.pt").exists() and (folder / "metrics.json").exists():
        return load_run_dir(folder, limit)
    if (folder / "card.json").exists():
        return load_model_dir(folder, limit)
    raise SystemExit(f"error: {folder} holds neither a training run (best.pt, metrics.json) nor a model (card.json)")


# --- figures ------------------------------------------------------------------------------------


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: Path) -> Path:
    """Save at :data:`DPI`, then as a 256-colour PNG when that keeps it under :data:`MAX_BYTES`."""
    from PIL import Image

    fig.savefig(path, dpi=DPI)
    pyplot().close(fig)
    if path.stat().st_size > MAX_BYTES:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
        rgb.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, optimize=True)
    return path


def to_hwc(image_uint8: torch.Tensor | np.ndarray) -> np.ndarray:
    return np.asarray(image_uint8).transpose(1, 2, 0)


def plot_curves(subject: Subject, path: Path) -> Path:
    if subject.history:
        training_curves(subject.history, subject.test_accuracy, subject.title, path)
        return path
    plt = pyplot()
    training_png = path.parent / "curves.png"  # export copies the run's curves into the model folder
    if training_png.exists():
        fig, (ax_png, ax) = plt.subplots(1, 2, figsize=(13, 4.2), width_ratios=[2.6, 1])
        ax_png.imshow(plt.imread(training_png))
        ax_png.set_title("the training run's curves (curves.png, copied at export)", fontsize=9)
        ax_png.axis("off")
    else:
        fig, ax = plt.subplots(figsize=(5, 4.2))
    names, values = ["validation", "test"], [subject.val_accuracy, subject.test_accuracy]
    shown = [(n, v) for n, v in zip(names, values) if v is not None]
    bars = ax.bar([n for n, _ in shown], [100 * v for _, v in shown], color=["tab:orange", "tab:red"][:len(shown)])
    for bar, (_, v) in zip(bars, shown):
        ax.text(bar.get_x() + bar.get_width() / 2, 100 * v + 1, f"{100 * v:.2f}%", ha="center")
    ax.set(ylim=(0, 105), ylabel="accuracy (%)",
           title="final accuracies (card.json)")
    ax.grid(axis="y", alpha=0.3)
    fig.suptitle(subject.title)
    fig.tight_layout()
    return save(fig, path)


def confusion_matrix(labels: torch.Tensor, predicted: torch.Tensor, n: int) -> np.ndarray:
    return torch.bincount(labels * n + predicted, minlength=n * n).reshape(n, n).numpy()


def plot_confusion(matrix: np.ndarray, classes: Sequence[str], title: str, path: Path) -> Path:
    plt = pyplot()
    n = len(classes)
    rows = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    side = 3.2 + 0.5 * n
    fig, axes = plt.subplots(1, 2, figsize=(2 * side, side * 0.92))
    for ax, values, fmt, name in ((axes[0], matrix, "d", "counts"), (axes[1], rows, ".2f", "row-normalised (recall)")):
        ax.imshow(values if name != "counts" else rows, cmap="Blues", vmin=0, vmax=1)
        for i in range(n):
            for j in range(n):
                ax.text(j, i, format(values[i, j], fmt), ha="center", va="center", fontsize=8 if n > 5 else 11,
                        color="white" if rows[i, j] > 0.5 else "black")
        ax.set_xticks(range(n), classes, rotation=45, ha="right")
        ax.set_yticks(range(n), classes)
        ax.set(xlabel="predicted", ylabel="true", title=name)
    fig.suptitle(f"{title}\ntest confusion matrix ({int(matrix.sum())} images, "
                 f"accuracy {100 * np.trace(matrix) / matrix.sum():.2f}%)")
    fig.tight_layout()
    return save(fig, path)


def plot_confident(images: torch.Tensor, labels: torch.Tensor, probs: torch.Tensor, classes: Sequence[str],
                   title: str, path: Path, per_row: int = 8) -> Path:
    plt = pyplot()
    confidence, predicted = probs.max(1)
    right = (predicted == labels)
    groups = []
    for name, mask in (("most confidently right", right), ("most confidently wrong", ~right)):
        index = torch.nonzero(mask).flatten()
        order = index[confidence[index].argsort(descending=True)][:per_row]
        groups.append((name, order))
    fig, axes = plt.subplots(2, per_row, figsize=(1.9 * per_row, 6.0))
    for row, (name, order) in enumerate(groups):
        axes[row, 0].set_ylabel(name, fontsize=10)
        for col in range(per_row):
            ax = axes[row, col]
            ax.set_xticks([])
            ax.set_yticks([])
            if col >= len(order):
                ax.axis("off")
                continue
            i = int(order[col])
            ax.imshow(to_hwc(images[i]), interpolation="nearest" if images.shape[-1] <= 64 else "antialiased")
            top = probs[i].topk(min(3, len(classes)))
            lines = [f"{classes[int(c)][:9]} {float(p):.2f}" for p, c in zip(top.values, top.indices)]
            ax.set_title(f"true: {classes[int(labels[i])][:9]}\n" + "\n".join(lines), fontsize=7.5,
                         color="tab:green" if row == 0 else "tab:red", loc="left")
    fig.suptitle(f"{title}: test images, top-3 probabilities as served")
    fig.tight_layout()
    return save(fig, path)


def plot_filters(net: nn.Module, title: str, path: Path) -> Path:
    plt = pyplot()
    conv = first_conv(net)
    weights = conv.weight.detach().float()
    n = weights.shape[0]
    cols = min(16, n) if n > 32 else min(8, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(0.8 * cols + 0.4, 0.8 * rows + 0.9), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < n:
            w = weights[k]
            w = (w - w.min()) / (w.max() - w.min() + 1e-12)  # each filter stretched to [0, 1]
            ax.imshow(w.permute(1, 2, 0).numpy(), interpolation="nearest")
    fig.suptitle(f"{title}: first-layer filters ({n} x {tuple(weights.shape[1:])}, each stretched to full range)",
                 fontsize=9)
    fig.tight_layout()
    return save(fig, path)


@torch.no_grad()
def stage_outputs(net: nn.Module, x: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    outputs: list[tuple[str, torch.Tensor]] = []
    hooks = [module.register_forward_hook(lambda m, a, out, name=name: outputs.append((name, out.detach().clone())))
             for name, module in feature_stages(net)]
    try:
        net.eval()(x)
    finally:
        for hook in hooks:
            hook.remove()
    return outputs


def plot_feature_maps(net: nn.Module, image_uint8: torch.Tensor, label: str, spec: InputSpec, title: str,
                      path: Path, channels: int = 8) -> Path:
    """The image, then per stage the ``channels`` most active maps (by mean activation)."""
    plt = pyplot()
    x = torch.from_numpy(normalize(image_uint8[None].numpy(), spec))
    outputs = stage_outputs(net, x)
    fig, axes = plt.subplots(len(outputs), channels + 1, figsize=(1.35 * (channels + 1), 1.45 * len(outputs) + 0.6),
                             squeeze=False)
    for row, (name, out) in enumerate(outputs):
        maps = out[0]
        order = maps.mean((1, 2)).argsort(descending=True)[:channels]
        first = axes[row, 0]
        if row == 0:
            first.imshow(to_hwc(image_uint8))
            first.set_title(f"input ({label})", fontsize=8)
        first.axis("off")
        for col in range(channels):
            ax = axes[row, col + 1]
            ax.axis("off")
            if col < len(order):
                ax.imshow(maps[order[col]].numpy(), cmap="viridis", interpolation="nearest")
                ax.set_title(f"{name} #{int(order[col])}" if col == 0 else f"#{int(order[col])}", fontsize=7)
        axes[row, 1].text(-0.15, 0.5, f"{name}\n{tuple(maps.shape)}", transform=axes[row, 1].transAxes,
                          ha="right", va="center", fontsize=7)
    fig.suptitle(f"{title}: feature maps after each stage (the {channels} most active channels)", fontsize=9)
    fig.tight_layout()
    return save(fig, path)


def plot_reliability(panels: list[tuple[str, Any]], title: str, path: Path) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.4), squeeze=False)
    for ax, (name, rel) in zip(axes[0], panels):
        centres = (rel.edges[:-1] + rel.edges[1:]) / 2
        width = rel.edges[1] - rel.edges[0]
        filled = rel.counts > 0
        ax.bar(centres[filled], rel.accuracy[filled], width=width, edgecolor="black", color="tab:blue",
               alpha=0.8, label="accuracy")
        ax.scatter(centres[filled], rel.confidence[filled], marker="_", s=260, linewidths=2.5, color="tab:red",
                   zorder=3, label="mean confidence")
        ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top-1 probability)", ylabel="accuracy",
               title=f"{name}\nECE {100 * rel.ece:.2f}% ({len(rel.counts)} bins)")
        ax.legend(loc="upper left", fontsize=8)
        share = ax.twinx()
        share.plot(centres[filled], rel.counts[filled] / rel.counts.sum(), "o:", color="grey", markersize=3)
        share.set_ylim(0, 1)
        share.set_ylabel("share of images", color="grey")
    fig.suptitle(f"{title}: reliability on the test split")
    fig.tight_layout()
    return save(fig, path)


def plot_gradcam(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, served: torch.Tensor,
                 spec: InputSpec, classes: Sequence[str], title: str, path: Path, shown: int = 8,
                 measured: int = 50) -> dict[str, Any]:
    """Grad-CAM on a seeded sample of ``measured`` test images (CIFAR's test split is stored class by
    class); the first ``shown`` of them drawn, titled with the served probability (``served``: the
    graph's output per test image, calibrated where the card says so)."""
    plt = pyplot()
    shares, drawn = [], []
    cam_graph = Explainable(net, net).eval()  # its cam method: what the exported TorchScript's computes
    for k, i in enumerate(seeded_permutation(len(images), 0)[:measured].tolist()):
        heat, predicted, _ = gradcam(cam_graph, images[i].numpy(), spec)
        shares.append(central_share(heat))
        if k < shown:
            drawn.append((i, heat, predicted, float(served[i, predicted])))
    fig, axes = plt.subplots(1, len(drawn), figsize=(1.9 * len(drawn), 2.6), squeeze=False)
    for ax, (i, heat, predicted, p) in zip(axes[0], drawn):
        image = to_hwc(images[i]).astype(np.float32)
        ax.imshow((0.5 * image + 0.5 * colormap(heat)).astype(np.uint8))
        right = predicted == int(labels[i])
        ax.set_title(f"{classes[predicted][:10]} {p:.2f}\n(true {classes[int(labels[i])][:10]})", fontsize=8,
                     color="tab:green" if right else "tab:red")
        ax.axis("off")
    summary = {"images": len(shares), "central_share_mean": float(np.mean(shares)),
               "central_share_median": float(np.median(shares)),
               "share_of_images_above_uniform": float(np.mean(np.array(shares) > 0.25))}
    fig.suptitle(f"{title}: Grad-CAM for the top class; heat inside the central box (1/4 of the area) over "
                 f"{summary['images']} test images: mean {summary['central_share_mean']:.2f} (uniform: 0.25)",
                 fontsize=9)
    fig.tight_layout()
    save(fig, path)
    return summary


# --- the report -----------------------------------------------------------------------------------


def write_report(folder: Path, out: Path | None = None, limit: int = 0, image_index: int = 0) -> dict[str, Any]:
    """Draw every figure for a run or model folder; return (and write) ``report.json``."""
    out = out or folder
    out.mkdir(parents=True, exist_ok=True)
    subject = load_subject(folder, limit)
    test_labels = subject.test.labels
    probs = softmax(subject.test_logits).float()
    predicted = probs.argmax(1)
    matrix = confusion_matrix(test_labels, predicted, len(subject.classes))
    calibration = calibration_summary(subject.val_logits, subject.val.labels, subject.test_logits, test_labels)
    temperature = calibration["temperature"]
    if subject.served_calibration:  # the graph divides by the card's T: T x log p undoes it exactly
        served = f"as served (T = {subject.served_calibration['temperature']:.3f} folded into the graph)"
        panels = [("the network's own softmax (before calibration)",
                   reliability(softmax(subject.test_logits, 1 / subject.served_calibration["temperature"]),
                               test_labels)),
                  (served, reliability(probs, test_labels))]
    else:
        served = "as the model outputs"
        panels = [(served, reliability(probs, test_labels)),
                  (f"after temperature T = {temperature:.3f} (fitted on validation)",
                   reliability(softmax(subject.test_logits, temperature), test_labels))]

    plot_curves(subject, out / FIGURES[0])
    plot_confusion(matrix, subject.classes, subject.title, out / FIGURES[1])
    plot_confident(subject.test.images, test_labels, probs, subject.classes, subject.title, out / FIGURES[2])
    plot_filters(subject.net, subject.title, out / FIGURES[3])
    image = subject.test.images[image_index]
    label = subject.classes[int(test_labels[image_index])]
    plot_feature_maps(subject.net, image, label, subject.spec, subject.title, out / FIGURES[4])
    plot_reliability(panels, subject.title, out / FIGURES[5])
    ood = None
    if subject.test_ood_scores is not None:  # a registry model: its card, graph and split are the folder's
        card = read_card(folder)
        ood = plot_ood(card, folder / card.artifact("onnx").file, card_dataset(card), subject.test_ood_scores,
                       out / OOD_FIGURE, save, pyplot)
    explained = plot_gradcam(subject.net, subject.test.images, test_labels, probs, subject.spec, subject.classes,
                             subject.title, out / FIGURES[6])

    report = {
        "subject": subject.title, "source": str(folder), "test_images": len(test_labels),
        "test_accuracy_measured": float((predicted == test_labels).double().mean()),
        "test_accuracy_recorded": subject.test_accuracy,
        "confusion_matrix": matrix.tolist(), "classes": subject.classes,
        "calibration": {**calibration, "ece_bins": ECE_BINS,
                        "probabilities_measured": served,
                        "card_calibration": subject.served_calibration},
        "figures": [str(out / name) for name in FIGURES] + ([ood["figure"]] if ood else []),
        "feature_map_image": {"test_index": image_index, "label": label},
        "gradcam": explained,
        **({"ood": ood} if ood else {}),
    }
    if not (out / "card.json").exists():  # a registry folder holds its card, graphs and figures only
        (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="a training run (best.pt, metrics.json) or a model (card.json)")
    parser.add_argument("--out", type=Path, help="where the PNGs go (default: the folder itself)")
    parser.add_argument("--limit", type=int, default=0, help="use a seeded sample of N validation and N test images (a run trained with "
                        "--limit-eval uses its own sample by default)")
    parser.add_argument("--image-index", type=int, default=0, help="test image whose feature maps are drawn")
    args = parser.parse_args(argv)
    report = write_report(args.folder, args.out, args.limit, args.image_index)
    cal = report["calibration"]
    print(f"{report['subject']}: test accuracy {report['test_accuracy_measured']:.4f} on {report['test_images']} "
          f"images; ECE {cal['test_ece_before']:.4f} -> {cal['test_ece_after']:.4f}, NLL {cal['test_nll_before']:.4f} "
          f"-> {cal['test_nll_after']:.4f} at T = {cal['temperature']:.3f}; Grad-CAM central share "
          f"{report['gradcam']['central_share_mean']:.3f}, above uniform for "
          f"{100 * report['gradcam']['share_of_images_above_uniform']:.0f}% of {report['gradcam']['images']} images; "
          f"wrote {len(report['figures'])} figures")


if __name__ == "__main__":
    main()
