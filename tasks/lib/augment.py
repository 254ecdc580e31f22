"""Whole-batch augmentation and normalisation on the training device: random resized crop, flip, scaling and
mean/std as a few tensor ops over a uint8 NHWC batch, so the loop runs no per-image Python code.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

# torchvision's default lower bound of 0.08 suits 100-epoch ImageNet runs; a
# few epochs on a small dataset learn faster from gentler crops (train.min_crop_scale).
CROP_SCALE = (0.5, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)


def device_batch(batch: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, size: int,
                 generator: torch.Generator | None = None, channels_last: bool = False,
                 min_scale: float = CROP_SCALE[0], flip: bool = True) -> torch.Tensor:
    """uint8 NHWC batch on the device -> the network's normalised float input: with a generator, a random resized
    crop + flip to size x size; without, the central window (the arrays already hold the eval crop)."""
    x = to_float(batch, mean, std)
    x = random_resized_crop(x, size, generator, flip=flip, min_scale=min_scale) if generator is not None else center_crop(x, size)
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def to_float(batch: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC -> float32 NCHW, scaled to [0, 1] and normalised by mean/std (both shaped (3,))."""
    x = batch.permute(0, 3, 1, 2).float().div_(255.0)
    return (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def crop_params(n: int, generator: torch.Generator, scale: Sequence[float] = CROP_SCALE,
                ratio: Sequence[float] = CROP_RATIO, flip: bool = True) -> torch.Tensor:
    """Per-image affine matrices (n, 2, 3) in normalised coordinates: a random box, maybe mirrored. Drawn on
    the CPU from `generator` so the same seed gives the same crops on any device."""
    area = torch.empty(n).uniform_(scale[0], scale[1], generator=generator)
    log_ratio = torch.empty(n).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    aspect = torch.exp(log_ratio)
    # Width and height as fractions of the (square) source; clamped instead of torchvision's retry loop.
    width = torch.sqrt(area * aspect).clamp(max=1.0)
    height = torch.sqrt(area / aspect).clamp(max=1.0)
    # Centre anywhere the box still fits, in [-1, 1] coordinates.
    cx = (torch.rand(n, generator=generator) * 2 - 1) * (1 - width)
    cy = (torch.rand(n, generator=generator) * 2 - 1) * (1 - height)
    mirror = torch.ones(n)
    if flip:
        mirror = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = width * mirror
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = height
    theta[:, 1, 2] = cy
    return theta


def random_resized_crop(x: torch.Tensor, size: int, generator: torch.Generator, flip: bool = True,
                        min_scale: float = CROP_SCALE[0]) -> torch.Tensor:
    """Random resized crop (+ horizontal flip) of a float NCHW batch to size x size, in one grid_sample."""
    theta = crop_params(x.shape[0], generator, scale=(min_scale, 1.0), flip=flip)
    if x.is_cuda:  # pinned + non-blocking: a blocking copy would make the host wait for the previous step
        theta = theta.pin_memory().to(x.device, non_blocking=True)
    theta = theta.to(device=x.device, dtype=x.dtype)
    grid = F.affine_grid(theta, [x.shape[0], x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """The central size x size window of an NCHW batch (no-op when it already has that size)."""
    top = (x.shape[-2] - size) // 2
    left = (x.shape[-1] - size) // 2
    return x[..., top:top + size, left:left + size]
