"""Pure-function tests of the pixel pipeline (service/preprocess.py): bounded work per image,
hostile shapes, and the values of every step checked against a hand computation. Seconds, no
server, no dataset."""

from __future__ import annotations

import io
import re
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.card import read_card
from service.pipeline import decode_batch, decode_or_error
from service.preprocess import (
    DECODE_BYTES_PER_PIXEL,
    DEFAULT_MAX_PIXELS,
    DECODE_FIXED_BYTES,
    DRAFT_MARGIN,
    FORMAT_BYTES_PER_PIXEL,
    MAX_SIDE,
    DecodeBudget,
    ImageError,
    load_rgb,
    max_decode_bytes,
    open_for,
    normalize,
    resize_and_crop,
    resized_size,
)

REPO = Path(__file__).resolve().parent.parent


def decode_image(data: bytes, size: tuple[int, int] | None = None) -> Image.Image:
    """An upload decoded to upright 8-bit RGB before the resize: the first two steps of
    ``decode_to_array`` (with ``size``, a large JPEG takes its reduced-scale decode)."""
    return load_rgb(open_for(data, size))
SIZES = {p.parent.name: read_card(p.parent).input.size for p in sorted((REPO / "models").glob("*/card.json"))}


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def grey_png(width: int, height: int) -> bytes:
    return encode(Image.new("L", (width, height), 90), "PNG", optimize=True)


def rotated_exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def test_both_shipped_models_are_covered() -> None:
    assert SIZES == {"catsdogs": (192, 192), "cifar10": (32, 32), "cifar10-int8": (32, 32)}


# --- bounded work: the hostile shapes -------------------------------------------------

HOSTILE = {"40000x1": (40_000, 1), "1x60000": (1, 60_000), "1000000x1": (1_000_000, 1), "1x1000000": (1, 1_000_000)}
REFUSED = {"1000000x1", "1x1000000"}  # a side over MAX_SIDE: image_too_large from the header (413)


@pytest.mark.parametrize("model", sorted(SIZES))
@pytest.mark.parametrize("shape", sorted(HOSTILE))
def test_extreme_aspect_ratios_are_served_or_refused_from_the_header(shape: str, model: str) -> None:
    width, height = HOSTILE[shape]
    data = grey_png(width, height)
    assert len(data) <= 2100  # ~120 bytes for 40000x1, 1-2 KB for the others
    result = decode_or_error(data, SIZES[model])
    if shape in REFUSED:
        assert isinstance(result, ImageError) and result.error == "image_too_large"
        assert f"side over {MAX_SIDE}" in result.detail
    else:
        assert isinstance(result, np.ndarray) and result.dtype == np.uint8
        assert result.shape == (3, *SIZES[model]) and (result == 90).all()


def test_pixel_limit_is_checked_from_the_header_before_decoding() -> None:
    """A 100-megapixel PNG bomb (a few KB of zeros) is refused before its pixels exist: the
    limit is on the header and the error is image_too_large (413 in the service)."""
    data = encode(Image.new("1", (10_000, 10_000)), "PNG")
    error = decode_or_error(data, (32, 32))
    assert isinstance(error, ImageError) and error.error == "image_too_large"
    assert "100000000 pixels" in error.detail
    small = decode_or_error(grey_png(200, 100), (32, 32), max_pixels=19_999)
    assert isinstance(small, ImageError) and small.error == "image_too_large"


def test_webp_gets_a_proportionally_smaller_pixel_limit() -> None:
    limit = 100_000
    webp_limit = limit * DECODE_BYTES_PER_PIXEL // FORMAT_BYTES_PER_PIXEL["WEBP"]
    side = int(webp_limit ** 0.5) + 1  # over the WebP limit, under the general one
    assert side * side <= limit
    data = encode(Image.new("RGB", (side, side), (1, 2, 3)), "WEBP", lossless=True)
    error = decode_or_error(data, (32, 32), max_pixels=limit)
    assert isinstance(error, ImageError) and error.error == "image_too_large"
    png = encode(Image.new("RGB", (side, side), (1, 2, 3)), "PNG")
    assert isinstance(decode_or_error(png, (32, 32), max_pixels=limit), np.ndarray)


# Peak memory of one decode, measured in a fresh interpreter from the kernel's high-water mark of
# resident memory (VmHWM, reset through /proc/self/clear_refs after a warm-up decode): Pillow's
# and libjpeg's buffers are not Python objects, so tracemalloc would not see them.
PEAK_CHILD = textwrap.dedent("""
    import gc, sys
    from service.pipeline import decode_or_error

    def status(key):
        return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) * 1024

    data, warm = open(sys.argv[1], "rb").read(), open(sys.argv[2], "rb").read()
    size = (int(sys.argv[3]), int(sys.argv[3]))
    decode_or_error(warm, size)
    gc.collect()
    open("/proc/self/clear_refs", "w").write("5")
    before = status("VmRSS")
    result = decode_or_error(data, size)
    print(getattr(result, "shape", result), status("VmHWM") - before)
""")


def peak_cases() -> dict[str, bytes]:
    side = 1200  # 1.44 Mpx: large enough that the per-pixel cost dominates the fixed allowance
    ramp = np.add.outer(np.arange(side), np.arange(side))
    rgb = Image.fromarray(np.stack([(ramp % 251).astype(np.uint8), (ramp % 13 * 19).astype(np.uint8),
                                    (ramp % 256).astype(np.uint8)], -1))
    return {
        "png_rgb": encode(rgb, "PNG"),
        "png_rgba_exif_rotated": encode(rgb.convert("RGBA"), "PNG", exif=rotated_exif(6)),
        "png_la_exif_rotated": encode(rgb.convert("LA"), "PNG", exif=rotated_exif(8)),
        "png_palette_transparent": encode(rgb.convert("P"), "PNG", transparency=0),
        "png_16bit": encode(Image.fromarray((ramp * 20).astype(np.uint16)), "PNG"),
        "tiff_float": encode(Image.fromarray(ramp.astype(np.float32)), "TIFF"),
        "tiff_int32": encode(Image.fromarray((ramp * 100).astype(np.int32)), "TIFF"),
        "tiff_rgba_lzw": encode(rgb.convert("RGBA"), "TIFF", compression="tiff_lzw"),
        "jpeg_cmyk_wide": encode(rgb.convert("CMYK").resize((48_000, 30)), "JPEG"),
        "jpeg_exif_rotated": encode(rgb, "JPEG", exif=rotated_exif(6)),
        "webp_rgba": encode(rgb.convert("RGBA"), "WEBP", lossless=True),
        "gif": encode(rgb.convert("P"), "GIF"),
        "bmp": encode(rgb, "BMP"),
        **{f"png_{name}": grey_png(*shape) for name, shape in HOSTILE.items()},
    }


@pytest.fixture(scope="module")
def peak_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("peak")
    files = {}
    for name, data in {**peak_cases(), "warm": grey_png(40, 30)}.items():
        files[name] = folder / name
        files[name].write_bytes(data)
    return files


# Every format and mode at the larger input (catsdogs); the issue's shapes at both models' sizes.
PEAK_RUNS = [(case, "catsdogs") for case in sorted(peak_cases()) if not case.startswith("png_1")
             and "x1" not in case] + [(f"png_{shape}", model) for shape in sorted(HOSTILE) for model in sorted(SIZES)]


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("case,model", PEAK_RUNS)
def test_peak_memory_per_image_is_within_the_bound(case: str, model: str, peak_files: dict[str, Path]) -> None:
    """The resident-memory peak of one decode is at most ``bytes_per_pixel * header pixels + fixed``
    (10 bytes a pixel, 17 for WebP, + 16 MiB): at the default 40-Mpx limit, max_decode_bytes()."""
    size = SIZES[model][0]
    out = subprocess.run([sys.executable, "-c", PEAK_CHILD, str(peak_files[case]), str(peak_files["warm"]),
                          str(size)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    outcome, peak = out.stdout.rsplit(maxsplit=1)
    refused = case.removeprefix("png_") in REFUSED
    assert outcome.startswith("image_too_large") if refused else outcome == str((3, size, size)), outcome
    with Image.open(peak_files[case]) as image:
        width, height = image.size
        per_pixel = FORMAT_BYTES_PER_PIXEL.get(image.format, DECODE_BYTES_PER_PIXEL)
    assert int(peak) <= per_pixel * width * height + DECODE_FIXED_BYTES, (case, int(peak) / (width * height))


def test_the_bound_docs_reliability_states_is_the_codes() -> None:
    """docs/RELIABILITY.md states the per-image bound in MB at the default pixel limit, twice; both
    figures must be what the code enforces (a change of either constant must update the doc)."""
    doc = (REPO / "docs" / "RELIABILITY.md").read_text()
    stated = re.findall(r"max_decode_bytes\(\)` = ([0-9.]+) MB|\(([0-9.]+) MB at the default ([0-9]+) Mpx\)", doc)
    figures = {float(a or b) for a, b, _ in stated}
    assert len(stated) >= 2 and figures == {round(max_decode_bytes(DEFAULT_MAX_PIXELS) / 1e6, 1)}, stated
    assert {int(mpx) for _, _, mpx in stated if mpx} == {DEFAULT_MAX_PIXELS // 1_000_000}


def test_decode_budget_makes_a_second_decode_wait_for_the_first() -> None:
    budget = DecodeBudget(100)
    first_in, first_go, second_in = threading.Event(), threading.Event(), threading.Event()

    def first() -> None:
        with budget.reserve(60):
            first_in.set()
            first_go.wait(10)

    def second() -> None:
        with budget.reserve(60):
            second_in.set()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    threads[0].start()
    assert first_in.wait(10)
    threads[1].start()
    assert not second_in.wait(0.3)  # 60 + 60 > 100: it waits
    assert budget.used == 60
    first_go.set()
    assert second_in.wait(10)
    for thread in threads:
        thread.join(10)
    assert budget.used == 0
    with budget.reserve(1000):  # larger than the whole budget: runs, alone
        assert budget.used == 1000
    assert budget.used == 0


# --- values of each step, against a hand computation ------------------------------------------

def test_constant_image_survives_resize_and_normalize_exactly() -> None:
    spec = read_card(REPO / "models" / "catsdogs").input
    pixels = decode_or_error(encode(Image.new("RGB", (517, 333), (200, 100, 50)), "PNG"), spec.size)
    assert (pixels[0] == 200).all() and (pixels[1] == 100).all() and (pixels[2] == 50).all()
    out = normalize(pixels[None], spec)
    assert out.dtype == np.float32 and out.shape == (1, 3, *spec.size)
    for channel, value in enumerate((200, 100, 50)):
        expected = (value / 255 - spec.mean[channel]) / spec.std[channel]
        assert np.allclose(out[0, channel], expected, atol=1e-6)


def test_centre_crop_keeps_the_middle() -> None:
    """288x96 to 96x96: no scaling (the shorter side is already 96), the middle third is kept."""
    image = Image.new("RGB", (288, 96), (255, 0, 0))
    image.paste((0, 255, 0), (96, 0, 192, 96))
    image.paste((0, 0, 255), (192, 0, 288, 96))
    pixels = decode_or_error(encode(image, "PNG"), (96, 96))
    assert (pixels.transpose(1, 2, 0) == (0, 255, 0)).all()
    tall = decode_or_error(encode(image.rotate(90, expand=True), "PNG"), (96, 96))
    assert (tall.transpose(1, 2, 0) == (0, 255, 0)).all()


def test_bilinear_halving_matches_the_hand_computed_triangle_filter() -> None:
    """64x64 columns alternating 0, 80 halved to 32x32: Pillow's antialiased bilinear filter at
    scale 2 weighs 4 source columns 1/8, 3/8, 3/8, 1/8, so inside pixels are 0.5 * 80 = 40; at the
    left edge the first tap falls outside and the rest renormalise: (3*0 + 3*80 + 1*0) / 7 = 34.3."""
    columns = np.tile(np.array([0, 80], dtype=np.uint8), 32)
    image = Image.fromarray(np.repeat(np.tile(columns, (64, 1))[..., None], 3, axis=2))
    pixels = decode_or_error(encode(image, "PNG"), (32, 32))[0]
    assert (pixels[:, 1:-1] == 40).all()
    assert (pixels[:, 0] == round(240 / 7)).all()


def reference_resize_and_crop(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """The two-step definition: resize the whole image (shorter side to size), then crop the centre."""
    target_h, target_w = size
    new_w, new_h = resized_size(*image.size, size)
    resized = image.resize((new_w, new_h), Image.Resampling.BILINEAR, reducing_gap=None)
    left, top = (new_w - target_w) // 2, (new_h - target_h) // 2
    return resized.crop((left, top, left + target_w, top + target_h))


@pytest.mark.parametrize("shape", [(500, 375), (375, 500), (33, 31), (7, 9), (300, 80), (96, 96), (640, 160)])
@pytest.mark.parametrize("model", sorted(SIZES))
def test_photo_shapes_resize_exactly_as_the_two_step_definition(shape: tuple[int, int], model: str) -> None:
    noise = np.random.default_rng(sum(shape)).integers(0, 256, (shape[1], shape[0], 3), dtype=np.uint8)
    image = Image.fromarray(noise)
    assert np.array_equal(np.asarray(resize_and_crop(image, SIZES[model])),
                          np.asarray(reference_resize_and_crop(image, SIZES[model])))


@pytest.mark.parametrize("shape", [(2000, 3), (3, 2000), (1000, 7)])
def test_extreme_shapes_stay_within_one_level_of_the_two_step_definition(shape: tuple[int, int]) -> None:
    noise = np.random.default_rng(sum(shape)).integers(0, 256, (shape[1], shape[0], 3), dtype=np.uint8)
    image = Image.fromarray(noise)
    fast = np.asarray(resize_and_crop(image, (32, 32)), dtype=int)
    slow = np.asarray(reference_resize_and_crop(image, (32, 32)), dtype=int)
    assert fast.shape == (32, 32, 3) and np.abs(fast - slow).max() <= 1


def test_exif_orientation_is_applied() -> None:
    """Stored 64 wide x 32 tall, red left and blue right, orientation 6 (rotate 90 degrees
    clockwise to display): shown 32 wide x 64 tall, red on top."""
    image = Image.new("RGB", (64, 32), (255, 0, 0))
    image.paste((0, 0, 255), (32, 0, 64, 32))
    for fmt in ("PNG", "JPEG"):
        shown = decode_image(encode(image, fmt, exif=rotated_exif(6)))
        assert shown.size == (32, 64)
        top, bottom = np.asarray(shown)[8, 16].astype(int), np.asarray(shown)[56, 16].astype(int)
        assert np.abs(top - (255, 0, 0)).max() <= 8 and np.abs(bottom - (0, 0, 255)).max() <= 8, fmt


def test_cmyk_jpeg_is_a_real_jpeg_and_comes_out_rgb() -> None:
    data = encode(Image.new("CMYK", (64, 48), (0, 255, 255, 0)), "JPEG")
    with Image.open(io.BytesIO(data)) as raw:
        assert (raw.format, raw.mode) == ("JPEG", "CMYK")
    pixels = decode_or_error(data, (32, 32)).transpose(1, 2, 0).astype(int)
    assert np.abs(pixels - (255, 0, 0)).max() <= 3


def test_16bit_png_is_rescaled_not_clipped() -> None:
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    image = decode_image(encode(Image.fromarray(values), "PNG"))
    expected = np.round(values.astype(float) / 65535 * 255)  # 0, 1, 128, 255
    assert np.array_equal(np.asarray(image)[..., 0], expected.astype(np.uint8))


def test_palette_image_keeps_its_colours() -> None:
    image = Image.new("P", (3, 1))
    image.putpalette([10, 20, 30, 200, 100, 0, 0, 0, 255] + [0] * 759)
    image.putpixel((0, 0), 0)
    image.putpixel((1, 0), 1)
    image.putpixel((2, 0), 2)
    for fmt in ("PNG", "GIF", "BMP", "TIFF"):
        assert np.asarray(decode_image(encode(image, fmt))).tolist() == [[[10, 20, 30], [200, 100, 0], [0, 0, 255]]], fmt


def test_transparency_is_composited_on_white() -> None:
    """out = alpha * colour + (1 - alpha) * 255, per channel, to the nearest level."""
    pixels = [(255, 0, 0, 128), (0, 0, 255, 0), (0, 255, 0, 255), (10, 20, 30, 64)]
    image = Image.new("RGBA", (4, 1))
    for x, value in enumerate(pixels):
        image.putpixel((x, 0), value)
    expected = np.array([[a / 255 * c + (1 - a / 255) * 255 for c in (r, g, b)] for r, g, b, a in pixels])
    for fmt in ("PNG", "WEBP", "TIFF"):
        out = np.asarray(decode_image(encode(image, fmt, **({"lossless": True} if fmt == "WEBP" else {}))), dtype=float)[0]
        assert np.abs(out - expected).max() <= 1, fmt
    grey_alpha = Image.new("LA", (2, 1))
    grey_alpha.putpixel((0, 0), (0, 128))
    grey_alpha.putpixel((1, 0), (100, 255))
    assert np.asarray(decode_image(encode(grey_alpha, "PNG")))[0, :, 0].tolist() == [127, 100]
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 50, 60, 70] + [0] * 762)
    palette.putpixel((1, 0), 1)
    assert np.asarray(decode_image(encode(palette, "PNG", transparency=0)))[0].tolist() == [[255, 255, 255], [50, 60, 70]]


def test_animated_gif_is_scored_on_its_first_frame() -> None:
    frames = [Image.new("RGB", (40, 40), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    assert np.asarray(decode_image(buffer.getvalue()))[20, 20].tolist() == [255, 0, 0]


def test_large_jpeg_draft_is_close_to_a_full_decode_and_small_ones_are_untouched() -> None:
    """A JPEG 2 * DRAFT_MARGIN times the resized size is decoded at a reduced DCT scale; the result
    stays close to the full decode. Photos the size of the training sets' are never drafted."""
    ramp = np.add.outer(np.arange(1536), np.arange(2048)) / 3584 * 255
    photo = Image.fromarray(np.stack([ramp, 255 - ramp, ramp / 2], -1).astype(np.uint8))
    data = encode(photo, "JPEG", quality=90)
    assert decode_image(data, size=(32, 32)).size == (2048 // 8, 1536 // 8)  # 1/8 scale
    assert min(resized_size(2048, 1536, (32, 32))) * DRAFT_MARGIN <= 1536 // 8
    drafted = decode_or_error(data, (32, 32)).astype(int)
    full = np.asarray(resize_and_crop(decode_image(data), (32, 32))).transpose(2, 0, 1).astype(int)
    assert np.abs(drafted - full).mean() < 2 and np.abs(drafted - full).max() <= 8
    small = encode(photo.resize((500, 375)), "JPEG")
    assert decode_image(small, size=(96, 96)).size == (500, 375)


def test_a_file_decodes_like_its_upload(tmp_path: Path) -> None:
    path = tmp_path / "x.png"
    path.write_bytes(encode(Image.new("RGB", (50, 40), (7, 8, 9)), "PNG"))
    from_path, from_bytes = decode_batch([path], (32, 32)), decode_batch([path.read_bytes()], (32, 32))
    assert from_path.good == from_bytes.good == [0] and np.array_equal(from_path.pixels, from_bytes.pixels)


@pytest.mark.parametrize("data,code", [
    (b"", "empty_file"),
    (b"hello, not an image", "not_an_image"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 30, "corrupt_image"),
    (b"\xff\xd8\xff\xe0" + b"\x00" * 40, "corrupt_image"),
    (b"%PDF-1.4 nope", "not_an_image"),
])
def test_bad_bytes_get_a_stable_code(data: bytes, code: str) -> None:
    error = decode_or_error(data, (32, 32))
    assert isinstance(error, ImageError) and error.error == code


def test_truncated_files_are_corrupt_not_crashes() -> None:
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    for fmt in ("PNG", "JPEG", "GIF", "WEBP", "TIFF", "BMP"):
        data = encode(image, fmt)
        error = decode_or_error(data[: len(data) // 2], (32, 32))
        assert isinstance(error, ImageError) and error.error == "corrupt_image", fmt


if __name__ == "__main__":  # the figures of docs/RELIABILITY.md: python tests/test_preprocess.py
    import tempfile

    folder = Path(tempfile.mkdtemp())
    (folder / "warm").write_bytes(grey_png(40, 30))
    print("| input | header pixels | model | peak MB | bytes per pixel | bound MB |\n| --- | --- | --- | --- | --- | --- |")
    for name, data in peak_cases().items():
        (folder / name).write_bytes(data)
        with Image.open(folder / name) as opened:
            pixels = opened.size[0] * opened.size[1]
            per_pixel = FORMAT_BYTES_PER_PIXEL.get(opened.format, DECODE_BYTES_PER_PIXEL)
        for model, (size, _) in sorted(SIZES.items()):
            run = subprocess.run([sys.executable, "-c", PEAK_CHILD, str(folder / name), str(folder / "warm"), str(size)],
                                 cwd=REPO, capture_output=True, text=True, timeout=120)
            peak = int(run.stdout.rsplit(maxsplit=1)[1])
            print(f"| {name} ({len(data):,} B) | {pixels:,} | {model} | {peak / 2**20:.1f} | {peak / pixels:.2f} | "
                  f"{(per_pixel * pixels + DECODE_FIXED_BYTES) / 2**20:.1f} |")
