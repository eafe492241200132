"""Grad-CAM explanations (Selvaraju et al., 2017): where in the image the evidence for a class lies.

    net = load_explainable("models/catsdogs")                 # the registry entry's Grad-CAM graph
    png = gradcam_png(net, image_uint8, spec)                  # top class
    png = gradcam_png(net, image_uint8, spec, class_index=1)   # a given class

The heat is the ReLU of the last convolutional stage's activations weighted by the mean gradient
of the class's logit over each channel, upsampled to the image and drawn over it (Pillow only).

A TorchScript file takes no hooks and the service imports nothing from ``training/``, so export
traces the registry's TorchScript artifact with a second method beside ``forward``: ``cam``, which
returns ``(logits, last stage's feature map)`` with the same weights (:mod:`training.cam`). Here it
runs with gradients on, and the class logit is differentiated with respect to that map.

Input checking is the caller's job (the HTTP layer decodes uploads with the card's input spec);
what still fails here raises :class:`ExplainError` (a ``ValueError`` with ``error``/``detail``).
:class:`Explainer` is ``POST /explain``'s side of it in an API worker. PyTorch is imported when
the first explanation runs, never at import: a worker that serves ONNX and is never asked to
explain does not load it.
"""

from __future__ import annotations

import asyncio
import io
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from service.batching import Overloaded
from service.card import InputSpec, ModelCard, RegistryError, read_card
from service.pipeline import decode_or_error
from service.preprocess import DecodeBudget, ImageError, normalize
from service.registry import verify_artifact

if TYPE_CHECKING:
    from torch import nn

MIN_PNG_SIDE = 224  # small inputs (CIFAR's 32x32) are drawn larger


class ExplainError(ValueError):
    """A request that cannot be explained: ``error`` is a stable code, ``detail`` says why."""

    def __init__(self, error: str, detail: str) -> None:
        super().__init__(f"{error}: {detail}")
        self.error = error
        self.detail = detail


def load_explainable(source: str | Path | nn.Module) -> nn.Module:
    """A module with a ``cam`` method (logits, feature map): a registry entry's TorchScript artifact
    (``source`` is its folder or any file in it; its card's sha256 is checked), or a module given."""
    import torch

    if isinstance(source, torch.nn.Module):
        module = source
    else:
        path = Path(source)
        folder = path if path.is_dir() else path.parent
        try:
            ts_path = verify_artifact(folder, read_card(folder), "torchscript")
        except (OSError, RegistryError) as exc:
            raise ExplainError("not_explainable", f"cannot load the TorchScript graph of {folder}: {exc}") from None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(str(ts_path), map_location="cpu")
    if not hasattr(module, "cam"):
        raise ExplainError("not_explainable", "this graph has no Grad-CAM method: re-export the model, or run "
                           "python -m training.cam MODEL_DIR for an older registry entry")
    return module.eval()


# --- Grad-CAM ----------------------------------------------------------------------------------


def gradcam(net: nn.Module, image_uint8: np.ndarray, spec: InputSpec,
            class_index: int | None = None) -> tuple[np.ndarray, int, np.ndarray]:
    """(heat (H, W) in [0, 1] at the image's size, the explained class, the class probabilities)
    for one (3, H, W) uint8 image preprocessed as ``spec`` says. ``net`` has a ``cam`` method
    (:func:`load_explainable`); nothing is shared between calls, so threads may call at once."""
    import torch

    image_uint8 = np.asarray(image_uint8)
    if image_uint8.ndim != 3 or image_uint8.shape[0] != 3 or image_uint8.dtype != np.uint8:
        raise ExplainError("bad_image", f"expected a (3, H, W) uint8 array, got {image_uint8.shape} "
                           f"{image_uint8.dtype}")
    # The graph runs as traced (optimized_execution off): TorchScript's profiling executor fuses
    # small graphs into differentiable subgraphs that drop the feature map's gradient ("not used in
    # the graph": seen with a one-convolution network), and it spent ~7 s a call re-profiling the
    # catsdogs graph on its first explanations, for nothing after (0.64 s a call either way).
    with torch.inference_mode(False), torch.enable_grad(), torch.jit.optimized_execution(False):
        x = torch.from_numpy(normalize(image_uint8[None], spec)).requires_grad_(True)
        if not hasattr(net, "cam"):
            raise ExplainError("not_explainable", "this graph has no Grad-CAM method (see load_explainable)")
        logits, activation = net.eval().cam(x)
        n_classes = logits.shape[1]
        if class_index is None:  # the served answer's top class (its graph may average views)
            with torch.no_grad():
                class_index = int(net(x.detach())[0].argmax())
        elif not 0 <= class_index < n_classes:
            raise ExplainError("bad_class", f"class index {class_index} is outside 0..{n_classes - 1}")
        gradient, = torch.autograd.grad(logits[0, class_index], activation)
    weights = gradient.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * activation).sum(1, keepdim=True)).detach()
    cam = torch.nn.functional.interpolate(cam, size=image_uint8.shape[1:], mode="bilinear", align_corners=False)[0, 0]
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


# --- POST /explain in an API worker ----------------------------------------------------------------

class NotExplainable(Exception):
    """The model's registry entry has nothing Grad-CAM can run (the API answers 501)."""


class Explainer:
    """Grad-CAM for ``POST /explain``, in the API worker on the CPU.

    Each model's Grad-CAM network is loaded by :func:`load_explainable` from its registry entry
    (the TorchScript file, hash checked against the card) the first time it is asked for, once per
    worker. One explanation runs at a time per worker, in a thread (the event loop keeps serving);
    at most ``max_waiting`` more wait for their turn, and past that a request is refused with
    :class:`~service.batching.Overloaded`.
    """

    def __init__(self, models_dir: Path, cards: dict[str, ModelCard], max_pixels: int,
                 budget: DecodeBudget | None = None, max_waiting: int = 4) -> None:
        self.models_dir = models_dir
        self.cards = cards
        self.max_pixels = max_pixels
        self.budget = budget
        self.max_waiting = max_waiting
        self.nets: dict[str, Any] = {}  # model name -> torch.nn.Module, loaded on first use
        self.turn = asyncio.Lock()
        self.waiting = 0  # requests queued for or holding the turn

    def network(self, model: str) -> Any:
        if model not in self.nets:
            folder = self.models_dir / model
            self.nets[model] = load_explainable(verify_artifact(folder, self.cards[model], "torchscript"))
        return self.nets[model]

    def explain(self, model: str, data: bytes, class_index: int | None) -> bytes | ImageError:
        """Decode as ``/classify`` does (the card's size, the pixel limit), then the Grad-CAM PNG."""
        card = self.cards[model]
        pixels = decode_or_error(data, card.input.size, self.max_pixels, self.budget)
        if isinstance(pixels, ImageError):
            return pixels
        try:
            return gradcam_png(self.network(model), pixels, card.input, class_index)
        except RegistryError as exc:
            raise NotExplainable(str(exc)) from None
        except ExplainError as exc:
            raise NotExplainable(exc.detail) from None

    async def __call__(self, model: str, data: bytes, class_index: int | None) -> bytes | ImageError:
        if self.waiting > self.max_waiting:
            raise Overloaded(f"{self.waiting} explanations are running or waiting in this worker "
                             f"(one runs at a time)", max(1, self.waiting))
        self.waiting += 1
        try:
            async with self.turn:
                return await asyncio.to_thread(self.explain, model, data, class_index)
        finally:
            self.waiting -= 1
