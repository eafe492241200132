"""Folder scoring, measured three ways in one run on the same files:

  1. decode only — :class:`service.decode_pool.DecodePool` reading and decoding the files (the
     first 20,000 at most) with 1 worker process, then with N (``--workers``; at least 2),
     alternated ``--decode-rounds`` times (2); best of each (steady state: workers started and
     page cache warm first);
  2. model only — the model's own batched rate: the decoded images fed to the model stage the CLI
     uses (``LocalScorer.run``: ONNX Runtime session, or TorchScript from pinned memory on CUDA) in
     batches of ``--batch-size``; measured before and after (3), the mean is the reference;
  3. end to end — ``python -m service.score`` as a subprocess, from process start to exit
     (imports, model load, walking, scoring, writing the CSV/metrics/confusion files);
     ``--repeats R`` makes R trials (model, CLI, model each) and reports the median one.

Interface (``benchmarks/gpu_run.py`` calls it as a subprocess; keep it stable)::

    python benchmarks/score_bench.py --folder DIR --models-dir DIR --model NAME
        [--backend onnx|torchscript] [--device auto|cpu|cuda] [--workers auto|N]
        [--batch-size N] [--limit N] [--repeats R] [--decode-rounds R] [--decode-files N] [--json OUT.json]

Options left out are left out of the CLI run too (its defaults apply: ONNX, device auto, workers
auto, batch 256); the model stage uses the same values. ``--limit N`` scores the first N files
(sorted), copied into a temporary folder. ``--folder`` defaults to the extracted
``cifar10-jpeg/test`` (10,000 files). Prints a small table, writes the JSON and exits 0; non-zero
only when the scoring CLI itself could not run (exit code >= 2). JSON keys: ``images``;
``seconds`` (CLI start to exit); ``images_per_s`` (the CLI's own scoring rate, first batch to last,
as its summary line reports it: the figure issue 12's GPU targets are about);
``end_to_end_images_per_s`` (images / seconds); ``model_images_per_s``; ``ratio`` (end to end /
model: issue 12's CPU target, >= 0.75); ``loop_ratio``; ``decode_only`` (``workers`` [1, N],
``images_per_s``, ``speedup``, ``machine_speedup``: pure-Python work alternated with the decode
rounds, what the machine itself gave N processes against one); ``load_average_1m_before_after``;
the settings used, and ``model_device``, where the model stage really ran (``cpu`` or ``cuda``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from service.card import read_card  # noqa: E402
from service.config import host_cores  # noqa: E402
from service.decode_pool import DecodePool, resolve_workers  # noqa: E402
from service.preprocess import DEFAULT_MAX_PIXELS  # noqa: E402
from service.score import LocalScorer, walk_files  # noqa: E402


DECODE_FILES = 20_000


def decode_rate(files: list[str], size: tuple[int, int], workers: int, batch: int,
                keep: bool = False) -> tuple[float, np.ndarray | None, dict]:
    """Steady-state images/s of ``workers`` decode processes over ``files``; the images (with
    ``keep``, else None: each batch is dropped once received, as the scorer drops it after its
    model call, so the measurement does not include growing this process by every batch); and
    CPU seconds per image of the workers and of this (the collecting) process, which do not
    depend on what else the machine runs."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    with DecodePool(workers, size, DEFAULT_MAX_PIXELS, batch_size=batch) as pool:
        for future in [pool.submit(files[:8]) for _ in range(max(workers, 1))]:
            future.result()  # every worker started and warm
        start, cpu = time.perf_counter(), time.process_time()
        ahead = 2 * max(workers, 1)
        chunks = [files[i:i + batch] for i in range(0, len(files), batch)]
        pending = [pool.submit(c) for c in chunks[:ahead]]
        parts = []
        for i in range(len(chunks)):
            pixels = pending.pop(0).result().pixels
            if keep:
                parts.append(pixels)
            if i + ahead < len(chunks):
                pending.append(pool.submit(chunks[i + ahead]))
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the workers have exited: their CPU is in
    worker_cpu = (after.ru_utime + after.ru_stime) - (children.ru_utime + children.ru_stime)
    return len(files) / seconds, np.concatenate(parts) if keep else None, {
        "worker_cpu_us_per_image": worker_cpu / len(files) * 1e6, "parent_cpu_us_per_image": cpu / len(files) * 1e6}


def _spin(n: int) -> int:
    total = 0
    for i in range(n):
        total += i * i
    return total


def machine_rate(workers: int, tasks_per_worker: int = 4, n: int = 1_000_000) -> float:
    """Tasks/s of ``workers`` processes running fixed pure-Python work: what this machine gives
    N processes against one right now (on a shared VM well under N; the decode speedup's ceiling)."""
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        pool.map(_spin, [1000] * workers)  # started
        start = time.perf_counter()
        pool.map(_spin, [n] * (workers * tasks_per_worker), chunksize=1)
        return workers * tasks_per_worker / (time.perf_counter() - start)


def model_rate(scorer: LocalScorer, images: np.ndarray, batch: int) -> float:
    """Images/s of the model stage alone on decoded images, in batches (one warm-up batch first)."""
    scorer.run(images[:batch])
    start = time.perf_counter()
    for i in range(0, len(images), batch):
        scorer.run(images[i:i + batch])
    return len(images) / (time.perf_counter() - start)


def cli_run(folder: Path, args: argparse.Namespace, out: Path) -> tuple[float, int, str]:
    """Seconds from process start to exit of ``python -m service.score``, its exit code, its last line."""
    command = [sys.executable, "-m", "service.score", str(folder), "--out", str(out),
               "--models-dir", str(args.models_dir), "--model", args.model]
    for flag in ("backend", "device", "workers", "batch_size"):
        value = getattr(args, flag)
        if value is not None:
            command += [f"--{flag.replace('_', '-')}", str(value)]
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
    return seconds, proc.returncode, last


def limited_copy(root: Path, paths: list[Path], limit: int, into: Path) -> Path:
    """The first ``limit`` files, copied with their relative paths (links would lead outside)."""
    target = into / root.name
    for path in paths[:limit]:
        dest = target / path.relative_to(root)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)
    return target


def default_folder() -> Path:
    from training.data import extract_archive, shared_datasets_dir

    return extract_archive(shared_datasets_dir() / "cifar10-jpeg.tar.gz") / "cifar10-jpeg" / "test"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", type=Path)
    parser.add_argument("--models-dir", type=Path, default=REPO / "models")
    parser.add_argument("--model", default="cifar10")
    parser.add_argument("--backend", choices=["onnx", "torchscript"])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--workers", help="auto or N (decode processes; the decode-only test compares 1 with N)")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--limit", type=int, help="score only the first N files")
    parser.add_argument("--decode-rounds", type=int, default=2, help="decode-only passes per variant (best counts)")
    parser.add_argument("--decode-files", type=int, default=DECODE_FILES,
                        help=f"files in each decode-only pass (the first N; default {DECODE_FILES:,})")
    parser.add_argument("--repeats", type=int, default=1, help="end-to-end trials (model, CLI, model each); "
                        "the median trial is reported")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    folder = (args.folder or default_folder()).resolve()
    workers = resolve_workers(args.workers or "auto")
    batch = args.batch_size or 256
    card = read_card(args.models_dir / args.model)
    size = card.input.size

    with tempfile.TemporaryDirectory(prefix="score-bench-") as tmp:
        paths = walk_files(folder)
        if args.limit and args.limit < len(paths):
            folder = limited_copy(folder, paths, args.limit, Path(tmp))
            paths = walk_files(folder)
        files = [str(p) for p in paths]
        for p in files:  # page cache warm for every measurement alike
            with open(p, "rb") as handle:
                handle.read()
        load_before = os.getloadavg()

        # 1. decode only, 1 worker vs N, alternated (at most DECODE_FILES files, to bound the time)
        many = max(workers, 2)
        rates: dict[int, list[float]] = {1: [], many: []}
        decode_files = files[:args.decode_files]
        cpu: dict[int, list[dict]] = {1: [], many: []}
        machine: dict[int, list[float]] = {1: [], many: []}
        for _ in range(args.decode_rounds):
            for n in (1, many):
                rate, _, used = decode_rate(decode_files, size, n, batch)
                rates[n].append(rate)
                cpu[n].append(used)
                machine[n].append(machine_rate(n))
        images = decode_rate(files, size, many, batch, keep=True)[1]  # the model stage runs on every file
        # CPU per image, median over rounds: p = workers' decode work, s = the collecting process's
        worker_us = float(np.median([u["worker_cpu_us_per_image"] for u in cpu[many]]))
        parent_us = float(np.median([u["parent_cpu_us_per_image"] for u in cpu[many]]))

        # 2. and 3. model stage alone around the end-to-end run
        scorer = LocalScorer(args.models_dir, args.model, args.backend or "onnx", args.device or "auto",
                             batch, 0)
        scorer.load()
        trials = []
        model_after = model_rate(scorer, images, batch)
        for _ in range(args.repeats):  # model, CLI, model: each CLI run against its neighbours
            model_before = model_after
            seconds, code, last_line = cli_run(folder, args, Path(tmp) / "pred.csv")
            model_after = model_rate(scorer, images, batch)
            reported = re.search(r"\((\d+) images/s\)", last_line)
            trials.append({"model_images_per_s_before_after": [round(model_before, 1), round(model_after, 1)],
                           "seconds": round(seconds, 3), "cli_exit_code": code, "cli_summary": last_line,
                           "loop": float(reported.group(1)) if reported else float("nan"),
                           "ratio": len(files) / seconds / ((model_before + model_after) / 2)})
        load_after = os.getloadavg()

    trials.sort(key=lambda t: t["ratio"])
    median = trials[len(trials) // 2]  # the median trial's figures are the result
    model_before, model_after = median["model_images_per_s_before_after"]
    seconds, code, last_line, loop = median["seconds"], median["cli_exit_code"], median["cli_summary"], median["loop"]
    model = (model_before + model_after) / 2
    end_to_end = len(files) / seconds
    result: dict[str, Any] = {
        "machine": f"{platform.machine()}, {host_cores()} cores ({os.cpu_count()} online)",
        "folder": str(args.folder or folder), "model": args.model,
        "backend": args.backend or "onnx (default)", "device": args.device or "auto (default)",
        "model_device": scorer.model.backend.device if scorer.model else None,  # where it ran: cpu or cuda
        "workers": workers, "batch_size": batch,
        "images": len(files),
        "seconds": round(seconds, 3),  # process start to exit
        "images_per_s": loop,  # the CLI's own figure: files / seconds from first batch to last
        "end_to_end_images_per_s": round(end_to_end, 1),  # files / (process start to exit)
        "model_images_per_s": round(model, 1),
        "model_images_per_s_before_after": [round(model_before, 1), round(model_after, 1)],
        "ratio": round(end_to_end / model, 3),  # start-to-exit rate / the model's batched rate
        "loop_ratio": round(loop / model, 3),
        "decode_only": {"files": len(decode_files), "workers": [1, many],
                        "images_per_s": [round(max(rates[1]), 1), round(max(rates[many]), 1)],
                        "all_runs": {str(k): [round(r, 1) for r in v] for k, v in rates.items()},
                        "speedup": round(max(rates[many]) / max(rates[1]), 3),
                        "worker_cpu_us_per_image": round(worker_us, 1), "parent_cpu_us_per_image": round(parent_us, 1),
                        # N workers on N otherwise idle cores, the collecting process sharing them:
                        # N * p / (p + s) times one worker (which has a core to itself, and the
                        # collector another); an estimate from CPU times, not a measurement
                        "speedup_expected_on_idle_cores": round(many * worker_us / (worker_us + parent_us), 3),
                        # the same alternation with pure-Python work in 1 and N processes: what the
                        # machine itself gave N processes during the run (best of each)
                        "machine_speedup": round(max(machine[many]) / max(machine[1]), 3),
                        "machine_all_runs": {str(k): [round(r, 2) for r in v] for k, v in machine.items()}},
        "cli_exit_code": code, "cli_summary": last_line,
        "ratios_of_all_trials": [round(t["ratio"], 3) for t in trials],
        "load_average_1m_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
    }
    speedup = result["decode_only"]["speedup"]
    print(f"{'what':<46}{'images/s':>12}")
    print(f"{'decode only, 1 worker process':<46}{max(rates[1]):>12.0f}")
    print(f"{f'decode only, {many} worker processes':<46}{max(rates[many]):>12.0f}   ({speedup:.2f}x)")
    print(f"{'':<46}{'':>12}   (CPU per image: workers {worker_us:.1f} us, collector {parent_us:.1f} us;"
          f" {result['decode_only']['speedup_expected_on_idle_cores']:.2f}x expected on {many} idle cores)")
    print(f"{'':<46}{'':>12}   (pure-Python work in the same rounds: {many} processes "
          f"{result['decode_only']['machine_speedup']:.2f}x one, the machine's own ceiling)")
    print(f"{'model alone, batched (mean of before/after)':<46}{model:>12.0f}")
    print(f"{'service.score, its scoring loop (as it reports)':<46}{loop:>12.0f}   ({result['loop_ratio']:.2f} of the model)")
    print(f"{'service.score, process start to exit':<46}{end_to_end:>12.0f}"
          f"   ({result['ratio']:.2f} of the model; {seconds:.2f} s for {len(files)} files)")
    print(f"load average (1 min) before/after: {load_before[0]:.2f} / {load_after[0]:.2f}; CLI exit {code}"
          + (f"; ratios of the {len(trials)} trials: {result['ratios_of_all_trials']}" if len(trials) > 1 else ""))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if all(t["cli_exit_code"] in (0, 1) for t in trials) else 1


if __name__ == "__main__":
    raise SystemExit(main())
