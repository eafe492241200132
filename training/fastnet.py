"""The speed-run networks (after hlb-CIFAR10 and airbench): :class:`FastNet` and its builders.

A frozen whitening first layer, identity-initialised convolutions, BatchNorm with a fixed scale and
fast statistics, GELU, a global max-pool and a scaled linear head. ``fastnet`` is the fast preset's
network, ``fastnet_res`` the shipping preset's, ``fastnet_tiny`` the smoke runs'. Registered with
the course's architectures in :data:`training.nets.ARCHITECTURES`.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


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
