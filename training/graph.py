"""The serving graph: what a registry entry computes around the trained network.

    softmax( TTA(network)(x) / temperature )

* :class:`TestTimeAugment`: the logits averaged over cheap views of each image (level 1: the
  mirror image; level 2: also one-pixel translations), the same module training evaluates with;
* :class:`WithSoftmax`: probabilities, divided by the calibration temperature first when there is one;
* :func:`serving_graph`: both, rebuilt from a model card (:class:`service.card.ModelCard`).

A leaf module: :mod:`training.export` (which builds the graphs) and :mod:`training.cam` (which
rebuilds them from the registry) both import it, and it imports neither.
"""

from __future__ import annotations

import torch
from torch import nn

from service.card import ModelCard


class TestTimeAugment(nn.Module):
    """Average a model's logits over cheap views of each image: ``level`` 1 adds the mirror image;
    level 2 also the mirrored pair shifted one pixel up-left and one down-right (reflect padding),
    weighted 1/2 (unshifted) and 1/4 + 1/4 as in airbench. Export wraps the same module, so the
    served graph computes exactly what was evaluated."""

    __test__ = False  # not a pytest test class, whatever its name says

    def __init__(self, model: nn.Module, level: int) -> None:
        super().__init__()
        if level not in (1, 2):
            raise ValueError(f"test-time augmentation level must be 1 or 2, not {level}")
        self.model = model
        self.level = level

    def mirrored(self, x: torch.Tensor) -> torch.Tensor:
        return (self.model(x) + self.model(x.flip(3))) / 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.mirrored(x)
        if self.level == 1:
            return logits
        h, w = x.shape[2], x.shape[3]
        padded = nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
        up_left = padded[:, :, 0:h, 0:w]
        down_right = padded[:, :, 2:h + 2, 2:w + 2]
        return logits / 2 + (self.mirrored(up_left) + self.mirrored(down_right)) / 4


def with_tta(model: nn.Module, level: int) -> nn.Module:
    """``model`` wrapped in :class:`TestTimeAugment` at ``level`` (0: the model itself)."""
    return TestTimeAugment(model, level) if level else model


class WithSoftmax(nn.Module):
    """The exported graph: ``softmax(model(x) / temperature)`` (temperature 1: the plain softmax)."""

    def __init__(self, model: nn.Module, temperature: float = 1.0) -> None:
        super().__init__()
        self.model = model
        self.temperature = float(temperature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        if self.temperature != 1.0:
            logits = logits / self.temperature
        return torch.softmax(logits, dim=1)


def serving_graph(plain: nn.Module, card: ModelCard) -> nn.Module:
    """What a registry entry's graphs compute, rebuilt from its card: softmax over the (test-time
    augmented) logits, divided by the calibration temperature when there is one."""
    return WithSoftmax(with_tta(plain, card.tta_level), card.temperature).eval()
