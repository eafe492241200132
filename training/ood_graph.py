"""The serving graph with an out-of-distribution score: ``x -> (probabilities, ood_score)``.

    graph = WithOOD(serving_graph(plain, card), plain, card.tta_level, scorer)

The probabilities are computed by the entry's own serving graph (:func:`training.graph.serving_graph`:
the test-time augmented logits, the calibration temperature, the softmax), unchanged: a forward
hook on the network's last ``nn.Linear`` only *reads* its input (the penultimate features) on each
test-time augmentation view. The features are averaged with the views' weights (the head is
linear, so the averaged features give exactly the averaged logits) and scored by a fitted
:class:`training.ood.MahalanobisScorer` whose statistics are buffers of the graph. Hooks fire under
``torch.onnx.export`` and ``torch.jit.trace``, so both exported formats compute the same thing.

With ``scorer=None`` the second output is the averaged features themselves (N, D): the graph
export fits the scorer on (:mod:`training.ood_fit`). A leaf beside :mod:`training.graph`.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from training.ood import MahalanobisScorer

# The weight of each view TestTimeAugment averages, in the order it runs them (level 2:
# mirrored(x) / 2 + (mirrored(up-left) + mirrored(down-right)) / 4, mirrored = (view + flip) / 2).
TTA_WEIGHTS = {0: (1.0,), 1: (0.5, 0.5), 2: (0.25, 0.25, 0.125, 0.125, 0.125, 0.125)}
SCORER = "scorer"  # the scorer's submodule name: its ONNX nodes are named /scorer/...


def last_linear(net: nn.Module) -> nn.Linear:
    """The network's classification head: its last ``nn.Linear`` (whose input is the penultimate
    features)."""
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(net).__name__} has no nn.Linear head: no penultimate features to score")
    return linears[-1]


class WithOOD(nn.Module):
    """``forward(x) -> (probabilities, ood_score)``: ``model`` (the serving graph, untouched) and the
    score of the penultimate features of ``plain`` (the network inside ``model``; not a second
    submodule: its weights live in ``model``). ``scorer`` None: the features instead of a score."""

    def __init__(self, model: nn.Module, plain: nn.Module, level: int,
                 scorer: MahalanobisScorer | None = None) -> None:
        super().__init__()
        if level not in TTA_WEIGHTS:
            raise ValueError(f"unknown test-time augmentation level {level}")
        self.model = model
        self.scorer = scorer if scorer is not None else nn.Identity()
        self.weights = TTA_WEIGHTS[level]
        object.__setattr__(self, "head", last_linear(plain))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        captured: list[torch.Tensor] = []
        hook = self.head.register_forward_hook(lambda module, args, output: captured.append(args[0]))
        try:
            probabilities = self.model(x)
        finally:
            hook.remove()
        if len(captured) != len(self.weights):
            raise RuntimeError(f"the head ran {len(captured)} times, the test-time augmentation has "
                               f"{len(self.weights)} views")
        features = torch.flatten(captured[0], 1) * self.weights[0]
        for weight, view in zip(self.weights[1:], captured[1:]):
            features = features + torch.flatten(view, 1) * weight
        return probabilities, self.scorer(features)


def scorer_from_state(state: Mapping[str, torch.Tensor], normalize: bool) -> MahalanobisScorer:
    """The fitted :class:`MahalanobisScorer` inside an exported graph, from its TorchScript state dict
    (keys ending in ``scorer.means`` etc.; the card says whether the features are L2-normalised)."""
    found = {key.rsplit(".", 1)[-1]: value for key, value in state.items()
             if key.rsplit(".", 2)[-2:-1] == [SCORER]}
    missing = {"means", "basis", "inv_sqrt_eig", "residual_precision"} - set(found)
    if missing:
        raise ValueError(f"the graph carries no scorer statistics ({sorted(missing)} missing)")
    return MahalanobisScorer(found["means"], found["basis"], found["inv_sqrt_eig"],
                             float(found["residual_precision"]), normalize)
