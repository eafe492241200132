"""Synthetic out-of-distribution images and corruptions for measuring OOD scores (:mod:`training.ood`).

All are seeded (the same seed gives the same images) and return uint8 ``(N, 3, H, W)`` like the
project's image splits: :func:`uniform_noise`, :func:`smooth_noise`, :func:`flat_colours`,
:func:`gradients` make images of no class (the kind of synthetic outliers Hendrycks & Gimpel, 2017,
and Liu et al., 2020, report on); :func:`pixel_shuffle` and :func:`patch_shuffle` corrupt real
images beyond recognition while keeping their colour statistics (and, for tiles, local texture).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def uniform_noise(n: int, size: Sequence[int], seed: int = 0) -> torch.Tensor:
    """i.i.d. uniform pixel noise, uint8 (n, 3, H, W)."""
    return torch.randint(0, 256, (n, 3, *size), generator=_generator(seed), dtype=torch.uint8)


def smooth_noise(n: int, size: Sequence[int], seed: int = 0, cell: int = 8) -> torch.Tensor:
    """Uniform noise on a grid ``cell`` times coarser, upscaled bilinearly: blobs of colour."""
    h, w = size
    coarse = torch.rand(n, 3, max(1, h // cell), max(1, w // cell), generator=_generator(seed)) * 255.0
    return F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False).round().clamp(0, 255).to(torch.uint8)


def flat_colours(n: int, size: Sequence[int], seed: int = 0) -> torch.Tensor:
    """One random colour per image, uint8 (n, 3, H, W)."""
    colours = torch.randint(0, 256, (n, 3, 1, 1), generator=_generator(seed), dtype=torch.uint8)
    return colours.expand(n, 3, *size).contiguous()


def gradients(n: int, size: Sequence[int], seed: int = 0) -> torch.Tensor:
    """Linear gradients between two random colours along a random direction, uint8 (n, 3, H, W)."""
    g = _generator(seed)
    h, w = size
    start = torch.rand(n, 3, 1, 1, generator=g) * 255.0
    end = torch.rand(n, 3, 1, 1, generator=g) * 255.0
    angle = torch.rand(n, 1, 1, generator=g) * 2 * math.pi
    ys = torch.linspace(-1.0, 1.0, h).view(1, h, 1)
    xs = torch.linspace(-1.0, 1.0, w).view(1, 1, w)
    t = xs * torch.cos(angle) + ys * torch.sin(angle)  # (n, H, W) in [-sqrt 2, sqrt 2]
    t = ((t - t.amin(dim=(1, 2), keepdim=True)) / (t.amax(dim=(1, 2), keepdim=True)
                                                   - t.amin(dim=(1, 2), keepdim=True) + 1e-12)).unsqueeze(1)
    return (start + (end - start) * t).round().clamp(0, 255).to(torch.uint8)


def pixel_shuffle(images: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Each image's pixels (all channels of a position together) in a random order of its own:
    the colour histogram stays, every shape is gone. ``images``: (N, C, H, W), any dtype."""
    n, c, h, w = images.shape
    order = torch.argsort(torch.rand(n, h * w, generator=_generator(seed)), dim=1)
    flat = images.reshape(n, c, h * w)
    return flat.gather(2, order.unsqueeze(1).expand(n, c, h * w)).reshape(n, c, h, w)


def patch_shuffle(images: torch.Tensor, patch: int, seed: int = 0) -> torch.Tensor:
    """Each image cut into ``patch`` x ``patch`` tiles put back in a random order of its own: local
    texture stays, the object is gone (a milder corruption than :func:`pixel_shuffle`)."""
    n, c, h, w = images.shape
    if h % patch or w % patch:
        raise ValueError(f"patch {patch} does not divide {h}x{w}")
    gh, gw = h // patch, w // patch
    tiles = images.reshape(n, c, gh, patch, gw, patch).permute(0, 2, 4, 1, 3, 5).reshape(n, gh * gw, c, patch, patch)
    order = torch.argsort(torch.rand(n, gh * gw, generator=_generator(seed)), dim=1)
    tiles = tiles.gather(1, order.view(n, gh * gw, 1, 1, 1).expand_as(tiles))
    return tiles.reshape(n, gh, gw, c, patch, patch).permute(0, 3, 1, 4, 2, 5).reshape(n, c, h, w)
