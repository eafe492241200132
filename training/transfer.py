"""Transfer learning: a network's starting weights (ImageNet's, or the matching weights of a
checkpoint of this project), the new head those leave fresh (trained alone first, ``--head-epochs``),
and BatchNorm layers that keep their running statistics (``--freeze-norm-stats``)."""

from __future__ import annotations

import argparse

import torch
from torch import nn

from training.nets import build_model
from training.pretrained import PretrainedWeightsUnavailable, imagenet_weights


def initial_model(args: argparse.Namespace, classes: int) -> tuple[nn.Module, list[str] | None]:
    """The architecture with its starting weights: ImageNet's, an ``--init-from`` checkpoint's, or
    fresh; and the parameters left fresh by transfer (None: no transfer)."""
    if args.pretrained == "imagenet":
        weights = imagenet_weights(args.model)
        try:
            model = weights.load(classes)
        except PretrainedWeightsUnavailable as exc:
            raise SystemExit(f"error: {exc}") from None
        return model, weights.head_parameters(model)
    model = build_model(args.model, classes)
    return model, init_from_checkpoint(model, args.init_from) if args.init_from else None


def init_from_checkpoint(model: nn.Module, path: str) -> list[str]:
    """Copy every weight whose name and shape match (the backbone); return the names left fresh."""
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    own = model.state_dict()
    fresh = [k for k, v in own.items() if k not in state or state[k].shape != v.shape]
    model.load_state_dict({k: v for k, v in state.items() if k in own and own[k].shape == v.shape},
                          strict=False)
    return fresh


def freeze_norm_statistics(model: nn.Module) -> None:
    """Put every BatchNorm layer in eval mode: it normalises with its running statistics (e.g. the
    pretrained ones) and stops updating them, while its scale and shift still train. Transfer from
    ImageNet needs it: the new head is fitted on features normalised with the running statistics,
    and switching the backbone to batch statistics afterwards changes every feature it sees (the
    catsdogs-imagenet run lost 2 points of validation accuracy in its first full epoch that way)."""
    for module in model.modules():
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)):
            module.eval()
