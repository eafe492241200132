"""Decoding in worker processes: the same bytes as the single-process path, errors kept, lean imports."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service import score
from service.decode_pool import DecodePool, resolve_workers
from service.pipeline import INLINE_MAX_PIXELS, decode_batch, inline_pixels, plain_jpeg_pixels
from service.preprocess import DEFAULT_MAX_PIXELS, ImageError, decode_to_array
from conftest import REPO, SHIPPED_MODELS


def general(data: bytes, size: tuple[int, int], max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray | ImageError:
    """The general decoder alone (no fast path): what the fast path must agree with."""
    try:
        return decode_to_array(data, size, max_pixels)
    except ImageError as exc:
        return exc


@pytest.fixture()
def mixed_folder(tmp_path: Path, cifar_folder: Path) -> Path:
    """Plain CIFAR JPEGs plus every kind of file that must leave the fast path: PNG, grayscale and
    EXIF-rotated JPEGs, a larger JPEG (resized), a truncated JPEG, a text file."""
    root = tmp_path / "mixed"
    sources = sorted((cifar_folder / "test" / "horse").glob("*.jpg"))[:40]
    (root / "horses").mkdir(parents=True)
    for src in sources:
        shutil.copy(src, root / "horses" / src.name)
    first = Image.open(sources[0])
    first.save(root / "horses" / "as.png")
    first.convert("L").save(root / "horses" / "gray.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6
    first.save(root / "horses" / "rotated.jpg", exif=exif)
    first.resize((90, 60)).save(root / "horses" / "large.jpg")
    (root / "horses" / "truncated.jpg").write_bytes(sources[1].read_bytes()[:-50])
    (root / "notes.txt").write_text("not an image")
    return root


def errors(batch) -> list[tuple[int, str, str]]:
    return [(i, e.error, e.detail) for i, e in batch.errors]


def test_worker_processes_write_the_same_bytes_as_one_process(mixed_folder: Path, tmp_path: Path) -> None:
    outputs = {}
    for workers in ("0", "2"):
        out = tmp_path / f"w{workers}" / "pred.csv"
        code = score.main([str(mixed_folder), "--out", str(out), "--workers", workers, "--batch-size", "16",
                           "--models-dir", str(SHIPPED_MODELS)])
        assert code == 1  # the truncated JPEG and the text file
        outputs[workers] = (out.read_bytes(), (out.parent / "pred.csv.errors.csv").read_bytes())
    assert outputs["0"] == outputs["2"]
    errors = outputs["2"][1].decode()
    assert "horses/truncated.jpg,corrupt_image" in errors and "notes.txt,not_an_image" in errors
    assert outputs["2"][0].decode().count("\n") == 1 + 40 + 4  # header, plain files, png/gray/rotated/large


def test_fast_path_matches_the_service_decoder_and_declines_the_rest(cifar_folder: Path) -> None:
    blobs = [p.read_bytes() for p in sorted((cifar_folder / "test" / "bird").glob("*.jpg"))[:300]]
    for blob in blobs:
        fast = plain_jpeg_pixels(blob, (32, 32))
        assert fast is not None and np.array_equal(fast, general(blob, (32, 32)))
    image = Image.open(io.BytesIO(blobs[0]))
    exif, xmp, gray = io.BytesIO(), io.BytesIO(), io.BytesIO()
    exif_data = Image.Exif()
    exif_data[0x0112] = 3
    image.save(exif, "JPEG", exif=exif_data)
    image.save(xmp, "JPEG", xmp=b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/'
                               b'1999/02/22-rdf-syntax-ns#"><rdf:Description xmlns:tiff="http://ns.adobe.com/'
                               b'tiff/1.0/" tiff:Orientation="3"/></rdf:RDF></x:xmpmeta>')
    image.convert("L").save(gray, "JPEG")
    for declined in (exif.getvalue(), xmp.getvalue(), gray.getvalue(), blobs[1][:-40], b""):
        assert plain_jpeg_pixels(declined, (32, 32)) is None
    assert np.array_equal(plain_jpeg_pixels(blobs[2], (64, 40)), general(blobs[2], (64, 40)))  # resized
    # the XMP-rotated file really is rotated by the general path, which is why it is declined
    assert not np.array_equal(general(xmp.getvalue(), (32, 32)), general(blobs[0], (32, 32)))


def test_fast_path_on_photos_resized_and_large(catsdogs_folder: Path) -> None:
    photos = sorted((catsdogs_folder / "train").glob("*.jpg"))[:40]
    for path in photos:
        blob = path.read_bytes()
        fast = plain_jpeg_pixels(blob, (96, 96))
        assert fast is not None and np.array_equal(fast, general(blob, (96, 96)))
    big, medium = io.BytesIO(), io.BytesIO()
    Image.open(photos[0]).resize((1600, 1200)).save(big, "JPEG")
    Image.open(photos[0]).resize((500, 380)).save(medium, "JPEG")
    assert plain_jpeg_pixels(big.getvalue(), (96, 96)) is None  # the general path decodes it at 1/2 scale
    assert np.array_equal(plain_jpeg_pixels(medium.getvalue(), (96, 96)), general(medium.getvalue(), (96, 96)))


def test_inline_decode_takes_small_plain_jpegs_only_and_batches_keep_their_order(cifar_folder: Path) -> None:
    """What the API worker decodes on arrival (service.pipeline.inline_pixels): small plain JPEGs,
    with the general decoder's pixels; everything else is left (None) for the batch's decode. A
    batch mixing decoded images, uploads and a bad upload keeps item order and errors."""
    blobs = [p.read_bytes() for p in sorted((cifar_folder / "test" / "ship").glob("*.jpg"))[:50]]
    for blob in blobs:
        assert np.array_equal(inline_pixels(blob, (32, 32)), general(blob, (32, 32)))
    image = Image.open(io.BytesIO(blobs[0]))
    at_cap, over_cap, png, exif = io.BytesIO(), io.BytesIO(), io.BytesIO(), io.BytesIO()
    image.resize((64, INLINE_MAX_PIXELS // 64)).save(at_cap, "JPEG")
    image.resize((64, INLINE_MAX_PIXELS // 64 + 1)).save(over_cap, "JPEG")
    image.save(png, "PNG")
    exif_data = Image.Exif()
    exif_data[0x0112] = 6
    image.save(exif, "JPEG", exif=exif_data)
    assert np.array_equal(inline_pixels(at_cap.getvalue(), (32, 32)), general(at_cap.getvalue(), (32, 32)))
    for left in (over_cap.getvalue(), png.getvalue(), exif.getvalue(), blobs[1][:-40], b"junk"):
        assert inline_pixels(left, (32, 32)) is None
    items = [inline_pixels(blobs[0], (32, 32)), blobs[1], b"junk", inline_pixels(blobs[3], (32, 32)), blobs[4]]
    mixed, reference = decode_batch(items, (32, 32)), decode_batch([blobs[i] for i in (0, 1, 3, 4)], (32, 32))
    assert mixed.good == [0, 1, 3, 4] and [(i, e.error) for i, e in mixed.errors] == [(2, "not_an_image")]
    assert np.array_equal(mixed.pixels, reference.pixels)


def test_decode_batch_lists_unreadable_files(cifar_folder: Path, tmp_path: Path) -> None:
    good = sorted((cifar_folder / "test" / "cat").glob("*.jpg"))[:3]
    batch = decode_batch([str(good[0]), str(tmp_path / "gone.jpg"), str(good[1]), str(tmp_path)], (32, 32))
    assert batch.good == [0, 2] and batch.pixels.shape == (2, 3, 32, 32)
    assert [(i, e.error) for i, e in batch.errors] == [(1, "unreadable_file"), (3, "unreadable_file")]


def test_pool_returns_batches_in_submission_order(cifar_folder: Path) -> None:
    files = [str(p) for p in sorted((cifar_folder / "test" / "frog").glob("*.jpg"))[:64]]
    with DecodePool(2, (32, 32)) as pool:
        futures = [pool.submit(files[i:i + 8]) for i in range(0, 64, 8)]
        pixels = np.concatenate([f.result().pixels for f in futures])
    assert np.array_equal(pixels, decode_batch(files, (32, 32)).pixels)


def test_shared_memory_slots_give_the_pipes_bytes_and_are_reused(cifar_folder: Path, tmp_path: Path) -> None:
    """Batches decoded into shared-memory slots equal the inline decode, bad files included; more
    batches in flight than slots, or a batch larger than a slot, travel by pipe with the same result;
    every slot is free again once its batch is collected."""
    from service.decode_pool import _SlotFuture

    files = [str(p) for p in sorted((cifar_folder / "test" / "deer").glob("*.jpg"))[:80]]
    files[5] = str(tmp_path / "gone.jpg")
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    files[13] = str(tmp_path / "bad.jpg")
    chunks = [files[i:i + 8] for i in range(0, 64, 8)] + [files[64:80]]  # the last one is 16 > 8
    with DecodePool(2, (32, 32), batch_size=8) as pool:
        assert len(pool.slots) == 6
        futures = [pool.submit(chunk) for chunk in chunks]  # 9 at once: 6 slots, then by pipe
        kinds = [isinstance(f, _SlotFuture) for f in futures]
        batches = [f.result() for f in futures]
        assert sorted(pool._free) == list(range(6))
        shared = [Path("/dev/shm", s.name) for s in pool.slots]
    assert not [p for p in shared if p.exists()]  # removed on close
    assert kinds == [True] * 6 + [False] * 3
    for chunk, batch in zip(chunks, batches):
        inline = decode_batch(chunk, (32, 32))
        assert batch.good == inline.good and errors(batch) == errors(inline)
        assert np.array_equal(batch.pixels, inline.pixels)
    assert [e.error for _, e in batches[0].errors] == ["unreadable_file"]
    assert [e.error for _, e in batches[1].errors] == ["not_an_image"]


def test_garbage_is_collected_before_the_workers_fork(tmp_path: Path) -> None:
    """An object left for the garbage collector (a reference cycle) is destroyed in this process
    when the pool forks its workers, never in a worker: a worker that ran an inherited ONNX
    Runtime session's destructor hung on that session's threads, which exist only here."""
    import gc
    import os

    ran_in: list[int] = []

    class Cycle:
        def __init__(self) -> None:
            self.me = self

        def __del__(self) -> None:
            ran_in.append(os.getpid())

    gc.disable()
    try:
        Cycle()  # garbage now, collected only by the cyclic collector
        with DecodePool(1, (32, 32), batch_size=8) as pool:
            assert ran_in == [os.getpid()]  # destroyed here, before the fork
            pool.submit([]).result()
    finally:
        gc.enable()


def where_read(pool: DecodePool) -> str:
    """Which process a pool reads its files in: this test's own thread ``/proc/self/task/<pid>``
    exists only in this process, so reading it answers ``not_an_image`` here (a text file) and
    ``unreadable_file`` in any other process."""
    probe = f"/proc/self/task/{os.getpid()}/stat"
    (_, error), = pool.submit([probe]).result().errors
    return {"not_an_image": "here", "unreadable_file": "elsewhere"}[error.error]


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux's /proc")
@pytest.mark.parametrize("setting", ["0", "1", "2", "auto"])
def test_workers_setting_decodes_in_that_many_processes(setting: str, cifar_folder: Path) -> None:
    """``--workers N`` starts N decoding processes and reads every file in them; ``0`` starts none
    and decodes here; ``auto`` starts at least one and leaves a core for the model (on a host
    with more than one)."""
    import psutil

    from service.config import host_cores

    me = psutil.Process()
    files = [str(p) for p in sorted((cifar_folder / "test" / "cat").glob("*.jpg"))[:64]]
    before = {p.pid for p in me.children(recursive=True)}
    with DecodePool(resolve_workers(setting), (32, 32), batch_size=8) as pool:
        started = [p for p in me.children(recursive=True)  # forks, not Python's resource tracker
                   if p.pid not in before and p.cmdline() == me.cmdline()]
        futures = [pool.submit(files[i:i + 8]) for i in range(0, 64, 8)]
        pixels = np.concatenate([f.result().pixels for f in futures])
        where = where_read(pool)
    assert np.array_equal(pixels, decode_batch(files, (32, 32)).pixels)
    if setting == "auto":
        assert 1 <= len(started) and (len(started) < host_cores() or host_cores() == 1)
    else:
        assert len(started) == int(setting)
    assert where == ("here" if setting == "0" else "elsewhere")
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in started)  # gone on close


def test_workers_setting_refuses_negative_counts() -> None:
    assert resolve_workers("0") == 0 and resolve_workers(3) == 3
    with pytest.raises(ValueError):
        resolve_workers("-1")


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="shared memory is not under /dev/shm here")
def test_shared_memory_is_removed_on_close_cancel_and_when_dropped(cifar_folder: Path) -> None:
    import gc

    files = [str(p) for p in sorted((cifar_folder / "test" / "ship").glob("*.jpg"))[:64]]
    names = []
    for how in ("close", "cancel", "drop"):
        pool = DecodePool(1, (32, 32), batch_size=8)
        slots = [Path("/dev/shm", s.name) for s in pool.slots]
        assert slots and all(p.exists() for p in slots)
        futures = [pool.submit(files[i:i + 8]) for i in range(0, 64, 8)]
        futures[0].result()
        if how == "close":
            pool.close()
        elif how == "cancel":
            pool.close(cancel=True)  # batches still queued and running
        else:  # never closed: removed when the pool is collected
            [f.result() for f in futures]
            del pool, futures
            gc.collect()
        names += slots
    assert not [p for p in names if p.exists()]


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="shared memory is not under /dev/shm here")
def test_a_dead_worker_leaves_no_shared_memory_and_no_warning(cifar_folder: Path) -> None:
    """A decode worker killed mid-run breaks the pool (the scorer reports it and stops); closing
    the pool then removes every slot, and Python's resource tracker finds nothing leaked."""
    files = [str(p) for p in sorted((cifar_folder / "test" / "ship").glob("*.jpg"))[:256]]
    code = f"""
import os, signal, psutil
from concurrent.futures.process import BrokenProcessPool
from service.decode_pool import DecodePool
files = {files!r}
pool = DecodePool(2, (32, 32), batch_size=16)
print(" ".join(s.name for s in pool.slots))
pool.submit(files[:16]).result()
me = psutil.Process()
worker, *_ = [c for c in me.children() if c.cmdline() == me.cmdline()]  # a fork, not the resource tracker
os.kill(worker.pid, signal.SIGKILL)
try:
    for _ in range(1000):  # the pool notices the death within a few batches
        futures = [pool.submit(files[i:i + 16]) for i in range(0, 256, 16)]
        [f.result() for f in futures]
except BrokenProcessPool:
    print("broken")
pool.close(cancel=True)
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.endswith("broken\n"), proc.stderr
    names = proc.stdout.splitlines()[0]
    assert not [n for n in names.split() if Path("/dev/shm", n).exists()]
    assert "leaked" not in proc.stderr and "resource_tracker" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_onnx_on_cpu_imports_no_torch_torchvision_or_matplotlib(mixed_folder: Path, tmp_path: Path, device: str) -> None:
    if device == "auto" and score.cuda_present():
        pytest.skip("auto means the GPU here")
    code = ("import sys; from service import score; "
            f"code = score.main([{str(mixed_folder)!r}, '--out', {str(tmp_path / 'p.csv')!r}, '--device', {device!r}, "
            f"'--models-dir', {str(SHIPPED_MODELS)!r}]); "
            "print(code, sorted(m for m in ('torch', 'torchvision', 'matplotlib') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.stdout.split(None, 1) == ["1", "[]\n"], proc.stderr
    assert (tmp_path / "p.csv.confusion.png").stat().st_size > 1000  # still drawn


def test_cuda_check_agrees_with_torch() -> None:
    torch = pytest.importorskip("torch")
    assert score.cuda_present() == torch.cuda.is_available()


@pytest.mark.skipif(not score.cuda_present(), reason="needs a CUDA GPU")
def test_pinned_cuda_runner_gives_the_registry_backends_bytes(cifar_folder: Path, tmp_path: Path) -> None:
    files = [str(p) for p in sorted((cifar_folder / "test" / "ship").glob("*.jpg"))[:256]]
    images = decode_batch(files, (32, 32)).pixels
    scorer = score.LocalScorer(SHIPPED_MODELS, "cifar10", "torchscript", "cuda", 256, 0)
    scorer.load()
    assert isinstance(scorer.run, score.PinnedCudaRunner)
    assert np.array_equal(scorer.run(images), scorer.model.predict(images))
    scorer.close()


def test_gpu_jpeg_hand_off_leaves_only_plain_jpegs_at_size_undecoded(mixed_folder: Path) -> None:
    files = sorted(str(p) for p in mixed_folder.rglob("*") if p.is_file())
    cpu, handed = decode_batch(files, (32, 32)), decode_batch(files, (32, 32), gpu_jpegs=True)
    names = [Path(f).name for f in files]
    assert sorted(names[i] for i, _ in handed.jpegs) == sorted(p.name for p in (mixed_folder / "horses").glob("0*.jpg"))
    assert sorted(names[i] for i in handed.good) == ["as.png", "gray.jpg", "large.jpg", "rotated.jpg"]
    assert errors(handed) == errors(cpu) and sorted(handed.good + [i for i, _ in handed.jpegs]) == cpu.good


def test_gpu_decode_without_a_gpu_is_one_line(mixed_folder: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    if score.cuda_present():
        pytest.skip("a GPU is present")
    code = score.main([str(mixed_folder), "--out", str(tmp_path / "p.csv"), "--decode", "gpu",
                       "--models-dir", str(SHIPPED_MODELS)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["error: --decode gpu needs the model on a CUDA GPU; it runs on cpu"]


@pytest.mark.skipif(not score.cuda_present(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["torchscript", "onnx"])
def test_gpu_decode_agrees_with_cpu_decode(mixed_folder: Path, cifar_folder: Path, tmp_path: Path,
                                           backend: str) -> None:
    import csv

    for src in sorted((cifar_folder / "test" / "ship").glob("*.jpg"))[:300]:
        shutil.copy(src, mixed_folder / "horses" / f"s{src.name}")
    rows = {}
    for decode in ("cpu", "gpu"):
        out = tmp_path / f"{decode}.csv"
        assert score.main([str(mixed_folder), "--out", str(out), "--decode", decode, "--device", "cuda",
                           "--backend", backend, "--batch-size", "64", "--models-dir", str(SHIPPED_MODELS)]) == 1
        with open(out, newline="") as handle:
            rows[decode] = list(csv.DictReader(handle))
    assert [r["path"] for r in rows["cpu"]] == [r["path"] for r in rows["gpu"]]
    agree = np.mean([a["label"] == b["label"] for a, b in zip(rows["cpu"], rows["gpu"])])
    drift = np.mean([abs(float(a["probability"]) - float(b["p_" + a["label"]])) for a, b in zip(rows["cpu"], rows["gpu"])])
    assert agree >= 0.97 and drift < 0.02
    assert (tmp_path / "gpu.csv.errors.csv").read_text() == (tmp_path / "cpu.csv.errors.csv").read_text()


def test_fast_path_keeps_the_pixel_limit() -> None:
    big = io.BytesIO()
    Image.new("RGB", (120, 120), "red").save(big, "JPEG")  # 14,400 pixels, no draft decode at 32x32
    assert plain_jpeg_pixels(big.getvalue(), (32, 32)) is not None
    assert plain_jpeg_pixels(big.getvalue(), (32, 32), max_pixels=10_000) is None
    batch = decode_batch([], (32, 32))
    assert batch.good == [] and batch.pixels.shape == (0, 3, 32, 32)
    assert general(big.getvalue(), (32, 32), 10_000).error == "image_too_large"


def test_fast_path_never_disagrees_with_the_service_decoder_on_damaged_jpegs(cifar_folder: Path) -> None:
    """Bytes flipped in the scan or the tables, or the scan cut short before the end marker: the fast
    path either declines (the general path then answers) or gives the general path's exact pixels;
    it never decodes a file the service refuses."""
    import random

    rng = random.Random(0)
    declined = 0
    for path in sorted((cifar_folder / "test" / "truck").glob("*.jpg"))[:300]:
        data = bytearray(path.read_bytes())
        scan = data.find(b"\xff\xda")
        kind = rng.randrange(3)
        if kind == 0:
            for _ in range(rng.randrange(1, 6)):
                data[rng.randrange(scan + 12, len(data) - 2)] = rng.randrange(256)
        elif kind == 1:
            data = data[:rng.randrange(scan + 12, len(data) - 2)] + b"\xff\xd9"
        else:
            data[rng.randrange(2, scan)] = rng.randrange(256)
        fast, slow = plain_jpeg_pixels(bytes(data), (32, 32)), general(bytes(data), (32, 32))
        if fast is None:
            declined += 1
        else:
            assert isinstance(slow, np.ndarray) and np.array_equal(fast, slow)
    assert 0 < declined < 300
