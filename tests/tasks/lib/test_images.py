"""Reading images safely: supported formats only, bounded reads, pixel and aspect limits, bounded resizes."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks.lib.cli import stage_main
from tasks.lib.images import BadImage, ImageLimits, load_rgb, read_file, set_image_limits
from tasks.lib.preprocess import INTERPOLATIONS, Preprocessing, resize_and_crop
from tests.conftest import REPO_ROOT
from tests.realistic import oracle_resize_crop, oracle_rgb, write_realistic_folder

# A minimal Encapsulated PostScript file: Pillow's EPS plugin would hand it to Ghostscript.
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n%%EndComments\nnewpath 0 0 moveto 10 10 lineto stroke\nshowpage\n%%EOF\n"


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def zero_png(width: int, height: int, rows_per_block: int = 64) -> bytes:
    """A real, valid grayscale PNG of zeros, built without ever holding its pixels.

    Each block of rows is deflated once and repeated (a full flush makes the
    blocks independent), so a 16384x16384 image (268 M pixels) is ~260 KB and
    takes a fraction of a second to write.
    """
    block = bytes((width + 1) * rows_per_block)           # filter byte 0 + zero pixels, per row
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    segment = compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH)
    n_blocks = height // rows_per_block
    adler = 1
    for _ in range(n_blocks):
        adler = zlib.adler32(block, adler)
    stream = b"\x78\xda" + segment * n_blocks + compressor.flush(zlib.Z_FINISH) + struct.pack(">I", adler)
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", stream)
            + png_chunk(b"IEND", b""))


def reference_resize_and_crop(img: Image.Image, prep: Preprocessing) -> Image.Image:
    """The resize before it was bounded: the whole image to the new size, then the center crop."""
    width, height = img.size
    scale = prep.resize_size / min(width, height)
    new_size = (max(prep.resize_size, round(width * scale)), max(prep.resize_size, round(height * scale)))
    if new_size != img.size:
        img = img.resize(new_size, INTERPOLATIONS[prep.interpolation])
    left = (new_size[0] - prep.crop_size) // 2
    top = (new_size[1] - prep.crop_size) // 2
    return img.crop((left, top, left + prep.crop_size, top + prep.crop_size))


def run_limited(code: str, memory_mb: int) -> subprocess.CompletedProcess:
    """Run python code in a child whose address space is capped: a resize that grows with its input fails there."""
    limit = f"import resource; resource.setrlimit(resource.RLIMIT_AS, ({memory_mb << 20}, {memory_mb << 20}))\n"
    return subprocess.run([sys.executable, "-c", limit + code], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"})


def test_resize_and_crop_is_unchanged_on_normal_images() -> None:
    rng = np.random.default_rng(0)
    for trial in range(150):
        width, height = int(rng.integers(20, 700)), int(rng.integers(20, 700))
        if max(width, height) > 3.5 * min(width, height):
            continue
        crop = int(rng.integers(16, 128))
        prep = Preprocessing(crop, crop + int(rng.integers(0, 40)), list(INTERPOLATIONS)[trial % 4])
        img = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        np.testing.assert_array_equal(np.asarray(resize_and_crop(img, prep)),
                                      np.asarray(reference_resize_and_crop(img, prep)), err_msg=f"{img.size} {prep}")


def test_resampling_only_the_crop_is_within_one_gray_level_and_exact_when_nothing_is_cropped() -> None:
    rng = np.random.default_rng(2)
    for trial in range(60):
        width, height = int(rng.integers(40, 500)), int(rng.integers(40, 500))
        prep = Preprocessing(32, 32 + int(rng.integers(0, 12)), ("bilinear", "bicubic", "lanczos")[trial % 3])
        img = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        got = np.asarray(resize_and_crop(img, prep, resample_crop_only=True), np.int16)
        assert np.abs(got - np.asarray(reference_resize_and_crop(img, prep))).max() <= 1, f"{img.size} {prep}"
    square = Image.fromarray(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8))   # Fashion-MNIST's shape
    np.testing.assert_array_equal(np.asarray(resize_and_crop(square, Preprocessing(96, 96), resample_crop_only=True)),
                                  np.asarray(reference_resize_and_crop(square, Preprocessing(96, 96))))


def test_resize_of_a_very_long_image_is_bounded_by_the_output_and_close_to_the_whole_resize() -> None:
    code = ("from PIL import Image\nfrom tasks.lib.preprocess import Preprocessing, resize_and_crop\n"
            "out = resize_and_crop(Image.new('RGB', (1, 300000), 'red'), Preprocessing(96, 110))\n"
            "print(out.size, out.getpixel((5, 5)))\n")
    proc = run_limited(code, memory_mb=1500)       # the whole resize needs 110x33,000,000x3 bytes (~11 GB)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "(96, 96) (255, 0, 0)"
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (60, 700, 3), dtype=np.uint8))   # 11.7:1, cropped first
    prep = Preprocessing(32, 40)
    got, want = np.asarray(resize_and_crop(img, prep), np.int16), np.asarray(reference_resize_and_crop(img, prep))
    assert np.abs(got - want).max() <= 1


def test_extreme_aspect_ratio_is_rejected_from_the_header(tmp_path: Path) -> None:
    path = tmp_path / "thin.png"
    Image.new("L", (1, 300000)).save(path, optimize=True)
    assert path.stat().st_size < 2000
    with pytest.raises(BadImage) as err:
        load_rgb(path)
    assert err.value.reason == "extreme_aspect_ratio" and "1x300000" in str(err.value)
    assert load_rgb(path, max_aspect_ratio=400000).size == (1, 300000)


def test_eps_named_jpg_is_not_an_image_and_never_reaches_ghostscript(tmp_path: Path) -> None:
    path = tmp_path / "drawing.jpg"
    path.write_bytes(EPS)
    with Image.open(path) as img:       # Pillow alone would take it as EPS
        assert img.format == "EPS"
    with pytest.raises(BadImage) as err:
        load_rgb(path)
    assert err.value.reason == "not_an_image" and "JPEG" in err.value.detail


def test_special_files_are_refused_without_reading(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)                     # no writer: a blocking open or read would hang here
    for path, kind in ((fifo, "FIFO"), (Path("/dev/zero"), "character device"), (tmp_path, "folder")):
        with pytest.raises(BadImage) as err:
            read_file(path)
        assert err.value.reason == "not_a_regular_file" and err.value.detail == kind


def test_files_over_the_byte_limit_are_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    Image.new("RGB", (64, 64), "blue").save(path)
    with pytest.raises(BadImage) as err:
        load_rgb(path, max_file_bytes=100)
    assert err.value.reason == "file_too_large"
    assert load_rgb(path, max_file_bytes=path.stat().st_size).size == (64, 64)


def test_max_pixels_above_pillows_own_limit_takes_effect(tmp_path: Path) -> None:
    path = tmp_path / "wide.png"
    path.write_bytes(zero_png(9600, 9600))      # 92 M pixels: over Pillow's default 89.5 M, under ours
    img = load_rgb(path, max_pixels=100_000_000)
    assert img.size == (9600, 9600)
    with pytest.raises(BadImage, match="decompression_bomb"):
        load_rgb(path, max_pixels=50_000_000)


@pytest.mark.timeout(60)
def test_a_real_decompression_bomb_is_rejected_at_the_default_limit_without_decoding(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(zero_png(16384, 16384))            # 268 M pixels, ~260 KB on disk
    assert path.stat().st_size < 400_000
    code = (f"from tasks.lib.images import BadImage, load_rgb\n"
            f"try:\n    load_rgb({str(path)!r})\nexcept BadImage as err:\n    print(err.reason)\n")
    proc = run_limited(code, memory_mb=700)     # decoding needs 268 MB of L plus 805 MB of RGB
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "decompression_bomb"


def test_every_stage_sets_pillows_limit_from_the_params(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)    # restored after the test
    path = tmp_path / "wide.png"
    path.write_bytes(zero_png(9600, 9600))                                    # 92 M pixels
    sizes = []

    def stage(params: object) -> None:       # decodes as evaluate and export do: no explicit limit
        sizes.append(load_rgb(path).size)

    params = ["--params", str(REPO_ROOT / "params.yaml")]
    assert stage_main(stage, "a stage", [*params, "-S", "prepare.max_pixels=100000000"]) == 0
    assert sizes == [(9600, 9600)]
    with pytest.raises(BadImage, match="decompression_bomb"):
        stage_main(stage, "a stage", params)                                  # the default 89.5 M


def test_every_stage_reads_images_with_prepares_aspect_and_size_limits(tmp_path: Path) -> None:
    """An image prepare accepted under raised limits is readable by evaluate and export, which name none."""
    path = tmp_path / "strip.png"
    Image.new("RGB", (800, 10), "white").save(path)                            # 80:1
    seen = []
    params = ["--params", str(REPO_ROOT / "params.yaml")]
    try:
        assert stage_main(lambda p: seen.append(load_rgb(path).size), "a stage",
                          [*params, "-S", "prepare.max_aspect_ratio=100"]) == 0
        assert seen == [(800, 10)]
        with pytest.raises(BadImage, match="file_too_large"):
            stage_main(lambda p: load_rgb(path), "a stage", [*params, "-S", "prepare.max_file_bytes=100"])
    finally:
        set_image_limits(ImageLimits())
    with pytest.raises(BadImage, match="extreme_aspect_ratio"):
        load_rgb(path)                                                        # outside a stage: the defaults


# --------------------------------------------------------------------------- non-square images of every kind


@pytest.mark.parametrize(("crop_size", "resize_size"), [(24, 24), (24, 32), (16, 16)])
def test_the_network_sees_the_centre_of_the_image_at_its_own_aspect(tmp_path: Path, crop_size: int,
                                                                     resize_size: int) -> None:
    """What the ONNX metadata's resize_policy promises a consumer ("resize the shorter side, keep aspect,
    center-crop"), on RGB JPEGs, grayscale and half-transparent PNGs wider and taller than square,
    against an oracle written from that sentence. Squashing to a square, resizing the longer side
    or cropping a corner gives other pixels on every one of these images."""
    written = write_realistic_folder(tmp_path, per_class=6)
    assert {w.kind.mode for w in written} == {"RGB", "L", "RGBA"} and len({w.size for w in written}) >= 5
    prep = Preprocessing(crop_size, resize_size)
    for item in written:
        rgb = oracle_rgb(tmp_path / item.path)
        got = np.asarray(resize_and_crop(load_rgb(tmp_path / item.path), prep), np.int16)
        want = oracle_resize_crop(rgb, crop_size, resize_size)
        # Alpha onto white: Pillow's integer compositing and the oracle's float one may differ by a level.
        tolerance = 1 if item.kind.mode == "RGBA" else 0
        assert np.abs(got - want).max() <= tolerance, f"{item.path} ({item.kind}, {item.size})"
        squashed = np.asarray(Image.fromarray(rgb).resize((crop_size, crop_size), Image.Resampling.BILINEAR))
        assert np.abs(got - squashed).max() > 10, f"{item.path}: squashing would pass this check"


def test_grayscale_and_transparent_images_become_the_rgb_a_viewer_shows(tmp_path: Path) -> None:
    """A grayscale scan is three equal channels; a half-transparent PNG is its colour blended onto white
    (not onto black, and not its colour with the alpha dropped)."""
    gray, rgba = tmp_path / "scan 1.png", tmp_path / "logo (2).png"
    Image.new("L", (45, 30), 107).save(gray)
    Image.new("RGBA", (30, 75), (30, 160, 40, 200)).save(rgba)
    assert np.asarray(load_rgb(gray)).reshape(-1, 3).tolist() == [[107, 107, 107]] * (45 * 30)
    blended = [round(c * 200 / 255 + 255 * 55 / 255) for c in (30, 160, 40)]     # [78, 180, 86]
    assert np.abs(np.asarray(load_rgb(rgba), np.int16) - blended).max() <= 1
    np.testing.assert_array_equal(np.asarray(load_rgb(rgba)), oracle_rgb(rgba))
