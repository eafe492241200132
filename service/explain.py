"""Grad-CAM explanations (Selvaraju et al., 2017): where in the image the evidence for a class lies.

    png = gradcam_png("models/catsdogs/model.torchscript.pt", image_uint8, spec)   # top class
    png = gradcam_png(module, image_uint8, spec, class_index=1)                       # a given class

The heat is the ReLU of the last convolutional stage's activations weighted by the mean gradient
of the class's logit over each channel, upsampled to the image and drawn over it (Pillow only).

The PyTorch network is rebuilt from the registry's TorchScript file (its weights; the architecture
named by the ``card.json`` beside it) or from a training checkpoint (``best.pt``), because a
TorchScript module accepts no hooks. :func:`load_explainable` does that once (a caller serving
many requests keeps the module); the architectures live in ``training/nets.py`` (pure PyTorch), so
an image that explains needs that file beside ``service/``.

Input checking is the caller's job (the HTTP layer decodes uploads with the card's input spec);
what still fails here raises :class:`ExplainError` (a ``ValueError`` with ``error``/``detail``).
"""

from __future__ import annotations

import io
import json
import threading
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from service.preprocess import InputSpec, normalize

MIN_PNG_SIDE = 224  # small inputs (CIFAR's 32x32) are drawn larger
# A hook on a shared module sees every thread's forward pass: one explanation at a time per process.
_HOOK_LOCK = threading.Lock()


class ExplainError(ValueError):
    """A request that cannot be explained: ``error`` is a stable code, ``detail`` says why."""

    def __init__(self, error: str, detail: str) -> None:
        super().__init__(f"{error}: {detail}")
        self.error = error
        self.detail = detail


# --- the PyTorch network behind an exported file ----------------------------------------------


def strip_to(state: dict[str, torch.Tensor], wanted: Sequence[str]) -> dict[str, torch.Tensor]:
    """``state`` with the wrappers' ``model.`` prefixes (softmax, test-time augmentation) removed
    and export-only buffers (fixed-size pooling matrices) dropped, keyed like ``wanted``."""
    wanted = set(wanted)
    out = {}
    for key, value in state.items():
        while key not in wanted and key.startswith("model."):
            key = key[len("model."):]
        if key in wanted:
            out[key] = value
    return out


def build_network(architecture: str, num_classes: int) -> nn.Module:
    from training.nets import build_model  # pure PyTorch; imported only where explanations run

    return build_model(architecture, num_classes)


def load_explainable(source: str | Path | nn.Module) -> nn.Module:
    """An eager PyTorch module (eval mode, CPU) returning logits, from an ``nn.Module``, a registry
    TorchScript file (with its ``card.json`` beside it) or a training checkpoint (``best.pt``)."""
    if isinstance(source, torch.jit.ScriptModule):
        raise ExplainError("not_explainable", "pass the TorchScript file's path (its card names the "
                           "architecture), not a loaded ScriptModule: those accept no hooks")
    if isinstance(source, nn.Module):
        return source.eval()
    path = Path(source)
    card_path = path.parent / "card.json"
    if card_path.exists():
        card = json.loads(card_path.read_text())
        if card.get("artifacts", {}).get("torchscript", {}).get("file") == path.name:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                state = torch.jit.load(str(path), map_location="cpu").state_dict()
            net = build_network(card["architecture"], len(card["classes"]))
            net.load_state_dict(strip_to(state, net.state_dict().keys()))
            return net.eval()
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    net = build_network(checkpoint["arch"], len(checkpoint["classes"]))
    net.load_state_dict(checkpoint["state_dict"])
    return net.eval()


POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def feature_stages(net: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules whose outputs are the network's stages (each resolution's last feature map),
    in order; the last one is the final convolutional stage that Grad-CAM explains."""
    if isinstance(getattr(net, "stages", None), nn.Sequential) and hasattr(net, "stem"):  # CIFAR ResNets
        return [("stem", net.stem)] + [(f"stages.{i}", s) for i, s in enumerate(net.stages)]
    if isinstance(getattr(net, "groups", None), nn.Sequential):  # FastNet
        return [(f"groups.{i}", g) for i, g in enumerate(net.groups)]
    if all(hasattr(net, f"layer{i}") for i in range(1, 5)):  # torchvision ResNet
        return [(f"layer{i}", getattr(net, f"layer{i}")) for i in range(1, 5)]
    body = getattr(net, "features", None) or getattr(net, "blocks", None)
    if isinstance(body, nn.Sequential):
        name = "features" if body is getattr(net, "features", None) else "blocks"
        children = list(body.named_children())
        stages = [(f"{name}.{n}", m) for (n, m), (_, after) in zip(children, children[1:])
                  if isinstance(after, POOLS) and not isinstance(m, POOLS)]
        if hasattr(net, "stem") and not isinstance(children[0][1], POOLS):  # GoogLeNet: the stem first
            stages.insert(0, ("stem", net.stem))
        if stages:
            return stages
    raise ExplainError("not_explainable", f"no convolutional stages known for {type(net).__name__}")


# --- Grad-CAM ----------------------------------------------------------------------------------


def gradcam(net: nn.Module, image_uint8: np.ndarray, spec: InputSpec,
            class_index: int | None = None) -> tuple[np.ndarray, int, np.ndarray]:
    """(heat (H, W) in [0, 1] at the image's size, the explained class, the class probabilities)
    for one (3, H, W) uint8 image preprocessed as ``spec`` says."""
    image_uint8 = np.asarray(image_uint8)
    if image_uint8.ndim != 3 or image_uint8.shape[0] != 3 or image_uint8.dtype != np.uint8:
        raise ExplainError("bad_image", f"expected a (3, H, W) uint8 array, got {image_uint8.shape} "
                           f"{image_uint8.dtype}")
    net = net.eval()
    target = feature_stages(net)[-1][1]
    with _HOOK_LOCK:
        return _gradcam_locked(net, target, image_uint8, spec, class_index)


def _gradcam_locked(net: nn.Module, target: nn.Module, image_uint8: np.ndarray, spec: InputSpec,
                    class_index: int | None) -> tuple[np.ndarray, int, np.ndarray]:
    captured: list[torch.Tensor] = []
    hook = target.register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        with torch.inference_mode(False), torch.enable_grad():  # whatever mode the caller runs in
            x = torch.from_numpy(normalize(image_uint8[None], spec))
            logits = net(x)
            n_classes = logits.shape[1]
            if class_index is None:
                class_index = int(logits[0].argmax())
            elif not 0 <= class_index < n_classes:
                raise ExplainError("bad_class", f"class index {class_index} is outside 0..{n_classes - 1}")
            activation = captured[-1]
            gradient, = torch.autograd.grad(logits[0, class_index], activation)
    finally:
        hook.remove()
    weights = gradient.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * activation).sum(1, keepdim=True)).detach()
    cam = nn.functional.interpolate(cam, size=image_uint8.shape[1:], mode="bilinear", align_corners=False)[0, 0]
    peak = float(cam.max())
    heat = (cam / peak).numpy() if peak > 0 else np.zeros(image_uint8.shape[1:], np.float32)
    return heat.astype(np.float32), class_index, torch.softmax(logits.detach(), 1)[0].numpy()


def colormap(values: np.ndarray) -> np.ndarray:
    """[0, 1] -> RGB uint8, a jet-like ramp (blue, cyan, yellow, red) without matplotlib."""
    stops = np.array([0.0, 0.35, 0.65, 1.0])
    colours = np.array([[0, 0, 160], [0, 200, 255], [255, 230, 0], [220, 0, 0]], dtype=np.float32)
    channels = [np.interp(values, stops, colours[:, c]) for c in range(3)]
    return np.stack(channels, -1).astype(np.uint8)


def overlay_png(image_uint8: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> bytes:
    """The image with the heat drawn over it, as PNG bytes (at least 224 pixels on the short side)."""
    h, w = image_uint8.shape[1:]
    scale = max(1, -(-MIN_PNG_SIDE // min(h, w)))
    size = (w * scale, h * scale)
    base = Image.fromarray(np.ascontiguousarray(image_uint8.transpose(1, 2, 0))).resize(size, Image.Resampling.BICUBIC)
    heat_big = np.asarray(Image.fromarray((heat * 255).astype(np.uint8)).resize(size, Image.Resampling.BILINEAR))
    coloured = Image.fromarray(colormap(heat_big / 255.0))
    out = io.BytesIO()
    Image.blend(base, coloured, alpha).save(out, format="PNG", optimize=True)
    return out.getvalue()


def gradcam_png(model_path_or_module: str | Path | nn.Module, image_uint8: np.ndarray, spec: InputSpec,
                class_index: int | None = None) -> bytes:
    """Grad-CAM over ``image_uint8`` ((3, H, W) uint8 at the card's input size) for ``class_index``
    (default: the top class), as PNG bytes. Raises :class:`ExplainError` (``bad_image``,
    ``bad_class``, ``not_explainable``)."""
    net = load_explainable(model_path_or_module)
    heat, _, _ = gradcam(net, image_uint8, spec, class_index)
    return overlay_png(np.asarray(image_uint8), heat)


def central_share(heat: np.ndarray, fraction: float = 0.5) -> float:
    """Share of the total heat inside the central box covering ``fraction`` of each side (a box of
    ``fraction**2`` of the area: 0.25 for 0.5, the share a uniform map would have)."""
    h, w = heat.shape
    top, left = round(h * (1 - fraction) / 2), round(w * (1 - fraction) / 2)
    total = float(heat.sum())
    inner = float(heat[top:h - top, left:w - left].sum())
    return inner / total if total > 0 else 0.0
