"""The command: ``python -m service.score FOLDER --model ... --out ...`` (see :mod:`service.score`).

A run, step by step: check the output, get the model's card (once), find the files and their
relative names (once), score them batch by batch (Ctrl-C and failures keep what was scored),
write the outputs, and say what happened in the exit code.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

from service.card import ModelCard, RegistryError, read_card
from service.config import Settings
from service.decode_pool import resolve_workers
from service.registry import FALLBACK_DEFAULT_MODEL
from service.score.errors import ScoreError
from service.score.kaggle import check_kaggle_ids, check_kaggle_model, kaggle_rows
from service.score.local import LocalScorer
from service.score.metrics import evaluate, write_metrics
from service.score.outputs import prepare_output, read_existing, side_file, write_atomic, write_errors
from service.score.ray_data import RayScorer
from service.score.remote import RemoteScorer
from service.score.rows import ScoredBatch, batch_rows, error_rows, output_columns
from service.score.sources import LabelFinder, model_folder, relative_names, walk_files


class Scorer(Protocol):
    card: ModelCard

    def score(self, paths: Sequence[Path], names: Sequence[str]) -> Iterator[ScoredBatch]: ...

    def close(self, cancel: bool = False) -> None: ...


DESCRIPTION = "Score every image in a folder: in-process (default) or through a running server (``--url``)."


def make_parser(settings: Settings, prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--model", default=settings.default_model or FALLBACK_DEFAULT_MODEL)
    parser.add_argument("--out", type=Path, required=True, help=".csv, .jsonl or .parquet (its folder is created)")
    parser.add_argument("--kaggle", action="store_true", help="write id,label (probability of dog)")
    parser.add_argument("--resume", action="store_true", help="skip files already in --out")
    parser.add_argument("--url", help="score through a running server instead of in-process")
    parser.add_argument("--engine", choices=["local", "ray"], default="local",
                        help="ray: Ray Data (a local Ray, or the cluster in RAY_ADDRESS)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", default="auto",
                        help="decode processes: auto (cores - 1, at least 1), or N; 0 decodes in this process")
    parser.add_argument("--decode", choices=["cpu", "gpu"], default="cpu",
                        help="gpu: nvJPEG for plain JPEGs at the model's size (CUDA; probabilities differ "
                             "slightly from cpu's libjpeg-turbo pixels)")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight with --url")
    parser.add_argument("--actors", type=int, default=1, help="model replicas with --engine ray")
    parser.add_argument("--backend", default=settings.backend, choices=["onnx", "torchscript"])
    parser.add_argument("--device", default=settings.device, choices=["auto", "cpu", "cuda"])
    parser.add_argument("--models-dir", type=Path, default=settings.models_dir)
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """The command; ``prog``: the name its usage line shows (default: argparse's, from sys.argv)."""
    settings = Settings.from_env()
    parser = make_parser(settings, prog)
    args = parser.parse_args(argv)
    if not args.folder.is_dir():
        parser.error(f"{args.folder} is not a folder")
    if args.out.suffix not in (".csv", ".jsonl", ".parquet"):
        parser.error("--out must end in .csv, .jsonl or .parquet")
    if args.kaggle and args.resume:
        parser.error("--kaggle and --resume do not combine; resume a full-output run, then use --kaggle")
    try:
        args.workers = resolve_workers(args.workers)
    except ValueError:
        parser.error(f"--workers must be auto or a number >= 0, not {args.workers!r}")
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    try:
        return run(args, settings)
    except (ScoreError, RegistryError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


@dataclass
class Files:
    """What a run scores: the files not scored yet, their relative names, and the rows kept."""

    todo: list[Path]
    names: list[str]
    previous: list[dict[str, Any]]


@dataclass
class Outcome:
    """What scoring gave: the rows (the kept ones first), the failed files, how it ended."""

    rows: list[dict[str, Any]]
    errors: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    interrupted: bool = False
    failure: ScoreError | None = None


def run(args: argparse.Namespace, settings: Settings) -> int:
    prepare_output(args.out)
    remote = connect(args, settings) if args.url else None  # a server that does not answer fails here
    card = remote.card if remote else read_card(model_folder(args.models_dir, args.model))  # an unknown model too
    if args.kaggle:
        check_kaggle_model(card, args.model)
    files = find_files(args)
    scorer = remote or make_local_scorer(args, settings, card)
    outcome = score_files(args, scorer, files, card)
    metrics = write_outputs(args, card, outcome)
    return report(args, outcome, len(files.previous), metrics)


def connect(args: argparse.Namespace, settings: Settings) -> Scorer:
    return RemoteScorer(args.url, args.model, min(args.batch_size, settings.max_files), args.concurrency)


def make_local_scorer(args: argparse.Namespace, settings: Settings, card: ModelCard) -> Scorer:
    if args.engine == "ray":
        return RayScorer(args.models_dir, args.model, args.backend, args.device, args.batch_size,
                         args.actors, settings.max_pixels, card=card)
    return LocalScorer(args.models_dir, args.model, args.backend, args.device, args.batch_size,
                       args.workers, settings.max_pixels, args.decode, card=card)


def find_files(args: argparse.Namespace) -> Files:
    """Every file under the folder, less those ``--resume`` finds scored; ``--kaggle`` ids checked."""
    root = args.folder.resolve()
    previous = read_existing(args.out) if args.resume else []
    done = {r["path"] for r in previous}
    found = walk_files(root)
    names = relative_names(found, root)
    if args.kaggle:
        check_kaggle_ids(names)
    todo = [k for k, name in enumerate(names) if name not in done]
    return Files([found[k] for k in todo], [names[k] for k in todo], previous)


def score_files(args: argparse.Namespace, scorer: Scorer, files: Files, card: ModelCard) -> Outcome:
    """Score batch by batch behind a progress bar; Ctrl-C or a failure keeps what was scored."""
    outcome = Outcome(rows=list(files.previous))
    labels = LabelFinder(card.classes)
    try:
        batches = scorer.score(files.todo, files.names)  # local: the first batches decode while the model loads
    except BaseException:
        scorer.close(cancel=True)
        raise
    started = time.perf_counter()  # the rate reported is from model ready to the last batch
    from tqdm import tqdm

    bar = tqdm(total=len(files.todo), unit="img", desc=f"scoring {args.folder}", file=sys.stderr, smoothing=0.1,
               mininterval=1.0)
    try:
        for batch in batches:
            outcome.rows.extend(batch_rows(batch, card, labels))
            outcome.errors.extend(error_rows(batch))
            bar.update(len(batch.names))
    except KeyboardInterrupt:
        outcome.interrupted = True
    except ScoreError as exc:
        outcome.failure = exc
    except Exception as exc:  # a decode worker that died (BrokenProcessPool), a full disk, ...
        outcome.failure = ScoreError(f"{type(exc).__name__}: {exc}")
    finally:
        bar.close()
        scorer.close(cancel=outcome.interrupted or outcome.failure is not None)
    outcome.seconds = time.perf_counter() - started
    return outcome


def write_outputs(args: argparse.Namespace, card: ModelCard, outcome: Outcome) -> dict[str, Any] | None:
    """The output, the error list and, for a labeled folder, the metrics; returns the metrics."""
    rows = sorted(outcome.rows, key=lambda r: r["path"])
    if args.kaggle:
        write_atomic(args.out, kaggle_rows(rows), ["id", "label"])
    else:
        write_atomic(args.out, rows, output_columns(card))
    write_errors(args.out, outcome.errors, args.resume)
    metrics = evaluate(rows, card.classes)
    if metrics:
        metrics.update(model=args.model, model_version=card.version)
        write_metrics(metrics, args.out, f"{args.model} v{card.version} on {args.folder.name}")
    return metrics


def report(args: argparse.Namespace, outcome: Outcome, kept: int, metrics: dict[str, Any] | None) -> int:
    """The summary lines on stderr, and the exit code: 0, 1 (failed files, or a run that stopped),
    130 (Ctrl-C)."""
    scored, seconds, errors = len(outcome.rows) - kept, outcome.seconds, outcome.errors
    summary = (f"scored {scored} images in {seconds:.1f}s ({scored / max(seconds, 1e-9):.0f} images/s), "
               f"{len(errors)} failed -> {args.out}")
    if metrics:
        summary += f"; accuracy {metrics['accuracy']:.4f} on {metrics['images']} labeled images"
    print(summary, file=sys.stderr)
    if errors:
        print(f"failures listed in {side_file(args.out, '.errors.csv')}", file=sys.stderr)
    if outcome.failure is not None:
        print(f"error: {outcome.failure}; the scored rows were kept: rerun with --resume to finish", file=sys.stderr)
        return 1
    if outcome.interrupted:
        print("interrupted: scored rows were kept; rerun with --resume to finish", file=sys.stderr)
        return 130
    return 1 if errors else 0
