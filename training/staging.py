"""Writing a registry entry: the serving graph as ONNX and TorchScript in a staging folder, their
outputs checked against PyTorch's (parity) before anything is installed, the card written with
:func:`service.card.write_card`, and the folder swapped in whole (a reader never sees half an entry).

:mod:`training.export` (a training run) and :mod:`training.quantize` (an INT8 entry) install
entries this way; what goes into the card is theirs.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from service.card import OOD_OUTPUTS, Artifact, ModelCard, write_card
from service.registry import sha256_file
from training.cam import trace_explainable

ONNX_FILE = "model.onnx"
TORCHSCRIPT_FILE = "model.torchscript.pt"
OPSET = 17


class FixedSizeAdaptiveAvgPool(nn.Module):
    """``adaptive_avg_pool2d`` for one input size, as two averaging matrices. ONNX has no adaptive
    pooling whose output size does not divide the input size (LeNet at 224x224 pools 53 -> 5)."""

    def __init__(self, in_size: tuple[int, int], out_size: tuple[int, int]) -> None:
        super().__init__()
        self.register_buffer("rows", self.bins(in_size[0], out_size[0]))
        self.register_buffer("cols", self.bins(in_size[1], out_size[1]).T.contiguous())

    @staticmethod
    def bins(n_in: int, n_out: int) -> torch.Tensor:
        """(n_out, n_in) matrix averaging PyTorch's adaptive bins: [floor(i*n/m), ceil((i+1)*n/m))."""
        matrix = torch.zeros(n_out, n_in)
        for i in range(n_out):
            start, end = i * n_in // n_out, -(-(i + 1) * n_in // n_out)
            matrix[i, start:end] = 1.0 / (end - start)
        return matrix

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rows @ x @ self.cols


def onnx_exportable(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """A copy of ``model`` whose adaptive average pools that ONNX cannot express are replaced by
    :class:`FixedSizeAdaptiveAvgPool` for the input size of ``example`` (the card's size)."""
    model = copy.deepcopy(model)
    shapes: dict[str, tuple[int, int]] = {}
    hooks = [module.register_forward_pre_hook(lambda m, args, name=name: shapes.update({name: args[0].shape[-2:]}))
             for name, module in model.named_modules() if isinstance(module, nn.AdaptiveAvgPool2d)]
    with torch.no_grad():
        model(example)
    for hook in hooks:
        hook.remove()
    for name, in_size in shapes.items():
        pool = model.get_submodule(name)
        out = pool.output_size if isinstance(pool.output_size, tuple) else (pool.output_size,) * 2
        out = tuple(o or i for o, i in zip(out, in_size))  # None keeps that dimension
        if any(i % o for i, o in zip(in_size, out)):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, FixedSizeAdaptiveAvgPool(tuple(in_size), out))
    return model


def output_names(model: nn.Module, example: torch.Tensor) -> list[str]:
    """``["probabilities"]``, or ``["probabilities", "ood_score"]`` for a graph returning a pair."""
    with torch.no_grad():
        out = model(example)
    return list(OOD_OUTPUTS[:len(out)]) if isinstance(out, tuple) else [OOD_OUTPUTS[0]]


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    names = output_names(model, example)
    torch.onnx.export(model, (example,), str(path), input_names=["input"], output_names=names,
                      dynamic_axes={"input": {0: "batch"}, **{name: {0: "batch"} for name in names}},
                      opset_version=OPSET, dynamo=False)


def quiet(func, *args, **kwargs):
    """Call ``func`` without the exporters' deprecation chatter (TorchScript, legacy ONNX export)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (FutureWarning, DeprecationWarning, UserWarning))
        return func(*args, **kwargs)


OOD_TOLERANCE = 1e-4  # relative: max |a - b| / max |b| of the OOD scores
PREVIOUS_TOLERANCE = 1e-6  # the probabilities of a re-exported entry against its previous ONNX graph's


def onnx_outputs(path: Path, inputs: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: inputs})


def as_pair(out: torch.Tensor | tuple[torch.Tensor, ...]) -> list[np.ndarray]:
    return [t.numpy() for t in out] if isinstance(out, tuple) else [out.numpy()]


def relative_diff(value: np.ndarray, reference: np.ndarray) -> float:
    return float(np.abs(value - reference).max() / max(float(np.abs(reference).max()), 1e-12))


def check_parity(model: nn.Module, onnx_path: Path, ts_path: Path, inputs: np.ndarray, tolerance: float,
                 previous_onnx: list[np.ndarray] | None = None) -> dict[str, float]:
    """The exported graphs' outputs against ``model``'s on ``inputs``: the probabilities within
    ``tolerance`` (max abs difference); an OOD score, when the graph has one, within
    :data:`OOD_TOLERANCE` (relative); ``previous_onnx``, the outputs of the graph this export
    replaces: its probabilities must equal the new ONNX graph's within :data:`PREVIOUS_TOLERANCE`."""
    with torch.no_grad():
        reference = as_pair(model(torch.from_numpy(inputs)))
        scripted = quiet(torch.jit.load, str(ts_path)).eval()
        ts_out = as_pair(scripted(torch.from_numpy(inputs)))
    onnx_out = onnx_outputs(onnx_path, inputs)
    result = {"images": int(len(inputs)),
              "max_abs_diff_onnx": float(np.abs(onnx_out[0] - reference[0]).max()),
              "max_abs_diff_torchscript": float(np.abs(ts_out[0] - reference[0]).max()),
              "tolerance": tolerance,
              "top1_agreement_onnx": float((onnx_out[0].argmax(1) == reference[0].argmax(1)).mean())}
    worst = max(result["max_abs_diff_onnx"], result["max_abs_diff_torchscript"])
    if not worst <= tolerance:  # also catches NaN
        raise SystemExit(f"parity check failed: max abs diff {worst:.3g} > {tolerance:g} ({result})")
    if len(reference) > 1:
        result.update(ood_score_max_rel_diff_onnx=relative_diff(onnx_out[1], reference[1]),
                      ood_score_max_rel_diff_torchscript=relative_diff(ts_out[1], reference[1]),
                      ood_score_max_rel_diff_onnx_vs_torchscript=relative_diff(onnx_out[1], ts_out[1]),
                      ood_score_tolerance=OOD_TOLERANCE)
        worst = max(result["ood_score_max_rel_diff_onnx"], result["ood_score_max_rel_diff_torchscript"],
                    result["ood_score_max_rel_diff_onnx_vs_torchscript"])
        if not worst <= OOD_TOLERANCE:
            raise SystemExit(f"parity check of the OOD score failed: max relative diff {worst:.3g} ({result})")
    if previous_onnx is not None:
        result["max_abs_diff_vs_previous_onnx"] = float(np.abs(onnx_out[0] - previous_onnx[0]).max())
        if not result["max_abs_diff_vs_previous_onnx"] <= PREVIOUS_TOLERANCE:
            raise SystemExit(f"the new graph's probabilities differ from the previous graph's by "
                             f"{result['max_abs_diff_vs_previous_onnx']:.3g} > {PREVIOUS_TOLERANCE:g}")
    return result


def artifact_records(artifacts: dict[str, Path]) -> dict[str, Artifact]:
    """The card's ``artifacts``: each written file's name, sha256 and size."""
    return {fmt: Artifact(path.name, sha256_file(path), path.stat().st_size) for fmt, path in artifacts.items()}


def install_entry(models_dir: Path, name: str, model: nn.Module, plain: nn.Module, inputs: np.ndarray,
                  tolerance: float, make_card: Callable[[dict[str, Artifact], dict[str, float]], ModelCard],
                  extra_files: Sequence[Path] = (), previous_onnx: Path | None = None) -> tuple[Path, ModelCard]:
    """Write ``model`` (the serving graph) as ONNX and TorchScript (with Grad-CAM's ``cam`` method on
    ``plain``) into a staging folder, check parity on ``inputs``, write the card ``make_card``
    returns (given the artifacts' records and the parity) and the ``extra_files`` that exist, and swap the folder in as ``models_dir/name``.
    ``previous_onnx``: the graph this one replaces, whose probabilities the new graph must reproduce."""
    example = torch.from_numpy(inputs[:2])
    previous = onnx_outputs(previous_onnx, inputs) if previous_onnx is not None else None
    models_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=models_dir))
    staging.chmod(0o755)  # mkdtemp makes it owner-only; the registry is read by the service user
    try:
        artifacts = {"onnx": staging / ONNX_FILE, "torchscript": staging / TORCHSCRIPT_FILE}
        exportable = onnx_exportable(model, example)
        quiet(export_onnx, exportable, example, artifacts["onnx"])
        # TorchScript keeps PyTorch's own pools; beside forward it carries Grad-CAM's `cam` method
        # (POST /explain; training/cam.py), sharing the weights
        trace_explainable(model, plain, example).save(str(artifacts["torchscript"]))
        # against the original model, so a replaced pool must match it too
        parity = check_parity(model, artifacts["onnx"], artifacts["torchscript"], inputs, tolerance, previous)
        card = make_card(artifact_records(artifacts), parity)
        write_card(staging, card)
        for extra in extra_files:
            if extra.exists():
                shutil.copy(extra, staging / extra.name)
        target = swap_in(staging, models_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target, card


def swap_in(staging: Path, target: Path) -> Path:
    """Make the finished ``staging`` folder the registry entry ``target``, replacing any entry there
    (renamed aside first, so the entry is never half-written)."""
    if target.exists():
        old = target.rename(target.parent / f".{target.name}-old")
        staging.rename(target)
        shutil.rmtree(old)
    else:
        staging.rename(target)
    return target
