"""The scoring command's edges: Kaggle ids, side-file names, the output folder, one-line errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from service import score
from conftest import REPO, SHIPPED_MODELS, free_port


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "service.score", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr
    return lines[0]


@pytest.fixture()
def cats_and_dogs(tmp_path: Path, cifar_folder: Path) -> Path:
    """cat/0000.jpg ... and dog/0000.jpg ...: a class-folder layout whose file names repeat."""
    root = tmp_path / "pets"
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        for src in sorted((cifar_folder / "test" / name).glob("*.jpg"))[:4]:
            shutil.copy(src, root / name / src.name)
    return root


def test_kaggle_refuses_repeated_ids_before_scoring(cats_and_dogs: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "submission.csv"
    code = score.main([str(cats_and_dogs), "--model", "catsdogs", "--kaggle", "--out", str(out),
                       "--models-dir", str(SHIPPED_MODELS)])
    line = one_error_line(capsys.readouterr().err)
    assert code == 2 and not out.exists()
    assert "cat/0000.jpg and dog/0000.jpg are both id 0" in line and "4 files repeat an id" in line


def test_kaggle_ids_of_a_flat_folder_are_unique_and_numeric(cats_and_dogs: Path, tmp_path: Path) -> None:
    flat = tmp_path / "test1"
    flat.mkdir()
    for i, src in enumerate(sorted(cats_and_dogs.glob("*/*.jpg")), start=1):
        shutil.copy(src, flat / f"{i}.jpg")
    out = tmp_path / "submission.csv"
    assert score.main([str(flat), "--model", "catsdogs", "--kaggle", "--out", str(out),
                       "--models-dir", str(SHIPPED_MODELS)]) == 0
    lines = out.read_text().splitlines()
    assert lines[0] == "id,label" and [int(x.split(",")[0]) for x in lines[1:]] == list(range(1, 9))


def test_side_files_are_named_from_the_whole_output_name(cats_and_dogs: Path, tmp_path: Path) -> None:
    (cats_and_dogs / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    outputs = [tmp_path / "x.csv", tmp_path / "x.parquet"]
    for out in outputs:
        assert score.main([str(cats_and_dogs), "--out", str(out), "--models-dir", str(SHIPPED_MODELS)]) == 1
    (cats_and_dogs / "dog" / "broken.jpg").unlink()
    (cats_and_dogs / "cat" / "0000.jpg").unlink()  # the parquet run differs from the csv one
    assert score.main([str(cats_and_dogs), "--out", str(outputs[1]), "--models-dir", str(SHIPPED_MODELS)]) == 0
    csv_metrics = json.loads((tmp_path / "x.csv.metrics.json").read_text())
    parquet_metrics = json.loads((tmp_path / "x.parquet.metrics.json").read_text())
    assert csv_metrics["images"] == 8 and parquet_metrics["images"] == 7
    assert (tmp_path / "x.csv.errors.csv").exists() and not (tmp_path / "x.parquet.errors.csv").exists()
    assert "on 8 labeled" in (tmp_path / "x.csv.confusion.txt").read_text()
    assert "on 7 labeled" in (tmp_path / "x.parquet.confusion.txt").read_text()
    for out in outputs:
        assert (tmp_path / f"{out.name}.confusion.png").stat().st_size > 1000
    assert not list(tmp_path.glob("x.metrics.json")) and not list(tmp_path.glob("x.confusion.*"))


def test_missing_output_folder_is_created_first(cats_and_dogs: Path, tmp_path: Path) -> None:
    out = tmp_path / "new" / "deeper" / "pred.jsonl"
    assert score.main([str(cats_and_dogs), "--out", str(out), "--models-dir", str(SHIPPED_MODELS)]) == 0
    assert len(out.read_text().splitlines()) == 8 and (out.parent / "pred.jsonl.metrics.json").exists()


def test_unwritable_output_fails_before_scoring(cats_and_dogs: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("in the way")
    code = score.main([str(cats_and_dogs), "--out", str(blocker / "pred.csv"), "--models-dir", str(SHIPPED_MODELS)])
    err = capsys.readouterr().err
    assert code == 2 and "cannot create the output folder" in one_error_line(err) and "scored" not in err


def test_unknown_model_is_one_line_and_exit_2(cats_and_dogs: Path, tmp_path: Path) -> None:
    proc = cli(str(cats_and_dogs), "--model", "nope", "--out", str(tmp_path / "p.csv"),
               "--models-dir", str(SHIPPED_MODELS))
    line = one_error_line(proc.stderr)
    assert proc.returncode == 2 and "'nope' not found" in line and "cifar10" in line
    assert not (tmp_path / "p.csv").exists()


def test_url_that_does_not_answer_is_one_line_and_exit_2(cats_and_dogs: Path, tmp_path: Path) -> None:
    proc = cli(str(cats_and_dogs), "--url", f"http://127.0.0.1:{free_port()}", "--out", str(tmp_path / "p.csv"))
    line = one_error_line(proc.stderr)
    assert proc.returncode == 2 and "does not answer" in line and not (tmp_path / "p.csv").exists()


def test_server_failing_mid_run_ends_with_one_error_line_and_exit_1(cats_and_dogs: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """A server that knows the model but fails every batch (HTTP 500): the run stops at once with one
    error line, exit code 1, and a whole (empty) output to --resume from."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    card = (SHIPPED_MODELS / "cifar10" / "card.json").read_bytes()

    class Broken(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(card)))
            self.end_headers()
            self.wfile.write(card)

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(500)
            self.send_header("Content-Length", "11")
            self.end_headers()
            self.wfile.write(b"out of luck")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Broken)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    out = tmp_path / "p.csv"
    try:
        code = score.main([str(cats_and_dogs), "--out", str(out), "--url", f"http://127.0.0.1:{server.server_port}"])
    finally:
        server.shutdown()
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1].startswith("error: ") and "HTTP 500: out of luck" in err[-1]
    assert "--resume" in err[-1] and out.read_text().startswith("path,label,probability")
