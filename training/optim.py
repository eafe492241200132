"""The optimiser side of a recipe: parameter groups (BatchNorm shifts at their own rate), the
optimiser by name, and lookahead-style weight averaging. The schedules: :mod:`training.schedules`."""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

OPTIMIZERS = ("sgd", "adam", "rmsprop")


def param_groups(model: nn.Module, names: Iterable[str], lr: float, weight_decay: float,
                 norm_bias_lr_scale: float) -> list[dict[str, Any]]:
    """One group for the named parameters; with ``norm_bias_lr_scale`` != 1 the BatchNorm shifts get
    their own group with that many times the rate and the same per-step decay (airbench)."""
    names = set(names)
    norm_biases = {f"{m}.bias" for m, module in model.named_modules() if isinstance(module, nn.BatchNorm2d)}
    params = dict(model.named_parameters())
    if norm_bias_lr_scale == 1:
        return [{"params": [params[n] for n in sorted(names)], "lr": lr, "weight_decay": weight_decay}]
    scaled = sorted(names & norm_biases)
    rest = sorted(names - norm_biases)
    return [group for group in (
        {"params": [params[n] for n in rest], "lr": lr, "weight_decay": weight_decay},
        {"params": [params[n] for n in scaled], "lr": lr * norm_bias_lr_scale,
         "weight_decay": weight_decay / norm_bias_lr_scale}) if group["params"]]


def make_optimizer(name: str, groups: list[dict[str, Any]], momentum: float = 0.9) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(groups, momentum=momentum, nesterov=momentum > 0)
    if name == "adam":
        return torch.optim.AdamW(groups)
    if name == "rmsprop":
        return torch.optim.RMSprop(groups, momentum=momentum)
    raise ValueError(f"unknown optimizer {name!r}")


class Lookahead:
    """Lookahead-style averaging (Zhang et al., 2019, in hlb-CIFAR10's EMA form): every ``every``
    steps the slow weights move toward the fast ones by ``1 - decay`` and the network restarts from
    the slow weights. ``decay`` grows with training progress, so early training is not held back."""

    def __init__(self, model: nn.Module, every: int = 5, base: float = 0.95, power: float = 3.0) -> None:
        self.model, self.every, self.base, self.power = model, every, base, power
        self.slow = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def step(self, step: int, total: int) -> None:
        last = step == total
        if step % self.every and not last:
            return
        decay = 1.0 if last else (self.base ** self.every) * (step / total) ** self.power
        for name, value in self.model.state_dict().items():
            if name in self.slow:
                self.slow[name].lerp_(value, 1 - decay)
                value.copy_(self.slow[name])
