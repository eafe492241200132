"""Export a trained checkpoint into the model registry: TorchScript + ONNX + card.json.

    python -m training.export runs/cifar10-resnet20 --name cifar10

The exported graphs include the softmax, so every backend returns probabilities. Before anything
is written, ONNX Runtime's and TorchScript's outputs on real test images must match the PyTorch
model within ``--tolerance`` (max abs difference of the probabilities), or the export fails.
The registry entry is assembled in a staging folder and swapped in whole (:mod:`training.staging`);
this module decides what the graphs compute and what the card (a :class:`service.card.ModelCard`) says.

Calibration (on unless ``--no-calibrate``): one temperature ``T`` is fitted on the validation split
by NLL and the graphs output ``softmax(logits / T)``; the card's ``calibration`` records ``T`` and
the test split's ECE (15 bins) and NLL before and after (:mod:`training.calibration`).

``--tta train`` (the default) exports the test-time augmentation the run was evaluated with (its
checkpoint records it: none for most recipes, flip + translate for the fast presets), so the card's
accuracies are the run's own. ``--tta flip`` exports a graph that averages the logits of each image
and its mirror image (twice the inference cost); ``--tta auto`` does so only if that raises
validation accuracy. Those two re-measure the card's accuracies for the graph that ships; the test
split decides nothing.

Out-of-distribution score (on unless ``--no-ood``; :mod:`training.ood_fit`, docs/OOD.md): statistics
of the penultimate features fitted on the training split and carried by the graphs, which then
return ``(probabilities, ood_score)`` (ONNX outputs ``probabilities`` and ``ood_score``); the card's
``ood`` section records the threshold (95 % TPR on validation) and the figures measured on the
proxy OOD sets. ``--ood-entry MODEL_DIR`` does the same for an entry already in the registry whose
run is gone; its probabilities must stay what they were (the new ONNX graph's against the old
one's within 1e-6 on real test images).

``--calibrate-entry MODEL_DIR`` calibrates an entry already in the registry whose run is gone (the
shipped models were exported before calibration existed): its network is rebuilt from the
TorchScript weights and checked against its ONNX and TorchScript graphs, then re-exported the same way.

Export rebuilds exactly the run's split (dataset, seed, data root, image size: recorded in the
checkpoint) for its parity images and any re-measurement. The card's validation and test
accuracies are those of the float32 graph that ships, read off the logits calibration is fitted on
(:class:`ShippedLogits`); the run's own figures (perhaps measured in bf16) stay in the card's
``training.training_eval``, with its precision and the hardware it trained on.
``--trained-precision`` states the precision of a run whose ``metrics.json`` predates that record.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from service.card import Artifact, InputSpec, ModelCard, OODSpec
from service.preprocess import normalize
from training.cam import rebuild_from_registry
from training.data import REPO_ROOT, Dataset
from training.evaluation import evaluate, measured_as
from training.graph import TestTimeAugment, WithSoftmax, serving_graph, with_tta
from training.nets import build_model
from training.ood_fit import fit_ood
from training.ood_graph import WithOOD
from training.splits import card_dataset, checkpoint_dataset
from training.staging import check_parity, install_entry


@torch.no_grad()
def split_logits(model: nn.Module, images: torch.Tensor, spec: InputSpec, batch_size: int = 0,
                 device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """The model's fp32 logits (on the CPU) for a split's uint8 images, preprocessed as the card says,
    computed on ``device`` (a GPU host's CPU would take minutes for a TTA graph). ``batch_size``
    0: as many images as make ~32 MB of input (500 at 32 px, 75 at 192 px)."""
    batch_size = batch_size or max(1, min(500, (32 << 20) // (4 * images[0].numel())))
    model.eval().to(device)
    try:
        return torch.cat([model(torch.from_numpy(normalize(images[i:i + batch_size].numpy(), spec)).to(device))
                          .float().cpu() for i in range(0, len(images), batch_size)])
    finally:
        model.to("cpu")


@dataclass
class ShippedLogits:
    """The float32 logits of the graph that ships (before softmax and temperature) on the run's
    validation and test splits: calibration is fitted on them and the card's accuracies read off
    them, so the card describes what the service computes (a run may have trained and evaluated
    in bf16)."""

    val: torch.Tensor
    val_labels: torch.Tensor
    test: torch.Tensor
    test_labels: torch.Tensor

    @classmethod
    def of(cls, model: nn.Module, data: Dataset, spec: InputSpec,
           device: torch.device = torch.device("cpu")) -> "ShippedLogits":
        val, test = data.val.to(torch.device("cpu")), data.test.to(torch.device("cpu"))
        return cls(split_logits(model, val.images, spec, device=device), val.labels,
                   split_logits(model, test.images, spec, device=device), test.labels)

    def accuracy(self, split: str) -> float:
        logits, labels = (self.val, self.val_labels) if split == "val" else (self.test, self.test_labels)
        return float((logits.argmax(1) == labels).double().mean())


def fit_calibration(logits: ShippedLogits) -> dict[str, Any]:
    """Temperature scaling for the graph that ships: T fitted on the validation split by NLL; the
    test split's ECE and NLL before and after (the card's ``calibration``)."""
    from training.calibration import calibration_summary

    summary = calibration_summary(logits.val, logits.val_labels, logits.test, logits.test_labels)
    print(f"calibration: T = {summary['temperature']:.4f}; test ECE {summary['test_ece_before']:.4f} -> "
          f"{summary['test_ece_after']:.4f}, NLL {summary['test_nll_before']:.4f} -> {summary['test_nll_after']:.4f}")
    return summary


def remeasure_in_fp32(metrics: dict[str, Any], logits: ShippedLogits) -> None:
    """Put the float32 graph's validation and test accuracy into ``metrics`` (what the card reports;
    the run's own figures stay in ``training_eval``)."""
    val, test = logits.accuracy("val"), logits.accuracy("test")
    if (val, test) != (metrics["val_accuracy"], metrics["test_accuracy"]):
        print(f"accuracy of the exported float32 graph: val {val:.4f}, test {test:.4f} "
              f"(before: {metrics['val_accuracy']:.4f} / {metrics['test_accuracy']:.4f})")
        metrics["test_measured_as"] += "; measured at export on the float32 graph that ships"
    metrics.update(val_accuracy=val, test_accuracy=test)


def load_checkpoint(run_dir: Path) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    ckpt = torch.load(run_dir / "best.pt", map_location="cpu", weights_only=True)
    model = build_model(ckpt["arch"], len(ckpt["classes"]))
    model.load_state_dict(ckpt["state_dict"])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return model.eval(), ckpt, metrics


TTA_LEVELS = {"none": 0, "flip": 1, "flip_translate": 2}
TTA_KINDS = {1: "horizontal flip, logits averaged",
             2: "horizontal flip and one-pixel translations, logits averaged (airbench's level 2)"}


def apply_tta(model: nn.Module, data: Dataset, mode: str, metrics: dict[str, Any],
              trained_level: int) -> tuple[nn.Module, dict | None]:
    """Wrap ``model`` in :class:`TestTimeAugment` as ``mode`` asks: ``train`` keeps the level the run
    was evaluated with (its metrics already describe that graph); ``none``/``flip``/``flip_translate``
    force a level and ``auto`` picks flip if validation accuracy rises. A level other than the run's
    re-measures validation and test accuracy in ``metrics`` for what ships."""
    level = trained_level if mode == "train" else TTA_LEVELS.get(mode, 1)
    if mode == "auto" or level != trained_level:
        cpu = [s.to(torch.device("cpu")) for s in (data.val, data.test)]
        base = with_tta(model, trained_level)
        # both measured here, in fp32 on the CPU: metrics.json may come from a bf16 GPU run
        val_before = evaluate(base, cpu[0], data.mean, data.std)[1]
        candidate = TestTimeAugment(model, level).eval() if level else model
        val_after = evaluate(candidate, cpu[0], data.mean, data.std)[1]
        print(f"validation accuracy: trained graph {val_before:.4f}, candidate (level {level}) {val_after:.4f}")
        if mode == "auto" and not val_after > val_before:
            level = trained_level
        else:
            test_loss, test_acc = evaluate(candidate, cpu[1], data.mean, data.std)
            # for the record (the test split chose nothing): the trained graph's, in fp32 too
            test_before = evaluate(base, cpu[1], data.mean, data.std)[1]
            # "without": the graph the run trained and evaluated (test-time augmentation level trained_level)
            tta_note = {"chosen_by": f"--tta {mode}", "trained_level": trained_level,
                        "val_accuracy_without": val_before, "test_accuracy_without": test_before}
            metrics.update(val_accuracy=val_after, test_accuracy=test_acc, test_loss=test_loss,
                           test_measured_as=measured_as(metrics["test_images"], level, metrics["split"]) +
                           "; test-time augmentation chosen at export")
            return candidate, ({"kind": TTA_KINDS[level], "level": level, **tta_note} if level else None)
    if not level:
        return model, None
    return TestTimeAugment(model, level).eval(), {"kind": TTA_KINDS[level], "level": level,
                                                  "chosen_by": "the training run's own evaluation"}


def calibrated_output(temperature: float) -> str:
    return (f"temperature-scaled softmax probabilities over classes, in card order: "
            f"softmax(logits / {temperature:.4f}) (the graphs include it; see calibration)")


def compute_device(device: str) -> torch.device:
    """``auto``: CUDA when usable, else the CPU; otherwise the device named."""
    return torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                        "cpu" if device == "auto" else device)


# The keys of an exported card, in the order they are written (then test-time augmentation and
# calibration, where the graphs have them).
EXPORTED_CARD_ORDER = ("name", "version", "task", "classes", "input", "output", "architecture", "parameters",
                       "metrics", "training", "split_spec", "artifacts", "parity", "exported", "export_command")
TRAINING_RECORD = ("command", "dataset", "data_source", "data_fingerprint", "split", "seed", "best_epoch",
                   "train_seconds", "hardware", "torch", "init_from")
TRAINING_RECORD_OPTIONAL = ("preset", "precision", "precision_reason", "cpu_flags", "training_eval")


def build_card(name: str, ckpt: dict[str, Any], metrics: dict[str, Any], artifacts: dict[str, Artifact],
               parity: dict[str, float], tta: dict | None, calibration: dict | None = None,
               ood: dict | None = None) -> ModelCard:
    """The card of a run's export: what it computes, how well, how it was trained and its files."""
    output = calibrated_output(calibration["temperature"]) if calibration else \
        "softmax probabilities over classes, in card order (the graphs include the softmax)"
    return ModelCard(
        name=name,
        version=artifacts["onnx"].sha256[:12],
        classes=tuple(ckpt["classes"]),
        input=InputSpec.from_dict(ckpt["input"]),
        artifacts=artifacts,
        architecture=ckpt["arch"],
        metrics={"test_accuracy": metrics["test_accuracy"], "test_images": metrics["test_images"],
                 "val_accuracy": metrics["val_accuracy"], "measured_as": metrics["test_measured_as"]},
        training={**{key: metrics[key] for key in TRAINING_RECORD},
                  **{key: metrics[key] for key in TRAINING_RECORD_OPTIONAL if metrics.get(key) is not None}},
        split_spec=metrics.get("data"),  # what export and re-measurement rebuild the split from
        test_time_augmentation=tta or None,
        calibration=calibration or None,
        ood=OODSpec.from_dict(ood) if ood else None,
        extra={"task": "image-classification", "output": output, "parameters": metrics["parameters"],
               "parity": parity, "exported": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
               "export_command": "python -m training.export " + " ".join(sys.argv[1:])},
        order=EXPORTED_CARD_ORDER + (("test_time_augmentation",) if tta else ()) +
        (("calibration",) if calibration else ()) + (("ood",) if ood else ()))


def export(run_dir: Path, name: str, models_dir: Path, tolerance: float, parity_count: int,
           tta_mode: str = "train", calibrate: bool = False, device: str = "cpu",
           trained_precision: str | None = None, ood: bool = False) -> Path:
    """``calibrate``: fold a temperature fitted on the validation split into the graphs (the
    command line does so unless ``--no-calibrate``; this function's default keeps plain softmax).
    ``trained_precision``: what the run trained in, for a ``metrics.json`` that does not say."""
    net, ckpt, metrics = load_checkpoint(run_dir)
    if "precision" not in metrics and trained_precision:
        metrics.update(precision=trained_precision, precision_reason=f"not in the run's metrics.json; stated at "
                                                                     f"export (--trained-precision {trained_precision})")
    metrics["training_eval"] = {"precision": metrics.get("precision", "fp32"), "tta_level": int(ckpt.get("tta", 0)),
                                **{key: metrics[key] for key in ("val_accuracy", "test_accuracy")}}
    spec = InputSpec.from_dict(ckpt["input"])
    data = checkpoint_dataset(ckpt, metrics, spec)
    plain = net  # Grad-CAM explains the network itself, not its test-time-augmented average
    net, tta = apply_tta(net, data, tta_mode, metrics, int(ckpt.get("tta", 0)))
    logits = ShippedLogits.of(net, data, spec, compute_device(device))
    remeasure_in_fp32(metrics, logits)
    calibration = fit_calibration(logits) if calibrate else None
    model: nn.Module = WithSoftmax(net, calibration["temperature"] if calibration else 1.0).eval()
    ood_section = None
    if ood:  # the statistics of the graph's own features: fitted after the temperature is folded in
        level = tta["level"] if tta else 0
        scorer, ood_section = fit_ood(model, plain, level, data, metrics["dataset"], spec.size, spec)
        model = WithOOD(model, plain, level, scorer).eval()
    # parity on the first images of the real test split
    inputs = normalize(data.test.images[:parity_count].numpy(), spec)
    target, card = install_entry(models_dir, name, model, plain, inputs, tolerance,
                                 lambda artifacts, parity: build_card(name, ckpt, metrics, artifacts, parity, tta,
                                                                      calibration, ood_section),
                                 [run_dir / "curves.png"])
    parity = card.extra["parity"]
    print(f"exported {name} v{card.version} to {target}: test accuracy {card.metrics['test_accuracy']:.4f}, "
          f"parity onnx {parity['max_abs_diff_onnx']:.2e} torchscript {parity['max_abs_diff_torchscript']:.2e}")
    return target


def calibrate_entry(folder: Path, tolerance: float = 1e-4, parity_count: int = 256,
                    device: str = "cpu") -> Path:
    """Fold a temperature into a registry entry whose training run is gone (the shipped models):
    rebuild its network from the TorchScript weights, check that it computes the entry's ONNX and
    TorchScript graphs on real test images, fit ``T`` on the card's validation split, and re-export both formats
    as ``softmax(logits / T)``. Accuracy is unchanged (``T`` > 0 keeps the argmax); the card keeps
    its training record and gains ``calibration``, a new version and the command."""
    plain, card = rebuild_from_registry(folder)
    if card.calibration:
        raise SystemExit(f"{folder}: already calibrated (T = {card.temperature:.4f})")
    spec = card.input
    data = card_dataset(card)
    inputs = normalize(data.test.images[:parity_count].numpy(), spec)
    uncalibrated = serving_graph(plain, card)  # softmax over the (test-time augmented) logits
    # the rebuilt network computes what the entry's two graphs serve (else SystemExit)
    check_parity(uncalibrated, folder / card.artifact("onnx").file, folder / card.artifact("torchscript").file,
                 inputs, tolerance)
    net = uncalibrated.model
    calibration = fit_calibration(ShippedLogits.of(net, data, spec, compute_device(device)))
    model = WithSoftmax(net, calibration["temperature"]).eval()

    def recalibrated_card(artifacts: dict[str, Artifact], parity: dict[str, float]) -> ModelCard:
        return card.updated(version=artifacts["onnx"].sha256[:12], artifacts=artifacts, parity=parity,
                            calibration={**calibration, "recalibrated_from_version": card.version},
                            output=calibrated_output(calibration["temperature"]),
                            calibrated=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                            calibrate_command=f"python -m training.export --calibrate-entry {folder}")

    figures = sorted(folder.glob("*.png"))  # curves and report figures travel with the entry
    target, new = install_entry(folder.parent, folder.name, model, plain, inputs, tolerance, recalibrated_card,
                                figures)
    print(f"calibrated {folder.name}: v{card.version} -> v{new.version}, T = {calibration['temperature']:.4f}, "
          f"test ECE {calibration['test_ece_before']:.4f} -> {calibration['test_ece_after']:.4f}")
    return target


def ood_entry(folder: Path, tolerance: float = 1e-4, parity_count: int = 256, scale: float = 1.0) -> Path:
    """Give a registry entry whose training run is gone an out-of-distribution score, in place:
    rebuild its network from the TorchScript weights, check that it computes the entry's graphs on
    real test images, fit the score on the card's training split (:func:`training.ood_fit.fit_ood`)
    and re-export both formats returning ``(probabilities, ood_score)``. The probabilities must equal
    the old ONNX graph's within 1e-6; the card keeps everything else and gains ``ood`` (refitted when
    it had one), a new version and the command."""
    plain, card = rebuild_from_registry(folder)
    spec = card.input
    data = card_dataset(card)
    inputs = normalize(data.test.images[:parity_count].numpy(), spec)
    serving = serving_graph(plain, card)  # the probabilities, exactly as the entry computes them
    onnx_path = folder / card.artifact("onnx").file
    check_parity(serving, onnx_path, folder / card.artifact("torchscript").file, inputs, tolerance)
    scorer, section = fit_ood(serving, plain, card.tta_level, data, card.dataset, spec.size, spec, scale)
    model = WithOOD(serving, plain, card.tta_level, scorer).eval()
    command = f"python -m training.export --ood-entry {folder}" + (f" --ood-scale {scale:g}" if scale != 1 else "")
    section = {**section, "fitted_from_version": card.version,
               "fitted": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "command": command}

    def with_ood(artifacts: dict[str, Artifact], parity: dict[str, float]) -> ModelCard:
        return card.updated(version=artifacts["onnx"].sha256[:12], artifacts=artifacts, parity=parity,
                            ood=OODSpec.from_dict(section))

    figures = sorted(folder.glob("*.png"))
    target, new = install_entry(folder.parent, folder.name, model, plain, inputs, tolerance, with_ood, figures,
                                previous_onnx=onnx_path)
    parity = new.extra["parity"]
    print(f"ood: {folder.name} v{card.version} -> v{new.version}; probabilities vs the previous graph "
          f"{parity['max_abs_diff_vs_previous_onnx']:.2e}; ood_score onnx {parity['ood_score_max_rel_diff_onnx']:.2e} "
          f"torchscript {parity['ood_score_max_rel_diff_torchscript']:.2e} (relative)")
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, nargs="?", help="training output folder (holds best.pt, metrics.json)")
    parser.add_argument("--name", help="registry name, e.g. cifar10")
    parser.add_argument("--calibrate-entry", type=Path, metavar="MODEL_DIR",
                        help="instead: fold a fitted temperature into an existing registry entry whose run is "
                             "gone (e.g. models/cifar10), in place")
    parser.add_argument("--ood-entry", type=Path, metavar="MODEL_DIR",
                        help="instead: fit the out-of-distribution score for an existing registry entry whose run "
                             "is gone, in place (the graphs then also return ood_score)")
    parser.add_argument("--ood", action=argparse.BooleanOptionalAction, default=True,
                        help="fit the out-of-distribution score at export (docs/OOD.md)")
    parser.add_argument("--ood-scale", type=float, default=1.0,
                        help="with --ood-entry: multiply the proxy OOD sets' sizes (1: the shipped figures)")
    parser.add_argument("--models-dir", type=Path, default=REPO_ROOT / "models")
    parser.add_argument("--tolerance", type=float, default=1e-4)
    parser.add_argument("--parity-images", type=int, default=256)
    parser.add_argument("--tta", choices=["train", "none", "flip", "flip_translate", "auto"], default="train",
                        help="train: what the run was evaluated with; flip: average with the mirror image; "
                             "auto: flip only if validation accuracy rises")
    parser.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=True,
                        help="fit a temperature on the validation split (NLL) and fold it into the graphs; "
                             "the card records ECE and NLL before and after on the test split")
    parser.add_argument("--device", default="auto", help="where calibration computes logits (auto: CUDA if usable)")
    parser.add_argument("--trained-precision", choices=["bf16", "fp32"],
                        help="the precision the run trained in, recorded in the card when its metrics.json predates "
                             "that record (the 2026-12-03 runs in ../shared/runs: bf16, per their README)")
    args = parser.parse_args(argv)
    if args.calibrate_entry:
        calibrate_entry(args.calibrate_entry, args.tolerance, args.parity_images, args.device)
        return
    if args.ood_entry:
        ood_entry(args.ood_entry, args.tolerance, args.parity_images, args.ood_scale)
        return
    if args.run_dir is None or args.name is None:
        parser.error("a run folder and --name are needed (or --calibrate-entry MODEL_DIR)")
    export(args.run_dir, args.name, args.models_dir, args.tolerance, args.parity_images, args.tta, args.calibrate,
           args.device, args.trained_precision, args.ood)


if __name__ == "__main__":
    main()
