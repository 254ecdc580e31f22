"""Batch augmentation on the device: shapes, determinism, and the no-augmentation path."""

from __future__ import annotations

import numpy as np
import torch

from tasks.lib.augment import center_crop, crop_params, device_batch, random_resized_crop, to_float
from tasks.lib.preprocess import Preprocessing, normalize


def _batch(n: int = 4, side: int = 20) -> torch.Tensor:
    return torch.randint(0, 256, (n, side, side, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def test_to_float_matches_the_eval_normalisation() -> None:
    batch = _batch()
    prep = Preprocessing(crop_size=20, resize_size=20, mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.4))
    got = to_float(batch, torch.tensor(prep.mean), torch.tensor(prep.std))
    want = np.stack([normalize(img, prep) for img in batch.numpy()])
    np.testing.assert_allclose(got.numpy(), want, atol=1e-6)


def test_random_crops_are_deterministic_under_a_seed_and_vary_without_it() -> None:
    x = to_float(_batch(), torch.zeros(3), torch.ones(3))
    a = random_resized_crop(x, 16, torch.Generator().manual_seed(3))
    b = random_resized_crop(x, 16, torch.Generator().manual_seed(3))
    c = random_resized_crop(x, 16, torch.Generator().manual_seed(4))
    assert a.shape == (4, 3, 16, 16)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_full_crop_without_flip_is_the_image_and_flip_mirrors_it() -> None:
    x = to_float(_batch(n=2, side=8), torch.zeros(3), torch.ones(3))
    theta = crop_params(2, torch.Generator().manual_seed(0), scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False)
    assert torch.allclose(theta, torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]).expand(2, 2, 3))
    grid = torch.nn.functional.affine_grid(theta, [2, 3, 8, 8], align_corners=False)
    same = torch.nn.functional.grid_sample(x, grid, align_corners=False, padding_mode="border")
    assert torch.allclose(same, x, atol=1e-5)
    theta[:, 0, 0] = -1
    grid = torch.nn.functional.affine_grid(theta, [2, 3, 8, 8], align_corners=False)
    mirrored = torch.nn.functional.grid_sample(x, grid, align_corners=False, padding_mode="border")
    assert torch.allclose(mirrored, x.flip(-1), atol=1e-5)


def test_crop_boxes_stay_inside_the_image() -> None:
    theta = crop_params(1000, torch.Generator().manual_seed(0))
    width, height = theta[:, 0, 0].abs(), theta[:, 1, 1]
    assert (width <= 1).all() and (height <= 1).all()
    assert (theta[:, 0, 2].abs() + width <= 1 + 1e-6).all()
    assert (theta[:, 1, 2].abs() + height <= 1 + 1e-6).all()
    assert (theta[:, 0, 0] < 0).any() and (theta[:, 0, 0] > 0).any()   # both flipped and not


def test_device_batch_without_generator_is_the_center_crop_in_the_asked_layout() -> None:
    batch = _batch(side=20)
    out = device_batch(batch, torch.zeros(3), torch.ones(3), 16, None, channels_last=True)
    assert out.shape == (4, 3, 16, 16)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, center_crop(to_float(batch, torch.zeros(3), torch.ones(3)), 16))


def test_hflip_false_never_mirrors() -> None:
    assert (crop_params(500, torch.Generator().manual_seed(0), flip=False)[:, 0, 0] > 0).all()   # x scale > 0
    assert (crop_params(500, torch.Generator().manual_seed(0))[:, 0, 0] < 0).any()               # flips by default
    batch = torch.randint(0, 255, (4, 8, 8, 3), dtype=torch.uint8)
    mean, std = torch.zeros(3), torch.ones(3)
    a = device_batch(batch, mean, std, 8, torch.Generator().manual_seed(1), flip=False)
    b = device_batch(batch, mean, std, 8, torch.Generator().manual_seed(1), flip=True)
    assert not torch.equal(a, b)                              # the switch reaches the crop
