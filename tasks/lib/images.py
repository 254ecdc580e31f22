"""Reading and decoding one image file safely into RGB. Torch-free: predict uses it too.

Every decode goes through here, with the same limits (`ImageLimits`): only regular files are read (opened
non-blocking, checked with fstat), at most `max_file_bytes` of them; only the formats of IMAGE_SUFFIXES are
decoded, whatever the name says; pixels and aspect ratio are checked from the header before decoding; and given
the sha256 prepare recorded, the bytes must hash to it before they are decoded. docs/data.md lists the reasons.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
# The Pillow decoders of those suffixes; no other decoder is ever tried.
IMAGE_FORMATS = ("JPEG", "PNG", "BMP", "GIF", "TIFF", "WEBP", "PPM")

# What load_rgb makes of a file before the model's own preprocessing: stated in every ONNX file's metadata
# (tasks.export) and done by the model card's onnxruntime snippet (tasks.handoff.card), which
# tests/tasks/handoff/test_card_snippet.py checks against predict on each kind of image named here.
INPUT_CONTRACT = {
    "exif_orientation": "applied (Pillow ImageOps.exif_transpose) before anything else",
    "alpha": "composited on white: RGBA, LA, PA, and P (palette) images with transparency",
    "high_bit_depth": "16- and 32-bit grey (I;16, I, F) scaled to 8 bits by the type's range, not clipped: "
                      "I;16 / 65535, I / 65535 when any value is over 255 else / 255, F as 0..1",
    "color_mode": "8-bit RGB; every other mode (L, 1, CMYK, P without transparency) by Pillow's convert('RGB')",
}

DEFAULT_MAX_PIXELS = 89_478_485            # Pillow's own default
DEFAULT_MAX_ASPECT_RATIO = 50.0
DEFAULT_MAX_FILE_BYTES = 256 * 2**20


class BadImage(ValueError):
    """An image that cannot be used; `reason` is a short machine-readable tag."""

    def __init__(self, path: Path | str, reason: str, detail: str = "") -> None:
        self.path = str(path)
        self.reason = reason
        self.detail = detail
        super().__init__(f"{path}: {reason}" + (f" ({detail})" if detail else ""))


@dataclass(frozen=True)
class ImageLimits:
    """What a file may be before it is decoded: bytes on disk, pixels and aspect ratio from the header."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES


def is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def read_file(path: Path | str, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> tuple[bytes, os.stat_result]:
    """The file's bytes and the stat of the descriptor they were read from; BadImage not_a_regular_file,
    file_too_large or empty_file instead of reading such files.

    O_NONBLOCK: a FIFO opens at once instead of waiting for a writer; fstat of the open descriptor: a file
    swapped for a FIFO or a device after an earlier check is still refused."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise BadImage(path, "not_a_regular_file", file_kind(info.st_mode))
        if info.st_size > max_file_bytes:
            raise BadImage(path, "file_too_large", f"{info.st_size} bytes > {max_file_bytes}")
        data = _read_at_most(fd, max_file_bytes + 1)
    finally:
        os.close(fd)
    if len(data) > max_file_bytes:   # grew while being read
        raise BadImage(path, "file_too_large", f"more than {max_file_bytes} bytes")
    if not data:
        raise BadImage(path, "empty_file", "zero bytes")
    return data, info


def _read_at_most(fd: int, limit: int) -> bytes:
    chunks, left = [], limit
    while left > 0 and (chunk := os.read(fd, min(left, 1 << 24))):
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def file_kind(mode: int) -> str:
    """A short name of a non-regular file's type, for reports."""
    kinds = ((stat.S_ISDIR, "folder"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"),
             (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"), (stat.S_ISLNK, "symbolic link"))
    return next((name for test, name in kinds if test(mode)), "special file")


def open_checked(data: bytes, path: Path | str, limits: ImageLimits) -> Image.Image:
    """Identify the format (supported ones only) and check pixels and aspect ratio from the header, decoding
    nothing yet; BadImage not_an_image, decompression_bomb or extreme_aspect_ratio."""
    Image.MAX_IMAGE_PIXELS = limits.max_pixels    # Pillow's own bomb limit follows ours
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise BadImage(path, "decompression_bomb", str(err)) from None
    except UnidentifiedImageError:
        raise BadImage(path, "not_an_image", f"not one of the supported formats ({', '.join(IMAGE_FORMATS)})") \
            from None
    except (OSError, SyntaxError, ValueError) as err:
        raise BadImage(path, "truncated", str(err)) from None
    width, height = img.size
    if width * height > limits.max_pixels:
        raise BadImage(path, "decompression_bomb", f"{width}x{height} > {limits.max_pixels} pixels")
    if max(width, height) > limits.max_aspect_ratio * max(min(width, height), 1):
        raise BadImage(path, "extreme_aspect_ratio", f"{width}x{height} is more than {limits.max_aspect_ratio:g}:1")
    return img


_process_limits = ImageLimits()


def set_image_limits(limits: ImageLimits) -> None:
    """The limits every decode in this process uses unless it names its own: each stage sets them from
    prepare's params (tasks.lib.cli.stage_main), so evaluate and export accept exactly what prepare accepted."""
    global _process_limits
    _process_limits = limits
    Image.MAX_IMAGE_PIXELS = limits.max_pixels


def image_limits() -> ImageLimits:
    return _process_limits


def decode(img: Image.Image, path: Path | str) -> Image.Image:
    """Decode the pixel data fully (what `open_checked` returned); BadImage truncated when it fails."""
    try:
        img.load()
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise BadImage(path, "truncated", str(err)) from None
    return img


def decode_rgb(data: bytes, path: Path | str, limits: ImageLimits = ImageLimits(),
               draft_size: int | None = None) -> Image.Image:
    """Checked, fully decoded, EXIF-oriented 8-bit RGB image from a file's bytes.

    draft_size: let a JPEG decode at 1/2, 1/4 or 1/8 scale (Pillow's `draft`) while both sides stay at least
    draft_size: much faster, and the pixels differ slightly from a full decode followed by the same resize."""
    img = open_checked(data, path, limits)
    if draft_size and img.format in ("JPEG", "MPO"):   # MPO: multi-picture JPEG from cameras
        img.draft(None, (draft_size, draft_size))
    decode(img, path)
    ImageOps.exif_transpose(img, in_place=True)       # in place: no copy of an upright image (5% of decode_cache)
    return to_rgb(img)


def load_rgb(path: Path | str, max_pixels: int | None = None, *, max_aspect_ratio: float | None = None,
             max_file_bytes: int | None = None, draft_size: int | None = None,
             sha256: str | None = None) -> Image.Image:
    """Read, check, fully decode, apply EXIF orientation and convert to 8-bit RGB; BadImage when the file is bad.

    A limit left None is the process's (prepare's params in a stage, the defaults elsewhere). sha256: the
    content hash the file must have; the bytes decoded are the bytes hashed, so pixels stored under that hash
    are that file's, whatever happens to it meanwhile.
    """
    limits = ImageLimits(max_pixels or Image.MAX_IMAGE_PIXELS or DEFAULT_MAX_PIXELS,
                         max_aspect_ratio or _process_limits.max_aspect_ratio,
                         max_file_bytes or _process_limits.max_file_bytes)
    data = read_file(path, limits.max_file_bytes)[0]
    if sha256 is not None:
        check_content(data, path, sha256)
    return decode_rgb(data, path, limits, draft_size)


def check_content(data: bytes, path: Path | str, sha256: str) -> None:
    """BadImage changed_since_prepare unless the bytes hash to sha256 (hex, as the split files hold it)."""
    actual = hashlib.sha256(data).hexdigest()
    if actual != sha256.lower():
        raise BadImage(path, "changed_since_prepare", f"its sha256 is {actual}, prepare recorded {sha256}")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any mode (1, L, LA, P, RGBA, CMYK, I;16, I, F) to RGB; alpha is composited on white."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return _high_depth_to_rgb(img)
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _high_depth_to_rgb(img: Image.Image) -> Image.Image:
    """Scale 16-bit / int / float grayscale to 8 bits by the type's range, not by min-max."""
    array = np.asarray(img)
    if img.mode.startswith("I;16"):
        scaled = array.astype(np.float64) / 65535.0
    elif img.mode == "I":
        scaled = array.astype(np.float64) / (65535.0 if array.max(initial=0) > 255 else 255.0)
    else:
        scaled = array.astype(np.float64)
    gray = np.clip(np.rint(scaled * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(gray, mode="L").convert("RGB")
