"""Grad-CAM graphs for the registry: the service explains predictions without PyTorch model code.

    python -m training.cam models/cifar10 models/catsdogs      # add model.cam.pt to existing entries

A TorchScript file runs a network but takes no hooks, and the service imports nothing from
``training/``. So export also writes ``model.cam.pt``: the network traced as a :class:`CamGraph`,
which returns ``(logits, last stage's feature map)``. The service (:mod:`service.explain`) runs it
with gradients on and differentiates the class logit with respect to the feature map: Grad-CAM
from the TorchScript file alone. The card lists it as the ``gradcam`` artifact (file, sha256,
bytes), checked like the others. This module also rebuilds the eager network behind a registry
entry (its TorchScript weights, the architecture its card names), which the command above and
:mod:`training.report` (feature maps) need.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from training.data import sha256_file
from training.nets import build_model

CAM_FILE = "model.cam.pt"


def strip_to(state: dict[str, torch.Tensor], wanted: Sequence[str]) -> dict[str, torch.Tensor]:
    """``state`` with the wrappers' ``model.`` prefixes (softmax, test-time augmentation) removed
    and export-only buffers (fixed-size pooling matrices) dropped, keyed like ``wanted``."""
    wanted = set(wanted)
    out = {}
    for key, value in state.items():
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


class CamGraph(nn.Module):
    """``net``'s logits and the output of its last convolutional stage, for tracing."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.stage = feature_stages(net)[-1][1]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        captured: list[torch.Tensor] = []
        hook = self.stage.register_forward_hook(lambda module, args, output: captured.append(output))
        try:
            logits = self.net(x)
        finally:
            hook.remove()
        return logits, captured[-1]


def write_cam_graph(net: nn.Module, example: torch.Tensor, path: Path) -> None:
    """Trace :class:`CamGraph` for ``net`` (eval mode) and save it; check its logits are ``net``'s."""
    graph = CamGraph(net.eval()).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            traced = torch.jit.trace(graph, example)
            expected = net(example)
            logits, features = traced(example)
        traced.save(str(path))
    if not torch.allclose(logits, expected, atol=1e-4) or features.dim() != 4:
        raise SystemExit(f"Grad-CAM graph check failed for {path}")


def rebuild_from_registry(folder: Path) -> tuple[nn.Module, dict]:
    """The eager network (eval, CPU) behind ``folder``'s TorchScript artifact, and its card."""
    card = json.loads((folder / "card.json").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        state = torch.jit.load(str(folder / card["artifacts"]["torchscript"]["file"]), map_location="cpu").state_dict()
    net = build_model(card["architecture"], len(card["classes"]))
    net.load_state_dict(strip_to(state, net.state_dict().keys()))
    return net.eval(), card


def artifact_entry(path: Path) -> dict:
    return {"file": path.name, "sha256": sha256_file(path), "bytes": path.stat().st_size}


def add_to_registry(folder: Path) -> Path:
    """Write ``folder/model.cam.pt`` for an existing registry entry and list it in its card."""
    net, card = rebuild_from_registry(folder)
    path = folder / CAM_FILE
    write_cam_graph(net, torch.zeros(2, 3, *card["input"]["size"]), path)
    card["artifacts"]["gradcam"] = artifact_entry(path)
    tmp = folder / "card.json.tmp"
    tmp.write_text(json.dumps(card, indent=2) + "\n")
    tmp.replace(folder / "card.json")
    return path


def main(argv: Sequence[str]) -> None:
    if not argv:
        raise SystemExit("usage: python -m training.cam MODEL_DIR [MODEL_DIR ...]")
    for folder in argv:
        print(f"wrote {add_to_registry(Path(folder))}")


if __name__ == "__main__":
    main(sys.argv[1:])
