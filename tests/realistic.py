"""Image folders shaped like a user's, for tests where a tidy fixture would hide the bug.

`class_0..class_N`, square PNGs and one image kind let several wrong behaviours give the
right answer: any sort order of `class_i` is the same list, a square image squashed or
cropped gives the same pixels, and one decoder path is all that runs. Here:

- class names that sort differently by code point (what prepare promises: Python's
  `sorted()`), case-insensitively, "naturally" (2 before 10) and by locale (Äpfel
  beside apple), with spaces, digits, capitals and non-ASCII letters;
- file names with spaces, a comma, a quote, brackets, non-ASCII letters and an
  upper-case suffix (the split files are CSV; paths must come back byte for byte);
- non-square images of several sizes, wider and taller, as RGB JPEG, grayscale PNG,
  half-transparent RGBA PNG and RGB PNG;
- each class a colour apart from the others in hue and in gray level, so a small model
  learns it from any of the kinds (a grayscale image keeps only the gray level).

Importable by any test: `from tests.realistic import write_realistic_folder`.
"""

from __future__ import annotations

import re
import unicodedata
from fractions import Fraction
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# In code-point order, which is the order prepare writes classes.json in.
CLASS_NAMES = ("10 items", "2 items", "Zebra", "apple", "Äpfel", "éclair")

# One colour per class (same order): hues apart, and gray levels 25, 64, 108, 145, 187, 223
# (ITU-R 601 luma, what Pillow's convert("L") computes), so grayscale images stay separable.
COLOURS = ((20, 15, 90), (190, 10, 10), (30, 160, 40), (200, 100, 230), (80, 230, 250), (250, 235, 90))

# (width, height): wider and taller than square, none square, so resize + center crop differs
# from squashing, from resizing the longer side and from an off-centre crop. Ratios 2:1, 5:2, 5:4,
# 3:2 and 7:4: at 16, 24 or 32 px (shorter side) the longer side scales to a whole number of
# pixels and the crop's offset is whole too, so an independent resize + center crop (a test's
# oracle) has one right answer, with no rounding convention to agree on.
SIZES = ((60, 30), (30, 75), (40, 50), (45, 30), (32, 56), (84, 48))

NOISE = 12           # +- per channel: textured, yet far from the next class's gray level (~40 apart)
BAND = 40            # how much darker the top and left quarters are
ALPHA = 200          # half-transparent RGBA images: composited on white, they get lighter


@dataclass(frozen=True)
class Kind:
    """How one image is stored: file suffix, Pillow mode, format."""

    suffix: str
    mode: str

    def save(self, img: Image.Image, path: Path) -> None:
        if self.suffix.lower() in (".jpg", ".jpeg"):
            img.convert("RGB").save(path, format="JPEG", quality=92)
        else:
            img.save(path, format="PNG")


KINDS = (Kind(".jpg", "RGB"), Kind(".png", "L"), Kind(".png", "RGBA"), Kind(".JPG", "RGB"), Kind(".png", "RGB"),
         Kind(".jpeg", "RGB"))

# File-name stems a camera, a scanner or a person would give; "{i}" makes each unique.
STEMS = ("IMG_{i:04d}", "photo {i}", "scan ({i})", "ñandú-{i}", "shot,{i}", "it's {i}", "Résumé {i}", "x{i}")


def make_image(size: tuple[int, int], colour: Sequence[int], mode: str, rng: np.random.Generator) -> Image.Image:
    """The class colour with per-pixel noise, darker across the top quarter and down the left quarter: an
    image with a top and a left, so squashing, an off-centre crop or a crop of the longer side's wrong
    end gives other pixels than the central crop."""
    width, height = size
    pixels = np.asarray(colour, np.int16) + rng.integers(-NOISE, NOISE + 1, (height, width, 3))
    pixels[: max(1, height // 4)] -= BAND
    pixels[:, : max(1, width // 4)] -= BAND
    rgb = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    if mode == "RGBA":
        rgb.putalpha(ALPHA)
        return rgb
    return rgb.convert(mode)


@dataclass(frozen=True)
class Written:
    """One file of a realistic folder: where it is (relative to the folder), its class, how it is stored."""

    path: str
    label_name: str
    kind: Kind
    size: tuple[int, int]


def write_realistic_folder(root: Path, classes: Sequence[str] = CLASS_NAMES, per_class: int = 8,
                           seed: int = 0) -> list[Written]:
    """An ImageFolder at root: one sub-folder per class name, per_class images each, every kind and size mixed.

    Returns what was written, in writing order (not sorted: a test must not learn the
    order it checks from here). Classes past len(COLOURS) reuse colours (fine for prepare,
    not for a test that needs a model to tell them apart).
    """
    rng = np.random.default_rng(seed)
    written = []
    for c, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            kind = KINDS[(i + c) % len(KINDS)]
            size = SIZES[(i + 2 * c) % len(SIZES)]
            stem = STEMS[(i + c) % len(STEMS)].format(i=i)
            path = folder / f"{stem}{kind.suffix}"
            kind.save(make_image(size, COLOURS[c % len(COLOURS)], kind.mode, rng), path)
            written.append(Written(f"{name}/{path.name}", name, kind, size))
    return written


# --------------------------------------------------------------------------- orders a bug might use instead


def natural_key(name: str) -> list[object]:
    """'2 items' before '10 items': what a file browser shows."""
    return [int(part) if part.isdigit() else part.casefold() for part in re.split(r"(\d+)", name)]


def wrong_orders(names: Sequence[str]) -> dict[str, list[str]]:
    """Orders a refactor could sort class names in by mistake; for CLASS_NAMES each differs from sorted()
    (the tests that use them check that, so the fixture cannot lose its point)."""
    return {
        "case-insensitive": sorted(names, key=str.casefold),
        "natural": sorted(names, key=natural_key),
        "dictionary (locale-like)": sorted(names, key=dictionary_key),
        "reversed": sorted(names, reverse=True),
    }


def dictionary_key(name: str) -> str:
    """Accents and case ignored (Äpfel beside apple): roughly what a locale's collation does."""
    decomposed = unicodedata.normalize("NFKD", name)
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch)).casefold()


# --------------------------------------------------------------------------- an oracle for the network's input
#
# What the preprocessing metadata promises, written from that sentence and no project code:
# decode, EXIF-orient, alpha onto white; resize the shorter side to resize_size keeping the
# aspect; take the central crop_size square; scale to [0, 1], subtract mean, divide by std;
# channels first.

RESAMPLING = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
              "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}


def oracle_rgb(path: Path) -> np.ndarray:
    """uint8 (H, W, 3): decoded with Pillow, upright, transparency composited on white in float arithmetic."""
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        if "A" not in img.getbands():
            return np.asarray(img.convert("RGB"))
        rgba = np.asarray(img.convert("RGBA"), np.float64)
    alpha = rgba[..., 3:] / 255.0
    return np.rint(rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)


def oracle_resize_crop(rgb: np.ndarray, crop_size: int, resize_size: int, interpolation: str = "bilinear"
                       ) -> np.ndarray:
    """uint8 (crop, crop, 3): shorter side to resize_size (the longer in proportion), then the central square.

    The realistic SIZES scale to whole pixels; a size that would need rounding is refused
    here rather than answered by a rounding rule copied from the code under test. A crop
    whose margin is odd leaves the extra pixel after it (the margin before is floored;
    torchvision's CenterCrop rounds half to even instead: both are centred to half a pixel).
    """
    height, width = rgb.shape[:2]
    scale = Fraction(resize_size, min(width, height))
    new_width, new_height = width * scale, height * scale
    assert new_width.denominator == new_height.denominator == 1, f"{width}x{height} does not scale to whole pixels"
    resized = np.asarray(Image.fromarray(rgb).resize((int(new_width), int(new_height)), RESAMPLING[interpolation]))
    top, left = (int(new_height) - crop_size) // 2, (int(new_width) - crop_size) // 2
    return resized[top:top + crop_size, left:left + crop_size]


def oracle_input(path: Path, prep: dict) -> np.ndarray:
    """float32 (3, crop, crop): the network's input for one file, from the preprocessing's recorded settings
    (a dict as the checkpoint and the ONNX metadata hold it)."""
    pixels = oracle_resize_crop(oracle_rgb(path), int(prep["crop_size"]), int(prep["resize_size"]),
                                str(prep["interpolation"]))
    scaled = (pixels.astype(np.float64) / 255.0 - np.asarray(prep["mean"])) / np.asarray(prep["std"])
    return scaled.transpose(2, 0, 1).astype(np.float32)
