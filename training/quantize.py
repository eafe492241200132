"""An INT8 registry entry from an exported one: ONNX Runtime static quantisation, per channel.

    python -m training.quantize models/cifar10 --name cifar10-int8

The entry's float32 ONNX graph (softmax, test-time augmentation and calibration temperature
included) is quantised with ``onnxruntime.quantization.quantize_static``: QDQ format, signed 8-bit
weights per output channel and unsigned 8-bit activations per tensor (U8S8, ONNX Runtime's choice
for x86: its CPU provider then fuses each quantised convolution into one ``QLinearConv``; with
signed activations it did not, and the graph ran no faster than float), activation ranges
calibrated (min/max) on ``--calibration-images`` images of the entry's *training* split (seeded
sample), never on validation or test. Convolutions and matrix products are quantised; the softmax
stays in float. ONNX Runtime runs the result with its integer kernels (VNNI / AMX-INT8 where the
CPU has them).

An entry whose card has an ``ood`` section (its graph also returns ``ood_score``) gets one too,
fitted again on the INT8 graph's own features (:mod:`training.quantize_ood`): the scorer stays in
float, its statistics, threshold and figures are the INT8 graph's.

The new entry is ONNX only (TorchScript has no such graph; ``IMGCLF_BACKEND=torchscript`` skips
it). Its card is the source card with the artifact, a new version and ``quantization``: the
source version, the calibration sample, the validation and test accuracy measured here on the
INT8 graph beside the float32 graph's, top-1 agreement with it on the test split and the largest
probability difference. Nothing is written unless the INT8 graph's test accuracy is within
``--max-drop`` of the float32 graph's.
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from service.card import Artifact, InputSpec, ModelCard, OODSpec, read_card, write_card
from service.preprocess import normalize
from service.registry import sha256_file, verify_artifact
from training.data import Dataset, seeded_permutation
from training.evaluation import onnx_image_outputs
from training.splits import card_dataset
from training.quantize_ood import attach_scorer, features_graph, refit
from training.staging import swap_in

INT8_FILE = "model.onnx"  # the entry's ONNX graph, whatever its arithmetic: the card says (quantization)


class CalibrationImages:
    """``onnxruntime.quantization.CalibrationDataReader``'s protocol (``get_next``) over normalised
    batches of a sample of the training split."""

    def __init__(self, images: np.ndarray, spec: InputSpec, input_name: str, batch_size: int = 64) -> None:
        self.batches: Iterator[np.ndarray] = (normalize(images[i:i + batch_size], spec)
                                              for i in range(0, len(images), batch_size))
        self.input_name = input_name

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.batches, None)
        return None if batch is None else {self.input_name: batch}


def quantize_graph(source: Path, target: Path, calibration: np.ndarray, spec: InputSpec) -> None:
    """Write the INT8 QDQ version of ``source`` to ``target``, calibrated on ``calibration``."""
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    input_name = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"]).get_inputs()[0].name
    with tempfile.TemporaryDirectory() as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        quant_pre_process(str(source), str(prepared))  # shape inference + graph optimisation first (ORT's advice)
        quantize_static(str(prepared), str(target), CalibrationImages(calibration, spec, input_name),
                        quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, op_types_to_quantize=["Conv", "Gemm", "MatMul"],
                        calibrate_method=CalibrationMethod.MinMax)


def quantize_entry(folder: Path, name: str, models_dir: Path, calibration_images: int = 1024,
                   max_drop: float = 0.01, seed: int = 0) -> Path:
    """Quantise registry entry ``folder`` into ``models_dir/name`` (see the module docstring)."""
    card = read_card(folder)
    fp32_path = verify_artifact(folder, card, "onnx")
    spec = card.input
    data: Dataset = card_dataset(card)
    sample = seeded_permutation(len(data.train), seed)[:calibration_images]
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=models_dir))
    staging.chmod(0o755)
    try:
        int8_path = staging / INT8_FILE
        ood_section = quantize_with_ood(card, fp32_path, int8_path, data, sample, staging) if card.ood else None
        if ood_section is None:
            quantize_graph(fp32_path, int8_path, data.train.images[sample].numpy(), spec)
        measured: dict[str, Any] = {}
        for split in ("val", "test"):
            part = getattr(data, split)
            labels = part.labels.numpy()
            int8 = onnx_image_outputs(int8_path, part.images.numpy(), spec)[0]
            fp32 = onnx_image_outputs(fp32_path, part.images.numpy(), spec)[0]
            measured[split] = {"int8": float((int8.argmax(1) == labels).mean()),
                               "fp32": float((fp32.argmax(1) == labels).mean()),
                               "agreement": float((int8.argmax(1) == fp32.argmax(1)).mean()),
                               "max_abs_diff": float(np.abs(int8 - fp32).max())}
        test = measured["test"]
        print(f"{name}: test accuracy int8 {test['int8']:.4f}, fp32 {test['fp32']:.4f} "
              f"(top-1 agreement {test['agreement']:.4f}); val int8 {measured['val']['int8']:.4f}")
        if test["fp32"] - test["int8"] > max_drop:
            raise SystemExit(f"int8 loses {100 * (test['fp32'] - test['int8']):.2f} points of test accuracy "
                             f"(> --max-drop {100 * max_drop:.2f}); nothing written")
        int8_sha256 = sha256_file(int8_path)
        new = card.updated(
            name=name, version=int8_sha256[:12],
            artifacts={"onnx": Artifact(INT8_FILE, int8_sha256, int8_path.stat().st_size)},
            metrics={**card.metrics, "val_accuracy": measured["val"]["int8"], "test_accuracy": test["int8"],
                     "measured_as": card.metrics["measured_as"] + "; measured at quantisation on the INT8 graph"},
            quantization={
                "method": "ONNX Runtime static quantisation (quantize_static): QDQ, int8 weights per output "
                          "channel, uint8 activations per tensor (min/max calibration); Conv, Gemm and MatMul "
                          "quantised, softmax in float",
                "source": card.name, "source_version": card.version,
                "calibration_images": int(len(sample)), "calibration_split": f"train (seed-{seed} sample)",
                "val": measured["val"], "test": measured["test"],
                "quantized": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "command": "python -m training.quantize " + " ".join(sys.argv[1:])},
            parity=None,  # the float graphs' parity; the INT8 graph's difference is under quantization
            ood=OODSpec.from_dict(ood_section) if ood_section else None)
        write_card(staging, new)
        target = swap_in(staging, models_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def quantize_with_ood(card: ModelCard, fp32_path: Path, int8_path: Path, data: Dataset, sample: np.ndarray,
                      scratch: Path) -> dict[str, Any]:
    """Quantise a graph that returns ``ood_score``: the network part quantised, the score refitted on
    its features and joined back (:mod:`training.quantize_ood`); returns the new ``ood`` section."""
    cut, quantized = scratch / "features.onnx", scratch / "features-int8.onnx"
    features = features_graph(fp32_path, cut)
    quantize_graph(cut, quantized, data.train.images[sample].numpy(), card.input)
    scorer, section = refit(card.ood.to_dict(), quantized, data, card.dataset, card.input)
    attach_scorer(quantized, features, scorer, section["parameters"]["feature_dim"], int8_path)
    cut.unlink()
    quantized.unlink()
    return {**section, "fitted_from_version": card.version,
            "fitted": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("entry", type=Path, help="registry entry to quantise (e.g. models/cifar10)")
    parser.add_argument("--name", required=True, help="the new entry's name, e.g. cifar10-int8")
    parser.add_argument("--models-dir", type=Path, help="registry to write into (default: the entry's own)")
    parser.add_argument("--calibration-images", type=int, default=1024)
    parser.add_argument("--max-drop", type=float, default=0.01, help="largest test-accuracy loss accepted (fraction)")
    args = parser.parse_args(argv)
    target = quantize_entry(args.entry, args.name, args.models_dir or args.entry.parent, args.calibration_images,
                            args.max_drop)
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
