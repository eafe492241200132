"""Bounded fuzzing of the upload decoder (seconds; the long runs are benchmarks/fuzz_decode.py).

The property (``benchmarks.fuzz_decode.check``): whatever the bytes, ``decode_or_error`` returns a
(3, H, W) uint8 array at the model's input size or an ImageError with a documented code, and never
raises anything else. Seeds are real files made by Pillow from CIFAR-10 images in every accepted
format; Hypothesis drives the mutations. Every finding of the fuzzers is a regression test below.
"""

from __future__ import annotations

import base64
import io
import random
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase
from PIL import Image

from benchmarks.fuzz_decode import SIZES, check, mutate, seed_corpus, set_header_size
from service.pipeline import decode_or_error
from service.preprocess import ImageError

SEEDS = seed_corpus(2)
CORPUS = list(SEEDS.values())
# Failing examples are kept outside the repository, so a rerun replays them first.
FUZZ_SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck),
                         database=DirectoryBasedExampleDatabase(Path.home() / ".cache" / "imgclf" / "hypothesis"))
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns on corrupt EXIF: expected
MAX_PIXELS = 1_000_000  # small, so mutated headers that stay under it decode quickly


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_every_seed_is_a_valid_image(name: str) -> None:
    for size in SIZES:
        assert check(SEEDS[name], size, MAX_PIXELS) == "ok"


def test_seeds_cover_every_accepted_format() -> None:
    formats = {Image.open(io.BytesIO(data)).format for data in CORPUS}
    assert formats == {"JPEG", "PNG", "GIF", "WEBP", "TIFF", "BMP"}


@FUZZ_SETTINGS
@given(seed=st.sampled_from(CORPUS), salt=st.integers(0, 2**63), size=st.sampled_from(SIZES))
def test_mutated_real_files_decode_or_fail_cleanly(seed: bytes, salt: int, size: tuple[int, int]) -> None:
    check(mutate(seed, random.Random(salt), CORPUS), size, MAX_PIXELS)


@FUZZ_SETTINGS
@given(seed=st.sampled_from(CORPUS), width=st.integers(0, 2**32 - 1), height=st.integers(0, 2**32 - 1),
       size=st.sampled_from(SIZES))
def test_any_header_size_is_decoded_or_refused(seed: bytes, width: int, height: int, size: tuple[int, int]) -> None:
    check(set_header_size(seed, width, height), size, MAX_PIXELS)


@FUZZ_SETTINGS
@given(prefix=st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"RIFF\x00\x00\x00\x00WEBPVP8 ",
                               b"II*\x00", b"MM\x00*", b"BM"]),
       body=st.binary(max_size=512), size=st.sampled_from(SIZES))
def test_random_bytes_behind_a_signature(prefix: bytes, body: bytes, size: tuple[int, int]) -> None:
    check(prefix + body, size, MAX_PIXELS)


# --- regressions: inputs the fuzzers found -------------------------------------------------------

# atheris, 2026-11-26: a JPEG whose EXIF block has a broken TIFF header ("ML\xf7*"); reading the
# orientation raised SyntaxError out of the decoder (a 500 in the service).
ATHERIS_BAD_EXIF_JPEG = base64.b64decode(
    "/9j/4AAQAABJRgABj4+Pj4+Pj4+Pj4+Pj4+Pj4+Pj4+Pj4+Pj4+Pj4+Pj4+Pj4+Pj4+Pj4+Pj4+Pj4+Pj4+Pj4+Pj4+Pj4+Pj4+P"
    "j4+Pj4+Pj4+Pj4+Pj4+Pj4+Pj48IADAAAwEiAALY/+AAEAAASUYAAQEAAAEAAQAA/+EAIkV4aWYAAE1M9yoAAAAIAAEBEgADAAAA"
    "AQAGAAC5usLDxMXGxwAyMjIy/8AAEQgAMAADASIAAhEBAxEB/wADAAAAAQAGAAAAMjIyMv/Y/+AAEEpGSUYA8RcYGRomJygpKjU2"
    "Nzg5OkNERUZHSElKU1RVVldYWVpjZGVmZ2hpanN0dXZ3eHl6goOEhYaHiImKkpOUlZaXmJmaoqOkpaanqKmqsrO0EAAASUYAAQEA"
    "AAEAAQAA/+EAIkV4aWYAAE1NACoAAAAIAAEBEgADAAAAAQAGAAAAMjIyMv/AABEIADAAAwEiAALY/+AAEAAASUYAAQEAAAEAAQAA"
    "/+EAIkV4aWYAAE1M9yoAAAAIAAEBEgADAAAAAQAABgAAMjIyMv/AABEIADAAAwEiAAIRAQMRAf8AAwAAAAEA/+AAEEpGSUYrAAEB"
    "AAABQAEAAAUJBQUJFA0LDRQUFBQUFBQUFDMUFBQUFBQUFBQUFBQUFBQUFBQjFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBT/wAARCAAg"
    "ACADC//EAO4QAAIBAwMCBAMFBQQEAAABfQECAwAEEQUSITFBBhNRYQcicRQygZGhCCNCsW/nuhPhZX/OrUJCvE//2Q==")


@pytest.mark.parametrize("size", SIZES)
def test_regression_jpeg_with_a_corrupt_exif_header(size: tuple[int, int]) -> None:
    error = decode_or_error(ATHERIS_BAD_EXIF_JPEG, size)
    assert isinstance(error, ImageError) and error.error == "corrupt_image"


def test_regression_png_with_a_corrupt_exif_chunk() -> None:
    """The same broken EXIF in a PNG eXIf chunk: before the fix, EXIF orientation was applied
    outside the decoder's error handling, so this was a 500 too."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "PNG", exif=b"Exif\x00\x00ML\xf7*\x00\x00\x00\x08")
    error = decode_or_error(buffer.getvalue(), (32, 32))
    assert isinstance(error, ImageError) and error.error == "corrupt_image"


# hypothesis, 2026-12-05: a TIFF whose strip offset tag holds a rational; Pillow's ImageFile.load
# seeks to it and raises TypeError (not one of the errors Pillow usually raises on corrupt data).
# Stored zlib-compressed.
HYPOTHESIS_RATIONAL_OFFSET_TIFF = zlib.decompress(base64.b64decode(
    "eNqtlD1P21AUhq8JkABOHCchCc4nUVUEEh1BiE7OxNKhlfor+iM6deiv6cyEEGJgZGasOiBmZt6LH6PDQK8HIj26x9bJec+X79nZ"
    "gWs45zadi1ZdJGsuImOvRLUXu4btWTd2Gq09n79E3/x3gO3azo2N/zfsmit/6bKgbUgMrQCr/MfbddGAunnn43TEUGyLHTEVTd6n"
    "y7fzCOmvi9jodkWP2E18yjheO0M/47lLDp03ckkCxJyb6HvNjaX7WaN2G6sv5mKM9gj97n/yaAdoGNtrb4kV+uL77Xjvax6IXbGg"
    "R++h38aPup/1bnPnLsWduBKPYoK+19wjt2GF/qcBNqi1Tn9nzDpiJn+kfZO/1ttjBsMK+9cJkBEzpgdr1H8h/ol7cZ4XPnM0FvQh"
    "W4a/v5B+zDlgxgnz9/G/cPpZeJ99ch2bWYTiJ+TUYWf7nCl9jonp432gxh2I4CEvfCcwJU5WQT8190vCs93XAXaL3f7I819p/hCf"
    "xe+82Msx2rvkN6qwX+UdkaJX3i+lfpMexGgfi1NxhI/fv+u88BuxczPsaYVvq+xDz/S/Ry+22Pse9Syo7ZP4Kr6LEzOPDObkMaqg"
    "3zJ3aWL6kJocyt2bmDv2CA6F7sInAF2a1g=="))


@pytest.mark.parametrize("size", SIZES)
def test_regression_tiff_with_a_rational_strip_offset(size: tuple[int, int]) -> None:
    error = decode_or_error(HYPOTHESIS_RATIONAL_OFFSET_TIFF, size)
    assert isinstance(error, ImageError) and error.error == "corrupt_image" and "TypeError" in error.detail
