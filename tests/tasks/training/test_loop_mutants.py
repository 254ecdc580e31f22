"""The training loop's augmented batches honour train.hflip and train.channels_last.

A dataset where a mirror changes the label (text, arrows, left/right body parts) sets `hflip: false`;
with it true, about half of every augmented batch is mirrored. Each image here is dark on its left
half and bright on its right, so a crop shows whether it was mirrored, whatever its box.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from tasks.lib.config import TrainParams
from tasks.lib.image_cache import MappedImages
from tasks.training.loop import Data, Run, image_batch
from tasks.training.runtime import Runtime

N, SIDE, SIZE = 64, 40, 32


def dark_left_bright_right() -> np.ndarray:
    """N uint8 NHWC images: the columns left of the middle near black, those right of it near white."""
    rng = np.random.default_rng(3)
    images = np.empty((N, SIDE, SIDE, 3), dtype=np.uint8)
    images[:, :, : SIDE // 2] = rng.integers(0, 40, (N, SIDE, SIDE // 2, 3))
    images[:, :, SIDE // 2:] = rng.integers(215, 256, (N, SIDE, SIDE // 2, 3))
    return images


def augmented_batch(**settings: object) -> torch.Tensor:
    images = MappedImages(dark_left_bright_right(), False)
    labels = torch.zeros(N, dtype=torch.long)
    data = Data(train_eval=images, train_margin=images, train_y=labels, val_x=images, val_y=labels,
                mean=torch.tensor([0.485, 0.456, 0.406]), std=torch.tensor([0.229, 0.224, 0.225]), num_classes=2)
    cfg = TrainParams(image_size=SIZE, batch_size=N, device="cpu", **settings)
    run = Run(cfg, Runtime(torch.device("cpu"), None), data, nn.Identity())
    return image_batch(run, torch.arange(N), torch.Generator().manual_seed(0)).x


def mirrored(x: torch.Tensor) -> torch.Tensor:
    """Per image: is its left edge brighter than its right edge (only a mirror does that here)?"""
    return x[:, :, :, 0].mean(dim=(1, 2)) > x[:, :, :, -1].mean(dim=(1, 2))


@pytest.mark.parametrize("min_crop_scale", [0.5, 1.0])
def test_hflip_false_mirrors_no_image_and_true_mirrors_about_half(min_crop_scale: float) -> None:
    kept = augmented_batch(hflip=False, min_crop_scale=min_crop_scale, channels_last=False)
    assert not mirrored(kept).any()
    flipped = int(mirrored(augmented_batch(hflip=True, min_crop_scale=min_crop_scale, channels_last=False)).sum())
    assert 16 <= flipped <= 48, f"{flipped} of {N} mirrored with train.hflip: true; a fair coin gives about half"


@pytest.mark.parametrize("channels_last", [False, True])
def test_augmented_batches_have_the_memory_layout_train_channels_last_asks_for(channels_last: bool) -> None:
    x = augmented_batch(hflip=False, min_crop_scale=0.5, channels_last=channels_last)
    assert x.shape == (N, 3, SIZE, SIZE)
    assert x.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert x.is_contiguous() != channels_last
