"""Grad-CAM from the registry's TorchScript file: the service explains without PyTorch model code.

    python -m training.cam models/cifar10 models/catsdogs      # give existing entries the method

A TorchScript file takes no hooks, and the service imports nothing from ``training/``. So export
traces the TorchScript artifact with two methods (``torch.jit.trace_module``) that share one copy of
the weights: ``forward`` (the serving graph: probabilities, exactly as before) and ``cam`` (the
plain network's logits and its last stage's feature map). The service (:mod:`service.explain`)
calls ``cam`` with gradients on and differentiates the class logit with respect to the map:
Grad-CAM from the sha256-checked TorchScript file alone, with no third copy of the weights in
``models/`` (whose 50 MB budget holds both formats of both models). This module also rebuilds the
eager network behind a registry entry (its TorchScript weights, the architecture its card names),
which the command above and :mod:`training.report` (feature maps) need.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from service.card import Artifact, ModelCard, read_card, write_card
from service.registry import sha256_file
from training.graph import serving_graph
from training.nets import build_model
from training.ood_graph import WithOOD, scorer_from_state


def strip_to(state: dict[str, torch.Tensor], wanted: Sequence[str]) -> dict[str, torch.Tensor]:
    """``state`` with the wrappers' ``model.`` prefixes (softmax, test-time augmentation) removed
    and export-only buffers (fixed-size pooling matrices) dropped, keyed like ``wanted``."""
    wanted = set(wanted)
    out = {}
    for key, value in state.items():
        key = key.removeprefix("serving.")
        while key not in wanted and key.startswith("model."):
            key = key[len("model."):]
        if key in wanted:
            out[key] = value
    return out


POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def feature_stages(net: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules whose outputs are the network's stages (each resolution's last feature map),
    in order; the last one is the final convolutional stage that Grad-CAM explains."""
    if isinstance(getattr(net, "stages", None), nn.Sequential) and hasattr(net, "stem"):  # CIFAR ResNets
        return [("stem", net.stem)] + [(f"stages.{i}", s) for i, s in enumerate(net.stages)]
    if isinstance(getattr(net, "groups", None), nn.Sequential):  # FastNet
        return [(f"groups.{i}", g) for i, g in enumerate(net.groups)]
    if all(hasattr(net, f"layer{i}") for i in range(1, 5)):  # torchvision ResNet
        return [(f"layer{i}", getattr(net, f"layer{i}")) for i in range(1, 5)]
    if hasattr(net, "conv_head") and isinstance(getattr(net, "blocks", None), nn.Sequential):  # timm EfficientNet
        # the last block of each resolution (a stage that strides ends the one before), then the
        # head's 1x1 conv + BatchNorm + activation (bn2): the final feature map
        blocks = list(net.blocks)
        strided = [i for i, stage in enumerate(blocks) if i and any(
            getattr(m, "stride", (1, 1)) != (1, 1) for m in stage.modules() if isinstance(m, nn.Conv2d))]
        ends = [i - 1 for i in strided]
        return [(f"blocks.{i}", blocks[i]) for i in ends] + [("bn2", net.bn2)]
    body = getattr(net, "features", None) or getattr(net, "blocks", None)
    if isinstance(body, nn.Sequential):
        name = "features" if body is getattr(net, "features", None) else "blocks"
        children = list(body.named_children())
        stages = [(f"{name}.{n}", m) for (n, m), (_, after) in zip(children, children[1:])
                  if isinstance(after, POOLS) and not isinstance(m, POOLS)]
        if hasattr(net, "stem") and not isinstance(children[0][1], POOLS):  # GoogLeNet: the stem first
            stages.insert(0, ("stem", net.stem))
        if stages:
            return stages
    raise ValueError(f"no convolutional stages known for {type(net).__name__}")


class Explainable(nn.Module):
    """``forward``: the serving graph; ``cam``: ``plain``'s logits and its last stage's output.
    ``plain`` must be the network inside ``serving`` (the weights are shared, not copied)."""

    def __init__(self, serving: nn.Module, plain: nn.Module) -> None:
        super().__init__()
        self.serving = serving
        object.__setattr__(self, "plain", plain)  # not a second submodule: its weights live in serving
        object.__setattr__(self, "stage", feature_stages(plain)[-1][1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.serving(x)

    def cam(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        captured: list[torch.Tensor] = []
        hook = self.stage.register_forward_hook(lambda module, args, output: captured.append(output))
        try:
            logits = self.plain(x)
        finally:
            hook.remove()
        return logits, captured[-1]


def trace_explainable(serving: nn.Module, plain: nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    """The TorchScript artifact: ``serving`` traced as ``forward`` and Grad-CAM's ``cam`` beside it."""
    module = Explainable(serving.eval(), plain.eval()).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            traced = torch.jit.trace_module(module, {"forward": example, "cam": example})
            logits, features = traced.cam(example)
            if not torch.allclose(logits, plain(example), atol=1e-4) or features.dim() != 4:
                raise SystemExit("the traced Grad-CAM method does not compute the network's logits")
    return traced


def rebuild_from_registry(folder: Path) -> tuple[nn.Module, ModelCard]:
    """The eager network (eval, CPU) behind ``folder``'s TorchScript artifact, and its card."""
    card = read_card(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        state = torch.jit.load(str(folder / card.artifact("torchscript").file), map_location="cpu").state_dict()
    net = build_model(card.architecture, len(card.classes))
    net.load_state_dict(strip_to(state, net.state_dict().keys()))
    return net.eval(), card


def add_to_registry(folder: Path) -> Path:
    """Re-trace ``folder``'s TorchScript artifact with the ``cam`` method, after checking the rebuilt
    serving graph computes what the old file does; update the card's sha256 and size."""
    plain, card = rebuild_from_registry(folder)
    path = folder / card.artifact("torchscript").file
    size = card.input.size
    example = torch.rand(4, 3, *size) * 4 - 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        old = torch.jit.load(str(path), map_location="cpu")
    serving = serving_graph(plain, card)
    if card.ood:  # the graph also returns the OOD score, its statistics in the file's buffers
        normalize = card.ood.section.get("parameters", {}).get("normalize") == "l2"
        serving = WithOOD(serving, plain, card.tta_level, scorer_from_state(old.state_dict(), normalize)).eval()
    with torch.no_grad():
        before, after = old(example), serving(example)
        pairs = zip(before, after) if isinstance(before, tuple) else [(before, after)]
        if not all(torch.allclose(a, b, atol=1e-5, rtol=1e-5) for a, b in pairs):
            raise SystemExit(f"{folder}: the rebuilt network does not compute the registry's TorchScript graph")
    traced = trace_explainable(serving, plain, example[:2])
    tmp = path.with_suffix(".tmp")
    traced.save(str(tmp))
    tmp.replace(path)
    rewritten = Artifact(path.name, sha256_file(path), path.stat().st_size)
    artifacts = {fmt: rewritten if fmt == "torchscript" else artifact for fmt, artifact in card.artifacts.items()
                 if fmt != "gradcam"}  # an earlier layout kept a separate graph file
    (folder / "model.cam.pt").unlink(missing_ok=True)
    write_card(folder, card.updated(artifacts=artifacts))
    return path


def main(argv: Sequence[str]) -> None:
    if not argv:
        raise SystemExit("usage: python -m training.cam MODEL_DIR [MODEL_DIR ...]")
    for folder in argv:
        print(f"rewrote {add_to_registry(Path(folder))} with a Grad-CAM method")


if __name__ == "__main__":
    main(sys.argv[1:])
