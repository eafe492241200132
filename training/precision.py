"""Which arithmetic training and evaluation run in: ``--precision auto|bf16|fp32``.

``bf16`` is ``torch.autocast(device, torch.bfloat16)`` around the forward pass (weights, gradients
and the optimiser stay float32); ``fp32`` is plain float32. ``auto`` picks bf16 where the hardware
computes it natively and fp32 elsewhere:

* CUDA: bf16 when ``torch.cuda.is_bf16_supported()`` (Ampere and later); an older GPU emulates it
  slowly, so it gets fp32.
* CPU: bf16 when the CPU's flags (``/proc/cpuinfo``) name AMX-BF16 (Intel Sapphire Rapids and
  later) or AVX512-BF16 (Intel Cooper Lake and later, AMD Zen 4 and later); oneDNN then runs bf16
  convolutions in those instructions. Without them bf16 is emulated and slower than fp32.

Measured side by side (docs/TRAINING.md): one training step of ``fastnet_res`` at batch 512 in
bf16 channels-last is 2.2x (AMD EPYC, AVX512-BF16) to 3.1x (Intel Xeon, AMX) its fp32
channels-last speed. Everything is public API: the flags are read from the kernel's own file, not
from a private torch query.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import ContextManager, Iterable

import torch

PRECISIONS = ("auto", "bf16", "fp32")
# CPU flags (as /proc/cpuinfo spells them) that mean native bf16 matrix arithmetic
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
# flags worth recording beside the precision (bf16 and int8 matrix units)
RECORDED_FLAGS = ("amx_bf16", "amx_int8", "amx_tile", "avx512_bf16", "avx512_vnni", "avx_vnni", "avx512f", "avx2")


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU's feature flags (the first ``flags`` line of ``cpuinfo``); empty where the file is
    absent or has none (macOS, Windows, some containers): ``auto`` then means fp32 on the CPU."""
    try:
        with open(cpuinfo) as handle:
            for line in handle:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@dataclass(frozen=True)
class Precision:
    """A resolved precision: ``name`` is ``bf16`` or ``fp32``, ``reason`` says why (for the card)."""

    name: str
    reason: str

    @property
    def bf16(self) -> bool:
        return self.name == "bf16"

    def autocast(self, device: torch.device) -> ContextManager:
        """The context the forward pass runs in: bf16 autocast, or nothing for fp32."""
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device.type, torch.bfloat16)

    def record(self, flags: Iterable[str] | None = None) -> dict[str, object]:
        """What ``metrics.json`` and the card keep: the precision, why, and the matrix-unit flags."""
        present = set(cpu_flags() if flags is None else flags)
        return {"precision": self.name, "precision_reason": self.reason,
                "cpu_flags": [f for f in RECORDED_FLAGS if f in present]}


FP32 = Precision("fp32", "fp32 asked for")


def resolve_precision(requested: str, device: torch.device, flags: Iterable[str] | None = None) -> Precision:
    """``requested`` (auto | bf16 | fp32) for ``device``; ``flags``: the CPU's (default: read them)."""
    if requested not in PRECISIONS:
        raise ValueError(f"unknown precision {requested!r}; choose from {PRECISIONS}")
    if requested == "fp32":
        return FP32
    if requested == "bf16":
        return Precision("bf16", "bf16 asked for")
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return Precision("bf16", f"auto: {torch.cuda.get_device_name(device)} computes bf16 natively")
        return Precision("fp32", f"auto: {torch.cuda.get_device_name(device)} has no native bf16")
    present = set(cpu_flags() if flags is None else flags)
    native = [f for f in NATIVE_BF16_FLAGS if f in present]
    if native:
        return Precision("bf16", f"auto: the CPU has {' and '.join(native)}")
    return Precision("fp32", "auto: the CPU has neither amx_bf16 nor avx512_bf16 (bf16 would be emulated)")
