"""A run's exact split, rebuilt from what was recorded: the data spec a checkpoint carries (dataset,
seed, data root, image size, the normalisation) or the ``split_spec`` of a model card. Training,
export, calibration, quantisation and the report all measure on the split rebuilt here."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from service.card import InputSpec, ModelCard
from training.data import Dataset, load_catsdogs, load_cifar10
from training.pretrained import IMAGENET_MEAN, IMAGENET_STD


def load_dataset(spec: Mapping[str, Any]) -> Dataset:
    """The dataset and split ``spec`` describes (:func:`training.train.data_spec` writes it)."""
    root = Path(spec["data_root"]) if spec.get("data_root") else None
    if spec["dataset"] == "cifar10":
        data = load_cifar10(root, download=spec.get("download", False), seed=spec["seed"])
    else:
        data = load_catsdogs(root, size=spec["image_size"], seed=spec["seed"])
    if spec.get("mean"):  # the pretrained backbone's own normalisation
        data.mean, data.std = tuple(spec["mean"]), tuple(spec["std"])
    elif spec.get("imagenet_stats"):  # checkpoints from before the spec recorded it: torchvision's
        data.mean, data.std = IMAGENET_MEAN, IMAGENET_STD
    return data


def checkpoint_dataset(ckpt: Mapping[str, Any], metrics: Mapping[str, Any], spec: InputSpec) -> Dataset:
    """The training run's own split: the data spec its checkpoint records (older checkpoints: the
    dataset and the seed in metrics.json, default data root), at the checkpoint's input size and
    statistics."""
    recorded = ckpt.get("data") or {"dataset": ckpt["dataset"], "seed": metrics.get("seed", 0),
                                    "data_root": None, "image_size": spec.size[0]}
    data = load_dataset({**recorded, "image_size": spec.size[0]})
    data.mean, data.std = spec.mean, spec.std  # e.g. ImageNet statistics for a pretrained backbone
    return data


def card_dataset(card: ModelCard | Mapping[str, Any]) -> Dataset:
    """The split a registry model was trained and measured on, from its card (a
    :class:`~service.card.ModelCard`, or a card's JSON data)."""
    if not isinstance(card, ModelCard):
        card = ModelCard.from_dict(card)
    spec = card.split_spec or {"dataset": card.training["dataset"], "seed": card.training["seed"], "data_root": None}
    data = load_dataset({**spec, "image_size": card.input.size[0]})
    data.mean, data.std = card.input.mean, card.input.std
    return data
