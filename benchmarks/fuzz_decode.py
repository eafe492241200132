"""Fuzz the upload decoder (``service.preprocess.decode_or_error``) with a real fuzzer.

    python benchmarks/fuzz_decode.py [--engine atheris|hypothesis] [--seconds 300] [--runs N]
        [--max-pixels 1000000] [--json OUT.json]
    python benchmarks/fuzz_decode.py --http 2000   # the same mutations through the real server

The property: for ANY bytes, the decoder returns a (3, H, W) uint8 array at the model's input
size or an :class:`ImageError` with a documented code; it never raises anything else, never hangs
(per-input timeout) and never exceeds the memory limit (atheris: libFuzzer's ``-rss_limit_mb``).

Seeds are real files: CIFAR-10 test images (read straight from ../shared/datasets'
``cifar10-jpeg.tar.gz``; synthetic photos when it is absent) re-encoded by Pillow as JPEG
(baseline, progressive, CMYK, EXIF-rotated), PNG (RGB, RGBA, palette, 16-bit, interlaced), GIF
(still and animated), WebP (lossy, lossless with alpha), TIFF (raw, LZW, float) and BMP.

``atheris`` (coverage-guided libFuzzer over Pillow's Python plugins and our code; ``pip install
atheris``) is used when installed, else Hypothesis with a large example budget and structure-aware
mutations (byte flips, inserts, deletes, splices, truncation, and header sizes rewritten with
valid PNG CRCs). Exit 0 when no input broke the property; 1 with the input saved otherwise.
Every finding becomes a regression test in tests/test_fuzz.py.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import struct
import sys
import tarfile
import time
import zlib
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CIFAR_ARCHIVE = Path(os.environ.get("IMGCLF_DATASETS", REPO.parent / "shared" / "datasets")) / "cifar10-jpeg.tar.gz"
# Every code decode_or_error may return (README's error table).
CODES = {"empty_file", "not_an_image", "corrupt_image", "image_too_large"}
SIZES = ((32, 32), (192, 192))  # the shipped models' inputs (models/*/card.json)


def cifar_photos(count: int) -> list[Image.Image]:
    """The first ``count`` JPEGs of the CIFAR-10 archive (streamed, nothing extracted); synthetic
    textured photos when the archive is absent."""
    photos: list[Image.Image] = []
    if CIFAR_ARCHIVE.exists():
        with tarfile.open(CIFAR_ARCHIVE, "r|gz") as archive:
            for member in archive:
                if member.isfile() and member.name.endswith(".jpg"):
                    photos.append(Image.open(io.BytesIO(archive.extractfile(member).read())).convert("RGB"))
                    if len(photos) == count:
                        break
    rng = np.random.default_rng(0)
    while len(photos) < count:
        base = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        photos.append(Image.fromarray(base).resize((32, 32), Image.Resampling.BICUBIC))
    return photos


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def seed_corpus(count: int = 4) -> dict[str, bytes]:
    """Real files in every accepted format and the modes that take a different decode path."""
    exif = Image.Exif()
    exif[0x0112] = 6
    seeds: dict[str, bytes] = {}
    for i, photo in enumerate(cifar_photos(count)):
        big = photo.resize((64, 48))
        grey16 = Image.fromarray((np.asarray(photo.convert("L"), dtype=np.uint16) * 257))
        seeds.update({
            f"{i}.jpg": encode(photo, "JPEG", quality=90),
            f"{i}.progressive.jpg": encode(big, "JPEG", progressive=True),
            f"{i}.cmyk.jpg": encode(photo.convert("CMYK"), "JPEG"),
            f"{i}.exif.jpg": encode(big, "JPEG", exif=exif),
            f"{i}.png": encode(photo, "PNG"),
            f"{i}.rgba.png": encode(photo.convert("RGBA"), "PNG"),
            f"{i}.palette.png": encode(photo.convert("P"), "PNG", transparency=0),
            f"{i}.16bit.png": encode(grey16, "PNG"),
            f"{i}.interlaced.png": encode(photo.convert("LA"), "PNG", interlace=1),
            f"{i}.gif": encode(photo.convert("P"), "GIF"),
            f"{i}.animated.gif": encode(photo, "GIF", save_all=True, append_images=[big.resize((32, 32))]),
            f"{i}.webp": encode(photo, "WEBP", quality=80),
            f"{i}.lossless.webp": encode(photo.convert("RGBA"), "WEBP", lossless=True),
            f"{i}.tiff": encode(photo, "TIFF"),
            f"{i}.lzw.tiff": encode(big, "TIFF", compression="tiff_lzw"),
            f"{i}.float.tiff": encode(Image.fromarray(np.asarray(photo.convert("L"), dtype=np.float32)), "TIFF"),
            f"{i}.bmp": encode(photo, "BMP"),
        })
    return seeds


def check(data: bytes, size: tuple[int, int], max_pixels: int) -> str:
    """The property under test. Returns the outcome ("ok" or the error code); anything else that
    goes wrong raises (AssertionError for a wrong result, or the decoder's own exception)."""
    from service.pipeline import decode_or_error
    from service.preprocess import ImageError

    result = decode_or_error(data, size, max_pixels)
    if isinstance(result, ImageError):
        assert result.error in CODES, result.error
        assert isinstance(result.detail, str) and result.detail
        return result.error
    assert isinstance(result, np.ndarray), type(result)
    assert result.dtype == np.uint8 and result.shape == (3, *size), (result.dtype, result.shape)
    return "ok"


# --- mutations (Hypothesis engine) -----------------------------------------------------------

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
INTERESTING_SIZES = (0, 1, 2, 7, 255, 256, 65535, 65536, 40_000, 1_000_000, 2**31 - 1, 2**32 - 1)


def fix_png_crcs(data: bytes) -> bytes:
    """Recompute every PNG chunk CRC, so mutations reach the decoder instead of the CRC check."""
    if not data.startswith(PNG_SIGNATURE):
        return data
    out, pos = bytearray(data[:8]), 8
    while pos + 12 <= len(data):
        length = struct.unpack(">I", data[pos:pos + 4])[0]
        end = pos + 8 + length
        if end + 4 > len(data):
            break
        body = data[pos + 4:end]
        out += data[pos:end] + struct.pack(">I", zlib.crc32(body))
        pos = end + 4
    return bytes(out + data[pos:])


def set_header_size(data: bytes, width: int, height: int) -> bytes:
    """Write a size into the PNG IHDR, the JPEG SOF, the GIF screen, the BMP header."""
    buf = bytearray(data)
    if data.startswith(PNG_SIGNATURE) and len(buf) >= 24:
        buf[16:24] = struct.pack(">II", width & 0xFFFFFFFF, height & 0xFFFFFFFF)
        return fix_png_crcs(bytes(buf))
    if data.startswith(b"\xff\xd8"):
        for marker in (b"\xff\xc0", b"\xff\xc2"):
            at = data.find(marker)
            if at > 0 and at + 9 <= len(buf):
                buf[at + 5:at + 9] = struct.pack(">HH", height & 0xFFFF, width & 0xFFFF)
        return bytes(buf)
    if data.startswith(b"GIF") and len(buf) >= 10:
        buf[6:10] = struct.pack("<HH", width & 0xFFFF, height & 0xFFFF)
    elif data.startswith(b"BM") and len(buf) >= 26:
        buf[18:26] = struct.pack("<ii", width % 2**31, (height % 2**32) - 2**31)
    return bytes(buf)


def mutate(data: bytes, rng: random.Random, seeds: list[bytes]) -> bytes:
    """One to four random mutations of a seed, AFL-style."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(8)
        pos = rng.randrange(len(buf) + 1)
        if op == 0 and buf:  # flip bits
            buf[pos % len(buf)] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:  # interesting byte
            buf[pos % len(buf)] = rng.choice((0, 1, 0x7F, 0x80, 0xFF))
        elif op == 2:  # insert random bytes
            buf[pos:pos] = rng.randbytes(rng.randint(1, 16))
        elif op == 3:  # delete a run
            del buf[pos:pos + rng.randint(1, 64)]
        elif op == 4:  # truncate
            del buf[pos:]
        elif op == 5:  # splice with another seed
            other = rng.choice(seeds)
            cut = rng.randrange(len(other) + 1)
            buf[pos:] = other[cut:]
        elif op == 6:  # header size from the interesting list
            buf = bytearray(set_header_size(bytes(buf), rng.choice(INTERESTING_SIZES), rng.choice(INTERESTING_SIZES)))
        else:  # duplicate a run (repeated chunks, frames)
            run = buf[pos:pos + rng.randint(1, 256)]
            buf[pos:pos] = run * rng.randint(1, 8)
    out = bytes(buf)
    return fix_png_crcs(out) if rng.random() < 0.7 else out


# --- engines ---------------------------------------------------------------------------------

def run_hypothesis(seeds: dict[str, bytes], seconds: float, runs: int, max_pixels: int,
                   on_case: Callable[[bytes, str], None], crash_path: Path) -> None:
    """Hypothesis picks a seed, a mutation stream and a model size (1 case in 50: raw bytes), in
    rounds of 1,000 examples until the time or the run budget is spent."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    corpus = list(seeds.values())
    deadline = time.monotonic() + seconds
    done = [0]

    @settings(max_examples=1000, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(seed=st.sampled_from(corpus), salt=st.integers(0, 2**63), size=st.sampled_from(SIZES),
           raw=st.binary(max_size=64))
    def one(seed: bytes, salt: int, size: tuple[int, int], raw: bytes) -> None:
        if time.monotonic() > deadline or done[0] >= runs:
            return
        data = raw if salt % 50 == 0 else mutate(seed, random.Random(salt), corpus)
        try:
            outcome = check(data, size, max_pixels)
        except BaseException:
            crash_path.write_bytes(data)
            raise
        done[0] += 1
        on_case(data, outcome)

    while time.monotonic() < deadline and done[0] < runs:
        one()


def run_atheris(seeds: dict[str, bytes], seconds: float, runs: int, max_pixels: int, corpus_dir: Path,
                rss_limit_mb: int, on_case: Callable[[bytes, str], None], on_end: Callable[[], None]) -> None:
    """libFuzzer, coverage-guided over every Python function loaded (Pillow's format plugins are
    Python; its C decoders are not instrumented), from the seed files. A crash, a timeout or an
    RSS over the limit ends the run with libFuzzer's report and the input saved (crash-*)."""
    import atheris

    Image.init()  # load every format plugin before instrumenting
    import service.preprocess  # noqa: F401

    atheris.instrument_all()
    corpus_dir.mkdir(parents=True, exist_ok=True)
    for name, data in seeds.items():
        (corpus_dir / name).write_bytes(data)
    deadline = time.monotonic() + seconds
    done = [0]

    def one(data: bytes) -> None:
        if time.monotonic() > deadline or (runs and done[0] >= runs):
            on_end()
            os._exit(0)
        size = SIZES[data[-1] % 2] if data else SIZES[0]
        outcome = check(data, size, max_pixels)
        done[0] += 1
        on_case(data, outcome)

    atheris.Setup([sys.argv[0], str(corpus_dir), "-timeout=20", f"-rss_limit_mb={rss_limit_mb}",
                   f"-artifact_prefix={corpus_dir.parent}/"], one)
    atheris.Fuzz()


def run_http(seeds: dict[str, bytes], cases: int, seed: int) -> dict[str, Any]:
    """Post ``cases`` mutated seeds to ``/classify`` of a server started here (loopback, shipped
    models, both models in turn); count statuses and error codes. A 5xx is a finding: its input is
    saved next to the corpus."""
    import httpx

    from soak import start_server, stop_server

    rng, corpus = random.Random(seed), list(seeds.values())
    statuses: Counter[str] = Counter()
    findings = []
    proc, url, log_path = start_server({})
    try:
        with httpx.Client(timeout=60) as client:
            for i in range(cases):
                data = mutate(rng.choice(corpus), rng, corpus)
                model = ("cifar10", "catsdogs")[i % 2]
                response = client.post(url + "/classify", files={"image": ("x", data)}, data={"model": model})
                try:
                    code = response.json().get("error", "")
                except ValueError:
                    code = "not-json"
                statuses[f"{response.status_code} {code}".strip()] += 1
                if response.status_code >= 500:
                    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"imgclf-http-5xx-{i}.bin"
                    path.write_bytes(data)
                    findings.append(str(path))
        alive = proc.poll() is None
    finally:
        stop_server(proc)
    return {"http_cases": cases, "http_statuses": dict(statuses.most_common()),
            "http_5xx": sum(n for k, n in statuses.items() if k.startswith("5")), "http_findings": findings,
            "server_alive_after": alive, "server_log": str(log_path)}


def main() -> None:
    import warnings

    warnings.simplefilter("ignore")  # Pillow warns on corrupt EXIF and the like: expected here
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--engine", choices=("auto", "atheris", "hypothesis"), default="auto")
    parser.add_argument("--seconds", type=float, default=300)
    parser.add_argument("--runs", type=int, default=0, help="stop after this many inputs (0: time only)")
    parser.add_argument("--max-pixels", type=int, default=1_000_000,
                        help="decoder pixel limit while fuzzing (small keeps inputs fast; the limit "
                             "logic is the same at any value)")
    parser.add_argument("--seed-images", type=int, default=4)
    parser.add_argument("--rss-limit-mb", type=int, default=1024)
    parser.add_argument("--corpus", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "imgclf-fuzz-corpus")
    parser.add_argument("--http", type=int, default=0, metavar="N",
                        help="instead: post N mutated files to a server started here; count 5xx")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.http:
        sys.path.insert(0, str(REPO / "benchmarks"))
        summary = {"seeds": len(seed_corpus(args.seed_images)),
                   **run_http(seed_corpus(args.seed_images), args.http, seed=0)}
        print(json.dumps(summary), flush=True)
        if args.json:
            args.json.write_text(json.dumps(summary, indent=2) + "\n")
        raise SystemExit(1 if summary["http_5xx"] else 0)

    engine = args.engine
    if engine == "auto":
        try:
            import atheris  # noqa: F401
            engine = "atheris"
        except ImportError:
            engine = "hypothesis"
    seeds = seed_corpus(args.seed_images)
    outcomes: Counter[str] = Counter()
    started = time.monotonic()
    summary: dict = {"engine": engine, "seeds": len(seeds), "max_pixels": args.max_pixels}

    def on_case(data: bytes, outcome: str) -> None:
        outcomes[outcome] += 1

    def report(crashes: int) -> None:
        summary.update(cases=sum(outcomes.values()), outcomes=dict(outcomes.most_common()), crashes=crashes,
                       seconds=round(time.monotonic() - started, 1))
        print(json.dumps(summary), flush=True)
        if args.json:
            args.json.write_text(json.dumps(summary, indent=2) + "\n")

    if engine == "atheris":
        from importlib.metadata import version

        summary["atheris"] = version("atheris")
        run_atheris(seeds, args.seconds, args.runs, args.max_pixels, args.corpus, args.rss_limit_mb, on_case,
                    lambda: report(0))
        return
    crash_path = Path(os.environ.get("TMPDIR", "/tmp")) / "imgclf-fuzz-crash.bin"
    try:
        run_hypothesis(seeds, args.seconds, args.runs or 10**12, args.max_pixels, on_case, crash_path)
    except Exception as exc:  # noqa: BLE001 - the finding itself; Hypothesis has shrunk it
        report(1)
        print(f"crash: {type(exc).__name__}: {exc} (see the falsifying example above; {crash_path})",
              file=sys.stderr)
        raise SystemExit(1) from None
    report(0)


if __name__ == "__main__":
    main()
