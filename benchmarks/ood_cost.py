"""What the out-of-distribution score costs per model call: the same model with and without it, side by side.

    git show HEAD~N:models/cifar10/model.onnx ...   # a registry copy of the entries before the score
    .venv/bin/python benchmarks/ood_cost.py --without /tmp/without --with models --json docs/benchmarks/ood_cost_cpu.json

For each model in both registries (same network and weights: the ``--with`` entry's card must
record ``fitted_from_version`` = the ``--without`` entry's version), ``LoadedModel.predict`` -- what
a serving batch runs: normalisation, the backend, and for the entry with the score its second
output and the packing of both into one array -- on real CIFAR-10 test JPEGs decoded by the
service's pipeline (resized to each model's input), batch sizes 1 and 32. The two are timed in
alternation, ``--rounds`` times, so a change in the machine's load falls on both; reported: the
median seconds per call and the ratio with/without. ``--threads``: ONNX Runtime threads (the
service gives a single worker all cores).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from service.card import read_card  # noqa: E402
from service.pipeline import decode_batch  # noqa: E402
from service.registry import load_model  # noqa: E402


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor()
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")


def jpegs(count: int) -> list[Path]:
    from training.data import extract_archive, shared_datasets_dir

    folder = extract_archive(shared_datasets_dir() / "cifar10-jpeg.tar.gz") / "cifar10-jpeg" / "test"
    return sorted(folder.glob("*/*.jpg"))[::max(1, 10_000 // count)][:count]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--without", type=Path, required=True, help="registry with the entries before the score")
    parser.add_argument("--with", dest="with_", type=Path, default=REPO / "models")
    parser.add_argument("--models", nargs="+", default=["cifar10", "catsdogs"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--backend", default="onnx")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    files = jpegs(max(args.batches))
    results = []
    for name in args.models:
        before, after = read_card(args.without / name), read_card(args.with_ / name)
        if after.ood is None or after.ood.section.get("fitted_from_version") != before.version:
            raise SystemExit(f"{name}: {args.with_ / name} is not {args.without / name} with an OOD score")
        plain = load_model(args.without / name, args.backend, "cpu", args.threads)
        scored = load_model(args.with_ / name, args.backend, "cpu", args.threads)
        pixels = decode_batch([str(p) for p in files], before.input.size).pixels
        for batch in args.batches:
            images = pixels[:batch]
            assert np.array_equal(scored.predict(images)[:, :-1], plain.predict(images))  # same probabilities
            times: dict[str, list[float]] = {"without": [], "with": []}
            for _ in range(args.rounds):
                for label, model in (("without", plain), ("with", scored)):
                    start = time.perf_counter()
                    model.predict(images)
                    times[label].append(time.perf_counter() - start)
            median = {k: statistics.median(v) for k, v in times.items()}
            row = {"model": name, "backend": args.backend, "batch": batch, "rounds": args.rounds,
                   "without_s": median["without"], "with_s": median["with"],
                   "ratio": median["with"] / median["without"]}
            results.append(row)
            print(f"{name} batch {batch}: without {1e3 * row['without_s']:.2f} ms, with {1e3 * row['with_s']:.2f} ms, "
                  f"ratio {row['ratio']:.3f}", flush=True)
    report = {"command": "python benchmarks/ood_cost.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "cpu": cpu_model(), "cores": os.cpu_count(), "load_average_1m": os.getloadavg()[0],
              "results": results}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
