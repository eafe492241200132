"""The out-of-distribution proxy sets export measures a registry entry's score on.

    sets = proxy_sets("catsdogs", (192, 192), data, ProxySizes.for_dataset("catsdogs"))   # {name: ProxySet}

The project has no collection of the things people really send, so every set here is a **proxy**
built from the project's own data (docs/OOD.md): a good figure on them is necessary, not
sufficient. Per dataset:

* both: ``synthetic`` (uniform noise, smooth noise, flat colours, gradients: :mod:`training.ood_images`)
  and ``pixel_shuffled`` (held-out test images of the entry's own split, pixels permuted);
* ``catsdogs``: ``cifar10_non_animals`` (CIFAR-10 test airplane, automobile, ship, truck, upscaled to
  the model's input), ``cifar10_other_animals`` (bird, deer, frog, horse), ``cifar10_8_classes``
  (both), and the control ``control_cifar10_cats_dogs`` (CIFAR-10 cats and dogs upscaled the same way:
  in distribution by class, so it measures how much of the score is "a blurred 32-pixel image");
* ``cifar10``: ``patch_shuffled_8px`` (test images cut in 8x8 tiles, shuffled) and the control
  ``control_catsdogs_photos`` (held-out cats-vs-dogs photos downscaled to 32 px: cats and dogs are
  CIFAR-10 classes, so in distribution).

Every sample is seeded. The shuffled sets use the *end* of the test split, so the first test
images (export's parity images) stay plain.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from training import ood_images
from training.data import CIFAR10_CLASSES, Dataset, load_catsdogs, load_cifar10

NON_ANIMALS = ("airplane", "automobile", "ship", "truck")
OTHER_ANIMALS = ("bird", "deer", "frog", "horse")


@dataclass(frozen=True)
class ProxySet:
    """uint8 images at the model's input size; ``control``: semantically in distribution (a low
    AUROC is the desirable result)."""

    images: torch.Tensor
    about: str
    control: bool = False
    parts: tuple[str, ...] = ()  # a union of these sets (its images are theirs, in order)


@dataclass(frozen=True)
class ProxySizes:
    synthetic_each: int  # per synthetic kind
    shuffled: int  # pixel- (and patch-) shuffled test images
    cifar_per_class: int  # catsdogs: CIFAR-10 test images per class
    control: int

    @classmethod
    def for_dataset(cls, dataset: str, scale: float = 1.0) -> "ProxySizes":
        base = {"catsdogs": (100, 500, 200, 400), "cifar10": (500, 2000, 0, 1000)}[dataset]
        return cls(*(max(1, round(v * scale)) if v else 0 for v in base))


def seeded_take(n_total: int, n: int, seed: int) -> torch.Tensor:
    return torch.randperm(n_total, generator=torch.Generator().manual_seed(seed))[:n]


def resize(images: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """uint8 images resized bilinearly (antialiased) to ``size``, as the service resizes a photo."""
    if tuple(images.shape[2:]) == tuple(size):
        return images
    out = F.interpolate(images.float(), size=tuple(size), mode="bilinear", align_corners=False, antialias=True)
    return out.round().clamp(0, 255).to(torch.uint8)


def cifar_classes(labels: torch.Tensor, names: Sequence[str], per_class: int, seed: int) -> torch.Tensor:
    """Positions of a seeded sample of ``per_class`` images of each class in ``names``."""
    picks = []
    for name in names:
        c = CIFAR10_CLASSES.index(name)
        where = torch.nonzero(labels == c).flatten()
        picks.append(where[seeded_take(len(where), per_class, seed + c)])
    return torch.cat(picks)


def synthetic(n: int, size: Sequence[int], seed: int) -> torch.Tensor:
    return torch.cat([ood_images.uniform_noise(n, size, seed), ood_images.smooth_noise(n, size, seed + 1),
                      ood_images.flat_colours(n, size, seed + 2), ood_images.gradients(n, size, seed + 3)])


def proxy_sets(dataset: str, size: Sequence[int], data: Dataset, sizes: ProxySizes,
               seed: int = 0) -> dict[str, ProxySet]:
    """The proxy OOD sets (see the module doc) of a model trained on ``dataset`` (whose split is
    ``data``) with input ``size``, by name."""
    test = data.test.images
    shuffled = test[len(test) - min(sizes.shuffled, len(test)):]
    n = sizes.synthetic_each
    sets = {"synthetic": ProxySet(synthetic(n, size, seed), f"uniform noise, smooth noise (8x coarser, upscaled), "
                                                             f"flat colours, linear gradients: {n} each, seed {seed}"),
            "pixel_shuffled": ProxySet(ood_images.pixel_shuffle(shuffled, seed),
                                       f"the last {len(shuffled)} held-out test images of the entry's split, "
                                       "pixels randomly permuted (colours kept, shapes gone)")}
    if dataset == "catsdogs":
        cifar = load_cifar10().test
        k = sizes.cifar_per_class
        non_animals = resize(cifar.images[cifar_classes(cifar.labels, NON_ANIMALS, k, seed)], size)
        animals = resize(cifar.images[cifar_classes(cifar.labels, OTHER_ANIMALS, k, seed)], size)
        how = f"upscaled 32->{size[0]} (bilinear, antialiased)"
        sets["cifar10_non_animals"] = ProxySet(non_animals, f"CIFAR-10 test {', '.join(NON_ANIMALS)}, {k} each, {how}")
        sets["cifar10_other_animals"] = ProxySet(animals, f"CIFAR-10 test {', '.join(OTHER_ANIMALS)}, {k} each, {how}")
        sets["cifar10_8_classes"] = ProxySet(torch.cat([non_animals, animals]),
                                             "the two sets above: every CIFAR-10 class that is not cat or dog",
                                             parts=("cifar10_non_animals", "cifar10_other_animals"))
        control = resize(cifar.images[cifar_classes(cifar.labels, ("cat", "dog"), sizes.control // 2, seed)], size)
        sets["control_cifar10_cats_dogs"] = ProxySet(
            control, f"CONTROL, in distribution by class: CIFAR-10 test cats and dogs, {sizes.control // 2} each, "
                     f"{how} like the OOD sets: a high AUROC here is the score flagging low-resolution images", True)
    elif dataset == "cifar10":
        sets["patch_shuffled_8px"] = ProxySet(ood_images.patch_shuffle(shuffled, 8, seed),
                                              f"the same {len(shuffled)} test images cut in 8x8 tiles, shuffled "
                                              "(local texture kept)")
        photos = load_catsdogs(size=192).test.images
        photos = resize(photos[seeded_take(len(photos), sizes.control, seed)], size)
        sets["control_catsdogs_photos"] = ProxySet(
            photos, f"CONTROL, in distribution by class: {len(photos)} held-out cats-vs-dogs photos downscaled "
                    f"192->{size[0]}: a high AUROC here is the score flagging another photo source", True)
    return sets
