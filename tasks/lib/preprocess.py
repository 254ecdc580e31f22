"""Evaluation-time preprocessing, torch-free: the same function makes the network's input for evaluate, export
parity and predict, so they cannot drift apart. The settings travel in the checkpoint and the ONNX metadata.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


@dataclass(frozen=True)
class Preprocessing:
    """Resize the shorter side to resize_size, center-crop crop_size, scale to [0,1], normalise."""

    crop_size: int
    resize_size: int
    interpolation: str = "bilinear"
    mean: tuple[float, ...] = field(default=IMAGENET_MEAN)
    std: tuple[float, ...] = field(default=IMAGENET_STD)

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation {self.interpolation!r} is not one of {sorted(INTERPOLATIONS)}")
        if self.resize_size < self.crop_size:
            raise ValueError(f"resize_size {self.resize_size} is smaller than crop_size {self.crop_size}")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["mean"], data["std"] = list(self.mean), list(self.std)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        return cls(
            crop_size=int(data["crop_size"]),
            resize_size=int(data["resize_size"]),
            interpolation=str(data["interpolation"]),
            mean=tuple(float(v) for v in data["mean"]),
            std=tuple(float(v) for v in data["std"]),
        )


def imagenet_preprocessing(image_size: int, crop_pct: float = 1.0) -> Preprocessing:
    """ImageNet mean/std at the training size: what every supported architecture's pretrained weights expect
    (tasks.lib.models.default_preprocessing adds the architecture check; this stays free of torch)."""
    return Preprocessing(crop_size=image_size, resize_size=max(image_size, round(image_size / crop_pct)))


# Train images are kept this much larger than image_size so random crops have room.
TRAIN_MARGIN = 1.15


def train_preprocessing(prep: Preprocessing, margin: float = TRAIN_MARGIN) -> Preprocessing:
    """The eval preprocessing with a larger square crop: the source of random resized crops."""
    side = max(prep.crop_size, round(prep.crop_size * margin))
    return replace(prep, crop_size=side, resize_size=max(side, prep.resize_size))


# Up to this aspect ratio the whole image is resized (the output is at most
# this many times the crop's area); beyond it only the part that survives the
# center crop is resampled, so no resize ever grows with the input: a 1x300000
# PNG would otherwise be resized to 96x28,800,000 pixels (8 GB) for a 96 px crop.
WHOLE_RESIZE_MAX_ASPECT = 4.0


def resize_and_crop(img: Image.Image, prep: Preprocessing, *, resample_crop_only: bool = False) -> Image.Image:
    """Shorter side to resize_size (aspect kept), then the central crop_size square: torchvision's Resize +
    CenterCrop on PIL images. Longer images than WHOLE_RESIZE_MAX_ASPECT:1 resample only the crop's source region
    (Pillow's resize box: within 1 gray level of the whole resize); resample_crop_only does so for every image (a
    third less resampling at 4:3), for the decoded cache's JPEG draft mode, whose pixels are approximate anyway."""
    width, height = img.size
    scale = prep.resize_size / min(width, height)
    new_size = (max(prep.resize_size, round(width * scale)), max(prep.resize_size, round(height * scale)))
    left = (new_size[0] - prep.crop_size) // 2
    top = (new_size[1] - prep.crop_size) // 2
    if new_size == img.size:
        return img.crop((left, top, left + prep.crop_size, top + prep.crop_size))
    crop_only = resample_crop_only and prep.interpolation != "nearest"   # nearest picks other pixels in a box
    if crop_only or max(new_size) > WHOLE_RESIZE_MAX_ASPECT * prep.resize_size:
        sx, sy = width / new_size[0], height / new_size[1]
        box = (left * sx, top * sy, (left + prep.crop_size) * sx, (top + prep.crop_size) * sy)
        return img.resize((prep.crop_size, prep.crop_size), INTERPOLATIONS[prep.interpolation], box=box)
    img = img.resize(new_size, INTERPOLATIONS[prep.interpolation])
    return img.crop((left, top, left + prep.crop_size, top + prep.crop_size))


def normalize(pixels: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """uint8 HWC -> float32 CHW, scaled to [0,1] and normalised by mean/std."""
    array = pixels.astype(np.float32) / 255.0
    array = (array - np.asarray(prep.mean, np.float32)) / np.asarray(prep.std, np.float32)
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def preprocess(img: Image.Image, prep: Preprocessing) -> np.ndarray:
    """An RGB PIL image to the float32 (3, crop, crop) array the network takes."""
    return normalize(np.asarray(resize_and_crop(img, prep), dtype=np.uint8), prep)
