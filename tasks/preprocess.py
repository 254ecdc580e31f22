"""Evaluation-time preprocessing, shared by PyTorch and the ONNX predict command.

Torch-free on purpose: the same function turns a PIL image into the network's
input for evaluate, export parity and predict, so the three cannot drift apart.
The settings travel inside the checkpoint and the ONNX metadata.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
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


def resize_and_crop(img: Image.Image, prep: Preprocessing) -> Image.Image:
    """Shorter side to resize_size (aspect kept), then the central crop_size square."""
    width, height = img.size
    scale = prep.resize_size / min(width, height)
    new_size = (max(prep.resize_size, round(width * scale)), max(prep.resize_size, round(height * scale)))
    if new_size != img.size:
        img = img.resize(new_size, INTERPOLATIONS[prep.interpolation])
    left = (new_size[0] - prep.crop_size) // 2
    top = (new_size[1] - prep.crop_size) // 2
    return img.crop((left, top, left + prep.crop_size, top + prep.crop_size))


def normalize(pixels: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """uint8 HWC -> float32 CHW, scaled to [0,1] and normalised by mean/std."""
    array = pixels.astype(np.float32) / 255.0
    array = (array - np.asarray(prep.mean, np.float32)) / np.asarray(prep.std, np.float32)
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def preprocess(img: Image.Image, prep: Preprocessing) -> np.ndarray:
    """An RGB PIL image to the float32 (3, crop, crop) array the network takes."""
    return normalize(np.asarray(resize_and_crop(img, prep), dtype=np.uint8), prep)
