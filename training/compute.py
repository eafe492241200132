"""Where and how a network runs: the device, the hardware's name (for the record), host
synchronisation for honest timings, and ``torch.compile`` where it pays and works."""

from __future__ import annotations

import platform
import sys
from typing import Any

import torch
from torch import nn

from training.precision import FP32, Precision


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            name = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name} CPU, {torch.get_num_threads()} threads"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def maybe_compile(model: nn.Module, mode: str, device: torch.device, example: torch.Tensor,
                  precision: Precision = FP32) -> nn.Module:
    """``torch.compile(model)`` with ``--compile on``, or checked (:func:`compile_checked`) with
    ``auto`` on CUDA; else the model itself."""
    if mode == "on":
        return torch.compile(model)
    if mode == "auto" and device.type == "cuda":
        return compile_checked(model, example, precision=precision)
    return model


def compile_checked(model: nn.Module, example: torch.Tensor, backend: Any = "inductor",
                    precision: Precision = FP32) -> nn.Module:
    """The compiled model, after one forward and backward pass on ``example`` (a training batch);
    where that fails (a host whose compiler toolchain Triton cannot use, say), the model itself,
    with a warning: training goes on eagerly instead of dying at its first step. The probe's
    effects on the weights, gradients and BatchNorm statistics are undone; the code it compiled
    is what training reuses."""
    compiled = torch.compile(model, backend=backend)
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    try:
        with precision.autocast(example.device):
            loss = compiled(example).float().sum()
        loss.backward()
    except Exception as exc:  # any failure of the compiler stack: train eagerly
        print(f"warning: torch.compile failed here ({type(exc).__name__}: {str(exc)[:300]}); "
              "training runs without it", file=sys.stderr)
        compiled = model
    finally:
        model.zero_grad(set_to_none=True)
        model.load_state_dict(saved)
    return compiled


