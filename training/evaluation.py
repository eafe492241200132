"""How a classifier is measured: mean cross-entropy and top-1 accuracy over a split, an exported
ONNX graph's outputs over a split, and the words that say how the test figure was measured
(metrics.json and the model card)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from service.card import InputSpec
from service.preprocess import normalize
from training.data import ImageSet, batches
from training.precision import FP32, Precision

def onnx_image_outputs(path: Path, images: np.ndarray, spec: InputSpec, batch_size: int = 500,
                       threads: int = 0) -> list[np.ndarray]:
    """Every output of the ONNX graph at ``path`` (in the graph's order) for uint8 images
    (N, 3, H, W), normalised as ``spec`` says and run in batches on ONNX Runtime's CPU provider
    (``threads``: its intra-op threads; 0, its default)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    parts = [session.run(None, {name: normalize(images[i:i + batch_size], spec)})
             for i in range(0, len(images), batch_size)]
    return [np.concatenate([part[j] for part in parts]) for j in range(len(parts[0]))]


TTA_WORDS = {0: "", 1: ", with flip test-time augmentation", 2: ", with flip + translate test-time augmentation"}


def measured_as(test_images: int, tta_level: int, split: str) -> str:
    """How the test figure was measured, for metrics.json and the card."""
    return (f"top-1 accuracy of the best-validation checkpoint on the {test_images}-image test split, "
            f"preprocessed as the model card says{TTA_WORDS[tta_level]} ({split})")


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageSet, mean: Sequence[float], std: Sequence[float], batch_size: int = 500,
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
