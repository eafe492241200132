"""Training-step speed in each precision and memory layout, side by side: what ``--precision auto``
buys on this machine.

    python benchmarks/precision_bench.py --json docs/benchmarks/precision_cpu.json

One training step (forward under the precision's autocast, cross-entropy, backward, Nesterov SGD)
on random data at each preset's network, batch size and resolution, in fp32 and bf16, NCHW and
channels-last; the variants of one network run interleaved for ``--rounds`` rounds and the median
images/s is reported, with what ``auto`` picks here and why (training/precision.py). Random data:
the speed of these kernels does not depend on the values (the whitening and pretrained weights do
not matter for it either).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from training.nets import build_model  # noqa: E402
from training.precision import RECORDED_FLAGS, cpu_flags, resolve_precision  # noqa: E402
from training.compute import hardware  # noqa: E402
from training.presets import recipe  # noqa: E402

# (preset, network, batch, side): each preset's network and resolution (the CIFAR presets at batch
# 512, half theirs, as issue 18's table), and resnet20, the earlier shipped network
CASES = [*((name, recipe(name)["model"], min(512, recipe(name)["batch_size"]), recipe(name).get("image_size", 32)
            if recipe(name)["dataset"] == "catsdogs" else 32) for name in ("fast", "ship", "catsdogs-imagenet")),
         ("-", "resnet20", 256, 32)]
VARIANTS = [("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True)]


def step_rate(model: torch.nn.Module, batch: int, side: int, precision: str, channels_last: bool, steps: int) -> float:
    device = torch.device("cpu")
    autocast = resolve_precision(precision, device).autocast
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.train().to(memory_format=fmt)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, nesterov=True)
    x = torch.randn(batch, 3, side, side).contiguous(memory_format=fmt)
    y = torch.randint(0, 2, (batch,))

    def step() -> None:
        with autocast(device):
            logits = model(x).float()
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # oneDNN plans its kernels on the first step
    tick = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - tick)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--only", nargs="+", help="networks to measure (default: all four)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    auto = resolve_precision("auto", torch.device("cpu"))
    rows = []
    print(f"{hardware(torch.device('cpu'))}; auto: {auto.name} ({auto.reason})")
    print("| preset | network, batch, side | fp32 NCHW | fp32 channels-last | bf16 NCHW | bf16 channels-last |\n"
          "| --- | --- | --- | --- | --- | --- |")
    for preset, name, batch, side in CASES:
        if args.only and name not in args.only:
            continue
        models = {variant: build_model(name, 2) for variant in VARIANTS}
        rates: dict[tuple[str, bool], list[float]] = {variant: [] for variant in VARIANTS}
        for _ in range(args.rounds):
            for variant in VARIANTS:
                rates[variant].append(step_rate(models[variant], batch, side, *variant, args.steps))
        medians = {f"{p}{'-cl' if cl else ''}": statistics.median(rates[(p, cl)]) for p, cl in VARIANTS}
        rows.append({"preset": preset, "network": name, "batch": batch, "side": side, "images_per_s": medians,
                     "rounds": {f"{p}{'-cl' if cl else ''}": rates[(p, cl)] for p, cl in VARIANTS}})
        print(f"| {preset} | `{name}`, {batch}, {side} px | " + " | ".join(f"{v:,.0f}" for v in medians.values()) + " |",
              flush=True)
    if args.json:
        flags = cpu_flags()
        args.json.write_text(json.dumps({
            "command": "python benchmarks/precision_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": hardware(torch.device("cpu")), "cpu_flags": [f for f in RECORDED_FLAGS if f in flags],
            "torch": torch.__version__, "auto": auto.record(flags), "rounds": args.rounds, "steps": args.steps,
            "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
