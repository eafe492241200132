"""The run's files: the output (``.csv``, ``.jsonl``, ``.parquet``) and its side files, checked
before scoring, read back for ``--resume``, and replaced atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from service.score.errors import ScoreError


def side_file(out: Path, suffix: str) -> Path:
    """``p.csv`` -> ``p.csv<suffix>``: side files named from the whole output name, so outputs that
    differ only in format do not overwrite each other's."""
    return out.with_name(out.name + suffix)


def prepare_output(out: Path) -> None:
    """Create the output's folder and check that it can be written, before any scoring."""
    folder = out.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ScoreError(f"cannot create the output folder {folder} ({type(exc).__name__}: {exc.strerror or exc})") from None
    if out.is_dir():
        raise ScoreError(f"--out {out} is a folder; give a file name ending in .csv, .jsonl or .parquet")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ScoreError(f"cannot write to the output folder {folder} (permission denied)")


def read_existing(out: Path) -> list[dict[str, Any]]:
    if not out.exists():
        return []
    if out.suffix == ".jsonl":
        return [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    if out.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(out).to_pylist()
    import csv

    with open(out, newline="") as handle:
        return list(csv.DictReader(handle))


def write_atomic(out: Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    tmp = out.with_name(f".{out.name}.tmp")
    if out.suffix == ".jsonl":
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif out.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), tmp)
    else:
        import csv

        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
    os.replace(tmp, out)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_errors(out: Path, errors: list[dict[str, str]], resume: bool) -> Path:
    """``<out>.errors.csv`` listing ``errors`` (sorted by path); with none, an earlier run's list
    is removed, except on ``--resume``."""
    path = side_file(out, ".errors.csv")
    if errors:
        errors.sort(key=lambda r: r["path"])
        write_atomic(path, errors, ["path", "error", "detail"])
    elif path.exists() and not resume:
        path.unlink()
    return path
