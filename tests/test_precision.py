"""--precision auto|bf16|fp32: what auto picks from the CPU's flags, what each runs in, and that a bf16
CPU run learns as well as an fp32 one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from training.precision import FP32, cpu_flags, resolve_precision

CPU = torch.device("cpu")


@pytest.mark.parametrize("flags, expected", [
    ({"avx2", "avx512f", "avx512_bf16"}, "bf16"),          # AMD Zen 4/5, Intel Cooper Lake
    ({"avx2", "amx_bf16", "amx_tile", "amx_int8"}, "bf16"),  # Intel Sapphire Rapids and later
    ({"avx2", "avx512f", "avx512_vnni"}, "fp32"),          # VNNI is int8 only: bf16 would be emulated
    (set(), "fp32"),                                       # no /proc/cpuinfo (macOS, some containers)
])
def test_auto_picks_bf16_only_where_the_cpu_computes_it(flags: set[str], expected: str) -> None:
    precision = resolve_precision("auto", CPU, flags)
    assert precision.name == expected
    assert precision.reason.startswith("auto: ")


def test_explicit_choices_win_and_unknown_is_refused() -> None:
    assert resolve_precision("fp32", CPU, {"amx_bf16"}) is FP32
    assert resolve_precision("bf16", CPU, set()).name == "bf16"
    with pytest.raises(ValueError, match="unknown precision"):
        resolve_precision("fp16", CPU)


def test_cpu_flags_are_read_from_the_first_flags_line(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu avx2 avx512_bf16\n\n"
                    "processor\t: 1\nflags\t\t: fpu\n")
    assert cpu_flags(info) == {"fpu", "avx2", "avx512_bf16"}
    assert cpu_flags(tmp_path / "absent") == frozenset()


def test_record_names_the_precision_and_the_matrix_units() -> None:
    record = resolve_precision("auto", CPU, {"avx512_bf16", "avx512_vnni", "sse2"}).record(
        {"avx512_bf16", "avx512_vnni", "sse2"})
    assert record == {"precision": "bf16", "precision_reason": "auto: the CPU has avx512_bf16",
                      "cpu_flags": ["avx512_bf16", "avx512_vnni"]}


def test_bf16_runs_the_convolutions_in_bf16_and_fp32_does_not() -> None:
    conv = torch.nn.Conv2d(3, 8, 3)
    x = torch.randn(2, 3, 8, 8)
    with resolve_precision("bf16", CPU).autocast(CPU):
        assert conv(x).dtype == torch.bfloat16
    with FP32.autocast(CPU):
        assert conv(x).dtype == torch.float32


def test_bf16_cpu_training_learns_within_noise_of_fp32(tmp_path: Path, cifar_folder: Path) -> None:
    """A small proxy (fastnet_tiny, 4,096 CIFAR-10 images, 3 epochs, 2,000 test images), once in
    each precision from the same seed: both learn, and their test accuracies are within 4 points
    (one standard error on 2,000 images is ~1.1 points; seed-to-seed spread at this budget ~1-2)."""
    from training.train import parse_args, train

    results = {}
    for precision in ("fp32", "bf16"):
        metrics = train(parse_args([
            "--model", "fastnet_tiny", "--epochs", "3", "--batch-size", "256", "--lr", "0.2", "--limit-train", "4096",
            "--limit-eval", "2000", "--precision", precision, "--quiet", "--no-plot", "--no-tensorboard",
            "--out", str(tmp_path / precision)]))
        assert metrics["precision"] == precision and metrics["precision_reason"] == f"{precision} asked for"
        results[precision] = metrics["test_accuracy"]
    assert min(results.values()) > 0.25, results  # both learned (chance is 0.10; measured 31-32 %)
    assert abs(results["bf16"] - results["fp32"]) <= 0.04, results
