"""The architectures of the CNN course, sized for CIFAR-10 (32x32) and usable at larger inputs.

Every network ends in global average pooling (LeNet in a small adaptive pool), so one definition
serves 32x32 CIFAR images and 96x96+ photos. One builder per variant, registered in
``ARCHITECTURES`` with the speed-run networks (:mod:`training.fastnet`) and the ImageNet ones
(:mod:`training.pretrained`); ``build_model(name, num_classes)`` is the only entry point training needs.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from training.fastnet import fastnet, fastnet_res, fastnet_tiny
from training.pretrained import efficientnet_lite0, tv_resnet18


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


ARCHITECTURES: dict[str, Callable[[int], nn.Module]] = {
    f.__name__: f for f in (plain_cnn, lenet5, alexnet, vgg11, vgg16, googlenet, resnet20, resnet18,
                            resnet34, se_resnet20, se_resnet18, densenet40, fastnet, fastnet_res,
                            fastnet_tiny, tv_resnet18, efficientnet_lite0)
}


def build_model(name: str, num_classes: int) -> nn.Module:
    try:
        return ARCHITECTURES[name](num_classes)
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(ARCHITECTURES)}") from None
