"""Decoding one image safely into RGB. Torch-free: predict uses it too."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})


class BadImage(ValueError):
    """An image that cannot be used; `reason` is a short machine-readable tag."""

    def __init__(self, path: Path | str, reason: str, detail: str = "") -> None:
        self.path = str(path)
        self.reason = reason
        self.detail = detail
        super().__init__(f"{path}: {reason}" + (f" ({detail})" if detail else ""))


def is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def is_hidden(path: Path) -> bool:
    return path.name.startswith(".")


def load_rgb(path: Path | str, max_pixels: int = 89_478_485) -> Image.Image:
    """Open, fully decode, apply EXIF orientation and convert to 8-bit RGB.

    Raises BadImage with reason empty_file, not_an_image, decompression_bomb or
    truncated. The pixel limit is checked from the header, before decoding.
    """
    path = Path(path)
    if path.stat().st_size == 0:
        raise BadImage(path, "empty_file", "zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise BadImage(path, "decompression_bomb", f"{width}x{height} > {max_pixels} pixels")
                img.load()
                return to_rgb(ImageOps.exif_transpose(img))
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise BadImage(path, "decompression_bomb", str(err)) from None
    except UnidentifiedImageError:
        raise BadImage(path, "not_an_image", "Pillow cannot identify the format") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise BadImage(path, "truncated", str(err)) from None


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
