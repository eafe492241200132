"""What test-time augmentation and INT8 cost and give: CPU time per image of registry entries' ONNX
graphs, side by side in one run, beside the accuracy their cards record.

    python benchmarks/variants_bench.py runs/variants --json docs/benchmarks/variants_cpu.json
    python benchmarks/variants_bench.py models --names cifar10 cifar10-int8

For every entry of the registry (or ``--names``): one ONNX Runtime CPU session as the service makes
it (``service.registry.load_model``: same threads, arena and spin settings), fed batches of real
test images (the card's split, decoded at the card's size) of ``--batch`` images. Rounds are
interleaved (every entry once per round, ``--rounds`` rounds) so a machine whose speed drifts
treats every entry alike; the figure is the median over rounds of this process's CPU time per
image (``time.process_time``: every ONNX Runtime thread included) and of the wall time. The
accuracies are the cards' (measured at export or quantisation on the full test split; the graph is
the same file). ``--threads`` is ONNX Runtime's intra-op thread count (default 1: what each of the
service's two workers gets on a 2-core host).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models_dir", type=Path)
    parser.add_argument("--names", nargs="+", help="entries to measure (default: all)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=8, help="batches per entry per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    from service.registry import load_model, model_folders
    from training.compute import hardware
    from training.precision import RECORDED_FLAGS, cpu_flags
    from training.splits import card_dataset
    import torch

    entries = {}
    for folder in model_folders(args.models_dir, args.names):
        model = load_model(folder, "onnx", "cpu", threads=args.threads)
        images = card_dataset(model.card).test.images[:args.batch * args.batches].numpy()
        model.predict(images[:args.batch])  # warm-up: the first run allocates and plans
        entries[folder.name] = (model, images)
    cpu: dict[str, list[float]] = {name: [] for name in entries}
    wall: dict[str, list[float]] = {name: [] for name in entries}
    for _ in range(args.rounds):
        for name, (model, images) in entries.items():
            c0, w0 = time.process_time(), time.perf_counter()
            for start in range(0, len(images), args.batch):
                model.predict(images[start:start + args.batch])
            cpu[name].append((time.process_time() - c0) * 1000 / len(images))
            wall[name].append((time.perf_counter() - w0) * 1000 / len(images))
    rows = []
    for name, (model, _) in entries.items():
        card = model.card
        tta = card.tta_level
        rows.append({"name": name, "version": card.version, "architecture": card.architecture,
                     "tta_level": tta, "views": {0: 1, 1: 2, 2: 6}[tta],
                     "int8": "quantization" in card.extra, "test_accuracy": card.metrics["test_accuracy"],
                     "test_images": card.metrics["test_images"],
                     "onnx_bytes": card.artifact("onnx").bytes,
                     "cpu_ms_per_image": statistics.median(cpu[name]), "cpu_ms_rounds": cpu[name],
                     "wall_ms_per_image": statistics.median(wall[name])})
    print(f"| entry | views | int8 | test accuracy | CPU ms / image | wall ms / image | ONNX MB |\n"
          f"| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['name']} | {row['views']} | {'yes' if row['int8'] else 'no'} | "
              f"{100 * row['test_accuracy']:.2f} % | {row['cpu_ms_per_image']:.2f} | {row['wall_ms_per_image']:.2f} | "
              f"{row['onnx_bytes'] / 1e6:.1f} |")
    if args.json:
        flags = cpu_flags()
        args.json.write_text(json.dumps({
            "command": "python benchmarks/variants_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": {"cpu": hardware(torch.device("cpu")), "cpu_flags": [f for f in RECORDED_FLAGS if f in flags]},
            "threads": args.threads, "batch": args.batch, "images_per_round": args.batch * args.batches,
            "rounds": args.rounds, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
