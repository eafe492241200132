"""Learning-rate schedules users expect, built on ``torch.optim.lr_scheduler`` and stepped once per
optimisation step:

* ``step``: the course's StepLR, the rate divided by 10 after each third of the steps;
* ``cosine``: a linear warm-up, then cosine annealing to zero;
* ``onecycle``: ``OneCycleLR`` with linear ramps (up for ``warmup`` of the steps, then down), the
  triangle the speed-run trainers use.

Every schedule accepts any number of steps, one included, and never runs a step at rate 0.
"""

from __future__ import annotations

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import (CosineAnnealingLR, LinearLR, LRScheduler, OneCycleLR, SequentialLR,
                                      StepLR)

SCHEDULES = ("step", "cosine", "onecycle")


def make_schedule(name: str, optimizer: Optimizer, total_steps: int, warmup: float = 0.15,
                  start_factor: float = 0.2, end_factor: float = 0.07) -> LRScheduler:
    """``warmup`` is the fraction of steps spent warming up (cosine, onecycle); ``start_factor``
    and ``end_factor`` are onecycle's first and last rate as fractions of the peak (the optimizer's
    own ``lr`` of each group)."""
    total_steps = max(1, total_steps)
    if name == "step":
        return StepLR(optimizer, step_size=max(1, total_steps // 3), gamma=0.1)
    if name == "cosine":
        warm = min(int(total_steps * warmup), total_steps - 1)
        # the floor keeps the last step's rate above 0 too
        cosine = CosineAnnealingLR(optimizer, T_max=total_steps - warm,
                                   eta_min=1e-3 * min(g["lr"] for g in optimizer.param_groups))
        if warm == 0:
            return cosine
        ramp = LinearLR(optimizer, start_factor=1 / (warm + 1), end_factor=1.0, total_iters=warm)
        return SequentialLR(optimizer, [ramp, cosine], milestones=[warm])
    if name == "onecycle":
        peaks = [group["lr"] for group in optimizer.param_groups]
        return OneCycleLR(optimizer, max_lr=peaks, total_steps=total_steps + 1,  # +1: the last step() is allowed
                          pct_start=max(warmup, 1e-6), anneal_strategy="linear", cycle_momentum=False,
                          div_factor=1 / start_factor, final_div_factor=start_factor / end_factor)
    raise ValueError(f"unknown schedule {name!r}; choose from {', '.join(SCHEDULES)}")


def rates(name: str, total_steps: int, lr: float = 1.0, **kwargs) -> list[float]:
    """The rate at each of ``total_steps`` steps (for plots, docs and tests)."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    schedule = make_schedule(name, optimizer, total_steps, **kwargs)
    out = []
    for _ in range(total_steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return out
